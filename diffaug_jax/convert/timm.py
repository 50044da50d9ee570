"""DeiT-III ViT checkpoints (timm naming, or the DeiT repository's own) -> `VisionTransformer` variables.

Two namings are accepted:
- timm (`timm.create_model("deit3_base_patch16_224")`): LayerScale as `blocks.{i}.ls1.gamma` / `ls2.gamma`.
- facebookresearch/deit `models_v2.py` (the released `deit_3_base_224_1k.pth`, saved as `{"model": ...}`):
  LayerScale as `blocks.{i}.gamma_1` / `gamma_2`; everything else has timm's names.
The DeiT names are rewritten to timm's, then the state dict is checked strictly (all missing, unexpected and
mis-shaped keys in one CheckpointMismatchError) and mapped mechanically (see `convert.torchvision`).

CLI: `python -m diffaug_jax.convert deit SRC DST [--variant deit3_base_patch16_224] [--num-classes 1000]`.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Mapping, Sequence


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


def vit_module(variant: str = "deit3_base_patch16_224", num_classes: int = 1000,
               **module_kw) -> VisionTransformer:
  if variant not in VARIANTS:
    raise ValueError(f"unknown DeiT-III variant {variant!r}; known: {', '.join(VARIANTS)}")
  return VisionTransformer(num_classes=num_classes, **{**VARIANTS[variant], **module_kw})


def load_deit(source: Any, *, variant: str = "deit3_base_patch16_224", num_classes: int = 1000,
              **module_kw) -> tuple[VisionTransformer, dict]:
  """DeiT-III checkpoint -> (VisionTransformer, {"params": ...} float32 numpy).

  Args:
    source: .pth/.pt (needs torch), .npz, .safetensors, or a mapping; `module.` prefixes and `{"model": ...}`
      / `{"state_dict": ...}` wrappers are removed.
    variant: a key of VARIANTS (sizes); module_kw override them (e.g. for a tiny test model, or dtype, or
      mean=None, std=None for already-normalised inputs; by default [-1, 1] inputs get ImageNet mean/std,
      which is what DeiT-III was trained with).
  """
  module = vit_module(variant, num_classes, **module_kw)
  sd = deit_to_timm_names(read_state_dict(source))
  size = module.img_size
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
  args = ap.parse_args(argv)
  _, variables = load_deit(args.src, variant=args.variant, num_classes=args.num_classes)
  common.write_converted(args.dst, variables, f"{args.variant} from {args.src}")
  return 0
