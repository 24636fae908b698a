"""I2T metrics: attribute accuracy, BLEU-4 and CIDEr-D against values worked out by hand."""
import math

import numpy as np
import pytest

from flowtok_jax.data import shapes
from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import caption_metrics as cm

LN2 = math.log(2.0)


# --- BLEU ---------------------------------------------------------------------------------------


def test_bleu_perfect_match_is_one():
  caps = ["a small red circle in the top left", "a blue square above a red circle"]
  assert cm.bleu(caps, caps) == pytest.approx(1.0)
  # Case, spacing and a trailing period do not matter (whitespace tokens, lower case).
  assert cm.bleu(["A  small red circle in the top left."], [caps[0]]) == pytest.approx(1.0)


def test_bleu_one_sentence_by_hand():
  # hyp: a red circle in the top left (7 tokens); ref adds "small" (8 tokens).
  # 1-grams 7/7; 2-grams 5/6 ("a red" misses); 3-grams 4/5; 4-grams 3/4.
  # Brevity: c = 7 < r = 8 -> exp(1 - 8/7). Product of precisions = 5/6 * 4/5 * 3/4 = 1/2.
  expected = math.exp(1 - 8 / 7) * 0.5 ** 0.25
  got = cm.bleu(["a red circle in the top left"], ["a small red circle in the top left"])
  assert got == pytest.approx(expected, rel=1e-12)


def test_bleu_is_corpus_level():
  # Pair 2 matches exactly: 7/7, 6/6, 5/5, 4/4. Counts add up before dividing:
  # p = 14/14, 11/12, 9/10, 7/8; c = 14, r = 15.
  hyps = ["a red circle in the top left", "a blue square above a red circle"]
  refs = ["a small red circle in the top left", "a blue square above a red circle"]
  expected = math.exp(1 - 15 / 14) * (11 / 12 * 9 / 10 * 7 / 8) ** 0.25
  assert cm.bleu(hyps, refs) == pytest.approx(expected, rel=1e-12)
  mean_of_sentences = (cm.bleu(hyps[:1], refs[:1]) + cm.bleu(hyps[1:], refs[1:])) / 2
  assert abs(cm.bleu(hyps, refs) - mean_of_sentences) > 1e-3


def test_bleu_clips_counts_and_picks_the_closest_reference():
  # "the" x4 against a reference holding it twice: p1 = 2/4; c = 4 < r = 6 -> exp(-0.5).
  got = cm.bleu(["the the the the"], ["the cat is on the mat"], max_n=1)
  assert got == pytest.approx(0.5 * math.exp(1 - 6 / 4), rel=1e-12)
  # References of 3 and 8 tokens for a 5-token hypothesis: the closest is 3 -> no penalty.
  got = cm.bleu(["a b c d e"], [["a b c", "a b c d e f g h"]], max_n=1)
  assert got == pytest.approx(1.0)
  # Equally close (4 and 6): the shorter counts, so c = 5 > r = 4 -> no penalty either.
  assert cm.bleu(["a b c d e"], [["a b c d", "a b c d e f"]], max_n=1) == pytest.approx(1.0)
  # No matching 4-gram anywhere -> 0 (no smoothing).
  assert cm.bleu(["a red circle"], ["a red square"]) == 0.0


def test_bleu_drops_as_words_go_wrong():
  ref = ["a large red circle in the top left corner of the image"]
  hyps = ["a large red circle in the top left corner of the image",
          "a large red circle in the top left corner of the picture",
          "a large red circle in the top left corner of a picture",
          "a large red circle in the top left corner on a picture"]
  scores = [cm.bleu([h], ref) for h in hyps]
  assert scores[0] == pytest.approx(1.0)
  assert all(a > b for a, b in zip(scores, scores[1:])), scores


# --- CIDEr-D ------------------------------------------------------------------------------------


def test_cider_d_by_hand():
  # Two images, references "a red circle" / "a blue square": N = 2, so an n-gram in one image's
  # references weighs ln 2 - ln 1 = ln 2, "a" (in both) weighs ln 2 - ln 2 = 0.
  refs = ["a red circle", "a blue square"]
  # Image 1, exact: cosine 1 for n = 1, 2, 3; no 4-grams (norm 0 -> 0). 10 * 3/4 = 7.5.
  # Image 2, "a blue circle": n=1 {blue, circle} vs {blue, square}: ln2^2 / (2 ln2^2) = 1/2;
  # n=2 {a blue, blue circle} vs {a blue, blue square}: 1/2; n=3: 0. 10 * 1/4 = 2.5.
  scores = cm.cider_d_scores(["a red circle", "a blue circle"], refs)
  assert scores == pytest.approx([7.5, 2.5], rel=1e-12)
  assert cm.cider_d(["a red circle", "a blue circle"], refs) == pytest.approx(5.0, rel=1e-12)


def test_cider_d_length_penalty_by_hand():
  refs = ["a red circle", "a blue square"]
  # "red circle" vs "a red circle": n=1 cosine 1 ("a" weighs 0); n=2 {red circle} vs
  # {a red, red circle}: ln2^2 / (ln2 * sqrt(2) ln2) = 1/sqrt(2); n=3,4: 0. Bigram lengths
  # 1 vs 2 -> exp(-1 / (2 * 6^2)).
  expected = 10 * (1 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
  scores = cm.cider_d_scores(["red circle", "a blue square"], refs)
  assert scores[0] == pytest.approx(expected, rel=1e-12)
  assert scores[1] == pytest.approx(7.5, rel=1e-12)


def test_cider_d_clips_repeated_words():
  # Repeating a correct word raises the hypothesis's weight but min(h, r) clips the gain.
  refs = ["a red circle left of a blue square", "a green triangle in the center"]
  plain = cm.cider_d_scores(["a red circle left of a blue square", "x"], refs)[0]
  gamed = cm.cider_d_scores(["a red red red circle left of a blue square", "x"], refs)[0]
  assert gamed < plain


def test_cider_d_averages_over_references():
  refs = [["a red circle", "a red circle"], ["a blue square"]]
  one = cm.cider_d_scores(["a red circle", "a blue square"], [["a red circle"], ["a blue square"]])
  two = cm.cider_d_scores(["a red circle", "a blue square"], refs)
  assert two == pytest.approx(one)


def test_metric_inputs_are_checked():
  with pytest.raises(UserError):
    cm.bleu(["a"], ["a", "b"])
  with pytest.raises(UserError):
    cm.cider_d(["a"], [[]])


# --- Attribute accuracy -------------------------------------------------------------------------


def _attrs(caption):
  return shapes.parse_caption(caption)


def test_exact_match_ignores_paraphrase_and_object_order():
  target = _attrs("a large red circle in the top left")
  for cap in ("a big red circle at the top left corner", "A large red circle is in the top left."):
    assert cm.compare_attributes(_attrs(cap), target)["exact"], cap
  target = _attrs("a red circle to the left of a blue square")
  for cap in ("a blue square is right of a red circle",
              "a red circle on the left of a blue square"):
    assert cm.compare_attributes(_attrs(cap), target)["exact"], cap


def test_caption_accuracy_per_attribute():
  targets = [_attrs("a large red circle in the top left"),
             _attrs("a red circle to the left of a blue square"),
             _attrs("a small green triangle in the center"),
             "a purple square below a cyan circle"]
  captions = ["a small red circle in the top left",        # size wrong.
              "a blue square left of a red circle",         # relation wrong (after alignment).
              "a small green triangle in the center",       # right.
              "purple squares everywhere"]                  # does not parse.
  m = cm.caption_accuracy(captions, targets)
  assert m["exact"] == pytest.approx(1 / 4)
  assert m["parse_rate"] == pytest.approx(3 / 4)
  assert m["count"] == pytest.approx(3 / 4)
  assert m["size"] == pytest.approx(1 / 2)         # Over the two one-object targets.
  assert m["location"] == pytest.approx(2 / 2)
  assert m["relation"] == pytest.approx(0 / 2)     # Over the two two-object targets.
  assert m["color"] == pytest.approx(4 / 6)        # Six target objects, the last two missed.
  assert m["shape"] == pytest.approx(4 / 6)
  assert m["exact_one"] == pytest.approx(1 / 2)    # By target kind: the third is right,
  assert m["exact_two"] == pytest.approx(0 / 2)    # both two-object captions wrong.
  assert m["num"] == 4
  assert np.isnan(cm.caption_accuracy(captions[:1], targets[:1])["exact_two"])


def test_wrong_count_is_not_exact():
  target = _attrs("a red circle above a blue square")
  agree = cm.compare_attributes(_attrs("a small blue square in the center"), target)
  assert not agree["exact"] and not agree["count"]
  assert agree["color"] == [False, True] and agree["shape"] == [False, True]
  assert agree["relation"] is False


def test_i2t_metrics_bundle():
  caps = ["a small red circle in the top left", "a blue square above a red circle"]
  m = cm.i2t_metrics(caps, caps, caps)
  assert m["exact"] == 1.0 and m["bleu4"] == pytest.approx(1.0)
  assert m["cider_d"] > 0


def test_i2t_references_include_the_caption_i2t_learns_to_write():
  """For 'right of' / 'below' scenes the reference caption (left / upper object first) is a
  correct caption, and must not be scored against the other order only."""
  from flowtok_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from flowtok_jax.evaluation import run_eval  # pylint: disable=g-import-not-at-top
  caption = "a red circle is to the right of a blue square"
  attrs = shapes.parse_caption(caption)
  refs = run_eval._references(caption, attrs)  # pylint: disable=protected-access
  assert refs[0] == caption and "a blue square to the left of a red circle" in refs
  assert len(refs) == len(set(refs)) == 3
