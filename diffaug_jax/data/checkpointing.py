"""Saving the train iterator's position with orbax (grain's per-process JSON handler).

The trainer's `checkpoint.py` must not import grain; it asks this module for the pieces instead:

  from diffaug_jax.data import checkpointing as data_ckpt
  mngr = ocp.CheckpointManager(dir, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                   "data": data_ckpt.handler()}, options=...)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=data_ckpt.save_args(train_iter)))
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        data=data_ckpt.restore_args(train_iter)))
  # restore sets the position of `train_iter` in place (and returns it as restored["data"]).

Each process writes `process_<i>-of-<n>.json` with its own iterator state, so multi-host runs resume
each host's slice exactly. (The train stream is global, so with num_workers=0 every host's state is the
same global step: a run restored on a different host count can copy one state into every iterator with
`it.set_state(...)`; grain's handler itself only restores the same process count, while train.py's own
handler, `diffaug_jax.checkpoint.DataIteratorHandler`, does that copy when all saved states are equal.)
A plain alternative (single process): `state = it.get_state()` (JSON-able dict) saved any way, then
`it.set_state(state)` on a freshly made iterator with the same config/seed.
"""

from typing import Any


def handler() -> Any:
  """An orbax CheckpointHandler for grain iterators (`grain.checkpoint.CheckpointHandler`)."""
  import grain  # pylint: disable=g-import-not-at-top
  return grain.checkpoint.CheckpointHandler()


def save_args(iterator) -> Any:
  """orbax save args for `iterator` (`grain.checkpoint.CheckpointSave`)."""
  import grain  # pylint: disable=g-import-not-at-top
  return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator) -> Any:
  """orbax restore args: restoring sets `iterator`'s position in place."""
  import grain  # pylint: disable=g-import-not-at-top
  return grain.checkpoint.CheckpointRestore(iterator)
