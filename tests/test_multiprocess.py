"""Two processes x 4 CPU devices (jax.distributed on localhost) == one process x 8 devices: same loss curve
(and the same OOD metrics, `test_ood_two_processes_match_one_process`).

Both the in-memory "arrays" source and the real grain pipeline (digits, with per-example random crops) yield
the same GLOBAL batch sequence for any process count (each process feeds its slice,
`make_array_from_process_local_data` assembles the global batch), so the curves must agree up to float
reduction order (rtol 1e-5). Then both runs resume for 3 more steps in this one process: the 2-process
checkpoint must continue exactly like the 1-process one (elastic resume). Runtime ~50 s per source on 2
cores (two subprocesses in parallel, then two short resumed runs)."""
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


EVAL_COUNT = {"arrays": 40, "digits": 364}


def _run_two_processes(*child_args: str) -> list[str]:
  """Runs this file as 2 jax.distributed processes x 4 CPU devices with `child_args`; returns their outputs
  (each exited 0)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, __file__, child_args[0], port, str(i), *child_args[1:]], env=env,
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _config(source, steps=STEPS):
  from test_trainer import tiny_config
  cfg = tiny_config(steps=steps)
  cfg.block_every = 2
  if source == "digits":  # the grain pipeline: global permutation, host slices, per-example crops
    from diffaug_jax.data.config import digits_config
    cfg.data = digits_config(image_size=8, channels=1)
    cfg.num_classes = 10
  return cfg


@pytest.mark.slow
@pytest.mark.parametrize("source", ["arrays", "digits"])
def test_two_processes_match_one_process(tmp_path, source):
  from diffaug_jax import trainer
  from diffaug_jax.metrics import read_jsonl
  for out in _run_two_processes(str(tmp_path / "multi"), source):
    assert f"CHILD step={STEPS} processes=2 devices=8" in out, out[-4000:]
  ref = trainer.train_and_evaluate(_config(source), str(tmp_path / "single"))
  multi = [r for r in read_jsonl(str(tmp_path / "multi" / "metrics.jsonl")) if r["split"] == "train"]
  single = [r for r in read_jsonl(str(tmp_path / "single" / "metrics.jsonl")) if r["split"] == "train"]
  assert [r["step"] for r in multi] == [r["step"] for r in single] == list(range(1, STEPS + 1))
  for a, b in zip(multi, single):
    for k in ("loss", "loss_clean", "loss_diffaug", "accuracy", "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {k}")
  ev_m = [r for r in read_jsonl(str(tmp_path / "multi" / "metrics.jsonl")) if r["split"] == "eval"][-1]
  assert ev_m["eval_count"] == EVAL_COUNT[source]
  np.testing.assert_allclose(ev_m["eval_accuracy"], ref["eval"]["eval_accuracy"], atol=1e-6)

  # Elastic resume: the 2-process checkpoint (state + data iterator) continues in ONE process exactly as the
  # 1-process checkpoint does (the iterator state is host-invariant; the state is resharded on restore).
  more = STEPS + 3
  resumed = trainer.train_and_evaluate(_config(source, more), str(tmp_path / "multi"))
  same = trainer.train_and_evaluate(_config(source, more), str(tmp_path / "single"))
  assert resumed["start"] == same["start"] == f"resume@{STEPS}" and resumed["step"] == more
  tail = lambda d: [r for r in read_jsonl(str(tmp_path / d / "metrics.jsonl"))
                    if r["split"] == "train" and r["step"] > STEPS]
  assert [r["step"] for r in tail("multi")] == [r["step"] for r in tail("single")] == [7, 8, 9]
  for a, b in zip(tail("multi"), tail("single")):
    for k in ("loss", "accuracy", "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"resumed step {a['step']} {k}")


def _ood_config(tmp):
  """A tiny OOD task: digits (ID, capped at 45) vs an npz of 21 noise images; batch 12 over the processes."""
  import ml_collections
  from diffaug_jax.convert.common import save_params
  from diffaug_jax.models.classifiers import get_classifier
  from fast_init import fast_init
  path = pathlib.Path(tmp)
  if not (path / "clf.msgpack").exists():
    path.mkdir(parents=True, exist_ok=True)
    save_params(path / "clf.msgpack", fast_init(get_classifier("cnn_small", 10, width=4), (1, 8, 8, 1)))
    noise = np.random.default_rng(0).integers(0, 256, size=(21, 8, 8, 1), dtype=np.uint8)
    np.savez(path / "noise.npz", image=noise, label=np.zeros(21, np.int32))
  return ml_collections.ConfigDict({
      "task": "ood", "batch_size": 16,
      "classifier": {"name": "cnn_small", "num_classes": 10, "kwargs": {"width": 4},
                     "params_path": str(path / "clf.msgpack")},
      "id_data": {"source": "digits", "image_size": 8, "split": "test", "max_examples": 45},
      "ood_data": {"noise": {"source": "npz", "path": str(path / "noise.npz")}}})


@pytest.mark.slow
def test_ood_two_processes_match_one_process(tmp_path):
  """The OOD task under jax.distributed: each process reads its rows (loader and npz), keeps their logits and
  features, scores them and gathers only the scores; the metrics equal the 1-process run (the 45 + 21 examples
  counted once; 45 = 16 + 16 + 13 leaves the two processes 24 and 21 ID rows)."""
  import json
  from diffaug_jax.evaluation import ood
  _ood_config(tmp_path / "data")  # written once, before the children read it
  _run_two_processes(str(tmp_path / "multi"), "ood", str(tmp_path / "data"))
  multi = json.loads((tmp_path / "multi" / "ood.json").read_text())
  single = ood.run(_ood_config(tmp_path / "data"), str(tmp_path / "single"))
  assert multi["num_id"] == single["num_id"] == 45
  assert multi["metrics"]["noise"]["msp"]["num_ood"] == 21
  assert multi["id_accuracy"] == pytest.approx(single["id_accuracy"])
  # Each process kept only its rows: the ReAct threshold, found across them, is the one-process value exactly.
  assert multi["react_clip"] == single["react_clip"]
  for m in ood.DEFAULT_METHODS:
    for k in ("auroc", "fpr95_openood", "aupr_in"):
      assert multi["metrics"]["noise"][m][k] == pytest.approx(single["metrics"]["noise"][m][k], abs=1e-6), (m, k)


def _da_run() -> dict:
  """The DA-classifier's training and diffused-test accuracy on 8 x 8 digits (a Gaussian denoiser as the
  score model), in however many processes run it: every process holds the same arrays and draws the same
  batches (the global batch), of which it feeds its rows."""
  import jax
  import ml_collections
  from diffaug_jax import diffusion
  from diffaug_jax.evaluation import da_classifier as dac, loading
  from diffaug_jax.models.time_classifier import time_classifier
  from test_da_classifier import _numpy_init
  sched = diffusion.linear_schedule(1000)
  dc = ml_collections.ConfigDict(dict(source="digits", image_size=8, channels=1))
  xtr, ytr = loading.load_arrays(dc, split="train")
  xte, yte = loading.load_arrays(dc, split="test")
  eps_fn, sp = dac.gaussian_denoiser(xtr, sched)
  m = time_classifier(10, denoising_augmented=True, width=8, channel_mult=(1, 2))
  v, hist = dac.train_classifier(jax.random.key(1), m, xtr, ytr, eps_fn, sp, sched, steps=4, batch_size=16,
                                 variables=_numpy_init(m, (1, 8, 8, 1), (1,), (1, 8, 8, 1)), log_every=1)
  ev = dac.evaluate_diffused(jax.random.key(2), m, v, xte[:100], yte[:100], eps_fn, sp, sched, batch_size=32)
  return {"loss": [h["loss"] for h in hist], "accuracy": ev["accuracy"], "num_examples": ev["num_examples"]}


def _robustness_run() -> dict:
  """DE and DDA (norm over groups of 4 rows, as the official code) of two classifiers on the digits eval
  loader, clean and gaussian_noise 5, with an analytic score model: per-row noise and row groups must see
  the same examples at the same rows for any process count."""
  import jax
  import jax.numpy as jnp
  from diffaug_jax import diffusion
  from diffaug_jax.data.config import digits_config
  from diffaug_jax.evaluation import dda, robustness, suites
  base = digits_config(8, 1)
  w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
  classify_fn = lambda p, x: x.reshape(x.shape[0], -1) @ p["w"]
  eps_fn = lambda sp, x_t, t: sp["a"] * x_t * (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
  model_fn = lambda sp, x_t, t: jnp.concatenate([eps_fn(sp, x_t, t), jnp.tanh(x_t) * 0.5], axis=-1)
  score = {"eps_fn": eps_fn, "model_fn": model_fn, "score_params": {"a": jnp.float32(0.7)},
           "schedule": diffusion.linear_schedule(1000), "learn_sigma": True,
           "dda_schedule": dda.dda_schedule(spacing="10")}
  models = [{"name": n, "classify_fn": classify_fn, "params": {"w": jnp.asarray(s * w)}, **score}
            for n, s in (("a", 1.0), ("b", -1.0))]
  specs = {"clean": {}, "corrupted": {"corruptions": ["gaussian_noise"], "severities": [5]}}
  cfg = {"de": {"ts": [0, 300, 600]}, "dda": {"start_step": 2, "factor": 2, "scale": 2.0, "norm": "groups_of_4"}}
  res = robustness.evaluate_models(models, specs, ["default", "de", "dda"], cfg=cfg, key=jax.random.key(0),
                                   make_batches=lambda es: suites.make_batches(es, base, batch_size=40))
  return {m: {s: {k: {mode: r for mode, r in v.items() if mode != "seconds"} for k, v in d["sets"].items()}
              for s, d in res["models"][m].items()} for m in ("a", "b")}


def test_robustness_two_processes_match_one_process(tmp_path):
  """DE / DDA results under jax.distributed equal one process's: the eval loader gives host h block h of
  every global batch, so each example keeps its row (and its noise) whatever the process count."""
  import json
  _run_two_processes(str(tmp_path / "multi"), "robustness")
  multi = json.loads((tmp_path / "multi" / "robustness.json").read_text())
  single = json.loads(json.dumps(_robustness_run()))
  assert multi == single
  assert single["a"]["clean"]["test"]["de"]["n"] == 364


@pytest.mark.slow
def test_da_classifier_two_processes_match_one_process(tmp_path):
  """train_classifier / evaluate_diffused under jax.distributed: the global batch is the drawn batch (not
  one copy per process), and every test example is scored once, as in one process."""
  import json
  _run_two_processes(str(tmp_path / "multi"), "da")
  multi = json.loads((tmp_path / "multi" / "da.json").read_text())
  single = _da_run()
  assert multi["num_examples"] == single["num_examples"] == 100
  np.testing.assert_allclose(multi["loss"], single["loss"], rtol=1e-5)
  assert multi["accuracy"] == pytest.approx(single["accuracy"])


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path):
  """Preemption on several hosts: SIGTERM reaches ONE process (process 1); JAX's preemption sync manager makes
  both stop at the same step, save one checkpoint and exit 0. Resumed in one process, the run continues
  exactly like an uninterrupted one."""
  import signal
  import time
  from diffaug_jax import trainer
  from diffaug_jax.metrics import read_jsonl
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
  port, wd = str(_free_port()), tmp_path / "multi"
  procs = [subprocess.Popen([sys.executable, __file__, str(wd), port, str(i), "preempt"], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    t0 = time.time()
    rows = lambda: len(read_jsonl(str(wd / "metrics.jsonl"))) if (wd / "metrics.jsonl").exists() else 0
    while rows() < 4 and time.time() - t0 < 240 and all(p.poll() is None for p in procs):
      time.sleep(0.2)
    assert rows() >= 4, "the two-process run did not start training"
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  steps = set()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
    line = [l for l in out.splitlines() if l.startswith("CHILD step=")][-1]
    steps.add(line)
  assert len(steps) == 1 and "preempted=True" in next(iter(steps)), steps  # one stop step, on both
  stop = int(next(iter(steps)).split("step=")[1].split()[0])
  assert sorted(os.listdir(wd / "checkpoints")) == [str(stop)]
  more = stop + 3
  resumed = trainer.train_and_evaluate(_config("arrays", more), str(wd))
  same = trainer.train_and_evaluate(_config("arrays", more), str(tmp_path / "single"))
  assert resumed["start"] == f"resume@{stop}" and resumed["step"] == same["step"] == more
  tail = lambda d, lo: [r for r in read_jsonl(str(d / "metrics.jsonl")) if r["split"] == "train" and r["step"] > lo]
  a, b = tail(wd, stop), tail(tmp_path / "single", stop)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [stop + 1, stop + 2, stop + 3]
  for x, y in zip(a, b):
    for k in ("loss", "accuracy", "grad_norm"):
      np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6, err_msg=f"resumed step {x['step']} {k}")


if __name__ == "__main__":
  # Child: argv = workdir, port, process id, source ("arrays" | "digits": train; "preempt": train until
  # SIGTERM; "ood": the OOD task, argv[5] = its data folder; "da" / "robustness": `_da_run` /
  # `_robustness_run`).
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[2]}", num_processes=2,
                             process_id=int(sys.argv[3]), initialization_timeout=120)
  if sys.argv[4] == "preempt":  # runs until a SIGTERM (see the preemption test)
    from diffaug_jax import trainer
    cfg = _config("arrays", 100_000)
    cfg.log_every = 1
    out = trainer.train_and_evaluate(cfg, sys.argv[1])
    print(f"CHILD step={out['step']} preempted={out['preempted']}", flush=True)
  elif sys.argv[4] in ("da", "robustness"):  # the run's results, as <workdir>/<name>.json from process 0
    import json
    out = {"da": _da_run, "robustness": _robustness_run}[sys.argv[4]]()
    if jax.process_index() == 0:
      os.makedirs(sys.argv[1], exist_ok=True)
      pathlib.Path(sys.argv[1], f"{sys.argv[4]}.json").write_text(json.dumps(out))
    print(f"CHILD {sys.argv[4]} processes={jax.process_count()}", flush=True)
  elif sys.argv[4] == "ood":
    from diffaug_jax.evaluation import ood
    ood.run(_ood_config(sys.argv[5]), sys.argv[1])
    print(f"CHILD ood processes={jax.process_count()} devices={jax.device_count()}", flush=True)
  else:
    from diffaug_jax import trainer
    out = trainer.train_and_evaluate(_config(sys.argv[4]), sys.argv[1])
    print(f"CHILD step={out['step']} processes={jax.process_count()} devices={jax.device_count()}",
          flush=True)
  jax.distributed.shutdown()
