"""OOD scores and metrics against small hand-computed cases."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from diffaug_jax import scoring
from fast_init import fast_init

H = np.array([[1., 2., 3., 4., 5., 6., 7., 8., 9., 10.]], np.float32)  # sum 55


def test_msp_energy_maxlogit():
  logits = np.array([[0., 0.], [math.log(3.), 0.]], np.float32)
  np.testing.assert_allclose(scoring.msp_score(logits), [0.5, 0.75], rtol=1e-6)
  np.testing.assert_allclose(scoring.energy_score(logits), [math.log(2), math.log(4)], rtol=1e-6)
  np.testing.assert_allclose(scoring.energy_score([[1., 2., 3.]]), [math.log(math.e + math.e**2 + math.e**3)],
                             rtol=1e-6)
  np.testing.assert_allclose(scoring.energy_score([[2., 4.]], temperature=2.),
                             [2 * math.log(math.e + math.e**2)], rtol=1e-6)
  np.testing.assert_allclose(scoring.max_logit_score(logits), [0., math.log(3.)], rtol=1e-6)


def test_react_threshold_and_clip():
  assert scoring.react_threshold(np.arange(10.).reshape(2, 5), 90) == pytest.approx(8.1)
  np.testing.assert_allclose(scoring.react_features(H, 8.1), [[1, 2, 3, 4, 5, 6, 7, 8, 8.1, 8.1]], rtol=1e-6)


def _as_processes(parts, fn):
  """Runs fn(part, sum_fn) on one thread per 'process'; sum_fn sums a vector over them (a barrier-synchronised
  stand-in for the cross-process collective)."""
  import threading
  barrier, inbox, out = threading.Barrier(len(parts)), [None] * len(parts), [None] * len(parts)

  def run(i):
    def sum_fn(v):
      inbox[i] = np.asarray(v)
      barrier.wait()
      total = sum(inbox)
      barrier.wait()  # everyone has read before the next call overwrites
      return total
    out[i] = fn(parts[i], sum_fn)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(parts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_percentile_across_processes_is_exact(dtype):
  """The ReAct threshold of features split over processes (each holding its rows) is the one-process value
  bit for bit (ties, +-0, infinities, an empty process, any split, both interpolation branches), and that is
  np.percentile's (bit for bit on numpy >= 2.4.1, which interpolates as documented there; within an ulp
  before)."""
  exact = tuple(int(v) for v in np.__version__.split(".")[:3] if v.isdigit()) >= (2, 4, 1)
  rng = np.random.default_rng(0)
  for trial in range(60):
    n = int(rng.integers(1, 2000))
    x = (rng.standard_normal(n) * [1e-3, 1.0, 1e4][trial % 3]).astype(dtype)
    if trial % 2:
      x = np.round(np.abs(x), 1).astype(dtype)  # many ties, ReLU-like features
    x[: n // 5] = 0.0
    x[: n // 10] = -0.0
    if trial % 7 == 0:
      x[-2:] = np.inf
    p = float([0.0, 50.0, 90.0, 99.9, 100 * rng.random()][trial % 5])
    with np.errstate(invalid="ignore"):  # inf - inf in the interpolation (numpy's own too)
      one = scoring.percentile_across(x, p)
      want = float(np.percentile(x, p))
    parts = np.array_split(x[rng.permutation(n)], int(rng.integers(1, 5)))
    parts.append(x[:0])  # a process with no rows of this set
    got = _as_processes(parts, lambda part, sum_fn: _quiet(scoring.percentile_across, part, p, sum_fn))
    assert all(g == one for g in got) or all(np.isnan(g) and np.isnan(one) for g in got), (trial, p, one, got)
    if exact or not np.isfinite(want):
      assert one == want or (np.isnan(one) and np.isnan(want)), (trial, p, want, one)
    else:
      assert one == pytest.approx(want, rel=2 * np.finfo(dtype).eps, abs=1e-30), (trial, p, want, one)
  # A NaN in one process's rows is an error on EVERY process (none is left waiting in a collective).
  parts = [np.array([1.0, np.nan], dtype), np.array([2.0], dtype)]
  errors = _as_processes(parts, lambda part, sum_fn: _raises(scoring.percentile_across, part, 50.0, sum_fn))
  assert all(isinstance(e, ValueError) and "NaN" in str(e) for e in errors), errors


def _quiet(fn, *args):
  with np.errstate(invalid="ignore"):  # (per thread)
    return fn(*args)


def _raises(fn, *args):
  try:
    fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    return e
  return None


def test_ash_and_scale_shaping():
  # p = 80 of n = 10 keeps k = 2 (indices 8, 9; values 9, 10; top-2 sum 19).
  assert scoring.num_kept(10, 80) == 2 and scoring.num_kept(10, 90) == 1 and scoring.num_kept(2048, 90) == 205
  b = np.zeros((1, 10), np.float32); b[0, 8:] = 55 / 2
  np.testing.assert_allclose(scoring.ash_b_features(H, 80), b, rtol=1e-6)
  b90 = np.zeros((1, 10), np.float32); b90[0, 9] = 55.
  np.testing.assert_allclose(scoring.ash_b_features(H, 90), b90, rtol=1e-6)
  p = np.zeros((1, 10), np.float32); p[0, 8:] = [9, 10]
  np.testing.assert_allclose(scoring.ash_p_features(H, 80), p, rtol=1e-6)
  np.testing.assert_allclose(scoring.ash_s_features(H, 80), p * math.exp(55 / 19), rtol=1e-5)
  np.testing.assert_allclose(scoring.scale_features(H, 80), H * math.exp(55 / 19), rtol=1e-5)
  # Per-row: a permuted second row gets its own top-k.
  h2 = np.stack([H[0], H[0][::-1]])
  out = np.asarray(scoring.ash_b_features(h2, 80))
  np.testing.assert_allclose(out[1, :2], [27.5, 27.5]) and np.testing.assert_allclose(out[1, 2:], 0)
  # A row of all-zero (post-ReLU) features stays zero and finite (the reference's 0/0 would be NaN);
  # seen on uniform-noise inputs to the demo's CNN.
  z = np.stack([np.zeros(10, np.float32), H[0]])
  for fn in (scoring.ash_s_features, scoring.scale_features):
    out = np.asarray(fn(z, 80))
    assert np.isfinite(out).all() and (out[0] == 0).all()
    np.testing.assert_allclose(out[1], np.asarray(fn(H, 80))[0], rtol=1e-6)
  with pytest.raises(ValueError):
    scoring.ash_b_features(H[0], 80)  # (D,) instead of (B, D)
  with pytest.raises(ValueError):
    scoring.scale_features(H, 100)


def test_ood_scores_dispatch_uses_head_and_energy():
  w = np.array([[1., -1.]] * 10, np.float32) / 10  # head: logits = h @ w
  head = lambda h: jnp.asarray(h) @ w
  logits = head(H)
  s = scoring.ood_scores(logits, H, head, react_clip=8.1, ash_percentile=80, scale_percentile=80)
  lse = lambda z: float(np.log(np.exp(z).sum()))
  assert float(s["ash_b"][0]) == pytest.approx(lse(np.array([5.5, -5.5])), rel=1e-5)
  assert float(s["react"][0]) == pytest.approx(lse(np.array([5.22, -5.22])), rel=1e-5)  # (36 + 2 * 8.1) / 10
  e = 5.5 * math.exp(55 / 19)
  assert float(s["scale"][0]) == pytest.approx(lse(np.array([e, -e])), rel=1e-5)
  e = 1.9 * math.exp(55 / 19)
  assert float(s["ash_s"][0]) == pytest.approx(lse(np.array([e, -e])), rel=1e-5)
  assert float(s["msp"][0]) == pytest.approx(1 / (1 + math.exp(-11.)), rel=1e-6)
  with pytest.raises(ValueError, match="react_clip"):
    scoring.ood_scores(logits, H, head, methods=("react",))
  with pytest.raises(ValueError, match="unknown"):
    scoring.ood_scores(logits, H, head, methods=("odin",))


def test_metrics_hand_computed():
  # Ranked: 7(ID) 6(OOD) 5(ID) 3(OOD) 2(ID).
  id_s, ood_s = [7., 5., 2.], [6., 3.]
  m = scoring.ood_metrics(id_s, ood_s)
  assert m["auroc"] == pytest.approx(3 / 6)
  # PR-in points (R, P): (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2), (1, 3/5) + (0, 1); trapezoid:
  assert m["aupr_in"] == pytest.approx((1 / 3) * (0.6 + 0.5) / 2 + (1 / 3) * (2 / 3 + 0.5) / 2 + 1 / 3)
  # PR-out (OOD positive, -score): (0, 0), (1/2, 1/2), (1/2, 1/3), (1, 1/2), (1, 2/5) + (0, 1):
  assert m["aupr_out"] == pytest.approx(0.5 * (0.5 + 1 / 3) / 2 + 0.5 * 0.5 / 2)
  # ODIN: keep all ID (threshold 2) -> both OOD accepted. OpenOOD: flag all OOD (score <= 6) -> ID 5, 2.
  assert m["fpr95_odin"] == pytest.approx(1.0)
  assert m["fpr95_openood"] == pytest.approx(2 / 3)


def test_fpr95_conventions_differ():
  id_s, ood_s = [4., 5., 6., 7.], [1., 4.5, 6.5]
  assert scoring.fpr_at_recall(id_s, ood_s, convention="odin") == pytest.approx(2 / 3)
  assert scoring.fpr_at_recall(id_s, ood_s, convention="openood") == pytest.approx(3 / 4)
  m = scoring.ood_metrics(id_s, ood_s)
  assert m["auroc"] == pytest.approx((1 + 2 + 2 + 3) / 12)
  # Perfect separation: AUROC 1, both FPRs 0, both AUPRs 1.
  m = scoring.ood_metrics(np.arange(10, 30), np.arange(10))
  assert m["auroc"] == 1.0 and m["fpr95_odin"] == 0.0 and m["fpr95_openood"] == 0.0
  assert m["aupr_in"] == pytest.approx(1.0) and m["aupr_out"] == pytest.approx(1.0)
  with pytest.raises(ValueError):
    scoring.fpr_at_recall(id_s, ood_s, convention="tpr")
  for recall in (95, 0.0, -1):  # a percentage would find no threshold and report a perfect 0.0
    with pytest.raises(ValueError, match="recall must be a fraction"):
      scoring.fpr_at_recall(id_s, ood_s, recall=recall)
  with pytest.raises(ValueError):
    scoring.ood_metrics([1., np.nan], [0.])


def test_ood_run_end_to_end(tmp_path):
  """digits (ID) vs uniform-noise images (an npz 'OOD set'): run() writes JSON + markdown, scores agree with
  the pure functions on the same features."""
  import json
  import ml_collections
  from diffaug_jax.convert.common import save_params
  from diffaug_jax.evaluation import ood
  from diffaug_jax.models.classifiers import get_classifier

  module = get_classifier("cnn_small", 10, width=4)
  variables = fast_init(module, (1, 16, 16, 1))
  save_params(tmp_path / "clf.msgpack", variables)
  noise = np.random.default_rng(0).integers(0, 256, size=(20, 16, 16, 1), dtype=np.uint8)
  np.savez(tmp_path / "noise.npz", image=noise, label=np.zeros(20, np.int32))
  cfg = ml_collections.ConfigDict({
      "task": "ood", "batch_size": 16,
      "classifier": {"name": "cnn_small", "num_classes": 10, "kwargs": {"width": 4},
                     "params_path": str(tmp_path / "clf.msgpack")},
      "id_data": {"source": "digits", "image_size": 16, "split": "test", "max_examples": 40},
      "ood_data": {"noise": {"source": "npz", "path": str(tmp_path / "noise.npz")},
                   "shuffled": {"source": "synthetic", "kind": "pixel_shuffle", "image_size": 16}}})
  res = ood.run(cfg, str(tmp_path / "wd"))
  assert res["num_id"] == 40
  assert set(res["metrics"]["noise"]) == set(ood.DEFAULT_METHODS)
  for m in ood.DEFAULT_METHODS:
    assert 0.0 <= res["metrics"]["noise"][m]["auroc"] <= 1.0
    assert res["metrics"]["noise"][m]["num_ood"] == 20
  assert "noise AUROC" in open(tmp_path / "wd" / "ood.md").read()
  json.load(open(tmp_path / "wd" / "ood.json"))
  # The task's MSP AUROC equals the metric computed directly from a plain forward pass.
  from diffaug_jax.evaluation import loading
  xi, _ = loading.load_arrays(cfg.id_data)
  xo = noise.astype(np.float32) / 127.5 - 1
  si = scoring.msp_score(module.apply(variables, jnp.asarray(xi)))
  so = scoring.msp_score(module.apply(variables, jnp.asarray(xo)))
  assert res["metrics"]["noise"]["msp"]["auroc"] == pytest.approx(scoring.ood_metrics(si, so)["auroc"], abs=1e-6)
  # Feature-shaping scores: ReAct's clip is the 90th percentile of the ID features (not the OOD ones), and
  # every method's metrics equal the pure functions applied to a direct forward pass.
  li, fi = module.apply(variables, jnp.asarray(xi), return_features=True)
  lo, fo = module.apply(variables, jnp.asarray(xo), return_features=True)
  assert res["react_source"] == "id_test"
  assert res["react_clip"] == pytest.approx(scoring.react_threshold(fi, 90.0), rel=1e-5)
  head = lambda h: module.apply(variables, h, method="logits_from_features")
  kw = dict(react_clip=res["react_clip"], ash_percentile=90.0, scale_percentile=85.0)
  di = scoring.ood_scores(li, fi, head, methods=ood.DEFAULT_METHODS, **kw)
  do = scoring.ood_scores(lo, fo, head, methods=ood.DEFAULT_METHODS, **kw)
  for m in ood.DEFAULT_METHODS:
    want = scoring.ood_metrics(di[m], do[m])
    # Sharded vs direct forward passes round differently; near-tied scores (ASH-B fills many rows with the
    # same value) may swap, which moves AUPR by ~1e-5. A wrong formula or threshold moves these by >> 1e-3.
    for k in ("auroc", "aupr_in", "aupr_out", "fpr95_openood", "fpr95_odin"):
      assert res["metrics"]["noise"][m][k] == pytest.approx(want[k], abs=1e-3), (m, k)


def test_scoring_is_pure():
  """scoring.py is pure math: importing it pulls in no flax / orbax / grain / tfds / optax."""
  import subprocess
  import sys
  code = ("import sys, diffaug_jax.scoring\n"
          "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('flax', 'orbax', 'grain', 'tensorflow_datasets', 'tensorflow', 'optax', 'torch'))))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", out.stdout


@pytest.mark.parametrize("source", ["digits", "npz"])
def test_iterate_batches_splits_global_batches_over_processes(tmp_path, source):
  """With P processes each yields its rows of every global batch, all yield the same number of batches
  (the sharded forward is a collective), and together they cover exactly the 1-process examples, the
  max_examples cap included."""
  from diffaug_jax.evaluation import loading
  if source == "npz":
    images = np.random.default_rng(0).integers(0, 256, size=(37, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", image=images, label=np.arange(37, dtype=np.int32))
    cfg = {"source": "npz", "path": str(tmp_path / "x.npz")}
  else:
    cfg = {"source": "digits", "image_size": 8, "split": "test", "max_examples": 45}

  def examples(pi, pc):
    batches = list(loading.iterate_batches(cfg, 12, process_index=pi, process_count=pc))
    assert all(len(b["mask"]) == 12 // pc for b in batches)
    rows = [(b["image"][j].tobytes(), int(b["label"][j])) for b in batches for j in range(len(b["mask"]))
            if b["mask"][j] > 0]
    return len(batches), rows

  n1, one = examples(0, 1)
  assert len(one) == (37 if source == "npz" else 45) and len(set(one)) == len(one)
  if source == "npz":  # float images in [0, 1] are refused (they would read as a constant -1)
    np.savez(tmp_path / "f.npz", image=images / 255.0, label=np.arange(37, dtype=np.int32))
    with pytest.raises(ValueError, match="must be uint8"):
      loading.load_arrays({"source": "npz", "path": str(tmp_path / "f.npz")})
  for pc in (2, 3):
    parts = [examples(pi, pc) for pi in range(pc)]
    assert len({n for n, _ in parts}) == 1  # same number of batches on every process
    assert sorted(r for _, rows in parts for r in rows) == sorted(one)
  with pytest.raises(ValueError, match="divisible"):
    next(loading.iterate_batches(cfg, 12, process_index=0, process_count=5))


def test_score_all_compiles_once_for_every_set_and_chunk():
  """Sets of different lengths and a padded last chunk reuse one compiled scorer, and the padding changes no
  score (against the per-chunk eager computation)."""
  from diffaug_jax.evaluation import ood
  from diffaug_jax.models.classifiers import get_classifier
  module = get_classifier("cnn_small", 10, width=4)
  variables = fast_init(module, (1, 8, 8, 1))
  rng = np.random.default_rng(0)
  sets = {n: (rng.normal(size=(n, 10)).astype(np.float32), np.abs(rng.normal(size=(n, 16))).astype(np.float32))
          for n in (23, 17)}
  kw = dict(methods=("msp", "react", "ash_b", "scale"), react_clip=0.7, chunk=8)
  ood._scorer.cache_clear()
  for n, (lo, fe) in sets.items():
    got = ood.score_all(module, variables, lo, fe, **kw)
    head = lambda h: module.apply(variables, h, method="logits_from_features")
    want = scoring.ood_scores(jnp.asarray(lo), jnp.asarray(fe), head, methods=kw["methods"], react_clip=0.7)
    for m in kw["methods"]:
      assert got[m].shape == (n,)
      np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-5)
  (scorer,) = [ood._scorer(module, kw["methods"], True, 90.0, 85.0)]
  assert ood._scorer.cache_info().currsize == 1 and scorer._cache_size() == 1


def test_ood_run_on_openood_style_image_lists(tmp_path):
  """OpenOOD v1.5's protocol as configs/eval_ood.py:imagenet sets it: ID, ReAct-reference and OOD sets as
  image lists under one root; the threshold comes from the reference list, not the scored ID one."""
  import ml_collections
  from PIL import Image
  from diffaug_jax.convert.common import load_params, save_params
  from diffaug_jax.evaluation import loading, ood
  from diffaug_jax.models.classifiers import get_classifier

  module = get_classifier("cnn_small", 10, width=4)
  save_params(tmp_path / "clf.msgpack", fast_init(module, (1, 16, 16, 1)))
  rng = np.random.default_rng(0)
  lists = {}
  for name, n in (("test_id", 12), ("val_id", 6), ("test_ood", 7)):
    rows = []
    for i in range(n):
      rel = f"{name}/{i}.png"
      (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (20, 18), dtype=np.uint8)).save(tmp_path / "images" / rel)
      rows.append(f"{rel} {i % 10}" if name != "test_ood" else f"{rel} 0")
    (tmp_path / f"{name}.txt").write_text("\n".join(rows) + "\n")
    lists[name] = dict(source="list", data_dir=str(tmp_path / "images"), eval_split=str(tmp_path / f"{name}.txt"),
                       image_size=16, channels=1, eval_transform="imagenet", resize_size=18, num_classes=10)
  cfg = ml_collections.ConfigDict({
      "task": "ood", "batch_size": 8,
      "classifier": {"name": "cnn_small", "num_classes": 10, "kwargs": {"width": 4},
                     "params_path": str(tmp_path / "clf.msgpack")},
      "id_data": lists["test_id"], "react_data": lists["val_id"], "ood_data": {"ood": lists["test_ood"]}})
  res = ood.run(cfg, str(tmp_path / "wd"))
  assert res["num_id"] == 12 and res["metrics"]["ood"]["msp"]["num_ood"] == 7
  assert res["react_source"] == "react_data"
  _, ref_feats, _ = ood.collect(ood.make_runner(module), load_params(str(tmp_path / "clf.msgpack")),
                                loading.iterate_batches(cfg.react_data, 8))
  assert res["react_clip"] == scoring.react_threshold(ref_feats, 90.0)
