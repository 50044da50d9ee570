"""AugMix views for the data pipeline (numpy/PIL, per example, deterministic given the rng).

Follows the official AugMix ImageNet code (google-research/augmix `imagenet.py` + `augmentations.py`):
mixture width 3, depth uniform in {1, 2, 3} (depth <= 0), severity 1, Dirichlet/Beta coefficient alpha 1;
ops autocontrast, equalize, posterize, rotate, solarize, shear_x/y, translate_x/y (the "augmentations"
list, without the ImageNet-C-overlapping colour/contrast/brightness/sharpness ops, which
`all_ops=True` adds as the reference's `augmentations_all`). The chain outputs are
mixed in [0, 1] pixel space; the official code mixes after `Normalize`, which is affine, so with weights
summing to 1 the result is the same. Output is rounded back to uint8 (the loader's dtype; the error is at
most 0.5/255).

`make_augmix_fn(data_cfg)` -> `fn(image uint8 (H, W, C), rng: np.random.Generator) -> uint8 (H, W, C)`,
the hook `pipeline.make_train_loader(..., augmix_fn=fn)` calls twice per example ("image_aug1",
"image_aug2"). Optional config fields: augmix_width (3), augmix_depth (-1 = random 1..3),
augmix_severity (1), augmix_alpha (1.0), augmix_all_ops (False).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def _int_param(level: float, maxval: float) -> int:
  return int(level * maxval / 10)


def _float_param(level: float, maxval: float) -> float:
  return float(level) * maxval / 10.0


def _sample_level(rng, n):
  return rng.uniform(0.1, n)


def _autocontrast(img, _, rng):
  del rng
  return ImageOps.autocontrast(img)


def _equalize(img, _, rng):
  del rng
  return ImageOps.equalize(img)


def _posterize(img, level, rng):
  return ImageOps.posterize(img, 4 - _int_param(_sample_level(rng, level), 4))


def _rotate(img, level, rng):
  degrees = _int_param(_sample_level(rng, level), 30)
  if rng.uniform() > 0.5:
    degrees = -degrees
  return img.rotate(degrees, resample=Image.BILINEAR)


def _solarize(img, level, rng):
  return ImageOps.solarize(img, 256 - _int_param(_sample_level(rng, level), 256))


def _affine(img, coeffs):
  return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR)


def _shear_x(img, level, rng):
  s = _float_param(_sample_level(rng, level), 0.3)
  s = -s if rng.uniform() > 0.5 else s
  return _affine(img, (1, s, 0, 0, 1, 0))


def _shear_y(img, level, rng):
  s = _float_param(_sample_level(rng, level), 0.3)
  s = -s if rng.uniform() > 0.5 else s
  return _affine(img, (1, 0, 0, s, 1, 0))


def _translate_x(img, level, rng):
  t = _int_param(_sample_level(rng, level), img.size[0] / 3)
  t = -t if rng.uniform() > 0.5 else t
  return _affine(img, (1, 0, t, 0, 1, 0))


def _translate_y(img, level, rng):
  t = _int_param(_sample_level(rng, level), img.size[1] / 3)
  t = -t if rng.uniform() > 0.5 else t
  return _affine(img, (1, 0, 0, 0, 1, t))


def _enhance(cls):
  def op(img, level, rng):
    return cls(img).enhance(_float_param(_sample_level(rng, level), 1.8) + 0.1)
  op.__name__ = f"_{cls.__name__.lower()}"
  return op


_color, _contrast, _brightness, _sharpness = (
    _enhance(c) for c in (ImageEnhance.Color, ImageEnhance.Contrast, ImageEnhance.Brightness,
                          ImageEnhance.Sharpness))

OPS = (_autocontrast, _equalize, _posterize, _rotate, _solarize, _shear_x, _shear_y, _translate_x,
       _translate_y)
# The reference's `augmentations_all` (its --all-ops flag): adds the ops that overlap ImageNet-C.
ALL_OPS = OPS + (_color, _contrast, _brightness, _sharpness)


def augmix(image: np.ndarray, rng: np.random.Generator, *, width: int = 3, depth: int = -1,
           severity: int = 1, alpha: float = 1.0, all_ops: bool = False) -> np.ndarray:
  """One AugMix view of a uint8 (H, W, C) image (C = 1 or 3) -> uint8 (H, W, C).

  all_ops: also draw color, contrast, brightness, sharpness (the reference's --all-ops)."""
  ops = ALL_OPS if all_ops else OPS
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"augmix expects uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
  gray = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if gray else image)
  ws = np.float32(rng.dirichlet([alpha] * width))
  m = np.float32(rng.beta(alpha, alpha))
  mix = np.zeros(image.shape, np.float32)
  for i in range(width):
    img = pil
    for _ in range(depth if depth > 0 else int(rng.integers(1, 4))):
      img = ops[int(rng.integers(len(ops)))](img, severity, rng)
    arr = np.asarray(img, np.float32)
    mix += ws[i] * (arr[..., None] if gray else arr)
  out = (1 - m) * image.astype(np.float32) + m * mix
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class _AugmixFn:
  """Picklable per-example callable (grain workers pickle the pipeline)."""

  def __init__(self, width, depth, severity, alpha, all_ops=False):
    self.width, self.depth, self.severity, self.alpha = width, depth, severity, alpha
    self.all_ops = all_ops

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return augmix(image, rng, width=self.width, depth=self.depth, severity=self.severity,
                  alpha=self.alpha, all_ops=self.all_ops)


def make_augmix_fn(data_cfg=None) -> _AugmixFn:
  """The `augmix_fn` hook for `make_train_loader`, configured from optional data config fields."""
  get = (lambda k, d: data_cfg.get(k, d)) if data_cfg is not None else (lambda k, d: d)
  return _AugmixFn(int(get("augmix_width", 3)), int(get("augmix_depth", -1)),
                   int(get("augmix_severity", 1)), float(get("augmix_alpha", 1.0)),
                   bool(get("augmix_all_ops", False)))
