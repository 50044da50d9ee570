"""A Pallas (Triton) kernel for GroupNorm's folded apply, y = act(x * a + d), on NVIDIA GPUs.

Why: on an H200 the XLA loop fusions that apply the UNet's GroupNorms move 4 bf16 per thread (8-byte accesses)
and reach ~2.4 TB/s, while a plain copy in the same program reaches 4.3 TB/s (benchmarks/RESULTS.md, 2026-11-26:
~37 ms of the 451 ms denoise call at batch 128). This kernel works on (32 rows, 256 channels) tiles, 64
elements per thread, which gives Triton room for 16-byte accesses (not verified in the compiled code yet).
Whether it is faster is for the benchmark's `gn=pallas` A/B to say; the UNet only uses it when asked
(`UNet.norm_stats="pallas"`). XLA cannot partition a Pallas call: use it in single-device programs (or inside
`shard_map`), not in a batch-sharded jit.

`affine_act(x (B, N, C), a (B, C) f32, d (B, C) f32, silu, out_dtype) -> (B, N, C)`: the same arithmetic as
the XLA expression in float32 (one multiply-add, then x * sigmoid(x) written as x / (1 + exp(-x))), one rounding
to `out_dtype`. Reverse-mode differentiable: the backward pass is the VJP of the XLA expression with
`jax.nn.silu` (a custom VJP; finite for any input, where differentiating x / (1 + exp(-x)) gives inf / inf
below -88), so training through a UNet that uses the kernel works. `supported(n, c)` says which shapes it
tiles; the caller falls back to XLA for the others (the small low-resolution GroupNorms, where the apply costs
little anyway).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["affine_act", "reference", "supported"]

BLOCK_C = 256  # channel tile: divides every width of ADM-256/128 (concatenations included); narrower UNets
# (iddpm CIFAR-10: 128, ADM-64: 192 channels) mostly fall back to XLA
MAX_BLOCK_N = 32  # rows per tile: 32 x 256 elements = 64 per thread at 4 warps (register budget)
MIN_BLOCK_N = 16


def _block_n(n: int) -> int:
  return min(n & -n, MAX_BLOCK_N)  # largest power of two dividing n (Triton tiles are powers of two)


def supported(n: int, c: int) -> bool:
  """Whether `affine_act` tiles (B, n, c) without masking: c a multiple of 256, n of 16."""
  return c % BLOCK_C == 0 and _block_n(n) >= MIN_BLOCK_N


def reference(x: jax.Array, a: jax.Array, d: jax.Array, silu: bool, out_dtype) -> jax.Array:
  """The kernel's arithmetic as an XLA expression (for tests; the UNet's XLA path uses `jax.nn.silu`)."""
  y = x.astype(jnp.float32) * a[:, None, :] + d[:, None, :]
  if silu:
    y = y / (1.0 + jnp.exp(-y))
  return y.astype(out_dtype)


def _kernel(x_ref, a_ref, d_ref, o_ref, *, silu: bool):
  y = x_ref[...].astype(jnp.float32) * a_ref[...][None, :] + d_ref[...][None, :]
  if silu:
    y = y / (1.0 + jnp.exp(-y))
  o_ref[...] = y.astype(o_ref.dtype)


def _pallas(x, a, d, silu, out_dtype, interpret):
  b, n, c = x.shape
  bn = _block_n(n)
  tile = pl.BlockSpec((None, bn, BLOCK_C), lambda i, j, k: (i, j, k))
  row = pl.BlockSpec((None, BLOCK_C), lambda i, j, k: (i, k))
  kw = {}
  if not interpret:
    from jax.experimental.pallas import triton as pltriton
    kw["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=1)
  return pl.pallas_call(
      functools.partial(_kernel, silu=silu),
      out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype),
      grid=(b, n // bn, c // BLOCK_C),
      in_specs=[tile, row, row],
      out_specs=tile,
      interpret=interpret,
      **kw,
  )(x, a.astype(jnp.float32), d.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _affine_act(x, a, d, silu, out_dtype, interpret):
  return _pallas(x, a, d, silu, out_dtype, interpret)


def _fwd(x, a, d, silu, out_dtype, interpret):
  return _pallas(x, a, d, silu, out_dtype, interpret), (x, a, d)


def _xla_apply(x, a, d, silu, out_dtype):
  y = x.astype(jnp.float32) * a[:, None, :] + d[:, None, :]
  return (jax.nn.silu(y) if silu else y).astype(out_dtype)


def _bwd(silu, out_dtype, interpret, res, g):
  _, vjp = jax.vjp(lambda *args: _xla_apply(*args, silu, out_dtype), *res)
  return vjp(g)


_affine_act.defvjp(_fwd, _bwd)


def affine_act(x: jax.Array, a: jax.Array, d: jax.Array, *, silu: bool, out_dtype,
               interpret: bool = False) -> jax.Array:
  """x (B, N, C) (any float dtype), a, d (B, C) -> act(x * a + d) (B, N, C) in `out_dtype`.

  `interpret=True` runs the kernel through Pallas' interpreter (any backend; for tests). Raises ValueError
  for shapes `supported` rejects.
  """
  if x.ndim != 3 or a.shape != (x.shape[0], x.shape[2]) or d.shape != a.shape:
    raise ValueError(f"affine_act: x (B, N, C) with a, d (B, C), got {x.shape}, {a.shape}, {d.shape}")
  if not supported(x.shape[1], x.shape[2]):
    raise ValueError(f"affine_act: (N, C) = {x.shape[1:]} not tiled (C % {BLOCK_C}, N % {MIN_BLOCK_N})")
  return _affine_act(x, a, d, bool(silu), jnp.dtype(out_dtype), bool(interpret))
