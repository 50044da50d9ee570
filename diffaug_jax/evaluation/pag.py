"""Perceptually aligned gradients (paper Fig. 3): input-gradients of the class logit on diffused images.

For an image x0 in [-1, 1], draw x_t = q_sample(x0, t, eps) (default t = 300) and compute
d logit_y(x_t) / d x_t with `jax.grad`. Each gradient image is min-max normalised to [0, 1]; with
`contrast=True` it is first clipped to its [p, 100 - p] percentiles (contrast stretching, default p = 1),
which makes the faint structure of robust-model gradients visible. The PNG grid has one row per image and
columns [x0, x_t, grad(model 1), ..., grad(model M)] so models can be compared side by side.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffaug_jax import diffusion
from diffaug_jax.evaluation import loading

Array = jax.Array
LogitFn = Callable[[Array, Array], Array]  # (x_t (B, H, W, C), t (B,)) -> logits (B, K)


def diffuse(key: Array, x0: Array, t: int, schedule: diffusion.Schedule) -> Array:
  """x_t = q_sample(x0, t, eps) with fresh eps; x0 (B, H, W, C) in [-1, 1]; t an int in [0, T) (the table
  gather would clamp or wrap any other, and the results would name the t asked for)."""
  if not 0 <= int(t) < schedule.num_timesteps:
    raise ValueError(f"PAG t must lie in [0, {schedule.num_timesteps}), got {t}")
  tt = jnp.full(x0.shape[:1], t, jnp.int32)
  return diffusion.q_sample(schedule, x0.astype(jnp.float32), tt,
                            jax.random.normal(key, x0.shape, jnp.float32))


def logit_gradients(logit_fn: LogitFn, x: Array, t: Array, labels: Array) -> Array:
  """d logits[i, labels[i]] / d x[i] for each example (examples independent: eval-mode networks)."""
  def total(xx):
    logits = logit_fn(xx, t)
    return jnp.sum(jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=1))
  return jax.grad(total)(x)


# Program-level jits (task module, not the pure core). A `jax.tree_util.Partial` logit_fn is a pytree whose
# leaves (the weights) are jit arguments; any other callable is static (one compile per object), and the
# weights it closes over are baked into the program as constants.
_jit_logit_gradients = jax.jit(logit_gradients)
_jit_logit_gradients_static = jax.jit(logit_gradients, static_argnums=0)


def _apply_eval(module, variables, x, t):
  del t  # plain classifiers ignore the timestep
  return module.apply(variables, x, train=False)


def pag_gradients(key: Array, x0: Array, labels: Array, logit_fn: LogitFn, schedule: diffusion.Schedule,
                  t: int = 300) -> tuple[Array, Array]:
  """(x_t, gradients), both (B, H, W, C). `logit_fn(x_t, t)` may ignore t (plain classifiers)."""
  x_t = diffuse(key, x0, t, schedule)
  return x_t, logit_gradients(logit_fn, x_t, jnp.full(x0.shape[:1], t, jnp.int32), labels)


def normalize_gradients(g: np.ndarray, *, contrast: bool = False, percentile: float = 1.0) -> np.ndarray:
  """Per-image min-max to [0, 1] (B, H, W, C); with `contrast`, clip to the [p, 100-p] percentiles first."""
  g = np.asarray(g, np.float64)
  out = np.empty_like(g)
  for i in range(g.shape[0]):
    gi = g[i]
    if contrast:
      lo, hi = np.percentile(gi, [percentile, 100.0 - percentile])
      gi = np.clip(gi, lo, hi)
    lo, hi = gi.min(), gi.max()
    out[i] = (gi - lo) / (hi - lo) if hi > lo else np.zeros_like(gi)
  return out.astype(np.float32)


def save_grid(path: str, columns: Sequence[np.ndarray], *, upscale: int | None = None, pad: int = 2) -> None:
  """Writes a PNG grid: columns[j] is (B, H, W, C) in [0, 1]; row i shows example i of every column."""
  from PIL import Image
  cols = [np.asarray(c, np.float32) for c in columns]
  b, h, w, _ = cols[0].shape
  if any(c.shape[:3] != (b, h, w) for c in cols):
    raise ValueError(f"grid columns differ in shape: {[c.shape for c in cols]}")
  up = upscale or max(1, 96 // max(h, w))
  hh, ww = h * up, w * up
  canvas = np.ones((b * (hh + pad) + pad, len(cols) * (ww + pad) + pad, 3), np.float32)
  for j, c in enumerate(cols):
    c = np.repeat(c, 3, axis=-1) if c.shape[-1] == 1 else c
    c = np.repeat(np.repeat(c, up, axis=1), up, axis=2)
    for i in range(b):
      y, x = pad + i * (hh + pad), pad + j * (ww + pad)
      canvas[y:y + hh, x:x + ww] = np.clip(c[i], 0.0, 1.0)
  if loading.is_primary():  # one writer per file (multi-host)
    Image.fromarray((canvas * 255 + 0.5).astype(np.uint8)).save(path)


def pag_figure(key: Array, x0: np.ndarray, labels: np.ndarray, logit_fns: Mapping[str, LogitFn],
               schedule: diffusion.Schedule, path: str, *, t: int = 300, contrast: bool = True,
               percentile: float = 1.0) -> dict[str, np.ndarray]:
  """Same x_t for every model; writes the grid and returns {"x_t": ..., model name: raw gradients}.
  A `jax.tree_util.Partial` logit_fn passes its weights to the jitted gradient as arguments (`run` does)."""
  x0 = jnp.asarray(x0, jnp.float32)
  x_t = diffuse(key, x0, t, schedule)
  tt = jnp.full(x0.shape[:1], t, jnp.int32)
  out = {"x_t": np.asarray(x_t)}
  cols = [(np.asarray(x0) + 1) / 2, np.clip((np.asarray(x_t) + 1) / 2, 0, 1)]
  for name, fn in logit_fns.items():
    grad_fn = _jit_logit_gradients if isinstance(fn, jax.tree_util.Partial) else _jit_logit_gradients_static
    g = np.asarray(grad_fn(fn, x_t, tt, jnp.asarray(labels)))
    out[name] = g
    cols.append(normalize_gradients(g, contrast=contrast, percentile=percentile))
  save_grid(path, cols)
  return out


def run(config, workdir: str) -> dict:
  """pag task. config: models {name: classifier cfg (workdir | name+num_classes+params_path)}, data {...},
  t (300), contrast (True), percentile (1.0), num_images (8), seed. Writes pag.png and pag.json."""
  os.makedirs(workdir, exist_ok=True)
  g = lambda k, d: loading.cfg_get(config, k, d)
  images, labels = loading.load_arrays(config.data)
  n = int(g("num_images", 8))
  images, labels = images[:n], labels[:n]
  fns = {}
  for name, mcfg in config.models.items():
    module, variables = loading.load_classifier(mcfg, what=f"config.models.{name}", data_cfg=config.data)
    fns[name] = jax.tree_util.Partial(functools.partial(_apply_eval, module), variables)
  t = int(g("t", 300))
  sched = diffusion.linear_schedule(int(g("num_timesteps", 1000)))
  path = os.path.join(workdir, "pag.png")
  pag_figure(jax.random.key(int(g("seed", 0))), images, labels, fns, sched, path, t=t,
             contrast=bool(g("contrast", True)), percentile=float(g("percentile", 1.0)))
  info = {"png": path, "t": t, "models": list(fns), "labels": labels.tolist(),
          "columns": ["x0", "x_t"] + list(fns)}
  loading.write_json(os.path.join(workdir, "pag.json"), info)
  loading.write_results(workdir, info, f"Perceptually aligned gradients at t={t}: pag.png (rows: images; "
                        f"columns: {', '.join(info['columns'])})\n")
  return info
