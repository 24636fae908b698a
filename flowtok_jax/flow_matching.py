"""Flow matching between two token sets: interpolant, time sampler, null-indicator roll, samplers.

Convention (SPEC §2): t = 0 is the **source**, t = 1 the **target**, σ_min = 1e-5:

    x_t = (1 - (1 - σ_min)·t)·x_src + t·x_tgt          v* = x_tgt - (1 - σ_min)·x_src

For text-to-image the source is the text tokens z_T and the target the image tokens z_I; for
image-to-text they swap. The same code serves both: a direction d ∈ {0 = T2I, 1 = I2T} travels
with every example and reaches the velocity network.

A velocity function has the signature

    velocity_fn(x [B, K, C], t [B], null [B] int32, direction [B] int32 | None) -> v [B, K, C]

(`null` = 1 asks for the unconditional velocity of classifier-free guidance). Every sampler here
is a pure, traceable function whose ODE loop is a `lax.fori_loop`: wrapped in one `jax.jit`, the
whole trajectory is one compiled program, never a Python loop of calls.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from flowtok_jax.errors import UserError

SIGMA_MIN = 1e-5
# The reference sampler stops its time grid this far short of t = 1.
PARITY_T_END = 1.0 - 1e-5

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array, Optional[jax.Array]], jax.Array]
SAMPLERS = ("euler", "heun")
GRIDS = ("parity", "uniform")


# -- training-side pieces -------------------------------------------------------------------------

def _expand_t(t: jax.Array, like: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] broadcastable against `like`."""
  return t.reshape(t.shape + (1,) * (like.ndim - t.ndim)).astype(like.dtype)


def interpolate(x_src: jax.Array, x_tgt: jax.Array, t: jax.Array,
                sigma_min: float = SIGMA_MIN) -> jax.Array:
  """Point on the conditional path at time t.

  Args:
    x_src: [B, ...] source sample (t = 0).
    x_tgt: [B, ...] target sample (t = 1).
    t: [B] times in [0, 1].
    sigma_min: the path ends at σ_min·x_src + x_tgt.
  Returns:
    [B, ...] x_t = (1 - (1 - σ_min)·t)·x_src + t·x_tgt.
  """
  tb = _expand_t(t, x_src)
  return (1.0 - (1.0 - sigma_min) * tb) * x_src + tb * x_tgt


def target_velocity(x_src: jax.Array, x_tgt: jax.Array, sigma_min: float = SIGMA_MIN) -> jax.Array:
  """d/dt of `interpolate`: [B, ...] v* = x_tgt - (1 - σ_min)·x_src (independent of t)."""
  return x_tgt - (1.0 - sigma_min) * x_src


def sample_time(rng: jax.Array, batch_size: int, loc=0.0, scale: float = 1.0) -> jax.Array:
  """Logit-normal times: [B] sigmoid(N(loc, scale²)), one draw per example (SPEC: N(0, 1)).

  `loc` may be a [B] array (a per-example location, e.g. per direction).
  """
  z = jax.random.normal(rng, (batch_size,), jnp.float32)
  return jax.nn.sigmoid(loc + scale * z)


def per_example_mse(v_pred: jax.Array, v_target: jax.Array) -> jax.Array:
  """[B] mean over every non-batch axis (K·C) of the squared velocity error, in float32."""
  err = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
  return err.reshape(err.shape[0], -1).mean(axis=1)


def _roll_marked(target: jax.Array, mask: jax.Array) -> jax.Array:
  """Rolls the rows of `target` selected by `mask` by one among themselves, within one shard.

  The k-th marked row (in index order) takes the target of the (k+1)-th marked row, the last one
  takes the first's: the same direction as the reference's `cat((tgt[1:], tgt[:1]))` over the
  marked rows. Unmarked rows are untouched. Shapes are static, so this runs inside jit.

  Args:
    target: [n, ...] targets of one shard.
    mask: [n] bool, at least two True (callers clear masks with fewer).
  Returns:
    [n, ...] targets with the marked rows rolled.
  """
  n = mask.shape[0]
  count = mask.sum()
  rank = jnp.cumsum(mask) - 1  # rank of each marked row among the marked rows
  # Indices of the marked rows, in index order, at the front (stable sort puts False after True).
  order = jnp.argsort(~mask, stable=True)
  source_rank = jnp.where(count > 0, (rank + 1) % jnp.maximum(count, 1), 0)
  src = jnp.where(mask, order[source_rank], jnp.arange(n))
  return jnp.take(target, src, axis=0)


def null_roll(rng: jax.Array, target: jax.Array, *, p: float = 0.1, num_shards: int = 1,
              groups: Optional[jax.Array] = None,
              num_groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """CrossFlow-style null indicator for classifier-free guidance, per data shard.

  Each example is marked null with probability `p`. Within a shard, if at most one example is
  marked the marks are cleared (a single marked example cannot be paired with an unrelated
  target); otherwise the **targets** of the marked examples are rolled by one among themselves
  and their indicator is 1. The null example thus learns to flow from its own source to an
  unrelated target, which is what "unconditional" means for a source-to-target flow.

  "Per shard" mirrors the reference, which rolls within each device's local batch: the global
  batch [B, ...] is viewed as `num_shards` contiguous blocks [S, B/S, ...] (the layout a batch
  sharded over the data axes has) and each block rolls only among its own examples, so the
  gather stays on-device under jit. `num_shards = 1` treats the whole batch as one shard.

  `groups` splits each shard further: a two-direction batch rolls T2I targets (images) only
  among T2I examples and I2T targets (text tokens) only among I2T examples, so a null example
  never gets a target of the other modality. The "at most one marked" rule applies per group.

  Args:
    rng: PRNG key.
    target: [B, ...] flow targets.
    p: marking probability per example.
    num_shards: number of data shards of the batch axis; must divide B.
    groups: optional [B] int32 group id in [0, num_groups) (the direction); None: one group.
    num_groups: number of groups (static).
  Returns:
    (target [B, ...] with marked targets rolled, null [B] int32 in {0, 1}).
  """
  b = target.shape[0]
  if num_shards < 1 or b % num_shards:
    raise UserError(f"batch of {b} examples does not split into {num_shards} data shards")
  n = b // num_shards
  marked = (jax.random.uniform(rng, (b,)) < p).reshape(num_shards, n)
  group = (jnp.zeros((num_shards, n), jnp.int32) if groups is None
           else groups.astype(jnp.int32).reshape(num_shards, n))
  blocks = target.reshape((num_shards, n) + target.shape[1:])
  out, null = blocks, jnp.zeros((num_shards, n), bool)
  for g in range(num_groups):
    mask = marked & (group == g)
    mask = mask & (mask.sum(axis=1, keepdims=True) > 1)
    rolled = jax.vmap(_roll_marked)(blocks, mask)
    out = jnp.where(mask.reshape(mask.shape + (1,) * (target.ndim - 1)), rolled, out)
    null = null | mask
  return out.reshape(target.shape), null.reshape(b).astype(jnp.int32)


# -- samplers -------------------------------------------------------------------------------------

def _direction_array(direction, batch_size: int) -> Optional[jax.Array]:
  """None stays None (T2I-only model); an int or [B] array becomes [B] int32."""
  if direction is None:
    return None
  return jnp.broadcast_to(jnp.asarray(direction, jnp.int32), (batch_size,))


def guided_velocity(velocity_fn: VelocityFn, x: jax.Array, t: jax.Array,
                    direction: Optional[jax.Array], cfg_scale) -> jax.Array:
  """Velocity with classifier-free guidance, v = v_u + s·(v_c - v_u).

  The conditional and null passes go through ONE forward of batch 2B. A Python `cfg_scale` of
  None or 1.0 skips the null pass (a traced scale always runs it, since it cannot be inspected).

  Args:
    velocity_fn: see the module docstring.
    x: [B, K, C] current state.
    t: [B] time.
    direction: [B] int32 or None.
    cfg_scale: guidance scale s (Python float, traced scalar, or None).
  Returns:
    [B, K, C] guided velocity.
  """
  b = x.shape[0]
  cond = jnp.zeros((b,), jnp.int32)
  if cfg_scale is None or (isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0):
    return velocity_fn(x, t, cond, direction)
  d2 = None if direction is None else jnp.concatenate([direction, direction])
  v = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                  jnp.concatenate([cond, jnp.ones((b,), jnp.int32)]), d2)
  v_c, v_u = v[:b], v[b:]
  return v_u + jnp.asarray(cfg_scale, v.dtype) * (v_c - v_u)


def sample(velocity_fn: VelocityFn, x0: jax.Array, *, steps: int = 20, cfg_scale=2.0,
           sampler: str = "euler", grid: str = "parity", direction=None) -> jax.Array:
  """Integrates dx/dt = v(x, t) from t = 0 (the source x0) to t = 1 in one traceable program.

  Grids:
    `parity` (Euler only): the reference rule. The model is evaluated at
      t_i = linspace(0, 1 - 1e-5, N)[i] (spacing (1 - 1e-5)/(N - 1)) while each step advances
      by the constant (1 - 1e-5)/N. The mismatch is a quirk of the reference, kept for parity.
    `uniform`: t_i = i/N and step 1/N, the consistent first-order scheme.
  Samplers:
    `euler`: N model evaluations.
    `heun`: uniform grid only; explicit trapezoid (predictor at t_i + h, corrector
      x += h/2·(k1 + k2)) on every step including the last, which evaluates the model at t = 1.
      The flow's velocity is finite there (σ_min > 0 and no noise schedule), so the last step
      does not fall back to Euler and the scheme is second order throughout: 2N evaluations.

  Args:
    velocity_fn: see the module docstring.
    x0: [B, K, C] source tokens (text tokens for T2I, image tokens for I2T).
    steps: N, the number of steps (static).
    cfg_scale: guidance scale s; None or 1.0 skips the null pass.
    sampler: 'euler' or 'heun'.
    grid: 'parity' or 'uniform'.
    direction: None (a T2I-only model has no direction input), 0 (T2I), 1 (I2T) or [B] int32.
  Returns:
    [B, K, C] the state at t = 1 (the generated target tokens).
  """
  if sampler not in SAMPLERS:
    raise UserError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
  if grid not in GRIDS:
    raise UserError(f"unknown time grid {grid!r} (choose from {', '.join(GRIDS)})")
  if sampler == "heun" and grid != "uniform":
    raise UserError("the heun sampler needs grid='uniform' (the parity grid is an Euler quirk)")
  if int(steps) < 1:
    raise UserError(f"sampling needs at least one step, got {steps}")
  steps = int(steps)
  b = x0.shape[0]
  d = _direction_array(direction, b)

  def v_at(x, t_scalar):
    t = jnp.full((b,), t_scalar, jnp.float32)
    return guided_velocity(velocity_fn, x, t, d, cfg_scale).astype(x.dtype)

  if sampler == "euler":
    if grid == "parity":
      # linspace(0, T, N)[i] = i·T/(N-1); N = 1 evaluates only t = 0.
      t_spacing = PARITY_T_END / max(steps - 1, 1)
      dt = PARITY_T_END / steps
    else:
      t_spacing = dt = 1.0 / steps

    def euler_step(i, x):
      return x + dt * v_at(x, i * t_spacing)

    return jax.lax.fori_loop(0, steps, euler_step, x0)

  h = 1.0 / steps

  def heun_step(i, x):
    t = i * h
    k1 = v_at(x, t)
    k2 = v_at(x + h * k1, t + h)
    return x + (0.5 * h) * (k1 + k2)

  return jax.lax.fori_loop(0, steps, heun_step, x0)


def function_evaluations(steps: int, sampler: str = "euler", cfg_scale=2.0) -> int:
  """Number of network forwards per example (a CFG step counts the null pass too)."""
  per_step = 2 if sampler == "heun" else 1
  guided = not (cfg_scale is None or cfg_scale == 1.0)
  return steps * per_step * (2 if guided else 1)
