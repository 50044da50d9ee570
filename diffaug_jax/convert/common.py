"""Shared pieces of the PyTorch -> Flax converters: reading state dicts, strict checks, layouts, files.

Reads `.pt`/`.pth` (needs torch; loaded with `weights_only=True`), `.npz` and `.safetensors` (no torch), or
an in-memory mapping of names to arrays. Converted params are written as flax msgpack with a sha256
sidecar, so they reload in milliseconds without torch and a corrupted copy is detected.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import pickle
import zipfile
import zlib
from typing import Any, Iterable, Mapping

import numpy as np

StateDict = dict[str, np.ndarray]


class CheckpointMismatchError(ValueError):
  """A state dict does not fit the model: lists every missing, unexpected and mis-shaped key."""


def _to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch here
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def _unwrap(obj: Any) -> Mapping[str, Any]:
  # Training scripts save {"state_dict": ...}, {"model": ...} or {"ema": ...}; DataParallel adds "module.".
  while isinstance(obj, Mapping):
    for wrapper in ("state_dict", "model", "model_ema", "ema"):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
    else:
      return obj
  raise ValueError(f"expected a mapping of parameter names to arrays, got {type(obj).__name__}")


def _unreadable(path: pathlib.Path, fmt: str, e: BaseException) -> ValueError:
  # One message for every reader: which file, read as what, and what the reader said (kept as __cause__).
  return ValueError(f"cannot read {path} as {fmt} ({type(e).__name__}: {e}): the file is truncated, corrupt or "
                    f"not in that format; re-download or re-export it")


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
  """Reads a state dict into {name: numpy array}; strips `module.` / `param/` prefixes."""
  if isinstance(source, Mapping):
    raw = _unwrap(source)
  else:
    path = pathlib.Path(source)
    if not path.is_file():
      raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
      try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):  # a bare .npy renamed .npz: one unnamed array
          raise ValueError("it holds a single .npy array, not named arrays")
        with z:
          raw = {k: z[k] for k in z.files}
      except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise _unreadable(path, ".npz", e) from e
      if any(k.startswith("param/") for k in raw):
        raw = {k[len("param/"):]: v for k, v in raw.items() if k.startswith("param/")}
    elif suffix == ".safetensors":
      from safetensors import SafetensorError  # optional dependency
      from safetensors.numpy import load_file
      try:
        raw = load_file(str(path))
      except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise _unreadable(path, ".safetensors", e) from e
    elif suffix in (".pt", ".pth", ".bin", ".ckpt", ".tar"):  # .tar: AugMix/DeepAugment's .pth.tar
      try:
        import torch  # optional dependency: pip install diffaug_jax[torch]
      except ImportError:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install 'diffaug_jax[torch]'); or convert it to .npz / "
            ".safetensors first") from None
      try:
        # torch raises RuntimeError for a broken zip archive, UnpicklingError for a bad / disallowed pickle.
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
      except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise _unreadable(path, "a PyTorch file (torch.load, weights_only=True)", e) from e
      raw = _unwrap(loaded)
    else:
      raise ValueError(f"unknown checkpoint format {suffix!r} for {path}: use .pt, .npz or .safetensors")
  out = {}
  for k, v in raw.items():
    k = k[len("module."):] if k.startswith("module.") else k
    out[k] = _to_numpy(v)
  return out


def key_mismatches(expected: Mapping[str, tuple[int, ...]], got_shapes: Mapping[str, tuple[int, ...]]
                   ) -> tuple[list[str], list[str], list[str]]:
  """(missing, unexpected, mis-shaped) keys of `got_shapes` against `expected` (both {key: shape}), sorted."""
  missing = sorted(set(expected) - set(got_shapes))
  unexpected = sorted(set(got_shapes) - set(expected))
  misshaped = sorted(k for k in set(expected) & set(got_shapes)
                     if tuple(expected[k]) != tuple(got_shapes[k]))
  return missing, unexpected, misshaped


def check_keys(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, Any], what: str,
               ignore: Iterable[str] = ()) -> None:
  """Raises CheckpointMismatchError naming ALL missing, unexpected and mis-shaped keys at once.

  `ignore`: substrings of keys that are dropped from `got` before the check (e.g. num_batches_tracked).
  """
  ignore = tuple(ignore)
  got_shapes = {k: tuple(np.shape(v)) for k, v in got.items() if not any(s in k for s in ignore)}
  missing, unexpected, misshaped = key_mismatches(expected, got_shapes)
  if missing or unexpected or misshaped:
    lines = [f"checkpoint does not match {what}:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if misshaped:
      lines.append(f"  mis-shaped ({len(misshaped)}): " + ", ".join(
          f"{k} expected {tuple(expected[k])} got {got_shapes[k]}" for k in misshaped))
    raise CheckpointMismatchError("\n".join(lines))


def conv_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)."""
  if w.ndim != 4:
    raise ValueError(f"expected a 4-D conv weight, got shape {w.shape}")
  return np.transpose(w, (2, 3, 1, 0))


def linear_to_dense(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight (O, I) -> Flax Dense kernel (I, O)."""
  if w.ndim != 2:
    raise ValueError(f"expected a 2-D linear weight, got shape {w.shape}")
  return np.transpose(w)


def conv1d_to_dense(w: np.ndarray) -> np.ndarray:
  """PyTorch 1x1 Conv1d weight (O, I, 1) -> Flax Dense kernel (I, O)."""
  if w.ndim != 3 or w.shape[-1] != 1:
    raise ValueError(f"expected a (O, I, 1) Conv1d weight, got shape {w.shape}")
  return np.transpose(w[..., 0])


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def check_output_path(src: str | os.PathLike | None, dst: str | os.PathLike) -> None:
  """Raises ValueError, before anything is read or written, when writing DST would fail or destroy SRC.

  DST may not be an existing directory, nor sit below an existing file, nor be SRC itself (also through a
  symlink or hard link): the converted msgpack would replace the only copy of the source checkpoint.
  """
  dst = pathlib.Path(dst)
  if dst.is_dir():
    raise ValueError(f"output {dst} is a directory: give a file path for DST, e.g. {dst / 'model.msgpack'}")
  parent = dst.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise ValueError(f"output {dst} cannot be written: {parent} is a file, not a directory")
  if src is not None and dst.exists() and os.path.exists(src) and os.path.samefile(src, dst):
    raise ValueError(f"output {dst} is the source checkpoint {src}: converting would replace the source; "
                     "give DST a different file name, e.g. model.msgpack")


def save_params(path: str | os.PathLike, variables: Any) -> str:
  """Writes variables as flax msgpack plus `<path>.sha256`; returns the digest.

  The bytes go to `<path>.tmp` first and are moved into place only when complete, so a failed write leaves
  an existing `path` untouched and no partial `.tmp` behind.
  """
  from flax import serialization
  import jax
  check_output_path(None, path)
  data = serialization.msgpack_serialize(jax.tree.map(np.asarray, variables))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  finally:
    if tmp.is_file() or tmp.is_symlink():  # only after a failure: os.replace moved it otherwise
      tmp.unlink()
  digest = _sha256(data)
  path.with_name(path.name + ".sha256").write_text(digest + "\n")
  return digest


def write_converted(dst: str | os.PathLike, variables: Any, description: str) -> str:
  """`save_params` plus the one-line report the converter CLIs print; returns the digest."""
  import jax
  digest = save_params(dst, variables)
  params = variables.get("params", variables) if isinstance(variables, Mapping) else variables
  n = sum(int(np.size(a)) for a in jax.tree.leaves(params))
  print(f"wrote {dst}: {description}, {n:,} params, sha256 {digest[:12]}")
  return digest


def load_params(path: str | os.PathLike, *, verify: bool = True) -> Any:
  """Reads variables written by `save_params`; checks the sha256 sidecar when present."""
  from flax import serialization
  import msgpack  # flax's own dependency; its exceptions name what failed to decode
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"params file not found: {path}")
  data = path.read_bytes()
  sidecar = path.with_name(path.name + ".sha256")
  if verify and sidecar.is_file():
    want = sidecar.read_text().strip()
    if _sha256(data) != want:
      raise ValueError(f"checksum mismatch for {path}: file is corrupted or was modified")
  try:
    variables = serialization.msgpack_restore(data)
  except (ValueError, TypeError, KeyError, msgpack.exceptions.UnpackException) as e:  # ExtraData etc.
    raise _not_converted(path, e) from e
  if not isinstance(variables, Mapping):
    raise _not_converted(path, TypeError(f"it holds a {type(variables).__name__}, not a dict of variables"))
  return variables


def _not_converted(path: pathlib.Path, e: BaseException) -> ValueError:
  return ValueError(
      f"{path} is not a flax msgpack params file written by `python -m diffaug_jax.convert` ({type(e).__name__}: "
      f"{e}); if it is a PyTorch / .npz / .safetensors checkpoint, convert it first: python -m diffaug_jax.convert "
      "{guided-diffusion|torchvision|deit} SRC DST.msgpack")
