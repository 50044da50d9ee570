"""The embedded demo (`python train.py` with no flags): DiffAug end to end on the bundled digits, offline.

Steps (each a normal `train_and_evaluate` run in its own sub-workdir, so each resumes / is reused):
  1. <workdir>/score     DDPM training of a small UNet on clean digits (reused when already finished).
  2. <workdir>/baseline  classifier, CE(clean) only.
  3. <workdir>/diffaug   same classifier and seed, CE(clean) + CE(DiffAug view) with the frozen score model.
  4. evaluation: Default (plain classifier) and DE (DiffAug Ensemble: softmax averaged over one-step denoised
     copies at t in `demo.ensemble_ts`, t = 0 = the raw image) on clean test digits and on corrupted copies
     (`diffaug_jax.data.corruptions`, severity `demo.severity`).
  5. a table shaped like the paper's Table 1 (stdout, results.md, results.json) and the DiffAug grid
     (paper Fig. 1, diffaug_grid.png): rows = test digits, columns = t (x0_hat after one denoising step).
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffaug_jax import augment, checkpoint as ckpt_lib, metrics as metrics_lib, trainer


def _test_arrays(data_cfg, max_test: int) -> tuple[np.ndarray, np.ndarray]:
  from diffaug_jax.data.sources import DigitsSource
  src = DigitsSource(data_cfg.eval_split, image_size=int(data_cfg.image_size), channels=int(data_cfg.channels))
  images, labels = np.asarray(src.images), np.asarray(src.labels, np.int32)
  if max_test:
    images, labels = images[:max_test], labels[:max_test]
  return images, labels


def _corrupt(images: np.ndarray, name: str, severity: int) -> np.ndarray:
  from diffaug_jax.data.corruptions import corrupt
  return corrupt(images, name, severity, seed=0)


def _batches(n: int, bs: int):
  for s in range(0, n, bs):
    yield s, min(s + bs, n)


def make_predictors(apply_fn, eps_fn, schedule, ts):
  """Jitted (once) Default and DE label predictors: f(variables, x float [-1,1] (B,H,W,C)[, key]) -> (B,)."""

  @jax.jit
  def default(variables, x):
    return jnp.argmax(apply_fn(variables, x, train=False), -1)

  @jax.jit
  def de(variables, x, key):
    classify = lambda v: apply_fn(variables, v, train=False)
    mean_probs, _ = augment.diffaug_ensemble(key, x, classify, eps_fn, schedule, ts)
    return jnp.argmax(mean_probs, -1)
  return default, de


def _predict(fn, variables, images, *, key=None, bs=128):
  """Predicted labels for uint8 images (N,H,W,C) in fixed-shape (padded) batches; DE when key is given."""
  out = []
  for i, (s, e) in enumerate(_batches(len(images), bs)):
    x = images[s:e]
    pad = bs - len(x)
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    xf = jnp.asarray(x, jnp.float32) / 127.5 - 1.0
    pred = fn(variables, xf) if key is None else fn(variables, xf, jax.random.fold_in(key, i))
    out.append(np.asarray(pred)[:e - s])
  return np.concatenate(out)


def _grid_png(path: str, images: np.ndarray, eps_fn, schedule, ts, key) -> None:
  """Rows = examples, columns = t; each cell the one-step DiffAug output (t = 0: the input)."""
  from PIL import Image
  x0 = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  one = jax.jit(lambda k, x, t: augment.diffaug_at(k, x, t, eps_fn, schedule))  # t traced: compiles once
  cols = [np.asarray(x0) if t == 0 else np.asarray(one(jax.random.fold_in(key, j), x0, jnp.int32(t)))
          for j, t in enumerate(ts)]
  n, h, w, c = images.shape
  pad = 2
  canvas = np.ones((n * (h + pad) + pad, len(ts) * (w + pad) + pad, c), np.float32)
  for i in range(n):
    for j in range(len(ts)):
      canvas[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = \
          (cols[j][i] + 1) / 2
  img = np.uint8(np.clip(canvas, 0, 1) * 255 + 0.5)
  img = img[..., 0] if c == 1 else img
  scale = max(1, 128 // h)
  im = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
  if jax.process_index() == 0:  # one writer (every process computed the same grid)
    im.save(path)


def format_table(results: dict, corruptions, severity: int) -> str:
  """Markdown table shaped like the paper's Table 1 (top-1 %)."""
  head = ("| model | Corrupted Default | Corrupted DE | Test Default | Test DE |",
          "|---|---|---|---|---|")
  rows = []
  for name in ("baseline", "diffaug"):
    r = results[name]
    rows.append(f"| {'CNN' if name == 'baseline' else 'CNN+DiffAug'} | {r['corrupted_default']:.2f} | "
                f"{r['corrupted_de']:.2f} | {r['clean_default']:.2f} | {r['clean_de']:.2f} |")
  per = ["", f"Per corruption (severity {severity}), Default / DE:"]
  for name in ("baseline", "diffaug"):
    per.append(f"  {name:9s} " + "  ".join(
        f"{c}: {results[name]['per_corruption'][c]['default']:.1f} / {results[name]['per_corruption'][c]['de']:.1f}"
        for c in corruptions))
  return "\n".join(head + tuple(rows) + tuple(per))


def _check_finished(summary: dict, what: str) -> None:
  trainer.exit_if_preempted(summary, what)  # the demo stops at a preempted stage; rerunning resumes it


def run_demo(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Runs the whole demo in `workdir`; returns the results dict (also written to results.json).
  `allow_config_change`: resume runs already in `workdir` under a changed config (trainer.train_and_evaluate)."""
  t0 = time.perf_counter()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  d = config.demo
  timings = {}

  # 1. Score model (resumes / is a no-op when already trained to its step count).
  print("== 1/4 score model (DDPM) ==", flush=True)
  t = time.perf_counter()
  score_dir = os.path.join(workdir, "score")
  # `config.seed` seeds every stage (the sub-runs' own seed fields are overridden by it).
  score_cfg = copy.deepcopy(d.score)
  score_cfg.seed = int(config.seed)
  _check_finished(trainer.train_and_evaluate(score_cfg, score_dir, allow_config_change=allow_config_change),
                  "score model")
  timings["score"] = time.perf_counter() - t

  # 2-3. Baseline and +DiffAug classifiers: same recipe and seed, DiffAug on/off.
  for i, (name, enabled) in enumerate((("baseline", False), ("diffaug", True))):
    print(f"== {2 + i}/4 classifier: {name} ==", flush=True)
    t = time.perf_counter()
    c = copy.deepcopy(d.classifier)
    c.seed = int(config.seed)
    c.diffaug.enabled = enabled
    c.score.workdir = score_dir
    _check_finished(trainer.train_and_evaluate(c, os.path.join(workdir, name),
                                               allow_config_change=allow_config_change), f"{name} classifier")
    timings[name] = time.perf_counter() - t

  # 4. Evaluation: Default and DE, clean and corrupted.
  print("== 4/4 evaluation (Default and DiffAug-Ensemble) ==", flush=True)
  t = time.perf_counter()
  score_module, score_params = ckpt_lib.load_score_model(workdir=score_dir)
  schedule = trainer.make_schedule(d.score.ddpm.schedule, int(d.score.ddpm.num_timesteps))
  eps_fn = trainer.make_score_eps_factory(score_module)(jax.tree.map(jnp.asarray, score_params))
  images, labels = _test_arrays(d.classifier.data, int(d.max_test))
  corrupted = {c: _corrupt(images, c, int(d.severity)) for c in d.corruptions}
  key = jax.random.key(int(config.seed) + 17)
  ts = tuple(int(v) for v in d.ensemble_ts)
  results: dict[str, Any] = {}
  predictors = None
  bs = min(128, len(labels))
  for name in ("baseline", "diffaug"):
    module, variables, _ = ckpt_lib.load_trained_classifier(os.path.join(workdir, name))
    variables = jax.tree.map(jnp.asarray, variables)
    if predictors is None:  # both classifiers share the architecture: compile once
      predictors = make_predictors(module.apply, eps_fn, schedule, ts)

    def acc(imgs, de):
      pred = _predict(predictors[1] if de else predictors[0], variables, imgs, key=key if de else None, bs=bs)
      return 100.0 * float(np.mean(pred == labels))
    r = {"clean_default": acc(images, False), "clean_de": acc(images, True), "per_corruption": {}}
    for c, imgs in corrupted.items():
      r["per_corruption"][c] = {"default": acc(imgs, False), "de": acc(imgs, True)}
    r["corrupted_default"] = float(np.mean([v["default"] for v in r["per_corruption"].values()]))
    r["corrupted_de"] = float(np.mean([v["de"] for v in r["per_corruption"].values()]))
    results[name] = r
  timings["eval"] = time.perf_counter() - t

  grid_path = os.path.join(workdir, "diffaug_grid.png")
  _grid_png(grid_path, images[:int(d.grid_examples)], eps_fn, schedule, tuple(d.grid_ts),
            jax.random.key(int(config.seed) + 23))
  table = format_table(results, tuple(d.corruptions), int(d.severity))
  timings["total"] = time.perf_counter() - t0
  header = (f"DiffAug demo: digits {images.shape[1]}x{images.shape[2]}, {len(labels)} test images, "
            f"corruptions {', '.join(d.corruptions)} "
            f"@ severity {d.severity} (Corrupted = mean over them), DE over t in {list(ts)}; top-1 %")
  out = {"results": results, "timings_s": timings, "num_test": int(len(labels)), "ensemble_ts": list(ts),
         "corruptions": list(d.corruptions), "severity": int(d.severity), "grid": grid_path}
  if jax.process_index() == 0:  # one writer (every process computed the same results)
    print("\n" + header + "\n" + table, flush=True)
    print(f"\nDiffAug grid (paper Fig. 1): {grid_path}\ntimings (s): " +
          ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
    metrics_lib.write_text_atomic(os.path.join(workdir, "results.json"), json.dumps(out, indent=1))
    metrics_lib.write_text_atomic(os.path.join(workdir, "results.md"), header + "\n\n" + table + "\n")
  return out
