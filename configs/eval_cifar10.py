"""CIFAR-10 robustness: clean test set + CIFAR-10-C (TFDS `cifar10_corrupted`, 19 corruptions x 5
severities), Default and DE modes; CE on CIFAR-10-C is the unnormalised mean error.

Run:
  python evaluate.py --config configs/eval_cifar10.py --workdir runs/eval_c10 \
      --config.models="({'name': 'R18+DiffAug', 'workdir': 'runs/c10_r18_diffaug'},)" \
      --config.score.workdir=runs/score_c10
Prepare CIFAR-10-C once (needs TensorFlow only for this step): `pip install -e .[prepare]` then
`python -m diffaug_jax.data.prepare cifar10_corrupted/fog_5 --data_dir <dir>` (one per config). Arg "sev5":
only severity 5.
"""
import ml_collections

from diffaug_jax.config_files import check_arg


def get_config(arg=None) -> ml_collections.ConfigDict:
  check_arg(__file__, arg, (None, "sev5"))
  from diffaug_jax.data.config import cifar10_config
  c = ml_collections.ConfigDict()
  c.task = "robustness"
  c.seed = 0
  # A tuple (not a list) so that --config.models="({'name': ..., 'workdir': ...},)" can replace it.
  c.models = (dict(name="R18", workdir="runs/c10_r18"), dict(name="R18+DiffAug", workdir="runs/c10_r18_diffaug"))
  c.score = ml_collections.ConfigDict(dict(workdir="runs/score_c10", params_path="", preset="", overrides={},
                                           dtype="bfloat16", schedule="linear", num_timesteps=1000))
  c.data = cifar10_config()
  c.batch_size = 512
  c.suites = ml_collections.ConfigDict({
      "clean": {},
      "cifar10_c": dict(source="tfds", severities=(5,) if arg == "sev5" else (1, 2, 3, 4, 5)),
  })
  c.modes = ("default", "de")
  c.de = ml_collections.ConfigDict(dict(ts=tuple(range(0, 500, 50))))
  # DDA (mode "dda", not in the default modes): D=2 on 32 px images, where the paper's D=4 (set for 256 px)
  # would low-pass to 8x8.
  c.dda = ml_collections.ConfigDict(dict(spacing="100", start_step=50, factor=2, scale=6.0,
                                         norm="per_example", image_size=0))
  c.figures = ml_collections.ConfigDict(dict(augmentation_grid=True, num_images=8, entropy_vs_t=True,
                                             entropy_ts=tuple(range(0, 1000, 50)), entropy_batches=2))
  return c
