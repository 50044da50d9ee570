"""DiffAug and DiffAug-Ensemble: invariants, determinism, sharding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffaug_jax import augment, diffusion, sharding

SCHED = diffusion.linear_schedule(1000)


def oracle_eps_fn(x0):
  """An eps_fn that knows x0: returns the exact noise, so x0_hat == x0 (up to clip)."""
  def eps_fn(x_t, t):
    return diffusion.x0_to_eps(SCHED, x_t, t, x0)
  return eps_fn


def toy_eps_fn(x_t, t):
  # Depends on x_t and t so that wrong plumbing shows up.
  return jnp.tanh(x_t) * (t[:, None, None, None].astype(jnp.float32) / 1000.0)


def images(n=16, seed=0, hw=8):
  return jax.random.uniform(jax.random.key(seed), (n, hw, hw, 3), minval=-1, maxval=1)


def test_diffaug_with_oracle_recovers_x0():
  x0 = images()
  x0_hat, t = augment.diffaug(jax.random.key(1), x0, oracle_eps_fn(x0), SCHED, t_high=900)
  assert x0_hat.shape == x0.shape and t.shape == (16,) and t.dtype == jnp.int32
  np.testing.assert_allclose(x0_hat, x0, atol=1e-3)


def test_diffaug_range_determinism_and_key_dependence():
  x0 = images()
  a, ta = augment.diffaug(jax.random.key(3), x0, toy_eps_fn, SCHED)
  b, tb = augment.diffaug(jax.random.key(3), x0, toy_eps_fn, SCHED)
  c, tc = augment.diffaug(jax.random.key(4), x0, toy_eps_fn, SCHED)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ta, tb)
  assert not np.array_equal(a, c)
  assert float(a.max()) <= 1 and float(a.min()) >= -1


def test_t_is_uniform_over_range():
  # 100k draws over 1000 bins: chi-square with 999 dof has mean 999, sd ~44.7; 1200 is ~4.5 sd.
  x0 = jnp.zeros((100_000, 1, 1, 1))
  _, t = jax.jit(lambda k: augment.diffaug(k, x0, lambda x, tt: jnp.zeros_like(x), SCHED))(
      jax.random.key(0))
  counts = np.bincount(np.asarray(t), minlength=1000)
  assert counts.shape == (1000,) and counts.min() > 0
  expected = len(t) / 1000
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 1200, chi2
  _, t2 = augment.diffaug(jax.random.key(0), x0[:1000], lambda x, tt: jnp.zeros_like(x), SCHED,
                          t_low=300, t_high=400)
  assert int(t2.min()) >= 300 and int(t2.max()) <= 399


def test_bad_t_range_rejected():
  with pytest.raises(ValueError):
    augment.diffaug(jax.random.key(0), images(2), toy_eps_fn, SCHED, t_low=500, t_high=500)
  with pytest.raises(ValueError, match=r"t_high <= 1000, got \[0, 4000\)"):  # not quietly capped to T
    augment.diffaug(jax.random.key(0), images(2), toy_eps_fn, SCHED, t_high=4000)
  # A known t outside the schedule is an error (the table gather would silently clamp it to T - 1).
  for t in (1000, -1, np.array([3, 1000])):
    with pytest.raises(ValueError, match="t must lie in"):
      augment.diffaug_at(jax.random.key(0), images(2), t, toy_eps_fn, SCHED)


def test_no_gradient_reaches_score_model():
  x0 = images(4)
  def loss(w):
    out, _ = augment.diffaug(jax.random.key(0), x0, lambda x, t: w * x, SCHED)
    return out.sum()
  assert float(jax.grad(loss)(1.0)) == 0.0


def test_diffaug_at_respaced_calls_model_with_original_t():
  r = diffusion.respace(SCHED, "10")
  seen = []
  def eps_fn(x_t, t):
    seen.append(t)
    return jnp.zeros_like(x_t)
  augment.diffaug_at(jax.random.key(0), images(2), jnp.array([1, 9]), eps_fn, r)
  np.testing.assert_array_equal(seen[0], np.asarray(r.timestep_map)[[1, 9]])


def test_jit_and_vmap():
  x0 = images(4)
  f = jax.jit(lambda k, x: augment.diffaug(k, x, toy_eps_fn, SCHED))
  a, _ = f(jax.random.key(7), x0)
  b, _ = augment.diffaug(jax.random.key(7), x0, toy_eps_fn, SCHED)
  np.testing.assert_allclose(a, b, atol=1e-6)
  keys = jax.random.split(jax.random.key(8), 3)
  out, t = jax.vmap(lambda k: augment.diffaug(k, x0, toy_eps_fn, SCHED))(keys)
  assert out.shape == (3,) + x0.shape and t.shape == (3, 4)


def test_sharded_equals_single_device():
  if jax.device_count() < 8:  # e.g. on a one-GPU machine
    pytest.skip("needs 8 devices (conftest fakes 8 CPU devices)")
  x0 = images(16)
  key = jax.random.key(11)
  f = lambda k, x: augment.diffaug(k, x, toy_eps_fn, SCHED)
  one = jax.jit(f)(key, jax.device_put(x0, jax.devices()[0]))
  mesh = sharding.make_mesh()
  xs = jax.device_put(x0, sharding.batch_sharding(mesh))
  eight = jax.jit(f, out_shardings=(sharding.batch_sharding(mesh),) * 2)(key, xs)
  assert len(eight[0].sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(eight[1]))
  np.testing.assert_allclose(np.asarray(one[0]), np.asarray(eight[0]), rtol=1e-6, atol=1e-6)


def linear_classifier(x):
  w = jnp.linspace(-1, 1, x[0].size * 5).reshape(x[0].size, 5)
  return x.reshape(x.shape[0], -1) @ w


def test_ensemble_single_t0_member_is_plain_softmax():
  x = images(6)
  mean, members = augment.diffaug_ensemble(jax.random.key(0), x, linear_classifier, toy_eps_fn,
                                           SCHED, ts=(0,))
  np.testing.assert_allclose(mean, jax.nn.softmax(linear_classifier(x)), rtol=1e-6)
  assert members.shape == (1, 6, 5)


def test_ensemble_members_order_mean_and_cumulative():
  x = images(6)
  ts = (50, 0, 100)
  key = jax.random.key(5)
  mean, members = jax.jit(lambda k, xx: augment.diffaug_ensemble(
      k, xx, linear_classifier, toy_eps_fn, SCHED, ts=ts))(key, x)
  assert members.shape == (3, 6, 5)
  np.testing.assert_allclose(mean, members.mean(0), rtol=1e-6)
  np.testing.assert_allclose(members[1], jax.nn.softmax(linear_classifier(x)), rtol=1e-5, atol=1e-6)
  # Member i uses fold_in(key, i): reproduce member 2 (t = 100) directly.
  x0_hat = augment.diffaug_at(jax.random.fold_in(key, 2), x, 100, toy_eps_fn, SCHED)
  np.testing.assert_allclose(members[2], jax.nn.softmax(linear_classifier(x0_hat)), rtol=1e-5,
                             atol=1e-6)
  cum = augment.cumulative_ensemble(members)
  np.testing.assert_allclose(cum[-1], mean, rtol=1e-6)
  np.testing.assert_allclose(cum[0], members[0], rtol=1e-6)
  np.testing.assert_allclose(mean.sum(-1), 1.0, rtol=1e-5)


def test_ensemble_default_ts_and_sharding():
  assert augment.DEFAULT_ENSEMBLE_TS == (0, 50, 100, 150, 200, 250, 300, 350, 400, 450)
  x = images(8)
  key = jax.random.key(9)
  f = lambda k, xx: augment.diffaug_ensemble(k, xx, linear_classifier, toy_eps_fn, SCHED)
  one = jax.jit(f)(key, x)
  mesh = sharding.make_mesh()
  eight = jax.jit(f)(key, jax.device_put(x, sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(one[0]), np.asarray(eight[0]), rtol=1e-5, atol=1e-6)
  assert one[1].shape == (10, 8, 5)
  with pytest.raises(ValueError):
    augment.diffaug_ensemble(key, x, linear_classifier, toy_eps_fn, SCHED, ts=(1000,))


def test_bad_inputs_are_refused_not_computed():
  """Integer pixels, a host-side t outside the schedule and an eps of the wrong shape are errors: the table
  gather would clamp / wrap t, and uint8 or 2-channel eps would broadcast into a wrong x0_hat."""
  from diffaug_jax import losses
  sched = diffusion.linear_schedule(1000)
  key = jax.random.key(0)
  x = jnp.zeros((2, 4, 4, 1), jnp.float32)
  eps_fn = lambda x_t, t: jnp.zeros_like(x_t)
  with pytest.raises(ValueError, match="float images in \\[-1, 1\\], got dtype uint8"):
    augment.diffaug(key, x.astype(jnp.uint8), eps_fn, sched)
  with pytest.raises(ValueError, match="float images"):
    augment.diffaug_ensemble(key, x.astype(jnp.uint8), lambda im: im.mean((1, 2)), eps_fn, sched, ts=(0, 50))
  with pytest.raises(ValueError, match="float images"):
    losses.ddpm_loss(key, x.astype(jnp.uint8), lambda x_t, t: jnp.zeros_like(x_t), sched, learn_sigma=False)
  for bad in (1000, -1):
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
      diffusion.q_sample(sched, x, np.full((2,), bad), x)
  with pytest.raises(ValueError, match=r"eps_fn returned shape \(2, 4, 4, 2\)"):
    augment.diffaug_at(key, x, 10, lambda x_t, t: jnp.zeros(x_t.shape[:3] + (2,)), sched)


def test_mesh_refuses_a_non_partitionable_prng():
  jax.config.update("jax_threefry_partitionable", False)
  try:
    with pytest.raises(RuntimeError, match="depend on the device count"):
      sharding.make_mesh()
  finally:
    jax.config.update("jax_threefry_partitionable", True)
  sharding.make_mesh()
