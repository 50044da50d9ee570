"""Random-access image sources: `len(src)` and `src[i] -> {"image": uint8 (H, W, C), "label": int}`.

- `DigitsSource`: scikit-learn's bundled 8x8 digits (offline), split deterministically, upsampled.
- `FolderSource`: class sub-folders of JPEG/PNG files (ImageNet layout), decoded with PIL.
- `TfdsSource`: a prepared TFDS dataset read with `tfds.data_source` (no TensorFlow needed to read).

Unreadable examples never stop an epoch: `_RobustSource.__getitem__` logs the file name, counts it (`num_bad` =
failed reads, `bad_files` = unique names) and deterministically returns the next readable example instead
(training); evaluation reads with `load_or_none` and leaves the example out (mask 0). The counters live in the
process that read the example (with grain workers > 0 that is a worker process: the log line is the report
there; `FolderSource.verify()` scans every file up front when a full list is wanted).

Construction fails early (before any compile) on a missing path, an empty dataset or an unknown /
unprepared TFDS dataset, naming the path / name and how to fix it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

PREPARE_HINT = (
    "Prepare it once (needs TensorFlow, only for this step): `pip install diffaug_jax[prepare]` then "
    "`python -m diffaug_jax.data.prepare {name} --data_dir {data_dir}` (writes the array_record format "
    "that tfds.data_source reads).")
IMAGENET_HINT = (
    " ImageNet cannot be downloaded automatically: download ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar from https://image-net.org into a manual dir and pass "
    "`--manual_dir DIR` to the prepare command (or point source='folder' at an extracted "
    "train/<wnid>/*.JPEG tree).")


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8 (H, W), (H, W, 1|3|4) -> uint8 (H, W, channels); RGB -> L uses PIL's ITU-R 601 luma."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype} with shape {image.shape}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
  c = image.shape[-1]
  if c == 4:
    image, c = image[..., :3], 3
  if c == channels:
    return image
  if c == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if c == 3 and channels == 1:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    return np.asarray(Image.fromarray(image).convert("L"), dtype=np.uint8)[..., None]
  raise ValueError(f"cannot convert an image with {c} channels to {channels}")


class _RobustSource:
  """Base: `_load(i)` may raise; `__getitem__` replaces a failing example by the next readable one."""

  def __init__(self):
    self.num_bad = 0
    self.bad_files: list[str] = []

  def __len__(self) -> int:
    raise NotImplementedError

  def _load(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def _describe(self, index: int) -> str:
    return f"{type(self).__name__}[{index}]"

  def load_or_none(self, index: int, *, instead: str = "skipped") -> dict[str, Any] | None:
    """Example `index`, or None when it cannot be read (logged and counted). Evaluation uses this: an
    unreadable image is left out of the score (mask 0), never replaced by a second copy of another."""
    try:
      return self._load(index)
    except Exception as e:  # pylint: disable=broad-except
      name = self._describe(index)
      self.num_bad += 1
      if name not in self.bad_files:
        self.bad_files.append(name)
      log.warning("unreadable image %s (%s: %s); %s", name, type(e).__name__, e, instead)
      return None

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    index = int(index)
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for a source of {n} examples")
    for k in range(n):
      ex = self.load_or_none((index + k) % n, instead="using the next example instead")
      if ex is not None:
        return ex
    raise RuntimeError(f"no readable example in {self!r} ({n} examples, all failed)")

  # Grain may fetch several indices at once.
  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]


class DigitsSource(_RobustSource):
  """scikit-learn's 1797 bundled 8x8 digits (intensities 0..16), offline.

  Split (deterministic, no RNG): within each class, in file order, every 5th example (positions 0, 5, 10,
  ...) is "test", the rest "train" -> 1433 train / 364 test. Images are scaled to
  uint8 (v * 255 / 16, rounded), bilinearly upsampled to (image_size, image_size) with PIL and repeated to
  `channels` (1 or 3). Label = the digit.
  """

  SPLITS = ("train", "test")

  def __init__(self, split: str = "train", *, image_size: int = 16, channels: int = 1):
    super().__init__()
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    if split not in self.SPLITS:
      raise ValueError(f"digits split must be one of {self.SPLITS}, got {split!r}")
    if channels not in (1, 3):
      raise ValueError(f"digits channels must be 1 or 3, got {channels}")
    if image_size < 8:
      raise ValueError(f"digits image_size must be >= 8, got {image_size}")
    d = load_digits()
    labels = d.target.astype(np.int64)
    is_test = np.zeros(len(labels), bool)
    for c in range(10):
      (idx,) = np.nonzero(labels == c)
      is_test[idx[::5]] = True
    keep = np.nonzero(is_test if split == "test" else ~is_test)[0]
    raw = np.round(d.images[keep] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    if image_size != 8:
      raw = np.stack([
          np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR))
          for im in raw])
    self.images = np.repeat(raw[..., None], channels, axis=-1)
    self.labels = labels[keep]
    self.split = split

  def __len__(self) -> int:
    return len(self.labels)

  def _load(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"DigitsSource(split={self.split!r}, n={len(self)}, shape={self.images.shape[1:]})"


def imagenet_class_names() -> list[str]:
  """The 1000 ImageNet-1k wnids in the standard (sorted) order, read offline from TFDS metadata."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
  with open(path) as f:
    names = [line.strip() for line in f if line.strip()]
  if len(names) != 1000:
    raise ValueError(f"expected 1000 ImageNet wnids in {path}, found {len(names)}")
  return names


def resolve_class_names(class_names: str | Sequence[str] | None) -> list[str] | None:
  """None/"" -> None (sorted sub-folders); "imagenet2012" -> the 1000 wnids; a path to a text file -> one
  name per line; a comma-separated string or a sequence -> that list."""
  if class_names is None or (isinstance(class_names, str) and not class_names.strip()):
    return None
  if isinstance(class_names, str):
    if class_names == "imagenet2012":
      return imagenet_class_names()
    if os.path.isfile(class_names):
      with open(class_names) as f:
        return [line.strip() for line in f if line.strip()]
    return [c.strip() for c in class_names.split(",") if c.strip()]
  return [str(c) for c in class_names]


def to_8bit(img):
  """A PIL image with 16-bit samples ("I;16*", or "I" as 16-bit PNGs may open) -> mode "L", value >> 8 (the
  high byte, as PIL itself reduces 16-bit RGB PNGs); a mode "I" image whose values fit in 8 bits is left as
  it is (PIL converts it right); other modes unchanged. PIL's convert("L"/"RGB") would clip 16-bit values
  instead (30000 -> 255: a white image)."""
  if not (img.mode.startswith("I;16") or img.mode == "I"):
    return img
  from PIL import Image  # pylint: disable=g-import-not-at-top
  a = np.asarray(img)
  lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
  if lo < 0 or hi > 65535:  # a 32-bit integer image: no scale to assume
    raise ValueError(f"mode {img.mode} image with values in [{lo}, {hi}], outside the 16-bit range "
                     "[0, 65535]: save it as an 8- or 16-bit image")
  if img.mode == "I" and hi <= 255:  # 32-bit integer samples holding 8-bit values (PIL reads those right)
    return img
  return Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8))  # 2-D uint8 -> mode "L"


_NAMES_FIX = ("remove or rename those folders, or give a class list that holds them (data.class_names: a text "
              "file, one name a line, or \"a,b,c\")")


class FolderSource(_RobustSource):
  """Images in class sub-folders: `root/<class>/**/*.{jpg,jpeg,png,...}` (ImageNet layout).

  Labels: index of the class folder in `class_names` when given (e.g. the 1000 ImageNet wnids, so a
  200-class ImageNet-R/-A tree keeps 1000-way labels; the train split's class list for an eval split, see
  `pipeline.make_source`; folders missing from the list are an error), else the index in the sorted list of
  sub-folders. Folders all named by decimal integers (ImageNet-V2's "0".."999") are labelled int(name) unless
  those names are themselves in `class_names`. `names_from` says where `class_names` came from (for errors).
  Files are listed once, sorted, at construction. Images are decoded with PIL (16-bit ones scaled to 8 bits,
  `to_8bit`) and converted to RGB (channels=3) or L (channels=1).
  """

  def __init__(self, root: str, *, class_names: str | Sequence[str] | None = None, channels: int = 3,
               extensions: Sequence[str] = IMAGE_EXTENSIONS, names_from: str = "class_names"):
    super().__init__()
    root = os.fspath(root)
    self.root = root
    self.channels = channels
    expected = f"class sub-folders of images ({', '.join(extensions)}), e.g. {root}/<class>/img.JPEG"
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist (expected {expected})")
    dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not dirs:
      raise ValueError(f"image folder {root!r} has no class sub-folders (expected {expected})")
    names = resolve_class_names(class_names)
    numeric = all(d.isdigit() for d in dirs)
    if numeric and (names is None or any(d not in names for d in dirs)):
      # Folders named by class index (ImageNet-V2's "0".."999"): label = int(name), never the
      # lexicographic position ("10" sorts before "2").
      k = len(names) if names is not None else max(int(d) for d in dirs) + 1
      if max(int(d) for d in dirs) >= k:
        raise ValueError(f"image folder {root!r}: numeric class folder {max(dirs, key=int)} >= the "
                         f"{k} names of {names_from}: {_NAMES_FIX}")
      index = {d: int(d) for d in dirs}
      names = names if names is not None else [str(i) for i in range(k)]
    else:
      if names is None:
        names = dirs
      unknown = [d for d in dirs if d not in names]
      if unknown:
        raise ValueError(f"image folder {root!r}: sub-folders {unknown[:10]} (of {len(unknown)}) are not "
                         f"in {names_from} ({len(names)} names, e.g. {names[:3]}): {_NAMES_FIX}")
      index = {n: i for i, n in enumerate(names)}
    self.class_names = list(names)
    exts = tuple(e.lower() for e in extensions)
    files, labels = [], []
    for d in dirs:
      for dirpath, subdirs, fnames in os.walk(os.path.join(root, d), followlinks=True):  # as ImageFolder
        subdirs.sort()
        for fn in sorted(fnames):
          if fn.lower().endswith(exts) and not fn.startswith("."):
            files.append(os.path.join(dirpath, fn))
            labels.append(index[d])
    if not files:
      raise ValueError(f"image folder {root!r} contains no images in its {len(dirs)} class sub-folders "
                       f"(expected {expected})")
    self.files = files
    self.labels = np.asarray(labels, np.int64)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.files)

  def _describe(self, index: int) -> str:
    return self.files[index]

  def _load(self, index: int) -> dict[str, Any]:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(self.files[index]) as img:
      img = to_8bit(img).convert("L" if self.channels == 1 else "RGB")
      arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
      arr = arr[..., None]
    return {"image": arr, "label": int(self.labels[index])}

  def verify(self) -> list[str]:
    """Decodes every file once; returns (and records) the unreadable ones. Slow on big trees."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    bad = []
    for path in self.files:
      try:
        with Image.open(path) as img:
          img.load()
      except Exception:  # pylint: disable=broad-except
        bad.append(path)
    for p in bad:
      if p not in self.bad_files:
        self.bad_files.append(p)
    return bad

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, n={len(self)}, classes={len(self.class_names)})"


class ListSource(FolderSource):
  """Images named by a list file, one "relative/path label" (or "relative/path") per line, paths under `root`
  (or absolute): OpenOOD's benchmark_imglist format, e.g. `test_imagenet.txt` ("imagenet_1k/val/ILSVRC2012_
  val_00000001.JPEG 65") under its images_largescale/ folder. That is how OpenOOD v1.5 splits ImageNet's val
  into the ID set it scores and the one it tunes ReAct's threshold on. A line without a label gets -1 (OOD
  sets). Decoding as `FolderSource`; a missing or unreadable file is logged, counted and replaced."""

  def __init__(self, list_file: str, root: str = "", *, channels: int = 3):  # pylint: disable=super-init-not-called
    _RobustSource.__init__(self)
    list_file = os.path.expanduser(os.fspath(list_file))
    self.root, self.list_file, self.channels = os.path.expanduser(os.fspath(root or "")), list_file, channels
    if not os.path.isfile(list_file):
      raise FileNotFoundError(f"image list {list_file!r} does not exist (expected lines 'relative/path label')")
    files, labels = [], []
    with open(list_file) as f:
      for number, line in enumerate(f, 1):
        parts = line.split()
        if not parts:
          continue
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].lstrip("-").isdigit()):
          raise ValueError(f"{list_file}:{number}: expected 'relative/path [integer label]', got {line.strip()!r}")
        files.append(os.path.join(self.root, parts[0]))
        labels.append(int(parts[1]) if len(parts) == 2 else -1)
    if not files:
      raise ValueError(f"image list {list_file!r} names no images")
    if not os.path.exists(files[0]):  # the usual slip: a root that is not the one the paths are relative to
      raise FileNotFoundError(f"image list {list_file!r}: its first image {files[0]!r} does not exist; its paths "
                              f"are relative to data.data_dir ({self.root!r}): set it to their common root")
    self.files = files
    self.labels = np.asarray(labels, np.int64)
    self.class_names = [str(i) for i in range(int(self.labels.max()) + 1)] if self.labels.max() >= 0 else []

  def __repr__(self) -> str:
    return f"ListSource({self.list_file!r}, root={self.root!r}, n={len(self)})"


def _tfds_error(name: str, data_dir: str | None, split: str, err: Exception) -> Exception:
  hint = PREPARE_HINT.format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
  if name.split("/")[0].split(":")[0].startswith("imagenet"):
    hint += IMAGENET_HINT
  return FileNotFoundError(
      f"cannot read TFDS dataset {name!r} split {split!r} from data_dir {data_dir!r} "
      f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). {hint}")


def tfds_builder(name: str, data_dir: str | None):
  """`tfds.builder(name, data_dir)` with a clear error for unknown names (no download)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_dir and os.path.expanduser(data_dir)  # TFDS reads "~/x" as a relative path
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown TFDS dataset {name!r} (data_dir {data_dir!r}): not a registered TFDS "
                     f"name. Check the name at https://www.tensorflow.org/datasets/catalog, or use "
                     f"source='folder' for an image tree.") from e


class TfdsSource(_RobustSource):
  """A prepared TFDS dataset (array_record or parquet) read with `tfds.data_source`; no TensorFlow.

  `image_key`/`label_key` select the features (defaults "image"/"label"). `file_name` (ImageNet) or the
  index names unreadable records in reports.
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None = None, channels: int = 3,
               image_key: str = "image", label_key: str = "label"):
    super().__init__()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    # "--config.data.data_dir=~/tfds" reaches us unexpanded, and TFDS would read "~" as a directory name.
    data_dir = data_dir and os.path.expanduser(data_dir)
    self.name, self.split, self.data_dir = name, split, data_dir
    self.channels, self.image_key, self.label_key = channels, image_key, label_key
    if data_dir is not None and "://" not in data_dir and not os.path.isdir(data_dir):  # (gs://: TFDS reads it)
      raise _tfds_error(name, data_dir, split,
                        FileNotFoundError(f"data_dir {data_dir!r} does not exist"))
    tfds_builder(name, data_dir)  # unknown-name check with a clear message
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
      n = len(self._ds)
    except Exception as e:  # pylint: disable=broad-except
      raise _tfds_error(name, data_dir, split, e) from e
    if n == 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} in data_dir {data_dir!r} is empty")

  def __len__(self) -> int:
    return len(self._ds)

  def _describe(self, index: int) -> str:
    return f"tfds:{self.name}/{self.split}[{index}]"

  def _load(self, index: int) -> dict[str, Any]:
    ex = self._ds[index]
    if self.image_key not in ex or self.label_key not in ex:
      raise KeyError(f"TFDS {self.name!r} example has keys {sorted(ex)}; expected image_key "
                     f"{self.image_key!r} and label_key {self.label_key!r}")
    image = to_channels(np.asarray(ex[self.image_key]), self.channels)
    return {"image": image, "label": int(np.asarray(ex[self.label_key]))}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"
