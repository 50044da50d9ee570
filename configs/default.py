"""The embedded demo (the README's main command): DiffAug end to end on scikit-learn's digits, offline.

Run:
  python train.py                                   # = --config configs/default.py --workdir runs/demo
  python train.py --config configs/default.py:smoke --workdir /tmp/demo_smoke   # ~1 min smoke version

What it does (diffaug_jax/demo.py): digits at 8x8 grayscale (native size; configurable) ->
  1. trains a small ADM UNet score model (DDPM, preset "digits") in <workdir>/score (reused when finished);
  2. trains a baseline classifier (<workdir>/baseline) and a +DiffAug classifier (<workdir>/diffaug), same
     recipe and seed, DiffAug = one-step denoised copies from the frozen score model, loss CE + CE;
  3. evaluates both in Default and DiffAug-Ensemble (DE, t in {0, 50, ..., 450}) modes on the clean test
     digits and on corrupted copies (gaussian_noise, defocus_blur, contrast, severity `demo.severity`),
  4. prints a table shaped like the paper's Table 1 (results.md / results.json) and saves the DiffAug
     augmentation grid (paper Fig. 1) as <workdir>/diffaug_grid.png.
Expected (measured on 2 CPU cores: ~5 min wall, deterministic), top-1 %, Corrupted = mean of the three:
  | model       | Corrupted Default | Corrupted DE | Test Default | Test DE |
  | CNN         | 52.20             | 59.07        | 98.63        | 95.88   |
  | CNN+DiffAug | 63.37             | 66.67        | 98.35        | 97.80   |
The +DiffAug classifier is more robust; DE helps both on corrupted digits and costs +DiffAug less clean
accuracy than the baseline.
"""
import ml_collections

from diffaug_jax.config_files import check_arg


IMAGE_SIZE = 8  # digits at their native 8x8 (the upsampling factor is a config choice; 16x16 costs 4x CPU)


def _data(image_size: int = IMAGE_SIZE):
  from diffaug_jax.data.config import digits_config
  d = digits_config(image_size=image_size, channels=1)
  d.crop_padding = 1
  return d


def score_run(smoke: bool) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "score"
  c.seed = 0
  c.num_classes = 10
  c.data = _data()
  c.data.train_transform = "none"  # the score model learns the clean digits
  # The "digits" ADM preset made CPU-sized: 32 channels, levels 8x8 and 4x4, one res block, no attention.
  overrides = dict(image_size=IMAGE_SIZE, channel_mult="1,2", attention_resolutions="", num_res_blocks=1)
  if smoke:  # one level: fewer ops to compile
    overrides["channel_mult"] = "1"
  c.score_model = ml_collections.ConfigDict(dict(preset="digits", factory="", dtype="float32",
                                                 overrides=overrides))
  c.ddpm = ml_collections.ConfigDict(dict(learn_sigma=False, loss_type="simple", ema_decay=0.995,
                                          class_cond=False, schedule="linear", num_timesteps=1000))
  c.optim = ml_collections.ConfigDict(dict(name="adam", learning_rate=2e-3, lr_batch_base=0, schedule="cosine",
                                           warmup_epochs=1.0, weight_decay=0.0, grad_clip=1.0))
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 1
  c.num_train_steps = 30 if smoke else 1500
  c.log_every = 10 if smoke else 100
  c.block_every = 4
  c.eval_every = 0
  c.checkpoint_every = 0 if smoke else 500
  c.keep_checkpoints = 2
  c.init_checkpoint = ""
  c.progress = True
  return c


def classifier_run(smoke: bool) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "classifier"
  c.seed = 0
  c.num_classes = 10
  c.data = _data()
  c.model = ml_collections.ConfigDict(dict(name="cnn_small", factory="", dtype="float32", kwargs={}))
  c.diffaug = ml_collections.ConfigDict(dict(enabled=True, weight=1.0, t_low=0, t_high=1000))
  c.score = ml_collections.ConfigDict(dict(workdir="", params_path="", preset="", overrides={},
                                           dtype="float32", schedule="linear", num_timesteps=1000))
  c.optim = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.05, lr_batch_base=0, momentum=0.9,
                                           nesterov=False, weight_decay=5e-4, schedule="cosine",
                                           warmup_epochs=0.0, grad_clip=0.0))
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 1
  c.num_train_steps = 20 if smoke else 1000
  c.label_smoothing = 0.0
  c.augmix = False
  c.jsd_weight = 12.0
  c.log_every = 10 if smoke else 100
  c.block_every = 4
  c.eval_every = 0
  c.checkpoint_every = 0 if smoke else 500
  c.final_eval = not smoke  # the demo evaluates the classifiers itself
  c.keep_checkpoints = 2
  c.init_checkpoint = ""
  c.progress = True
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  """arg: None (full demo) | "smoke" (reduced size, < 60 s, used by tests/test_demo.py)."""
  check_arg(__file__, arg, (None, "smoke", "full"))
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.mode = "demo"
  c.seed = 0  # every stage's seed: the score run, both classifiers (their own `seed` fields are set to it), eval
  c.demo = ml_collections.ConfigDict()
  c.demo.score = score_run(smoke)
  c.demo.classifier = classifier_run(smoke)
  c.demo.corruptions = ("gaussian_noise", "defocus_blur", "contrast")
  c.demo.severity = 5
  c.demo.ensemble_ts = (0, 100, 200) if smoke else tuple(range(0, 500, 50))
  c.demo.max_test = 64 if smoke else 0  # 0 = the whole test split (364 digits)
  c.demo.grid_ts = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900)
  c.demo.grid_examples = 8
  return c
