"""Randomized-smoothing certification on toy problems with known answers (CPU, 8 fake devices)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffaug_jax import diffusion, scoring
from diffaug_jax.evaluation import certify
from fast_init import fast_init

SIGMA = 0.5


def _linear_problem(p_true, dim=16, seed=0):
  """Binary linear classifier sign(w.x + b) and a point x whose smoothed top-class probability is p_true.

  Smoothing noise in [-1, 1] units has std 2 sigma, so pA = Phi(m / (2 sigma |w|)) with m = w.x + b, and the
  exact l2 radius on the [0, 1] scale is sigma Phi^-1(pA) = m / (2 |w|).
  """
  rng = np.random.default_rng(seed)
  w = rng.normal(size=dim).astype(np.float32)
  b = np.float32(0.1)
  m = 2 * SIGMA * np.linalg.norm(w) * stats.norm.ppf(p_true)
  u = w / np.linalg.norm(w)
  x = (u * (m - b) / np.linalg.norm(w)).astype(np.float32).reshape(1, 4, 4, 1)

  def classify(params, xb):
    s = xb.reshape(xb.shape[0], -1) @ params["w"] + params["b"]
    return jnp.stack([-s, s], axis=-1)

  params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
  true_radius = SIGMA * stats.norm.ppf(p_true) if p_true > 0.5 else 0.0
  return classify, params, x, true_radius


def test_lower_bound_matches_clopper_pearson_and_is_valid():
  # Beta quantile == one-sided Clopper-Pearson; all-successes case is alpha^(1/n) exactly.
  assert scoring.lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-9)
  assert scoring.lower_confidence_bound(0, 10, 0.05) == 0.0
  # Statistical validity: over many binomial draws, pA_lower > true pA happens at most ~alpha of the time.
  rng = np.random.default_rng(0)
  p_true, n, alpha, runs = 0.8, 500, 0.05, 3000
  na = rng.binomial(n, p_true, size=runs)
  lcb = np.array([scoring.lower_confidence_bound(int(k), n, alpha) for k in na])
  violations = np.mean(lcb > p_true)
  assert violations <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)
  assert violations > 0.2 * alpha  # not vacuous: the bound is tight-ish, not 0
  with pytest.raises(ValueError):
    scoring.lower_confidence_bound(5, 3, 0.01)


def test_certify_linear_toy_never_above_true_radius():
  classify, params, x, true_radius = _linear_problem(0.9)
  predict_fn = certify.make_noisy_predict_fn(classify, SIGMA, denoise=False)
  counts_fn = certify.make_counts_fn(predict_fn, 2, batch_size=512)
  radii = []
  for seed in range(6):
    pred, radius, p_a = certify.certify(counts_fn, params, jax.random.key(seed), x, sigma=SIGMA, n0=64,
                                        n=2000, alpha=0.001, batch_size=512)
    assert pred == 1
    assert radius <= true_radius
    assert p_a < 0.9
    radii.append(radius)
  # Close to the truth with n = 2000 (so the test can fail if the radius were e.g. always 0).
  assert np.mean(radii) > 0.6 * true_radius


def test_abstain_when_classes_tie():
  classify, params, x, _ = _linear_problem(0.5)
  predict_fn = certify.make_noisy_predict_fn(classify, SIGMA, denoise=False)
  counts_fn = certify.make_counts_fn(predict_fn, 2, batch_size=512)
  outs = [certify.certify(counts_fn, params, jax.random.key(s), x, sigma=SIGMA, n0=64, n=1024,
                          alpha=0.001, batch_size=512) for s in range(4)]
  assert all(pred == scoring.ABSTAIN and radius == 0.0 for pred, radius, _ in outs)
  assert certify.predict(counts_fn, params, jax.random.key(9), x, n=1024, alpha=0.001,
                         batch_size=512) == scoring.ABSTAIN
  assert scoring.predict_from_counts([50, 50, 0], 0.001) == scoring.ABSTAIN
  assert scoring.predict_from_counts([3, 97, 0], 0.001) == 1
  # A clear case is predicted, not abstained.
  classify, params, x, _ = _linear_problem(0.99)
  counts_fn = certify.make_counts_fn(certify.make_noisy_predict_fn(classify, SIGMA, denoise=False), 2, 512)
  assert certify.predict(counts_fn, params, jax.random.key(1), x, n=512, alpha=0.001, batch_size=512) == 1


def test_denoised_smoothing_with_oracle_denoiser_gives_exact_radius():
  """A one-point data set: the oracle eps recovers x* exactly, so every vote is correct and the
  certificate is sigma * Phi^-1(alpha^(1/n)) exactly; the partial last batch is masked correctly."""
  schedule = diffusion.linear_schedule(1000)
  x_star = jnp.asarray(np.linspace(-0.9, 0.9, 16, dtype=np.float32).reshape(1, 4, 4, 1))
  sab = schedule.sqrt_alphas_cumprod
  s1m = schedule.sqrt_one_minus_alphas_cumprod

  def eps_fn(params, x_t, t):
    return (x_t - sab[t][:, None, None, None] * params["x"]) / s1m[t][:, None, None, None]

  def classify(params, xb):  # class 2 iff the image is x*, else class 0
    d = jnp.sum((xb - params["x"]) ** 2, axis=(1, 2, 3))
    return jnp.stack([d, jnp.zeros_like(d) - 1.0, 1e-3 - d], axis=-1)

  params = {"x": x_star}
  predict_fn = certify.make_noisy_predict_fn(classify, SIGMA, eps_fn=eps_fn, schedule=schedule)
  counts_fn = certify.make_counts_fn(predict_fn, 3, batch_size=64)
  n, alpha = 200, 0.01  # 200 = 3 full batches of 64 + a masked partial one
  counts = certify.sample_counts(counts_fn, params, jax.random.key(0), x_star, n, 64)
  np.testing.assert_array_equal(counts, [0, 0, n])
  pred, radius, _ = certify.certify(counts_fn, params, jax.random.key(1), x_star, sigma=SIGMA, n0=10, n=n,
                                    alpha=alpha, batch_size=64)
  assert pred == 2
  assert radius == pytest.approx(SIGMA * stats.norm.ppf(alpha ** (1 / n)), rel=1e-6)
  t = diffusion.t_for_sigma(schedule, SIGMA)
  assert certify.effective_sigma(schedule, t) >= SIGMA


def test_selection_counts_pick_class_estimation_counts_bound_it():
  """Cohen's CERTIFY: cA comes from the n0 selection votes only; pA_lower from the n estimation votes of
  THAT class only (a majority among the estimation votes for another class must not be certified)."""
  alpha, sigma = 0.001, 0.5
  # Selection says class 1, estimation votes mostly class 0: pA_lower(class 1) = LCB(10 / 100) -> abstain.
  pred, radius, p_a = scoring.certify_from_counts([3, 97], [90, 10], sigma, alpha)
  assert pred == scoring.ABSTAIN and radius == 0.0
  assert p_a == pytest.approx(stats.beta.ppf(alpha, 10, 91))
  # Selection says class 0: certified with the estimation counts (n = 100), not the selection ones.
  pred, radius, p_a = scoring.certify_from_counts([97, 3], [90, 10], sigma, alpha)
  assert pred == 0 and p_a == pytest.approx(stats.beta.ppf(alpha, 90, 11))
  assert radius == pytest.approx(sigma * stats.norm.ppf(stats.beta.ppf(alpha, 90, 11)))
  # certify(): n0 and n samples are drawn in separate calls with different keys.
  calls = []

  def counts_fn(params, key, x, num_valid):
    calls.append((jax.random.key_data(key).tolist(), int(num_valid)))
    return np.array([0, int(num_valid)])

  pred, _, _ = certify.certify(counts_fn, None, jax.random.key(0), None, sigma=sigma, n0=30, n=250,
                               alpha=alpha, batch_size=100)
  assert pred == 1
  assert [c[1] for c in calls] == [30, 100, 100, 50]
  assert calls[0][0] not in [c[0] for c in calls[1:]]
  assert len({tuple(c[0]) for c in calls}) == 4  # fresh noise key for every batch


def test_votes_outside_num_classes_are_an_error_not_a_bigger_radius():
  """one_hot drops a class index >= num_classes; counting only the kept votes would shrink n and inflate
  pA_lower (7069 of 7069 instead of 7069 of 10000). The count must equal the samples drawn."""
  def predict_fn(params, key, xb):
    del params, key
    return jnp.where(jnp.arange(xb.shape[0]) % 10 < 7, 0, 7)  # 70% class 0, 30% class 7

  counts_fn = certify.make_counts_fn(predict_fn, num_classes=5, batch_size=8)
  with pytest.raises(ValueError, match="outside num_classes"):
    certify.certify(counts_fn, None, jax.random.key(0), np.zeros((1, 2, 2, 1), np.float32), sigma=0.5,
                    n0=16, n=80, batch_size=8)
  ok = certify.make_counts_fn(predict_fn, num_classes=8, batch_size=8)
  c = certify.sample_counts(ok, None, jax.random.key(0), np.zeros((1, 2, 2, 1), np.float32), 20, 8)
  assert c.sum() == 20 and c[0] + c[7] == 20


def test_denoised_predict_uses_t_for_sigma():
  """The denoiser sees t* = t_for_sigma(sigma) (smallest t with sqrt((1 - abar)/abar) >= 2 sigma): an eps
  model whose x0_hat is the constant image t / 1000, and a 1000-way classifier reading that t back."""
  schedule = diffusion.linear_schedule(1000)
  sab, s1m = schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod

  def eps_fn(params, x_t, t):
    c = (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
    return (x_t - sab[t][:, None, None, None] * c) / s1m[t][:, None, None, None]

  def classify(params, xb):
    return -jnp.abs(jnp.arange(1000.0)[None] - 1000.0 * xb.mean(axis=(1, 2, 3))[:, None])

  x = jnp.zeros((1, 4, 4, 1))
  for sigma in (0.25, 0.5, 1.0):
    predict_fn = certify.make_noisy_predict_fn(classify, sigma, eps_fn=eps_fn, schedule=schedule)
    pred = np.asarray(jax.jit(predict_fn)(None, jax.random.key(0), jnp.broadcast_to(x, (8, 4, 4, 1))))
    t_star = diffusion.t_for_sigma(schedule, sigma)
    np.testing.assert_array_equal(pred, t_star)
    lv = np.sqrt((1 - np.asarray(schedule.alphas_cumprod, np.float64)) / np.asarray(schedule.alphas_cumprod))
    assert lv[t_star] >= 2 * sigma > lv[t_star - 1]


def test_summary_table_and_best_sigma():
  rows = {0.25: [{"radius": 0.3, "correct": 1}, {"radius": 0.0, "correct": 0}],
          0.5: [{"radius": 0.9, "correct": 1}, {"radius": 0.1, "correct": 1}]}
  summ = certify.summarize(rows, radii=(0.0, 0.25, 0.5))
  np.testing.assert_allclose(summ["curves"]["0.25"], [0.5, 0.5, 0.0])
  np.testing.assert_allclose(summ["curves"]["0.5"], [1.0, 0.5, 0.5])
  np.testing.assert_allclose(summ["best"], [1.0, 0.5, 0.5])
  assert summ["best_sigma"] == [0.5, 0.25, 0.5]
  assert "| best |" in certify.markdown_table(summ)


def test_run_writes_outputs(tmp_path):
  """End-to-end `run` on embedded digits with a (random) small classifier and Gaussian smoothing."""
  import ml_collections
  from diffaug_jax.convert.common import save_params
  from diffaug_jax.models.classifiers import get_classifier

  module = get_classifier("cnn_small", 10, width=4)
  variables = fast_init(module, (1, 8, 8, 1))
  save_params(tmp_path / "clf.msgpack", variables)
  cfg = ml_collections.ConfigDict({
      "task": "certify", "seed": 0, "denoise": False, "sigmas": [0.25, 0.5], "n0": 8, "n": 48,
      "alpha": 0.001, "batch_size": 16, "radii": [0.0, 0.25, 0.5],
      "classifier": {"name": "cnn_small", "num_classes": 10, "kwargs": {"width": 4},
                     "params_path": str(tmp_path / "clf.msgpack")},
      "data": {"source": "digits", "split": "test", "max_examples": 3, "skip": 5, "image_size": 8}})
  out = certify.run(cfg, str(tmp_path / "wd"))
  for f in ("certify_sigma0.25.tsv", "certify_sigma0.5.tsv", "certify.json", "certify.md", "certify.png"):
    assert os.path.exists(tmp_path / "wd" / f), f
  lines = open(tmp_path / "wd" / "certify_sigma0.5.tsv").read().strip().split("\n")
  assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"] and len(lines) == 4
  # idx is the example's index in the split (Cohen's TSV), not its position in the skip-5 subset.
  assert [int(r.split("\t")[0]) for r in lines[1:]] == [0, 5, 10]
  assert len(out["best"]) == 3
  json.load(open(tmp_path / "wd" / "certify.json"))


def test_certify_from_counts_refuses_frequencies():
  """Frequencies passed for vote counts would truncate to zero votes and abstain without a word."""
  from diffaug_jax import scoring
  with pytest.raises(ValueError, match="integer vote counts"):
    scoring.certify_from_counts(np.array([0.1, 0.9]), np.array([0.02, 0.98]), 0.25, 0.001)
  pred, radius, _ = scoring.certify_from_counts(np.array([1, 99]), np.array([2, 998]), 0.25, 0.001)
  assert pred == 1 and radius > 0
