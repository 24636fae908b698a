"""Fixtures for the model tests.

`make_test_model(kind, **overrides)` builds a tiny module; `perturb(params)` adds noise to every
parameter, so that zero-initialised layers stop hiding the computation under test;
`random_params(module, *args)` gives a full random parameter tree from `jax.eval_shape` alone.
A jitted `init` costs seconds of compile on a loaded 2-core machine (one RNG program per
parameter), so tests use a real init only where the init itself is under test.
"""
import flax.linen as nn
import jax
import numpy as np
import pytest

from flowtok_jax.models import clip, discriminator, flow, text, tokenizer

# Widths <= 32, depth <= 2: each forward compiles and runs in well under a second on CPU.
TINY = {
    "flow": (flow.FlowConfig, flow.FlowTransformer,
             dict(depth=2, width=32, heads=2, num_tokens=8, channels=4)),
    "tokenizer": (tokenizer.TokenizerConfig, tokenizer.FlowTiTok,
                  dict(image_size=16, patch_size=4, enc_width=32, enc_depth=1, enc_heads=2,
                       dec_width=32, dec_depth=1, dec_heads=2, num_tokens=8, token_channels=4,
                       text_aware=True, text_width=24, text_len=8)),
    "clip_text": (text.CLIPTextConfig, text.CLIPTextTower,
                  dict(vocab_size=50, max_len=8, width=32, depth=2, heads=2)),
    "text_vae": (text.TextVAEConfig, text.TextVAE,
                 dict(width=32, depth=2, heads=2, ffn_dim=48, token_channels=4)),
    "align_mlp": (text.AlignMLPConfig, text.AlignMLP, dict(hidden=16, token_channels=4)),
    "text_decoder": (text.TextDecoderConfig, text.TextDecoder,
                     dict(width=32, depth=1, heads=2, ffn_dim=48, vocab_size=50, max_len=8)),
    "clip_image": (clip.CLIPImageConfig, clip.CLIPImageTower,
                   dict(image_size=16, patch_size=4, width=32, depth=1, heads=2, embed_dim=16)),
    "discriminator": (discriminator.DiscriminatorConfig, discriminator.PatchDiscriminator,
                      dict(channels=8, num_stages=2, groups=4)),
}


def _make(kind: str, **overrides) -> nn.Module:
  """A tiny module of `kind` (a key of TINY, or 'clip_model'), config fields overridden."""
  if kind == "clip_model":
    return clip.CLIPModel(_make("clip_text", **overrides.pop("text", {})).cfg,
                          _make("clip_image", **overrides.pop("image", {})).cfg)
  cfg_cls, mod_cls, base = TINY[kind]
  return mod_cls(cfg_cls(**{**base, **overrides}))


@pytest.fixture
def make_test_model():
  return _make


def _perturb(params, scale: float = 0.5, seed: int = 0, skip: str | None = None):
  """Adds N(0, scale²) to every parameter (except paths containing `skip`): leaves init zeros."""
  flat = jax.tree_util.tree_flatten_with_path(params)
  leaves, treedef = flat
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    if skip is not None and skip in name:
      out.append(leaf)
    else:
      out.append(leaf + scale * rng.standard_normal(leaf.shape).astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture
def perturb():
  return _perturb


def _random_params(module: nn.Module, *args, seed: int = 0, scale: float = 0.1, **kwargs):
  """Boxed parameters shaped like `module.init(key, *args, **kwargs)`, drawn N(0, scale²)."""
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1), "sample": jax.random.key(2)}
  shapes = jax.eval_shape(lambda *a: module.init(rngs, *a, **kwargs), *args)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture
def random_params():
  return _random_params
