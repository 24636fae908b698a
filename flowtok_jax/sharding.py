"""Mesh from the config, logical-axis rules, born-sharded state, host batches -> global arrays.

Model code names only logical axes ('batch', 'embed', 'mlp', ...); this module maps them onto the
mesh ('data', 'fsdp', 'tensor') with the config's rules (default: the models' table). The state is
never materialised unsharded: `jax.eval_shape(init)` gives the boxed shapes and logical names,
`nn.get_partition_spec` + `nn.logical_to_mesh_sharding` turn them into NamedShardings (optax's
`mu`/`nu` mirror the boxed params, so they inherit the same specs), and `jax.jit(init,
out_shardings=...)` creates every leaf directly on its shards.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from flowtok_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
# Examples are split over every data-parallel device: 'data' (pure replicas) and 'fsdp' (replicas
# that also split the parameters).
DATA_AXES = ("data", "fsdp")
# Leaves at least this large that end up fully replicated on a multi-device mesh are logged.
_WARN_REPLICATED_BYTES = 64 << 20


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves a mesh shape with at most one -1 ('the rest') against the device count.

  Raises:
    UserError: wrong length, several -1, non-positive sizes, or a product that does not use
      exactly `num_devices` devices.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise UserError(f"mesh.shape must have {len(MESH_AXES)} sizes for axes {MESH_AXES}, "
                    f"got {shape}")
  if shape.count(-1) > 1:
    raise UserError(f"mesh.shape {shape}: at most one size may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise UserError(f"mesh.shape {shape}: sizes must be positive (or -1 for the rest)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise UserError(f"mesh.shape {shape} does not fit {num_devices} devices: "
                      f"{num_devices} is not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise UserError(f"mesh.shape {shape} needs {math.prod(shape)} devices, "
                    f"but {num_devices} are available")
  return shape


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh from `mesh_cfg.shape` over all devices.

  Axis types are Auto: the linen logical-partitioning recipe (sharding constraints inside the
  model, shardings inferred for intermediates) fails on the Explicit axes `jax.make_mesh` now
  defaults to.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg.shape, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_rules(sharding_cfg: ml_collections.ConfigDict | None = None) -> tuple:
  """The logical-axis rules: `sharding_cfg.rules` when set, else the models' default table."""
  rules = sharding_cfg.get("rules") if sharding_cfg is not None else None
  if rules is None:
    from flowtok_jax.models import layers  # pylint: disable=g-import-not-at-top
    rules = layers.DEFAULT_LOGICAL_RULES
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise UserError(f"sharding rule {rule!r} must be (logical_name, mesh_axes)")
    name, axes = rule
    for ax in (axes,) if isinstance(axes, str) or axes is None else axes:
      if ax is not None and ax not in MESH_AXES:
        raise UserError(f"sharding rule {rule!r}: unknown mesh axis {ax!r} (axes: {MESH_AXES})")
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in DATA_AXES)


def check_batch_size(global_batch_size: int, mesh: Mesh, process_count: int | None = None):
  """Raises a UserError unless the global batch splits evenly over data devices and hosts."""
  process_count = jax.process_count() if process_count is None else process_count
  dp = data_parallel_size(mesh)
  if global_batch_size <= 0:
    raise UserError(f"batch size must be positive, got {global_batch_size}")
  if global_batch_size % dp:
    raise UserError(f"batch size {global_batch_size} is not divisible by the data-parallel size "
                    f"{dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  if global_batch_size % process_count:
    raise UserError(f"batch size {global_batch_size} is not divisible by the number of "
                    f"processes {process_count}")
  if dp % process_count:
    # Each process feeds its own rows; with fewer data shards than processes (e.g. tensor
    # parallelism across hosts) several processes would own the same rows.
    raise UserError(f"the mesh's data-parallel size {dp} (data x fsdp) is not a multiple of the "
                    f"{process_count} processes: give the data or fsdp axis at least one device "
                    "per host (tensor parallelism stays within a host)")


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ('data', 'fsdp'), every other axis replicated."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(host_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's slice of the batch into global arrays sharded over the data axes.

  Args:
    host_batch: name -> numpy array [B / process_count, ...] (this process's examples).
    mesh: the mesh.
  Returns:
    name -> jax.Array [B, ...] with the leading axis over ('data', 'fsdp').
  """
  sh = data_sharding(mesh)
  n = jax.process_count()
  # The global shape stated, not inferred: a mesh whose processes share rows then fails loudly
  # instead of assembling a batch of the wrong size.
  return {k: jax.make_array_from_process_local_data(
              sh, np.asarray(v), global_shape=(n * np.shape(v)[0],) + np.shape(v)[1:])
          for k, v in host_batch.items()}


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (tiny test models, odd vocabularies)."""
  dims = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for size, axes in zip(shape, dims):
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    n = math.prod(mesh.shape[a] for a in names)
    out.append(axes if n == 1 or size % n == 0 else None)
  return P(*out)


def strip_boxes(tree: Any) -> Any:
  """Replaces logical-axis boxes by their values.

  Unlike `nn.meta.unbox`, adds no sharding constraint (which fails on abstract values and on
  dims `_fit_spec` left unsharded); the shardings are applied by jit's out_shardings instead.
  """
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def shardings_for(abstract: Any, mesh: Mesh, rules: Sequence) -> Any:
  """NamedShardings for an abstract (eval_shape) tree whose leaves may be logically boxed.

  Unboxed leaves (step, rng, optax counts) are replicated. Returns a tree shaped like the
  *unboxed* tree.
  """
  specs = nn.get_partition_spec(abstract)
  shapes = strip_boxes(abstract)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  def one(spec, leaf):
    if not hasattr(leaf, "shape"):  # An empty node (optax's MaskedNode, a namedtuple that
      return leaf  # logical_to_mesh took for a spec): no array to place.
    spec = P() if spec is None else spec
    return NamedSharding(mesh, _fit_spec(spec, tuple(leaf.shape), mesh))
  return jax.tree.map(one, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def born_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Sequence,
                 *args) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` (returning a boxed tree) so every leaf is created on its shards.

  Returns:
    (unboxed tree of jax.Arrays, tree of their NamedShardings).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = shardings_for(abstract, mesh, rules)
    warn_replicated(strip_boxes(abstract), shardings, mesh)
    tree = jax.jit(lambda *a: strip_boxes(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings


def abstract_with_shardings(init_fn: Callable[..., Any], mesh: Mesh, rules: Sequence, *args):
  """`jax.ShapeDtypeStruct`s (with shardings) of the unboxed `init_fn(*args)`: restore targets."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = shardings_for(abstract, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      strip_boxes(abstract), shardings), shardings


def warn_replicated(shapes: Any, shardings: Any, mesh: Mesh):
  """Logs large leaves that stay fully replicated on a multi-device mesh (a missing axis name)."""
  if mesh.size == 1:
    return
  def one(path, leaf, sh):
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    if nbytes >= _WARN_REPLICATED_BYTES and all(a is None for a in sh.spec):
      logging.warning("%s (%s, %.0f MiB) is replicated on every device",
                      jax.tree_util.keystr(path), leaf.shape, nbytes / 2**20)
  jax.tree_util.tree_map_with_path(one, shapes, shardings)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None):
  """Starts multi-host JAX once per process (before any other JAX call).

  With no arguments JAX reads the cluster from the environment (Cloud TPU, SLURM, ...); explicit
  values serve local multi-process runs (`launch/local_multihost.sh`).
  """
  if coordinator_address is None and num_processes is None and process_id is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
