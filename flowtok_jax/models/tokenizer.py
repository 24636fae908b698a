"""FlowTiTok: the 1D VAE image tokenizer (TA-TiTok + 2D RoPE + SwiGLU; SPEC §1.1).

Images are NHWC in [0, 1]. The encoder maps them to K × C posterior parameters; the decoder maps
K × C tokens (plus, when text-aware, CLIP text features) back to RGB.

Parameter tree (W width, p patch, g = image/p, K tokens, C channels, D text width, L text length):
  encoder/patch_embed/{kernel [p, p, 3, W], bias [W]}   (torch Conv2d weight.permute(2, 3, 1, 0))
  encoder/latent_tokens [K, W], encoder/latent_pos [K, W]
  encoder/ln_pre, encoder/blocks_{i}/{ln_1, attn/qkv, attn/proj, ln_2, mlp/w12, mlp/w3},
  encoder/ln_post, encoder/out/{kernel [W, 2C], bias [2C]}   (1×1 conv: weight[:, :, 0, 0].T;
    output channels: mean first, then logvar)
  decoder/mask_token [W], decoder/latent_embed/{kernel [C, W], bias}, decoder/latent_pos [K, W]
  decoder/text_proj/{kernel [D, W], bias}, decoder/text_pos [L, W]   (text_aware only)
  decoder/ln_pre, decoder/blocks_{i}/..., decoder/ln_post
  decoder/pixel_head/{kernel [W, p·p·3], bias}   (1×1 conv weight[:, :, 0, 0].T; output index
    (p1·p + p2)·3 + c, the order of the reference 'b (p1 p2 c) h w' rearrange)
  decoder/pixel_mlp/{kernel [W, H], bias}   (only with pixel_head_hidden H, not in the reference:
    pixel_head then reads its GELU output, kernel [H, p·p·3])
  decoder/conv_out/{kernel [3, 3, 3, 3], bias [3]}   (torch weight.permute(2, 3, 1, 0), NHWC)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowtok_jax.errors import UserError
from flowtok_jax.models import layers

# width, depth, heads of the ViT sizes the reference tokenizer uses.
VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Static shape of a FlowTiTok."""
  image_size: int
  patch_size: int
  enc_width: int
  enc_depth: int
  enc_heads: int
  dec_width: int
  dec_depth: int
  dec_heads: int
  num_tokens: int  # K.
  token_channels: int  # C.
  text_aware: bool = True
  text_width: int = 768  # D of the CLIP features the decoder reads.
  text_len: int = 77  # L of the CLIP features.
  logvar_min: float = -30.0
  logvar_max: float = 20.0
  mlp_ratio: float = 4.0
  # Learned absolute position tables on the patch (encoder) and mask (decoder) tokens, as in
  # TA-TiTok. Off in FlowTiTok (SPEC §1.1: RoPE only) and so in every paper config. With RoPE
  # only, attention values carry no position: a shallow tower must route position through
  # attention to the (unrotated) latent tokens, which the 2+2-layer demo tokenizer learns slowly.
  patch_pos_embed: bool = False
  # Hidden width of a GELU layer before the decoder's pixel head (None: the linear head of
  # FlowTiTok). The linear head's patches span at most `dec_width` of their p·p·3 values.
  pixel_head_hidden: Optional[int] = None
  dtype: str = "float32"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @classmethod
  def from_config(cls, section, dtype: str = "float32") -> "TokenizerConfig":
    """Builds from a `tokenizer` section; explicit widths/depths/heads override the size names."""
    sizes = {}
    for side in ("encoder", "decoder"):
      name = section.get(f"{side}_size")
      if name is not None and name not in VIT_SIZES:
        raise UserError(f"tokenizer.{side}_size {name!r} is unknown "
                        f"(known: {', '.join(VIT_SIZES)})")
      w, d, h = VIT_SIZES[name] if name is not None else (None, None, None)
      w = section.get(f"{side}_width") or w
      d = section.get(f"{side}_depth") or d
      h = section.get(f"{side}_heads") or h
      if None in (w, d, h):
        raise UserError(f"tokenizer: set {side}_size or all of {side}_width/_depth/_heads")
      if w % h or (w // h) % 4:
        raise UserError(f"tokenizer.{side}: width {w} / heads {h} must give a head dim "
                        "divisible by 4 (2D RoPE)")
      sizes[side] = (w, d, h)
    if section.image_size % section.patch_size:
      raise UserError(f"tokenizer.image_size {section.image_size} is not a multiple of "
                      f"patch_size {section.patch_size}")
    (ew, ed, eh), (dw, dd, dh) = sizes["encoder"], sizes["decoder"]
    return cls(image_size=section.image_size, patch_size=section.patch_size, enc_width=ew,
               enc_depth=ed, enc_heads=eh, dec_width=dw, dec_depth=dd, dec_heads=dh,
               num_tokens=section.num_tokens, token_channels=section.token_channels,
               text_aware=bool(section.text_aware), text_width=section.text_width,
               text_len=section.text_len, logvar_min=section.logvar_min,
               logvar_max=section.logvar_max, mlp_ratio=float(section.get("mlp_ratio", 4.0)),
               patch_pos_embed=bool(section.get("patch_pos_embed", False)),
               pixel_head_hidden=section.get("pixel_head_hidden"), dtype=dtype)


def pixel_shuffle(x: jax.Array, grid: int, patch: int) -> jax.Array:
  """[B, g·g, (p1 p2 c)] row-major patches -> [B, g·p, g·p, c] NHWC image.

  The channel order (p1, p2, c) is the reference's 'b (p1 p2 c) h w -> b c (h p1) (w p2)'.
  """
  b, c = x.shape[0], x.shape[-1] // (patch * patch)
  x = x.reshape(b, grid, grid, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * patch, grid * patch, c)


def _token_init(width: int):
  # width^-0.5 · N(0, 1), as the reference initialises latent tokens, mask token and tables.
  return layers.normal(width ** -0.5)


class FlowTiTokEncoder(nn.Module):
  """images [B, H, W, 3] -> posterior parameters (mean, logvar) [B, K, C]."""
  cfg: TokenizerConfig

  @nn.compact
  def __call__(self, images: jax.Array):
    cfg = self.cfg
    dt = layers.dtype_of(cfg.dtype)
    w, g, k = cfg.enc_width, cfg.grid, cfg.num_tokens
    if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"FlowTiTok expects images [B, {cfg.image_size}, {cfg.image_size}, 3], "
                       f"got {images.shape}")
    init = layers.trunc_normal(0.02)
    x = layers.PatchEmbed(w, cfg.patch_size, dtype=dt, kernel_init=init,
                          name="patch_embed")(images.astype(dt))
    x = x.reshape(x.shape[0], g * g, w)  # Row-major patches, as the RoPE table expects.
    if cfg.patch_pos_embed:
      x = x + self.param("patch_pos", layers.with_axes(_token_init(w), (None, "embed")),
                         (g * g, w)).astype(dt)
    tok = self.param("latent_tokens", layers.with_axes(_token_init(w), (None, "embed")), (k, w))
    pos = self.param("latent_pos", layers.with_axes(_token_init(w), (None, "embed")), (k, w))
    lat = jnp.broadcast_to((tok + pos).astype(dt), (x.shape[0], k, w))
    x = jnp.concatenate([x, lat], axis=1)
    x = layers.constrain(layers.layer_norm("ln_pre", dtype=dt)(x), ("batch", "length", "embed"))
    rope = layers.rope_2d(w // cfg.enc_heads, g, num_extra=k)
    for i in range(cfg.enc_depth):
      x = layers.PreLNBlock(cfg.enc_heads, cfg.mlp_ratio, mlp="swiglu", dtype=dt,
                            kernel_init=init, name=f"blocks_{i}")(x, rope=rope)
    x = layers.layer_norm("ln_post", dtype=dt)(x[:, g * g:])
    out = layers.dense(2 * cfg.token_channels, ("embed", None), name="out", dtype=dt,
                       kernel_init=init)(x).astype(jnp.float32)
    mean, logvar = out[..., : cfg.token_channels], out[..., cfg.token_channels:]
    return mean, jnp.clip(logvar, cfg.logvar_min, cfg.logvar_max)


class FlowTiTokDecoder(nn.Module):
  """tokens [B, K, C] (+ text features [B, L, D]) -> images [B, H, W, 3], not clipped."""
  cfg: TokenizerConfig

  @nn.compact
  def __call__(self, z: jax.Array, text_features: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.cfg
    dt = layers.dtype_of(cfg.dtype)
    w, g, p, k = cfg.dec_width, cfg.grid, cfg.patch_size, cfg.num_tokens
    b = z.shape[0]
    if z.shape[1:] != (k, cfg.token_channels):
      raise ValueError(f"FlowTiTok.decode expects z [B, {k}, {cfg.token_channels}], "
                       f"got {z.shape}")
    init = layers.trunc_normal(0.02)
    mask = self.param("mask_token", layers.with_axes(_token_init(w), ("embed",)), (w,))
    lat = layers.dense(w, (None, "embed"), name="latent_embed", dtype=dt,
                       kernel_init=init)(z.astype(dt))
    lat = lat + self.param("latent_pos", layers.with_axes(_token_init(w), (None, "embed")),
                           (k, w)).astype(dt)
    if cfg.patch_pos_embed:  # [W] + [g², W]: one mask token, a position per patch.
      mask = mask + self.param("mask_pos", layers.with_axes(_token_init(w), (None, "embed")),
                               (g * g, w))
    parts = [jnp.broadcast_to(mask.astype(dt), (b, g * g, w)), lat]
    if cfg.text_aware:
      if text_features is None:
        raise ValueError("this FlowTiTok decoder is text-aware: pass text_features [B, L, D]")
      if text_features.shape[1:] != (cfg.text_len, cfg.text_width):
        raise ValueError(f"text_features must be [B, {cfg.text_len}, {cfg.text_width}], "
                         f"got {text_features.shape}")
      txt = layers.dense(w, (None, "embed"), name="text_proj", dtype=dt,
                         kernel_init=init)(text_features.astype(dt))
      txt = txt + self.param("text_pos", layers.with_axes(_token_init(w), (None, "embed")),
                             (cfg.text_len, w)).astype(dt)
      parts.append(txt)
    x = jnp.concatenate(parts, axis=1)
    x = layers.constrain(layers.layer_norm("ln_pre", dtype=dt)(x), ("batch", "length", "embed"))
    rope = layers.rope_2d(w // cfg.dec_heads, g, num_extra=x.shape[1] - g * g)
    for i in range(cfg.dec_depth):
      x = layers.PreLNBlock(cfg.dec_heads, cfg.mlp_ratio, mlp="swiglu", dtype=dt,
                            kernel_init=init, name=f"blocks_{i}")(x, rope=rope)
    x = layers.layer_norm("ln_post", dtype=dt)(x[:, : g * g])
    head_in = "embed"
    if cfg.pixel_head_hidden:
      x = nn.gelu(layers.dense(cfg.pixel_head_hidden, ("embed", "mlp"), name="pixel_mlp",
                               dtype=dt, kernel_init=init)(x), approximate=True)
      head_in = "mlp"
    x = layers.dense(p * p * 3, (head_in, None), name="pixel_head", dtype=dt,
                     kernel_init=init)(x)
    x = pixel_shuffle(x, g, p)
    x = nn.Conv(3, (3, 3), padding="SAME", dtype=dt, param_dtype=jnp.float32, name="conv_out",
                kernel_init=layers.with_axes(init, (None, None, None, None)),
                bias_init=layers.with_axes(layers.zeros, (None,)))(x)
    return x.astype(jnp.float32)


class FlowTiTok(nn.Module):
  """Encoder + decoder; call `encode` / `decode` with `model.apply(..., method=...)`."""
  cfg: TokenizerConfig

  def setup(self):
    self.encoder = FlowTiTokEncoder(self.cfg)
    self.decoder = FlowTiTokDecoder(self.cfg)

  def encode(self, images: jax.Array, text_features: Optional[jax.Array] = None):
    """images [B, H, W, 3] in [0, 1] -> (mean, logvar) [B, K, C], logvar clipped.

    `text_features` is accepted for call-site symmetry and unused: the encoder is text-agnostic.
    """
    del text_features
    return self.encoder(images)

  def decode(self, z: jax.Array, text_features: Optional[jax.Array] = None) -> jax.Array:
    """z [B, K, C] (unscaled tokens) -> images [B, H, W, 3], roughly [0, 1]: callers clip.

    `text_features` [B, L, D] is required when the config is text-aware, ignored otherwise.
    """
    return self.decoder(z, text_features if self.cfg.text_aware else None)

  def __call__(self, images: jax.Array, text_features: Optional[jax.Array] = None,
               sample: bool = True, noise_scale: float | jax.Array = 1.0):
    """Training pass: encode, draw z = mean + noise_scale·σ·ε (rng stream 'sample'), decode.

    `noise_scale` below 1 damps the posterior noise (the tokenizer stage's noise warm-up); the
    KL is the trainer's and always reads the full posterior.

    Returns:
      (reconstruction [B, H, W, 3], mean [B, K, C], logvar [B, K, C]).
    """
    mean, logvar = self.encode(images)
    z = mean
    if sample:
      eps = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
      z = mean + noise_scale * jnp.exp(0.5 * logvar) * eps
    return self.decode(z, text_features), mean, logvar
