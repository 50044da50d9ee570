"""Prepare a stock TFDS dataset once, in the format `tfds.data_source` reads (array_record).

  pip install diffaug_jax[prepare]     # TensorFlow: needed only for this step, never for training
  python -m diffaug_jax.data.prepare cifar10 --data_dir ~/tensorflow_datasets
  python -m diffaug_jax.data.prepare cifar10_corrupted/gaussian_noise_5 --data_dir DIR
  python -m diffaug_jax.data.prepare imagenet2012 --data_dir DIR --manual_dir DIR_WITH_TARS

ImageNet (imagenet2012, imagenet2012_corrupted, ...) cannot be downloaded automatically: download
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org into --manual_dir first.
Alternatively skip TFDS and point `source="folder"` at an extracted `train/<wnid>/*.JPEG` tree.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys


class UnknownDatasetError(ValueError):
  """A TFDS name or config that is not registered; the message is one line naming the nearest valid ones."""


def _did_you_mean(wanted: str, valid) -> str:
  close = difflib.get_close_matches(wanted, list(valid), n=5, cutoff=0.6)
  return f" Did you mean: {', '.join(close)}?" if close else ""


def check_name(name: str) -> None:
  """Raises UnknownDatasetError for an unregistered TFDS dataset or config, in one line. tfds.builder's own
  errors list every registered dataset (or every config) over hundreds of lines. Reads only TFDS's registry:
  no TensorFlow, no download, no data_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top
  try:
    ds_name, kwargs = naming.parse_builder_name_kwargs(name)
  except ValueError:
    raise UnknownDatasetError(f"cannot parse the TFDS name {name!r}: expected dataset[/config][:version], "
                              "e.g. cifar10_corrupted/gaussian_noise_5") from None
  if ds_name.namespace:  # a community dataset (e.g. huggingface:...): TFDS resolves it, not the registry
    return
  try:
    cls = tfds.builder_cls(ds_name.name)
  except tfds.core.registered.DatasetNotFoundError:
    raise UnknownDatasetError(
        f"unknown TFDS dataset {ds_name.name!r} (from {name!r}): not a registered TFDS name (catalog: "
        "https://www.tensorflow.org/datasets/catalog)."
        + _did_you_mean(ds_name.name, tfds.list_builders(with_community_datasets=False))) from None
  config, configs = kwargs.get("config"), dict(getattr(cls, "builder_configs", None) or {})
  if config is not None and configs and config not in configs:
    raise UnknownDatasetError(
        f"unknown config {config!r} of TFDS dataset {ds_name.name!r} (from {name!r}; it has {len(configs)} "
        f"configs, e.g. {next(iter(configs))!r})." + _did_you_mean(config, configs))


def prepare(name: str, data_dir: str, manual_dir: str | None = None, file_format: str = "array_record"):
  """`tfds.builder(name, data_dir).download_and_prepare(file_format=...)`; returns the builder. An unknown
  dataset or config raises UnknownDatasetError (one line) before anything is written."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  check_name(name)
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    print("note: TensorFlow is not installed; most TFDS builders need it to PREPARE a dataset "
          "(`pip install diffaug_jax[prepare]`). Reading a prepared data_dir does not.", file=sys.stderr)
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
  except tfds.core.registered.DatasetNotFoundError as e:  # a name check_name leaves to TFDS (a namespace)
    lines = str(e).splitlines()
    raise UnknownDatasetError(" ".join(lines[:1] + [ln.strip() for ln in lines if "Did you mean" in ln][:1])) from e
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None)
  return builder


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("name", help="TFDS name, e.g. cifar10, imagenet2012, cifar10_corrupted/gaussian_noise_5")
  p.add_argument("--data_dir", required=True, help="where the prepared dataset is written")
  p.add_argument("--manual_dir", default=None, help="manually downloaded archives (ImageNet)")
  p.add_argument("--file_format", default="array_record", choices=("array_record", "parquet"))
  a = p.parse_args(argv)
  base = a.name.split(":")[0]
  if base in ("cifar10_corrupted", "imagenet2012_corrupted"):
    # Their default config is one corruption at severity 1 that nothing reads: name the one wanted.
    p.error(f"name a config of {base}, e.g. {base}/gaussian_noise_5 (<corruption>_<severity>)")
  data_dir = os.path.expanduser(a.data_dir)  # "--data_dir=~/tfds" reaches us unexpanded
  try:
    builder = prepare(a.name, data_dir, a.manual_dir and os.path.expanduser(a.manual_dir), a.file_format)
  except UnknownDatasetError as e:  # one line, not TFDS's traceback with its list of every name
    p.exit(2, f"{p.prog}: error: {e}\n")
  print(f"prepared {a.name} in {builder.data_dir}: splits "
        f"{ {k: v.num_examples for k, v in builder.info.splits.items()} }")


if __name__ == "__main__":
  main()
