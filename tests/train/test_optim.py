"""AdamW from the config: schedule values, decay mask rules, clipping."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowtok_jax.errors import UserError
from flowtok_jax.train import optim


def _cfg(**kw):
  c = optim.default_config()
  c.update(kw)
  return c


def test_warmup_then_constant():
  s = optim.schedule(_cfg(lr=2.0, warmup_steps=4, schedule="constant"), total_steps=100)
  np.testing.assert_allclose([float(s(i)) for i in (0, 1, 2, 4, 50, 100)],
                             [0.0, 0.5, 1.0, 2.0, 2.0, 2.0], rtol=1e-6)


def test_warmup_then_cosine_to_end_lr():
  s = optim.schedule(_cfg(lr=1.0, warmup_steps=10, schedule="cosine", end_lr=0.1),
                     total_steps=110)
  # Half-way through the cosine: end + (lr - end) * (1 + cos(pi/2)) / 2 = 0.55.
  np.testing.assert_allclose([float(s(i)) for i in (5, 10, 60, 110, 500)],
                             [0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-5)


def test_bad_schedule_is_user_error():
  with pytest.raises(UserError, match="optim.schedule"):
    optim.schedule(_cfg(schedule="linear"), 10)


@pytest.mark.parametrize("key, value", [
    ("lr", float("nan")), ("lr", -1e-3), ("b1", 1.0), ("b2", float("inf")), ("eps", 0.0),
    ("weight_decay", -0.1), ("end_lr", float("nan")), ("clip_norm", -1.0)])
def test_numbers_that_would_not_train_are_refused_by_name(key, value):
  with pytest.raises(UserError, match=f"optim.{key}"):
    optim.make(_cfg(**{key: value}), total_steps=10)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Embed(7, 8, name="tok_embedding")(x)
    x = nn.Dense(8, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")), name="proj")(x)
    x = nn.LayerNorm(name="ln_final")(x)
    x = x + self.param("mask_token", nn.initializers.zeros, (1, 8))
    return nn.Dense(3, name="head")(x)


def test_decay_mask_rules_on_boxed_and_plain_trees():
  params = _Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
  for tree in (params, nn.meta.unbox(params)):
    mask = nn.meta.unbox(optim.decay_mask(tree, optim.DEFAULT_DECAY_EXCLUDE))
    assert mask["proj"]["kernel"] and mask["head"]["kernel"]  # matmul weights decay
    assert not mask["proj"]["bias"] and not mask["head"]["bias"]  # ndim < 2
    assert not mask["ln_final"]["scale"]
    assert not mask["tok_embedding"]["embedding"]  # 2D but an embedding table
    assert not mask["mask_token"]  # 2D but a learned token
  # The exclusion list is configurable: without it only ndim decides.
  mask = optim.decay_mask(nn.meta.unbox(params), ())
  assert mask["tok_embedding"]["embedding"] and mask["mask_token"]


def test_weight_decay_only_hits_masked_params():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = optim.make(_cfg(lr=0.1, weight_decay=0.5, warmup_steps=0), total_steps=10).tx
  upd, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(upd["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(upd["b"], 0.0)


def test_clipping_rescales_to_global_norm():
  # With eps >> |g|, Adam's first update is ~ -lr * g / eps: linear in the (clipped) gradient.
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  g = {"w": 100.0 * jnp.ones((2, 2)), "b": jnp.zeros((2,))}  # global norm 200
  def first_update(clip):
    tx = optim.make(_cfg(lr=1.0, weight_decay=0.0, eps=1e6, clip_norm=clip), total_steps=10).tx
    return np.asarray(tx.update(g, tx.init(params), params)[0]["w"])
  np.testing.assert_allclose(first_update(None), -100.0 / 1e6, rtol=1e-3)
  np.testing.assert_allclose(first_update(1.0), -0.5 / 1e6, rtol=1e-3)


def test_paper_config_decays_no_bias_fused_or_not():
  import os  # pylint: disable=g-import-not-at-top
  from flowtok_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                        "flowtok.py"))
  params = {"flow": {"blocks_0": {"attn": {"qkv": {"kernel": jnp.zeros((4, 3, 2, 2)),
                                                  "bias": jnp.zeros((3, 2, 2))},
                                           "proj": {"bias": jnp.zeros((4,))}}}}}
  mask = optim.decay_mask(params, config.optim.decay_exclude)
  attn = mask["flow"]["blocks_0"]["attn"]
  assert attn["qkv"]["kernel"] and not attn["qkv"]["bias"] and not attn["proj"]["bias"]


def test_muon_dims_pick_hidden_kernels_with_their_contracted_axes():
  from optax.contrib import MuonDimensionNumbers as Dims  # pylint: disable=g-import-not-at-top
  params = {"blocks_0": {"attn": {"qkv": {"kernel": jnp.zeros((8, 3, 2, 4)),
                                          "bias": jnp.zeros((3, 2, 4))},
                                  "proj": {"kernel": jnp.zeros((2, 4, 8))}},
                         "mlp": {"w12": {"kernel": jnp.zeros((8, 2, 6))},
                                 "fc2": {"kernel": jnp.zeros((6, 8))}},
                         "adaLN": {"kernel": jnp.zeros((8, 48))}},
            "patch_embed": {"kernel": jnp.zeros((2, 2, 3, 8))},
            "pixel_head": {"kernel": jnp.zeros((8, 12))},
            "latent_tokens": jnp.zeros((4, 8))}
  dims = optim.muon_dims(params, re.compile(optim.MUON_INCLUDE))
  b = dims["blocks_0"]
  assert b["attn"]["qkv"]["kernel"] == Dims((0,), (1, 2, 3))  # fused q, k, v: one matrix
  assert b["attn"]["qkv"]["bias"] is None
  assert b["attn"]["proj"]["kernel"] == Dims((0, 1), (2,))  # contracts heads and head dim
  assert b["mlp"]["w12"]["kernel"] == Dims((0,), (1, 2))
  assert b["mlp"]["fc2"]["kernel"] == Dims((0,), (1,))
  # adaLN (zero-initialised modulation), stems, heads and tables stay on AdamW.
  assert b["adaLN"]["kernel"] is None and dims["patch_embed"]["kernel"] is None
  assert dims["pixel_head"]["kernel"] is None and dims["latent_tokens"] is None


def test_muon_orthogonalises_hidden_kernels_and_adamw_updates_the_rest():
  rng = np.random.default_rng(0)
  params = {"blocks_0": {"mlp": {"fc1": {"kernel": jnp.zeros((16, 16)),
                                         "bias": jnp.zeros((16,))}}},
            "head": {"kernel": jnp.zeros((16, 4))}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  tx = optim.make(_cfg(name="muon", lr=0.1, weight_decay=0.0), total_steps=10).tx
  upd, _ = tx.update(grads, tx.init(params), params)
  u = np.asarray(upd["blocks_0"]["mlp"]["fc1"]["kernel"])
  sv = np.linalg.svd(u, compute_uv=False)
  # Newton-Schulz leaves every singular value near 1 (0.7-1.2 for the preset coefficients),
  # scaled so the update's RMS is AdamW's ~0.2 x lr: sqrt(16) x 0.2 x lr per singular value.
  assert sv.max() / sv.min() < 2.0, sv
  np.testing.assert_allclose(np.sqrt(np.mean(u ** 2)), 0.2 * 0.1, rtol=0.3)
  # The rest gets (Nesterov) Adam's first step: one magnitude ~lr for all, against sign(g).
  for got, g in ((upd["head"]["kernel"], grads["head"]["kernel"]),
                 (upd["blocks_0"]["mlp"]["fc1"]["bias"], grads["blocks_0"]["mlp"]["fc1"]["bias"])):
    got, g = np.asarray(got), np.asarray(g)
    np.testing.assert_array_equal(np.sign(got), -np.sign(g))
    np.testing.assert_allclose(np.abs(got), np.abs(got).flat[0], rtol=1e-4)
    assert 0.05 < np.abs(got).flat[0] < 0.2


def test_unknown_optimizer_is_user_error():
  with pytest.raises(UserError, match="optim.name"):
    optim.make(_cfg(name="sgd"), total_steps=10)


def test_muon_decay_follows_the_mask():
  # optax's Muon decays its AdamW half unmasked; ours decays by the same rules as AdamW.
  params = {"blocks_0": {"mlp": {"fc1": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}}},
            "ln": {"scale": jnp.ones((4,))}, "head": {"kernel": jnp.ones((4, 2))}}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = optim.make(_cfg(name="muon", lr=0.1, weight_decay=0.5), total_steps=10).tx
  upd, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(upd["blocks_0"]["mlp"]["fc1"]["kernel"], -0.05, rtol=1e-5)
  np.testing.assert_allclose(upd["head"]["kernel"], -0.05, rtol=1e-5)
  np.testing.assert_allclose(upd["blocks_0"]["mlp"]["fc1"]["bias"], 0.0, atol=1e-7)
  np.testing.assert_allclose(upd["ln"]["scale"], 0.0, atol=1e-7)
