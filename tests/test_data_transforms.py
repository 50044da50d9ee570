"""Transforms: shapes, dtypes, torchvision semantics of RandomResizedCrop (incl. fallback), determinism."""
import numpy as np
import pytest

from diffaug_jax.data import transforms as T


def _img(h, w, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def test_rrc_shape_and_determinism():
  img = _img(300, 400)
  a = T.random_resized_crop(img, np.random.default_rng(7), 224)
  b = T.random_resized_crop(img, np.random.default_rng(7), 224)
  c = T.random_resized_crop(img, np.random.default_rng(8), 224)
  assert a.shape == (224, 224, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_rrc_is_crop_then_resize():
  """torchvision's F.resized_crop on a PIL image: img.crop(box) then img.resize(size, BILINEAR). The crop's
  border pixels must not see the image outside the crop (PIL's resize(box=...) does)."""
  from PIL import Image
  img = _img(300, 400)
  got = T.random_resized_crop(img, np.random.default_rng(3), 64)
  top, left, h, w = T.rrc_params(np.random.default_rng(3), 300, 400)
  want = np.asarray(Image.fromarray(img).crop((left, top, left + w, top + h)).resize((64, 64),
                                                                                    Image.BILINEAR))
  np.testing.assert_array_equal(got, want)


def test_rrc_params_within_bounds():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = T.rrc_params(rng, 300, 400)
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
    area = h * w / (300 * 400)
    # Rounding lets the area stray slightly outside the sampled scale range.
    assert 0.07 <= area <= 1.0
    assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_rrc_fallback_is_central_clamped_crop():
  # No 10-try sample can fit a 10x1000 image with scale >= 0.9: torchvision falls back to a centre crop
  # with the ratio clamped to 4/3 -> h = 10, w = round(10 * 4/3) = 13.
  top, left, h, w = T.rrc_params(np.random.default_rng(0), 10, 1000, scale=(0.9, 1.0))
  assert (top, left, h, w) == (0, (1000 - 13) // 2, 10, 13)
  top, left, h, w = T.rrc_params(np.random.default_rng(0), 1000, 10, scale=(0.9, 1.0))
  assert (top, left, h, w) == ((1000 - 13) // 2, 0, 13, 10)


def test_resize_shorter_and_center_crop_match_torchvision_sizes():
  r = T.resize_shorter(_img(300, 400), 256)
  assert r.shape == (256, 341, 3)  # int(256 * 400 / 300) = 341
  r = T.resize_shorter(_img(500, 375), 256)
  assert r.shape == (341, 256, 3)
  img = np.arange(10 * 12, dtype=np.uint8).reshape(10, 12, 1)
  np.testing.assert_array_equal(T.center_crop(img, 4), img[3:7, 4:8])
  small = T.center_crop(_img(2, 2, 1), 4)
  assert small.shape == (4, 4, 1) and small[0].sum() == 0  # zero padded


def test_imagenet_views_and_eval():
  fn = T.make_train_transform("imagenet", 224)
  img = _img(300, 400)
  view, view_da = fn(img, np.random.default_rng(0))
  assert view.shape == view_da.shape == (224, 224, 3) and view.dtype == view_da.dtype == np.uint8
  # The DiffAug view is the deterministic Resize(256) + CenterCrop(224) = the eval transform.
  np.testing.assert_array_equal(view_da, T.make_eval_transform("imagenet", 224)(img))
  _, view_da2 = fn(img, np.random.default_rng(1))
  np.testing.assert_array_equal(view_da, view_da2)


def test_cifar_and_digits_views():
  img = _img(32, 32)
  view, base = T.make_train_transform("cifar", 32, crop_padding=4)(img, np.random.default_rng(3))
  assert view.shape == (32, 32, 3) and base is img
  views = [T.make_train_transform("cifar", 32)(img, np.random.default_rng(s))[0] for s in range(8)]
  assert any(not np.array_equal(v, img) for v in views)
  g = _img(16, 16, 1)
  v, b = T.make_train_transform("digits", 16, crop_padding=2)(g, np.random.default_rng(0))
  assert v.shape == (16, 16, 1) and np.array_equal(b, g)
  v, b = T.make_train_transform("none", 16)(_img(20, 24, 1), np.random.default_rng(0))
  assert v.shape == b.shape == (16, 16, 1)


def test_bad_names_and_inputs():
  with pytest.raises(ValueError, match="train_transform"):
    T.make_train_transform("autoaugment", 32)
  with pytest.raises(ValueError, match="eval_transform"):
    T.make_eval_transform("bogus", 32)
  with pytest.raises(ValueError, match="uint8"):
    T.center_crop(np.zeros((8, 8, 3), np.float32), 4)


def test_augmix_views_deterministic_and_mixed():
  from diffaug_jax.data import augmix  # pylint: disable=g-import-not-at-top
  fn = augmix.make_augmix_fn(None)
  img = _img(32, 32)
  a = fn(img, np.random.default_rng(0))
  b = fn(img, np.random.default_rng(0))
  assert a.shape == img.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  outs = [fn(img, np.random.default_rng(s)) for s in range(1, 6)]
  assert all(not np.array_equal(o, img) for o in outs)
  g = fn(_img(16, 16, 1), np.random.default_rng(0))
  assert g.shape == (16, 16, 1)


class _FixedRng:
  """Stands in for np.random.Generator in the host AugMix ops: uniform(low, high) returns the queued values
  in order (the sampled level first, then the sign draw, which flips the sign when > 0.5)."""

  def __init__(self, *values):
    self.values = list(values)

  def uniform(self, low=0.0, high=1.0):
    del low, high
    return self.values.pop(0)


def test_host_augmix_ops_hand_made():
  """Each op of the pipeline's AugMix (what the trainer uses) on a hand-made case, level -> PIL argument."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from diffaug_jax.data import augmix as H  # pylint: disable=g-import-not-at-top

  def run(op, arr, *values):
    gray = arr.shape[-1] == 1
    out = op(Image.fromarray(np.asarray(arr, np.uint8)[..., 0] if gray else np.asarray(arr, np.uint8)), 1,
             _FixedRng(*values))
    out = np.asarray(out).astype(np.int64)
    return out[..., None] if gray else out

  col = lambda v: np.asarray(v, np.uint8).reshape(1, -1, 1)
  # posterize at level 1: 4 - int(0.4) = 4 bits kept; solarize: threshold 256 - int(25.6) = 231.
  np.testing.assert_array_equal(run(H._posterize, col([0, 15, 16, 255, 100]), 1.0).ravel(), [0, 0, 16, 240, 96])
  np.testing.assert_array_equal(run(H._solarize, col([230, 231, 255, 0]), 1.0).ravel(), [230, 24, 0, 0])
  np.testing.assert_array_equal(run(H._autocontrast, col([50, 100, 150])).ravel(), [0, 127, 255])
  img = np.full((32, 32, 1), 10, np.uint8)
  img[16:] = 200
  out = run(H._equalize, img)
  assert (out[:16] == 0).all() and (out[16:] == 255).all()
  grid = np.arange(30 * 30 * 3).reshape(30, 30, 3) % 251
  # translate_x at level 1: int(1 * 10 / 10) = 1 px; sign draw 0.2 -> +1: output x shows input x + 1.
  out = run(H._translate_x, grid, 1.0, 0.2)
  np.testing.assert_array_equal(out[:, :-1], grid[:, 1:])
  assert (out[:, -1] == 0).all()
  out = run(H._translate_y, grid, 1.0, 0.9)  # sign draw 0.9 -> -1: shifted down by one row
  np.testing.assert_array_equal(out[1:], grid[:-1])
  assert (out[0] == 0).all()
  np.testing.assert_array_equal(run(H._rotate, grid, 0.2, 0.2), grid)  # int(0.2 * 3) = 0 degrees
  np.testing.assert_array_equal(run(H._rotate, grid, 30.0, 0.2), np.rot90(grid))  # 90 deg counter-clockwise
  np.testing.assert_array_equal(run(H._rotate, grid, 30.0, 0.9), np.rot90(grid, -1))  # sign flipped
  # shear at level 1: 0.03 per pixel; rows (columns) constant along the sheared axis stay unchanged inside.
  rows = np.repeat(np.arange(30)[:, None, None] * 8, 30, axis=1)
  np.testing.assert_array_equal(run(H._shear_x, rows, 1.0, 0.2)[:, :28], rows[:, :28])
  assert not np.array_equal(run(H._shear_x, rows.transpose(1, 0, 2), 1.0, 0.2), rows.transpose(1, 0, 2))
  cols = rows.transpose(1, 0, 2)
  np.testing.assert_array_equal(run(H._shear_y, cols, 1.0, 0.2)[:28], cols[:28])
  assert not np.array_equal(run(H._shear_y, rows, 1.0, 0.2), rows)
  assert len(H.OPS) == 9  # the reference's `augmentations` list


def test_host_augmix_all_ops_enhancers_hand_made():
  """all_ops adds color, contrast, brightness, sharpness: ImageEnhance.*(img).enhance(level * 1.8 / 10 + 0.1)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from diffaug_jax.data import augmix as H  # pylint: disable=g-import-not-at-top

  def run(op, arr, level):
    arr = np.asarray(arr, np.uint8)
    out = op(Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr), 1, _FixedRng(level))
    out = np.asarray(out).astype(np.int64)
    return out[..., None] if out.ndim == 2 else out

  col = lambda v: np.asarray(v, np.uint8).reshape(1, -1, 1)
  assert H.ALL_OPS[:9] == H.OPS and len(H.ALL_OPS) == 13
  # Level 10 -> factor 1.9 (values chosen away from integer boundaries).
  np.testing.assert_array_equal(run(H._brightness, col([5, 101, 200]), 10.0).ravel(), [9, 191, 255])
  np.testing.assert_array_equal(run(H._contrast, col([0, 30, 101]), 10.0).ravel(), [0, 17, 152])  # mean 44
  np.testing.assert_array_equal(run(H._color, [[[101, 53, 10]]], 10.0).ravel(), [136, 44, 0])  # L = 62
  img = np.zeros((5, 5, 1), np.uint8)
  img[2, 2] = 131
  want = np.zeros((5, 5, 1), np.int64)
  want[2, 2] = 203  # SMOOTH centre 50, blended 50 + 1.9 * 81
  np.testing.assert_array_equal(run(H._sharpness, img, 10.0), want)
  fn = H.make_augmix_fn({"augmix_all_ops": True})
  assert fn.all_ops and not H.make_augmix_fn(None).all_ops
  x = _img(24, 24)
  a = [fn(x, np.random.default_rng(s)) for s in range(4)]
  np.testing.assert_array_equal(a[0], fn(x, np.random.default_rng(0)))
  b = [H.make_augmix_fn(None)(x, np.random.default_rng(s)) for s in range(4)]
  assert any(not np.array_equal(u, v) for u, v in zip(a, b))  # a different op set is drawn


def _three_augment_branch(image, rng_seed, size, crop="rrc"):
  """Re-derive which of the three ops 3-Augment applied, and the flipped crop it applied it to (from the
  same rng stream)."""
  from PIL import Image
  rng = np.random.default_rng(rng_seed)
  if crop == "rrc":  # DeiT-III on ImageNet-1k: bicubic RandomResizedCrop
    view = T.random_resized_crop(image, rng, size, resample=Image.BICUBIC)
  else:  # --src: Simple Random Crop
    view = T.random_crop_with_padding(T.resize_shorter_bicubic(image, size), rng, size, 4, mode="reflect")
  base = T.random_hflip(view, rng)
  return int(rng.integers(0, 3)), base


def test_three_augment_ops_and_determinism():
  """DeiT-III 3-Augment: deterministic per rng; each of grayscale / solarize / blur is chosen about a third of
  the time; grayscale views have equal channels (color jitter keeps them gray); without color jitter the
  solarized view is exactly ImageOps.solarize of the crop and the blurred one is smoother than the crop."""
  from PIL import Image, ImageOps
  rng0 = np.random.default_rng(0)
  image = rng0.integers(0, 256, (40, 56, 3), dtype=np.uint8)
  image[:, :20] = 200  # a flat bright area (solarization inverts it)
  size = 32
  counts = [0, 0, 0]
  for seed in range(150):
    view = T.three_augment(image, np.random.default_rng(seed), size)
    assert view.shape == (size, size, 3) and view.dtype == np.uint8
    np.testing.assert_array_equal(view, T.three_augment(image, np.random.default_rng(seed), size))
    branch, base = _three_augment_branch(image, seed, size)
    counts[branch] += 1
    if branch == 0:
      assert np.abs(view[..., 0].astype(int) - view[..., 1]).max() <= 1  # gray stays gray through jitter
    plain = T.three_augment(image, np.random.default_rng(seed), size, color_jitter=0.0)
    if branch == 1:
      np.testing.assert_array_equal(plain, np.asarray(ImageOps.solarize(Image.fromarray(base), 128)))
    if branch == 2:
      roughness = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()
      assert roughness(plain) < roughness(base)
  assert min(counts) > 30, counts  # ~50 each
  gray = T.three_augment(image[..., :1], np.random.default_rng(1), size)
  assert gray.shape == (size, size, 1)
  view, view_da = T.make_train_transform("three_augment", size, resize_size=36)(image, np.random.default_rng(3))
  np.testing.assert_array_equal(view, T.three_augment(image, np.random.default_rng(3), size))
  np.testing.assert_array_equal(view_da, T.resize_center_crop(image, size, 36))
  # --src: Simple Random Crop instead of the RandomResizedCrop.
  for seed in range(5):
    src = T.three_augment(image, np.random.default_rng(seed), size, color_jitter=0.0, crop="src")
    branch, base = _three_augment_branch(image, seed, size, crop="src")
    if branch == 1:
      np.testing.assert_array_equal(src, np.asarray(ImageOps.solarize(Image.fromarray(base), 128)))
  view, _ = T.make_train_transform("three_augment_src", size)(image, np.random.default_rng(3))
  np.testing.assert_array_equal(view, T.three_augment(image, np.random.default_rng(3), size, crop="src"))
