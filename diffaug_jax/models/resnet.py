"""ResNets (torchvision-exact ImageNet stem, and the CIFAR stem) as Flax Linen modules.

Classifier interface (shared by every classifier in `diffaug_jax.models`):
  `module.apply(variables, x, train=False, return_features=False)`
    x: float (B, H, W, C) NHWC in [-1, 1]. The module maps it to [0, 1] with (x + 1) / 2 and normalises with its
    `mean` / `std` attributes (None = feed x unchanged, e.g. for imported nets whose inputs are already
    normalised).
    -> logits float32 (B, K), or (logits, features float32 (B, D)) with `return_features=True`.
  `module.apply(variables, h, method="logits_from_features")` -> logits (B, K): the head only (ReAct/ASH/SCALE).
  train=True needs `mutable=["batch_stats"]` (BatchNorm batch statistics, momentum 0.9 == torch 0.1).
  `dtype` is the compute dtype; params and BatchNorm statistics stay float32.

Module names follow torchvision's state-dict names with "." replaced by "_" (`layer1_0`, `downsample_0`,
`downsample_1`, `fc`), which is what `diffaug_jax.convert.torchvision` relies on.

Known difference from torch: BatchNorm's running variance is updated with the biased batch variance (Flax)
instead of torch's unbiased one (a factor n/(n-1) on the update, negligible for n = B*H*W).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for convs.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
  """The bias init of torch.nn.Linear / Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (a bias has no fan-in of
  its own, so the layer's is passed in)."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def normalize_input(x: jax.Array, mean: Sequence[float] | None, std: Sequence[float] | None,
                    dtype: Any) -> jax.Array:
  """Maps x in [-1, 1] (B, H, W, C) to ((x + 1) / 2 - mean) / std in `dtype`; mean/std None -> x unchanged.

  mean/std of length 1 apply to every channel; otherwise their length must equal C (a 3-value ImageNet mean on a
  1-channel image would silently broadcast to 3 channels, so it is an error instead).
  """
  if x.ndim != 4:
    raise ValueError(f"classifier input must be NHWC (B, H, W, C), got shape {x.shape}")
  x = jnp.asarray(x)
  if mean is None and std is None:
    return x.astype(dtype)
  if mean is None or std is None:
    raise ValueError(f"mean and std must both be set or both be None, got mean={mean} std={std}")
  mean_a = jnp.asarray(mean, jnp.float32).reshape(-1)
  std_a = jnp.asarray(std, jnp.float32).reshape(-1)
  c = x.shape[-1]
  for name, a in (("mean", mean_a), ("std", std_a)):
    if a.shape[0] not in (1, c):
      raise ValueError(f"{name} has {a.shape[0]} values but the input has {c} channels (shape {x.shape})")
  x = ((x.astype(jnp.float32) + 1.0) * 0.5 - mean_a) / std_a
  return x.astype(dtype)


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # torch pads symmetrically (k // 2); Flax "SAME" with stride 2 pads (0, 1) on even sizes, which differs.
  p = k // 2
  return ((p, p), (p, p))


def _conv(features: int, kernel: int, strides: int, name: str, *, dtype: Any) -> nn.Conv:
  """torchvision's bias-free conv with symmetric padding (created inside the caller's compact scope)."""
  return nn.Conv(features, (kernel, kernel), (strides, strides), padding=_pad(kernel), use_bias=False,
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=conv_init, name=name)


def _batch_norm(name: str, zero: bool = False, *, train: bool, dtype: Any) -> nn.BatchNorm:
  """torchvision BatchNorm2d (momentum 0.1 == flax 0.9, eps 1e-5); `zero` = zero-init gamma."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32, name=name,
                      scale_init=nn.initializers.zeros if zero else nn.initializers.ones)


class BasicBlock(nn.Module):
  """torchvision BasicBlock (expansion 1): conv3x3(stride)-bn-relu-conv3x3-bn (+ downsample) - relu."""
  features: int
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(_batch_norm, train=train, dtype=self.dtype)
    out = nn.relu(norm("bn1")(conv(self.features, 3, self.strides, "conv1")(x)))
    out = norm("bn2", self.zero_init_residual)(conv(self.features, 3, 1, "conv2")(out))
    if self.strides != 1 or x.shape[-1] != self.features * self.expansion:
      x = norm("downsample_1")(conv(self.features * self.expansion, 1, self.strides, "downsample_0")(x))
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5, stride on the 3x3 conv, expansion 4)."""
  features: int
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(_batch_norm, train=train, dtype=self.dtype)
    out = nn.relu(norm("bn1")(conv(self.features, 1, 1, "conv1")(x)))
    out = nn.relu(norm("bn2")(conv(self.features, 3, self.strides, "conv2")(out)))
    out = norm("bn3", self.zero_init_residual)(conv(self.features * 4, 1, 1, "conv3")(out))
    if self.strides != 1 or x.shape[-1] != self.features * 4:
      x = norm("downsample_1")(conv(self.features * 4, 1, self.strides, "downsample_0")(x))
    return nn.relu(out + x)


class ResNet(nn.Module):
  """ResNet classifier.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) ResNet-18, (3, 4, 6, 3) ResNet-50.
    block: "basic" or "bottleneck".
    num_classes: K.
    width: channels of the first stage (64 for torchvision; stage i has width * 2**i).
    stem: "imagenet" (7x7/2 conv + 3x3/2 max pool, torchvision) or "cifar" (3x3/1 conv, no pool).
    zero_init_residual: zero-init the last BN gamma of each block (torchvision's flag; off by default).
    mean, std: input normalisation (see module docstring); None = x fed unchanged.
    dtype: compute dtype.
  Features: global-average-pooled last stage, (B, width * 8 * expansion) (2048 for ResNet-50, 512 ResNet-18).
  """
  stage_sizes: Sequence[int]
  block: str = "bottleneck"
  num_classes: int = 1000
  width: int = 64
  stem: str = "imagenet"
  zero_init_residual: bool = False
  mean: Sequence[float] | None = IMAGENET_MEAN
  std: Sequence[float] | None = IMAGENET_STD
  dtype: Any = jnp.float32

  def setup(self):
    # Only the head lives in setup (so `logits_from_features` can reach it); the body is compact.
    features = self.width * 2 ** (len(self.stage_sizes) - 1) * (4 if self.block == "bottleneck" else 1)
    self.fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=dense_init,
                       bias_init=torch_default_bias(features))  # torchvision's fc: nn.Linear's default init

  def logits_from_features(self, features: jax.Array) -> jax.Array:
    """features (B, D) -> float32 logits (B, K) (the fc layer only)."""
    return self.fc(features).astype(jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
    if self.stem not in ("imagenet", "cifar"):
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
    block_cls = BasicBlock if self.block == "basic" else Bottleneck
    k, s = (7, 2) if self.stem == "imagenet" else (3, 1)
    x = normalize_input(x, self.mean, self.std, self.dtype)
    x = nn.Conv(self.width, (k, k), (s, s), padding=_pad(k), use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=conv_init, name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                     param_dtype=jnp.float32, name="bn1")(x)
    x = nn.relu(x)
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # pads with -inf, as torch does
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = block_cls(self.width * 2**i, strides=2 if (i > 0 and j == 0) else 1,
                      zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                      name=f"layer{i + 1}_{j}")(x, train)
    h = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = self.logits_from_features(h)
    return (logits, h) if return_features else logits


def resnet18(num_classes: int = 1000, **kw) -> ResNet:
  return ResNet(stage_sizes=(2, 2, 2, 2), block="basic", num_classes=num_classes, **kw)


def resnet50(num_classes: int = 1000, **kw) -> ResNet:
  return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", num_classes=num_classes, **kw)
