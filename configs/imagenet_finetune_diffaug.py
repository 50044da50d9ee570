"""Fine-tune a released PyTorch ResNet-50 with DiffAug (paper: AugMix+DiffAug, DeepAugment+DiffAug, DAM+DiffAug).

Run (convert the release once; `pip install '.[torch]'` is needed only to read .pth.tar):
  python -m diffaug_jax.convert torchvision checkpoint.pth.tar augmix_rn50.msgpack --arch resnet50
  python -m diffaug_jax.convert guided-diffusion 256x256_diffusion_uncond.pt adm256.msgpack \
      --flags-json adm_256_uncond
  python train.py --config configs/imagenet_finetune_diffaug.py:augmix --workdir runs/ft_augmix_diffaug \
      --config.init_checkpoint=augmix_rn50.msgpack --config.score.params_path=adm256.msgpack \
      --config.data.data_dir=/data/imagenet
  # :deepaugment (DeepAugment release) and :dam (DeepAugment+AugMix release) the same way.

Recipe (REFERENCE.md): ~50k steps at the release's final learning rate (AugMix: about 1e-3; DeepAugment and
DeepAugment+AugMix: 1e-6, constant), SGD momentum 0.9, weight decay 1e-4, batch 256, BatchNorm in train mode
over the concatenated views. AugMix variants train on [clean, augmix1, augmix2, diffaug] with
CE(clean) + CE(diffaug) + 12 JSD; DeepAugment on [clean, diffaug] (its augmented images are an offline
dataset, not a per-batch transform). `init_checkpoint` is required: a run without one stops at start.
Expected (paper Table 1, severity 5): AugMix+DiffAug IN-C Default 29.47 / DE 38.58, IN-Test 77.34 / 75.88.
Not measured here.
"""
import ml_collections

from diffaug_jax.config_files import check_arg, sibling

_FINAL_LR = {"augmix": 1e-3, "deepaugment": 1e-6, "dam": 1e-6}


def get_config(arg=None) -> ml_collections.ConfigDict:
  """arg: "augmix" (default) | "deepaugment" | "dam" (DeepAugment + AugMix)."""
  arg = arg or "augmix"
  check_arg(__file__, arg, sorted(_FINAL_LR))
  with_augmix = arg in ("augmix", "dam")
  c = sibling(__file__, "imagenet_resnet50_diffaug").get_config("augmix" if with_augmix else "diffaug")
  c.optim.learning_rate = _FINAL_LR[arg]
  c.optim.lr_batch_base = 0  # the release's final lr as is, not rescaled
  c.optim.schedule = "constant"
  c.num_epochs = 0
  c.num_train_steps = 50_000
  c.require_init_checkpoint = True
  return c
