"""guided-diffusion / improved-diffusion UNet checkpoints -> Flax params for `diffaug_jax.models.unet.UNet`.

The Flax parameter tree mirrors the PyTorch state dict (see models/unet.py), so the mapping is mechanical:
  torch `a.<i>.<j>.b.<k>.weight`  <->  flax `a_<i>_<j>/b_<k>/{kernel|scale|embedding}`
Layouts: conv OIHW -> HWIO; Conv1d [O, I, 1] (attention qkv / proj_out) and Linear [O, I] -> Dense [I, O];
GroupNorm weight -> scale; Embedding weight -> embedding (same layout).

The expected key set and shapes are derived from the Flax model itself (`jax.eval_shape`, no allocation), and
the state dict is checked strictly against it (all missing / unexpected / mis-shaped keys in one error).

CLI (via `python -m diffaug_jax.convert guided-diffusion SRC DST --flags-json FILE_or_preset`):
  python -m diffaug_jax.convert guided-diffusion 256x256_diffusion_uncond.pt adm256.msgpack \
      --flags-json adm_256_uncond
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffaug_jax.convert import common
from diffaug_jax.models.unet import UNET_PRESETS, UNet, unet_from_flags

__all__ = ["load_guided_diffusion", "convert_state_dict", "expected_torch_shapes", "flax_shapes",
           "torch_key", "main", "resolve_flags"]

_CONV1D_MODULES = ("qkv", "proj_out")  # 1x1 Conv1d in torch, Dense here


def torch_key(flax_path: Sequence[str]) -> str:
  """('input_blocks_1_0', 'in_layers_2', 'kernel') -> 'input_blocks.1.0.in_layers.2.weight'."""
  *mods, leaf = flax_path
  mods = [re.sub(r"_(\d+)", r".\1", m) for m in mods]
  return ".".join(mods + ["bias" if leaf == "bias" else "weight"])


def _torch_shape(flax_path: Sequence[str], shape: tuple) -> tuple:
  """Shape the torch tensor has for a flax param of `shape`."""
  leaf = flax_path[-1]
  if leaf != "kernel":
    return tuple(shape)  # bias, GroupNorm scale, Embedding table
  if len(shape) == 4:  # HWIO -> OIHW
    h, w, i, o = shape
    return (o, i, h, w)
  if len(shape) == 2:
    i, o = shape
    return (o, i, 1) if flax_path[-2] in _CONV1D_MODULES else (o, i)
  raise ValueError(f"unexpected kernel rank at {'/'.join(flax_path)}: {shape}")


def _dummy_inputs(module: UNet, size: Optional[int] = None):
  s = size or 2 ** (len(module.channel_mult) - 1)  # smallest valid input: params do not depend on H, W
  x = jnp.zeros((1, s, s, module.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if module.num_classes is not None else None
  return x, t, y


def flax_shapes(module: UNet) -> dict:
  """Flat {flax path tuple: ShapeDtypeStruct} of the module's params, computed with jax.eval_shape."""
  x, t, y = _dummy_inputs(module)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, y))
  return traverse_util.flatten_dict(variables["params"])


def expected_torch_shapes(module: UNet) -> dict:
  """{torch state-dict key: shape} the module expects."""
  return {torch_key(p): _torch_shape(p, s.shape) for p, s in flax_shapes(module).items()}


def convert_state_dict(module: UNet, state_dict: Mapping[str, Any], *, what: str = "guided-diffusion") -> dict:
  """Strictly check `state_dict` against `module` and return Flax variables {"params": ...} (float32 numpy).

  Raises common.CheckpointMismatchError naming every missing, unexpected and mis-shaped key.
  """
  fshapes = flax_shapes(module)
  expected = {torch_key(p): _torch_shape(p, s.shape) for p, s in fshapes.items()}
  common.check_keys(expected, state_dict, what)
  flat = {}
  for path in fshapes:
    w = state_dict[torch_key(path)]
    # numpy arrays stay numpy; jax arrays / tracers (e.g. under jax.eval_shape) are converted with array methods.
    w = np.asarray(w, dtype=np.float32) if not isinstance(w, jax.Array) else w.astype(jnp.float32)
    if path[-1] == "kernel":
      if w.ndim == 4:
        w = common.conv_oihw_to_hwio(w)
      elif w.ndim == 3:
        w = common.conv1d_to_dense(w)
      else:
        w = common.linear_to_dense(w)
    flat[path] = np.ascontiguousarray(w) if isinstance(w, np.ndarray) else w
  return {"params": traverse_util.unflatten_dict(flat)}


def resolve_flags(flags: Any) -> dict:
  """A preset name, a path to a JSON file of create_model flags, or a dict -> dict of flags."""
  if isinstance(flags, Mapping):
    return dict(flags)
  if isinstance(flags, str):
    if flags in UNET_PRESETS:
      return dict(UNET_PRESETS[flags])
    if os.path.isfile(flags):
      try:
        with open(flags) as f:
          d = json.load(f)
      except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: say which file
        raise ValueError(f"flags file {flags} is not valid JSON ({e}); give a JSON object of create_model "
                         f"flags or a preset name ({sorted(UNET_PRESETS)})") from e
      d = d.get("config", d) if isinstance(d, dict) else d  # also accepts the golden *_shapes.json ({"config": ...})
      if not isinstance(d, dict):
        raise ValueError(f"flags file {flags} holds a JSON {type(d).__name__}, not an object of create_model flags")
      return dict(d)
    raise ValueError(f"flags {flags!r} is neither a preset ({sorted(UNET_PRESETS)}) nor a JSON file")
  raise ValueError(f"cannot interpret flags {flags!r}")


def load_guided_diffusion(source: Any, **flags) -> tuple:
  """Load a guided-diffusion checkpoint: (path or mapping, create_model flags) -> (UNet module, variables).

  `source`: a .pt (needs torch; loaded with weights_only=True), .npz or .safetensors file, a mapping of
  state-dict names to arrays, or a `.msgpack` file written by `main` (then checked against the module too).
  `flags`: guided-diffusion create_model arguments (exactly as in the golden .json files), or `preset=NAME`
  (other flags override the preset). `module.apply(variables, x_nhwc, t, y=None)` gives the NHWC output.
  """
  preset = flags.pop("preset", None)
  if preset is not None:
    flags = {**resolve_flags(preset), **flags}
  module = unet_from_flags(**flags)
  if isinstance(source, (str, os.PathLike)) and str(source).endswith(".msgpack"):
    variables = common.load_params(source)
    if not isinstance(variables.get("params"), Mapping):
      raise ValueError(f"{source} has no 'params' tree (top-level keys: {sorted(map(str, variables))}); it is "
                       "not a UNet converted by `python -m diffaug_jax.convert guided-diffusion`")
    got = traverse_util.flatten_dict(variables["params"])
    want = flax_shapes(module)
    common.check_keys({"/".join(k): tuple(v.shape) for k, v in want.items()},
                      {"/".join(k): np.asarray(v) for k, v in got.items()}, f"converted params {source}")
    return module, variables
  state_dict = common.load_state_dict(source)
  what = f"guided-diffusion checkpoint {source}" if isinstance(source, (str, os.PathLike)) else \
      "guided-diffusion state dict"
  return module, convert_state_dict(module, state_dict, what=what)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI: convert SRC (.pt/.npz/.safetensors) to DST (.msgpack + .sha256) for the given model flags."""
  ap = argparse.ArgumentParser(prog="python -m diffaug_jax.convert guided-diffusion",
                               description="Convert a guided-diffusion UNet checkpoint to Flax msgpack.")
  ap.add_argument("src", help=".pt (needs torch), .npz or .safetensors state dict")
  ap.add_argument("dst", help="output .msgpack path (a .sha256 sidecar is written beside it)")
  ap.add_argument("--flags-json", required=True,
                  help=f"JSON file of create_model flags, or a preset name: {sorted(UNET_PRESETS)}")
  args = ap.parse_args(argv)
  common.check_output_path(args.src, args.dst)  # before the (possibly GB-sized) read
  flags = resolve_flags(args.flags_json)
  try:
    module, variables = load_guided_diffusion(args.src, **flags)
  except common.CheckpointMismatchError as e:  # a clear message, not a traceback
    print(f"error: {e}", file=sys.stderr)
    return 1
  common.write_converted(args.dst, variables, f"guided-diffusion UNet from {args.src} (image_size "
                         f"{module.image_size}, out_channels {module.out_channels})")
  return 0
