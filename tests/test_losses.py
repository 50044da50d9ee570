"""Losses against direct NumPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffaug_jax import diffusion, losses


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def test_cross_entropy_matches_numpy_and_mask():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 5)
  p = np_softmax(logits.astype(np.float64))
  want = -np.log(p[np.arange(5), labels]).mean()
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), want, rtol=1e-5)
  mask = np.array([1, 1, 0, 1, 0], np.float32)
  want_m = -(np.log(p[np.arange(5), labels]) * mask).sum() / mask.sum()
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask=mask),
                             want_m, rtol=1e-5)
  ls = 0.1
  q = np.full((5, 7), ls / 7) + (1 - ls) * np.eye(7)[labels]
  want_ls = -(q * np.log(p)).sum(-1).mean()
  np.testing.assert_allclose(
      losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=ls), want_ls, rtol=1e-5)


def test_diffaug_objective_sums_the_two_views():
  a = jnp.array([[2.0, 0.0], [0.0, 1.0]])
  b = jnp.array([[0.5, 0.0], [1.0, 0.0]])
  y = jnp.array([0, 1])
  loss, aux = losses.diffaug_objective(a, b, y, weight=0.5)
  np.testing.assert_allclose(loss, aux["loss_clean"] + 0.5 * aux["loss_diffaug"], rtol=1e-6)
  np.testing.assert_allclose(aux["loss_diffaug"], losses.cross_entropy(b, y), rtol=1e-6)


def test_jsd_matches_numpy_and_vanishes_for_equal_inputs():
  rng = np.random.default_rng(1)
  l0, l1, l2 = (rng.normal(size=(4, 6)).astype(np.float32) * 3 for _ in range(3))
  ps = [np_softmax(l.astype(np.float64)) for l in (l0, l1, l2)]
  m = np.clip(sum(ps) / 3, 1e-7, 1)
  want = sum((p * (np.log(p) - np.log(m))).sum(-1).mean() for p in ps) / 3
  np.testing.assert_allclose(losses.jsd_consistency(l0, l1, l2), want, rtol=1e-5)
  assert abs(float(losses.jsd_consistency(l0, l0, l0))) < 1e-6
  # Saturated softmax: 0 log 0 must be 0, not NaN.
  big = jnp.array([[1000.0, -1000.0]])
  assert np.isfinite(float(losses.jsd_consistency(big, -big, big)))


def test_normal_kl_and_discretized_likelihood():
  np.testing.assert_allclose(losses.normal_kl(0.0, 0.0, 0.0, 0.0), 0.0)
  # KL(N(1, 1) || N(0, e^2)) = 0.5 * (-1 + 2 - 0 + e^-2 + e^-2).
  np.testing.assert_allclose(losses.normal_kl(1.0, 0.0, 0.0, 2.0), 0.5 * (1 + 2 * np.exp(-2)), rtol=1e-6)
  # A very sharp Gaussian centred on a pixel value puts ~all mass in its bin.
  x = jnp.array([-1.0, 0.0, 1.0])
  ll = losses.discretized_gaussian_log_likelihood(x, x, jnp.full(3, -8.0))
  np.testing.assert_allclose(ll, 0.0, atol=1e-4)


def test_ddpm_loss_simple_and_hybrid():
  s = diffusion.linear_schedule(100)
  x0 = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3), minval=-1, maxval=1)
  zero3 = lambda x_t, t: jnp.zeros_like(x_t)
  loss, aux = losses.ddpm_loss(jax.random.key(1), x0, zero3, s, learn_sigma=False)
  # eps_hat = 0 -> mse = E[eps^2] ~ 1.
  assert 0.8 < float(loss) < 1.2 and float(aux["vb"]) == 0.0
  zero6 = lambda x_t, t: jnp.zeros(x_t.shape[:-1] + (6,))
  loss_h, aux_h = losses.ddpm_loss(jax.random.key(1), x0, zero6, s, learn_sigma=True, loss_type="hybrid")
  np.testing.assert_allclose(aux_h["mse"], aux["mse"], rtol=1e-6)
  assert float(aux_h["vb"]) > 0
  # The vb term trains only the variance channels.
  def f(w):
    return losses.ddpm_loss(jax.random.key(1), x0, lambda x_t, t: w * jnp.concatenate([x_t, x_t], -1), s,
                            learn_sigma=True, loss_type="hybrid")[1]["vb"]
  def g(w):
    fn = lambda x_t, t: jnp.concatenate([w * x_t, jnp.zeros_like(x_t)], -1)
    return losses.ddpm_loss(jax.random.key(1), x0, fn, s, learn_sigma=True, loss_type="hybrid")[1]["vb"]
  assert float(jax.grad(g)(0.3)) == 0.0 and float(jax.grad(f)(0.3)) != 0.0
  with pytest.raises(ValueError):
    losses.ddpm_loss(jax.random.key(1), x0, zero3, s, learn_sigma=False, loss_type="hybrid")
  with pytest.raises(ValueError, match="variance channels are trained by L_vb only"):  # never trained
    losses.ddpm_loss(jax.random.key(1), x0, zero6, s, learn_sigma=True, loss_type="simple")
