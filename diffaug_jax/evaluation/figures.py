"""PNG figures (matplotlib, Agg backend): the DiffAug augmentation grid (paper Fig. 1), mean prediction
entropy vs t (Fig. 2) and DiffAug-Ensemble accuracy vs ensemble size / t (Fig. 12 style)."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffaug_jax import augment
from diffaug_jax import diffusion
from diffaug_jax.evaluation import loading
from diffaug_jax.evaluation import suites as suites_lib

GRID_TS = tuple(range(350, 701, 50))  # paper Fig. 1: t = 350, 400, ..., 700


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> str:
  if loading.is_primary():  # one writer per file (multi-host)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
  _plt().close(fig)
  return path


def diffaug_samples(images: np.ndarray, eps_fn: Callable, score_params: Any,
                    schedule: diffusion.Schedule, ts: Sequence[int] = GRID_TS, seed: int = 0) -> np.ndarray:
  """uint8 (N, H, W, C) -> float [0, 1] (len(ts), N, H, W, C): one-step DiffAug at each t."""
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  # The weights are a jit argument: closed over, a 2 GB score model would be baked into the program.
  f = jax.jit(lambda sp, k, x, t: augment.diffaug_at(k, x, t, lambda xt, tt: eps_fn(sp, xt, tt), schedule))
  key = jax.random.key(seed)
  out = [np.asarray(f(score_params, jax.random.fold_in(key, i), x, jnp.int32(t))) for i, t in enumerate(ts)]
  return (np.stack(out) + 1.0) / 2.0


def augmentation_grid(images: np.ndarray, eps_fn: Callable, score_params: Any,
                      schedule: diffusion.Schedule, path: str, *, ts: Sequence[int] = GRID_TS,
                      seed: int = 0) -> str:
  """Paper Fig. 1: rows = images, columns = original then DiffAug at each t. Returns the path."""
  images = np.asarray(images)
  samples = diffaug_samples(images, eps_fn, score_params, schedule, ts, seed)
  plt = _plt()
  n, cols = len(images), len(ts) + 1
  fig, axes = plt.subplots(n, cols, figsize=(1.4 * cols, 1.4 * n), squeeze=False)
  gray = images.shape[-1] == 1
  for i in range(n):
    row = [images[i].astype(np.float32) / 255.0] + [samples[j, i] for j in range(len(ts))]
    for j, im in enumerate(row):
      ax = axes[i, j]
      ax.imshow(np.clip(im[..., 0] if gray else im, 0, 1), cmap="gray" if gray else None,
                vmin=0, vmax=1, interpolation="nearest")
      ax.set_xticks([]), ax.set_yticks([])
      if i == 0:
        ax.set_title("original" if j == 0 else f"t={ts[j - 1]}", fontsize=8)
  return _save(fig, path)


def entropy_vs_t_figure(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: str) -> str:
  """Paper Fig. 2: {model name: (ts, mean prediction entropy on DiffAug samples at each t)}.

  Get the numbers with `robustness.evaluate_de(..., ts=range(0, 1000, 50))["member_entropy"]`."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  for name, (ts, ent) in curves.items():
    ax.plot(list(ts), list(ent), marker="o", ms=3, label=name)
  ax.set_xlabel("diffusion time t")
  ax.set_ylabel("mean prediction entropy (nats)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, path)


def de_curve_figure(results: Mapping[str, Any], path: str) -> str:
  """Fig. 12 style, two panels per suite mean: accuracy of the first-k-members ensemble vs k, and of
  each member alone vs its t. One line per (model, suite) that has DE results."""
  plt = _plt()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
  drew = False
  for name, res in results["models"].items():
    for suite, r in res.items():
      sets = r["sets"]
      de = [sets[k]["de"] for k in suites_lib.summary_sets(suite, sets) if "de" in sets[k]]
      if not de:
        continue
      ts = de[0]["ts"]
      cum = 100 * np.mean([d["cumulative"] for d in de], axis=0)
      mem = 100 * np.mean([d["members"] for d in de], axis=0)
      ax1.plot(np.arange(1, len(ts) + 1), cum, marker="o", ms=3, label=f"{name} / {suite}")
      ax2.plot(ts, mem, marker="o", ms=3, label=f"{name} / {suite}")
      drew = True
  ax1.set_xlabel("ensemble size k (members t_1..t_k)")
  ax1.set_ylabel("top-1 accuracy (%)")
  ax2.set_xlabel("member t (alone)")
  ax2.set_ylabel("top-1 accuracy (%)")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    if drew:
      ax.legend(fontsize=6)
  return _save(fig, path)
