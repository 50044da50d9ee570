"""Per-example image transforms on uint8 HWC numpy arrays (PIL for resampling).

Every random transform takes an explicit `np.random.Generator`; the pipeline builds one per example from
(seed, process_index, global example index), so the output is a pure function of the seed and the
example's position in the stream, whatever the worker count.

Semantics follow torchvision (what the official DiffAug/AugMix code uses):
- `random_resized_crop`: `transforms.RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))` incl. the
  10-try loop and the central-crop fallback; PIL crop, then PIL bilinear resize, as torchvision does for
  PIL images.
- `resize_shorter`: `transforms.Resize(int)` (shorter side -> size, longer side truncated like torchvision).
- `center_crop`: `transforms.CenterCrop` (round((h - size) / 2) offsets; zero-pads images smaller than size).
- `random_crop_with_padding`: `transforms.RandomCrop(size, padding=p)` (zero padding, or reflect).
- `three_augment`: DeiT-III's 3-Augment (facebookresearch/deit `augment.py`, `new_data_aug_generator`):
  RandomResizedCrop(size, scale=(0.08, 1), bicubic) (crop="rrc", the ImageNet-1k recipe) or, with `--src`
  (crop="src", DeiT-III's ImageNet-21k recipe), Simple Random Crop (Resize(size, bicubic) + RandomCrop(size,
  padding=4, reflect)); + horizontal flip, then ONE of {grayscale, solarization (threshold 128), Gaussian blur
  (radius ~ U(0.1, 2))} chosen uniformly, then ColorJitter(0.3, 0.3, 0.3) (brightness, contrast, saturation
  factors ~ U(0.7, 1.3), in a random order).
- "rand_augment" train transform: DeiT-III's 224 fine-tuning (`--aa rand-m9-mstd0.5-inc1`, timm 0.3.2
  `transforms_imagenet_train`): RandomResizedCrop(size, bicubic: `--train-interpolation bicubic`) + horizontal
  flip + timm RandAugment (`randaugment.py`: fill (124, 116, 104), bicubic). No ColorJitter: timm 0.3.2 adds
  ColorJitter only when no auto-augment policy is given (`elif color_jitter is not None`), so DeiT's
  `--color-jitter` is ignored with `--aa`.

Transform factories return callables:
- train: `fn(image uint8 (H, W, C), rng) -> (view uint8 (S, S, C), view_da uint8 (S, S, C))`;
- eval: `fn(image uint8 (H, W, C)) -> uint8 (S, S, C)`.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

TrainTransform = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
EvalTransform = Callable[[np.ndarray], np.ndarray]

TRAIN_TRANSFORMS = ("imagenet", "three_augment", "three_augment_src", "rand_augment", "cifar", "digits",
                    "none")
EVAL_TRANSFORMS = ("imagenet", "cifar", "digits", "none")


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
    raise ValueError(
        f"expected a uint8 image of shape (H, W, 1|3), got dtype {image.dtype} shape {image.shape}")
  return image


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
  out = np.asarray(img, dtype=np.uint8)
  if out.ndim == 2:
    out = out[..., None]
  assert out.shape[-1] == channels, (out.shape, channels)
  return out


def rrc_params(rng: np.random.Generator, height: int, width: int,
               scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: returns (top, left, crop_h, crop_w)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback to a central crop with the aspect ratio clamped into `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), *,
                        resample: int = Image.BILINEAR) -> np.ndarray:
  """(H, W, C) uint8 -> (size, size, C) uint8, torchvision RandomResizedCrop semantics (`resample`: a PIL
  filter; bilinear is torchvision's default, bicubic DeiT-III's)."""
  image = _check_image(image)
  top, left, h, w = rrc_params(rng, image.shape[0], image.shape[1], scale, ratio)
  # Crop, then resize (torchvision's F.resized_crop): PIL's resize(box=...) would let the filter read pixels
  # outside the crop, changing the border rows and columns.
  img = _to_pil(image).crop((left, top, left + w, top + h)).resize((size, size), resample)
  return _from_pil(img, image.shape[-1])


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision `Resize(size)` with an int: shorter side -> size (bilinear, PIL), aspect kept."""
  image = _check_image(image)
  h, w = image.shape[:2]
  short, long = (w, h) if w <= h else (h, w)
  if short == size:
    return image
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  return _from_pil(_to_pil(image).resize((new_w, new_h), Image.BILINEAR), image.shape[-1])


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision `CenterCrop(size)`; zero-pads (centred) first when the image is smaller."""
  image = _check_image(image)
  h, w = image.shape[:2]
  if h < size or w < size:
    ph, pw = max(size - h, 0), max(size - w, 0)
    image = np.pad(image, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
    h, w = image.shape[:2]
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def resize_center_crop(image: np.ndarray, size: int, resize_size: int) -> np.ndarray:
  """Resize(resize_size) + CenterCrop(size): the DiffAug view and the ImageNet eval transform."""
  return center_crop(resize_shorter(image, resize_size), size)


def fit(image: np.ndarray, size: int) -> np.ndarray:
  """Identity when the image is already (size, size); else Resize(size) + CenterCrop(size)."""
  image = _check_image(image)
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return resize_center_crop(image, size, size)


def hflip(image: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(image[:, ::-1])


def random_hflip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  return hflip(image) if rng.uniform() < p else image


def random_crop_with_padding(image: np.ndarray, rng: np.random.Generator, size: int,
                             padding: int, mode: str = "constant") -> np.ndarray:
  """torchvision `RandomCrop(size, padding, padding_mode)`: pad every side by `padding` (zeros, or
  "reflect"), crop a random window."""
  image = _check_image(image)
  if padding:
    image = np.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode=mode)
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f"random crop {size} larger than padded image {image.shape}")
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return image[top:top + size, left:left + size]


def resize_shorter_bicubic(image: np.ndarray, size: int) -> np.ndarray:
  """`Resize(size, interpolation=BICUBIC)` (shorter side -> size), DeiT-III's Simple Random Crop resize."""
  image = _check_image(image)
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  return _from_pil(_to_pil(image).resize((new_w, new_h), Image.BICUBIC), image.shape[-1])


def three_augment(image: np.ndarray, rng: np.random.Generator, size: int,
                  color_jitter: float = 0.3, *, crop: str = "rrc") -> np.ndarray:
  """DeiT-III 3-Augment (see the module docstring): (H, W, C) uint8 -> (size, size, C) uint8.
  crop: "rrc" (bicubic RandomResizedCrop, DeiT-III on ImageNet-1k) or "src" (Simple Random Crop, `--src`)."""
  if crop == "rrc":
    view = random_resized_crop(image, rng, size, resample=Image.BICUBIC)
  elif crop == "src":
    view = random_crop_with_padding(resize_shorter_bicubic(image, size), rng, size, 4, mode="reflect")
  else:
    raise ValueError(f"three_augment crop must be 'rrc' or 'src', got {crop!r}")
  view = random_hflip(view, rng)
  channels = view.shape[-1]
  img = _to_pil(view)
  choice = int(rng.integers(0, 3))
  if choice == 0:  # grayscale, kept at the input's channel count (torchvision Grayscale(3))
    img = img.convert("L").convert(img.mode)
  elif choice == 1:
    img = ImageOps.solarize(img, threshold=128)
  else:
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0))))
  if color_jitter:
    lo, hi = max(0.0, 1.0 - color_jitter), 1.0 + color_jitter
    ops = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    factors = [float(rng.uniform(lo, hi)) for _ in ops]
    for i in rng.permutation(len(ops)):  # torchvision ColorJitter applies its factors in a random order
      if ops[i] is ImageEnhance.Color and img.mode == "L":
        continue  # saturation of a one-channel image: nothing to do
      img = ops[i](img).enhance(factors[i])
  return _from_pil(img, channels)


def make_train_transform(name: str, image_size: int, *, resize_size: int | None = None,
                         crop_padding: int = 4, rrc_scale: tuple[float, float] = (0.08, 1.0),
                         rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                         rand_augment: str = "rand-m9-mstd0.5-inc1", da_view: bool = True) -> TrainTransform:
  """Returns `fn(image, rng) -> (image, image_da)`, both uint8 (image_size, image_size, C); image_da is None
  when `da_view` is False (not computed).

  - "imagenet": image = RandomResizedCrop(image_size) + flip; image_da = Resize(resize_size) +
    CenterCrop(image_size) (resize_size defaults to round(image_size / 0.875), 256 for 224).
  - "three_augment": image = DeiT-III's 3-Augment (`three_augment`, RandomResizedCrop); image_da as for
    "imagenet". "three_augment_src": the same with Simple Random Crop (DeiT-III's `--src`).
  - "rand_augment": image = RandomResizedCrop(image_size, rrc_scale, rrc_ratio, bicubic) + flip + timm
    RandAugment with the policy `rand_augment` (DeiT-III's 224 fine-tuning default), no color jitter;
    image_da as for "imagenet".
  - "cifar": image = RandomCrop(image_size, padding=crop_padding) + flip; image_da = the unaugmented image.
  - "digits": mild: RandomCrop(image_size, padding=crop_padding) (no flip: digits are not mirror
    symmetric); image_da = the unaugmented image.
  - "none": both views are the (fitted) unaugmented image.
  Images of another size than image_size are first fitted (Resize + CenterCrop) for cifar/digits/none.
  """
  if name not in TRAIN_TRANSFORMS:
    raise ValueError(f"unknown train_transform {name!r}; expected one of {TRAIN_TRANSFORMS}")
  resize_size = resize_size or int(round(image_size / 0.875))
  scale, ratio = tuple(rrc_scale), tuple(rrc_ratio)
  if name == "rand_augment":
    # Imported here: randaugment imports this module's helpers. Parsed once, so a bad policy string fails
    # when the pipeline is built rather than inside a worker.
    from diffaug_jax.data import randaugment  # pylint: disable=g-import-not-at-top
    ra_params = randaugment.parse_rand_augment(rand_augment)

  def center(image):  # the ImageNet recipes' DiffAug view (a full-size resize: skipped when unused)
    return resize_center_crop(image, image_size, resize_size) if da_view else None

  def imagenet(image, rng):
    view = random_hflip(random_resized_crop(image, rng, image_size, scale, ratio), rng)
    return view, center(image)

  def deit3(image, rng, crop="rrc"):
    return three_augment(image, rng, image_size, crop=crop), center(image)

  def rand_aug(image, rng):
    view = random_resized_crop(image, rng, image_size, scale, ratio, resample=Image.BICUBIC)
    view = randaugment.rand_augment(random_hflip(view, rng), rng, ra_params)
    return view, center(image)

  def cifar(image, rng):
    base = fit(image, image_size)
    return random_hflip(random_crop_with_padding(base, rng, image_size, crop_padding), rng), base

  def digits(image, rng):
    base = fit(image, image_size)
    return random_crop_with_padding(base, rng, image_size, crop_padding), base

  def none(image, rng):
    del rng
    base = fit(image, image_size)
    return base, base

  return {"imagenet": imagenet, "three_augment": deit3, "three_augment_src": lambda im, r: deit3(im, r, "src"),
          "rand_augment": rand_aug, "cifar": cifar, "digits": digits, "none": none}[name]


def make_eval_transform(name: str, image_size: int, *, resize_size: int | None = None) -> EvalTransform:
  """Deterministic eval transform: "imagenet" = Resize(resize_size) + CenterCrop(image_size); the others
  keep the image (fitted to image_size when its size differs)."""
  if name not in EVAL_TRANSFORMS:
    raise ValueError(f"unknown eval_transform {name!r}; expected one of {EVAL_TRANSFORMS}")
  resize_size = resize_size or int(round(image_size / 0.875))
  if name == "imagenet":
    return lambda image: resize_center_crop(image, image_size, resize_size)
  return lambda image: fit(image, image_size)
