"""Test helper: random Flax variables from shapes only (compiling RNG-based initialisers costs seconds on a
busy 2-core CPU). Variance-like leaves get 1, everything else 0.3 N(0, 1)."""

import jax
import jax.numpy as jnp
import numpy as np


def fast_init(module, shape, seed=0):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: np.ones(x.shape, np.float32) if "var" in str(p[-1])
      else (0.3 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
