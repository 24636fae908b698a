"""The explicit train state every stage shares, and the EMA update.

The state is a `flax.struct.dataclass`, so it is a pytree: the train step is a pure
`(state, batch) -> (state, metrics)`, jitted with shardings for every leaf, and orbax saves it
as is.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (frozen parts from earlier stages are not in it).

  Attributes:
    step: int32 scalar, number of updates taken.
    params: trainable parameters (unboxed arrays).
    opt_state: optax state of `params`.
    ema_params: EMA of `params`, or None when the stage has no EMA.
    rng: uint32 [2] base key; the step's key is `fold_in(rng, step)`, so resuming replays the
      exact same randomness.
    aux_params: the auxiliary module's parameters (e.g. PatchGAN discriminator), or None.
    aux_opt_state: its optax state, or None.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  aux_params: Any = None
  aux_opt_state: Any = None

  @property
  def eval_params(self):
    """The parameters evaluators and export use: EMA when there is one."""
    return self.params if self.ema_params is None else self.ema_params


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
  """Returns `decay * ema + (1 - decay) * params`, leaf by leaf, in each leaf's dtype.

  Args:
    ema: the running average (pytree).
    params: the new parameters (same structure).
    decay: in [0, 1]; 1 freezes the average, 0 copies the params.
  """
  def one(e, p):
    d = jnp.asarray(decay, jnp.float32)
    return (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype)
  return jax.tree.map(one, ema, params)
