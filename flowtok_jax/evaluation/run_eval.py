"""`flowtok eval`: a bundle measured on captioned-shapes (DESIGN.md §7), results as JSON + HTML.

    flowtok eval --bundle runs/demo/bundle --data_dir runs/demo/data [--split test,compositional]
        [--num N] [--out DIR]

For every evaluation split (test and compositional by default; never train):
  1. the pixel parser on the ground-truth images of the examples used (`t2i/<split>/parser_gt`);
     below 0.99 the split's T2I accuracy is void (`t2i/<split>/valid` = 0);
  2. T2I: one image per caption of the split (seed = `seed` + index), parsed back and scored
     against the caption's attributes (`shapes_eval.t2i_accuracy`), plus a Fréchet distance to
     the ground-truth images in the space of the in-project shapes feature net (not FID);
  3. I2T (two-way bundles): captions of the split's ground-truth images, exact-match and
     per-attribute accuracy, BLEU-4 and CIDEr-D (`caption_metrics.i2t_metrics`), references =
     the dataset caption and the canonical caption of the same attributes.
On the val split, the tokenizer: PSNR / SSIM of reconstructions (posterior mean, decoded with the
caption's CLIP features when text-aware) and the parser's acceptance of them, the ceiling of T2I.

Written to OUT: `eval.json` (summary of flat scalars, per-split details, sampler knobs, a sample
of prompts / captions) and `report.html` with image grids (prompts beside generated images,
captions beside captioned images); `grids.npz` keeps the grids' pixels for later reports.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax import inference
from flowtok_jax import paths
from flowtok_jax.data import shapes
from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import caption_metrics, image_metrics, report, shapes_eval

EVAL_SPLITS = shapes_eval.HELD_OUT_SPLITS
PARSER_MIN_ACCURACY = 0.99  # DESIGN §7: below this on ground truth, T2I accuracy is void.
GRID_SIZE = 16  # Images per report grid.
FEATURE_NET_TRAIN = 4096  # Train-split records read to train the shapes feature net.
# `flowtok demo` evaluates this many examples per split unless config.eval.num says otherwise
# (configs/demo.py reads all 1000 and generates for 256 of them, `eval.t2i_num`).
DEMO_NUM = 256


def default_out(bundle_path: str) -> str:
  """Where `flowtok eval` writes without --out: BUNDLE-eval, beside the bundle, not in it (a
  re-export replaces the bundle directory whole, and refuses to delete files it does not own)."""
  return bundle_path.rstrip("/") + "-eval"


def parse_splits(text: str | Sequence[str]) -> list[str]:
  """'test,compositional' -> ['test', 'compositional']; train and unknown names are refused."""
  names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
  if not names:
    raise UserError("no evaluation split given")
  return list(dict.fromkeys(shapes_eval.held_out_split(name) for name in names))


def _finite(value):
  """JSON-safe scalars: NaN / inf become None."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def clean_json(tree):
  """JSON-safe copy: numpy scalars as Python numbers, NaN / inf as None."""
  if isinstance(tree, dict):
    return {k: clean_json(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [clean_json(v) for v in tree]
  if isinstance(tree, (np.floating, np.integer)):
    tree = tree.item()
  return _finite(tree)


# -- tokenizer reconstructions --------------------------------------------------------------------

def _reconstruct_program(bundle: inference.Bundle, compiler_options: Optional[dict]):
  from flowtok_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  models = bundle.models

  def recon(params, images, ids):
    mean, logvar = models.tokenizer.apply({"params": params["tokenizer"]}, images,
                                          method=tok_lib.FlowTiTok.encode)
    feats = None
    if models.text_aware:
      feats = models.clip_text.apply({"params": params["clip_text"]}, ids)
    out = models.tokenizer.apply({"params": params["tokenizer"]}, mean, feats,
                                 method=tok_lib.FlowTiTok.decode)
    return inference.to_uint8(out), jnp.exp(0.5 * logvar).mean(axis=(1, 2))
  return jax.jit(recon, compiler_options=compiler_options or None)


def reconstruct(bundle: inference.Bundle, images: np.ndarray, captions: Sequence[str], *,
                batch_size: int = 8, compiler_options: Optional[dict] = None,
                progress: Optional[Callable[[int], Any]] = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizer round trip (posterior mean) of uint8 images [N, S, S, 3] -> (uint8 [N, S, S, 3],
  each image's mean posterior σ [N]); `progress(n)` after each batch of n."""
  run = _reconstruct_program(bundle, compiler_options)
  ids, _ = bundle.tokenizer.encode(list(captions), bundle.models.text_len)
  x = images.astype(np.float32) * np.float32(1 / 255)
  params = jax.device_put(bundle.params)
  out, sigmas = [], []
  for a in range(0, len(x), batch_size):
    b = min(a + batch_size, len(x))
    pad = lambda v: inference.pad_rows(v[a:b], batch_size)
    images_ab, sigma_ab = jax.device_get(run(params, pad(x), pad(ids)))
    out.append(np.asarray(images_ab)[: b - a])
    sigmas.append(np.asarray(sigma_ab)[: b - a])
    if progress is not None:
      progress(b - a)
  return np.concatenate(out), np.concatenate(sigmas)


# -- the evaluation -------------------------------------------------------------------------------

def _references(caption: str, attrs: dict) -> list[str]:
  """The dataset caption, its canonical wording, and the reference caption (left / upper
  object first: what the demo's I2T learns to write), without repeats."""
  return list(dict.fromkeys([caption, shapes.canonical_caption(attrs),
                             shapes.reference_caption(attrs["objects"],
                                                      attrs.get("relation", ""))]))


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def servers(b: inference.Bundle, *, batch_size: int, steps: Optional[int],
            cfg_scale: Optional[float], sampler: Optional[str], grid: Optional[str],
            caption_cfg_scale: Optional[float], compiler_options: Optional[dict]):
  """The evaluation's (Generator, Captioner or None): the T2I knobs given, I2T the bundle's
  defaults with `steps` / `sampler` / `grid` when given and its own guidance scale."""
  server_args = dict(batch_size=batch_size, compiler_options=compiler_options)
  gen = inference.Generator(b, steps=steps, cfg_scale=cfg_scale, sampler=sampler, grid=grid,
                            **server_args)
  cap = None
  if b.can_caption:
    cap = inference.Captioner(b, steps=steps, cfg_scale=caption_cfg_scale, sampler=sampler,
                              grid=grid, **server_args)
  return gen, cap


def _score_split(split: str, data, gen, cap, feature_net, seed: int, summary: dict,
                 grids: list, t2i_num: Optional[int] = None) -> dict[str, Any]:
  """T2I (on the first `t2i_num` examples; None: all) and I2T with a captioner (on all) on one
  split's (images, attrs, captions): its details; adds its flat scalars to `summary` and its
  grids to `grids`."""
  images, attrs, captions = data
  # The T2I prompts: the first t2i_num (with their true images and attributes).
  t_images, t_attrs, t_captions = (v[:t2i_num] for v in data)
  d: dict[str, Any] = {"num": len(images), "t2i_num": len(t_images)}
  parser_gt = shapes_eval.t2i_accuracy(t_images, t_attrs)["accuracy"]
  valid = parser_gt >= PARSER_MIN_ACCURACY
  if not valid:
    logging.warning("%s: the parser reads only %.3f of the ground-truth images correctly "
                    "(< %.2f): its T2I accuracy is void", split, parser_gt, PARSER_MIN_ACCURACY)
  seeds = [seed + i for i in range(len(t_images))]
  generated, seconds = _timed(lambda: gen.generate(t_captions, seeds, truncate=True))
  t2i = shapes_eval.t2i_accuracy(generated, t_attrs)
  d["t2i"] = {**t2i, "parser_gt": parser_gt, "valid": valid, "seconds": seconds}
  summary.update({f"t2i/{split}/num": len(t_images), f"t2i/{split}/accuracy": t2i["accuracy"],
                  f"t2i/{split}/parser_gt": parser_gt, f"t2i/{split}/valid": float(valid)})
  for key in ("accuracy_lenient", "accuracy_one", "accuracy_two", "color", "shape", "size",
              "location", "pair_size", "relation", "count"):
    summary[f"t2i/{split}/{key}"] = t2i[key]
  if feature_net is not None:
    d["t2i"]["frechet_shapes_net"] = feature_net.frechet(generated, t_images)
    summary[f"t2i/{split}/frechet_shapes_net"] = d["t2i"]["frechet_shapes_net"]
  g = min(GRID_SIZE, len(t_images))
  grids.append((f"T2I {split}: generated from the prompt below each image",
                generated[:g], t_captions[:g]))
  d["samples"] = [{"prompt": c, "seed": s} for c, s in zip(t_captions[:g], seeds[:g])]
  if cap is None:
    return d
  predicted, seconds = _timed(lambda: cap.caption_images(list(images)))
  i2t = caption_metrics.i2t_metrics(predicted, attrs,
                                    [_references(c, a) for c, a in zip(captions, attrs)])
  d["i2t"] = {**i2t, "seconds": seconds}
  summary[f"i2t/{split}/num"] = len(images)
  for key in ("exact", "exact_one", "exact_two", "parse_rate", "color", "shape", "size",
              "location", "relation", "bleu4", "cider_d"):
    summary[f"i2t/{split}/{key}"] = i2t[key]
  grids.append((f"I2T {split}: generated caption (true caption)", images[:g],
                [f"{p} ({c})" for p, c in zip(predicted[:g], captions[:g])]))
  for sample, p in zip(d["samples"], predicted[:g]):
    sample["caption_of_true_image"] = p
  return d


def _score_reconstructions(b: inference.Bundle, split: str, data, summary: dict, grids: list,
                           **reconstruct_args) -> dict[str, Any]:
  """The tokenizer's round trip of one split's (images, attrs, captions), scored by the parser
  and PSNR / SSIM: its details; adds its flat scalars to `summary` and its grid to `grids`."""
  images, attrs, captions = data
  recon, sigmas = reconstruct(b, images, captions, **reconstruct_args)
  parsed = shapes_eval.t2i_accuracy(recon, attrs)
  details = {
      "split": split, "num": len(images),
      "psnr": float(np.mean(image_metrics.psnr(images, recon))),
      "ssim": float(np.mean(image_metrics.ssim(images, recon))),
      "parser_recon": parsed["accuracy"], "parser_recon_lenient": parsed["accuracy_lenient"],
      # By scene kind: the misses are mostly two-object scenes (smaller objects, 12-22 px).
      "parser_recon_one": parsed["accuracy_one"], "parser_recon_two": parsed["accuracy_two"],
      "parser_gt": shapes_eval.t2i_accuracy(images, attrs)["accuracy"],
      # Posterior statistics (DESIGN §7): its σ, averaged per image and over the split.
      "posterior_std": float(np.mean(sigmas))}
  for key in ("num", "psnr", "ssim", "parser_recon", "parser_recon_lenient",
              "parser_recon_one", "parser_recon_two", "parser_gt", "posterior_std"):
    summary[f"tokenizer/{split}/{key}"] = details[key]
  g = min(GRID_SIZE, len(images))
  grids.append((f"tokenizer {split}: reconstructions (caption of the original)",
                recon[:g], captions[:g]))
  return details


def evaluate(bundle, data_dir: str, *, splits: str | Sequence[str] = "test,compositional",
             num: Optional[int] = None, t2i_num: Optional[int] = None,
             out: Optional[str] = None, batch_size: int = 32,
             steps: Optional[int] = None, cfg_scale: Optional[float] = None,
             sampler: Optional[str] = None, grid: Optional[str] = None,
             caption_cfg_scale: Optional[float] = None, recon_split: str = "val",
             frechet_steps: int = 300, seed: int = 0,
             compiler_options: Optional[dict] = None) -> dict[str, Any]:
  """Evaluates a bundle on captioned-shapes and writes eval.json + report.html.

  Args:
    bundle: bundle directory (or loaded `inference.Bundle`).
    data_dir: TFDS data dir; the dataset variant the bundle was trained on is built there if
      missing (it is deterministic given the bundle's data config).
    splits: evaluation splits (comma-separated or a list); never train.
    num: examples per split (the first `num`; default all).
    t2i_num: prompts per split the T2I images are generated for (the first `t2i_num` of those
      `num`; default all): generating is the evaluation's cost, captioning and
      reconstructing read every example.
    out: output directory (default: `default_out(bundle)`, beside the bundle).
    batch_size: examples per compiled call.
    steps, cfg_scale, sampler, grid: T2I sampler knobs (None: the bundle's defaults); I2T uses
      the bundle's defaults with `steps` / `sampler` / `grid` when given.
    caption_cfg_scale: I2T guidance scale (None: the bundle's default, 1.0).
    recon_split: split of the tokenizer reconstructions ('' skips them).
    frechet_steps: training steps of the shapes feature net (0 skips the Fréchet distance).
    seed: seed of the first generated image of each split.
    compiler_options: XLA options for every program (tests lower the optimisation level).
  Returns:
    The eval.json content: 'summary' (flat scalars), 'splits', 'tokenizer', 'knobs', ...
  """
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  b = inference.as_bundle(bundle)
  names = parse_splits(splits)
  if recon_split and recon_split not in EVAL_SPLITS:
    raise UserError(f"tokenizer reconstructions never read split {recon_split!r} "
                    f"(choose from {', '.join(EVAL_SPLITS)})")
  if num is not None and int(num) < 1:
    raise UserError(f"--num must be at least 1, got {num}")
  if t2i_num is not None and int(t2i_num) < 1:
    raise UserError(f"--t2i_num must be at least 1, got {t2i_num}")
  if frechet_steps and any(n is not None and int(n) < 2 for n in (num, t2i_num)):
    raise UserError("the Fréchet distance needs --num and --t2i_num 2 or more "
                    "(or --frechet_steps 0)")
  data_cfg = b.config.data
  if data_cfg.get("name") != builders.SHAPES_NAME:
    raise UserError(f"this bundle was trained on {data_cfg.get('name')!r}, not captioned-shapes: "
                    "measure it by FID with --inception (the FID Inception weights, "
                    "pt_inception-2015-12-05-6726825d.pth)")
  if not data_dir:
    raise UserError("--data_dir is required")
  builders.existing_data_dir(data_dir)
  out = paths.writable_dir(out or default_out(b.path), "--out")
  try:
    logging.info("eval data: %s", builders.build(data_cfg, data_dir))
  except OSError as e:
    raise UserError(f"cannot prepare the evaluation data in {data_dir}: {e}") from None
  gen, cap = servers(b, batch_size=batch_size, steps=steps, cfg_scale=cfg_scale,
                     sampler=sampler, grid=grid, caption_cfg_scale=caption_cfg_scale,
                     compiler_options=compiler_options)
  feature_net = None
  if frechet_steps:
    # A few thousand one-object scenes train it to ~99 % colour / ~96 % shape on val; rendering
    # all of a 20k train split would cost more than the training.
    feature_net = image_metrics.feature_net_for(data_cfg, steps=int(frechet_steps), seed=seed,
                                                num_train=FEATURE_NET_TRAIN, num_val=512)

  summary: dict[str, Any] = {}
  details: dict[str, Any] = {}
  grids: list[tuple[str, np.ndarray, list[str]]] = []
  loaded = {split: shapes_eval.load_split(data_cfg, data_dir, split, num) for split in names}
  for split, (images, _, _) in loaded.items():
    if not len(images):
      raise UserError(f"split {split!r} in {data_dir} has no examples")
  recon_data = (shapes_eval.load_split(data_cfg, data_dir, recon_split, num) if recon_split
                else None)
  # One bar over every image generated, captioned or reconstructed, with its ETA.
  total = (sum(len(v[0][:t2i_num]) for v in loaded.values())
           + (sum(len(v[0]) for v in loaded.values()) if cap is not None else 0)
           + (len(recon_data[0]) if recon_data else 0))
  with inference.progress_on(total, "eval", gen, cap) as update:
    for split in names:
      details[split] = _score_split(split, loaded[split], gen, cap, feature_net, seed,
                                    summary, grids, t2i_num=t2i_num)
    tokenizer_details = None
    if recon_split:
      tokenizer_details = _score_reconstructions(
          b, recon_split, recon_data, summary, grids, batch_size=batch_size,
          compiler_options=compiler_options, progress=update)

  result = clean_json({
      "bundle": b.path, "data_dir": os.path.abspath(data_dir), "splits": details,
      "tokenizer": tokenizer_details, "summary": summary,
      "knobs": {"t2i": gen.knobs(), "i2t": cap.knobs() if cap else None, "seed": seed},
      "can_caption": cap is not None,
      "frechet_name": image_metrics.FRECHET_NAME if feature_net is not None else None,
      "feature_net_val_accuracy": feature_net.val_accuracy if feature_net is not None else None,
      "grids": [{"title": t, "texts": list(texts)} for t, _, texts in grids],
  })
  write_eval(out, result, grids)
  return result


def write_eval(out: str, result: dict, grids: Sequence[tuple[str, np.ndarray, list[str]]]):
  os.makedirs(out, exist_ok=True)
  np.savez_compressed(os.path.join(out, "grids.npz"),
                      **{f"grid{i}": np.asarray(images) for i, (_, images, _) in enumerate(grids)})
  tmp = os.path.join(out, "eval.json.tmp")
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(out, "eval.json"))
  report.write_report(os.path.join(out, "report.html"), result["summary"], grids=grids,
                      title=f"flowtok eval: {result['bundle']}")


def load_grids(eval_dir: str) -> list[tuple[str, np.ndarray, list[str]]]:
  """The report grids an evaluation wrote (titles, uint8 images, texts)."""
  with open(os.path.join(eval_dir, "eval.json")) as f:
    result = json.load(f)
  with np.load(os.path.join(eval_dir, "grids.npz")) as data:
    return [(g["title"], data[f"grid{i}"], g["texts"]) for i, g in enumerate(result["grids"])]


def check_step_candidates(candidates: Sequence[int]) -> list[int]:
  """The distinct step counts of `candidates`, sorted; UserError unless all are ints >= 1."""
  if not candidates or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                                and c >= 1 for c in candidates):
    raise UserError(f"I2T step candidates must be positive integers, got {list(candidates)}")
  return sorted({int(c) for c in candidates})


def select_i2t_steps(bundle, data_dir: str, candidates: Sequence[int], *, split: str = "val",
                     num: Optional[int] = None, batch_size: int = 32,
                     compiler_options: Optional[dict] = None) -> tuple[int, dict[int, float]]:
  """The image-to-text step count with the best exact match on held-out images of `split`.

  A model selection step, so it reads a held-out split other than the ones reported (the demo:
  val, reports on test / compositional) and never train. Ties go to the fewest steps; when no
  count gets a single caption right there is no evidence, and the bundle's default stays.

  Returns:
    (chosen steps, {steps: exact match on `split`}).
  """
  b = inference.as_bundle(bundle)
  if not b.can_caption:
    raise UserError(f"bundle {b.path} cannot caption: no image-to-text steps to choose")
  split = shapes_eval.held_out_split(split, "the I2T step choice (on a held-out split)")
  counts = check_step_candidates(candidates)
  images, attrs, captions = shapes_eval.load_split(b.config.data, data_dir, split, num)
  references = [_references(c, a) for c, a in zip(captions, attrs)]
  exact = {}
  with inference.progress_on(len(counts) * len(images), f"I2T steps on {split}") as update:
    for steps in counts:
      cap = inference.Captioner(b, steps=steps, batch_size=batch_size,
                                compiler_options=compiler_options)
      cap.progress = update
      predicted = cap.caption_images(list(images))
      exact[steps] = float(caption_metrics.i2t_metrics(predicted, attrs, references)["exact"])
  best = max(counts, key=lambda k: (exact[k], -k))
  why = "the best"
  if exact[best] == 0.0:
    best = int(b.meta["defaults"]["i2t"]["steps"])
    why = "no count got a caption right: the bundle's default"
  logging.info("I2T exact match on %d %s images by steps: %s -> %d steps (%s)", len(images),
               split, exact, best, why)
  return best, exact


# -- the demo's use -------------------------------------------------------------------------------

def demo_eval(config, bundle: str, out: str) -> dict[str, float]:
  """`flowtok demo`'s evaluation: `evaluate` on the demo data; flat 'eval/...' scalars.

  Knobs come from an optional `config.eval` section (num, t2i_num, batch_size, frechet_steps,
  steps, cfg_scale, splits); absent keys take `evaluate`'s defaults, except num (DEMO_NUM).
  """
  section = config.get("eval") or {}
  keys = ("num", "t2i_num", "batch_size", "frechet_steps", "steps", "cfg_scale", "splits")
  kwargs = {"num": DEMO_NUM}
  kwargs.update({k: section[k] for k in keys if k in section and section[k] is not None})
  result = evaluate(bundle, config.data.data_dir, out=out, **kwargs)
  return {f"eval/{k}": v for k, v in result["summary"].items() if v is not None}


def _loss_curves(workdir: str) -> dict[str, list[tuple[float, float]]]:
  curves = {}
  for stage in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, stage, "metrics.jsonl")
    if not os.path.isfile(path):
      continue
    points = []
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row.get("train/loss"), (int, float)) and "step" in row:
          points.append((float(row["step"]), float(row["train/loss"])))
    if points:
      curves[f"{stage} train/loss"] = points
  return curves


def demo_report(workdir: str, eval_dir: str, out: str) -> str:
  """W/report.html: W/metrics.json's scalars, stage times, eval grids and loss curves."""
  metrics = {}
  path = os.path.join(workdir, "metrics.json")
  if os.path.exists(path):
    with open(path) as f:
      metrics = json.load(f)
  times = {k[len("time/"):-len("_sec")]: v for k, v in metrics.items()
           if k.startswith("time/") and k.endswith("_sec") and k != "time/total_sec"}
  scalars = {k: v for k, v in metrics.items() if not k.startswith("time/")}
  grids = load_grids(eval_dir) if os.path.exists(os.path.join(eval_dir, "eval.json")) else []
  return report.write_report(out, scalars, grids=grids, stage_times=times,
                             loss_curves=_loss_curves(workdir), title="flowtok demo")
