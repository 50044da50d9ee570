"""Writes tests/data/timm_randaugment_ops.npz: timm's RandAugment outputs for tests/test_randaugment.py.

How it was produced (timm 0.3.2, the version facebookresearch/deit pins; Pillow 13.0.0, numpy 2.4.6):

  pip download timm==0.3.2 --no-deps -d /tmp/ra_scratch
  python tests/data/make_timm_randaugment_golden.py /tmp/ra_scratch/timm-0.3.2-py3-none-any.whl

Only `timm/data/auto_augment.py` is taken from the wheel and loaded by file path (it needs just PIL, numpy,
random, math, re: no torch, and timm itself is not installed). Two kinds of cases:

- "op_*": every op of both RandAugment lists (timm's `AugmentOp(name, prob=1, magnitude=m)` with
  magnitude_std 0, DeiT's hparams: img_mean (124, 116, 104), BICUBIC) at magnitudes OP_MAGNITUDES, each
  signed op with both signs (python `random` seeded so that `random.random() > 0.5` is the stored `negate`),
  on a 3-channel and a 1-channel image (the 1-channel one with img_mean 115, the fill our code uses for
  grayscale: timm's 3-tuple fill makes Pillow 13 raise on "L" images).
- "e2e_*": timm's whole `rand_augment_transform(policy, hparams)` with its random sources (numpy's global RNG
  for the op choice, python `random` for prob/gauss/sign) replaced by shims that draw from one
  `np.random.default_rng(seed)` exactly as `diffaug_jax.data.randaugment.sample_ops` documents: so our
  `rand_augment(image, default_rng(seed), params)` must reproduce it exactly.

Pillow 13 raises for `ImageOps.posterize(img, 0)` (PosterizeIncreasing at magnitude 10, Posterize below 2.5),
where Pillow <= 12 (e.g. 8.4.0 of DeiT's time, 12.1.0) returns a black image from its LUT; the loaded module's
`ImageOps` is given that old posterize for bits outside 1..8 (and Pillow's own otherwise).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import re
import sys
import tempfile
import zipfile

import numpy as np
import PIL
from PIL import Image, ImageOps

FILL_RGB = (124, 116, 104)
FILL_GRAY = 115  # round(mean(FILL_RGB))
OP_MAGNITUDES = (0.0, 2.4, 5.0, 9.0, 9.7, 10.0)
NO_LEVEL = ("AutoContrast", "Equalize", "Invert")
SIGNED = ("Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
          "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
E2E_POLICIES = (("rand-m9-mstd0.5-inc1", 3), ("rand-m9-mstd0.5-inc1", 1), ("rand-m7-n3-mstd1", 3),
                ("rand-m10-n4-mstd3-inc1", 3), ("rand-m9-mstd0.5-inc1-w0", 3))
E2E_CASES = 16
SHAPE = (16, 12)  # (H, W): not square, so x/y mix-ups show


class _ImageOpsCompat:
  """PIL.ImageOps with the pre-Pillow-13 posterize LUT for bits outside 1..8 (0 kept bits -> black)."""

  def __getattr__(self, name):
    return getattr(ImageOps, name)

  @staticmethod
  def posterize(img, bits):
    if 1 <= bits <= 8:
      return ImageOps.posterize(img, bits)
    mask = ~(2 ** (8 - bits) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


class _PyRandomShim:
  """Stands in for python `random` inside timm's module, drawing from a numpy Generator."""
  rng: np.random.Generator

  def random(self):
    return float(self.rng.random())

  def gauss(self, mu, sigma):
    return float(self.rng.normal(mu, sigma))


class _NpRandomShim:
  def __init__(self, owner):
    self.owner = owner

  def choice(self, ops, size, replace=True, p=None):
    rng = self.owner.rng
    if replace and p is None:
      idx = rng.integers(0, len(ops), size=size)
    else:
      idx = rng.choice(len(ops), size=size, replace=replace, p=p)
    return [ops[int(i)] for i in idx]


class _NumpyShim:
  def __init__(self, owner):
    self.random = _NpRandomShim(owner)

  def __getattr__(self, name):
    return getattr(np, name)


def load_timm(wheel_or_py: str, tmp: str):
  """Loads timm/data/auto_augment.py (alone) by file path; returns (module, timm version)."""
  version = "unknown"
  path = wheel_or_py
  if wheel_or_py.endswith(".whl"):
    with zipfile.ZipFile(wheel_or_py) as zf:
      path = os.path.join(tmp, "auto_augment.py")
      with open(path, "wb") as f:
        f.write(zf.read("timm/data/auto_augment.py"))
      version = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", zf.read("timm/version.py").decode()).group(1)
  spec = importlib.util.spec_from_file_location("timm_auto_augment", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  mod.ImageOps = _ImageOpsCompat()
  return mod, version


def _image(rng, channels):
  # Smooth content in a limited range, so autocontrast/equalize/solarize have something to do.
  low = rng.uniform(40, 210, (4, 3, channels))
  img = np.stack([np.asarray(Image.fromarray(low[..., c].astype(np.float32), "F").resize(
      SHAPE[::-1], Image.BILINEAR)) for c in range(channels)], -1)
  img = img + rng.normal(0, 6, img.shape)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _pil(a):
  return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def _np(img, channels):
  a = np.asarray(img, np.uint8)
  return a[..., None] if channels == 1 else a


def _seed_for(negate: bool) -> int:
  for s in range(1000):
    random.seed(s)
    if (random.random() > 0.5) == negate:
      return s
  raise AssertionError


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("timm", help="timm-0.3.2-py3-none-any.whl, or a path to timm/data/auto_augment.py")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "timm_randaugment_ops.npz"))
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    aa, version = load_timm(args.timm, tmp)
  rng = np.random.default_rng(0)
  images = {3: _image(rng, 3), 1: _image(rng, 1)}
  # DeiT's hparams at 224 (translate_const int(224 * 0.45) = 100 is unused by RandAugment's ops).
  hparams = {c: {"translate_const": 100, "img_mean": fill, "interpolation": Image.BICUBIC}
             for c, fill in ((3, FILL_RGB), (1, FILL_GRAY))}
  names = list(dict.fromkeys(aa._RAND_INCREASING_TRANSFORMS + aa._RAND_TRANSFORMS))  # pylint: disable=protected-access
  out = {"op_input_rgb": images[3], "op_input_gray": images[1]}
  op_names, op_mags, op_negs, outs = [], [], [], {3: [], 1: []}
  for name in names:
    for m in ((0.0,) if name in NO_LEVEL else OP_MAGNITUDES):
      for negate in ((False, True) if name in SIGNED else (False,)):
        for c in (3, 1):
          op = aa.AugmentOp(name, prob=1.0, magnitude=m, hparams=dict(hparams[c]))
          random.seed(_seed_for(negate))  # the only python-random draw is the sign
          outs[c].append(_np(op(_pil(images[c])), c))
        op_names.append(name)
        op_mags.append(m)
        op_negs.append(negate)
  out.update(op_name=np.array(op_names), op_magnitude=np.array(op_mags), op_negate=np.array(op_negs),
             op_output_rgb=np.stack(outs[3]), op_output_gray=np.stack(outs[1]))

  owner = _PyRandomShim()
  aa.random, aa.np = owner, _NumpyShim(owner)
  e2e_inputs = {c: np.stack([_image(rng, c) for _ in range(E2E_CASES)]) for c in (3, 1)}
  policies, channels, seeds, e2e_out = [], [], [], []
  for p, (policy, c) in enumerate(E2E_POLICIES):
    transform = aa.rand_augment_transform(policy, dict(hparams[c]))
    for k in range(E2E_CASES):
      seed = 1000 * p + k
      owner.rng = np.random.default_rng(seed)
      e2e_out.append(_np(transform(_pil(e2e_inputs[c][k])), c))
      policies.append(policy)
      channels.append(c)
      seeds.append(seed)
  out.update(e2e_input_rgb=e2e_inputs[3], e2e_input_gray=e2e_inputs[1], e2e_policy=np.array(policies),
             e2e_channels=np.array(channels), e2e_seed=np.array(seeds),
             e2e_output_rgb=np.stack([o for o, c in zip(e2e_out, channels) if c == 3]),
             e2e_output_gray=np.stack([o for o, c in zip(e2e_out, channels) if c == 1]))
  out["versions"] = np.array([f"timm {version}", f"Pillow {PIL.__version__}", f"numpy {np.__version__}",
                              f"python {sys.version.split()[0]}"])
  np.savez_compressed(args.out, **out)
  print(f"wrote {args.out}: {len(op_names)} op cases, {len(seeds)} end-to-end cases; "
        f"{os.path.getsize(args.out)} bytes; {out['versions']}")


if __name__ == "__main__":
  main()
