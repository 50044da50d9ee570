"""CIFAR-10, WideResNet-28-10, baseline or +DiffAug.

Run:
  python train.py --config configs/cifar10_wrn28_10.py:diffaug --workdir runs/c10_wrn_diffaug \
      --config.data.data_dir=~/tensorflow_datasets --config.score.workdir=runs/score_c10
  python train.py --config configs/cifar10_wrn28_10.py:baseline --workdir runs/c10_wrn_base \
      --config.data.data_dir=~/tensorflow_datasets

Recipe (standard WRN): SGD 0.1 (batch 128), momentum 0.9, nesterov, wd 5e-4, x0.2 at epochs 60/120/160
approximated by cosine over 200 epochs, bf16 compute. Expected: ~96% clean test accuracy (baseline ~96.0);
+DiffAug: similar clean accuracy, better CIFAR-10-C. Not measured here (CPU only).
"""
import ml_collections

from diffaug_jax.config_files import sibling


def get_config(arg=None) -> ml_collections.ConfigDict:
  """arg: "baseline" | "diffaug" (default "diffaug"). The ResNet-18 recipe with the WRN model, nesterov."""
  c = sibling(__file__, "cifar10_resnet18").get_config(arg)
  c.model.name = "wrn28_10"
  c.optim.nesterov = True
  return c
