"""The stages' periodic evaluators: held-out batches, the tokenizer's reconstruction scores, and
their place in the train loop (eval/<split>/... rows in metrics.jsonl, image grids)."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowtok_jax import sharding
from flowtok_jax.data import shapes
from flowtok_jax.errors import UserError
from flowtok_jax.train import evaluators, stage_api

S = 32


def _ctx(batch_size=8):
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"shape": (-1, 1, 1)}))
  return stage_api.StageContext(mesh=mesh, rules=sharding.logical_rules(None), workdir="/none",
                                process_index=0, process_count=1,
                                global_batch_size=batch_size, seed=0)


def _scenes(n):
  """Rendered val scenes: images in [0, 1], ids = row index (decoded back to the caption)."""
  cfg = shapes.ShapesConfig(image_size=S)
  exs = [shapes.render_example(0, "val", i, cfg) for i in range(n)]
  images = np.stack([e["image"] for e in exs]).astype(np.float32) / 255
  captions = [e["caption"] for e in exs]
  ids = np.tile(np.arange(n, dtype=np.int32)[:, None], (1, 4))
  return images, ids, captions


def test_held_out_batches_reads_whole_global_batches_only():
  rows = [{"image": np.zeros((n, 2, 2, 3))} for n in (4, 4, 4, 2)]
  closed = []

  class It:
    def __init__(self):
      self.inner = iter(rows)

    def __iter__(self):
      return self

    def __next__(self):
      return next(self.inner)

    def close(self):
      closed.append(True)

  assert len(evaluators.held_out_batches(It, 10, 4, 1)) == 2  # 10 -> 2 whole batches
  assert len(evaluators.held_out_batches(It, 100, 4, 1)) == 3  # the short last one is dropped
  assert len(evaluators.held_out_batches(It, 1, 4, 1)) == 1  # at least one
  assert len(closed) == 3
  with pytest.raises(UserError, match="fewer than one global batch"):
    evaluators.held_out_batches(lambda: iter(rows[3:]), 8, 4, 1)


@pytest.mark.parametrize("kind", ["exact", "blank"])
def test_reconstruction_scores_against_the_captions(kind):
  images, ids, captions = _scenes(16)
  batches = [{"image": images[i:i + 8], "text_ids": ids[i:i + 8]} for i in (0, 8)]
  sigma = 0.25

  def recon_fn(params, frozen, x, text_ids):
    del frozen, text_ids
    out = x * params["gain"]
    return out, jnp.full((x.shape[0],), sigma)

  reads = []
  ev = evaluators.reconstruction(
      _ctx(), every_steps=5, read_batches=lambda: reads.append(1) or batches, recon_fn=recon_fn,
      decode_text=lambda rows: [captions[r[0]] for r in rows], split="val")
  assert ev.every_steps == 5
  gain = 1.0 if kind == "exact" else 0.0
  res = ev.fn({"gain": jnp.float32(gain)}, {}, 5)
  res2 = ev.fn({"gain": jnp.float32(gain)}, {}, 10)
  assert len(reads) == 1  # the held-out set is read once
  s = res.scalars
  assert s["eval/val/num"] == 16 and s["eval/val/posterior_std"] == pytest.approx(sigma)
  if kind == "exact":  # the renders themselves: the parser reads every one back
    assert s["eval/val/parser_recon"] == 1.0 and s["eval/val/ssim"] == pytest.approx(1.0)
    assert s["eval/val/psnr"] > 100
  else:  # black images: nothing to read
    assert s["eval/val/parser_recon"] == 0.0 and s["eval/val/psnr"] < 20
  assert res2.scalars == s
  grid = res.images["eval/val/reconstructions"]
  assert grid.shape == (16, S, S, 3) and grid.dtype == np.uint8  # 8 originals, 8 reconstructions
  np.testing.assert_array_equal(grid[:8], np.round(images[:8] * 255).astype(np.uint8))


def test_reconstruction_without_captions_has_no_parser_scores():
  images, ids, _ = _scenes(8)
  ev = evaluators.reconstruction(
      _ctx(), every_steps=1, read_batches=lambda: [{"image": images, "text_ids": ids}],
      recon_fn=lambda p, f, x, t: (x, jnp.zeros((x.shape[0],))))
  assert not any("parser" in k for k in ev.fn({}, {}, 1).scalars)


def test_tokenizer_stage_reports_held_out_reconstructions(shapes_data):
  """The tokenizer stage, trained by the loop on a built shapes dataset, logs eval/val/..."""
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top
  make, root = shapes_data
  config = make()
  config.stages.tokenizer.train.update(total_steps=4, eval_every_steps=2, ckpt_every_steps=4)
  work = os.path.join(root, "tokenizer")
  result = loop.train_and_evaluate(config, work, "tokenizer")
  assert result.last_eval["eval/val/num"] == 24  # every val image: 3 whole batches of 8
  assert 0.0 <= result.last_eval["eval/val/parser_recon"] <= 1.0
  with open(os.path.join(work, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "eval/val/psnr" in r] == [2, 4]
  assert sorted(os.listdir(os.path.join(work, "images", "eval", "val", "reconstructions"))) == [
      "00000002.png", "00000004.png"]


def test_flowtok_evaluator_averages_losses_and_scores_captions():
  images, ids, captions = _scenes(16)
  batches = [{"image": images[i:i + 8], "text_ids": ids[i:i + 8], "extra": ids[i:i + 8]}
             for i in (0, 8)]
  # The "model" captions even rows right and writes word salad for odd ones.
  salad = np.full((16, 4), -1, np.int32)

  def flow_fn(params, frozen, batch):
    del frozen
    assert set(batch) == {"image", "text_ids"}  # only the keys asked for
    out = jnp.where((batch["text_ids"][:, :1] % 2) == 0, batch["text_ids"], salad[:8])
    return {"rel_loss_t2i": params["loss"] + batch["text_ids"][0, 0]}, out

  def decode(rows):
    return [captions[r[0]] if r[0] >= 0 else "square square the" for r in rows]

  ev = evaluators.flowtok(_ctx(), every_steps=3, read_batches=lambda: batches,
                          flow_fn=flow_fn, keys=("image", "text_ids"), decode_text=decode,
                          shapes_world=True, split="val")
  res = ev.fn({"loss": jnp.float32(0.5)}, {}, 3)
  s = res.scalars
  assert s["eval/val/rel_loss_t2i"] == pytest.approx(0.5 + (0 + 8) / 2)  # mean over batches
  assert s["eval/val/i2t_exact"] == pytest.approx(0.5)
  assert s["eval/val/i2t_parse_rate"] == pytest.approx(0.5)
  lines = res.texts["eval/val/captions"].splitlines()
  assert len(lines) == 8 and lines[0] == f"{captions[0]}  ({captions[0]})"
  # With an I2T caption in the batch, captions are shown beside (and scored against) it.
  with_i2t = [dict(b, i2t_text_ids=b["text_ids"][::-1]) for b in batches]
  ev = evaluators.flowtok(_ctx(), every_steps=3, read_batches=lambda: with_i2t,
                          flow_fn=lambda p, f, b: ({}, b["i2t_text_ids"]),
                          keys=("image", "text_ids", "i2t_text_ids"), decode_text=decode,
                          shapes_world=True, split="val")
  res = ev.fn({}, {}, 3)
  assert res.scalars["eval/val/i2t_exact"] == 1.0
  assert res.texts["eval/val/captions"].splitlines()[0] == f"{captions[7]}  ({captions[7]})"
  # Without captions (a T2I-only model): losses only.
  ev = evaluators.flowtok(_ctx(), every_steps=3, read_batches=lambda: batches,
                          flow_fn=lambda p, f, b: ({"loss_fm": jnp.float32(1.0)}, None),
                          keys=("image",), decode_text=decode, shapes_world=True)
  res = ev.fn({}, {}, 3)
  assert res.scalars == {"eval/val/loss_fm": 1.0} and not res.texts


def test_a_missing_evaluation_split_fails_before_the_first_step(shapes_data):
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top
  make, root = shapes_data
  config = make("data.eval_split=nosuch")
  config.stages.tokenizer.train.update(total_steps=4, eval_every_steps=2, ckpt_every_steps=1)
  work = os.path.join(root, "tokenizer_nosplit")
  with pytest.raises(UserError, match="nosuch"):
    loop.train_and_evaluate(config, work, "tokenizer")
  ckpts = os.path.join(work, "checkpoints")
  assert not os.path.isdir(ckpts) or not [d for d in os.listdir(ckpts) if d.isdigit()]


def test_retrieval_scores_rank_every_pair_against_all_others():
  rng = np.random.default_rng(0)
  n, e = 12, 6
  img = rng.normal(size=(n, e))
  ids = np.arange(n)[:, None].repeat(3, axis=1)
  s = evaluators.retrieval_scores(img, img * 3.0, ids, "eval/val")  # scale does not matter
  assert s["eval/val/num"] == n
  assert all(s[f"eval/val/{k}"] == 1.0 for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5",
                                                   "t2i_r1_same_text"))
  # Texts 0 and 1 swapped: those two pairs miss at rank 1 and hit at rank 5, both ways...
  txt = img.copy()
  txt[[0, 1]] = txt[[1, 0]]
  s = evaluators.retrieval_scores(img, txt, ids, "p")
  assert s["p/i2t_r1"] == s["p/t2i_r1"] == pytest.approx((n - 2) / n)
  assert s["p/t2i_r1_same_text"] == pytest.approx((n - 2) / n)
  # ...unless the two captions are the same text: then the swapped image is as right.
  ids[1] = ids[0]
  assert evaluators.retrieval_scores(img, txt, ids, "p")["p/t2i_r1_same_text"] == 1.0
  # Unrelated embeddings: chance level.
  s = evaluators.retrieval_scores(rng.normal(size=(200, e)), rng.normal(size=(200, e)),
                                  np.arange(200)[:, None], "p")
  assert s["p/i2t_r1"] < 0.05 and s["p/t2i_r5"] < 0.1


def test_clip_stage_reports_held_out_retrieval(shapes_data):
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top
  make, root = shapes_data
  config = make()
  config.stages.clip.train.update(total_steps=2, eval_every_steps=2, ckpt_every_steps=2)
  work = os.path.join(root, "clip")
  result = loop.train_and_evaluate(config, work, "clip")
  assert result.last_eval["eval/val/num"] == 24
  for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "t2i_r1_same_text"):
    assert 0.0 <= result.last_eval[f"eval/val/{k}"] <= 1.0
  assert result.last_eval["eval/val/i2t_r5"] >= result.last_eval["eval/val/i2t_r1"]
