"""The data config (an `ml_collections.ConfigDict`) and helpers that need no data reading.

Fields (see `default_config`; `validate` checks them):
  source            "digits" | "tfds" | "folder" | "list" (a file of "relative/path label" lines, OpenOOD's
                    benchmark_imglist format: the split fields are the list files' paths, data_dir the root
                    the paths are relative to; num_classes = max label + 1 of the train list unless set).
  name              TFDS name, e.g. "cifar10", "imagenet2012", "cifar10_corrupted/gaussian_noise_5"
                    (source="tfds"); free text otherwise.
  data_dir          TFDS data_dir ("" = TFDS default ~/tensorflow_datasets), or the folder root
                    (source="folder"). Unused for digits.
  train_split       split name: TFDS split ("train"), a sub-folder of data_dir ("train"; "" = data_dir itself
                    is the class root), or digits "train".
  eval_split        same for evaluation: TFDS "test"/"validation", folder "val", digits "test".
  image_size        output side S: every view is (S, S, channels).
  channels          1 (grayscale, PIL "L") or 3 (RGB).
  train_transform   "imagenet" (RandomResizedCrop + flip; DiffAug view Resize + CenterCrop) |
                    "three_augment" (DeiT-III's 3-Augment with RandomResizedCrop; DiffAug view as for
                    "imagenet") | "three_augment_src" (with Simple Random Crop, DeiT-III's --src) |
                    "rand_augment" (DeiT-III's 224 fine-tuning: bicubic RandomResizedCrop + flip + timm
                    RandAugment `rand_augment`, no color jitter; DiffAug view as for "imagenet") | "cifar"
                    (RandomCrop with padding + flip; DiffAug view unaugmented) | "digits" (random crop with
                    padding, no flip) | "none".
  rand_augment      optional: the timm RandAugment policy of train_transform="rand_augment"
                    ("rand-m9-mstd0.5-inc1", DeiT-III's `--aa`; grammar in `randaugment.py`).
  eval_transform    "imagenet" (Resize(resize_size) + CenterCrop(image_size)) | "cifar" | "digits" | "none"
                    (identity, or Resize + CenterCrop when the stored size differs from image_size).
  resize_size       shorter side before the centre crop (0 -> round(image_size / 0.875): 256 for 224).
  crop_padding      zero padding of the cifar/digits random crop (4 for CIFAR).
  rrc_scale         RandomResizedCrop scale range (0.08, 1.0).
  rrc_ratio         RandomResizedCrop aspect-ratio range (3/4, 4/3).
  num_classes       0 -> inferred (digits 10; folder: len(class_names) or #sub-folders; TFDS: label feature).
  class_names       folder only: "" (the train split's sorted sub-folders label every split: an eval split may
                    hold a subset of them, a folder the train split lacks is an error) | "imagenet2012" (the
                    1000 wnids: 200-class ImageNet-R/-A trees keep 1000-way labels) | a text file (one name a
                    line) | "a,b,c".
  image_key         TFDS image feature name ("image").
  label_key         TFDS label feature name ("label").
  num_workers       grain worker processes (0 = in-process, used by tests).
  worker_buffer_size  batches buffered per worker.
  read_threads      reader threads in each worker (grain ReadOptions.num_threads).
  prefetch_buffer_size  elements each reader prefetches (grain ReadOptions.prefetch_buffer_size). The
                    batch is formed before reading, so an element is a whole per-host batch and every
                    worker holds this many: ~read_threads keeps the threads busy (128 held ~1000 ImageNet
                    host batches, ~80 GB at batch 256 on 8 workers).
"""

from __future__ import annotations

import os

import ml_collections

from diffaug_jax.data import randaugment, transforms

SOURCES = ("digits", "tfds", "folder", "list")


def default_config() -> ml_collections.ConfigDict:
  """The embedded default: digits upsampled to 16x16 grayscale, mild crop augmentation."""
  return ml_collections.ConfigDict(dict(
      source="digits",
      name="digits",
      data_dir="",
      train_split="train",
      eval_split="test",
      image_size=16,
      channels=1,
      train_transform="digits",
      eval_transform="none",
      resize_size=0,
      crop_padding=2,
      rrc_scale=(0.08, 1.0),
      rrc_ratio=(3 / 4, 4 / 3),
      rand_augment="rand-m9-mstd0.5-inc1",
      num_classes=0,
      class_names="",
      image_key="image",
      label_key="label",
      num_workers=0,
      worker_buffer_size=2,
      read_threads=4,
      prefetch_buffer_size=4,
  ))


def digits_config(image_size: int = 16, channels: int = 1) -> ml_collections.ConfigDict:
  cfg = default_config()
  cfg.image_size, cfg.channels = image_size, channels
  cfg.crop_padding = max(1, image_size // 8)
  return cfg


def cifar10_config(data_dir: str = "", source: str = "tfds") -> ml_collections.ConfigDict:
  """TFDS `cifar10` (train/test) at 32x32 RGB, RandomCrop(32, 4) + flip."""
  cfg = default_config()
  cfg.update(dict(source=source, name="cifar10", data_dir=data_dir, train_split="train",
                  eval_split="test", image_size=32, channels=3, train_transform="cifar",
                  eval_transform="none", crop_padding=4, num_classes=10,
                  augmix_severity=3))  # AugMix's CIFAR default (its ImageNet code uses 1)
  return cfg


def imagenet_config(data_dir: str = "", source: str = "tfds") -> ml_collections.ConfigDict:
  """ImageNet-1k at 224: TFDS `imagenet2012` (train/validation) or an extracted folder tree
  (data_dir/train/<wnid>/*.JPEG, data_dir/val/<wnid>/*.JPEG)."""
  cfg = default_config()
  cfg.update(dict(source=source, name="imagenet2012", data_dir=data_dir, train_split="train",
                  eval_split="validation" if source == "tfds" else "val", image_size=224, channels=3,
                  train_transform="imagenet", eval_transform="imagenet", resize_size=256,
                  num_classes=1000, class_names="imagenet2012" if source == "folder" else "",
                  num_workers=8, read_threads=4, prefetch_buffer_size=4))
  return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending field."""
  if cfg.source not in SOURCES:
    raise ValueError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")
  if cfg.channels not in (1, 3):
    raise ValueError(f"data.channels must be 1 or 3, got {cfg.channels}")
  if int(cfg.image_size) <= 0:
    raise ValueError(f"data.image_size must be positive, got {cfg.image_size}")
  if cfg.train_transform not in transforms.TRAIN_TRANSFORMS:
    raise ValueError(f"data.train_transform must be one of {transforms.TRAIN_TRANSFORMS}, "
                     f"got {cfg.train_transform!r}")
  if cfg.train_transform == "rand_augment":
    try:
      randaugment.parse_rand_augment(cfg.get("rand_augment", randaugment.DEIT_POLICY))
    except ValueError as e:
      raise ValueError(f"data.rand_augment: {e}") from None
  if cfg.eval_transform not in transforms.EVAL_TRANSFORMS:
    raise ValueError(f"data.eval_transform must be one of {transforms.EVAL_TRANSFORMS}, "
                     f"got {cfg.eval_transform!r}")
  if cfg.source == "tfds" and not cfg.name:
    raise ValueError("data.name (a TFDS dataset name) is required when data.source='tfds'")
  if cfg.source == "folder" and not cfg.data_dir:
    raise ValueError("data.data_dir (the image folder root) is required when data.source='folder'")
  if int(cfg.get("num_workers", 0)) < 0:
    raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")


def image_shape(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of every image the loaders yield (build models before reading data)."""
  return (int(cfg.image_size), int(cfg.image_size), int(cfg.channels))


def folder_root(cfg: ml_collections.ConfigDict, split: str) -> str:
  root = os.path.expanduser(cfg.data_dir)
  return os.path.join(root, split) if split else root


def class_folders(root: str) -> list[str]:
  """The class sub-folders of `root`, sorted, as `sources.FolderSource` lists them (hidden ones skipped)."""
  return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def train_class_names(cfg: ml_collections.ConfigDict) -> list[str] | None:
  """source="folder" without class_names: the class list that labels EVERY split, from the train split's
  sub-folders (sorted; all-numeric folders -> "0".."max", i.e. label int(name) as FolderSource gives them).
  Each split numbering its own folders would silently give a val split lacking "dog" the train split's "dog"
  label for its "frog". None when the train folder does not exist or has no sub-folders (an eval-only tree,
  e.g. an OOD set, is labelled by its own folders)."""
  root = folder_root(cfg, cfg.train_split)
  dirs = class_folders(root) if os.path.isdir(root) else []
  if not dirs:
    return None
  if all(d.isdigit() for d in dirs):  # class-index folders (see sources.FolderSource)
    return [str(i) for i in range(max(int(d) for d in dirs) + 1)]
  return dirs


def num_classes(cfg: ml_collections.ConfigDict) -> int:
  """cfg.num_classes when > 0; else digits 10, folder len(class_names) or the number of class
  sub-folders of the train split, TFDS the label feature's num_classes (reads metadata only)."""
  if int(cfg.get("num_classes", 0) or 0) > 0:
    return int(cfg.num_classes)
  validate(cfg)
  if cfg.source == "digits":
    return 10
  if cfg.source == "folder":
    from diffaug_jax.data import sources  # pylint: disable=g-import-not-at-top
    names = sources.resolve_class_names(cfg.get("class_names", ""))
    if names is not None:
      return len(names)
    root = folder_root(cfg, cfg.train_split)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist (expected class sub-folders)")
    names = train_class_names(cfg)
    if names is None:
      raise ValueError(f"image folder {root!r} has no class sub-folders")
    return len(names)
  from diffaug_jax.data import sources  # pylint: disable=g-import-not-at-top
  if cfg.source == "list":
    return len(sources.ListSource(cfg.train_split, cfg.data_dir, channels=int(cfg.channels)).class_names)
  builder = sources.tfds_builder(cfg.name, cfg.data_dir or None)
  feature = builder.info.features[cfg.get("label_key", "label")]
  return int(feature.num_classes)
