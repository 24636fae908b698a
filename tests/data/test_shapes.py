"""Captioned-shapes renderer and caption grammar: the rules of DESIGN.md §6, checked literally."""
import itertools

import numpy as np
import pytest

from flowtok_jax.data import shapes
from flowtok_jax.errors import UserError

# The palette as DESIGN.md writes it (not read from the module under test).
PALETTE = {"red": (220, 40, 40), "yellow": (230, 210, 40), "green": (40, 180, 60),
           "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (150, 60, 200)}
HELDOUT = {("purple", "triangle"), ("cyan", "circle"), ("yellow", "square")}


def _examples(split, num, size=64, seed=0, **kw):
  cfg = shapes.ShapesConfig(image_size=size, **kw)
  return [shapes.render_example(seed, split, i, cfg) for i in range(num)]


@pytest.mark.parametrize("size", [64, 32])
def test_pixels_are_exact_palette_and_fill_exactly_the_boxes(size):
  for ex in _examples("train", 150, size) + _examples("compositional", 50, size):
    image = ex["image"]
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    painted = image.any(-1)
    inside = np.zeros_like(painted)
    for o in ex["objects"]:
      x0, y0, x1, y1 = o["bbox"]
      assert (o["center"][0], o["center"][1]) == ((x0 + x1) / 2, (y0 + y1) / 2)
      cx, cy = int(o["center"][0]), int(o["center"][1])
      assert tuple(image[cy, cx]) == PALETTE[o["color"]], o
      box = image[y0:y1, x0:x1]
      on = box.any(-1)
      # Hard edges: every painted pixel of the box is exactly the object's colour.
      assert (box[on] == PALETTE[o["color"]]).all()
      # The painted pixels touch all four sides of the box (the bbox is tight).
      assert on[0].any() and on[-1].any() and on[:, 0].any() and on[:, -1].any()
      inside[y0:y1, x0:x1] = True
    assert not (painted & ~inside).any(), "paint outside every bbox"


def test_shape_masks_are_the_named_shapes():
  for n in (6, 7, 12, 15, 28):
    square, circle, tri = (shapes.shape_mask(s, n) for s in ("square", "circle", "triangle"))
    assert square.all()
    assert (circle == circle[::-1]).all() and (circle == circle.T).all()
    assert not circle[0, 0] and circle[n // 2].all()
    widths = tri.sum(1)
    assert (np.diff(widths) >= 0).all() and widths[-1] == n and widths[0] <= 2  # Point up.
    assert (tri == tri[:, ::-1]).all()  # Isosceles.
    assert 0.5 < tri.mean() < 0.7 < 0.75 < circle.mean() < 0.9  # Fill ratios stay apart.


@pytest.mark.parametrize("size", [64, 32])
def test_one_object_sizes_and_locations(size):
  k = size / 64  # Every length of the 64-px rules scales by k.
  exs = [e for e in _examples("train", 400, size, two_object_fraction=0.0)]
  seen = set()
  for ex in exs:
    (o,) = ex["objects"]
    x0, y0, x1, y1 = o["bbox"]
    n = x1 - x0
    assert n == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= size and y1 <= size
    lo, hi = (12, 16) if o["size"] == "small" else (24, 28)
    assert lo * k <= n <= hi * k, o
    dx, dy = o["center"][0] - size / 2, o["center"][1] - size / 2
    loc = o["location"]
    if loc == "center":
      assert abs(dx) <= 6 * k and abs(dy) <= 6 * k
    else:
      vert, horiz = loc.split()
      assert (dy < 0) == (vert == "top") and (dx < 0) == (horiz == "left")
      assert abs(dx) >= 12 * k and abs(dy) >= 12 * k
    assert ex["relation"] == ""
    seen.add((o["size"], loc))
  assert len(seen) == 10  # Every size at every location occurs.


@pytest.mark.parametrize("size", [64, 32])
def test_two_objects_relation_gap_and_sizes(size):
  k = size / 64
  rels = set()
  for ex in _examples("train", 300, size, two_object_fraction=1.0):
    a, b = ex["objects"]
    assert (a["color"], a["shape"]) != (b["color"], b["shape"])
    assert a["size"] is None and b["size"] is None
    for o in (a, b):
      n = o["bbox"][2] - o["bbox"][0]
      assert 12 * k <= n <= 22 * k
      assert 0 <= min(o["bbox"]) and max(o["bbox"]) <= size
    ab, bb = a["bbox"], b["bbox"]
    gap = 2 * k
    assert (ab[2] + gap <= bb[0] or bb[2] + gap <= ab[0]
            or ab[3] + gap <= bb[1] or bb[3] + gap <= ab[1]), (ab, bb)
    dx = b["center"][0] - a["center"][0]  # a REL b: 'left of' means a has the smaller x.
    dy = b["center"][1] - a["center"][1]
    main, other = {"left of": (dx, dy), "right of": (-dx, dy),
                   "above": (dy, dx), "below": (-dy, dx)}[ex["relation"]]
    assert main >= 8 * k and main > abs(other), ex
    rels.add(ex["relation"])
  assert rels == {"left of", "right of", "above", "below"}


def test_geometry_halves_at_32_px():
  g64, g32 = shapes.geometry(64), shapes.geometry(32)
  for field in ("small", "large", "pair"):
    assert tuple(v / 2 for v in getattr(g64, field)) == getattr(g32, field)
  for field in ("center_tol", "corner_min", "relation_margin", "gap", "size"):
    assert getattr(g64, field) / 2 == getattr(g32, field)


def test_heldout_pairs_never_in_train_val_test_and_always_in_compositional():
  for split, num in (("train", 3000), ("val", 300), ("test", 300)):
    for ex in _examples(split, num):
      pairs = {(o["color"], o["shape"]) for o in ex["objects"]}
      assert not pairs & HELDOUT, (split, ex["caption"])
  comp = _examples("compositional", 300)
  for ex in comp:
    assert {(o["color"], o["shape"]) for o in ex["objects"]} & HELDOUT, ex["caption"]
  assert {len(ex["objects"]) for ex in comp} == {1, 2}


def test_same_seed_same_bytes_other_seed_or_split_differs():
  cfg = shapes.ShapesConfig()
  a = [shapes.render_example(3, "train", i, cfg) for i in range(20)]
  b = [shapes.render_example(3, "train", i, cfg) for i in range(20)]
  for x, y in zip(a, b):
    assert x["image"].tobytes() == y["image"].tobytes() and x["caption"] == y["caption"]
    assert x["objects"] == y["objects"]
  c = [shapes.render_example(4, "train", i, cfg) for i in range(20)]
  d = [shapes.render_example(3, "val", i, cfg) for i in range(20)]
  for other in (c, d):
    assert sum(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(a, other)) >= 18


def test_paraphrase_knob_and_two_object_fraction():
  plain = _examples("train", 200, paraphrase_prob=0.0)
  assert all(shapes.canonical_caption(shapes.parse_caption(e["caption"])) == e["caption"]
             for e in plain)
  para = _examples("train", 200, paraphrase_prob=0.3)
  changed = sum(shapes.canonical_caption(shapes.parse_caption(e["caption"])) != e["caption"]
                for e in para)
  assert 30 < changed < 170
  # The paraphrase rate never moves the scenes themselves.
  assert all(p["image"].tobytes() == q["image"].tobytes() for p, q in zip(plain, para))
  frac = np.mean([len(e["objects"]) == 2 for e in plain])
  assert 0.4 < frac < 0.6


def test_generated_captions_parse_back_to_ground_truth():
  for ex in _examples("train", 300) + _examples("compositional", 100):
    assert shapes.parse_caption(ex["caption"]) == shapes.scene_attributes(ex["objects"],
                                                                          ex["relation"])


def test_reference_caption_is_a_function_of_the_pixels():
  """Every caption a scene can get (any paraphrase, either object first) has one reference
  caption: canonical words, and 'left of' / 'above' with the left or upper object first."""
  inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
  seen_two = 0
  for ex in _examples("train", 200, paraphrase_prob=1.0):
    ref = shapes.reference_caption(ex["objects"], ex["relation"])
    attrs = shapes.parse_caption(ref)
    assert ref == shapes.canonical_caption(attrs)
    truth = shapes.scene_attributes(ex["objects"], ex["relation"])
    if not ex["relation"]:
      assert attrs == truth
      continue
    seen_two += 1
    assert attrs["relation"] in ("left of", "above")
    swapped = ex["objects"][::-1], inverse[ex["relation"]]
    assert shapes.reference_caption(*swapped) == ref  # The other description of the scene.
    want = truth if ex["relation"] in ("left of", "above") else shapes.scene_attributes(*swapped)
    assert attrs == want
    # The first object really is the left (upper) one on the relation's axis.
    axis = 0 if attrs["relation"] == "left of" else 1
    first = next(o for o in ex["objects"] if (o["color"], o["shape"]) == (
        attrs["objects"][0]["color"], attrs["objects"][0]["shape"]))
    other = next(o for o in ex["objects"] if o is not first)
    assert first["center"][axis] < other["center"][axis]
  assert seen_two > 50


def _all_one_object_captions():
  for size, color, shape, is_, prep in itertools.product(
      ("small", "little", "large", "big"), PALETTE, ("circle", "square", "triangle"),
      ("", "is "), ("in the", "at the")):
    places = [("center", "center")] + [
        (c + suffix, c) for c in ("top left", "top right", "bottom left", "bottom right")
        for suffix in ("", " corner")]
    for text, canon in places:
      yield (f"a {size} {color} {shape} {is_}{prep} {text}",
             {"objects": [{"color": color, "shape": shape,
                           "size": "small" if size in ("small", "little") else "large",
                           "location": canon}], "relation": ""})


_REL = {"to the left of": "left of", "left of": "left of", "on the left of": "left of",
        "to the right of": "right of", "right of": "right of", "on the right of": "right of",
        "above": "above", "over": "above", "below": "below", "under": "below",
        "beneath": "below"}


def _all_two_object_captions():
  for c0, s0, is_, rel, c1, s1 in itertools.product(
      PALETTE, ("circle", "square", "triangle"), ("", "is "), _REL, PALETTE,
      ("circle", "square", "triangle")):
    yield (f"a {c0} {s0} {is_}{rel} a {c1} {s1}",
           {"objects": [{"color": c0, "shape": s0, "size": None, "location": None},
                        {"color": c1, "shape": s1, "size": None, "location": None}],
            "relation": _REL[rel]})


def test_parse_caption_accepts_every_paraphrase_and_round_trips():
  count = 0
  for text, attrs in itertools.chain(_all_one_object_captions(), _all_two_object_captions()):
    assert shapes.parse_caption(text) == attrs, text
    canon = shapes.canonical_caption(attrs)
    assert shapes.parse_caption(canon) == attrs
    count += 1
  assert count == 4 * 6 * 3 * 2 * 2 * 9 + 6 * 3 * 2 * 11 * 6 * 3
  assert shapes.canonical_caption(shapes.parse_caption("A BIG Red circle AT the top left corner."))\
      == "a large red circle in the top left"
  assert shapes.parse_caption("  a red   circle is OVER\ta blue square . ")["relation"] == "above"


@pytest.mark.parametrize("text", [
    "", "a red circle", "a medium red circle in the center", "a small red circle in the middle",
    "a small red circle in the center corner", "a small red hexagon in the top left",
    "a small pink circle in the top left", "an small red circle in the top left",
    "a small red circle in top left", "a small red circle on the top left",
    "a small red circle in the top left..", "a red circle is is above a blue square",
    "a red circle left to a blue square", "a red circle above blue square",
    "a red circle above a blue square and a green circle", "a small red circle above a blue square",
    "a red circle in the top left", "the red circle above a blue square",
    "a small red circle in the top left corner corner"])
def test_parse_caption_rejects_junk(text):
  assert shapes.parse_caption(text) is None


def test_bad_knobs_are_user_errors():
  with pytest.raises(UserError, match="multiple of 32"):
    shapes.ShapesConfig(image_size=48)
  with pytest.raises(UserError, match="pink circle"):
    shapes.ShapesConfig(heldout=("pink circle",))
  with pytest.raises(UserError, match="split"):
    shapes.render_example(0, "training", 0, shapes.ShapesConfig())


def test_val_and_test_never_repeat_a_training_image():
  """One-object scenes collide with train often (~6 % of val/test at 64 px, ~25 % at 32 px);
  such a scene is drawn again, so evaluation never scores a training image."""
  for res in (64, 32):
    cfg = shapes.ShapesConfig(image_size=res, num_train=2000)
    train = {shapes.render_example(0, "train", i, cfg)["image"].tobytes() for i in range(2000)}
    before = shapes.ShapesConfig(image_size=res)  # No check: the collisions are real.
    assert any(shapes.render_example(0, "val", i, before)["image"].tobytes() in train
               for i in range(300))
    for split in ("val", "test"):
      for i in range(300):
        ex = shapes.render_example(0, split, i, cfg)
        assert ex["image"].tobytes() not in train, (res, split, i)
        np.testing.assert_array_equal(ex["image"], shapes.render_example(0, split, i, cfg)["image"])
