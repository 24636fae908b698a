"""Parity quirks of the shared layers, each against an independent numpy computation."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax.models import layers


def test_timestep_embedding_is_cos_then_sin_of_raw_t():
  t = np.array([0.0, 0.25, 0.7, 0.99999], np.float32)
  got = np.asarray(layers.timestep_embedding(jnp.asarray(t), 256))
  want = np.zeros((4, 256))
  for b in range(4):
    for i in range(128):
      freq = math.exp(-math.log(10000.0) * i / 128)
      want[b, i] = math.cos(t[b] * freq)  # Raw t: no ×1000.
      want[b, 128 + i] = math.sin(t[b] * freq)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_sincos_1d_is_sin_then_cos():
  dim, length = 12, 5
  got = layers.sincos_1d(dim, length)
  for m in range(length):
    for i in range(dim // 2):
      omega = 10000.0 ** (-i / (dim / 2))
      assert abs(got[m, i] - math.sin(m * omega)) < 1e-6
      assert abs(got[m, dim // 2 + i] - math.cos(m * omega)) < 1e-6


def _rope_reference(x, grid):
  """Loop form of EVA 2D RoPE: dims [0, D/2) rotate by row, [D/2, D) by column, pairs (2i, 2i+1)."""
  n, dh = x.shape
  half = dh // 2
  out = x.copy()
  for tok in range(grid * grid):
    row, col = divmod(tok, grid)
    for d in range(0, dh, 2):
      pos, j = (row, d // 2) if d < half else (col, (d - half) // 2)
      angle = pos * 10000.0 ** (-(2 * j) / half)
      x0, x1 = x[tok, d], x[tok, d + 1]
      out[tok, d] = x0 * math.cos(angle) - x1 * math.sin(angle)
      out[tok, d + 1] = x1 * math.cos(angle) + x0 * math.sin(angle)
  return out  # Tokens after the grid (latents, text) are left alone.


def test_rope_2d_rotates_adjacent_pairs_rows_then_columns():
  grid, dh, extra = 3, 16, 2
  x = np.random.default_rng(0).standard_normal((grid * grid + extra, dh)).astype(np.float32)
  cos, sin = layers.rope_2d(dh, grid, num_extra=extra)
  got = layers.apply_rope(jnp.asarray(x)[None, :, None, :], cos, sin)[0, :, 0]
  np.testing.assert_allclose(np.asarray(got), _rope_reference(x, grid), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[grid * grid:], x[grid * grid:])


def test_parity_layer_norm_uses_unbiased_std_with_eps_on_std():
  x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32) * 3 + 1
  ln = layers.ParityLayerNorm()
  params = ln.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.3, params)  # scale 1.3, bias 0.3
  got = np.asarray(ln.apply(params, x))
  mean = x.mean(-1, keepdims=True)
  std = x.std(-1, ddof=1, keepdims=True)
  want = 1.3 * (x - mean) / (std + 1e-5) + 0.3
  np.testing.assert_allclose(got, want, atol=1e-5)
  standard = 1.3 * (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) + 0.3
  assert np.abs(got - standard).max() > 1e-2  # The quirk is visible at D = 8.


def test_swiglu_hidden_matches_released_shapes():
  assert layers.swiglu_hidden(768) == 2048
  assert layers.swiglu_hidden(1024) == 2730


def test_default_rules_are_short_and_use_known_names():
  rules = layers.DEFAULT_LOGICAL_RULES
  assert len(rules) <= 15
  logical = {"batch", "length", "embed", "heads", "kv", "mlp", "vocab"}
  for name, mesh in rules:
    assert name in logical
    mesh = mesh if isinstance(mesh, tuple) else (mesh,)
    assert set(mesh) <= {"data", "fsdp", "tensor", None}
  # Activations keep batch on (data, fsdp) and leave embed unsharded; params shard embed on fsdp.
  act = jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
  assert layers.nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == act
  want = jax.sharding.PartitionSpec("fsdp", "tensor")
  assert layers.nn.logical_to_mesh_axes(("embed", "mlp"), rules) == want


def test_trunc_normal_matches_the_references_absolute_bounds():
  """torch's trunc_normal_(std=0.02) cuts at ±2 (absolute): effectively N(0, 0.02²), not the
  ±2σ-truncated normal (std 0.0176) that flax's truncated_normal draws."""
  w = layers.trunc_normal(0.02)(jax.random.PRNGKey(0), (512, 512))
  assert abs(float(jnp.std(w)) / 0.02 - 1.0) < 0.01
  assert float(jnp.max(jnp.abs(w))) > 2.5 * 0.02  # not cut at 2σ


def _plain_dot(x, kernel, in_dims):
  contract = tuple(range(x.ndim - in_dims, x.ndim))
  return jax.lax.dot_general(x, kernel, ((contract, tuple(range(in_dims))), ((), ())))


def test_dense_dot_matches_dot_general_and_its_gradients_in_both_orders():
  rng = np.random.default_rng(0)
  for x_shape, k_shape, in_dims in [((3, 5, 6), (6, 7), 1), ((2, 4, 3, 5), (3, 5, 2, 4), 2),
                                    ((2, 2, 2, 4, 4, 3), (4, 4, 3, 6), 3)]:
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    want = _plain_dot(x, kernel, in_dims)
    ct = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    want_gx, want_gk = jax.vjp(lambda a, b: _plain_dot(a, b, in_dims), x, kernel)[1](ct)
    for from_input in (True, False):
      got, vjp = jax.vjp(lambda a, b: layers.dense_dot(a, b, in_dims, from_input), x, kernel)
      gx, gk = vjp(ct)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
      assert gx.shape == x.shape and gk.shape == kernel.shape
      np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(gk, want_gk, rtol=1e-5, atol=1e-5)


def test_patch_embed_is_the_strided_convolution_with_the_same_parameters():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 12, 12, 3)), jnp.float32)
  for use_bias in (True, False):
    ours = layers.PatchEmbed(5, 4, use_bias=use_bias, kernel_init=layers.normal(0.5),
                             bias_init=layers.normal(0.5))
    params = nn.unbox(ours.init(jax.random.key(0), images))
    conv = nn.Conv(5, (4, 4), strides=(4, 4), padding="VALID", use_bias=use_bias)
    assert (jax.tree_util.tree_map(jnp.shape, params)
            == jax.tree_util.tree_map(jnp.shape, conv.init(jax.random.key(0), images)))
    got = ours.apply(params, images)
    assert got.shape == (2, 3, 3, 5)
    np.testing.assert_allclose(got, conv.apply(params, images), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p, f: jnp.sum(f.apply(p, images) ** 2))
    for a, b in zip(jax.tree_util.tree_leaves(grads(params, ours)),
                    jax.tree_util.tree_leaves(grads(params, conv))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
