"""Input pipelines: TFDS / image-folder / embedded-digits sources, transforms, grain loaders.

`grain` and `tensorflow_datasets` are imported only inside this package (and lazily: importing
`diffaug_jax.data` itself, or `diffaug_jax.data.corruptions`, pulls in neither).

Public API (names re-exported lazily from the sub-modules):
  default_config(), digits_config(image_size, channels), cifar10_config(data_dir, source),
  imagenet_config(data_dir, source)                         -> ml_collections.ConfigDict   [config.py]
  validate(cfg), num_classes(cfg) -> int, image_shape(cfg) -> (H, W, C)                    [config.py]
  make_source(cfg, split) -> random-access source ({"image": uint8 HWC, "label": int})     [pipeline.py]
  make_train_loader(cfg, *, global_batch_size, seed, process_index=0, process_count=1,
                    augmix_fn=None, source=None, num_workers=None, da_view=True) -> grain.DatasetIterator
      infinite; yields {"image", "image_da" (unless da_view=False): uint8 (B,S,S,C), "label": int32 (B,)}
      (+ "image_aug1", "image_aug2" with augmix_fn); B = global_batch_size // process_count: this
      host's contiguous slice of one global batch sequence that does not depend on process_count
      (per-epoch global permutation; N // global_batch_size batches per epoch, remainder dropped);
      get_state()/set_state() for exact resume.                                          [pipeline.py]
  make_eval_loader(cfg, split=None, *, global_batch_size, process_index=0, process_count=1,
                   source=None, num_workers=None) -> EvalLoader (re-iterable; num_examples,
      num_batches, batch_size); yields {"image", "label", "mask", "index"}, last batch padded (mask 0).
  checkpointing.handler(), checkpointing.save_args(it), checkpointing.restore_args(it)
      -> the orbax handler / args that save the iterator position per process.      [checkpointing.py]
  augmix.make_augmix_fn(cfg) -> per-example AugMix callable for make_train_loader(augmix_fn=...)
      (optional cfg fields augmix_width 3, augmix_depth -1, augmix_severity 1, augmix_alpha 1.0)  [augmix.py]
  DigitsSource, FolderSource, TfdsSource, to_channels, imagenet_class_names          [sources.py]
  `python -m diffaug_jax.data.prepare NAME --data_dir DIR [--manual_dir M]`          [prepare.py]
      (tfds download_and_prepare with file_format="array_record": `tfds.data_source` cannot read the
      default TFRecord format; needs TensorFlow for stock datasets: `pip install diffaug_jax[prepare]`)

Data config fields (documented in full in `diffaug_jax/data/config.py`):
  source ("digits"|"tfds"|"folder"), name (TFDS name), data_dir (TFDS data_dir or folder root),
  train_split, eval_split (TFDS split or sub-folder of data_dir; "" = data_dir itself), image_size,
  channels (1|3), train_transform ("imagenet"|"three_augment"|"three_augment_src"|"rand_augment"|"cifar"|
  "digits"|"none"), eval_transform ("imagenet"|"cifar"|"digits"|"none"), resize_size (0 -> image_size/0.875),
  crop_padding, rrc_scale, rrc_ratio, rand_augment (timm policy), num_classes (0 = infer), class_names
  (folder: ""|"imagenet2012"|file|"a,b,c"), image_key, label_key, num_workers (0 = in-process),
  worker_buffer_size, read_threads, prefetch_buffer_size.
"""

import importlib

_EXPORTS = {
    "default_config": "config", "digits_config": "config", "cifar10_config": "config",
    "imagenet_config": "config", "validate": "config", "num_classes": "config", "image_shape": "config",
    "make_source": "pipeline", "make_train_loader": "pipeline", "make_train_dataset": "pipeline",
    "make_eval_loader": "pipeline", "EvalLoader": "pipeline",
    "DigitsSource": "sources", "FolderSource": "sources", "TfdsSource": "sources",
    "to_channels": "sources", "imagenet_class_names": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"diffaug_jax.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'diffaug_jax.data' has no attribute {name!r}")
