"""Robustness suites: which datasets to read, how their labels map, and the corruption metrics.

A suite expands into `EvalSet`s (one eval iterator each). Sources:
- TFDS (read through the data dev's `diffaug_jax.data.pipeline.make_eval_loader`, `tfds.data_source`:
  the dataset must be prepared in `data_dir`);
- folders (ImageNet layout: `<root>/<wnid>/*.JPEG`; the official ImageNet-C tree
  `<root>/<corruption>/<severity>/<wnid>/*.JPEG`);
- "corrupt": any base data config + this project's corruptions (`diffaug_jax.data.corruptions`), for data
  with no released corrupted copy (digits, a user's folder).

Suites (`SUITES`): clean, cifar10_c, imagenet_c, imagenet_r, imagenet_a, imagenet_sketch, imagenet_v2,
corrupted. ImageNet-R/-A use the 200-class subsets (`imagenet_200_class_subsets.json`, shipped in this
package): logits are sliced to the subset BEFORE the softmax (`head="subset"`), or `head="full"` takes
the 1000-way argmax.

mCE (Hendrycks & Dietterich 2019): CE_c = sum_s err_{c,s} / sum_s err^AlexNet_{c,s}, mCE = mean_c CE_c
(x100). AlexNet errors per corruption and severity are those of the ImageNet-C release
(hendrycks/robustness; their per-corruption means are the familiar 0.886428 for gaussian_noise, ...).
CIFAR-10-C: unnormalised mean error (no AlexNet reference exists for it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from importlib import resources
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

IMAGENET_C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
IMAGENET_C_EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

# TFDS `cifar10_corrupted` config names: the 19 corruptions of CIFAR-10-C (TFDS spells glass_blur
# "frosted_glass_blur" and elastic_transform "elastic").
CIFAR10_C_CORRUPTIONS: tuple[str, ...] = (
    "brightness", "contrast", "defocus_blur", "elastic", "fog", "frost", "frosted_glass_blur",
    "gaussian_blur", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate",
    "saturate", "shot_noise", "snow", "spatter", "speckle_noise", "zoom_blur",
)

# AlexNet top-1 error on ImageNet-C per corruption, severities 1..5 (ImageNet-C release).
ALEXNET_ERRORS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.94870, 0.98720, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.58430, 0.70048, 0.82108, 0.89750, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.91870, 0.94952),
    "frost": (0.61390, 0.79734, 0.88790, 0.89942, 0.93430),
    "fog": (0.67474, 0.76050, 0.84378, 0.87260, 0.94500),
    "brightness": (0.45140, 0.48502, 0.54048, 0.62166, 0.72440),
    "contrast": (0.64548, 0.76150, 0.88874, 0.97760, 0.99270),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.54620, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}


@functools.lru_cache(maxsize=1)
def imagenet_200_subsets() -> dict[str, tuple[int, ...]]:
  """{"imagenet_r": 200 sorted indices, "imagenet_a": 200 sorted indices} into the 1000 classes."""
  text = resources.files("diffaug_jax.evaluation").joinpath(
      "data/imagenet_200_class_subsets.json").read_text()
  raw = json.loads(text)
  return {"imagenet_r": tuple(int(i) for i in raw["imagenet_r_indices"]),
          "imagenet_a": tuple(int(i) for i in raw["imagenet_a_indices"])}


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One dataset to evaluate.

  source: {"kind": "tfds", "name", "split", "data_dir"} | {"kind": "folder", "path"} |
    {"kind": "corrupt", "corruption", "severity", "seed"} (applied to the base data config) |
    {"kind": "base", "split"} (the base data config itself).
  class_subset: the 200 class indices of ImageNet-R/-A (None: all classes).
  head: "subset" (slice the logits to class_subset before the softmax) or "full" (1000-way argmax).
  labels: "full" (1000-way labels: TFDS imagenet_r/imagenet_a, whose ClassLabel is the 1000-wnid list, and
    folders read with the ImageNet wnid list; what every suite here produces) or "subset" (labels already
    index the 200 subset classes, for a user's own source).
  """
  suite: str
  name: str
  source: Mapping[str, Any]
  corruption: str | None = None
  severity: int | None = None
  class_subset: tuple[int, ...] | None = None
  head: str = "subset"
  labels: str = "full"


def summary_sets(suite: str, set_names: Iterable[str]) -> list[str]:
  """The sets a suite's summary numbers average over: for ImageNet-C its 15 standard corruptions (the
  paper's IN-C; extra corruptions asked for are reported apart), unless only extras were run; all sets of
  every other suite. One rule for the summary, the DE member table and the DE curve."""
  names = list(set_names)
  if suite == "imagenet_c":
    std = [n for n in names if n.split("/")[0] in IMAGENET_C_CORRUPTIONS]
    return std or names
  return names


def _severities(cfg) -> tuple[int, ...]:
  sev = tuple(int(s) for s in (cfg.get("severities") or (1, 2, 3, 4, 5)))
  if any(s not in (1, 2, 3, 4, 5) for s in sev):
    raise ValueError(f"severities must be within 1..5, got {sev}")
  return sev


def _corruptions(cfg, known: Sequence[str], suite: str, default: Sequence[str] | None = None
                 ) -> tuple[str, ...]:
  names = tuple(cfg.get("corruptions") or (known if default is None else default))
  bad = [c for c in names if c not in known]
  if bad:
    raise ValueError(f"suite {suite!r}: unknown corruption(s) {bad}; known: {', '.join(known)}")
  return names


def _tfds(name, split, data_dir):
  return {"kind": "tfds", "name": name, "split": split, "data_dir": data_dir}


_FOLDER_SUITES = ("imagenet_c", "imagenet_r", "imagenet_a", "imagenet_sketch", "imagenet_v2")
# The options each suite reads (data_dir: all). An option another suite reads is an error here too: a
# `path=` given to "clean" would otherwise evaluate the base config's data instead of the folder.
_SUITE_READS = {"clean": ("split", "tfds_name"), "cifar10_c": ("source", "corruptions", "severities"),
                "imagenet_c": ("source", "path", "corruptions", "severities"),
                "imagenet_r": ("source", "path", "head"), "imagenet_a": ("source", "path", "head"),
                "imagenet_sketch": ("source", "path"), "imagenet_v2": ("source", "path"),
                "corrupted": ("corruptions", "severities", "seed", "split")}
SUITE_OPTIONS = ("data_dir", *sorted(set().union(*_SUITE_READS.values())))  # every option some suite reads


def expand_suite(name: str, cfg: Mapping[str, Any] | None = None, *, data_dir: str = "") -> list[EvalSet]:
  """Suite name + its options -> EvalSets.

  Options (all optional): source ("tfds" | "folder"), path (folder root), data_dir (TFDS), split,
  corruptions, severities, head ("subset" | "full"), seed (for "corrupted"), tfds_name (for "clean").
  A misspelled option or source is an error: silently ignoring `severity=5` would run all five severities,
  and reading `source="Folder"` as TFDS would swap the official ImageNet-C release for the regenerated one.
  So is an option this suite does not read (`_SUITE_READS`), and source="folder" for a suite without a
  folder form (clean, cifar10_c, corrupted).
  """
  if name not in SUITES:
    raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
  cfg = dict(cfg or {})
  unknown = sorted(set(cfg) - set(SUITE_OPTIONS))
  if unknown:
    raise ValueError(f"suite {name!r}: unknown option(s) {unknown}; known: {', '.join(SUITE_OPTIONS)}")
  unread = sorted(set(cfg) - {"data_dir", *_SUITE_READS[name]})
  if unread:
    raise ValueError(f"suite {name!r} does not read option(s) {unread}; it reads: "
                     f"{', '.join(('data_dir', *_SUITE_READS[name]))}")
  cfg.setdefault("data_dir", data_dir)
  src = cfg.get("source") or "tfds"
  if src not in ("tfds", "folder"):
    raise ValueError(f"suite {name!r}: source must be 'tfds' or 'folder', got {src!r}")
  if src == "folder" and name not in _FOLDER_SUITES:
    raise ValueError(f"suite {name!r} has no folder form (source='folder': {', '.join(_FOLDER_SUITES)})")
  get = cfg.get
  if name == "clean":
    if get("tfds_name"):
      return [EvalSet(name, "test", _tfds(get("tfds_name"), get("split", "test"), get("data_dir")))]
    return [EvalSet(name, "test", {"kind": "base", "split": get("split")})]
  if name == "cifar10_c":
    out = []
    for c in _corruptions(cfg, CIFAR10_C_CORRUPTIONS, name):
      for s in _severities(cfg):
        out.append(EvalSet(name, f"{c}/{s}", _tfds(f"cifar10_corrupted/{c}_{s}", "test", get("data_dir")),
                           corruption=c, severity=s))
    return out
  if name == "imagenet_c":
    out = []
    for c in _corruptions(cfg, IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA, name,
                          default=IMAGENET_C_CORRUPTIONS):
      for s in _severities(cfg):
        if src == "folder":
          source = {"kind": "folder", "path": os.path.join(_need_path(cfg, name), c, str(s))}
        else:
          source = _tfds(f"imagenet2012_corrupted/{c}_{s}", "validation", get("data_dir"))
        out.append(EvalSet(name, f"{c}/{s}", source, corruption=c, severity=s))
    return out
  if name in ("imagenet_r", "imagenet_a"):
    subset = imagenet_200_subsets()[name]
    head = get("head", "subset")
    if head not in ("subset", "full"):
      raise ValueError(f"suite {name!r}: head must be 'subset' or 'full', got {head!r}")
    # Both sources label with the 1000-wnid list (TFDS imagenet_r/imagenet_a's ClassLabel is
    # imagenet_common's 1000 names; folders are read with the wnid list); Head maps them into the subset.
    if src == "folder":
      source = {"kind": "folder", "path": _need_path(cfg, name)}
    else:
      source = _tfds(name, "test", get("data_dir"))
    return [EvalSet(name, head, source, class_subset=subset, head=head, labels="full")]
  if name in ("imagenet_sketch", "imagenet_v2"):
    if src == "folder":
      source = {"kind": "folder", "path": _need_path(cfg, name)}
    else:
      tfds_name = {"imagenet_sketch": "imagenet_sketch", "imagenet_v2": "imagenet_v2"}[name]
      source = _tfds(tfds_name, "test", get("data_dir"))
    return [EvalSet(name, "test", source)]
  if name == "corrupted":
    from diffaug_jax.data import corruptions  # pylint: disable=g-import-not-at-top
    out = []
    for c in _corruptions(cfg, corruptions.CORRUPTIONS, name):
      for s in _severities(cfg):
        out.append(EvalSet(name, f"{c}/{s}", {"kind": "corrupt", "corruption": c, "severity": s,
                                              "seed": int(get("seed", 0)), "split": get("split")},
                           corruption=c, severity=s))
    return out
  raise AssertionError(name)  # every name in SUITES is handled above


SUITES = ("clean", "cifar10_c", "imagenet_c", "imagenet_r", "imagenet_a", "imagenet_sketch",
          "imagenet_v2", "corrupted")

_PREPARE_CMD = ("`pip install diffaug_jax[prepare]` then "
                "`python -m diffaug_jax.data.prepare {name} --data_dir <data_dir>`")
_PREPARE = {
    "imagenet2012": "ImageNet needs a MANUAL download: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                    "from image-net.org, then " + _PREPARE_CMD.format(name="imagenet2012")[:-1]
                    + " --manual_dir <dir with the tars>`",
    "imagenet2012_corrupted": "TFDS regenerates ImageNet-C from ImageNet (manual download of ImageNet "
                              "first, see imagenet2012): "
                              + _PREPARE_CMD.format(name="imagenet2012_corrupted/<config>")[:-1]
                              + " --manual_dir <dir with the tars>`; or use the official JPEG release with "
                              "suite option source='folder', path=<root containing "
                              "<corruption>/<severity>/<wnid>/*.JPEG>",
    "cifar10_corrupted": _PREPARE_CMD.format(name="cifar10_corrupted/<corruption>_<severity>"),
}


def prepare_hint(tfds_name: str) -> str:
  base = tfds_name.split("/")[0].split(":")[0]
  return _PREPARE.get(base, _PREPARE_CMD.format(name=tfds_name)
                      + " (reading a prepared data_dir needs no TensorFlow)")


def _need_path(cfg, suite):
  path = cfg.get("path")
  if not path:
    raise ValueError(f"suite {suite!r} with source='folder' needs option path=<folder root>")
  return path


class DatasetMissingError(FileNotFoundError):
  pass


def make_batches(evalset: EvalSet, base_data_cfg, *, batch_size: int, loader_fn: Callable | None = None
                 ) -> tuple[Iterable[Mapping[str, np.ndarray]], int | None]:
  """EvalSet -> (iterable of eval batches {"image" uint8, "label", "mask"}, number of batches or None).

  `loader_fn(data_cfg, split, global_batch_size) -> iterable` overrides the data dev's
  `make_eval_loader` (tests pass a fake). Missing datasets raise `DatasetMissingError` naming the TFDS
  name or path and how to prepare it.
  """
  import copy  # pylint: disable=g-import-not-at-top
  src = dict(evalset.source)
  cfg = copy.deepcopy(base_data_cfg)
  split = None
  if src["kind"] == "tfds":
    cfg.source, cfg.name, split = "tfds", src["name"], src["split"]
    if src.get("data_dir"):
      cfg.data_dir = src["data_dir"]
  elif src["kind"] == "folder":
    path = os.path.expanduser(src["path"])
    if not os.path.isdir(path):
      raise DatasetMissingError(
          f"{evalset.suite} {evalset.name}: folder {path!r} not found. Expected an ImageNet-layout tree "
          f"(<wnid>/*.JPEG; for ImageNet-C <root>/<corruption>/<severity>/<wnid>/*.JPEG from "
          f"https://zenodo.org/record/2235448).")
    cfg.source, cfg.data_dir, split = "folder", path, ""
    if evalset.suite.startswith("imagenet"):
      cfg.class_names = "imagenet2012"  # 1000-way labels whatever subset of wnids the tree holds
  elif src["kind"] in ("base", "corrupt"):
    split = src.get("split") or None
  else:
    raise ValueError(f"unknown source kind {src['kind']!r}")
  if loader_fn is None:
    from diffaug_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (grain/tfds: data only)
    import jax  # pylint: disable=g-import-not-at-top

    def loader_fn(c, s, b):
      return pipeline.make_eval_loader(c, s, global_batch_size=b, process_index=jax.process_index(),
                                       process_count=jax.process_count())
  try:
    loader = loader_fn(cfg, split, batch_size)
  except (FileNotFoundError, OSError, ValueError) as e:
    if src["kind"] == "tfds":
      raise DatasetMissingError(
          f"{evalset.suite} {evalset.name}: TFDS dataset {src['name']!r} (split {src['split']!r}) could "
          f"not be read from data_dir {cfg.data_dir or '~/tensorflow_datasets'!r}: {e}\nPrepare it: "
          f"{prepare_hint(src['name'])}") from e
    raise
  total = getattr(loader, "num_batches", None)
  if src["kind"] == "corrupt":
    from diffaug_jax.data import corruptions  # pylint: disable=g-import-not-at-top
    return corruptions.corrupt_iterator(iter(loader), src["corruption"], int(src["severity"]),
                                        seed=int(src.get("seed", 0)),
                                        process_count=getattr(loader, "process_count", 1)), total
  return loader, total


# ------------------------------------------------------------------------------------------ metrics


def corruption_errors(accuracies: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
  """{corruption: {severity: accuracy in [0, 1]}} -> {corruption: mean error over given severities}."""
  return {c: float(np.mean([1.0 - a for a in by_sev.values()])) for c, by_sev in accuracies.items()}


def mce(accuracies: Mapping[str, Mapping[int, float]], *, normalise: bool = True) -> dict[str, Any]:
  """mean Corruption Error.

  normalise=True (ImageNet-C): CE_c = sum_s E_{c,s} / sum_s E^AlexNet_{c,s} over the severities present,
  mCE = mean over the 15 standard corruptions present; the extra corruptions (no AlexNet reference) are
  reported unnormalised (mean error, %) under "error_extra", not averaged.
  normalise=False (CIFAR-10-C): CE_c = mean_s E_{c,s}, mCE = mean over corruptions.
  Returns {"mCE": percent, "CE": {corruption: percent}, "severities": [the severities present]
  [, "error_extra": {corruption: percent}]}. The published ImageNet-C mCE averages severities 1-5; over
  fewer severities (e.g. only 5) the number is not comparable with it, which "severities" records.
  """
  ce, extra = {}, {}
  for c, by_sev in accuracies.items():
    errs = {int(s): 1.0 - float(a) for s, a in by_sev.items()}
    if normalise and c in ALEXNET_ERRORS:
      ref = ALEXNET_ERRORS[c]
      ce[c] = 100.0 * sum(errs.values()) / sum(ref[s - 1] for s in errs)
    elif normalise:
      extra[c] = 100.0 * float(np.mean(list(errs.values())))
    else:
      ce[c] = 100.0 * float(np.mean(list(errs.values())))
  out = {"mCE": float(np.mean(list(ce.values()))) if ce else float("nan"), "CE": ce,
         "severities": sorted({int(s) for by_sev in accuracies.values() for s in by_sev})}
  if extra:
    out["error_extra"] = extra
  return out
