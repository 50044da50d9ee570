"""Train state: a plain pytree with no RNG and no score-model parameters.

Keys are derived per step with `jax.random.fold_in(train_key, state.step)`, so the state needs no RNG and a
resumed run is exact by construction. The frozen score model used by DiffAug is an explicit argument of the
step (never part of this state, the optimizer or the checkpoint).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params / batch_stats: float32 pytrees; opt_state: optax state (float32).

  `ema_params` is only used by the score-model mode (DDPM training keeps an exponential moving average of the
  parameters, which is what sampling / DiffAug use); it is `None` (an empty pytree) for classifiers.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  ema_params: PyTree = None

  @classmethod
  def create(cls, variables: dict, tx: optax.GradientTransformation, *, ema: bool = False) -> "TrainState":
    """Builds step-0 state from Flax `variables` ({"params": ..., optional "batch_stats": ...})."""
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    # Copy for the EMA so the buffers are distinct (the state is donated to the step).
    ema_params = jax.tree.map(jnp.array, params) if ema else None
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), ema_params=ema_params)

  def variables(self, *, ema: bool = False) -> dict:
    """Flax variables for `module.apply` (EMA params when `ema` and available)."""
    params = self.ema_params if (ema and self.ema_params is not None) else self.params
    out = {"params": params}
    if self.batch_stats:
      out["batch_stats"] = self.batch_stats
    return out
