"""Model construction from a config and parameter counting without materialising weights.

`component_modules(config)` is the one place that turns the model sections of a ConfigDict into
modules (through each module's frozen `*Config.from_config`); `param_counts(config)` counts every
component with `jax.eval_shape`, so paper-scale models cost no memory. `flowtok info` prints it.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax.errors import UserError
from flowtok_jax.models import clip, discriminator, flow, text, tokenizer


class Component(NamedTuple):
  """A module with abstract example inputs for `init` (batch 1)."""
  module: nn.Module
  args: tuple
  kwargs: dict
  method: Optional[Callable] = None


def _sds(shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


def check_model_config(config) -> None:
  """Raises UserError when the sections disagree on K, C, L or the CLIP width."""
  k, c = config.flow.num_tokens, config.flow.channels
  pairs = [
      ("tokenizer.num_tokens", config.tokenizer.num_tokens, "flow.num_tokens", k),
      ("clip_text.max_len", config.clip_text.max_len, "flow.num_tokens", k),
      ("tokenizer.token_channels", config.tokenizer.token_channels, "flow.channels", c),
      ("text_vae.token_channels", config.text_vae.token_channels, "flow.channels", c),
      ("align_mlp.token_channels", config.align_mlp.token_channels, "flow.channels", c),
      ("text_vae.width", config.text_vae.width, "clip_text.width", config.clip_text.width),
      ("tokenizer.text_width", config.tokenizer.text_width, "clip_text.width",
       config.clip_text.width),
      ("tokenizer.text_len", config.tokenizer.text_len, "clip_text.max_len",
       config.clip_text.max_len),
  ]
  if "text_decoder" in config:
    pairs.append(("text_decoder.width", config.text_decoder.width, "clip_text.width",
                  config.clip_text.width))
    pairs.append(("text_decoder.max_len", config.text_decoder.max_len, "clip_text.max_len",
                  config.clip_text.max_len))
  for name_a, a, name_b, b in pairs:
    if a != b:
      raise UserError(f"{name_a} = {a} must equal {name_b} = {b} (the flow maps one token "
                      "shape onto itself)")


def component_modules(config) -> dict[str, Component]:
  """Every model component the config describes, keyed by its name in `flowtok info`."""
  check_model_config(config)
  dtype = config.get("model_dtype", "float32")
  out = {}
  fc = flow.FlowConfig.from_config(config.flow, dtype=dtype)
  b, k, ch = 1, fc.num_tokens, fc.channels
  direction = (_sds((b,), jnp.int32),) if fc.two_directions else ()
  out["flow"] = Component(flow.FlowTransformer(fc), (_sds((b, k, ch)), _sds((b,)),
                                                     _sds((b,), jnp.int32)) + direction, {})
  ct = text.CLIPTextConfig.from_config(config.clip_text, dtype=dtype)
  feats = _sds((b, ct.max_len, ct.width))
  out["text_vae"] = Component(
      text.TextVAE(text.TextVAEConfig.from_config(config.text_vae, dtype=dtype)), (feats,), {})
  out["align_mlp"] = Component(
      text.AlignMLP(text.AlignMLPConfig.from_config(config.align_mlp, dtype=dtype)), (feats,), {})
  if "text_decoder" in config:
    td = text.TextDecoderConfig.from_config(config.text_decoder, dtype=dtype)
    out["text_decoder"] = Component(text.TextDecoder(td), (_sds((b, ct.max_len, ch)),), {})
  out["clip_text"] = Component(text.CLIPTextTower(ct), (_sds((b, ct.max_len), jnp.int32),), {})
  tc = tokenizer.TokenizerConfig.from_config(config.tokenizer, dtype=dtype)
  img = _sds((b, tc.image_size, tc.image_size, 3))
  out["tokenizer_encoder"] = Component(tokenizer.FlowTiTokEncoder(tc), (img,), {})
  out["tokenizer_decoder"] = Component(
      tokenizer.FlowTiTokDecoder(tc), (_sds((b, k, ch)), feats if tc.text_aware else None), {})
  if config.get("clip_image") is not None:
    ci = clip.CLIPImageConfig.from_config(config.clip_image, dtype=dtype)
    out["clip_image"] = Component(
        clip.CLIPImageTower(ci), (_sds((b, ci.image_size, ci.image_size, 3)),), {})
  if config.get("discriminator") is not None:
    dc = discriminator.DiscriminatorConfig.from_config(config.discriminator, dtype=dtype)
    out["discriminator"] = Component(discriminator.PatchDiscriminator(dc), (img,), {})
  return out


def abstract_params(comp: Component) -> Any:
  """The (boxed, logically annotated) parameter tree of a component as ShapeDtypeStructs."""
  def init(*args):
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1),
            "sample": jax.random.key(2)}
    kw = dict(comp.kwargs)
    if comp.method is not None:
      kw["method"] = comp.method
    return comp.module.init(rngs, *args, **kw)["params"]
  return jax.eval_shape(init, *comp.args)


def count(tree: Any) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def param_counts(config, names: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Parameter counts per component, the paper's FlowTok total, and the grand total.

  `flowtok` = DiT + text VAE + alignment MLP: the quantity the paper reports (153M / 698M / 1.1B
  for B / XL / H). The fixed position table of the DiT is not a parameter.

  Args:
    config: a ConfigDict with the model sections.
    names: count only these components (default: all); `total` then sums those.
  """
  comps = component_modules(config)
  if names is not None:
    unknown = sorted(set(names) - set(comps))
    if unknown:
      raise UserError(f"unknown model components {unknown} (known: {', '.join(comps)})")
    comps = {n: comps[n] for n in names}
  counts = {name: count(abstract_params(c)) for name, c in comps.items()}
  out = {"params": counts}
  if {"flow", "text_vae", "align_mlp"} <= set(counts):
    out["flowtok"] = counts["flow"] + counts["text_vae"] + counts["align_mlp"]
  out["total"] = sum(counts.values())
  return out
