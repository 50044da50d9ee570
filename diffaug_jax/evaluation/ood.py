"""OOD detection with a classifier's logits and penultimate features (OpenOOD v1.5 conventions).

Scores (all "higher = more in-distribution"; formulas in `diffaug_jax.scoring`): MSP, energy, ReAct
(clip at the 90th percentile of ID activations), ASH-B (OpenOOD default) and ASH-S (ASH paper) at
percentile 90, SCALE at 85. Metrics: AUROC, AUPR-in, AUPR-out, FPR@95 under both conventions
("openood": OOD positive; "odin": ID positive).

One jitted, sharded forward pass per batch (`classify.ShardedRunner`: each process feeds its rows) returns
(logits, features); each process keeps only its own rows (ImageNet's 50k x (1000 + 2048) floats are 610 MB:
no host holds them all) and scores them through the classifier's head (`logits_from_features`), jitted once;
only the scores (a few floats per example) are gathered for the metrics. The ReAct threshold comes from
`react_data` (OpenOOD uses the ID training/validation set) or, by default, the ID test set itself (stated in
the output); across processes it is found exactly (`scoring.percentile_across`, the value np.percentile
gives on the whole set), so every number equals the one-process run's.

Data: ID and each OOD set are data configs (TFDS name via `source="tfds", name=...`, an image folder via
`source="folder", data_dir=...`, or OpenOOD's image lists via `source="list"`), read by the data package.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffaug_jax import scoring, sharding
from diffaug_jax.evaluation import classify, loading

DEFAULT_METHODS = ("msp", "energy", "react", "ash_b", "ash_s", "scale")
NEAR_OOD_AVERAGE = ("msp", "react", "ash_b", "scale")  # the paper's "MSP, ReAct, ASH, SCALE" average


def make_runner(module, mesh=None) -> classify.ShardedRunner:
  """One sharded forward, jitted once: variables, images (B, H, W, C) -> per-example (logits (B, K),
  features (B, D)) in float32, for the real rows only (each process's own, or gathered: `collect`). Reusable
  across datasets of one batch shape."""
  def step(variables, x, key, mask):
    del key, mask
    x = classify.uint8_to_model(x)  # uint8 from the loaders (converted here, on the device) or [-1, 1] floats
    logits, feats = module.apply(variables, x, train=False, return_features=True)
    return {"logits": logits.astype(jnp.float32), "features": feats.astype(jnp.float32)}

  return classify.ShardedRunner(step, mesh)


def collect(runner: classify.ShardedRunner, variables, batches: Iterable[Mapping[str, np.ndarray]], *,
            gather: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Runs the forward over batches {"image", "label", "mask"} (this process's rows); returns (logits,
  features, labels) of the real (mask 1) examples as numpy: of ALL processes, or (gather False) of this one."""
  out = runner.run(variables, batches, jax.random.key(0), gather=gather)
  return out["logits"], out["features"], out["label"]


def array_batches(images: np.ndarray, labels: np.ndarray | None, batch_size: int):
  """In-memory (N, H, W, C) arrays -> padded {"image", "label", "mask"} batches."""
  labels = np.zeros(len(images), np.int32) if labels is None else labels
  for s in range(0, len(images), batch_size):
    b, mask = sharding.pad_to_multiple({"image": images[s:s + batch_size], "label": labels[s:s + batch_size]},
                                       batch_size)
    yield {**b, "mask": mask}


@functools.lru_cache(maxsize=16)
def _scorer(module, methods: tuple[str, ...], has_clip: bool, ash_percentile: float, scale_percentile: float):
  """One jitted `scoring.ood_scores` per (module, methods, percentiles): every set and every chunk reuses it."""
  def scores(variables, logits, features, react_clip):
    head = lambda h: module.apply(variables, h, method="logits_from_features").astype(jnp.float32)
    return scoring.ood_scores(logits, features, head, methods=methods,
                              react_clip=react_clip if has_clip else None, ash_percentile=ash_percentile,
                              scale_percentile=scale_percentile)
  return jax.jit(scores)


def score_all(module, variables, logits: np.ndarray, features: np.ndarray, *,
              methods: Sequence[str] = DEFAULT_METHODS, react_clip: float | None = None,
              ash_percentile: float = 90.0, scale_percentile: float = 85.0,
              chunk: int = 4096) -> dict[str, np.ndarray]:
  """All scores for precomputed (logits, features), in chunks of `chunk` rows (the last one zero-padded, so
  one compiled program serves every chunk of every set of at least `chunk` rows; a shorter set is one chunk
  of its own length, and compiles its own)."""
  n = len(logits)
  if n == 0:  # a process can hold no rows of a small set
    return {m: np.zeros((0,), np.float32) for m in methods}
  chunk = max(1, min(chunk, n))
  fn = _scorer(module, tuple(methods), react_clip is not None, float(ash_percentile), float(scale_percentile))
  clip = jnp.float32(0.0 if react_clip is None else react_clip)
  out: dict[str, list] = {m: [] for m in methods}
  for s in range(0, n, chunk):
    lo, fe = logits[s:s + chunk], features[s:s + chunk]
    pad = chunk - len(lo)
    if pad:
      lo = np.concatenate([lo, np.zeros((pad,) + lo.shape[1:], lo.dtype)])
      fe = np.concatenate([fe, np.zeros((pad,) + fe.shape[1:], fe.dtype)])
    sc = fn(variables, lo, fe, clip)
    for m in methods:
      out[m].append(np.asarray(sc[m])[:chunk - pad])
  return {m: np.concatenate(v) for m, v in out.items()}


def evaluate_ood(module, variables, id_batches, ood_batches: Mapping[str, Iterable], *,
                 react_batches=None, methods: Sequence[str] = DEFAULT_METHODS,
                 react_percentile: float = 90.0, ash_percentile: float = 90.0,
                 scale_percentile: float = 85.0, mesh=None) -> dict[str, Any]:
  """Scores ID and each OOD set; returns {"id_accuracy", "react_clip", "metrics": {ood: {method: {...}}},
  "average": {method: {...}}}. Batches are iterables of this process's {"image" float [-1, 1] or uint8,
  "label", "mask"} rows (`loading.iterate_batches` splits a global batch over processes); every batch is
  padded to the first one's size. Each process keeps its own rows' logits and features; only scores and
  counts cross processes."""
  runner = make_runner(module, mesh)
  id_logits, id_feats, id_labels = collect(runner, variables, id_batches, gather=False)
  ref_feats = id_feats
  if react_batches is not None and "react" in methods:
    _, ref_feats, _ = collect(runner, variables, react_batches, gather=False)
  react_clip = (scoring.react_threshold(ref_feats, react_percentile, sharding.sum_over_processes)
                if "react" in methods else None)
  del ref_feats
  kw = dict(methods=methods, react_clip=react_clip, ash_percentile=ash_percentile,
            scale_percentile=scale_percentile)

  def scores(logits, feats):  # this process's rows scored here; every process's scores, in process order
    return sharding.allgather_rows(score_all(module, variables, logits, feats, **kw))

  id_scores = scores(id_logits, id_feats)
  num_correct, num_id = sharding.sum_over_processes(
      [int(np.sum(np.argmax(id_logits, -1) == id_labels)), len(id_labels)])
  del id_logits, id_feats
  metrics = {}
  for name, batches in ood_batches.items():
    lo, fe, _ = collect(runner, variables, batches, gather=False)
    ood_s = scores(lo, fe)
    metrics[name] = {m: scoring.ood_metrics(id_scores[m], ood_s[m]) for m in methods}
  average = {m: {k: float(np.mean([metrics[o][m][k] for o in metrics]))
                 for k in ("auroc", "aupr_in", "aupr_out", "fpr95_openood", "fpr95_odin")} for m in methods}
  out = {"id_accuracy": float(num_correct / num_id), "num_id": int(num_id),
         "react_clip": react_clip, "react_source": "react_data" if react_batches is not None else "id_test",
         "percentiles": {"react": react_percentile, "ash": ash_percentile, "scale": scale_percentile},
         "metrics": metrics, "average": average}
  paper = [m for m in NEAR_OOD_AVERAGE if m in methods]
  if paper:
    out["auroc_paper_average"] = float(np.mean([average[m]["auroc"] for m in paper]))
  return out


def markdown_table(result: Mapping[str, Any]) -> str:
  """AUROC / FPR@95 (OpenOOD convention) in %, one row per method, one column pair per OOD set."""
  names = list(result["metrics"])
  methods = list(result["average"])
  lines = ["| method | " + " | ".join(f"{n} AUROC | {n} FPR@95" for n in names) + " | avg AUROC |",
           "|---|" + "---|---|" * len(names) + "---|"]
  for m in methods:
    cells = [f"{100 * result['metrics'][n][m]['auroc']:.2f} | {100 * result['metrics'][n][m]['fpr95_openood']:.2f}"
             for n in names]
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {100 * result['average'][m]['auroc']:.2f} |")
  note = ("\nFPR@95: OpenOOD convention (OOD = positive class: fraction of ID flagged as OOD when 95% of OOD "
          "is detected); the ODIN-style value (ID positive) is in ood.json as fpr95_odin.\n")
  return "\n".join(lines) + "\n" + note


def run(config, workdir: str) -> dict:
  """ood task. config: classifier {...}, id_data {...}, ood_data {name: data cfg}, react_data (optional),
  methods, react_percentile, ash_percentile, scale_percentile, batch_size. Writes ood.json and ood.md."""
  if "openood_dir" in config and not config.openood_dir:  # (every list path derives from it: "/images_...")
    raise ValueError("set --config.openood_dir to OpenOOD's data folder (the one holding images_largescale/ and "
                     "benchmark_imglist/)")
  os.makedirs(workdir, exist_ok=True)
  module, variables = loading.load_classifier(config.classifier, data_cfg=config.id_data)
  bs = sharding.eval_batch_size(int(config.batch_size))
  g = lambda k, d: loading.cfg_get(config, k, d)
  react_cfg = g("react_data", None)
  result = evaluate_ood(
      module, variables, loading.iterate_batches(config.id_data, bs),
      {name: loading.iterate_batches(cfg, bs) for name, cfg in config.ood_data.items()},
      react_batches=loading.iterate_batches(react_cfg, bs) if react_cfg else None,
      methods=tuple(g("methods", DEFAULT_METHODS)), react_percentile=float(g("react_percentile", 90.0)),
      ash_percentile=float(g("ash_percentile", 90.0)), scale_percentile=float(g("scale_percentile", 85.0)))
  loading.write_json(os.path.join(workdir, "ood.json"), result)  # process 0 writes (every process holds it)
  loading.write_text(os.path.join(workdir, "ood.md"), markdown_table(result))
  loading.write_results(workdir, result, markdown_table(result))
  return result
