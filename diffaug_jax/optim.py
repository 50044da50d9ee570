"""Optax optimizers and learning-rate schedules from a config.

Config fields (`config.optim`):
  name: "sgd" | "adamw" | "lamb" | "adam".
  learning_rate: base LR for a global batch of `lr_batch_base` (linearly scaled to the real batch size;
    `lr_batch_base=None` means no scaling).
  momentum, nesterov: SGD (PyTorch semantics: v = m v + g + wd p; p -= lr v).
  weight_decay: SGD adds `wd * p` to the gradient before momentum (torch.optim.SGD, as the official recipe);
    AdamW/LAMB use decoupled decay. `wd_mask`: "all" (torch default) or "no_bias_norm" (skip 1-D params
    and the ViT's pos_embed / cls_token / dist_token: timm's `param_groups_weight_decay` with the model's
    `no_weight_decay()`, as DeiT-III trains).
  b1, b2, eps: Adam-family betas.
  schedule: "step" (x `decay_factor` every `decay_epochs`), "cosine", "constant".
  warmup_epochs, warmup_lr: linear warm-up from warmup_lr (default 0) to the LR over the warm-up steps, then
    the schedule. min_lr_ratio: the cosine schedule's floor as a fraction of the LR (timm's min-lr / lr).
  grad_clip: global-norm clipping (None = off).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def scaled_learning_rate(cfg: Any, global_batch_size: int) -> float:
  """Base LR scaled linearly with the global batch (e.g. 0.1 at 256 -> 0.4 at 1024)."""
  base = float(cfg.learning_rate)
  ref = cfg.get("lr_batch_base", None)
  return base * global_batch_size / float(ref) if ref else base


def make_schedule(cfg: Any, *, global_batch_size: int, steps_per_epoch: int,
                  total_steps: int) -> optax.Schedule:
  """LR schedule as a function of the optimizer step."""
  lr = scaled_learning_rate(cfg, global_batch_size)
  warmup = int(round(float(cfg.get("warmup_epochs", 0.0)) * steps_per_epoch))
  warmup_lr = float(cfg.get("warmup_lr", 0.0) or 0.0)
  kind = cfg.get("schedule", "constant")
  if kind == "step":
    every = max(1, int(round(float(cfg.decay_epochs) * steps_per_epoch)))
    factor = float(cfg.get("decay_factor", 0.1))
    # Closed form (torch StepLR's): O(1) in the compiled step, where a piecewise-constant schedule unrolls one
    # comparison per boundary (12,500 of them for 1-epoch decays over 100k steps: minutes of compile).
    main = lambda step: lr * jnp.power(jnp.float32(factor), jnp.floor_divide(step, every).astype(jnp.float32))
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup), alpha=float(cfg.get("min_lr_ratio", 0.0)))
  elif kind == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config.optim.schedule={kind!r}: expected 'step', 'cosine' or 'constant'")
  if warmup <= 0:
    return main
  if kind == "step":
    # Step boundaries are in absolute steps: keep them, only ramp the first `warmup` steps.
    return lambda step: jnp.where(step < warmup, warmup_lr + (lr - warmup_lr) * step / warmup, main(step))
  return optax.join_schedules([optax.linear_schedule(warmup_lr, lr, warmup), main], [warmup])


NO_WEIGHT_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")  # timm VisionTransformer.no_weight_decay()


def _decay_mask(cfg: Any) -> Callable | None:
  mode = cfg.get("wd_mask", "all")
  if mode == "all":
    return None
  if mode == "no_bias_norm":
    def decays(path, p):
      name = str(getattr(path[-1], "key", path[-1])) if path else ""
      return p.ndim > 1 and name not in NO_WEIGHT_DECAY_NAMES
    return lambda params: jax.tree_util.tree_map_with_path(decays, params)
  raise ValueError(f"config.optim.wd_mask={mode!r}: expected 'all' or 'no_bias_norm'")


def make_optimizer(cfg: Any, *, global_batch_size: int, steps_per_epoch: int,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule). The LR metric is `schedule(state.step)`."""
  schedule = make_schedule(cfg, global_batch_size=global_batch_size, steps_per_epoch=steps_per_epoch,
                           total_steps=total_steps)
  name = cfg.get("name", "sgd")
  wd = float(cfg.get("weight_decay", 0.0))
  mask = _decay_mask(cfg)
  parts = []
  if cfg.get("grad_clip", None):
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
  if name == "sgd":
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask=mask))
    momentum = float(cfg.get("momentum", 0.9)) or None
    parts.append(optax.sgd(schedule, momentum=momentum, nesterov=bool(cfg.get("nesterov", False))))
  elif name in ("adamw", "adam"):
    if name == "adam" and wd:  # torch.optim.Adam's weight_decay: L2 added to the gradient, before the moments
      parts.append(optax.add_decayed_weights(wd, mask=mask))
    parts.append(optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                             eps=float(cfg.get("eps", 1e-8)), weight_decay=wd if name == "adamw" else 0.0,
                             mask=mask))
  elif name == "lamb":
    parts.append(optax.lamb(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                            eps=float(cfg.get("eps", 1e-6)), weight_decay=wd, mask=mask))
  else:
    raise ValueError(f"config.optim.name={name!r}: expected 'sgd', 'adamw', 'adam' or 'lamb'")
  return optax.chain(*parts), schedule
