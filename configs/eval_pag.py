"""Perceptually aligned gradients (paper Fig. 3): d logit_y / d x_t on images diffused to t = 300.

Run (embedded digits demo, after `python train.py`; baseline vs +DiffAug side by side, a few seconds):
  python evaluate.py --config configs/eval_pag.py --workdir runs/demo/pag
ImageNet (RN50 vs RN50+DiffAug):
  python evaluate.py --config configs/eval_pag.py:imagenet --workdir runs/pag_rn50 \
      --config.models.rn50.workdir=runs/rn50 --config.models.rn50_diffaug.workdir=runs/rn50_diffaug \
      --config.data.data_dir=/data/imagenet
Expected: the +DiffAug model's gradients look more like the digit/object (edges, strokes) than the
baseline's noisy gradients. Output: pag.png (rows = images; columns x0, x_t, one per model), pag.json.
"""
import ml_collections

from diffaug_jax.config_files import check_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  check_arg(__file__, arg, (None, "imagenet"))
  c = ml_collections.ConfigDict()
  c.task = "pag"
  c.seed = 0
  c.t = 300
  c.contrast = True  # percentile clipping (contrast stretching) before min-max normalisation
  c.percentile = 1.0
  c.num_images = 8
  c.num_timesteps = 1000
  if arg == "imagenet":
    c.models = ml_collections.ConfigDict({"rn50": dict(workdir=""), "rn50_diffaug": dict(workdir="")})
    c.data = ml_collections.ConfigDict(dict(source="folder", data_dir="", eval_split="val",
                                            class_names="imagenet2012", image_size=224, channels=3,
                                            eval_transform="imagenet", resize_size=256, skip=5000))
    return c
  c.models = ml_collections.ConfigDict({"baseline": dict(workdir="runs/demo/baseline"),
                                        "diffaug": dict(workdir="runs/demo/diffaug")})
  c.data = ml_collections.ConfigDict(dict(source="digits", image_size=8, channels=1, split="test", skip=7))
  return c
