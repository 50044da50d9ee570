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


@pytest.mark.slow  # ~18 s on 2 busy cores: UNet compile + DE over the digits test set
def test_run_de_with_score_model_writes_figures(tmp_path):
  """robustness.run on the real path for `de`: a score model loaded from a params file + UNet preset by
  `loading.load_score`, DE with its cumulative curve, and all three figures (Fig. 1 grid, Fig. 2 entropy
  vs t, DE curve) written and non-empty; the DE ensemble's last cumulative point is the full DE."""
  from diffaug_jax.convert import common
  from diffaug_jax.data.config import digits_config
  from diffaug_jax.models import classifiers
  from diffaug_jax.models.unet import unet_from_preset

  def numpy_init(module, *args):
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: np.ones(x.shape, np.float32) if "var" in str(p[-1]) or "scale" in str(p[-1])
        else (0.1 * rng.standard_normal(x.shape)).astype(np.float32), shapes)

  clf = classifiers.get_classifier("cnn_small", 10, width=4)
  common.save_params(str(tmp_path / "cnn.msgpack"), numpy_init(clf, jnp.zeros((1, 8, 8, 1))))
  unet = unet_from_preset("digits", image_size=8)
  common.save_params(str(tmp_path / "unet.msgpack"),
                     numpy_init(unet, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)))
  c = ml_collections.ConfigDict()
  c.task = "robustness"
  c.models = [dict(name="cnn", arch="cnn_small", num_classes=10, kwargs={"width": 4},
                   params_path=str(tmp_path / "cnn.msgpack"))]
  c.score = dict(params_path=str(tmp_path / "unet.msgpack"), preset="digits", overrides={"image_size": 8})
  c.data = digits_config(image_size=8, channels=1)
  c.batch_size = 200
  c.suites = ml_collections.ConfigDict({"clean": {}})
  c.modes = ("default", "de")
  c.de = dict(ts=(0, 300))
  c.figures = dict(augmentation_grid=True, num_images=3, entropy_vs_t=True, entropy_ts=(0, 500),
                   entropy_batches=1)
  out = str(tmp_path / "eval")
  res = evaluation.run_task(c, out)
  de = res["models"]["cnn"]["clean"]["sets"]["test"]["de"]
  assert de["ts"] == [0, 300] and de["cumulative"][-1] == de["accuracy"]
  assert de["members"][0] == res["models"]["cnn"]["clean"]["sets"]["test"]["default"]["accuracy"]
  for f in ("de_curve.png", "diffaug_grid.png", "entropy_vs_t.png"):
    with open(os.path.join(out, f), "rb") as fh:
      assert fh.read(8).startswith(b"\x89PNG"), f
    assert os.path.getsize(os.path.join(out, f)) > 1000, f
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved["entropy_vs_t"]["cnn"]["ts"] == [0, 500]
  assert "Clean DE" in open(os.path.join(out, "results.md")).read()


@pytest.mark.parametrize("arg", [None, "imagenet"])
def test_issue6_configs_build_with_reference_defaults(arg):
  """The certify / ood / pag / da_classifier configs load, name a known task, and carry REFERENCE.md's
  defaults (sigmas {0.25, 0.5, 1}, n0 = 100, alpha = 0.001; ReAct/ASH 90, SCALE 85; PAG t = 300)."""
  cert = _load_config("eval_certify", arg)
  assert cert.task in evaluation.TASKS and tuple(cert.sigmas) == (0.25, 0.5, 1.0)
  assert cert.n0 == 100 and cert.alpha == 0.001 and cert.n >= 1000 and cert.denoise
  if arg == "imagenet":
    assert cert.n == 10_000 and cert.score.preset == "adm_256_uncond"
  ood = _load_config("eval_ood", arg)
  assert ood.task in evaluation.TASKS
  assert (ood.react_percentile, ood.ash_percentile, ood.scale_percentile) == (90.0, 90.0, 85.0)
  assert {"msp", "react", "ash_b", "scale"} <= set(ood.methods)
  if arg == "imagenet":  # OpenOOD v1.5's lists under one --config.openood_dir
    ood.openood_dir = "/o/data"
    lists = "/o/data/benchmark_imglist/imagenet/"
    assert (ood.id_data.source, ood.id_data.data_dir) == ("list", "/o/data/images_largescale")
    assert (ood.id_data.eval_split, ood.react_data.eval_split) == (lists + "test_imagenet.txt",
                                                                 lists + "val_imagenet.txt")
    assert ood.ood_data.ninco.eval_split == lists + "test_ninco.txt" and ood.ood_data.ssb_hard.source == "list"
    from diffaug_jax.evaluation import ood as ood_task
    with pytest.raises(ValueError, match="set --config.openood_dir"):
      ood_task.run(_load_config("eval_ood", arg), "/nonexistent/never_written")
  pag = _load_config("eval_pag", arg)
  assert pag.task in evaluation.TASKS and pag.get("t", 300) == 300
  if arg is None:
    for a in (None, "smoke"):
      assert _load_config("da_classifier_digits", a).task in evaluation.TASKS


def test_evaluate_py_cli(tmp_path):
  """`python evaluate.py --config <file> --workdir DIR` (absl flags, XLA flags, distributed init, task
  dispatch) writes the task's outputs: the pag task on digits with a converted-params classifier."""
  import subprocess
  import sys
  from diffaug_jax.convert import common
  from diffaug_jax.models import classifiers
  module = classifiers.get_classifier("cnn_small", 10, width=4)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  rng = np.random.default_rng(0)
  common.save_params(str(tmp_path / "cnn.msgpack"), jax.tree_util.tree_map_with_path(
      lambda p, x: np.ones(x.shape, np.float32) if "var" in str(p[-1])
      else (0.3 * rng.standard_normal(x.shape)).astype(np.float32), shapes))
  (tmp_path / "cfg.py").write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.task, c.seed, c.t, c.num_images = 'pag', 0, 300, 2\n"
      f"  c.models = {{'m': dict(name='cnn_small', num_classes=10, kwargs={{'width': 4}}, "
      f"params_path={str(tmp_path / 'cnn.msgpack')!r})}}\n"
      "  c.data = dict(source='digits', image_size=16, channels=1, split='test', skip=3)\n"
      "  return c\n")
  out = tmp_path / "wd"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), f"--config={tmp_path / 'cfg.py'}",
                         f"--workdir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.getsize(out / "pag.png") > 0
  assert json.load(open(out / "results.json"))["columns"] == ["x0", "x_t", "m"]


@pytest.mark.parametrize("name", ["eval_digits", "eval_cifar10", "eval_imagenet"])
def test_models_can_be_replaced_from_the_command_line(name):
  """The docstrings' `--config.models=...` override must parse (ml_collections cannot override lists)."""
  import subprocess
  import sys
  script = ("from absl import app\n"
            "from ml_collections import config_flags\n"
            "C = config_flags.DEFINE_config_file('config', None, '', lock_config=False)\n"
            "app.run(lambda _: print([m['name'] for m in C.value.models]))\n")
  out = subprocess.run(
      [sys.executable, "-c", script, f"--config={os.path.join(REPO, 'configs', name + '.py')}",
       "--config.models=({'name': 'X', 'workdir': 'runs/x'}, {'name': 'Y', 'workdir': 'runs/y'})"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "['X', 'Y']"


def test_only_process_0_writes_outputs(tmp_path, monkeypatch):
  """Every process holds the same gathered results; only process 0 writes them (no races on shared storage)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from diffaug_jax.evaluation import figures, loading, pag

  def write_all(d):
    d.mkdir()
    loading.write_results(str(d), {"a": 1}, "# a\n")
    loading.write_json(str(d / "x.json"), {"b": 2})
    loading.write_rows([{"index": 0, "label": 1, "prediction": 1, "radius": 0.5, "correct": 1, "seconds": 0.1}],
                       str(d / "rows.tsv"))
    figures._save(plt.figure(), str(d / "f.png"))  # pylint: disable=protected-access
    pag.save_grid(str(d / "g.png"), [np.zeros((2, 4, 4, 3))])
    return sorted(p.name for p in d.iterdir())

  assert write_all(tmp_path / "p0") == ["f.png", "g.png", "results.json", "results.md", "rows.tsv", "x.json"]
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert write_all(tmp_path / "p1") == []


def test_score_params_file_is_checked_against_its_preset(tmp_path):
  """A params file + preset is checked key by key before anything runs: a class-conditional model's
  label_emb under an unconditional preset, or a missing key, is an error (not ignored or a jit-time crash);
  a workdir AND a params file is ambiguous."""
  from flax import traverse_util
  from diffaug_jax import checkpoint
  from diffaug_jax.convert import common
  from diffaug_jax.models.unet import unet_from_preset
  unet = unet_from_preset("digits", image_size=8)
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                        jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                       jnp.zeros((1,), jnp.int32)))["params"]
  common.save_params(str(tmp_path / "ok.msgpack"), {"params": params})
  module, got = checkpoint.load_score_model(params_path=str(tmp_path / "ok.msgpack"), preset="digits",
                                            overrides={"image_size": 8})
  assert module.image_size == 8 and jax.tree.structure(got) == jax.tree.structure(params)
  flat = traverse_util.flatten_dict(params)
  extra = {**flat, ("label_emb", "embedding"): np.zeros((10, 4), np.float32)}
  common.save_params(str(tmp_path / "extra.msgpack"), {"params": traverse_util.unflatten_dict(extra)})
  with pytest.raises(common.CheckpointMismatchError, match="label_emb/embedding"):
    checkpoint.load_score_model(params_path=str(tmp_path / "extra.msgpack"), preset="digits",
                                overrides={"image_size": 8})
  fewer = {k: v for k, v in flat.items() if k[0] != "out_2"}
  common.save_params(str(tmp_path / "fewer.msgpack"), {"params": traverse_util.unflatten_dict(fewer)})
  with pytest.raises(common.CheckpointMismatchError, match="out_2"):
    checkpoint.load_score_model(params_path=str(tmp_path / "fewer.msgpack"), preset="digits",
                                overrides={"image_size": 8})
  with pytest.raises(ValueError, match="both a workdir"):
    checkpoint.load_score_model(workdir=str(tmp_path), params_path=str(tmp_path / "ok.msgpack"), preset="digits")
  # A released checkpoint's preset names its schedule: improved-diffusion's CIFAR-10 model under the linear
  # 1000-step default would read t / 4 of a cosine 4000-step schedule, silently.
  with pytest.raises(ValueError, match="'iddpm_cifar10' was trained with the cosine schedule over 4000 steps"):
    checkpoint.load_score_model(params_path=str(tmp_path / "ok.msgpack"), preset="iddpm_cifar10",
                                schedule=("linear", 1000))
  with pytest.raises(ValueError, match="'adm_256_uncond' was trained with the linear schedule over 1000"):
    checkpoint.load_score_model(params_path=str(tmp_path / "ok.msgpack"), preset="adm_256_uncond",
                                schedule=("cosine", 1000))


def test_misspelled_model_spec_keys_are_errors():
  """`setp` for `step` would silently evaluate the latest checkpoint: unknown keys are refused."""
  from diffaug_jax.evaluation import loading
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['setp'\]"):
    loading.load_classifier({"workdir": "runs/x", "setp": 500})
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['presett'\]"):
    loading.load_score({"params_path": "x.msgpack", "presett": "adm_256_uncond"})


def test_params_file_classifier_is_checked_against_its_spec(tmp_path):
  from diffaug_jax.convert import common
  from diffaug_jax.evaluation import loading
  from diffaug_jax.models import classifiers
  module = classifiers.get_classifier("cnn_small", 10, width=4)
  common.save_params(str(tmp_path / "c.msgpack"),
                     jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                  jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))))
  spec = {"arch": "cnn_small", "num_classes": 10, "kwargs": {"width": 4}, "params_path": str(tmp_path / "c.msgpack")}
  data = {"image_size": 8, "channels": 1}
  loading.load_classifier(spec, data_cfg=data)
  with pytest.raises(ValueError, match=r"does not fit the model: shape .*\(10,\) \(model: \(5,\)\)"):
    loading.load_classifier(dict(spec, num_classes=5), data_cfg=data)


def test_classifier_with_other_classes_than_the_data_is_refused(tmp_path):
  """A 4-way classifier on 10-class digits would run and report a silently wrong accuracy."""
  import ml_collections
  from diffaug_jax.convert import common
  from diffaug_jax.evaluation import loading
  from diffaug_jax.models import classifiers
  data = ml_collections.ConfigDict(dict(source="digits", image_size=16, channels=1))
  for k in (4, 10):
    module = classifiers.get_classifier("cnn_small", k, width=4)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    common.save_params(str(tmp_path / f"cnn{k}.msgpack"), jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes))
    spec = dict(name="cnn_small", num_classes=k, kwargs={"width": 4}, params_path=str(tmp_path / f"cnn{k}.msgpack"))
    if k == 4:
      with pytest.raises(ValueError, match="has 4 outputs but the evaluation data has 10 classes"):
        loading.load_classifier(spec, data_cfg=data)
    else:
      loading.load_classifier(spec, data_cfg=data)
  # An eval-only image tree (no train split) numbers its own folders: right only if it has all 10 classes. With
  # 2 of them its labels 0, 1 are not the classifier's: refused, unless data.class_names says which they are.
  from PIL import Image
  for c in ("cat", "dog"):
    (tmp_path / "evalonly" / "val" / c).mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "evalonly" / "val" / c / "x.png")
  folder = ml_collections.ConfigDict(dict(source="folder", data_dir=str(tmp_path / "evalonly"), eval_split="val",
                                          image_size=16, channels=1))
  with pytest.raises(ValueError, match=r"2 class folders would be labelled 0..1 .* 10 outputs.*data.class_names"):
    loading.load_classifier(spec, data_cfg=folder)
  folder.class_names = "ant,bee,cat,cow,dog,eel,elk,emu,fox,gnu"
  loading.load_classifier(spec, data_cfg=folder)
  for c in [f"c{i}" for i in range(8)]:  # all 10 classes: labelled by their sorted order, as the train split was
    (tmp_path / "evalonly" / "val" / c).mkdir()
  folder.class_names = ""
  loading.load_classifier(spec, data_cfg=folder)
  numeric = ml_collections.ConfigDict(dict(folder.to_dict(), data_dir=str(tmp_path / "numeric")))
  for c in ("3", "7"):  # class-index folders label int(name): a subset is right, an index past the outputs not
    (tmp_path / "numeric" / "val" / c).mkdir(parents=True)
  loading.load_classifier(spec, data_cfg=numeric)
  (tmp_path / "numeric" / "val" / "10").mkdir()
  with pytest.raises(ValueError, match="class folders up to 10"):
    loading.load_classifier(spec, data_cfg=numeric)


def test_results_files_are_written_whole_or_not_at_all(tmp_path):
  """A value json cannot encode (or a stop mid-write) leaves the previous results.json as it was."""
  from diffaug_jax.evaluation import loading
  path = str(tmp_path / "results.json")
  loading.write_json(path, {"accuracy": 0.5})
  with pytest.raises(TypeError):
    loading.write_json(path, {"accuracy": object()})
  assert json.load(open(path)) == {"accuracy": 0.5}
  assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def _pag_config(params_path, t):
  c = ml_collections.ConfigDict()
  c.task, c.seed, c.t, c.num_images = "pag", 0, t, 2
  c.models = {"m": dict(name="cnn_small", num_classes=10, kwargs={"width": 4}, params_path=str(params_path))}
  c.data = dict(source="digits", image_size=16, channels=1, split="test", skip=50)
  return c


def _save_cnn(path):
  from diffaug_jax.convert import common
  from diffaug_jax.models import classifiers
  module = classifiers.get_classifier("cnn_small", 10, width=4)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  common.save_params(str(path), jax.tree.map(lambda s: np.full(s.shape, 0.1, s.dtype), shapes))


def test_earlier_evaluation_outputs_are_set_aside(tmp_path, capsys):
  """A second evaluation into a workdir moves the first one's outputs to earlier/1/ (a third: earlier/2/,
  earlier/1/ untouched); a fresh workdir gets no earlier/; a training run's files in the workdir stay."""
  _save_cnn(tmp_path / "cnn.msgpack")
  wd = tmp_path / "wd"
  outputs = ["pag.json", "pag.png", "results.json", "results.md"]

  evaluation.run_task(_pag_config(tmp_path / "cnn.msgpack", 300), str(wd))
  assert sorted(os.listdir(wd)) == outputs  # fresh workdir: nothing set aside
  assert "earlier" not in capsys.readouterr().out
  first = (wd / "results.json").read_text()
  assert json.loads(first)["t"] == 300
  # The workdir is also a training run's (evaluated into by mistake or on purpose): its files are not outputs.
  (wd / "config.json").write_text("{}")
  (wd / "metrics.jsonl").write_text("{}\n")
  (wd / "checkpoints" / "5").mkdir(parents=True)

  evaluation.run_task(_pag_config(tmp_path / "cnn.msgpack", 200), str(wd))
  assert f"moved to {wd / 'earlier' / '1'}" in capsys.readouterr().out
  assert sorted(os.listdir(wd / "earlier" / "1")) == outputs
  assert (wd / "earlier" / "1" / "results.json").read_text() == first
  assert json.load(open(wd / "results.json"))["t"] == 200
  assert sorted(os.listdir(wd)) == ["checkpoints", "config.json", "earlier", "metrics.jsonl"] + outputs
  second = (wd / "results.json").read_text()

  evaluation.run_task(_pag_config(tmp_path / "cnn.msgpack", 100), str(wd))
  assert sorted(os.listdir(wd / "earlier")) == ["1", "2"]
  assert (wd / "earlier" / "1" / "results.json").read_text() == first
  assert (wd / "earlier" / "2" / "results.json").read_text() == second
  assert json.load(open(wd / "results.json"))["t"] == 100


def test_set_aside_keeps_what_the_evaluation_reads(tmp_path, monkeypatch):
  """Files the new config names (a da_classifier run's classifier, evaluated by the next task) stay with
  their sha256 sidecar; everything else an evaluation wrote moves; other processes move nothing; a
  workdir that is a file is a clear error."""
  from diffaug_jax.evaluation import loading
  wd = tmp_path / "wd"
  wd.mkdir()
  written = ["certify_sigma0.25.tsv", "da_classifier.json", "da_classifier.msgpack", "da_classifier.msgpack.sha256",
             "guided_ddim_da.png", "noisy_classifier.msgpack", "noisy_classifier.msgpack.sha256", "results.json",
             "results.md"]
  for name in written + ["config.json", "notes.txt"]:
    (wd / name).write_text(name)
  (wd / "earlier" / "7").mkdir(parents=True)  # numbering continues above the highest set
  config = ml_collections.ConfigDict({"models": {"noisy": {"params_path": str(wd / "noisy_classifier.msgpack")}}})
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert loading.set_aside_earlier_outputs(str(wd), config) is None
  monkeypatch.undo()
  assert loading.set_aside_earlier_outputs(str(wd), config) == str(wd / "earlier" / "8")
  assert sorted(os.listdir(wd / "earlier" / "8")) == [n for n in written if not n.startswith("noisy")]
  assert sorted(os.listdir(wd)) == ["config.json", "earlier", "noisy_classifier.msgpack",
                                    "noisy_classifier.msgpack.sha256", "notes.txt"]
  assert loading.set_aside_earlier_outputs(str(wd), config) is None  # nothing left to set aside
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    evaluation.run_task(_pag_config(tmp_path / "cnn.msgpack", 300), str(tmp_path / "afile"))
  with pytest.raises(ValueError, match="is a URL"):
    evaluation.run_task(_pag_config(tmp_path / "cnn.msgpack", 300), "gs://bucket/eval")


def test_output_file_list_covers_every_task():
  """loading.OUTPUT_FILES (what a set-aside moves) names every file a task module writes into its workdir
  (a new f-string name must be added to `samples` here, and its pattern to OUTPUT_FILES)."""
  import fnmatch
  import re
  from diffaug_jax.evaluation import loading
  samples = {"certify_sigmaX.tsv": ["certify_sigma0.25.tsv", "certify_sigma1.tsv"],
             "X_classifier.msgpack": ["noisy_classifier.msgpack", "da_classifier.msgpack",
                                      "noisy_classifier.msgpack.sha256", "da_classifier.msgpack.sha256"],
             "guided_X_X.png": ["guided_ddpm_unguided.png", "guided_ddim_da.png"]}
  found = set()
  for name in evaluation.TASKS + ("loading",):
    src = open(os.path.join(REPO, "diffaug_jax", "evaluation", f"{name}.py")).read()
    for m in re.finditer(r"os\.path\.join\(workdir, f?\"([^\"]+)\"\)", src):
      found.add(re.sub(r"\{[^}]*\}", "X", m.group(1)))
  assert {"results.json", "de_curve.png", "certify_sigmaX.tsv", "ood.json", "pag.png", "guided_X_X.png"} <= found
  for f in sorted(found):
    for concrete in samples[f] if "X" in f else [f]:
      assert any(fnmatch.fnmatchcase(concrete, p) for p in loading.OUTPUT_FILES), concrete
