"""Config file for the multi-host tests: a real stage (clip or flowtok) on process-invariant data.

    python launch/train.py --config tests/multihost_stage.py:stage=clip --workdir W ...

Registers `mh_clip`, `mh_flowtok` and `mh_toy`: the real stage builders of `train/stages.py`
(and the loop tests' toy MLP, which compiles in well under a second) with their `train_iter`
replaced by synthetic examples whose global batch does not depend on the number of
processes: global row r of step k is always example k·B + r, and each process generates exactly
the rows its devices hold. (The dataset pipeline gives the same guarantee — it shards the
global stream in per-process blocks — but synthetic rows spare the test a dataset build.)
"""
import dataclasses
import itertools
import os
import sys

import grain
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from flowtok_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from flowtok_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from flowtok_jax.train import evaluators  # pylint: disable=wrong-import-position
from flowtok_jax.train import stage_api  # pylint: disable=g-import-not-at-top,wrong-import-position
from flowtok_jax.train import stages  # pylint: disable=wrong-import-position,unused-import


def process_rows(mesh, batch_size: int) -> list[int]:
  """Global batch rows held by this process's devices (sorted; they form one block)."""
  index_map = sharding.data_sharding(mesh).addressable_devices_indices_map((batch_size,))
  rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(batch_size))})
  if rows != list(range(rows[0], rows[0] + len(rows))):
    raise AssertionError(f"this process holds non-contiguous rows {rows}")
  return rows


class _SyntheticBatch(grain.transforms.Map):
  """Step k -> this process's rows of global batch k, each example seeded by its global index."""

  def __init__(self, rows, batch_size, example_fn):
    self._rows, self._b, self._example = list(rows), batch_size, example_fn

  def map(self, step):
    examples = [self._example(np.random.default_rng(int(step) * self._b + r))
                for r in self._rows]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _captioned_example(config):
  s, l, v = config.data.image_size, config.data.max_text_len, config.text_tokenizer.vocab_size

  def example(rng):
    n = int(rng.integers(3, l + 1))
    ids = np.zeros((l,), np.int32)
    ids[:n] = rng.integers(1, v, n)
    return {"image": rng.random((s, s, 3), dtype=np.float32), "text_ids": ids,
            "truncated": np.zeros((), bool)}
  return example


def _toy_example(config):
  del config

  def example(rng):
    x = rng.normal(size=(toy_stage.IN,)).astype(np.float32)
    return {"x": x, "y": x @ toy_stage._TEACHER}  # pylint: disable=protected-access
  return example


def _wrap(inner_name: str, example_fn):
  def build(config, ctx: stage_api.StageContext) -> stage_api.Stage:
    inner = stage_api.get_builder(inner_name)(config, ctx)
    rows = process_rows(ctx.mesh, ctx.global_batch_size)

    def train_iter():
      ds = grain.MapDataset.range(10**9).map(
          _SyntheticBatch(rows, ctx.global_batch_size, example_fn(config)))
      return iter(ds.to_iter_dataset())

    return dataclasses.replace(inner, train_iter=train_iter)
  return build


HELD_OUT = 24  # Held-out examples of the toy's evaluator: 3 global batches of 8.


def _with_toy_evaluator(build):
  """The toy stage with a collective held-out evaluator in place of its host-local one.

  The real `evaluators.retrieval` ranks the student MLP's outputs against the teacher's on
  HELD_OUT examples that each process reads only its rows of (as the dataset pipeline does), so
  its programs, `held_out_batches` and the cross-process gather run as they do on a pod.
  """
  def wrapped(config, ctx: stage_api.StageContext) -> stage_api.Stage:
    stage = build(config, ctx)
    every = int(config.train.eval_every_steps)
    model = toy_stage.MLP(hidden=config.toy.hidden)
    b = ctx.global_batch_size
    rows = process_rows(ctx.mesh, b)

    def batches():
      for k in itertools.count():
        xs = [toy_stage._example(10**6 + k * b + r)["x"] for r in rows]  # pylint: disable=protected-access
        yield {"image": np.stack(xs),
               "text_ids": np.array([[k * b + r] for r in rows], np.int32)}

    def embed(params, frozen, x, ids):
      del frozen, ids
      return model.apply({"params": params}, x), x @ toy_stage._TEACHER  # pylint: disable=protected-access

    ev = evaluators.retrieval(
        ctx, every_steps=every, split="held", embed_fn=embed,
        read_batches=lambda: evaluators.held_out_batches(batches, HELD_OUT, b,
                                                         ctx.process_count))
    return dataclasses.replace(stage, evaluators=(ev,) if every else ())
  return wrapped


sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "train"))
import toy_stage  # pylint: disable=g-import-not-at-top,wrong-import-position

for _name, _example_fn in (("clip", _captioned_example), ("flowtok", _captioned_example)):
  stage_api.register(f"mh_{_name}")(_wrap(_name, _example_fn))
stage_api.register("mh_toy")(_with_toy_evaluator(_wrap("toy", _toy_example)))


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, stage="clip", steps=6)
  if arg.stage == "toy":
    config = toy_stage.toy_config()
  else:
    config = config_lib.load_module(os.path.join(REPO_ROOT, "configs", "demo.py")).get_config(
        "runlocal")
  config.train.update(stage=f"mh_{arg.stage}", batch_size=8, total_steps=arg.steps,
                      log_every_steps=1, eval_every_steps=0,
                      ckpt_every_steps=2, progress_bar=False)
  config.optim.warmup_steps = 1
  if arg.stage == "toy":
    config.train.eval_every_steps = 2  # The collective held-out evaluator, at steps 2 and 4.
  config.mesh.shape = (2, 2, 2)  # data x fsdp x tensor: every axis crosses the process boundary.
  return config
