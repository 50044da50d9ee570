"""torchvision ResNet state dicts -> `diffaug_jax.models.resnet.ResNet` variables.

The released AugMix, DeepAugment and DeepAugment+AugMix ImageNet models are torchvision ResNet-50 checkpoints,
often saved by DataParallel training scripts as `{"state_dict": {"module.conv1.weight": ...}, "epoch": ...}`;
`common.load_state_dict` unwraps both. `num_batches_tracked` buffers are ignored. Every other key must match
the model exactly: all missing, unexpected and mis-shaped keys are reported in one CheckpointMismatchError.

Names: Flax module `layer1_0` <-> torch `layer1.0` (a trailing `_<digits>` becomes `.<digits>`); Conv `kernel`
(kh, kw, I, O) <-> `weight` (O, I, kh, kw); Dense `kernel` (I, O) <-> `weight` (O, I); BatchNorm `scale` <->
`weight`; batch_stats `mean`/`var` <-> `running_mean`/`running_var`. The same mechanical mapping serves the timm
ViT converter (`diffaug_jax.convert.timm`).

CLI: `python -m diffaug_jax.convert torchvision SRC DST [--arch resnet50] [--num-classes 1000]`.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffaug_jax.convert import common
from diffaug_jax.models.resnet import ResNet

# arch -> (stage_sizes, block)
ARCHS: dict[str, tuple[tuple[int, ...], str]] = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
    "resnet152": ((3, 8, 36, 3), "bottleneck"),
}

IGNORED = ("num_batches_tracked",)

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def read_state_dict(source: Any) -> dict[str, np.ndarray]:
  """`common.load_state_dict` (also reads the AugMix/DeepAugment release files `checkpoint.pth.tar`)."""
  return common.load_state_dict(source)


def torch_key(path: Sequence[str]) -> str:
  """Flax variable path (collection, module..., leaf) -> torch state-dict key."""
  col, *mods, leaf = path
  name = _LEAF_TO_TORCH.get((col, leaf), leaf)  # other params (cls_token, gamma, ...) keep their name
  return ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in mods] + [name])


def _torch_layout(path: Sequence[str], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  if path[-1] == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _from_torch(path: Sequence[str], w: np.ndarray) -> np.ndarray:
  w = np.asarray(w, dtype=np.float32)
  if path[-1] == "kernel" and w.ndim == 4:
    return common.conv_oihw_to_hwio(w)
  if path[-1] == "kernel" and w.ndim == 2:
    return common.linear_to_dense(w)
  return w


def variable_shapes(module: nn.Module, x_shape: tuple[int, ...]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {flax path: shape} of module's variables, via jax.eval_shape (no memory allocated)."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
  return {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(shapes).items()}


def expected_torch_shapes(module: nn.Module, x_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
  """{torch key: torch shape} that a state dict must provide exactly for `module`."""
  return {torch_key(p): _torch_layout(p, s) for p, s in variable_shapes(module, x_shape).items()}


def convert_state_dict(module: nn.Module, state_dict: Mapping[str, Any], *, x_shape: tuple[int, ...],
                       what: str) -> dict:
  """Strictly checks `state_dict` against `module`; returns float32 numpy variables (params, batch_stats)."""
  flat_shapes = variable_shapes(module, x_shape)
  expected = {torch_key(p): _torch_layout(p, s) for p, s in flat_shapes.items()}
  common.check_keys(expected, state_dict, what, ignore=IGNORED)
  flat = {p: _from_torch(p, state_dict[torch_key(p)]) for p in flat_shapes}
  return traverse_util.unflatten_dict(flat)


def resnet_module(arch: str = "resnet50", num_classes: int = 1000, **module_kw) -> ResNet:
  """The ResNet for a torchvision `arch`; module_kw override attributes (dtype, mean, std, stage_sizes...)."""
  if arch not in ARCHS:
    raise ValueError(f"unknown torchvision arch {arch!r}; known: {', '.join(ARCHS)}")
  stages, block = ARCHS[arch]
  kw = {"stage_sizes": stages, "block": block, "stem": "imagenet", **module_kw}
  return ResNet(num_classes=num_classes, **kw)


def load_torchvision_resnet(source: Any, *, arch: str = "resnet50", num_classes: int = 1000,
                            **module_kw) -> tuple[ResNet, dict]:
  """torchvision ResNet checkpoint -> (ResNet module, {"params", "batch_stats"} float32 numpy).

  Args:
    source: .pt/.pth/.pth.tar (needs torch), .npz, .safetensors path, or a mapping name -> array; `module.`
      prefixes and `{"state_dict": ...}` / `{"model": ...}` wrappers are removed.
    arch: resnet18/34/50/101/152.
    num_classes: classes of the checkpoint's fc layer (a mismatch is reported as a mis-shaped key).
    module_kw: ResNet attributes, e.g. dtype=jnp.bfloat16, or mean=None, std=None when the caller feeds
      already-normalised inputs. By default the module maps [-1, 1] inputs to ImageNet normalisation, which is
      what torchvision's training transforms produced.
  """
  module = resnet_module(arch, num_classes, **module_kw)
  sd = read_state_dict(source)
  variables = convert_state_dict(module, sd, x_shape=(1, 64, 64, 3),
                                 what=f"torchvision {arch} (num_classes={num_classes})")
  return module, variables


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m diffaug_jax.convert torchvision",
                               description="torchvision ResNet checkpoint -> flax msgpack (+ .sha256)")
  ap.add_argument("src", help=".pt/.pth/.pth.tar (needs torch), .npz or .safetensors state dict")
  ap.add_argument("dst", help="output .msgpack path")
  ap.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
  ap.add_argument("--num-classes", type=int, default=1000)
  args = ap.parse_args(argv)
  common.check_output_path(args.src, args.dst)  # before the (possibly GB-sized) read
  _, variables = load_torchvision_resnet(args.src, arch=args.arch, num_classes=args.num_classes)
  common.write_converted(args.dst, variables, f"{args.arch} from {args.src}")
  return 0
