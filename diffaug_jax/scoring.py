"""Pure math for the paper's non-accuracy claims: OOD scores + metrics, randomized-smoothing certificates.

numpy / scipy / jax.numpy (+ scikit-learn, imported by the two metric functions that use it; no flax): the
evaluation task modules (`evaluation/ood.py`, `evaluation/certify.py`) feed these functions with logits,
penultimate features and vote counts.

OOD conventions (OpenOOD v1.5): every score is "higher = more in-distribution (ID)".
  * MSP: max softmax probability.
  * energy: T * logsumexp(logits / T) (the negative free energy).
  * ReAct: features clipped at the `percentile` (default 90) of ALL ID feature activations
    (`np.percentile(id_features.flatten(), p)`, OpenOOD's `react_postprocessor`), then energy of the head.
  * ASH-B (OpenOOD's `ash` postprocessor): keep the top k = n - round(n p / 100) activations per example,
    set them all to sum(h) / k, zero the rest; energy.  ASH-S (ASH paper's best ImageNet setting): keep
    the top k, zero the rest, multiply by exp(sum(h) / sum(top-k h)); energy.  Both at p = 90.
  * SCALE (p = 85): h * exp(sum(h) / sum(top-k h)) WITHOUT pruning; energy.
Feature shaping works on pooled penultimate features (B, D) as the classifiers return them (for a ResNet
this equals OpenOOD's (B, 2048, 1, 1) view).

Metric conventions (made explicit because papers differ):
  * AUROC is convention-free (swapping the positive class and negating the score gives the same value).
  * AUPR-in: ID is the positive class, ranked by the score. AUPR-out: OOD positive, ranked by -score.
    Both are the trapezoidal area (sklearn.metrics.auc) under sklearn's precision-recall curve, as OpenOOD
    computes them. Note: some OpenOOD v1.5 revisions of `auc_and_fpr_recall` swap the two labels
    (Jingkang50/OpenOOD issue #211, Dec 2023; fix PR #212); we keep the definitions above, so a number
    reported as "AUPR-In" by such a revision corresponds to our aupr_out.
  * FPR@95 "openood": OOD is the positive class; threshold where >= 95% of OOD examples are flagged
    (TPR over OOD), report the fraction of ID examples wrongly flagged as OOD.
  * FPR@95 "odin" (ODIN / energy / ReAct papers): ID is the positive class; threshold where >= 95% of ID
    examples are kept, report the fraction of OOD examples wrongly accepted as ID.

Certification (Cohen et al. 2019, `locuslab/smoothing` core.py): n0 selection samples pick the top class
cA; n estimation samples give nA votes for cA; the one-sided (1 - alpha) Clopper-Pearson lower bound
pA_lower = Beta.ppf(alpha, nA, n - nA + 1) (== statsmodels' proportion_confint(nA, n, 2 alpha, "beta")[0]);
abstain if pA_lower < 0.5, otherwise certify cA with l2 radius sigma * Phi^-1(pA_lower). `predict` uses a
two-sided binomial test (scipy.stats.binomtest, the successor of the removed binom_test) on the top two
counts and abstains when p-value > alpha.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

ABSTAIN = -1

Array = Any

# ----------------------------------------------------------------------------------------------------
# OOD scores (jax.numpy; work on numpy input too). Shapes: logits (B, K), features (B, D) -> scores (B,).
# ----------------------------------------------------------------------------------------------------


def msp_score(logits: Array) -> Array:
  """Maximum softmax probability, (B, K) -> (B,)."""
  return jnp.max(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1), axis=-1)


def max_logit_score(logits: Array) -> Array:
  """Maximum logit, (B, K) -> (B,)."""
  return jnp.max(jnp.asarray(logits, jnp.float32), axis=-1)


def energy_score(logits: Array, temperature: float = 1.0) -> Array:
  """Negative free energy T * logsumexp(logits / T), (B, K) -> (B,)."""
  logits = jnp.asarray(logits, jnp.float32)
  return temperature * jax.nn.logsumexp(logits / temperature, axis=-1)


def _check_features(h: Array, name: str) -> Array:
  h = jnp.asarray(h, jnp.float32)
  if h.ndim != 2:
    raise ValueError(f"{name}: expected pooled features of shape (B, D), got shape {h.shape}")
  return h


def _check_percentile(percentile: float) -> None:
  if not 0 <= percentile < 100:
    raise ValueError(f"percentile must be in [0, 100), got {percentile}")


def num_kept(dim: int, percentile: float) -> int:
  """k = n - round(n * p / 100): how many activations ASH / SCALE keep (OpenOOD's formula)."""
  _check_percentile(percentile)
  k = dim - int(np.round(dim * percentile / 100.0))
  return max(k, 1)


def react_threshold(id_features: Array, percentile: float = 90.0, sum_fn=None) -> float:
  """ReAct clip value: the `percentile` of all ID penultimate activations (flattened), np.percentile's
  "linear" definition (`percentile_across`).

  `sum_fn`: for ID features split over processes, each process passes its own rows and a function that sums
  an int64 vector over processes; the value is then the one of the whole set, bit for bit."""
  _check_percentile(percentile)
  return percentile_across(id_features, percentile, sum_fn)


def _order_keys(x: np.ndarray) -> np.ndarray:
  """float32/float64 -> unsigned integers of the same width and the same order (negative floats have all
  bits flipped, the others their sign bit set), built in one copy: features of a large set are GBs."""
  keys = x.view(np.uint32 if x.dtype == np.float32 else np.uint64).copy()
  top = keys.dtype.type(1) << keys.dtype.type(8 * keys.itemsize - 1)
  negative = keys >= top
  np.invert(keys, out=keys, where=negative)
  np.bitwise_or(keys, top, out=keys, where=~negative)
  return keys


def _from_order_key(key: int, dtype) -> float:
  utype = np.uint32 if np.dtype(dtype) == np.float32 else np.uint64
  top = 1 << (8 * np.dtype(utype).itemsize - 1)
  bits = key & ~top if key & top else ~key & (2 * top - 1)
  return np.array(bits, utype).view(dtype)[()]


def _order_statistics(keys: np.ndarray, ks: Sequence[int], sum_fn) -> list[int]:
  """The keys of the ks-th smallest (0-based) of the union over processes of every process's `keys`: a radix
  select, 16 bits per round (2 rounds for float32, 4 for float64), each round ONE `sum_fn` call on the
  65536-bucket histograms of all ks, so every process makes the same calls. Only the first round reads every
  key; each round keeps the keys of the chosen bucket (shared by ks that chose the same one)."""
  bits = 8 * keys.itemsize
  prefixes, ranks = [0] * len(ks), [int(k) for k in ks]
  subsets = [keys] * len(ks)
  for shift in range(bits - 16, -1, -16):
    digits, hists = {}, []
    for sub in subsets:
      if id(sub) not in digits:
        d = sub >> sub.dtype.type(shift)
        if shift + 16 < bits:
          d &= sub.dtype.type(0xFFFF)
        digits[id(sub)] = (d, np.bincount(d, minlength=1 << 16).astype(np.int64))
      hists.append(digits[id(sub)][1])
    counts = np.asarray(sum_fn(np.concatenate(hists))).reshape(len(ks), 1 << 16)
    chosen: dict = {}
    for i, sub in enumerate(subsets):
      cum = np.cumsum(counts[i])
      d = int(np.searchsorted(cum, ranks[i], side="right"))  # the bucket holding the rank-th key
      ranks[i] -= int(cum[d - 1]) if d else 0
      prefixes[i] = (prefixes[i] << 16) | d
      if (id(sub), d) not in chosen:
        chosen[(id(sub), d)] = sub[digits[id(sub)][0] == d]
      subsets[i] = chosen[(id(sub), d)]
  return prefixes


def percentile_across(values: Array, percentile: float, sum_fn=None) -> float:
  """np.percentile(values.ravel(), percentile) ("linear"), of a set that processes may hold in parts.

  sum_fn None: this process holds the whole set. Otherwise each process passes its own values (float32 /
  float64; other floats are cast to float32) and `sum_fn(int64 vector) -> its sum over processes`, called
  the same number of times (3 for float32) on every process. The two neighbouring order statistics are found
  exactly (a radix select over order-preserving integer keys: no host holds or sorts the whole set) and
  interpolated with a float64 index and a weight applied in the values' dtype, as numpy >= 2.4.1 does
  (older numpy rounds the index or the weight differently: within an ulp). So 1 and N processes give the
  same value bit for bit on any numpy. NaN anywhere is an error on every process."""
  x = np.asarray(values).reshape(-1)
  if x.dtype not in (np.float32, np.float64):
    x = x.astype(np.float32)
  sum_fn = sum_fn or (lambda v: v)
  n, nans = (int(v) for v in np.asarray(sum_fn(np.array([x.size, np.isnan(x).sum()], np.int64))))
  if nans:  # decided from the global count: no process raises while the others wait in a collective
    raise ValueError(f"percentile of values that contain NaN ({nans} of {n})")
  if n == 0:
    raise ValueError("percentile of an empty set")
  virtual = (n - 1) * (float(percentile) / 100.0)  # np.percentile's "linear" index, in float64
  k = int(np.floor(virtual))
  gamma = virtual - k
  a, b = (_from_order_key(key, x.dtype) for key in _order_statistics(_order_keys(x), [k, min(k + 1, n - 1)], sum_fn))
  diff = b - a  # numpy's _lerp with a Python-float weight: the arithmetic stays in the values' dtype
  return float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)


def react_features(h: Array, threshold: float) -> Array:
  """ReAct rectification: min(h, threshold), (B, D) -> (B, D)."""
  return jnp.minimum(_check_features(h, "react_features"), threshold)


def _topk_mask(h: Array, k: int) -> Array:
  """(B, D) 0/1 mask of each row's top-k entries (ties broken by index, as torch.topk)."""
  _, idx = jax.lax.top_k(h, k)
  return jnp.zeros_like(h).at[jnp.arange(h.shape[0])[:, None], idx].set(1.0)


def ash_b_features(h: Array, percentile: float = 90.0) -> Array:
  """ASH-B (OpenOOD default): top-k entries set to sum(h)/k, others 0."""
  h = _check_features(h, "ash_b_features")
  k = num_kept(h.shape[1], percentile)
  fill = jnp.sum(h, axis=1, keepdims=True) / k
  return _topk_mask(h, k) * fill


def ash_p_features(h: Array, percentile: float = 90.0) -> Array:
  """ASH-P: keep the top-k entries unchanged, others 0."""
  h = _check_features(h, "ash_p_features")
  return _topk_mask(h, num_kept(h.shape[1], percentile)) * h


def _sum_ratio(h: Array, pruned: Array) -> Array:
  """sum(h) / sum(top-k h) per row, (B, 1). A row of all-zero (post-ReLU) features has 0 / 0; the
  reference code returns NaN there, which breaks AUROC. Its features are zero whatever the factor, so the
  ratio is taken as 1 (the value for a row whose mass is all in its top k)."""
  s1 = jnp.sum(h, axis=1, keepdims=True)
  s2 = jnp.sum(pruned, axis=1, keepdims=True)
  return jnp.where(s2 != 0, s1 / jnp.where(s2 != 0, s2, 1.0), 1.0)


def ash_s_features(h: Array, percentile: float = 90.0) -> Array:
  """ASH-S (ASH paper): top-k kept, others 0, then scaled by exp(sum(h) / sum(top-k h))."""
  h = _check_features(h, "ash_s_features")
  pruned = _topk_mask(h, num_kept(h.shape[1], percentile)) * h
  return pruned * jnp.exp(_sum_ratio(h, pruned))


def scale_features(h: Array, percentile: float = 85.0) -> Array:
  """SCALE: h * exp(sum(h) / sum(top-k h)) (no pruning)."""
  h = _check_features(h, "scale_features")
  pruned = _topk_mask(h, num_kept(h.shape[1], percentile)) * h
  return h * jnp.exp(_sum_ratio(h, pruned))


OOD_METHODS = ("msp", "energy", "max_logit", "react", "ash_b", "ash_s", "scale")


def ood_scores(logits: Array, features: Array | None, head_fn, *, methods: Sequence[str] = OOD_METHODS,
               react_clip: float | None = None, ash_percentile: float = 90.0,
               scale_percentile: float = 85.0, temperature: float = 1.0) -> dict[str, Array]:
  """All requested scores for one batch; higher = more ID.

  Args:
    logits: (B, K) plain logits.
    features: (B, D) penultimate features (needed by react / ash_* / scale).
    head_fn: features (B, D) -> logits (B, K), the classifier's last layer (`logits_from_features`).
    react_clip: ReAct threshold from `react_threshold(id_features, 90)` (required for "react").
  """
  out = {}
  for m in methods:
    if m == "msp":
      out[m] = msp_score(logits)
    elif m == "energy":
      out[m] = energy_score(logits, temperature)
    elif m == "max_logit":
      out[m] = max_logit_score(logits)
    elif m in ("react", "ash_b", "ash_s", "ash_p", "scale"):
      if features is None or head_fn is None:
        raise ValueError(f"OOD method {m!r} needs penultimate features and head_fn")
      if m == "react":
        if react_clip is None:
          raise ValueError("OOD method 'react' needs react_clip (react_threshold of ID features)")
        h = react_features(features, react_clip)
      elif m == "ash_b":
        h = ash_b_features(features, ash_percentile)
      elif m == "ash_s":
        h = ash_s_features(features, ash_percentile)
      elif m == "ash_p":
        h = ash_p_features(features, ash_percentile)
      else:
        h = scale_features(features, scale_percentile)
      out[m] = energy_score(head_fn(h), temperature)
    else:
      raise ValueError(f"unknown OOD method {m!r}; known: {OOD_METHODS + ('ash_p',)}")
  return out


# ----------------------------------------------------------------------------------------------------
# OOD metrics (numpy + scikit-learn).
# ----------------------------------------------------------------------------------------------------


def _scores_and_labels(id_scores: Array, ood_scores_: Array) -> tuple[np.ndarray, np.ndarray]:
  id_scores = np.asarray(id_scores, np.float64).ravel()
  ood_scores_ = np.asarray(ood_scores_, np.float64).ravel()
  if id_scores.size == 0 or ood_scores_.size == 0:
    raise ValueError(f"need ID and OOD scores, got {id_scores.size} ID and {ood_scores_.size} OOD")
  for name, s in (("id_scores", id_scores), ("ood_scores", ood_scores_)):
    if not np.all(np.isfinite(s)):
      raise ValueError(f"{name} contains non-finite values")
  scores = np.concatenate([id_scores, ood_scores_])
  is_id = np.concatenate([np.ones(id_scores.size, np.int64), np.zeros(ood_scores_.size, np.int64)])
  return scores, is_id


def fpr_at_recall(id_scores: Array, ood_scores_: Array, recall: float = 0.95,
                  convention: str = "openood") -> float:
  """FPR at `recall` TPR; see the module docstring for the two conventions ("openood", "odin")."""
  from sklearn import metrics

  if not 0.0 < recall <= 1.0:  # 95 (a percentage) would find no threshold and report a perfect 0.0
    raise ValueError(f"recall must be a fraction in (0, 1], got {recall}")
  scores, is_id = _scores_and_labels(id_scores, ood_scores_)
  if convention == "openood":  # OOD positive, ranked by -score
    fpr, tpr, _ = metrics.roc_curve(1 - is_id, -scores)
  elif convention == "odin":  # ID positive, ranked by score
    fpr, tpr, _ = metrics.roc_curve(is_id, scores)
  else:
    raise ValueError(f"unknown FPR convention {convention!r}; use 'openood' or 'odin'")
  return float(fpr[np.argmax(tpr >= recall)])


def ood_metrics(id_scores: Array, ood_scores_: Array, recall: float = 0.95) -> dict[str, float]:
  """AUROC, AUPR-in, AUPR-out, FPR@95 under both conventions (fractions in [0, 1])."""
  from sklearn import metrics

  scores, is_id = _scores_and_labels(id_scores, ood_scores_)
  auroc = metrics.roc_auc_score(is_id, scores)
  p_in, r_in, _ = metrics.precision_recall_curve(is_id, scores)
  p_out, r_out, _ = metrics.precision_recall_curve(1 - is_id, -scores)
  return {
      "auroc": float(auroc),
      "aupr_in": float(metrics.auc(r_in, p_in)),
      "aupr_out": float(metrics.auc(r_out, p_out)),
      "fpr95_openood": fpr_at_recall(id_scores, ood_scores_, recall, "openood"),
      "fpr95_odin": fpr_at_recall(id_scores, ood_scores_, recall, "odin"),
      "num_id": int(is_id.sum()),
      "num_ood": int((1 - is_id).sum()),
  }


# ----------------------------------------------------------------------------------------------------
# Randomized-smoothing certificates (numpy + scipy).
# ----------------------------------------------------------------------------------------------------


def lower_confidence_bound(num_a: int, num: int, alpha: float) -> float:
  """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
  if not 0 <= num_a <= num or num <= 0:
    raise ValueError(f"need 0 <= num_a <= num and num > 0, got num_a={num_a}, num={num}")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  if num_a == 0:
    return 0.0
  return float(stats.beta.ppf(alpha, num_a, num - num_a + 1))


def certify_from_counts(counts_selection: Array, counts_estimation: Array, sigma: float,
                        alpha: float) -> tuple[int, float, float]:
  """Cohen et al. CERTIFY from vote counts.

  Args:
    counts_selection: (K,) votes of the n0 selection samples (picks cA).
    counts_estimation: (K,) votes of the n estimation samples (bounds pA).
  Returns:
    (prediction or ABSTAIN, radius (0.0 when abstaining), pA_lower).
  """
  c0 = np.asarray(counts_selection)
  c = np.asarray(counts_estimation)
  if c0.ndim != 1 or c.shape != c0.shape:
    raise ValueError(f"counts must be two (K,) vectors, got {c0.shape} and {c.shape}")
  for v in (c0, c):  # frequencies would pass through int() as zero votes and abstain without a word
    if v.size and (np.any(v < 0) or np.any(v != np.round(v))):
      raise ValueError(f"counts must be non-negative integer vote counts, got {v[:10].tolist()}")
  c_a = int(np.argmax(c0))
  p_a = lower_confidence_bound(int(c[c_a]), int(c.sum()), alpha)
  if p_a < 0.5:
    return ABSTAIN, 0.0, p_a
  return c_a, float(sigma * stats.norm.ppf(p_a)), p_a


def predict_from_counts(counts: Array, alpha: float) -> int:
  """Cohen et al. PREDICT: top class unless the two-sided binomial test of top-1 vs top-2 has p > alpha."""
  c = np.asarray(counts)
  order = np.argsort(-c, kind="stable")
  top1, top2 = int(order[0]), int(order[1])
  n1, n2 = int(c[top1]), int(c[top2])
  if n1 + n2 == 0:
    return ABSTAIN
  if stats.binomtest(n1, n1 + n2, p=0.5).pvalue > alpha:
    return ABSTAIN
  return top1


def certified_accuracy(radii: Array, correct: Array, radius_grid: Array) -> np.ndarray:
  """Fraction of examples that are correct AND certified at radius >= r, for each r in the grid.

  Abstentions count as incorrect (pass correct=False for them). radius_grid: (R,) -> (R,).
  """
  radii = np.asarray(radii, np.float64)
  correct = np.asarray(correct, bool)
  grid = np.asarray(radius_grid, np.float64)
  if radii.shape != correct.shape:
    raise ValueError(f"radii {radii.shape} and correct {correct.shape} differ")
  if radii.size == 0:
    return np.zeros_like(grid)
  return np.array([np.mean(correct & (radii >= r)) for r in grid])


def best_over_sigmas(curves: Mapping[float, Array], radius_grid: Array) -> tuple[np.ndarray, list]:
  """Per radius, the best certified accuracy over sigmas and the sigma that achieves it."""
  sigmas = sorted(curves)
  table = np.stack([np.asarray(curves[s], np.float64) for s in sigmas])  # (S, R)
  best = table.max(axis=0)
  arg = [sigmas[i] for i in table.argmax(axis=0)]
  if best.shape != np.asarray(radius_grid).shape:
    raise ValueError("curves do not match the radius grid")
  return best, arg
