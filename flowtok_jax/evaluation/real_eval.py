"""`flowtok eval --inception W` on real data: FID, rFID and caption scores of a bundle.

    flowtok eval --bundle B --data_dir D --inception pt_inception-2015-12-05-6726825d.pth
        [--split val] [--num N] [--out DIR]

For a bundle trained on a folder of captioned images or a TFDS dataset (anything but
captioned-shapes, whose pixel parser `run_eval` uses), on the first N examples of one held-out
split (default: the bundle's `data.eval_split`; never train):
  * tokenizer: reconstructions (posterior mean) of the split's images: rFID, PSNR, SSIM and the
    posterior σ;
  * T2I: one image per example from its first caption (seed = `seed` + index): FID against the
    split's images;
  * I2T (two-way bundles): a caption per image, BLEU-4 and CIDEr-D against all of the image's
    captions (COCO has about five).
Every FID here is the real one (evaluation/inception.py, weights from a local file) between the
model's view of the real images (resized and centre-cropped to the bundle's image size, as
training saw them) and the generated or reconstructed images at that size. FID is biased upward
at small N; `num` is reported beside it, and numbers are comparable only at the same N.

Written to OUT: eval.json (summary of flat scalars, knobs, a sample of prompts / captions),
report.html with image grids, grids.npz.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from flowtok_jax import inference, paths
from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import caption_metrics, image_metrics, inception, run_eval


def load_examples(data_cfg, data_dir: str, split: str, image_size: int,
                  num: Optional[int] = None) -> tuple[np.ndarray, list[list[str]]]:
  """The first `num` examples of a built split: (uint8 [N, S, S, 3], each image's captions)."""
  from flowtok_jax.data import builders, examples, pipeline  # pylint: disable=g-import-not-at-top
  source = builders.data_source(data_cfg, split, data_dir)
  n = len(source) if num is None else min(int(num), len(source))
  images, captions = [], []
  for i in range(n):
    ex = source[i]
    image = pipeline.load_image(ex, data_cfg.image_key, image_size)
    images.append(np.round(image * 255.0).astype(np.uint8))
    captions.append([examples.text(c) for c in
                     examples.captions_of(examples.feature(ex, data_cfg.caption_key))])
  stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
  return stacked, captions


def evaluate_real(bundle, data_dir: str, weights: str, *, split: Optional[str] = None,
                  num: Optional[int] = None, out: Optional[str] = None, batch_size: int = 32,
                  steps: Optional[int] = None, cfg_scale: Optional[float] = None,
                  sampler: Optional[str] = None, grid: Optional[str] = None,
                  caption_cfg_scale: Optional[float] = None, seed: int = 0,
                  inception_batch_size: int = 50,
                  compiler_options: Optional[dict] = None) -> dict[str, Any]:
  """Evaluates a bundle by FID / rFID / caption scores and writes eval.json + report.html.

  Args:
    bundle: bundle directory (or a loaded `inference.Bundle`).
    data_dir: TFDS data dir holding the bundle's dataset, already built.
    weights: the FID Inception weights (`inception.load_variables`).
    split: one held-out split (default: the bundle's data.eval_split).
    num: examples (the first `num`; default all); at least 2.
    out, batch_size, steps, cfg_scale, sampler, grid, caption_cfg_scale, seed,
    compiler_options: as for `run_eval.evaluate`.
    inception_batch_size: images per Inception call.
  Returns:
    The eval.json content: 'summary' (flat scalars), 'knobs', 'samples', ...
  """
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  b = inference.as_bundle(bundle)
  data_cfg = b.config.data
  if data_cfg.get("name") == builders.SHAPES_NAME:
    raise UserError("a captioned-shapes bundle is measured by the pixel parser (and the shapes "
                    "feature net's Fréchet distance); --inception (real FID) is for real data")
  split = split or data_cfg.get("eval_split") or "val"
  if "," in split:
    raise UserError(f"--split takes one split for FID evaluation, got {split!r}")
  if split == data_cfg.get("train_split", "train") or split.startswith("train"):
    raise UserError(f"evaluation never reads the training split ({split!r})")
  if num is not None and int(num) < 2:
    raise UserError(f"FID needs --num 2 or more, got {num}")
  if not data_dir:
    raise UserError("--data_dir is required")
  builders.existing_data_dir(data_dir)
  out = paths.writable_dir(out or run_eval.default_out(b.path), "--out")
  variables = inception.load_variables(weights)  # Refuse bad weights before any sampling.
  size = b.models.image_size
  images, captions = load_examples(data_cfg, data_dir, split, size, num)
  if len(images) < 2:
    raise UserError(f"split {split!r} in {data_dir} has {len(images)} examples; FID needs 2")
  prompts = [c[0] for c in captions]

  gen, cap = run_eval.servers(b, batch_size=batch_size, steps=steps, cfg_scale=cfg_scale,
                              sampler=sampler, grid=grid, caption_cfg_scale=caption_cfg_scale,
                              compiler_options=compiler_options)
  n = len(images)
  # Reconstruct, generate, caption, then Inception features of real, reconstructed, generated.
  with inference.progress_on(n * (6 if cap is not None else 5), "eval", gen, cap) as update:
    recon, sigmas = run_eval.reconstruct(b, images, prompts, batch_size=batch_size,
                                         compiler_options=compiler_options, progress=update)
    seeds = [seed + i for i in range(n)]
    generated = gen.generate(prompts, seeds, truncate=True)
    predicted = cap.caption_images(list(images)) if cap is not None else None
    net = inception.InceptionFeatures(variables, inception_batch_size)

    stats = lambda x: image_metrics.gaussian_stats(net(x, update))

    real_stats = stats(images)
    summary: dict[str, Any] = {
        f"tokenizer/{split}/rfid": image_metrics.frechet_distance(*real_stats, *stats(recon)),
        f"tokenizer/{split}/psnr": float(np.mean(image_metrics.psnr(images, recon))),
        f"tokenizer/{split}/ssim": float(np.mean(image_metrics.ssim(images, recon)))
        if size >= 11 else None,
        f"tokenizer/{split}/posterior_std": float(np.mean(sigmas)),
        f"t2i/{split}/fid": image_metrics.frechet_distance(*real_stats, *stats(generated)),
        f"{split}/num": n}
    if predicted is not None:
      summary[f"i2t/{split}/bleu4"] = caption_metrics.bleu(predicted, captions)
      summary[f"i2t/{split}/cider_d"] = caption_metrics.cider_d(predicted, captions)

  g = min(run_eval.GRID_SIZE, n)
  grids = [(f"T2I {split}: generated from the prompt below each image", generated[:g],
            prompts[:g]),
           (f"tokenizer {split}: reconstructions (caption of the original)", recon[:g],
            prompts[:g])]
  samples = [{"prompt": p, "seed": s} for p, s in zip(prompts[:g], seeds[:g])]
  if predicted is not None:
    grids.append((f"I2T {split}: generated caption (first true caption)", images[:g],
                  [f"{p} ({c})" for p, c in zip(predicted[:g], prompts[:g])]))
    for sample, p in zip(samples, predicted[:g]):
      sample["caption_of_true_image"] = p
  result = run_eval.clean_json({
      "bundle": b.path, "data_dir": os.path.abspath(data_dir), "split": split, "num": n,
      "summary": summary, "samples": samples, "can_caption": cap is not None,
      "inception": os.path.abspath(weights),
      "fid_note": f"FID with the FID Inception-v3 on {n} images at {size}x{size} (resized to "
                  "299 for the network); biased upward at small N",
      "knobs": {"t2i": gen.knobs(), "i2t": cap.knobs() if cap else None, "seed": seed},
      "grids": [{"title": t, "texts": list(texts)} for t, _, texts in grids],
  })
  run_eval.write_eval(out, result, grids)
  return result
