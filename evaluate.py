"""Evaluation entry point: `config.task` selects a task module in diffaug_jax/evaluation/.

  python evaluate.py --config configs/eval_digits.py --workdir runs/demo/eval
  python evaluate.py --config configs/eval_cifar10.py --workdir runs/eval_c10
  python evaluate.py --config configs/eval_imagenet.py:dda --workdir runs/eval_in_dda

Tasks: robustness (Default / DE / DDA / DDA-SE on clean and shifted suites), certify, ood, pag,
da_classifier. Each writes results.json (every number), results.md and its PNGs into --workdir. If --workdir
already holds an earlier evaluation's outputs, they are first moved to --workdir/earlier/<n>/ (n = 1, 2, ...;
a training run's files and any file the config reads stay), so nothing is silently replaced.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for results.json / results.md / PNGs.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "true", "false"],
    "Start jax.distributed: auto = detect the launcher (or the config's `distributed` field); true on a Cloud "
    "TPU VM pod slice, whose hosts no environment variable names.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  from diffaug_jax import perf, sharding
  perf.set_xla_gpu_flags()  # program-level XLA flags (GPU), before JAX starts its backend; see perf.py
  force = {"auto": _CONFIG.value.get("distributed", None), "true": True, "false": False}[_DISTRIBUTED.value]
  sharding.initialize_distributed(force)  # before any other JAX call
  from diffaug_jax.evaluation import run_task
  run_task(_CONFIG.value, _WORKDIR.value)
  print(f"results: {os.path.join(_WORKDIR.value, 'results.md')} (table), results.json (every number)", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, _HERE)
  app.run(main)
