"""The jitted programs `flowtok bench` times and `flowtok aot` compiles for TPU topologies.

A `Program` is a function with its shardings and abstract (shape + sharding) arguments, so the
same object can be lowered for any mesh, including one of abstract TPU devices
(`jax.experimental.topologies`), or run on real devices with `make_args()`:

    train_program(config, mesh)     the stage's train step exactly as train/loop.py jits it
                                    (state donated, frozen parts and batch sharded)
    sample_program(config, mesh)    text -> image (or image -> caption) generation: the whole
                                    ODE with CFG and the decoders in one program (inference.py)
"""
from __future__ import annotations

import dataclasses
import tempfile
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowtok_jax import flops as flops_lib
from flowtok_jax import sharding
from flowtok_jax.errors import UserError


@dataclasses.dataclass
class Program:
  """A function, its shardings and abstract arguments.

  Attributes:
    name: 'train' or 'sample_t2i' / 'sample_i2t'.
    fn: the pure function.
    in_shardings, out_shardings, donate_argnums: as for `jax.jit`.
    abstract_args: `jax.ShapeDtypeStruct`s with shardings, one per argument.
    make_args: builds concrete, sharded arguments on the mesh's (real) devices.
    mesh, rules: the mesh and logical-axis rules the program is traced under.
    examples: examples (images or captions) per call.
    flops: analytic FLOPs per call (global, `flops.py`), or None.
  """
  name: str
  fn: Callable
  in_shardings: Any
  out_shardings: Any
  donate_argnums: tuple
  abstract_args: tuple
  make_args: Callable[[], tuple]
  mesh: jax.sharding.Mesh
  rules: tuple
  examples: int
  flops: Optional[float] = None

  def jitted(self):
    return jax.jit(self.fn, in_shardings=self.in_shardings, out_shardings=self.out_shardings,
                   donate_argnums=self.donate_argnums)

  def lower(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted().lower(*self.abstract_args)


def _random_like(abstract: dict[str, jax.ShapeDtypeStruct], seed: int = 0,
                 int_high: int = 2) -> dict[str, np.ndarray]:
  """Host arrays for a batch: floats in [0, 1), ints in [0, int_high), bools False."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, a in abstract.items():
    dt = np.dtype(a.dtype)
    if np.issubdtype(dt, np.floating):
      out[k] = rng.random(a.shape, dtype=np.float32).astype(dt)
    elif np.issubdtype(dt, np.integer):
      out[k] = rng.integers(0, int_high, a.shape).astype(dt)
    else:
      out[k] = np.zeros(a.shape, dt)
  return out


def _check_batch(batch_size: int, mesh):
  sharding.check_batch_size(batch_size, mesh, process_count=1)


def train_program(config: ml_collections.ConfigDict, mesh, *, stage_name: Optional[str] = None,
                  batch_size: Optional[int] = None, process_count: int = 1) -> Program:
  """The train step of `stage_name` (default `config.train.stage`) on `mesh`.

  Frozen parts start from random weights (their checkpoints are not read) and an unset
  `tokenizer.latent_scale` is taken as 1.0, so nothing but the config is needed.
  """
  from flowtok_jax.train import loop, stage_api  # pylint: disable=g-import-not-at-top
  stage_name = stage_name or config.train.stage
  config = stage_api.config_for_stage(config, stage_name)
  with config.unlocked():
    if config.get("tokenizer") is not None and config.tokenizer.get("latent_scale") is None:
      config.tokenizer.latent_scale = 1.0
    if batch_size is not None:
      config.train.batch_size = batch_size
  batch_size = int(config.train.batch_size)
  rules = sharding.logical_rules(config.get("sharding"))
  sharding.check_batch_size(batch_size, mesh, process_count=process_count)
  ctx = stage_api.StageContext(mesh=mesh, rules=rules, workdir=tempfile.gettempdir(),
                               process_index=0, process_count=process_count,
                               global_batch_size=batch_size, seed=config.seed)
  stage = stage_api.get_builder(stage_name)(config, ctx)
  batch1 = loop.example_batch_1(stage)
  init_fn = loop.make_init_fn(stage, batch1)
  rng = jax.random.PRNGKey(config.seed)
  abstract, state_sh = sharding.abstract_with_shardings(init_fn, mesh, rules, rng)
  frozen_inits, frozen_abs, frozen_sh = {}, {}, {}
  for part in stage.frozen:
    init = lambda r, part=part: part.init(r, {k: jnp.asarray(v) for k, v in batch1.items()})
    frozen_inits[part.name] = init
    frozen_abs[part.name], frozen_sh[part.name] = sharding.abstract_with_shardings(
        init, mesh, rules, rng)
  data_sh = sharding.data_sharding(mesh)
  batch_abs = {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=data_sh)
               for k, v in batch1.items()}

  def make_args():
    state, _ = sharding.born_sharded(init_fn, mesh, rules, rng)
    frozen = {n: sharding.born_sharded(f, mesh, rules, rng)[0] for n, f in frozen_inits.items()}
    vocab = config.get("clip_text", {}).get("vocab_size", 2) if config.get("clip_text") else 2
    host = _random_like(batch_abs, int_high=int(vocab))
    return state, frozen, sharding.host_to_global(host, mesh)

  analytic = stage.flops_per_step
  if analytic is None and stage_name == "flowtok":
    analytic = flops_lib.train_step_flops(config, batch_size)["total"]
  return Program(
      name="train", fn=loop.make_train_step(stage),
      in_shardings=(state_sh, frozen_sh, data_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,),
      abstract_args=(abstract, frozen_abs, batch_abs), make_args=make_args, mesh=mesh,
      rules=rules, examples=batch_size, flops=analytic)


def _sampler_init(models, directions: tuple[str, ...]):
  """`rng -> boxed params` with the subtrees the sampling pipelines read."""
  def init(rng):
    ks = jax.random.split(rng, 5)
    length, width = models.text_len, models.clip_text.cfg.width
    fc = models.flow.cfg
    ids = jnp.zeros((1, length), jnp.int32)
    feats = jnp.zeros((1, length, width), jnp.float32)
    z = jnp.zeros((1, fc.num_tokens, fc.channels), jnp.float32)
    img = jnp.zeros((1, models.image_size, models.image_size, 3), jnp.float32)
    zero = jnp.zeros((1,), jnp.int32)
    params = {"flow": models.flow.init(ks[0], z, jnp.zeros((1,)), zero,
                                       zero if fc.two_directions else None)["params"]}
    tok = models.tokenizer.init({"params": ks[1], "sample": ks[1]}, img,
                                feats if models.text_aware else None)["params"]
    params["tokenizer"] = {}
    if "t2i" in directions:
      params["clip_text"] = models.clip_text.init(ks[2], ids)["params"]
      params["text_vae"] = models.text_vae.init(ks[3], feats)["params"]
      params["tokenizer"]["decoder"] = tok["decoder"]
    if "i2t" in directions:
      params["tokenizer"]["encoder"] = tok["encoder"]
      params["text_decoder"] = models.text_decoder.init(ks[4], z)["params"]
    return params
  return init


def sample_program(config: ml_collections.ConfigDict, mesh, *, direction: str = "t2i",
                   batch_size: Optional[int] = None, steps: Optional[int] = None,
                   cfg_scale: Optional[float] = None, sampler: Optional[str] = None,
                   grid: Optional[str] = None) -> Program:
  """Generation of `batch_size` images (t2i) or captions (i2t) with random weights.

  Knobs default to `config.sample.*` (steps 20, CFG 2.0, euler, parity grid, batch 64).
  """
  from flowtok_jax import inference  # pylint: disable=g-import-not-at-top
  if direction not in ("t2i", "i2t"):
    raise UserError(f"direction must be t2i or i2t, got {direction!r}")
  sc = config.get("sample") or ml_collections.ConfigDict()
  steps = int(steps if steps is not None else sc.get("steps", 20))
  cfg_scale = float(cfg_scale if cfg_scale is not None else sc.get("cfg_scale", 2.0))
  sampler = sampler or sc.get("sampler", "euler")
  grid = grid or sc.get("grid", "parity" if sampler == "euler" else "uniform")
  batch_size = int(batch_size or sc.get("batch_size", 64))
  _check_batch(batch_size, mesh)
  scale = config.tokenizer.get("latent_scale") or 1.0
  models = inference.build_models(config, scale)
  if direction == "i2t" and (models.text_decoder is None or not models.two_directions):
    raise UserError("captioning needs a two-direction flow (flow.two_directions) and a "
                    "text_decoder section")
  rules = sharding.logical_rules(config.get("sharding"))
  init = _sampler_init(models, (direction,))
  rng = jax.random.PRNGKey(config.get("seed", 0))
  abstract, params_sh = sharding.abstract_with_shardings(init, mesh, rules, rng)
  data_sh = sharding.data_sharding(mesh)
  s, length = models.image_size, models.text_len
  knobs = dict(steps=steps, sampler=sampler, grid=grid)
  if direction == "t2i":
    inputs = {"ids": jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=data_sh),
              "seeds": jax.ShapeDtypeStruct((batch_size,), jnp.uint32, sharding=data_sh)}
    fn = lambda p, x: inference.text_to_image(models, p, x["ids"], x["seeds"], cfg_scale,
                                              **knobs)
  else:
    inputs = {"images": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32,
                                             sharding=data_sh)}
    fn = lambda p, x: inference.image_to_text(models, p, x["images"], cfg_scale, **knobs)

  def make_args():
    params, _ = sharding.born_sharded(init, mesh, rules, rng)
    host = _random_like(inputs, int_high=int(config.clip_text.vocab_size))
    return params, sharding.host_to_global(host, mesh)

  per = flops_lib.sample_flops(config, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                               direction=direction)["total"]
  return Program(
      name=f"sample_{direction}", fn=fn, in_shardings=(params_sh, data_sh),
      out_shardings=data_sh, donate_argnums=(), abstract_args=(abstract, inputs),
      make_args=make_args, mesh=mesh, rules=rules, examples=batch_size,
      flops=per * batch_size)
