"""The Stage interface: what a training stage hands to the one train loop (`train/loop.py`).

A stage (CLIP pretraining, tokenizer, FlowTok, or a test toy) is a function registered by name,

    @stage_api.register("tokenizer")
    def build_tokenizer(config, ctx: StageContext) -> Stage: ...

that turns the config into a `Stage`: how to initialise the trainable parameters, the loss, the
optimizer, the training data, and optionally frozen parts from earlier stages, an auxiliary module
trained by its own optimizer (a GAN discriminator), EMA, evaluators and an analytic FLOPs count.
The loop owns everything else (mesh, sharding, jit, checkpoints, metrics); nothing is forked per
stage.

Conventions every stage follows:
  * Parameter trees returned by `init` functions are **boxed** with logical axes
    (`nn.with_logical_partitioning` / `nn.LogicallyPartitioned`) so the loop can shard them; the
    loop unboxes them, so `loss_fn` and evaluators always receive plain arrays.
  * `init` functions receive a batch of ONE example (leading dim 1, zeros shaped like
    `Stage.example_batch`): init must not depend on the batch size.
  * `loss_fn` is traced once inside the jitted train step: pure jnp, no Python branching on values.
    `step` is a traced int32 scalar; use `jnp.where(step >= start, ...)` for schedules.
  * Metric names are short (`loss_t2i`); the loop namespaces them as `train/loss_t2i`. A name that
    already contains '/' is kept as is. The total loss is always logged as `train/loss`.
  * Batches are dicts of arrays with the global batch on the leading axis, sharded over the mesh's
    ('data', 'fsdp') axes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import jax
import ml_collections
import numpy as np
import optax

from flowtok_jax import config_lib
from flowtok_jax.errors import UserError

Params = Any  # A pytree of arrays (boxed with logical axes when returned by an init function).
Batch = Mapping[str, Any]  # Name -> array [B, ...].
Metrics = dict[str, Any]  # Flat name -> scalar.


@dataclasses.dataclass
class LossAux:
  """What a loss function returns besides the loss, when it needs more than metrics.

  Attributes:
    metrics: flat scalar metrics (short names; the loop prefixes `train/`).
    outputs: anything the auxiliary module's loss needs from this forward pass (e.g. the
      reconstructions `[B, H, W, 3]` a discriminator judges). The loop applies `stop_gradient`.
  """
  metrics: Metrics
  outputs: Any = None


jax.tree_util.register_dataclass(LossAux, data_fields=["metrics", "outputs"], meta_fields=[])


class LossFn(Protocol):
  """`loss_fn(params, frozen, batch, rng, step, aux_params) -> (loss, metrics | LossAux)`.

  Args:
    params: the trainable parameters (unboxed), differentiated.
    frozen: name -> frozen parameter tree (see `FrozenPart`); `{}` when the stage has none.
    batch: the global batch.
    rng: a key already folded with the step (different every step, identical on resume).
    step: int32 scalar, the step being taken (0 for the first update).
    aux_params: the auxiliary module's parameters (e.g. discriminator), or None. Gradients do not
      flow into them from this loss.
  Returns:
    (scalar loss, metrics dict) or (scalar loss, LossAux).
  """

  def __call__(self, params: Params, frozen: Mapping[str, Params], batch: Batch,
               rng: jax.Array, step: jax.Array, aux_params: Params | None) -> tuple[Any, Any]:
    ...


@dataclasses.dataclass(frozen=True)
class FrozenPart:
  """Parameters loaded from an earlier stage's checkpoint and kept fixed (not trained, not decayed).

  They are sharded by their logical axes like the trainable params, never replicated per device,
  and reach `loss_fn` as `frozen[name]`.

  Attributes:
    name: key in the `frozen` dict.
    init: `(rng, example_batch) -> boxed params`; defines shapes and logical axes (and is the
      fallback values when `checkpoint` is None).
    checkpoint: the earlier stage's workdir or checkpoint directory (typically
      `config.init.<part>_from`), or None to initialise randomly (tests; a warning is logged).
    select: path inside the saved parameter tree, e.g. `('text_tower',)`; `()` takes it whole.
    use_ema: take the checkpoint's EMA parameters (True) or its raw parameters.
    load: `() -> params` (plain arrays) for a part that comes from weight files rather than a
      stage's checkpoint (a perceptual network); checked against `init`'s shapes. Takes
      precedence over `checkpoint`.
  """
  name: str
  init: Callable[[jax.Array, Batch], Params]
  checkpoint: str | None = None
  select: tuple[str, ...] = ()
  use_ema: bool = True
  load: Callable[[], Params] | None = None


@dataclasses.dataclass(frozen=True)
class AuxModule:
  """A second module trained with its own optimizer in the same jitted step (two-player update).

  Each step computes the main loss (given the current `aux_params`) and this module's loss (given
  the main loss's `LossAux.outputs`, stop-gradiented) from the same state, then applies both
  updates.
  Before `start_step` the module's parameters and optimizer state are left unchanged.

  Attributes:
    name: used for metrics (`train/<name>_loss`) and the state fields' meaning.
    init: `(rng, example_batch) -> boxed params`.
    optimizer: its optax transformation (e.g. `optim.make(config.<stage>.disc_optim, ...)`).
    loss_fn: `(aux_params, outputs, batch, rng, step) -> (loss, metrics)`.
    start_step: first step at which it is updated.
  """
  name: str
  init: Callable[[jax.Array, Batch], Params]
  optimizer: optax.GradientTransformation
  loss_fn: Callable[[Params, Any, Batch, jax.Array, jax.Array], tuple[Any, Metrics]]
  start_step: int = 0


@dataclasses.dataclass
class EvalResult:
  """What an evaluator returns.

  Attributes:
    scalars: flat name -> float. Short names are namespaced `eval/<name>`.
    images: name -> uint8 `[N, H, W, 3]` (or float in [0, 1]); written as a PNG grid under
      `W/images/<name>/<step>.png` and to TensorBoard.
    texts: name -> text (e.g. sampled captions), written to TensorBoard.
  """
  scalars: dict[str, float] = dataclasses.field(default_factory=dict)
  images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  texts: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A periodic evaluation or sampling job, run by every process on the EMA parameters.

  Attributes:
    name: label in logs.
    fn: `(params, frozen, step) -> EvalResult`; `params` are the EMA params when EMA is on. It
      builds/jits its own programs (once, e.g. at stage build time or on first call) and reads its
      own data; all processes call it (collective programs), process 0 writes the results.
    every_steps: run when `step % every_steps == 0` and at the last step; 0 disables.
    prepare: optional; the loop calls it once before the first step (e.g. to read held-out data),
      so a missing evaluation split fails at the start of a run, not at its first evaluation.
  """
  name: str
  fn: Callable[[Params, Mapping[str, Params], int], EvalResult]
  every_steps: int
  prepare: Callable[[], None] | None = None


@dataclasses.dataclass(frozen=True)
class StageContext:
  """What a stage builder gets besides the config.

  Attributes:
    mesh: the device mesh (axes 'data', 'fsdp', 'tensor').
    rules: logical-axis rules ((logical, mesh axes), ...).
    workdir: this run's work directory.
    process_index: this host's index (`jax.process_index()`).
    process_count: number of hosts.
    global_batch_size: `config.train.batch_size`.
    seed: `config.seed`.
    resumed_meta: metadata of the workdir's latest checkpoint when the run resumes ({} on a
      fresh start): what it trained with (config, frozen steps) stays what it trains with.
  """
  mesh: jax.sharding.Mesh
  rules: tuple
  workdir: str
  process_index: int
  process_count: int
  global_batch_size: int
  seed: int
  resumed_meta: dict = dataclasses.field(default_factory=dict)

  @property
  def host_batch_size(self) -> int:
    """Examples each host's data iterator yields per step."""
    return self.global_batch_size // self.process_count

  def to_global(self, host_batch: Batch) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays sharded over ('data', 'fsdp') (for evaluators)."""
    from flowtok_jax import sharding  # pylint: disable=g-import-not-at-top
    return sharding.host_to_global(host_batch, self.mesh)


@dataclasses.dataclass(frozen=True)
class Stage:
  """Everything the train loop needs from a stage.

  Attributes:
    name: stage name (also written into checkpoint metadata).
    init: `(rng, example_batch) -> boxed trainable params`.
    loss_fn: see `LossFn`.
    optimizer: optax transformation for the trainable params (usually `optim.make(...)`).
    train_iter: zero-argument factory of this host's training iterator. It yields dicts of numpy
      arrays `[host_batch, ...]` and has `get_state()`/`set_state()` (a grain `DatasetIterator`,
      so orbax can checkpoint it). Called once per run, before any restore.
    example_batch: one host batch (or arrays with the right trailing shapes and dtypes); only
      shapes/dtypes of `x[:1]` are used, for `init` and for compiling. It names the keys the
      train step receives: other keys of the iterator's batches (e.g. raw caption strings) stay
      on the host, and values are cast to these dtypes.
    learning_rate: optional `step -> lr` schedule, logged as `train/lr`.
    frozen: frozen parts (see `FrozenPart`).
    aux: optional auxiliary module (see `AuxModule`).
    ema_decay: EMA decay of the trainable params (`ema = d*ema + (1-d)*p` every step); None: no EMA
      (evaluators then see the raw params).
    evaluators: periodic evaluation / sampling jobs.
    flops_per_step: analytic FLOPs of one training step on the global batch (forward + backward),
      for `perf/mfu`; None: XLA's count of the compiled step.
    fingerprints: name -> sha256 of an input file the run's meaning depends on (the text
      tokenizer model: the token ids; a perceptual network's weights: the loss). Written into
      checkpoint metadata; resuming with another file is refused, and export checks the text
      tokenizer it ships.
  """
  name: str
  init: Callable[[jax.Array, Batch], Params]
  loss_fn: LossFn
  optimizer: optax.GradientTransformation
  train_iter: Callable[[], Iterator[Batch]]
  example_batch: Batch
  learning_rate: Callable[[Any], Any] | None = None
  frozen: Sequence[FrozenPart] = ()
  aux: AuxModule | None = None
  ema_decay: float | None = None
  evaluators: Sequence[Evaluator] = ()
  flops_per_step: float | None = None
  fingerprints: Mapping[str, str] = dataclasses.field(default_factory=dict)


StageBuilder = Callable[[ml_collections.ConfigDict, StageContext], Stage]
_REGISTRY: dict[str, StageBuilder] = {}


def register(name: str):
  """Decorator registering `builder(config, ctx) -> Stage` under `name`."""
  def wrap(builder: StageBuilder) -> StageBuilder:
    _REGISTRY[name] = builder
    return builder
  return wrap


def get_builder(name: str) -> StageBuilder:
  """Returns the builder registered as `name` (importing the project's stages first)."""
  if name not in _REGISTRY:
    try:
      from flowtok_jax.train import stages  # pylint: disable=g-import-not-at-top,unused-import
    except ModuleNotFoundError as e:
      if e.name != "flowtok_jax.train.stages":
        raise
  if name not in _REGISTRY:
    raise UserError(f"unknown stage {name!r} (known: {', '.join(sorted(_REGISTRY)) or 'none'})")
  return _REGISTRY[name]


def config_for_stage(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Returns a copy of `config` with `config.stages.<name>.<section>` merged into `<section>`.

  A multi-stage config (the demo) keeps shared defaults in `config.train` / `config.optim` and
  per-stage changes in e.g. `config.stages.clip.train.total_steps = 300`. Single-stage configs
  need no `stages` section. An unknown key in an override is a UserError.

  Args:
    config: the full config.
    name: the stage being trained.
  Returns:
    An unlocked copy; the loop and the stage builder read `config.train`, `config.optim`, ...
  """
  out = ml_collections.ConfigDict(config.to_dict())
  overrides = config.get("stages", {}).get(name) if config.get("stages") else None
  if overrides:
    for section, values in overrides.items():
      if section not in out:
        raise UserError(f"config.stages.{name}.{section}: no section {section!r} to override")
      _merge(out[section], values, f"stages.{name}.{section}")
  return out


def _merge(target: ml_collections.ConfigDict, values, where: str):
  for key, value in values.items():
    if key not in target:
      raise UserError(f"config.{where}.{key}: {key!r} is not a key of that section")
    if isinstance(target[key], ml_collections.ConfigDict):
      _merge(target[key], value, f"{where}.{key}")
    else:
      config_lib.set_typed(target, key, value, where)
