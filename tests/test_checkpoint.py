"""Checkpoints: SIGTERM saves and stops, SIGKILL + restart == uninterrupted (params and data order), resume
order, the grain iterator state, load_trained_classifier. Runtime ~60 s on 2 cores (3 short subprocesses)."""
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
STEPS = 16


def _child_env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
  return env


def _start(workdir, slow: bool):
  return subprocess.Popen([sys.executable, __file__, str(workdir), "slow" if slow else "fast"],
                          env=_child_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait_for_checkpoint(workdir, step, proc, timeout=240):
  d = pathlib.Path(workdir) / "checkpoints" / str(step)
  t0 = time.time()
  while time.time() - t0 < timeout:
    if d.is_dir() and (d / "_CHECKPOINT_METADATA").exists():
      return
    if proc.poll() is not None:
      pytest.fail(f"child exited early ({proc.returncode}):\n{proc.stdout.read()}")
    time.sleep(0.1)
  proc.kill()
  pytest.fail(f"checkpoint {d} did not appear in {timeout}s")


def _last_rows(workdir):
  from diffaug_jax.metrics import read_jsonl
  rows = {}
  for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    if r["split"] == "train":
      rows[r["step"]] = r  # a re-done step after a restart overwrites the killed attempt's row
  return rows


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path):
  from diffaug_jax import checkpoint as ckpt_lib, trainer
  from test_trainer import tiny_config
  wd = tmp_path / "interrupted"
  # 1. SIGTERM (preemption): saves a checkpoint at the current step and exits cleanly.
  p = _start(wd, slow=True)
  _wait_for_checkpoint(wd, 4, p)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=240)
  assert p.returncode == 0, out
  assert "preempted=True" in out, out
  term_step = int(re.search(r"CHILD start=\S+ step=(\d+)", out).group(1))
  assert 4 <= term_step < STEPS and (wd / "checkpoints" / str(term_step)).is_dir()
  # 2. Restart, then SIGKILL mid-run (no chance to save).
  p = _start(wd, slow=True)
  _wait_for_checkpoint(wd, 10, p)
  p.kill()
  p.wait(timeout=60)
  # 3. Restart and finish.
  p = _start(wd, slow=False)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out
  assert re.search(rf"CHILD start=resume@\d+ step={STEPS} ", out), out
  # Uninterrupted reference, in this process (same program, same devices).
  ref = tmp_path / "ref"
  cfg = tiny_config(steps=STEPS)
  cfg.checkpoint_every = 2
  trainer.train_and_evaluate(cfg, str(ref))
  a, _ = ckpt_lib.restore_raw_state(str(wd))
  b, _ = ckpt_lib.restore_raw_state(str(ref))
  assert int(a["step"]) == int(b["step"]) == STEPS
  # The frozen score params are never in the checkpoint: only the classifier's state.
  assert set(a) <= {"step", "params", "batch_stats", "opt_state", "ema_params"} and not a.get("ema_params")
  assert set(a["params"]) == {"Conv_0", "BatchNorm_0", "Dense_0"}
  for x, y in zip(__import__("jax").tree.leaves((a["params"], a["batch_stats"], a["opt_state"])),
                  __import__("jax").tree.leaves((b["params"], b["batch_stats"], b["opt_state"]))):
    np.testing.assert_array_equal(x, y)
  # Same data order: every step saw the same batch (per-step loss / accuracy identical).
  ra, rb = _last_rows(str(wd)), _last_rows(str(ref))
  assert sorted(ra) == sorted(rb) == list(range(1, STEPS + 1))
  for s in rb:
    assert ra[s]["loss"] == rb[s]["loss"] and ra[s]["accuracy"] == rb[s]["accuracy"], s


def test_resume_order_and_load_trained_classifier(tmp_path):
  import jax
  from diffaug_jax import checkpoint as ckpt_lib, trainer
  from test_trainer import tiny_config
  cfg = tiny_config(steps=3, diffaug=False)
  trainer.train_and_evaluate(cfg, str(tmp_path / "a"))
  module, variables, tcfg = ckpt_lib.load_trained_classifier(str(tmp_path / "a"))
  assert tcfg.num_classes == 4 and set(variables) == {"params", "batch_stats"}
  logits = module.apply(variables, np.zeros((2, 8, 8, 1), np.float32))
  assert logits.shape == (2, 4)
  # Weights-only init from another run: params equal, step and optimizer fresh.
  cfg2 = tiny_config(steps=3, diffaug=False)
  cfg2.init_checkpoint = str(tmp_path / "a")
  ck = ckpt_lib.Checkpointer(str(tmp_path / "b"))
  from diffaug_jax.state import TrainState
  import optax
  tx = optax.sgd(0.1)
  init = lambda v=None: TrainState.create(v or variables, tx)
  state, where = ckpt_lib.restore_or_init(ck, init, None, init_checkpoint=cfg2.init_checkpoint, log=lambda m: None)
  assert where.startswith("init:") and int(state.step) == 0
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(variables["params"])):
    np.testing.assert_array_equal(x, y)
  ck.close()
  with pytest.raises(FileNotFoundError, match="nope"):
    ckpt_lib.weights_from(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="not a score model"):
    ckpt_lib.load_score_model(workdir=str(tmp_path / "a"))



def test_init_checkpoint_that_is_not_msgpack_names_the_file(tmp_path):
  """An .npz / .pt given where a converted .msgpack is expected: the error names it and says to convert it."""
  from diffaug_jax import checkpoint as ckpt_lib
  src = tmp_path / "r18.npz"
  np.savez(src, **{"conv1.weight": np.zeros((4, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"r18\.npz is not a flax msgpack .*python -m diffaug_jax\.convert"):
    ckpt_lib.weights_from(str(src))
  variables = {"params": {"w": np.ones((2, 3), np.float32)}}
  from diffaug_jax.convert import common
  common.save_params(tmp_path / "ok.msgpack", variables)  # a converted file still loads
  np.testing.assert_array_equal(ckpt_lib.weights_from(str(tmp_path / "ok.msgpack"))["params"]["w"], np.ones((2, 3)))

def test_grain_iterator_state_roundtrip(tmp_path):
  """The data pipeline's grain iterator goes through the checkpoint and continues identically."""
  import jax.numpy as jnp
  import optax
  from diffaug_jax import checkpoint as ckpt_lib
  from diffaug_jax.data import config as dconfig, pipeline
  from diffaug_jax.state import TrainState
  dcfg = dconfig.digits_config(8, 1)
  it = pipeline.make_train_loader(dcfg, global_batch_size=8, seed=3)
  for _ in range(3):
    next(it)
  state = TrainState.create({"params": {"w": jnp.ones((2,))}}, optax.sgd(0.1))
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(3, state, it, force=True)
  ck.wait()
  expected = [next(it)["label"] for _ in range(2)]
  it2 = pipeline.make_train_loader(dcfg, global_batch_size=8, seed=3)
  restored, step = ck.restore(state, it2)
  assert step == 3 and int(restored.step) == 0
  got = [next(it2)["label"] for _ in range(2)]
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e, g)
  ck.close()

  # Written by 2 processes (simulated: the same state file twice), restored by 1: a host-invariant state is
  # used; per-process states that differ cannot be mapped to another process count and fail clearly.
  data_dir = tmp_path / "checkpoints" / "3" / "data"
  (own,) = data_dir.glob("process_*.json")
  text = own.read_text()
  own.unlink()
  for i in range(2):
    (data_dir / f"process_{i}-of-2.json").write_text(text)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  it3 = pipeline.make_train_loader(dcfg, global_batch_size=8, seed=3)
  ck.restore(state, it3)
  np.testing.assert_array_equal(next(it3)["label"], expected[0])
  (data_dir / "process_1-of-2.json").write_text(text.replace("3", "4"))
  with pytest.raises(ValueError, match="states differ"):
    ck.restore(state, pipeline.make_train_loader(dcfg, global_batch_size=8, seed=3))
  ck.close()


if __name__ == "__main__":
  # Child process of the kill-and-resume test: argv = workdir, "slow"|"fast".
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from diffaug_jax import trainer
  from test_trainer import tiny_config
  if sys.argv[2] == "slow":  # give the parent time to signal between checkpoints
    _next = trainer.InMemoryIterator.__next__

    def slow_next(self):
      time.sleep(0.4)
      return _next(self)
    trainer.InMemoryIterator.__next__ = slow_next
  cfg = tiny_config(steps=STEPS)
  cfg.checkpoint_every = 2
  out = trainer.train_and_evaluate(cfg, sys.argv[1])
  print(f"CHILD start={out['start']} step={out['step']} preempted={out['preempted']}", flush=True)


@pytest.mark.parametrize("error", [KeyError, IndexError])
def test_data_state_of_another_shape_is_a_clear_error(tmp_path, error):
  """A data-iterator state saved by an iterator of another shape (e.g. another data.num_workers: grain's
  multi-worker state has other keys, or per-worker lists of another length: IndexError) names the cause
  instead of a bare error inside grain."""
  import jax.numpy as jnp
  import optax
  from diffaug_jax import checkpoint as ckpt_lib
  from diffaug_jax.state import TrainState

  class Iter:
    def __init__(self, key):
      self.key, self.state = key, {key: 0}

    def get_state(self):
      return dict(self.state)

    def set_state(self, state):
      if self.key not in state:
        raise error(self.key)  # as grain on a foreign state
      self.state = {self.key: state[self.key]}

  state = TrainState.create({"params": {"w": jnp.ones(2)}}, optax.sgd(0.1))
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(1, state, Iter("next_index"), force=True)
  ck.wait()
  with pytest.raises(ValueError, match="num_workers"):
    ck.restore(state, Iter("next_index_in_cycle"))
  ck.close()


def test_loading_weights_reads_no_optimizer_state(tmp_path, monkeypatch):
  """weights_from / load_trained_classifier restore only params and batch_stats (orbax partial restore):
  the optimizer state of a big model is not read from disk."""
  import jax
  import orbax.checkpoint as ocp
  from diffaug_jax import checkpoint as ckpt_lib
  from diffaug_jax import trainer
  from test_trainer import tiny_config
  wd = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(steps=2, diffaug=False), wd)
  full, _ = ckpt_lib.restore_raw_state(wd)
  assert "opt_state" in full
  restored_keys = []
  for cls in (ocp.CheckpointManager, ocp.PyTreeCheckpointer):  # whichever reads the state from disk
    def spy(self, *a, real=cls.restore, **kw):
      out = real(self, *a, **kw)
      tree = out["state"] if "state" in out else out
      restored_keys.append(sorted(dict(tree)))
      return out
    monkeypatch.setattr(cls, "restore", spy)
  w = ckpt_lib.weights_from(wd)
  assert sorted(w) == sorted(k for k in ("params", "batch_stats") if full.get(k))
  for a, b in zip(jax.tree.leaves(w["params"]), jax.tree.leaves(full["params"])):
    np.testing.assert_array_equal(a, b)
  if ckpt_lib._PARTIAL_RESTORE:
    assert restored_keys and all("opt_state" not in keys for keys in restored_keys), restored_keys


def test_weights_of_an_8_device_run_load_on_one_device(tmp_path):
  """Train on 8 devices, evaluate on 1: the raw state and the weights load as host numpy, whatever device
  layout saved them (orbax's own restore asks for the saving run's topology)."""
  import jax
  from diffaug_jax import checkpoint as ckpt_lib
  from diffaug_jax import trainer
  from test_trainer import tiny_config
  wd = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(steps=2, diffaug=False), wd)
  want = float(sum(np.abs(x).sum() for x in jax.tree.leaves(ckpt_lib.weights_from(wd)["params"])))
  code = ("import jax, numpy as np; from diffaug_jax import checkpoint as c; "
          f"t, _ = c.restore_raw_state({wd!r}); w = c.weights_from({wd!r}); "
          "assert jax.device_count() == 1 and 'opt_state' in t; "
          "print(float(sum(np.abs(x).sum() for x in jax.tree.leaves(w['params']))))")
  env = _child_env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  run = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO), capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert float(run.stdout.strip().splitlines()[-1]) == pytest.approx(want, rel=1e-6)
