"""`flowtok probe --direction tokenizer`: where a bundle's tokenizer reconstructions fail.

    flowtok probe --direction tokenizer --bundle runs/demo/bundle --data_dir runs/demo/data \
        --split val --num 1000

The tokenizer bar (DESIGN §6) is the pixel parser's acceptance of reconstructions: the posterior
mean of each held-out image, decoded with the image's caption (the decoder is text-aware). This
probe breaks that reading down, one JSON object:

  recon/accuracy, recon/accuracy_one, recon/accuracy_two, recon/psnr
      the bar's reading on this split, and by scene kind (one or two objects).
  objects/num, objects/shape, objects/color, objects/missing
      per object of the original images (as the parser reads them; it reads clean renders
      exactly), the reconstruction's object nearest its centre: share with the right shape, the
      right colour, and share with no object at all.
  confusion/TRUE->READ
      how many objects of shape TRUE the reconstructions draw as READ (wrong shapes only).
  two/other_shape, two/other_shape_num
      of the wrong shapes in two-object scenes whose objects differ in shape, the share drawn as
      the other object's shape (a binding slip), and how many there were. Chance is 0.5: a wrong
      shape is one of the two others.
  caption=empty/..., caption=swap/...
      the same tokens decoded with an empty caption, and with the next example's caption:
      accuracy, objects/shape, objects/color. What falls is what the decoder reads from the
      caption rather than from the tokens.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import i2t_probe, image_metrics, shapes_eval


def _nearest(detections, center):
  return min(detections, key=lambda d: (d.center[0] - center[0]) ** 2
             + (d.center[1] - center[1]) ** 2)


def object_readings(originals: np.ndarray, images: np.ndarray, truths=None) -> dict:
  """Per-object shape / colour agreement of `images` with `originals` (uint8 [N, S, S, 3]).

  Each object the parser finds in an original is paired with the object of the matching image
  nearest its centre. `truths`: the originals' detections, when already read. Returns the
  `objects/*`, `confusion/*` and `two/*` keys of the module docstring (`confusion/*` only for
  confusions that occur).
  """
  if originals.shape != images.shape:
    raise UserError(f"originals {originals.shape} and images {images.shape} differ in shape")
  if truths is None:
    truths = [shapes_eval.detect_objects(o) for o in originals]
  n = shape_ok = color_ok = missing = other = other_num = 0
  confusion = collections.Counter()
  for truth, image in zip(truths, images):
    read = shapes_eval.detect_objects(image)
    for i, t in enumerate(truth):
      n += 1
      if not read:
        missing += 1
        continue
      r = _nearest(read, t.center)
      color_ok += r.color == t.color
      if r.shape == t.shape:
        shape_ok += 1
        continue
      confusion[f"confusion/{t.shape}->{r.shape}"] += 1
      if len(truth) == 2 and truth[1 - i].shape != t.shape:
        other_num += 1
        other += r.shape == truth[1 - i].shape
  out = {"objects/num": n, "objects/shape": shape_ok / max(n, 1),
         "objects/color": color_ok / max(n, 1), "objects/missing": missing / max(n, 1),
         "two/other_shape": other / other_num if other_num else float("nan"),
         "two/other_shape_num": other_num}
  out.update(sorted(confusion.items()))
  return out


def _accuracy(images: np.ndarray, attrs: Sequence[dict]) -> dict:
  scores = shapes_eval.t2i_accuracy(images, attrs)
  return {k: scores[k] for k in ("accuracy", "accuracy_one", "accuracy_two")}


def probe(bundle, data_dir: str, *, split: str = "val", num: int = 1000,
          batch_size: int = 50) -> dict:
  """Runs the measurements of the module docstring on the first `num` examples of `split`."""
  from flowtok_jax.evaluation import run_eval  # pylint: disable=g-import-not-at-top
  b, images, attrs, captions = i2t_probe.probe_examples(bundle, data_dir, split, num)
  recon, _ = run_eval.reconstruct(b, images, captions, batch_size=batch_size)
  out = {"num": len(images),
         "recon/psnr": float(np.mean(image_metrics.psnr(images, recon)))}
  out.update({f"recon/{k}": v for k, v in _accuracy(recon, attrs).items()})
  truths = [shapes_eval.detect_objects(o) for o in images]  # Read once, for every decoding.
  out.update(object_readings(images, recon, truths))
  if b.models.text_aware:
    swapped = list(captions[1:]) + list(captions[:1])
    for name, texts in (("empty", [""] * len(captions)), ("swap", swapped)):
      other, _ = run_eval.reconstruct(b, images, texts, batch_size=batch_size)
      readings = object_readings(images, other, truths)
      out[f"caption={name}/accuracy"] = _accuracy(other, attrs)["accuracy"]
      for key in ("objects/shape", "objects/color"):
        out[f"caption={name}/{key}"] = readings[key]
  return out
