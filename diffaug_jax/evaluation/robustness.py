"""Robustness evaluation: Default, DiffAug-Ensemble (DE), DDA and DDA-SE modes over suites.

Functions usable from any JAX program (the digits demo, a notebook), independent of checkpoints and
data pipelines; all run sharded over the mesh (default: all devices) with one compilation per shape:

  evaluate_default(classify_fn, params, batches)                   -> {"accuracy", "n", ...}
  evaluate_de(classify_fn, params, eps_fn, score_params, batches)  -> {"accuracy", "cumulative",
                                                                       "members", "ts", ...}
  evaluate_dda(classify_fn, params, model_fn, score_params, batches) -> {"dda": {...}, "dda_se": {...}}

Callables take their parameters explicitly, so weights are jit arguments (never baked-in constants):
  classify_fn(params, x) -> logits (B, K), x float32 NHWC in [-1, 1];
  eps_fn(score_params, x_t, t) -> eps (B, H, W, C), t original timesteps (B,) int32;
  model_fn(score_params, x_t, t) -> full model output (eps, or eps + variance channels: learn_sigma).
Use `flax_classify_fn(module)` / `flax_eps_fn(module)` / `flax_model_fn(module)` to build them from Flax
modules; a closure that ignores its params argument (pass params=None) is fine for small models.
`batches` is any iterable of {"image" uint8 (B, H, W, C), "label" (B,), "mask" (B,)} (mask optional).

`run(config, workdir)` is the task entry of `evaluate.py` (config.task == "robustness").
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffaug_jax import augment
from diffaug_jax import diffusion
from diffaug_jax import sharding as shd
from diffaug_jax.evaluation import classify
from diffaug_jax.evaluation import dda as dda_lib
from diffaug_jax.evaluation import loading
# Re-exported (documented above, used from notebooks); the one implementation is in `loading`.
from diffaug_jax.evaluation.loading import (  # noqa: F401  pylint: disable=unused-import
    flax_classify_fn, flax_eps_fn, flax_model_fn)
from diffaug_jax.evaluation import suites as suites_lib

PyTree = Any
Batches = Iterable[Mapping[str, np.ndarray]]
MODES = ("default", "de", "dda", "dda_se")


# ------------------------------------------------------------------------------------- scoring


class Head:
  """Logits -> probabilities / predictions, with optional class-subset slicing (ImageNet-R/-A).

  head="subset": logits[:, subset] before the softmax, predictions index the subset.
  head="full": softmax over all classes; predictions are full-class indices.
  labels: "subset" or "full", the space the dataset's labels live in.
  """

  def __init__(self, class_subset: Sequence[int] | None = None, head: str = "subset",
               labels: str = "full"):
    if head not in ("subset", "full") or labels not in ("subset", "full"):
      raise ValueError(f"head/labels must be 'subset' or 'full', got {head!r}/{labels!r}")
    self.subset = None if class_subset is None else np.asarray(class_subset, np.int32)
    self.head, self.labels = head, labels

  def probs(self, logits: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    if self.subset is not None and self.head == "subset":
      logits = logits[:, jnp.asarray(self.subset)]
    return jax.nn.softmax(logits, axis=-1)

  def targets(self, labels: np.ndarray) -> np.ndarray:
    """Dataset labels -> the index space of the predictions."""
    labels = np.asarray(labels, np.int64)
    if self.subset is None:
      return labels
    if self.head == "subset" and self.labels == "full":
      pos = np.searchsorted(self.subset, labels)
      pos = np.clip(pos, 0, len(self.subset) - 1)
      if not np.all(self.subset[pos] == labels):
        bad = np.unique(labels[self.subset[pos] != labels])[:10]
        raise ValueError(f"labels {bad.tolist()} are not in the {len(self.subset)}-class subset")
      return pos
    if self.labels == "subset" and labels.size and (labels.min() < 0 or labels.max() >= len(self.subset)):
      raise ValueError(f"labels={self.labels!r} means labels index the {len(self.subset)}-class subset, but "
                       f"they range over [{labels.min()}, {labels.max()}]: are they 1000-way (labels='full')?")
    if self.head == "full" and self.labels == "subset":
      return self.subset[labels].astype(np.int64)
    return labels


def _entropy(p: jax.Array) -> jax.Array:
  return -jnp.sum(p * jnp.log(jnp.clip(p, 1e-12, 1.0)), axis=-1)


def _acc(pred: np.ndarray, target: np.ndarray) -> float:
  return float(np.mean(pred == target)) if len(target) else float("nan")


# ------------------------------------------------------------------------------------- step makers
# Each mode's outputs for a tuple of classifiers on one batch: the score model's work (a DE member's x0_hat,
# DDA's adaptation) is done once and every classifier reads it. The single-model step makers below and the
# joint step of `evaluate_models` are built from these.


def _default_outputs(fns, cls_params, x, head: Head) -> list[dict]:
  outs = []
  for fn, params in zip(fns, cls_params):
    p = head.probs(fn(params, x))
    outs.append({"pred": jnp.argmax(p, -1).astype(jnp.int32), "entropy": _entropy(p)})
  return outs


def _de_outputs(fns, cls_params, eps_fn, score_params, x, key, schedule: diffusion.Schedule,
                ts: tuple, head: Head) -> list[dict]:
  mean_probs, member_probs = augment.diffaug_ensemble(
      key, x, lambda im: tuple(_logits_as_probs_input(head, fn(params, im)) for fn, params in zip(fns, cls_params)),
      lambda x_t, t: eps_fn(score_params, x_t, t), schedule, ts=ts)
  outs = []
  for mean, members in zip(mean_probs, member_probs):
    cum = augment.cumulative_ensemble(members)
    outs.append({
        "pred": jnp.argmax(mean, -1).astype(jnp.int32),
        "member_pred": jnp.argmax(members, -1).T.astype(jnp.int32),   # (B, M)
        "cum_pred": jnp.argmax(cum, -1).T.astype(jnp.int32),          # (B, M)
        "member_entropy": _entropy(members).T,                        # (B, M)
    })
  return outs


def _logits_as_probs_input(head: Head, logits: jax.Array) -> jax.Array:
  """The core's ensemble softmaxes `classify_fn`'s output: hand it the (sub-)logits."""
  logits = logits.astype(jnp.float32)
  if head.subset is not None and head.head == "subset":
    logits = logits[:, jnp.asarray(head.subset)]
  return logits


def _dda_outputs(fns, cls_params, model_fn, score_params, x, key, mask, schedule: diffusion.Schedule,
                 head: Head, *, start_step: int, factor: int, scale: float, learn_sigma: bool, norm: str,
                 image_size: int | None) -> list[dict]:
  ref = x
  if image_size and x.shape[1] != image_size:
    # DDA's model runs at its own resolution (256); classify at the input resolution.
    ref = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), "cubic")
  adapted = dda_lib.dda_adapt(key, ref, lambda x_t, t: model_fn(score_params, x_t, t), schedule,
                              start_step=start_step, factor=factor, scale=scale,
                              learn_sigma=learn_sigma, norm=norm, mask=mask)
  adapted = jnp.clip(adapted, -1.0, 1.0)
  if adapted.shape != x.shape:
    adapted = jax.image.resize(adapted, x.shape, "cubic")
  outs = []
  for fn, params in zip(fns, cls_params):
    p_orig = head.probs(fn(params, x))
    p_dda = head.probs(fn(params, adapted))
    p_se = 0.5 * (p_orig + p_dda)
    outs.append({"pred": jnp.argmax(p_orig, -1).astype(jnp.int32),
                 "pred_dda": jnp.argmax(p_dda, -1).astype(jnp.int32),
                 "pred_dda_se": jnp.argmax(p_se, -1).astype(jnp.int32)})
  return outs


def default_step(classify_fn, head: Head):
  def step(params, x, key, mask):
    del key, mask
    return _default_outputs((classify_fn,), (params,), x, head)[0]
  return step


def de_step(classify_fn, eps_fn, schedule: diffusion.Schedule, ts: Sequence[int], head: Head):
  ts = tuple(int(t) for t in ts)

  def step(params, x, key, mask):
    del mask
    cls_params, score_params = params
    return _de_outputs((classify_fn,), (cls_params,), eps_fn, score_params, x, key, schedule, ts, head)[0]
  return step


def dda_step(classify_fn, model_fn, schedule: diffusion.Schedule, head: Head, *, start_step: int,
             factor: int, scale: float, learn_sigma: bool, norm: str, image_size: int | None):
  def step(params, x, key, mask):
    cls_params, score_params = params
    return _dda_outputs((classify_fn,), (cls_params,), model_fn, score_params, x, key, mask, schedule, head,
                        start_step=start_step, factor=factor, scale=scale, learn_sigma=learn_sigma, norm=norm,
                        image_size=image_size)[0]
  return step


def joint_step(classify_fns: Sequence[Callable], head: Head, modes: Sequence[str], *, eps_fn=None,
               model_fn=None, schedule: diffusion.Schedule | None = None, ts: Sequence[int] = (),
               dda_schedule: diffusion.Schedule | None = None, dda_kw: Mapping[str, Any] | None = None):
  """Every mode ("default", "de", "dda") of several classifiers from one read of a batch, sharing the score
  model's work. params = (tuple of classifier params, score params); outputs keyed "{j}/{mode}/{name}" for
  classifier j. With the same key, classifier j's outputs equal those of the single-model steps."""
  fns, ts = tuple(classify_fns), tuple(int(t) for t in ts)

  def step(params, x, key, mask):
    cls_params, score_params = params
    per_mode = {}
    if "default" in modes:
      per_mode["default"] = _default_outputs(fns, cls_params, x, head)
    if "de" in modes:
      per_mode["de"] = _de_outputs(fns, cls_params, eps_fn, score_params, x, key, schedule, ts, head)
    if "dda" in modes:
      per_mode["dda"] = _dda_outputs(fns, cls_params, model_fn, score_params, x, key, mask, dda_schedule,
                                     head, **dict(dda_kw or {}))
    # The runner gathers a flat dict of per-example arrays: one key per (classifier, mode, output).
    return {f"{j}/{mode}/{k}": v for mode, outs in per_mode.items() for j, o in enumerate(outs) for k, v in o.items()}
  return step


# ------------------------------------------------------------------------------------- results


def _default_result(out: Mapping[str, np.ndarray], h: Head) -> dict:
  target = h.targets(out["label"])
  return {"accuracy": _acc(out["pred"], target), "n": int(len(target)),
          "mean_entropy": float(np.mean(out["entropy"])) if len(target) else float("nan")}


def _de_result(out: Mapping[str, np.ndarray], h: Head, ts: Sequence[int]) -> dict:
  target = h.targets(out["label"])
  m = len(tuple(ts))
  return {
      "accuracy": _acc(out["pred"], target),
      "ts": [int(t) for t in ts],
      "members": [_acc(out["member_pred"][:, i], target) for i in range(m)],
      "cumulative": [_acc(out["cum_pred"][:, i], target) for i in range(m)],
      "member_entropy": [float(np.mean(out["member_entropy"][:, i])) for i in range(m)],
      "n": int(len(target)),
  }


def _dda_result(out: Mapping[str, np.ndarray], h: Head) -> dict:
  target = h.targets(out["label"])
  return {"dda": {"accuracy": _acc(out["pred_dda"], target)},
          "dda_se": {"accuracy": _acc(out["pred_dda_se"], target)},
          "default": {"accuracy": _acc(out["pred"], target)}, "n": int(len(target))}


# ------------------------------------------------------------------------------------- evaluators


def _key(key):
  return jax.random.key(0) if key is None else key


def evaluate_default(classify_fn, params: PyTree, batches: Batches, *, class_subset=None,
                     head: str = "subset", labels: str = "full", mesh=None, desc: str | None = None,
                     total: int | None = None, runner: classify.ShardedRunner | None = None) -> dict:
  """Plain classifier accuracy. Returns {"accuracy", "n", "mean_entropy"}."""
  h = Head(class_subset, head, labels)
  runner = runner or classify.ShardedRunner(default_step(classify_fn, h), mesh)
  return _default_result(runner.run(params, batches, _key(None), desc=desc, total=total), h)


def evaluate_de(classify_fn, params: PyTree, eps_fn, score_params: PyTree, batches: Batches, *,
                schedule: diffusion.Schedule | None = None, ts: Sequence[int] = augment.DEFAULT_ENSEMBLE_TS,
                key=None, class_subset=None, head: str = "subset", labels: str = "full", mesh=None,
                desc: str | None = None, total: int | None = None,
                runner: classify.ShardedRunner | None = None) -> dict:
  """DiffAug Ensemble. Returns {"accuracy" (full ensemble), "ts", "members" (accuracy of each member
  alone, in ts order), "cumulative" (accuracy of the first k members, k = 1..M; last == accuracy),
  "member_entropy" (mean prediction entropy per member: paper Fig. 2 when ts spans 0..999), "n"}."""
  schedule = diffusion.linear_schedule(1000) if schedule is None else schedule
  h = Head(class_subset, head, labels)
  runner = runner or classify.ShardedRunner(de_step(classify_fn, eps_fn, schedule, ts, h), mesh)
  out = runner.run((params, score_params), batches, _key(key), desc=desc, total=total)
  return _de_result(out, h, ts)


def evaluate_dda(classify_fn, params: PyTree, model_fn, score_params: PyTree, batches: Batches, *,
                 schedule: diffusion.Schedule | None = None, start_step: int = 50, factor: int = 4,
                 scale: float = 6.0, learn_sigma: bool = True, norm: str = "per_example",
                 image_size: int | None = None, key=None, class_subset=None, head: str = "subset",
                 labels: str = "full", mesh=None, desc: str | None = None, total: int | None = None,
                 runner: classify.ShardedRunner | None = None) -> dict:
  """DDA and DDA-SE in one pass (the adaptation is the expensive part; both read it).

  Returns {"dda": {"accuracy"}, "dda_se": {"accuracy"}, "default": {"accuracy"}, "n"}.
  `schedule`: default `respace(linear_schedule(1000), "100")`.
  """
  schedule = dda_lib.dda_schedule() if schedule is None else schedule
  h = Head(class_subset, head, labels)
  runner = runner or classify.ShardedRunner(
      dda_step(classify_fn, model_fn, schedule, h, start_step=start_step, factor=factor, scale=scale,
               learn_sigma=learn_sigma, norm=norm, image_size=image_size), mesh)
  out = runner.run((params, score_params), batches, _key(key), desc=desc, total=total)
  return _dda_result(out, h)


# ------------------------------------------------------------------------------------- suites


def _suite_summary(suite: str, per_set: Mapping[str, Mapping[str, Any]], modes: Sequence[str]
                   ) -> dict[str, Any]:
  """Average accuracy per mode over the suite's sets (+ mCE / CE for corruption suites). ImageNet-C's
  accuracy, mCE and accuracy by severity cover its 15 standard corruptions; extra corruptions asked for
  are reported apart ("accuracy_extra", "error_extra")."""
  out: dict[str, Any] = {}
  for mode in modes:
    accs = {name: r[mode]["accuracy"] for name, r in per_set.items() if mode in r}
    if not accs:
      continue
    kept = set(suites_lib.summary_sets(suite, accs))
    main = {k: a for k, a in accs.items() if k in kept}
    extra = {k: a for k, a in accs.items() if k not in kept}
    entry: dict[str, Any] = {"accuracy": float(np.mean(list(main.values())))}
    if extra:
      entry["accuracy_extra"] = float(np.mean(list(extra.values())))
    if suite in ("imagenet_c", "cifar10_c", "corrupted"):
      def by_corruption(sets):
        d: dict[str, dict[int, float]] = {}
        for name, a in sets.items():
          c, sev = name.split("/")
          d.setdefault(c, {})[int(sev)] = a
        return d
      entry.update(suites_lib.mce(by_corruption(accs), normalise=suite == "imagenet_c"))
      by_c = by_corruption(main)
      sevs = sorted({sev for d in by_c.values() for sev in d})
      entry["accuracy_by_severity"] = {
          str(sev): float(np.mean([d[sev] for d in by_c.values() if sev in d])) for sev in sevs}
    out[mode] = entry
  return out


def _dda_settings(dda_cfg: Mapping[str, Any], model: Mapping[str, Any]) -> tuple[diffusion.Schedule, dict]:
  """(respaced schedule, dda_adapt keywords) from config.dda; defaults are the paper's setting."""
  kw = dict(start_step=int(dda_cfg.get("start_step", 50)), factor=int(dda_cfg.get("factor", 4)),
            scale=float(dda_cfg.get("scale", 6.0)), learn_sigma=bool(model.get("learn_sigma", True)),
            norm=str(dda_cfg.get("norm", "per_example")), image_size=int(dda_cfg.get("image_size", 0)) or None)
  # (respaced from the score model's own schedule: a cosine 4000-step model is not a linear 1000 one)
  sched = model.get("dda_schedule") or dda_lib.dda_schedule(spacing=str(dda_cfg.get("spacing", "100")),
                                                            base=model.get("schedule"))
  return sched, kw


def _need(model, keys, mode):
  missing = [k for k in keys if model.get(k) is None]
  if missing:
    raise ValueError(f"mode {mode!r} needs a score model: model {model.get('name')!r} lacks {missing} "
                     f"(set config.score.params_path and config.score.preset)")


_SCORE_OBJECTS = ("eps_fn", "model_fn", "score_params", "schedule", "dda_schedule")


def _score_groups(models: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
  """Models grouped by the score model they use (the same objects), in order of first appearance."""
  groups: dict[tuple, list] = {}
  for m in models:
    k = tuple(id(m.get(f)) for f in _SCORE_OBJECTS) + (bool(m.get("learn_sigma", True)),)
    groups.setdefault(k, []).append(m)
  return list(groups.values())


def _evaluate_group(group: Sequence[Mapping[str, Any]], evalsets, modes: Sequence[str], *,
                    make_batches: Callable, cfg: Mapping[str, Any], mesh, key, runners: dict
                    ) -> dict[str, dict[str, Any]]:
  """Every mode of every model of one score group, one pass over each set (see `evaluate_models`).
  Returns {model name: {suite: {"sets": {set_name: {mode: result, "seconds", "unreadable"}}, ...}}}."""
  m0 = group[0]
  run_modes = tuple(m for m in ("default", "de", "dda") if m in modes or (m == "dda" and "dda_se" in modes))
  for m in group:
    if "de" in run_modes:
      _need(m, ("eps_fn", "score_params"), "de")
    if "dda" in run_modes:
      _need(m, ("model_fn", "score_params"), "dda")
  ts = tuple(int(t) for t in dict(cfg.get("de", {})).get("ts", augment.DEFAULT_ENSEMBLE_TS))
  dda_sched, dda_kw = _dda_settings(dict(cfg.get("dda", {})), m0) if "dda" in run_modes else (None, {})
  fns = tuple(m["classify_fn"] for m in group)
  uses_score = bool({"de", "dda"} & set(run_modes))
  # Placed once for every runner of the group (their heads differ per suite, e.g. ImageNet-R / -A): the
  # runners then find the weights replicated already and make no copy of a 2 GB score model of their own.
  params = shd.replicate((tuple(m["params"] for m in group), m0["score_params"] if uses_score else None), mesh)
  fkey = (run_modes, ts, tuple(sorted(dda_kw.items())), tuple(id(f) for f in fns), id(m0.get("eps_fn")),
          id(m0.get("model_fn")), id(m0.get("schedule")), id(dda_sched))
  names = ", ".join(m["name"] for m in group)
  results: dict[str, dict[str, Any]] = {m["name"]: {} for m in group}
  for i, es in enumerate(evalsets):
    h = Head(es.class_subset, es.head, es.labels)
    # The compiled step closes over the Head, so the key holds the subset itself (ImageNet-R and -A differ).
    rk = (es.class_subset, es.head, es.labels) + fkey
    if rk not in runners:
      runners[rk] = classify.ShardedRunner(
          joint_step(fns, h, run_modes, eps_fn=m0.get("eps_fn"), model_fn=m0.get("model_fn"),
                     schedule=m0.get("schedule"), ts=ts, dda_schedule=dda_sched, dda_kw=dda_kw), mesh)
    batches, total = make_batches(es)
    t0 = time.time()
    out = runners[rk].run(params, batches, jax.random.fold_in(key, i), total=total,
                          desc=f"{names} {es.suite}:{es.name} [{'+'.join(run_modes)}]")
    seconds = round(time.time() - t0, 3)
    num_examples = getattr(batches, "num_examples", None)
    for j, m in enumerate(group):
      def part(mode, j=j):
        prefix = f"{j}/{mode}/"
        return {"label": out["label"], **{k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}}
      per_mode: dict[str, Any] = {}
      if "default" in run_modes:
        per_mode["default"] = _default_result(part("default"), h)
      if "de" in run_modes:
        per_mode["de"] = _de_result(part("de"), h, ts)
      if "dda" in run_modes:
        r = _dda_result(part("dda"), h)
        per_mode["dda"], per_mode["dda_se"] = dict(r["dda"], n=r["n"]), dict(r["dda_se"], n=r["n"])
      per_mode["seconds"] = seconds  # the one pass: every mode of every model of the group
      if num_examples is not None:
        # left out of the score (logged by name)
        per_mode["unreadable"] = int(num_examples) - int(len(out["label"]))
      suite = results[m["name"]].setdefault(es.suite, {"sets": {}, "source": dict(es.source)})
      if es.suite == "imagenet_c":
        # Record which ImageNet-C was read: the two differ slightly (REFERENCE.md).
        suite["imagenet_c_release"] = ("official JPEG release (folder)" if es.source["kind"] == "folder"
                                       else "TFDS imagenet2012_corrupted (regenerated)")
      suite["sets"][es.name] = per_mode
  return results


def evaluate_models(models: Sequence[Mapping[str, Any]], suite_specs: Mapping[str, Mapping[str, Any]],
                    modes: Sequence[str], *, make_batches: Callable, cfg: Mapping[str, Any] | None = None,
                    mesh=None, key=None, data_dir: str = "") -> dict[str, Any]:
  """Several models x suites x modes -> one results dict {"models": {name: {suite: ...}}, ...}.

  `models`: dicts with name, classify_fn, params and (for de/dda) eps_fn / model_fn, score_params, schedule,
  learn_sigma (`load_models` builds them). Models that use the same score model (the same objects) are
  evaluated together: each set is read once for all modes, and each DE member's x0_hat and each DDA
  adaptation are computed once and scored by every classifier (the score model is ~99% of the cost).
  Models with the same classify_fn object (same architecture) share one compiled program. A model's
  results equal its single-model `evaluate_default` / `evaluate_de` / `evaluate_dda` with the set's key
  `fold_in(key, set index)`."""
  cfg = dict(cfg or {})
  bad = [m for m in modes if m not in MODES]
  if bad:
    raise ValueError(f"unknown mode(s) {bad}; known: {MODES}")
  evalsets = []
  for name, opts in suite_specs.items():
    evalsets += suites_lib.expand_suite(name, opts, data_dir=data_dir)
  out = {"modes": list(modes), "suites": {k: dict(v) for k, v in suite_specs.items()}, "models": {}}
  names = [m["name"] for m in models]
  if len(set(names)) != len(names):
    raise ValueError(f"model names must be unique, got {names}")
  mesh = shd.make_mesh() if mesh is None else mesh
  key = _key(key)
  runners: dict = {}
  per_model: dict[str, Any] = {}
  for group in _score_groups(models):
    per_model.update(_evaluate_group(group, evalsets, modes, make_batches=make_batches, cfg=cfg, mesh=mesh,
                                     key=key, runners=runners))
  done = set(modes) | ({"dda", "dda_se"} if {"dda", "dda_se"} & set(modes) else set())
  for name in names:  # in the order given
    for suite_name, suite in per_model[name].items():
      suite["summary"] = _suite_summary(suite_name, suite["sets"], [m for m in MODES if m in done])
    out["models"][name] = per_model[name]
  return out


# ------------------------------------------------------------------------------------- task entry


def _to_dict(x):
  if hasattr(x, "to_dict"):
    return x.to_dict()
  return dict(x)


def load_models(config) -> list[dict[str, Any]]:
  """config.models: list of {name, workdir[, step]} (train.py runs) or {name, arch, num_classes, params_path}
  (converted weights), loaded by `loading.load_classifier`. config.score (optional, needed by de/dda):
  see `loading.load_score`. Returns model dicts for `evaluate_models`."""
  score_spec = config.get("score", {}) or {}
  data_cfg = config.get("data", None)
  score_fns = {}
  if loading.has_score(score_spec):
    score = loading.load_score(score_spec)
    score_fns = dict(eps_fn=score.eps_fn, model_fn=score.model_fn, score_params=score.variables,
                     schedule=score.schedule, learn_sigma=score.learn_sigma)
  models = []
  shared: dict[str, Any] = {}  # one classify_fn per architecture -> one compilation for all its models
  for spec in config.models:
    spec = _to_dict(spec)
    module, variables = loading.load_classifier(spec, what=f"model {spec.get('name')!r}", data_cfg=data_cfg)
    arch = repr(module)
    if arch not in shared:
      shared[arch] = loading.flax_classify_fn(module)
    m = {"name": spec.get("name") or os.path.basename(os.path.normpath(spec.get("workdir", "model"))),
         "classify_fn": shared[arch], "params": variables}
    m.update(score_fns)
    models.append(m)
  return models


def run(config, workdir: str) -> dict:
  """evaluate.py task: config.models x config.suites x config.modes -> results.json, results.md, PNGs."""
  from diffaug_jax.evaluation import figures, tables  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  models = load_models(config)
  base_data = config.data
  batch_size = shd.eval_batch_size(int(config.get("batch_size", 256)))

  def make_batches(es):
    return suites_lib.make_batches(es, base_data, batch_size=batch_size)

  suite_specs = {k: _to_dict(v) for k, v in _to_dict(config.suites).items()}
  results = evaluate_models(models, suite_specs, list(config.modes), make_batches=make_batches,
                            cfg=_to_dict(config), key=jax.random.key(int(config.get("seed", 0))),
                            data_dir=str(base_data.get("data_dir", "")))
  results["config"] = json.loads(config.to_json()) if hasattr(config, "to_json") else {}
  results["device"] = {"backend": jax.default_backend(), "count": jax.device_count()}
  md = tables.results_table(results)
  loading.write_results(workdir, results, md, default=float)
  if jax.process_index() == 0:
    print(md)
  if "de" in config.modes:
    figures.de_curve_figure(results, os.path.join(workdir, "de_curve.png"))
  fig_cfg = _to_dict(config.get("figures", {}) or {})
  m0 = models[0] if models else {}
  if m0.get("eps_fn") is not None and (fig_cfg.get("augmentation_grid") or fig_cfg.get("entropy_vs_t")):
    batches, _ = make_batches(suites_lib.expand_suite("clean", {}, data_dir="")[0])
    first = next(iter(batches))
    if fig_cfg.get("augmentation_grid"):
      images = np.asarray(first["image"])[: int(fig_cfg.get("num_images", 6))]
      figures.augmentation_grid(images, m0["eps_fn"], m0["score_params"], m0["schedule"],
                                os.path.join(workdir, "diffaug_grid.png"))
    if fig_cfg.get("entropy_vs_t"):
      # Paper Fig. 2: mean entropy of each model's softmax on DiffAug samples at each t (one batch per
      # model; `entropy_batches` batches of the clean set).
      ts = tuple(int(t) for t in fig_cfg.get("entropy_ts", tuple(range(0, 1000, 50))))
      nb = int(fig_cfg.get("entropy_batches", 1))
      curves = {}
      for m in models:
        b, _ = make_batches(suites_lib.expand_suite("clean", {}, data_dir="")[0])
        b = [x for _, x in zip(range(nb), b)]
        r = evaluate_de(m["classify_fn"], m["params"], m["eps_fn"], m["score_params"], b,
                        schedule=m["schedule"], ts=ts, key=jax.random.key(1))
        curves[m["name"]] = (ts, r["member_entropy"])
      results["entropy_vs_t"] = {k: {"ts": list(v[0]), "entropy": list(v[1])} for k, v in curves.items()}
      loading.write_json(os.path.join(workdir, "results.json"), results, default=float)
      figures.entropy_vs_t_figure(curves, os.path.join(workdir, "entropy_vs_t.png"))
  return results
