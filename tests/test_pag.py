"""Perceptually aligned gradients: jax.grad parity and the PNG grid."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffaug_jax import diffusion
from diffaug_jax.evaluation import pag
from fast_init import fast_init


def test_gradients_match_direct_grad_and_png(tmp_path):
  from diffaug_jax.models.classifiers import get_classifier
  module = get_classifier("cnn_small", 10, width=4)
  variables = fast_init(module, (1, 16, 16, 1))
  schedule = diffusion.linear_schedule(1000)
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 1)), jnp.float32)
  labels = jnp.array([1, 4, 7])
  logit_fn = lambda x, t: module.apply(variables, x)
  key = jax.random.key(3)
  x_t, g = jax.jit(pag.pag_gradients, static_argnums=(3, 5))(key, x0, labels, logit_fn, schedule, 300)
  # x_t is q_sample at t=300 with the same key's noise.
  noise = jax.random.normal(key, x0.shape, jnp.float32)
  np.testing.assert_allclose(x_t, diffusion.q_sample(schedule, x0, jnp.full((3,), 300), noise), atol=1e-6)
  direct = jax.jit(jax.grad(lambda x, y: module.apply(variables, x)[0, y]))
  for i in range(3):  # each example's gradient = jax.grad of its own logit, computed on that example alone
    gi = direct(x_t[i:i + 1], labels[i])
    np.testing.assert_allclose(g[i:i + 1], gi, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g).max()) > 0
  out = pag.pag_figure(key, np.asarray(x0), np.asarray(labels), {"a": logit_fn, "b": logit_fn}, schedule,
                       str(tmp_path / "pag.png"), t=300)
  assert os.path.getsize(tmp_path / "pag.png") > 0
  np.testing.assert_allclose(out["a"], g, rtol=1e-4, atol=1e-6)
  from PIL import Image
  im = Image.open(tmp_path / "pag.png")
  assert im.size[0] > im.size[1] / 3 * 4 - 1  # 4 columns (x0, x_t, a, b), 3 rows
  for bad in (1000, -1):  # the gather would clamp / wrap it, under the asked-for t's name
    with pytest.raises(ValueError, match=r"PAG t must lie in \[0, 1000\)"):
      pag.pag_gradients(key, x0, labels, logit_fn, schedule, bad)


def test_normalize_gradients():
  g = np.array([[[[-2.0]], [[0.0]], [[2.0]]]], np.float32).reshape(1, 3, 1, 1)
  np.testing.assert_allclose(pag.normalize_gradients(g)[..., 0].ravel(), [0.0, 0.5, 1.0])
  g = np.concatenate([np.linspace(-1, 1, 98), [-100.0, 100.0]]).reshape(1, 10, 10, 1)
  n = pag.normalize_gradients(g, contrast=True, percentile=2.0)
  assert n.min() == 0.0 and n.max() == 1.0
  assert np.isclose(np.median(n), 0.5)  # outliers clipped, the bulk sits mid-range
  np.testing.assert_array_equal(pag.normalize_gradients(np.ones((1, 2, 2, 1))), np.zeros((1, 2, 2, 1)))


def test_run_task_dispatch_writes_png(tmp_path):
  import json
  import ml_collections
  from diffaug_jax.convert.common import save_params
  from diffaug_jax.evaluation import run_task
  from diffaug_jax.models.classifiers import get_classifier
  module = get_classifier("cnn_small", 10, width=4)
  save_params(tmp_path / "clf.msgpack", fast_init(module, (1, 16, 16, 1)))
  cfg = ml_collections.ConfigDict({
      "task": "pag", "seed": 0, "t": 300, "contrast": True, "percentile": 1.0, "num_images": 3,
      "models": {"m": {"name": "cnn_small", "num_classes": 10, "kwargs": {"width": 4},
                       "params_path": str(tmp_path / "clf.msgpack")}},
      "data": {"source": "digits", "image_size": 16, "channels": 1, "split": "test", "skip": 7}})
  info = run_task(cfg, str(tmp_path / "wd"))
  assert info["columns"] == ["x0", "x_t", "m"] and len(info["labels"]) == 3
  assert os.path.getsize(tmp_path / "wd" / "pag.png") > 0
  assert json.load(open(tmp_path / "wd" / "results.json"))["t"] == 300


def test_partial_logit_fn_passes_weights_as_arguments(tmp_path, monkeypatch):
  """`run` hands pag_figure `Partial(apply, variables)`: same gradients as a closure, but the weights are jit
  arguments, not constants baked into the program."""
  from diffaug_jax.models.classifiers import get_classifier
  module = get_classifier("cnn_small", 10, width=4)
  variables = fast_init(module, (1, 16, 16, 1))
  schedule = diffusion.linear_schedule(1000)
  x0 = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  labels = np.array([2, 5])
  closure = lambda x, t: module.apply(variables, x, train=False)
  partial = jax.tree_util.Partial(functools.partial(pag._apply_eval, module), variables)
  key = jax.random.key(0)
  out = pag.pag_figure(key, x0, labels, {"closure": closure, "partial": partial}, schedule,
                       str(tmp_path / "pag.png"))
  np.testing.assert_allclose(out["partial"], out["closure"], rtol=1e-6, atol=1e-7)
  x_t, tt = jnp.asarray(out["x_t"]), jnp.full((2,), 300, jnp.int32)
  lowered = pag._jit_logit_gradients.lower(partial, x_t, tt, jnp.asarray(labels))
  n_weights = len(jax.tree.leaves(variables))
  assert len(jax.tree.leaves(lowered.args_info)) == n_weights + 3
  # ... and pag_figure sends a Partial to that jit, a closure to the static one.
  used = []
  monkeypatch.setattr(pag, "_jit_logit_gradients", lambda *a: used.append("args") or jnp.zeros(x_t.shape))
  monkeypatch.setattr(pag, "_jit_logit_gradients_static", lambda *a: used.append("static") or jnp.zeros(x_t.shape))
  pag.pag_figure(key, x0, labels, {"closure": closure, "partial": partial}, schedule, str(tmp_path / "p2.png"))
  assert used == ["static", "args"]
