"""timm RandAugment (diffaug_jax.data.randaugment): parity with timm 0.3.2, draws, parsing, transform, config.

The parity cases (tests/data/timm_randaugment_ops.npz) come from timm 0.3.2's own `auto_augment.py` run
under Pillow 13.0.0 / numpy 2.4.6 (see tests/data/make_timm_randaugment_golden.py). The op cases compare
exact uint8 equality. The end-to-end cases also rely on numpy's Generator streams (integers, random,
normal, choice) being those of numpy 2.4.6; regenerate the file if a numpy release changes them.
"""
import collections
import pathlib
import re

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from diffaug_jax.data import config as data_config
from diffaug_jax.data import pipeline
from diffaug_jax.data import randaugment as RA
from diffaug_jax.data import transforms as T

GOLDEN = pathlib.Path(__file__).parent / "data" / "timm_randaugment_ops.npz"
DEIT = RA.parse_rand_augment("rand-m9-mstd0.5-inc1")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as g:
    return {k: g[k] for k in g.files}


def _img(h, w, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


# ---- parity with timm

@pytest.mark.parametrize("kind", ["rgb", "gray"])
def test_every_op_matches_timm(golden, kind):
  """Each op of both lists (inc0 and inc1) at magnitudes 0, 2.4, 5, 9, 9.7, 10, both signs, == timm's
  AugmentOp output (the gray image: timm with fill 115, the value we derive from the RGB fill)."""
  image = golden[f"op_input_{kind}"]
  names = set(golden["op_name"])
  assert names == set(RA.RAND_TRANSFORMS) | set(RA.RAND_INCREASING_TRANSFORMS) and len(names) == 21
  bad = []
  for i, (name, m, neg) in enumerate(zip(golden["op_name"], golden["op_magnitude"], golden["op_negate"])):
    got = RA.apply_op(image, str(name), float(m), negate=bool(neg))
    if not np.array_equal(got, golden[f"op_output_{kind}"][i]):
      bad.append((str(name), float(m), bool(neg)))
  assert not bad, f"{len(bad)} op cases differ from timm: {bad[:10]}"


def test_golden_cases_are_discriminative(golden):
  """The stored cases depend on sign and magnitude (so a wrong level function or sign cannot pass)."""
  out = golden["op_output_rgb"]
  key = {(str(n), float(m), bool(s)): i for i, (n, m, s) in
         enumerate(zip(golden["op_name"], golden["op_magnitude"], golden["op_negate"]))}
  for name in sorted(RA.SIGNED_OPS):
    assert not np.array_equal(out[key[(name, 9.0, False)]], out[key[(name, 9.0, True)]]), name
    assert not np.array_equal(out[key[(name, 9.0, False)]], out[key[(name, 5.0, False)]]), name
  for name in ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd", "Posterize", "Solarize", "Color"):
    assert not np.array_equal(out[key[(name, 9.0, False)]], out[key[(name, 5.0, False)]]), name


def test_rand_augment_matches_timm_end_to_end(golden):
  """timm's whole RandAugment (op choice, prob 0.5, gauss magnitude + clip, sign), its random sources fed
  from default_rng(seed) in timm's draw order, == our rand_augment with default_rng(seed). Policies: DeiT's
  (RGB and gray), rand-m7-n3-mstd1, rand-m10-n4-mstd3-inc1 (heavy clipping), rand-m9-mstd0.5-inc1-w0."""
  index = collections.Counter()
  bad = []
  for policy, c, seed in zip(golden["e2e_policy"], golden["e2e_channels"], golden["e2e_seed"]):
    kind = "rgb" if c == 3 else "gray"
    k = index[kind]
    index[kind] += 1
    n_inputs = len(golden[f"e2e_input_{kind}"])
    got = RA.rand_augment(golden[f"e2e_input_{kind}"][k % n_inputs], np.random.default_rng(int(seed)),
                          RA.parse_rand_augment(str(policy)))
    if not np.array_equal(got, golden[f"e2e_output_{kind}"][k]):
      bad.append((str(policy), int(seed)))
  assert not bad, f"differs from timm: {bad}"
  assert len(golden["e2e_seed"]) == 80


# ---- parsing

def test_parse_deit_policy_and_lists():
  assert DEIT == RA.RandAugmentParams(magnitude=9.0, num_layers=2, magnitude_std=0.5, increasing=True)
  assert DEIT.op_names == (
      "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
      "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
      "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
  assert RA.parse_rand_augment("rand") == RA.RandAugmentParams(10.0, 2, 0.0, False)
  p = RA.parse_rand_augment("rand-inc0-n3-m7.5-mstd1-mmax15-w0")
  assert (p.magnitude, p.num_layers, p.magnitude_std, p.increasing, p.magnitude_max, p.weight_idx) == (
      7.5, 3, 1.0, False, 15.0, 0)
  assert p.op_names == RA.RAND_TRANSFORMS and len(set(RA.RAND_TRANSFORMS)) == 15
  np.testing.assert_allclose(p.choice_weights.sum(), 1.0)


@pytest.mark.parametrize("policy, part", [
    ("", "''"), ("rand2-m9", "'rand2'"), ("augmix-m9", "'augmix'"), ("rand-x9", "'x9'"), ("rand-m", "'m'"),
    ("rand-m9-", "''"), ("rand-mstd-1", "'mstd'"), ("rand-n1.5", "'n1.5'"), ("rand-m9x", "'m9x'"),
    ("rand-inc2", "'inc2'"), ("rand-w1", "'w1'"), ("rand-m9-m8", "'m8'"), ("rand-mmax0", "'mmax0'"),
    ("rand-p0.5", "'p0.5'"), ("rand-M9", "'M9'"), ("rand-w0-n14", "at most 13"),
])
def test_parse_rejects(policy, part):
  with pytest.raises(ValueError, match=re.escape(part)):
    RA.parse_rand_augment(policy)


def test_parse_rejects_non_string():
  with pytest.raises(ValueError, match="string"):
    RA.parse_rand_augment(None)


# ---- draws

def test_deterministic_given_seed_and_shape_dtype():
  img = _img(40, 36)
  a = RA.rand_augment(img, np.random.default_rng(5), DEIT)
  b = RA.rand_augment(img, np.random.default_rng(5), DEIT)
  np.testing.assert_array_equal(a, b)
  assert a.shape == img.shape and a.dtype == np.uint8
  outs = {RA.rand_augment(img, np.random.default_rng(s), DEIT).tobytes() for s in range(20)}
  assert len(outs) >= 10
  # sample_ops + apply_ops is rand_augment, and consumes the same stream.
  rng1, rng2 = np.random.default_rng(9), np.random.default_rng(9)
  np.testing.assert_array_equal(RA.rand_augment(img, rng1, DEIT),
                                RA.apply_ops(img, RA.sample_ops(rng2, DEIT)))
  assert rng1.random() == rng2.random()


def test_num_applied_ops_is_binomial_and_choice_uniform_with_replacement():
  rng = np.random.default_rng(0)
  draws = [RA.sample_ops(rng, DEIT) for _ in range(8000)]
  freq = np.bincount([len(d) for d in draws], minlength=3) / len(draws)
  np.testing.assert_allclose(freq, [0.25, 0.5, 0.25], atol=0.025)  # Binomial(2, 0.5); 4+ sigma
  names = collections.Counter(op.name for d in draws for op in d)
  assert set(names) == set(DEIT.op_names)
  total = sum(names.values())
  np.testing.assert_allclose([names[n] / total for n in DEIT.op_names], 1 / 15, atol=0.012)
  pairs = [d for d in draws if len(d) == 2]
  same = np.mean([d[0].name == d[1].name for d in pairs])
  assert 0.04 < same < 0.095  # with replacement: 1/15 of the pairs repeat an op
  n3 = RA.parse_rand_augment("rand-m9-n3")
  assert abs(np.mean([len(RA.sample_ops(rng, n3)) for _ in range(4000)]) - 1.5) < 0.06
  assert RA.sample_ops(rng, RA.parse_rand_augment("rand-n0")) == ()
  # Signed ops draw a sign; the others never negate.
  signs = [op.negate for d in draws for op in d if op.name in RA.SIGNED_OPS]
  assert 0.46 < np.mean(signs) < 0.54
  assert not any(op.negate for d in draws for op in d if op.name not in RA.SIGNED_OPS)


def test_weighted_choice_is_without_replacement():
  rng = np.random.default_rng(1)
  p = RA.parse_rand_augment("rand-m9-n13-w0")
  for _ in range(50):
    idx = [op.name for op in RA.sample_ops(rng, p)]
    assert len(idx) == len(set(idx)) and "Invert" not in idx and "Posterize" not in idx


def test_magnitude_gaussian_and_clipped_per_op():
  rng = np.random.default_rng(0)
  mags = np.array([op.magnitude for _ in range(3000)
                   for op in RA.sample_ops(rng, RA.parse_rand_augment("rand-m9-mstd4"))])
  assert mags.min() == 0.0 and mags.max() == 10.0
  assert 0.35 < np.mean(mags == 10.0) < 0.45  # P(N(9, 4) >= 10) = 0.40
  assert 0.01 < np.mean(mags == 0.0) < 0.03  # P(N(9, 4) <= 0) = 0.012
  assert len(np.unique(mags)) > 100  # one draw per op call, not per image
  deit = np.array([op.magnitude for _ in range(3000) for op in RA.sample_ops(rng, DEIT)])
  assert abs(deit.mean() - 9.0) < 0.05 and 0.01 < np.mean(deit == 10.0) < 0.04
  fixed = [op.magnitude for _ in range(100) for op in RA.sample_ops(rng, RA.parse_rand_augment("rand-m12"))]
  assert set(fixed) == {10.0}  # M > 10 is clipped to 10 unless mmax
  wide = [op.magnitude for _ in range(300) for op in RA.sample_ops(rng, RA.parse_rand_augment("rand-m12-mmax15"))]
  assert set(wide) == {12.0}


# ---- ops

def test_grayscale_and_fill():
  gray = _img(20, 16, 1)
  out = RA.rand_augment(gray, np.random.default_rng(3), DEIT)
  assert out.shape == (20, 16, 1) and out.dtype == np.uint8
  flat = np.full((20, 16, 1), 200, np.uint8)
  # A 0.45 * W shift leaves int(0.45 * 16) = 7 full columns of fill: 115 = round(mean(124, 116, 104)).
  shifted = RA.apply_op(flat, "TranslateXRel", 10.0)
  assert (shifted[:, -7:] == 115).all() and (shifted[:, :8] == 200).all()
  rgb = RA.apply_op(np.full((20, 16, 3), 200, np.uint8), "TranslateYRel", 10.0, negate=True)
  np.testing.assert_array_equal(rgb[:9, 5], [RA.IMAGENET_FILL] * 9)  # negated: moves down
  np.testing.assert_array_equal(RA.apply_op(flat, "Rotate", 10.0, fill=7)[0, 0], [7])
  for name in RA.RAND_TRANSFORMS + RA.RAND_INCREASING_TRANSFORMS:
    for kind in (gray, _img(20, 16, 3)):
      assert RA.apply_op(kind, name, 9.0, negate=True).shape == kind.shape


def test_posterize_zero_bits_is_black_and_mmax_clamps():
  img = _img(8, 8)
  np.testing.assert_array_equal(RA.apply_op(img, "PosterizeIncreasing", 10.0), 0)
  np.testing.assert_array_equal(RA.apply_op(img, "Posterize", 2.0), 0)
  np.testing.assert_array_equal(RA.apply_op(img, "PosterizeIncreasing", 14.0), 0)  # mmax: bits < 0
  want = np.asarray(ImageEnhance.Color(Image.fromarray(img)).enhance(0.1))  # max(0.1, 1 - 1.17)
  np.testing.assert_array_equal(RA.apply_op(img, "ColorIncreasing", 13.0, negate=True), want)
  np.testing.assert_array_equal(RA.apply_op(img, "SolarizeIncreasing", 13.0), 255 - img)  # threshold 0


def test_rejects_bad_images():
  with pytest.raises(ValueError, match="uint8"):
    RA.rand_augment(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0), DEIT)
  with pytest.raises(ValueError, match="uint8"):
    RA.rand_augment(np.zeros((8, 8, 4), np.uint8), np.random.default_rng(0), DEIT)


# ---- train transform, config, pipeline

def test_make_train_transform_rand_augment():
  img = _img(48, 40)
  fn = T.make_train_transform("rand_augment", 32)
  view, view_da = fn(img, np.random.default_rng(4))
  assert view.shape == view_da.shape == (32, 32, 3) and view.dtype == view_da.dtype == np.uint8
  np.testing.assert_array_equal(view_da, T.resize_center_crop(img, 32, 37))  # round(32 / 0.875)
  # Clean view: bicubic RandomResizedCrop, flip, RandAugment from one stream; no color jitter.
  rng = np.random.default_rng(4)
  want = T.random_resized_crop(img, rng, 32, resample=Image.BICUBIC)
  want = RA.rand_augment(T.random_hflip(want, rng), rng, DEIT)
  np.testing.assert_array_equal(view, want)
  gview, _ = fn(_img(48, 40, 1), np.random.default_rng(0))
  assert gview.shape == (32, 32, 1)
  # The policy is parsed by the factory.
  other = T.make_train_transform("rand_augment", 32, rand_augment="rand-m9-n0")
  rng = np.random.default_rng(4)
  np.testing.assert_array_equal(
      other(img, np.random.default_rng(4))[0],
      T.random_hflip(T.random_resized_crop(img, rng, 32, resample=Image.BICUBIC), rng))
  with pytest.raises(ValueError, match="'q1'"):
    T.make_train_transform("rand_augment", 32, rand_augment="rand-q1")


def test_config_default_and_validate():
  cfg = data_config.default_config()
  assert cfg.rand_augment == "rand-m9-mstd0.5-inc1"
  cfg.train_transform = "rand_augment"
  data_config.validate(cfg)
  cfg.rand_augment = "rand-m9-inc3"
  with pytest.raises(ValueError, match=r"data\.rand_augment.*'inc3'"):
    data_config.validate(cfg)
  cfg.train_transform = "imagenet"  # the policy only matters for rand_augment
  data_config.validate(cfg)


def test_pipeline_passes_policy(monkeypatch):
  seen = []
  real = T.make_train_transform

  def spy(*args, **kwargs):
    seen.append(kwargs.get("rand_augment"))
    return real(*args, **kwargs)

  monkeypatch.setattr(T, "make_train_transform", spy)
  cfg = data_config.digits_config(16, 1)
  cfg.update({"train_transform": "rand_augment", "rand_augment": "rand-m5-n1"})
  batch = next(pipeline.make_train_loader(cfg, global_batch_size=4, seed=0))
  assert seen == ["rand-m5-n1"]
  assert batch["image"].shape == batch["image_da"].shape == (4, 16, 16, 1)
