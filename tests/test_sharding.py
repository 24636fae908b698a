"""Mesh from the config, rule validation, batch checks, and FSDP really sharding (8 devices)."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from flowtok_jax import sharding
from flowtok_jax.errors import UserError


def test_mesh_shape_resolves_the_rest():
  assert sharding.mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert sharding.mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape((1, 4, 2), 8) == (1, 4, 2)


@pytest.mark.parametrize("shape,devices,msg", [
    ((3, -1, 1), 8, "does not fit 8 devices"),
    ((2, 2, 1), 8, r"needs 4 devices, but 8 are available"),
    ((-1, -1, 1), 8, "at most one"),
    ((2, 2), 4, "must have 3 sizes"),
    ((0, 1, 1), 1, "positive"),
])
def test_mesh_that_does_not_fit_is_user_error(shape, devices, msg):
  with pytest.raises(UserError, match=msg):
    sharding.mesh_shape(shape, devices)


def test_make_mesh_checks_real_devices():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(shape=(-1, 1, 1))))
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.size == jax.device_count()
  # Auto axes: linen's logical constraints need them (Explicit is make_mesh's default).
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(UserError, match="needs 2 devices"):
    sharding.make_mesh(ml_collections.ConfigDict(dict(shape=(2, 1, 1))))


def test_batch_must_divide_data_parallel_size_and_processes():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  sharding.check_batch_size(8, mesh, process_count=2)
  with pytest.raises(UserError, match=r"batch size 6 is not divisible by the data-parallel "
                                      r"size 4 \(mesh data x fsdp = 2 x 2\)"):
    sharding.check_batch_size(6, mesh, process_count=1)
  with pytest.raises(UserError, match="number of processes 3"):
    sharding.check_batch_size(8, mesh, process_count=3)
  # Tensor parallelism across hosts: both processes would own the same rows.
  tp = jax.sharding.AbstractMesh((1, 1, 8), sharding.MESH_AXES)
  with pytest.raises(UserError, match="data-parallel size 1 .* not a multiple of the 2 processes"):
    sharding.check_batch_size(8, tp, process_count=2)


def test_rules_from_config_are_validated_and_default_to_the_models_table():
  from flowtok_jax.models import layers  # pylint: disable=g-import-not-at-top
  assert sharding.logical_rules(None) == tuple(layers.DEFAULT_LOGICAL_RULES)
  cfg = ml_collections.ConfigDict(dict(rules=(("batch", ("data", "fsdp")), ("mlp", "tensor"))))
  assert sharding.logical_rules(cfg) == (("batch", ("data", "fsdp")), ("mlp", "tensor"))
  bad = ml_collections.ConfigDict(dict(rules=(("mlp", "model"),)))
  with pytest.raises(UserError, match="unknown mesh axis 'model'"):
    sharding.logical_rules(bad)


_FSDP_SCRIPT = r"""
import json, flax.linen as nn, jax, jax.numpy as jnp, ml_collections, numpy as np
from flowtok_jax import sharding
from flowtok_jax.train import optim

class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    p = lambda axes: nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)
    x = nn.Dense(64, kernel_init=p(("embed", "mlp")), name="up")(x)
    return nn.Dense(3, kernel_init=p(("mlp", "embed")), name="odd")(x)  # 3 % fsdp != 0

mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(shape=(2, 2, 2))))
rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
tx = optim.make(optim.default_config(), total_steps=10).tx
def init(rng):
  params = Net().init(rng, jnp.zeros((1, 16)))["params"]
  return {"params": params, "opt": tx.init(params)}
state, _ = sharding.born_sharded(init, mesh, rules, jax.random.PRNGKey(0))
mu = state["opt"][0][0].mu
batch = sharding.host_to_global({"x": np.zeros((8, 16), np.float32)}, mesh)
shard = lambda a: [list(s.data.shape) for s in a.addressable_shards]
print(json.dumps({
  "up": shard(state["params"]["up"]["kernel"]), "up_mu": shard(mu["up"]["kernel"]),
  "odd": shard(state["params"]["odd"]["kernel"]), "x": shard(batch["x"]),
  "x_shape": list(batch["x"].shape)}))
"""


def test_fsdp_and_tensor_axes_really_shard_params_and_optimizer_state():
  out = subprocess.run(
      [sys.executable, "-c", _FSDP_SCRIPT], check=True, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, timeout=180)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  # [16, 64] kernel over (embed=fsdp 2, mlp=tensor 2): every device holds a quarter.
  assert got["up"] == [[8, 32]] * 8 and got["up_mu"] == [[8, 32]] * 8
  # [64, 3]: 3 does not divide by fsdp, so that dim stays whole; mlp still over tensor.
  assert got["odd"] == [[32, 3]] * 8
  # The global batch [8, 16] is split over data x fsdp = 4 devices (replicated over tensor).
  assert got["x_shape"] == [8, 16] and got["x"] == [[2, 16]] * 8
