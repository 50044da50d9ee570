"""Score model on CIFAR-10 (DDPM / improved-diffusion objective), UNet preset "small_32" (~7M params).

Run:
  python train.py --config configs/score_cifar10.py --workdir runs/score_c10 \
      --config.data.data_dir=~/tensorflow_datasets
  # larger, improved-diffusion CIFAR-10 architecture with L_hybrid and the cosine schedule:
  python train.py --config configs/score_cifar10.py:iddpm --workdir runs/score_c10_iddpm
Then train classifiers with --config.score.workdir=runs/score_c10 (configs/cifar10_resnet18.py; for the
iddpm run add --config.score.schedule=cosine --config.score.num_timesteps=4000: a score workdir is only used
with the schedule it was trained with).
Recipe: Adam 1e-4 (2e-4 for small_32), batch 128, EMA 0.9999, 500k steps (iddpm) / 200k (small_32), bf16.
Expected: L_simple ~0.03; one-step DiffAug samples look like blurred CIFAR images up to t~300. Not measured
here (CPU only).
"""
import ml_collections

from diffaug_jax.config_files import check_arg


def get_config(arg=None) -> ml_collections.ConfigDict:
  """arg: None ("small_32", linear T=1000, L_simple) | "iddpm" (improved-diffusion: cosine T=4000, hybrid)."""
  check_arg(__file__, arg, (None, "iddpm"))
  iddpm = arg == "iddpm"
  from diffaug_jax.data.config import cifar10_config
  c = ml_collections.ConfigDict()
  c.mode = "score"
  c.seed = 0
  c.num_classes = 10
  c.data = cifar10_config(data_dir="")
  # The clean images, as improved-diffusion trains (no crop: padded crops would teach black borders).
  c.data.train_transform = "none"
  c.data.num_workers = 4
  c.score_model = ml_collections.ConfigDict(dict(preset="iddpm_cifar10" if iddpm else "small_32", factory="",
                                                 dtype="bfloat16", overrides={}))
  c.ddpm = ml_collections.ConfigDict(dict(learn_sigma=iddpm, loss_type="hybrid" if iddpm else "simple",
                                          ema_decay=0.9999, class_cond=False,
                                          schedule="cosine" if iddpm else "linear",
                                          num_timesteps=4000 if iddpm else 1000))
  c.optim = ml_collections.ConfigDict(dict(name="adam", learning_rate=1e-4 if iddpm else 2e-4, lr_batch_base=0,
                                           schedule="constant", warmup_epochs=0.0, weight_decay=0.0,
                                           grad_clip=0.0 if iddpm else 1.0))  # improved-diffusion: no clipping
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 1
  c.num_train_steps = 500_000 if iddpm else 200_000
  c.log_every = 100
  c.block_every = 8
  c.eval_every = 0
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.init_checkpoint = ""
  c.fsdp = False
  c.distributed = ml_collections.config_dict.placeholder(bool)  # None: detect the launcher; True: TPU VM pods
  c.progress = True
  return c
