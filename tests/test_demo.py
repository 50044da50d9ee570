"""The embedded demo end to end in its reduced-size mode (configs/default.py:smoke). Runtime ~60 s on 2 cores."""
import importlib.util
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.slow
def test_demo_smoke_end_to_end(tmp_path, capsys):
  from PIL import Image
  from diffaug_jax import demo
  cfg = _config("default", "smoke")
  out = demo.run_demo(cfg, str(tmp_path))
  printed = capsys.readouterr().out
  assert "| CNN+DiffAug |" in printed and "Corrupted DE" in printed
  res = json.loads((tmp_path / "results.json").read_text())
  for name in ("baseline", "diffaug"):
    r = res["results"][name]
    assert set(r["per_corruption"]) == {"gaussian_noise", "defocus_blur", "contrast"}
    for k in ("clean_default", "clean_de", "corrupted_default", "corrupted_de"):
      assert 0.0 <= r[k] <= 100.0
  grid = Image.open(out["grid"])
  # 8 examples x 10 timesteps of 8x8 cells (2-px borders), upscaled by 16.
  assert grid.size == ((10 * 10 + 2) * 16, (8 * 10 + 2) * 16)
  for sub in ("score", "baseline", "diffaug"):
    assert (tmp_path / sub / "config.json").is_file()
  # The evaluate.py configs for the demo must match what the demo trained (a mismatched image size would
  # run and report a wrong accuracy; the loader refuses it instead).
  from diffaug_jax.evaluation import loading
  evals = {"eval_digits": lambda c: c.data, "eval_certify": lambda c: c.data, "eval_pag": lambda c: c.data,
           "eval_ood": lambda c: c.id_data}
  for name, data_of in evals.items():
    data_cfg = data_of(_config(name))
    loading.load_classifier({"workdir": str(tmp_path / "baseline")}, data_cfg=data_cfg)
    data_cfg.image_size = 2 * data_cfg.image_size
    with pytest.raises(ValueError, match="trained on"):
      loading.load_classifier({"workdir": str(tmp_path / "baseline")}, data_cfg=data_cfg)


def test_train_default_workdir_keeps_the_config_arg():
  """Without --workdir, train.py's run directory names the config and its arg: the baseline and +DiffAug runs
  of one config file get two workdirs (they shared one, and the second stopped on a changed config)."""
  import subprocess
  import sys
  code = ("import importlib.util as u; s = u.spec_from_file_location('t', 'train.py'); m = u.module_from_spec(s); "
          "s.loader.exec_module(m); print([m.default_run_name(f) for f in (None, 'configs/default.py', "
          "'configs/default.py:smoke', 'configs/cifar10_resnet18.py:baseline', "
          "'configs/cifar10_resnet18.py:diffaug')])")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
  assert out.strip() == str(["demo", "demo", "default_smoke", "cifar10_resnet18_baseline",
                             "cifar10_resnet18_diffaug"])


def test_a_preempted_run_exits_143(tmp_path):
  """train.py (and the demo) exit with status 143 after a SIGTERM stop, not 0: `train.py && evaluate.py`
  must not go on with a half-trained run, and a job runner must see a run to restart."""
  import subprocess
  import sys
  from diffaug_jax import demo
  with pytest.raises(SystemExit) as e:
    demo._check_finished({"preempted": True, "step": 3}, "score")  # pylint: disable=protected-access
  assert e.value.code == 143
  code = ("import runpy, sys; from diffaug_jax import trainer; "
          "trainer.train_and_evaluate = lambda *a, **k: {'preempted': True, 'step': 3}; "
          "sys.argv = ['train.py', '--config', 'configs/cifar10_resnet18.py:baseline', "
          f"'--workdir', {str(tmp_path)!r}]; "
          "runpy.run_path('train.py', run_name='__main__')")
  run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 143 and "stopped by SIGTERM at step 3" in run.stdout, run.stdout + run.stderr


def test_every_config_refuses_an_unknown_arg():
  """`--config file.py:arg` with an arg the file does not know is an error naming the file, in every config
  (a typo such as :sev_5 would otherwise run the default recipe)."""
  import glob
  from diffaug_jax.config_files import load_module
  files = sorted(glob.glob(str(REPO / "configs" / "*.py")))
  assert len(files) >= 15
  for path in files:
    # (cifar10_wrn28_10 passes its arg on to cifar10_resnet18, which names itself)
    with pytest.raises(ValueError, match=rf"({pathlib.Path(path).name}|cifar10_resnet18.py): unknown arg"):
      load_module(path).get_config("no_such_arg")


def test_all_configs_load_and_build():
  """Every config's get_config(arg) returns a complete config whose models can be built (no init)."""
  from diffaug_jax import mixing, trainer
  from diffaug_jax.data import config as data_config
  cases = [("default", None), ("default", "smoke"), ("cifar10_resnet18", "baseline"),
           ("cifar10_resnet18", "diffaug"), ("cifar10_wrn28_10", None), ("imagenet_resnet50_diffaug", None),
           ("imagenet_resnet50_diffaug", "augmix"), ("imagenet_vit_b16_diffaug", None), ("score_digits", None),
           ("score_cifar10", None), ("score_cifar10", "iddpm"), ("imagenet_finetune_diffaug", "augmix"),
           ("imagenet_finetune_diffaug", "deepaugment"), ("imagenet_finetune_diffaug", "dam")]
  for name, arg in cases:
    cfg = _config(name, arg)
    runs = [cfg.demo.score, cfg.demo.classifier] if cfg.mode == "demo" else [cfg]
    for c in runs:
      assert c.batch_size > 0 and c.optim.name in ("sgd", "adam", "adamw", "lamb"), name
      if c.mode == "classifier":
        assert trainer.build_classifier(c) is not None
        data_config.validate(c.data)  # names a known transform, source, ...
        trainer.mix_config(c)  # a valid (or no) Mixup/CutMix setting
      else:
        assert trainer.build_score_model(c) is not None
  r50 = _config("imagenet_resnet50_diffaug")
  assert (r50.optim.learning_rate, r50.optim.lr_batch_base, r50.optim.momentum, r50.optim.nesterov,
          r50.optim.weight_decay, r50.optim.decay_epochs, r50.optim.decay_factor, r50.num_epochs) == \
      (0.1, 256, 0.9, False, 1e-4, 30.0, 0.1, 90)
  # DeiT-III's 224 fine-tuning: RandAugment + Mixup 0.8 / CutMix 1.0 per 64 examples, DiffAug of the mixed view.
  vit = _config("imagenet_vit_b16_diffaug")
  assert (vit.data.train_transform, vit.data.rand_augment, vit.diffaug.source) == \
      ("rand_augment", "rand-m9-mstd0.5-inc1", "clean")
  assert trainer.mix_config(vit) == mixing.MixConfig(0.8, 1.0, 1.0, 0.5, 64)
  with pytest.raises(ValueError, match="arg"):
    _config("cifar10_resnet18", "nope")
  # Issue 8's fine-tuning recipes: the release's final lr, constant, ~50k steps, AugMix views where named.
  for arg, lr, augmix in (("augmix", 1e-3, True), ("deepaugment", 1e-6, False), ("dam", 1e-6, True)):
    ft = _config("imagenet_finetune_diffaug", arg)
    assert (ft.optim.learning_rate, ft.optim.schedule, ft.num_train_steps, ft.augmix, ft.diffaug.enabled,
            ft.require_init_checkpoint) == (lr, "constant", 50_000, augmix, True, True)


def test_finetune_config_refuses_to_start_without_weights(tmp_path):
  from diffaug_jax import trainer
  with pytest.raises(ValueError, match="init_checkpoint"):
    trainer.train_and_evaluate(_config("imagenet_finetune_diffaug", "augmix"), str(tmp_path))
  assert not any(tmp_path.iterdir())  # nothing written


def test_demo_seed_reaches_every_training_stage(tmp_path, monkeypatch):
  """`--config.seed` seeds the score run and both classifiers, not only the evaluation keys."""
  from diffaug_jax import demo, trainer

  class Stop(Exception):
    pass

  seeds = []

  def fake_train(config, workdir, **kw):
    seeds.append(int(config.seed))
    if len(seeds) == 3:
      raise Stop  # before the evaluation, which would need trained models
    return {"preempted": False, "step": 1}

  monkeypatch.setattr(trainer, "train_and_evaluate", fake_train)
  config = _config("default", "smoke")
  config.seed = 7
  with pytest.raises(Stop):
    demo.run_demo(config, str(tmp_path))
  assert seeds == [7, 7, 7]
