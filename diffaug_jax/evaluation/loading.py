"""Loading for the evaluation tasks: classifiers, score models and data from config specs; common outputs.

One implementation shared by every task module (robustness, certify, ood, pag, da_classifier):

  load_classifier(spec)  -> (module, variables)
      spec {workdir[, step]} (a train.py run, `checkpoint.load_trained_classifier`) or
      {arch | name, num_classes, kwargs, params_path} (converted weights, `convert.common.load_params`).
  load_score(spec)       -> ScoreModel(module, variables, schedule, learn_sigma, eps_fn, model_fn)
      spec {workdir} (a score-mode train.py run) or {params_path, preset, overrides}; schedule "linear"
      (default) | "cosine" with num_timesteps (default 1000); dtype "" | "bfloat16" | "float16".
  load_arrays / iterate_batches / synthetic_ood_arrays / data_config: small evaluation data subsets.
  write_results / write_rows: evaluate.py's results.json + results.md, Cohen-format certify TSVs.
  set_aside_earlier_outputs(workdir, config): moves an earlier evaluation's outputs to workdir/earlier/<n>/.

Callables are param-first so weights stay jit ARGUMENTS (never baked-in constants):
  flax_classify_fn(module)(variables, x) -> logits (B, K), x float32 NHWC in [-1, 1];
  flax_eps_fn(module)(variables, x_t, t) -> eps; flax_model_fn(module)(variables, x_t, t) -> full output,
  built on `models.score.make_eps_fn` / `make_model_fn`.

`spec` / config arguments may be dicts, ml_collections.ConfigDicts or attribute objects (`cfg_get`).
Heavy dependencies (checkpoint/orbax, the data package/grain/TFDS, convert) are imported lazily.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffaug_jax import diffusion, metrics, sharding

PyTree = Any


def cfg_get(config, name: str, default=None):
  """config[name] (dict / ConfigDict) or config.name (attribute object), else `default`."""
  try:
    return config[name] if name in config else default
  except TypeError:
    return getattr(config, name, default)


class _AttrDict(dict):
  __getattr__ = dict.__getitem__


# ------------------------------------------------------------------------------------- callables


def flax_classify_fn(module) -> Callable[[PyTree, jax.Array], jax.Array]:
  """(variables, x) -> logits for a Flax classifier (eval mode)."""
  return lambda variables, x: module.apply(variables, x, train=False)


def flax_eps_fn(module, *, dtype=None) -> Callable:
  """(variables, x_t, t) -> eps for the score UNet (`models.score.make_eps_fn`)."""
  from diffaug_jax.models import score  # pylint: disable=g-import-not-at-top
  return lambda variables, x_t, t: score.make_eps_fn(module, variables, dtype=dtype)(x_t, t)


def flax_model_fn(module, *, dtype=None) -> Callable:
  """(variables, x_t, t) -> full model output (eps + variance channels with learn_sigma)."""
  from diffaug_jax.models import score  # pylint: disable=g-import-not-at-top
  return lambda variables, x_t, t: score.make_model_fn(module, variables, dtype=dtype)(x_t, t)


# ------------------------------------------------------------------------------------- classifiers


CLASSIFIER_SPEC_KEYS = ("name", "workdir", "step", "arch", "num_classes", "kwargs", "params_path")
SCORE_SPEC_KEYS = ("kind", "workdir", "params_path", "preset", "overrides", "dtype", "schedule", "num_timesteps")


def _check_spec_keys(spec, known: tuple[str, ...], what: str) -> None:
  """A misspelled key (`setp` for `step`) would silently fall back to a default: refuse it."""
  keys = spec.keys() if hasattr(spec, "keys") else ()
  unknown = sorted(set(keys) - set(known))
  if unknown:
    raise ValueError(f"{what}: unknown key(s) {unknown}; known: {', '.join(known)}")


def load_classifier(spec, *, what: str = "config.classifier", data_cfg=None) -> tuple[Any, PyTree]:
  """(module, variables) from {workdir[, step]} or {arch | name, num_classes, kwargs, params_path}.

  `arch` names the architecture when both are given (robustness specs use `name` as the display name);
  `what` names the spec in the error message. With `data_cfg`, a train.py run is checked against the data
  it will be evaluated on: a classifier fed images of another size or channel count would still run
  (global pooling) and report a silently wrong accuracy, so a mismatch is an error instead.
  """
  _check_spec_keys(spec, CLASSIFIER_SPEC_KEYS, what)
  if cfg_get(spec, "workdir"):
    from diffaug_jax import checkpoint  # pylint: disable=g-import-not-at-top
    workdir = cfg_get(spec, "workdir")
    module, variables, train_cfg = checkpoint.load_trained_classifier(workdir, cfg_get(spec, "step"))
    if data_cfg is not None:
      _check_image_shape(train_cfg, data_cfg, what, workdir)
      _check_num_classes(module, variables, data_cfg, what, workdir)
    return module, variables
  arch = cfg_get(spec, "arch") or cfg_get(spec, "name")
  if not (cfg_get(spec, "params_path") and arch and cfg_get(spec, "num_classes")):
    raise ValueError(f"{what}: give `workdir` (a train.py run) or `params_path` + `arch` (or `name`) + "
                     f"`num_classes`")
  from diffaug_jax.convert.common import load_params  # pylint: disable=g-import-not-at-top
  from diffaug_jax.models.classifiers import get_classifier  # pylint: disable=g-import-not-at-top
  module = get_classifier(arch, int(cfg_get(spec, "num_classes")), **dict(cfg_get(spec, "kwargs", {}) or {}))
  variables = load_params(cfg_get(spec, "params_path"))
  shape = _image_shape(data_cfg) if data_cfg is not None else None
  if shape:  # every key and shape against the model now, not a flax error inside the first jit
    from diffaug_jax import checkpoint  # pylint: disable=g-import-not-at-top
    want = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, shape[0], shape[0], shape[1])),
                                              train=False))
    checkpoint.check_variables(variables, dict(want), cfg_get(spec, "params_path"))
    _check_num_classes(module, variables, data_cfg, what, cfg_get(spec, "params_path"))
  return module, variables


def _image_shape(data_cfg) -> tuple[int, int] | None:
  size, channels = cfg_get(data_cfg, "image_size"), cfg_get(data_cfg, "channels")
  return None if not size or not channels else (int(size), int(channels))


def _check_num_classes(module, variables, data_cfg, what: str, source: str) -> None:
  """A classifier whose outputs do not match the data's classes still runs and reports a silently wrong
  accuracy (a 4-way model never predicts labels 4-9; a 1000-way one is scored against 10-way labels)."""
  shape = _image_shape(data_cfg)
  if not shape:
    return
  from diffaug_jax.data import config as data_config_lib  # pylint: disable=g-import-not-at-top
  cfg = data_config(data_cfg)
  try:
    want = data_config_lib.num_classes(cfg)
  except (FileNotFoundError, ValueError):  # e.g. an eval-only folder tree (no train split): checked below
    want = None
  x = jax.ShapeDtypeStruct((1, shape[0], shape[0], shape[1]), jnp.float32)
  got = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x).shape[-1]
  if want is not None and got != want:
    raise ValueError(f"{what}: the classifier from {source} has {got} outputs but the evaluation data has "
                     f"{want} classes (data.num_classes / data.class_names / the dataset's labels): its scores "
                     "would be meaningless; evaluate it on the data it was trained for")
  _check_self_labelled_folders(cfg, cfg_get(data_cfg, "split") or cfg.eval_split, got, what, source)


def _check_self_labelled_folders(cfg, split: str, got: int, what: str, source: str) -> None:
  """An image tree with neither data.class_names nor a train split numbers its own class folders 0..n-1 (or
  int(name) for numeric folders). That is the classifier's labelling only if the tree has all its classes: a
  tree lacking one shifts every later label by one and reports a wrong accuracy without an error."""
  if cfg.source != "folder" or cfg.get("class_names", ""):
    return
  from diffaug_jax.data import config as data_config_lib  # pylint: disable=g-import-not-at-top
  if data_config_lib.train_class_names(cfg) is not None:
    return  # labelled by the train split's classes
  root = data_config_lib.folder_root(cfg, split)
  dirs = data_config_lib.class_folders(root) if os.path.isdir(root) else []
  if not dirs:
    return  # the loader says what is missing
  if all(d.isdigit() for d in dirs):
    if max(int(d) for d in dirs) < got:
      return  # label int(name): any subset of the classifier's indices is right
    raise ValueError(f"{what}: {root} has class folders up to {max(int(d) for d in dirs)} (labelled by their "
                     f"numbers) but the classifier from {source} has {got} outputs")
  if len(dirs) != got:
    raise ValueError(
        f"{what}: {root} has no train split beside it, so its {len(dirs)} class folders would be labelled "
        f"0..{len(dirs) - 1} in sorted order, but the classifier from {source} has {got} outputs: the labels "
        "would not be its classes. Set data.class_names to the classifier's classes in training order (a "
        "text file with one per line, a comma-separated list, or 'imagenet2012')")


def _check_image_shape(train_cfg, data_cfg, what: str, workdir: str) -> None:
  trained = _image_shape(cfg_get(train_cfg, "data", {}) or {})
  evaluated = _image_shape(data_cfg)
  if trained and evaluated and trained != evaluated:
    raise ValueError(
        f"{what}: the classifier in {workdir} was trained on {trained[0]}x{trained[0]}x{trained[1]} images "
        f"(its config.json) but the evaluation data yields {evaluated[0]}x{evaluated[0]}x{evaluated[1]}: "
        "set the evaluation config's data.image_size / data.channels to match")


# ------------------------------------------------------------------------------------- score model


class ScoreModel(NamedTuple):
  """A frozen score model: pass `variables` as the first argument of eps_fn / model_fn."""
  module: Any
  variables: PyTree
  schedule: diffusion.Schedule
  learn_sigma: bool
  eps_fn: Callable  # (variables, x_t, t) -> eps (B, H, W, C) float32
  model_fn: Callable  # (variables, x_t, t) -> full output (B, H, W, C or 2C) float32


# "float32" keeps the module's own compute dtype (as the robustness task always did).
_DTYPES = {"": None, "none": None, "float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def has_score(spec) -> bool:
  """Whether `spec` (config.score, possibly None / empty) names a score model."""
  return bool(spec) and bool(cfg_get(spec, "workdir") or cfg_get(spec, "params_path"))


def load_score(spec) -> ScoreModel:
  """ScoreModel from config.score: {workdir} of a score-mode train run or {params_path, preset, overrides}
  of converted weights; schedule "linear" (default) | "cosine" over num_timesteps (default 1000); dtype
  (compute dtype of eps_fn / model_fn: "" = the module's, "bfloat16", "float16")."""
  if not has_score(spec):
    raise ValueError("no score model given: set config.score.workdir or config.score.params_path")
  _check_spec_keys(spec, SCORE_SPEC_KEYS, "config.score")
  from diffaug_jax import checkpoint  # pylint: disable=g-import-not-at-top
  steps = int(cfg_get(spec, "num_timesteps", 1000) or 1000)
  kind = cfg_get(spec, "schedule", "linear") or "linear"
  if kind not in ("linear", "cosine"):
    raise ValueError(f"config.score.schedule must be 'linear' or 'cosine', got {kind!r}")
  module, params = checkpoint.load_score_model(
      workdir=cfg_get(spec, "workdir") or None, params_path=cfg_get(spec, "params_path") or None,
      preset=cfg_get(spec, "preset") or None, overrides=dict(cfg_get(spec, "overrides", {}) or {}),
      schedule=(kind, steps))
  variables = params if "params" in params else {"params": params}
  schedule = diffusion.cosine_schedule(steps) if kind == "cosine" else diffusion.linear_schedule(steps)
  dtype_name = str(cfg_get(spec, "dtype", "") or "").lower()
  if dtype_name not in _DTYPES:
    raise ValueError(f"config.score.dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
  dtype = _DTYPES[dtype_name]
  learn_sigma = int(module.out_channels) == 2 * int(module.in_channels)
  # Frozen: weights held in the compute dtype (cast once; the same outputs as casting inside every call).
  from diffaug_jax.models import score  # pylint: disable=g-import-not-at-top
  variables = {**variables, "params": score.frozen_params_for_compute(module, variables["params"], dtype)}
  return ScoreModel(module, variables, schedule, learn_sigma, flax_eps_fn(module, dtype=dtype),
                    flax_model_fn(module, dtype=dtype))


# ------------------------------------------------------------------------------------- data

_OWN_DATA_KEYS = ("split", "max_examples", "skip", "path")


def data_config(data_cfg):
  """The data package's config (diffaug_jax.data.default_config) updated with data_cfg's fields, minus the
  evaluation-only ones (split, max_examples, skip, path)."""
  from diffaug_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  cfg = data_lib.default_config()
  with cfg.unlocked():
    for k in data_cfg.keys():
      if k not in _OWN_DATA_KEYS:
        cfg[k] = data_cfg[k]
  return cfg


def load_arrays(data_cfg, *, split: str | None = None, return_indices: bool = False) -> tuple[np.ndarray, ...]:
  """(images float32 (N, H, W, C) in [-1, 1], labels int32 (N,)[, indices int64 (N,) into the split]) for a
  small evaluation subset.

  data_cfg: the data package's fields (source "digits" | "tfds" | "folder", name, data_dir, eval_split,
  image_size, channels, eval_transform, ...; see `diffaug_jax/data/config.py`), plus
  split (default eval_split), skip (every skip-th example, Cohen's convention), max_examples (0 = all);
  or source "npz" with `path` holding arrays `image` (uint8 NHWC) and `label`; or source "synthetic"
  (`synthetic_ood_arrays`).
  Examples are read by random access (`data.make_source`) and the deterministic eval transform.
  """
  skip = int(cfg_get(data_cfg, "skip", 1) or 1)
  cap = int(cfg_get(data_cfg, "max_examples", 0) or 0)

  def out(images, labels, indices):
    if cap:
      images, labels, indices = images[:cap], labels[:cap], indices[:cap]
    return (images, labels, np.asarray(indices, np.int64)) if return_indices else (images, labels)

  if cfg_get(data_cfg, "source") == "synthetic":
    images, labels = synthetic_ood_arrays(data_cfg)
    return out(images[::skip], labels[::skip], np.arange(0, len(images), skip))
  if cfg_get(data_cfg, "source") == "npz":
    if not cfg_get(data_cfg, "path"):
      raise ValueError("data source 'npz' needs `path` (an .npz with arrays image (uint8 NHWC) and label)")
    with np.load(cfg_get(data_cfg, "path")) as z:
      n = len(z["label"])
      if z["image"].dtype != np.uint8 or z["image"].ndim != 4 or len(z["image"]) != n:
        raise ValueError(f"{cfg_get(data_cfg, 'path')}: `image` must be uint8 (N, H, W, C) with one label "
                         f"each, got {z['image'].dtype} {z['image'].shape} for {n} labels (float images "
                         "in [0, 1] would read as a constant -1)")
      images = z["image"][::skip].astype(np.float32) / 127.5 - 1.0
      labels = z["label"][::skip].astype(np.int32)
    return out(images, labels, np.arange(0, n, skip))
  from diffaug_jax.data import pipeline, sources, transforms  # pylint: disable=g-import-not-at-top
  cfg = data_config(data_cfg)
  split = split or cfg_get(data_cfg, "split") or cfg.eval_split
  src = pipeline.make_source(cfg, split)
  transform = transforms.make_eval_transform(
      cfg.eval_transform, int(cfg.image_size), resize_size=int(cfg.get("resize_size", 0) or 0) or None)
  idx = np.arange(0, len(src), skip)
  if cap:
    idx = idx[:cap]
  images, labels, kept = [], [], []
  for i in idx:
    ex = src.load_or_none(int(i))
    if ex is None:  # unreadable (logged): left out, not replaced by a copy of its neighbour
      continue
    images.append(transform(sources.to_channels(ex["image"], int(cfg.channels))))
    labels.append(int(ex["label"]))
    kept.append(int(i))
  if not images:
    raise ValueError(f"no examples in {cfg.source}:{cfg.name} split {split!r}")
  return out(np.stack(images).astype(np.float32) / 127.5 - 1.0, np.asarray(labels, np.int32), kept)


def synthetic_ood_arrays(data_cfg) -> tuple[np.ndarray, np.ndarray]:
  """Offline OOD stand-ins for the embedded demo (labels -1), from the digits test split (same size/channels):
  kind "pixel_shuffle" (each digit's pixels randomly permuted: same intensity histogram, no digit shape) or
  "uniform_noise" (uniform pixels). `seed` fixes them."""
  kind = cfg_get(data_cfg, "kind", "pixel_shuffle")
  base = {"source": "digits", "image_size": int(cfg_get(data_cfg, "image_size", 16)),
          "channels": int(cfg_get(data_cfg, "channels", 1)), "split": "test"}
  images, _ = load_arrays(_AttrDict(base))
  rng = np.random.default_rng(int(cfg_get(data_cfg, "seed", 0)))
  if kind == "pixel_shuffle":
    flat = images.reshape(len(images), -1, images.shape[-1])
    out = np.stack([f[rng.permutation(f.shape[0])] for f in flat]).reshape(images.shape)
  elif kind == "uniform_noise":
    out = rng.integers(0, 256, images.shape).astype(np.float32) / 127.5 - 1.0
  else:
    raise ValueError(f"unknown synthetic OOD kind {kind!r}: use pixel_shuffle or uniform_noise")
  return out.astype(np.float32), np.full(len(out), -1, np.int32)


def iterate_batches(data_cfg, batch_size: int, *, split: str | None = None, process_index: int | None = None,
                    process_count: int | None = None):
  """Streams THIS process's rows of each global batch of `batch_size`: {"image", "label", "mask"} (padded,
  mask 0 on padding). Images are the loader's uint8 (a quarter of float32's bytes to the device; convert there
  with `classify.uint8_to_model`), or float32 [-1, 1] from npz / synthetic arrays. Data sets go through
  `data.make_eval_loader`; npz / synthetic sources are batched
  in memory. max_examples caps the count to the split's first examples. Every process yields the same
  number of batches (the sharded forward is a collective); `classify.ShardedRunner` reassembles them."""
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if batch_size % pc:
    raise ValueError(f"eval batch_size {batch_size} must be divisible by the {pc} processes")
  local = batch_size // pc
  if cfg_get(data_cfg, "source") in ("npz", "synthetic"):
    images, labels = load_arrays(data_cfg, split=split)
    for start in range(0, len(images), batch_size):  # process p takes rows [p * local, (p + 1) * local)
      lo = min(start + pi * local, len(images))
      rows = slice(lo, min(lo + local, start + batch_size, len(images)))
      batch, mask = sharding.pad_to_multiple({"image": images[rows], "label": labels[rows]}, local)
      if not len(mask):  # nothing left for this process in the last batch: a full padding batch
        batch = {"image": np.zeros((local,) + images.shape[1:], images.dtype),
                 "label": np.zeros((local,), labels.dtype)}
        mask = np.zeros((local,), np.float32)
      yield {**batch, "mask": mask}
    return
  from diffaug_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  cfg = data_config(data_cfg)
  loader = data_lib.make_eval_loader(cfg, split or cfg_get(data_cfg, "split") or None,
                                     global_batch_size=batch_size, process_index=pi, process_count=pc)
  cap = int(cfg_get(data_cfg, "max_examples", 0) or 0)
  num_batches = loader.num_batches
  if cap:  # the split's first `cap` examples: global batches hold examples in order (see EvalLoader)
    num_batches = min(num_batches, -(-cap // batch_size))
  for i, batch in enumerate(loader):
    if i >= num_batches:
      return
    mask = np.asarray(batch["mask"], np.float32)
    if cap:
      mask = mask * (np.asarray(batch["index"]) < cap)
    yield {"image": batch["image"], "label": batch["label"], "mask": mask}


# ------------------------------------------------------------------------------------- outputs


def is_primary() -> bool:
  """Whether this process writes the outputs. Every process computes the same gathered results; process 0
  alone writes them, so N processes never race on one file in shared storage."""
  return jax.process_index() == 0


def write_json(path: str, obj: Any, *, default: Callable | None = None) -> None:
  if is_primary():  # (encoded before the file is touched: an unencodable value leaves the old file whole)
    metrics.write_text_atomic(path, json.dumps(obj, indent=1, default=default))


def write_text(path: str, text: str) -> None:
  if is_primary():
    metrics.write_text_atomic(path, text)


def write_results(workdir: str, result: dict, markdown: str, *, default: Callable | None = None) -> None:
  """evaluate.py's common outputs: results.json (every number) and results.md (process 0 only).
  `default`: json.dump's fallback for values it cannot encode (e.g. `float` for numpy scalars)."""
  write_json(os.path.join(workdir, "results.json"), result, default=default)
  write_text(os.path.join(workdir, "results.md"), markdown)


def write_rows(rows: list[dict], path: str) -> None:
  """Certify rows -> Cohen et al.'s TSV (idx, label, predict, radius, correct, time); process 0 only."""
  if not is_primary():
    return
  with open(path, "w") as f:
    f.write("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    for r in rows:
      f.write(f"{r['index']}\t{r['label']}\t{r['prediction']}\t{r['radius']:.4f}\t{r['correct']}\t"
              f"{r['seconds']:.4f}\n")


# Every top-level file an evaluation task writes into its workdir (fnmatch patterns): keep in step with the
# task modules (tests/test_eval_entry.py checks their `os.path.join(workdir, ...)` names against this list).
OUTPUT_FILES = (
    "results.json", "results.md",  # every task (write_results)
    "de_curve.png", "diffaug_grid.png", "entropy_vs_t.png",  # robustness
    "certify.json", "certify.md", "certify.png", "certify_sigma*.tsv",  # certify
    "ood.json", "ood.md",  # ood
    "pag.json", "pag.png",  # pag
    "da_classifier.json", "da_classifier.md", "guided_*.png",  # da_classifier
    "noisy_classifier.msgpack", "noisy_classifier.msgpack.sha256",  # da_classifier's trained classifiers
    "da_classifier.msgpack", "da_classifier.msgpack.sha256",
)
EARLIER_DIR = "earlier"


def _config_paths(config) -> set[str]:
  """Real paths of the existing files / folders the config's strings name (and their .sha256 sidecars):
  what this evaluation may read, e.g. a classifier params file that an earlier da_classifier run wrote."""
  out: set[str] = set()

  def walk(x):
    if hasattr(x, "to_dict"):
      x = x.to_dict()
    if isinstance(x, dict):
      for v in x.values():
        walk(v)
    elif isinstance(x, (list, tuple)):
      for v in x:
        walk(v)
    elif isinstance(x, (str, os.PathLike)) and str(x) and os.path.exists(x):
      real = os.path.realpath(x)
      out.update((real, real + ".sha256"))

  walk(config)
  return out


def earlier_outputs(workdir: str, config=None) -> list[str]:
  """Names of the files in `workdir` an evaluation task writes (OUTPUT_FILES), minus any the config names
  (read by this evaluation), sorted."""
  if not os.path.isdir(workdir):
    return []
  keep = _config_paths(config) if config is not None else set()
  names = []
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name)
    if (any(fnmatch.fnmatchcase(name, p) for p in OUTPUT_FILES) and os.path.isfile(path)
        and os.path.realpath(path) not in keep):
      names.append(name)
  return names


def set_aside_earlier_outputs(workdir: str, config=None) -> str | None:
  """Before an evaluation writes into `workdir`: if it holds an earlier evaluation's outputs (results.json,
  or the partial outputs of a stopped run), moves them into a new `workdir/earlier/<n>/` (n = 1, 2, ...,
  one above the highest there: never over an earlier set) and returns that folder; None if there was
  nothing. Only evaluation outputs move (OUTPUT_FILES): a training run's config.json, metrics.jsonl and
  checkpoints/ stay, and so does any file the config names (this evaluation reads it). No task resumes from
  its outputs, so every run starts clean. Process 0 only (other processes never read these files)."""
  if not is_primary():
    return None
  names = earlier_outputs(workdir, config)
  if not names:
    return None
  root = os.path.join(workdir, EARLIER_DIR)
  if os.path.exists(root) and not os.path.isdir(root):
    raise ValueError(f"{root} is a file: the outputs of the earlier evaluation in {workdir} are set aside in "
                     f"{root}/<n>/ before they would be replaced; move that file, or use another --workdir")
  os.makedirs(root, exist_ok=True)
  n = max([int(d) for d in os.listdir(root) if d.isdigit()], default=0) + 1
  while True:  # (exist_ok=False: two evaluations started at once into one workdir never share a folder)
    dest = os.path.join(root, str(n))
    try:
      os.mkdir(dest)
      break
    except FileExistsError:
      n += 1
  for name in names:
    os.replace(os.path.join(workdir, name), os.path.join(dest, name))
  return dest
