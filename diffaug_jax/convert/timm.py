"""DeiT-III ViT checkpoints (timm naming, or the DeiT repository's own) -> `VisionTransformer` variables.

Two namings are accepted:
- timm (`timm.create_model("deit3_base_patch16_224")`): LayerScale as `blocks.{i}.ls1.gamma` / `ls2.gamma`.
- facebookresearch/deit `models_v2.py` (the released `deit_3_base_224_1k.pth`, saved as `{"model": ...}`):
  LayerScale as `blocks.{i}.gamma_1` / `gamma_2`; everything else has timm's names.
The DeiT names are rewritten to timm's, then the state dict is checked strictly (all missing, unexpected and
mis-shaped keys in one CheckpointMismatchError) and mapped mechanically (see `convert.torchvision`).

Stage-1 weights at another resolution (DeiT-III trains ViT-B/L on ImageNet-1k at 192 and fine-tunes at 224):
`resize_pos_embed=True` resizes the pos_embed grid (12 x 12 -> 14 x 14) as DeiT's `--finetune` does, with
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` semantics (`bicubic_resize_grid`).

CLI: `python -m diffaug_jax.convert deit SRC DST [--variant deit3_base_patch16_224] [--num-classes 1000]
[--resize-pos-embed]`.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Mapping, Sequence

import numpy as np

from diffaug_jax.convert import common
from diffaug_jax.convert.torchvision import convert_state_dict, read_state_dict
from diffaug_jax.models.vit import VisionTransformer

# timm deit3_* model args (timm 1.0 vision_transformer.py).
VARIANTS: dict[str, dict[str, Any]] = {
    "deit3_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit3_small_patch16_384": dict(img_size=384, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit3_medium_patch16_224": dict(img_size=224, patch_size=16, embed_dim=512, depth=12, num_heads=8),
    "deit3_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "deit3_base_patch16_384": dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "deit3_large_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "deit3_large_patch16_384": dict(img_size=384, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "deit3_huge_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}

_DEIT_GAMMA = re.compile(r"^(blocks\.\d+)\.gamma_([12])$")


def deit_to_timm_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Renames the DeiT repository's `blocks.i.gamma_1/2` to timm's `blocks.i.ls1/ls2.gamma`; others unchanged."""
  out: dict[str, Any] = {}
  for k, v in state_dict.items():
    m = _DEIT_GAMMA.match(k)
    new = f"{m.group(1)}.ls{m.group(2)}.gamma" if m else k
    if new in out:
      raise common.CheckpointMismatchError(
          f"checkpoint has both DeiT and timm names for {new!r} (e.g. {k!r}); cannot tell which one to use")
    out[new] = v
  return out


def _torch_bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's 1-D bicubic resize (align_corners=False, size given): source
  position (i + 0.5) * in / out - 0.5, Keys' cubic with A = -0.75, taps clamped to the border."""
  w = np.zeros((out_size, in_size))
  for i in range(out_size):
    real = (i + 0.5) * in_size / out_size - 0.5  # not clamped at 0 for cubic, as torch does
    idx = min(int(np.floor(real)), in_size - 1)
    t = min(max(real - idx, 0.0), 1.0)
    taps = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
    for j, c in enumerate(taps):
      w[i, min(max(idx - 1 + j, 0), in_size - 1)] += c
  return w


def bicubic_resize_grid(grid: np.ndarray, size: int) -> np.ndarray:
  """(H, W, D) -> (size, size, D), `F.interpolate(mode="bicubic", align_corners=False)` per channel."""
  rows = _torch_bicubic_matrix(grid.shape[0], size)
  cols = _torch_bicubic_matrix(grid.shape[1], size)
  return np.einsum("ih,jw,hwd->ijd", rows, cols, grid.astype(np.float64)).astype(np.float32)


def interpolate_pos_embed(state_dict: Mapping[str, Any], num_patches: int) -> dict[str, Any]:
  """The state dict with its `pos_embed` (1, N, D) (patch tokens only: DeiT-III has no class-token position)
  resized to (1, num_patches, D) on the square patch grid, as DeiT's `--finetune` loads stage-1 weights."""
  pos = np.asarray(state_dict["pos_embed"], np.float32)
  old, new = int(round(pos.shape[1] ** 0.5)), int(round(num_patches ** 0.5))
  if old * old != pos.shape[1] or new * new != num_patches:
    raise ValueError(f"pos_embed {pos.shape} -> {num_patches} patches: not square patch grids")
  if old == new:
    return dict(state_dict)
  grid = bicubic_resize_grid(pos[0].reshape(old, old, -1), new)
  return {**state_dict, "pos_embed": grid.reshape(1, new * new, -1)}


def vit_module(variant: str = "deit3_base_patch16_224", num_classes: int = 1000,
               **module_kw) -> VisionTransformer:
  if variant not in VARIANTS:
    raise ValueError(f"unknown DeiT-III variant {variant!r}; known: {', '.join(VARIANTS)}")
  return VisionTransformer(num_classes=num_classes, **{**VARIANTS[variant], **module_kw})


def load_deit(source: Any, *, variant: str = "deit3_base_patch16_224", num_classes: int = 1000,
              resize_pos_embed: bool = False, **module_kw) -> tuple[VisionTransformer, dict]:
  """DeiT-III checkpoint -> (VisionTransformer, {"params": ...} float32 numpy).

  Args:
    source: .pth/.pt (needs torch), .npz, .safetensors, or a mapping; `module.` prefixes and `{"model": ...}`
      / `{"state_dict": ...}` wrappers are removed.
    variant: a key of VARIANTS (sizes); module_kw override them (e.g. for a tiny test model, or dtype, or
      mean=None, std=None for already-normalised inputs; by default [-1, 1] inputs get ImageNet mean/std,
      which is what DeiT-III was trained with).
    resize_pos_embed: resize a pos_embed of another grid (stage-1 weights at 192) to the variant's (see the
      module docstring); off, another grid is a shape mismatch like any other.
  """
  module = vit_module(variant, num_classes, **module_kw)
  sd = deit_to_timm_names(read_state_dict(source))
  size = module.img_size
  if resize_pos_embed and "pos_embed" in sd:
    sd = interpolate_pos_embed(sd, (size // module.patch_size) ** 2)
  variables = convert_state_dict(module, sd, x_shape=(1, size, size, 3),
                                 what=f"DeiT-III {variant} (num_classes={num_classes}"
                                      + (f", overrides {module_kw})" if module_kw else ")"))
  return module, variables


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m diffaug_jax.convert deit",
                               description="DeiT-III / timm deit3 checkpoint -> flax msgpack (+ .sha256)")
  ap.add_argument("src", help=".pth/.pt (needs torch), .npz or .safetensors state dict")
  ap.add_argument("dst", help="output .msgpack path")
  ap.add_argument("--variant", default="deit3_base_patch16_224", choices=sorted(VARIANTS))
  ap.add_argument("--num-classes", type=int, default=1000)
  ap.add_argument("--resize-pos-embed", action="store_true",
                  help="resize the pos_embed grid to the variant's size (stage-1 weights at another resolution)")
  args = ap.parse_args(argv)
  common.check_output_path(args.src, args.dst)  # before the (possibly GB-sized) read
  _, variables = load_deit(args.src, variant=args.variant, num_classes=args.num_classes,
                           resize_pos_embed=args.resize_pos_embed)
  common.write_converted(args.dst, variables, f"{args.variant} from {args.src}")
  return 0
