"""Certified l2 robustness with diffusion-denoised randomized smoothing (Carlini et al. + Cohen et al.).

Run (embedded digits demo, after `python train.py`; ~2-4 min on CPU):
  python evaluate.py --config configs/eval_certify.py --workdir runs/demo/certify
ImageNet (paper Fig. 10 / Table 13: ViT-B/16 vs ViT-B/16+DiffAug, 256x256 ADM denoiser, every 100th val image):
  python evaluate.py --config configs/eval_certify.py:imagenet --workdir runs/certify_vit \
      --config.classifier.workdir=runs/vit_diffaug --config.score.params_path=weights/adm256_uncond.msgpack \
      --config.data.data_dir=/data/imagenet
Expected (paper, ImageNet): certified accuracy at radius 0.5 / 1.0: 36.3 -> 40.3 / 25.5 -> 32.5.
Outputs: certify_sigma{s}.tsv (index, label, prediction, radius, correct, seconds), certify.json, certify.md
(certified accuracy vs radius per sigma + best sigma per radius), certify.png.
"""
import ml_collections

from diffaug_jax.config_files import check_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  check_arg(__file__, arg, (None, "imagenet", "smoke"))
  c = ml_collections.ConfigDict()
  c.task = "certify"
  c.seed = 0
  c.denoise = True  # False: plain Gaussian smoothing (Cohen et al.) without the diffusion denoiser
  c.sigmas = (0.25, 0.5, 1.0)
  c.alpha = 0.001
  c.radii = tuple(round(0.25 * i, 2) for i in range(17))  # 0 .. 4
  if arg == "imagenet":
    # batch_size: noisy copies per call. The bf16 ADM-256 at 224 needs ~0.4 GB of activations per copy (XLA's
    # estimate): 128 fits one 80 GB GPU; scale it with the device count (e.g. 1024 on 8 GPUs).
    c.n0, c.n, c.batch_size = 100, 10_000, 128
    c.classifier = ml_collections.ConfigDict(dict(workdir="", name="vit_b16", num_classes=1000, params_path=""))
    # bfloat16 compute (the official code runs the ADM in fp16); overrides: UNet execution choices.
    c.score = ml_collections.ConfigDict(dict(workdir="", params_path="", preset="adm_256_uncond", overrides={},
                                             dtype="bfloat16", schedule="linear", num_timesteps=1000))
    c.data = ml_collections.ConfigDict(dict(source="folder", data_dir="", eval_split="val",
                                            class_names="imagenet2012", image_size=224, channels=3,
                                            eval_transform="imagenet", resize_size=256, skip=100,
                                            max_examples=500))
    return c
  c.n0, c.n, c.batch_size = 100, 2000, 1000
  if arg == "smoke":
    c.n0, c.n, c.batch_size = 16, 256, 128
  c.classifier = ml_collections.ConfigDict(dict(workdir="runs/demo/diffaug", name="", num_classes=10,
                                                params_path=""))
  c.score = ml_collections.ConfigDict(dict(workdir="runs/demo/score", params_path="", preset="", overrides={},
                                           dtype="", schedule="linear", num_timesteps=1000))
  c.data = ml_collections.ConfigDict(dict(source="digits", image_size=8, channels=1, split="test", skip=9,
                                          max_examples=100 if arg != "smoke" else 10))
  return c
