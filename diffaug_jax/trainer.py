"""The training program: `train_and_evaluate(config, workdir)`.

Reads top to bottom: distributed init -> mesh -> data (fails before compiling on a bad path) -> models ->
optimizer -> restore (latest in workdir -> init checkpoint -> scratch) -> jit ONCE -> loop (progress bar,
JSONL metrics, non-finite guard, periodic eval, checkpoints every N steps / on SIGTERM / at the end).

Bad input loses nothing: config.json is written once the run has built and restored; a workdir's run is
resumed only under the config it was made with (`RESUME_MAY_CHANGE` lists what may differ, e.g. the run
length; `allow_config_change=True` overrides and keeps the old file); an init checkpoint must fit the model;
the loss is checked before every checkpoint, so a non-finite state is never saved.

Modes (`config.mode`):
  "classifier": `steps.train_step`; DiffAug on/off by `config.diffaug.enabled` (off = the baseline run). The
    frozen score model comes from `config.score` (a score-mode workdir of ours, or a converted parameter file
    + UNet preset) and is passed to the step as an explicit replicated argument.
  "score": `steps.score_train_step` (DDPM objective, EMA params in the state).

Sharding: one mesh axis `data` over all devices of all processes; the batch is sharded on it, the state is
replicated (or laid out by `config.fsdp`, the hook for FSDP-style rules), and so are the frozen score params.
Each process feeds its own slice; `sharding.shard_batch` builds the global batch with
`jax.make_array_from_process_local_data`. Keys: `root = jax.random.key(config.seed)`; the train stream is
`fold_in(root, 1)` and each step uses `fold_in(train_key, state.step)` (computed inside the jitted step), so
a resumed run is exact and the numbers do not depend on the device count.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from diffaug_jax import checkpoint as ckpt_lib
from diffaug_jax import diffusion, metrics as metrics_lib, mixing, optim, sharding, steps
from diffaug_jax.state import TrainState

PyTree = Any

# Exit status of train.py (and the demo) after a SIGTERM stop with its checkpoint saved: 128 + SIGTERM, as a
# shell reports a process killed by it, so `train.py && evaluate.py` does not go on with a half-trained run
# and a job runner sees a run to restart (0 would read as finished). Rerunning the command resumes.
PREEMPTED_EXIT_CODE = 143


def exit_if_preempted(summary: dict, what: str) -> None:
  """After `train_and_evaluate`: a run stopped by SIGTERM (its checkpoint saved) says so and exits with
  PREEMPTED_EXIT_CODE."""
  if summary.get("preempted"):
    print(f"{what}: stopped by SIGTERM at step {summary['step']} (checkpoint saved); rerun the same command "
          "to resume", flush=True)
    raise SystemExit(PREEMPTED_EXIT_CODE)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, None: None}


def _dtype(name):
  if name is None or not isinstance(name, str):
    return name
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of float32, bfloat16, float16")
  return _DTYPES[name]


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _import_factory(path: str) -> Callable:
  """'package.module:attr' -> attr (custom models: `config.model.factory`)."""
  mod, _, attr = path.partition(":")
  if not attr:
    raise ValueError(f"factory {path!r} must look like 'package.module:callable'")
  return getattr(importlib.import_module(mod), attr)


# ------------------------------------------------------------------------------------------------- models
def build_classifier(config, *, dtype=None):
  """Classifier module from `config.model` (name via `models.classifiers.get_classifier`, or `factory`)."""
  m = config.model
  dtype = _dtype(dtype) or _dtype(m.get("dtype", "float32"))
  kwargs = dict(m.get("kwargs", {}) or {})
  if m.get("factory"):
    return _import_factory(m.factory)(num_classes=config.num_classes, dtype=dtype, **kwargs)
  from diffaug_jax.models.classifiers import get_classifier
  return get_classifier(m.name, config.num_classes, dtype=dtype, **kwargs)


def build_score_model(config, *, dtype=None):
  """UNet from `config.score_model` (preset + overrides, or `factory`), for score-mode runs."""
  m = config.score_model
  kwargs = dict(m.get("overrides", {}) or {})
  dtype = _dtype(dtype) or _dtype(m.get("dtype", None))
  if dtype is not None:
    kwargs["dtype"] = dtype
  if m.get("factory"):
    return _import_factory(m.factory)(**kwargs)
  from diffaug_jax.models.unet import unet_from_preset
  return unet_from_preset(m.preset, **kwargs)


def make_score_eps_factory(module, *, dtype=None) -> Callable:
  """score_params -> eps_fn(x_t, t) (`models.score.make_eps_fn` in compute dtype `dtype`)."""
  from diffaug_jax.models.score import make_eps_fn
  return lambda params: make_eps_fn(module, {"params": params}, dtype=dtype)


def load_frozen_score(config):
  """(module, params, schedule) of the frozen DiffAug score model named by `config.score`.

  Sources: `score.workdir` (EMA params of a score-mode run of ours), `score.params_path` (a converted file,
  `convert.common.load_params`) with `score.preset` (+ `overrides`), or - for tests and benchmarks only -
  `score.factory` ('module:callable' -> Linen module) with `score.random_init=True` (random weights).
  """
  s = config.score
  schedule = make_schedule(s.get("schedule", "linear"), int(s.get("num_timesteps", 1000)))
  if s.get("factory"):
    module = _import_factory(s.factory)(**dict(s.get("overrides", {}) or {}))
    if s.get("params_path"):
      from diffaug_jax.convert.common import load_params
      return module, load_params(s.params_path)["params"], schedule
    if not s.get("random_init", False):
      raise ValueError("config.score.factory needs score.params_path (or random_init=True for tests)")
    shape = (1,) + tuple(int(v) for v in s.image_shape)
    variables = module.init(jax.random.key(int(s.get("init_seed", 0))), jnp.zeros(shape, jnp.float32),
                            jnp.zeros((1,), jnp.int32))
    return module, variables["params"], schedule
  module, params = ckpt_lib.load_score_model(
      workdir=s.get("workdir"), params_path=s.get("params_path"), preset=s.get("preset"),
      overrides=dict(s.get("overrides", {}) or {}),
      schedule=(s.get("schedule", "linear"), int(s.get("num_timesteps", 1000))))
  return module, params, schedule


def _check_score_input(config, image_shape, score_module) -> None:
  """A score model fed another channel count cannot run (an error now, not a shape error in the first jit).
  One trained on another image size runs, the UNet being convolutional (the paper runs ADM-256 on 224
  crops), but is easy to pick by mistake, so a score run of ours trained at another size is logged."""
  in_channels = getattr(score_module, "in_channels", None)
  if in_channels is not None and int(in_channels) != int(image_shape[-1]):
    raise ValueError(f"the score model takes {in_channels}-channel images but the data yields {image_shape[-1]} "
                     "channels: set data.channels or use a score model trained on such images")
  workdir = config.score.get("workdir")
  if workdir:
    trained = int(ckpt_lib.read_train_config(workdir).get("data", {}).get("image_size", 0) or 0)
    if trained and trained != int(image_shape[0]):
      _log(f"note: the score model in {workdir} was trained on {trained}x{trained} images; DiffAug runs it on "
           f"{image_shape[0]}x{image_shape[1]}")


def reads_da_view(config) -> bool:
  """Whether the train step reads the batch's "image_da" (a classifier run with DiffAug from that view)."""
  return (config.get("mode", "classifier") == "classifier" and bool(config.diffaug.enabled)
          and config.diffaug.get("source", "image_da") == "image_da")


def mix_config(config) -> mixing.MixConfig | None:
  """`config.mixup` (optional: mixup_alpha, cutmix_alpha, prob, switch_prob, group_size; an absent alpha is 0,
  i.e. that method is off; absent section, or both alphas 0, = no mixing) -> MixConfig, checked against the
  batch size and AugMix before anything is built."""
  mc = config.get("mixup", None)
  if not mc:
    return None
  names = {f.name for f in dataclasses.fields(mixing.MixConfig)}
  unknown = sorted(set(mc.keys()) - names)
  if unknown:
    raise ValueError(f"config.mixup has unknown fields {unknown}; expected {sorted(names)}")
  kw = {**dict(mixup_alpha=0.0, cutmix_alpha=0.0), **dict(mc)}
  if float(kw["mixup_alpha"]) == 0 and float(kw["cutmix_alpha"]) == 0:
    return None
  group = kw.get("group_size", 0)
  if isinstance(group, float) and group.is_integer():
    group = int(group)
  cfg = mixing.MixConfig(**{**{k: float(v) for k, v in kw.items() if k != "group_size"}, "group_size": group})
  if config.batch_size % (cfg.group_size or config.batch_size) or (cfg.group_size or config.batch_size) % 2:
    raise ValueError(f"config.mixup.group_size={cfg.group_size} must divide batch_size={config.batch_size} "
                     "and be even (0: the whole batch, which must then be even)")
  if config.get("augmix", False):
    raise ValueError("config.mixup and config.augmix together: the JSD term needs views of one unmixed image")
  return cfg


def make_schedule(kind: str, num_timesteps: int) -> diffusion.Schedule:
  if kind == "linear":
    return diffusion.linear_schedule(num_timesteps)
  if kind == "cosine":
    return diffusion.cosine_schedule(num_timesteps)
  raise ValueError(f"unknown diffusion schedule {kind!r}; expected 'linear' or 'cosine'")


# --------------------------------------------------------------------------------------------------- data
def build_data(config, mesh) -> dict:
  """Train iterator (this process's slice, checkpointable) + eval batches, before any compilation.

  Returns dict(train_iter, eval_fn (-> iterable of padded {"image","label","mask"}), num_train,
  image_shape (H,W,C), num_classes). `config.data.source`: "digits" | "tfds" | "folder" (the grain
  pipelines of `diffaug_jax.data`: each host reads its own shard of the source) or "arrays" (an in-memory
  synthetic set whose GLOBAL batch order does not depend on the process count; used by the multi-process
  test).
  """
  sharding.local_batch_size(config.batch_size, mesh)  # divisibility check with a clear message
  eval_batch = sharding.eval_batch_size(int(config.get("eval_batch_size", 0) or config.batch_size), mesh.size)
  pi, pc = jax.process_index(), jax.process_count()
  dcfg = config.data
  if dcfg.source == "arrays":
    if config.get("augmix", False):  # the in-memory source makes no AugMix views: no JSD term would be added
      raise ValueError("config.augmix=True needs a grain data source (digits, tfds, folder), not 'arrays'")
    images, labels, test_images, test_labels = synthetic_arrays(dcfg)
    it = InMemoryIterator(images, labels, global_batch=config.batch_size, seed=config.seed,
                          process_index=pi, process_count=pc)
    return dict(train_iter=it, num_train=len(images), image_shape=images.shape[1:],
                num_classes=int(dcfg.num_classes),
                eval_fn=lambda: padded_eval_batches(test_images, test_labels, eval_batch, pi, pc))
  from diffaug_jax.data import config as data_config, pipeline  # grain/TFDS live behind this import
  data_config.validate(dcfg)
  source = pipeline.make_source(dcfg, dcfg.train_split)  # bad path / empty dataset -> error here
  if len(source) == 0:
    raise ValueError(f"training split {dcfg.train_split!r} of {dcfg.name!r} ({dcfg.data_dir}) is empty")
  augmix_fn = None
  if config.get("augmix", False):
    from diffaug_jax.data import augmix  # data / augmix dev
    augmix_fn = augmix.make_augmix_fn(dcfg)
  train_iter = pipeline.make_train_loader(dcfg, global_batch_size=config.batch_size, seed=config.seed,
                                          process_index=pi, process_count=pc, source=source,
                                          augmix_fn=augmix_fn, da_view=reads_da_view(config))
  eval_loader = pipeline.make_eval_loader(dcfg, global_batch_size=eval_batch, process_index=pi,
                                          process_count=pc)
  return dict(train_iter=train_iter, num_train=len(source), image_shape=data_config.image_shape(dcfg),
              num_classes=data_config.num_classes(dcfg), eval_fn=lambda: iter(eval_loader),
              train_source=source)


def synthetic_arrays(dcfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """A small deterministic, learnable uint8 image set (class = which quadrant is bright, plus noise)."""
  n, s, c, k = int(dcfg.get("num_train", 256)), int(dcfg.image_size), int(dcfg.channels), int(dcfg.num_classes)
  rng = np.random.default_rng(1234)

  def make(m):
    labels = rng.integers(0, k, m).astype(np.int32)
    x = rng.normal(100, 30, (m, s, s, c))
    for i, y in enumerate(labels):
      r, col = divmod(int(y) % 4, 2)
      x[i, r * s // 2:(r + 1) * s // 2, col * s // 2:(col + 1) * s // 2] += 60 + 20 * (int(y) // 4)
    return np.clip(x, 0, 255).astype(np.uint8), labels
  tr = make(n)
  te = make(int(dcfg.get("num_test", 64)))
  return tr[0], tr[1], te[0], te[1]


class InMemoryIterator:
  """Infinite, deterministic, checkpointable batches from in-memory arrays.

  Epoch e uses the permutation `default_rng([seed, e])` of all examples; global batch b is
  perm[b*G:(b+1)*G] and process p yields rows [p*G/P, (p+1)*G/P) of it, so the global batch sequence is the
  same for any process count. State: {"epoch", "batch"} (JSON).
  """

  def __init__(self, images, labels, *, global_batch, seed, process_index=0, process_count=1):
    if len(images) < global_batch:
      raise ValueError(f"{len(images)} examples < global batch {global_batch}")
    self.images, self.labels = images, labels
    self.global_batch, self.seed = int(global_batch), int(seed)
    self.pi, self.pc = process_index, process_count
    self.per_epoch = len(images) // self.global_batch
    self.epoch, self.batch = 0, 0
    self._perm_epoch, self._perm = None, None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.batch >= self.per_epoch:
      self.epoch, self.batch = self.epoch + 1, 0
    if self._perm_epoch != self.epoch:  # once per epoch, not per step (O(N) each)
      self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images))
      self._perm_epoch = self.epoch
    g = self._perm[self.batch * self.global_batch:(self.batch + 1) * self.global_batch]
    per = self.global_batch // self.pc
    idx = g[self.pi * per:(self.pi + 1) * per]
    self.batch += 1
    x = self.images[idx]
    return {"image": x, "image_da": x, "label": self.labels[idx]}

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "batch": self.batch}

  def set_state(self, state: dict) -> None:
    self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def padded_eval_batches(images, labels, global_batch, pi=0, pc=1):
  """Fixed-size eval batches with mask (this process's rows of each global batch)."""
  n = len(images)
  per = global_batch // pc
  for start in range(0, n, global_batch):
    idx = np.arange(start + pi * per, start + (pi + 1) * per)
    valid = idx < n
    idx = np.where(valid, idx, 0)
    yield {"image": np.where(valid[:, None, None, None], images[idx], 0).astype(np.uint8),
           "label": np.where(valid, labels[idx], 0).astype(np.int32), "mask": valid.astype(np.int32)}


# -------------------------------------------------------------------------------------------------- state
def fsdp_rule(min_size: int = 2 ** 20, axis_size: int | None = None):
  """FSDP-style layout hook: shard the largest dimension divisible by the mesh size of every leaf with
  at least `min_size` elements over `data`; smaller leaves stay replicated."""
  def rule(path, x):
    n = axis_size or jax.device_count()
    if np.size(x) < min_size or not np.shape(x):
      return P()
    dims = sorted(range(len(x.shape)), key=lambda i: -x.shape[i])
    for d in dims:
      if x.shape[d] % n == 0:
        spec = [None] * len(x.shape)
        spec[d] = sharding.DATA_AXIS
        return P(*spec)
    return P()
  return rule


def _init_variables(module, config, key, image_shape, *, score: bool):
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  if score:
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if config.get("ddpm", {}).get("class_cond", False) else None
    return module.init({"params": key, "dropout": key}, x, t, y=y, train=False)
  return module.init({"params": key, "dropout": key}, x, train=False)


# --------------------------------------------------------------------------------------------------- loop
class _Preemption:
  """SIGTERM -> flag (checked each step; the loop saves a checkpoint and returns).

  One process only: with several, a signal reaches them at different steps, so the flag is left to JAX's
  preemption sync manager (started by `jax.distributed.initialize`), which orbax's `reached_preemption`
  reads at the same step on every process; a Python handler here would replace its SIGTERM handler."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    metrics_lib.write_text_atomic(os.path.join(workdir, "config.json"),
                                  config.to_json_best_effort(indent=1, sort_keys=True))


# Fields (dotted paths, or a section) a resumed run may change: how long it runs, how it reads and lays out
# data and reports, not what it computes. (A new length does re-plan a cosine schedule's remaining learning
# rates: that extends or shortens the run rather than bit-resuming it, and the resume says so.)
RESUME_MAY_CHANGE = ("num_train_steps", "num_epochs", "log_every", "block_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints", "async_checkpoint", "progress", "final_eval",
                     "distributed", "eval_batch_size", "init_checkpoint", "require_init_checkpoint", "fsdp",
                     "fsdp_min_size", "data.data_dir", "data.read_threads", "data.prefetch_buffer_size",
                     "data.worker_buffer_size")


# Fields whose absence (a config written before they existed) means a definite value: set on one side only,
# they are a change unless they hold that value (adding Mixup to a run is not a new field's default).
ABSENT_MEANS = {"diffaug.source": "image_da", "mixup.mixup_alpha": 0.0, "mixup.cutmix_alpha": 0.0}


def config_changes(saved: dict, config) -> tuple[list[str], list[str]]:
  """(changed, one_sided): dotted keys set in both the workdir's saved config.json and `config` (as JSON) with
  different values (or set on one side only to a value other than what their absence means, ABSENT_MEANS),
  and the other keys set on one side only (a field a newer version added with its default, or removed), both
  minus RESUME_MAY_CHANGE."""
  now = traverse_util.flatten_dict(json.loads(config.to_json_best_effort(sort_keys=True)), sep=".")
  before = traverse_util.flatten_dict(saved, sep=".")
  free = lambda k: any(k == p or k.startswith(p + ".") for p in RESUME_MAY_CHANGE)
  changed = {k for k in set(now) & set(before) if now[k] != before[k] and not free(k)}
  one_sided = {k for k in set(now) ^ set(before) if not free(k)}
  meaningful = {k for k in one_sided if k in ABSENT_MEANS and now.get(k, before.get(k)) != ABSENT_MEANS[k]}
  return sorted(changed | meaningful), sorted(one_sided - meaningful)


def _check_labels(labels: np.ndarray, num_classes: int, step: int) -> None:
  """Host-side (this host's rows, before they go to the devices): a label outside [0, num_classes) would
  show up only as a non-finite loss (or a silently wrapped one-hot)."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"batch at step {step} has labels in [{labels.min()}, {labels.max()}] but config.num_classes "
                     f"is {num_classes}: set num_classes (and data.num_classes) to the data's class count")


def _set_aside(path: str, step: int) -> str:
  """Renames `path` (config.json, metrics.jsonl) to `<stem>.before_step<step>[.k]<ext>`, never over an
  earlier one (two config changes at one step keep both); returns the new file name."""
  new = _unused_name(path, f"before_step{step}")
  os.replace(path, new)
  return os.path.basename(new)


def _unused_name(path: str, tag: str) -> str:
  """`<stem>.<tag><ext>`, or `<stem>.<tag>.<k><ext>` (k = 2, 3, ...) for the first one not taken."""
  stem, ext = os.path.splitext(path)
  new, k = f"{stem}.{tag}{ext}", 2
  while os.path.exists(new):
    new, k = f"{stem}.{tag}.{k}{ext}", k + 1
  return new


def _set_aside_rows_past(path: str, step: int) -> str | None:
  """A hard-stopped attempt (no checkpoint at its last steps) logged rows past the step a resume restarts
  from; the resumed run logs those steps again, so they would appear twice. Moves the rows past `step` (and
  a line cut off mid-write) to `<stem>.after_step<step>[.k].jsonl` and rewrites `path` without them;
  returns the new file's name, None if nothing was past `step`."""
  with open(path) as f:
    lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
  keep, past = [], []
  for line in lines:
    try:
      later = int(json.loads(line)["step"]) > step
    except (ValueError, TypeError, KeyError):  # cut off, or not a row of ours
      later = True
    (past if later else keep).append(line)
  if not past:
    return None
  aside = _unused_name(path, f"after_step{step}")
  metrics_lib.write_text_atomic(aside, "".join(past))
  metrics_lib.write_text_atomic(path, "".join(keep))
  return os.path.basename(aside)


def check_resume_config(config, workdir: str, resume_step: int, *, allow: bool = False) -> list[str]:
  """Refuses to resume the run in `workdir` under a config that computes something else (model, data,
  batch size, optimizer, DiffAug, score model, seed, ...) unless `allow`; returns the changed keys (logged
  and recorded when allowed)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    saved = json.load(f)
  changed, one_sided = config_changes(saved, config)
  if one_sided:
    _log(f"note: {path} and this config differ in which fields they set ({', '.join(one_sided)}): fields "
         "added or removed by another version of the code; resuming")
  lengths = [f"{k} {saved.get(k)} -> {config.get(k)}" for k in ("num_train_steps", "num_epochs")
             if saved.get(k) != config.get(k)]
  if lengths and config.get("optim", {}).get("schedule") == "cosine":
    _log(f"note: the run's length changed ({', '.join(lengths)}) under a cosine schedule: the learning rate "
         "of the remaining steps follows the new length")
  if changed and not allow:
    shown = ", ".join(changed[:12]) + (" ..." if len(changed) > 12 else "")
    raise ValueError(f"{workdir} holds a run at step {resume_step} made with another config ({shown} differ "
                     f"from {path}); use a new workdir, or train.py --allow_config_change to resume it under "
                     "this config anyway")
  return changed


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Runs (or resumes) a training run in `workdir`. Returns a summary dict (final step, last train metrics,
  eval metrics, where it started from, whether it stopped on SIGTERM).

  allow_config_change: resume the run in `workdir` even if `config` differs from its config.json in more
  than `RESUME_MAY_CHANGE` (the old file is kept as config.before_step<N>.json)."""
  # 1. Processes and devices.
  sharding.initialize_distributed(config.get("distributed", None))
  sharding.check_multi_process()
  mesh = sharding.make_mesh()
  mode = config.get("mode", "classifier")
  if mode not in ("classifier", "score"):
    raise ValueError(f"config.mode={mode!r}: expected 'classifier' or 'score'")
  if config.get("require_init_checkpoint") and not config.get("init_checkpoint"):
    raise ValueError("this config fine-tunes released weights: set --config.init_checkpoint=<converted "
                     "params file or training workdir>")
  metrics_lib.check_local_path(workdir, "--workdir")
  workdir = os.path.abspath(workdir)
  for path in (workdir, os.path.join(workdir, "checkpoints")):  # (orbax would fail deep inside, or at a save)
    if os.path.exists(path) and not os.path.isdir(path):
      raise NotADirectoryError(f"{path} exists and is not a directory: --workdir must be a directory (a new "
                               "one, or a run's to resume)")
  mix = mix_config(config) if mode == "classifier" else None
  diffaug_source = config.get("diffaug", {}).get("source", "image_da") if mode == "classifier" else "image_da"
  if diffaug_source not in ("image_da", "clean"):
    raise ValueError(f"config.diffaug.source must be 'image_da' or 'clean', got {diffaug_source!r}")

  # 2. Data first: a wrong path / empty dataset fails here, before anything compiles.
  data = build_data(config, mesh)
  train_iter = data["train_iter"]
  if mode == "classifier" and int(data["num_classes"]) != int(config.num_classes):
    raise ValueError(f"config.num_classes={config.num_classes} but the data has {data['num_classes']} classes")
  steps_per_epoch = max(1, data["num_train"] // config.batch_size)
  total_steps = int(config.get("num_train_steps", 0) or 0) or int(config.num_epochs * steps_per_epoch)
  if total_steps <= 0:
    raise ValueError(f"nothing to train: num_train_steps={config.get('num_train_steps', 0)}, "
                     f"num_epochs={config.get('num_epochs', 0)} give {total_steps} steps")
  _log(f"[{mode}] {jax.process_count()} process(es), {jax.device_count()} device(s); {data['num_train']} "
       f"train examples, global batch {config.batch_size}, {steps_per_epoch} steps/epoch, {total_steps} steps")

  # 3. Models and optimizer.
  root = jax.random.key(config.seed)
  init_key = jax.random.fold_in(root, 0)
  score_params, score_eps_factory, schedule = None, None, None
  if mode == "classifier":
    module = build_classifier(config)
    if config.diffaug.enabled:
      from diffaug_jax.models.score import frozen_params_for_compute
      score_dtype = _dtype(config.score.get("dtype", None))
      score_module, score_params, schedule = load_frozen_score(config)
      _check_score_input(config, data["image_shape"], score_module)
      # Held in the compute dtype (cast once here, not inside every step): same outputs, half the memory.
      score_params = frozen_params_for_compute(score_module, score_params, score_dtype)
      score_eps_factory = make_score_eps_factory(score_module, dtype=score_dtype)
  else:
    module = build_score_model(config)
    schedule = make_schedule(config.ddpm.get("schedule", "linear"), int(config.ddpm.get("num_timesteps", 1000)))
  tx, lr_schedule = optim.make_optimizer(config.optim, global_batch_size=config.batch_size,
                                         steps_per_epoch=steps_per_epoch, total_steps=total_steps)

  def init_state(variables=None):
    if variables is None:
      variables = _init_variables(module, config, init_key, data["image_shape"], score=mode == "score")
    return TrainState.create(variables, tx, ema=mode == "score")

  abstract_state = jax.eval_shape(init_state)
  rule = fsdp_rule(int(config.get("fsdp_min_size", 2 ** 20))) if config.get("fsdp", False) else None
  state_sh = sharding.state_shardings(mesh, abstract_state, rule)
  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)

  def init_state_placed(variables=None):
    if variables is None:
      return jax.jit(init_state, out_shardings=state_sh)()
    variables = jax.tree.map(np.asarray, variables)
    return jax.jit(init_state, out_shardings=state_sh)(variables)

  # 4. Restore: latest in workdir -> init checkpoint (weights only) -> scratch.
  ckpt = ckpt_lib.Checkpointer(workdir, save_every=int(config.get("checkpoint_every", 0) or 0),
                               keep=int(config.get("keep_checkpoints", 3)),
                               async_save=bool(config.get("async_checkpoint", True)))
  resume_step = ckpt.latest_step()
  changed = (check_resume_config(config, workdir, resume_step, allow=allow_config_change)
             if resume_step is not None else [])
  expected = {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}
  # A resume reads into the abstract state: no random state is initialised (and compiled) only to be replaced.
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
  state, where = ckpt_lib.restore_or_init(ckpt, init_state_placed, train_iter,
                                          init_checkpoint=config.get("init_checkpoint"), log=_log,
                                          expected=expected, target=target)
  start_step = int(jax.device_get(state.step))
  # config.json describes the run; written once it is known to build (a failed rerun loses nothing). What
  # it replaces is kept: the config of a resumed run's earlier steps, or the files of an attempt that
  # stopped before its first checkpoint (a fresh start must not append its metrics to theirs).
  cfg_path = os.path.join(workdir, "config.json")
  if jax.process_index() == 0:
    if changed:
      kept = _set_aside(cfg_path, start_step)
      _log(f"resuming under a changed config ({', '.join(changed)}); the old one is kept as {kept}")
    elif resume_step is None and os.path.isfile(cfg_path):
      try:
        with open(cfg_path) as f:
          changed_keys, one_sided = config_changes(json.load(f), config)
      except ValueError:  # not JSON (cut off): not this config either
        changed_keys, one_sided = ["(unreadable)"], []
      if changed_keys or one_sided:
        _log(f"{workdir} holds the config.json of another run without checkpoints; kept as "
             f"{_set_aside(cfg_path, 0)}")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is None and os.path.isfile(metrics_path):
      _log(f"starting from step 0 in a workdir with metrics of an earlier attempt; kept as "
           f"{_set_aside(metrics_path, 0)}")
    elif resume_step is not None and os.path.isfile(metrics_path):
      kept = _set_aside_rows_past(metrics_path, start_step)
      if kept:
        _log(f"metrics.jsonl held rows past step {start_step}, of an attempt that stopped (killed or crashed) "
             f"after its last checkpoint: those steps run again; the old rows are kept in {kept}")
  if resume_step is None or changed or not os.path.isfile(cfg_path):
    write_config(config, workdir)

  # 5. Jit once: static parts bound with partial, batch sharded, state replicated (or by rule), donated.
  train_key_const = 1  # stream id: fold_in(root, 1) = train stream

  if mode == "classifier":
    # The frozen score params follow the state's layout rule: replicated, or with `config.fsdp` their big
    # kernels split over `data` (XLA gathers each one inside the step; a 550M-parameter UNet then costs each
    # device 1/N of its memory).
    score_sh = sharding.state_shardings(mesh, score_params, rule)
    if score_params is not None:
      score_params = jax.device_put(jax.tree.map(np.asarray, score_params), score_sh)
    step_cfg = steps.StepConfig(schedule=schedule, diffaug=bool(config.diffaug.enabled),
                                diffaug_weight=float(config.diffaug.get("weight", 1.0)),
                                t_low=int(config.diffaug.get("t_low", 0)),
                                # 0: the whole schedule (1000 for ADM, 4000 for improved-diffusion's cosine;
                                # a baseline run loads no score model, so has no schedule and no t range)
                                t_high=int(config.diffaug.get("t_high", 0) or 0) or (
                                    schedule.num_timesteps if schedule is not None else 1000),
                                jsd_weight=float(config.get("jsd_weight", 12.0)),
                                label_smoothing=float(config.get("label_smoothing", 0.0)),
                                lr_schedule=lr_schedule, mix=mix, diffaug_source=diffaug_source)
    bound = functools.partial(steps.train_step, apply_fn=module.apply, score_eps_fn=score_eps_factory,
                              tx=tx, cfg=step_cfg)

    def step_fn(state, batch, score_params):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), train_key_const), state.step)
      return bound(state, batch, key, score_params)
    p_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, score_sh), out_shardings=(state_sh, repl),
                     donate_argnums=(0,))
    p_eval = jax.jit(functools.partial(steps.eval_step, apply_fn=module.apply),
                     in_shardings=(state_sh, batch_sh), out_shardings=repl)
  else:
    sc = config.ddpm
    step_cfg = steps.ScoreStepConfig(schedule=schedule, learn_sigma=bool(sc.get("learn_sigma", False)),
                                     loss_type=sc.get("loss_type", "simple"),
                                     rescale_vb=bool(sc.get("rescale_vb", True)),
                                     ema_decay=float(sc.get("ema_decay", 0.9999)),
                                     class_cond=bool(sc.get("class_cond", False)), lr_schedule=lr_schedule)
    bound = functools.partial(steps.score_train_step, apply_fn=module.apply, tx=tx, cfg=step_cfg)

    def step_fn(state, batch, score_params):
      del score_params
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), train_key_const), state.step)
      return bound(state, batch, key)
    p_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, None), out_shardings=(state_sh, repl),
                     donate_argnums=(0,))

    def eval_fn(state, batch):
      key = jax.random.fold_in(jax.random.key(config.seed), 2)
      return steps.score_eval_step(state, batch, key, apply_fn=module.apply, cfg=step_cfg)
    p_eval = jax.jit(eval_fn, in_shardings=(state_sh, batch_sh), out_shardings=repl)

  def run_eval(state) -> dict:
    totals: dict[str, float] = {}
    for batch in data["eval_fn"]():
      # Masked sums in both modes: every process runs the same number of (collective) eval steps.
      batch = {k: v for k, v in batch.items() if k in ("image", "label", "mask")}
      out = metrics_lib.to_python(p_eval(state, sharding.shard_batch(batch, mesh)))
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + v
    n = max(totals.get("count", 0.0), 1.0)
    res = {"eval_loss": totals.get("loss", float("nan")) / n, "eval_count": totals.get("count", 0.0)}
    if "correct" in totals:
      res["eval_accuracy"] = totals["correct"] / n
    return res

  # 6. Loop.
  writer = metrics_lib.MetricWriter(workdir)
  progress = metrics_lib.Progress(total_steps, config.batch_size, prefix=mode,
                                  enabled=jax.process_index() == 0 and config.get("progress", True))
  log_every = max(1, int(config.get("log_every", 50)))
  block_every = max(1, int(config.get("block_every", 4)))
  eval_every = int(config.get("eval_every", 0) or 0)
  if eval_every < 0:  # -k: every k epochs, whatever the batch size
    eval_every = -eval_every * steps_per_epoch
  batch_keys = ("image", "label")
  if mode == "classifier":
    # The DiffAug view goes to the device only when the step reads it.
    batch_keys += ("image_da",) * reads_da_view(config) + ("image_aug1", "image_aug2")
  pending: list[tuple[int, dict]] = []
  window: list[dict] = []
  last_train, last_eval = {}, {}
  preempted = False
  step = start_step
  progress.start(step)
  t_start = time.perf_counter()
  try:
    with _Preemption() as preemption:
      while step < total_steps:
        try:
          batch = next(train_iter)
        except StopIteration as e:
          raise RuntimeError(f"train iterator ended at step {step} (expected an infinite, repeating stream)") from e
        batch = {k: v for k, v in batch.items() if k in batch_keys}
        if mode == "classifier":
          _check_labels(batch["label"], int(config.num_classes), step)
        state, m = p_step(state, sharding.shard_batch(batch, mesh), score_params)
        step += 1
        pending.append((step, m))
        stopping = preemption.flag or ckpt.manager.reached_preemption(step)
        saving = stopping or step == total_steps or ckpt.should_save(step)
        # Block on a value every few steps: keeps the dispatch queue short (8 fake CPU devices abort when
        # ~40 sharded steps queue) and catches a non-finite loss at its step. The newest step stays in
        # flight, so the device computes it while the host prepares the next batch; every step is read
        # before a log line and before a checkpoint, so a non-finite state is never saved (orbax would then
        # drop the good checkpoints it keeps).
        drain = step % log_every == 0 or saving
        if len(pending) >= block_every or drain:
          ready, pending = (pending, []) if drain else (pending[:-1], pending[-1:])
          for s, mm in ready:
            vals = metrics_lib.to_python(mm)
            metrics_lib.check_finite(vals, s)
            metrics_lib.check_finite(vals, s, "param_absmax")  # the weights about to be saved
            window.append(vals)
        if step % log_every == 0 or step == total_steps:
          last_train = {k: float(np.mean([w[k] for w in window])) for k in window[-1]} if window else {}
          window = []
          ips = progress.update(step, last_train)
          writer.write(step, last_train, split="train", images_per_sec=ips)
        if eval_every and (step % eval_every == 0 or step == total_steps):
          last_eval = run_eval(state)
          writer.write(step, last_eval, split="eval")
          _log(f"  eval @ {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        ckpt.save(step, state, train_iter)
        if stopping:
          _log(f"SIGTERM/preemption at step {step}: saving a checkpoint and stopping")
          preempted = True
          break
    ckpt.save(step, state, train_iter, force=True)
  finally:
    progress.close()
    ckpt.close()
    writer.close()
  if not eval_every and not preempted and mode == "classifier" and config.get("final_eval", True):
    last_eval = run_eval(state)
    writer = metrics_lib.MetricWriter(workdir)
    writer.write(step, last_eval, split="eval")
    writer.close()
  return {"step": step, "start": where, "train": last_train, "eval": last_eval, "preempted": preempted,
          "seconds": time.perf_counter() - t_start, "state": state, "module": module}
