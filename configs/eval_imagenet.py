"""ImageNet robustness, the paper's Table 1/2: ImageNet val, ImageNet-C (severity 5 as Table 1; arg
"allsev" for 1..5 and mCE), ImageNet-R and -A (200-class logit slicing), ImageNet-Sketch, ImageNet-V2;
Default and DE modes (arg "dda": DDA and DDA-SE, 256x256 uncond model, 100 respaced steps, N=50, D=4,
scale 6).

Run:
  python evaluate.py --config configs/eval_imagenet.py --workdir runs/eval_in \
      --config.models="({'name': 'RN50+DiffAug', 'workdir': 'runs/in_rn50_diffaug'},)" \
      --config.score.params_path=weights/256x256_diffusion_uncond.msgpack
ImageNet needs a MANUAL download (ILSVRC2012 tars into <data_dir>/downloads/manual, then
`python -m diffaug_jax.data.prepare imagenet2012 --data_dir DIR --manual_dir TARS`); ImageNet-C either TFDS
`imagenet2012_corrupted` (regenerated from ImageNet) or the official JPEG release with
--config.suites.imagenet_c.source=folder --config.suites.imagenet_c.path=DIR (the results record which).
ImageNet-R/-A/-Sketch/-V2: TFDS `imagenet_r`, `imagenet_a`, `imagenet_sketch`, `imagenet_v2` or folders
(source=folder, path=...). Expected (paper, top-1 %, IN-C sev 5 Default/DE): RN50 17.87/27.12, RN50+DiffAug
20.87/32.22.
"""
import ml_collections

from diffaug_jax.config_files import check_arg


def get_config(arg=None) -> ml_collections.ConfigDict:
  check_arg(__file__, arg, (None, "dda", "allsev"))
  from diffaug_jax.data.config import imagenet_config
  c = ml_collections.ConfigDict()
  c.task = "robustness"
  c.seed = 0
  # A tuple (not a list) so that --config.models="({'name': ..., 'workdir': ...},)" can replace it.
  c.models = (dict(name="RN50+DiffAug", workdir="runs/in_rn50_diffaug"),)
  c.score = ml_collections.ConfigDict(dict(workdir="", params_path="weights/256x256_diffusion_uncond.msgpack",
                                           preset="adm_256_uncond", overrides={}, dtype="bfloat16",
                                           schedule="linear", num_timesteps=1000))
  c.data = imagenet_config()
  c.batch_size = 256 if arg != "dda" else 64
  sev = (1, 2, 3, 4, 5) if arg == "allsev" else (5,)
  c.suites = ml_collections.ConfigDict({
      "clean": {},
      "imagenet_c": dict(source="tfds", path="", severities=sev),
      "imagenet_r": dict(source="tfds", path="", head="subset"),
      "imagenet_a": dict(source="tfds", path="", head="subset"),
      "imagenet_sketch": dict(source="tfds", path=""),
      "imagenet_v2": dict(source="tfds", path=""),
  })
  c.modes = ("dda",) if arg == "dda" else ("default", "de")
  c.de = ml_collections.ConfigDict(dict(ts=tuple(range(0, 500, 50))))
  # image_size=256: DDA runs the 256 model at 256 (the 224 crop is resized up and the result back).
  # norm="groups_of_4": the official code's whole-batch guidance norm at its --batch_size 4, the setting its
  # scale 6 was chosen with (per_example would step about twice as far). Framing differs slightly: the
  # official code adapts the whole 224 ImageNet-C image upscaled to 256 and then crops; we adapt the
  # classifier's Resize(256) + CenterCrop(224) view upscaled to 256 and resize the result back.
  c.dda = ml_collections.ConfigDict(dict(spacing="100", start_step=50, factor=4, scale=6.0,
                                         norm="groups_of_4", image_size=256))
  c.figures = ml_collections.ConfigDict(dict(augmentation_grid=True, num_images=4, entropy_vs_t=False,
                                             entropy_ts=tuple(range(0, 1000, 50)), entropy_batches=1))
  return c
