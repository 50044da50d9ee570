"""OOD detection (MSP, energy, ReAct, ASH-B, ASH-S, SCALE; AUROC / AUPR / FPR@95) with a trained classifier.

Run (embedded digits demo, after `python train.py`; digits are ID, OOD = offline stand-ins: pixel-shuffled
digits and uniform noise; add any npz / folder / TFDS set under config.ood_data):
  python evaluate.py --config configs/eval_ood.py --workdir runs/demo/ood
ImageNet near-OOD, paper Table 6, OpenOOD v1.5's protocol (its data/ folder: images_largescale/ and
benchmark_imglist/imagenet/; ID = test_imagenet.txt, the ReAct threshold from val_imagenet.txt, near-OOD =
test_ssb_hard.txt and test_ninco.txt, read as `source="list"`):
  python evaluate.py --config configs/eval_ood.py:imagenet --workdir runs/ood_rn50 \
      --config.classifier.workdir=runs/rn50_diffaug --config.openood_dir=/data/openood/data
Plain image folders instead (all of ImageNet val as ID, the ReAct threshold from it too; not OpenOOD's split):
  python evaluate.py --config configs/eval_ood.py:imagenet_folders --workdir runs/ood_rn50 \
      --config.classifier.workdir=runs/rn50_diffaug --config.id_data.data_dir=/data/imagenet \
      --config.ood_data.ssb_hard.data_dir=/data/openood/ssb_hard --config.ood_data.ninco.data_dir=/data/openood/ninco
Expected (paper): near-OOD AUROC average over MSP/ReAct/ASH/SCALE, RN50 78.23 -> RN50+DiffAug 79.57.
Outputs: ood.json (all metrics, both FPR@95 conventions), ood.md (AUROC and OpenOOD-convention FPR@95).
"""
import ml_collections

from diffaug_jax.config_files import check_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  check_arg(__file__, arg, (None, "imagenet", "imagenet_folders"))
  c = ml_collections.ConfigDict()
  c.task = "ood"
  c.methods = ("msp", "energy", "react", "ash_b", "ash_s", "scale")
  c.react_percentile = 90.0
  c.ash_percentile = 90.0
  c.scale_percentile = 85.0
  c.react_data = None  # data cfg for the ReAct threshold (OpenOOD: ID train/val); None -> ID test set
  if arg in ("imagenet", "imagenet_folders"):
    c.batch_size = 256
    c.classifier = ml_collections.ConfigDict(dict(workdir="", name="resnet50", num_classes=1000,
                                                  params_path=""))
    common = dict(image_size=224, channels=3, eval_transform="imagenet", resize_size=256)
    if arg == "imagenet":  # every path follows --config.openood_dir (a reference, resolved when read)
      c.openood_dir = ""
      root = c.get_ref("openood_dir")

      def listed(name):
        return dict(source="list", data_dir=root + "/images_largescale",
                    eval_split=root + f"/benchmark_imglist/imagenet/{name}.txt", num_classes=1000, **common)

      c.id_data = ml_collections.ConfigDict(listed("test_imagenet"))
      c.react_data = ml_collections.ConfigDict(listed("val_imagenet"))
      c.ood_data = ml_collections.ConfigDict({"ssb_hard": listed("test_ssb_hard"), "ninco": listed("test_ninco")})
      return c
    c.id_data = ml_collections.ConfigDict(dict(source="folder", data_dir="", eval_split="val",
                                               class_names="imagenet2012", **common))
    c.ood_data = ml_collections.ConfigDict({
        "ssb_hard": dict(source="folder", data_dir="", eval_split="", **common),
        "ninco": dict(source="folder", data_dir="", eval_split="", **common)})
    return c
  c.batch_size = 64
  c.classifier = ml_collections.ConfigDict(dict(workdir="runs/demo/diffaug", name="", num_classes=10,
                                                params_path=""))
  c.id_data = ml_collections.ConfigDict(dict(source="digits", image_size=8, channels=1, split="test"))
  # Offline stand-ins (the digits have no natural OOD set): pixel-shuffled test digits and uniform noise.
  # Any npz ({"source": "npz", "path": ...}), image folder or TFDS set can be added here.
  c.ood_data = ml_collections.ConfigDict({
      "pixel_shuffle": dict(source="synthetic", kind="pixel_shuffle", image_size=8, channels=1),
      "uniform_noise": dict(source="synthetic", kind="uniform_noise", image_size=8, channels=1)})
  return c
