r"""The captioned-shapes world: a deterministic renderer and its caption grammar (DESIGN.md §6).

Every example is a pure function of `(seed, split, index)`, so anyone can regenerate the data and
check generated pixels against it. Images are S×S RGB (S = 64 by default; geometry is written for
64 px and scales by S / 64, so at 32 px every length halves), black background, one or two filled
objects with hard edges: every object pixel is exactly its palette colour.

Objects: a colour from `PALETTE`, a shape from `SHAPES` and a square bounding box of side n.
`circle` fills the inscribed disc, `square` the whole box, `triangle` is isosceles, point up: apex
at the top centre, base = the bottom edge of the box. A pixel belongs to a shape when its centre
lies inside (for the triangle, inside the widest extent of its row), so every mask touches all four
sides of its box and the bbox of the painted pixels is the object's bbox.

One-object scenes (size small: n in 12..16, large: n in 24..28): the centre lies within 6 px of
the image centre on both axes (`center`), or in a quadrant at least 12 px from the centre lines on
both axes (`top left` ...). Two-object scenes: n in 12..22 each, two different (colour, shape)
pairs, boxes at least 2 px apart, and `objects[0] REL objects[1]` holds between the centres by at
least 8 px on the relation's axis, which is also the larger of the two centre offsets. Image y
grows downwards: `above` means a smaller y.

Caption grammar (lower case; `parse_caption` also accepts any case, extra whitespace and one
trailing period). Brackets are optional parts; the first alternative is the canonical one:

    caption  := one | two
    one      := "a" SIZE COLOR SHAPE ["is"] PREP "the" PLACE
    two      := "a" COLOR SHAPE ["is"] REL "a" COLOR SHAPE
    SIZE     := "small" | "little"                          -> small
              | "large" | "big"                             -> large
    COLOR    := "red" | "yellow" | "green" | "cyan" | "blue" | "purple"
    SHAPE    := "circle" | "square" | "triangle"
    PREP     := "in" | "at"
    PLACE    := "center" | CORNER ["corner"]
    CORNER   := "top left" | "top right" | "bottom left" | "bottom right"
    REL      := "to the left of" | "left of" | "on the left of"      -> left of
              | "to the right of" | "right of" | "on the right of"   -> right of
              | "above" | "over"                                     -> above
              | "below" | "under" | "beneath"                        -> below

Canonical captions: "a small red circle in the top left", "a red circle to the left of a blue
square". Each optional slot takes a non-canonical form with probability `paraphrase_prob`.

Splits `train`, `val`, `test` never show a held-out (colour, shape) pair; every `compositional`
scene shows at least one.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any

import numpy as np

from flowtok_jax.errors import UserError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 210, 40),
    "green": (40, 180, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 220),
    "purple": (150, 60, 200),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
LOCATIONS = CORNERS + ("center",)
RELATIONS = ("left of", "right of", "above", "below")
# "A left of B" says what "B right of A" says.
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below",
                    "below": "above"}
SPLITS = ("train", "val", "test", "compositional")
DEFAULT_HELDOUT = ("purple triangle", "cyan circle", "yellow square")

# Surface forms; the first of each tuple is canonical.
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
PREPOSITIONS = ("in the", "at the")

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
  """What a rendered example depends on besides (seed, split, index).

  Attributes:
    image_size: S, pixels per side; a multiple of 32 (all lengths stay integers).
    two_object_fraction: probability that a scene has two objects.
    paraphrase_prob: probability that each optional caption slot takes a non-canonical form.
    heldout: (colour, shape) pairs as "colour shape" strings, kept out of train/val/test.
    num_train: the size of the train split. A val or test scene that would render exactly like
      one of these train scenes is drawn again (the next attempt of its own seed), so evaluation
      never scores a training image (one-object scenes collide often: ~6 % at 64 px, ~25 % at
      32 px). 0: no check.
  """
  image_size: int = 64
  two_object_fraction: float = 0.5
  paraphrase_prob: float = 0.3
  heldout: tuple[str, ...] = DEFAULT_HELDOUT
  num_train: int = 0

  def __post_init__(self):
    if self.image_size < 32 or self.image_size % 32:
      raise UserError(f"captioned_shapes image_size must be a multiple of 32, got "
                      f"{self.image_size}")
    for name in ("two_object_fraction", "paraphrase_prob"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise UserError(f"captioned_shapes {name} must be in [0, 1], got {value}")
    object.__setattr__(self, "heldout", tuple(self.heldout))
    pairs = heldout_pairs(self)
    if len(pairs) > len(COLORS) * len(SHAPES) - 2:
      raise UserError("captioned_shapes: too many held-out pairs, train needs at least two")


def _parse_pair(text: str) -> tuple[str, str]:
  parts = text.split()
  if len(parts) != 2 or parts[0] not in PALETTE or parts[1] not in SHAPES:
    raise UserError(f"held-out pair {text!r} must be 'colour shape' with colour in "
                    f"{'/'.join(COLORS)} and shape in {'/'.join(SHAPES)}")
  return parts[0], parts[1]


def heldout_pairs(cfg: ShapesConfig) -> frozenset[tuple[str, str]]:
  """The held-out (colour, shape) pairs of `cfg`."""
  return frozenset(_parse_pair(p) for p in cfg.heldout)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Lengths at image size S (given at 64 px, scaled by S / 64)."""
  size: int
  small: tuple[int, int]
  large: tuple[int, int]
  pair: tuple[int, int]
  center_tol: int
  corner_min: int
  relation_margin: int
  gap: int

  @property
  def mid(self) -> float:
    return self.size / 2


def geometry(image_size: int) -> Geometry:
  """The scene rules at `image_size` px (every 64-px length times image_size / 64)."""
  f = image_size / 64
  s = lambda v: int(round(v * f))  # pylint: disable=unnecessary-lambda-assignment
  return Geometry(size=image_size, small=(s(12), s(16)), large=(s(24), s(28)),
                  pair=(s(12), s(22)), center_tol=s(6), corner_min=s(12),
                  relation_margin=s(8), gap=s(2))


def corner_of(dx: float, dy: float) -> str:
  """The corner word of the quadrant of a centre offset (dx, dy) from the middle (y down)."""
  return ("top " if dy < 0 else "bottom ") + ("left" if dx < 0 else "right")


def location_of(center, image_size: int) -> str | None:
  """The location word of a one-object centre `(x, y)`, or None if it fits none."""
  g = geometry(image_size)
  dx, dy = center[0] - g.mid, center[1] - g.mid
  if abs(dx) <= g.center_tol and abs(dy) <= g.center_tol:
    return "center"
  if min(abs(dx), abs(dy)) >= g.corner_min:
    return corner_of(dx, dy)
  return None


def relation_of(center0, center1, image_size: int) -> str | None:
  """The canonical relation `object0 REL object1` from two centres, or None if ambiguous."""
  g = geometry(image_size)
  dx, dy = center1[0] - center0[0], center1[1] - center0[1]
  if abs(dx) > abs(dy) and abs(dx) >= g.relation_margin:
    return "left of" if dx > 0 else "right of"
  if abs(dy) > abs(dx) and abs(dy) >= g.relation_margin:
    return "above" if dy > 0 else "below"
  return None


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, n: int) -> np.ndarray:
  """Pixels of `shape` in an n×n box, by pixel centre. Returns bool [n, n] (row = y)."""
  c = np.arange(n) + 0.5 - n / 2  # Pixel centres relative to the box centre.
  x, y = c[None, :], c[:, None]
  if shape == "square":
    mask = np.ones((n, n), bool)
  elif shape == "circle":
    mask = x ** 2 + y ** 2 <= (n / 2) ** 2
  elif shape == "triangle":
    # Half-width at the bottom edge of each row: row 0 keeps its centre pixel(s), so the mask
    # reaches the top of the box; the last row spans the full base.
    rows = np.arange(n)[:, None]
    mask = np.abs(x) <= (rows + 1) / 2
  else:
    raise ValueError(f"unknown shape {shape!r}")
  mask.setflags(write=False)
  return mask


def _uniform_int(rng: np.random.Generator, lo: float, hi: float) -> int:
  """An integer uniformly in [ceil(lo), floor(hi)]."""
  lo, hi = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
  if hi < lo:
    raise AssertionError(f"empty range [{lo}, {hi}]")
  return int(rng.integers(lo, hi + 1))


def _box(x0: int, y0: int, n: int) -> list[int]:
  return [int(x0), int(y0), int(x0 + n), int(y0 + n)]


def _center(box) -> list[float]:
  return [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]


def _place_one(rng, g: Geometry, location: str, n: int) -> list[int]:
  """A box of side n whose centre satisfies `location`."""
  def axis(side: str) -> int:  # side: 'low', 'high' or 'mid'.
    if side == "mid":
      return _uniform_int(rng, g.mid - g.center_tol - n / 2, g.mid + g.center_tol - n / 2)
    if side == "low":
      return _uniform_int(rng, 0, g.mid - g.corner_min - n / 2)
    return _uniform_int(rng, g.mid + g.corner_min - n / 2, g.size - n)
  if location == "center":
    x_side = y_side = "mid"
  else:
    vert, horiz = location.split()
    y_side = "low" if vert == "top" else "high"
    x_side = "low" if horiz == "left" else "high"
  x0 = axis(x_side)
  y0 = axis(y_side)
  return _box(x0, y0, n)


def _place_two(rng, g: Geometry, relation: str, n0: int, n1: int) -> tuple[list[int], list[int]]:
  """Two boxes, at least `gap` apart, with `box0 relation box1` between their centres."""
  while True:  # Rejection sampling, 64 candidates per draw; a draw succeeds with ~99% chance.
    x0 = rng.integers(0, g.size - n0 + 1, 64)
    y0 = rng.integers(0, g.size - n0 + 1, 64)
    x1 = rng.integers(0, g.size - n1 + 1, 64)
    y1 = rng.integers(0, g.size - n1 + 1, 64)
    dx = (x1 + n1 / 2) - (x0 + n0 / 2)
    dy = (y1 + n1 / 2) - (y0 + n0 / 2)
    main, other = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    if relation in ("right of", "below"):
      main = -main
    apart = ((x0 + n0 + g.gap <= x1) | (x1 + n1 + g.gap <= x0)
             | (y0 + n0 + g.gap <= y1) | (y1 + n1 + g.gap <= y0))
    ok = (main >= g.relation_margin) & (main > np.abs(other)) & apart
    if ok.any():
      i = int(np.argmax(ok))
      return _box(x0[i], y0[i], n0), _box(x1[i], y1[i], n1)


def _pick_pairs(rng, cfg: ShapesConfig, split: str, count: int) -> list[tuple[str, str]]:
  every = [(c, s) for c in COLORS for s in SHAPES]
  held = heldout_pairs(cfg)
  if split == "compositional":
    held_list = [p for p in every if p in held]
    if not held_list:
      raise UserError("the compositional split needs at least one held-out pair")
    first = held_list[int(rng.integers(len(held_list)))]
    if count == 1:
      return [first]
    others = [p for p in every if p != first]
    second = others[int(rng.integers(len(others)))]
    return [first, second] if rng.random() < 0.5 else [second, first]
  allowed = [p for p in every if p not in held]
  idx = rng.choice(len(allowed), size=count, replace=False)
  return [allowed[int(i)] for i in idx]


def _variant(rng, options: tuple[str, ...], p: float) -> str:
  """The canonical option, or with probability p a uniformly chosen non-canonical one."""
  u, k = rng.random(), int(rng.integers(1 << 30))  # Always two draws: p does not shift the stream.
  if len(options) == 1 or u >= p:
    return options[0]
  return options[1 + k % (len(options) - 1)]


def random_caption(rng, objects: list[dict], relation: str, p: float) -> str:
  """A caption of the scene `objects[0] relation objects[1]` (or of one object) as the dataset
  draws it: each optional slot non-canonical with probability p."""
  is_word = _variant(rng, ("", "is "), p)
  if relation:
    a, b = objects
    rel = _variant(rng, RELATION_PHRASES[relation], p)
    return f"a {a['color']} {a['shape']} {is_word}{rel} a {b['color']} {b['shape']}"
  (o,) = objects
  size = _variant(rng, SIZE_WORDS[o["size"]], p)
  prep = _variant(rng, PREPOSITIONS, p)
  corner = _variant(rng, ("", " corner"), p) if o["location"] != "center" else ""
  return f"a {size} {o['color']} {o['shape']} {is_word}{prep} {o['location']}{corner}"


def render_objects(objects: list[dict], image_size: int) -> np.ndarray:
  """Paints objects (dicts with color, shape, bbox) on black. Returns uint8 [S, S, 3]."""
  image = np.zeros((image_size, image_size, 3), np.uint8)
  for o in objects:
    x0, y0, x1, y1 = o["bbox"]
    mask = shape_mask(o["shape"], x1 - x0)
    image[y0:y1, x0:x1][mask] = PALETTE[o["color"]]
  return image


def render_example(seed: int, split: str, index: int, cfg: ShapesConfig) -> dict[str, Any]:
  """Renders example `index` of `split`; a pure function of its arguments.

  Args:
    seed: dataset seed.
    split: one of SPLITS.
    index: example number within the split (>= 0).
    cfg: resolution, scene mix, paraphrase rate, held-out pairs, train size.
  Returns:
    dict(image=uint8 [S, S, 3], caption=str, objects=list of {color, shape, size, location,
    center [x, y], bbox [x0, y0, x1, y1]}, relation=str). For two objects size and location are
    None; relation is '' for one object, else canonical with `objects[0] REL objects[1]`.
  """
  if split not in _SPLIT_IDS:
    raise UserError(f"unknown captioned_shapes split {split!r} (splits: {', '.join(SPLITS)})")
  taken = _train_scenes(int(seed), cfg) if split in ("val", "test") and cfg.num_train else ()
  attempt = 0
  objects, relation, rng = _sample_scene(seed, split, index, cfg, attempt)
  while _scene_key(objects) in taken:
    attempt += 1
    objects, relation, rng = _sample_scene(seed, split, index, cfg, attempt)
  caption = random_caption(rng, objects, relation, cfg.paraphrase_prob)
  return dict(image=render_objects(objects, cfg.image_size), caption=caption, objects=objects,
              relation=relation)


def _sample_scene(seed: int, split: str, index: int, cfg: ShapesConfig, attempt: int):
  """(objects, relation, rng left where the caption draws from) of one scene attempt."""
  key = [int(seed), _SPLIT_IDS[split], int(index)] + ([attempt] if attempt else [])
  rng = np.random.default_rng(key)
  g = geometry(cfg.image_size)
  two = rng.random() < cfg.two_object_fraction
  pairs = _pick_pairs(rng, cfg, split, 2 if two else 1)
  if two:
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    n0, n1 = (int(rng.integers(g.pair[0], g.pair[1] + 1)) for _ in range(2))
    boxes = _place_two(rng, g, relation, n0, n1)
    sizes, locations = [None, None], [None, None]
  else:
    relation = ""
    size = SIZES[int(rng.integers(2))]
    lo, hi = g.small if size == "small" else g.large
    location = LOCATIONS[int(rng.integers(len(LOCATIONS)))]
    boxes = [_place_one(rng, g, location, int(rng.integers(lo, hi + 1)))]
    sizes, locations = [size], [location]
  objects = [dict(color=c, shape=s, size=sz, location=loc, center=_center(b), bbox=b)
             for (c, s), sz, loc, b in zip(pairs, sizes, locations, boxes)]
  return objects, relation, rng


def _scene_key(objects: list[dict]) -> tuple:
  """What the pixels of a scene depend on (objects never overlap, so not their order)."""
  return tuple(sorted((o["color"], o["shape"], tuple(o["bbox"])) for o in objects))


@functools.lru_cache(maxsize=4)
def _train_scenes(seed: int, cfg: ShapesConfig) -> frozenset:
  """Keys of the first `cfg.num_train` train scenes (sampled, not rendered: ~1 s for 20k)."""
  return frozenset(_scene_key(_sample_scene(seed, "train", i, cfg, 0)[0])
                   for i in range(cfg.num_train))


def objects_json(objects: list[dict]) -> str:
  """The stored form of `objects` (compact JSON, fixed key order)."""
  return json.dumps(objects, separators=(",", ":"))


def scene_attributes(objects: list[dict], relation: str) -> dict[str, Any]:
  """Ground truth reduced to what a caption says, in `parse_caption`'s format."""
  return {"objects": [{k: o.get(k) for k in ("color", "shape", "size", "location")}
                      for o in objects],
          "relation": relation}


# --- Parsing ---------------------------------------------------------------------------------

def _alt(words) -> str:
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOR = f"({_alt(COLORS)})"
_SHAPE = f"({_alt(SHAPES)})"
_SIZE_OF = {w: size for size, words in SIZE_WORDS.items() for w in words}
_REL_OF = {w: rel for rel, words in RELATION_PHRASES.items() for w in words}
_ONE_RE = re.compile(
    rf"a ({_alt(_SIZE_OF)}) {_COLOR} {_SHAPE} (?:is )?(?:in|at) the "
    rf"(?:(center)|({_alt(CORNERS)})(?: corner)?)")
_TWO_RE = re.compile(rf"a {_COLOR} {_SHAPE} (?:is )?({_alt(_REL_OF)}) a {_COLOR} {_SHAPE}")


def normalize_caption(text: str) -> str:
  """Lower case, single spaces, no trailing period."""
  text = " ".join(text.lower().split())
  if text.endswith("."):
    text = text[:-1].rstrip()
  return text


def parse_caption(text: str) -> dict[str, Any] | None:
  """Reads a caption back into canonical attributes; the inverse of the grammar.

  Args:
    text: a caption, any case and spacing, optionally ending in a period.
  Returns:
    {'objects': [{'color', 'shape', 'size', 'location'}], 'relation': str} with canonical values
    (size/location None for two-object captions, relation '' for one object), or None if `text`
    is not in the grammar.
  """
  text = normalize_caption(text)
  m = _ONE_RE.fullmatch(text)
  if m:
    size, color, shape, center, corner = m.groups()
    return {"objects": [{"color": color, "shape": shape, "size": _SIZE_OF[size],
                         "location": center or corner}], "relation": ""}
  m = _TWO_RE.fullmatch(text)
  if m:
    c0, s0, rel, c1, s1 = m.groups()
    return {"objects": [{"color": c0, "shape": s0, "size": None, "location": None},
                        {"color": c1, "shape": s1, "size": None, "location": None}],
            "relation": _REL_OF[rel]}
  return None


def reference_caption(objects: list[dict], relation: str) -> str:
  """The one caption a scene's pixels determine: canonical wording and, for two objects, the
  left (or upper) object first, so the relation is always 'left of' or 'above'.

  A scene's training caption is one of many (paraphrases, either object first); this one is a
  function of the image alone, which is what an image-to-text model can learn to write.
  """
  objects = [{k: o.get(k) for k in ("color", "shape", "size", "location")} for o in objects]
  if relation in ("right of", "below"):
    objects, relation = objects[::-1], INVERSE_RELATION[relation]
  return canonical_caption({"objects": objects, "relation": relation})


def canonical_caption(attrs: dict[str, Any]) -> str:
  """The canonical caption of `parse_caption`-style attributes (or `scene_attributes`)."""
  objects, relation = attrs["objects"], attrs.get("relation", "")
  if relation:
    a, b = objects
    return (f"a {a['color']} {a['shape']} {RELATION_PHRASES[relation][0]} "
            f"a {b['color']} {b['shape']}")
  (o,) = objects
  return f"a {o['size']} {o['color']} {o['shape']} in the {o['location']}"
