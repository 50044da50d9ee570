"""Gaussian diffusion math of ADM (openai/guided-diffusion), as small pure functions over a schedule.

Every coefficient table is computed in float64 on the host (numpy), exactly as guided-diffusion does, then
stored as float32 and gathered at `t` on device, which is what guided-diffusion's `_extract_into_tensor`
does too (`th.from_numpy(arr)[t].float()`). Golden parity: tests/test_diffusion.py.

Conventions: images are NHWC (any trailing shape works: coefficients broadcast over all non-batch axes),
`t` is an int array of shape (B,) (or a scalar) indexing the schedule's own table. For a respaced schedule,
`t` indexes the respaced table and the score model must be called with `model_timesteps(schedule, t)`,
the original 0..T-1 index (guided-diffusion's `timestep_map`).

This module imports jax and numpy only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_FIELDS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "log_betas",
    "fixed_large_log_variance",
    "timestep_map",
)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Immutable diffusion schedule: float32 coefficient tables of shape (T,) and an int32 `timestep_map`.

  A pytree (all fields are leaves), so it can be passed through `jax.jit` as an argument or closed over
  as constants. Build it with `linear_schedule`, `cosine_schedule`, `from_betas` or `respace`.
  """

  betas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  sqrt_recip_alphas_cumprod: Array
  sqrt_recipm1_alphas_cumprod: Array
  posterior_variance: Array
  posterior_log_variance_clipped: Array
  posterior_mean_coef1: Array
  posterior_mean_coef2: Array
  log_betas: Array
  # log of guided-diffusion's FIXED_LARGE variance: [posterior_variance[1], betas[1:]].
  fixed_large_log_variance: Array
  # Original timestep (0..T_orig-1) of each entry; arange(T) for an un-respaced schedule.
  timestep_map: Array

  @property
  def num_timesteps(self) -> int:
    return int(np.shape(self.betas)[0])


jax.tree_util.register_dataclass(Schedule, data_fields=list(_FIELDS), meta_fields=[])


def from_betas(betas: np.ndarray, timestep_map: np.ndarray | None = None) -> Schedule:
  """Builds every table from float64 `betas` (T,), as guided-diffusion's `GaussianDiffusion.__init__`."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size < 2:
    # One step has no posterior variance to clip the log of (log 0 = -inf tables, NaN samples);
    # guided-diffusion fails there too.
    raise ValueError(f"betas must be a 1-D array of at least 2 steps, got shape {betas.shape}")
  if not ((betas > 0).all() and (betas <= 1).all()):
    raise ValueError("betas must lie in (0, 1]")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas, axis=0)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  # The posterior variance is 0 at t = 0; guided-diffusion clips the log by repeating entry 1.
  post_logvar = np.log(np.append(post_var[1], post_var[1:]))
  fixed_large = np.log(np.append(post_var[1], betas[1:]))
  if timestep_map is None:
    timestep_map = np.arange(len(betas))
  tables = dict(
      betas=betas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_logvar,
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
      log_betas=np.log(betas),
      fixed_large_log_variance=fixed_large,
  )
  leaves = {k: jnp.asarray(v.astype(np.float32)) for k, v in tables.items()}
  leaves["timestep_map"] = jnp.asarray(np.asarray(timestep_map, dtype=np.int32))
  return Schedule(**leaves)


def linear_betas(num_steps: int = 1000) -> np.ndarray:
  """ADM's linear betas, scaled so that any T matches the 1000-step endpoints (float64)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  scale = 1000 / num_steps
  return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  """improved-diffusion's cosine schedule: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")

  def abar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

  return np.array(
      [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)],
      dtype=np.float64)


def linear_schedule(num_steps: int = 1000) -> Schedule:
  """The schedule of the 256x256 ADM models (T = 1000 by default)."""
  return from_betas(linear_betas(num_steps))


def cosine_schedule(num_steps: int) -> Schedule:
  """The cosine schedule of improved-diffusion's CIFAR-10 models."""
  return from_betas(cosine_betas(num_steps))


def space_timesteps(num_timesteps: int, spec: str | int | list[int]) -> list[int]:
  """Which original timesteps a respaced schedule keeps (guided-diffusion's `space_timesteps`).

  `spec`: "ddimN" (an even stride giving exactly N steps), "N" or N (N evenly spaced steps), or
  "a,b,c" (the range cut into equal sections, a, b and c steps taken in each). Returns sorted indices.
  """
  if isinstance(spec, str):
    if spec.startswith("ddim"):
      desired = int(spec[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
    try:
      counts = [int(x) for x in spec.split(",")]
    except ValueError:
      raise ValueError(f"bad respacing spec {spec!r}: expected 'ddimN', 'N' or 'a,b,c'") from None
  elif isinstance(spec, int):
    counts = [spec]
  else:
    counts = [int(x) for x in spec]
  size_per, extra = divmod(num_timesteps, len(counts))
  start, steps = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot divide a section of {size} steps into {count}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))  # Python's round (half to even), as the reference.
      cur += stride
    start += size
  return sorted(set(steps))


def respace(schedule: Schedule, spec: str | int | list[int]) -> Schedule:
  """A respaced schedule (guided-diffusion's `SpacedDiffusion`), keeping the original-timestep map.

  New betas are 1 - abar_i / abar_prev_kept over the kept steps, computed in float64 from the base
  schedule's alphas_cumprod: exact (float64 betas) when the base is ADM's linear or cosine schedule of any
  length, from its float32 betas otherwise (custom `from_betas` tables). A respaced schedule cannot be
  respaced again.
  """
  base_map = np.asarray(schedule.timestep_map)
  if not np.array_equal(base_map, np.arange(len(base_map))):
    raise ValueError("respace() takes an un-respaced schedule")
  abar64 = _float64_alphas_cumprod(schedule)
  keep = space_timesteps(len(abar64), spec)
  new_betas, last = [], 1.0
  for i in keep:
    new_betas.append(1.0 - abar64[i] / last)
    last = abar64[i]
  return from_betas(np.array(new_betas, dtype=np.float64), timestep_map=np.array(keep))


def _float64_alphas_cumprod(schedule: Schedule) -> np.ndarray:
  """float64 abar of a base schedule, recomputed from betas (exact for the named schedules)."""
  betas32 = np.asarray(schedule.betas)
  n = len(betas32)
  for candidate in (linear_betas(n), cosine_betas(n)):
    if np.array_equal(candidate.astype(np.float32), betas32):
      return np.cumprod(1.0 - candidate)
  return np.cumprod(1.0 - betas32.astype(np.float64))


def check_t(t, num_timesteps: int) -> None:
  """Rejects a host-side t (Python int, numpy array) outside [0, T): the table gather would, without a word,
  clamp t >= T to T - 1 and wrap a negative t around from the end. A jax array is not read (a traced t
  cannot be; a device one would cost a sync, and a multi-host one is not addressable)."""
  if isinstance(t, jax.Array):
    return
  tv = np.asarray(t)
  if tv.size and (tv.min() < 0 or tv.max() >= num_timesteps):
    raise ValueError(f"t must lie in [0, {num_timesteps}) (indices into the schedule), got "
                     f"[{tv.min()}, {tv.max()}]")


def check_images(x: Array, name: str = "x0") -> None:
  """Images enter the diffusion math as floats in [-1, 1]: integer pixels (uint8 [0, 255]) are refused
  (their values are not checked: a traced array cannot be read)."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must be float images in [-1, 1], got dtype {jnp.result_type(x)} (uint8 pixels: "
                     f"x / 127.5 - 1)")


def _extract(table: Array, t: Array, x: Array) -> Array:
  """table[t] reshaped to broadcast against x (batch first); float32."""
  check_t(t, len(table))
  c = jnp.asarray(table)[jnp.asarray(t)]
  return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def model_timesteps(schedule: Schedule, t: Array) -> Array:
  """Original timestep index (what the score model is called with) for schedule index t."""
  check_t(t, len(schedule.timestep_map))
  return jnp.asarray(schedule.timestep_map)[jnp.asarray(t)]


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. x0, noise: (B, ...); t: (B,). Returns (B, ...)."""
  return (_extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
          + _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def predict_x0(schedule: Schedule, x_t: Array, t: Array, eps: Array, clip: bool = True) -> Array:
  """One-step estimate x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, optionally clipped to [-1, 1]."""
  x0 = (_extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - _extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)
  return jnp.clip(x0, -1.0, 1.0) if clip else x0


def x0_to_eps(schedule: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
  """The eps that maps x_t to x0 (guided-diffusion's `_predict_eps_from_xstart`)."""
  return ((_extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
          / _extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t))


def posterior_mean_variance(schedule: Schedule, x0: Array, x_t: Array, t: Array
                            ) -> tuple[Array, Array, Array]:
  """q(x_{t-1} | x_t, x0): (mean, variance, clipped log-variance), each broadcast to x_t's shape."""
  mean = (_extract(schedule.posterior_mean_coef1, t, x_t) * x0
          + _extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
  var = jnp.broadcast_to(_extract(schedule.posterior_variance, t, x_t), x_t.shape)
  logvar = jnp.broadcast_to(_extract(schedule.posterior_log_variance_clipped, t, x_t), x_t.shape)
  return mean, var, logvar


def learned_range_log_variance(schedule: Schedule, t: Array, v: Array) -> Array:
  """log-variance interpolated by the model's extra channels v in [-1, 1] (LEARNED_RANGE).

  frac = (v + 1) / 2; logvar = frac log(beta_t) + (1 - frac) posterior_log_variance_clipped_t.
  """
  frac = (v + 1.0) / 2.0
  return (frac * _extract(schedule.log_betas, t, v)
          + (1.0 - frac) * _extract(schedule.posterior_log_variance_clipped, t, v))


def split_model_output(model_out: Array, learn_sigma: bool) -> tuple[Array, Array | None]:
  """(eps, v) from an NHWC model output: eps is the first half of the channels when learn_sigma."""
  if not learn_sigma:
    return model_out, None
  c = model_out.shape[-1]
  if c % 2:
    raise ValueError(f"learn_sigma output needs an even channel count, got {c}")
  return model_out[..., : c // 2], model_out[..., c // 2:]


def p_mean_variance(schedule: Schedule, model_out: Array, x_t: Array, t: Array, *,
                    clip: bool = True, learn_sigma: bool, var_type: str | None = None) -> dict:
  """p(x_{t-1} | x_t) for an eps-predicting model (guided-diffusion's `p_mean_variance`).

  Args:
    model_out: (B, ..., C) or (B, ..., 2C) with learn_sigma (channels last).
    var_type: "learned_range" (default with learn_sigma), "fixed_large" (default without) or "fixed_small".
  Returns: dict(mean, variance, log_variance, pred_x0, eps), all of x_t's shape.
  """
  eps, v = split_model_output(model_out, learn_sigma)
  var_type = var_type or ("learned_range" if learn_sigma else "fixed_large")
  if var_type == "learned_range":
    if v is None:
      raise ValueError("var_type 'learned_range' needs learn_sigma=True")
    log_variance = learned_range_log_variance(schedule, t, v)
  elif var_type == "fixed_large":
    log_variance = jnp.broadcast_to(_extract(schedule.fixed_large_log_variance, t, x_t), x_t.shape)
  elif var_type == "fixed_small":
    log_variance = jnp.broadcast_to(_extract(schedule.posterior_log_variance_clipped, t, x_t), x_t.shape)
  else:
    raise ValueError(f"unknown var_type {var_type!r}")
  pred_x0 = predict_x0(schedule, x_t, t, eps, clip=clip)
  mean, _, _ = posterior_mean_variance(schedule, pred_x0, x_t, t)
  return dict(mean=mean, variance=jnp.exp(log_variance), log_variance=log_variance,
              pred_x0=pred_x0, eps=eps)


def _nonzero_mask(t: Array, x: Array) -> Array:
  t = jnp.asarray(t)
  m = (t != 0).astype(x.dtype)
  return m.reshape(m.shape + (1,) * (x.ndim - m.ndim))


def p_sample(key: Array, schedule: Schedule, model_out: Array, x_t: Array, t: Array, *,
             clip: bool = True, learn_sigma: bool, var_type: str | None = None,
             cond_grad: Array | None = None) -> tuple[Array, Array]:
  """One ancestral step x_t -> x_{t-1}; returns (x_prev, x0_hat). No noise is added at t == 0.

  `cond_grad`: grad_x log p(y | x_t) already scaled (classifier guidance); shifts the mean by
  variance * cond_grad (guided-diffusion's `condition_mean`).
  """
  out = p_mean_variance(schedule, model_out, x_t, t, clip=clip, learn_sigma=learn_sigma,
                        var_type=var_type)
  mean = out["mean"]
  if cond_grad is not None:
    mean = mean + out["variance"] * cond_grad
  noise = jax.random.normal(key, x_t.shape, x_t.dtype)
  x_prev = mean + _nonzero_mask(t, x_t) * jnp.exp(0.5 * out["log_variance"]) * noise
  return x_prev, out["pred_x0"]


def ddim_step(key: Array, schedule: Schedule, eps: Array, x_t: Array, t: Array, *, eta: float = 0.0,
              clip: bool = True, cond_grad: Array | None = None) -> tuple[Array, Array]:
  """One DDIM step x_t -> x_{t-1} (guided-diffusion's `ddim_sample`); returns (x_prev, x0_hat).

  eps is re-derived from the (clipped) x0_hat, so clipping feeds back into the direction term.
  `cond_grad` (scaled grad log p(y|x_t)) follows `condition_score`: eps -= sqrt(1 - abar) cond_grad,
  then x0_hat is recomputed from that eps without clipping, as the reference does.
  """
  x0_hat = predict_x0(schedule, x_t, t, eps, clip=clip)
  if cond_grad is not None:
    eps = x0_to_eps(schedule, x_t, t, x0_hat)
    eps = eps - _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * cond_grad
    x0_hat = predict_x0(schedule, x_t, t, eps, clip=False)
  eps = x0_to_eps(schedule, x_t, t, x0_hat)
  abar = _extract(schedule.alphas_cumprod, t, x_t)
  abar_prev = _extract(schedule.alphas_cumprod_prev, t, x_t)
  sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
  noise = jax.random.normal(key, x_t.shape, x_t.dtype)
  mean = x0_hat * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma**2) * eps
  return mean + _nonzero_mask(t, x_t) * sigma * noise, x0_hat


def noise_level(schedule: Schedule) -> np.ndarray:
  """sqrt((1 - abar_t) / abar_t) per t (float64 on the host): the std of x_t / sqrt(abar_t) - x0."""
  abar = _float64_alphas_cumprod(schedule) if _is_base(schedule) else np.asarray(
      schedule.alphas_cumprod, np.float64)
  return np.sqrt((1.0 - abar) / abar)


def _is_base(schedule: Schedule) -> bool:
  m = np.asarray(schedule.timestep_map)
  return np.array_equal(m, np.arange(len(m)))


def t_for_sigma(schedule: Schedule, sigma: float) -> int:
  """Smallest t with sqrt((1 - abar_t) / abar_t) >= 2 sigma (diffusion-denoised smoothing).

  Images live in [-1, 1], twice the [0, 1] range the smoothing sigma is defined on, hence 2 sigma.
  x_t / sqrt(abar_t) = x0 + N(0, (1 - abar_t)/abar_t), so the returned t is the step whose noise matches.
  """
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}")
  levels = noise_level(schedule)
  hits = np.nonzero(levels >= 2.0 * sigma)[0]
  if hits.size == 0:
    raise ValueError(f"sigma {sigma} is beyond the schedule's largest noise level {levels[-1] / 2:.4g}")
  return int(hits[0])


ModelFn = Callable[[Array, Array], Array]
