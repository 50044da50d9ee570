"""Pallas (Triton) kernels for GroupNorm on NVIDIA GPUs: the folded apply, y = act(x * a + d), and the
per-channel shifted sums its statistics start from.

The apply kernel, `affine_act`.

Why: on an H200 the XLA loop fusions that apply the UNet's GroupNorms move 4 bf16 per thread (8-byte accesses)
and reach ~2.4 TB/s, while a plain copy in the same program reaches 4.3 TB/s (benchmarks/RESULTS.md, 2026-11-26:
~37 ms of the 451 ms denoise call at batch 128). This kernel works on (32 rows, 256 channels) tiles, 64
elements per thread. Measured on an H200 (bf16, batch 128, 224x224x256): 3.7 TB/s alone, against 3.2 TB/s for
XLA's fusion of the same arithmetic and 3.4 TB/s for an XLA elementwise y = 2x in the same process
(`benchmarks/bench_pallas_norm.py`), and 3.5 TB/s inside the UNet, where a plain concatenation copy reached
4.3 TB/s. The UNet uses it by default in bf16 (`UNet.norm_stats="auto"` -> "pallas").

Sharding: XLA cannot see inside a Pallas call, and left alone would gather a batch-sharded operand onto every
device. Every kernel here works example by example, so each is wrapped in a `custom_partitioning` rule
(`_per_example`) that splits it over whatever shards the batch axis, with no communication; on one device
that is the kernel itself (the same lowered program); under vmap the mapped axis is folded into the batch.
The rule is checked on 8 CPU devices through the Pallas interpreter (the kernels, and GroupNorm32's kernel
branch); it has never been compiled or run on several GPUs. Programs with it are not cached by jax's
persistent compilation cache (the partitioning callback is keyed by a Python object id).

`affine_act(x (B, N, C) or its channel parts, a (B, C) f32, d (B, C) f32, silu, out_dtype) -> (B, N, C)`
(parts: a decoder block's [h, skip] is read where it lies, never concatenated): the same arithmetic as
the XLA expression in float32 (one multiply-add, then x * sigmoid(x) written as x / (1 + exp(-x))), one rounding
to `out_dtype`. Reverse-mode differentiable: the backward pass is the VJP of the XLA expression with
`jax.nn.silu` (a custom VJP; finite for any input, where differentiating x / (1 + exp(-x)) gives inf / inf
below -88), so training through a UNet that uses the kernel works. `supported(n, c)` says which shapes it
tiles; the caller falls back to XLA for the others (the small low-resolution GroupNorms, where the apply costs
little anyway).

The statistics kernel, `channel_sums`. Why: the UNet's "channel" statistics (`_channel_group_stats`) reduce
(B, N, C) over N in XLA, and those column reductions run at ~2.55 TB/s against 4.3 TB/s for a copy on an H200
(~33 ms of the 451 ms denoise call). This kernel reads x once in (rows <= 1024, 256 channels) blocks, walks
each block in (16, 256) sub-tiles with elementwise float32 accumulators (no cross-thread reduction until the
end of the block) and writes one partial sum per block; XLA adds the few partials per channel.
`channel_sums(x (B, N, C), pivot (B, C)) -> (s1, s2)`, each (B, C) float32: s1 = sum_n (x - pivot),
s2 = sum_n (x - pivot)^2, the subtraction in float32 (the pivot, a sample of x per channel, keeps the
squares small when |mean| >> std). Same `supported` shapes as the apply. Measured on an H200 (224x224x256,
batch 128): 3.8 TB/s against 3.1 TB/s for XLA's reduction. Reverse-mode differentiable in x and the pivot
(custom VJP, backward in XLA).

Three variants of the apply read or write a neighbour's layout, so that the UNet's resampling blocks move
less (ADM-256 at 224, bf16, batch 128; each from the H200 profiles of 2026-11-26 in benchmarks/RESULTS.md,
calls 5 and 7, ms per call of the denoise program):
- `affine_act_phases`: the four output phases of `UNet.upsample_impl="phases"` (four 2x2 convs on the
  low-resolution input) in, the interleaved (B, 2H, 2W, C) activation out: the interleaving copy that XLA
  would make (4.1 ms at 224x224 in the profile of the first "phases" form) is gone; the kernel moves
  3.5 TB/s (1.9 ms at 224x224, as the plain apply).
- `affine_act_pool`: a down-sampling ResBlock's apply + SiLU + 2x2 average pool, and the pool of its skip
  path, from one read of x (2.0 ms at 224x224, against 2.1 + 1.0 + 1.0 for XLA's apply and two pools).
- `affine_act_up`: an up-sampling ResBlock's apply, and its skip path up-sampled by the same programs
  (x is read from memory once; the four corner programs of a tile re-load it, from L2) (2.1 ms at
  112x112 -> 224x224, against 0.5 + 2.0 for the apply and XLA's broadcast).
- `affine_act_skip` (not yet measured on a GPU): a ResBlock's apply, and its 1x1 skip conv of the raw input
  from the same tiles, so the conv does not read x again (`UNet.skip_impl="fused"`). Why: with "split" a
  224x224 decoder block reads its [h, skip] parts (3.3 GB each at batch 128) for the apply, then again for
  the two per-part skip convs (a GEMM, and a conv that takes the first's output as side input: 1.8 + 2.8 ms
  in the H200 profile of call 7). Those convs move 16.4 GB (both parts, the first's output, two writes);
  fused, the skip conv adds only its 3.3 GB write to the apply's traffic (~1 ms at the apply's 3.5 TB/s),
  if its arithmetic (1.7 TFLOP per 224x224 block) hides under the memory traffic. The product runs on the
  tensor cores through Triton's dot (by default (128, 64) x (64, 128) steps into a float32 (128, 128)
  accumulator); whether it keeps up is for a GPU to show (`bench_pallas_norm.py` times it against "split").
The phase apply replaced an interleaving copy and was not timed against it in one process. With the pooled
and up-sampling applies refused (the bench's `fuse=none`, which then also ran those GroupNorms' apply in
XLA), the whole denoise ran at 1.003x the default in call 8, inside the +-2% verdict band: they are kept, as
they move fewer bytes and cost nothing measurable.

Launch parameters: `Tuning` (rows per tile, warps, stages). In the sweep of `benchmarks/bench_pallas_norm.py`
on an H200 the sums' defaults were the fastest (tied by 2 and 4 stages), the apply's lost by 2.2% to 16-row
tiles on the kernels alone, and the two tied in the whole UNet (within 0.2%), so the defaults stay. Added
since, not yet swept on a GPU: `apply_steps` (the rows apply walks several sub-tiles per program in a loop
that Triton can pipeline, like the sums kernel, which reads at 3.8 TB/s where the one-tile apply moves 3.5-3.7)
and the `skip_*` parameters of `affine_act_skip`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["Tuning", "affine_act", "affine_act_phases", "affine_act_pool", "affine_act_skip", "affine_act_up",
           "channel_sums", "channel_sums_reference", "current_tuning", "interleave_phases", "phases_supported",
           "pool_reference", "pool_supported", "reference", "skip_reference", "skip_supported", "supported",
           "tuning", "up_supported", "upsample_nearest2"]

BLOCK_C = 256  # channel tile: divides every width of ADM-256/128 (concatenations included); narrower UNets
# (iddpm CIFAR-10: 128, ADM-64: 192 channels) mostly fall back to XLA
MIN_BLOCK_N = 16  # fewest rows a tile may have (`supported`)


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Launch parameters of the kernels, read when a program is traced (`tuning` changes them for the programs
  traced inside it; `benchmarks/bench_pallas_norm.py` sweeps them on a GPU). The apply_* fields serve every
  apply kernel (rows, phases, pooled, up-sampling), the stats_* fields `channel_sums`."""
  # pixels per apply tile (x 256 channels): 64 elements per thread at 4 warps; the pooled apply's output tiles
  # hold half as many (each reads 4x that many input pixels)
  apply_rows: int = 32
  apply_warps: int = 4
  apply_stages: int = 1
  # tiles per program of the rows apply (`affine_act`): > 1 walks apply_rows-row sub-tiles in a loop, which
  # Triton can software-pipeline (apply_stages > 1: the next sub-tile's load in flight while this one is
  # applied and stored) (unmeasured; the sweep's candidates). 1: the measured kernel (the same jaxpr).
  apply_steps: int = 1
  stats_rows: int = 1024  # rows per `channel_sums` program (one partial sum per stats_rows rows, 256 channels)
  stats_block: int = 16  # rows per sub-tile: two 16 x 256 float32 accumulators = 64 registers/thread at 4 warps
  stats_warps: int = 4
  # 3 stages let Triton prefetch the next sub-tiles while the current one is added (a load and two adds).
  stats_stages: int = 3
  # `affine_act_skip`: (rows x skip_block_o outputs) float32 accumulator tiles, walked over the input channels
  # in `skip_chunk` steps (unmeasured on a GPU). Compiled offline for sm_90a (`benchmarks/triton_resources.py`,
  # the pip Triton), Triton's usual Hopper GEMM tile, 128 x 256 x 64 at 8 warps, spills in the 112x112 and
  # 224x224 blocks (255 registers, ~100-160 local stores): the apply's tile competes with the 128-register
  # accumulator. 128 x 128 uses 104-216 registers and spills nowhere; 64 x 256 also fits (the sweep's rival).
  skip_rows: int = 128
  skip_block_o: int = 128  # output channels per program (<= 256: `skip_supported` outputs are multiples of 256)
  skip_chunk: int = 64
  skip_warps: int = 8
  skip_stages: int = 3

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if type(v) is not int or v < 1:  # not bool either
        raise ValueError(f"pallas_norm.Tuning.{f.name} must be a positive int, got {v!r}")
    for name, least in (("apply_rows", MIN_BLOCK_N), ("stats_rows", MIN_BLOCK_N), ("stats_block", MIN_BLOCK_N),
                        ("skip_rows", MIN_BLOCK_N), ("skip_chunk", MIN_BLOCK_N), ("skip_block_o", MIN_BLOCK_N),
                        ("apply_steps", 1), ("apply_warps", 1),
                        ("stats_warps", 1), ("skip_warps", 1)):  # Triton: power-of-two tiles and warp counts
      v = getattr(self, name)
      if v & (v - 1) or v < least:
        raise ValueError(f"pallas_norm.Tuning.{name} must be a power of two >= {least}, got {v}")
    for name in ("skip_chunk", "skip_block_o"):
      if getattr(self, name) > BLOCK_C:
        raise ValueError(f"pallas_norm.Tuning.{name} must divide {BLOCK_C}, got {getattr(self, name)}")


_TUNING = Tuning()


def current_tuning() -> Tuning:
  return _TUNING


@contextlib.contextmanager
def tuning(**overrides):
  """Trace programs with other launch parameters: `with tuning(apply_rows=64, apply_warps=8): jit(f).lower(x)`.
  Only tracing reads them: a function jax has already traced (the same Python function, the same argument
  shapes) keeps the parameters of its first trace, so trace a new function inside. For benchmarks (not
  thread-safe); the defaults are `Tuning()`'s."""
  global _TUNING
  previous, _TUNING = _TUNING, dataclasses.replace(_TUNING, **overrides)
  try:
    yield _TUNING
  finally:
    _TUNING = previous


def _block_n(n: int, tune: Tuning | None = None) -> int:
  # largest power of two dividing n (Triton tiles are powers of two), capped
  return min(n & -n, (tune or _TUNING).apply_rows)


def _per_example(fn, in_ranks: tuple, out_ranks: tuple, replicated: tuple = ()):
  """`fn(*operands)`, whose operands and results all lead with the batch axis and which works example by
  example, as a function XLA partitions over whatever shards that batch axis: each device runs `fn` on its own
  examples, with the other axes whole, and nothing is communicated. (XLA cannot see inside a Pallas call, so
  without this a batch-sharded program would gather every operand onto every device.) On one device it is
  `fn` itself (jax lowers a custom_partitioning call inline there). Under vmap the mapped axis is folded into
  the batch. `fn` must build its kernel from the shapes it is called with: in a sharded program they are one
  device's shapes. Operands whose positions are in `replicated` have no batch axis (a weight matrix): every
  device gets them whole, and they may not be vmapped."""
  from jax.experimental.custom_partitioning import custom_partitioning
  from jax.sharding import NamedSharding, PartitionSpec

  def positional(*operands):  # custom_partitioning binds its function's signature: positional only
    return fn(*operands)

  wrapped = custom_partitioning(positional)
  single = len(out_ranks) == 1

  def batch_of(arg_shapes):
    sharding = arg_shapes[0].sharding
    spec = getattr(sharding, "spec", None)
    if spec is None and not sharding.is_fully_replicated:
      warnings.warn(f"pallas_norm: operand sharding {sharding} names no mesh axes (a GSPMDSharding without a "
                    "mesh in scope); the kernel runs on the gathered batch on every device. Shard with a "
                    "NamedSharding to split it over the batch.", stacklevel=2)
    return spec[0] if spec else None

  def shardings(mesh, batch, ranks, whole=()):
    return tuple(NamedSharding(mesh, PartitionSpec(*(None,) * r) if i in whole else
                               PartitionSpec(batch, *(None,) * (r - 1))) for i, r in enumerate(ranks))

  def infer(mesh, arg_shapes, result_shape):  # GSPMD propagation
    out = shardings(mesh, batch_of(arg_shapes), out_ranks)
    return out[0] if single else out

  def partition(mesh, arg_shapes, result_shape):
    batch = batch_of(arg_shapes)
    out = shardings(mesh, batch, out_ranks)
    return mesh, positional, (out[0] if single else out), shardings(mesh, batch, in_ranks, replicated)

  # Shardy: factor "b" is the batch, shared by every operand and result but the replicated ones; every other
  # axis is its own factor and is kept whole.
  names = iter(f"f{i}" for i in range(sum(in_ranks) + sum(out_ranks)))
  spec = lambda r, batched=True: " ".join((["b"] if batched else []) + [next(names) for _ in range(r - batched)])
  ins = [spec(r, i not in replicated) for i, r in enumerate(in_ranks)]
  outs = [spec(r) for r in out_ranks]
  others = tuple(f for s in ins + outs for f in s.split() if f != "b")
  wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                        sharding_rule=", ".join(ins) + " -> " + ", ".join(outs), need_replication_factors=others)

  # custom_partitioning has no batching rule. Working example by example, the function vmaps by folding the
  # mapped axis into the batch, batch-major: (V, B, ...) -> (B * V, ...), one call, and back. Batch-major keeps
  # a sharded B expressible on the merged axis (V-major would make XLA gather it).
  from jax.custom_batching import custom_vmap

  @custom_vmap
  def call(*operands):
    return wrapped(*operands)

  @call.def_vmap
  def _vmap_rule(axis_size, in_batched, *operands):
    if any(in_batched[i] for i in replicated):
      raise NotImplementedError("pallas_norm: vmap over a kernel's weight operand")
    full = [o if batched or i in replicated else jnp.broadcast_to(o, (axis_size, *o.shape))
            for i, (o, batched) in enumerate(zip(operands, in_batched))]
    fold = lambda o: jnp.moveaxis(o, 0, 1).reshape(o.shape[1] * axis_size, *o.shape[2:])
    out = call(*(o if i in replicated else fold(o) for i, o in enumerate(full)))
    unfold = lambda y: jnp.moveaxis(y.reshape(y.shape[0] // axis_size, axis_size, *y.shape[1:]), 1, 0)
    return (unfold(out), True) if single else (tuple(map(unfold, out)), (True,) * len(out))

  return call


def supported(n: int, c: int) -> bool:
  """Whether `affine_act` and `channel_sums` tile (B, n, c) without masking: c a multiple of 256, n of 16."""
  return c % BLOCK_C == 0 and (n & -n) >= MIN_BLOCK_N


def reference(x: jax.Array, a: jax.Array, d: jax.Array, silu: bool, out_dtype) -> jax.Array:
  """The kernel's arithmetic as an XLA expression (for tests; the UNet's XLA path uses `jax.nn.silu`)."""
  return _act(x, a[:, None, :], d[:, None, :], silu).astype(out_dtype)


def _act(x, a, d, silu: bool):
  """Every apply kernel's arithmetic (and `reference`'s), float32: one multiply-add with a, d broadcast to x,
  then x * sigmoid(x) written as x / (1 + exp(-x))."""
  y = x.astype(jnp.float32) * a + d
  return y / (1.0 + jnp.exp(-y)) if silu else y


def _kernel(*refs, silu: bool, bounds: tuple, sub: int):
  """refs = (x part refs..., a, d, out). Channel tile k lies in part i when bounds[i] <= k < bounds[i + 1];
  only that part's block is read (each part's BlockSpec clamps k into its own range; Triton loads nothing
  for a branch that does not run). A block of more than `sub` rows is applied `sub` rows at a time."""
  *x_refs, a_ref, d_ref, o_ref = refs

  def apply(x_ref):
    steps = x_ref.shape[0] // sub
    if steps == 1:  # (the measured kernel: x loaded before a and d)
      o_ref[...] = _act(x_ref[...], a_ref[...][None, :], d_ref[...][None, :], silu).astype(o_ref.dtype)
      return
    a, d = a_ref[...][None, :], d_ref[...][None, :]

    def step(i, carry):
      rows = pl.ds(pl.multiple_of(i * sub, sub), sub)
      o_ref[rows, :] = _act(x_ref[rows, :], a, d, silu).astype(o_ref.dtype)
      return carry

    jax.lax.fori_loop(0, steps, step, 0)

  if len(x_refs) == 1:
    apply(x_refs[0])
    return
  k = pl.program_id(2)
  for x_ref, lo, hi in zip(x_refs, bounds, bounds[1:]):
    pl.when((k >= lo) & (k < hi))(functools.partial(apply, x_ref))


def _part_index_map(i, j, k, *, lo: int, hi: int):
  return i, j, jnp.minimum(jnp.maximum(k - lo, 0), hi - lo - 1)


def _launch(interpret: bool, warps: int, stages: int) -> dict:
  """pallas_call's Triton launch parameters (none for the interpreter)."""
  if interpret:
    return {}
  from jax.experimental.pallas import triton as pltriton
  return {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=stages)}


def _corner_specs(ht: int, wt: int):
  """BlockSpecs over the grid (B, H / ht, W / wt, 4, C / 256) of the kernels that write a 2x up-sampled
  (B, H, 2, W, 2, C) view: a (ht, wt, 256) tile of a (B, H, W, C) array, a (B, C) row, and the output tile of
  grid axis 3's corner p = (p // 2, p % 2)."""
  tile = pl.BlockSpec((None, ht, wt, BLOCK_C), lambda i, j, l, p, k: (i, j, l, k))
  row = pl.BlockSpec((None, BLOCK_C), lambda i, j, l, p, k: (i, k))
  corner = pl.BlockSpec((None, ht, None, wt, None, BLOCK_C), lambda i, j, l, p, k: (i, j, p // 2, l, p % 2, k))
  return tile, row, corner


def _apply_call(*operands, silu, out_dtype, interpret, tune):
  *parts, a, d = operands
  b, n, _ = parts[0].shape
  bounds = (0, *itertools.accumulate(p.shape[2] // BLOCK_C for p in parts))  # channel-tile offsets
  sub = _block_n(n, tune)
  bn = min(n & -n, sub * tune.apply_steps)  # rows per program: apply_steps sub-tiles where n allows
  x_specs = [pl.BlockSpec((None, bn, BLOCK_C), functools.partial(_part_index_map, lo=lo, hi=hi))
             for lo, hi in zip(bounds, bounds[1:])]
  tile = pl.BlockSpec((None, bn, BLOCK_C), lambda i, j, k: (i, j, k))
  row = pl.BlockSpec((None, BLOCK_C), lambda i, j, k: (i, k))
  return pl.pallas_call(
      functools.partial(_kernel, silu=silu, bounds=bounds, sub=sub),
      out_shape=jax.ShapeDtypeStruct((b, n, bounds[-1] * BLOCK_C), out_dtype),
      grid=(b, n // bn, bounds[-1]),
      in_specs=[*x_specs, row, row],
      out_specs=tile,
      interpret=interpret,
      **_launch(interpret, tune.apply_warps, tune.apply_stages),
  )(*parts, a, d)


def _pallas(parts, a, d, silu, out_dtype, interpret):
  # The launch parameters are read now, at trace time (the partitioner calls back later, at compile time).
  call = functools.partial(_apply_call, silu=silu, out_dtype=out_dtype, interpret=interpret, tune=_TUNING)
  return _per_example(call, (3,) * len(parts) + (2, 2), (3,))(*parts, a.astype(jnp.float32),
                                                             d.astype(jnp.float32))


def _with_vjp(pallas_fn, bwd):
  """`pallas_fn(x, a, d, silu, out_dtype, interpret)` as a reverse-differentiable function with backward pass
  `bwd(silu, out_dtype, interpret, (x, a, d), g)`. `x` may be a tuple of arrays."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
  def fn(x, a, d, silu, out_dtype, interpret):
    return pallas_fn(x, a, d, silu, out_dtype, interpret)

  def fwd(x, a, d, silu, out_dtype, interpret):
    return pallas_fn(x, a, d, silu, out_dtype, interpret), (x, a, d)

  fn.defvjp(fwd, bwd)
  return fn


def _with_xla_vjp(pallas_fn, expression):
  """`_with_vjp` whose backward pass is the VJP of `expression(x, a, d, silu, out_dtype)`: the same arithmetic
  in XLA, with `jax.nn.silu` (finite for any input; the module docstring says why)."""
  def bwd(silu, out_dtype, interpret, res, g):
    _, vjp = jax.vjp(lambda *args: expression(*args, silu, out_dtype), *res)
    return vjp(g)

  return _with_vjp(pallas_fn, bwd)


def _xla_apply(x, a, d, silu, out_dtype):
  y = x.astype(jnp.float32) * a[:, None, :] + d[:, None, :]
  return (jax.nn.silu(y) if silu else y).astype(out_dtype)


def _split(v: jax.Array, widths, axis: int = -1) -> list:
  """v cut along `axis` into consecutive pieces of `widths` (a part's slice of a, d or w)."""
  offsets = [0, *itertools.accumulate(widths)]
  return [jax.lax.slice_in_dim(v, lo, hi, axis=axis) for lo, hi in zip(offsets, offsets[1:])]


def _bwd(silu, out_dtype, interpret, res, g):
  # Part by part against its channel slice of a, d and g: the backward concatenates only the (B, C) da, dd.
  parts, a, d = res
  widths = [p.shape[2] for p in parts]
  dparts, da, dd = [], [], []
  for p, ai, di, gi in zip(parts, _split(a, widths), _split(d, widths), _split(g, widths)):
    _, vjp = jax.vjp(lambda *args: _xla_apply(*args, silu, out_dtype), p, ai, di)
    dp, dai, ddi = vjp(gi)
    dparts.append(dp)
    da.append(dai)
    dd.append(ddi)
  cat = lambda v: v[0] if len(v) == 1 else jnp.concatenate(v, axis=-1)
  return tuple(dparts), cat(da), cat(dd)


_affine_act = _with_vjp(_pallas, _bwd)


def affine_act(x, a: jax.Array, d: jax.Array, *, silu: bool, out_dtype, interpret: bool = False) -> jax.Array:
  """x (B, N, C) (any float dtype), a, d (B, C) -> act(x * a + d) (B, N, C) in `out_dtype`.

  `x` may also be a tuple of parts (B, N, C_i) that make the input as their concatenation along channels:
  the kernel reads each output tile's channels from its part, so the concatenation is never materialised (a
  UNet decoder block's [h, skip], `UNet.skip_impl="split"`). `interpret=True` runs the kernel through Pallas'
  interpreter (any backend; for tests). Raises ValueError for shapes `supported` rejects.
  """
  parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  if not parts or any(p.ndim != 3 or p.shape[2] == 0 for p in parts):
    raise ValueError(f"affine_act: x (B, N, C) or non-empty parts (B, N, C_i > 0), got {[p.shape for p in parts]}")
  b, n = parts[0].shape[:2]
  c = sum(p.shape[-1] for p in parts)
  if any(p.shape[:2] != (b, n) for p in parts) or a.shape != (b, c) or d.shape != a.shape:
    raise ValueError(f"affine_act: x (B, N, C) or parts (B, N, C_i) with a, d (B, C), got "
                     f"{[p.shape for p in parts]}, {a.shape}, {d.shape}")
  for p in parts:
    if not supported(n, p.shape[2]):
      raise ValueError(f"affine_act: (N, C) = {p.shape[1:]} not tiled (C % {BLOCK_C}, N % {MIN_BLOCK_N})")
  return _affine_act(parts, a, d, bool(silu), jnp.dtype(out_dtype), bool(interpret))


SKIP_BLOCK_O = 256  # `affine_act_skip` outputs: a multiple of this (each program owns Tuning.skip_block_o)
SKIP_MIN_ROWS = 64  # fewest rows of an `affine_act_skip` tile (a Hopper warpgroup MMA is 64 rows tall)


def skip_supported(n: int, widths, o: int) -> bool:
  """Whether `affine_act_skip` tiles parts (B, n, widths[i]) projected to o channels: every width and o a
  multiple of 256, and n divisible by 64."""
  return (len(widths) > 0 and all(w > 0 and w % BLOCK_C == 0 for w in widths) and o > 0
          and o % SKIP_BLOCK_O == 0 and (n & -n) >= SKIP_MIN_ROWS)


def _skip_kernel(*refs, silu: bool, widths: tuple, chunk: int):
  """refs = (x parts, a parts, d parts, w parts (C_i, bo), bias (bo,), act out (rows, C), skip out
  (rows, bo)), bo = Tuning.skip_block_o. Each part is walked in `chunk`-channel steps: the step's x is
  applied into the act tile and multiplied into the float32 accumulator. Grid axis 0 is the output-channel
  tile; the programs of the first write the activation (the others only read x again)."""
  k = len(widths)
  x_refs, a_refs, d_refs, w_refs = refs[:k], refs[k:2 * k], refs[2 * k:3 * k], refs[3 * k:4 * k]
  bias_ref, y_ref, s_ref = refs[4 * k:]
  first = pl.program_id(0) == 0
  acc = jnp.zeros(s_ref.shape, jnp.float32)
  offset = 0
  for x_ref, a_ref, d_ref, w_ref, width in zip(x_refs, a_refs, d_refs, w_refs, widths):
    def step(i, acc, x_ref=x_ref, a_ref=a_ref, d_ref=d_ref, w_ref=w_ref, offset=offset):
      start = pl.multiple_of(i * chunk, chunk)
      ch = pl.ds(start, chunk)
      x = x_ref[:, ch]

      @pl.when(first)
      def _():
        y = _act(x, a_ref[ch][None, :], d_ref[ch][None, :], silu)
        y_ref[:, pl.ds(offset + start, chunk)] = y.astype(y_ref.dtype)

      return acc + jnp.dot(x, w_ref[ch, :], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, width // chunk, step, acc)
    offset += width
  s_ref[...] = (acc + bias_ref[...].astype(jnp.float32)[None, :]).astype(s_ref.dtype)


def _skip_call(*operands, silu, out_dtype, interpret, tune):
  k = (len(operands) - 1) // 4
  parts = operands[:k]
  b, n, _ = parts[0].shape
  widths = tuple(p.shape[2] for p in parts)
  c, o = sum(widths), operands[-1].shape[0]
  rows, bo = min(n & -n, tune.skip_rows), tune.skip_block_o
  # Grid (output tile, example, row tile): the first axis is launched fastest, so the programs that share a
  # row tile (and read the same x) run side by side and all but the first find x in L2.
  x_specs = [pl.BlockSpec((None, rows, w), lambda l, i, j: (i, j, 0)) for w in widths]
  row_specs = [pl.BlockSpec((None, w), lambda l, i, j: (i, 0)) for w in widths]
  w_specs = [pl.BlockSpec((w, bo), lambda l, i, j: (0, l)) for w in widths]
  return pl.pallas_call(
      functools.partial(_skip_kernel, silu=silu, widths=widths, chunk=tune.skip_chunk),
      out_shape=(jax.ShapeDtypeStruct((b, n, c), out_dtype), jax.ShapeDtypeStruct((b, n, o), parts[0].dtype)),
      grid=(o // bo, b, n // rows),
      in_specs=[*x_specs, *row_specs, *row_specs, *w_specs, pl.BlockSpec((bo,), lambda l, i, j: (l,))],
      out_specs=(pl.BlockSpec((None, rows, c), lambda l, i, j: (i, j, 0)),
                 pl.BlockSpec((None, rows, bo), lambda l, i, j: (i, j, l))),
      interpret=interpret,
      **_launch(interpret, tune.skip_warps, tune.skip_stages),
  )(*operands)


def _skip_pallas(parts, a, d, silu, out_dtype, interpret, w, bias):
  widths = [p.shape[2] for p in parts]
  k = len(parts)
  operands = (*parts, *_split(a.astype(jnp.float32), widths), *_split(d.astype(jnp.float32), widths),
              *_split(w.astype(parts[0].dtype), widths, axis=0), bias)
  call = functools.partial(_skip_call, silu=silu, out_dtype=out_dtype, interpret=interpret, tune=_TUNING)
  ranks = (3,) * k + (2,) * (3 * k) + (1,)
  return _per_example(call, ranks, (3, 3), replicated=tuple(range(3 * k, 4 * k + 1)))(*operands)


def skip_reference(x, a, d, w, bias, silu: bool, out_dtype) -> tuple[jax.Array, jax.Array]:
  """`affine_act_skip` as an XLA expression: (the apply of every part, concatenated; sum_i x_i @ w_i + bias
  from x's dtype operands with float32 accumulation, rounded once to x's dtype)."""
  parts = tuple(x)
  widths = [p.shape[2] for p in parts]
  act = jnp.concatenate([_xla_apply(p, ai, di, silu, out_dtype)
                         for p, ai, di in zip(parts, _split(a, widths), _split(d, widths))], axis=-1)
  dt = parts[0].dtype
  acc = sum(jnp.einsum("bnc,co->bno", p, wi, preferred_element_type=jnp.float32)
            for p, wi in zip(parts, _split(w.astype(dt), widths, axis=0)))
  return act, (acc + bias.astype(jnp.float32)).astype(dt)


# The shared custom-VJP wrapper, with (parts, w, bias) as its first argument.
_affine_act_skip = _with_xla_vjp(
    lambda x, a, d, silu, out_dtype, interpret: _skip_pallas(x[0], a, d, silu, out_dtype, interpret, x[1], x[2]),
    lambda x, a, d, silu, out_dtype: skip_reference(x[0], a, d, x[1], x[2], silu, out_dtype))


def affine_act_skip(x, a: jax.Array, d: jax.Array, w: jax.Array, bias: jax.Array, *, silu: bool, out_dtype,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """x (B, N, C) or its channel parts (B, N, C_i), a, d (B, C), w (C, O), bias (O,) -> (act(x * a + d)
  (B, N, C) in `out_dtype`, x @ w + bias (B, N, O) in x's dtype): a decoder ResBlock's GroupNorm apply and
  its 1x1 skip conv of the raw input (`UNet.skip_impl="fused"`), from ONE read of x.

  The apply is `affine_act`'s arithmetic. The product takes x's dtype operands (w is cast to it) and
  accumulates all C channels in float32, rounding once after the bias (`skip_reference`; the split form's
  per-part convs round each part's sum first). Each program owns (rows, `Tuning.skip_block_o` outputs): it
  walks its rows' input channels in steps, applying them into the activation (the programs of the first
  output tile write it) and multiplying them into its accumulator. Reverse-mode differentiable in every array
  argument (the VJP of `skip_reference`). Raises ValueError for shapes `skip_supported` rejects."""
  parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  if not parts or any(p.ndim != 3 for p in parts):
    raise ValueError(f"affine_act_skip: x (B, N, C) or parts (B, N, C_i), got {[p.shape for p in parts]}")
  b, n = parts[0].shape[:2]
  widths = tuple(p.shape[2] for p in parts)
  c = sum(widths)
  if any(p.dtype != parts[0].dtype for p in parts):  # one dtype: Triton's dot takes w in the parts' dtype
    raise ValueError(f"affine_act_skip: parts of one dtype, got {[str(p.dtype) for p in parts]}")
  if (any(p.shape[:2] != (b, n) for p in parts) or a.shape != (b, c) or d.shape != a.shape or w.ndim != 2
      or w.shape[0] != c or bias.shape != (w.shape[1],)):
    raise ValueError(f"affine_act_skip: parts (B, N, C_i), a, d (B, C), w (C, O), bias (O,), got "
                     f"{[p.shape for p in parts]}, {a.shape}, {d.shape}, {w.shape}, {bias.shape}")
  if not skip_supported(n, widths, w.shape[1]):
    raise ValueError(f"affine_act_skip: N = {n}, widths {widths}, O = {w.shape[1]} not tiled (C_i % {BLOCK_C}, "
                     f"O % {SKIP_BLOCK_O}, N % {SKIP_MIN_ROWS})")
  return _affine_act_skip((parts, w, bias), a, d, bool(silu), jnp.dtype(out_dtype), bool(interpret))


def _phase_tile(h: int, w: int, tune: Tuning | None = None) -> tuple[int, int]:
  """(rows, columns) of the phase apply's (rows, columns, 256) tiles: powers of two dividing (h, w), at most
  `apply_rows` pixels (the width first: longer contiguous runs)."""
  pixels = (tune or _TUNING).apply_rows
  wt = min(w & -w, pixels)
  return min(h & -h, pixels // wt), wt


def phases_supported(h: int, w: int, c: int) -> bool:
  """Whether `affine_act_phases` (and `channel_sums` on each phase) tile four (B, h, w, c) phases: c a
  multiple of 256 and the largest power-of-two divisors of h and w holding >= 16 pixels together."""
  return c % BLOCK_C == 0 and (h & -h) * (w & -w) >= MIN_BLOCK_N


def interleave_phases(phases) -> jax.Array:
  """Four (B, H, W, C) phases (p00, p01, p10, p11) -> (B, 2H, 2W, C), out[:, 2i + py, 2j + px] =
  phases[2 py + px][:, i, j] (in XLA)."""
  b, h, w, c = phases[0].shape
  rows = [jnp.stack(phases[2 * py:2 * py + 2], axis=3) for py in (0, 1)]  # (B, H, W, px, C)
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, c)  # (B, H, py, W, px, C)


def _phase_kernel(*refs, silu: bool):
  """refs = (the four phase refs, a, d, out); grid axis 3 is the phase, whose block of the output view
  (B, H, 2, W, 2, C) is at [.., py, .., px, ..]; only that phase's ref is read."""
  *x_refs, a_ref, d_ref, o_ref = refs

  def apply(x_ref):
    o_ref[...] = _act(x_ref[...], a_ref[...][None, None, :], d_ref[...][None, None, :], silu).astype(o_ref.dtype)

  p = pl.program_id(3)
  for q, x_ref in enumerate(x_refs):
    pl.when(p == q)(functools.partial(apply, x_ref))


def _phase_apply_call(*operands, silu, out_dtype, interpret, tune):
  *phases, a, d = operands
  b, h, w, c = phases[0].shape
  # The output as (B, H, py, W, px, C), a free view of (B, 2H, 2W, C): phase p's tile lands at (p // 2, p % 2).
  ht, wt = _phase_tile(h, w, tune)
  x_spec, row, out_spec = _corner_specs(ht, wt)
  y = pl.pallas_call(
      functools.partial(_phase_kernel, silu=silu),
      out_shape=jax.ShapeDtypeStruct((b, h, 2, w, 2, c), out_dtype),
      # The phase inside the pixel tile: the four tiles of one output region are written one after another.
      grid=(b, h // ht, w // wt, 4, c // BLOCK_C),
      in_specs=[x_spec] * 4 + [row, row],
      out_specs=out_spec,
      interpret=interpret,
      **_launch(interpret, tune.apply_warps, tune.apply_stages),
  )(*phases, a, d)
  return y.reshape(b, 2 * h, 2 * w, c)


def _phase_pallas(phases, a, d, silu, out_dtype, interpret):
  call = functools.partial(_phase_apply_call, silu=silu, out_dtype=out_dtype, interpret=interpret, tune=_TUNING)
  return _per_example(call, (4,) * 4 + (2, 2), (4,))(*phases, a.astype(jnp.float32), d.astype(jnp.float32))


def _phase_expression(phases, a, d, silu, out_dtype):
  b, c = a.shape
  return _xla_apply(interleave_phases(phases).reshape(b, -1, c), a, d, silu, out_dtype).reshape(
      b, 2 * phases[0].shape[1], 2 * phases[0].shape[2], c)


_affine_act_phases = _with_xla_vjp(_phase_pallas, _phase_expression)


def affine_act_phases(phases, a: jax.Array, d: jax.Array, *, silu: bool, out_dtype,
                      interpret: bool = False) -> jax.Array:
  """The four output phases (p00, p01, p10, p11) of a nearest-x2 up-sampled conv, each (B, H, W, C), with a, d
  (B, C) -> act(interleave(phases) * a + d) (B, 2H, 2W, C) in `out_dtype`, where
  interleave(phases)[:, 2i + py, 2j + px] = phases[2 py + px][:, i, j] (`interleave_phases`).

  The same arithmetic as `affine_act`; each (rows, columns, 256) tile of a phase is written to its strided
  place in the output, so the interleaved input is never materialised. Reverse-mode differentiable (the VJP
  of the XLA expression). Raises ValueError for shapes `phases_supported` rejects."""
  phases = tuple(phases)
  if len(phases) != 4 or any(p.ndim != 4 or p.shape != phases[0].shape for p in phases):
    raise ValueError(f"affine_act_phases: four (B, H, W, C) phases of one shape, got {[p.shape for p in phases]}")
  b, h, w, c = phases[0].shape
  if a.shape != (b, c) or d.shape != a.shape:
    raise ValueError(f"affine_act_phases: a, d (B, C) = {(b, c)}, got {a.shape}, {d.shape}")
  if not phases_supported(h, w, c):
    raise ValueError(f"affine_act_phases: (H, W, C) = {(h, w, c)} not tiled (C % {BLOCK_C}, "
                     f"pow2(H) * pow2(W) >= {MIN_BLOCK_N})")
  return _affine_act_phases(phases, a, d, bool(silu), jnp.dtype(out_dtype), bool(interpret))


def _pool_tile(h: int, w: int, tune: Tuning | None = None) -> tuple[int, int]:
  """(rows, columns) of the pooled output's tiles in `affine_act_pool`: powers of two dividing the pooled
  (h, w), at most apply_rows / 2 pixels (each program reads 4x that many input pixels and keeps two float32
  accumulators)."""
  pixels = max((tune or _TUNING).apply_rows // 2, 1)
  wt = min(w & -w, pixels)
  return min(h & -h, pixels // wt), wt


def pool_supported(h: int, w: int, c: int) -> bool:
  """Whether `affine_act_pool` tiles a (B, h, w, c) input: even h and w, c a multiple of 256, and the
  largest power-of-two divisors of h / 2 and w / 2 holding >= 8 pooled pixels together."""
  return h % 2 == 0 and w % 2 == 0 and c % BLOCK_C == 0 and ((h // 2) & -(h // 2)) * ((w // 2) & -(w // 2)) >= 8


def _pool_kernel(*refs, silu: bool):
  """refs = (x viewed (B, H/2, 2, W/2, 2, C) four times: the (dy, dx) corner of every 2x2 window, a, d,
  pooled act out, pooled x out). The four corners' tiles are added one at a time in float32."""
  *x_refs, a_ref, d_ref, y_ref, xp_ref = refs
  a, d = a_ref[...][None, None, :], d_ref[...][None, None, :]
  acc_y = acc_x = None
  for x_ref in x_refs:
    x = x_ref[...].astype(jnp.float32)
    y = _act(x, a, d, silu)
    acc_y = y if acc_y is None else acc_y + y
    acc_x = x if acc_x is None else acc_x + x
  y_ref[...] = (acc_y * 0.25).astype(y_ref.dtype)
  xp_ref[...] = (acc_x * 0.25).astype(xp_ref.dtype)


def _pool_apply_call(x, a, d, *, silu, out_dtype, interpret, tune):
  b, h, w, c = x.shape
  ph, pw = h // 2, w // 2
  ht, wt = _pool_tile(ph, pw, tune)
  corner = lambda dy, dx: pl.BlockSpec((None, ht, None, wt, None, BLOCK_C),
                                       lambda i, j, l, k: (i, j, dy, l, dx, k))
  row = pl.BlockSpec((None, BLOCK_C), lambda i, j, l, k: (i, k))
  tile = pl.BlockSpec((None, ht, wt, BLOCK_C), lambda i, j, l, k: (i, j, l, k))
  x6 = x.reshape(b, ph, 2, pw, 2, c)  # a free view: the 2x2 windows' corners as axes
  return pl.pallas_call(
      functools.partial(_pool_kernel, silu=silu),
      out_shape=(jax.ShapeDtypeStruct((b, ph, pw, c), out_dtype), jax.ShapeDtypeStruct((b, ph, pw, c), x.dtype)),
      grid=(b, ph // ht, pw // wt, c // BLOCK_C),
      in_specs=[corner(dy, dx) for dy in (0, 1) for dx in (0, 1)] + [row, row],
      out_specs=(tile, tile),
      interpret=interpret,
      **_launch(interpret, tune.apply_warps, tune.apply_stages),
  )(x6, x6, x6, x6, a, d)


def _pool_pallas(x, a, d, silu, out_dtype, interpret):
  call = functools.partial(_pool_apply_call, silu=silu, out_dtype=out_dtype, interpret=interpret, tune=_TUNING)
  return _per_example(call, (4, 2, 2), (4, 4))(x, a.astype(jnp.float32), d.astype(jnp.float32))


def _pool_pair(x: jax.Array, y: jax.Array, out_dtype) -> tuple[jax.Array, jax.Array]:
  """(avg_pool2(y), avg_pool2(x)) for a float32 activation y of x (B, H, W, C): pooled in float32, rounded once
  (to `out_dtype`, to x's dtype)."""
  b, h, w, c = x.shape
  pool = lambda v: v.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return pool(y).astype(out_dtype), pool(x.astype(jnp.float32)).astype(x.dtype)


def pool_reference(x: jax.Array, a: jax.Array, d: jax.Array, silu: bool, out_dtype) -> tuple[jax.Array, jax.Array]:
  """`affine_act_pool`'s arithmetic as an XLA expression (`reference`'s apply, then `_pool_pair`)."""
  b, c = a.shape
  return _pool_pair(x, reference(x.reshape(b, -1, c), a, d, silu, jnp.float32).reshape(x.shape), out_dtype)


def _pool_expression(x, a, d, silu, out_dtype):
  b, c = a.shape
  return _pool_pair(x, _xla_apply(x.reshape(b, -1, c), a, d, silu, jnp.float32).reshape(x.shape), out_dtype)


_affine_act_pool = _with_xla_vjp(_pool_pallas, _pool_expression)


def affine_act_pool(x: jax.Array, a: jax.Array, d: jax.Array, *, silu: bool, out_dtype,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """x (B, H, W, C), a, d (B, C) -> (avg_pool2(act(x * a + d)) in `out_dtype`, avg_pool2(x) in x's dtype),
  each (B, H/2, W/2, C): a down-sampling ResBlock's normalised input and its skip path, from ONE read of x.

  The full-resolution activation is never written: each program reads the four corners of its 2x2 windows
  (strided tiles of a free (B, H/2, 2, W/2, 2, C) view), applies the multiply-add and SiLU in float32 and
  averages in float32, rounding once. (The XLA path rounds the activation, then pools it: the two differ by
  at most about a rounding step.) Reverse-mode differentiable (the VJP of the XLA expression). Raises
  ValueError for shapes `pool_supported` rejects."""
  _check_nhwc("affine_act_pool", x, a, d, pool_supported, f"even H, W; C % {BLOCK_C}; pow2(H/2) * pow2(W/2) >= 8")
  return _affine_act_pool(x, a, d, bool(silu), jnp.dtype(out_dtype), bool(interpret))


def _check_nhwc(name: str, x, a, d, supported_fn, rule: str) -> None:
  """x (B, H, W, C) with a, d (B, C) that `supported_fn(H, W, C)` tiles, else ValueError."""
  if x.ndim != 4:
    raise ValueError(f"{name}: x (B, H, W, C), got {x.shape}")
  b, h, w, c = x.shape
  if a.shape != (b, c) or d.shape != a.shape:
    raise ValueError(f"{name}: a, d (B, C) = {(b, c)}, got {a.shape}, {d.shape}")
  if not supported_fn(h, w, c):
    raise ValueError(f"{name}: (H, W, C) = {(h, w, c)} not tiled ({rule})")


def upsample_nearest2(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated 2x2 (in XLA: one broadcast, no gather)."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def up_supported(h: int, w: int, c: int) -> bool:
  """Whether `affine_act_up` tiles a (B, h, w, c) input (the same tiles as the phase apply)."""
  return phases_supported(h, w, c)


def _up_kernel(x_ref, a_ref, d_ref, y_ref, xu_ref, *, silu: bool):
  """Grid axis 3 is the corner of the 2x2 up-sampled block this program writes x to; corner 0's program
  also writes the activation."""
  x = x_ref[...]
  xu_ref[...] = x

  @pl.when(pl.program_id(3) == 0)
  def _():
    y_ref[...] = _act(x, a_ref[...][None, None, :], d_ref[...][None, None, :], silu).astype(y_ref.dtype)


def _up_apply_call(x, a, d, *, silu, out_dtype, interpret, tune):
  b, h, w, c = x.shape
  ht, wt = _phase_tile(h, w, tune)
  tile, row, corner = _corner_specs(ht, wt)
  y, xu = pl.pallas_call(
      functools.partial(_up_kernel, silu=silu),
      out_shape=(jax.ShapeDtypeStruct((b, h, w, c), out_dtype), jax.ShapeDtypeStruct((b, h, 2, w, 2, c), x.dtype)),
      grid=(b, h // ht, w // wt, 4, c // BLOCK_C),
      in_specs=[tile, row, row],
      out_specs=(tile, corner),
      interpret=interpret,
      **_launch(interpret, tune.apply_warps, tune.apply_stages),
  )(x, a, d)
  return y, xu.reshape(b, 2 * h, 2 * w, c)


def _up_pallas(x, a, d, silu, out_dtype, interpret):
  call = functools.partial(_up_apply_call, silu=silu, out_dtype=out_dtype, interpret=interpret, tune=_TUNING)
  return _per_example(call, (4, 2, 2), (4, 4))(x, a.astype(jnp.float32), d.astype(jnp.float32))


def _up_expression(x, a, d, silu, out_dtype):
  b, c = a.shape
  return _xla_apply(x.reshape(b, -1, c), a, d, silu, out_dtype).reshape(x.shape), upsample_nearest2(x)


_affine_act_up = _with_xla_vjp(_up_pallas, _up_expression)


def affine_act_up(x: jax.Array, a: jax.Array, d: jax.Array, *, silu: bool, out_dtype,
                  interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """x (B, H, W, C), a, d (B, C) -> (act(x * a + d) (B, H, W, C) in `out_dtype`, upsample_nearest2(x)
  (B, 2H, 2W, C) in x's dtype): an up-sampling ResBlock's normalised input (its conv up-samples it) and its
  up-sampled skip path, x read from memory once. The up-sampled copy is written by the same programs that
  apply the GroupNorm, one (rows, columns, 256) tile per corner of the 2x2 blocks (the four corner programs
  of a tile load it; all but the first from L2). Same tiling as
  `affine_act_phases` (`up_supported`). Reverse-mode differentiable (the VJP of the XLA expression)."""
  _check_nhwc("affine_act_up", x, a, d, up_supported, f"C % {BLOCK_C}, pow2(H) * pow2(W) >= {MIN_BLOCK_N}")
  return _affine_act_up(x, a, d, bool(silu), jnp.dtype(out_dtype), bool(interpret))


def _stats_rows(n: int, tune: Tuning | None = None) -> int:
  return min(n & -n, (tune or _TUNING).stats_rows)  # largest power of two dividing n, capped


def channel_sums_reference(x: jax.Array, pivot: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The kernel's result as an XLA expression: (sum_n d, sum_n d^2), d = x - pivot in float32 (for tests)."""
  d = x.astype(jnp.float32) - pivot.astype(jnp.float32)[:, None, :]
  return d.sum(axis=1), (d * d).sum(axis=1)


def _stats_kernel(x_ref, p_ref, s1_ref, s2_ref, *, block_n: int):
  p = p_ref[...][None, :]

  def body(i, carry):
    acc1, acc2 = carry
    start = pl.multiple_of(i * block_n, block_n)
    d = x_ref[pl.ds(start, block_n), :].astype(jnp.float32) - p
    return acc1 + d, acc2 + d * d

  zero = jnp.zeros((block_n, BLOCK_C), jnp.float32)
  acc1, acc2 = jax.lax.fori_loop(0, x_ref.shape[0] // block_n, body, (zero, zero))
  s1_ref[...] = jnp.sum(acc1, axis=0)
  s2_ref[...] = jnp.sum(acc2, axis=0)


def _stats_call(x, pivot, *, interpret, tune):
  b, n, c = x.shape
  rows = _stats_rows(n, tune)
  chunks = n // rows
  block_n = min(tune.stats_block, rows)
  tile = pl.BlockSpec((None, rows, BLOCK_C), lambda i, j, k: (i, j, k))
  row = pl.BlockSpec((None, BLOCK_C), lambda i, j, k: (i, k))
  part = pl.BlockSpec((None, None, BLOCK_C), lambda i, j, k: (i, j, k))
  out = jax.ShapeDtypeStruct((b, chunks, c), jnp.float32)
  return pl.pallas_call(
      functools.partial(_stats_kernel, block_n=block_n),
      out_shape=(out, out),
      grid=(b, chunks, c // BLOCK_C),
      in_specs=[tile, row],
      out_specs=(part, part),
      interpret=interpret,
      **_launch(interpret, tune.stats_warps, tune.stats_stages),
  )(x, pivot)


def _stats_pallas(x, pivot, interpret):
  call = functools.partial(_stats_call, interpret=interpret, tune=_TUNING)  # launch parameters: trace time
  s1, s2 = _per_example(call, (3, 2), (3, 3))(x, pivot.astype(jnp.float32))
  return s1.sum(axis=1), s2.sum(axis=1)  # the per-chunk partial sums (B, chunks, C), in XLA


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _channel_sums(x, pivot, interpret):
  return _stats_pallas(x, pivot, interpret)


def _stats_fwd(x, pivot, interpret):
  return _stats_pallas(x, pivot, interpret), (x, pivot)


def _stats_bwd(interpret, res, g):
  x, pivot = res
  g1, g2 = g
  d = x.astype(jnp.float32) - pivot.astype(jnp.float32)[:, None, :]
  dx = g1[:, None, :] + 2.0 * d * g2[:, None, :]
  # d/dpivot of (sum d, sum d^2): -N g1 - 2 sum_n d g2 (XLA drops it where the caller stop_gradients the pivot).
  dpivot = -(x.shape[1] * g1 + 2.0 * jnp.sum(d * g2[:, None, :], axis=1))
  return dx.astype(x.dtype), dpivot.astype(pivot.dtype)


_channel_sums.defvjp(_stats_fwd, _stats_bwd)


def channel_sums(x: jax.Array, pivot: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """x (B, N, C) (any float dtype), pivot (B, C) -> (sum_n d, sum_n d^2), each (B, C) float32, d = x - pivot.

  The subtraction is in float32. Reverse-mode differentiable in both arguments (the UNet stop_gradients the
  pivot, so XLA drops its cotangent). `interpret=True` runs the kernel through Pallas' interpreter (any backend; for
  tests). Raises ValueError for shapes `supported` rejects.
  """
  if x.ndim != 3 or pivot.shape != (x.shape[0], x.shape[2]):
    raise ValueError(f"channel_sums: x (B, N, C) with pivot (B, C), got {x.shape}, {pivot.shape}")
  if not supported(x.shape[1], x.shape[2]):
    raise ValueError(f"channel_sums: (N, C) = {x.shape[1:]} not tiled (C % {BLOCK_C}, N % {MIN_BLOCK_N})")
  return _channel_sums(x, pivot, bool(interpret))
