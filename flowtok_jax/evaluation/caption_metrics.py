"""I2T metrics: caption attribute accuracy on the shapes world, BLEU-4 and CIDEr-D.

Attribute accuracy reads a generated caption back with `shapes.parse_caption`, so it does not
care which paraphrase the model chose, nor in which order it listed two objects ("a red circle
left of a blue square" = "a blue square right of a red circle").

BLEU-4 and CIDEr-D follow the COCO caption scorers, on lower-case whitespace tokens (the
trailing period dropped; no PTB tokenizer):
* BLEU-4: corpus level; clipped n-gram precisions for n = 1..4, geometric mean with equal
  weights, brevity penalty exp(1 - r/c) when c < r, r summing each hypothesis's closest
  reference length (ties to the shorter). No smoothing: a corpus without any matching 4-gram
  scores 0.
* CIDEr-D: n = 1..4; each n-gram weighted by term count x (log N - log max(1, df)), df = number
  of images whose references contain it, N = number of images (the IDF is over the evaluated
  reference corpus); per n the cosine with the hypothesis's weights clipped to the reference's
  (min(h, r) * r), times the Gaussian length penalty exp(-(l_h - l_r)^2 / (2 * 6^2)) with l the
  number of bigrams, as the COCO code counts it; mean over n, mean over references, x 10;
  the corpus score is the mean over images.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Sequence

import numpy as np

from flowtok_jax.data import shapes
from flowtok_jax.errors import UserError

_OBJECT_KEYS = ("color", "shape", "size", "location")


def tokenize(text: str) -> list[str]:
  """Lower-case whitespace tokens without a trailing period."""
  return shapes.normalize_caption(text).split()


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _as_refs(references) -> list[list[str]]:
  return [[r] if isinstance(r, str) else list(r) for r in references]


def _check(hypotheses, references) -> list[list[str]]:
  refs = _as_refs(references)
  if len(hypotheses) != len(refs):
    raise UserError(f"{len(hypotheses)} captions but {len(refs)} reference sets")
  if not refs or any(not r for r in refs):
    raise UserError("every caption needs at least one reference (and there must be one)")
  return refs


# --- BLEU --------------------------------------------------------------------------------------


def bleu(hypotheses: Sequence[str], references, max_n: int = 4) -> float:
  """Corpus BLEU-max_n (BLEU-4 by default).

  Args:
    hypotheses: N generated captions.
    references: N references, each a string or a list of strings.
    max_n: highest n-gram order.
  Returns:
    BLEU in [0, 1].
  """
  refs = _check(hypotheses, references)
  matches, totals = np.zeros(max_n), np.zeros(max_n)
  hyp_len = ref_len = 0
  for hyp, ref_set in zip(hypotheses, refs):
    h = tokenize(hyp)
    r_toks = [tokenize(r) for r in ref_set]
    hyp_len += len(h)
    ref_len += min((abs(len(r) - len(h)), len(r)) for r in r_toks)[1]
    for n in range(1, max_n + 1):
      counts = _ngrams(h, n)
      most = collections.Counter()
      for r in r_toks:
        most |= _ngrams(r, n)  # Element-wise max over references.
      matches[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
      totals[n - 1] += max(len(h) - n + 1, 0)
  if hyp_len == 0 or (matches == 0).any():
    return 0.0
  log_p = np.log(matches / totals).mean()
  brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
  return float(brevity * math.exp(log_p))


# --- CIDEr-D -----------------------------------------------------------------------------------


def _counts(tokens: Sequence[str], max_n: int) -> collections.Counter:
  out = collections.Counter()
  for n in range(1, max_n + 1):
    out.update(_ngrams(tokens, n))
  return out


def cider_d_scores(hypotheses: Sequence[str], references, sigma: float = 6.0,
                   max_n: int = 4) -> np.ndarray:
  """CIDEr-D of each hypothesis (IDF over the given references). Returns float [N]."""
  refs = _check(hypotheses, references)
  hyp_counts = [_counts(tokenize(h), max_n) for h in hypotheses]
  ref_counts = [[_counts(tokenize(r), max_n) for r in ref_set] for ref_set in refs]
  doc_freq = collections.Counter()
  for ref_set in ref_counts:
    doc_freq.update(set(g for c in ref_set for g in c))
  log_n = math.log(float(len(refs)))

  def vectorize(counts):
    vec = [dict() for _ in range(max_n)]
    norm = np.zeros(max_n)
    for g, tf in counts.items():
      w = tf * (log_n - math.log(max(1.0, doc_freq[g])))
      vec[len(g) - 1][g] = w
      norm[len(g) - 1] += w * w
    bigrams = sum(tf for g, tf in counts.items() if len(g) == 2)
    return vec, np.sqrt(norm), bigrams

  scores = np.zeros(len(refs))
  for i, (hc, rcs) in enumerate(zip(hyp_counts, ref_counts)):
    vh, nh, lh = vectorize(hc)
    total = np.zeros(max_n)
    for rc in rcs:
      vr, nr, lr = vectorize(rc)
      val = np.zeros(max_n)
      for n in range(max_n):
        val[n] = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
        if nh[n] != 0 and nr[n] != 0:
          val[n] /= nh[n] * nr[n]
      total += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
    scores[i] = total.mean() / len(rcs) * 10.0
  return scores


def cider_d(hypotheses: Sequence[str], references, sigma: float = 6.0) -> float:
  """Corpus CIDEr-D: the mean of `cider_d_scores` (x10 scale, a perfect corpus is ~10)."""
  return float(cider_d_scores(hypotheses, references, sigma).mean())


# --- Attribute accuracy on the shapes world ----------------------------------------------------


def _agreement(pred: dict, target: dict) -> dict[str, Any]:
  """Per-attribute agreement of two parse_caption results, with the pred's objects in order."""
  want, got = target["objects"], pred["objects"]
  out = {"count": len(got) == len(want)}
  for key in _OBJECT_KEYS:
    out[key] = [None if w.get(key) is None else (i < len(got) and got[i].get(key) == w[key])
                for i, w in enumerate(want)]
  out["relation"] = None
  if len(want) == 2:
    out["relation"] = len(got) == 2 and pred.get("relation") == target["relation"]
  return out


def _hits(agreement: dict) -> int:
  return sum(bool(v) for key in _OBJECT_KEYS for v in agreement[key]) + bool(
      agreement["relation"])


def compare_attributes(pred: dict[str, Any] | None, target: dict[str, Any]) -> dict[str, Any]:
  """Agreement of a parsed caption with the ground truth, order-insensitive for two objects.

  Args:
    pred: `parse_caption` output (None when the caption did not parse).
    target: ground truth in the same format (`shapes.scene_attributes`).
  Returns:
    dict: 'exact' (bool), 'count' (bool), per target object lists 'color', 'shape', 'size',
    'location' (bool, or None where the target states nothing), 'relation' (bool or None).
  """
  if pred is None:
    pred = {"objects": [], "relation": None}
  candidates = [pred]
  objs = pred["objects"]
  if len(objs) == 2 and pred.get("relation") in shapes.INVERSE_RELATION:
    candidates.append({"objects": objs[::-1],
                       "relation": shapes.INVERSE_RELATION[pred["relation"]]})
  elif len(objs) == 1 and len(target["objects"]) == 2:
    candidates.append({"objects": [{}] + objs, "relation": pred.get("relation")})
  best = max((_agreement(c, target) for c in candidates), key=_hits)
  best["count"] = len(objs) == len(target["objects"])  # The padding above is no object.
  checks = [v for key in _OBJECT_KEYS for v in best[key] if v is not None]
  best["exact"] = bool(best["count"] and all(checks) and best["relation"] in (None, True))
  return best


def caption_accuracy(captions: Sequence[str], targets) -> dict[str, float]:
  """I2T attribute accuracy of generated captions.

  Args:
    captions: N generated captions.
    targets: N ground truths, each `parse_caption`-format attributes or a reference caption.
  Returns:
    Flat dict of floats: 'exact' (every attribute and the relation right), 'parse_rate'
    (share of captions in the grammar), 'count', 'color', 'shape' (over target objects),
    'size', 'location' (over one-object targets), 'relation' (over two-object targets),
    'exact_one' / 'exact_two' (exact match by target kind; NaN if none), 'num' (N).
  """
  if len(captions) != len(targets):
    raise UserError(f"{len(captions)} captions but {len(targets)} targets")
  if not len(captions):
    raise UserError("caption_accuracy needs at least one caption")
  sums = {k: [] for k in ("exact", "parse_rate", "count", "relation", "exact_one", "exact_two")
          + _OBJECT_KEYS}
  for caption, target in zip(captions, targets):
    if isinstance(target, str):
      parsed_target = shapes.parse_caption(target)
      if parsed_target is None:
        raise UserError(f"reference caption {target!r} is not in the shapes grammar")
      target = parsed_target
    pred = shapes.parse_caption(caption)
    agree = compare_attributes(pred, target)
    sums["parse_rate"].append(pred is not None)
    sums["exact"].append(agree["exact"])
    sums["exact_one" if len(target["objects"]) == 1 else "exact_two"].append(agree["exact"])
    sums["count"].append(agree["count"])
    if agree["relation"] is not None:
      sums["relation"].append(agree["relation"])
    for key in _OBJECT_KEYS:
      sums[key].extend(v for v in agree[key] if v is not None)
  out = {k: float(np.mean(v)) if v else float("nan") for k, v in sums.items()}
  out["num"] = float(len(captions))
  return out


def i2t_metrics(captions: Sequence[str], targets, references) -> dict[str, float]:
  """`caption_accuracy` plus 'bleu4' and 'cider_d' against `references` (N strings or lists)."""
  out = caption_accuracy(captions, targets)
  out["bleu4"] = bleu(captions, references)
  out["cider_d"] = cider_d(captions, references)
  return out
