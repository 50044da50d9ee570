"""Device mesh, shardings and host-local -> global arrays.

The program uses one mesh axis, `data`: the batch is split over it, everything else (train state, frozen
score-model params) is replicated. Under `jax.jit` with these shardings XLA sees the *global* batch, so
BatchNorm statistics and losses are global means: no `axis_name`, no pmap, and the same numbers on 1 or N
devices (up to float reassociation).

Multi-host: each process loads only its own slice of the global batch (`process_index` of `process_count`)
and `shard_batch` assembles the global `jax.Array` with `jax.make_array_from_process_local_data`. Host
values that evaluation reduces per process cross processes through `sum_over_processes` (counts) and
`allgather_rows` (per-example scores of unequal lengths).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

PyTree = Any


def initialize_distributed(force: bool | None = None, **kwargs) -> None:
  """Starts `jax.distributed` when running as one process of several.

  `force=None` detects a launch: a plain multi-process launch sets `JAX_COORDINATOR_ADDRESS` (+
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); SLURM (one task per GPU: JAX gives a task the GPU of its local rank),
  Open MPI and GKE TPU launches set their own variables. A Cloud TPU VM pod slice sets none (its hosts come
  from the metadata server): pass `force=True` there (the configs' `distributed`). Not started on a TPU VM by
  default, because on a one-host VM every process would claim to be process 0 of a one-process cluster at
  the same address, and a second job (an evaluation beside a training run) would kill the first.
  `check_multi_process` then stops a multi-host run that was not started. Call it from the program entry
  point, before any other JAX call; never at import.
  """
  if jax.distributed.is_initialized():
    return
  if force is None:
    env = os.environ
    force = bool(
        kwargs
        or env.get("JAX_COORDINATOR_ADDRESS")
        or env.get("SLURM_NTASKS", "1") not in ("", "1")
        or env.get("OMPI_COMM_WORLD_SIZE", "1") not in ("", "1")
        or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    )
  if force:
    jax.distributed.initialize(**kwargs)


def check_multi_process() -> None:
  """A host that is one of several processes (a TPU pod slice's runtime says so even without
  `jax.distributed`) but has no distributed client would fail later, at the first checkpoint barrier or
  collective; say what to do now."""
  if jax.process_count() > 1 and not jax.distributed.is_initialized():
    raise RuntimeError(
        f"this is process {jax.process_index()} of {jax.process_count()} but jax.distributed is not running: "
        "pass --config.distributed=True (Cloud TPU VM pod slices need it; other launchers are detected)")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes) with axis `data`.

  Random draws over a batch sharded on it equal the unsharded ones only with jax's partitionable threefry
  PRNG (its default since 0.5): results would otherwise depend on the device count, so that is an error."""
  if not getattr(jax.config, "jax_threefry_partitionable", True):
    raise RuntimeError("jax_threefry_partitionable is off (JAX_THREEFRY_PARTITIONABLE=0?): random draws would "
                       "depend on the device count; leave it at jax's default (True)")
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices).reshape(len(devices)), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data`; the rest unsplit."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, state: PyTree,
                    rule: Callable[[tuple, Any], P] | None = None) -> PyTree:
  """Shardings for a train state: replicated by default.

  `rule(path, leaf) -> PartitionSpec` is the hook for FSDP-style layouts (e.g. split the largest dimension
  of big kernels over `data`); it receives every leaf's key path.
  """
  if rule is None:
    return jax.tree.map(lambda _: replicated(mesh), state)
  return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, rule(p, x)), state)


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
  """This process's share of the global batch; checks it divides over devices and processes."""
  ndev = jax.device_count() if mesh is None else mesh.size
  if int(global_batch_size) <= 0:
    raise ValueError(f"global batch size must be positive, got {global_batch_size}")
  if global_batch_size % ndev:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the {ndev} devices of the mesh")
  return global_batch_size // jax.process_count()


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Host-local numpy batch (this process's slice) -> global arrays sharded on `data`.

  Every leaf has the local batch as leading dimension; the global batch is the concatenation over
  processes in `process_index` order.
  """
  sharding = batch_sharding(mesh)

  def one(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(one, batch)


def shard_global_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """A batch that every process holds whole (the same global batch on each, e.g. drawn from one seeded RNG)
  -> global arrays sharded on `data`, equal to it: each process contributes its contiguous rows. (Passing it
  to `shard_batch` as a local slice would make a global batch of process_count copies.)"""
  pi, pc = jax.process_index(), jax.process_count()

  def rows(x):
    x = np.asarray(x)
    if len(x) % pc:
      raise ValueError(f"a global batch of {len(x)} rows does not split over {pc} processes")
    k = len(x) // pc
    return x[pi * k:(pi + 1) * k]

  return shard_batch(jax.tree.map(rows, batch), mesh)


def eval_batch_size(requested: int, num_devices: int | None = None) -> int:
  """`requested` rounded up to a multiple of the device count (default: all devices). Eval batches are padded
  and masked, so any size works once every device gets whole rows; padding then sits only at the end of each
  global batch, whatever the process count (500 on 8 or 16 devices -> 504 or 512)."""
  n = jax.device_count() if num_devices is None else int(num_devices)
  return -(-int(requested) // n) * n


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree (identical on every process) replicated on the mesh."""
  return jax.device_put(tree, replicated(mesh))


def pad_to_multiple(batch: Mapping[str, np.ndarray], multiple: int
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Pads every leaf's leading dimension with zeros up to a multiple; returns (padded, mask).

  `mask` is float32 (n_padded,), 1 for real rows and 0 for padding, so evaluators count exactly at a
  static shape.
  """
  sizes = {k: np.shape(v)[0] for k, v in batch.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"batch leaves have different leading sizes: {sizes}")
  n = next(iter(sizes.values()))
  target = -(-n // multiple) * multiple if n else multiple
  pad = target - n
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) if pad else v
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return out, mask


# ------------------------------------------------------------------------------- host values across processes
def _allgather(x: np.ndarray) -> np.ndarray:
  """(P, ...) stack of every process's equally shaped host array."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def sum_over_processes(x) -> np.ndarray:
  """Elementwise sum over processes of an int64 host vector (itself in a one-process run). Sent as int32
  pairs, so counts past 2^31 stay exact without jax_enable_x64."""
  x = np.ascontiguousarray(x, np.int64).reshape(-1)
  if jax.process_count() == 1:
    return x
  return _allgather(x.view(np.int32)).view(np.int64).sum(0)


def allgather_rows(tree: PyTree) -> PyTree:
  """Every process's rows of a pytree of host arrays (leading dims equal within a process, possibly different
  across processes), concatenated in process order on every process."""
  leaves, treedef = jax.tree.flatten(tree)
  if jax.process_count() == 1 or not leaves:
    return tree
  n = len(leaves[0])
  counts = _allgather(np.array([n], np.int32))[:, 0]
  most = int(counts.max())
  out = []
  for x in leaves:
    x = np.asarray(x)
    if len(x) != n:
      raise ValueError(f"leaves with {n} and {len(x)} rows")
    padded = np.concatenate([x, np.zeros((most - n,) + x.shape[1:], x.dtype)])
    stacked = _allgather(padded)
    out.append(np.concatenate([stacked[p, :c] for p, c in enumerate(counts)]))
  return jax.tree.unflatten(treedef, out)
