"""Checkpoints: the only module that imports orbax.

Layout: `<workdir>/checkpoints/<step>/{state,data}` written by an orbax `CheckpointManager`:
  state: the TrainState pytree (step, params, batch_stats, opt_state[, ema_params]) - never the frozen score
    params, which reload from their own file / workdir (`load_score_model`);
  data: the data iterator state, one JSON file per process (`process_<i>-of-<n>.json`, the same format as
    grain's own checkpoint handler, so grain `DataLoader` / `DatasetIterator` iterators and any iterator with
    `get_state()` / `set_state()` work; grain itself is not imported here). On another process count the
    saved state is used only when every process saved the same one (a host-invariant state, like our train
    pipeline's); otherwise the restore fails with a clear error.
Resume order (`restore_or_init`): latest checkpoint in workdir -> explicit init checkpoint (weights only) ->
scratch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffaug_jax.state import TrainState

PyTree = Any


# ----------------------------------------------------------------------------------------------- data state
class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores an iterator's `get_state()` (bytes or JSON-able) per process."""

  def _file(self, directory: epath.Path) -> epath.Path:
    return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "DataSave") -> None:
    state = args.state  # captured when the save was requested (the iterator keeps moving meanwhile)
    text = state.decode() if isinstance(state, (bytes, bytearray)) else json.dumps(state, indent=1)
    self._file(directory).write_text(text)

  def restore(self, directory: epath.Path, args: "DataRestore") -> Any:
    f = self._file(directory)
    text = f.read_text() if f.exists() else self._host_invariant_state(epath.Path(directory), f.name)
    item = args.item
    current = item.get_state()
    # Same representation as the iterator's own get_state(): bytes (grain DataLoader) or a JSON value.
    try:
      item.set_state(text.encode() if isinstance(current, (bytes, bytearray)) else json.loads(text))
    except (KeyError, TypeError, ValueError, IndexError) as e:  # (IndexError: grain, another worker count)
      raise ValueError(
          f"the data iterator state in {f} does not fit this iterator ({type(e).__name__}: {e}): it was saved "
          "by an iterator of another shape, e.g. another data.num_workers (grain's multi-worker state differs "
          "from the in-process one); resume with the settings the run was saved with") from e
    return item

  @staticmethod
  def _host_invariant_state(directory: epath.Path, wanted: str) -> str:
    """The state saved by a different number of processes, usable only when all of them saved the same one.

    Our train pipeline's state is `{"next_index": k}` on every host (host h reads its slice of global batch
    k, for any host count), so a run can resume on more or fewer hosts. A state that differs between hosts
    (e.g. grain's ShardByJaxProcess shard options) cannot be mapped to another host count: error.
    """
    saved = sorted(directory.glob("process_*-of-*.json"))
    texts = {p.read_text() for p in saved}
    if len(texts) != 1:
      raise ValueError(
          f"data iterator state {directory / wanted} does not exist: the checkpoint was written by "
          f"{len(saved)} process(es) ({', '.join(p.name for p in saved) or 'no state files'}) whose states "
          f"differ, so it cannot be restored on {jax.process_count()} process(es); resume on the same process "
          "count, or restore the state without the data item and call set_state yourself")
    logging.getLogger(__name__).warning(
        "data iterator state written by %d process(es), restored on %d: every process saved the same state, "
        "so it does not depend on the process (%s)", len(saved), jax.process_count(), saved[0].name)
    return texts.pop()

  def structure(self, directory):  # required by the interface
    return None

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  state: Any  # iterator.get_state() snapshot: bytes or a JSON-able value


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


# ----------------------------------------------------------------------------------------------- manager
def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for (state, data iterator).

  save_every: save when step % save_every == 0 (0 disables periodic saves; `force=True` always saves).
  keep: number of checkpoints kept.
  """

  def __init__(self, workdir: str, *, save_every: int = 0, keep: int = 3, async_save: bool = True):
    if int(keep) < 1:  # orbax's max_to_keep=0 deletes every checkpoint, the last one included
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: TrainState, data_iter: Any = None, *, force: bool = False) -> bool:
    """Saves if due (or forced). Returns whether a save was started (async: `wait()` to finish)."""
    if not (force or self.should_save(step)):
      return False
    if step in self.manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None and hasattr(data_iter, "get_state"):
      items["data"] = DataSave(data_iter.get_state())
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, state_like: TrainState, data_iter: Any = None, step: int | None = None
              ) -> tuple[TrainState, int]:
    """Restores (state, step) at `step` (default latest) into the structure/shardings of `state_like`;
    `data_iter.set_state` is called when the checkpoint has a data item."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(_abstract(state_like))}
    step_dir = epath.Path(self.directory) / str(step)
    if data_iter is not None and hasattr(data_iter, "set_state") and (step_dir / "data").exists():
      items["data"] = DataRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class _DropReadOnlyNoise(logging.Filter):
  """orbax warns on every read-only open and about items a weights-only restore leaves alone."""
  _NOISE = ("read_only=True", "is read only", "could not be restored", "Metadata file does not exist")

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(n in record.getMessage() for n in self._NOISE)


@contextlib.contextmanager
def _quiet_read_only_restore():
  f = _DropReadOnlyNoise()
  logger = logging.getLogger("absl")
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


def restore_raw_state(workdir_or_ckpt_dir: str, step: int | None = None, *,
                      keys: Sequence[str] | None = None) -> tuple[dict, int]:
  """Restores a saved TrainState as plain nested dicts of numpy arrays (no target structure needed).

  Accepts a training workdir or its `checkpoints` directory. Returns (tree, step) with keys "step", "params",
  "batch_stats", "opt_state"[, "ema_params"], as host numpy whatever device layout saved them. `keys`: read
  only these top-level entries (those the checkpoint has): loading weights then skips the optimizer state
  (two Adam moments of a 550M-parameter UNet are 4.4 GB per host). Needs orbax's partial restore
  (`PyTreeRestore(partial_restore=...)`); an orbax without it reads everything and drops the rest here.
  """
  path = os.path.abspath(workdir_or_ckpt_dir)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  with _quiet_read_only_restore():
    return _restore_raw_state(path, step, keys)


_PARTIAL_RESTORE = "partial_restore" in inspect.signature(ocp.args.PyTreeRestore).parameters


def _restore_raw_state(path: str, step: int | None, keys: Sequence[str] | None = None) -> tuple[dict, int]:
  mngr = ocp.CheckpointManager(path, item_names=("state", "data"),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {path}")
    tree = _restore_as_numpy(os.path.join(path, str(step), "state"), keys)
    if tree is None:  # an orbax whose metadata we cannot read: its own restore (the saving run's layout)
      tree = dict(mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"])
      tree = {k: v for k, v in tree.items() if keys is None or k in keys}
  finally:
    mngr.close()
  return jax.tree.map(np.asarray, tree), step


def _restore_as_numpy(state_dir: str, keys: Sequence[str] | None) -> dict | None:
  """The saved state's top-level entries `keys` (all when None) as host numpy, whatever device layout saved
  them (a checkpoint of 8 devices loads on 1). None where this orbax cannot (an unknown metadata layout, or
  `keys` without partial restore): the caller then uses orbax's own restore and drops the other entries."""
  if (keys is not None and not _PARTIAL_RESTORE) or not os.path.isdir(state_dir):
    return None
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(state_dir)
    meta = getattr(meta, "item_metadata", meta)  # a StepMetadata (newer orbax) holds the tree's metadata
    meta = getattr(meta, "tree", meta)
    if not isinstance(meta, Mapping):
      return None
    target = {k: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), v) for k, v in meta.items()
              if keys is None or k in keys}
    if not target:
      return {}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    partial = {"partial_restore": True} if keys is not None else {}
    return dict(checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, **partial)))


def weights_from(source: str) -> dict:
  """Weights-only variables {"params", ["batch_stats"]} from a training workdir / checkpoint dir, or from a
  converted parameter file (`convert.common.save_params` msgpack, checksum verified)."""
  if os.path.isdir(source):
    tree, _ = restore_raw_state(source, keys=("params", "batch_stats"))
    out = {"params": tree["params"]}
    if tree.get("batch_stats"):
      out["batch_stats"] = tree["batch_stats"]
    return out
  if os.path.isfile(source):
    from diffaug_jax.convert.common import load_params  # lazy: convert is optional at import time
    return dict(load_params(source))
  raise FileNotFoundError(f"init checkpoint {source!r} is neither a workdir/checkpoint directory nor a file")


def check_variables(loaded: dict, expected: dict, source: str) -> None:
  """Raises one ValueError listing the missing, unexpected and mis-shaped leaves of `loaded` against
  `expected` (both {"params", ["batch_stats"]}; expected leaves may be ShapeDtypeStructs)."""
  from diffaug_jax.convert.common import key_mismatches  # the converters' comparison, our message

  def shapes_of(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got = shapes_of({k: v for k, v in loaded.items() if k in ("params", "batch_stats") and v})
  want = shapes_of({k: v for k, v in expected.items() if v})
  missing, unexpected, misshaped = key_mismatches(want, got)
  shapes = [f"{k} {got[k]} (model: {want[k]})" for k in misshaped]
  if missing or unexpected or shapes:
    parts = [f"{name} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
             for name, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
    raise ValueError(f"{source!r} does not fit the model: " + "; ".join(parts))


def restore_or_init(ckpt: Checkpointer, init_state_fn: Callable[[dict | None], TrainState], data_iter: Any,
                    *, init_checkpoint: str | None = None, log: Callable[[str], None] = print,
                    expected: dict | None = None, target: PyTree | None = None) -> tuple[TrainState, str]:
  """Resume order: latest checkpoint in workdir -> `init_checkpoint` (weights only) -> scratch.

  init_state_fn(variables_or_None) builds a fresh state (None = random init). The restore reads into
  `target` (the state's `jax.ShapeDtypeStruct`s with their shardings: nothing is built), or else into the
  structure and shardings of a fresh `init_state_fn(None)`. `expected` ({"params", "batch_stats"} shapes of
  the model): an init checkpoint is checked against it first, with one error naming every mismatch. Returns
  (state, where) with where in {"resume@<step>", "init:<src>", "scratch"}.
  """
  latest = ckpt.latest_step()
  if latest is not None:
    try:
      state, step = ckpt.restore(init_state_fn(None) if target is None else target, data_iter)
    except Exception as e:  # pylint: disable=broad-except  # orbax / tensorstore errors are many and long
      first_line = str(e).splitlines()[0][:300] if str(e) else ""
      older = [s for s in ckpt.all_steps() if s != latest]
      if older:
        damaged = (f"If step {latest} is damaged (a write cut off, a deleted file), the older checkpoint(s) "
                   f"{older} are still there: move {ckpt.directory}/{latest} aside (e.g. to {latest}.broken) to "
                   f"resume from step {max(older)}")
      else:
        damaged = f"If step {latest} is damaged, no older checkpoint is kept"
      raise RuntimeError(f"cannot restore checkpoint step {latest} from {ckpt.directory} ({type(e).__name__}: "
                         f"{first_line}). {damaged}; if the model or data changed (--allow_config_change), this "
                         "run's checkpoints do not fit it: use a new workdir") from e
    log(f"resumed from {ckpt.directory}/{step}")
    return state, f"resume@{step}"
  if init_checkpoint:
    variables = weights_from(init_checkpoint)
    if expected is not None:
      check_variables(variables, expected, f"init checkpoint {init_checkpoint}")
    log(f"initialised weights from {init_checkpoint}")
    return init_state_fn(variables), f"init:{init_checkpoint}"
  return init_state_fn(None), "scratch"


# ----------------------------------------------------------------------------------------------- loading
def read_train_config(workdir: str):
  """The `config.json` a training run wrote into its workdir, as an ml_collections ConfigDict."""
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a diffaug_jax training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_trained_classifier(workdir: str, step: int | None = None, *, dtype: Any = None):
  """(module, variables, train_config) of a classifier trained by `train.py` in `workdir`.

  variables = {"params", ["batch_stats"]} as numpy (latest step unless `step`). `dtype` overrides the compute
  dtype recorded in the config.
  """
  from diffaug_jax import trainer  # lazy: trainer imports this module
  config = read_train_config(workdir)
  if config.get("mode", "classifier") != "classifier":
    raise ValueError(f"{workdir} holds a {config.mode!r} run, not a classifier")
  module = trainer.build_classifier(config, dtype=dtype)
  tree, _ = restore_raw_state(workdir, step, keys=("params", "batch_stats"))
  variables = {"params": tree["params"]}
  if tree.get("batch_stats"):
    variables["batch_stats"] = tree["batch_stats"]
  return module, variables, config


def load_score_model(*, workdir: str | None = None, params_path: str | None = None, preset: str | None = None,
                     overrides: dict | None = None, step: int | None = None, dtype: Any = None,
                     schedule: tuple[str, int] | None = None):
  """(module, params) of a frozen score model: EMA params of a score-mode workdir of ours, or a converted
  parameter file (`convert.common.load_params`, e.g. the guided-diffusion 256x256 model) with a UNet preset.

  schedule: the (kind, num_timesteps) the caller will use; it must be the one the score model was trained
  with, since eps_hat means nothing under another noise schedule: for a workdir its `config.ddpm`, for a
  preset of a released checkpoint the schedule the preset names (`UNET_PRESETS`: noise_schedule,
  diffusion_steps)."""
  from diffaug_jax import trainer
  if workdir and params_path:
    raise ValueError(f"config.score names both a workdir ({workdir}) and a params_path ({params_path}); "
                     "set one (e.g. --config.score.workdir= to use the params file)")
  if workdir:
    config = read_train_config(workdir)
    if config.get("mode") != "score":
      raise ValueError(f"{workdir} holds a {config.get('mode')!r} run, not a score model")
    ddpm = config.get("ddpm", {}) or {}
    trained = (str(ddpm.get("schedule", "linear")), int(ddpm.get("num_timesteps", 1000)))
    if schedule is not None and (str(schedule[0]), int(schedule[1])) != trained:
      raise ValueError(f"the score model in {workdir} was trained with the {trained[0]} schedule over "
                       f"{trained[1]} steps, but config.score asks for {schedule[0]} over {schedule[1]}: set "
                       f"--config.score.schedule={trained[0]} --config.score.num_timesteps={trained[1]}")
    module = trainer.build_score_model(config, dtype=dtype)
    if overrides:  # the architecture is the run's own; only execution choices may be overridden here
      from diffaug_jax.models.unet import EXECUTION_FIELDS
      execution = set(EXECUTION_FIELDS)
      if not set(overrides) <= execution:
        raise ValueError(f"score.overrides {sorted(set(overrides) - execution)} cannot change the architecture "
                         f"of the score run in {workdir}; only {sorted(execution)} may be overridden")
      module = module.clone(**overrides)
    # The EMA weights when the run kept them (read alone: not the raw params, nor the optimizer state).
    params = restore_raw_state(workdir, step, keys=("ema_params",))[0].get("ema_params")
    if not params:
      params = restore_raw_state(workdir, step, keys=("params",))[0]["params"]
    return module, params
  if params_path:
    if not preset:
      raise ValueError("a score model loaded from params_path needs config.score.preset")
    from flax import traverse_util
    from diffaug_jax.convert import common, guided_diffusion
    from diffaug_jax.models.unet import UNET_PRESETS, unet_from_preset
    flags = {**UNET_PRESETS.get(preset, {}), **(overrides or {})}
    if schedule is not None and "noise_schedule" in flags:  # a released checkpoint's own schedule
      trained = (str(flags["noise_schedule"]), int(flags.get("diffusion_steps", 1000)))
      if (str(schedule[0]), int(schedule[1])) != trained:
        raise ValueError(f"preset {preset!r} was trained with the {trained[0]} schedule over {trained[1]} steps, "
                         f"but config.score asks for {schedule[0]} over {schedule[1]}: set "
                         f"--config.score.schedule={trained[0]} --config.score.num_timesteps={trained[1]}")
    variables = common.load_params(params_path)
    params = variables.get("params", variables) if isinstance(variables, dict) else variables
    kw = dict(overrides or {})
    if dtype is not None:
      kw["dtype"] = dtype
    module = unet_from_preset(preset, **kw)
    # Every key and shape, before anything compiles: an unused key (say label_emb of a class-conditional
    # model under an unconditional preset) would otherwise be ignored without a word.
    if not isinstance(params, dict):
      raise ValueError(f"{params_path} holds no parameter tree (got {type(params).__name__})")
    common.check_keys({"/".join(k): tuple(v.shape) for k, v in guided_diffusion.flax_shapes(module).items()},
                      {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()},
                      f"score params {params_path} for preset {preset!r} (overrides {dict(overrides or {})})")
    return module, params
  raise ValueError("no score model given: set config.score.workdir or config.score.params_path")
