"""Certified l2 robustness: Cohen et al. randomized smoothing with the one-step diffusion denoiser.

Diffusion-denoised smoothing (Carlini et al. 2023): for smoothing noise sigma (defined on [0, 1] images),
take t* = `diffusion.t_for_sigma(schedule, sigma)` (smallest t with sqrt((1 - abar)/abar) >= 2 sigma; the
factor 2 because model images live in [-1, 1]), noise the [-1, 1] image with q_sample(x0, t*, eps), take ONE
clipped x0_hat and classify it (`augment.diffaug_at`). Because t* is the first step whose noise level is
>= 2 sigma, the Gaussian actually used has std sigma_eff >= sigma; certifying with sigma * Phi^-1(pA) is
therefore valid and at most slightly conservative (sigma_eff is recorded in the output).

`denoise=False` gives plain Gaussian-augmentation smoothing: classify x0 + 2 sigma N(0, I) directly.

The sampling hot path is one jitted function per (classifier, sigma): broadcast one image to a large batch
split over the `data` mesh axis, draw fresh noise, denoise, classify, and return the (K,) vote counts; only
the counts come back to the host. n0 selection and n estimation samples come from independent keys.
The certificate math (Clopper-Pearson via scipy.stats.beta, binomtest, abstain rule) is in
`diffaug_jax.scoring`.

Outputs of `run`: `certify_sigma{s}.tsv` with rows (index, label, prediction, radius, correct, seconds)
(Cohen's format), `certify.json`, `certify.md` (certified accuracy vs radius per sigma and the best sigma
per radius, paper Table 13 shape) and `certify.png` (paper Fig. 10 shape).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from diffaug_jax import augment, diffusion, scoring, sharding
from diffaug_jax.evaluation import loading

Array = jax.Array
ClassifyFn = Callable[[Any, Array], Array]  # (params, (B, H, W, C) in [-1, 1]) -> logits (B, K)
PredictFn = Callable[[Any, Array, Array], Array]  # (params, key, (B, H, W, C)) -> labels (B,) int32
EpsFn = Callable[[Any, Array, Array], Array]  # (params, x_t, t) -> eps

DEFAULT_SIGMAS = (0.25, 0.5, 1.0)
DEFAULT_RADII = tuple(np.round(np.arange(0.0, 4.01, 0.25), 2))


def effective_sigma(schedule: diffusion.Schedule, t: int) -> float:
  """The [0, 1]-scale noise std actually applied at timestep t: sqrt((1 - abar_t) / abar_t) / 2."""
  return float(diffusion.noise_level(schedule)[t] / 2.0)


def make_noisy_predict_fn(classify_fn: ClassifyFn, sigma: float, *, eps_fn: EpsFn | None = None,
                          schedule: diffusion.Schedule | None = None, denoise: bool = True) -> PredictFn:
  """predict_fn(params, key, x) -> argmax labels of the base classifier on noised (and denoised) copies.

  Args:
    classify_fn: (params, [-1, 1] images (B, H, W, C)) -> logits (B, K).
    sigma: smoothing noise std on the [0, 1] scale.
    eps_fn, schedule: (params, x_t, t) -> eps (the score model, e.g. built from
      `models.score.make_eps_fn(module, params["score"])` inside) and its schedule (needed when `denoise`).
    denoise: one-step diffusion denoising (Carlini et al.) vs plain Gaussian noise (Cohen et al.).
  `params` is any pytree (e.g. {"classifier": ..., "score": ...}); it is a jit ARGUMENT, never a baked-in
  constant, so a 550M-parameter score model is not copied into the executable.
  """
  if denoise:
    if eps_fn is None or schedule is None:
      raise ValueError("denoised smoothing needs eps_fn and schedule")
    t = diffusion.t_for_sigma(schedule, sigma)

    def predict(params, key, x):
      x0_hat = augment.diffaug_at(key, x, t, functools.partial(eps_fn, params), schedule, clip=True)
      return jnp.argmax(classify_fn(params, x0_hat), axis=-1).astype(jnp.int32)
  else:
    def predict(params, key, x):
      noisy = x.astype(jnp.float32) + 2.0 * sigma * jax.random.normal(key, x.shape, jnp.float32)
      return jnp.argmax(classify_fn(params, noisy), axis=-1).astype(jnp.int32)
  return predict


def make_counts_fn(predict_fn: PredictFn, num_classes: int, batch_size: int, mesh=None):
  """Jitted counts(params, key, x (1, H, W, C), num_valid) -> (K,) int32 votes over `batch_size` copies.

  The copies are split over the mesh's `data` axis (params replicated); rows >= num_valid are ignored
  (static shapes for the last, partial batch).
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  if batch_size % mesh.size:
    raise ValueError(f"certify batch_size {batch_size} must be divisible by the {mesh.size} devices")
  batch_spec = NamedSharding(mesh, P(sharding.DATA_AXIS))

  def counts(params, key, x, num_valid):
    xb = jnp.broadcast_to(x, (batch_size,) + x.shape[1:])
    xb = jax.lax.with_sharding_constraint(xb, batch_spec)
    preds = predict_fn(params, key, xb)
    valid = (jnp.arange(batch_size) < num_valid).astype(jnp.int32)
    return jnp.sum(jax.nn.one_hot(preds, num_classes, dtype=jnp.int32) * valid[:, None], axis=0)

  repl = sharding.replicated(mesh)
  return jax.jit(counts, in_shardings=(repl, repl, repl, repl), out_shardings=repl)


def sample_counts(counts_fn, params, key: Array, x: Array, num: int, batch_size: int) -> np.ndarray:
  """(K,) vote counts over `num` noisy samples of one image x (1, H, W, C), in batches of `batch_size`."""
  total = None
  for i, start in enumerate(range(0, num, batch_size)):
    c = counts_fn(params, jax.random.fold_in(key, i), x, np.int32(min(batch_size, num - start)))
    c = np.asarray(c, np.int64)  # blocks every step: keeps the dispatch queue short
    total = c if total is None else total + c
  if total is None or int(total.sum()) != num:
    # one_hot drops a prediction outside [0, K): fewer votes would shrink n and inflate the bound and radius.
    got = 0 if total is None else int(total.sum())
    raise ValueError(f"{got} of {num} noisy predictions fell in [0, {0 if total is None else len(total)}): "
                     "the classifier predicts classes outside num_classes (check config.classifier."
                     "num_classes against the head's width)")
  return total


def certify(counts_fn, params, key: Array, x: Array, *, sigma: float, n0: int = 100, n: int = 10_000,
            alpha: float = 0.001, batch_size: int = 1000, counts_fn0=None,
            batch_size0: int | None = None) -> tuple[int, float, float]:
  """Cohen et al. CERTIFY for one image (1, H, W, C): (prediction or -1, radius, pA_lower).

  `counts_fn0` / `batch_size0`: an optional smaller-batch counts function for the n0 selection samples
  (n0 = 100 would otherwise run a full, mostly masked, estimation batch).
  """
  key0, key1 = jax.random.split(key)
  if counts_fn0 is None:
    counts_fn0, batch_size0 = counts_fn, batch_size
  c0 = sample_counts(counts_fn0, params, key0, x, n0, batch_size0)
  c = sample_counts(counts_fn, params, key1, x, n, batch_size)
  return scoring.certify_from_counts(c0, c, sigma, alpha)


def predict(counts_fn, params, key: Array, x: Array, *, n: int = 1000, alpha: float = 0.001,
            batch_size: int = 1000) -> int:
  """Cohen et al. PREDICT for one image: top class or -1 (abstain)."""
  return scoring.predict_from_counts(sample_counts(counts_fn, params, key, x, n, batch_size), alpha)


def certify_dataset(counts_fn, params, key: Array, images: np.ndarray, labels: np.ndarray, *, sigma: float,
                    n0: int, n: int, alpha: float, batch_size: int,
                    indices: Sequence[int] | None = None, counts_fn0=None,
                    batch_size0: int | None = None, dataset_indices: Sequence[int] | None = None
                    ) -> list[dict]:
  """Certifies images (N, H, W, C) in [-1, 1]; rows (index, label, prediction, radius, correct, seconds).

  indices: which rows of `images` to certify (default all). dataset_indices: (N,) each row's index in its
  dataset split, written as the row's "index" (Cohen's TSV `idx`; default the row position)."""
  rows = []
  indices = range(len(images)) if indices is None else indices
  for i in indices:
    t0 = time.time()
    pred, radius, p_a = certify(counts_fn, params, jax.random.fold_in(key, int(i)), images[i:i + 1],
                                sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                                counts_fn0=counts_fn0, batch_size0=batch_size0)
    idx = int(i) if dataset_indices is None else int(dataset_indices[i])
    rows.append({"index": idx, "label": int(labels[i]), "prediction": int(pred),
                 "radius": float(radius), "correct": int(pred == int(labels[i])),
                 "seconds": round(time.time() - t0, 4), "pA_lower": float(p_a)})
  return rows


def summarize(rows_by_sigma: dict[float, list[dict]], radii: Sequence[float] = DEFAULT_RADII) -> dict:
  """Certified accuracy vs radius per sigma and best-over-sigmas per radius."""
  radii = np.asarray(radii, np.float64)
  curves = {}
  for s, rows in rows_by_sigma.items():
    curves[s] = scoring.certified_accuracy([r["radius"] for r in rows], [r["correct"] for r in rows], radii)
  best, best_sigma = scoring.best_over_sigmas(curves, radii)
  return {"radii": radii.tolist(), "curves": {str(s): c.tolist() for s, c in curves.items()},
          "best": best.tolist(), "best_sigma": best_sigma}


def markdown_table(summary: dict) -> str:
  radii = summary["radii"]
  head = "| sigma | " + " | ".join(f"r={r:g}" for r in radii) + " |"
  sep = "|---|" + "---|" * len(radii)
  lines = [head, sep]
  for s, c in summary["curves"].items():
    lines.append(f"| {s} | " + " | ".join(f"{100 * a:.1f}" for a in c) + " |")
  lines.append("| best | " + " | ".join(
      f"{100 * a:.1f} ({s:g})" for a, s in zip(summary["best"], summary["best_sigma"])) + " |")
  return "\n".join(lines) + "\n"


def plot_curves(summary: dict, path: str, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for s, c in summary["curves"].items():
    ax.plot(summary["radii"], np.asarray(c) * 100, label=f"sigma={s}")
  ax.plot(summary["radii"], np.asarray(summary["best"]) * 100, "k--", label="best sigma")
  ax.set_xlabel("l2 radius")
  ax.set_ylabel("certified accuracy (%)")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  if loading.is_primary():
    fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config, workdir: str) -> dict:
  """certify task: for each sigma, certify a subset of the test set; write TSV/JSON/markdown/PNG.

  config: classifier {...}, score {...} (unless denoise=False), data {...}, sigmas, n0, n, alpha,
  batch_size, seed, denoise, radii, num_classes.
  """
  os.makedirs(workdir, exist_ok=True)
  module, variables = loading.load_classifier(config.classifier, data_cfg=config.data)
  denoise = bool(loading.cfg_get(config, "denoise", True))
  params = {"classifier": variables}
  eps_fn = schedule = None
  if denoise:
    score = loading.load_score(loading.cfg_get(config, "score"))
    params["score"], schedule = score.variables, score.schedule
    eps_fn = lambda p, x_t, t: score.eps_fn(p["score"], x_t, t)
  images, labels, dataset_indices = loading.load_arrays(config.data, return_indices=True)
  num_classes = int(config.classifier.num_classes)
  mesh = sharding.make_mesh()
  params = sharding.replicate(params, mesh)
  classify_fn = lambda p, x: module.apply(p["classifier"], x, train=False)
  key = jax.random.key(int(loading.cfg_get(config, "seed", 0)))
  sigmas = tuple(float(s) for s in loading.cfg_get(config, "sigmas", DEFAULT_SIGMAS))
  rows_by_sigma, meta = {}, {}
  for s in sigmas:
    predict_fn = make_noisy_predict_fn(classify_fn, s, eps_fn=eps_fn, schedule=schedule, denoise=denoise)
    bs = int(config.batch_size)
    counts_fn = make_counts_fn(predict_fn, num_classes, bs, mesh)
    bs0 = -(-int(config.n0) // mesh.size) * mesh.size  # n0 rounded up to the device count
    counts_fn0 = make_counts_fn(predict_fn, num_classes, bs0, mesh) if bs0 < bs else None
    rows = certify_dataset(counts_fn, params, jax.random.fold_in(key, int(round(s * 1000))), images, labels,
                           sigma=s, n0=int(config.n0), n=int(config.n), alpha=float(config.alpha),
                           batch_size=bs, counts_fn0=counts_fn0, batch_size0=bs0 if counts_fn0 else None,
                           dataset_indices=dataset_indices)
    loading.write_rows(rows, os.path.join(workdir, f"certify_sigma{s:g}.tsv"))
    rows_by_sigma[s] = rows
    if denoise:
      t = diffusion.t_for_sigma(schedule, s)
      meta[str(s)] = {"t": t, "sigma_eff": effective_sigma(schedule, t)}
  radii = tuple(loading.cfg_get(config, "radii", DEFAULT_RADII))
  summary = summarize(rows_by_sigma, radii)
  summary.update(num_examples=len(images), n0=int(config.n0), n=int(config.n), alpha=float(config.alpha),
                 denoise=denoise, timesteps=meta)
  loading.write_json(os.path.join(workdir, "certify.json"),
                     {"summary": summary, "rows": {str(s): r for s, r in rows_by_sigma.items()}})
  md = "Certified accuracy (%) vs l2 radius (best sigma in parentheses)\n\n" + markdown_table(summary)
  loading.write_text(os.path.join(workdir, "certify.md"), md)
  loading.write_results(workdir, summary, md)
  plot_curves(summary, os.path.join(workdir, "certify.png"),
              "diffusion-denoised smoothing" if denoise else "Gaussian smoothing")
  return summary
