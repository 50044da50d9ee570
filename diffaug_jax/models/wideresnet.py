"""Wide ResNet (Zagoruyko & Komodakis 2016), the standard pre-activation WRN-d-k for 32x32 inputs.

Layout as the widely used PyTorch implementation (xternalz/WideResNet-pytorch, used by AugMix's CIFAR code):
conv3x3(16) -> 3 groups of n = (depth - 4) / 6 pre-activation blocks with widths 16k, 32k, 64k and strides
1, 2, 2 -> BN -> ReLU -> global average pool -> fc. Block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3,
plus identity, or a 1x1 conv (stride) of the pre-activated input when the width changes.
BatchNorm eps 1e-5, momentum 0.9 (torch 0.1). Interface: see `diffaug_jax.models.resnet`.
Features: (B, 64k) (640 for WRN-28-10).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffaug_jax.models.resnet import IMAGENET_MEAN, IMAGENET_STD, conv_init, normalize_input


def _bn(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _conv(f: int, k: int, s: int, dtype: Any, name: str) -> nn.Conv:
  p = k // 2
  return nn.Conv(f, (k, k), (s, s), padding=((p, p), (p, p)), use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=conv_init, name=name)


class WideBasicBlock(nn.Module):
  features: int
  strides: int = 1
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    equal = x.shape[-1] == self.features and self.strides == 1
    o = nn.relu(_bn(train, self.dtype, "bn1")(x))
    shortcut = x if equal else _conv(self.features, 1, self.strides, self.dtype, "conv_shortcut")(o)
    y = _conv(self.features, 3, self.strides, self.dtype, "conv1")(o)
    y = nn.relu(_bn(train, self.dtype, "bn2")(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-depth-widen. dropout_rate > 0 with train=True needs a 'dropout' rng."""
  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  dropout_rate: float = 0.0
  mean: Sequence[float] | None = IMAGENET_MEAN
  std: Sequence[float] | None = IMAGENET_STD
  dtype: Any = jnp.float32

  def setup(self):
    self.fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                       bias_init=nn.initializers.zeros)

  def logits_from_features(self, features: jax.Array) -> jax.Array:
    """features (B, 64 * widen_factor) -> float32 logits (B, K)."""
    return self.fc(features).astype(jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}")
    n = (self.depth - 4) // 6
    widths = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
    x = normalize_input(x, self.mean, self.std, self.dtype)
    x = _conv(16, 3, 1, self.dtype, "conv1")(x)
    for g, w in enumerate(widths):
      for j in range(n):
        x = WideBasicBlock(w, strides=(1 if g == 0 else 2) if j == 0 else 1, dropout_rate=self.dropout_rate,
                           dtype=self.dtype, name=f"block{g + 1}_{j}")(x, train)
    x = nn.relu(_bn(train, self.dtype, "bn_final")(x))
    h = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = self.logits_from_features(h)
    return (logits, h) if return_features else logits


def wrn28_10(num_classes: int = 10, **kw) -> WideResNet:
  return WideResNet(depth=28, widen_factor=10, num_classes=num_classes, **kw)
