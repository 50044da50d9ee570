"""(UNet module, variables) -> the `model_fn` / `eps_fn` closures the diffusion core and DiffAug expect.

Compute dtype: `dtype` (float32 / bfloat16 / float16) overrides the module's compute dtype. Params are used as
given: float32 params are cast to the compute dtype inside each layer on every call, so programs that hold a
frozen score model pass `frozen_params_for_compute(...)` (cast once, bit-identical outputs). GroupNorm and the
attention softmax run in float32 whatever the dtype, the timestep MLP and output head too (see unet.py), and
the returned arrays are float32. `variables` may be traced values (closures built inside a jitted step).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from diffaug_jax.models.unet import UNet, cast_params_for_compute

__all__ = ["make_model_fn", "make_eps_fn", "frozen_params_for_compute"]

Array = jax.Array


def _with_dtype(module: UNet, dtype: Optional[Any]) -> UNet:
  if dtype is None:
    return module
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"compute dtype must be float32, bfloat16 or float16, got {dtype}")
  return module.clone(dtype=dtype) if jnp.dtype(module.dtype) != dtype else module


def make_model_fn(module: UNet, variables: Any, *, dtype: Optional[Any] = None,
                  y: Optional[Array] = None) -> Callable[[Array, Array], Array]:
  """model_fn(x_t (B,H,W,C) float, t (B,) int original timesteps) -> full output (B,H,W,out_channels) f32.

  `y` (B,) int labels for class-conditional models (required iff module.num_classes is set).
  """
  if (y is None) != (module.num_classes is None):
    raise ValueError(f"make_model_fn: labels y are required iff the model is class-conditional "
                     f"(num_classes={module.num_classes}, y given: {y is not None})")
  m = _with_dtype(module, dtype)

  def model_fn(x_t: Array, t: Array) -> Array:
    t = jnp.asarray(t, jnp.int32)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, x_t.shape[:1])
    return m.apply(variables, x_t, t, y).astype(jnp.float32)

  return model_fn


def make_eps_fn(module: UNet, variables: Any, *, dtype: Optional[Any] = None,
                y: Optional[Array] = None) -> Callable[[Array, Array], Array]:
  """eps_fn(x_t (B,H,W,C), t (B,) int original timesteps) -> eps_hat (B,H,W,C) float32.

  With learn_sigma (out_channels == 2 * in_channels) only the first in_channels output channels (eps) are
  returned; the variance channels are dropped.
  """
  model_fn = make_model_fn(module, variables, dtype=dtype, y=y)
  c = module.in_channels
  if module.out_channels not in (c, 2 * c):
    raise ValueError(f"out_channels {module.out_channels} is neither in_channels {c} nor 2x (learn_sigma)")

  def eps_fn(x_t: Array, t: Array) -> Array:
    return model_fn(x_t, t)[..., :c]

  return eps_fn


def frozen_params_for_compute(module: Any, params: Any, dtype: Optional[Any] = None) -> Any:
  """The frozen score params a program should hold for compute dtype `dtype` (default: the module's).

  For a UNet in bf16/fp16: `unet.cast_params_for_compute` (weights of the reduced-precision layers stored in
  that dtype: same outputs bit for bit, half the memory, no per-call cast of every weight). float32, or a
  module that is not our UNet (a user factory): the params unchanged. Never for params being trained.
  """
  dtype = jnp.dtype(dtype if dtype is not None else getattr(module, "dtype", jnp.float32))
  if not isinstance(module, UNet) or dtype == jnp.float32:
    return params
  return cast_params_for_compute(params, dtype)
