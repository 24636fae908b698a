"""Text side: CLIP text tower (causal, ln_final everywhere), text VAE vs numpy, MLP, decoder."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowtok_jax.models import text

B, L, D, C = 2, 8, 32, 4


def _ids(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, 50, (B, L)), jnp.int32)


@pytest.fixture(scope="module")
def clip_quick():
  model = text.CLIPTextTower(text.CLIPTextConfig(vocab_size=50, max_len=L, width=D, depth=2,
                                                 heads=2, act="quick_gelu"))
  return model, jax.jit(model.apply)


def test_clip_text_is_causal_with_ln_final_at_every_position(clip_quick, random_params):
  model, apply = clip_quick
  ids = _ids()
  params = random_params(model, ids, scale=0.3)
  # ln_final with unit scale / zero bias: every position is normalised (no pooling).
  params["params"]["ln_final"]["scale"] = nn.meta.replace_boxed(
      params["params"]["ln_final"]["scale"], np.ones((D,), np.float32))
  params["params"]["ln_final"]["bias"] = nn.meta.replace_boxed(
      params["params"]["ln_final"]["bias"], np.zeros((D,), np.float32))
  feats = np.asarray(apply(params, ids))
  assert feats.shape == (B, L, D) and feats.dtype == np.float32
  np.testing.assert_allclose(feats.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(feats.std(-1), 1.0, atol=1e-3)
  j = 5
  ids2 = ids.at[:, j].set((ids[:, j] % 49) + 1)
  feats2 = np.asarray(apply(params, ids2))
  np.testing.assert_array_equal(feats[:, :j], feats2[:, :j])  # Earlier positions untouched.
  assert np.abs(feats[:, j:] - feats2[:, j:]).max() > 1e-4


def test_clip_text_activation_knob_changes_the_function(clip_quick, make_test_model,
                                                       random_params):
  quick, quick_apply = clip_quick
  plain = make_test_model("clip_text", act="gelu")
  ids = _ids()
  params = random_params(quick, ids, scale=0.5)
  # Same tree: OpenAI weights load into either; the knob alone changes the output.
  a = np.asarray(quick_apply(params, ids))
  b = np.asarray(jax.jit(plain.apply)(params, ids))
  assert a.shape == b.shape and np.abs(a - b).max() > 1e-3


def _np_parity_ln(x, g, b):
  return g * (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-5) + b


def _np_text_vae(p, x, heads):
  """Independent numpy forward of the post-LN text VAE (deterministic)."""
  for i in range(len([k for k in p if k.startswith("layers_")])):
    lp = p[f"layers_{i}"]
    wq = lp["attn"]["qkv"]["kernel"]  # [D, 3, H, Dh]
    bq = lp["attn"]["qkv"]["bias"]
    q, k, v = (np.einsum("bld,dhe->blhe", x, wq[:, n]) + bq[n] for n in range(3))
    s = np.einsum("blhe,bmhe->bhlm", q, k) / np.sqrt(q.shape[-1])
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhlm,bmhe->blhe", a, v)
    o = np.einsum("blhe,hed->bld", o, lp["attn"]["proj"]["kernel"]) + lp["attn"]["proj"]["bias"]
    t = _np_parity_ln(x + o, lp["norm1"]["scale"], lp["norm1"]["bias"])
    f = np.maximum(t @ lp["ffn"]["fc1"]["kernel"] + lp["ffn"]["fc1"]["bias"], 0)
    f = f @ lp["ffn"]["fc2"]["kernel"] + lp["ffn"]["fc2"]["bias"]
    x = _np_parity_ln(t + f, lp["norm2"]["scale"], lp["norm2"]["bias"])
  out = x @ p["out"]["kernel"] + p["out"]["bias"]
  return out[..., :C], out[..., C:]


def test_text_vae_matches_numpy_post_ln_forward_and_dropout_is_stochastic(make_test_model,
                                                                          random_params):
  model = make_test_model("text_vae")
  apply = jax.jit(model.apply, static_argnames="deterministic")
  feats = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, D)), jnp.float32)
  params = random_params(model, feats, scale=0.3)
  mean, logvar = apply(params, feats, deterministic=True)
  assert mean.shape == logvar.shape == (B, L, C)
  p = jax.tree.map(np.asarray, nn.meta.unbox(params)["params"])
  want_mean, want_logvar = _np_text_vae(p, np.asarray(feats, np.float64), heads=2)
  np.testing.assert_allclose(np.asarray(mean), want_mean, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(np.asarray(logvar), want_logvar, atol=2e-4, rtol=2e-4)
  # RBG keys: the dropout masks compile faster than with threefry on CPU.
  keys = [jax.random.key(i, impl="unsafe_rbg") for i in (1, 2)]
  r1 = apply(params, feats, deterministic=False, rngs={"dropout": keys[0]})[0]
  r2 = apply(params, feats, deterministic=False, rngs={"dropout": keys[1]})[0]
  assert np.abs(np.asarray(r1) - np.asarray(r2)).max() > 1e-4


def test_align_mlp_shape_and_temperature_init(make_test_model):
  model = make_test_model("align_mlp")
  feats = jnp.ones((B, L, D))
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), feats))["params"]
  assert [shapes[n]["kernel"].shape for n in ("fc1", "fc2", "fc3")] == [(D, 16), (16, 16),
                                                                         (16, C)]
  assert jax.eval_shape(model.apply, {"params": shapes}, feats).shape == (B, L, C)
  # Only τ is computed: XLA drops the other initialisers, so this compiles cheaply.
  tau = jax.jit(lambda k: model.apply(model.init(k, feats), method=text.AlignMLP.logit_scale))(
      jax.random.key(0))
  assert abs(float(tau) - np.log(1 / 0.07)) < 1e-6


def test_text_decoder_gives_per_position_logits(make_test_model, random_params):
  model = make_test_model("text_decoder")
  z = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, C)), jnp.float32)
  params = random_params(model, z)
  logits = jax.jit(model.apply)(params, z)
  assert logits.shape == (B, L, 50) and logits.dtype == jnp.float32
  # The learned position table makes identical tokens at different slots decode differently.
  same = jnp.broadcast_to(z[:, :1], z.shape)
  out = np.asarray(jax.jit(model.apply)(params, same))
  assert np.abs(out[:, 0] - out[:, 1]).max() > 1e-4
  with pytest.raises(ValueError, match="max_len"):
    model.apply(params, jnp.zeros((B, L + 1, C)))


def test_text_vae_keeps_pytorchs_default_linear_init():
  """Weights and biases U(±1/√fan_in), as the reference's modules built after its own init:
  fused qkv biases too (three Linear(W, W) there), norms 1 / 0."""
  model = text.TextVAE(text.TextVAEConfig(width=64, depth=1, heads=4, ffn_dim=256,
                                          token_channels=C))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.ones((B, L, 64))))["params"]
  block = params["layers_0"]
  for leaf, fan_in in ((block["attn"]["qkv"]["bias"], 64), (block["attn"]["proj"]["bias"], 64),
                       (block["attn"]["qkv"]["kernel"], 64), (block["ffn"]["fc1"]["bias"], 64),
                       (block["ffn"]["fc2"]["bias"], 256), (params["out"]["bias"], 64)):
    bound = 1 / np.sqrt(fan_in)
    leaf = np.asarray(leaf)
    assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound
    assert abs(leaf.std() - bound / np.sqrt(3)) < 0.25 * bound / np.sqrt(3), leaf.std()
  np.testing.assert_array_equal(block["norm1"]["bias"], 0.0)
