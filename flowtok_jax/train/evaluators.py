"""Periodic evaluators that stages hand to the train loop (`stage_api.Evaluator`).

The loop runs them every `train.eval_every_steps` and at the last step, on the EMA parameters
when there is an EMA. Each reads a fixed set of held-out examples (the first ones of
`data.eval_split`, never the training split) once, runs one compiled program per global batch,
and returns scalars the loop logs as `eval/<split>/...`, plus image grids and texts for
TensorBoard (images also under `W/images/`).

  reconstruction  the tokenizer's round trip from the posterior mean: PSNR, SSIM, posterior σ
                  and, on the captioned-shapes world, the share of reconstructions the pixel
                  parser reads back as their caption (so a tokenizer is checked against the
                  parser before anything downstream trains on it).
  retrieval       the CLIP stage's held-out image <-> text retrieval (recall@1 and @5 both ways
                  among all held-out pairs, and text -> image hits whose image has the query's
                  exact caption, since a short caption can describe several held-out images).
  flowtok         FlowTok's training objective on held-out pairs (flow loss per direction,
                  relative to its target's variance; text-decoder accuracy) and, for a two-way
                  model, captions of the held-out images (the bundle's I2T sampler), scored on
                  the captioned-shapes world by exact match, parse rate and attribute.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from flowtok_jax.errors import UserError
from flowtok_jax.train import stage_api

Batch = dict[str, np.ndarray]
# (trainable params, frozen params, images [B, S, S, 3] in [0, 1], text ids [B, L]) ->
# (reconstructions [B, S, S, 3], posterior σ averaged per example [B]).
ReconFn = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
GRID = 8  # Originals and reconstructions shown per evaluation.


def held_out_batches(make_iter: Callable[[], Iterator[Batch]], num: int,
                     global_batch_size: int, process_count: int) -> list[Batch]:
  """The first `num` examples of an ordered evaluation iterator, in full global batches.

  Rounds `num` down to whole global batches (at least one), so every process holds the same
  number of equally sized host batches and the programs stay collective.
  """
  want = max(1, int(num) // global_batch_size)
  host = global_batch_size // process_count
  it = make_iter()
  out = []
  try:
    for batch in it:
      if len(batch["image"]) < host:
        break
      out.append(batch)
      if len(out) == want:
        break
  finally:
    if hasattr(it, "close"):
      it.close()
  if not out:
    raise UserError(f"the evaluation split holds fewer than one global batch "
                    f"({global_batch_size} examples); lower the batch size or turn the stage's "
                    "evaluation off: train.eval_every_steps=0, or stages.<stage>.train."
                    "eval_every_steps=0 where the config sets it per stage (configs/demo.py)")
  return out


def _gather(x: jax.Array) -> np.ndarray:
  """A global array as numpy on every process (all of it, in global order)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class _HeldOut:
  """Held-out host batches, read once (by `prepare`, or at the first evaluation)."""

  def __init__(self, read_batches: Callable[[], list[Batch]]):
    self._read, self._batches = read_batches, None

  def prepare(self):
    if self._batches is None:
      self._batches = self._read()

  def run(self, ctx: stage_api.StageContext, program, keys, params, frozen):
    """Yields (global batch, program(params, frozen, global batch)) per held-out batch."""
    self.prepare()
    for host_batch in self._batches:
      batch = ctx.to_global({k: host_batch[k] for k in keys})
      with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
        out = program(params, frozen, batch)
      yield batch, out

  def collect(self, ctx: stage_api.StageContext, program, keys, params, frozen,
              pick: Callable[[dict, Any], tuple]) -> list[np.ndarray]:
    """Runs every held-out batch and returns the arrays `pick(global batch, program output)`
    names, each gathered to numpy and concatenated over the batches, in global order."""
    parts = [[_gather(x) for x in pick(batch, out)]
             for batch, out in self.run(ctx, program, keys, params, frozen)]
    return [np.concatenate(column) for column in zip(*parts)]


def reconstruction(ctx: stage_api.StageContext, *, every_steps: int,
                   read_batches: Callable[[], list[Batch]], recon_fn: ReconFn,
                   decode_text: Callable[[np.ndarray], list[str]] | None = None,
                   split: str = "val") -> stage_api.Evaluator:
  """The tokenizer evaluator.

  Args:
    ctx: the stage context (mesh, logical-axis rules, host -> global batches).
    every_steps: evaluation period in steps (0: never).
    read_batches: returns the held-out host batches (called once, by `prepare`).
    recon_fn: see `ReconFn`; compiled here.
    decode_text: ids [N, L] -> captions. Given (the captioned-shapes world), reconstructions are
      also read by the pixel parser and scored against their captions.
    split: the held-out split's name: scalars are `eval/<split>/psnr`, ..., images
      `eval/<split>/reconstructions`.
  Returns:
    The `Evaluator`.
  """
  program = jax.jit(lambda p, f, b: recon_fn(p, f, b["image"], b["text_ids"]))
  held = _HeldOut(read_batches)

  def fn(params, frozen, step):
    del step
    images, recons, sigmas, ids = held.collect(
        ctx, program, ("image", "text_ids"), params, frozen,
        lambda b, out: (b["image"], out[0], out[1], b["text_ids"]))
    # uint8 as the exported bundle writes them, so the numbers match `flowtok eval`'s.
    to_u8 = lambda x: np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
    images, recons = to_u8(images), to_u8(recons)
    from flowtok_jax.evaluation import image_metrics  # pylint: disable=g-import-not-at-top
    name = f"eval/{split}"
    scalars = {f"{name}/psnr": float(np.mean(image_metrics.psnr(images, recons))),
               f"{name}/ssim": float(np.mean(image_metrics.ssim(images, recons))),
               f"{name}/posterior_std": float(np.mean(sigmas)),
               f"{name}/num": float(len(images))}
    if decode_text is not None:
      scalars.update(_parser_scores(name, recons, decode_text(ids)))
    grid = np.concatenate([images[:GRID], recons[:GRID]])  # Originals above reconstructions.
    return stage_api.EvalResult(scalars=scalars, images={f"{name}/reconstructions": grid})

  return stage_api.Evaluator(name="reconstruction", fn=fn, every_steps=int(every_steps),
                             prepare=held.prepare)


def _parser_scores(name: str, recons: np.ndarray, captions: list[str]) -> dict[str, float]:
  """Parser acceptance of reconstructions against their (parsable) captions."""
  from flowtok_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from flowtok_jax.evaluation import shapes_eval  # pylint: disable=g-import-not-at-top
  keep = [i for i, c in enumerate(captions) if shapes.parse_caption(c) is not None]
  if len(keep) < len(captions):
    logging.warning("%d of %d evaluation captions are outside the shapes grammar (truncated?): "
                    "not scored by the parser", len(captions) - len(keep), len(captions))
  if not keep:
    return {}
  acc = shapes_eval.t2i_accuracy(recons[keep], [captions[i] for i in keep])
  return {f"{name}/parser_recon": acc["accuracy"],
          f"{name}/parser_recon_lenient": acc["accuracy_lenient"],
          f"{name}/parser_recon_shape": acc["shape"], f"{name}/parser_recon_color": acc["color"]}


# (trainable params, frozen params, images [B, S, S, 3], text ids [B, L]) ->
# (image embeddings [B, E], text embeddings [B, E]).
EmbedFn = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def retrieval_scores(img: np.ndarray, txt: np.ndarray, ids: np.ndarray,
                     prefix: str) -> dict[str, float]:
  """Recall@1/@5 of image -> text and text -> image over all N pairs (cosine similarity).

  Args:
    img, txt: [N, E] embeddings, row i of each from the same pair.
    ids: [N, L] text ids; `t2i_r1_same_text` also counts a text -> image hit whose image's
      caption is the query's exact text (duplicates are a property of the data, not errors).
    prefix: scalars are `<prefix>/i2t_r1`, ...
  """
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  sim = unit(img.astype(np.float64)) @ unit(txt.astype(np.float64)).T  # [image, text]
  n = len(sim)
  out = {f"{prefix}/num": float(n)}
  for name, s in (("i2t", sim), ("t2i", sim.T)):
    # Rank of the true pair: how many candidates score strictly higher.
    rank = (s > np.diag(s)[:, None]).sum(axis=1)
    out[f"{prefix}/{name}_r1"] = float(np.mean(rank < 1))
    out[f"{prefix}/{name}_r5"] = float(np.mean(rank < 5))
  best = sim.T.argmax(axis=1)  # Each text's top image.
  out[f"{prefix}/t2i_r1_same_text"] = float(np.mean(np.all(ids[best] == ids, axis=1)))
  return out


def retrieval(ctx: stage_api.StageContext, *, every_steps: int,
              read_batches: Callable[[], list[Batch]], embed_fn: EmbedFn,
              split: str = "val") -> stage_api.Evaluator:
  """The CLIP evaluator: held-out retrieval among all held-out pairs at once.

  Args:
    ctx: the stage context.
    every_steps: evaluation period in steps (0: never).
    read_batches: returns the held-out host batches (called once, by `prepare`).
    embed_fn: see `EmbedFn`; compiled here.
    split: the held-out split's name (`eval/<split>/i2t_r1`, ...).
  Returns:
    The `Evaluator`.
  """
  program = jax.jit(lambda p, f, b: embed_fn(p, f, b["image"], b["text_ids"]))
  held = _HeldOut(read_batches)

  def fn(params, frozen, step):
    del step
    img, txt, ids = held.collect(ctx, program, ("image", "text_ids"), params, frozen,
                                 lambda b, out: (out[0], out[1], b["text_ids"]))
    return stage_api.EvalResult(scalars=retrieval_scores(img, txt, ids, f"eval/{split}"))

  return stage_api.Evaluator(name="retrieval", fn=fn, every_steps=int(every_steps),
                             prepare=held.prepare)


# (trainable params, frozen params, global batch) -> (loss metrics {name: scalar},
# I2T caption ids [B, L] or None).
FlowFn = Callable[[Any, Any, dict[str, jax.Array]], tuple[dict[str, jax.Array], Any]]


def flowtok(ctx: stage_api.StageContext, *, every_steps: int,
            read_batches: Callable[[], list[Batch]], flow_fn: FlowFn, keys: tuple[str, ...],
            decode_text: Callable[[np.ndarray], list[str]] | None = None,
            shapes_world: bool = False, split: str = "val") -> stage_api.Evaluator:
  """The FlowTok evaluator: held-out losses and, when the model writes captions, I2T.

  Args:
    ctx: the stage context.
    every_steps: evaluation period in steps (0: never).
    read_batches: returns the held-out host batches (called once, by `prepare`).
    flow_fn: see `FlowFn`; compiled here. Its losses use a fixed key, so two evaluations of the
      same params agree; they are averaged over the batches (`eval/<split>/rel_loss_t2i`, ...).
    keys: the batch keys the program reads (the stage's example_batch keys).
    decode_text: ids [N, L] -> strings; needed for captions.
    shapes_world: score the captions against the true captions' attributes (exact match, parse
      rate, per attribute) on the captioned-shapes world.
    split: the held-out split's name.
  Returns:
    The `Evaluator`.
  """
  program = jax.jit(flow_fn)
  held = _HeldOut(read_batches)

  def fn(params, frozen, step):
    del step
    sums: dict[str, list[float]] = {}
    captions, truths = [], []
    for batch, (metrics, ids) in held.run(ctx, program, keys, params, frozen):
      for k, v in metrics.items():
        sums.setdefault(k, []).append(float(v))
      if ids is not None and decode_text is not None:
        captions += decode_text(_gather(ids))
        # The caption I2T was trained to write (data.i2t_caption_key) when there is one.
        truths += decode_text(_gather(batch.get("i2t_text_ids", batch["text_ids"])))
    name = f"eval/{split}"
    scalars = {f"{name}/{k}": float(np.mean(v)) for k, v in sums.items()}
    texts = {}
    if captions:
      texts[f"{name}/captions"] = "\n".join(
          f"{c}  ({t})" for c, t in zip(captions[:GRID], truths[:GRID]))
      if shapes_world:
        from flowtok_jax.data import shapes  # pylint: disable=g-import-not-at-top
        from flowtok_jax.evaluation import caption_metrics  # pylint: disable=g-import-not-at-top
        keep = [i for i, t in enumerate(truths) if shapes.parse_caption(t) is not None]
        if keep:
          acc = caption_metrics.caption_accuracy([captions[i] for i in keep],
                                                 [truths[i] for i in keep])
          scalars.update({f"{name}/i2t_{k}": acc[k] for k in ("exact", "parse_rate", "color",
                                                                "shape", "size", "location")})
    return stage_api.EvalResult(scalars=scalars, texts=texts)

  return stage_api.Evaluator(name="flowtok", fn=fn, every_steps=int(every_steps),
                             prepare=held.prepare)
