"""train_and_evaluate end to end on tiny stand-in models (8 fake CPU devices). Runtime ~40 s on 2 cores."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from diffaug_jax import metrics as metrics_lib, trainer


def tiny_config(*, diffaug: bool = True, steps: int = 8, seed: int = 0) -> ml_collections.ConfigDict:
  """A classifier run on the in-memory 'arrays' source with the stand-ins of tests/test_steps.py."""
  c = ml_collections.ConfigDict()
  c.mode = "classifier"
  c.seed = seed
  c.num_classes = 4
  c.data = ml_collections.ConfigDict(dict(source="arrays", name="arrays", image_size=8, channels=1,
                                          num_classes=4, num_train=128, num_test=40))
  c.model = ml_collections.ConfigDict(dict(name="", factory="test_steps:TinyClassifier", dtype="float32",
                                           kwargs={}))
  c.diffaug = ml_collections.ConfigDict(dict(enabled=diffaug, weight=1.0, t_low=0, t_high=1000))
  c.score = ml_collections.ConfigDict(dict(workdir="", params_path="", preset="", factory="test_steps:TinyEps",
                                           overrides={}, random_init=True, image_shape=(8, 8, 1),
                                           dtype="float32", schedule="linear", num_timesteps=1000))
  c.optim = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.05, lr_batch_base=0, momentum=0.9,
                                           nesterov=False, weight_decay=1e-4, schedule="step",
                                           decay_epochs=1.0, decay_factor=0.5, warmup_epochs=0.0))
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_epochs = 1
  c.num_train_steps = steps
  c.log_every = 1
  c.block_every = 4
  c.eval_every = 0
  c.checkpoint_every = 0
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.init_checkpoint = ""
  c.progress = False
  return c


def test_classifier_run_outputs(tmp_path):
  cfg = tiny_config(steps=8)
  out = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert out["step"] == 8 and out["start"] == "scratch" and not out["preempted"]
  rows = metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 9))
  assert all(np.isfinite(r["loss"]) and r["loss_diffaug"] > 0 for r in train)
  # Step LR schedule (x0.5 every epoch = 8 steps): the 8th step still runs at the base LR.
  assert train[0]["learning_rate"] == pytest.approx(0.05)
  ev = [r for r in rows if r["split"] == "eval"][-1]
  assert ev["eval_count"] == 40 and 0.0 <= ev["eval_accuracy"] <= 1.0
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["mode"] == "classifier" and saved["model"]["factory"] == "test_steps:TinyClassifier"
  assert (tmp_path / "checkpoints" / "8").is_dir()
  # Running again in the same workdir resumes at the end: nothing left to do.
  again = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert again["start"] == "resume@8" and again["step"] == 8


def test_score_mode_then_classifier_from_its_workdir(tmp_path):
  sc = tiny_config(steps=4)
  sc.mode = "score"
  sc.score_model = ml_collections.ConfigDict(dict(preset="", factory="test_steps:TinyEps", overrides={},
                                                  dtype="float32"))
  sc.ddpm = ml_collections.ConfigDict(dict(learn_sigma=False, loss_type="simple", ema_decay=0.9,
                                           class_cond=False, schedule="linear", num_timesteps=1000))
  sc.optim = ml_collections.ConfigDict(dict(name="adam", learning_rate=1e-3, schedule="constant"))
  sc.eval_every = 4
  out = trainer.train_and_evaluate(sc, str(tmp_path / "score"))
  assert out["step"] == 4 and out["state"].ema_params is not None
  from diffaug_jax import checkpoint as ckpt_lib
  with pytest.raises(ValueError, match="cannot change the architecture"):
    ckpt_lib.load_score_model(workdir=str(tmp_path / "score"), overrides={"model_channels": 8})
  cc = tiny_config(steps=2)
  cc.score.factory = ""
  cc.score.workdir = str(tmp_path / "score")
  out = trainer.train_and_evaluate(cc, str(tmp_path / "clf"))
  assert out["step"] == 2 and out["train"]["loss_diffaug"] > 0
  # eps_hat of a score model means something only under its own noise schedule.
  cc.score.schedule, cc.score.num_timesteps = "cosine", 4000
  with pytest.raises(ValueError, match="trained with the linear schedule over 1000"):
    trainer.train_and_evaluate(cc, str(tmp_path / "clf2"))
  # Score-mode eval counts every test example (masked sums; a partial last batch is not skipped, so every
  # process runs the same number of eval steps).
  ev = [r for r in metrics_lib.read_jsonl(str(tmp_path / "score" / "metrics.jsonl")) if r["split"] == "eval"]
  assert ev and ev[-1]["eval_count"] == 40


def test_score_eval_step_ignores_padding_rows():
  import jax.numpy as jnp
  import optax
  from diffaug_jax import diffusion, steps
  from diffaug_jax.state import TrainState
  from test_steps import TinyEps
  module = TinyEps()
  x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  state = TrainState.create(variables, optax.sgd(0.1), ema=True)
  cfg = steps.ScoreStepConfig(schedule=diffusion.linear_schedule(1000), learn_sigma=False,
                              loss_type="simple", ema_decay=0.9, class_cond=False, lr_schedule=None)
  mask = np.array([1, 1, 0, 0], np.float32)
  run = lambda im: steps.score_eval_step(state, {"image": im, "label": np.zeros(4, np.int32), "mask": mask},
                                         jax.random.key(1), apply_fn=module.apply, cfg=cfg)
  a, b = run(x), run(np.where(mask[:, None, None, None] > 0, x, 255 - x).astype(np.uint8))
  assert float(a["count"]) == 2.0 and float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)


def test_bad_input_loses_nothing(tmp_path):
  """A rerun that fails (typo) or computes something else (changed batch size) leaves the run as it was."""
  from diffaug_jax import checkpoint as ckpt_lib
  wd = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(steps=4, diffaug=False), wd)
  saved = (tmp_path / "run" / "config.json").read_text()
  bad = tiny_config(steps=4, diffaug=False)
  bad.model.factory = "test_steps:NoSuchModel"
  with pytest.raises(AttributeError, match="NoSuchModel"):
    trainer.train_and_evaluate(bad, wd)
  assert (tmp_path / "run" / "config.json").read_text() == saved
  ckpt_lib.load_trained_classifier(wd)  # the finished run still loads
  changed = tiny_config(steps=6, diffaug=False)
  changed.batch_size = 32
  with pytest.raises(ValueError, match="another config.*batch_size"):
    trainer.train_and_evaluate(changed, wd)
  assert (tmp_path / "run" / "config.json").read_text() == saved
  assert ckpt_lib.Checkpointer(wd).all_steps() == [4]
  # Allowed on request: resumes, records the new config and keeps the old one.
  changed.batch_size, changed.optim.learning_rate = 16, 0.01
  out = trainer.train_and_evaluate(changed, wd, allow_config_change=True)
  assert out["start"] == "resume@4" and out["step"] == 6
  assert (tmp_path / "run" / "config.before_step4.json").read_text() == saved
  assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["learning_rate"] == 0.01
  # Two changes at one step (the run is finished at 6) keep both records: the config that trained steps 5-6
  # is not overwritten by the second.
  trained_5_6 = (tmp_path / "run" / "config.json").read_text()
  for lr in (0.02, 0.03):
    changed.optim.learning_rate = lr
    assert trainer.train_and_evaluate(changed, wd, allow_config_change=True)["step"] == 6
  assert (tmp_path / "run" / "config.before_step6.json").read_text() == trained_5_6
  assert json.loads((tmp_path / "run" / "config.before_step6.2.json").read_text())["optim"]["learning_rate"] == 0.02
  assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["learning_rate"] == 0.03
  changed.optim.learning_rate = 0.01
  trainer.train_and_evaluate(changed, wd, allow_config_change=True)
  # What does not change the computation resumes: a moved dataset, reader settings, a field that another
  # version of the code added (set on one side only).
  moved = tiny_config(steps=7, diffaug=False)
  moved.optim.learning_rate = 0.01
  moved.data.data_dir, moved.data.read_threads = "/elsewhere", 4
  out = trainer.train_and_evaluate(moved, wd)
  assert out["start"] == "resume@6" and out["step"] == 7
  # Values that cannot run are refused before anything is written.
  for field, value, msg in (("num_train_steps", 0, "nothing to train"), ("batch_size", 0, "must be positive"),
                            ("keep_checkpoints", 0, "keep_checkpoints must be >= 1")):
    cfg = tiny_config(steps=4, diffaug=False)
    cfg[field] = value
    if field == "num_train_steps":
      cfg.num_epochs = 0
    with pytest.raises(ValueError, match=msg):
      trainer.train_and_evaluate(cfg, str(tmp_path / field))
    assert not (tmp_path / field / "config.json").exists()


def test_baseline_run_with_the_whole_schedule_t_range(tmp_path):
  """diffaug.t_high = 0 means "the score model's whole schedule"; a baseline run loads no score model, and
  must still run (the CIFAR baseline configs set t_high = 0). An out-of-schedule range is a config error."""
  cfg = tiny_config(steps=2, diffaug=False)
  cfg.diffaug.t_high = 0
  trainer.train_and_evaluate(cfg, str(tmp_path / "baseline"))
  bad = tiny_config(steps=2)
  bad.diffaug.t_high = 4000
  with pytest.raises(ValueError, match=r"\[0, 4000\) must lie in \[0, 1000\]"):
    trainer.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_resume_with_a_new_length_says_the_cosine_schedule_is_replanned(tmp_path, capsys):
  """A new num_train_steps may be resumed (RESUME_MAY_CHANGE); under a cosine schedule, whose remaining
  learning rates follow the new length, the resume says so (a step schedule's do not: no note)."""
  cfg = tiny_config(steps=8)
  cfg.optim.schedule = "cosine"
  trainer.write_config(cfg, str(tmp_path))
  longer = tiny_config(steps=16)
  longer.optim.schedule = "cosine"
  assert trainer.check_resume_config(longer, str(tmp_path), 8) == []
  assert "num_train_steps 8 -> 16) under a cosine schedule" in capsys.readouterr().out
  trainer.write_config(tiny_config(steps=8), str(tmp_path))
  assert trainer.check_resume_config(tiny_config(steps=16), str(tmp_path), 8) == []
  assert "cosine" not in capsys.readouterr().out


def test_init_checkpoint_must_fit_the_model(tmp_path):
  trainer.train_and_evaluate(tiny_config(steps=2, diffaug=False), str(tmp_path / "a"))
  cfg = tiny_config(steps=2, diffaug=False)
  cfg.num_classes = cfg.data.num_classes = 5
  cfg.init_checkpoint = str(tmp_path / "a")
  with pytest.raises(ValueError, match=r"does not fit the model: shape.*Dense_0/bias \(4,\) \(model: \(5,\)\)"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "b"))


def test_nonfinite_state_is_never_checkpointed(tmp_path):
  """Saving every step while checking the loss every 4: the check must come first, or the NaN state is
  saved and orbax's keep=2 drops the last good checkpoints."""
  from diffaug_jax import checkpoint as ckpt_lib
  for lr in (1e12, 1e20):  # 1e20: the weights overflow one step before the loss does
    cfg = tiny_config(steps=30, diffaug=False)
    cfg.optim.learning_rate = lr
    cfg.checkpoint_every, cfg.keep_checkpoints, cfg.log_every, cfg.block_every = 1, 2, 100, 4
    wd = str(tmp_path / f"lr{lr:g}")
    with pytest.raises(metrics_lib.NonFiniteLossError):
      trainer.train_and_evaluate(cfg, wd)
    for st in ckpt_lib.Checkpointer(wd).all_steps():
      tree, _ = ckpt_lib.restore_raw_state(wd, st)
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(tree["params"])), (lr, st)


def test_nonfinite_loss_names_the_step(tmp_path):
  cfg = tiny_config(steps=30, diffaug=False)
  cfg.optim.learning_rate = 1e12
  with pytest.raises(metrics_lib.NonFiniteLossError, match=r"at step \d+") as err:
    trainer.train_and_evaluate(cfg, str(tmp_path))
  # The named step is the FIRST non-finite one: every earlier step was logged with a finite loss.
  import re
  bad = int(re.search(r"at step (\d+)", str(err.value)).group(1))
  train = [r for r in metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
  assert 1 <= bad < 30 and [r["step"] for r in train] == list(range(1, bad)), (bad, [r["step"] for r in train])
  assert all(np.isfinite(r["loss"]) for r in train)


def test_bad_data_path_fails_before_compiling(tmp_path, monkeypatch):
  cfg = tiny_config()
  cfg.data = ml_collections.ConfigDict(dict(source="folder", name="mine", data_dir=str(tmp_path / "nope"),
                                            train_split="train", eval_split="val", image_size=8, channels=1,
                                            train_transform="none", eval_transform="none", num_classes=4))
  monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before checking the data path"))
  with pytest.raises((FileNotFoundError, ValueError), match="nope"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "wd"))


def test_fsdp_rule_shards_big_leaves():
  rule = trainer.fsdp_rule(min_size=64, axis_size=8)
  assert rule((), np.zeros((3, 3, 16, 32))) == jax.sharding.PartitionSpec(None, None, None, "data")
  assert rule((), np.zeros((10,))) == jax.sharding.PartitionSpec()


def test_fsdp_run_splits_state_and_score_params_and_matches_the_replicated_run(tmp_path, monkeypatch):
  """config.fsdp lays out the big leaves of the state AND of the frozen score params over `data`; the run's
  numbers are those of the replicated layout (XLA gathers the kernels inside the step)."""
  placed = []
  real = trainer.sharding.state_shardings

  def recording(mesh, tree, rule=None):  # every layout the trainer asks for, in order
    placed.append(real(mesh, tree, rule))
    return placed[-1]

  monkeypatch.setattr(trainer.sharding, "state_shardings", recording)
  losses = {}
  for fsdp in (False, True):
    cfg = tiny_config(steps=4)
    cfg.score.overrides = {"hidden": 32}  # score kernel 3x3x1x32 and 3x3x32x1: 288 elements, split by 8
    cfg.fsdp, cfg.fsdp_min_size = fsdp, 256
    placed.clear()
    trainer.train_and_evaluate(cfg, str(tmp_path / str(fsdp)))
    specs = [s.spec for tree in placed for s in jax.tree.leaves(tree)]
    assert any(s != jax.sharding.PartitionSpec() for s in specs) == fsdp
    score_specs = [s.spec for s in jax.tree.leaves(placed[-1])]  # the score params are placed last
    assert len(score_specs) == 6 and sum(s != jax.sharding.PartitionSpec() for s in score_specs) == 2 * fsdp
    rows = metrics_lib.read_jsonl(str(tmp_path / str(fsdp) / "metrics.jsonl"))
    losses[fsdp] = [r["loss"] for r in rows if r["split"] == "train"]
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_distributed_start_detection_and_override(tmp_path, monkeypatch):
  """Launch variables start jax.distributed; the config's `distributed=False` (passed by train.py before any
  other JAX call) and True override; a process that is one of several without it is stopped with advice."""
  from diffaug_jax import sharding
  calls = []
  monkeypatch.setattr(sharding.jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  sharding.initialize_distributed()
  assert calls == []
  sharding.initialize_distributed(force=True)  # a Cloud TPU VM pod slice: --config.distributed=True
  monkeypatch.setenv("SLURM_NTASKS", "16")
  sharding.initialize_distributed()
  sharding.initialize_distributed(force=False)
  assert calls == [{}, {}]
  sharding.check_multi_process()  # one process here: nothing to say
  monkeypatch.setattr(sharding.jax, "process_count", lambda: 4)
  with pytest.raises(RuntimeError, match="--config.distributed=True"):
    sharding.check_multi_process()


def test_train_py_passes_distributed_false_before_any_jax_call(tmp_path):
  """train.py must hand the config's `distributed` to the start-up call itself: read later, inside the trainer,
  the auto-detected start (here: a SLURM variable) has already happened, and False cannot undo it."""
  import subprocess
  import sys
  env = dict(os.environ, SLURM_NTASKS="4", JAX_PLATFORMS="cpu")
  args = [sys.executable, "train.py", "--config", "configs/cifar10_resnet18.py", "--config.distributed=False",
          "--config.data.data_dir=" + str(tmp_path / "none"), "--workdir", str(tmp_path / "wd")]
  out = subprocess.run(args, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                       capture_output=True, text=True, timeout=300)
  assert "cannot read TFDS dataset 'cifar10'" in out.stderr, out.stderr[-2000:]  # got as far as the data


def test_program_modules_do_not_import_data_libraries():
  """steps/state/optim/trainer/checkpoint/demo import without grain, TFDS or TensorFlow (lazy data imports)."""
  import subprocess
  import sys
  code = ("import sys; import diffaug_jax.steps, diffaug_jax.state, diffaug_jax.optim, diffaug_jax.trainer, "
          "diffaug_jax.checkpoint, diffaug_jax.metrics, diffaug_jax.demo; "
          "bad = sorted({m.split('.')[0] for m in sys.modules} & {'grain', 'tensorflow_datasets', 'tensorflow'}); "
          "print('BAD', bad); sys.exit(1 if bad else 0)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0, r.stdout + r.stderr


def test_image_folder_run_with_a_corrupt_file(tmp_path, caplog):
  """The grain folder pipeline through the program: class sub-folders of PNGs, one corrupt file that is
  skipped (counted by the source), not a crash."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, n in (("train", 24), ("val", 8)):
    for k, cls in enumerate(("a", "b", "c", "d")):
      d = tmp_path / "imgs" / split / cls
      d.mkdir(parents=True)
      for i in range(n // 4):
        Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8) // (k + 1)).save(d / f"{i}.png")
  (tmp_path / "imgs" / "train" / "a" / "broken.png").write_bytes(b"not a png")
  cfg = tiny_config(steps=3, diffaug=True)
  cfg.data = ml_collections.ConfigDict(dict(
      source="folder", name="mine", data_dir=str(tmp_path / "imgs"), train_split="train", eval_split="val",
      image_size=8, channels=1, train_transform="cifar", eval_transform="none", crop_padding=1,
      resize_size=0, num_classes=0, class_names="", num_workers=0, read_threads=1, prefetch_buffer_size=4))
  caplog.set_level("WARNING")
  out = trainer.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert out["step"] == 3 and np.isfinite(out["train"]["loss"]) and out["eval"]["eval_count"] == 8
  # Reported with its file name (3 steps x 16 = 48 draws from 25 files: the broken one is read).
  assert "broken.png" in caplog.text, caplog.text[-2000:]


def test_empty_dataset_fails_before_compiling(tmp_path, monkeypatch):
  """Class sub-folders without a single image: a clear error naming the path, before any jit."""
  for cls in ("a", "b"):
    (tmp_path / "empty_ds" / "train" / cls).mkdir(parents=True)
    (tmp_path / "empty_ds" / "train" / cls / "readme.txt").write_text("no images here")
  cfg = tiny_config()
  cfg.data = ml_collections.ConfigDict(dict(source="folder", name="mine", data_dir=str(tmp_path / "empty_ds"),
                                            train_split="train", eval_split="train", image_size=8, channels=1,
                                            train_transform="none", eval_transform="none", num_classes=2))
  monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before checking the dataset"))
  with pytest.raises((FileNotFoundError, ValueError), match="empty_ds"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "wd"))


def test_program_traces_the_train_step_once(tmp_path, monkeypatch):
  """The jitted step of train_and_evaluate is traced once over many steps, across blocking, logging and
  checkpoint saves (a weak-typed step counter or a Python scalar in the state would retrace at step 2)."""
  from diffaug_jax import steps
  traces = []
  real = steps.train_step

  def counting(*a, **k):
    traces.append(1)
    return real(*a, **k)
  monkeypatch.setattr(steps, "train_step", counting)
  cfg = tiny_config(steps=6)
  cfg.block_every = 2
  cfg.checkpoint_every = 2
  out = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert out["step"] == 6
  assert len(traces) == 1, f"train step traced {len(traces)} times in 6 steps"


@pytest.mark.parametrize("source", ["clean", "image_da"])
def test_mixup_run_sends_the_diffaug_view_only_when_read(tmp_path, monkeypatch, source):
  """config.mixup + diffaug.source reach the step; the batch sent to the device carries "image_da" only when
  the step reads it (DiffAug on, source "image_da")."""
  from diffaug_jax import sharding
  sent = []
  real = sharding.shard_batch
  monkeypatch.setattr(sharding, "shard_batch", lambda b, mesh: sent.append(sorted(b)) or real(b, mesh))
  cfg = tiny_config(steps=2)
  cfg.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, group_size=8))
  cfg.diffaug.source = source
  cfg.label_smoothing = 0.1
  out = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert out["step"] == 2 and np.isfinite(out["train"]["loss"])
  assert sent[0] == (["image", "image_da", "label"] if source == "image_da" else ["image", "label"])
  cfg = tiny_config(steps=1)
  cfg.diffaug.source = "Clean"
  with pytest.raises(ValueError, match="diffaug.source"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "bad"))


def test_adding_mixup_or_a_clean_diffaug_source_to_a_run_is_a_change():
  """A field absent from an older run's config.json is a harmless one-sided key when it holds what its absence
  meant (no Mixup, DiffAug of "image_da"); adding Mixup or source="clean" is a change like any other."""
  saved = json.loads(tiny_config().to_json_best_effort())
  cfg = tiny_config()
  cfg.diffaug.source = "image_da"
  cfg.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=0.0, group_size=8))
  changed, one_sided = trainer.config_changes(saved, cfg)
  assert changed == [] and "diffaug.source" in one_sided and "mixup.group_size" in one_sided
  cfg.diffaug.source = "clean"
  cfg.mixup.cutmix_alpha = 1.0
  changed, _ = trainer.config_changes(saved, cfg)
  assert changed == ["diffaug.source", "mixup.cutmix_alpha"]


def test_eval_batch_rounds_up_to_the_device_count(tmp_path):
  """Eval batches are padded and masked: an eval_batch_size the 8 devices do not divide (the ImageNet
  configs' 500 on 8 or 16 GPUs) is rounded up, and every eval example is still counted once."""
  cfg = tiny_config(steps=1)
  cfg.eval_batch_size = 10
  out = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert out["eval"]["eval_count"] == 40


def test_fresh_start_keeps_the_files_of_an_attempt_without_checkpoints(tmp_path):
  """A workdir holding another run's config.json and metrics.jsonl but no checkpoint (it stopped before its
  first save): a fresh start keeps both aside instead of overwriting the config and appending to the metrics."""
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps({"precious": 1}))
  (wd / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
  trainer.train_and_evaluate(tiny_config(steps=2, diffaug=False), str(wd))
  assert json.loads((wd / "config.before_step0.json").read_text()) == {"precious": 1}
  assert (wd / "metrics.before_step0.jsonl").read_text() == json.dumps({"step": 1, "loss": 9.0}) + "\n"
  assert all(row.get("loss") != 9.0 for row in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines()))
  assert "precious" not in json.loads((wd / "config.json").read_text())


def test_unusable_workdirs_and_a_broken_latest_checkpoint_say_what_to_do(tmp_path):
  """A workdir (or its checkpoints/) that is a file fails before anything runs; a latest checkpoint that
  cannot be read names the older one still there, and moving the broken step aside resumes from it."""
  import shutil
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match="must be a directory"):
    trainer.train_and_evaluate(tiny_config(steps=2, diffaug=False), str(tmp_path / "file"))
  (tmp_path / "wd2").mkdir()
  (tmp_path / "wd2" / "checkpoints").write_text("x")
  with pytest.raises(NotADirectoryError, match="checkpoints exists and is not a directory"):
    trainer.train_and_evaluate(tiny_config(steps=2, diffaug=False), str(tmp_path / "wd2"))
  with pytest.raises(ValueError, match="is a URL: .*Mount the bucket"):  # not a local folder named "gs:"
    trainer.train_and_evaluate(tiny_config(steps=2, diffaug=False), "gs://bucket/run")
  assert not os.path.exists("gs:")
  wd = tmp_path / "run"
  cfg = tiny_config(steps=4, diffaug=False)
  cfg.checkpoint_every = 2
  trainer.train_and_evaluate(cfg, str(wd))
  shutil.rmtree(wd / "checkpoints" / "4" / "state")  # a half-deleted / corrupted latest step
  cfg.num_train_steps = 6
  with pytest.raises(RuntimeError,
                     match=r"cannot restore checkpoint step 4.*\[2\].*4.broken.*from step 2.*do not fit it"):
    trainer.train_and_evaluate(cfg, str(wd))
  os.replace(wd / "checkpoints" / "4", wd / "checkpoints" / "4.broken")
  assert trainer.train_and_evaluate(cfg, str(wd))["start"] == "resume@2"


def test_labels_outside_num_classes_are_an_error_not_a_nan():
  trainer._check_labels(np.array([0, 3, 1]), 4, 1)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"labels in \[0, 9\] but config.num_classes is 5"):
    trainer._check_labels(np.array([0, 9, 2]), 5, 1)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="labels in"):
    trainer._check_labels(np.array([-1, 2]), 5, 3)  # pylint: disable=protected-access


def test_score_model_input_is_checked_against_the_data(tmp_path, capsys):
  """Another channel count is an error before anything compiles; another image size (our own score run)
  is logged: it runs, the UNet being convolutional, but is easy to pick by mistake."""
  import types
  module = types.SimpleNamespace(in_channels=3)
  cfg = tiny_config(steps=1)
  with pytest.raises(ValueError, match="takes 3-channel images but the data yields 1"):
    trainer._check_score_input(cfg, (8, 8, 1), module)  # pylint: disable=protected-access
  (tmp_path / "config.json").write_text(json.dumps({"mode": "score", "data": {"image_size": 16}}))
  cfg.score.workdir = str(tmp_path)
  trainer._check_score_input(cfg, (8, 8, 1), types.SimpleNamespace(in_channels=1))  # pylint: disable=protected-access
  assert "trained on 16x16 images; DiffAug runs it on 8x8" in capsys.readouterr().out


def test_fresh_start_over_a_cut_off_config_json(tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text('{"mode": "classif')  # a write cut off
  trainer.train_and_evaluate(tiny_config(steps=1, diffaug=False), str(wd))
  assert (wd / "config.before_step0.json").read_text() == '{"mode": "classif'
  assert json.loads((wd / "config.json").read_text())["mode"] == "classifier"


def test_resume_builds_no_random_state(tmp_path, monkeypatch):
  """A resume restores into the abstract state (shapes, dtypes, shardings): no random state is built (and
  compiled) only to be replaced by the checkpoint."""
  from diffaug_jax import checkpoint as ckpt_lib
  wd = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(steps=2, diffaug=False), wd)
  built = []
  real = ckpt_lib.restore_or_init

  def spy(ckpt, init_state_fn, *a, **kw):
    return real(ckpt, lambda v=None: built.append(v) or init_state_fn(v), *a, **kw)

  monkeypatch.setattr(ckpt_lib, "restore_or_init", spy)
  out = trainer.train_and_evaluate(tiny_config(steps=3, diffaug=False), wd)
  assert out["start"] == "resume@2" and out["step"] == 3
  assert built == []
