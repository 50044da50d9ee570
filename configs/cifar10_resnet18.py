"""CIFAR-10, ResNet-18 (CIFAR stem), baseline or +DiffAug.

Run:
  # 1. a score model for CIFAR-10 (or pass a converted improved-diffusion model, see below)
  python train.py --config configs/score_cifar10.py --workdir runs/score_c10
  # 2. the classifiers
  python train.py --config configs/cifar10_resnet18.py:baseline --workdir runs/c10_r18_base \
      --config.data.data_dir=~/tensorflow_datasets
  python train.py --config configs/cifar10_resnet18.py:diffaug --workdir runs/c10_r18_diffaug \
      --config.data.data_dir=~/tensorflow_datasets --config.score.workdir=runs/score_c10
  # (or --config.score.params_path=iddpm_cifar10.msgpack --config.score.preset=iddpm_cifar10
  #  --config.score.schedule=cosine --config.score.num_timesteps=4000 for the released improved-diffusion model)

Data: TFDS `cifar10` prepared in data_dir (reading needs no TensorFlow; preparing does: `pip install
'.[prepare]'` then `python -m diffaug_jax.data.prepare cifar10 --data_dir DIR`). RandomCrop(32, 4) + flip; DiffAug view
= the un-augmented image. Recipe: SGD 0.1 (batch 128), momentum 0.9, wd 5e-4, cosine, 200 epochs, bf16 compute.
Expected: ~95% clean test accuracy for both (baseline ~95.3); +DiffAug trades ~0-0.5% clean accuracy for
better CIFAR-10-C accuracy (evaluate with evaluate.py). Not measured here (CPU only).
"""
import ml_collections

from diffaug_jax.config_files import check_arg


def get_config(arg=None) -> ml_collections.ConfigDict:
  """arg: "baseline" | "diffaug" (default "diffaug")."""
  arg = arg or "diffaug"
  check_arg(__file__, arg, ("baseline", "diffaug"))
  from diffaug_jax.data.config import cifar10_config
  c = ml_collections.ConfigDict()
  c.mode = "classifier"
  c.seed = 0
  c.num_classes = 10
  c.data = cifar10_config(data_dir="")
  c.data.num_workers = 4
  c.model = ml_collections.ConfigDict(dict(name="resnet18_cifar", factory="", dtype="bfloat16",
                                           kwargs=dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))))
  # t_high=0: t ~ U over the whole schedule of the score model (1000 steps, or 4000 for the released
  # improved-diffusion cosine model: t < 1000 there would only reach noise/signal 0.43).
  c.diffaug = ml_collections.ConfigDict(dict(enabled=arg == "diffaug", weight=1.0, t_low=0, t_high=0))
  c.score = ml_collections.ConfigDict(dict(workdir="", params_path="", preset="", factory="", overrides={},
                                           dtype="bfloat16", schedule="linear", num_timesteps=1000))
  c.optim = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, lr_batch_base=128, momentum=0.9,
                                           nesterov=False, weight_decay=5e-4, wd_mask="all", schedule="cosine",
                                           warmup_epochs=0.0, grad_clip=0.0))
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 200
  c.num_train_steps = 0
  c.label_smoothing = 0.0
  c.augmix = False
  c.jsd_weight = 12.0
  c.log_every = 100
  c.block_every = 8
  c.eval_every = 5000
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.init_checkpoint = ""
  c.fsdp = False
  c.distributed = ml_collections.config_dict.placeholder(bool)  # None: detect the launcher; True: TPU VM pods
  c.progress = True
  return c
