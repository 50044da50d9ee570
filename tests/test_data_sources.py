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
