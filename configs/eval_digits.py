"""Robustness evaluation of the embedded demo's classifiers (digits, 8x8 grayscale as the demo trains them), on CPU.

Run (after `python train.py`, which writes runs/demo/{score,baseline,diffaug}):
  python evaluate.py --config configs/eval_digits.py --workdir runs/demo/eval
  python evaluate.py --config configs/eval_digits.py:full --workdir runs/demo/eval_full   # + severities 1-5, DDA
  python evaluate.py --config configs/eval_digits.py:smoke --workdir /tmp/eval_smoke      # 2 corruptions

Outputs results.json, results.md (Table-1 shape: rows = models, columns = suite x mode), de_curve.png,
diffaug_grid.png (Fig. 1), entropy_vs_t.png (Fig. 2). Expected: the +DiffAug classifier is more robust
on the corrupted digits and gains more from DE than the baseline (numbers vary with the demo's training).
"""
import ml_collections

from diffaug_jax.config_files import check_arg


def get_config(arg=None) -> ml_collections.ConfigDict:
  check_arg(__file__, arg, (None, "smoke", "full"))
  from diffaug_jax.data.config import digits_config
  c = ml_collections.ConfigDict()
  c.task = "robustness"
  c.seed = 0
  # A tuple (not a list) so that --config.models="({'name': ..., 'workdir': ...},)" can replace it.
  c.models = (dict(name="CNN", workdir="runs/demo/baseline"),
              dict(name="CNN+DiffAug", workdir="runs/demo/diffaug"))
  c.score = ml_collections.ConfigDict(dict(workdir="runs/demo/score", params_path="", preset="",
                                           overrides={}, dtype="", schedule="linear", num_timesteps=1000))
  c.data = digits_config(image_size=8, channels=1)
  c.batch_size = 128
  corruptions = ("gaussian_noise", "contrast") if arg == "smoke" else (
      "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
      "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
      "jpeg_compression")
  c.suites = ml_collections.ConfigDict({
      "clean": {},
      "corrupted": dict(corruptions=corruptions, severities=(1, 2, 3, 4, 5) if arg == "full" else (5,),
                        seed=0),
  })
  c.modes = ("default", "de", "dda") if arg == "full" else ("default", "de")
  c.de = ml_collections.ConfigDict(dict(ts=tuple(range(0, 500, 50))))
  # DDA on 8 px digits: D=2 (D=4 would leave 2x2 px), 100 respaced steps, start at 50.
  c.dda = ml_collections.ConfigDict(dict(spacing="100", start_step=50, factor=2, scale=6.0,
                                         norm="per_example", image_size=0))
  c.figures = ml_collections.ConfigDict(dict(augmentation_grid=True, num_images=6, entropy_vs_t=arg != "smoke",
                                             entropy_ts=tuple(range(0, 1000, 50)), entropy_batches=1))
  return c
