"""Evaluation: robustness modes (Default, DiffAug-Ensemble, DDA, DDA-SE), suites, tables, figures, and
the task dispatch of `evaluate.py`.

Each task module `diffaug_jax.evaluation.<task>` exposes `run(config, workdir) -> dict`. Modules are
imported only when their task is run, so the package imports nothing heavy.
"""

from __future__ import annotations

import importlib
import os

TASKS = ("robustness", "certify", "ood", "pag", "da_classifier")


def get_task(name: str):
  """The task module for `config.task` (imported lazily); a clear error if it is unknown or missing."""
  if name not in TASKS:
    raise ValueError(f"unknown evaluation task {name!r}; known: {', '.join(TASKS)}")
  try:
    module = importlib.import_module(f"diffaug_jax.evaluation.{name}")
  except ModuleNotFoundError as e:
    if e.name == f"diffaug_jax.evaluation.{name}":
      raise ValueError(f"evaluation task {name!r} is not available: diffaug_jax/evaluation/{name}.py is "
                       f"missing from this checkout") from e
    raise
  if not hasattr(module, "run"):
    raise ValueError(f"diffaug_jax/evaluation/{name}.py has no run(config, workdir)")
  return module


def run_task(config, workdir: str) -> dict:
  """Dispatch `config.task` (default "robustness") to its module's `run(config, workdir)`.

  The outputs of an earlier evaluation in `workdir` are first moved to `workdir/earlier/<n>/`
  (`loading.set_aside_earlier_outputs`), so a second evaluation never silently replaces them."""
  task = config.get("task", "robustness") if hasattr(config, "get") else "robustness"
  module = get_task(task)  # (an unknown task is an error before anything in workdir moves)
  from diffaug_jax import metrics, sharding  # pylint: disable=g-import-not-at-top
  metrics.check_local_path(workdir, "--workdir")
  sharding.check_multi_process()
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a directory: give a directory for the evaluation's "
                     "outputs")
  os.makedirs(workdir, exist_ok=True)
  from diffaug_jax.evaluation import loading  # pylint: disable=g-import-not-at-top
  kept = loading.set_aside_earlier_outputs(workdir, config)
  if kept:
    print(f"{workdir} held the outputs of an earlier evaluation: moved to {kept}", flush=True)
  return module.run(config, workdir)
