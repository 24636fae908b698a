"""A small CLIP to pretrain when no pretrained text tower is given (the embedded demo).

`CLIPModel` holds the `CLIPTextTower` under the name `text`, so after pretraining
`params['text']` is exactly the tree FlowTok's frozen text tower loads.

Parameter trees (W image width, p patch, g grid, E shared embedding, D text width):
  CLIPImageTower: patch_embed/kernel [p, p, 3, W] (no bias), class_embedding [W],
    positional_embedding [1 + g², W], ln_pre, blocks_{i}/... (pre-LN, GELU MLP), ln_post,
    proj/kernel [W, E].
  CLIPModel: text/... (CLIPTextTower), text_projection/kernel [D, E], visual/... (image tower),
    logit_scale [] (init log(1/0.07)).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax.errors import UserError
from flowtok_jax.models import layers
from flowtok_jax.models.text import CLIPTextConfig, CLIPTextTower


@dataclasses.dataclass(frozen=True)
class CLIPImageConfig:
  image_size: int
  patch_size: int
  width: int
  depth: int
  heads: int
  embed_dim: int  # E: the shared text-image embedding.
  mlp_ratio: float = 4.0
  dtype: str = "float32"

  @classmethod
  def from_config(cls, section, dtype: str = "float32") -> "CLIPImageConfig":
    if section.image_size % section.patch_size:
      raise UserError(f"clip_image.image_size {section.image_size} is not a multiple of "
                      f"patch_size {section.patch_size}")
    if section.width % section.heads:
      raise UserError(f"clip_image.width {section.width} not divisible by heads "
                      f"{section.heads}")
    return cls(image_size=section.image_size, patch_size=section.patch_size,
               width=section.width, depth=section.depth, heads=section.heads,
               embed_dim=section.embed_dim, mlp_ratio=section.get("mlp_ratio", 4.0), dtype=dtype)


class CLIPImageTower(nn.Module):
  """ViT with a class token: images [B, H, W, 3] in [0, 1] -> embeddings [B, E] (unnormalised)."""
  cfg: CLIPImageConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = layers.dtype_of(cfg.dtype)
    p, w = cfg.patch_size, cfg.width
    if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"CLIPImageTower expects [B, {cfg.image_size}, {cfg.image_size}, 3], "
                       f"got {images.shape}")
    init = layers.normal(0.02)
    # Centre the [0, 1] pixels; the tower learns its own scale.
    x = layers.PatchEmbed(w, p, use_bias=False, dtype=dt, kernel_init=init,
                          name="patch_embed")((images.astype(dt) - 0.5) * 2)
    b = x.shape[0]
    x = x.reshape(b, -1, w)
    cls = self.param("class_embedding", layers.with_axes(init, ("embed",)), (w,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, w)), x], axis=1)
    pos = self.param("positional_embedding", layers.with_axes(init, (None, "embed")),
                     (x.shape[1], w))
    x = layers.layer_norm("ln_pre", dtype=dt)(x + pos.astype(dt))
    x = layers.constrain(x, ("batch", "length", "embed"))
    for i in range(cfg.depth):
      x = layers.PreLNBlock(cfg.heads, cfg.mlp_ratio, mlp="gelu", dtype=dt, kernel_init=init,
                            name=f"blocks_{i}")(x)
    x = layers.layer_norm("ln_post", dtype=dt)(x[:, 0])
    x = layers.dense(cfg.embed_dim, ("embed", None), name="proj", dtype=dt, use_bias=False,
                     kernel_init=init)(x)
    return x.astype(jnp.float32)


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


class CLIPModel(nn.Module):
  """Contrastive text-image model; text pooled at the last non-pad token (the EOS slot)."""
  text_cfg: CLIPTextConfig
  image_cfg: CLIPImageConfig

  def setup(self):
    self.text = CLIPTextTower(self.text_cfg)
    self.visual = CLIPImageTower(self.image_cfg)
    self.text_projection = layers.dense(
        self.image_cfg.embed_dim, ("embed", None), name="text_projection", use_bias=False,
        dtype=layers.dtype_of(self.text_cfg.dtype), kernel_init=layers.normal(0.02))
    self.logit_scale = self.param("logit_scale", layers.with_axes(
        nn.initializers.constant(float(np.log(1 / 0.07))), ()), ())

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """ids [B, L] -> L2-normalised [B, E]."""
    feats = self.text(ids)
    last = jnp.maximum(jnp.sum(ids != self.text_cfg.pad_id, axis=1) - 1, 0)
    pooled = jnp.take_along_axis(feats, last[:, None, None], axis=1)[:, 0]
    return _normalize(self.text_projection(pooled).astype(jnp.float32))

  def encode_image(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] in [0, 1] -> L2-normalised [B, E]."""
    return _normalize(self.visual(images))

  def __call__(self, ids: jax.Array, images: jax.Array):
    """Returns (text_emb [B, E], image_emb [B, E], scale = exp(logit_scale) capped at 100)."""
    scale = jnp.exp(jnp.minimum(self.logit_scale, np.log(100.0)))
    return self.encode_text(ids), self.encode_image(images), scale
