"""Training entry point.

  python train.py                                        # the embedded digits demo (configs/default.py)
  python train.py --config configs/cifar10_resnet18.py:diffaug --workdir runs/c10_r18_diffaug
  python train.py --config configs/score_cifar10.py --workdir runs/score_c10

A run resumes from the latest checkpoint in --workdir (under the config it was started with, apart from its
length and logging; --allow_config_change to override); SIGTERM saves a checkpoint and exits with status 143
(not 0: the run is not finished; rerunning the command resumes it).
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"), "Config file (path[:arg]).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>[_<arg>]).")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume the run in --workdir even though --config computes something else "
    "than its config.json (the old file is kept as config.before_step<N>.json).")


def default_run_name(config_filename: str | None) -> str:
  """'configs/cifar10_resnet18.py:baseline' -> 'cifar10_resnet18_baseline' (the arg kept, so the baseline and
  +DiffAug runs of one file do not share a workdir); the embedded demo (default.py, no arg) -> 'demo'."""
  path, _, arg = (config_filename or "default").partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return "demo" if (name, arg) == ("default", "") else name + (f"_{arg}" if arg else "")


def main(argv):
  del argv
  import logging as py_logging
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # orbax logs every save/restore at INFO/WARNING
  # That sets the ROOT level (absl's handler sits on the root logger), which would also drop our own warnings,
  # e.g. the data sources' report of an unreadable image replaced in training / left out of evaluation.
  py_logging.getLogger("diffaug_jax").setLevel(py_logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = os.path.join(_HERE, "runs", default_run_name(flags.FLAGS["config"].config_filename))
  from diffaug_jax import metrics, perf, sharding
  metrics.check_local_path(workdir, "--workdir")  # (before anything makes a local folder named "gs:")
  perf.set_xla_gpu_flags()  # program-level XLA flags (GPU), before JAX starts its backend; see perf.py
  sharding.initialize_distributed(config.get("distributed", None))  # before any other JAX call
  if config.get("mode") == "demo":
    from diffaug_jax import demo
    demo.run_demo(config, workdir, allow_config_change=_ALLOW_CHANGE.value)
  else:
    from diffaug_jax import trainer
    summary = trainer.train_and_evaluate(config, workdir, allow_config_change=_ALLOW_CHANGE.value)
    trainer.exit_if_preempted(summary, "training")
    if summary.get("eval"):
      print("final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, _HERE)
  app.run(main)
