"""Small fast classifiers for tests and the embedded digits demo (train in about a minute on CPU).

Both follow the classifier interface of `diffaug_jax.models.resnet` and take any channel count (1 for digits,
3 for RGB) and any spatial size >= 8 (16x16 and 32x32 are the intended ones). Their default `mean`/`std` are
None: the [-1, 1] input is fed unchanged (already zero-centred), unlike the ImageNet-normalised big nets.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffaug_jax.models.resnet import ResNet, conv_init, dense_init, normalize_input


class SmallCNN(nn.Module):
  """conv3x3(w)-BN-ReLU-pool2 -> conv3x3(2w)-BN-ReLU-pool2 -> conv3x3(4w)-BN-ReLU -> global avg pool -> fc.

  Features: (B, 4 * width). With width 16 it has ~25k parameters.
  """
  num_classes: int = 10
  width: int = 16
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None
  dtype: Any = jnp.float32

  def setup(self):
    self.fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=dense_init)

  def logits_from_features(self, features: jax.Array) -> jax.Array:
    return self.fc(features).astype(jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    x = normalize_input(x, self.mean, self.std, self.dtype)
    for i, mult in enumerate((1, 2, 4)):
      x = nn.Conv(self.width * mult, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=conv_init, name=f"conv{i + 1}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                       param_dtype=jnp.float32, name=f"bn{i + 1}")(x)
      x = nn.relu(x)
      if i < 2:
        x = nn.max_pool(x, (2, 2), (2, 2))
    h = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = self.logits_from_features(h)
    return (logits, h) if return_features else logits


def cnn_small(num_classes: int = 10, **kw) -> SmallCNN:
  return SmallCNN(num_classes=num_classes, **kw)


def resnet_tiny(num_classes: int = 10, **kw) -> ResNet:
  """CIFAR-stem ResNet with 3 BasicBlock stages (1 block each) of width 16/32/64; features (B, 64)."""
  kw = {"stage_sizes": (1, 1, 1), "block": "basic", "width": 16, "stem": "cifar", "mean": None, "std": None,
        **kw}
  return ResNet(num_classes=num_classes, **kw)
