"""TextTokenizer: training, fixed-length encoding with EOS, decoding, save/load, errors."""
import itertools
import pickle

import ml_collections
import numpy as np
import pytest

from flowtok_jax.data import text_tokenizer as tt
from flowtok_jax.errors import UserError

_COLORS = ("red", "yellow", "green", "cyan", "blue", "purple")
_SHAPES = ("circle", "square", "triangle")


def _shapes_captions():
  """Captions covering the captioned-shapes grammar (DESIGN.md §6), paraphrases included."""
  caps = []
  for i, (color, shape) in enumerate(itertools.product(_COLORS, _SHAPES)):
    for j, (size, where) in enumerate(itertools.product(
        ("small", "little", "large", "big"),
        ("in the top left", "at the top right corner", "in the bottom left",
         "is at the bottom right corner", "in the center", "is in the center"))):
      caps.append(f"a {size} {color} {shape} {where}")
    other_color, other_shape = _COLORS[(i + 1) % 6], _SHAPES[(i + 2) % 3]
    for rel in ("to the left of", "left of", "on the left of", "to the right of", "right of",
                "on the right of", "above", "over", "below", "under", "beneath", "is above"):
      caps.append(f"a {color} {shape} {rel} a {other_color} {other_shape}")
  return caps


@pytest.fixture(scope="module")
def captions():
  return _shapes_captions()


@pytest.fixture(scope="module")
def tok(captions):
  # BPE at 128 learns every grammar word as one piece (unigram stalls near 54 pieces here).
  return tt.TextTokenizer.train(captions, vocab_size=128, model_type="bpe")


def test_special_ids_and_vocab(tok):
  assert tok.vocab_size == 128
  sp = tok._sp  # pylint: disable=protected-access
  assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)


def test_round_trip_shapes_captions(tok, captions):
  # The demo's L = 16 holds every caption of the grammar without truncation.
  ids, truncated = tok.encode(captions, max_len=16)
  assert ids.dtype == np.int32 and ids.shape == (len(captions), 16)
  assert not truncated.any()
  assert tok.decode(ids) == captions
  assert tok.decode(ids[5]) == captions[5]  # [L] -> str
  assert not (ids == tt.UNK_ID).any()


def test_round_trip_unigram(captions):
  tok = tt.TextTokenizer.train(captions, vocab_size=64, model_type="unigram")
  ids, truncated = tok.encode(captions, max_len=48)
  assert not truncated.any()
  assert tok.decode(ids) == captions


def test_eos_then_padding(tok):
  text = "a red circle in the center"
  ids, truncated = tok.encode([text], max_len=24)
  row = ids[0].tolist()
  n = row.index(tt.EOS_ID)
  assert n >= 5 and not truncated[0]
  assert all(t not in (tt.PAD_ID, tt.EOS_ID, tt.BOS_ID) for t in row[:n])
  assert row[n + 1:] == [tt.PAD_ID] * (24 - n - 1)
  # A single string is a batch of one.
  np.testing.assert_array_equal(tok.encode(text, max_len=24)[0], ids)


def test_truncation_keeps_eos_last_and_flags(tok):
  long_text = "a small red circle to the left of a big blue square in the top left corner"
  short_text = "a red circle"
  full, _ = tok.encode([long_text], max_len=64)
  n = full[0].tolist().index(tt.EOS_ID)
  ids, truncated = tok.encode([long_text, short_text], max_len=6)
  assert n > 6
  assert truncated.tolist() == [True, False]
  assert ids[0, -1] == tt.EOS_ID
  np.testing.assert_array_equal(ids[0, :5], full[0, :5])  # the first L-1 pieces survive
  assert tt.EOS_ID in ids[1].tolist()
  # Exactly L-1 pieces fit: not truncated.
  exact, flag = tok.encode([long_text], max_len=n + 1)
  assert not flag[0] and exact[0, -1] == tt.EOS_ID


def test_decode_stops_at_eos_and_drops_pad_bos_out_of_vocab(tok):
  ids, _ = tok.encode(["a blue square above a red circle"], max_len=16)
  row = ids[0].tolist()
  n = row.index(tt.EOS_ID)
  noisy = [tt.BOS_ID] + row[:2] + [tt.PAD_ID, tok.vocab_size + 5] + row[2:n] + [tt.EOS_ID, 7, 8]
  assert tok.decode(np.array(noisy)) == "a blue square above a red circle"


def test_case_folding(tok):
  a, _ = tok.encode(["A Red CIRCLE in the Center"], max_len=16)
  b, _ = tok.encode(["a red circle in the center"], max_len=16)
  np.testing.assert_array_equal(a, b)


def test_save_load_and_pickle_identical(tok, captions, tmp_path):
  path = str(tmp_path / "sub" / "text.model")
  tok.save(path)
  loaded = tt.TextTokenizer.load(path)
  np.testing.assert_array_equal(loaded.encode(captions, 16)[0], tok.encode(captions, 16)[0])
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode(captions, 16)[0], tok.encode(captions, 16)[0])
  assert tt.TextTokenizer.from_bytes(tok.to_bytes()).vocab_size == tok.vocab_size


def test_missing_or_corrupt_model_is_user_error(tmp_path):
  with pytest.raises(UserError, match="not found"):
    tt.TextTokenizer.load(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"\x00 this is not a sentencepiece model \xff" * 10)
  with pytest.raises(UserError, match="corrupt"):
    tt.TextTokenizer.load(str(bad))


def test_train_from_config_and_bad_settings(captions):
  cfg = ml_collections.ConfigDict(dict(vocab_size=48, model_type="bpe", num_captions=100,
                                       lowercase=True))
  tok = tt.train_from_config(cfg, (c.encode() for c in captions))  # bytes, as TFDS gives them
  assert 10 < tok.vocab_size <= 48
  with pytest.raises(UserError, match="model_type"):
    tt.TextTokenizer.train(captions, 64, model_type="wordpiece")
  with pytest.raises(UserError, match="no non-empty"):
    tt.TextTokenizer.train(["", "  "], 64)


# -- CLIP's BPE (tokenizer.json) --------------------------------------------------------------


def clip_like_json(captions) -> bytes:
  """A small tokenizer.json built like CLIP's published one: byte-level BPE whose word ends are
  marked "</w>", lower-casing, <|startoftext|> and <|endoftext|> as the last two ids."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(captions, trainers.BpeTrainer(
      vocab_size=400, end_of_word_suffix="</w>", show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens([tt.CLIP_SOT, tt.CLIP_EOT])
  return tok.to_str().encode()


@pytest.fixture(scope="module")
def clip_tok(captions):
  return tt.ClipBpeTokenizer(clip_like_json(captions))


def test_clip_bpe_ids_are_open_clips_layout(clip_tok, captions):
  """<|startoftext|>, pieces, <|endoftext|>, then 0; truncation keeps the end token last."""
  v = clip_tok.vocab_size
  assert (clip_tok.bos_id, clip_tok.eos_id, clip_tok.pad_id) == (v - 2, v - 1, 0)
  ids, truncated = clip_tok.encode(captions[:50], max_len=16)
  assert ids.shape == (50, 16) and not truncated.any()
  assert (ids[:, 0] == clip_tok.bos_id).all()
  for row in ids:
    end = list(row).index(clip_tok.eos_id)
    assert 2 <= end and (row[end + 1:] == 0).all() and clip_tok.bos_id not in row[1:end]
  assert clip_tok.decode(ids) == [" ".join(c.split()) for c in captions[:50]]
  assert clip_tok.decode(clip_tok.encode("A Big RED Circle", 16)[0][0]) == "a big red circle"
  long = " ".join(captions[:3])
  ids, truncated = clip_tok.encode([long], max_len=8)
  assert truncated[0] and ids[0, 0] == clip_tok.bos_id and ids[0, -1] == clip_tok.eos_id
  assert long.startswith(clip_tok.decode(ids[0]))
  assert clip_tok.unk_id is None  # Byte-level BPE has no unknown token.
  with pytest.raises(UserError, match=">= 2"):
    clip_tok.encode(["a"], max_len=1)


def test_either_kind_loads_by_content(clip_tok, tok, tmp_path):
  clip_tok.save(str(tmp_path / "tokenizer.json"))
  tok.save(str(tmp_path / "text_tokenizer.model"))
  for path, kind in ((tmp_path / "tokenizer.json", "clip_bpe"),
                     (tmp_path / "text_tokenizer.model", "sentencepiece")):
    loaded = tt.load(str(path))
    assert loaded.kind == kind and loaded.to_bytes() == path.read_bytes()
  # A bundle stores either kind under one file name.
  (tmp_path / "named.model").write_bytes(clip_tok.to_bytes())
  again = tt.load(str(tmp_path / "named.model"))
  ids = clip_tok.encode(["a red circle in the center"], 16)[0]
  np.testing.assert_array_equal(again.encode(["a red circle in the center"], 16)[0], ids)
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(clip_tok)).encode(
      ["a red circle in the center"], 16)[0], ids)
  (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
  with pytest.raises(UserError, match="corrupt text tokenizer model .*bad.json"):
    tt.load(str(tmp_path / "bad.json"))
  without = clip_like_json(["a red circle"]).decode().replace(tt.CLIP_SOT, "<|start|>")
  (tmp_path / "other.json").write_text(without)
  with pytest.raises(UserError, match="lacks <|startoftext|>"):
    tt.load(str(tmp_path / "other.json"))


def test_prompts_through_clip_bpe(clip_tok):
  """Serving's prompt checks with CLIP's ids: the count of a too-long prompt excludes both
  special tokens; with no unknown token nothing is refused as unknown."""
  from flowtok_jax import inference  # pylint: disable=g-import-not-at-top
  ids = inference.encode_prompts(clip_tok, ["a red circle in the center"], 16)
  assert ids[0, 0] == clip_tok.bos_id
  n = len(clip_tok.encode(["a red circle in the center " * 3], 64)[0][0].nonzero()[0]) - 2
  with pytest.raises(UserError, match=f"is {n} tokens, this model reads at most 14"):
    inference.encode_prompts(clip_tok, ["a red circle in the center " * 3], 16)
