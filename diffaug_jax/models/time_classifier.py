"""Time-conditioned classifiers for classifier guidance: the "noisy classifier" and the DA-classifier.

A small guided-diffusion-style encoder (the `EncoderUNetModel` idea, sized for digits / CIFAR): a
sinusoidal timestep embedding ([cos, sin], `models.unet.timestep_embedding`) -> 2-layer MLP; a 3x3 stem;
per level `num_res_blocks` residual blocks (GroupNorm -> SiLU -> conv, + Dense(emb) shift, GroupNorm ->
SiLU -> zero-initialised conv, 1x1 skip when widths differ) and a 2x2 average-pool between levels; then
GroupNorm -> SiLU -> global average pool = features (B, D), and a Dense head.

Two modes (paper Sec. "denoising-augmented classifier"):
* noisy classifier (`denoising_augmented=False`): input x_t only.
* DA-classifier (`denoising_augmented=True`): input x_t AND its one-step denoised x0_hat(x_t, t), concatenated
  on the channel axis ([x_t, x0_hat], 2C input channels) and processed by ONE network pass. We chose channel
  concatenation (rather than two passes with shared weights) because it costs one pass and lets the first
  convolution compare the noisy and denoised views pixel by pixel; the official code was not released for this
  experiment, so this is our documented choice.

Interface (like the other classifiers, plus the timestep):
  `apply(vars, x_t, t, x0_hat=None, *, train=False, return_features=False)` -> logits (B, K) [or
  (logits, features (B, D))]; `apply(vars, h, method="logits_from_features")`. x_t, x0_hat: (B, H, W, C) in
  the diffusion's [-1, 1] scale; t: (B,) int original timestep indices 0..999. No BatchNorm: the classifier
  sees inputs at every noise level, so batch statistics would mix levels (guided-diffusion uses GroupNorm).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffaug_jax.models.unet import timestep_embedding


def _groups(channels: int, num_groups: int) -> int:
  g = min(num_groups, channels)
  while channels % g:
    g -= 1
  return g


class TimeResBlock(nn.Module):
  """Residual block with an additive timestep-embedding shift. x (B, H, W, C), emb (B, E)."""
  out_channels: int
  num_groups: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    c = x.shape[-1]
    h = nn.GroupNorm(num_groups=_groups(c, self.num_groups), epsilon=1e-5, dtype=jnp.float32,
                     name="norm1")(x.astype(jnp.float32))
    h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(nn.silu(h))
    h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="emb")(nn.silu(emb))[:, None, None, :]
    h = nn.GroupNorm(num_groups=_groups(self.out_channels, self.num_groups), epsilon=1e-5, dtype=jnp.float32,
                     name="norm2")(h.astype(jnp.float32))
    h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                name="conv2")(nn.silu(h))
    skip = x if c == self.out_channels else nn.Conv(self.out_channels, (1, 1), dtype=self.dtype,
                                                     name="skip")(x)
    return skip + h


class TimeClassifier(nn.Module):
  """Noisy / denoising-augmented time-conditioned classifier (see module docstring)."""
  num_classes: int = 10
  denoising_augmented: bool = False
  width: int = 32
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  num_groups: int = 8
  dtype: Any = jnp.float32

  def setup(self):
    self.head = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")

  def logits_from_features(self, features: jax.Array) -> jax.Array:
    return self.head(features.astype(jnp.float32))

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, x0_hat: jax.Array | None = None, *, train: bool = False,
               return_features: bool = False):
    del train  # no dropout / BatchNorm
    if x_t.ndim != 4:
      raise ValueError(f"TimeClassifier expects NHWC x_t, got shape {x_t.shape}")
    if self.denoising_augmented:
      if x0_hat is None or x0_hat.shape != x_t.shape:
        raise ValueError(f"DA-classifier needs x0_hat of x_t's shape {x_t.shape}, got "
                         f"{None if x0_hat is None else x0_hat.shape}")
      x = jnp.concatenate([x_t, x0_hat], axis=-1)
    else:
      if x0_hat is not None:
        raise ValueError("noisy classifier (denoising_augmented=False) takes no x0_hat")
      x = x_t
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), x.shape[:1])
    emb_dim = 4 * self.width
    emb = timestep_embedding(t, self.width)
    emb = nn.Dense(emb_dim, name="time_dense0")(emb)
    emb = nn.Dense(emb_dim, name="time_dense1")(nn.silu(emb))
    h = nn.Conv(self.width, (3, 3), padding=1, dtype=self.dtype, name="stem")(x.astype(self.dtype))
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = TimeResBlock(self.width * mult, self.num_groups, self.dtype, name=f"block{level}_{i}")(h, emb)
      if level < len(self.channel_mult) - 1:
        h = nn.avg_pool(h, (2, 2), (2, 2))
    h = nn.GroupNorm(num_groups=_groups(h.shape[-1], self.num_groups), epsilon=1e-5, dtype=jnp.float32,
                     name="norm_out")(h.astype(jnp.float32))
    features = jnp.mean(nn.silu(h), axis=(1, 2))
    logits = self.logits_from_features(features)
    return (logits, features) if return_features else logits


def time_classifier(num_classes: int = 10, *, denoising_augmented: bool = False, **kw) -> TimeClassifier:
  """Factory; digits default width 32, channel_mult (1, 2, 2) (~0.19M parameters on 16 x 16 x 1 input)."""
  return TimeClassifier(num_classes=num_classes, denoising_augmented=denoising_augmented, **kw)
