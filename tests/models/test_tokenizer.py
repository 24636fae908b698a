"""FlowTiTok: encode/decode shapes, logvar clip, text-aware decoding, pixel layout, sizes."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowtok_jax.models import layers, tokenizer

B, S, K, C, L, D = 2, 16, 8, 4, 8, 24


def _data(seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.uniform(0, 1, (B, S, S, 3)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  return images, text


@pytest.fixture(scope="module")
def tok():
  """A tiny text-aware FlowTiTok, random parameters, and its jitted entry points (compiled once)."""
  cfg = tokenizer.TokenizerConfig(
      image_size=S, patch_size=4, enc_width=32, enc_depth=1, enc_heads=2, dec_width=32,
      dec_depth=1, dec_heads=2, num_tokens=K, token_channels=C, text_aware=True, text_width=D,
      text_len=L)
  model = tokenizer.FlowTiTok(cfg)
  images, text = _data()
  shapes = jax.eval_shape(lambda a, b: model.init(jax.random.key(0), a, b, sample=False),
                          images, text)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32),
                        shapes)
  fns = dict(
      encode=jax.jit(functools.partial(model.apply, method=tokenizer.FlowTiTok.encode)),
      decode=jax.jit(functools.partial(model.apply, method=tokenizer.FlowTiTok.decode)),
      forward=jax.jit(lambda p, a, b, key: model.apply(p, a, b, rngs={"sample": key})))
  return model, params, fns


def _with_logvar_bias(params, value):
  """Copy of params whose encoder output bias puts logvar at `value` (mean bias 0)."""
  bias = np.zeros((2 * C,), np.float32)
  bias[C:] = value
  enc = dict(params["params"]["encoder"])
  enc["out"] = dict(enc["out"], bias=nn.meta.replace_boxed(enc["out"]["bias"], bias))
  return {"params": dict(params["params"], encoder=enc)}


def test_encode_decode_shapes_logvar_clip_and_sampling(tok):
  _, params, fns = tok
  images, text = _data()
  key = jax.random.key(0, impl="unsafe_rbg")  # Compiles faster than threefry on CPU.
  # logvar far below the clip: it sits at -30, σ ≈ 3e-7, so a sample decodes like the mean.
  low = _with_logvar_bias(params, -100.0)
  recon, mean, logvar = fns["forward"](low, images, text, key)
  assert recon.shape == (B, S, S, 3) and recon.dtype == jnp.float32
  assert mean.shape == logvar.shape == (B, K, C)
  np.testing.assert_array_equal(np.asarray(logvar), -30.0)
  assert np.abs(np.asarray(mean)).max() > 1e-3
  from_mean = np.asarray(fns["decode"](low, mean, text))
  np.testing.assert_allclose(np.asarray(recon), from_mean, atol=1e-4)
  # logvar far above: clipped to 20, σ = e^10, and the sampled reconstruction moves.
  high = _with_logvar_bias(params, 100.0)
  recon_high, _, logvar_high = fns["forward"](high, images, text, key)
  np.testing.assert_array_equal(np.asarray(logvar_high), 20.0)
  assert np.abs(np.asarray(recon_high) - from_mean).max() > 1e-3
  # The encode method is the forward's first half (shapes only: no extra compile).
  enc = jax.eval_shape(fns["encode"], params, images)
  assert [e.shape for e in enc] == [(B, K, C), (B, K, C)]


def test_text_aware_decoder_needs_and_uses_text(tok, make_test_model):
  model, params, fns = tok
  images, text = _data()
  dec = nn.meta.unbox(params)["params"]["decoder"]
  assert dec["text_proj"]["kernel"].shape == (D, 32)
  assert dec["text_pos"].shape == (L, 32)
  z = jnp.asarray(np.random.default_rng(1).standard_normal((B, K, C)), jnp.float32)
  a = np.asarray(fns["decode"](params, z, text))
  assert a.shape == (B, S, S, 3)
  assert np.abs(a - np.asarray(fns["decode"](params, z, text * 2))).max() > 1e-4
  with pytest.raises(ValueError, match="text-aware"):
    model.apply(params, z, None, method=tokenizer.FlowTiTok.decode)
  blind = make_test_model("tokenizer", text_aware=False)
  shapes = jax.eval_shape(lambda a: blind.init(jax.random.key(0), a, None, sample=False), images)
  assert "text_proj" not in shapes["params"]["decoder"]
  assert "text_pos" not in shapes["params"]["decoder"]


def test_pixel_shuffle_matches_the_reference_rearrange():
  g, p, c = 3, 2, 3
  x = np.random.default_rng(0).standard_normal((1, g * g, p * p * c)).astype(np.float32)
  # Reference: tokens -> NCHW [B, (p1 p2 c), g, g] -> 'b (p1 p2 c) h w -> b c (h p1) (w p2)'.
  nchw = x.transpose(0, 2, 1).reshape(1, p * p * c, g, g)
  want = np.zeros((1, c, g * p, g * p), np.float32)
  for ch in range(p * p * c):
    p1, rem = divmod(ch, p * c)
    p2, cc = divmod(rem, c)
    for h in range(g):
      for w in range(g):
        want[0, cc, h * p + p1, w * p + p2] = nchw[0, ch, h, w]
  got = np.asarray(tokenizer.pixel_shuffle(jnp.asarray(x), g, p))
  np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))


def test_paper_sizes_and_swiglu_shapes():
  import ml_collections  # pylint: disable=g-import-not-at-top
  sec = ml_collections.ConfigDict(dict(
      image_size=256, patch_size=16, encoder_size="base", decoder_size="large",
      encoder_width=None, encoder_depth=None, encoder_heads=None, decoder_width=None,
      decoder_depth=None, decoder_heads=None, num_tokens=77, token_channels=16,
      text_aware=True, text_width=768, text_len=77, logvar_min=-30.0, logvar_max=20.0))
  cfg = tokenizer.TokenizerConfig.from_config(sec)
  assert (cfg.enc_width, cfg.enc_depth, cfg.enc_heads) == (768, 12, 12)
  assert (cfg.dec_width, cfg.dec_depth, cfg.dec_heads, cfg.grid) == (1024, 24, 16, 16)
  # One decoder block at paper width: SwiGLU hidden 2730, RoPE over 64-dim heads.
  block = layers.PreLNBlock(16, mlp="swiglu")
  x = jax.ShapeDtypeStruct((1, 256 + 77 + 77, 1024), jnp.float32)
  rope = layers.rope_2d(64, 16, num_extra=154)
  shapes = jax.eval_shape(lambda a: block.init(jax.random.key(0), a, rope=rope), x)["params"]
  shapes = nn.meta.unbox(shapes)
  assert shapes["mlp"]["w12"]["kernel"].shape == (1024, 2, 2730)
  assert shapes["mlp"]["w3"]["kernel"].shape == (2730, 1024)
  assert shapes["attn"]["qkv"]["kernel"].shape == (1024, 3, 16, 64)


def test_patch_pos_embed_is_off_by_default_and_adds_position_tables():
  """SPEC §1.1: FlowTiTok has no absolute position on patches (RoPE only). The optional TA-TiTok
  style tables (the demo's) add [grid², W] params that make identical mask tokens differ."""
  base = dict(image_size=S, patch_size=4, enc_width=32, enc_depth=1, enc_heads=2, dec_width=32,
              dec_depth=1, dec_heads=2, num_tokens=K, token_channels=C, text_aware=False)
  images, _ = _data()

  def param_shapes(**kw):
    model = tokenizer.FlowTiTok(tokenizer.TokenizerConfig(**base, **kw))
    shapes = jax.eval_shape(lambda a: model.init(jax.random.key(0), a, sample=False), images)
    return model, nn.unbox(shapes)["params"]

  _, plain = param_shapes()
  assert "patch_pos" not in plain["encoder"] and "mask_pos" not in plain["decoder"]
  model, with_pos = param_shapes(patch_pos_embed=True)
  g = S // 4
  assert with_pos["encoder"]["patch_pos"].shape == (g * g, 32)
  assert with_pos["decoder"]["mask_pos"].shape == (g * g, 32)
  params = model.init(jax.random.key(0), images, sample=False)
  z = jnp.zeros((1, K, C))
  out = model.apply(params, z, method=tokenizer.FlowTiTok.decode)
  table = params["params"]["decoder"]["mask_pos"]
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed["params"]["decoder"]["mask_pos"] = nn.meta.replace_boxed(table, jnp.zeros((g * g, 32)))
  out0 = model.apply(zeroed, z, method=tokenizer.FlowTiTok.decode)
  assert not np.allclose(out, out0)
  cfg = tokenizer.TokenizerConfig.from_config(
      _section(patch_pos_embed=True), "float32")
  assert cfg.patch_pos_embed
  assert not tokenizer.TokenizerConfig.from_config(_section(), "float32").patch_pos_embed


def _section(**kw):
  import ml_collections  # pylint: disable=g-import-not-at-top
  section = ml_collections.ConfigDict(dict(
      image_size=S, patch_size=4, encoder_size=None, encoder_width=32, encoder_depth=1,
      encoder_heads=2, decoder_size=None, decoder_width=32, decoder_depth=1, decoder_heads=2,
      num_tokens=K, token_channels=C, text_aware=False, text_width=D, text_len=L,
      logvar_min=-30.0, logvar_max=20.0))
  section.update(kw)
  return section


def test_mlp_ratio_is_read_from_the_config_and_defaults_to_the_released_4():
  """The paper configs leave `tokenizer.mlp_ratio` unset (FlowTiTok's 4); the demo sets 2."""
  assert tokenizer.TokenizerConfig.from_config(_section(), "float32").mlp_ratio == 4.0
  cfg = tokenizer.TokenizerConfig.from_config(_section(mlp_ratio=2.0), "float32")
  images, _ = _data()
  model = tokenizer.FlowTiTok(dataclasses.replace(cfg, text_aware=False))
  shapes = nn.unbox(jax.eval_shape(lambda a: model.init(jax.random.key(0), a, sample=False),
                                   images))["params"]
  hidden = layers.swiglu_hidden(32, 2.0)  # int(2/3 · 64) = 42.
  for side in ("encoder", "decoder"):
    assert shapes[side]["blocks_0"]["mlp"]["w12"]["kernel"].shape == (32, 2, hidden), side
    assert shapes[side]["blocks_0"]["mlp"]["w3"]["kernel"].shape == (hidden, 32), side


def test_pixel_head_hidden_adds_a_gelu_layer_whose_patches_span_more_than_the_width():
  """Off (None) by default: FlowTiTok's linear head, whose patches span at most W of their
  p·p·3 values. Set, a GELU layer of that width comes before it, and they span more."""
  assert tokenizer.TokenizerConfig.from_config(_section(), "float32").pixel_head_hidden is None
  size, p, w, hidden = 64, 8, 32, 128  # 64 patches of 8 x 8 x 3 = 192 values from width 32.

  def patches(**kw):
    cfg = tokenizer.TokenizerConfig.from_config(
        _section(image_size=size, patch_size=p, patch_pos_embed=True, **kw), "float32")
    model = tokenizer.FlowTiTok(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                 sample=False))
    dec = params["params"]["decoder"]
    # Patches made to differ: large random position entries (the ViT's features then span the
    # width), and the 3x3 conv an identity, so the head's patches are the output's.
    g = size // p
    dec["mask_pos"] = jax.random.normal(jax.random.key(1), (g * g, w)) * 10.0
    kernel = np.zeros((3, 3, 3, 3), np.float32)
    kernel[1, 1] = np.eye(3)
    dec["conv_out"]["kernel"] = jnp.asarray(kernel)
    dec["pixel_head"]["kernel"] = dec["pixel_head"]["kernel"] * 50.0
    if "pixel_mlp" in dec:
      dec["pixel_mlp"]["kernel"] = dec["pixel_mlp"]["kernel"] * 50.0  # GELU far from linear.
    out = model.apply(params, jnp.zeros((1, K, C)), method=tokenizer.FlowTiTok.decode)
    x = np.asarray(out).reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4)
    return dec, x.reshape(g * g, p * p * 3)

  def rank(x):  # Singular values of the centred patches above 1e-4 of the largest.
    sv = np.linalg.svd(x - x.mean(0), compute_uv=False)
    return int(np.sum(sv > 1e-4 * sv[0]))

  linear_params, linear = patches()
  assert "pixel_mlp" not in linear_params
  assert linear_params["pixel_head"]["kernel"].shape == (w, p * p * 3)
  mlp_params, mlp = patches(pixel_head_hidden=hidden)
  assert mlp_params["pixel_mlp"]["kernel"].shape == (w, hidden)
  assert mlp_params["pixel_head"]["kernel"].shape == (hidden, p * p * 3)
  assert rank(linear) <= w < rank(mlp), (rank(linear), rank(mlp))
