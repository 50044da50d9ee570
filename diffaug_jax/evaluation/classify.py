"""Sharded, batched prediction loops: pad every batch to one static shape, jit once, count with a mask.

`run_sharded(step_fn, params, batches, ...)` is the engine every robustness mode uses:

    step_fn(params, images, key, mask) -> dict of per-example arrays (B, ...)

with `images` float32 NHWC in [-1, 1] (converted on device from the loader's uint8), `params` any pytree
(replicated on the mesh, passed as a jit argument so big weights are never baked into the program as
constants), `key` a per-batch key (`fold_in(key, batch_index)`) and `mask` (B,) float32, 1 for real rows and
0 for padding (for whole-batch statistics such as DDA's `norm="batch"`; per-example steps ignore it). The batch
is sharded on the mesh's `data` axis; every batch is padded to the first batch's size rounded up to a multiple
of the device count, so the function compiles once. Padding rows (loader `mask` 0 or added here) are dropped
on the host.

Results are identical for 1 and N devices for a given key and global batch (the random draws of the core
are sharding-invariant), which tests/test_eval_robustness.py checks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffaug_jax import sharding as shd

PyTree = Any
StepFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], Mapping[str, jax.Array]]


def uint8_to_model(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] (or float already in [-1, 1]) -> float32 [-1, 1]."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  return images.astype(jnp.float32)


def _real_rows(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One fetched batch without its padding rows (dropped per batch: the host never holds the padded copy
  of a whole evaluation, e.g. 50k x (1000 logits + 2048 features) for OOD)."""
  keep = out.pop("mask") > 0
  return {k: v[keep] for k, v in out.items()}


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array: its devices' shards in row order (the rows it fed)."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _fetch(tree: PyTree, gather: bool = True) -> PyTree:
  """Global jax arrays -> host numpy: all processes' rows (gather) or this process's own."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  if not gather:
    return jax.tree.map(_local_rows, tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def _progress(it: Iterable, desc: str | None, total: int | None):
  if desc is None or jax.process_index() != 0:
    return it
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return it
  return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


class ShardedRunner:
  """Jits `step_fn` once for a mesh and runs it over padded batches.

  Reuse one runner over several datasets of the same batch shape (e.g. the 95 CIFAR-10-C sets): the
  compiled program is kept.
  """

  def __init__(self, step_fn: StepFn, mesh: Mesh | None = None):
    self.mesh = shd.make_mesh() if mesh is None else mesh
    self._step_fn = step_fn
    batch = shd.batch_sharding(self.mesh)
    repl = shd.replicated(self.mesh)

    def _step(params, images, labels, mask, key, index):
      out = dict(step_fn(params, uint8_to_model(images), jax.random.fold_in(key, index), mask))
      out["label"] = labels
      out["mask"] = mask
      return out

    self._jitted = jax.jit(_step, in_shardings=(repl, batch, batch, batch, repl, repl),
                           out_shardings=batch)
    self._params_src = None
    self._params = None

  def _replicated_params(self, params: PyTree) -> PyTree:
    # Re-place only when the caller passes different weights (identity of params or of each element
    # of a (classifier, score) tuple): a 2 GB score model is not re-sent for each of 95 datasets.
    src = self._params_src
    same = src is params or (isinstance(src, tuple) and isinstance(params, tuple)
                             and len(src) == len(params) and all(a is b for a, b in zip(src, params)))
    if not same:
      self._params = shd.replicate(params, self.mesh)
      self._params_src = params
    return self._params

  def run(self, params: PyTree, batches: Iterable[Mapping[str, np.ndarray]], key: jax.Array, *,
          desc: str | None = None, total: int | None = None, batch_size: int | None = None,
          gather: bool = True) -> dict[str, np.ndarray]:
    """Runs over all batches; returns the concatenated per-example outputs of real rows only
    (plus "label"). `batch_size`: pad every batch to this (default: the first batch's size). `gather`
    False: only the rows this process fed (in a multi-process run; for outputs too big to copy to every
    host, e.g. OOD features, reduced locally and then gathered)."""
    params = self._replicated_params(params)
    ndev = self.mesh.size
    # Each process feeds its own rows; the padded per-process size must split over its devices.
    multiple = ndev // jax.process_count()
    results: list[dict[str, np.ndarray]] = []
    pending = None
    target = batch_size
    for index, batch in enumerate(_progress(batches, desc, total)):
      if "image" not in batch or "label" not in batch:
        raise ValueError(f"eval batches need 'image' and 'label' keys, got {sorted(batch)}")
      images = np.asarray(batch["image"])
      n = len(images)
      mask = np.asarray(batch.get("mask", np.ones(n, np.float32)), np.float32)
      if target is None:
        if jax.process_count() > 1 and n % multiple:
          # Padding each process's rows would put padding between them: examples would sit at other rows of
          # the global batch than in a one-process run, and per-row noise (DE, DDA) would differ.
          raise ValueError(f"each process feeds {n} rows, not a multiple of its {multiple} devices: make the "
                           f"eval batch size a multiple of the {ndev} devices")
        target = -(-n // multiple) * multiple
      if n > target:
        raise ValueError(f"batch {index} has {n} rows, more than the static batch size {target}")
      padded, pad_mask = shd.pad_to_multiple(
          {"image": images, "label": np.asarray(batch["label"], np.int32), "mask": mask}, target)
      if len(padded["image"]) != target:  # pad_to_multiple rounds up to a multiple of `target`
        raise ValueError(f"could not pad batch {index} of {n} rows to {target}")
      padded["mask"] = padded["mask"] * pad_mask
      arrays = shd.shard_batch(padded, self.mesh)
      out = self._jitted(params, arrays["image"], arrays["label"], arrays["mask"], key,
                         jnp.asarray(index, jnp.int32))
      # Keep one batch in flight: fetch the previous result while this one computes (and never queue
      # dozens of sharded steps, which aborts with many fake CPU devices).
      if pending is not None:
        results.append(_real_rows(_fetch(pending, gather)))
      pending = out
    if pending is not None:
      results.append(_real_rows(_fetch(pending, gather)))
    if not results:
      raise ValueError(f"no batches to evaluate ({desc or 'dataset'} is empty)")
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def run_sharded(step_fn: StepFn, params: PyTree, batches: Iterable[Mapping[str, np.ndarray]],
                key: jax.Array | None = None, *, mesh: Mesh | None = None, desc: str | None = None,
                total: int | None = None) -> dict[str, np.ndarray]:
  """One-shot `ShardedRunner(step_fn, mesh).run(params, batches, key)`."""
  key = jax.random.key(0) if key is None else key
  return ShardedRunner(step_fn, mesh).run(params, batches, key, desc=desc, total=total)


def batches_from_arrays(images: np.ndarray, labels: np.ndarray, batch_size: int
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Numpy arrays -> eval batches `{"image", "label", "mask"}` with a zero-padded last batch."""
  images, labels = np.asarray(images), np.asarray(labels)
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  for s in range(0, len(images), batch_size):
    b = {"image": images[s:s + batch_size], "label": labels[s:s + batch_size].astype(np.int32)}
    padded, mask = shd.pad_to_multiple(b, batch_size)
    padded["mask"] = mask
    yield padded
