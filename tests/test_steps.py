"""train_step / score_train_step / eval_step: sharding invariance, single compilation, loss composition.

Stand-in Flax modules (tiny, fast to compile) are defined here and reused by the trainer/checkpoint/
multiprocess tests through `factory="test_steps:..."`. Runtime ~25 s on 2 cores.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffaug_jax import diffusion, sharding, steps
from diffaug_jax.state import TrainState


class TinyClassifier(nn.Module):
  """Conv + BatchNorm + Dense: exercises batch_stats (statistics over the concatenated views)."""
  num_classes: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    x = nn.Conv(8, (3, 3), dtype=self.dtype)(x.astype(self.dtype))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    h = jnp.mean(nn.relu(x), axis=(1, 2)).astype(jnp.float32)
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(h).astype(jnp.float32)
    return (logits, h) if return_features else logits


class TinyEps(nn.Module):
  """A stand-in eps-prediction 'score model' with the UNet attributes make_eps_fn reads."""
  in_channels: int = 1
  out_channels: int = 1
  num_classes: Optional[int] = None
  dtype: Any = jnp.float32
  hidden: int = 0  # > 0: one hidden conv of this width first (a kernel big enough for FSDP tests to split)

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    temb = nn.Dense(self.in_channels)(jnp.sin(t.astype(jnp.float32)[:, None] / 100.0))
    x = x.astype(self.dtype)
    if self.hidden:
      x = nn.tanh(nn.Conv(self.hidden, (3, 3), dtype=self.dtype)(x))
    h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(x)
    return (h + temb[:, None, None, :]).astype(jnp.float32)


def _setup(diffaug=True, weight=1.0, num_classes=4):
  from diffaug_jax.trainer import make_score_eps_factory
  clf = TinyClassifier(num_classes)
  eps_mod = TinyEps()
  x = jnp.zeros((1, 8, 8, 1))
  variables = clf.init(jax.random.key(0), x)
  score_params = eps_mod.init(jax.random.key(1), x, jnp.zeros((1,), jnp.int32))["params"]
  tx = optax.sgd(0.1, momentum=0.9)
  state = TrainState.create(variables, tx)
  cfg = steps.StepConfig(schedule=diffusion.linear_schedule(1000), diffaug=diffaug, diffaug_weight=weight,
                         lr_schedule=lambda s: 0.1)
  fn = functools.partial(steps.train_step, apply_fn=clf.apply, score_eps_fn=make_score_eps_factory(eps_mod),
                         tx=tx, cfg=cfg)
  return state, score_params, fn


def _batch(n=16, seed=0, augmix=False):
  rng = np.random.default_rng(seed)
  b = {"image": rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
       "image_da": rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
       "label": rng.integers(0, 4, (n,)).astype(np.int32)}
  if augmix:
    b["image_aug1"] = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    b["image_aug2"] = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  return b


def _run(mesh, state, score_params, fn, batches):
  st_sh = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  sc_sh = jax.tree.map(lambda _: sharding.replicated(mesh), score_params)
  step = jax.jit(lambda s, b, p: fn(s, b, jax.random.fold_in(jax.random.key(7), s.step), p),
                 in_shardings=(st_sh, sharding.batch_sharding(mesh), sc_sh),
                 out_shardings=(st_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  state = jax.device_put(jax.device_get(state), st_sh)  # a copy: the step donates it
  score_params = jax.device_put(score_params, sc_sh)
  hist = []
  for b in batches:
    state, m = step(state, sharding.shard_batch(b, mesh), score_params)
    hist.append(jax.device_get(m))
  return jax.device_get(state), hist, step


def test_sharded_8_devices_equals_1_device():
  """Same global batch on a 1-device and an 8-device mesh -> same params/batch_stats/metrics.

  Tolerance: rtol 2e-5, atol 1e-6 (float32; only the reduction order differs across devices)."""
  assert jax.device_count() == 8
  batches = [_batch(16, s) for s in range(3)]
  state, sp, fn = _setup()
  s1, h1, _ = _run(sharding.make_mesh(jax.devices()[:1]), state, sp, fn, batches)
  state, sp, fn = _setup()
  s8, h8, _ = _run(sharding.make_mesh(), state, sp, fn, batches)
  for a, b in zip(jax.tree.leaves((s1.params, s1.batch_stats)), jax.tree.leaves((s8.params, s8.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  for m1, m8 in zip(h1, h8):
    for k in ("loss", "loss_clean", "loss_diffaug", "accuracy"):
      np.testing.assert_allclose(m1[k], m8[k], rtol=2e-5, atol=1e-6)
  assert int(s8.step) == 3
  # The step did something: params moved and the DiffAug term is a real, non-zero loss.
  assert not np.allclose(jax.tree.leaves(s8.params)[0], jax.tree.leaves(state.params)[0])
  assert all(h["loss_diffaug"] > 0 for h in h8)


def test_compiles_once_across_steps():
  traces = []
  state, sp, fn = _setup()

  def counting(*a, **k):
    traces.append(1)
    return fn(*a, **k)
  _, _, step = _run(sharding.make_mesh(), state, sp, counting, [_batch(16, s) for s in range(4)])
  assert len(traces) == 1, f"train step traced {len(traces)} times"
  assert step._cache_size() == 1


def test_loss_composition_baseline_and_augmix():
  state, sp, fn = _setup(diffaug=True, weight=0.5)
  _, m = fn(state, _batch(8), jax.random.key(3), sp)
  np.testing.assert_allclose(m["loss"], m["loss_clean"] + 0.5 * m["loss_diffaug"], rtol=1e-6)
  # AugMix views present -> + 12 * JSD.
  _, m = fn(state, _batch(8, augmix=True), jax.random.key(3), sp)
  assert m["loss_jsd"] > 0
  np.testing.assert_allclose(m["loss"], m["loss_clean"] + 0.5 * m["loss_diffaug"] + 12 * m["loss_jsd"],
                             rtol=1e-5)
  # Baseline: the same step without DiffAug never calls the score model (score params may be None).
  state, _, fn = _setup(diffaug=False)
  new, m = fn(state, _batch(8), jax.random.key(3), None)
  assert float(m["loss_diffaug"]) == 0.0 and float(m["loss"]) == pytest.approx(float(m["loss_clean"]))
  assert int(new.step) == 1 and m["grad_norm"] > 0 and m["learning_rate"] == pytest.approx(0.1)


def test_diffaug_view_has_no_gradient_to_score_params():
  state, sp, fn = _setup()

  def loss_wrt_score(p):
    _, m = fn(state, _batch(8), jax.random.key(3), p)
    return m["loss"]
  g = jax.grad(loss_wrt_score)(sp)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g))


def test_hybrid_loss_rescales_vb_by_T_over_1000():
  """guided/improved-diffusion's default rescale_learned_sigmas=True (RESCALED_MSE): L_vb x T / 1000, i.e. x4
  for the 4000-step cosine CIFAR-10 recipe."""
  mod = TinyEps(out_channels=2)  # learn_sigma: eps + v for 1 channel
  variables = mod.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  variables = jax.tree.map(lambda a: a + 0.1, variables)
  tx = optax.sgd(0.0)
  state = TrainState.create(variables, tx, ema=True)
  vb = {}
  for rescale in (True, False):
    cfg = steps.ScoreStepConfig(schedule=diffusion.cosine_schedule(4000), learn_sigma=True, loss_type="hybrid",
                                rescale_vb=rescale)
    _, m = steps.score_train_step(state, _batch(8), jax.random.key(1), apply_fn=mod.apply, tx=tx, cfg=cfg)
    vb[rescale] = float(m["vb"])
  assert vb[False] > 0 and vb[True] == pytest.approx(4 * vb[False], rel=1e-5)


def test_score_train_step_ema_and_eval():
  mod = TinyEps()
  variables = mod.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  tx = optax.adam(1e-2)
  state = TrainState.create(variables, tx, ema=True)
  cfg = steps.ScoreStepConfig(schedule=diffusion.linear_schedule(1000), ema_decay=0.5)
  step = jax.jit(functools.partial(steps.score_train_step, apply_fn=mod.apply, tx=tx, cfg=cfg))
  b = _batch(8)
  new, m = step(state, b, jax.random.key(1))
  assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
  for e, p0, p1 in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(state.params),
                       jax.tree.leaves(new.params)):
    np.testing.assert_allclose(e, 0.5 * p0 + 0.5 * p1, rtol=1e-6, atol=1e-7)
  ev = steps.score_eval_step(new, b, jax.random.key(2), apply_fn=mod.apply, cfg=cfg)
  assert ev["count"] == 8 and np.isfinite(ev["loss"])


def test_eval_step_counts_mask():
  state, _, _ = _setup()
  clf = TinyClassifier(4)
  b = _batch(8)
  b["mask"] = np.array([1, 1, 1, 0, 0, 0, 0, 0], np.int32)
  out = steps.eval_step(state, b, apply_fn=clf.apply)
  assert float(out["count"]) == 3.0 and 0 <= float(out["correct"]) <= 3


def test_imagenet_recipe_schedule_and_sgd_semantics():
  """SGD 0.1 per 256 scaled linearly, x0.1 every 30 epochs; torch-style coupled weight decay + momentum."""
  import ml_collections
  from diffaug_jax import optim
  cfg = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, lr_batch_base=256, momentum=0.9,
                                       nesterov=False, weight_decay=1e-4, schedule="step", decay_epochs=30.0,
                                       decay_factor=0.1, warmup_epochs=0.0))
  spe = 100
  tx, sched = optim.make_optimizer(cfg, global_batch_size=1024, steps_per_epoch=spe, total_steps=90 * spe)
  for step, lr in ((0, 0.4), (30 * spe - 1, 0.4), (30 * spe, 0.04), (60 * spe, 0.004), (90 * spe - 1, 0.004)):
    assert float(sched(step)) == pytest.approx(lr, rel=1e-6), step
  # Two updates by hand (torch.optim.SGD): buf = m*buf + (g + wd*p); p -= lr*buf.
  p = {"w": jnp.array([1.0, -2.0])}
  g = {"w": jnp.array([0.5, 0.25])}
  st = tx.init(p)
  pt, buf = np.array([1.0, -2.0]), np.zeros(2)
  for _ in range(2):
    u, st = tx.update(g, st, p)
    p = optax.apply_updates(p, u)
    buf = 0.9 * buf + (np.array([0.5, 0.25]) + 1e-4 * pt)
    pt = pt - 0.4 * buf
  np.testing.assert_allclose(p["w"], pt, rtol=1e-6)


def test_adam_weight_decay_is_torch_adams_l2():
  """name="adam" with weight_decay is torch.optim.Adam's: wd * param joins the gradient before the moments
  (so a zero gradient still moves a weight by ~lr on the first step); "adamw" decays after them."""
  import ml_collections
  from diffaug_jax import optim
  params = {"w": jnp.full((3,), 2.0)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for name, want in (("adam", -0.1), ("adamw", -0.1 * 0.5 * 2.0)):
    cfg = ml_collections.ConfigDict(dict(name=name, learning_rate=0.1, lr_batch_base=0, schedule="constant",
                                         weight_decay=0.5))
    tx, _ = optim.make_optimizer(cfg, global_batch_size=8, steps_per_epoch=10, total_steps=100)
    u, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=1e-5, err_msg=name)


def test_warmup_starts_at_zero_and_vit_tokens_are_not_decayed():
  """Warm-up is lr * step / warmup for every schedule kind; "no_bias_norm" skips 1-D params and the ViT's
  pos_embed / cls_token (timm's no_weight_decay, as DeiT-III trains)."""
  import ml_collections
  from diffaug_jax import optim
  for kind in ("step", "cosine", "constant"):
    cfg = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1.0, lr_batch_base=0, schedule=kind,
                                         decay_epochs=50.0, decay_factor=0.1, warmup_epochs=1.0,
                                         weight_decay=0.05, wd_mask="no_bias_norm"))
    sched = optim.make_schedule(cfg, global_batch_size=8, steps_per_epoch=10, total_steps=1000)
    assert [float(sched(s)) for s in (0, 5)] == pytest.approx([0.0, 0.5]), kind
    cfg.warmup_lr = 0.1  # DeiT's --warmup-lr: the ramp starts there
    sched = optim.make_schedule(cfg, global_batch_size=8, steps_per_epoch=10, total_steps=1000)
    assert [float(sched(s)) for s in (0, 5, 10)] == pytest.approx([0.1, 0.55, 1.0]), kind
    cfg.warmup_lr = 0.0
  tx, _ = optim.make_optimizer(cfg, global_batch_size=8, steps_per_epoch=10, total_steps=1000)
  params = {"pos_embed": jnp.ones((1, 4, 8)), "cls_token": jnp.ones((1, 1, 8)),
            "blocks": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones((8,))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  st = tx.init(params)
  for _ in range(6):  # past step 0, where the warm-up LR is 0
    u, st = tx.update(zeros, st, params)
  leaves = {"pos_embed": u["pos_embed"], "cls_token": u["cls_token"],
            "kernel": u["blocks"]["kernel"], "bias": u["blocks"]["bias"]}
  moved = {k: float(jnp.abs(v).max()) for k, v in leaves.items()}
  assert moved["kernel"] > 0 and moved["pos_embed"] == moved["cls_token"] == moved["bias"] == 0.0, moved


def test_score_params_never_in_state_or_optimizer():
  """The frozen score model is only an argument: the new state's params and optimizer state are exactly the
  classifier's (same tree as tx.init(classifier params)), and no score-model leaf is carried along."""
  state, sp, fn = _setup()
  new, _ = jax.jit(fn)(state, _batch(8), jax.random.key(3), sp)
  tx = optax.sgd(0.1, momentum=0.9)  # the optimizer of _setup
  shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
  assert shapes(new.params) == shapes(state.params)
  assert jax.tree.structure(new.opt_state) == jax.tree.structure(tx.init(state.params))
  assert shapes(new.opt_state) == shapes(tx.init(state.params))
  assert new.ema_params is None
  n_state = sum(np.size(x) for x in jax.tree.leaves(new))
  n_clf = sum(np.size(x) for x in jax.tree.leaves((state.params, state.batch_stats, tx.init(state.params))))
  assert n_state == n_clf + 1, (n_state, n_clf)  # + the step counter; nothing of the score model


def test_four_view_step_equals_direct_computation():
  """[clean, aug1, aug2, diffaug]: loss = CE(clean) + CE(diffaug) + 12 JSD(clean, aug1, aug2), computed here
  directly (NumPy softmax / CE / JSD) from ONE train-mode forward over the four views; BatchNorm statistics
  are those of the concatenated 4B batch (the step's new batch_stats equal this forward's)."""
  from diffaug_jax.trainer import make_score_eps_factory
  state, sp, fn = _setup(diffaug=True, weight=1.0)
  b = _batch(8, seed=5, augmix=True)
  key = jax.random.key(11)
  new, m = fn(state, b, key, sp)
  # The step's DiffAug view: same key derivation (da_key = first split of the step key).
  cfg = steps.StepConfig(schedule=diffusion.linear_schedule(1000), diffaug=True)
  x_da, _ = steps.make_diffaug_view(jax.random.split(key)[0], steps.to_model_range(b["image_da"]), sp,
                                    make_score_eps_factory(TinyEps()), cfg)
  views = [steps.to_model_range(b[k]) for k in ("image", "image_aug1", "image_aug2")] + [x_da]
  logits, upd = TinyClassifier(4).apply({"params": state.params, "batch_stats": state.batch_stats},
                                        jnp.concatenate(views), train=True, mutable=["batch_stats"])
  lc, l1, l2, ld = np.split(np.asarray(logits, np.float64), 4)
  y = b["label"]
  sm = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  ce = lambda z: float(-np.log(sm(z)[np.arange(len(y)), y]).mean())
  ps = [sm(z) for z in (lc, l1, l2)]
  mix = np.clip(sum(ps) / 3, 1e-7, 1)
  jsd = sum((p * (np.log(p) - np.log(mix))).sum(-1).mean() for p in ps) / 3
  np.testing.assert_allclose(m["loss_clean"], ce(lc), rtol=1e-5)
  np.testing.assert_allclose(m["loss_diffaug"], ce(ld), rtol=1e-5)
  np.testing.assert_allclose(m["loss_jsd"], jsd, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(m["loss"], ce(lc) + ce(ld) + 12 * jsd, rtol=1e-5)
  assert jsd > 1e-4  # the AugMix views really differ
  for a, c in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(upd["batch_stats"])):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
  # ... and not those of the clean view alone (statistics are shared across the views).
  _, clean_only = TinyClassifier(4).apply({"params": state.params, "batch_stats": state.batch_stats},
                                          views[0], train=True, mutable=["batch_stats"])
  assert not np.allclose(jax.tree.leaves(new.batch_stats)[0], jax.tree.leaves(clean_only["batch_stats"])[0])


def test_step_schedule_is_constant_size_in_the_run_length():
  """The step schedule is closed-form: a run with a decay every epoch over 100k steps traces a handful of ops
  (a piecewise-constant schedule unrolled 12,500 boundaries into the step: minutes of compile, GBs of RAM)."""
  import ml_collections
  from diffaug_jax import optim
  cfg = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, lr_batch_base=0, schedule="step",
                                       decay_epochs=1.0, decay_factor=0.5, warmup_epochs=0.0))
  sched = optim.make_schedule(cfg, global_batch_size=16, steps_per_epoch=8, total_steps=100_000)
  assert len(jax.make_jaxpr(sched)(0).eqns) < 20
  assert [float(sched(s)) for s in (0, 7, 8, 17, 80)] == pytest.approx([0.1, 0.1, 0.05, 0.025, 0.1 * 0.5 ** 10])
