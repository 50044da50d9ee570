"""AugMix as a pure JAX function of (key, images): the on-device alternative to the host (PIL) pipeline path.

AugMix (Hendrycks et al. 2020, google-research/augmix `imagenet.py` + `augmentations.py`): for each image,
`width` (3) chains of `depth` ops (uniform 1..3 when depth <= 0), each op drawn uniformly from
autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y
(`all_ops=True` adds color, contrast, brightness, sharpness), level ~ U(0.1, severity) (severity 1), random
sign for the geometric ops; chain outputs mixed with Dirichlet(alpha) weights, then with the original by
m ~ Beta(alpha, alpha): out = (1 - m) x + m sum_i w_i chain_i (alpha 1). Mixing happens in pixel space; the
reference mixes after ToTensor+Normalize, which is affine, so the result is the same.

Each op reproduces Pillow's 8-bit semantics (every op returns integer 0..255 values, as PIL does between ops):
LUT ops as `ImageOps` (autocontrast cutoff 0, equalize, posterize, solarize), geometric ops as
`Image.transform(AFFINE, BILINEAR)` / `Image.rotate(BILINEAR)` (pixel-centre coordinates, edge-clamped
bilinear, truncated, samples outside the image are 0), enhance ops as `ImageEnhance` (blend truncates).
`tests/test_augmix.py` checks every op against Pillow 13: identical, except rotate, whose float32 (vs double)
coordinates can flip a truncation by 1 level on a few pixels; autocontrast uses the exact integer table
floor(255 (i - lo) / (hi - lo)), where Pillow's double arithmetic could in principle land 1 lower. The random
draws use jax.random: the *distribution* matches the reference, not its numpy stream.

Placement (host vs device), measured on CPU ONLY (`benchmarks/augmix_placement.py`, this machine: 2 CPU cores
shared with other jobs, load average ~10, so absolute numbers are inflated; jax 0.10.2 CPU backend, Pillow 13),
one AugMix view per image:
  host, `diffaug_jax.data.augmix.augmix` (PIL, per example, one core): 32x32x3 1.0-1.6 ms, 224x224x3 13-18 ms
  device, `augmix` below, jitted, batch 16, CPU backend:                32x32x3 11-13 ms,  224x224x3 85-98 ms
  (one-off compile of `augmix` on this loaded CPU: 12-17 s)
Decision: the HOST path is the default (it is what `trainer.py` wires through `make_train_loader(augmix_fn=)`):
on CPU it is 5-10x cheaper per image, it parallelises over grain workers, and it is the reference's own PIL
code. Vectorised over a batch, this module must evaluate every candidate op in every chain slot (a select,
since each image draws its own ops): 3 chains x 3 slots x (a LUT gather + a histogram + a bilinear warp),
memory-bound work that an accelerator does quickly but the CPU backend does not. Use it when the hosts cannot
keep up (few CPU cores per accelerator, e.g. TPU VMs): call it inside the jitted train step on the uint8 batch
(see `augmix`). Accelerator timings were not measured here.

Pure: jax/numpy only (no flax), no jit inside; the program jits.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
       "translate_y")
ALL_OPS = OPS + ("color", "contrast", "brightness", "sharpness")
_LUT_OPS = ("autocontrast", "equalize", "posterize", "solarize")
_AFFINE_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_ENHANCE_OPS = ("color", "contrast", "brightness", "sharpness")


# ------------------------------------------------------------------------------------------------
# Single-image ops. `img`: float32 (H, W, C) holding integers 0..255. Return the same.


def _apply_lut(img: Array, lut: Array) -> Array:
  """lut: int32 (C, 256) -> img with each channel mapped through its table."""
  c = img.shape[-1]
  idx = img.astype(jnp.int32)
  return lut[jnp.arange(c)[None, None, :], idx].astype(jnp.float32)


def _histogram(img: Array) -> Array:
  """(H, W, C) -> int32 (C, 256) per-channel histogram."""
  c = img.shape[-1]
  idx = img.astype(jnp.int32).reshape(-1, c)
  return jnp.zeros((c, 256), jnp.int32).at[jnp.arange(c)[None, :], idx].add(1)


def _identity_lut(c: int) -> Array:
  return jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (c, 256))


def autocontrast_lut(img: Array) -> Array:
  """ImageOps.autocontrast(cutoff=0): per channel, stretch [lo, hi] to [0, 255]; identity when hi <= lo."""
  flat = img.reshape(-1, img.shape[-1])
  lo = flat.min(axis=0).astype(jnp.int32)[:, None]
  hi = flat.max(axis=0).astype(jnp.int32)[:, None]
  i = jnp.arange(256, dtype=jnp.int32)[None, :]
  stretched = jnp.clip((255 * (i - lo)) // jnp.maximum(hi - lo, 1), 0, 255)
  return jnp.where(hi > lo, stretched, i)


def equalize_lut(img: Array) -> Array:
  """ImageOps.equalize: Pillow's integer histogram-equalisation table per channel."""
  h = _histogram(img)
  c = h.shape[0]
  levels = jnp.arange(256)
  last = jnp.max(jnp.where(h > 0, levels[None, :], -1), axis=1)  # last non-empty level
  h_last = jnp.take_along_axis(h, last[:, None], axis=1)[:, 0]
  step = (h.sum(axis=1) - h_last) // 255
  safe = jnp.maximum(step, 1)[:, None]
  n = safe // 2 + jnp.cumsum(h, axis=1) - h  # step // 2 + sum(h[:i])
  lut = jnp.clip(n // safe, 0, 255)  # Pillow clips the table to 8 bits
  ok = ((h > 0).sum(axis=1) > 1) & (step > 0)
  return jnp.where(ok[:, None], lut, _identity_lut(c))


def posterize_lut(c: int, bits: Array) -> Array:
  """ImageOps.posterize(bits): keep the top `bits` bits."""
  mask = 256 - jnp.left_shift(1, 8 - bits)  # == ~(2**(8 - bits) - 1) & 0xff
  return jnp.broadcast_to(jnp.bitwise_and(jnp.arange(256, dtype=jnp.int32), mask), (c, 256))


def solarize_lut(c: int, threshold: Array) -> Array:
  """ImageOps.solarize(threshold): invert levels >= threshold."""
  i = jnp.arange(256, dtype=jnp.int32)
  return jnp.broadcast_to(jnp.where(i < threshold, i, 255 - i), (c, 256))


def affine(img: Array, coeffs: Array) -> Array:
  """Image.transform(size, AFFINE, coeffs, resample=BILINEAR), fill 0.

  For output pixel (x, y): (x_in, y_in) = (a (x+.5) + b (y+.5) + c, d (x+.5) + e (y+.5) + f); outside
  [0, W) x [0, H) -> 0; else bilinear at (x_in - .5, y_in - .5) with edge clamping.
  """
  h, w, _ = img.shape
  a, b, c, d, e, f = (coeffs[i] for i in range(6))
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5, jnp.arange(w, dtype=jnp.float32) + 0.5,
                        indexing="ij")
  xin = a * xs + b * ys + c
  yin = d * xs + e * ys + f
  valid = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  xf, yf = xin - 0.5, yin - 0.5
  x0, y0 = jnp.floor(xf), jnp.floor(yf)
  dx, dy = (xf - x0)[..., None], (yf - y0)[..., None]
  x0i, y0i = x0.astype(jnp.int32), y0.astype(jnp.int32)
  cx0, cx1 = jnp.clip(x0i, 0, w - 1), jnp.clip(x0i + 1, 0, w - 1)
  cy0, cy1 = jnp.clip(y0i, 0, h - 1), jnp.clip(y0i + 1, 0, h - 1)
  v00, v01 = img[cy0, cx0], img[cy0, cx1]
  v10, v11 = img[cy1, cx0], img[cy1, cx1]
  top = v00 + (v01 - v00) * dx
  bot = v10 + (v11 - v10) * dx
  val = top + (bot - top) * dy
  return jnp.where(valid[..., None], jnp.clip(jnp.floor(val), 0, 255), 0.0)  # Pillow truncates


def rotate_coeffs(degrees: Array, h: int, w: int) -> Array:
  """Image.rotate(degrees) (counter-clockwise, about the centre) as AFFINE coefficients."""
  t = -jnp.deg2rad(degrees.astype(jnp.float32))
  cos, sin = jnp.cos(t), jnp.sin(t)
  cx, cy = w / 2.0, h / 2.0
  return jnp.stack([cos, sin, cos * (-cx) + sin * (-cy) + cx, -sin, cos, -sin * (-cx) + cos * (-cy) + cy])


def _gray(img: Array) -> Array:
  """Pillow RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; 1-channel images unchanged."""
  if img.shape[-1] == 1:
    return img
  i = img.astype(jnp.int32)
  l = (i[..., 0] * 19595 + i[..., 1] * 38470 + i[..., 2] * 7471 + 0x8000) >> 16
  return jnp.broadcast_to(l[..., None], img.shape).astype(jnp.float32)


def _smooth(img: Array) -> Array:
  """ImageFilter.SMOOTH (3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded); the 1-pixel border is kept."""
  p = jnp.pad(img, ((1, 1), (1, 1), (0, 0)))
  h, w, _ = img.shape
  s = sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) + 4 * img
  out = jnp.clip(jnp.floor(s / 13.0 + 0.5), 0, 255)
  border = jnp.zeros((h, w), bool).at[0].set(True).at[-1].set(True).at[:, 0].set(True).at[:, -1].set(True)
  return jnp.where(border[..., None], img, out)


def _degenerate(op: str, img: Array) -> Array:
  if op == "color":
    return _gray(img)
  if op == "contrast":
    mean = jnp.floor(jnp.mean(_gray(img)[..., 0]) + 0.5)
    return jnp.full_like(img, mean)
  if op == "brightness":
    return jnp.zeros_like(img)
  return _smooth(img)


def blend(degenerate: Array, img: Array, factor: Array) -> Array:
  """ImageEnhance.*.enhance(factor) = Image.blend(degenerate, img, factor) (truncating, clipped)."""
  return jnp.floor(jnp.clip(degenerate + factor * (img - degenerate), 0, 255))


# ------------------------------------------------------------------------------------------------
# One random op, one chain, one image.


def _random_op(key: Array, img: Array, ops: tuple[str, ...], severity: float) -> Array:
  """Applies one op drawn uniformly from `ops` with a random level (and sign) to img (H, W, C)."""
  h, w, c = img.shape
  k_op, k_lvl, k_sign = jax.random.split(key, 3)
  op = jax.random.randint(k_op, (), 0, len(ops))
  level = jax.random.uniform(k_lvl, (), jnp.float32, 0.1, severity)  # sample_level(severity)
  sign = jnp.where(jax.random.uniform(k_sign, ()) > 0.5, -1.0, 1.0)
  int_param = lambda maxval: jnp.floor(level * maxval / 10.0)  # int() of a positive number
  float_param = lambda maxval: level * maxval / 10.0

  # Point ops: build every candidate LUT (256 entries each, cheap), pick one, apply once.
  luts = {
      "autocontrast": lambda: autocontrast_lut(img),
      "equalize": lambda: equalize_lut(img),
      "posterize": lambda: posterize_lut(c, 4 - int_param(4).astype(jnp.int32)),
      "solarize": lambda: solarize_lut(c, 256 - int_param(256).astype(jnp.int32)),
  }
  one, zero = jnp.float32(1), jnp.float32(0)
  shear = sign * float_param(0.3)
  coeffs = {
      "rotate": lambda: rotate_coeffs(sign * int_param(30), h, w),
      "shear_x": lambda: jnp.stack([one, shear, zero, zero, one, zero]),
      "shear_y": lambda: jnp.stack([one, zero, zero, shear, one, zero]),
      "translate_x": lambda: jnp.stack([one, zero, sign * int_param(w / 3), zero, one, zero]),
      "translate_y": lambda: jnp.stack([one, zero, zero, zero, one, sign * int_param(h / 3)]),
  }
  lut = _identity_lut(c)
  mat = jnp.array([1, 0, 0, 0, 1, 0], jnp.float32)
  kind = jnp.int32(0)  # 0 LUT, 1 affine, 2 enhance
  degen = img
  factor = float_param(1.8) + 0.1
  for i, name in enumerate(ops):
    hit = op == i
    if name in luts:
      lut = jnp.where(hit, luts[name](), lut)
    elif name in coeffs:
      mat = jnp.where(hit, coeffs[name](), mat)
      kind = jnp.where(hit, 1, kind)
    elif name in _ENHANCE_OPS:
      degen = jnp.where(hit, _degenerate(name, img), degen)
      kind = jnp.where(hit, 2, kind)
    else:
      raise ValueError(f"unknown AugMix op {name!r}; known: {', '.join(ALL_OPS)}")
  out = jnp.where(kind == 1, affine(img, mat), _apply_lut(img, lut))
  if any(n in _ENHANCE_OPS for n in ops):
    out = jnp.where(kind == 2, blend(degen, img, factor), out)
  return out


def _augmix_one(key: Array, img: Array, *, width: int, depth: int, severity: float, alpha: float,
                ops: tuple[str, ...]) -> Array:
  k_w, k_m, k_depth, k_ops = jax.random.split(key, 4)
  del k_m
  # Dirichlet(alpha * 1_width) and Beta(alpha, alpha) from ONE gamma draw (normalised gammas); with alpha = 1
  # the gammas are Exponential(1), which avoids the gamma sampler's slow-to-compile rejection loop.
  if alpha == 1.0:
    g = jax.random.exponential(k_w, (width + 2,), jnp.float32)
  else:
    g = jax.random.gamma(k_w, jnp.full((width + 2,), alpha, jnp.float32))
  ws = g[:width] / jnp.sum(g[:width])
  m = g[width] / (g[width] + g[width + 1])
  max_depth = depth if depth > 0 else 3
  depths = (jnp.full((width,), depth) if depth > 0 else jax.random.randint(k_depth, (width,), 1, 4))

  # Chains are independent: vmap over them, scan over depth (one compiled op body, not 9 unrolled ones).
  def chain(k, n_ops):
    def body(x, d):
      y = _random_op(jax.random.fold_in(k, d), x, ops, severity)
      return jnp.where(d < n_ops, y, x), None
    return jax.lax.scan(body, img, jnp.arange(max_depth))[0]

  chains = jax.vmap(chain)(jax.random.split(k_ops, width), depths)  # (width, H, W, C)
  mix = jnp.tensordot(ws, chains, axes=1)
  return (1.0 - m) * img + m * mix


def augmix(key: Array, images: Array, *, width: int = 3, depth: int = -1, severity: float = 1.0,
           alpha: float = 1.0, all_ops: bool = False) -> Array:
  """One AugMix view per image, on device.

  Args:
    key: a jax.random key (typed); each image gets fold_in(key, index).
    images: uint8 (B, H, W, C) in [0, 255] (the loader's batch), or float (B, H, W, C) in [-1, 1] (the model
      range; quantised to the 8-bit grid first, since the ops are defined on 8-bit levels). C = 1 or 3.
    width, depth (<= 0: uniform 1..3), severity, alpha, all_ops: as the reference (defaults = ImageNet run).
  Returns:
    float32 (B, H, W, C) in [-1, 1] (model range; not re-quantised).
  In the train step: `aug1 = augmix(fold_in(key, 1), batch["image"]); aug2 = augmix(fold_in(key, 2), ...)`.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"augmix expects (B, H, W, 1|3) images, got shape {images.shape}")
  if width < 1:
    raise ValueError(f"width must be >= 1, got {width}")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32)
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255)
  else:
    raise ValueError(f"augmix expects uint8 or float images, got {images.dtype}")
  ops = ALL_OPS if all_ops else OPS
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
  fn = lambda k, im: _augmix_one(k, im, width=width, depth=depth, severity=severity, alpha=alpha, ops=ops)
  out = jax.vmap(fn)(keys, x)
  return out / 127.5 - 1.0


def apply_op(name: str, img: Array, *, level: float = 1.0, sign: float = 1.0) -> Array:
  """Deterministic single op on uint8-valued (H, W, C) `img` at a given `level` (the sampled level) and sign.

  For tests and inspection; returns float32 0..255 integers, as PIL's op would.
  """
  img = jnp.asarray(img, jnp.float32)
  h, w, c = img.shape
  ip = lambda maxval: math.floor(level * maxval / 10.0)
  if name == "autocontrast":
    return _apply_lut(img, autocontrast_lut(img))
  if name == "equalize":
    return _apply_lut(img, equalize_lut(img))
  if name == "posterize":
    return _apply_lut(img, posterize_lut(c, jnp.int32(4 - ip(4))))
  if name == "solarize":
    return _apply_lut(img, solarize_lut(c, jnp.int32(256 - ip(256))))
  if name == "rotate":
    return affine(img, rotate_coeffs(jnp.float32(sign * ip(30)), h, w))
  s = sign * level * 0.3 / 10.0
  if name == "shear_x":
    return affine(img, jnp.array([1, s, 0, 0, 1, 0], jnp.float32))
  if name == "shear_y":
    return affine(img, jnp.array([1, 0, 0, s, 1, 0], jnp.float32))
  if name == "translate_x":
    return affine(img, jnp.array([1, 0, sign * ip(w / 3), 0, 1, 0], jnp.float32))
  if name == "translate_y":
    return affine(img, jnp.array([1, 0, 0, 0, 1, sign * ip(h / 3)], jnp.float32))
  if name in _ENHANCE_OPS:
    return blend(_degenerate(name, img), img, jnp.float32(level * 1.8 / 10.0 + 0.1))
  raise ValueError(f"unknown AugMix op {name!r}; known: {', '.join(ALL_OPS)}")
