"""Time-conditioned (noisy / DA) classifiers on the embedded digits, and classifier guidance."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffaug_jax import diffusion, sampling
from diffaug_jax.evaluation import da_classifier as dac, loading
from diffaug_jax.models.time_classifier import time_classifier

SCHED = diffusion.linear_schedule(1000)


@pytest.fixture(scope="module")
def digits():
  dc = ml_collections.ConfigDict(dict(source="digits", image_size=8, channels=1))
  xtr, ytr = loading.load_arrays(dc, split="train")
  xte, yte = loading.load_arrays(dc, split="test")
  eps_fn, sp = dac.gaussian_denoiser(xtr, SCHED)
  return xtr, ytr, xte, yte, eps_fn, sp


def _numpy_init(module, *shapes, seed=0):
  """Fan-in scaled normal kernels, zero biases, unit norm scales (no RNG compile on a busy CPU)."""
  rng = np.random.default_rng(seed)
  args = [jnp.zeros(s, jnp.int32 if len(s) == 1 else jnp.float32) for s in shapes]
  tree = jax.eval_shape(module.init, jax.random.key(0), *args)

  def leaf(path, x):
    name = str(path[-1])
    if "kernel" in name:
      return (rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(np.float32)
    return np.ones(x.shape, np.float32) if "scale" in name else np.zeros(x.shape, np.float32)
  return jax.tree_util.tree_map_with_path(leaf, tree)


def test_gaussian_denoiser_denoises(digits):
  xtr, _, xte, _, eps_fn, sp = digits
  key = jax.random.key(0)
  for t in (100, 500):
    tt = jnp.full((len(xte),), t)
    x_t, x0_hat = dac.classifier_inputs(key, jnp.asarray(xte), tt, eps_fn, sp, SCHED, denoising_augmented=True)
    naive = x_t / SCHED.sqrt_alphas_cumprod[t]
    assert float(jnp.mean((x0_hat - xte) ** 2)) < 0.8 * float(jnp.mean((jnp.clip(naive, -1, 1) - xte) ** 2))


def test_time_classifier_interface():
  m = time_classifier(10, denoising_augmented=True, width=8, channel_mult=(1, 2))
  v = _numpy_init(m, (2, 8, 8, 1), (2,), (2, 8, 8, 1))
  x = jnp.zeros((2, 8, 8, 1))
  logits, feats = m.apply(v, x, jnp.array([0, 999]), x, return_features=True)
  assert logits.shape == (2, 10) and feats.shape == (2, 16)
  np.testing.assert_allclose(m.apply(v, feats, method="logits_from_features"), logits, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="x0_hat"):
    m.apply(v, x, jnp.array([0, 1]))
  noisy = time_classifier(10, width=8, channel_mult=(1, 2))
  with pytest.raises(ValueError, match="no x0_hat"):
    noisy.apply(_numpy_init(noisy, (2, 8, 8, 1), (2,)), x, jnp.array([0, 1]), x)


@pytest.mark.slow
def test_da_classifier_beats_chance_on_diffused_digits(digits):
  xtr, ytr, xte, yte, eps_fn, sp = digits
  m = time_classifier(10, denoising_augmented=True, width=16, channel_mult=(1, 2))
  variables, hist = dac.train_classifier(jax.random.key(1), m, xtr, ytr, eps_fn, sp, SCHED, steps=120,
                                         batch_size=64, learning_rate=3e-3,
                                         variables=_numpy_init(m, (1, 8, 8, 1), (1,), (1, 8, 8, 1)))
  assert hist[-1]["loss"] < hist[0]["loss"]
  ev = dac.evaluate_diffused(jax.random.key(2), m, variables, xte, yte, eps_fn, sp, SCHED, batch_size=128)
  assert ev["num_examples"] == len(yte)
  assert ev["accuracy"] > 0.2  # chance is 0.1; t ~ U{0..999} includes pure-noise steps
  assert ev["bins"][0]["accuracy"] > 0.5  # nearly clean inputs: clearly learned


@pytest.mark.slow
def test_guidance_scale_zero_equals_unguided_and_cond_fn_is_grad(digits):
  xtr, _, _, _, eps_fn, sp = digits
  m = time_classifier(10, denoising_augmented=True, width=8, channel_mult=(1, 2))
  v = _numpy_init(m, (1, 8, 8, 1), (1,), (1, 8, 8, 1))
  y = jnp.arange(8) % 10
  # cond_fn == scale * d/dx sum_i log softmax(f(x_i, t_i, x0_hat(x_i)))[y_i], computed directly.
  x = jax.random.normal(jax.random.key(5), (8, 8, 8, 1))
  t = jnp.full((8,), 400)

  def direct(xx):
    x0h = diffusion.predict_x0(SCHED, xx, t, eps_fn(sp, xx, t), clip=True)
    return jnp.sum(jax.nn.log_softmax(m.apply(v, xx, t, x0h))[jnp.arange(8), y])
  both = jax.jit(lambda xx: (dac.make_cond_fn(m, v, y, 2.0, eps_fn=eps_fn, score_params=sp, schedule=SCHED)(xx, t),
                             2.0 * jax.grad(direct)(xx)))
  g, g_direct = both(x)
  np.testing.assert_allclose(g, g_direct, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g).max()) > 0

  model_fn = eps_fn  # the Gaussian denoiser's eps is the model output (learn_sigma=False)
  sched = diffusion.respace(SCHED, "6")
  common = dict(module=m, model_fn=model_fn, base_schedule=SCHED, sample_schedule=sched,
                shape=(8, 8, 8, 1), eps_fn=eps_fn)
  key = jax.random.key(7)
  for method in ("ddpm", "ddim"):
    guided = jax.jit(lambda key, scale, method=method: dac.guided_sample(
        key, variables=v, y=y, scale=scale, score_params=sp, method=method, **common))
    # Unguided = the plain sampler without any cond_fn, same key.
    unguided = jax.jit(lambda key, method=method: sampling.sample_loop(
        key, lambda x_t, tt: model_fn(sp, x_t, tt), sched, (8, 8, 8, 1), method=method, learn_sigma=False))(key)
    zero = guided(key, 0.0)
    if method == "ddpm":  # mean + variance * 0 == mean
      np.testing.assert_array_equal(zero, unguided)
    else:  # condition_score recomputes eps from the clipped x0_hat: equal up to float rounding
      np.testing.assert_allclose(zero, unguided, atol=1e-5)
    assert float(jnp.abs(guided(key, 50.0) - unguided).max()) > 1e-3  # guidance acts when scale > 0


@pytest.mark.slow
def test_run_writes_table_grids_and_params(tmp_path):
  """The da_classifier task end to end (evaluate.py's path) at toy size: both classifiers trained and
  evaluated on diffused test digits, guided DDPM/DDIM grids for unguided / noisy / DA written."""
  import json
  import os
  from diffaug_jax.evaluation import run_task
  c = ml_collections.ConfigDict(dict(
      task="da_classifier", seed=0, num_classes=10, num_timesteps=1000,
      data=dict(source="digits", image_size=8, channels=1, train_split="train", eval_split="test"),
      score=dict(kind="gaussian"), model=dict(width=8, channel_mult=(1, 2), num_res_blocks=1),
      train_steps=3, batch_size=16, learning_rate=2e-3, eval_batch_size=128, guidance_scale=2.0,
      samples_per_class=1, ddpm_steps="3", ddim_steps=3))
  res = run_task(c, str(tmp_path))
  for name in ("noisy", "da"):
    assert res[name]["num_examples"] > 300 and 0.0 <= res[name]["accuracy"] <= 1.0
    assert os.path.getsize(tmp_path / f"{name}_classifier.msgpack") > 0
  assert set(res["guided_label_accuracy"]) == {f"{m}_{n}" for m in ("ddpm", "ddim")
                                               for n in ("unguided", "noisy", "da")}
  for m in ("ddpm", "ddim"):
    for n in ("unguided", "noisy", "da"):
      with open(tmp_path / f"guided_{m}_{n}.png", "rb") as f:
        assert f.read(8).startswith(b"\x89PNG")
  assert json.load(open(tmp_path / "da_classifier.json"))["guidance_scale"] == 2.0
  assert "| da |" in open(tmp_path / "da_classifier.md").read()
