"""FlowTransformer: shapes, adaLN-Zero init, timestep path, the direction embedding."""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowtok_jax.errors import UserError
from flowtok_jax.models import flow

B, K, C = 3, 8, 4


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((B, K, C)), jnp.float32)
  t = jnp.asarray([0.0, 0.5, 0.9], jnp.float32)
  null = jnp.asarray([0, 1, 0], jnp.int32)
  return x, t, null


CFG = flow.FlowConfig(depth=2, width=32, heads=2, num_tokens=K, channels=C)


@pytest.fixture(scope="module")
def one_way():
  """A one-direction model and its jitted apply (compiled once per module)."""
  model = flow.FlowTransformer(CFG)
  return model, jax.jit(model.apply)


@pytest.fixture(scope="module")
def two_way():
  """A two-direction model, its jitted apply and one real init.

  The init uses an RBG key: threefry's per-parameter programs make this compile several times
  slower on CPU, and the init functions under test do not depend on the generator.
  """
  model = flow.FlowTransformer(dataclasses.replace(CFG, two_directions=True))
  x, t, null = _inputs()
  key = jax.random.key(0, impl="unsafe_rbg")
  params = jax.jit(model.init)(key, x, t, null, jnp.zeros((B,), jnp.int32))
  return model, jax.jit(model.apply), params


def test_shapes_and_adaln_zero_init_gives_exactly_zero(two_way):
  _, apply, params = two_way
  x, t, null = _inputs()
  v = apply(params, x, t, null, jnp.ones((B,), jnp.int32))
  assert v.shape == (B, K, C) and v.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(v), 0.0)
  p = nn.meta.unbox(params)["params"]
  for name in ("blocks_0", "blocks_1", "final_layer"):
    np.testing.assert_array_equal(np.asarray(p[name]["adaLN"]["kernel"]), 0.0)
  np.testing.assert_array_equal(np.asarray(p["final_layer"]["linear"]["kernel"]), 0.0)
  assert p["blocks_0"]["adaLN"]["kernel"].shape == (32, 6 * 32)
  assert p["blocks_0"]["attn"]["qkv"]["kernel"].shape == (32, 3, 2, 16)
  assert p["blocks_0"]["attn"]["proj"]["kernel"].shape == (2, 16, 32)
  assert p["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (32, 128)
  assert p["final_layer"]["linear"]["kernel"].shape == (32, C)
  assert p["null_embedder"]["embedding"].shape == (2, 32)
  assert "pos_embed" not in p  # The sin-cos table is fixed, not a parameter.
  qkv = np.asarray(p["blocks_0"]["attn"]["qkv"]["kernel"]).reshape(32, 96)
  assert abs(qkv.std() - math.sqrt(2 / (32 + 96))) < 0.02  # xavier-uniform on [W, 3W]
  np.testing.assert_array_equal(np.asarray(p["blocks_0"]["attn"]["qkv"]["bias"]), 0.0)


def test_output_depends_on_t_and_null_once_weights_move(one_way, random_params):
  model, apply = one_way
  x, t, null = _inputs()
  params = random_params(model, x, t, null)
  v = np.asarray(apply(params, x, t, null))
  assert np.abs(v).max() > 1e-3
  assert np.abs(v - np.asarray(apply(params, x, t + 0.05, null))).max() > 1e-5
  assert np.abs(v - np.asarray(apply(params, x, t, 1 - null))).max() > 1e-5
  with pytest.raises(ValueError, match="two_directions"):
    apply(params, x, t, null, jnp.zeros((B,), jnp.int32))
  with pytest.raises(ValueError, match="expects x"):
    apply(params, x[:, :5], t, null)


def test_timestep_embedder_feeds_raw_t_cos_sin_to_mlp(two_way, random_params):
  te = flow.TimestepEmbedder(width=16, freq_dim=8)
  t = jnp.asarray([0.0, 0.3, 1.0])
  params = nn.meta.unbox(random_params(te, t, scale=0.3))["params"]
  got = np.asarray(jax.jit(te.apply)({"params": params}, t))
  freqs = np.array([math.exp(-math.log(10000) * i / 4) for i in range(4)])
  args = np.asarray(t)[:, None] * freqs
  h = np.concatenate([np.cos(args), np.sin(args)], -1)
  h = h @ params["fc1"]["kernel"] + params["fc1"]["bias"]
  h = h / (1 + np.exp(-h)) @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  np.testing.assert_allclose(got, h, atol=1e-5)
  # The real init draws the t-MLP from N(0, 0.02) with zero biases.
  real = nn.meta.unbox(two_way[2])["params"]["t_embedder"]
  assert abs(float(np.std(real["fc2"]["kernel"])) - 0.02) < 0.003
  np.testing.assert_array_equal(np.asarray(real["fc1"]["bias"]), 0.0)


def test_direction_embedding_is_zero_initialised_and_loads_t2i_weights(one_way, two_way,
                                                                        perturb):
  (_, apply1), (_, apply2, p2) = one_way, two_way
  x, t, null = _inputs()
  d0, d1 = jnp.zeros((B,), jnp.int32), jnp.ones((B,), jnp.int32)
  table = nn.meta.unbox(p2)["params"]["direction_embedder"]["embedding"]
  np.testing.assert_array_equal(np.asarray(table), 0.0)
  # Move every weight except the direction table: both directions still agree exactly.
  p2 = perturb(p2, scale=0.1, skip="direction_embedder")
  v0 = np.asarray(apply2(p2, x, t, null, d0))
  assert np.abs(v0).max() > 1e-3
  np.testing.assert_array_equal(v0, np.asarray(apply2(p2, x, t, null, d1)))
  # A T2I-only checkpoint + the zero table is the same function as the one-way model.
  p1 = {"params": {k: v for k, v in p2["params"].items() if k != "direction_embedder"}}
  np.testing.assert_allclose(np.asarray(apply1(p1, x, t, null)), v0, atol=1e-6)
  # Once trained, the table separates the directions.
  p3 = perturb(p2, scale=0.1, seed=1)
  assert np.abs(np.asarray(apply2(p3, x, t, null, d0))
                - np.asarray(apply2(p3, x, t, null, d1))).max() > 1e-5


def test_bfloat16_compute_keeps_float32_params(random_params):
  model = flow.FlowTransformer(dataclasses.replace(CFG, dtype="bfloat16", remat=True))
  x, t, null = _inputs()
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, null)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
  plain = jax.eval_shape(flow.FlowTransformer(CFG).init, jax.random.key(0), x, t, null)
  assert jax.tree.structure(shapes) == jax.tree.structure(plain)  # remat keeps the names.
  v = jax.jit(model.apply)(random_params(model, x, t, null), x, t, null)
  assert v.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(v)))


def test_variant_table_and_explicit_sizes():
  sec = ml_collections.ConfigDict(dict(variant="XL", depth=None, width=None, heads=None,
                                       num_tokens=77, channels=16))
  cfg = flow.FlowConfig.from_config(sec)
  assert (cfg.depth, cfg.width, cfg.heads) == (28, 1152, 16)
  sec.update(variant=None, depth=2, width=64, heads=4)
  assert flow.FlowConfig.from_config(sec).width == 64
  sec.update(variant="Z")
  with pytest.raises(UserError, match="variant"):
    flow.FlowConfig.from_config(sec)
