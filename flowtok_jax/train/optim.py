"""AdamW with weight-decay masks, warm-up schedules and optional clipping, from a config section.

    opt = optim.make(config.optim, total_steps=config.train.total_steps)
    Stage(..., optimizer=opt.tx, learning_rate=opt.schedule)

Weight decay skips, by rule, every parameter with fewer than 2 dimensions (biases, norm scales,
1D tokens) and every parameter whose '/'-joined path matches one of `decay_exclude` (regexes:
norms, embedding tables, latent / mask tokens, learned positions), as the reference tokenizer and
DiT recipes do. The mask is computed from the parameter tree, so it works on boxed (logically
annotated) and plain trees alike.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flowtok_jax.errors import UserError

SCHEDULES = ("constant", "cosine")


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
  if cfg.warmup_steps < 0 or cfg.lr < 0:
    raise UserError("optim.lr and optim.warmup_steps must be >= 0")
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


def make(cfg: ml_collections.ConfigDict, *, total_steps: int) -> Optimizer:
  """Builds AdamW (decoupled decay, masked) with clipping from a config section.

  Args:
    cfg: keys lr, warmup_steps, schedule, end_lr, b1, b2, eps, weight_decay, decay_exclude,
      clip_norm (None or 0: no clipping).
    total_steps: run length, for the cosine.
  Returns:
    Optimizer(tx, schedule).
  """
  sched = schedule(cfg, total_steps)
  exclude = tuple(cfg.decay_exclude or ())
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
  parts.append(optax.adamw(sched, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay),
                           mask=lambda p: decay_mask(p, exclude)))
  return Optimizer(optax.chain(*parts), sched)


def default_config() -> ml_collections.ConfigDict:
  """The optim section with the tokenizer recipe's defaults (SPEC §5); configs override it."""
  c = ml_collections.ConfigDict()
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
