"""A deterministic pixel parser for the captioned-shapes world and T2I attribute accuracy.

`parse_image` reads an image back into the attributes a caption states, in
`shapes.parse_caption`'s format, so a generated image can be checked against its prompt without
any learned network (DESIGN.md §7). It is meant for *generated* images, not only clean renders,
so every step tolerates blur, colour shifts, speckle and soft edges:

1. Pixel colour. Blurring an object's edge into the black background moves a pixel along the
   segment black -> palette colour, so each pixel is projected onto every palette colour's
   segment: coverage t_k = <p, c_k> / |c_k|^2 and residual |p - t_k c_k|. Its colour is the one
   with the smallest residual; it is an object pixel when that coverage is >= 0.5 (the 50 %
   contour of a blurred edge is the true edge) and the residual is small against |p| (the colour
   direction is close to a palette colour, not white or grey).
2. Objects. Connected components (8-neighbour) per colour; components far smaller than the
   smallest object the rules allow are noise and dropped.
3. Shape. The coverage *mass* within 1 px of the component (blur moves mass, it does not
   create it), relative to the object's own interior level (a generated colour may be darker
   than the palette), with holes filled (speckle). Its vertical skewness finds point-up
   triangles (-0.57 ideal, circles and squares 0); then the fill ratio, mass / (longest row x
   longest column), which a stray edge pixel cannot move the way it moves a bounding box,
   separates squares (1.0) from discs (0.76-0.85, 0.89 at 6 px).
4. Size, location, relation. Bounding-box side and centre (a 1-pixel end row or column, a
   stuck speckle, is trimmed; a triangle's box is measured up from its base, its apex may
   fade) against `shapes.geometry`, taking the nearest word when a value falls between the
   rules' ranges (a generated object is rarely exact); the relation is the dominant axis of
   the centre offset.
5. Scoring (`score_image`). An object's size or location, or a relation, is right only when
   the word matches *and* the measured geometry obeys DESIGN §6's rule for that word, within
   one pixel per 64 (measurement; ground truth reads 100 %): small 12–16 px, large 24–28 px,
   each of two objects 12–22 px; `center` within 6 px of the middle, a corner at least 12 px
   from it on both axes; a relation by at least 8 px on its axis. The nearest-word reading
   alone is reported beside it as `accuracy_lenient`.

`validate_parser` measures the parser on ground-truth renders: the T2I number is void unless
that reaches 99 %.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
from typing import Any, Sequence

import numpy as np
import PIL.Image
import scipy.ndimage

from flowtok_jax.data import examples, shapes
from flowtok_jax.errors import UserError

_PALETTE = np.array([shapes.PALETTE[c] for c in shapes.COLORS], np.float32)  # [6, 3]
_PALETTE_SQ = (_PALETTE ** 2).sum(-1)  # [6]
_EIGHT = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class ParserConfig:
  """Thresholds of the pixel parser (chosen by measurement, see tests/evaluation).

  Attributes:
    min_coverage: an object pixel carries at least this share of its palette colour.
    max_angle_residual: largest residual / |pixel| (about sin of the angle to the palette
      colour; the closest palette pair, cyan and blue, is 24 degrees apart).
    min_area_fraction: components smaller than this share of the smallest legal object's area
      are noise.
    triangle_max_skewness: a vertical mass profile more skewed (negative: mass low) than this
      is a point-up triangle (ideal -0.57, circles and squares 0).
    square_min_fill: fill ratio from which a non-triangle is a square. Digital discs fill
      0.76-0.85 of their box from 7 px up, squares 1.0; degraded renders measured 0.76-0.88
      for discs and >= 0.86 for squares.
    square_min_fill_tiny: the same for objects at most 6 px wide (a 6-px disc fills 0.889).
    max_blemish_fraction: a component whose box overlaps a larger object's box and whose area
      is below this share of it belongs to that object (objects never overlap).
  """
  min_coverage: float = 0.5
  max_angle_residual: float = 0.45
  min_area_fraction: float = 0.3
  triangle_max_skewness: float = -0.2
  square_min_fill: float = 0.9
  square_min_fill_tiny: float = 0.94
  max_blemish_fraction: float = 0.5


@dataclasses.dataclass(frozen=True)
class Detection:
  """One object found in an image (attributes plus the geometry they came from)."""
  color: str
  shape: str
  size: str
  location: str
  center: tuple[float, float]  # (x, y) in pixels, bbox convention of shapes.render_example.
  bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive.
  side: int  # Bounding-box side (a triangle's measured up from its base).
  area: int  # Object pixels in the component.
  fill: float  # Coverage mass / (longest row mass * longest column mass).
  skewness: float  # Of the vertical mass profile (triangle about -0.5, others 0).


def to_uint8_range(images) -> np.ndarray:
  """Images as float32 in 0..255: uint8 as is, floats read as [0, 1]. Returns [..., H, W, 3]."""
  images = np.asarray(images)
  if images.shape[-1] != 3:
    raise UserError(f"expected RGB images [..., H, W, 3], got shape {images.shape}")
  if images.dtype == np.uint8:
    return images.astype(np.float32)
  return np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0


def _pixel_classes(image: np.ndarray, cfg: ParserConfig):
  """Per-pixel colour, object mask and coverage. image: float [H, W, 3] in 0..255.

  Returns:
    label int [H, W] (palette index), object bool [H, W], coverage float [H, W, 6] (>= 0).
  """
  t = np.maximum(image @ _PALETTE.T / _PALETTE_SQ, 0.0)  # [H, W, 6]
  norm_sq = (image ** 2).sum(-1)  # [H, W]
  # |p - t c|^2 = |p|^2 - t^2 |c|^2 at the projection t = <p, c> / |c|^2 (t >= 0).
  resid_sq = norm_sq[..., None] - t ** 2 * _PALETTE_SQ  # [H, W, 6]
  label = resid_sq.argmin(-1)
  t_best = np.take_along_axis(t, label[..., None], -1)[..., 0]
  r_best_sq = np.take_along_axis(resid_sq, label[..., None], -1)[..., 0]
  obj = (t_best >= cfg.min_coverage) & (r_best_sq <= cfg.max_angle_residual ** 2 * norm_sq)
  return label, obj, t


def _smallest_area(image_size: int) -> float:
  g = shapes.geometry(image_size)
  return float(shapes.shape_mask("triangle", g.small[0]).sum())


def nearest_location(center, image_size: int) -> str:
  """`shapes.location_of`, or the nearest location region when the centre fits none."""
  exact = shapes.location_of(center, image_size)
  if exact is not None:
    return exact
  g = shapes.geometry(image_size)
  dx, dy = center[0] - g.mid, center[1] - g.mid
  to_center = max(abs(dx), abs(dy)) - g.center_tol
  to_corner = g.corner_min - min(abs(dx), abs(dy))
  if to_center <= to_corner or dx == 0 or dy == 0:
    return "center"
  return shapes.corner_of(dx, dy)


def nearest_size(side: float, image_size: int) -> str:
  """'small' or 'large': the nearer of the rules' two side ranges."""
  g = shapes.geometry(image_size)
  return "small" if side <= (g.small[1] + g.large[0]) / 2 else "large"


def dominant_relation(center0, center1) -> str:
  """`object0 REL object1` by the larger centre offset (no margin: the lenient reading)."""
  dx, dy = center1[0] - center0[0], center1[1] - center0[1]
  if abs(dx) >= abs(dy):
    return "left of" if dx > 0 else "right of"
  return "above" if dy > 0 else "below"


def tolerance(image_size: int) -> float:
  """Pixels a measured length may miss a §6 rule by: one per 64 px (at least one)."""
  return max(1.0, image_size / 64)


def size_fits(side: float, word: str | None, image_size: int) -> bool:
  """Whether a bounding-box side obeys the rule of `word` ('small', 'large'; None: one of two
  objects, 12–22 px at 64 px), within `tolerance`."""
  g = shapes.geometry(image_size)
  lo, hi = {"small": g.small, "large": g.large, None: g.pair}[word]
  tol = tolerance(image_size)
  return lo - tol <= side <= hi + tol


def location_fits(center, word: str, image_size: int) -> bool:
  """Whether a one-object centre obeys the rule of location `word`, within `tolerance`."""
  g = shapes.geometry(image_size)
  tol = tolerance(image_size)
  dx, dy = center[0] - g.mid, center[1] - g.mid
  if word == "center":
    return max(abs(dx), abs(dy)) <= g.center_tol + tol
  return shapes.corner_of(dx, dy) == word and min(abs(dx), abs(dy)) >= g.corner_min - tol


def relation_fits(center0, center1, relation: str, image_size: int) -> bool:
  """Whether `object0 relation object1` holds by §6's rule (the larger offset, by at least the
  margin on its axis), within `tolerance`."""
  g = shapes.geometry(image_size)
  dx, dy = center1[0] - center0[0], center1[1] - center0[1]
  offset = abs(dx) if relation in ("left of", "right of") else abs(dy)
  return (dominant_relation(center0, center1) == relation
          and offset >= g.relation_margin - tolerance(image_size))


def _trimmed_extent(counts: np.ndarray) -> tuple[int, int]:
  """[lo, hi) of the non-empty entries of a pixel-count profile, dropping a 1-pixel end.

  A speckle or ringing pixel stuck to an edge adds a 1-pixel column; no circle or square has
  one (a disc's outer columns hold >= 3 pixels), only a triangle's apex, which is measured
  from the base anyway.
  """
  nz = np.flatnonzero(counts)
  lo, hi = int(nz[0]), int(nz[-1]) + 1
  if hi - lo > 2 and counts[lo] <= 1:
    lo += 1
  if hi - lo > 2 and counts[hi - 1] <= 1:
    hi -= 1
  return lo, hi


def _overlap(a: tuple[slice, slice], b: tuple[slice, slice]) -> bool:
  return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))


def _skewness(profile: np.ndarray) -> float:
  """Skewness of a 1D mass profile (position = index)."""
  pos = np.arange(len(profile), dtype=np.float64)
  total = profile.sum()
  mean = (profile * pos).sum() / total
  var = (profile * (pos - mean) ** 2).sum() / total
  return float((profile * (pos - mean) ** 3).sum() / total / max(var, 1e-9) ** 1.5)


def detect_objects(image, cfg: ParserConfig = ParserConfig()) -> list[Detection]:
  """Finds the objects of one image, largest first.

  Args:
    image: uint8 [H, W, 3] (or float in [0, 1]); H == W.
    cfg: parser thresholds.
  Returns:
    Detections sorted by decreasing area.
  """
  image = to_uint8_range(image)
  if image.ndim != 3 or image.shape[0] != image.shape[1]:
    raise UserError(f"expected one square RGB image [S, S, 3], got shape {image.shape}")
  size = image.shape[0]
  label, obj, coverage = _pixel_classes(image, cfg)
  min_area = cfg.min_area_fraction * _smallest_area(size)
  found = []
  for k, color in enumerate(shapes.COLORS):
    comps, _ = scipy.ndimage.label(obj & (label == k), _EIGHT)
    for idx, sl in enumerate(scipy.ndimage.find_objects(comps), 1):
      # A window 1 px larger than the component holds everything measured below.
      win = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
      mine = comps[win] == idx
      area = int(mine.sum())
      if area >= min_area:
        found.append((k, color, win, mine, area, sl))
  # Objects never overlap, so a much smaller blob inside another object's box is a blemish of
  # that object (a patch of off colour in a generated image), not an object of its own.
  found.sort(key=lambda f: -f[4])
  kept = []
  for f in found:
    inside = any(_overlap(f[5], g[5]) and f[4] < cfg.max_blemish_fraction * g[4] for g in kept)
    if not inside:
      kept.append(f)
  found = [f[:5] for f in kept]
  taken = np.zeros(obj.shape, bool)
  for _, _, win, mine, _ in found:
    taken[win] |= mine
  detections = []
  for k, color, win, mine, area in found:
    cov = coverage[win][..., k]
    # Coverage relative to the object's own interior level: a generated colour may be a bit
    # darker or brighter than the palette, which must not change the fill ratio.
    inner = scipy.ndimage.binary_erosion(mine, _EIGHT)
    level = max(float(np.median(cov[inner if inner.any() else mine])), 0.5)
    # Mass within 1 px of the component, of pixels of its colour that no other object owns:
    # the blurred rim is counted, a neighbour's rim is not.
    near = scipy.ndimage.binary_dilation(mine, _EIGHT) & (mine | ~taken[win]) & (label[win] == k)
    mass = np.where(near, np.minimum(cov / level, 1.0), 0.0)
    # Speckle inside an object is a hole in its component, not a notch in its shape.
    mass[scipy.ndimage.binary_fill_holes(mine) & ~mine] = 1.0
    # Fill ratio against the longest row and column of mass rather than the bbox, so that
    # a stray pixel at the edge does not change it: square 1, disc pi/4, triangle ~0.55.
    rows, cols = mass.sum(1), mass.sum(0)
    fill = float(mass.sum() / max(rows.max() * cols.max(), 1e-9))
    # A point-up triangle keeps most of its mass low (skewness -0.57 for the ideal shape; a
    # circle or square 0); moments do not depend on where the box edges are read.
    skew = _skewness(rows)
    x0, x1 = (v + win[1].start for v in _trimmed_extent(mine.sum(0)))
    y0, y1 = (v + win[0].start for v in _trimmed_extent(mine.sum(1)))
    side = max(x1 - x0, y1 - y0)
    if skew < cfg.triangle_max_skewness:
      shape = "triangle"
    elif fill >= (cfg.square_min_fill_tiny if side <= 6 else cfg.square_min_fill):
      shape = "square"
    else:
      shape = "circle"
    cx = (x0 + x1) / 2
    # A blurred apex can fall below the coverage threshold; the base is reliable, so a
    # triangle's box is measured up from its base.
    cy = y1 - side / 2 if shape == "triangle" else (y0 + y1) / 2
    detections.append(Detection(
        color=color, shape=shape, size=nearest_size(side, size),
        location=nearest_location((cx, cy), size), center=(cx, cy), bbox=(x0, y0, x1, y1),
        side=side, area=area, fill=fill, skewness=skew))
  detections.sort(key=lambda d: -d.area)
  return detections


def attributes_of(detections: Sequence[Detection]) -> dict[str, Any]:
  """Detections in `shapes.parse_caption`'s format (as a caption would state them).

  One object: size and location set, relation ''. Two: size/location None, relation
  `objects[0] REL objects[1]` with the objects ordered left-to-right / top-to-bottom (the
  relation is then 'left of' or 'above'). Zero or three and more: relation None.
  """
  dets = list(detections)
  if len(dets) == 1:
    (d,) = dets
    return {"objects": [dict(color=d.color, shape=d.shape, size=d.size, location=d.location)],
            "relation": ""}
  relation = None
  if len(dets) == 2:
    relation = dominant_relation(dets[0].center, dets[1].center)
    if relation in ("right of", "below"):
      dets, relation = dets[::-1], shapes.INVERSE_RELATION[relation]
  return {"objects": [dict(color=d.color, shape=d.shape, size=None, location=None)
                      for d in dets], "relation": relation}


def parse_image(image, cfg: ParserConfig = ParserConfig()) -> dict[str, Any]:
  """The attributes an image shows, in `shapes.parse_caption`'s format (see `attributes_of`).

  Args:
    image: uint8 [S, S, 3] (or float in [0, 1]).
    cfg: parser thresholds.
  """
  return attributes_of(detect_objects(image, cfg))


# --- Scoring against prompts ------------------------------------------------------------------

HELD_OUT_SPLITS = tuple(s for s in shapes.SPLITS if s != "train")


def held_out_split(name: str, what: str = "evaluation") -> str:
  """`name` if it is one whole held-out split (val, test, compositional), else a UserError.

  Evaluations and probes never read training images, not even a slice such as 'train[:5]'.
  """
  name = name.strip()
  if name.split("[")[0].strip() == "train":
    raise UserError(f"{what} never reads the training split: choose from "
                    f"{', '.join(HELD_OUT_SPLITS)}")
  if name not in HELD_OUT_SPLITS:
    raise UserError(f"unknown split {name!r} for {what} (choose one of "
                    f"{', '.join(HELD_OUT_SPLITS)})")
  return name


_ATTRS = ("color", "shape", "size", "location")


def score_image(detections: Sequence[Detection], target: dict[str, Any],
                image_size: int | None = None) -> dict[str, Any]:
  """Checks one image's detections against the attributes its prompt asks for.

  The prompt's objects are matched to detections (the assignment agreeing on most colours and
  shapes), so "a red circle left of a blue square" is met by either listing order.

  Args:
    detections: from `detect_objects`.
    target: `parse_caption`-format attributes of the prompt.
    image_size: side of the image the detections come from. Given, sizes, locations and the
      relation must also obey §6's geometry (`size_fits`, `location_fits`, `relation_fits`),
      and two objects must each be 12–22 px ('pair_size'); None: the nearest words only.
  Returns:
    dict: 'correct' (count, every attribute and the relation right), 'correct_lenient' (the
    same by the nearest words only), 'count' (bool), per-object lists 'color', 'shape', 'size',
    'location' (bool or None when the prompt does not state it), 'pair_size' (two-object
    prompts; else Nones), and 'relation' (bool, None for one-object prompts).
  """
  want = target["objects"]
  dets = list(detections)
  best, best_score = None, -1
  # Only the largest few can be meant (the count check already sees all of them); this bounds
  # the search on a noisy image with many blobs.
  candidates = range(min(len(dets), 8))
  for perm in itertools.permutations(candidates, min(len(want), len(candidates))):
    score = sum((dets[j].color == w["color"]) + (dets[j].shape == w["shape"])
                for w, j in zip(want, perm))
    if score > best_score:
      best, best_score = perm, score
  best = list(best or ())
  out: dict[str, Any] = {"count": len(dets) == len(want)}
  for key in _ATTRS:
    out[key] = [None if w.get(key) is None else
                (i < len(best) and getattr(dets[best[i]], key) == w[key])
                for i, w in enumerate(want)]
  out["pair_size"] = [None] * len(want)
  out["relation"] = None
  if len(want) == 2:
    out["relation"] = (len(best) == 2 and dominant_relation(
        dets[best[0]].center, dets[best[1]].center) == target["relation"])

  def correct(o):
    checks = [v for key in _ATTRS + ("pair_size",) for v in o[key] if v is not None]
    return bool(o["count"] and all(checks) and o["relation"] in (None, True))

  out["correct_lenient"] = correct(out)
  if image_size is not None:  # The words must also fit §6's rules.
    matched = [dets[best[i]] if i < len(best) else None for i in range(len(want))]
    for i, (w, d) in enumerate(zip(want, matched)):
      if out["size"][i]:
        out["size"][i] = size_fits(d.side, w["size"], image_size)
      if out["location"][i]:
        out["location"][i] = location_fits(d.center, w["location"], image_size)
      if len(want) == 2:
        out["pair_size"][i] = d is not None and size_fits(d.side, None, image_size)
    if out["relation"]:
      out["relation"] = relation_fits(matched[0].center, matched[1].center, target["relation"],
                                      image_size)
  out["correct"] = correct(out)
  return out


def as_attributes(prompt) -> dict[str, Any]:
  """A prompt given as a caption string or as `parse_caption`-format attributes."""
  if isinstance(prompt, str):
    attrs = shapes.parse_caption(prompt)
    if attrs is None:
      raise UserError(f"prompt {prompt!r} is not in the captioned-shapes grammar")
    return attrs
  return prompt


def t2i_accuracy(images, prompts, cfg: ParserConfig = ParserConfig()) -> dict[str, float]:
  """T2I attribute accuracy of generated images against their prompts.

  Args:
    images: uint8 [N, S, S, 3] (or a list of such images, or floats in [0, 1]).
    prompts: N prompts, each a caption string or `parse_caption`-format attributes.
    cfg: parser thresholds.
  Returns:
    Flat dict of floats: 'accuracy' (all attributes of every object and the relation right by
    §6's rules, and no extra object; `score_image` with the image size), 'accuracy_lenient' (the
    same by the nearest words alone), 'count', 'color', 'shape' (over prompted objects), 'size',
    'location' (over one-object prompts), 'pair_size', 'relation' (over two-object prompts),
    'accuracy_one' / 'accuracy_two' (accuracy by prompt kind; NaN if none), and 'num' (N).
  """
  if len(images) != len(prompts):
    raise UserError(f"{len(images)} images but {len(prompts)} prompts")
  if not len(prompts):
    raise UserError("t2i_accuracy needs at least one image")
  sums: dict[str, list] = {k: [] for k in ("count", "relation", "pair_size") + _ATTRS}
  correct, lenient = {1: [], 2: []}, []
  for image, prompt in zip(images, prompts):
    target = as_attributes(prompt)
    s = score_image(detect_objects(image, cfg), target, image_size=np.shape(image)[0])
    correct[len(target["objects"])].append(s["correct"])
    lenient.append(s["correct_lenient"])
    sums["count"].append(s["count"])
    if s["relation"] is not None:
      sums["relation"].append(s["relation"])
    for key in _ATTRS + ("pair_size",):
      sums[key].extend(v for v in s[key] if v is not None)

  def mean(values):
    return float(np.mean(values)) if values else float("nan")

  out = {k: mean(v) for k, v in sums.items()}
  out.update(accuracy=mean(correct[1] + correct[2]), accuracy_lenient=mean(lenient),
             accuracy_one=mean(correct[1]), accuracy_two=mean(correct[2]),
             num=float(len(prompts)))
  return out


# --- Ground truth and its validation ---------------------------------------------------------


def load_split(data_cfg, data_dir: str, split: str, n: int | None = None):
  """The first n examples of a built captioned_shapes split.

  Returns:
    (images uint8 [n, S, S, 3], attributes: list of `scene_attributes`, captions: list[str]).
  """
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  if data_cfg.name != builders.SHAPES_NAME:
    raise UserError(f"the shapes evaluator needs data.name={builders.SHAPES_NAME}, "
                    f"got {data_cfg.name!r}")
  source = builders.data_source(data_cfg, split, data_dir)
  n = len(source) if n is None else min(int(n), len(source))
  images, attrs, captions = [], [], []
  for i in range(n):
    ex = source[i]  # A damaged record is a UserError (builders.CheckedSource).
    images.append(np.asarray(ex["image"], np.uint8))
    attrs.append(shapes.scene_attributes(json.loads(examples.text(ex["objects"])),
                                         examples.text(ex["relation"])))
    captions.append(examples.text(ex["caption"]))
  size = data_cfg.image_size
  return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), attrs, captions


DEGRADATIONS = ("clean", "blur", "noise", "jpeg", "shift", "speckle", "all")


def degrade(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
  """A ground-truth image made to look generated (for measuring the parser's robustness).

  Args:
    image: uint8 [S, S, 3].
    kind: 'clean'; 'blur' (Gaussian, sigma 0.7 px); 'noise' (Gaussian, sigma 8/255);
      'jpeg' (real JPEG, quality 75, 4:2:0 chroma); 'shift' (per-channel gain 0.9-1.1 and
      offset +-12); 'speckle' (0.5 % of pixels set to random colours); 'all' (blur, shift,
      noise, speckle, then JPEG).
    rng: numpy generator (noise draws).
  Returns:
    uint8 [S, S, 3].
  """
  if kind not in DEGRADATIONS:
    raise UserError(f"unknown degradation {kind!r} (choose from {', '.join(DEGRADATIONS)})")
  x = image.astype(np.float32)
  if kind in ("blur", "all"):
    x = scipy.ndimage.gaussian_filter(x, sigma=(0.7, 0.7, 0.0), mode="constant")
  if kind in ("shift", "all"):
    x = x * rng.uniform(0.9, 1.1, 3) + rng.uniform(-12, 12, 3)
  if kind in ("noise", "all"):
    x = x + rng.normal(0.0, 8.0, x.shape)
  if kind in ("speckle", "all"):
    hit = rng.random(x.shape[:2]) < 0.005
    x[hit] = rng.uniform(0, 255, (int(hit.sum()), 3))
  x = np.clip(np.round(x), 0, 255).astype(np.uint8)
  if kind in ("jpeg", "all"):
    buf = io.BytesIO()
    PIL.Image.fromarray(x).save(buf, format="jpeg", quality=75)
    x = np.asarray(PIL.Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
  return x


def parser_accuracy(images, attrs, degradation: str = "clean", seed: int = 0,
                    cfg: ParserConfig = ParserConfig()) -> float:
  """Share of images whose parse equals their ground truth exactly (after `degrade`)."""
  rng = np.random.default_rng(seed)
  images = [degrade(np.asarray(im, np.uint8), degradation, rng) for im in images]
  return t2i_accuracy(images, attrs, cfg)["accuracy"]


def validate_parser(data_cfg, data_dir: str, split: str = "val", n: int | None = 1000,
                    degradation: str = "clean") -> float:
  """The parser's accuracy on ground-truth images of a built split (must be >= 0.99).

  Args:
    data_cfg: the `data` section of a config (captioned_shapes).
    data_dir: TFDS data dir holding the built dataset.
    split: split name.
    n: images to check (the first n; all when None).
    degradation: see `degrade` ('clean' for the rendered pixels as stored).
  Returns:
    Accuracy in [0, 1]: count, every attribute and the relation right.
  """
  images, attrs, _ = load_split(data_cfg, data_dir, split, n)
  if not len(images):
    raise UserError(f"split {split!r} is empty")
  return parser_accuracy(images, attrs, degradation)
