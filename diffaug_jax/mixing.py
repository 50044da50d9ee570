"""Mixup and CutMix of a device batch, as DeiT / DeiT-III train (timm `Mixup`, mode "batch").

timm (`timm/data/mixup.py`, the `Mixup` DeiT builds with `--mixup 0.8 --cutmix 1.0 --smoothing 0.1`) draws,
once per batch: with probability `prob` mix at all; when both alphas are > 0, CutMix with probability
`switch_prob`, else Mixup; lam ~ Beta(alpha, alpha) of the chosen method. Example i is mixed with example
B - 1 - i (the batch flipped):
- Mixup: x_i <- lam x_i + (1 - lam) x_{B-1-i}.
- CutMix: a box of side int(H sqrt(1 - lam)) x int(W sqrt(1 - lam)) centred at a uniform pixel (cy, cx),
  clipped to the image (corners cy -/+ cut_h // 2), is pasted from x_{B-1-i}; lam is then corrected to the
  area actually kept, 1 - box area / (H W) (`correct_lam=True`).
The target is lam * onehot_ls(y_i) + (1 - lam) * onehot_ls(y_{B-1-i}); since cross-entropy is linear in its
target, `losses.mixed_cross_entropy` computes that loss from the two integer labels and lam.

"Batch" here is a GROUP of `group_size` consecutive examples of the global batch, each with its own draw:
DeiT mixes each GPU's batch on its own (64 examples per GPU in its fine-tuning command), so `group_size=64`
reproduces the per-batch statistics of that run on any number of devices, and the result does not depend on
how the global batch is sharded (group_size 0 = the whole batch is one group). When group_size divides the
per-device batch, the flip stays on the device.

Pure jax.numpy over arrays and keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MixConfig:
  """mixup_alpha, cutmix_alpha: Beta parameters (0 disables that method); prob: chance to mix a group at
  all; switch_prob: chance of CutMix when both are enabled; group_size: examples per independent draw (0 =
  the whole batch). DeiT-III fine-tuning: 0.8, 1.0, 1.0, 0.5, 64."""
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0
  switch_prob: float = 0.5
  group_size: int = 0

  def __post_init__(self):
    if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
      raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
    if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
      raise ValueError("MixConfig with mixup_alpha = cutmix_alpha = 0 mixes nothing; use no MixConfig")
    if not (0.0 <= self.prob <= 1.0 and 0.0 <= self.switch_prob <= 1.0):
      raise ValueError(f"prob and switch_prob must be in [0, 1], got {self.prob}, {self.switch_prob}")
    if not isinstance(self.group_size, int) or self.group_size < 0 or self.group_size % 2:
      raise ValueError(f"group_size must be 0 (whole batch) or an even int >= 2 (examples mix in pairs), got "
                       f"{self.group_size!r}")


def _group_params(key: Array, height: int, width: int, cfg: MixConfig) -> tuple[Array, Array, Array]:
  """One group's draw -> (lam float32 (), use_cutmix bool (), box (yl, yh, xl, xh) int32 (4,)).

  lam is already the CutMix-corrected area fraction; lam = 1 when the group is not mixed."""
  k_apply, k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(key, 6)
  apply = jax.random.uniform(k_apply) < cfg.prob
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
  else:
    use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
  lam_mixup = jax.random.beta(k_mix, cfg.mixup_alpha, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else jnp.float32(1.0)
  lam_cutmix = jax.random.beta(k_cut, cfg.cutmix_alpha, cfg.cutmix_alpha) if cfg.cutmix_alpha > 0 else jnp.float32(1.0)
  # timm's rand_bbox: cut sides truncated to int, a uniform centre, corners clipped to the image.
  ratio = jnp.sqrt(1.0 - lam_cutmix)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_cy, (), 0, height)
  cx = jax.random.randint(k_cx, (), 0, width)
  yl, yh = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  xl, xh = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  lam_box = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (height * width)
  use_cutmix = apply & use_cutmix
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mixup), 1.0).astype(jnp.float32)
  return lam, use_cutmix, jnp.stack([yl, yh, xl, xh]).astype(jnp.int32)


def mix_batch(key: Array, x: Array, cfg: MixConfig) -> tuple[Array, Array, Array]:
  """Mixup / CutMix of a batch (see the module docstring).

  Args:
    key: PRNG key. x: (B, H, W, C) float images (any affine range: mixing commutes with normalisation).
    cfg: MixConfig; B must be a multiple of cfg.group_size (even), or even when group_size is 0.
  Returns:
    (x_mixed (B, H, W, C) x.dtype, lam float32 (B,) weight of each example's own label, partner int32 (B,)
    the index of the example it was mixed with).
  """
  b, h, w = x.shape[:3]
  g = cfg.group_size or b
  if b % g or g % 2:  # odd: the middle example would be "mixed" with itself (timm asserts an even batch)
    raise ValueError(f"batch size {b} must be a multiple of the mixing group size {g}, which must be even")
  n = b // g
  lam, use_cutmix, box = jax.vmap(lambda k: _group_params(k, h, w, cfg))(jax.random.split(key, n))
  xg = x.reshape((n, g) + x.shape[1:])
  x_partner = xg[:, ::-1]
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  in_box = ((rows >= box[:, 0, None, None]) & (rows < box[:, 1, None, None])
            & (cols >= box[:, 2, None, None]) & (cols < box[:, 3, None, None]))  # (n, H, W)
  pasted = jnp.where(in_box[:, None, :, :, None], x_partner, xg)
  lam_x = lam.astype(x.dtype)[:, None, None, None, None]
  blended = lam_x * xg + (1 - lam_x) * x_partner
  mixed = jnp.where(use_cutmix[:, None, None, None, None], pasted, blended)
  # Partner of position i in its group is g - 1 - i: the group flipped.
  partner = (jnp.arange(n)[:, None] * g + (g - 1 - jnp.arange(g))[None, :]).reshape(b).astype(jnp.int32)
  return mixed.reshape(x.shape), jnp.repeat(lam, g), partner
