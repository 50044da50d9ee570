"""Noisy vs denoising-augmented (DA) time-conditioned classifiers, and classifier-guided sampling with them.

* Training (both): x0 from the training set, t ~ U{0, ..., T-1} per example, x_t = q_sample(x0, t, eps);
  cross-entropy of `TimeClassifier(x_t, t)` (noisy) or `TimeClassifier(x_t, t, x0_hat)` (DA), where
  x0_hat = clip(predict_x0(x_t, eps_fn(x_t, t))) is the one-step denoised image (no gradient to the score
  model during training). `models/time_classifier.py` documents the architecture and the channel-concat
  choice for the two DA inputs.
* Evaluation (paper Table 4): test images diffused to a uniformly drawn t (fixed key), top-1 accuracy of
  both classifiers, overall and per t-bin.
* Guidance (guided-diffusion's cond_fn): grad_x log softmax(classifier(x_t, t[, x0_hat(x_t)]))_y * scale,
  passed to `diffaug_jax.sampling` (DDPM: mean += variance * grad; DDIM: eps -= sqrt(1 - abar) grad). For
  the DA-classifier the gradient flows through x0_hat(x_t) (and so through the score model) by default
  (`grad_through_denoiser=True`, the exact gradient of the composite log p(y | x_t)); False treats x0_hat
  as a constant (cheaper).

Score model: any `eps_fn(score_params, x_t, t)`; `run` uses a trained UNet (config.score.workdir /
params_path) or, by default for the embedded digits, `gaussian_denoiser`: the exact MMSE denoiser of a
Gaussian fitted to the training images (closed form, no training, a real if weak "score model").

Jitting: the task module jits its train/eval/sample programs with params as ARGUMENTS (not constants),
batches split over the `data` mesh axis, parameters replicated.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffaug_jax import diffusion, sampling, sharding
from diffaug_jax.evaluation import loading
from diffaug_jax.models.time_classifier import TimeClassifier, time_classifier

Array = jax.Array
EpsFn = Callable[[Any, Array, Array], Array]  # (score_params, x_t, t_original) -> eps


# ----------------------------------------------------------------------------------------------------
# A closed-form denoiser for small data (digits): MMSE denoiser of a Gaussian fit.
# ----------------------------------------------------------------------------------------------------


def gaussian_denoiser(train_images: np.ndarray, schedule: diffusion.Schedule, *, ridge: float = 1e-4
                      ) -> tuple[EpsFn, dict]:
  """eps_fn for data ~ N(mu, Sigma) fitted to train_images (N, H, W, C) in [-1, 1].

  With x_t = a x0 + s eps (a = sqrt(abar_t), s = sqrt(1 - abar_t)):
  E[x0 | x_t] = mu + U diag(a lam / (a^2 lam + s^2)) U^T (x_t - a mu), Sigma = U diag(lam) U^T, and
  eps_hat = (x_t - a E[x0 | x_t]) / s. `schedule` must be the BASE schedule (t = original indices).
  """
  x = np.asarray(train_images, np.float64).reshape(len(train_images), -1)
  mu = x.mean(0)
  cov = np.cov(x, rowvar=False) + ridge * np.eye(x.shape[1])
  lam, u = np.linalg.eigh(cov)
  params = {"mean": jnp.asarray(mu, jnp.float32), "u": jnp.asarray(u, jnp.float32),
            "lam": jnp.asarray(np.maximum(lam, 0.0), jnp.float32)}
  sab = schedule.sqrt_alphas_cumprod
  s1m = schedule.sqrt_one_minus_alphas_cumprod

  def eps_fn(p, x_t, t):
    shape = x_t.shape
    xt = x_t.reshape(shape[0], -1).astype(jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), shape[:1])
    a, s = sab[t][:, None], s1m[t][:, None]
    coef = a * p["lam"][None] / (a**2 * p["lam"][None] + s**2)  # (B, D) in the eigenbasis
    z = (xt - a * p["mean"][None]) @ p["u"]
    x0 = p["mean"][None] + (coef * z) @ p["u"].T
    return ((xt - a * x0) / s).reshape(shape)

  return eps_fn, params


# ----------------------------------------------------------------------------------------------------
# Pure pieces: inputs, loss, train step, accuracy, cond_fn.
# ----------------------------------------------------------------------------------------------------


def classifier_inputs(key: Array, x0: Array, t: Array, eps_fn: EpsFn | None, score_params: Any,
                      schedule: diffusion.Schedule, *, denoising_augmented: bool
                      ) -> tuple[Array, Array | None]:
  """(x_t, x0_hat or None) for x0 (B, H, W, C) in [-1, 1] and t (B,) indices into the (base) schedule."""
  noise = jax.random.normal(key, x0.shape, jnp.float32)
  x_t = diffusion.q_sample(schedule, x0.astype(jnp.float32), t, noise)
  if not denoising_augmented:
    return x_t, None
  if eps_fn is None:
    raise ValueError("the DA-classifier needs an eps_fn (score model)")
  return x_t, denoise(x_t, t, eps_fn, score_params, schedule)


def denoise(x_t: Array, t: Array, eps_fn: EpsFn, score_params: Any, schedule: diffusion.Schedule) -> Array:
  """One-step clipped x0_hat(x_t, t); t are original indices (base schedule)."""
  eps = eps_fn(score_params, x_t, t).astype(jnp.float32)
  return diffusion.predict_x0(schedule, x_t, t, eps, clip=True)


def apply_classifier(module: TimeClassifier, variables: Any, x_t: Array, t: Array, x0_hat: Array | None):
  return module.apply(variables, x_t, t, x0_hat) if module.denoising_augmented \
      else module.apply(variables, x_t, t)


def train_step(params, opt_state, score_params, batch, key, *, module: TimeClassifier,
               tx: optax.GradientTransformation, eps_fn: EpsFn | None, schedule: diffusion.Schedule):
  """One SGD step on a batch {"image" (B, H, W, C) [-1, 1], "label" (B,)}; t ~ U{0..T-1} per example."""
  t_key, n_key = jax.random.split(key)
  x0, y = batch["image"], batch["label"]
  t = jax.random.randint(t_key, y.shape, 0, schedule.num_timesteps, dtype=jnp.int32)
  x_t, x0_hat = classifier_inputs(n_key, x0, t, eps_fn, score_params, schedule,
                                  denoising_augmented=module.denoising_augmented)
  x0_hat = None if x0_hat is None else jax.lax.stop_gradient(x0_hat)

  def loss_fn(p):
    logits = apply_classifier(module, {"params": p}, x_t, t, x0_hat)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": acc}


def diffused_predictions(variables, score_params, x0, t, key, *, module, eps_fn, schedule) -> Array:
  """Predicted labels (B,) on x0 diffused to the given t (B,)."""
  x_t, x0_hat = classifier_inputs(key, x0, t, eps_fn, score_params, schedule,
                                  denoising_augmented=module.denoising_augmented)
  return jnp.argmax(apply_classifier(module, variables, x_t, t, x0_hat), -1)


def make_cond_fn(module: TimeClassifier, variables: Any, y: Array, scale: float, *,
                 eps_fn: EpsFn | None = None, score_params: Any = None,
                 schedule: diffusion.Schedule | None = None, grad_through_denoiser: bool = True):
  """guided-diffusion cond_fn(x_t, t_original) = scale * grad_x log p(y | x_t) (B, H, W, C).

  For the DA-classifier, `schedule` must be the BASE schedule (t_original indexes it).
  """
  if module.denoising_augmented and (eps_fn is None or schedule is None):
    raise ValueError("DA-classifier guidance needs eps_fn, score_params and the base schedule")

  def log_p(x, t):
    x0_hat = None
    if module.denoising_augmented:
      x0_hat = denoise(x, t, eps_fn, score_params, schedule)
      if not grad_through_denoiser:
        x0_hat = jax.lax.stop_gradient(x0_hat)
    logp = jax.nn.log_softmax(apply_classifier(module, variables, x, t, x0_hat).astype(jnp.float32))
    return jnp.sum(jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), axis=1))

  def cond_fn(x_t, t):
    return jax.grad(log_p)(x_t.astype(jnp.float32), t) * scale

  return cond_fn


# ----------------------------------------------------------------------------------------------------
# Programs: training loop, evaluation, guided sampling (jitted, sharded).
# ----------------------------------------------------------------------------------------------------


def init_classifier(module: TimeClassifier, key: Array, image_shape: tuple[int, ...]) -> Any:
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  args = (x, t, x) if module.denoising_augmented else (x, t)
  return jax.jit(module.init)(key, *args)


def train_classifier(key: Array, module: TimeClassifier, images: np.ndarray, labels: np.ndarray,
                     eps_fn: EpsFn | None, score_params: Any, schedule: diffusion.Schedule, *,
                     steps: int, batch_size: int, learning_rate: float = 2e-3, weight_decay: float = 0.0,
                     variables: Any = None, mesh=None, log_every: int = 50) -> tuple[Any, list[dict]]:
  """Trains a time-conditioned classifier on (images (N, H, W, C) in [-1, 1], labels); returns
  (variables, history). AdamW with cosine decay; batches sampled with replacement from a seeded numpy RNG."""
  mesh = sharding.make_mesh() if mesh is None else mesh
  if batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} must be divisible by the {mesh.size} devices")
  init_key, data_seed, step_key = jax.random.split(key, 3)
  if variables is None:
    variables = init_classifier(module, init_key, images.shape[1:])
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, max(steps, 1)), weight_decay=weight_decay)
  params = sharding.replicate(variables["params"], mesh)
  opt_state = sharding.replicate(tx.init(variables["params"]), mesh)
  score_params = sharding.replicate(score_params, mesh)
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  step_fn = jax.jit(functools.partial(train_step, module=module, tx=tx, eps_fn=eps_fn, schedule=schedule),
                    in_shardings=(repl, repl, repl, data, repl), out_shardings=(repl, repl, repl),
                    donate_argnums=(0, 1))
  rng = np.random.default_rng(int(jax.random.randint(data_seed, (), 0, 2**31 - 1)))
  history = []
  for step in range(steps):
    idx = rng.integers(0, len(images), batch_size)
    # (every process draws the same idx: the global batch, of which each feeds its rows)
    batch = sharding.shard_global_batch({"image": images[idx].astype(np.float32),
                                         "label": labels[idx].astype(np.int32)}, mesh)
    params, opt_state, m = step_fn(params, opt_state, score_params, batch, jax.random.fold_in(step_key, step))
    if step % log_every == 0 or step == steps - 1:  # also blocks: keeps the dispatch queue short
      history.append({"step": step, **{k: float(v) for k, v in m.items()}})
  return {"params": jax.device_get(params)}, history


def evaluate_diffused(key: Array, module: TimeClassifier, variables: Any, images: np.ndarray,
                      labels: np.ndarray, eps_fn: EpsFn | None, score_params: Any,
                      schedule: diffusion.Schedule, *, batch_size: int = 256, num_bins: int = 10,
                      mesh=None) -> dict:
  """Accuracy on test images diffused to t ~ U{0..T-1} (one fixed draw per example; same key -> same t and
  noise for every classifier), overall and per t-bin (paper Table 4)."""
  mesh = sharding.make_mesh() if mesh is None else mesh
  if batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} must be divisible by the {mesh.size} devices")
  t_key, n_key = jax.random.split(key)
  n_steps = schedule.num_timesteps
  t_all = np.asarray(jax.random.randint(t_key, (len(images),), 0, n_steps, dtype=jnp.int32))
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  fn = jax.jit(functools.partial(diffused_predictions, module=module, eps_fn=eps_fn, schedule=schedule),
               in_shardings=(repl, repl, data, data, repl), out_shardings=repl)
  variables = sharding.replicate(variables, mesh)
  score_params = sharding.replicate(score_params, mesh)
  preds = []
  for i, s in enumerate(range(0, len(images), batch_size)):
    b, mask = sharding.pad_to_multiple({"image": images[s:s + batch_size].astype(np.float32),
                                        "t": t_all[s:s + batch_size]}, batch_size)
    b = sharding.shard_global_batch(b, mesh)  # every process holds the whole test set
    p = np.asarray(fn(variables, score_params, b["image"], b["t"], jax.random.fold_in(n_key, i)))
    preds.append(p[mask > 0])
  correct = np.concatenate(preds) == np.asarray(labels)
  edges = np.linspace(0, n_steps, num_bins + 1).astype(int)
  bins = [{"t_low": int(lo), "t_high": int(hi),
           "accuracy": float(correct[(t_all >= lo) & (t_all < hi)].mean()) if np.any((t_all >= lo) & (t_all < hi))
           else float("nan")} for lo, hi in zip(edges[:-1], edges[1:])]
  return {"accuracy": float(correct.mean()), "num_examples": int(len(correct)), "bins": bins}


def guided_sample(key: Array, module: TimeClassifier, variables: Any, y: Array, scale: float, *,
                  model_fn: Callable[[Any, Array, Array], Array], score_params: Any,
                  base_schedule: diffusion.Schedule, sample_schedule: diffusion.Schedule,
                  shape: tuple[int, ...], method: str = "ddpm", learn_sigma: bool = False, eta: float = 0.0,
                  eps_fn: EpsFn | None = None, grad_through_denoiser: bool = True,
                  guided: bool = True) -> Array:
  """Classifier-guided samples (B, H, W, C) via `sampling.sample_loop`; pure (the caller jits).

  model_fn(score_params, x_t, t_original) -> model output; eps_fn(score_params, x_t, t) -> eps (defaults to
  model_fn's first C channels). `guided=False` samples without cond_fn (same key -> same initial noise).
  """
  if eps_fn is None:
    c = shape[-1]
    eps_fn = lambda p, x, t: model_fn(p, x, t)[..., :c]
  cond_fn = None
  if guided:
    cond_fn = make_cond_fn(module, variables, y, scale, eps_fn=eps_fn, score_params=score_params,
                           schedule=base_schedule, grad_through_denoiser=grad_through_denoiser)
  return sampling.sample_loop(key, functools.partial(model_fn, score_params), sample_schedule, shape,
                              method=method, learn_sigma=learn_sigma, eta=eta, cond_fn=cond_fn)


# ----------------------------------------------------------------------------------------------------
# The task.
# ----------------------------------------------------------------------------------------------------


def _score_model(config, train_images, schedule):
  """(model_fn, eps_fn, score_params, learn_sigma, schedule) from config.score.kind: "gaussian" (on
  `schedule`) or "unet" (a trained score model, with the schedule it was trained with)."""
  if loading.cfg_get(config.score, "kind", "gaussian") == "gaussian":
    eps_fn, params = gaussian_denoiser(train_images, schedule)
    return eps_fn, eps_fn, params, False, schedule
  score = loading.load_score(config.score)
  return score.model_fn, score.eps_fn, score.variables, score.learn_sigma, score.schedule


def run(config, workdir: str) -> dict:
  """da_classifier task: train noisy + DA classifiers, Table-4 accuracy on diffused test images, guided
  sample grids (DDPM and DDIM) with each; writes da_classifier.json/.md, guided_*.png, classifier params."""
  from diffaug_jax.convert.common import save_params
  from diffaug_jax.evaluation import pag

  os.makedirs(workdir, exist_ok=True)
  g = lambda k, d=None: loading.cfg_get(config, k, d)
  mesh = sharding.make_mesh()
  schedule = diffusion.linear_schedule(int(g("num_timesteps", 1000)))
  x_train, y_train = loading.load_arrays(config.data, split=loading.cfg_get(config.data, "train_split", "train"))
  x_test, y_test = loading.load_arrays(config.data, split=loading.cfg_get(config.data, "eval_split", "test"))
  model_fn, eps_fn, score_params, learn_sigma, schedule = _score_model(config, x_train, schedule)
  num_classes = int(g("num_classes", 10))
  key = jax.random.key(int(g("seed", 0)))
  results: dict[str, Any] = {"score_model": loading.cfg_get(config.score, "kind", "gaussian")}
  models = {}
  for name, da in (("noisy", False), ("da", True)):
    module = time_classifier(num_classes, denoising_augmented=da, **dict(g("model", {}) or {}))
    t0 = time.time()
    variables, hist = train_classifier(jax.random.fold_in(key, 1), module, x_train, y_train, eps_fn,
                                       score_params, schedule, steps=int(config.train_steps),
                                       batch_size=int(config.batch_size),
                                       learning_rate=float(g("learning_rate", 2e-3)), mesh=mesh)
    if loading.is_primary():
      save_params(os.path.join(workdir, f"{name}_classifier.msgpack"), variables)
    ev = evaluate_diffused(jax.random.fold_in(key, 2), module, variables, x_test, y_test, eps_fn, score_params,
                           schedule, batch_size=int(g("eval_batch_size", 256)), mesh=mesh)
    results[name] = {**ev, "train_seconds": round(time.time() - t0, 1), "history": hist}
    models[name] = (module, variables)

  # Guided sampling: one row per class, for each classifier and sampler; judged by the noisy classifier at t=0.
  n_per = int(g("samples_per_class", 4))
  y = jnp.asarray(np.repeat(np.arange(num_classes), n_per), jnp.int32)
  shape = (len(y),) + x_train.shape[1:]
  judge_module, judge_vars = models["noisy"]
  samples_out = {}
  for method, spec in (("ddpm", str(g("ddpm_steps", "250"))), ("ddim", f"ddim{int(g('ddim_steps', 50))}")):
    sched = diffusion.respace(schedule, spec)
    for name, (module, variables) in [("unguided", models["da"])] + list(models.items()):
      fn = jax.jit(functools.partial(guided_sample, module=module, scale=float(g("guidance_scale", 1.0)),
                                     model_fn=model_fn, base_schedule=schedule, sample_schedule=sched,
                                     shape=shape, method=method, learn_sigma=learn_sigma, eps_fn=eps_fn,
                                     guided=name != "unguided"))
      x = fn(jax.random.fold_in(key, 3), variables=variables, y=y, score_params=score_params)
      x = np.asarray(x)
      judged = np.asarray(jnp.argmax(judge_module.apply(judge_vars, jnp.asarray(x), jnp.zeros(len(y), jnp.int32)),
                                     -1))
      samples_out[f"{method}_{name}"] = float(np.mean(judged == np.asarray(y)))
      grid = ((x + 1) / 2).reshape(num_classes, n_per, *x.shape[1:])
      pag.save_grid(os.path.join(workdir, f"guided_{method}_{name}.png"),
                    [grid[:, j] for j in range(n_per)])
  results["guided_label_accuracy"] = samples_out
  results["guidance_scale"] = float(g("guidance_scale", 1.0))
  loading.write_json(os.path.join(workdir, "da_classifier.json"), results)
  md = ["| classifier | accuracy on x_t, t ~ U{0..999} (%) |", "|---|---|"]
  md += [f"| {n} | {100 * results[n]['accuracy']:.2f} |" for n in ("noisy", "da")]
  md += ["", "| t-bin | noisy | DA |", "|---|---|---|"]
  md += [f"| [{a['t_low']}, {a['t_high']}) | {100 * a['accuracy']:.1f} | {100 * b['accuracy']:.1f} |"
         for a, b in zip(results["noisy"]["bins"], results["da"]["bins"])]
  md += ["", f"Guided samples (scale {results['guidance_scale']}): fraction judged as the target class by the "
         "noisy classifier at t=0", "", "| sampler | fraction |", "|---|---|"]
  md += [f"| {k} | {100 * v:.1f} |" for k, v in samples_out.items()]
  loading.write_text(os.path.join(workdir, "da_classifier.md"), "\n".join(md) + "\n")
  loading.write_results(workdir, results, "\n".join(md) + "\n")
  return results
