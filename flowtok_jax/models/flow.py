"""The FlowTok DiT: a velocity network over K tokens of C channels (SPEC §1.3).

Text tokens are the source of T2I and image tokens its target (and the reverse for I2T), so the
network has no cross-attention and no text path: x_t, t, a CFG null indicator and, for two-way
models, a direction are everything it sees.

Parameter tree (W width, C channels, H heads, Dh = W/H):
  x_embedder/{kernel [C, W], bias [W]}
  t_embedder/fc1/{kernel [256, W], bias}, t_embedder/fc2/{kernel [W, W], bias}
  null_embedder/embedding [2, W]            (row 0 conditional, row 1 null)
  direction_embedder/embedding [2, W]       (two_directions only; row 0 T2I, row 1 I2T)
  blocks_{i}/adaLN/{kernel [W, 6W], bias [6W]}   chunks: shift, scale, gate (msa), same (mlp)
  blocks_{i}/attn/qkv/{kernel [W, 3, H, Dh], bias [3, H, Dh]}, attn/proj/{kernel [H, Dh, W], bias}
  blocks_{i}/mlp/fc1/{kernel [W, 4W], bias}, mlp/fc2/{kernel [4W, W], bias}
  final_layer/adaLN/{kernel [W, 2W], bias [2W]} (shift, scale), final_layer/linear/{kernel [W, C]}
The 1D sin-cos position table is fixed and is not a parameter.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowtok_jax.errors import UserError
from flowtok_jax.models import layers

# Rematerialisation of the DiT blocks in the backward pass (`flow.remat`): what each block keeps
# from its forward pass. 'full' keeps only the block input (least memory, about one extra
# forward); 'dots' keeps the outputs of the weight matmuls (qkv, proj, MLP, adaLN) and
# recomputes attention and the elementwise ops; 'none' keeps everything.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(value) -> str:
  """Normalises a `flow.remat` value: False/None -> 'none', True -> 'full', or a policy name."""
  if value is None or value is False:
    return "none"
  if value is True:
    return "full"
  if value not in REMAT_POLICIES:
    raise UserError(f"flow.remat {value!r} is unknown (known: {', '.join(REMAT_POLICIES)}, "
                    "or True/False)")
  return value


# depth, width, heads (SPEC §1 table; L is defined by the reference code too).
FLOW_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "H": (36, 1280, 20),
}


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """Static shape and dtype of a FlowTransformer."""
  depth: int
  width: int
  heads: int
  num_tokens: int  # K (= text length L).
  channels: int  # C.
  mlp_ratio: float = 4.0
  two_directions: bool = False  # Adds the zero-initialised direction embedding.
  freq_dim: int = 256  # Timestep sinusoid size.
  dtype: str = "float32"  # Compute dtype; parameters are float32.
  remat: bool | str = "none"  # Block rematerialisation: a REMAT_POLICIES name (True = 'full').

  @classmethod
  def from_config(cls, section, dtype: str = "float32") -> "FlowConfig":
    """Builds from a `flow` ConfigDict section (variant and/or explicit depth/width/heads)."""
    variant = section.get("variant")
    if variant is not None and variant not in FLOW_SIZES:
      raise UserError(f"flow.variant {variant!r} is unknown (known: {', '.join(FLOW_SIZES)})")
    depth, width, heads = FLOW_SIZES[variant] if variant is not None else (None, None, None)
    depth = section.get("depth") or depth
    width = section.get("width") or width
    heads = section.get("heads") or heads
    if None in (depth, width, heads):
      raise UserError("flow: set flow.variant or all of flow.depth, flow.width, flow.heads")
    if width % heads:
      raise UserError(f"flow.width {width} is not divisible by flow.heads {heads}")
    return cls(depth=depth, width=width, heads=heads, num_tokens=section.num_tokens,
               channels=section.channels, mlp_ratio=section.get("mlp_ratio", 4.0),
               two_directions=bool(section.get("two_directions", False)),
               remat=remat_policy(section.get("remat", False)), dtype=dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x·(1 + scale) + shift, with shift/scale [B, W] broadcast over tokens."""
  return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
  """[cos | sin] sinusoid of raw t -> Linear-SiLU-Linear, weights N(0, 0.02)."""
  width: int
  freq_dim: int = 256
  dtype: str = "float32"

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    dt = layers.dtype_of(self.dtype)
    h = layers.timestep_embedding(t, self.freq_dim).astype(dt)
    h = layers.dense(self.width, (None, "embed"), name="fc1", dtype=dt,
                     kernel_init=layers.normal(0.02))(h)
    h = nn.silu(h)
    return layers.dense(self.width, ("mlp", "embed"), name="fc2", dtype=dt,
                        kernel_init=layers.normal(0.02))(h)


class DiTBlock(nn.Module):
  """adaLN-Zero block: LN (no affine, eps 1e-6) -> modulate -> attn / GELU-tanh MLP -> gate."""
  heads: int
  mlp_ratio: float = 4.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    dt = layers.dtype_of(self.dtype)
    w = x.shape[-1]
    mod = layers.dense(6 * w, ("embed", "mlp"), name="adaLN", dtype=dt,
                       kernel_init=layers.zeros)(nn.silu(c))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    h = layers.layer_norm("norm1", eps=1e-6, affine=False, dtype=dt)(x)
    h = layers.Attention(self.heads, dtype=dt, name="attn")(modulate(h, shift_a, scale_a))
    x = x + gate_a[:, None] * h
    h = layers.layer_norm("norm2", eps=1e-6, affine=False, dtype=dt)(x)
    h = layers.Mlp(int(w * self.mlp_ratio), act="gelu_tanh", dtype=dt,
                   name="mlp")(modulate(h, shift_m, scale_m))
    x = x + gate_m[:, None] * h
    return layers.constrain(x, ("batch", "length", "embed"))


class FinalLayer(nn.Module):
  """LN (no affine) -> adaLN shift/scale -> Linear(W, C); adaLN and linear zero-initialised."""
  channels: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    dt = layers.dtype_of(self.dtype)
    w = x.shape[-1]
    mod = layers.dense(2 * w, ("embed", "mlp"), name="adaLN", dtype=dt,
                       kernel_init=layers.zeros)(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = modulate(layers.layer_norm("norm", eps=1e-6, affine=False, dtype=dt)(x), shift, scale)
    return layers.dense(self.channels, ("embed", None), name="linear", dtype=dt,
                        kernel_init=layers.zeros)(x)


class FlowTransformer(nn.Module):
  """Velocity network v_θ(x_t, t, null, direction)."""
  cfg: FlowConfig

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, null: jax.Array,
               direction: Optional[jax.Array] = None) -> jax.Array:
    """Predicts the velocity.

    Args:
      x: [B, K, C] tokens at time t.
      t: [B] times in [0, 1] (0 = source, 1 = target), fed raw to the sinusoid.
      null: [B] int32 CFG indicator, 0 = conditional, 1 = null.
      direction: [B] int32, 0 = T2I, 1 = I2T; only for two-direction models (None means T2I).
    Returns:
      v: [B, K, C] float32.
    """
    cfg = self.cfg
    dt = layers.dtype_of(cfg.dtype)
    if x.shape[1:] != (cfg.num_tokens, cfg.channels):
      raise ValueError(f"FlowTransformer expects x [B, {cfg.num_tokens}, {cfg.channels}], "
                       f"got {x.shape}")
    if direction is not None and not cfg.two_directions:
      raise ValueError("direction given to a one-direction FlowTransformer "
                       "(set flow.two_directions)")
    pos = layers.sincos_1d(cfg.width, cfg.num_tokens)
    h = layers.dense(cfg.width, (None, "embed"), name="x_embedder", dtype=dt)(x.astype(dt))
    h = layers.constrain(h + pos.astype(dt), ("batch", "length", "embed"))

    c = TimestepEmbedder(cfg.width, cfg.freq_dim, dtype=cfg.dtype, name="t_embedder")(t)
    c = c + layers.Embed(2, cfg.width, dtype=dt, name="null_embedder")(null.astype(jnp.int32))
    if cfg.two_directions:
      # Zero rows: a T2I-only checkpoint loads and behaves identically for either direction.
      d = jnp.zeros_like(null) if direction is None else direction
      c = c + layers.Embed(2, cfg.width, dtype=dt, init=layers.zeros,
                           name="direction_embedder")(d.astype(jnp.int32))

    policy = remat_policy(cfg.remat)
    block = DiTBlock
    if policy != "none":
      block = nn.remat(DiTBlock, policy=REMAT_POLICIES[policy])
    for i in range(cfg.depth):
      h = block(cfg.heads, cfg.mlp_ratio, dtype=cfg.dtype, name=f"blocks_{i}")(h, c)
    v = FinalLayer(cfg.channels, dtype=cfg.dtype, name="final_layer")(h, c)
    return v.astype(jnp.float32)
