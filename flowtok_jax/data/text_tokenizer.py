"""Text tokenizers: fixed-length ids for the CLIP text tower, and captions back from ids.

Two kinds, one interface (`encode`, `decode`, `vocab_size`, the special ids as attributes,
`to_bytes` / `save` and pickling); `load(path)` and `from_bytes(data)` tell them apart:

* `TextTokenizer`: a sentencepiece model trained in-process on the captions (the demo, and any
  run whose CLIP tower is trained here). Ids: pad = 0, unk = 1, bos = 2, eos = 3, then the
  learned pieces. A caption becomes its pieces plus EOS, padded with pad to the fixed length L.
* `ClipBpeTokenizer`: OpenAI CLIP's byte-level BPE, read from a Hugging Face `tokenizer.json`
  (the one published with the CLIP ViT-L/14 weights), for the imported text tower of the paper
  configs: ids are what the released FlowTok saw, <|startoftext|> + pieces + <|endoftext|>,
  padded with 0 (open_clip's `tokenize`). Needs the `clip` extra (the `tokenizers` library).

A caption too long for L is cut so that the last slot is still the end token (the text decoder
learns to stop there) and is flagged as truncated.

    tok = TextTokenizer.train(captions, vocab_size=64)
    ids, truncated = tok.encode(["a red circle in the center"], max_len=16)   # [1, 16], [1]
    tok.decode(ids)                                                          # ['a red circle ...']
    load("W/text_tokenizer.model") or load("clip/tokenizer.json")           # either kind
"""
from __future__ import annotations

import io
import logging
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from flowtok_jax.errors import UserError

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

# sentencepiece normalisation rules: NFKC with whitespace cleanup; the `_cf` variant also folds
# case, so a prompt typed as "A Red Circle" maps onto the lowercase training captions.
_RULE_CASEFOLD = "nmt_nfkc_cf"
_RULE_KEEP_CASE = "nmt_nfkc"


class _ModelFile:
  """A tokenizer made from one serialized model (`self._data`): file, bytes and pickle forms.

  Picklable (the model travels as its bytes), so grain worker processes can hold it.
  """
  _data: bytes  # Set by the subclass's __init__(data), which parses it.

  @classmethod
  def load(cls, path: str):
    """Reads a model written by `save`; missing or unreadable files raise UserError."""
    return _load(path, cls)

  def save(self, path: str) -> None:
    """Writes the serialized model (written atomically)."""
    _write_atomic(path, self._data)

  def to_bytes(self) -> bytes:
    """The serialized model, e.g. to embed in an export bundle."""
    return self._data

  @classmethod
  def from_bytes(cls, data: bytes):
    return cls(data)

  def __getstate__(self):
    return {"data": self._data}

  def __setstate__(self, state):
    self.__init__(state["data"])


class TextTokenizer(_ModelFile):
  """A sentencepiece model with fixed special ids, fixed-length encoding and batch decoding.

  Its file is the standard sentencepiece `.model` format.
  """
  kind = "sentencepiece"
  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

  def __init__(self, model_proto: bytes):
    """Wraps a serialized sentencepiece model; raises UserError if it does not parse."""
    self._data = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._data)
    except (RuntimeError, OSError, TypeError) as e:
      raise UserError(f"not a valid sentencepiece model ({len(self._data)} bytes)") from e
    specials = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if specials != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise UserError(f"sentencepiece model has special ids (pad, unk, bos, eos) = {specials}, "
                      f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")

  # -- construction --------------------------------------------------------------------------

  @classmethod
  def train(cls, captions: Iterable[str | bytes], vocab_size: int, model_type: str = "unigram",
            lowercase: bool = True, num_threads: int = 1) -> "TextTokenizer":
    """Trains a model in memory on `captions`.

    Args:
      captions: training sentences (str or UTF-8 bytes); read once.
      vocab_size: requested vocabulary including the 4 specials. A soft limit: sentencepiece may
        stop below it when the text has fewer useful pieces (see `vocab_size` of the result).
      model_type: 'unigram', 'bpe', 'word' or 'char'.
      lowercase: case-fold all text (training and encoding).
      num_threads: trainer threads.
    Returns:
      The trained tokenizer.
    """
    if vocab_size < 5:
      raise UserError(f"text_tokenizer.vocab_size must be >= 5 (4 special ids + 1), "
                      f"got {vocab_size}")
    if model_type not in ("unigram", "bpe", "word", "char"):
      raise UserError(f"text_tokenizer.model_type must be unigram|bpe|word|char, "
                      f"got {model_type!r}")
    sentences = [_as_str(c) for c in captions]
    sentences = [s for s in sentences if s.strip()]
    if not sentences:
      raise UserError("cannot train the text tokenizer: no non-empty captions")
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
          model_type=model_type, character_coverage=1.0,
          normalization_rule_name=_RULE_CASEFOLD if lowercase else _RULE_KEEP_CASE,
          pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, hard_vocab_limit=False,
          num_threads=num_threads, minloglevel=2, input_sentence_size=0,
          shuffle_input_sentence=False)
    except RuntimeError as e:
      raise UserError(f"sentencepiece training failed: {e}") from e
    tok = cls(model.getvalue())
    logging.info("trained %s text tokenizer on %d captions: vocab %d (requested %d)", model_type,
                 len(sentences), tok.vocab_size, vocab_size)
    return tok

  # -- use -----------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Actual number of ids (specials included); may be below the requested size."""
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str | bytes] | str | bytes,
             max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodes texts to fixed-length ids ending in EOS.

    Args:
      texts: N strings (or one string, treated as N = 1).
      max_len: L, the output length; at least 1 (EOS alone).
    Returns:
      ids: int32 [N, L]: pieces, EOS, then PAD_ID. A text with L or more pieces keeps its first
        L - 1 pieces and EOS in the last slot.
      truncated: bool [N], True where pieces were dropped.
    """
    if max_len < 1:
      raise UserError(f"max_text_len must be >= 1, got {max_len}")
    if isinstance(texts, (str, bytes)):
      texts = [texts]
    # One call per string: sentencepiece's list form starts a thread pool per call, which costs
    # ~10x the encoding itself for the one-caption calls the input pipeline makes.
    pieces = [self._sp.encode(_as_str(t), out_type=int) for t in texts]
    ids = np.full((len(pieces), max_len), PAD_ID, np.int32)
    truncated = np.zeros((len(pieces),), bool)
    for i, p in enumerate(pieces):
      if len(p) > max_len - 1:
        p = p[:max_len - 1]
        truncated[i] = True
      ids[i, :len(p)] = p
      ids[i, len(p)] = EOS_ID
    return ids, truncated

  def decode(self, ids) -> str | list[str]:
    """Decodes ids [L] to a string or [N, L] to N strings.

    Stops at the first EOS; drops PAD/BOS and ids outside the vocabulary (a model head may be
    wider than the trained vocabulary).
    """
    arr = np.asarray(ids)
    if arr.ndim not in (1, 2):
      raise ValueError(f"decode expects ids of shape [L] or [N, L], got {arr.shape}")
    rows = arr[None] if arr.ndim == 1 else arr
    out = []
    size = self.vocab_size
    for row in rows.tolist():
      if EOS_ID in row:
        row = row[:row.index(EOS_ID)]
      out.append(self._sp.decode([t for t in row if t not in (PAD_ID, BOS_ID) and 0 <= t < size]))
    return out[0] if arr.ndim == 1 else out


class ClipBpeTokenizer(_ModelFile):
  """OpenAI CLIP's BPE from a Hugging Face `tokenizer.json`, encoded as open_clip does.

  Ids: <|startoftext|>, the BPE pieces, <|endoftext|>, then 0 (open_clip pads with 0, which is
  also the id of "!"). Byte-level: no text is unknown. Its file is the tokenizer.json.
  """
  kind = "clip_bpe"
  pad_id, unk_id = 0, None

  def __init__(self, tokenizer_json: bytes):
    """Wraps a tokenizer.json; raises UserError if it does not parse or lacks CLIP's tokens."""
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UserError("the CLIP BPE tokenizer needs the `tokenizers` library: "
                      "pip install 'flowtok_jax[clip]'") from None
    self._data = bytes(tokenizer_json)
    try:
      self._tok = tokenizers.Tokenizer.from_str(self._data.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"not a valid tokenizer.json ({len(self._data)} bytes: "
                      f"{type(e).__name__})") from None
    self._tok.no_padding()
    self._tok.no_truncation()
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.bos_id, self.eos_id = vocab.get(CLIP_SOT), vocab.get(CLIP_EOT)
    if self.bos_id is None or self.eos_id is None:
      raise UserError(f"tokenizer.json is not CLIP's: it lacks {CLIP_SOT} or {CLIP_EOT}")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, texts: Sequence[str | bytes] | str | bytes,
             max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> ids [N, L] (start, pieces, end, 0...) and truncated [N]; a text with more than
    L - 2 pieces keeps its first L - 2 and the end token (open_clip's truncation)."""
    if max_len < 2:
      raise UserError(f"max_text_len must be >= 2 for CLIP's start and end tokens, got {max_len}")
    if isinstance(texts, (str, bytes)):
      texts = [texts]
    # One call per string, as for sentencepiece: the batch form runs a thread pool, which the
    # input pipeline's one-caption calls (and forked grain workers) do not want.
    pieces = [self._tok.encode(_as_str(t), add_special_tokens=False).ids for t in texts]
    ids = np.full((len(pieces), max_len), self.pad_id, np.int32)
    truncated = np.zeros((len(pieces),), bool)
    for i, p in enumerate(pieces):
      if len(p) > max_len - 2:
        p = p[:max_len - 2]
        truncated[i] = True
      ids[i, 0] = self.bos_id
      ids[i, 1:len(p) + 1] = p
      ids[i, len(p) + 1] = self.eos_id
    return ids, truncated

  def decode(self, ids) -> str | list[str]:
    """Ids [L] -> a string, [N, L] -> N strings: up to the first end token, without the start
    token, trailing padding or ids outside the vocabulary."""
    arr = np.asarray(ids)
    if arr.ndim not in (1, 2):
      raise ValueError(f"decode expects ids of shape [L] or [N, L], got {arr.shape}")
    rows = arr[None] if arr.ndim == 1 else arr
    size, out = self.vocab_size, []
    for row in rows.tolist():
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      while row and row[-1] == self.pad_id:
        row = row[:-1]
      row = [t for t in row if t != self.bos_id and 0 <= t < size]
      text = self._tok.decode(row, skip_special_tokens=True)
      # CLIP's BPE marks word ends with "</w>"; its published decoder leaves them in.
      out.append(" ".join(text.replace("</w>", " ").split()))
    return out[0] if arr.ndim == 1 else out


CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"
Tokenizer = TextTokenizer | ClipBpeTokenizer


def from_bytes(data: bytes):
  """A tokenizer of either kind from its serialized model (JSON: CLIP BPE; else sentencepiece)."""
  data = bytes(data)
  if data.lstrip()[:1] == b"{":
    return ClipBpeTokenizer(data)
  return TextTokenizer(data)


def load(path: str):
  """Reads a tokenizer model file of either kind (`.model` sentencepiece or `tokenizer.json`)."""
  return _load(path, from_bytes)


def _load(path: str, make):
  """`make(bytes of path)`; a missing file or a model that does not parse is a UserError."""
  if not os.path.isfile(path):
    raise UserError(f"text tokenizer model not found: {path}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    return make(data)
  except UserError as e:
    if "pip install" in str(e):  # A missing library, not a bad file.
      raise
    raise UserError(f"corrupt text tokenizer model {path}: {e}") from e


def _write_atomic(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)  # Never leave a half-written model behind.


def _as_str(text: str | bytes) -> str:
  if isinstance(text, (bytes, np.bytes_)):
    return bytes(text).decode("utf-8")
  return str(text)


def train_from_config(text_cfg, captions: Iterable[str | bytes]) -> TextTokenizer:
  """Trains the tokenizer described by the `text_tokenizer` config section.

  Args:
    text_cfg: section with `vocab_size`, `model_type`, `num_captions` and optionally `lowercase`.
    captions: caption stream (e.g. the training split); the first `num_captions` are used.
  Returns:
    The trained tokenizer.
  """
  limit = text_cfg.get("num_captions")
  subset = []
  for i, caption in enumerate(captions):
    if limit is not None and i >= limit:
      break
    subset.append(caption)
  return TextTokenizer.train(subset, vocab_size=text_cfg.vocab_size,
                             model_type=text_cfg.get("model_type", "unigram"),
                             lowercase=text_cfg.get("lowercase", True))


def train_on_split(config, data_dir: str, path: str) -> TextTokenizer:
  """Trains the configured tokenizer on `config.data.train_split`'s captions and saves it.

  Args:
    config: the experiment config (its `data` and `text_tokenizer` sections).
    data_dir: TFDS data dir of the prepared dataset.
    path: the `.model` file to write (written atomically).
  Returns:
    The trained tokenizer.
  """
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  captions = builders.read_captions(config.data, config.data.train_split, data_dir,
                                    limit=config.text_tokenizer.get("num_captions"))
  tokenizer = train_from_config(config.text_tokenizer, captions)
  tokenizer.save(path)
  return tokenizer
