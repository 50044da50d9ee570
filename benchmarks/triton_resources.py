"""Registers, spills and shared memory of every Pallas (Triton) kernel of the ADM UNet, compiled for an H100 /
H200 (sm_90a) on a machine without a GPU (issue 7).

    pip install triton                     # the compiler only (not a dependency); no GPU or driver needed
    PYTHONPATH=. python benchmarks/triton_resources.py                        # ADM-256 at 224, batch 128
    PYTHONPATH=. python benchmarks/triton_resources.py --unet skip_impl=fused --tune skip_rows=64

Why: a Triton kernel whose registers run out spills to local memory, which a timing shows only as "slow". The
UNet's kernels are lowered for CUDA here (`jax.export`, as the lowering census tests do); each distinct
Triton call (its IR and launch parameters, as XLA would receive them) is compiled by the `triton` package's
own pipeline for sm_90a and its cubin read back with `cuobjdump`. Prints one row per kernel: where it is
used, grid, warps, stages, registers per thread, spill stores / loads in the SASS, shared memory, and
Hopper MMA instructions.

The numbers come from the pip `triton`, not the Triton inside jaxlib's XLA that compiles these kernels on a
GPU: the two pipelines are close but not the same, so a spill here is a warning to check on a device, not a
verdict (and no spill here does not promise none there). Uses two private jax modules (the Triton dialect's
registration and the MLIR context of jax's lowering) to read the kernels' IR bytecode out of the exported
program; nothing here imports tensorflow_datasets or grain.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

TRITON_TARGET = "__gpu$xla.gpu.triton"


def _value(text: str):
  return int(text) if re.fullmatch(r"-?\d+", text) else {"true": True, "false": False}.get(text, text)


def parse_assignments(items) -> dict:
  """["skip_impl=fused", "skip_rows=64"] -> {"skip_impl": "fused", "skip_rows": 64}."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"triton_resources: expected name=value, got {item!r}")
    out[key] = _value(value)
  return out


def triton_calls(module_text: str) -> list[dict]:
  """The Triton custom calls of a StableHLO module (`jax.export`'s `mlir_module()`), in program order:
  {name, grid, warps, stages, ttir (the kernel's Triton IR as text), where (the op's location)}."""
  from jax._src.interpreters import mlir as jax_mlir
  from jax._src.lib import triton
  from jax._src.lib.mlir import ir

  ctx = jax_mlir.make_ir_context()
  triton.dialect.register_dialect(ctx)
  calls = []
  with ctx:
    module = ir.Module.parse(module_text)

    def visit(op):
      for region in op.regions:
        for block in region.blocks:
          for inner in block.operations:
            if inner.operation.name == "stablehlo.custom_call" and \
                ir.StringAttr(inner.attributes["call_target_name"]).value == TRITON_TARGET:
              calls.append(_call_info(inner, ir))
            visit(inner.operation)

    visit(module.operation)
  return calls


def _call_info(op, ir) -> dict:
  config = ir.DictAttr(op.attributes["mhlo.backend_config"])
  num = lambda key: ir.IntegerAttr(config[key]).value
  kernel = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
  loc = re.search(r'loc\("([^"]*)"', str(op.location))
  return dict(name=ir.StringAttr(config["name"]).value, grid=(num("grid_x"), num("grid_y"), num("grid_z")),
              warps=num("num_warps"), stages=num("num_stages"),
              ttir=kernel.operation.get_asm(enable_debug_info=False), where=loc.group(1) if loc else "")


def compile_sm90(ttir: str, warps: int, stages: int) -> dict:
  """Compile Triton IR text for sm_90a with the pip `triton`: {regs, stack (bytes), spill_stores,
  spill_loads, shared (bytes), mma (Hopper wgmma instructions in the SASS)}."""
  import triton
  from triton.backends.compiler import GPUTarget

  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "kernel.ttir")
    with open(src, "w") as f:
      f.write(ttir)
    # (fp fusion on: Triton's default, stated because Triton 3.9 warns that its default will change)
    options = dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    cubin = os.path.join(tmp, "kernel.cubin")
    with open(cubin, "wb") as f:
      f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
  field = lambda key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))
  return dict(regs=field("REG"), stack=field("STACK"), spill_stores=len(re.findall(r"\bSTL\b", sass)),
              spill_loads=len(re.findall(r"\bLDL\b", sass)), shared=kernel.metadata.shared,
              mma=len(re.findall(r"\bHGMMA\b", sass)))


def _where(path: str) -> str:
  """'jit(apply)/UNet/output_blocks_15_0/in_layers_0/...' -> 'output_blocks_15_0/in_layers_0'."""
  parts = [p for p in path.split("/") if p and not p.startswith(("jit(", "pjit", "UNet", "custom_", "pallas"))]
  return "/".join(parts[:2])


def unet_program(args) -> str:
  """The StableHLO text of the UNet forward pass `args` describe, lowered for CUDA (on any machine)."""
  import jax
  import jax.numpy as jnp
  from jax import export

  from diffaug_jax.models import pallas_norm
  from diffaug_jax.models.unet import unet_from_preset

  model = unet_from_preset(args.preset, dtype=jnp.bfloat16, **parse_assignments(args.unet))
  x = jax.ShapeDtypeStruct((args.batch, args.size, args.size, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t)
  with pallas_norm.tuning(**parse_assignments(args.tune)):
    exported = export.export(jax.jit(model.apply), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_TARGET)])(params, x, t)
  return exported.mlir_module()


def kernel_rows(module_text: str, compile_fn=None) -> list[dict]:
  """One row per distinct Triton kernel (IR and launch parameters) of a StableHLO module, with how many calls
  share it, where the first is, and `compile_fn(ttir, warps, stages)`'s resources (`compile_sm90`)."""
  groups = collections.OrderedDict()
  for call in triton_calls(module_text):
    groups.setdefault((call["ttir"], call["warps"], call["stages"]), []).append(call)
  return [dict(kernel=calls[0]["name"], calls=len(calls), first=_where(calls[0]["where"]),
               grid="x".join(map(str, calls[0]["grid"])), warps=warps, stages=stages,
               **(compile_fn or compile_sm90)(ttir, warps, stages))
          for (ttir, warps, stages), calls in groups.items()]


def table(rows: list[dict]) -> str:
  head = "| kernel | calls | first use | grid | warps | stages | regs | stack B | STL / LDL | shared KiB | wgmma |"
  lines = [head, "|---|---:|---|---|---:|---:|---:|---:|---|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['kernel']} | {r['calls']} | {r['first']} | {r['grid']} | {r['warps']} | {r['stages']} | "
                 f"{r['regs']} | {r['stack']} | {r['spill_stores']} / {r['spill_loads']} | "
                 f"{r['shared'] / 1024:.0f} | {r['mma']} |")
  return "\n".join(lines)


def parse_args(argv):
  ap = argparse.ArgumentParser(description="registers and spills of the UNet's Pallas kernels, compiled offline")
  ap.add_argument("--preset", default="adm_256_uncond")
  ap.add_argument("--size", type=int, default=224, help="input height = width")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--unet", nargs="*", default=[], help="UNet fields, name=value (e.g. skip_impl=fused)")
  ap.add_argument("--tune", nargs="*", default=[], help="pallas_norm.Tuning fields, name=value")
  return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if importlib.util.find_spec("triton") is None:
    raise SystemExit("triton_resources: needs the `triton` package (pip install triton); no GPU is needed")
  rows = kernel_rows(unet_program(args))
  print(f"{args.preset} at {args.size}x{args.size}, batch {args.batch}, bf16; UNet {args.unet or 'defaults'}, "
        f"Tuning {args.tune or 'defaults'}; compiled for sm_90a by the pip triton")
  print(table(rows))
  return rows


if __name__ == "__main__":
  main()
