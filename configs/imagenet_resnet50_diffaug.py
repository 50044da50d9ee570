"""ImageNet-1k, ResNet-50 from scratch + DiffAug: the paper's "RN50+DiffAug" recipe.

Run (one GPU node, or every host of a pod; SLURM / MPI / JAX_COORDINATOR_ADDRESS launches start
jax.distributed by themselves, a Cloud TPU VM pod slice needs --config.distributed=True):
  python -m diffaug_jax.convert guided-diffusion 256x256_diffusion_uncond.pt adm256.msgpack \
      --flags-json adm_256_uncond   # once
  python train.py --config configs/imagenet_resnet50_diffaug.py --workdir runs/in_r50_diffaug \
      --config.data.data_dir=/data/imagenet --config.score.params_path=adm256.msgpack
  # baseline (same program, no DiffAug):  configs/imagenet_resnet50_diffaug.py:baseline
  # AugMix + DiffAug (views clean, aug1, aug2, diffaug; + 12 * JSD):  configs/imagenet_resnet50_diffaug.py:augmix

Recipe (REFERENCE.md): clean view RandomResizedCrop(224) + flip, DiffAug view Resize(256) + CenterCrop(224);
t ~ U{0..999}, ONE score-model call (ADM 256x256 unconditional, run on the 224 crop, bf16), loss CE + CE
with one classifier forward over the concatenation (shared BatchNorm statistics). SGD lr 0.1 for batch 256
scaled linearly (x batch/256), momentum 0.9, no nesterov, weight decay 1e-4 on all params (torch), x0.1
every 30 epochs, 90 epochs. An extracted ImageNet tree (DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG) instead
of TFDS: `--config.data.source=folder --config.data.eval_split=val --config.data.class_names=imagenet2012`.
Expected (paper Table 1, severity 5): IN-Test Default 75.95 / DE 75.07; IN-C Default 20.87 / DE 32.22
(baseline RN50: 76.15 / 71.43; 17.87 / 27.12). Not measured here.
"""
import ml_collections

from diffaug_jax.config_files import check_arg


def get_config(arg=None) -> ml_collections.ConfigDict:
  """arg: "diffaug" (default) | "baseline" | "augmix" (AugMix + DiffAug + JSD)."""
  arg = arg or "diffaug"
  check_arg(__file__, arg, ("baseline", "diffaug", "augmix"))
  from diffaug_jax.data.config import imagenet_config
  c = ml_collections.ConfigDict()
  c.mode = "classifier"
  c.seed = 0
  c.num_classes = 1000
  c.data = imagenet_config(data_dir="", source="tfds")
  c.model = ml_collections.ConfigDict(dict(name="resnet50", factory="", dtype="bfloat16", kwargs={}))
  c.diffaug = ml_collections.ConfigDict(dict(enabled=arg != "baseline", weight=1.0, t_low=0, t_high=1000))
  c.score = ml_collections.ConfigDict(dict(workdir="", params_path="", preset="adm_256_uncond", factory="",
                                           overrides={}, dtype="bfloat16", schedule="linear",
                                           num_timesteps=1000))
  c.optim = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, lr_batch_base=256, momentum=0.9,
                                           nesterov=False, weight_decay=1e-4, wd_mask="all", schedule="step",
                                           decay_epochs=30.0, decay_factor=0.1, warmup_epochs=0.0,
                                           grad_clip=0.0))
  c.batch_size = 256
  c.eval_batch_size = 500
  c.num_epochs = 90
  c.num_train_steps = 0
  c.label_smoothing = 0.0
  c.augmix = arg == "augmix"
  c.jsd_weight = 12.0
  c.log_every = 100
  c.block_every = 8
  c.eval_every = -1  # steps; -k = every k epochs at any batch size (5004 steps at 256: the last partial batch dropped)
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.init_checkpoint = ""
  c.fsdp = False  # True: split the big leaves of the state and of the frozen UNet over the devices
  c.distributed = ml_collections.config_dict.placeholder(bool)  # None: detect the launcher; True: TPU VM pods
  c.progress = True
  return c
