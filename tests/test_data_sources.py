"""Sources: digits split, image folders (corrupt file counted + named), clear errors for bad paths/names."""
import os

import numpy as np
import pytest
from PIL import Image

from diffaug_jax.data import config as data_config
from diffaug_jax.data import sources


def make_folder(root, *, corrupt=True):
  """root/{cat,dog}/ with PNG + JPEG (+ a grayscale PNG, + one corrupt .jpg)."""
  rng = np.random.default_rng(0)
  os.makedirs(root / "cat")
  os.makedirs(root / "dog")
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / "cat" / f"c{i}.png")
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / "dog" / f"d{i}.JPEG")
  Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "dog" / "gray.png")
  (root / "dog" / "notes.txt").write_text("not an image")
  if corrupt:
    (root / "cat" / "c1_broken.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
  return root


def test_digits_split_and_shapes():
  tr = sources.DigitsSource("train", image_size=16, channels=1)
  te = sources.DigitsSource("test", image_size=32, channels=3)
  assert (len(tr), len(te)) == (1433, 364)
  assert tr[0]["image"].shape == (16, 16, 1) and te[0]["image"].shape == (32, 32, 3)
  assert tr[0]["image"].dtype == np.uint8 and te.images.max() > 200
  assert sorted(set(te.labels.tolist())) == list(range(10))
  assert len(tr) + len(te) == 1797  # every digit in exactly one split
  # Deterministic: a second construction gives the same images.
  te8 = sources.DigitsSource("test", image_size=8)
  again = sources.DigitsSource("test", image_size=8)
  np.testing.assert_array_equal(te8.images, again.images)
  with pytest.raises(ValueError, match="split"):
    sources.DigitsSource("validation")


def test_folder_source_labels_and_corrupt_file(tmp_path, caplog):
  root = make_folder(tmp_path / "imgs")
  src = sources.FolderSource(str(root), channels=3)
  assert src.class_names == ["cat", "dog"] and len(src) == 8  # .txt ignored
  names = [os.path.basename(f) for f in src.files]
  bad = names.index("c1_broken.jpg")
  out = [src[i] for i in range(len(src))]  # no crash
  assert all(o["image"].ndim == 3 and o["image"].shape[-1] == 3 and o["image"].dtype == np.uint8
             for o in out)
  assert src.num_bad == 1 and src.bad_files == [src.files[bad]]
  assert "c1_broken.jpg" in caplog.text
  # Replaced deterministically by the next readable example.
  np.testing.assert_array_equal(out[bad]["image"], out[bad + 1]["image"])
  assert [o["label"] for o in out] == [0, 0, 0, 0, 1, 1, 1, 1]
  assert src.verify() == [src.files[bad]]
  gray = sources.FolderSource(str(root), channels=1)[names.index("gray.png")]["image"]
  assert gray.shape == (16, 16, 1)


def test_folder_follows_linked_sub_folders(tmp_path):
  """A symlinked directory inside a class folder is read, as torchvision's ImageFolder reads it."""
  root = make_folder(tmp_path / "imgs", corrupt=False)
  make_folder(tmp_path / "more", corrupt=False)
  os.symlink(tmp_path / "more" / "dog", root / "dog" / "linked")
  src = sources.FolderSource(str(root), channels=3)
  linked = [f for f in src.files if os.sep + "linked" + os.sep in f]
  assert len(linked) == 4 and len(src) == 11 and src.labels[src.files.index(linked[0])] == 1


def test_folder_class_names_subset(tmp_path):
  root = make_folder(tmp_path / "imgs", corrupt=False)
  src = sources.FolderSource(str(root), class_names=["ant", "cat", "bee", "dog"])
  assert sorted(set(src.labels.tolist())) == [1, 3]
  with pytest.raises(ValueError, match="not in class_names"):
    sources.FolderSource(str(root), class_names="cat,bee")
  # ImageNet-V2 layout: folders named by class index -> label int(name), not the lexicographic rank.
  for d in ("0", "2", "10"):
    (tmp_path / "v2" / d).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "v2" / d / "x.png")
  v2 = sources.FolderSource(str(tmp_path / "v2"), class_names="imagenet2012")
  assert v2.labels.tolist() == [0, 10, 2] and v2.num_classes == 1000
  assert sources.FolderSource(str(tmp_path / "v2")).num_classes == 11
  wnids = sources.imagenet_class_names()
  assert len(wnids) == 1000 and wnids[0] == "n01440764" and wnids == sorted(wnids)


def test_folder_errors_name_the_path(tmp_path):
  missing = tmp_path / "no_such_dir"
  with pytest.raises(FileNotFoundError, match="no_such_dir.*class sub-folders"):
    sources.FolderSource(str(missing))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty.*no class sub-folders"):
    sources.FolderSource(str(tmp_path / "empty"))
  (tmp_path / "noimg" / "a").mkdir(parents=True)
  (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
  with pytest.raises(ValueError, match="noimg.*contains no images"):
    sources.FolderSource(str(tmp_path / "noimg"))


def test_tfds_errors_say_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_dataset_xyz'"):
    sources.TfdsSource("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"cifar10.*python -m diffaug_jax.data.prepare cifar10"):
    sources.TfdsSource("cifar10", "train", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="manual"):
    sources.TfdsSource("imagenet2012", "train", data_dir=str(tmp_path / "nope"))


def test_num_classes_and_image_shape(tmp_path):
  make_folder(tmp_path / "imgs", corrupt=False)
  cfg = data_config.default_config()
  assert data_config.num_classes(cfg) == 10 and data_config.image_shape(cfg) == (16, 16, 1)
  cfg.update(dict(source="folder", data_dir=str(tmp_path), train_split="imgs"))
  assert data_config.num_classes(cfg) == 2
  cfg.class_names = "imagenet2012"
  assert data_config.num_classes(cfg) == 1000
  cfg.source = "bogus"
  with pytest.raises(ValueError, match="data.source"):
    data_config.validate(cfg)


def test_folder_split_that_is_not_a_sub_folder_names_the_field(tmp_path):
  from diffaug_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  make_folder(tmp_path / "train", corrupt=False)
  make_folder(tmp_path / "val", corrupt=False)
  cfg = data_config.imagenet_config(data_dir=str(tmp_path), source="tfds")
  cfg.source = "folder"  # the TFDS split name "validation" stays: the tree's folder is "val"
  cfg.class_names = ""
  assert len(pipeline.make_source(cfg, cfg.train_split)) == 7
  with pytest.raises(FileNotFoundError, match=r"data.eval_split='validation'.*\['train', 'val'\].*"
                                              r"--config.data.eval_split="):
    pipeline.make_source(cfg, cfg.eval_split)
  cfg.eval_split = "val"
  assert len(pipeline.make_source(cfg, cfg.eval_split)) == 7


def test_tfds_data_dir_with_tilde_is_expanded(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "tfds").mkdir()
  with tfds.testing.mock_data(num_examples=4):
    src = sources.TfdsSource("cifar10", "train", data_dir="~/tfds")
  assert src.data_dir == str(tmp_path / "tfds") and len(src) == 4


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
  """A 16-bit PNG ("I;16") or 32-bit-integer TIFF ("I") holding 16-bit values reads as value >> 8 (30000 ->
  117), for 1 and 3 channels; PIL's convert clipped it to 255 (a white image)."""
  (tmp_path / "imgs" / "a").mkdir(parents=True)
  a = np.array([[0, 255, 256, 30000], [65535, 1000, 40000, 512]], np.uint16)
  Image.fromarray(a).save(tmp_path / "imgs" / "a" / "x16.png")
  Image.fromarray(a.astype(np.int32)).save(tmp_path / "imgs" / "a" / "xi.tif")
  assert Image.open(tmp_path / "imgs" / "a" / "x16.png").mode.startswith("I;16")
  assert Image.open(tmp_path / "imgs" / "a" / "xi.tif").mode == "I"
  want = (a >> 8).astype(np.uint8)
  assert want[0, 3] == 117
  for channels in (1, 3):
    src = sources.FolderSource(str(tmp_path / "imgs"), channels=channels)
    for i in range(len(src)):
      got = src[i]["image"]
      assert got.shape == (2, 4, channels) and got.dtype == np.uint8
      np.testing.assert_array_equal(got, np.repeat(want[..., None], channels, axis=-1), err_msg=src.files[i])
    assert src.num_bad == 0
  # Values no 16-bit scale fits: the file is reported unreadable (named), not clipped to white.
  Image.fromarray(np.full((2, 2), 70000, np.int32)).save(tmp_path / "imgs" / "a" / "z_big.tif")
  src = sources.FolderSource(str(tmp_path / "imgs"), channels=1)
  assert src.load_or_none(src.files.index(str(tmp_path / "imgs" / "a" / "z_big.tif"))) is None
  assert src.bad_files == [str(tmp_path / "imgs" / "a" / "z_big.tif")]
  # A 32-bit-integer image holding 8-bit values stays as it is (PIL reads those right), not shifted to black.
  (tmp_path / "eight" / "a").mkdir(parents=True)
  Image.fromarray(np.array([[0, 128, 255, 200]], np.int32)).save(tmp_path / "eight" / "a" / "x8.tif")
  got = sources.FolderSource(str(tmp_path / "eight"), channels=1)[0]["image"]
  np.testing.assert_array_equal(got[..., 0], [[0, 128, 255, 200]])


def _folder_split(root, classes):
  for c in classes:
    (root / c).mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(root / c / "x.png")


def test_eval_split_is_labelled_with_the_train_classes(tmp_path):
  """train/{cat,dog,frog}, val/{cat,frog}: val's frog is label 2 (train's numbering), not 1 (train's dog)."""
  from diffaug_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _folder_split(tmp_path / "train", ["cat", "dog", "frog"])
  _folder_split(tmp_path / "val", ["cat", "frog"])
  cfg = data_config.default_config()
  cfg.update(dict(source="folder", data_dir=str(tmp_path), train_split="train", eval_split="val",
                  image_size=4, channels=3))
  val = pipeline.make_source(cfg, "val")
  assert val.labels.tolist() == [0, 2] and val.class_names == ["cat", "dog", "frog"]
  assert pipeline.make_source(cfg, "train").labels.tolist() == [0, 1, 2]
  assert data_config.num_classes(cfg) == 3
  assert [int(lab) for b in pipeline.make_eval_loader(cfg, global_batch_size=2) for lab in b["label"]] == [0, 2]
  # A class the train split lacks has no label: an error naming it and the train folder.
  _folder_split(tmp_path / "val", ["bird"])
  with pytest.raises(ValueError, match=r"\['bird'\].*train split's classes.*" + str(tmp_path / "train")):
    pipeline.make_source(cfg, "val")
  # An explicit class list still wins; an eval-only tree (no train folder) still labels itself.
  cfg.class_names = "bird,cat,dog,frog"
  assert pipeline.make_source(cfg, "val").labels.tolist() == [0, 1, 3]
  cfg.class_names, cfg.train_split = "", "no_train_here"
  assert pipeline.make_source(cfg, "val").labels.tolist() == [0, 1, 2]


def test_numeric_class_folders_keep_int_labels_across_splits(tmp_path):
  from diffaug_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _folder_split(tmp_path / "train", ["0", "1", "2", "10"])
  _folder_split(tmp_path / "val", ["2", "10"])
  cfg = data_config.default_config()
  cfg.update(dict(source="folder", data_dir=str(tmp_path), train_split="train", eval_split="val",
                  image_size=4, channels=3))
  assert pipeline.make_source(cfg, "train").labels.tolist() == [0, 1, 10, 2]  # sorted as strings, int labels
  val = pipeline.make_source(cfg, "val")
  assert val.labels.tolist() == [10, 2] and val.num_classes == data_config.num_classes(cfg) == 11
  _folder_split(tmp_path / "val", ["11"])
  with pytest.raises(ValueError, match="numeric class folder 11 >= the 11 names of the train split's"):
    pipeline.make_source(cfg, "val")


def test_train_py_shows_unreadable_image_warnings(tmp_path):
  """train.py silences absl/orbax below ERROR, but the data sources' report of an unreadable image (the only
  one, with num_workers=0) still reaches stderr."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = make_folder(tmp_path / "imgs")
  code = ("import runpy, sys; from absl import logging; from diffaug_jax import trainer; from diffaug_jax.data "
          "import sources\n"
          "def fake(*a, **k):\n"
          "  logging.warning('third-party chatter')\n"
          f"  src = sources.FolderSource({str(root)!r})\n"
          "  [src[i] for i in range(len(src))]\n"
          "  return {}\n"
          "trainer.train_and_evaluate = fake\n"
          "sys.argv = ['train.py', '--config', 'configs/cifar10_resnet18.py:baseline', "
          f"'--workdir', {str(tmp_path / 'run')!r}]\n"
          "runpy.run_path('train.py', run_name='__main__')")
  repo = pathlib.Path(__file__).resolve().parents[1]
  run = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "unreadable image" in run.stderr and "c1_broken.jpg" in run.stderr, run.stderr
  assert "third-party chatter" not in run.stderr


def test_list_source_reads_openood_image_lists(tmp_path):
  """OpenOOD's benchmark_imglist format ("relative/path label" lines under an image root) is how its v1.5
  protocol splits ImageNet val into the scored ID set and the ReAct-tuning one: read as a source."""
  import ml_collections
  from diffaug_jax.data import config as data_config
  from diffaug_jax.evaluation import loading
  make_folder(tmp_path / "images" / "ds", corrupt=False)
  lst = tmp_path / "test_ds.txt"
  lst.write_text("ds/cat/c0.png 3\nds/dog/d1.JPEG 7\n\nds/dog/gray.png\n")  # no label: an OOD line, -1
  src = sources.ListSource(str(lst), str(tmp_path / "images"), channels=3)
  assert len(src) == 3 and src.labels.tolist() == [3, 7, -1] and src.num_classes == 8
  assert src[1]["image"].shape == (24, 20, 3) and src[2]["image"].shape == (16, 16, 3)
  cfg = ml_collections.ConfigDict(dict(source="list", data_dir=str(tmp_path / "images"), eval_split=str(lst),
                                       train_split=str(lst), image_size=16, channels=3, eval_transform="none"))
  batches = list(loading.iterate_batches(cfg, 4))
  assert len(batches) == 1 and batches[0]["image"].shape == (4, 16, 16, 3)
  assert batches[0]["label"].tolist()[:3] == [3, 7, -1] and batches[0]["mask"].tolist() == [1, 1, 1, 0]
  assert data_config.num_classes(loading.data_config(cfg)) == 8
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.ListSource(str(tmp_path / "missing.txt"), str(tmp_path / "images"))
  with pytest.raises(FileNotFoundError, match="relative to data.data_dir"):
    sources.ListSource(str(lst), str(tmp_path))  # the wrong root
  (tmp_path / "bad.txt").write_text("ds/cat/c0.png 3\nds/cat/c1.png cat\n")
  with pytest.raises(ValueError, match=r"bad.txt:2: expected 'relative/path \[integer label\]'"):
    sources.ListSource(str(tmp_path / "bad.txt"), str(tmp_path / "images"))
