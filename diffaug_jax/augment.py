"""The DiffAug operator and the DiffAug Ensemble (DE), as pure functions of arrays, keys and callables.

    x_t    = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,        eps ~ N(0, I), t ~ U{t_low, ..., t_high - 1}
    x0_hat = clip(sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps_fn(x_t, t), -1, 1)

`eps_fn(x_t, t) -> eps` is any callable: a Flax `apply` with its params bound
(`diffaug_jax.models.score.make_eps_fn`), or a lambda in a test. It is called exactly once per image.
Images are NHWC in [-1, 1]; `t` (B,) int32 indexes `schedule` (the original timestep for the 1000-step
schedule; on a respaced one the model is called with `schedule.timestep_map[t]`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffaug_jax import diffusion

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]
ClassifyFn = Callable[[Array], Array]

DEFAULT_ENSEMBLE_TS = tuple(range(0, 500, 50))  # 0, 50, ..., 450; t = 0 is the raw image.


def diffaug_at(key: Array, x0: Array, t: Array | int, eps_fn: EpsFn,
               schedule: diffusion.Schedule, *, clip: bool = True) -> Array:
  """x0_hat for given timesteps: noise x0 to t, denoise once. No gradient reaches the score model.

  Args:
    key: PRNG key for the noise.
    x0: (B, H, W, C) images in [-1, 1].
    t: scalar or (B,) int, indices into `schedule` (the model sees `schedule.timestep_map[t]`).
  Returns:
    (B, H, W, C) float32 one-step estimate, clipped to [-1, 1] when `clip`.
  """
  diffusion.check_t(t, schedule.num_timesteps)
  diffusion.check_images(x0)
  x0 = x0.astype(jnp.float32)
  t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), x0.shape[:1])
  noise = jax.random.normal(key, x0.shape, jnp.float32)
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  eps = eps_fn(x_t, diffusion.model_timesteps(schedule, t)).astype(jnp.float32)
  if eps.shape != x_t.shape:  # (a wrong channel count would broadcast into a wrong-shaped x0_hat)
    raise ValueError(f"eps_fn returned shape {eps.shape} for x_t of shape {x_t.shape}")
  return jax.lax.stop_gradient(diffusion.predict_x0(schedule, x_t, t, eps, clip=clip))


def diffaug(key: Array, x0: Array, eps_fn: EpsFn, schedule: diffusion.Schedule, *,
            t_low: int = 0, t_high: int | None = None, clip: bool = True) -> tuple[Array, Array]:
  """The DiffAug training augmentation: t ~ U{t_low, ..., t_high - 1} per example, one denoising step.

  Args:
    key: PRNG key (split into the t draw and the noise).
    x0: (B, H, W, C) images in [-1, 1].
    t_low, t_high: range of t (t_high exclusive, at most the schedule length T; None: T).
  Returns:
    (x0_hat (B, H, W, C) float32, t (B,) int32).
  """
  t_high = schedule.num_timesteps if t_high is None else t_high
  if not 0 <= t_low < t_high <= schedule.num_timesteps:  # (a larger t_high is not quietly capped)
    raise ValueError(f"need 0 <= t_low < t_high <= {schedule.num_timesteps}, got [{t_low}, {t_high})")
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, x0.shape[:1], t_low, t_high, dtype=jnp.int32)
  return diffaug_at(noise_key, x0, t, eps_fn, schedule, clip=clip), t


def diffaug_ensemble(key: Array, x: Array, classify_fn: ClassifyFn, eps_fn: EpsFn,
                     schedule: diffusion.Schedule, ts: Sequence[int] = DEFAULT_ENSEMBLE_TS
                     ) -> tuple[Array, Array]:
  """DiffAug Ensemble: the softmax averaged over one-step denoised copies at each t in `ts`.

  Members with t = 0 classify the raw input; every other member uses fresh noise (`fold_in(key, i)`
  for member i) and one score-model call. Members run in a `lax.scan`, so memory stays that of one
  member whatever `len(ts)` is.

  Args:
    x: (B, H, W, C) images in [-1, 1].
    classify_fn: (B, H, W, C) -> (B, K) logits, or any pytree of such logits (several classifiers scored
      on the same denoised copies: the score model runs once for all of them).
    ts: static sequence of timesteps (Python ints).
  Returns:
    (mean_probs (B, K), member_probs (M, B, K)) in float32 (pytrees of them, shaped as `classify_fn`'s
    output), members in the order of `ts`, so that cumulative-ensemble curves are
    `cumsum(member_probs, 0) / arange(1, M + 1)` without recomputation.
  """
  diffusion.check_images(x, "x")
  ts = tuple(int(t) for t in ts)
  if not ts:
    raise ValueError("ts must name at least one member")
  if any(not 0 <= t < schedule.num_timesteps for t in ts):
    raise ValueError(f"ts must lie in [0, {schedule.num_timesteps}), got {ts}")

  def probs(images):
    return jax.tree.map(lambda logits: jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
                        classify_fn(images))

  raw = [i for i, t in enumerate(ts) if t == 0]
  noisy = [i for i, t in enumerate(ts) if t != 0]
  members = [None] * len(ts)
  if raw:
    p0 = probs(x)
    for i in raw:
      members[i] = p0  # t = 0 is deterministic: one forward serves every such member.
  if noisy:
    def member(_, it):
      i, t = it
      x0_hat = diffaug_at(jax.random.fold_in(key, i), x, t, eps_fn, schedule)
      return None, probs(x0_hat)

    idx = jnp.asarray(noisy, jnp.int32)
    _, noisy_probs = jax.lax.scan(member, None, (idx, jnp.asarray([ts[i] for i in noisy], jnp.int32)))
    for j, i in enumerate(noisy):
      members[i] = jax.tree.map(lambda p, j=j: p[j], noisy_probs)
  member_probs = jax.tree.map(lambda *m: jnp.stack(m), *members)
  return jax.tree.map(lambda p: p.mean(axis=0), member_probs), member_probs


def cumulative_ensemble(member_probs: Array) -> Array:
  """(M, B, K) member probabilities -> (M, B, K) mean of the first k members, k = 1..M."""
  counts = jnp.arange(1, member_probs.shape[0] + 1, dtype=member_probs.dtype)
  return jnp.cumsum(member_probs, axis=0) / counts[:, None, None]
