"""DDPM ancestral and DDIM sampling loops (guided-diffusion's p_sample_loop / ddim_sample_loop).

PURE: jax + diffaug_jax.diffusion only (no flax). No jit inside; the caller jits, e.g.
`jax.jit(lambda key: ddim_sample(key, model_fn, sched, shape, learn_sigma=True))`.

Conventions:
- `schedule` may be respaced (`diffusion.respace(base, "ddim50")`); the loop walks its indices
  T'-1 ... 0 and calls `model_fn(x_t, t_original)` with `diffusion.model_timesteps` (guided-diffusion's
  timestep_map; `rescale_timesteps` is False for all ADM models).
- `cond_fn(x_t, t_original) -> grad_x log p(y | x_t)` (already multiplied by the guidance scale) follows
  guided-diffusion: DDPM shifts the mean by variance * grad ("condition_mean"); DDIM shifts the score,
  eps -= sqrt(1 - abar_t) * grad ("condition_score"). In guided-diffusion's SpacedDiffusion, cond_fn also
  receives the original timestep.
- Randomness: step i uses `jax.random.fold_in(key, i)` (i = respaced index); the initial noise uses
  `fold_in(key, T')`. Same key -> same samples.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from diffaug_jax import diffusion

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
CondFn = Callable[[Array, Array], Array]

__all__ = ["ddpm_sample", "ddim_sample", "sample_loop"]


def _init(key: Array, schedule: diffusion.Schedule, shape: Sequence[int], x_init: Optional[Array],
          start_step: Optional[int]) -> tuple[Array, int]:
  n = schedule.num_timesteps
  start = n - 1 if start_step is None else int(start_step)
  if not 0 <= start < n:
    raise ValueError(f"start_step {start_step} outside [0, {n - 1}] for a {n}-step schedule")
  if x_init is None:
    if start != n - 1:
      raise ValueError("start_step needs x_init (the noisy x_t at that step)")
    x = jax.random.normal(jax.random.fold_in(key, n), tuple(shape), jnp.float32)
  else:
    x = jnp.asarray(x_init, jnp.float32)
    if shape is not None and tuple(x.shape) != tuple(shape):
      raise ValueError(f"x_init shape {x.shape} != requested shape {tuple(shape)}")
  return x, start


def sample_loop(key: Array, model_fn: ModelFn, schedule: diffusion.Schedule, shape: Sequence[int], *,
                method: str = "ddpm", learn_sigma: bool, clip: bool = True, eta: float = 0.0,
                cond_fn: Optional[CondFn] = None, var_type: Optional[str] = None,
                x_init: Optional[Array] = None, start_step: Optional[int] = None) -> Array:
  """Runs the reverse process from step `start_step` (default T'-1, from pure noise) down to 0.

  Args:
    key: PRNG key. model_fn: (x_t (B,...), t_original (B,) int32) -> model output (B,..., C or 2C).
    schedule: (possibly respaced) diffusion.Schedule. shape: (B, H, W, C) of the samples.
    method: "ddpm" (ancestral, guided-diffusion p_sample) or "ddim" (eta-DDIM).
    learn_sigma: the model outputs [eps, v] (2C channels); DDIM ignores v.
    x_init / start_step: start from a given x_t at respaced index start_step (e.g. SDEdit / DDA style).
  Returns:
    samples (B, H, W, C) float32 (x0 of the last step, i.e. the model's final x_{-1} = x_0 sample).
  """
  if method not in ("ddpm", "ddim"):
    raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
  x, start = _init(key, schedule, shape, x_init, start_step)
  b = x.shape[0]

  def step(x_t, i):
    t = jnp.full((b,), i, jnp.int32)
    t_model = diffusion.model_timesteps(schedule, t)
    model_out = model_fn(x_t, t_model).astype(jnp.float32)
    grad = None if cond_fn is None else cond_fn(x_t, t_model).astype(jnp.float32)
    k = jax.random.fold_in(key, i)
    if method == "ddpm":
      x_prev, _ = diffusion.p_sample(k, schedule, model_out, x_t, t, clip=clip, learn_sigma=learn_sigma,
                                     var_type=var_type, cond_grad=grad)
    else:
      eps, _ = diffusion.split_model_output(model_out, learn_sigma)
      x_prev, _ = diffusion.ddim_step(k, schedule, eps, x_t, t, eta=eta, clip=clip, cond_grad=grad)
    return x_prev, None

  indices = jnp.arange(start, -1, -1, dtype=jnp.int32)
  x, _ = jax.lax.scan(step, x, indices)
  return x


def ddpm_sample(key: Array, model_fn: ModelFn, schedule: diffusion.Schedule, shape: Sequence[int], *,
                learn_sigma: bool, clip: bool = True, cond_fn: Optional[CondFn] = None,
                var_type: Optional[str] = None, x_init: Optional[Array] = None,
                start_step: Optional[int] = None) -> Array:
  """Ancestral DDPM sampling (guided-diffusion p_sample_loop). See `sample_loop`."""
  return sample_loop(key, model_fn, schedule, shape, method="ddpm", learn_sigma=learn_sigma, clip=clip,
                     cond_fn=cond_fn, var_type=var_type, x_init=x_init, start_step=start_step)


def ddim_sample(key: Array, model_fn: ModelFn, schedule: diffusion.Schedule, shape: Sequence[int], *,
                learn_sigma: bool, eta: float = 0.0, clip: bool = True, cond_fn: Optional[CondFn] = None,
                x_init: Optional[Array] = None, start_step: Optional[int] = None) -> Array:
  """DDIM sampling (guided-diffusion ddim_sample_loop), eta=0 deterministic after the initial noise."""
  return sample_loop(key, model_fn, schedule, shape, method="ddim", learn_sigma=learn_sigma, clip=clip,
                     eta=eta, cond_fn=cond_fn, x_init=x_init, start_step=start_step)
