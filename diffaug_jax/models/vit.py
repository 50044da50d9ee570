"""Vision Transformer in the DeiT-III style (timm `VisionTransformer`, `deit3_*` family) as a Flax Linen module.

Architecture (matches timm 1.0 `deit3_base_patch16_224`): patch embedding conv (patch x patch, stride patch,
with bias); learned `pos_embed` (1, N_patches, D) added to the patch tokens ONLY (no_embed_class), then the
class token is prepended; pre-norm blocks x + ls1 * attn(norm1(x)), x + ls2 * mlp(norm2(x)) with LayerScale,
qkv bias, LayerNorm eps 1e-6, exact (erf) GELU; final LayerNorm; the head reads the class token.

Interface: see `diffaug_jax.models.resnet` (x in [-1, 1] NHWC, internal mean/std normalisation, `train`,
`return_features`, `logits_from_features`). Features = final-normed class token (B, D). Drop-path (stochastic
depth, DeiT-III uses it) is active only with train=True and drop_path_rate > 0 and then needs a 'dropout' rng.
Module names follow timm's state-dict names (".<i>" -> "_<i>": `blocks_0`) so that
`diffaug_jax.convert.timm` maps them mechanically.

Initialisation (matters only from scratch; the DiffAug recipe starts from stage-1 weights) follows DeiT-III's
own `models_v2.vit_models`, which trained the paper's model, not timm's re-implementation: LayerScale 1e-4
(timm: 1e-6), cls_token and pos_embed trunc_normal_(std=0.02) (timm: cls_token normal 1e-6; the bounds +-2
are absolute, so effectively N(0, 0.02^2)), Linear layers the same with zero bias, and the patch-embedding conv left
at PyTorch's default (weight and bias uniform in +-1/sqrt(fan_in)).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffaug_jax.models.attention import QKV, dot_product_attention
from diffaug_jax.models.resnet import IMAGENET_MEAN, IMAGENET_STD, dense_init, normalize_input, torch_default_bias

# timm's / DeiT's trunc_normal_(std=.02): its bounds a=-2, b=2 are absolute values, i.e. 100 sigma, so this
# is N(0, 0.02^2) in practice (flax's bounds are in sigmas: the default +-2 sigma would shrink the std 12%).
_trunc02 = nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=_trunc02,
                  bias_init=nn.initializers.zeros, name=name)


def _layernorm(dtype: Any, name: str) -> nn.LayerNorm:
  # Flax LayerNorm computes its statistics in float32 for low-precision inputs.
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


class LayerScale(nn.Module):
  dim: int
  init_values: float = 1e-4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_values), (self.dim,), jnp.float32)
    return x * gamma.astype(self.dtype)


class Attention(nn.Module):
  """timm `Attention`: qkv (channels ordered (3, heads, head_dim)), softmax(q k^T / sqrt(hd)) v, proj.
  Logits and softmax in float32; cuDNN's fused kernel on an NVIDIA GPU in bf16 (`attention_impl`)."""
  dim: int
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    hd = d // self.num_heads
    q, k, v = QKV(self.num_heads, legacy_order=False, dtype=self.dtype, kernel_init=_trunc02,
                  name="qkv")(x)  # (B, N, H, hd) each
    out = dot_product_attention(q, k, v, hd ** -0.5, self.attention_impl).reshape(b, n, d)
    return _dense(d, self.dtype, "proj")(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = _dense(self.hidden, self.dtype, "fc1")(x)
    x = nn.gelu(x, approximate=False)
    return _dense(d, self.dtype, "fc2")(x)


def _drop_path(x, rate: float, deterministic: bool, rng_fn):
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng_fn(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  init_values: float = 1e-4
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    rng_fn = lambda: self.make_rng("dropout")
    y = Attention(self.dim, self.num_heads, self.dtype, self.attention_impl, name="attn")(
        _layernorm(self.dtype, "norm1")(x))
    x = x + _drop_path(LayerScale(self.dim, self.init_values, self.dtype, name="ls1")(y), self.drop_path,
                       not train, rng_fn)
    y = Mlp(int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(_layernorm(self.dtype, "norm2")(x))
    x = x + _drop_path(LayerScale(self.dim, self.init_values, self.dtype, name="ls2")(y), self.drop_path,
                       not train, rng_fn)
    return x


class PatchEmbed(nn.Module):
  """(B, H, W, C) -> (B, N, D) patch tokens (row-major patch order, as timm's flatten(2))."""
  dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    # PyTorch's default Conv2d init (models_v2 leaves the patch embedding at it): weight and bias U(+-1/sqrt(fan_in)).
    x = nn.Conv(self.dim, (p, p), (p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=dense_init, bias_init=torch_default_bias(p * p * x.shape[-1]), name="proj")(x)
    return x.reshape(x.shape[0], -1, self.dim)


class VisionTransformer(nn.Module):
  """DeiT-III ViT. `img_size` fixes the pos_embed length ((img_size / patch_size)**2); inputs must match it."""
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  init_values: float = 1e-4
  drop_path_rate: float = 0.0
  # "constant": every block drops at drop_path_rate (DeiT-III's models_v2, dpr_constant=True, what the paper
  # trained with); "linear": 0 -> drop_path_rate over the blocks (timm's schedule).
  drop_path_schedule: str = "constant"
  mean: Sequence[float] | None = IMAGENET_MEAN
  std: Sequence[float] | None = IMAGENET_STD
  dtype: Any = jnp.float32
  attention_impl: str = "auto"  # see models.attention: cuDNN on an NVIDIA GPU in bf16/fp16, else XLA

  def setup(self):
    self.head = _dense(self.num_classes, self.dtype, "head")

  def logits_from_features(self, features: jax.Array) -> jax.Array:
    """features (B, D) (final-normed class token) -> float32 logits (B, K)."""
    return self.head(features).astype(jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    b, h, w, _ = x.shape
    if h != self.img_size or w != self.img_size:
      raise ValueError(f"ViT built for {self.img_size}x{self.img_size} inputs, got shape {x.shape}")
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
    x = normalize_input(x, self.mean, self.std, self.dtype)
    p = self.patch_size
    x = PatchEmbed(self.embed_dim, p, self.dtype, name="patch_embed")(x)
    n = x.shape[1]
    pos = self.param("pos_embed", _trunc02, (1, n, self.embed_dim), jnp.float32)
    cls = self.param("cls_token", _trunc02, (1, 1, self.embed_dim), jnp.float32)
    x = x + pos.astype(self.dtype)  # no_embed_class: pos_embed on the patch tokens only
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.embed_dim)), x], axis=1)
    if self.drop_path_schedule not in ("constant", "linear"):
      raise ValueError(f"drop_path_schedule must be 'constant' or 'linear', got {self.drop_path_schedule!r}")
    for i in range(self.depth):
      dpr = self.drop_path_rate
      if self.drop_path_schedule == "linear":
        dpr = self.drop_path_rate * i / max(self.depth - 1, 1)
      x = Block(self.embed_dim, self.num_heads, self.mlp_ratio, self.init_values, dpr, self.dtype,
                self.attention_impl, name=f"blocks_{i}")(x, train)
    x = _layernorm(self.dtype, "norm")(x)
    feats = x[:, 0].astype(jnp.float32)
    logits = self.logits_from_features(feats)
    return (logits, feats) if return_features else logits


def vit_b16(num_classes: int = 1000, **kw) -> VisionTransformer:
  """DeiT-III ViT-B/16 (timm `deit3_base_patch16_224`)."""
  kw = {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **kw}
  return VisionTransformer(num_classes=num_classes, **kw)
