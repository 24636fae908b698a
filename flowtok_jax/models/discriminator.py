"""PatchGAN discriminator for the tokenizer's optional hinge GAN loss (SPEC §1.1).

Shaped after the TA-TiTok discriminator: a stem conv, then stages of conv -> 2× average-pool
downsample -> GroupNorm -> LeakyReLU(0.1), then a conv to one logit per patch.

Parameter tree (c = channels):
  stem/{kernel [3, 3, 3, c], bias}, stages_{s}_conv/{kernel [3, 3, c_in, c_out], bias},
  stages_{s}_norm/{scale, bias} [c_out], head/{kernel [3, 3, c_out, 1], bias [1]},
  with c_out = c · min(2^(s+1), 4).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowtok_jax.errors import UserError
from flowtok_jax.models import layers


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  channels: int = 64  # Stem width; stage s has channels · min(2^(s+1), 4).
  num_stages: int = 3  # Each halves the resolution.
  groups: int = 32  # GroupNorm groups (capped by the channel count).
  dtype: str = "float32"

  @classmethod
  def from_config(cls, section, dtype: str = "float32") -> "DiscriminatorConfig":
    if section.channels < 1 or section.num_stages < 1:
      raise UserError("discriminator.channels and discriminator.num_stages must be >= 1")
    return cls(channels=section.channels, num_stages=section.num_stages,
               groups=section.get("groups", 32), dtype=dtype)


def _conv(features: int, name: str, dt, in_axis=None, out_axis="mlp") -> nn.Conv:
  return nn.Conv(features, (3, 3), padding="SAME", dtype=dt, param_dtype=jnp.float32, name=name,
                 kernel_init=layers.with_axes(layers.xavier_uniform,
                                              (None, None, in_axis, out_axis)),
                 bias_init=layers.with_axes(layers.zeros, (out_axis,)))


class PatchDiscriminator(nn.Module):
  """images [B, H, W, 3] in [0, 1] -> logits [B, H / 2^S, W / 2^S, 1] (one per patch)."""
  cfg: DiscriminatorConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = layers.dtype_of(cfg.dtype)
    x = _conv(cfg.channels, "stem", dt)((images.astype(dt) - 0.5) * 2)
    x = nn.leaky_relu(x, 0.1)
    for s in range(cfg.num_stages):
      c_out = cfg.channels * min(2 ** (s + 1), 4)
      x = _conv(c_out, f"stages_{s}_conv", dt, in_axis=None)(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      groups = min(cfg.groups, c_out)
      while c_out % groups:
        groups -= 1
      x = nn.GroupNorm(num_groups=groups, dtype=dt, param_dtype=jnp.float32,
                       name=f"stages_{s}_norm",
                       scale_init=layers.with_axes(nn.initializers.ones_init(), ("mlp",)),
                       bias_init=layers.with_axes(layers.zeros, ("mlp",)))(x)
      x = nn.leaky_relu(x, 0.1)
    return _conv(1, "head", dt, out_axis=None)(x).astype(jnp.float32)
