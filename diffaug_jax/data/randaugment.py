"""timm's RandAugment on uint8 HWC numpy arrays (PIL ops, explicit numpy Generator), as DeiT-III uses it.

Follows timm 0.3.2 `timm/data/auto_augment.py` (`rand_augment_transform`, `RandAugment`, `AugmentOp`, the
`*_level_to_arg` functions), the version pinned in facebookresearch/deit `requirements.txt`
(torch 1.7.0, torchvision 0.8.1, timm 0.3.2). DeiT-III fine-tunes at 224 with `--aa rand-m9-mstd0.5-inc1`;
timm's `transforms_imagenet_train` then calls `rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)` with
hparams `translate_const=int(224 * 0.45)`, `img_mean=(124, 116, 104)` (round(255 * ImageNet mean)) and
`interpolation=BICUBIC` (DeiT's `--train-interpolation bicubic`). `translate_const` only feeds the absolute
TranslateX/Y ops, which RandAugment does not use (it uses TranslateX/YRel with translate_pct 0.45).
timm 0.4.12 is identical for these policies (it only adds `magnitude_std=inf` -> uniform sampling, used by
AugMix); later timm (e.g. 0.9) drops "w" and adds "p", "t", "mmax" and "mstd>100" -> uniform sampling.

Policy ("rand" then "-"-separated parts, any order, each at most once):
  m<float>    magnitude M (default 10; timm parses an int, a float is accepted here).
  n<int>      num_layers: ops drawn per image, uniformly WITH replacement (default 2).
  mstd<float> magnitude std: each applied op uses M' ~ N(M, mstd) (0 = fixed M; default 0).
  inc<0|1>    1: the "increasing" op list (severity grows with M); 0: the original list (default 0).
  mmax<float> upper clip of M' (default 10). From later timm (0.9), with its clamps of the op arguments
              (no-ops for M' <= 10).
  w<int>      timm 0.3.2 op-choice weights: only w0 (`_RAND_CHOICE_WEIGHTS_0`, by list position); ops are
              then drawn WITHOUT replacement, as timm does (later timm removed it).
Every op is applied with probability 0.5; M' is clipped to [0, mmax]; then the op's level function maps it
to the PIL argument (rotate +-30 deg, shear +-0.3, translate +-0.45 * size, enhance factor 1 +- 0.9 M'/10
(inc) or 0.1 + 1.8 M'/10, posterize bits, solarize threshold, solarize-add 110 M'/10), negated with
probability 0.5 for the signed ones. Rotate/shear/translate use `fill` and `resample`.

Randomness: all from the passed `np.random.Generator`, in timm's order (timm draws from numpy's global RNG
for the op choice and python `random` for the rest): (1) op indices `rng.integers(0, 15, size=n)` (w0:
`rng.choice(15, n, replace=False, p=weights)`); then for each chosen op in order: (2) `rng.random() > 0.5`
-> skip the op; else (3) if mstd > 0, M' = `rng.normal(M, mstd)`; (4) for signed ops, `rng.random() > 0.5`
-> negate. No draw depends on the image, so `sample_ops` draws everything first, `apply_ops` applies it.

Deliberate differences from timm 0.3.2:
- "inc0" selects the original (non-increasing) list. timm tests `bool("0")`, which is True, so in timm (0.3.2
  to at least 0.9.16) any "inc<digits>" selects the increasing list; DeiT's "inc1" is unaffected.
- Unknown, malformed or repeated parts raise ValueError (timm asserts, or silently skips parts without a
  digit, e.g. "rand-foo").
- Posterize with 0 bits kept (PosterizeIncreasing at M' = 10, Posterize at M' < 2.5) gives a black image, as
  Pillow's LUT does up to Pillow 12 (checked: 8.4.0, 11.3.0, 12.1.0); Pillow 13.0.0 (installed here) raises
  ValueError for bits < 1, so unpatched timm crashes there with it.
- Grayscale (C=1): the fill is one value, round(mean(fill)) (115 for DeiT's mean); timm only sees RGB, and
  with a 3-tuple fill Pillow 13 raises on "L" images.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from diffaug_jax.data.transforms import _check_image, _from_pil, _to_pil

DEIT_POLICY = "rand-m9-mstd0.5-inc1"
IMAGENET_FILL = (124, 116, 104)  # timm: tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN)

_MAX_LEVEL = 10.0
_PROB = 0.5  # timm's rand_augment_ops: every op applied with prob 0.5
_TRANSLATE_PCT = 0.45  # timm's default translate_pct for TranslateX/YRel

RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# timm 0.3.2 `_RAND_CHOICE_WEIGHTS_0`, in RAND_TRANSFORMS order; timm applies it by position to either list.
_CHOICE_WEIGHTS_0 = (0.025, 0.005, 0.0, 0.3, 0.0, 0.005, 0.005, 0.025, 0.005, 0.005, 0.025, 0.2, 0.2, 0.1,
                     0.1)


@dataclasses.dataclass(frozen=True)
class RandAugmentParams:
  """A parsed RandAugment policy (see the module docstring for the grammar)."""
  magnitude: float = 10.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  increasing: bool = False
  magnitude_max: float = _MAX_LEVEL
  weight_idx: int | None = None

  @property
  def op_names(self) -> tuple[str, ...]:
    return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS

  @property
  def choice_weights(self) -> np.ndarray | None:
    if self.weight_idx is None:
      return None
    w = np.asarray(_CHOICE_WEIGHTS_0, np.float64)
    return w / w.sum()


def parse_rand_augment(config_str: str) -> RandAugmentParams:
  """timm's RandAugment config string, e.g. "rand-m9-mstd0.5-inc1" -> RandAugmentParams.
  Raises ValueError naming the offending part."""
  if not isinstance(config_str, str):
    raise ValueError(f"RandAugment policy must be a string, got {config_str!r}")
  parts = config_str.split("-")
  if parts[0] != "rand":
    raise ValueError(f"RandAugment policy {config_str!r} must start with 'rand', got {parts[0]!r}")
  kw: dict = {}
  for part in parts[1:]:
    match = re.fullmatch(r"([a-z]+)(\d.*)", part)  # timm's split: key = text before the first digit
    if match is None:
      raise ValueError(f"malformed RandAugment policy part {part!r} in {config_str!r}")
    key, val = match.groups()
    field = {"m": "magnitude", "n": "num_layers", "mstd": "magnitude_std", "inc": "increasing",
             "mmax": "magnitude_max", "w": "weight_idx"}.get(key)
    if field is None:
      raise ValueError(f"unknown RandAugment policy part {part!r} in {config_str!r} "
                       "(expected m<float>, n<int>, mstd<float>, inc<0|1>, mmax<float>, w0)")
    if field in kw:
      raise ValueError(f"repeated RandAugment policy part {part!r} in {config_str!r}")
    try:
      if field in ("num_layers", "weight_idx", "increasing"):
        value = int(val)
      else:
        value = float(val)
    except ValueError:
      raise ValueError(f"malformed RandAugment policy part {part!r} in {config_str!r}") from None
    if field == "increasing":
      if value not in (0, 1):
        raise ValueError(f"RandAugment policy part {part!r}: inc must be 0 or 1")
      value = bool(value)
    if field == "weight_idx" and value != 0:
      raise ValueError(f"RandAugment policy part {part!r}: only weight set w0 exists")
    if field == "magnitude_max" and value <= 0:
      raise ValueError(f"RandAugment policy part {part!r}: mmax must be > 0")
    kw[field] = value
  params = RandAugmentParams(**kw)
  if params.weight_idx is not None and params.num_layers > int(np.count_nonzero(_CHOICE_WEIGHTS_0)):
    # Drawing without replacement needs that many ops with a non-zero weight.
    raise ValueError(f"RandAugment policy {config_str!r}: w0 allows at most "
                     f"{np.count_nonzero(_CHOICE_WEIGHTS_0)} layers")
  return params


# ---- level (magnitude in [0, mmax]) -> op argument, timm's *_level_to_arg. The arithmetic order is kept so
# the floats (and so the resampled pixels) are bit-identical.

def _signed(v: float, negate: bool) -> float:
  return -v if negate else v


def _posterize_bits(level: float) -> int:
  return int((level / _MAX_LEVEL) * 4)


def _solarize_thresh(level: float) -> int:
  return min(256, int((level / _MAX_LEVEL) * 256))  # min: later timm, for mmax > 10


def _level_arg(name: str, level: float, negate: bool) -> float | int | None:
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  if name == "Rotate":
    return _signed((level / _MAX_LEVEL) * 30.0, negate)
  if name == "Posterize":
    return _posterize_bits(level)
  if name == "PosterizeIncreasing":
    return 4 - _posterize_bits(level)
  if name == "Solarize":
    return _solarize_thresh(level)
  if name == "SolarizeIncreasing":
    return 256 - _solarize_thresh(level)
  if name == "SolarizeAdd":
    return min(128, int((level / _MAX_LEVEL) * 110))  # min: later timm, for mmax > 10
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return (level / _MAX_LEVEL) * 1.8 + 0.1
  if name.endswith("Increasing"):  # Color/Contrast/Brightness/SharpnessIncreasing
    return max(0.1, 1.0 + _signed((level / _MAX_LEVEL) * 0.9, negate))  # max: later timm, for mmax > 10
  if name in ("ShearX", "ShearY"):
    return _signed((level / _MAX_LEVEL) * 0.3, negate)
  if name in ("TranslateXRel", "TranslateYRel"):
    return _signed((level / _MAX_LEVEL) * _TRANSLATE_PCT, negate)
  raise ValueError(f"unknown RandAugment op {name!r}")


SIGNED_OPS = frozenset(("Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                        "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))


# ---- the PIL ops.

def _lut(img: Image.Image, table: Sequence[int]) -> Image.Image:
  return img.point(list(table) * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
  if bits >= 8:
    return img
  # Old Pillow's LUT for every bits < 8: bits <= 0 keeps nothing (black); Pillow 13 rejects bits < 1.
  mask = ~(2 ** (8 - max(bits, 0)) - 1)
  return _lut(img, [i & mask for i in range(256)])


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
  return _lut(img, [min(255, i + add) if i < thresh else i for i in range(256)])


def _affine(img: Image.Image, coeffs, fill, resample) -> Image.Image:
  return img.transform(img.size, Image.AFFINE, coeffs, resample=resample, fillcolor=fill)


_ENHANCE = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
            "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


def _apply_pil(img: Image.Image, name: str, arg, fill, resample) -> Image.Image:
  base = name.removesuffix("Increasing")
  if base == "AutoContrast":
    return ImageOps.autocontrast(img)
  if base == "Equalize":
    return ImageOps.equalize(img)
  if base == "Invert":
    return ImageOps.invert(img)
  if base == "Rotate":
    return img.rotate(arg, resample=resample, fillcolor=fill)
  if base == "Posterize":
    return _posterize(img, arg)
  if base == "Solarize":
    return ImageOps.solarize(img, arg)
  if base == "SolarizeAdd":
    return _solarize_add(img, arg)
  if base in _ENHANCE:
    return _ENHANCE[base](img).enhance(arg)
  if base == "ShearX":
    return _affine(img, (1, arg, 0, 0, 1, 0), fill, resample)
  if base == "ShearY":
    return _affine(img, (1, 0, 0, arg, 1, 0), fill, resample)
  if base == "TranslateXRel":
    return _affine(img, (1, 0, arg * img.size[0], 0, 1, 0), fill, resample)
  if base == "TranslateYRel":
    return _affine(img, (1, 0, 0, 0, 1, arg * img.size[1]), fill, resample)
  raise ValueError(f"unknown RandAugment op {name!r}")


def _pil_fill(fill: int | Sequence[int], channels: int) -> int | tuple[int, ...]:
  """The PIL fillcolor for a C-channel image: a 3-tuple for RGB, one int (round of the mean) for "L"."""
  values = [int(v) for v in np.atleast_1d(np.asarray(fill))]
  if len(values) not in (1, 3):
    raise ValueError(f"fill must be one value or three, got {fill!r}")
  if channels == 1:
    return round(sum(values) / len(values))
  return tuple(values * 3) if len(values) == 1 else tuple(values)


def apply_op(image: np.ndarray, name: str, magnitude: float, *, negate: bool = False,
             fill: int | Sequence[int] = IMAGENET_FILL, resample: int = Image.BICUBIC) -> np.ndarray:
  """One RandAugment op at a given (already clipped) magnitude: uint8 (H, W, C) -> uint8 (H, W, C).
  negate: the sign draw of the signed ops (ignored by the others). timm's `AugmentOp(name, prob=1,
  magnitude=magnitude)` with magnitude_std 0 and `random.random() > 0.5 == negate`."""
  image = _check_image(image)
  img = _to_pil(image)
  out = _apply_pil(img, name, _level_arg(name, magnitude, negate), _pil_fill(fill, image.shape[-1]),
                   resample)
  return _from_pil(out, image.shape[-1])


@dataclasses.dataclass(frozen=True)
class OpDraw:
  """One op that passed its prob-0.5 draw: the op name, its clipped magnitude, its sign draw."""
  name: str
  magnitude: float
  negate: bool


def sample_ops(rng: np.random.Generator, params: RandAugmentParams) -> tuple[OpDraw, ...]:
  """All the random draws of one RandAugment call (see the module docstring for their order); returns the
  ops that will be applied, in order (0..num_layers of them)."""
  names = params.op_names
  if params.weight_idx is None:
    idx = rng.integers(0, len(names), size=params.num_layers)
  else:
    idx = rng.choice(len(names), size=params.num_layers, replace=False, p=params.choice_weights)
  out = []
  for i in idx:
    name = names[int(i)]
    if rng.random() > _PROB:  # timm: `random.random() > self.prob` skips the op
      continue
    magnitude = params.magnitude
    if params.magnitude_std > 0:
      magnitude = float(rng.normal(magnitude, params.magnitude_std))
    magnitude = min(params.magnitude_max, max(0.0, magnitude))  # clip to the valid range, per op call
    negate = bool(rng.random() > 0.5) if name in SIGNED_OPS else False
    out.append(OpDraw(name, magnitude, negate))
  return tuple(out)


def apply_ops(image: np.ndarray, ops: Sequence[OpDraw], *, fill: int | Sequence[int] = IMAGENET_FILL,
              resample: int = Image.BICUBIC) -> np.ndarray:
  """Applies `sample_ops`' draws in order: uint8 (H, W, C) -> uint8 (H, W, C)."""
  image = _check_image(image)
  if not ops:
    return image
  channels = image.shape[-1]
  pil_fill = _pil_fill(fill, channels)
  img = _to_pil(image)
  for op in ops:
    img = _apply_pil(img, op.name, _level_arg(op.name, op.magnitude, op.negate), pil_fill, resample)
  return _from_pil(img, channels)


def rand_augment(image: np.ndarray, rng: np.random.Generator, params: RandAugmentParams, *,
                 fill: int | Sequence[int] = IMAGENET_FILL, resample: int = Image.BICUBIC) -> np.ndarray:
  """timm RandAugment of a uint8 (H, W, C) image (C = 1 or 3) -> uint8 (H, W, C).
  fill: the geometric ops' fill (RGB triple; its rounded mean for C = 1); resample: a PIL filter."""
  image = _check_image(image)
  return apply_ops(image, sample_ops(rng, params), fill=fill, resample=resample)

