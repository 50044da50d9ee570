"""Classifier registry: `get_classifier(name, num_classes, *, dtype=jnp.float32, **kw) -> nn.Module`.

| name | module | intended input (NHWC, [-1, 1]) | features D | default mean/std |
|---|---|---|---|---|
| resnet18, resnet50 | torchvision ResNet, ImageNet stem | 224x224x3 (any >= 32) | 512 / 2048 | ImageNet |
| resnet18_cifar, resnet50_cifar | ResNet, 3x3 stem, no max-pool | 32x32x3 | 512 / 2048 | ImageNet |
| wrn28_10 | pre-activation WideResNet-28-10 | 32x32x3 | 640 | ImageNet |
| vit_b16 | DeiT-III ViT-B/16 | exactly img_size (224) x img_size x 3 | 768 | ImageNet |
| resnet_tiny | 3-stage BasicBlock ResNet, width 16 | 16x16 or 32x32, any C (digits: 1) | 64 | None |
| cnn_small | 3-conv BN CNN, width 16 | 16x16 or 32x32, any C (digits: 1) | 64 | None |

`**kw` override module attributes (e.g. `mean=None, std=None` to feed x unchanged, `zero_init_residual=True`,
`drop_path_rate=0.1`, `img_size=384`, `width=32`). All modules: `apply(vars, x, train=False,
return_features=False)`, `apply(vars, h, method="logits_from_features")`; BatchNorm stats in "batch_stats"
(ViT has none).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from diffaug_jax.models import resnet, small, vit, wideresnet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18,
    "resnet50": resnet.resnet50,
    "resnet18_cifar": lambda num_classes, **kw: resnet.resnet18(num_classes, **{"stem": "cifar", **kw}),
    "resnet50_cifar": lambda num_classes, **kw: resnet.resnet50(num_classes, **{"stem": "cifar", **kw}),
    "wrn28_10": wideresnet.wrn28_10,
    "vit_b16": vit.vit_b16,
    "resnet_tiny": small.resnet_tiny,
    "cnn_small": small.cnn_small,
}

# Input side length each classifier is designed for (the ViT requires exactly this unless img_size is given).
INPUT_SIZES: dict[str, int] = {
    "resnet18": 224, "resnet50": 224, "resnet18_cifar": 32, "resnet50_cifar": 32, "wrn28_10": 32,
    "vit_b16": 224, "resnet_tiny": 32, "cnn_small": 32,
}


def classifier_names() -> list[str]:
  return sorted(_REGISTRY)


def get_classifier(name: str, num_classes: int, *, dtype: Any = jnp.float32, **kw) -> nn.Module:
  """Builds classifier `name` with `num_classes` outputs and compute dtype `dtype` (params stay float32)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown classifier {name!r}; available: {', '.join(classifier_names())}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  return _REGISTRY[name](num_classes, dtype=dtype, **kw)
