"""PyTorch checkpoints -> Flax variables (guided-diffusion, torchvision ResNet, timm/DeiT ViT).

`python -m diffaug_jax.convert KIND SRC DST [options]`; KIND in guided-diffusion, torchvision, deit.
"""

from diffaug_jax.convert.common import (CheckpointMismatchError, check_keys, load_params,
                                        load_state_dict, save_params)


def load_guided_diffusion(source, **flags):
  """guided-diffusion state dict (path or mapping) + create_model flags -> (module, variables)."""
  from diffaug_jax.convert.guided_diffusion import load_guided_diffusion as fn
  return fn(source, **flags)


def load_torchvision_resnet(source, **kwargs):
  """torchvision ResNet state dict -> (module, variables)."""
  from diffaug_jax.convert.torchvision import load_torchvision_resnet as fn
  return fn(source, **kwargs)


def load_deit(source, **kwargs):
  """timm / DeiT-III ViT state dict -> (module, variables)."""
  from diffaug_jax.convert.timm import load_deit as fn
  return fn(source, **kwargs)


__all__ = ["CheckpointMismatchError", "check_keys", "load_params", "load_state_dict", "save_params",
           "load_guided_diffusion", "load_torchvision_resnet", "load_deit"]
