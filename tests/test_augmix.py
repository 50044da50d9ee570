"""On-device AugMix (diffaug_jax.augmix): hand-made op cases, Pillow cross-check, shape/range, determinism."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from diffaug_jax import augmix as A


def _op(name, img, **kw):
  return np.asarray(A.apply_op(name, np.asarray(img, np.uint8), **kw)).astype(np.int64)


def _col(values):
  return np.asarray(values, np.uint8).reshape(1, -1, 1)


def test_lut_ops_hand_made():
  # severity-1 levels: posterize keeps 4 bits; solarize at level 1 inverts levels >= 256 - 25 = 231.
  np.testing.assert_array_equal(_op("posterize", _col([0, 15, 16, 255, 100]), level=1.0).ravel(),
                                [0, 0, 16, 240, 96])
  np.testing.assert_array_equal(_op("solarize", _col([230, 231, 255, 0]), level=1.0).ravel(), [230, 24, 0, 0])
  img = np.stack([np.array([[50, 100, 150]]), np.array([[7, 7, 7]]), np.array([[0, 128, 255]])], -1)
  out = _op("autocontrast", img)
  np.testing.assert_array_equal(out[0, :, 0], [0, 127, 255])  # 255 * 50 / 100 = 127.5 -> 127
  np.testing.assert_array_equal(out[0, :, 1], [7, 7, 7])  # constant channel: unchanged
  np.testing.assert_array_equal(out[0, :, 2], [0, 128, 255])
  # equalize: 512 pixels at 10 and 512 at 200 -> step 2; table maps 10 -> 0, 200 -> 513 // 2 clipped to 255.
  img = np.full((32, 32, 1), 10, np.uint8)
  img[16:] = 200
  out = _op("equalize", img)
  assert (out[:16] == 0).all() and (out[16:] == 255).all()


def test_geometric_ops_hand_made():
  img = np.arange(30 * 30 * 3).reshape(30, 30, 3) % 251
  # translate_x at level 1: int(1 * (30 / 3) / 10) = 1 pixel; output x shows input x + 1, last column 0.
  out = _op("translate_x", img, level=1.0)
  np.testing.assert_array_equal(out[:, :-1], img[:, 1:])
  assert (out[:, -1] == 0).all()
  out = _op("translate_y", img, level=1.0, sign=-1.0)
  np.testing.assert_array_equal(out[1:], img[:-1])
  assert (out[0] == 0).all()
  np.testing.assert_array_equal(_op("rotate", img, level=0.2), img)  # int(0.2 * 3) = 0 degrees
  # 90 degrees counter-clockwise (level 30 -> 90) == np.rot90, up to float32 trig (+-1 level).
  out = _op("rotate", img, level=30.0)
  assert np.abs(out - np.rot90(img)).max() <= 1
  # shear_x keeps rows that are constant along x, where the source stays inside the image.
  rows = np.repeat(np.arange(30)[:, None, None] * 8, 30, axis=1)
  out = _op("shear_x", rows, level=1.0)  # x_in = x + 0.03 y: inside for x <= 28
  np.testing.assert_array_equal(out[:, :28], rows[:, :28])


def test_remaining_ops_hand_made():
  """shear_y and the all_ops enhancers (color, contrast, brightness, sharpness) on hand-computed pixels.

  Enhancers are Image.blend(degenerate, img, f) with f = level * 1.8 / 10 + 0.1, truncated; the values are
  chosen so that no result sits on an integer boundary (float32 f = 1.8999999 or ~0.5)."""
  # shear_y at level 1: y_in = y + 0.03 x; columns constant along y stay unchanged where inside.
  cols = np.repeat(np.arange(30)[None, :, None] * 8, 30, axis=0)
  np.testing.assert_array_equal(_op("shear_y", cols, level=1.0)[:28], cols[:28])
  assert not np.array_equal(_op("shear_y", cols.transpose(1, 0, 2), level=1.0), cols.transpose(1, 0, 2))
  f05 = (0.5 - 0.1) * 10 / 1.8  # level giving f ~ 0.5
  # brightness: degenerate = black -> f * x.
  np.testing.assert_array_equal(_op("brightness", _col([5, 101, 200]), level=10.0).ravel(), [9, 191, 255])
  np.testing.assert_array_equal(_op("brightness", _col([1, 11, 101, 255]), level=f05).ravel(), [0, 5, 50, 127])
  # contrast: degenerate = mean gray level rounded (mean(0, 30, 101) = 43.7 -> 44); 44 + 1.9 (x - 44).
  np.testing.assert_array_equal(_op("contrast", _col([0, 30, 101]), level=10.0).ravel(), [0, 17, 152])
  # color: degenerate = L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16 = 62 for (101, 53, 10).
  np.testing.assert_array_equal(_op("color", np.array([[[101, 53, 10]]]), level=10.0).ravel(), [136, 44, 0])
  # sharpness: degenerate = SMOOTH (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, border kept). A single bright
  # pixel 131 in a 5x5 zero image: smooth centre 655/13 -> 50, ring 131/13 -> 10; blended with f = 1.9:
  # centre 50 + 1.9 * 81 = 203.9 -> 203, ring 10 - 19 -> 0, border 0 (unchanged).
  img = np.zeros((5, 5, 1), np.uint8)
  img[2, 2] = 131
  want = np.zeros((5, 5, 1), np.int64)
  want[2, 2] = 203
  np.testing.assert_array_equal(_op("sharpness", img, level=10.0), want)
  # f ~ 0.5: centre 50 + 40.5 -> 90 (the ring, 10 - 5 = 5.0, sits on a boundary: not checked).
  assert _op("sharpness", img, level=f05)[2, 2, 0] == 90


def _pil(name, img, level, sign):
  p = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
  h, w = img.shape[:2]
  ip = lambda m: int(level * m / 10)
  aff = lambda c: p.transform(p.size, Image.AFFINE, c, resample=Image.BILINEAR)
  s = sign * level * 0.3 / 10
  f = level * 1.8 / 10 + 0.1
  q = {
      "autocontrast": lambda: ImageOps.autocontrast(p),
      "equalize": lambda: ImageOps.equalize(p),
      "posterize": lambda: ImageOps.posterize(p, 4 - ip(4)),
      "solarize": lambda: ImageOps.solarize(p, 256 - ip(256)),
      "rotate": lambda: p.rotate(sign * ip(30), resample=Image.BILINEAR),
      "shear_x": lambda: aff((1, s, 0, 0, 1, 0)),
      "shear_y": lambda: aff((1, 0, 0, s, 1, 0)),
      "translate_x": lambda: aff((1, 0, sign * ip(w / 3), 0, 1, 0)),
      "translate_y": lambda: aff((1, 0, 0, 0, 1, sign * ip(h / 3))),
      "color": lambda: ImageEnhance.Color(p).enhance(f),
      "contrast": lambda: ImageEnhance.Contrast(p).enhance(f),
      "brightness": lambda: ImageEnhance.Brightness(p).enhance(f),
      "sharpness": lambda: ImageEnhance.Sharpness(p).enhance(f),
  }[name]()
  a = np.asarray(q).astype(np.int64)
  return a if a.ndim == 3 else a[..., None]


@pytest.mark.parametrize("channels", [3, 1])
def test_ops_match_pillow(channels):
  rng = np.random.default_rng(channels)
  for name in A.ALL_OPS:
    for level, sign in ((0.7, 1.0), (7.3, -1.0)):  # severity-1 range, and a strong level
      img = rng.integers(0, 256, (12, 14, channels)).astype(np.uint8)
      want, got = _pil(name, img, level, sign), _op(name, img, level=level, sign=sign)
      diff = np.abs(want - got)
      # rotate: float32 vs double coordinates may flip a truncation (+-1 on a few pixels).
      assert diff.max() <= (1 if name == "rotate" else 0), (name, level, diff.max())
      assert (diff > 0).mean() <= (0.02 if name == "rotate" else 0.0), name


def test_augmix_batch_shape_range_determinism():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
  images[1] = 128  # a flat image: every op keeps it in range
  fn = jax.jit(A.augmix)
  key = jax.random.key(0)
  a, b = fn(key, images), fn(key, images)
  c = fn(jax.random.key(1), images)
  assert a.shape == images.shape and a.dtype == jnp.float32
  assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  clean = images / 127.5 - 1.0
  assert not np.allclose(a, clean, atol=1e-3)
  # Each image got its own draw: image 0's result does not depend on the others.
  a0 = fn(key, np.stack([images[0], images[2], images[1]]))
  np.testing.assert_allclose(a0[0], a[0], atol=1e-6)


def test_augmix_input_checks():
  with pytest.raises(ValueError, match="B, H, W"):
    A.augmix(jax.random.key(0), jnp.zeros((16, 16, 3), jnp.uint8))
  with pytest.raises(ValueError, match="unknown AugMix op"):
    A.apply_op("blur", np.zeros((4, 4, 3)))
  # float [-1, 1] input goes through the same 8-bit grid (abstract check: no second compile).
  out = jax.eval_shape(A.augmix, jax.random.key(0), jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32))
  assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32
