"""Losses: cross-entropy, the DiffAug objective, AugMix's JSD consistency and DDPM training losses.

Pure jax.numpy; no optax/flax so that the core stays importable anywhere.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffaug_jax import diffusion

Array = jax.Array


def cross_entropy(logits: Array, labels: Array, *, label_smoothing: float = 0.0,
                  mask: Array | None = None) -> Array:
  """Mean softmax cross-entropy over the (masked) batch, computed in float32.

  Args:
    logits: (B, K). labels: (B,) int. mask: optional (B,) weights (0 drops a row, e.g. padding).
  """
  nll = _smoothed_nll(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), labels, label_smoothing)
  if mask is None:
    return nll.mean()
  mask = mask.astype(jnp.float32)
  return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _smoothed_nll(logp: Array, labels: Array, label_smoothing: float) -> Array:
  """Per-example CE against (1 - ls) onehot(label) + ls / K: (B, K) log-probs, (B,) labels -> (B,)."""
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
  return nll


def mixed_cross_entropy(logits: Array, labels: Array, partner_labels: Array, lam: Array, *,
                        label_smoothing: float = 0.0) -> Array:
  """Mean CE against Mixup/CutMix targets lam onehot_ls(labels) + (1 - lam) onehot_ls(partner_labels):
  timm's SoftTargetCrossEntropy on its `mixup_target` (CE is linear in the target, so no (B, K) targets).

  logits (B, K); labels, partner_labels (B,) int; lam (B,) float (see `mixing.mix_batch`)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  lam = lam.astype(jnp.float32)
  return (lam * _smoothed_nll(logp, labels, label_smoothing)
          + (1.0 - lam) * _smoothed_nll(logp, partner_labels, label_smoothing)).mean()


def accuracy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  if mask is None:
    return correct.mean()
  return (correct * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def diffaug_objective(logits_clean: Array, logits_da: Array, labels: Array, weight: float = 1.0,
                      *, label_smoothing: float = 0.0) -> tuple[Array, dict]:
  """CE(clean) + weight * CE(DiffAug view): the paper's loss (weight 1). Returns (loss, aux)."""
  ce_clean = cross_entropy(logits_clean, labels, label_smoothing=label_smoothing)
  ce_da = cross_entropy(logits_da, labels, label_smoothing=label_smoothing)
  return ce_clean + weight * ce_da, dict(loss_clean=ce_clean, loss_diffaug=ce_da)


def jsd_consistency(logits_clean: Array, logits_aug1: Array, logits_aug2: Array) -> Array:
  """AugMix's Jensen-Shannon consistency (without its weight 12), as the reference code computes it.

  m = clamp((p_c + p_1 + p_2) / 3, 1e-7, 1); JSD = mean over batch of (KL(p_c||m) + KL(p_1||m) +
  KL(p_2||m)) / 3, with 0 log 0 = 0 (PyTorch's `kl_div(log m, p, reduction="batchmean")`).
  """
  ps = [jax.nn.softmax(l.astype(jnp.float32), axis=-1) for l in (logits_clean, logits_aug1, logits_aug2)]
  log_m = jnp.log(jnp.clip((ps[0] + ps[1] + ps[2]) / 3.0, 1e-7, 1.0))

  def kl(p):
    return (jax.scipy.special.xlogy(p, p) - p * log_m).sum(axis=-1).mean()

  return (kl(ps[0]) + kl(ps[1]) + kl(ps[2])) / 3.0


# ---------------------------------------------------------------------------------------------
# DDPM (score-model) training: guided-diffusion's `training_losses` for eps prediction.


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x: Array) -> Array:
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array) -> Array:
  """log-likelihood of 8-bit data x in [-1, 1] under a Gaussian discretised to bins of width 2/255."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: Array) -> Array:
  return x.reshape(x.shape[0], -1).mean(axis=1)


def vb_terms_bpd(schedule: diffusion.Schedule, model_out: Array, x0: Array, x_t: Array, t: Array, *,
                 learn_sigma: bool) -> Array:
  """Per-example variational bound term in bits/dim: KL for t > 0, decoder NLL at t = 0. (B,)."""
  true_mean, _, true_logvar = diffusion.posterior_mean_variance(schedule, x0, x_t, t)
  out = diffusion.p_mean_variance(schedule, model_out, x_t, t, clip=False, learn_sigma=learn_sigma)
  kl = _mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"])) / math.log(2.0)
  nll = -_mean_flat(discretized_gaussian_log_likelihood(
      x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def ddpm_loss(key: Array, x0: Array, model_fn: Callable[[Array, Array], Array],
              schedule: diffusion.Schedule, *, learn_sigma: bool, loss_type: str = "simple",
              rescale_vb: bool = False) -> tuple[Array, dict]:
  """DDPM training loss with uniform t (guided-diffusion's `training_losses`, eps prediction).

  loss_type "simple" (without learn_sigma): L_simple = ||eps - eps_hat||^2 (mean over pixels and batch).
  "hybrid" (with learn_sigma, as guided-diffusion whenever the variance is learned): L_simple + L_vb, where
  L_vb trains only the variance channels (the mean is a stop_gradient copy, as in the reference);
  `rescale_vb` multiplies L_vb by T/1000 (RESCALED_MSE).

  Args:
    x0: (B, H, W, C) in [-1, 1]. model_fn(x_t, t_original) -> (B, H, W, C or 2C).
  Returns:
    (scalar loss, dict(mse, vb, t, per_example (B,) loss)).
  """
  if loss_type not in ("simple", "hybrid"):
    raise ValueError(f"loss_type must be 'simple' or 'hybrid', got {loss_type!r}")
  if (loss_type == "hybrid") != learn_sigma:
    # guided-diffusion adds L_vb whenever the variance is learned: "simple" would leave the variance
    # channels at their initial values, which sampling and DDA then use.
    raise ValueError(f"learn_sigma={learn_sigma} needs loss_type {'hybrid' if learn_sigma else 'simple'}, got "
                     f"{loss_type!r} (the variance channels are trained by L_vb only)")
  diffusion.check_images(x0)
  x0 = x0.astype(jnp.float32)
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, x0.shape[:1], 0, schedule.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  model_out = model_fn(x_t, diffusion.model_timesteps(schedule, t)).astype(jnp.float32)
  eps, v = diffusion.split_model_output(model_out, learn_sigma)
  if eps.shape != x0.shape:
    raise ValueError(f"model eps shape {eps.shape} != x0 shape {x0.shape}")
  mse = _mean_flat((noise - eps) ** 2)
  vb = jnp.zeros_like(mse)
  if loss_type == "hybrid":
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    vb = vb_terms_bpd(schedule, frozen, x0, x_t, t, learn_sigma=True)
    if rescale_vb:
      vb = vb * schedule.num_timesteps / 1000.0
  per_example = mse + vb
  return per_example.mean(), dict(mse=mse.mean(), vb=vb.mean(), t=t, per_example=per_example)
