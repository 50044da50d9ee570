"""Robustness evaluation: Default / DE / DDA modes, sharding invariance, subsets, mCE, tables, figures.

Tiny stand-in models (a linear classifier on pooled pixels, an analytic eps model) keep this CPU-cheap:
~20 s on 2 cores with 8 fake devices.
"""
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffaug_jax import diffusion
from diffaug_jax import sharding as shd
from diffaug_jax.evaluation import classify, dda, figures, robustness, suites, tables

K = 5
H = 8


def classify_fn(params, x):
  feats = jnp.concatenate([x.mean(axis=(1, 2)), (x ** 2).mean(axis=(1, 2))], axis=-1)  # (B, 6)
  return feats @ params["w"] + params["b"]


def eps_fn(sp, x_t, t):
  # An analytic "denoiser": a fraction of x_t, growing with t.
  return sp["a"] * x_t * (t.astype(jnp.float32) / 1000.0)[:, None, None, None]


def model_fn(sp, x_t, t):
  eps = eps_fn(sp, x_t, t)
  return jnp.concatenate([eps, jnp.tanh(x_t) * 0.5], axis=-1)  # learn_sigma: (eps, v)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(6, K)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(K,)) * 0.1, jnp.float32)}
  sp = {"a": jnp.float32(0.7)}
  images = rng.integers(0, 256, size=(20, H, H, 3), dtype=np.uint8)
  labels = rng.integers(0, K, size=(20,)).astype(np.int32)
  return params, sp, images, labels


def _batches(images, labels, bs=8):
  return list(classify.batches_from_arrays(images, labels, bs))


def _mesh1():
  return shd.make_mesh(jax.devices()[:1])


def test_default_sharded_equals_single_and_masks_padding(setup):
  params, _, images, labels = setup
  assert jax.device_count() == 8
  step = robustness.default_step(classify_fn, robustness.Head())
  key = jax.random.key(1)
  out8 = classify.ShardedRunner(step).run(params, _batches(images, labels), key)
  out1 = classify.ShardedRunner(step, _mesh1()).run(params, _batches(images, labels), key)
  assert len(out8["pred"]) == 20  # 4 padding rows of the last batch dropped
  np.testing.assert_array_equal(out8["pred"], out1["pred"])
  np.testing.assert_allclose(out8["entropy"], out1["entropy"], rtol=1e-5)
  ref = np.argmax(np.asarray(classify_fn(params, jnp.asarray(images, jnp.float32) / 127.5 - 1)), -1)
  np.testing.assert_array_equal(out8["pred"], ref)
  res = robustness.evaluate_default(classify_fn, params, _batches(images, labels))
  assert res["n"] == 20 and res["accuracy"] == pytest.approx(np.mean(ref == labels))


def test_de_sharded_equals_single_and_cumulative(setup):
  params, sp, images, labels = setup
  ts = (0, 100, 300, 600)
  sched = diffusion.linear_schedule(1000)
  step = robustness.de_step(classify_fn, eps_fn, sched, ts, robustness.Head())
  key = jax.random.key(2)
  out8 = classify.ShardedRunner(step).run((params, sp), _batches(images, labels), key)
  out1 = classify.ShardedRunner(step, _mesh1()).run((params, sp), _batches(images, labels), key)
  for k in ("pred", "member_pred", "cum_pred"):
    np.testing.assert_array_equal(out8[k], out1[k])
  np.testing.assert_allclose(out8["member_entropy"], out1["member_entropy"], rtol=1e-4, atol=1e-6)
  res = robustness.evaluate_de(classify_fn, params, eps_fn, sp, _batches(images, labels), schedule=sched,
                               ts=ts, key=key)
  assert res["cumulative"][-1] == res["accuracy"]
  # Per example, not only in aggregate: the last cumulative prediction is the full ensemble's.
  np.testing.assert_array_equal(out8["cum_pred"][:, -1], out8["pred"])
  np.testing.assert_array_equal(out8["cum_pred"][:, 0], out8["member_pred"][:, 0])
  assert res["cumulative"][0] == res["members"][0]
  # Member t=0 is the plain classifier.
  plain = robustness.evaluate_default(classify_fn, params, _batches(images, labels))
  assert res["members"][0] == plain["accuracy"]
  assert len(res["members"]) == len(ts) == len(res["member_entropy"])
  # Noise matters: a large-t member differs from the raw one somewhere.
  assert not np.array_equal(out8["member_pred"][:, 0], out8["member_pred"][:, 3]) or \
      not np.allclose(out8["member_entropy"][:, 0], out8["member_entropy"][:, 3])


def test_dda_sharded_equals_single(setup):
  params, sp, images, labels = setup
  sched = dda.dda_schedule(spacing="10")
  step = robustness.dda_step(classify_fn, model_fn, sched, robustness.Head(), start_step=3, factor=2,
                             scale=3.0, learn_sigma=True, norm="per_example", image_size=None)
  key = jax.random.key(3)
  out8 = classify.ShardedRunner(step).run((params, sp), _batches(images, labels), key)
  out1 = classify.ShardedRunner(step, _mesh1()).run((params, sp), _batches(images, labels), key)
  for k in ("pred", "pred_dda", "pred_dda_se"):
    np.testing.assert_array_equal(out8[k], out1[k])


def test_dda_respaces_the_score_models_own_schedule(setup, monkeypatch):
  """DDA runs on the score model's schedule respaced (a cosine 4000-step model keeps its abar table and
  its 0..3999 timesteps), not on a linear 1000-step one."""
  base = diffusion.cosine_schedule(4000)
  sched = dda.dda_schedule(spacing="100", base=base)
  keep = np.asarray(sched.timestep_map)
  assert len(keep) == 100 and keep[-1] == 3999  # (guided-diffusion spacing: the last step kept)
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), np.asarray(base.alphas_cumprod)[keep], rtol=1e-5)
  seen = []
  monkeypatch.setattr(dda, "dda_schedule", lambda **kw: seen.append(kw) or sched)
  params, sp, images, labels = setup
  model = {"name": "m", "classify_fn": classify_fn, "params": params, "model_fn": model_fn, "score_params": sp,
           "schedule": base, "learn_sigma": True}
  robustness.evaluate_models([model], {"clean": {}}, ["dda"], cfg={"dda": {"start_step": 1, "factor": 2}},
                             make_batches=lambda es: (_batches(images[:8], labels[:8]), None),
                             key=jax.random.key(0))
  assert seen and seen[0]["base"] is base


def test_dda_scale0_is_plain_respaced_sampling():
  sched = dda.dda_schedule(spacing="10")
  rng = np.random.default_rng(1)
  ref = jnp.asarray(rng.uniform(-1, 1, size=(2, H, H, 3)), jnp.float32)
  sp = {"a": jnp.float32(0.5)}
  mf = lambda x, t: model_fn(sp, x, t)
  key = jax.random.key(4)
  got = jax.jit(lambda k, r: dda.dda_adapt(k, r, mf, sched, start_step=4, factor=2, scale=0.0))(key, ref)
  want = jax.jit(lambda k, r: dda.plain_respaced_sampling(k, r, mf, sched, start_step=4))(key, ref)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  guided = jax.jit(lambda k, r: dda.dda_adapt(k, r, mf, sched, start_step=4, factor=2, scale=5.0))(key, ref)
  assert np.abs(np.asarray(guided) - np.asarray(want)).max() > 1e-3  # guidance does something
  # Independent reference: the library's DDPM sampler (`sampling.ddpm_sample`, not written for DDA) from
  # x_N = q_sample(ref, N) over respaced indices N-1 .. 0 (the original's `range(N)[::-1]`). Its step i
  # uses fold_in(key, i), so handing it DDA's loop key gives the same per-step noise.
  from diffaug_jax import sampling
  k_start, k_loop = jax.random.split(key)
  x_n = diffusion.q_sample(sched, ref, jnp.full((2,), 4, jnp.int32), jax.random.normal(k_start, ref.shape))
  lib = jax.jit(lambda k, x: sampling.ddpm_sample(k, mf, sched, ref.shape, learn_sigma=True, x_init=x,
                                                  start_step=3))(k_loop, x_n)
  np.testing.assert_allclose(np.asarray(got), np.asarray(lib), rtol=1e-5, atol=1e-5)


def test_dda_defaults_match_the_paper_setting():
  """DDA: 100 respaced steps of the 1000-step linear schedule, start at N = 50 (t about 500), D = 4,
  scale = 6 (REFERENCE.md), in the pure function, the evaluator, the suite runner and the ImageNet config."""
  import importlib.util
  import inspect
  import os
  sched = dda.dda_schedule()
  assert sched.num_timesteps == 100
  assert abs(int(np.asarray(sched.timestep_map)[50]) - 500) <= 10
  for fn in (dda.dda_adapt, robustness.evaluate_dda):
    d = {k: v.default for k, v in inspect.signature(fn).parameters.items()}
    assert (d["start_step"], d["factor"], d["scale"]) == (50, 4, 6.0), fn.__name__
  src = inspect.getsource(robustness._dda_settings)
  for want in ('"start_step", 50', '"factor", 4', '"scale", 6.0', '"spacing", "100"'):
    assert want in src, want
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "eval_imagenet.py")
  spec = importlib.util.spec_from_file_location("eval_imagenet", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("dda").dda
  assert (c.spacing, c.start_step, c.factor, c.scale) == ("100", 50, 4, 6.0)


def test_dda_guidance_decreases_lowpass_distance():
  sched = dda.dda_schedule(spacing="20")
  rng = np.random.default_rng(2)
  ref = jnp.asarray(rng.uniform(-1, 1, size=(3, H, H, 3)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(3, H, H, 3)), jnp.float32)
  sp = {"a": jnp.float32(0.3)}
  mf = lambda x, t: model_fn(sp, x, t)
  ref_lp = dda.lowpass(ref, 2)
  i = jnp.int32(12)
  t = jnp.full((3,), 12, jnp.int32)

  @jax.jit
  def dist(x):
    out = mf(x, diffusion.model_timesteps(sched, t))
    x0 = diffusion.p_mean_variance(sched, out, x, t, learn_sigma=True)["pred_x0"]
    return dda.lowpass_distance(ref_lp, x0, 2)

  key = jax.random.key(0)
  step = jax.jit(lambda x, s: dda.guided_step(key, x, i, ref_lp, mf, sched, factor=2, scale=s,
                                              learn_sigma=True))
  x_next, grad, d0 = step(x, 1.0)
  np.testing.assert_allclose(np.asarray(d0), np.asarray(dist(x)), rtol=1e-5)
  x_plain, _, _ = step(x, 0.0)
  np.testing.assert_allclose(np.asarray(x_plain - x_next), np.asarray(grad), rtol=1e-5, atol=1e-6)
  # The update direction (-grad) lowers ||LPF(ref) - LPF(x0_hat(x))|| for every example.
  d1 = dist(x - 0.05 * grad)
  assert np.all(np.asarray(d1) < np.asarray(d0)), (d0, d1)


def test_200_class_subsets_match_golden(golden_dir):
  golden = json.loads((golden_dir / "imagenet_200_class_subsets.json").read_text())
  for name, gkey in (("imagenet_r", "imagenet_r_indices"), ("imagenet_a", "imagenet_a_indices")):
    (es,) = suites.expand_suite(name, {})
    assert list(es.class_subset) == golden[gkey] and len(es.class_subset) == 200
    head = robustness.Head(es.class_subset, "subset", "subset")
    logits = np.zeros((3, 1000), np.float32)
    not_in = next(i for i in range(1000) if i not in set(golden[gkey]))
    logits[0, golden[gkey][17]] = 5.0
    logits[1, not_in] = 50.0  # outside the subset: must be ignored by the sliced softmax
    logits[1, golden[gkey][3]] = 1.0
    logits[2, golden[gkey][199]] = 2.0
    p = np.asarray(head.probs(jnp.asarray(logits)))
    assert p.shape == (3, 200)
    np.testing.assert_array_equal(p.argmax(-1), [17, 3, 199])
    # 1000-way option: the argmax over all classes, labels mapped into the 1000 space.
    full = robustness.Head(es.class_subset, "full", "subset")
    assert np.asarray(full.probs(jnp.asarray(logits))).argmax(-1)[1] == not_in
    np.testing.assert_array_equal(full.targets(np.array([17, 3])), [golden[gkey][17], golden[gkey][3]])
    # Folder labels (1000-way) map back to subset positions; a label outside the subset is an error.
    sub_full = robustness.Head(es.class_subset, "subset", "full")
    np.testing.assert_array_equal(sub_full.targets(np.array([golden[gkey][5]])), [5])
    with pytest.raises(ValueError, match="not in the 200-class subset"):
      sub_full.targets(np.array([not_in]))


def test_tfds_imagenet_r_a_labels_are_1000_way(tmp_path):
  """TFDS imagenet_r / imagenet_a label with the 1000-wnid list (the same list folders are read with), so the
  suites must say labels="full"; reading them as subset positions scored an oracle at 0%."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from diffaug_jax.data import sources
  for name in ("imagenet_r", "imagenet_a"):
    label = tfds.builder(name, data_dir=str(tmp_path)).info.features["label"]
    assert label.names == sources.imagenet_class_names()
    for src in ({}, {"source": "folder", "path": "/x"}):
      (es,) = suites.expand_suite(name, src)
      assert es.labels == "full"
  # 1000-way labels declared as subset positions are an error, not a silent 0%.
  subset = suites.imagenet_200_subsets()["imagenet_r"]
  with pytest.raises(ValueError, match="1000-way"):
    robustness.Head(subset, "subset", "subset").targets(np.array([3, 500]))


def _oracle_classify(params, x):
  """Reads the label written into pixel (0, 0) (label = 4 * u0 + u1 of the uint8 image): 1000 logits."""
  del params
  u = jnp.round((x[:, 0, 0, :2] + 1.0) * 127.5).astype(jnp.int32)
  return 10.0 * jax.nn.one_hot(4 * u[:, 0] + u[:, 1], 1000)


def test_imagenet_r_and_a_each_use_their_own_subset():
  """The runner cache must not hand ImageNet-A the program compiled for ImageNet-R's 200 classes."""
  subsets = suites.imagenet_200_subsets()

  def make_batches(es):
    labels = np.asarray(subsets[es.suite][::25], np.int32)  # 8 true 1000-way labels of this suite
    images = np.zeros((len(labels), 4, 4, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = labels // 4, labels % 4
    return _batches(images, labels), None

  for order in (("imagenet_r", "imagenet_a"), ("imagenet_a", "imagenet_r")):
    specs = {name: {"source": "folder", "path": "/unused"} for name in order}
    res = robustness.evaluate_models([{"name": "oracle", "classify_fn": _oracle_classify, "params": {}}],
                                     specs, ["default"], make_batches=make_batches)
    for name in order:
      assert res["models"]["oracle"][name]["sets"]["subset"]["default"]["accuracy"] == 1.0, (order, name)


def test_unreadable_examples_are_counted_in_results(setup):
  """A loader that knows its size (EvalLoader.num_examples) reports how many examples were not scored."""
  params, _, images, labels = setup

  class Loader(list):
    num_examples = 21  # one more than the 20 readable rows: one file could not be read

  def make_batches(es):
    return Loader(_batches(images, labels)), None

  res = robustness.evaluate_models([{"name": "m", "classify_fn": classify_fn, "params": params}],
                                   {"clean": {}}, ["default"], make_batches=make_batches)
  s = res["models"]["m"]["clean"]["sets"]["test"]
  assert s["default"]["n"] == 20 and s["unreadable"] == 1


def test_suite_options_are_checked():
  with pytest.raises(ValueError, match="unknown option.*severity"):
    suites.expand_suite("imagenet_c", {"severity": (5,)})
  with pytest.raises(ValueError, match="source must be 'tfds' or 'folder'"):
    suites.expand_suite("imagenet_c", {"source": "Folder", "path": "/data/imagenet-c"})
  with pytest.raises(ValueError, match="unknown option.*corruption"):
    suites.expand_suite("cifar10_c", {"corruption": ("fog",)})
  # An option another suite reads, or a folder source where there is no folder form, is not ignored:
  with pytest.raises(ValueError, match=r"'clean' does not read option\(s\) \['path', 'source'\]"):
    suites.expand_suite("clean", {"source": "folder", "path": "/data/other"})
  with pytest.raises(ValueError, match=r"'imagenet_r' does not read option\(s\) \['severities'\]"):
    suites.expand_suite("imagenet_r", {"severities": (5,)})
  with pytest.raises(ValueError, match="'cifar10_c' has no folder form"):
    suites.expand_suite("cifar10_c", {"source": "folder"})
  with pytest.raises(ValueError, match="unknown suite 'imagenet_x'"):
    suites.expand_suite("imagenet_x", {"path": "/x"})
  # The shipped eval configs' suites all expand (their options are the ones each suite reads).
  for config in ("eval_imagenet", "eval_cifar10", "eval_digits"):
    cfg = importlib.import_module(f"configs.{config}").get_config()
    for name, opts in cfg.suites.items():
      assert suites.expand_suite(name, dict(opts))


def test_dda_step_hands_the_padding_mask_to_batch_norm(monkeypatch, setup):
  """DDA's norm="batch" (the official whole-batch guidance norm) must not count padding rows."""
  params, sp, images, labels = setup
  seen = []
  real = dda.dda_adapt

  def spy(*args, **kw):
    seen.append(kw.get("mask"))
    return real(*args, **kw)

  monkeypatch.setattr(dda, "dda_adapt", spy)
  step = robustness.dda_step(classify_fn, model_fn, dda.dda_schedule(spacing="10"), robustness.Head(),
                             start_step=2, factor=2, scale=3.0, learn_sigma=True, norm="batch",
                             image_size=None)
  out = classify.ShardedRunner(step, _mesh1()).run((params, sp), _batches(images[:12], labels[:12]),
                                                   jax.random.key(0))
  assert len(out["pred_dda"]) == 12
  assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (8,)  # traced once, mask passed


def test_mce_hand_computed():
  acc = {"gaussian_noise": {1: 0.5, 5: 0.1}, "brightness": {5: 0.6}, "speckle_noise": {5: 0.3}}
  r = suites.mce(acc, normalise=True)
  ce_g = 100 * (0.5 + 0.9) / (0.69528 + 0.99452)
  ce_b = 100 * 0.4 / 0.72440
  assert r["CE"]["gaussian_noise"] == pytest.approx(ce_g)
  assert r["CE"]["brightness"] == pytest.approx(ce_b)
  assert "speckle_noise" not in r["CE"]  # not one of the 15: no AlexNet reference, reported apart
  assert r["error_extra"] == {"speckle_noise": pytest.approx(70.0)}
  # The suite's IN-C accuracy is over the standard corruptions; an extra one is reported apart.
  per = {"gaussian_noise/5": {"default": {"accuracy": 0.1}}, "speckle_noise/5": {"default": {"accuracy": 0.3}}}
  summ = robustness._suite_summary("imagenet_c", per, ["default"])["default"]  # pylint: disable=protected-access
  assert summ["accuracy"] == pytest.approx(0.1) and summ["accuracy_extra"] == pytest.approx(0.3)
  assert summ["accuracy_by_severity"] == {"5": pytest.approx(0.1)}
  # The DE member table uses the same sets as the IN-C columns: its t = 0 member equals Default.
  de = lambda members, acc: {"de": {"ts": [0, 50], "members": members, "cumulative": [members[0], acc],
                                    "accuracy": acc}}
  sets = {"fog/5": {"default": {"accuracy": 0.2}, **de([0.2, 0.4], 0.3)},
          "spatter/5": {"default": {"accuracy": 0.8}, **de([0.8, 1.0], 0.9)}}
  suite_summary = robustness._suite_summary  # pylint: disable=protected-access
  res = {"modes": ["default", "de"], "suites": {"imagenet_c": {}}, "models": {"m": {"imagenet_c": {
      "sets": sets, "summary": suite_summary("imagenet_c", sets, ["default", "de"])}}}}
  md = tables.results_table(res)
  assert "| m | IN-C | 20.00 | 40.00 |" in md, md
  # Severity 5 alone is not the published (1-5) mCE, and the table says so.
  assert "over severities 5 only, not comparable with the 1-5 mCE" in md, md
  assert r["severities"] == [1, 5]
  assert suites.summary_sets("imagenet_c", ["spatter/5"]) == ["spatter/5"]  # only extras asked for
  assert r["mCE"] == pytest.approx((ce_g + ce_b) / 2)
  # All five severities give the familiar AlexNet mean (sum err / sum alexnet): AlexNet itself -> 100.
  alex = {c: {s + 1: 1 - e for s, e in enumerate(v)} for c, v in suites.ALEXNET_ERRORS.items()}
  assert suites.mce(alex)["mCE"] == pytest.approx(100.0) and suites.mce(alex)["severities"] == [1, 2, 3, 4, 5]
  alex_sets = {f"{c}/{sev}": {"default": {"accuracy": a}} for c, v in alex.items() for sev, a in v.items()}
  full = {"modes": ["default"], "suites": {"imagenet_c": {}}, "models": {"alexnet": {"imagenet_c": {
      "sets": alex_sets, "summary": suite_summary("imagenet_c", alex_sets, ["default"])}}}}
  md = tables.results_table(full)
  assert "IN-C: mCE normalised by AlexNet)" in md and "| alexnet | 100.00 |" in md, md
  assert np.mean(suites.ALEXNET_ERRORS["gaussian_noise"]) == pytest.approx(0.886428, abs=1e-6)
  u = suites.mce({"fog": {1: 0.8, 2: 0.6}}, normalise=False)
  assert u["mCE"] == pytest.approx(30.0)
  assert len(suites.expand_suite("cifar10_c", {})) == 19 * 5
  assert len(suites.expand_suite("imagenet_c", {"severities": [5]})) == 15


def test_alexnet_errors_match_hendrycks_release():
  """Every AlexNet constant (15 corruptions x 5 severities) against the list in Hendrycks' ImageNet-C
  evaluation code (`imagenetc_alexnet_error_rates_list`, typed here independently)."""
  hendrycks = [
      (0.69528, 0.82542, 0.93554, 0.98138, 0.99452), (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
      (0.78374, 0.89808, 0.9487, 0.9872, 0.99548), (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
      (0.64308, 0.75054, 0.88806, 0.91622, 0.93344), (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
      (0.70008, 0.76992, 0.80784, 0.84198, 0.87198), (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
      (0.6139, 0.79734, 0.8879, 0.89942, 0.9343), (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
      (0.4514, 0.48502, 0.54048, 0.62166, 0.7244), (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
      (0.52596, 0.70116, 0.55686, 0.64076, 0.80554), (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
      (0.51002, 0.54718, 0.57294, 0.65458, 0.74778)]
  assert tuple(suites.ALEXNET_ERRORS) == suites.IMAGENET_C_CORRUPTIONS
  for c, want in zip(suites.IMAGENET_C_CORRUPTIONS, hendrycks):
    np.testing.assert_allclose(suites.ALEXNET_ERRORS[c], want, rtol=0, atol=1e-9, err_msg=c)


@pytest.mark.slow
def test_suite_table_and_figures(setup, tmp_path):
  params, sp, images, labels = setup

  def loader_fn(cfg, split, bs):
    return _batches(images, labels, bs)

  def make_batches(es):
    return suites.make_batches(es, _FakeCfg(), batch_size=8, loader_fn=loader_fn)

  models = [
      {"name": "m1", "classify_fn": classify_fn, "params": params, "eps_fn": eps_fn, "model_fn": model_fn,
       "score_params": sp, "schedule": diffusion.linear_schedule(1000), "learn_sigma": True,
       "dda_schedule": dda.dda_schedule(spacing="10")},
      {"name": "m2", "classify_fn": classify_fn,
       "params": jax.tree.map(lambda v: -v, params), "eps_fn": eps_fn, "model_fn": model_fn,
       "score_params": sp, "schedule": diffusion.linear_schedule(1000), "learn_sigma": True,
       "dda_schedule": dda.dda_schedule(spacing="10")},
  ]
  specs = {"clean": {}, "corrupted": {"corruptions": ["contrast"], "severities": [1, 5]}}
  cfg = {"de": {"ts": [0, 200, 400]}, "dda": {"start_step": 2, "factor": 2, "scale": 2.0}}
  res = robustness.evaluate_models(models, specs, ["default", "de", "dda"], make_batches=make_batches,
                                   cfg=cfg, key=jax.random.key(0))
  json.dumps(res, default=float)
  md = tables.results_table(res)
  header = next(line for line in md.splitlines() if line.startswith("| Model"))
  for s in ("Clean", "Corrupted"):
    for m in ("Def", "DE", "DDA", "DDA-SE"):
      assert f"{s} {m}" in header
  for name in ("m1", "m2"):
    row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(header.strip("|").split("|")) and "-" not in cells[1:], row
  # m2 shares m1's compiled programs (same callables) but must be scored with its own weights.
  for name, m in (("m1", models[0]), ("m2", models[1])):
    direct = robustness.evaluate_default(classify_fn, m["params"], _batches(images, labels))
    assert res["models"][name]["clean"]["sets"]["test"]["default"]["accuracy"] == direct["accuracy"]
  summ = res["models"]["m1"]["corrupted"]["summary"]
  assert set(summ) == {"default", "de", "dda", "dda_se"} and "mCE" in summ["default"]
  sets = res["models"]["m1"]["corrupted"]["sets"]
  assert set(sets) == {"contrast/1", "contrast/5"}
  # Severity 5 contrast is a different input than severity 1 (the corruption was applied).
  assert sets["contrast/1"]["default"] != sets["contrast/5"]["default"] or \
      sets["contrast/1"]["de"]["member_entropy"] != sets["contrast/5"]["de"]["member_entropy"]
  # Figures: written and non-empty.
  p1 = figures.de_curve_figure(res, str(tmp_path / "de.png"))
  p2 = figures.augmentation_grid(images[:3], eps_fn, sp, diffusion.linear_schedule(1000),
                                 str(tmp_path / "grid.png"))
  de = res["models"]["m1"]["clean"]["sets"]["test"]["de"]
  p3 = figures.entropy_vs_t_figure({"m1": (de["ts"], de["member_entropy"])}, str(tmp_path / "ent.png"))
  for p in (p1, p2, p3):
    with open(p, "rb") as f:
      head = f.read(8)
    assert head.startswith(b"\x89PNG") and (tmp_path / p.split("/")[-1]).stat().st_size > 1000


class _FakeCfg(dict):
  """Stands in for the data config (only copied by make_batches for base/corrupt sources)."""


def test_missing_dataset_message():
  (es,) = [e for e in suites.expand_suite("imagenet_c", {"corruptions": ["fog"], "severities": [5]})]

  def loader_fn(cfg, split, bs):
    raise FileNotFoundError("no such dataset")

  class Cfg:
    data_dir = ""
  with pytest.raises(suites.DatasetMissingError, match="(?s)imagenet2012_corrupted/fog_5.*manual download"):
    suites.make_batches(es, Cfg(), batch_size=8, loader_fn=loader_fn)
  (es,) = suites.expand_suite("imagenet_r", {"source": "folder", "path": "/nonexistent/imagenet-r"})
  with pytest.raises(suites.DatasetMissingError, match="/nonexistent/imagenet-r"):
    suites.make_batches(es, Cfg(), batch_size=8, loader_fn=loader_fn)


def test_imagenet_c_folder_tree_recorded(setup, tmp_path):
  params, _, images, labels = setup
  for c in ("fog", "contrast"):
    (tmp_path / c / "5").mkdir(parents=True)
  seen = []

  def loader_fn(cfg, split, bs):
    seen.append((cfg.source, cfg.data_dir, split, cfg.class_names))
    return _batches(images, labels, bs)

  class Cfg:
    source, data_dir, class_names = "tfds", "", ""

  def make_batches(es):
    return suites.make_batches(es, Cfg(), batch_size=8, loader_fn=loader_fn)

  specs = {"imagenet_c": {"source": "folder", "path": str(tmp_path), "corruptions": ["fog", "contrast"],
                          "severities": [5]}}
  res = robustness.evaluate_models([{"name": "m", "classify_fn": classify_fn, "params": params}], specs,
                                   ["default"], make_batches=make_batches)
  r = res["models"]["m"]["imagenet_c"]
  assert r["imagenet_c_release"].startswith("official JPEG")
  assert seen == [("folder", str(tmp_path / "fog" / "5"), "", "imagenet2012"),
                  ("folder", str(tmp_path / "contrast" / "5"), "", "imagenet2012")]
  accs = {c: 1 - r["sets"][f"{c}/5"]["default"]["accuracy"] for c in ("fog", "contrast")}
  want = np.mean([100 * accs[c] / suites.ALEXNET_ERRORS[c][4] for c in accs])
  assert r["summary"]["default"]["mCE"] == pytest.approx(want)


def test_dda_group_norm_is_the_official_batch_norm_per_group():
  """norm="groups_of_4": each group of 4 consecutive rows gets the gradient the official code's whole-batch
  norm gives a batch of 4 (its --batch_size): d_i / ||D_group||, about half the per-example step."""
  rng = np.random.default_rng(0)
  ref_lp = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
  x0 = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
  g = jax.grad(lambda y: jnp.sum(dda.lowpass_distance(ref_lp, y, 2, norm="groups_of_4")))(x0)
  for lo in (0, 4):
    one = jax.grad(lambda y: dda.lowpass_distance(ref_lp[lo:lo + 4], y, 2, norm="batch"))(x0[lo:lo + 4])
    np.testing.assert_allclose(np.asarray(g[lo:lo + 4]), np.asarray(one), rtol=1e-5, atol=1e-7)
  per = jax.grad(lambda y: jnp.sum(dda.lowpass_distance(ref_lp, y, 2)))(x0)
  row_norm = lambda a: np.linalg.norm(np.asarray(a).reshape(8, -1), axis=1)
  ratio = row_norm(per) / row_norm(g)
  assert np.all(ratio > 1.3), ratio  # ~sqrt(4) = 2 for similar rows
  with pytest.raises(ValueError, match="divisible by 3"):
    dda.lowpass_distance(ref_lp, x0, 2, norm="groups_of_3")


def test_models_sharing_a_score_model_are_evaluated_together(setup):
  """Two classifiers on one score model: one read of the set, each DE member's x0_hat and the DDA
  adaptation computed once (rows through the score model counted on the host), and each model's results
  equal its single-model evaluation with the set's key."""
  params, sp, images, labels = setup
  rows = {"eps": 0, "model": 0}

  def count(name):
    def add(x):
      rows[name] += x.shape[0]
    return add

  def eps_counted(sp_, x_t, t):
    jax.debug.callback(count("eps"), x_t)  # once per device shard: rows add up over the mesh
    return eps_fn(sp_, x_t, t)

  def model_counted(sp_, x_t, t):
    jax.debug.callback(count("model"), x_t)
    return model_fn(sp_, x_t, t)

  reads = []

  def make_batches(es):
    reads.append(es.name)
    return _batches(images, labels), None

  sched, dsched = diffusion.linear_schedule(1000), dda.dda_schedule(spacing="10")
  score = {"eps_fn": eps_counted, "model_fn": model_counted, "score_params": sp, "schedule": sched,
           "learn_sigma": True, "dda_schedule": dsched}
  models = [{"name": "m1", "classify_fn": classify_fn, "params": params, **score},
            {"name": "m2", "classify_fn": classify_fn, "params": jax.tree.map(lambda v: -v, params), **score}]
  ts = (0, 200, 400)
  dda_cfg = {"start_step": 2, "factor": 2, "scale": 2.0}
  key = jax.random.key(5)
  res = robustness.evaluate_models(models, {"clean": {}}, ["default", "de", "dda"], make_batches=make_batches,
                                   cfg={"de": {"ts": ts}, "dda": dda_cfg}, key=key)
  jax.effects_barrier()
  padded = 24  # 20 images in batches of 8
  assert reads == ["test"]
  assert rows["eps"] == padded * 2  # two noisy members, once for both models
  assert rows["model"] == padded * 2  # DDA from respaced step 2: two model calls per row, once for both
  set_key = jax.random.fold_in(key, 0)
  for m in models:
    got = res["models"][m["name"]]["clean"]["sets"]["test"]
    assert got["default"] == robustness.evaluate_default(classify_fn, m["params"], _batches(images, labels))
    de = robustness.evaluate_de(classify_fn, m["params"], eps_fn, sp, _batches(images, labels), schedule=sched,
                                ts=ts, key=set_key)
    assert got["de"] == de
    r = robustness.evaluate_dda(classify_fn, m["params"], model_fn, sp, _batches(images, labels), schedule=dsched,
                                key=set_key, start_step=2, factor=2, scale=2.0)
    assert got["dda"] == dict(r["dda"], n=20) and got["dda_se"] == dict(r["dda_se"], n=20)
  assert res["models"]["m1"]["clean"]["sets"]["test"]["de"] != res["models"]["m2"]["clean"]["sets"]["test"]["de"]


def test_eval_batch_size_is_a_multiple_of_the_devices():
  """The evaluation tasks round their batch size up (masked padding), so a shipped batch size never meets
  the runner's multi-process check (padding between hosts) on a device count it does not divide."""
  assert [shd.eval_batch_size(b, n) for b, n in ((500, 8), (500, 16), (256, 512), (64, 1))] == [504, 512, 512, 64]
  assert shd.eval_batch_size(12) == 16  # 8 fake devices
