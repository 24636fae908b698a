"""AdamW (or Muon) with weight-decay masks, warm-up schedules and optional clipping, from a config.

    opt = optim.make(config.optim, total_steps=config.train.total_steps)
    Stage(..., optimizer=opt.tx, learning_rate=opt.schedule)

Weight decay skips, by rule, every parameter with fewer than 2 dimensions (biases, norm scales,
1D tokens) and every parameter whose '/'-joined path matches one of `decay_exclude` (regexes:
norms, embedding tables, latent / mask tokens, learned positions), as the reference tokenizer and
DiT recipes do. The mask is computed from the parameter tree, so it works on boxed (logically
annotated) and plain trees alike.

`name = "muon"` (an option, not the paper's recipe) updates the kernels matching `muon_include`
(by default the transformer blocks' attention and MLP matrices) with Muon, orthogonalised
momentum scaled to AdamW's update size so the same lr applies, and the rest with (Nesterov)
AdamW; decay follows the same mask.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flowtok_jax.errors import UserError

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "muon")
# Kernels Muon updates (hidden transformer matrices); embeddings, heads, norms stay on AdamW.
MUON_INCLUDE = r"blocks_\d+/(attn|mlp)/[^/]+/kernel$"


class Optimizer(NamedTuple):
  """An optax transformation and the learning-rate schedule inside it (for logging)."""
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]


def path_name(path: Sequence[Any]) -> str:
  """Joins a jax key path into 'a/b/kernel' (box `.value` attributes and indices dropped)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":  # nn.LogicallyPartitioned boxes keep the array in `.value`.
        parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def decay_mask(params: Any, exclude: Sequence[str] = ()) -> Any:
  """Returns a tree of bools: True where weight decay applies.

  Args:
    params: parameter pytree (plain or boxed).
    exclude: regexes searched in each '/'-joined path; a match means no decay.
  """
  patterns = [re.compile(p) for p in exclude]
  def one(path, leaf):
    name = path_name(path)
    return jnp.ndim(leaf) >= 2 and not any(p.search(name) for p in patterns)
  return jax.tree_util.tree_map_with_path(one, params)


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> Callable[[Any], Any]:
  """Linear warm-up from 0 to `cfg.lr` over `warmup_steps`, then constant or cosine to `end_lr`.

  Args:
    cfg: the optim section (lr, warmup_steps, schedule, end_lr).
    total_steps: length of the run; the cosine reaches `end_lr` there.
  Returns:
    `step -> learning rate`.
  """
  if cfg.schedule not in SCHEDULES:
    raise UserError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
  if cfg.warmup_steps < 0 or not _finite(cfg.lr) or cfg.lr < 0:
    raise UserError(f"optim.lr and optim.warmup_steps must be finite and >= 0, got "
                    f"{cfg.lr} and {cfg.warmup_steps}")
  warmup = int(cfg.warmup_steps)
  lr = float(cfg.lr)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  else:
    decay_steps = max(int(total_steps) - warmup, 1)
    alpha = float(cfg.end_lr) / lr if lr else 0.0
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=alpha)
  if warmup == 0:
    return after
  ramp = optax.linear_schedule(0.0, lr, warmup)
  return optax.join_schedules([ramp, after], [warmup])


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_numbers(cfg: ml_collections.ConfigDict) -> None:
  """Refuses optimizer numbers that would train on NaN or not at all, naming the key."""
  for key, ok, want in (
      ("b1", lambda v: 0 <= v < 1, "in [0, 1)"), ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
      ("eps", lambda v: v > 0, "> 0"), ("weight_decay", lambda v: v >= 0, ">= 0"),
      ("end_lr", lambda v: v >= 0, ">= 0")):
    value = cfg.get(key)
    if value is not None and not (_finite(value) and ok(value)):
      raise UserError(f"optim.{key} must be a finite number {want}, got {value!r}")
  clip = cfg.get("clip_norm")
  if clip is not None and not (_finite(clip) and clip >= 0):
    raise UserError(f"optim.clip_norm must be None, 0 (off) or a finite number > 0, got {clip!r}")


def make(cfg: ml_collections.ConfigDict, *, total_steps: int) -> Optimizer:
  """Builds AdamW or Muon (decoupled decay, masked) with clipping from a config section.

  Args:
    cfg: keys lr, warmup_steps, schedule, end_lr, b1, b2, eps, weight_decay, decay_exclude,
      clip_norm (None or 0: no clipping); name (adamw | muon; default adamw) and, for muon,
      muon_ns_steps and muon_include (a regex: the kernels Muon updates).
    total_steps: run length, for the cosine.
  Returns:
    Optimizer(tx, schedule).
  """
  _check_numbers(cfg)
  sched = schedule(cfg, total_steps)
  exclude = tuple(cfg.decay_exclude or ())
  name = cfg.get("name", "adamw")
  if name not in OPTIMIZERS:
    raise UserError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
  mask = lambda p: decay_mask(p, exclude)
  if name == "adamw":
    parts.append(optax.adamw(sched, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                             weight_decay=float(cfg.weight_decay), mask=mask))
  else:
    # Muon's momentum 0.95 (its authors'); updates scaled to AdamW's RMS (0.2), so lr carries
    # over. optax's AdamW half decays every leaf, so decay is applied outside it, masked.
    include = re.compile(cfg.muon_include)
    parts.append(optax.contrib.muon(
        sched, beta=0.95, ns_steps=int(cfg.muon_ns_steps), consistent_rms=0.2,
        muon_weight_dimension_numbers=lambda p: muon_dims(p, include),
        adam_b1=float(cfg.b1), adam_b2=float(cfg.b2), eps=float(cfg.eps),
        weight_decay=0.0, adam_weight_decay=0.0))
    if cfg.weight_decay:
      parts.append(decoupled_decay(sched, float(cfg.weight_decay), mask))
  return Optimizer(optax.chain(*parts), sched)


def decoupled_decay(sched: Callable[[Any], Any], weight_decay: float,
                    mask: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Adds -lr(step) · weight_decay · param to the (already lr-scaled) updates where `mask`."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("decoupled_decay needs the params")
    lr = sched(state.count)
    on = mask(params)
    updates = jax.tree.map(lambda u, p, m: u - lr * weight_decay * p if m else u,
                           updates, params, on)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def muon_dims(params: Any, include: "re.Pattern[str]") -> Any:
  """Muon's view of each kernel whose path matches `include`; None (AdamW) for the rest.

  A `layers.Dense` kernel is [*in, *features]; attention's output projection contracts two
  axes (heads, head dim), every other matched kernel one. Fused projections (qkv, SwiGLU's w12)
  are orthogonalised as one [in, prod(features)] matrix.
  """
  from optax.contrib import MuonDimensionNumbers  # pylint: disable=g-import-not-at-top
  def one(path, leaf):
    name = path_name(path)
    if jnp.ndim(leaf) < 2 or not include.search(name):
      return None
    n_in = 2 if name.endswith("attn/proj/kernel") else 1
    return MuonDimensionNumbers(reduction_axis=tuple(range(n_in)),
                                output_axis=tuple(range(n_in, jnp.ndim(leaf))))
  return jax.tree_util.tree_map_with_path(one, params)


def default_config() -> ml_collections.ConfigDict:
  """The optim section with the tokenizer recipe's defaults (SPEC §5); configs override it."""
  c = ml_collections.ConfigDict()
  c.name = "adamw"
  c.muon_ns_steps = 5
  c.muon_include = MUON_INCLUDE
  c.lr = 1e-4
  c.warmup_steps = 0
  c.schedule = "constant"
  c.end_lr = 0.0
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 1e-4
  c.decay_exclude = DEFAULT_DECAY_EXCLUDE
  c.clip_norm = None
  return c


# Searched in '/'-joined parameter paths; ndim < 2 leaves are never decayed anyway.
# Biases by name too: fused projections (qkv, SwiGLU's w12) hold 2D ones. Learned position
# tables are `*_pos` (FlowTiTok) or `*embedding` (CLIP, text decoder).
DEFAULT_DECAY_EXCLUDE = ("norm", r"(^|/)ln", r"(^|/)bias$", "embedding", "latent_tokens",
                         "mask_token", r"_pos$", "pos_emb", "null_emb", "dir_emb")
