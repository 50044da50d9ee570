"""Host-side metric plumbing: JSONL writer (process 0 only), progress line, throughput, non-finite guard,
atomic text files."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


def write_text_atomic(path: str, text: str) -> None:
  """Writes `path` whole or not at all (a temporary file moved into place): a run stopped mid-write leaves
  the previous config.json / results.json as it was, not cut off."""
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss is NaN/Inf; the message names the step."""


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Device scalars -> Python floats (this blocks on the values; one transfer for the whole dict)."""
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def check_finite(metrics: Mapping[str, float], step: int, key: str = "loss") -> None:
  value = metrics.get(key)
  if value is not None and not math.isfinite(value):
    raise NonFiniteLossError(
        f"non-finite {key} ({value}) at step {step}; stopping. Metrics at that step: {dict(metrics)}")


def check_local_path(path: str, what: str) -> None:
  """Workdirs are written with the file system's calls (metrics, config, results, orbax's local paths): a
  URL such as gs://bucket/run would become a local folder named "gs:" on each host, and a preempted run
  would restart from scratch on a fresh VM. Refused with the way to do it."""
  if "://" in str(path):
    raise ValueError(f"{what} {path} is a URL: workdirs must be file system paths. Mount the bucket (e.g. "
                     "gcsfuse) or a shared file system at the same path on every host and pass that path")


class MetricWriter:
  """Appends one JSON object per line to `workdir/<name>` on process 0 (no-op elsewhere)."""

  def __init__(self, workdir: str, name: str = "metrics.jsonl", *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, name)
    self._f = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._f = open(self.path, "a", buffering=1)

  def write(self, step: int, metrics: Mapping[str, Any], **extra) -> None:
    if not self._f:
      return
    row = {"step": int(step), **extra}
    row.update({k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                for k, v in metrics.items()})
    self._f.write(json.dumps(row) + "\n")

  def close(self) -> None:
    if self._f:
      self._f.close()
      self._f = None


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A one-line progress bar: step/total, loss, accuracy, images/s, ETA. Prints on process 0.

  Uses carriage returns on a TTY and plain lines otherwise (logs stay readable).
  """

  def __init__(self, total_steps: int, global_batch_size: int, *, prefix: str = "train",
               stream=None, enabled: bool | None = None):
    self.total = int(total_steps)
    self.batch = int(global_batch_size)
    self.prefix = prefix
    self.stream = stream or sys.stdout
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._t = None
    self._step = None

  def start(self, step: int) -> None:
    self._t, self._step = time.perf_counter(), int(step)

  def update(self, step: int, metrics: Mapping[str, float]) -> float:
    """Reports metrics at `step` (after the values were fetched); returns images/s since the last call."""
    now = time.perf_counter()
    if self._t is None:
      self.start(step)
      return 0.0
    dt = max(now - self._t, 1e-9)
    ips = (int(step) - self._step) * self.batch / dt
    steps_per_s = (int(step) - self._step) / dt
    self._t, self._step = now, int(step)
    if self.enabled:
      eta = (self.total - int(step)) / steps_per_s if steps_per_s > 0 else float("nan")
      frac = int(step) / max(self.total, 1)
      bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
      parts = [f"{self.prefix} [{bar}] {int(step)}/{self.total}"]
      if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
      if "accuracy" in metrics:
        parts.append(f"acc {100 * metrics['accuracy']:.1f}%")
      parts.append(f"{ips:,.0f} img/s")
      if math.isfinite(eta):
        parts.append(f"eta {eta:.0f}s")
      line = " | ".join(parts)
      self.stream.write(("\r" + line) if self.tty else (line + "\n"))
      self.stream.flush()
    return ips

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()
