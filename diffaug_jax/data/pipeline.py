"""grain pipelines: an infinite, checkpointable train iterator and a padded, deterministic eval loader.

Train (`make_train_loader`): one GLOBAL example stream, identical for any number of hosts.
  N = len(source), B = global batch size, P = process count, b = B // P, K = N // B batches per epoch.
  Epoch e uses the permutation perm_e of range(N) given by (seed, e) only (grain's index shuffle, reseeded
  with the epoch number). Global batch k of epoch e (stream step s = e * K + k) holds the source
  examples perm_e[k * B : (k + 1) * B]; host h reads only its contiguous slice
  perm_e[k * B + h * b : k * B + (h + 1) * b], so `jax.make_array_from_process_local_data` (host slices
  concatenated in process order) rebuilds exactly the 1-host global batch. Per-example augmentation
  rng = f(seed, global stream position s * B + i), never the host. Drop-remainder per epoch: every epoch
  is exactly K full global batches and the last N - K * B positions of perm_e are skipped (different
  examples each epoch); so `num_train // batch_size` steps are one epoch, for any host count (N >= B is
  required).
  Per host, as grain ops (index arithmetic first, so each host decodes only its own examples):
    MapDataset.range(K * b).repeat()           # host-local stream position j
    -> map_with_index(j -> (source index, global position))
    -> map(read source + decode + transform)   # rng from the global position
    -> batch(b, drop_remainder=True)           # local batch s = global step s
    -> to_iter_dataset(ReadOptions)  [-> mp_prefetch(num_workers) when num_workers > 0]
The returned `grain.DatasetIterator` yields numpy dicts {"image": uint8 (b, S, S, C), "image_da": uint8
(b, S, S, C), "label": int32 (b,)} (+ "image_aug1", "image_aug2" with an `augmix_fn`). Its position is
`it.get_state()` (a small JSON-able dict) / `it.set_state(state)`; orbax checkpoints it with
`diffaug_jax.data.checkpointing` (grain's per-process handler). Because the stream depends only on
(seed, global step), a restored iterator continues bit-identically (with the num_workers it was saved with:
grain's multi-worker state differs from the in-process one); the state is the same on every host, so a state
saved with one host count can be set on iterators made for another host count (train.py's checkpoints do this:
`checkpoint.DataIteratorHandler` restores a state that every saving process wrote identically on any process count).

Eval (`make_eval_loader`): global batch b holds examples [b G, (b + 1) G) in order, padded to G at the end of
the split, and host h reads its contiguous block [h G / P, (h + 1) G / P) of it, so every example sits at the
same row of the same global batch whatever the host count (per-row noise, as DE and DDA draw it, is then
host-count invariant); every host yields the same number of batches, {"image": uint8 (B, S, S, C), "label":
int32 (B,), "mask": int32 (B,), "index": int32 (B,)} with mask 0 and index -1 on padding.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Iterator

import grain
import ml_collections
import numpy as np

from diffaug_jax.data import config as config_lib
from diffaug_jax.data import sources as sources_lib
from diffaug_jax.data import transforms

log = logging.getLogger(__name__)

# augmix_fn(image uint8 (S, S, C) (the clean, cropped+flipped view), rng) -> augmented image of the same
# shape (uint8, or float32 in [0, 255]); called twice per example for "image_aug1"/"image_aug2".
AugmixFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]

_RobustSource = sources_lib._RobustSource  # pylint: disable=protected-access


def make_source(cfg: ml_collections.ConfigDict, split: str) -> _RobustSource:
  """The random-access source for `split` (fails here, before any compile, on a bad path/name)."""
  config_lib.validate(cfg)
  if cfg.source == "digits":
    return sources_lib.DigitsSource(split, image_size=int(cfg.image_size), channels=int(cfg.channels))
  if cfg.source == "list":
    return sources_lib.ListSource(split, cfg.data_dir, channels=int(cfg.channels))
  if cfg.source == "folder":
    root = config_lib.folder_root(cfg, split)
    if split and not os.path.isdir(root) and os.path.isdir(os.path.expanduser(cfg.data_dir)):
      # The usual slip: a TFDS split name ("validation") over a tree whose folder is "val".
      field = "train_split" if cfg.get("train_split") == split else "eval_split"
      present = sorted(e.name for e in os.scandir(os.path.expanduser(cfg.data_dir)) if e.is_dir())
      raise FileNotFoundError(f"image folder {root!r} does not exist: data.{field}={split!r} is not a "
                              f"sub-folder of data.data_dir {cfg.data_dir!r} (it holds {present[:10]}); "
                              f"set --config.data.{field}=<folder name>")
    class_names, names_from = cfg.get("class_names", "") or None, "data.class_names"
    if class_names is None and split != cfg.get("train_split"):
      # An eval split numbering its own sub-folders would label val/frog as train's "dog" when val has no
      # dog: label it with the train split's list (None: no train folder, the tree labels itself).
      class_names = config_lib.train_class_names(cfg)
      names_from = f"the train split's classes, the sub-folders of {config_lib.folder_root(cfg, cfg.train_split)!r}"
    return sources_lib.FolderSource(root, class_names=class_names, channels=int(cfg.channels),
                                    names_from=names_from)
  return sources_lib.TfdsSource(cfg.name, split, data_dir=cfg.data_dir or None,
                                channels=int(cfg.channels), image_key=cfg.get("image_key", "image"),
                                label_key=cfg.get("label_key", "label"))


def _example_rng(seed: int, position: int) -> np.random.Generator:
  # Keyed by the GLOBAL stream position only, so the same example view comes out on any host count.
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(position)])


def _shuffle_seed(seed: int) -> int:
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5EED]).generate_state(1)[0]) & 0x7FFFFFFF


class _GlobalIndex:
  """Host-local stream position j -> (source index, global stream position). Picklable for workers."""

  def __init__(self, num_examples, global_batch, per_host, process_index, seed):
    self.n, self.gb, self.b, self.pi = num_examples, global_batch, per_host, process_index
    self.per_epoch = num_examples // global_batch  # K full global batches per epoch (drop remainder)
    # perm[e * N + p] = perm_e[p]: grain's shuffle reseeds each epoch from (its seed + epoch), so its seed is
    # a hash of ours: with `seed` itself, seed s + 1 would replay seed s's epoch orders one epoch earlier.
    self.perm = grain.MapDataset.range(num_examples).shuffle(seed=_shuffle_seed(seed))

  def __call__(self, j: int, _) -> tuple[int, int]:
    step, r = divmod(int(j), self.b)
    epoch, k = divmod(step, self.per_epoch)
    offset = self.pi * self.b + r  # position inside the global batch
    return int(self.perm[epoch * self.n + k * self.gb + offset]) % self.n, step * self.gb + offset


class _TrainMap:
  """(source index, global position) -> views. A picklable class so grain workers can run it."""

  def __init__(self, source, transform, channels, seed, augmix_fn):
    self.source, self.transform, self.channels = source, transform, channels
    self.seed, self.augmix_fn = seed, augmix_fn

  def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
    index, position = item
    example = self.source[index]
    rng = _example_rng(self.seed, position)
    image = sources_lib.to_channels(example["image"], self.channels)
    view, view_da = self.transform(image, rng)
    out = {"image": view, "label": np.int32(example["label"])}
    if view_da is not None:
      out["image_da"] = view_da
    if self.augmix_fn is not None:
      out["image_aug1"] = np.asarray(self.augmix_fn(view, rng))
      out["image_aug2"] = np.asarray(self.augmix_fn(view, rng))
    return out


def _read_options(cfg) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=int(cfg.get("read_threads", 4)),
                           prefetch_buffer_size=int(cfg.get("prefetch_buffer_size", 4)))


def _maybe_workers(ds: grain.IterDataset, cfg, num_workers: int | None) -> grain.IterDataset:
  n = int(cfg.get("num_workers", 0) if num_workers is None else num_workers)
  if n > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: outside an absl app (a notebook, a
      flags.FLAGS.mark_as_parsed()   # library caller) they would fail at the first batch
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=n, per_worker_buffer_size=int(cfg.get("worker_buffer_size", 2))))
  return ds


def _check_hosts(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index/process_count: {process_index}/{process_count}")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"process_count {process_count}")
  return global_batch_size // process_count


def make_train_dataset(cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1,
                       augmix_fn: AugmixFn | None = None, source=None,
                       num_workers: int | None = None, da_view: bool = True) -> grain.IterDataset:
  """The train `grain.IterDataset` (see module docstring); `iter()` it for a checkpointable iterator."""
  config_lib.validate(cfg)
  per_host = _check_hosts(global_batch_size, process_index, process_count)
  source = make_source(cfg, cfg.train_split) if source is None else source
  if len(source) < global_batch_size:  # an epoch is N // B full global batches: at least one
    raise ValueError(f"{source!r} has {len(source)} examples, fewer than global_batch_size "
                     f"{global_batch_size}")
  transform = transforms.make_train_transform(
      cfg.train_transform, int(cfg.image_size), resize_size=int(cfg.get("resize_size", 0) or 0) or None,
      crop_padding=int(cfg.get("crop_padding", 4)), rrc_scale=tuple(cfg.get("rrc_scale", (0.08, 1.0))),
      rrc_ratio=tuple(cfg.get("rrc_ratio", (3 / 4, 4 / 3))),
      rand_augment=cfg.get("rand_augment", "rand-m9-mstd0.5-inc1"), da_view=da_view)
  ds = grain.MapDataset.range((len(source) // global_batch_size) * per_host).repeat(None)
  ds = ds.map_with_index(_GlobalIndex(len(source), global_batch_size, per_host, process_index, seed))
  ds = ds.map(_TrainMap(source, transform, int(cfg.channels), seed, augmix_fn))
  ds = ds.batch(per_host, drop_remainder=True)
  ds = ds.to_iter_dataset(_read_options(cfg))
  return _maybe_workers(ds, cfg, num_workers)


def make_train_loader(cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                      process_index: int = 0, process_count: int = 1,
                      augmix_fn: AugmixFn | None = None, source=None,
                      num_workers: int | None = None, da_view: bool = True) -> grain.DatasetIterator:
  """Infinite train iterator of this host's slice of each global batch (see module docstring).

  Host h of P gets positions [h * b, (h + 1) * b) of every global batch (b = global_batch_size // P), so the
  host batches concatenated in process order are the 1-host batch, for any P.

  Yields {"image", "image_da": uint8 (B, S, S, C), "label": int32 (B,)} (+ "image_aug1"/"image_aug2" when
  `augmix_fn` is given). Checkpoint with `it.get_state()`/`it.set_state()` or
  `diffaug_jax.data.checkpointing`. `source` (from `make_source`) may be passed to keep a handle on its
  `num_bad`/`bad_files` counters (exact with num_workers=0). `num_workers` overrides cfg.num_workers.
  `da_view=False` leaves "image_da" out (not computed: a run without DiffAug, or one that denoises the clean
  view, has no use for it).
  """
  return iter(make_train_dataset(cfg, global_batch_size=global_batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count,
                                 augmix_fn=augmix_fn, source=source, num_workers=num_workers,
                                 da_view=da_view))


class _EvalMap:
  """Host-local position -> its example (a zero image with mask 0 past the split's end or when unreadable)."""

  def __init__(self, source, indices, transform, shape, channels):
    self.source, self.indices, self.transform = source, indices, transform
    self.shape, self.channels = shape, channels

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    index = int(self.indices[position])
    ex = None
    if index >= 0:
      load = getattr(self.source, "load_or_none", None)
      ex = load(index) if load is not None else self.source[index]
    if ex is None:  # padding, or unreadable (logged): not scored, rather than scoring another image twice
      return {"image": np.zeros(self.shape, np.uint8), "label": np.int32(0), "mask": np.int32(0),
              "index": np.int32(index)}
    image = self.transform(sources_lib.to_channels(ex["image"], self.channels))
    return {"image": image, "label": np.int32(ex["label"]), "mask": np.int32(1), "index": np.int32(index)}


class EvalLoader:
  """Re-iterable eval batches for one split; every `iter()` starts again from the first batch.

  Attributes: num_examples (whole split, all hosts), num_batches (equal on every host), batch_size (per
  host), global_batch_size, source. Host h reads rows [h B, (h + 1) B) of every global batch (B = batch_size),
  i.e. examples b G + h B + r (G = global_batch_size; index -1 past the split's end).
  """

  def __init__(self, cfg, source, *, global_batch_size, process_index, process_count, num_workers):
    self.batch_size = _check_hosts(global_batch_size, process_index, process_count)
    self.global_batch_size = global_batch_size
    self.source = source
    self.num_examples = len(source)
    self.process_index, self.process_count = process_index, process_count
    self.num_batches = math.ceil(self.num_examples / global_batch_size)
    b, r = np.divmod(np.arange(self.num_batches * self.batch_size), self.batch_size)
    indices = b * global_batch_size + process_index * self.batch_size + r
    self._indices = np.where(indices < self.num_examples, indices, -1)
    self._transform = transforms.make_eval_transform(
        cfg.eval_transform, int(cfg.image_size),
        resize_size=int(cfg.get("resize_size", 0) or 0) or None)
    self._shape = config_lib.image_shape(cfg)
    self._cfg = cfg
    self._num_workers = num_workers

  def __len__(self) -> int:
    return self.num_batches

  def dataset(self) -> grain.IterDataset:
    ds = grain.MapDataset.range(self.num_batches * self.batch_size)
    ds = ds.map(_EvalMap(self.source, self._indices, self._transform, self._shape,
                         int(self._cfg.channels)))
    ds = ds.batch(self.batch_size, drop_remainder=True).to_iter_dataset(_read_options(self._cfg))
    return _maybe_workers(ds, self._cfg, self._num_workers)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self.dataset())

  def __repr__(self) -> str:
    return (f"EvalLoader({self.source!r}, num_examples={self.num_examples}, "
            f"num_batches={self.num_batches}, batch_size={self.batch_size})")


def make_eval_loader(cfg: ml_collections.ConfigDict, split: str | None = None, *, global_batch_size: int,
                     process_index: int = 0, process_count: int = 1, source=None,
                     num_workers: int | None = None) -> EvalLoader:
  """Eval loader for `split` (default cfg.eval_split); batches of global_batch_size // process_count.

  Yields {"image": uint8 (B, S, S, C), "label": int32 (B,), "mask": int32 (B,), "index": int32 (B,)} (the
  example's index in the split); the last batch is padded (zero images, label 0, mask 0, index -1), and an
  unreadable image is a mask-0 row too (logged; the eval results'
  "unreadable" = num_examples - scored). `source` overrides the configured source (e.g. a corrupted copy).
  """
  config_lib.validate(cfg)
  split = cfg.eval_split if split is None else split
  source = make_source(cfg, split) if source is None else source
  return EvalLoader(cfg, source, global_batch_size=global_batch_size, process_index=process_index,
                    process_count=process_count, num_workers=num_workers)
