"""Mixup / CutMix (timm `Mixup`, mode "batch", per group): the output is what the drawn parameters say, the
draws follow timm's distributions, the loss equals timm's soft-target CE, and the train step wires it in."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from diffaug_jax import losses, mixing, sharding, steps

import test_steps


_mix_jit = jax.jit(mixing.mix_batch, static_argnums=2)


def _x(b=8, h=12, w=10, c=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (b, h, w, c)).astype(np.float32))


def test_mixup_blends_each_example_with_its_flipped_partner():
  x = _x(8)
  cfg = mixing.MixConfig(mixup_alpha=0.8, cutmix_alpha=0.0, group_size=4)
  out, lam, partner = mixing.mix_batch(jax.random.key(0), x, cfg)
  np.testing.assert_array_equal(partner, [3, 2, 1, 0, 7, 6, 5, 4])
  assert lam[0] == lam[3] and lam[4] == lam[7] and lam[0] != lam[4]  # one draw per group
  expect = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner]
  np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)


def test_cutmix_pastes_one_box_from_the_partner_and_lam_is_the_kept_area():
  x = _x(64, h=16, w=12)
  cfg = mixing.MixConfig(mixup_alpha=0.0, cutmix_alpha=1.0, group_size=2)
  out, lam, partner = mixing.mix_batch(jax.random.key(1), x, cfg)
  out, x, lam, partner = map(np.asarray, (out, x, lam, partner))
  for i in range(64):
    own = np.all(out[i] == x[i], axis=-1)
    other = np.all(out[i] == x[partner[i]], axis=-1)
    assert np.all(own | other), i  # every pixel comes from one of the two images
    assert lam[i] == pytest.approx(own.mean(), abs=1e-6), i  # correct_lam: the area actually kept
    rows, cols = np.nonzero(~own)
    if rows.size:  # the pasted pixels fill their bounding box: one axis-aligned rectangle
      box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
      assert box == rows.size, i
      # timm's rand_bbox: corners cy -/+ cut // 2, so a side not clipped by the border is even.
      for lo, hi, side in ((rows.min(), rows.max() + 1, 16), (cols.min(), cols.max() + 1, 12)):
        assert lo == 0 or hi == side or (hi - lo) % 2 == 0, (i, lo, hi)
  assert np.any(lam < 1) and np.any(lam > 0.3)


def _timm_cutmix_lam(rng, n, h, w):
  """numpy transcription of timm 0.3.2's CutMix draw: lam ~ Beta(1, 1), rand_bbox, correct_lam."""
  lam = rng.beta(1.0, 1.0, n)
  cut_h, cut_w = (h * np.sqrt(1 - lam)).astype(int), (w * np.sqrt(1 - lam)).astype(int)
  cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
  yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
  xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
  return 1 - (yh - yl) * (xh - xl) / (h * w)


def test_cutmix_kept_area_follows_timm():
  """The corrected lam (area kept) has the distribution of timm's draw: Beta(1, 1) raw lam, a box of
  int(side sqrt(1 - lam)) around a uniform centre, clipped (two-sample KS test against the transcription)."""
  n, h, w = 3000, 14, 10
  x = _x(2 * n, h=h, w=w, c=1, seed=5)
  _, lam, _ = _mix_jit(jax.random.key(6), x, mixing.MixConfig(0.0, 1.0, group_size=2))
  # Rounded: lam takes values k / (h w), in float32 here and float64 there; KS must see the same atoms.
  ours = np.round(np.asarray(lam[::2], np.float64), 5)
  ref = np.round(_timm_cutmix_lam(np.random.default_rng(0), 20000, h, w), 5)
  assert stats.ks_2samp(ours, ref).pvalue > 1e-3
  # Not a plain Beta(1, 1) (the clipping and the even sides matter): the test can tell them apart.
  assert stats.ks_2samp(np.random.default_rng(1).beta(1, 1, n), ref).pvalue < 1e-3


def test_draws_follow_timm_distributions():
  """mixup lam ~ Beta(0.8, 0.8); CutMix chosen with switch_prob; prob gates the whole group."""
  n = 4000
  x = _x(2 * n, h=4, w=4, c=1, seed=2)
  _, lam, _ = _mix_jit(jax.random.key(2), x, mixing.MixConfig(0.8, 0.0, group_size=2))
  assert stats.kstest(np.asarray(lam[::2]), stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
  out, lam, partner = _mix_jit(jax.random.key(3), x, mixing.MixConfig(0.8, 1.0, switch_prob=0.25,
                                                                              group_size=2))
  out, xn = np.asarray(out), np.asarray(x)
  pure = np.all((out == xn) | (out == xn[np.asarray(partner)]), axis=(1, 2, 3))[::2]  # CutMix (or lam = 1)
  assert abs(pure.mean() - 0.25) < 0.03, pure.mean()
  # 32 x 32 so that a CutMix box is almost never empty (an empty box reads as lam = 1).
  x32 = _x(2 * n, h=32, w=32, c=1, seed=3)
  _, lam, _ = _mix_jit(jax.random.key(4), x32, mixing.MixConfig(0.8, 1.0, prob=0.3, group_size=2))
  assert abs(np.mean(np.asarray(lam[::2]) < 1) - 0.3) < 0.03
  out, lam, _ = _mix_jit(jax.random.key(5), x, mixing.MixConfig(0.8, 1.0, prob=0.0))
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(lam, 1.0)


def test_mixed_cross_entropy_equals_timm_soft_target_ce():
  """timm: target = lam onehot_ls(y) + (1 - lam) onehot_ls(y.flip(0)), off = ls / K, on = 1 - ls + off;
  loss = mean(sum(-target * log_softmax(logits)))."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  y = rng.integers(0, 5, 6)
  partner = np.arange(6)[::-1]
  lam = rng.uniform(size=6).astype(np.float32)
  ls, k = 0.1, 5
  off, on = ls / k, 1 - ls + ls / k

  def onehot(v):
    t = np.full((6, k), off)
    t[np.arange(6), v] = on
    return t
  target = lam[:, None] * onehot(y) + (1 - lam[:, None]) * onehot(y[partner])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expect = np.mean(np.sum(-target * logp, -1))
  got = losses.mixed_cross_entropy(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(y[partner]),
                                   jnp.asarray(lam), label_smoothing=ls)
  assert float(got) == pytest.approx(expect, rel=1e-6)


def test_bad_settings_are_errors():
  for kw in (dict(mixup_alpha=0.0, cutmix_alpha=0.0), dict(mixup_alpha=-1.0), dict(prob=1.5),
             dict(group_size=1), dict(group_size=3), dict(group_size=4.0)):
    with pytest.raises(ValueError):
      mixing.MixConfig(**kw)
  with pytest.raises(ValueError, match="multiple of the mixing group"):
    mixing.mix_batch(jax.random.key(0), _x(6), mixing.MixConfig(group_size=4))
  with pytest.raises(ValueError, match="must be even"):  # an odd whole batch: one example would mix with itself
    mixing.mix_batch(jax.random.key(0), _x(5), mixing.MixConfig())


def _step_setup(mix, source):
  state, sp, fn = test_steps._setup()
  cfg = fn.keywords["cfg"]
  cfg = steps.StepConfig(schedule=cfg.schedule, lr_schedule=cfg.lr_schedule, label_smoothing=0.1, mix=mix,
                         diffaug_source=source)
  return state, sp, functools.partial(fn.func, **{**fn.keywords, "cfg": cfg})


@pytest.mark.parametrize("source", ["image_da", "clean"])
def test_train_step_loss_is_mixed_ce_of_the_mixed_views(source):
  """The step's loss, recomputed by hand: clean view mixed by mix_batch(fold_in(key, 2)); DiffAug view from
  the batch's image_da (hard labels) or from the mixed clean view (mixed targets)."""
  mix = mixing.MixConfig(0.8, 1.0, group_size=4)
  state, sp, fn = _step_setup(mix, source)
  batch, key = test_steps._batch(8), jax.random.key(3)
  _, m = fn(state, batch, key, sp)
  x, lam, partner = mixing.mix_batch(jax.random.fold_in(key, 2), steps.to_model_range(batch["image"]), mix)
  da_key = jax.random.split(key)[0]
  x0_da = x if source == "clean" else steps.to_model_range(batch["image_da"])
  cfg = fn.keywords["cfg"]
  x_da, _ = steps.make_diffaug_view(da_key, x0_da, sp, fn.keywords["score_eps_fn"], cfg)
  logits, _ = test_steps.TinyClassifier(4).apply(state.variables(), jnp.concatenate([x, x_da]), train=True,
                                                 mutable=["batch_stats"])
  labels = jnp.asarray(batch["label"])
  ce_mixed = lambda lg: losses.mixed_cross_entropy(lg, labels, labels[partner], lam, label_smoothing=0.1)
  clean = ce_mixed(logits[:8])
  da = ce_mixed(logits[8:]) if source == "clean" else losses.cross_entropy(logits[8:], labels,
                                                                             label_smoothing=0.1)
  np.testing.assert_allclose([m["loss_clean"], m["loss_diffaug"]], [clean, da], rtol=1e-5)
  assert float(jnp.min(lam)) < 1  # something was mixed


def test_mixed_step_sharded_8_devices_equals_1_device():
  mix = mixing.MixConfig(0.8, 1.0, group_size=2)
  batches = [test_steps._batch(16, s) for s in range(2)]
  runs = []
  for mesh in (sharding.make_mesh(jax.devices()[:1]), sharding.make_mesh()):
    state, sp, fn = _step_setup(mix, "clean")
    runs.append(test_steps._run(mesh, state, sp, fn, batches))
  (s1, h1, _), (s8, h8, _) = runs
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  for m1, m8 in zip(h1, h8):
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=2e-5)


def test_step_refuses_mixing_with_augmix():
  state, sp, fn = _step_setup(mixing.MixConfig(), "image_da")
  with pytest.raises(ValueError, match="AugMix"):
    fn(state, test_steps._batch(8, augmix=True), jax.random.key(0), sp)


def test_trainer_mix_config_checks():
  from diffaug_jax.trainer import mix_config
  c = ml_collections.ConfigDict(dict(batch_size=512, augmix=False))
  assert mix_config(c) is None
  c.mixup = dict(mixup_alpha=0.0, cutmix_alpha=0.0)
  assert mix_config(c) is None
  c.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, group_size=64)
  assert mix_config(c) == mixing.MixConfig(0.8, 1.0, 1.0, 0.5, 64)
  c.mixup.group_size = 48
  with pytest.raises(ValueError, match="divide batch_size"):
    mix_config(c)
  c.mixup = dict(mixup_alpha=0.8, cutmx_alpha=1.0)
  with pytest.raises(ValueError, match="unknown fields"):
    mix_config(c)
  c.mixup = dict(mixup_alpha=0.0, cutmx_alpha=1.0)  # a typo is an error even when nothing else mixes
  with pytest.raises(ValueError, match="unknown fields"):
    mix_config(c)
  c.mixup = dict(mixup_alpha=0.2)  # an absent alpha is 0: Mixup only, not the dataclass's CutMix default
  assert mix_config(c) == mixing.MixConfig(0.2, 0.0, group_size=0)
  c.mixup = dict(cutmix_alpha=1.0, group_size=3)
  with pytest.raises(ValueError, match="even"):
    mix_config(c)
  c.mixup = dict(mixup_alpha=0.8)
  c.augmix = True
  with pytest.raises(ValueError, match="augmix"):
    mix_config(c)
