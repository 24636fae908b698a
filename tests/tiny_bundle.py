"""A tiny trained-looking FlowTok run and its export bundle, without training (shared by tests).

Training even a few steps of three stages costs minutes of compiling on a busy 2-core CPU, so the
runs are written directly: parameters of the right shapes (`jax.eval_shape` of the stages' own
init, filled with seeded random values) saved with the project's checkpoint module, with the
metadata the train loop writes. Export then reads them through exactly the code paths it uses
for real runs (checkpoint restore, frozen-part loading, decoder from `init.tokenizer_from`).

Layout under `root`: text_tokenizer.model, clip/, tokenizer/, flowtok/ (two-way, p_i2t 0.5),
flowtok_t2i/ (same weights, trained T2I only).
"""
from __future__ import annotations

import dataclasses
import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowtok_jax import checkpoint as ckpt_lib
from flowtok_jax import config_lib
from flowtok_jax import sharding
from flowtok_jax.data import builders
from flowtok_jax.data import text_tokenizer
from flowtok_jax.models import text as text_lib
from flowtok_jax.models import tokenizer as tok_lib
from flowtok_jax.train import loop, stage_api

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "demo.py")
LATENT_SCALE = 1.25
STEP = 3
# Small serving programs compile 2-3x faster without XLA's CPU optimisations (results unchanged
# up to float rounding); the export/inference tests pass these to every jit they make.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def has_flatbuffers() -> bool:
  """jax.export serialisation (bundle programs) needs the optional 'flatbuffers' package."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("flatbuffers") is not None


@dataclasses.dataclass
class TinyRuns:
  """Paths and parameters of the fake runs."""
  root: str
  config: ml_collections.ConfigDict  # The flowtok stage's config (two-way).
  flowtok: str  # Workdirs.
  flowtok_t2i: str
  clip: str
  tokenizer: str
  params: dict  # flowtok EMA params.
  clip_text: dict
  tokenizer_params: dict  # {'encoder', 'decoder'}


def random_like(abstract, seed: int, scale: float = 0.2):
  """Seeded random float32 arrays shaped like an abstract tree (LayerNorm scales around 1)."""
  rng = np.random.default_rng(seed)
  def one(path, a):
    name = jax.tree_util.keystr(path)
    x = rng.normal(0.0, scale, a.shape).astype(np.float32)
    return x + 1.0 if name.endswith("['scale']") else x
  return jax.tree_util.tree_map_with_path(one, sharding.strip_boxes(abstract))


def write_checkpoint(workdir: str, stage: str, params, config, step: int = STEP,
                     keep: int = 1, **meta_extra):
  """A checkpoint as the train loop writes it: state with params + EMA, data position, meta."""
  state = {"step": np.int32(step), "params": params, "ema_params": params}
  meta = {"stage": stage, "step": step, "config": json.loads(config.to_json_best_effort()),
          **meta_extra}
  data_iter = iter(grain.MapDataset.range(1).to_iter_dataset())
  cfg = ml_collections.ConfigDict({"max_to_keep": keep, "async_save": False})
  with ckpt_lib.Checkpointer(workdir, cfg) as ckpt:
    ckpt.save(step, state, data_iter, meta)


def flowtok_config(data_dir: str, **flowtok_stage) -> ml_collections.ConfigDict:
  """`configs/demo.py:runlocal` merged for the flowtok stage (64 px, K = L = 16, C = 8)."""
  config = stage_api.config_for_stage(config_lib.load(DEMO + ":runlocal"), "flowtok")
  config.data.data_dir = data_dir
  config.tokenizer.latent_scale = LATENT_SCALE
  config.flowtok_stage = ml_collections.ConfigDict({"p_i2t": 0.5, **flowtok_stage})
  return config


def make_runs(root: str, data_cfg, data_dir: str) -> TinyRuns:
  """Writes the text tokenizer, the clip / tokenizer / flowtok runs under `root`."""
  captions = builders.read_captions(data_cfg, "train", data_dir, limit=256)
  text_tokenizer.train_from_config(
      ml_collections.ConfigDict({"vocab_size": 128, "model_type": "bpe", "num_captions": 256}),
      captions).save(os.path.join(root, "text_tokenizer.model"))
  config = flowtok_config(data_dir)
  paths = {name: os.path.join(root, name) for name in ("clip", "tokenizer", "flowtok",
                                                       "flowtok_t2i")}
  config.init.clip_from = paths["clip"]
  config.init.tokenizer_from = paths["tokenizer"]

  ct = text_lib.CLIPTextConfig.from_config(config.clip_text)
  ids1 = jnp.zeros((1, ct.max_len), jnp.int32)
  clip_text = random_like(jax.eval_shape(
      lambda r: text_lib.CLIPTextTower(ct).init(r, ids1)["params"], jax.random.PRNGKey(0)), 1)
  write_checkpoint(paths["clip"], "clip", {"text": clip_text}, config)

  tc = tok_lib.TokenizerConfig.from_config(config.tokenizer)
  s = tc.image_size
  feats1 = jnp.zeros((1, tc.text_len, tc.text_width))
  tok_params = random_like(jax.eval_shape(
      lambda r: tok_lib.FlowTiTok(tc).init(
          {"params": r, "sample": r}, jnp.zeros((1, s, s, 3)), feats1)["params"],
      jax.random.PRNGKey(0)), 2, scale=0.1)
  write_checkpoint(paths["tokenizer"], "tokenizer", tok_params, config)

  mesh = sharding.make_mesh(config.mesh)
  ctx = stage_api.StageContext(mesh=mesh, rules=sharding.logical_rules(None),
                               workdir=paths["flowtok"], process_index=0, process_count=1,
                               global_batch_size=config.train.batch_size, seed=config.seed)
  stage = stage_api.get_builder("flowtok")(config, ctx)
  batch1 = {k: jnp.asarray(v) for k, v in loop.example_batch_1(stage).items()}
  params = random_like(jax.eval_shape(lambda r: stage.init(r, batch1),
                                      jax.random.PRNGKey(0)), 3)
  write_checkpoint(paths["flowtok"], "flowtok", params, config)
  t2i_config = ml_collections.ConfigDict(config.to_dict())
  t2i_config.flowtok_stage.p_i2t = 0.0
  write_checkpoint(paths["flowtok_t2i"], "flowtok", params, t2i_config)
  return TinyRuns(root=root, config=config, params=params, clip_text=clip_text,
                  tokenizer_params=tok_params, **paths)
