"""evaluate.py plumbing: task dispatch, the eval configs, and robustness.run end to end on digits
(a random cnn_small from a converted-params file, Default mode; ~10 s)."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffaug_jax import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_dispatch_errors(monkeypatch):
  with pytest.raises(ValueError, match="unknown evaluation task 'nope'"):
    evaluation.get_task("nope")
  monkeypatch.setattr(evaluation, "TASKS", evaluation.TASKS + ("not_written_yet",))
  with pytest.raises(ValueError, match="not_written_yet.py is missing"):
    evaluation.get_task("not_written_yet")
  assert evaluation.get_task("robustness").run is not None


@pytest.mark.parametrize("name,arg", [("eval_digits", None), ("eval_digits", "full"), ("eval_cifar10", None),
                                      ("eval_imagenet", None), ("eval_imagenet", "dda")])
def test_configs_build(name, arg):
  c = _load_config(name, arg)
  assert c.task == "robustness" and c.models and c.modes
  from diffaug_jax.evaluation import suites
  for s, opts in c.suites.items():
    opts = dict(opts)
    if opts.get("source") == "folder":
      continue
    assert suites.expand_suite(s, opts)


def test_run_end_to_end_digits(tmp_path):
  from diffaug_jax.convert import common
  from diffaug_jax.data.config import digits_config
  from diffaug_jax.models import classifiers
  module = classifiers.get_classifier("cnn_small", 10)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False)
  path = str(tmp_path / "cnn.msgpack")
  common.save_params(path, jax.tree.map(np.asarray, variables))
  c = ml_collections.ConfigDict()
  c.task = "robustness"
  c.models = [dict(name="cnn", arch="cnn_small", num_classes=10, params_path=path)]
  c.data = digits_config(image_size=16, channels=1)
  c.batch_size = 128
  c.suites = ml_collections.ConfigDict({"clean": {}, "corrupted": dict(corruptions=("contrast",),
                                                                        severities=(5,))})
  c.modes = ("default",)
  out = str(tmp_path / "eval")
  res = evaluation.run_task(c, out)
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  acc = saved["models"]["cnn"]["clean"]["summary"]["default"]["accuracy"]
  assert 0.0 <= acc <= 1.0 and saved["models"]["cnn"]["clean"]["sets"]["test"]["default"]["n"] > 300
  assert res["models"]["cnn"]["corrupted"]["sets"]["contrast/5"]["default"]["n"] > 300
  md = open(os.path.join(out, "results.md")).read()
  assert "| cnn |" in md and "Corrupted Def" in md
