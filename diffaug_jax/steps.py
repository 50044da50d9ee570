"""Pure, module-level train / eval steps. No jit inside: the trainer binds the static parts with
`functools.partial` and jits once with shardings and donation.

The DiffAug step (paper Sec. 3, official `train.py`): from a uint8 batch it builds the clean view and the
DiffAug view (t ~ U{t_low..t_high-1}, fresh noise, ONE score-model call, clipped x0_hat, no gradient through
the score model), concatenates them (and the two AugMix views when the batch carries them) and runs ONE
classifier forward in train mode, so BatchNorm statistics are computed over the concatenation exactly as the
official code does. loss = CE(clean) + w * CE(diffaug) [+ jsd_weight * JSD(clean, aug1, aug2)]. With
`StepConfig.mix` (DeiT-III fine-tuning) the clean view is Mixup/CutMix-ed on the device first and its CE is
taken against the mixed targets.

Sharding: the steps are written on the global batch. Under `jax.jit` with the batch sharded on the mesh
axis `data`, XLA inserts the cross-device reductions (BatchNorm statistics and the loss are global means),
and with the partitionable threefry PRNG the random draws do not depend on the device count.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from diffaug_jax import augment, diffusion, losses, mixing
from diffaug_jax.state import TrainState

PyTree = Any
Metrics = dict[str, jax.Array]
# score_eps_fn(score_params) -> eps_fn(x_t, t) (see diffaug_jax.models.score.make_eps_fn).
ScoreEpsFactory = Callable[[PyTree], Callable[[jax.Array, jax.Array], jax.Array]]


def _global_norm(tree) -> jax.Array:
  """sqrt of the sum of squares of every leaf (float32). Spelled out: `optax.global_norm` is deprecated
  and its successor `optax.tree.norm` is newer than the optax versions we support."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _absmax(tree) -> jax.Array:
  """max |x| over every leaf: finite iff every weight is (NaN propagates; no square to overflow)."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(tree)]))


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the classifier step (bound with functools.partial; never traced).

  schedule: the diffusion schedule used by DiffAug (linear, T=1000 for the ADM models).
  diffaug: False = the baseline run (same step, no DiffAug view, no score-model call).
  diffaug_weight: w in CE(clean) + w * CE(diffaug) (official: 1).
  t_low, t_high: DiffAug t range, t ~ U{t_low, ..., t_high - 1} (official: 0..999).
  jsd_weight: AugMix consistency weight (AugMix code: 12), used when the batch has "augmix1"/"augmix2".
  label_smoothing: for both CE terms.
  lr_schedule: optax schedule, only to report the learning rate of this step.
  mix: Mixup/CutMix of the clean view (`mixing.MixConfig`, DeiT-III fine-tuning), None = off. Its loss is
    CE against the mixed targets; not combined with AugMix (the JSD term compares views of one image).
  diffaug_source: what the DiffAug view denoises: "image_da" (the batch's DiffAug view, Resize + CenterCrop
    in the ImageNet recipe; the clean view when the batch has none) or "clean" (the clean view as the
    classifier sees it, after Mixup/CutMix, with the same mixed targets).
  """
  schedule: diffusion.Schedule | None = None
  diffaug: bool = True
  diffaug_weight: float = 1.0
  t_low: int = 0
  t_high: int = 1000
  jsd_weight: float = 12.0
  label_smoothing: float = 0.0
  lr_schedule: Callable[[jax.Array], jax.Array] | None = None
  mix: mixing.MixConfig | None = None
  diffaug_source: str = "image_da"

  def __post_init__(self):
    if self.diffaug_source not in ("image_da", "clean"):
      raise ValueError(f"diffaug_source must be 'image_da' or 'clean', got {self.diffaug_source!r}")
    if self.diffaug and self.schedule is not None and \
        not 0 <= self.t_low < self.t_high <= self.schedule.num_timesteps:
      raise ValueError(f"DiffAug t range [t_low, t_high) = [{self.t_low}, {self.t_high}) must lie in "
                       f"[0, {self.schedule.num_timesteps}] (the score model's schedule) and be non-empty")


@dataclasses.dataclass(frozen=True)
class ScoreStepConfig:
  """Static settings of the DDPM step: schedule, learn_sigma (6-channel output), loss_type
  ("simple" | "hybrid": "hybrid" exactly when learn_sigma), rescale_vb (L_vb x T/1000: improved-diffusion's
  RESCALED_MSE, its default rescale_learned_sigmas=True; guided-diffusion's default is False, the same at
  T = 1000), ema_decay, class_cond (pass labels as `y`), lr_schedule (metric only)."""
  schedule: diffusion.Schedule
  learn_sigma: bool = False
  loss_type: str = "simple"
  rescale_vb: bool = True
  ema_decay: float = 0.9999
  class_cond: bool = False
  lr_schedule: Callable[[jax.Array], jax.Array] | None = None


def to_model_range(image: jax.Array) -> jax.Array:
  """uint8 [0, 255] NHWC -> float32 [-1, 1] (on device; the contract's conversion)."""
  return image.astype(jnp.float32) / 127.5 - 1.0


def _variables(params: PyTree, batch_stats: PyTree) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _lr(schedule, step) -> jax.Array:
  return jnp.asarray(schedule(step) if schedule is not None else jnp.nan, jnp.float32)


def make_diffaug_view(key: jax.Array, x0: jax.Array, score_params: PyTree, score_eps_fn: ScoreEpsFactory,
                      cfg: StepConfig) -> tuple[jax.Array, jax.Array]:
  """DiffAug view of x0 (B,H,W,C in [-1,1]) -> (x0_hat float32 (B,H,W,C), t int32 (B,)), no gradient."""
  if cfg.schedule is None:
    raise ValueError("StepConfig.schedule is None but DiffAug is enabled")
  score_params = jax.lax.stop_gradient(score_params)
  eps_fn = score_eps_fn(score_params)
  x0_hat, t = augment.diffaug(key, x0, lambda x_t, tt: eps_fn(x_t, tt).astype(jnp.float32), cfg.schedule,
                              t_low=cfg.t_low, t_high=cfg.t_high, clip=True)
  return jax.lax.stop_gradient(x0_hat.astype(jnp.float32)), t


def train_step(state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array, score_params: PyTree, *,
               apply_fn: Callable, score_eps_fn: ScoreEpsFactory | None, tx: optax.GradientTransformation,
               cfg: StepConfig) -> tuple[TrainState, Metrics]:
  """One classifier update.

  Args:
    state: TrainState (float32 params, batch_stats, opt_state).
    batch: {"image": uint8 (B,H,W,C), "image_da": uint8 (B,H,W,C), "label": int32 (B,)} and optionally
      "image_aug1", "image_aug2" (data pipeline names; "augmix1"/"augmix2" also accepted) uint8 (B,H,W,C). "image_da"
      falls back to "image" when absent.
    key: this step's key, `fold_in(train_key, step)`.
    score_params: frozen score-model params (explicit argument; ignored when cfg.diffaug is False).
    apply_fn: classifier `module.apply` (compute dtype set on the module).
    score_eps_fn: `score_params -> eps_fn(x_t, t)` (compute dtype set there, e.g. bf16).
  Returns:
    (new_state, metrics) with scalar float32 metrics: loss, loss_clean, loss_diffaug, loss_jsd, accuracy
    (clean view, against the example's own label), accuracy_diffaug, grad_norm, learning_rate.
  """
  labels = batch["label"].astype(jnp.int32)
  da_key, dropout_key = jax.random.split(key)
  aug_keys = next((k for k in (("image_aug1", "image_aug2"), ("augmix1", "augmix2"))
                   if k[0] in batch and k[1] in batch), None)
  has_augmix = aug_keys is not None
  x_clean = to_model_range(batch["image"])
  if cfg.mix is not None:
    if has_augmix:
      raise ValueError("Mixup/CutMix and AugMix together: the JSD term needs views of one unmixed image")
    # fold_in rather than a third split, so the streams of runs without mixing are unchanged.
    x_clean, lam, partner = mixing.mix_batch(jax.random.fold_in(key, 2), x_clean, cfg.mix)
    partner_labels = labels[partner]

  def ce(logits, mixed):
    if mixed and cfg.mix is not None:
      return losses.mixed_cross_entropy(logits, labels, partner_labels, lam, label_smoothing=cfg.label_smoothing)
    return losses.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)

  views = [x_clean]
  if has_augmix:
    views += [to_model_range(batch[aug_keys[0]]), to_model_range(batch[aug_keys[1]])]
  if cfg.diffaug:
    da_from_clean = cfg.diffaug_source == "clean"
    x0_da = x_clean if da_from_clean else to_model_range(batch.get("image_da", batch["image"]))
    x_da, _ = make_diffaug_view(da_key, x0_da, score_params, score_eps_fn, cfg)
    views.append(x_da)
  x = jnp.concatenate(views, axis=0) if len(views) > 1 else views[0]

  def loss_fn(params):
    logits, new_vars = apply_fn(_variables(params, state.batch_stats), x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": dropout_key})
    logits = logits.astype(jnp.float32)
    chunks = jnp.split(logits, len(views), axis=0)
    logits_clean = chunks[0]
    loss_clean = ce(logits_clean, mixed=True)
    loss = loss_clean
    aux = {"loss_clean": loss_clean, "accuracy": jnp.mean(jnp.argmax(logits_clean, -1) == labels)}
    if cfg.diffaug:
      logits_da = chunks[-1]
      loss_da = ce(logits_da, mixed=da_from_clean)
      loss = loss + cfg.diffaug_weight * loss_da
      aux["loss_diffaug"] = loss_da
      aux["accuracy_diffaug"] = jnp.mean(jnp.argmax(logits_da, -1) == labels)
    else:
      aux["loss_diffaug"] = jnp.zeros((), jnp.float32)
      aux["accuracy_diffaug"] = jnp.zeros((), jnp.float32)
    if has_augmix:
      jsd = losses.jsd_consistency(logits_clean, chunks[1], chunks[2])
      loss = loss + cfg.jsd_weight * jsd
      aux["loss_jsd"] = jsd
    return loss, (aux, new_vars.get("batch_stats", {}))

  (loss, (aux, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=new_batch_stats,
                            opt_state=new_opt_state)
  # param_absmax of the UPDATED weights: the loss would show a blow-up only one step later, after a checkpoint.
  metrics = {"loss": loss, **aux, "grad_norm": _global_norm(grads), "param_absmax": _absmax(new_params),
             "learning_rate": _lr(cfg.lr_schedule, state.step)}
  return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def score_train_step(state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array, *,
                     apply_fn: Callable, tx: optax.GradientTransformation,
                     cfg: ScoreStepConfig) -> tuple[TrainState, Metrics]:
  """One DDPM update of a score model (guided-diffusion objective via `losses.ddpm_loss`) + EMA.

  batch: {"image": uint8 (B,H,W,C), "label": int32 (B,)}; the model is `apply_fn(vars, x_t, t, y=..., train=True)`.
  Returns (new_state, metrics: loss, grad_norm, learning_rate, + ddpm_loss aux scalars).
  """
  x0 = to_model_range(batch["image"])
  loss_key, dropout_key = jax.random.split(key)
  y = batch["label"].astype(jnp.int32) if cfg.class_cond else None

  def loss_fn(params):
    def model_fn(x_t, t):
      out = apply_fn({"params": params}, x_t, t, y=y, train=True, rngs={"dropout": dropout_key})
      return out.astype(jnp.float32)
    return losses.ddpm_loss(loss_key, x0, model_fn, cfg.schedule, learn_sigma=cfg.learn_sigma,
                            loss_type=cfg.loss_type, rescale_vb=cfg.rescale_vb)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    d = cfg.ema_decay
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, new_params)
  new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state, ema_params=ema)
  metrics = {"loss": loss, "grad_norm": _global_norm(grads), "param_absmax": _absmax(new_params),
             "learning_rate": _lr(cfg.lr_schedule, state.step)}
  for k, v in (aux or {}).items():
    if jnp.ndim(v) == 0:
      metrics[k] = v
  return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, apply_fn: Callable) -> Metrics:
  """Classifier eval on a padded batch: returns SUMS (correct, loss, count) so the host adds them exactly.

  batch: {"image": uint8 (B,H,W,C), "label": int32 (B,), optional "mask": float (B,) with 0 on padding}.
  """
  labels = batch["label"].astype(jnp.int32)
  mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
  logits = apply_fn(state.variables(), to_model_range(batch["image"]), train=False).astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(nll * mask), "count": jnp.sum(mask)}


def score_eval_step(state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array, *, apply_fn: Callable,
                    cfg: ScoreStepConfig) -> Metrics:
  """DDPM loss of the EMA params on a padded batch at a fixed key: SUMS over the real rows (optional "mask",
  0 on padding), like `eval_step`, so every process runs the same number of eval steps."""
  x0 = to_model_range(batch["image"])
  y = batch["label"].astype(jnp.int32) if cfg.class_cond else None
  params = state.ema_params if state.ema_params is not None else state.params

  def model_fn(x_t, t):
    return apply_fn({"params": params}, x_t, t, y=y, train=False).astype(jnp.float32)

  _, aux = losses.ddpm_loss(key, x0, model_fn, cfg.schedule, learn_sigma=cfg.learn_sigma,
                            loss_type=cfg.loss_type, rescale_vb=cfg.rescale_vb)
  mask = batch.get("mask", jnp.ones(x0.shape[:1], jnp.float32)).astype(jnp.float32)
  return {"loss": jnp.sum(aux["per_example"] * mask), "count": jnp.sum(mask)}
