"""Sharding strategies of configs/flowtok.py (dp, fsdp, tp) and the DiT remat policies."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowtok_jax import config_lib
from flowtok_jax.errors import UserError
from flowtok_jax.models import flow as flow_lib
from flowtok_jax.sharding import strip_boxes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import json, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from flowtok_jax import config_lib, sharding
from flowtok_jax.models import flow as flow_lib
from flowtok_jax.train import optim

out = {}
x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 77, 16)), jnp.float32)
t, null = jnp.linspace(0.1, 0.9, 8), jnp.zeros((8,), jnp.int32)
for strategy in ("dp", "fsdp", "tp"):
  config = config_lib.load(f"{sys.argv[1]}/configs/flowtok.py:runlocal,strategy={strategy},tp=2")
  model = flow_lib.FlowTransformer(flow_lib.FlowConfig.from_config(config.flow))
  tx = optim.make(config.optim, total_steps=10).tx
  def init(rng):
    params = model.init(rng, x[:1], t[:1], null[:1])["params"]
    return {"params": params, "opt": tx.init(params)}
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.sharding)
  rng = jax.random.PRNGKey(0)
  abstract, _ = sharding.abstract_with_shardings(init, mesh, rules, rng)
  shapes = lambda a: [list(a.sharding.shard_shape(a.shape))]
  blk, mu = abstract["params"]["blocks_0"], abstract["opt"][0][0].mu["blocks_0"]
  out[strategy] = {"mesh": list(mesh.shape.values()), "fc1": shapes(blk["mlp"]["fc1"]["kernel"]),
                   "fc1_mu": shapes(mu["mlp"]["fc1"]["kernel"]),
                   "qkv": shapes(blk["attn"]["qkv"]["kernel"])}
  if strategy != "tp":
    continue
  # fsdp x tensor for real: the state is born on its shards, and the sharded forward gives the
  # velocities of one device.
  state, _ = sharding.born_sharded(init, mesh, rules, rng)
  real = lambda a: sorted({tuple(s.data.shape) for s in a.addressable_shards})
  blk, mu = state["params"]["blocks_0"], state["opt"][0][0].mu["blocks_0"]
  out["tp_real"] = {"fc1": real(blk["mlp"]["fc1"]["kernel"]),
                    "fc1_mu": real(mu["mlp"]["fc1"]["kernel"]),
                    "devices": len(blk["mlp"]["fc1"]["kernel"].addressable_shards)}
  apply = lambda p, x: model.apply({"params": p}, x, t, null)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    v = jax.jit(apply)(state["params"], sharding.host_to_global({"x": np.asarray(x)}, mesh)["x"])
  reference = jax.jit(apply)(jax.device_get(state["params"]), np.asarray(x))
  out["tp_real"]["max_diff"] = float(np.max(np.abs(np.asarray(v) - np.asarray(reference))))
print(json.dumps(out))
"""


def test_strategies_shard_params_and_adam_moments_and_agree():
  out = subprocess.run(
      [sys.executable, "-c", _SCRIPT, REPO], check=True, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, timeout=300)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  # runlocal DiT: width 64, MLP 256, 4 heads of 16; fc1 [64, 256] ('embed', 'mlp'),
  # qkv [64, 3, 4, 16] ('embed', -, 'heads', 'kv').
  assert got["dp"]["mesh"] == [8, 1, 1]
  assert got["dp"]["fc1"] == [[64, 256]] and got["dp"]["fc1_mu"] == [[64, 256]]
  assert got["fsdp"]["mesh"] == [1, 8, 1]  # ZeRO-3: params and moments split 8 ways
  assert got["fsdp"]["fc1"] == [[8, 256]] and got["fsdp"]["fc1_mu"] == [[8, 256]]
  assert got["fsdp"]["qkv"] == [[8, 3, 4, 16]]
  assert got["tp"]["mesh"] == [1, 4, 2]  # fsdp 4 x Megatron over heads / MLP hidden 2
  assert got["tp"]["fc1"] == [[16, 128]] and got["tp"]["fc1_mu"] == [[16, 128]]
  assert got["tp"]["qkv"] == [[16, 3, 2, 16]]
  # The real arrays: every one of the 8 devices holds exactly its [16, 128] block.
  assert got["tp_real"]["fc1"] == [[16, 128]]
  assert got["tp_real"]["fc1_mu"] == got["tp_real"]["fc1"] and got["tp_real"]["devices"] == 8
  assert got["tp_real"]["max_diff"] < 1e-5


def test_remat_policies_change_memory_not_gradients():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 4)), jnp.float32)
  t, null = jnp.array([0.2, 0.7]), jnp.zeros((2,), jnp.int32)
  base = flow_lib.FlowConfig(depth=1, width=32, heads=2, num_tokens=8, channels=4)
  params = strip_boxes(jax.jit(flow_lib.FlowTransformer(base).init)(jax.random.key(0), x, t,
                                                                     null)["params"])
  grads = {}
  for policy in ("none", "full", "dots"):
    cfg = flow_lib.FlowConfig(**{**base.__dict__, "remat": policy})
    model = flow_lib.FlowTransformer(cfg)
    loss = lambda p, model=model: jnp.mean(model.apply({"params": p}, x, t, null) ** 2)
    grads[policy] = jax.jit(jax.grad(loss))(params)
  for policy in ("full", "dots"):
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[policy])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_knob_is_read_from_the_config():
  assert flow_lib.remat_policy(False) == "none" and flow_lib.remat_policy(True) == "full"
  config = config_lib.load(f"{REPO}/configs/flowtok.py:runlocal,remat=dots")
  assert flow_lib.FlowConfig.from_config(config.flow).remat == "dots"
  bad = config_lib.load(f"{REPO}/configs/flowtok.py:runlocal,remat=some")
  with pytest.raises(UserError, match="flow.remat 'some' is unknown"):
    flow_lib.FlowConfig.from_config(bad.flow)
  with pytest.raises(UserError, match="strategy='zero'"):
    config_lib.load(f"{REPO}/configs/flowtok.py:strategy=zero")
