"""Sweep the launch parameters of the Pallas GroupNorm kernels (`diffaug_jax.models.pallas_norm`) on the UNet's
largest shapes and write the fastest as `pallas_tuning.json` (issue 7).

    python benchmarks/bench_pallas_norm.py --out $OUT              # GPU: ADM-256 at 224, batch 128 shapes
    python benchmarks/bench_pallas_norm.py --tiny                  # CPU smoke test (Pallas interpreter)
    python benchmarks/bench_pallas_norm.py --out $OUT --kernels skip --target-s 0.1   # the fused skip only
    python benchmarks/bench_diffaug.py --pallas-tuning $OUT/pallas_tuning.json --cases denoise:bf16:auto:128:tune=1

For each `pallas_norm.Tuning` candidate it compiles the kernel at each shape, checks its result against the
XLA expression (a config that is wrong cannot win), times it (warm-up, then the median of repeats of
back-to-back calls ended by `block_until_ready`) and reports GB/s of HBM traffic next to two references of
the same process: XLA's fusion of the same arithmetic and an elementwise copy (y = 2x, one read and one
write). The winner of each kernel minimises its summed time over the shapes. Which parameters win on the
kernels alone is a lead, not a verdict: the whole program's A/B (`tune=1` cases of bench_diffaug.py) decides.

Shapes (full): the 224x224 GroupNorms of ADM-256 at 224 (9 per call of 256 channels, 3 decoder ones over the
[h, skip] parts of 2 x 256) and a 112x112 one of 512 channels; batch 128, bf16 in and out, float32 a and d.
The fused skip kernel (`affine_act_skip`, `UNet.skip_impl="fused"`) on three decoder blocks' [h, skip] and
1x1 skip conv, against the library's "split" form (the apply kernel, then XLA's per-part 1x1 convs).
Nothing here imports tensorflow_datasets or grain.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# name -> (batch, rows, [channels of each part])
APPLY_SHAPES = {"224x224 c256": (128, 224 * 224, [256]), "224x224 c256+256 (parts)": (128, 224 * 224, [256, 256]),
                "112x112 c512": (128, 112 * 112, [512])}
STATS_SHAPES = {"224x224 c256": (128, 224 * 224, 256), "112x112 c512": (128, 112 * 112, 512)}
# name -> (batch, rows, [channels of each part], output channels): decoder blocks' [h, skip] -> 1x1 skip conv
SKIP_SHAPES = {"224x224 c256+256 -> 256": (128, 224 * 224, [256, 256], 256),
               "112x112 c256+256 -> 256": (128, 112 * 112, [256, 256], 256),
               "56x56 c512+256 -> 512": (128, 56 * 56, [512, 256], 512)}
TINY_APPLY = {"tiny c256": (2, 64, [256]), "tiny c256+256 (parts)": (2, 64, [256, 256])}
TINY_STATS = {"tiny c256": (2, 64, 256)}
TINY_SKIP = {"tiny c256+256 -> 256": (2, 128, [256, 256], 256)}

# Candidates (Tuning overrides; {} = the library's defaults, always first). Apply: rows per tile and warps.
# (An H200 sweep of 2026-11-26 measured the single-tile ones: 32 rows 3.71 TB/s, 16 rows 3.80, 64 rows with 4 / 8
# warps 2.45 / 3.66, 128 rows 0.16; the looped ones, apply_steps > 1 with pipelining stages, are new.)
APPLY_GRID = [{}, dict(apply_rows=16), dict(apply_steps=4, apply_stages=3), dict(apply_steps=8, apply_stages=3),
              dict(apply_rows=16, apply_steps=8, apply_stages=3), dict(apply_steps=4, apply_stages=2),
              dict(apply_steps=8, apply_stages=4), dict(apply_rows=64, apply_warps=8)]
# stats_rows is capped by the largest power of two dividing the rows (1024 at 224x224, 256 at 112x112).
STATS_GRID = [{}, dict(stats_block=32), dict(stats_rows=512), dict(stats_rows=512, stats_block=32),
              dict(stats_warps=8, stats_block=32), dict(stats_stages=2), dict(stats_stages=4)]
# The fused skip kernel (`affine_act_skip`): rows x outputs per tile, input-channel step, warps, pipeline
# stages. All but the last compile without spills for sm_90a in `triton_resources.py` (the pip Triton); the
# last, 128 x 256 (Triton's usual Hopper GEMM tile, the first default), spills there: is it slower here?
SKIP_GRID = [{}, dict(skip_rows=64, skip_block_o=256), dict(skip_rows=64), dict(skip_stages=2),
             dict(skip_stages=4), dict(skip_chunk=32), dict(skip_chunk=128, skip_stages=2), dict(skip_block_o=256)]
TINY_APPLY_GRID = [{}, dict(apply_rows=16), dict(apply_rows=16, apply_steps=2, apply_stages=2)]
TINY_STATS_GRID = [{}, dict(stats_rows=16), dict(stats_rows=32, stats_block=32)]
TINY_SKIP_GRID = [{}, dict(skip_rows=64)]


def time_fn(fn, args, *, warmup: int, target_s: float, repeats: int) -> float:
  """Median seconds per call of back-to-back calls (one block_until_ready per repeat)."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = max(time.perf_counter() - t0, 1e-6)
  iters = max(1, min(200, int(target_s / one)))
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - t0) / iters)
  return statistics.median(runs)


def _cfg_name(overrides: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes through the interpreter")
  ap.add_argument("--out", default=None, help="dir for pallas_tuning.json and pallas_tuning.md")
  ap.add_argument("--time-budget", type=float, default=None, help="seconds; later candidates are skipped")
  ap.add_argument("--target-s", type=float, default=0.25, help="timed seconds per repeat")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--kernels", default="apply,stats,skip",
                  help="comma list of the kernels to sweep, in that order (apply, stats, skip); the others keep "
                       "their defaults")
  args = ap.parse_args(sys.argv[1:] if argv is None else argv)

  import jax
  import jax.numpy as jnp

  from diffaug_jax.models import pallas_norm
  from diffaug_jax.models.unet import skip_conv

  t_start = time.perf_counter()
  device = jax.devices()[0]
  if not args.tiny and device.platform != "gpu":
    raise SystemExit(f"bench_pallas_norm: the full shapes need a GPU (platform {device.platform}); use --tiny")
  interpret = args.tiny
  apply_shapes, stats_shapes = (TINY_APPLY, TINY_STATS) if args.tiny else (APPLY_SHAPES, STATS_SHAPES)
  apply_grid, stats_grid = (TINY_APPLY_GRID, TINY_STATS_GRID) if args.tiny else (APPLY_GRID, STATS_GRID)
  skip_shapes, skip_grid = (TINY_SKIP, TINY_SKIP_GRID) if args.tiny else (SKIP_SHAPES, SKIP_GRID)
  kernels = list(dict.fromkeys(k for k in args.kernels.split(",") if k))  # ordered, no repeats
  if not kernels or set(kernels) - {"apply", "stats", "skip"}:
    raise SystemExit(f"bench_pallas_norm: --kernels {args.kernels!r}: a comma list of apply, stats, skip")
  apply_shapes = apply_shapes if "apply" in kernels else {}
  stats_shapes = stats_shapes if "stats" in kernels else {}
  skip_shapes = skip_shapes if "skip" in kernels else {}
  timing = dict(warmup=1 if args.tiny else 2, target_s=0.0 if args.tiny else args.target_s,
                repeats=1 if args.tiny else args.repeats)
  print(f"[pallas] {getattr(device, 'device_kind', device)} ({device.platform}), jax {jax.__version__}, "
        f"interpret={interpret}", flush=True)
  key = jax.random.key(0)
  rows: list[dict] = []

  def over_budget() -> bool:
    return args.time_budget is not None and time.perf_counter() - t_start > args.time_budget

  def record(kernel, shape, cfg, sec, nbytes, err=None, **extra):
    row = dict(kernel=kernel, shape=shape, config=cfg, ms=1e3 * sec, gb_per_s=nbytes / sec / 1e9, **extra)
    if err is not None:
      row["max_abs_err"] = err
    rows.append(row)
    print(f"[pallas] {kernel:6s} {shape:26s} {cfg:44s} {1e3 * sec:8.3f} ms {nbytes / sec / 1e9:8.0f} GB/s"
          + (f"  err {err:.2e}" if err is not None else ""), flush=True)

  def sweep(kernel, grid, data, kernel_fn, error_fn, tolerance):
    """Candidate by candidate over the shapes (a budget cut leaves whole candidates out, not shapes):
    compile `kernel_fn` under the candidate's launch parameters, check `error_fn(got, want)` against
    `tolerance`, time it. A candidate that fails to compile or run (registers, shared memory) is a failed row;
    the sweep goes on."""
    for cfg in grid if data else ():
      if over_budget():
        print(f"[pallas] budget: skip the remaining {kernel} candidates", flush=True)
        break
      for shape, (args, want, nbytes) in data.items():
        try:  # compile, run (blocking: a GPU fault surfaces here), check and time, or a failed row
          with pallas_norm.tuning(**cfg):  # read while tracing: a fresh function per candidate
            fn = jax.jit(lambda *a: kernel_fn(*a)).lower(*args).compile()
          err = error_fn(jax.block_until_ready(fn(*args)), want, shape)
          sec = time_fn(fn, args, **timing)
        except Exception as e:  # noqa: BLE001 - any compile/run failure is this candidate's result
          print(f"[pallas] {kernel:6s} {shape:26s} {_cfg_name(cfg):44s} FAILED: {type(e).__name__}: "
                f"{str(e)[:200]}", flush=True)
          rows.append(dict(kernel=kernel, shape=shape, config=_cfg_name(cfg), tuning=cfg, ok=False,
                           ms=float("nan"), gb_per_s=0.0, error=f"{type(e).__name__}: {str(e)[:500]}"))
          continue
        record(kernel, shape, _cfg_name(cfg), sec, nbytes, err, tuning=cfg, ok=err <= tolerance)

  max_abs = lambda got, want: max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                                  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))

  def run_apply():
    # ---- the apply: XLA's fusion of the same arithmetic and a copy as references
    apply_data = {}
    for shape, (b, n, parts_c) in apply_shapes.items():
      ks = jax.random.split(jax.random.fold_in(key, n * len(parts_c)), len(parts_c) + 2)
      parts = tuple(jax.random.normal(k, (b, n, c), jnp.bfloat16) for k, c in zip(ks, parts_c))
      c = sum(parts_c)
      a = 1.0 + 0.1 * jax.random.normal(ks[-2], (b, c), jnp.float32)
      d = 0.1 * jax.random.normal(ks[-1], (b, c), jnp.float32)
      nbytes = 2 * 2 * b * n * c  # bf16 read + write
      xla = jax.jit(lambda parts, a, d: jax.nn.silu(jnp.concatenate(parts, -1).astype(jnp.float32) * a[:, None]
                                                    + d[:, None]).astype(jnp.bfloat16))
      record("apply", shape, "XLA fusion", time_fn(xla, (parts, a, d), **timing), nbytes)
      copy = jax.jit(lambda x: x * 2)
      record("copy", shape, "XLA y = 2x", time_fn(copy, (parts[0],), **timing), 2 * 2 * b * n * parts_c[0])
      apply_data[shape] = ((parts, a, d), xla(parts, a, d), nbytes)
    # one bf16 ulp at |y| < 16 (exp differs between XLA and Triton)
    sweep("apply", apply_grid, apply_data,
          lambda parts, a, d: pallas_norm.affine_act(parts, a, d, silu=True, out_dtype=jnp.bfloat16,
                                                     interpret=interpret),
          lambda got, want, shape: max_abs(got, want), 0.0625)

  def run_stats():
    # ---- the statistics: XLA's reduction as the reference
    stats_data = {}
    for shape, (b, n, c) in stats_shapes.items():
      kx, kp = jax.random.split(jax.random.fold_in(key, 7 * n + c))
      x = (3.0 + jax.random.normal(kx, (b, n, c), jnp.float32)).astype(jnp.bfloat16)
      pivot = x[:, 0, :].astype(jnp.float32)
      ref = jax.jit(pallas_norm.channel_sums_reference)
      record("stats", shape, "XLA reduction", time_fn(ref, (x, pivot), **timing), 2 * b * n * c)
      stats_data[shape] = ((x, pivot), ref(x, pivot), 2 * b * n * c)

    def sums_error(got, want, shape):
      # float32 sums in another order: relative to the sum of |terms| (n * E|d| ~ n), not to the (small) result
      (s1, s2), (w1, w2), n = got, want, stats_shapes[shape][1]
      return max(float(jnp.max(jnp.abs(s1 - w1))) / n, float(jnp.max(jnp.abs(s2 - w2) / (w2 + n))))

    sweep("stats", stats_grid, stats_data, lambda x, p: pallas_norm.channel_sums(x, p, interpret=interpret),
          sums_error, 1e-5)

  def run_skip():
    # ---- the fused skip: the library's skip_impl="split" on the same operands as the reference (the apply
    # kernel, then XLA's per-part 1x1 convs)
    skip_data = {}
    for shape, (b, n, parts_c, o) in skip_shapes.items():
      ks = jax.random.split(jax.random.fold_in(key, 3 * n + o), len(parts_c) + 4)
      parts = tuple(jax.random.normal(k, (b, n, c), jnp.bfloat16) for k, c in zip(ks, parts_c))
      c = sum(parts_c)
      a = 1.0 + 0.1 * jax.random.normal(ks[-4], (b, c), jnp.float32)
      d = 0.1 * jax.random.normal(ks[-3], (b, c), jnp.float32)
      w = (jax.random.normal(ks[-2], (c, o), jnp.float32) / c ** 0.5).astype(jnp.bfloat16)
      bias = (0.1 * jax.random.normal(ks[-1], (o,), jnp.float32)).astype(jnp.bfloat16)
      operands = (parts, a, d, w, bias)
      nbytes = 2 * b * n * (2 * c + o)  # bf16: the parts read, the activation and the skip conv written
      side = round(n ** 0.5)  # the convs on the block's (H, W) (a 1x1 conv's algorithm may depend on them)
      hw = (side, side) if side * side == n else (n, 1)
      split = jax.jit(lambda parts, a, d, w, bias, b=b, n=n, hw=hw: (
          pallas_norm.affine_act(parts, a, d, silu=True, out_dtype=jnp.bfloat16, interpret=interpret),
          skip_conv(tuple(p.reshape(b, *hw, -1) for p in parts), w[None, None], bias).reshape(b, n, -1)))
      record("skip", shape, "split: apply kernel + XLA 1x1 convs", time_fn(split, operands, **timing), nbytes)
      want = jax.jit(lambda *args: pallas_norm.skip_reference(*args, True, jnp.bfloat16))(*operands)
      skip_data[shape] = (operands, want, nbytes)
    # |act| < 16 and |skip| ~ a few: one bf16 ulp at 16 covers both (the skip: one rounding of float32 sums)
    sweep("skip", skip_grid, skip_data,
          lambda parts, a, d, w, bias: pallas_norm.affine_act_skip(parts, a, d, w, bias, silu=True,
                                                                   out_dtype=jnp.bfloat16, interpret=interpret),
          lambda got, want, shape: max_abs(got, want), 0.0625)

  def summarize(final: bool) -> dict:
    """The winners so far and the result dict; written to --out after every kernel's sweep (a run killed
    later keeps what it measured), printed at the end."""
    best = {}
    n_shapes = {"apply": len(apply_shapes), "stats": len(stats_shapes), "skip": len(skip_shapes)}
    for kernel, grid in (("apply", apply_grid), ("stats", stats_grid), ("skip", skip_grid)):
      totals = {}
      for cfg in grid:
        mine = [r for r in rows if r["kernel"] == kernel and r.get("tuning") == cfg]
        if mine and len(mine) == n_shapes[kernel] and all(r["ok"] for r in mine):  # measured everywhere, right
          totals[_cfg_name(cfg)] = (sum(r["ms"] for r in mine), cfg)
      if totals:
        name, (ms, cfg) = min(totals.items(), key=lambda kv: kv[1][0])
        default_ms = totals.get("default", (float("nan"),))[0]
        best[kernel] = dict(config=name, tuning=cfg, ms=ms, default_ms=default_ms)
    tuning = {}
    for kernel in ("apply", "stats", "skip"):
      tuning.update(best.get(kernel, {}).get("tuning", {}))
    result = dict(device=str(getattr(device, "device_kind", device)), platform=device.platform,
                  jax=jax.__version__, interpret=interpret, defaults=dataclasses.asdict(pallas_norm.Tuning()),
                  tuning=tuning, best=best, rows=rows, total_s=time.perf_counter() - t_start, complete=final)

    def md_row(r):
      head = f"| {r['kernel']} | {r['shape']} | {r['config']} |"
      if "error" in r:
        return f"{head} failed | | {r['error'][:100].replace('|', '/')} |"
      err = f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else ""
      return f"{head} {r['ms']:.3f} | {r['gb_per_s']:.0f} | {err} |"

    md = ["| kernel | shape | config | ms | GB/s | max abs err |", "|---|---|---|---:|---:|---:|"]
    md += [md_row(r) for r in rows]
    md += ["", "Best (summed over the shapes): " + "; ".join(
        f"{k}: {v['config']} {v['ms']:.3f} ms (default {v['default_ms']:.3f})" for k, v in best.items()),
        f"Tuning overrides: `{json.dumps(tuning)}`"]
    if final:
      print("\n" + "\n".join(md), flush=True)
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, "pallas_tuning.json"), "w") as f:
        json.dump(result, f, indent=1)
      with open(os.path.join(args.out, "pallas_tuning.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return result

  for kernel in kernels:  # in the order asked for: a time budget cuts the last
    {"apply": run_apply, "stats": run_stats, "skip": run_skip}[kernel]()
    summarize(final=False)
  return summarize(final=True)


if __name__ == "__main__":
  main()
