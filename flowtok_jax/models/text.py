"""Text side: CLIP text tower, text VAE ("projector"), alignment MLP, text decoder (SPEC §1, §1.2).

Parameter trees (D CLIP width, C token channels, V vocab, L length, H heads, Dh = D/H):
  CLIPTextTower: token_embedding/embedding [V, D], positional_embedding [L, D],
    blocks_{i}/{ln_1, ln_2}/{scale, bias} [D], blocks_{i}/attn/qkv/{kernel [D, 3, H, Dh],
    bias [3, H, Dh]}, blocks_{i}/attn/proj/{kernel [H, Dh, D], bias [D]},
    blocks_{i}/mlp/fc1/{kernel [D, r·D], bias} (c_fc), blocks_{i}/mlp/fc2/{kernel [r·D, D], bias}
    (c_proj), ln_final/{scale, bias}.
  TextVAE: layers_{i}/attn/{qkv, proj} as above (W_Q|W_K|W_V fused in that order; W_O = proj),
    layers_{i}/norm1/{scale, bias} (g, b), layers_{i}/ffn/fc1/{kernel [D, F], bias},
    layers_{i}/ffn/fc2/{kernel [F, D], bias}, layers_{i}/norm2, out/{kernel [D, 2C], bias [2C]}.
  AlignMLP: fc1 [D, hid], fc2 [hid, hid], fc3 [hid, C] (kernel, bias each), logit_scale [].
  TextDecoder: in_proj/{kernel [C, D], bias}, positional_embedding [L, D], layers_{i} as TextVAE,
    out/{kernel [D, V], bias [V]}.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax.errors import UserError
from flowtok_jax.models import layers

# depth, width, heads, vocab, length: the OpenAI ViT-L/14(-336) text tower.
CLIP_TEXT_SIZES = {"ViT-L/14": dict(depth=12, width=768, heads=12, vocab_size=49408, max_len=77)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int
  max_len: int  # L.
  width: int  # D.
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"  # 'quick_gelu' (OpenAI weights) or 'gelu'.
  pad_id: int = 0  # Used by the contrastive model's pooling (last non-pad token).
  dtype: str = "float32"

  @classmethod
  def from_config(cls, section, dtype: str = "float32") -> "CLIPTextConfig":
    if section.act not in ("quick_gelu", "gelu"):
      raise UserError(f"clip_text.act must be 'quick_gelu' or 'gelu', got {section.act!r}")
    if section.width % section.heads:
      raise UserError(f"clip_text.width {section.width} not divisible by heads {section.heads}")
    return cls(vocab_size=section.vocab_size, max_len=section.max_len, width=section.width,
               depth=section.depth, heads=section.heads, mlp_ratio=section.mlp_ratio,
               act=section.act, pad_id=section.get("pad_id", 0), dtype=dtype)


@dataclasses.dataclass(frozen=True)
class TextVAEConfig:
  width: int  # D (= CLIP width).
  depth: int
  heads: int
  ffn_dim: int
  token_channels: int  # C.
  dropout: float = 0.1
  dtype: str = "float32"

  @classmethod
  def from_config(cls, section, dtype: str = "float32") -> "TextVAEConfig":
    if section.width % section.heads:
      raise UserError(f"text_vae.width {section.width} not divisible by heads {section.heads}")
    return cls(width=section.width, depth=section.depth, heads=section.heads,
               ffn_dim=section.ffn_dim, token_channels=section.token_channels,
               dropout=section.dropout, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class AlignMLPConfig:
  hidden: int
  token_channels: int  # C.
  init_logit_scale: float = float(np.log(1 / 0.07))  # τ of the contrastive alignment loss.
  dtype: str = "float32"

  @classmethod
  def from_config(cls, section, dtype: str = "float32") -> "AlignMLPConfig":
    return cls(hidden=section.hidden, token_channels=section.token_channels, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class TextDecoderConfig:
  width: int  # D (= CLIP width).
  depth: int
  heads: int
  ffn_dim: int
  vocab_size: int
  max_len: int  # L: size of the learned position table.
  dropout: float = 0.1
  dtype: str = "float32"

  @classmethod
  def from_config(cls, section, dtype: str = "float32") -> "TextDecoderConfig":
    if section.width % section.heads:
      raise UserError(f"text_decoder.width {section.width} not divisible by heads "
                      f"{section.heads}")
    return cls(width=section.width, depth=section.depth, heads=section.heads,
               ffn_dim=section.ffn_dim, vocab_size=section.vocab_size, max_len=section.max_len,
               dropout=section.get("dropout", 0.1), dtype=dtype)


class CLIPTextTower(nn.Module):
  """Causal pre-LN transformer; returns ln_final at every position (no pooling/projection)."""
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [B, L] int32 -> features [B, L, D] float32."""
    cfg = self.cfg
    dt = layers.dtype_of(cfg.dtype)
    if ids.shape[1] > cfg.max_len:
      raise ValueError(f"CLIPTextTower: {ids.shape[1]} tokens > max_len {cfg.max_len}")
    x = layers.Embed(cfg.vocab_size, cfg.width, dtype=dt, name="token_embedding")(ids)
    pos = self.param("positional_embedding", layers.with_axes(layers.normal(0.01),
                                                              (None, "embed")),
                     (cfg.max_len, cfg.width))
    x = layers.constrain(x + pos[: ids.shape[1]].astype(dt), ("batch", "length", "embed"))
    for i in range(cfg.depth):
      x = layers.PreLNBlock(cfg.heads, cfg.mlp_ratio, mlp=cfg.act, causal=True, dtype=dt,
                            kernel_init=layers.normal(0.02), name=f"blocks_{i}")(x)
    return layers.layer_norm("ln_final", dtype=dt)(x).astype(jnp.float32)


class PostLNBlock(nn.Module):
  """Original-Transformer layer: t = LN(x + Drop(MHA(x))); y = LN(t + Drop(FFN(t))).

  Attention covers all tokens (no mask, padding included, as in the released text VAE).
  """
  heads: int
  ffn_dim: int
  dropout: float = 0.1
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    dt = layers.dtype_of(self.dtype)
    # These modules keep PyTorch's default Linear init (weights and biases).
    init, bias = layers.torch_default, layers.TORCH_DEFAULT_BIAS
    a = layers.Attention(self.heads, dtype=dt, dropout=self.dropout, kernel_init=init,
                         bias_init=bias, name="attn")(x, deterministic=deterministic)
    a = nn.Dropout(self.dropout)(a, deterministic=deterministic)
    t = layers.ParityLayerNorm(dtype=dt, name="norm1")(x + a)
    z = layers.Mlp(self.ffn_dim, act="relu", dtype=dt, kernel_init=init, bias_init=bias,
                   dropout=self.dropout, name="ffn")(t, deterministic=deterministic)
    z = nn.Dropout(self.dropout)(z, deterministic=deterministic)
    y = layers.ParityLayerNorm(dtype=dt, name="norm2")(t + z)
    return layers.constrain(y, ("batch", "length", "embed"))


class TextVAE(nn.Module):
  """CLIP features [B, L, D] -> (mean, logvar) [B, L, C]; no position table, no logvar clip."""
  cfg: TextVAEConfig

  @nn.compact
  def __call__(self, feats: jax.Array, deterministic: bool = True):
    """Dropout (rate cfg.dropout) uses the 'dropout' rng when not deterministic."""
    cfg = self.cfg
    dt = layers.dtype_of(cfg.dtype)
    x = feats.astype(dt)
    for i in range(cfg.depth):
      x = PostLNBlock(cfg.heads, cfg.ffn_dim, cfg.dropout, dtype=cfg.dtype,
                      name=f"layers_{i}")(x, deterministic)
    out = layers.dense(2 * cfg.token_channels, ("embed", None), name="out", dtype=dt,
                       kernel_init=layers.torch_default,
                       bias_init=layers.TORCH_DEFAULT_BIAS)(x).astype(jnp.float32)
    return out[..., : cfg.token_channels], out[..., cfg.token_channels:]


class AlignMLP(nn.Module):
  """Per-token Linear-SiLU-Linear-SiLU-Linear: CLIP features -> the alignment target [B, L, C].

  Also owns the contrastive temperature τ (`logit_scale`, init log(1/0.07)), read by
  `model.apply(params, method=AlignMLP.logit_scale)`; logits use exp(τ).
  """
  cfg: AlignMLPConfig

  def setup(self):
    cfg = self.cfg
    dt = layers.dtype_of(cfg.dtype)
    init = dict(kernel_init=layers.torch_default, bias_init=layers.TORCH_DEFAULT_BIAS)
    self.fc1 = layers.dense(cfg.hidden, ("embed", "mlp"), name="fc1", dtype=dt, **init)
    self.fc2 = layers.dense(cfg.hidden, (None, "mlp"), name="fc2", dtype=dt, **init)
    self.fc3 = layers.dense(cfg.token_channels, ("mlp", None), name="fc3", dtype=dt, **init)
    self.scale = self.param("logit_scale", layers.with_axes(
        nn.initializers.constant(cfg.init_logit_scale), ()), ())

  def __call__(self, feats: jax.Array) -> jax.Array:
    """feats [B, L, D] -> [B, L, C] float32."""
    h = nn.silu(self.fc1(feats.astype(layers.dtype_of(self.cfg.dtype))))
    h = nn.silu(self.fc2(h))
    return self.fc3(h).astype(jnp.float32)

  def logit_scale(self) -> jax.Array:
    """τ (a scalar); the loss multiplies cosine similarities by exp(τ)."""
    return self.scale


class TextDecoder(nn.Module):
  """z_T [B, L, C] -> token logits [B, L, V], non-autoregressive (one prediction per position).

  Like the text VAE (post-LN, unmasked) plus a learned position table: tokens that arrive
  through the flow are not guaranteed to carry their position, and each slot predicts one id.
  """
  cfg: TextDecoderConfig

  @nn.compact
  def __call__(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    dt = layers.dtype_of(cfg.dtype)
    if z.shape[1] > cfg.max_len:
      raise ValueError(f"TextDecoder: {z.shape[1]} tokens > max_len {cfg.max_len}")
    x = layers.dense(cfg.width, (None, "embed"), name="in_proj", dtype=dt,
                     kernel_init=layers.torch_default,
                     bias_init=layers.TORCH_DEFAULT_BIAS)(z.astype(dt))
    pos = self.param("positional_embedding", layers.with_axes(layers.normal(0.02),
                                                              (None, "embed")),
                     (cfg.max_len, cfg.width))
    x = layers.constrain(x + pos[: z.shape[1]].astype(dt), ("batch", "length", "embed"))
    for i in range(cfg.depth):
      x = PostLNBlock(cfg.heads, cfg.ffn_dim, cfg.dropout, dtype=cfg.dtype,
                      name=f"layers_{i}")(x, deterministic)
    logits = layers.dense(cfg.vocab_size, ("embed", "vocab"), name="out", dtype=dt,
                          kernel_init=layers.torch_default,
                          bias_init=layers.TORCH_DEFAULT_BIAS)(x)
    return layers.constrain(logits, ("batch", "length", "vocab")).astype(jnp.float32)
