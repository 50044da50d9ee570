"""Summarise a `jax.profiler` trace (the .xplane.pb files under a trace dir) into a short kernel table.

    python benchmarks/profile_summary.py TRACE_DIR [--top 25] [--json OUT.json] [--md OUT.md]

Works without TensorBoard/xprof: reads the XSpace with `jax.profiler.ProfileData`. On GPU it sums the kernel
events of the device plane's "Stream" lines (one event per CUDA kernel / memcpy), per XLA module, and sorts the
kernels into categories (convolution, GEMM, attention, reductions, elementwise fusions, copies/transposes) so
"where the step's time goes" is one glance. On CPU (smoke test) it sums the XLA thunk events by their `hlo_op`.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
from typing import Any

__all__ = ["categorize", "summarize", "to_markdown"]

# Order matters: first match wins. Kernel names from cuDNN / cuBLAS / XLA codegen on Hopper.
_CATEGORIES = (
    ("attention", r"fmha|flash|sdpa|fprop_attn|attention|softmax"),
    ("convolution", r"(?<![a-z])conv(?!ert)|fprop|dgrad|wgrad|implicit_gemm|cudnn"),
    ("gemm", r"gemm|nvjet|cutlass|cublas|matmul|dot|triton_gemm|sm90_xmma"),
    ("copy/transpose", r"transpose|copy|memcpy|memset|concatenate|slice"),
    ("reduction fusion", r"reduce|reduction"),
    ("elementwise fusion", r"fusion|loop|elementwise|convert"),
)


def categorize(name: str) -> str:
  low = name.lower()
  for cat, pat in _CATEGORIES:
    if re.search(pat, low):
      return cat
  return "other"


def _stats(ev) -> dict:
  try:
    return dict(ev.stats)
  except Exception:  # noqa: BLE001 - defensive against API drift of ProfileData
    return {}


def _files(trace_dir: str) -> list[str]:
  if os.path.isfile(trace_dir):
    return [trace_dir]
  return sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))


def summarize(trace_dir: str, top: int = 25) -> dict[str, Any]:
  """-> {"source", "device_planes", "busy_ms", "span_ms", "categories": {cat: ms}, "top": [(name, ms, count,
  cat)], "modules": {module: ms}}. Raises FileNotFoundError when the dir holds no .xplane.pb."""
  from jax.profiler import ProfileData  # lazy: importing this module must not need jax

  files = _files(trace_dir)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  per_kernel: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  per_module: dict[str, float] = collections.defaultdict(float)
  device_planes = []
  t_min, t_max = None, None
  source = "gpu"
  for f in files:
    pd = ProfileData.from_file(f)
    planes = list(pd.planes)
    gpu = [p for p in planes if p.name.startswith("/device:GPU")]
    if gpu:
      for p in gpu:
        device_planes.append(p.name)
        lines = list(p.lines)
        streams = [l for l in lines if l.name.startswith("Stream")]
        use = streams or [l for l in lines if l.name == "XLA Ops"]
        for line in use:
          for ev in line.events:
            d = float(ev.duration_ns)
            if d <= 0:
              continue
            st = _stats(ev)
            per_kernel[ev.name][0] += d
            per_kernel[ev.name][1] += 1
            per_module[str(st.get("hlo_module", "?"))] += d
            t_min = ev.start_ns if t_min is None else min(t_min, ev.start_ns)
            t_max = ev.end_ns if t_max is None else max(t_max, ev.end_ns)
    else:
      source = "cpu"
      for p in planes:
        if not p.name.startswith("/host:CPU"):
          continue
        device_planes.append(p.name)
        for line in p.lines:
          for ev in line.events:
            st = _stats(ev)
            if "hlo_op" not in st or float(ev.duration_ns) <= 0:
              continue
            d = float(ev.duration_ns)
            per_kernel[str(st["hlo_op"])][0] += d
            per_kernel[str(st["hlo_op"])][1] += 1
            per_module[str(st.get("hlo_module", "?"))] += d
            t_min = ev.start_ns if t_min is None else min(t_min, ev.start_ns)
            t_max = ev.end_ns if t_max is None else max(t_max, ev.end_ns)
  busy = sum(v[0] for v in per_kernel.values())
  cats: dict[str, float] = collections.defaultdict(float)
  for name, (d, _) in per_kernel.items():
    cats[categorize(name)] += d
  ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
  return {
      "source": source,
      "files": files,
      "device_planes": sorted(set(device_planes)),
      "busy_ms": busy / 1e6,
      "span_ms": (t_max - t_min) / 1e6 if t_min is not None else 0.0,
      "num_kernels": int(sum(v[1] for v in per_kernel.values())),
      "categories": {k: v / 1e6 for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
      "top": [(n, d / 1e6, c, categorize(n)) for n, (d, c) in ranked],
      "modules": {k: v / 1e6 for k, v in sorted(per_module.items(), key=lambda kv: -kv[1])},
  }


def to_markdown(s: dict[str, Any]) -> str:
  busy = s["busy_ms"] or 1e-9
  kernels = (f"- kernel time (sum over streams): {s['busy_ms']:.2f} ms; first-to-last kernel span: "
             f"{s['span_ms']:.2f} ms; kernels: {s['num_kernels']}")
  gaps = (f"- span not covered by kernels (launch gaps / host waits, single stream): "
          f"{max(0.0, s['span_ms'] - s['busy_ms']):.2f} ms")
  out = [f"Profile summary ({s['source']}; planes: {', '.join(s['device_planes']) or '-'})", "", kernels, gaps,
         "", "| category | ms | share |", "|---|---:|---:|"]
  out += [f"| {k} | {v:.2f} | {100 * v / busy:.1f}% |" for k, v in s["categories"].items()]
  out += ["", "| XLA module | ms |", "|---|---:|"]
  out += [f"| {k} | {v:.2f} |" for k, v in list(s["modules"].items())[:8]]
  out += ["", "| kernel / op | category | calls | ms | share |", "|---|---|---:|---:|---:|"]
  for name, ms, calls, cat in s["top"]:
    short = name if len(name) <= 90 else name[:87] + "..."
    out.append(f"| `{short}` | {cat} | {calls} | {ms:.2f} | {100 * ms / busy:.1f}% |")
  return "\n".join(out) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("trace_dir")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--json", default=None)
  ap.add_argument("--md", default=None)
  a = ap.parse_args(argv)
  s = summarize(a.trace_dir, a.top)
  md = to_markdown(s)
  print(md)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(s, f, indent=1)
  if a.md:
    with open(a.md, "w") as f:
      f.write(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
