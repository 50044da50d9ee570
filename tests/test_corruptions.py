"""ImageNet-C style corruptions: shape/dtype/range, severity effect, determinism (numpy only, ~5 s)."""
import numpy as np
import pytest

from diffaug_jax.data import corruptions as C


def _image(size, channels=3):
  yy, xx = np.mgrid[0:size, 0:size]
  img = np.stack([xx * 255 / size, yy * 255 / size, ((xx + yy) % (size // 2) > size // 4) * 200 + 20], -1)
  return img[..., :channels].astype(np.uint8)


def _dist(a, b):
  return np.abs(a.astype(np.float64) - b).mean()


# Families whose official parameters are not monotone at every step (glass_blur's iterations go 2,1,3,2,2;
# frost/fog blend weights; jpeg quality 10 vs 7; snow 2 vs 3): only severity 5 > severity 1 is required.
_LOOSE = {"glass_blur", "frost", "fog", "jpeg_compression", "snow", "pixelate"}


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_corruption_contract(name):
  for size, ch in ((16, 1), (32, 3), (64, 3)):
    img = _image(size, ch)
    dists = []
    for sev in C.SEVERITIES:
      out = C.corrupt(img, name, sev, seed=3)
      assert out.shape == img.shape and out.dtype == np.uint8, (name, size)
      dists.append(_dist(out, img))
      # Deterministic given the seed.
      np.testing.assert_array_equal(out, C.corrupt(img, name, sev, seed=3))
    assert dists[-1] > dists[0], (name, size, dists)
    if size >= 32:
      assert dists[-1] > 0.5, (name, size, dists)
      if name not in _LOOSE:
        assert all(b >= a - 0.05 * dists[-1] for a, b in zip(dists, dists[1:])), (name, size, dists)


def test_batch_and_seed():
  imgs = np.stack([_image(32), _image(32)[::-1]])
  out = C.corrupt(imgs, "gaussian_noise", 3, seed=0)
  assert out.shape == imgs.shape
  # Image i of a batch equals the single call with its global index: independent of batching.
  np.testing.assert_array_equal(out[1], C.corrupt(imgs[1], "gaussian_noise", 3, seed=0, index_offset=1))
  assert not np.array_equal(out, C.corrupt(imgs, "gaussian_noise", 3, seed=1))
  it = C.corrupt_iterator(iter([{"image": imgs[:1]}, {"image": imgs[1:]}]), "gaussian_noise", 3, seed=0)
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in it]), out)
  # Over 3 hosts, whatever rows a host reads, every example is corrupted as on one host: the random stream
  # is the example's (its "index", as the eval loaders give it), not the row's of its host.
  many = np.stack([_image(32)[::k] for k in (1, -1)] * 4)[:7]
  one = np.concatenate([b["image"] for b in C.corrupt_iterator(iter([{"image": many}]), "shot_noise", 2)])
  for h in range(3):
    idx = np.arange(h, 7, 3)
    batches = [{"image": many[idx[:1]], "index": idx[:1]}, {"image": many[idx[1:]], "index": idx[1:]}]
    got = C.corrupt_iterator(iter(batches), "shot_noise", 2, process_count=3)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in got]), one[idx])
  with pytest.raises(ValueError, match="example index"):
    list(C.corrupt_iterator(iter([{"image": many}]), "shot_noise", 2, process_count=2))


def test_bad_input():
  with pytest.raises(ValueError, match="unknown corruption"):
    C.corrupt(_image(16), "not_a_corruption", 1)
  with pytest.raises(ValueError, match="severity"):
    C.corrupt(_image(16), "contrast", 6)
  with pytest.raises(ValueError, match="uint8"):
    C.corrupt(_image(16).astype(np.float32), "contrast", 1)
