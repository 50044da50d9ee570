"""Noisy vs denoising-augmented (DA) time-conditioned classifiers on the embedded digits (paper Table 4 +
classifier-guided sampling), fully offline.

Run (~3-5 min on 2 CPU cores; `:smoke` ~1 min):
  python evaluate.py --config configs/da_classifier_digits.py --workdir runs/demo/da_classifier
With the demo's trained UNet as the score model instead of the closed-form Gaussian denoiser:
  python evaluate.py --config configs/da_classifier_digits.py --workdir runs/demo/da_unet \
      --config.score.kind=unet --config.score.workdir=runs/demo/score
What it does: trains a noisy classifier (input x_t) and a DA-classifier (input [x_t, x0_hat] on channels),
same seed/steps; reports accuracy on test digits diffused to t ~ U{0..999} overall and per t-bin
(da_classifier.md/json); samples 4 digits per class with DDPM (250 steps) and DDIM (50 steps), unguided and
guided by each classifier (guided_{ddpm,ddim}_{unguided,noisy,da}.png, one row per class).
Expected: both classifiers far above chance (10%) on small t, near chance at t close to 999; the DA-classifier
is more accurate overall (paper Table 4's claim; measured here with the Gaussian denoiser and the defaults,
1000 steps: DA 41.48% vs noisy 39.56%); guided samples are judged as their target class more often than
unguided ones (DDPM: 87.5% with the DA-classifier, 100% with the noisy one, 5.0% unguided).
"""
import ml_collections

from diffaug_jax.config_files import check_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  check_arg(__file__, arg, (None, "smoke"))
  c = ml_collections.ConfigDict()
  c.task = "da_classifier"
  c.seed = 0
  c.num_classes = 10
  c.num_timesteps = 1000
  c.data = ml_collections.ConfigDict(dict(source="digits", image_size=8, channels=1, train_split="train",
                                          eval_split="test"))
  # kind "gaussian": closed-form MMSE denoiser of a Gaussian fit to the training digits (no training);
  # kind "unet": a trained score model (workdir of `train.py` in score mode, or params_path + preset).
  # (kind "unet" uses the score model's own schedule: schedule / num_timesteps below must be the ones it
  # was trained with, which a score workdir checks.)
  c.score = ml_collections.ConfigDict(dict(kind="gaussian", workdir="", params_path="", preset="", overrides={},
                                           dtype="", schedule="linear", num_timesteps=1000))
  c.model = ml_collections.ConfigDict(dict(width=32, channel_mult=(1, 2), num_res_blocks=1))
  c.train_steps = 1000
  c.batch_size = 128
  c.learning_rate = 2e-3
  c.eval_batch_size = 256
  c.guidance_scale = 2.0
  c.samples_per_class = 4
  c.ddpm_steps = "250"
  c.ddim_steps = 50
  if arg == "smoke":
    c.train_steps = 60
    c.batch_size = 64
    c.model.width = 16
    c.samples_per_class = 2
    c.ddpm_steps = "20"
    c.ddim_steps = 10
  return c
