"""Program-level XLA / JAX performance settings for GPU runs (call from entry points, never at import).

XLA reads `XLA_FLAGS` (and the allocator reads `XLA_PYTHON_CLIENT_*`) once, when JAX initialises its first
backend. An entry point (train.py, evaluate.py, benchmarks/) therefore calls `set_xla_gpu_flags()` as its first
statement, before anything touches a device:

    from diffaug_jax import perf
    perf.set_xla_gpu_flags()          # appends the defaults below unless the user already set them
    import jax                        # (importing jax is fine; creating arrays is what initialises)

Flags already present in `XLA_FLAGS` (by name, whatever their value) are left as the user set them, so
`XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false python train.py` still wins. An unknown flag makes
XLA abort the process ("Unknown flag in XLA_FLAGS"), so the defaults are kept to flags documented by the JAX
GPU performance guide / NVIDIA JAX-Toolbox that exist in jaxlib 0.10 and 0.11; should one be unknown
anyway, `benchmarks/gpu_check.sh` reruns the benchmark without them (`--no-xla-flags`). Set `DIFFAUG_XLA_FLAGS=0` to
skip everything here.

Default flags (GPU only; they are registered but inert on CPU):
- `--xla_gpu_enable_latency_hiding_scheduler=true`: schedules asynchronous collectives (the data-parallel
  gradient all-reduce, BatchNorm statistics) to overlap with compute. No effect on one GPU; documented in the
  JAX "GPU performance tips" and baked into NVIDIA's JAX containers.

Optional sets (`set_xla_gpu_flags(extra=...)`), measured by the benchmark before becoming defaults:
- `CUBLAS_GEMMS`: `--xla_gpu_enable_triton_gemm=false` (cuBLAS for every GEMM instead of autotuned Triton
  GEMM fusions; JAX-Toolbox's former default).
"""
from __future__ import annotations

import os
import shlex
import sys
import warnings
from collections.abc import Mapping, MutableMapping, Sequence

__all__ = [
  "CUBLAS_GEMMS",
  "DEFAULT_GPU_FLAGS",
  "backend_initialized",
  "enable_compilation_cache",
  "flag_names",
  "set_xla_gpu_flags",
]

DEFAULT_GPU_FLAGS: Mapping[str, str] = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
}
CUBLAS_GEMMS: Mapping[str, str] = {"xla_gpu_enable_triton_gemm": "false"}


def flag_names(xla_flags: str) -> set[str]:
  """Names of the flags in an XLA_FLAGS string: "--a=1 --b" -> {"a", "b"}."""
  names = set()
  for tok in shlex.split(xla_flags or ""):
    if tok.startswith("--"):
      names.add(tok[2:].split("=", 1)[0])
  return names


def backend_initialized() -> bool:
  """True when JAX has already created its backends (flags set now would be ignored)."""
  if "jax" not in sys.modules:
    return False
  try:
    # Private, but the only way to ask without initialising a backend.
    from jax._src import xla_bridge
  except ImportError:  # pragma: no cover - layout change in a future jax
    return False
  fn = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(fn()) if fn is not None else bool(getattr(xla_bridge, "_backends", {}))


def set_xla_gpu_flags(extra: Mapping[str, str] | None = None, *, defaults: bool = True,
                      env: MutableMapping[str, str] | None = None) -> list[str]:
  """Appends performance flags to `XLA_FLAGS` unless already set; returns the flags it appended.

  Args:
    extra: more flags {name (no leading dashes): value} to append (e.g. `CUBLAS_GEMMS`).
    defaults: include `DEFAULT_GPU_FLAGS`.
    env: the environment to edit (default `os.environ`; a dict in tests).
  Returns:
    The appended "--name=value" strings (empty when nothing was appended, when `DIFFAUG_XLA_FLAGS=0`, or when
    JAX's backend is already initialised, in which case a warning says the flags would have no effect).
  Raises:
    ValueError: a flag name that does not look like an XLA flag (must start with "xla_").
  """
  env = os.environ if env is None else env
  if env.get("DIFFAUG_XLA_FLAGS", "1").strip().lower() in ("0", "false", "no", "off"):
    return []
  wanted: dict[str, str] = dict(DEFAULT_GPU_FLAGS) if defaults else {}
  wanted.update(extra or {})
  for name in wanted:
    if not name.startswith("xla_") or name.startswith("-"):
      raise ValueError(f"set_xla_gpu_flags: {name!r} is not an XLA flag name (expected 'xla_...', no dashes)")
  if env is os.environ and backend_initialized():
    warnings.warn("set_xla_gpu_flags called after JAX initialised its backend; XLA_FLAGS changes are ignored. "
                  "Call it first thing in the entry point.", RuntimeWarning, stacklevel=2)
    return []
  current = env.get("XLA_FLAGS", "")
  present = flag_names(current)
  added = [f"--{k}={v}" for k, v in wanted.items() if k not in present]
  if added:
    env["XLA_FLAGS"] = " ".join([current.strip()] + added).strip()
  return added


def enable_compilation_cache(path: str | None = None, *, min_compile_time_s: float = 1.0) -> str | None:
  """Turns on JAX's persistent compilation cache at `path` (default `$DIFFAUG_JAX_CACHE`, else off).

  Saves minutes per start of the big ADM programs (a rerun on the same machine skips XLA compilation and
  autotuning). Programs partitioned over several devices that hold a custom-partitioning call (the Pallas
  GroupNorm kernels, jax's cuDNN attention) get a new cache key every process and are not reused. Safe to
  call after import; returns the directory used or None.
  """
  path = path or os.environ.get("DIFFAUG_JAX_CACHE")
  if not path:
    return None
  import jax
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
  return path


def _main(argv: Sequence[str]) -> int:
  """`python -m diffaug_jax.perf [--probe]`: print the flags; --probe also initialises the backend (a bad
  flag aborts here, in a throw-away process, instead of in the real program)."""
  added = set_xla_gpu_flags()
  print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
  print("appended: " + (" ".join(added) or "(none)"))
  if "--probe" in argv:
    import jax
    print("devices:", jax.devices())
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
