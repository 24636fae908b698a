"""The grain input pipeline: TFDS source -> shuffle -> decode/crop -> tokenize -> per-process
shard -> per-process batches, with a checkpointable iterator.

    it = make_iterator(config.data, tokenizer, split="train", global_batch_size=64, seed=0)
    batch = next(it)   # {'image': f32 [b, S, S, 3] in [0, 1], 'text_ids': i32 [b, L],
                       #  'truncated': bool [b]},  b = global_batch_size // process_count
    state = it.get_state()          # or orbax: grain.checkpoint.CheckpointSave(it)

Order of operations (all on the random-access `MapDataset`, so every step is indexable and the
iterator state is a single position per worker):
  source [-> DecodedCache, when data.cache_decoded] -> shuffle(seed) -> repeat(num_epochs)
  -> random_map(_Preprocess, seed) -> block shard -> batch(b) -> to_iter_dataset
  -> mp_prefetch (when data.num_workers > 0).
With data.preload the records are read into arrays once, up front (`Preloaded`), and the same
order is built on their indices: range(N) -> shuffle(seed) -> repeat -> block shard -> batch(b)
-> map(gather rows) -> to_iter_dataset. Its batches and iterator states are the plain
pipeline's, row for row.
Sharding last, in blocks: process p's batch i is rows [p·b, (p+1)·b) of the global batch i that a
single process would read, so the global batch is the same, row for row, for any process count.
Shuffling before `repeat` makes grain reseed the permutation per epoch (seed + epoch), so every
epoch has a new order that depends only on the seed. Batching before `to_iter_dataset` means worker
processes split whole batches between them: the batch sequence is the same for any worker count.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from flowtok_jax.data.examples import captions_of, feature, pick_caption, to_rgb_uint8
from flowtok_jax.data.text_tokenizer import Tokenizer
from flowtok_jax.errors import UserError

# Batches produced ahead by the in-process reader (threads) or by each worker process. Kept small:
# one batch of 64 images at 64 px is ~3 MB, and grain's own default (500 elements) is for tiny ones.
_DEFAULT_READ_THREADS = 1
_DEFAULT_PREFETCH = 2


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic, antialiased) and crops the centre square.

  Args:
    image: uint8 [H, W, 3].
    size: S, the output side.
  Returns:
    uint8 [S, S, 3]; the input itself when it is already S x S (no resampling).
  """
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  if min(h, w) != size:
    # The shorter side lands on exactly `size`; the longer one is rounded.
    if h <= w:
      new_h, new_w = size, max(size, int(round(w * size / h)))
    else:
      new_h, new_w = max(size, int(round(h * size / w))), size
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    h, w = new_h, new_w
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def decode_image(element: dict[str, Any], image_key: str, size: int) -> np.ndarray:
  """A record's image, resized and centre-cropped: uint8 [S, S, 3]."""
  try:
    image = to_rgb_uint8(feature(element, image_key))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # Builders apply data.on_bad_image when they write the dataset, so this means a damaged or
    # foreign dataset: stop rather than train on a silently altered stream.
    raise UserError(f"undecodable image in the dataset: {e}") from e
  return resize_center_crop(image, size)


def load_image(element: dict[str, Any], image_key: str, size: int) -> np.ndarray:
  """A record's image as the model sees it: float32 [S, S, 3] in [0, 1] (resize + centre crop)."""
  return decode_image(element, image_key, size).astype(np.float32) * np.float32(1 / 255)


class _WithLatents:
  """A random-access source whose records also carry their stored tokenizer posteriors.

  Pickles as paths (grain may send it to worker processes), which reopen the memory maps on
  first use.
  """

  def __init__(self, source: Sequence, latents_dir: str, split: str):
    from flowtok_jax.tools import pretokenize  # pylint: disable=g-import-not-at-top
    self._source, self._dir, self._split = source, latents_dir, split
    self._arrays = pretokenize.open_split(latents_dir, split, num_records=len(source))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if self._arrays is None:
      from flowtok_jax.tools import pretokenize  # pylint: disable=g-import-not-at-top
      self._arrays = pretokenize.open_split(self._dir, self._split)
    element = dict(self._source[index])
    element["latent_mean"] = np.asarray(self._arrays[0][index], np.float32)
    element["latent_logvar"] = np.asarray(self._arrays[1][index], np.float32)
    return element

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}


def _with_feature(element: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
  """A copy of `element` with `value` at `key` ('a/b': nested), copying only the dicts on the
  way (the inverse of `feature`)."""
  head, _, rest = key.partition("/")
  inner = _with_feature(element.get(head, {}), rest, value) if rest else value
  return {**element, head: inner}


class DecodedCache:
  """A random-access source that keeps what training reads of each record after its first read.

  Each record is read from `source` once: its image decoded, resized and centre-cropped to S
  (uint8, in one [N, S, S, 3] array, reserved up front and filled as records are read) and its
  caption features (the keys named; nested 'a/b' keys keep their nesting). Later epochs read
  memory, not the record files: parsing a record (protobuf + PNG) cost 0.31 ms, so an epoch
  re-read ~11 ms of one core per batch of 32 that the training step could have had
  (docs/benchmarks.md, "eighteenth pass"). Holds N·S²·3 bytes per reading process (grain
  workers each fill their own; 234 MiB for 20k images at 64 px): for datasets that fit in RAM.
  Pickles without its arrays, so a worker process starts empty.
  """

  def __init__(self, source: Sequence, image_key: str, text_keys: Sequence[str], size: int):
    self._source, self._image_key, self._size = source, image_key, size
    self._text_keys = tuple(k for k in dict.fromkeys(text_keys) if k)
    self._images = self._texts = None  # Record i is cached once _texts[i] is not None.

  def __len__(self) -> int:
    return len(self._source)

  def nbytes(self) -> int:
    """Bytes the image array takes once every record has been read."""
    return len(self._source) * self._size * self._size * 3

  @property
  def images(self) -> np.ndarray | None:
    """uint8 [N, S, S, 3]: the records read so far (rows not yet read are undefined); None
    before the first read."""
    return self._images

  def __getitem__(self, index):
    if self._images is None:  # np.empty: pages are committed only as records fill them.
      n = len(self._source)
      self._images = np.empty((n, self._size, self._size, 3), np.uint8)
      self._texts = [None] * n
    index = int(index)
    if self._texts[index] is None:
      element = self._source[index]
      texts = {}
      for key in self._text_keys:
        texts = _with_feature(texts, key, feature(element, key))
      self._images[index] = decode_image(element, self._image_key, self._size)
      self._texts[index] = texts  # Last: a failed decode leaves the record uncached.
    return _with_feature(self._texts[index], self._image_key, self._images[index])

  def __getstate__(self):
    return {**self.__dict__, "_images": None, "_texts": None}


class Preloaded:
  """A split held as arrays, for `data.preload`: each batch is rows gathered by index.

  Every record is read once, when this is built: its image decoded, resized and centre-cropped
  (uint8 [N, S, S, 3]) and its caption (and I2T caption) tokenized (int32 [N, L]). A batch then
  costs one fancy index per array instead of grain's per-element map (caption pick, two
  sentencepiece encodes, the float conversion, the stacking): on the demo's data, batch 32,
  0.47 instead of 2.6 ms of CPU, which the reading thread took from the two cores the step runs
  on (docs/benchmarks.md, "twenty-seventh pass"). For datasets that fit in RAM whose records
  hold one caption each (a caption drawn from several per epoch needs the per-element map:
  `from_source` returns None).
  """

  def __init__(self, images: np.ndarray, text_ids: np.ndarray, truncated: np.ndarray,
               i2t_text_ids: np.ndarray | None = None):
    self.images, self.text_ids, self.truncated = images, text_ids, truncated
    self.i2t_text_ids = i2t_text_ids

  def __len__(self) -> int:
    return len(self.images)

  @classmethod
  def from_source(cls, source: Sequence, data_cfg, tokenizer: Tokenizer) -> "Preloaded | None":
    """Reads `source` (every record once); None when a record holds several captions."""
    keys = tuple(k for k in (data_cfg.caption_key, data_cfg.get("i2t_caption_key")) if k)
    # The decoded cache reads a record as training sees it; read in full, its image array is ours.
    cache = DecodedCache(source, data_cfg.image_key, keys, data_cfg.image_size)
    texts = [[] for _ in keys]
    for i in range(len(cache)):
      element = cache[i]
      for key, out in zip(keys, texts):
        captions = captions_of(feature(element, key))
        if len(captions) != 1:
          return None
        out.append(captions[0])
    ids, truncated = tokenizer.encode(texts[0], data_cfg.max_text_len)
    i2t = tokenizer.encode(texts[1], data_cfg.max_text_len)[0] if len(keys) > 1 else None
    return cls(cache.images, ids, truncated, i2t)

  def gather(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `index` [b] as `_Preprocess` gives them, batched."""
    out = {"image": self.images[index].astype(np.float32) * np.float32(1 / 255),
           "text_ids": self.text_ids[index], "truncated": self.truncated[index]}
    if self.i2t_text_ids is not None:
      out["i2t_text_ids"] = self.i2t_text_ids[index]
    return out


class _Gather(grain.transforms.Map):
  """A batch of record indices -> that batch of a `Preloaded` split."""

  def __init__(self, arrays: Preloaded):
    self._arrays = arrays

  def map(self, element: np.ndarray) -> dict[str, np.ndarray]:
    return self._arrays.gather(np.asarray(element))


class _Preprocess(grain.transforms.RandomMap):
  """One example -> {'image': f32 [S, S, 3] in [0, 1], 'text_ids': i32 [L], 'truncated': bool}.

  Module-level and holding only picklable state: grain starts workers with spawn. A RandomMap so
  that, where an example holds several captions, the one used is drawn from the seeded stream.
  """

  def __init__(self, image_key: str, caption_key: str, image_size: int,
               tokenizer: Tokenizer, max_text_len: int, i2t_caption_key: str | None = None):
    self._image_key = image_key
    self._caption_key = caption_key
    self._i2t_caption_key = i2t_caption_key
    self._image_size = image_size
    self._tokenizer = tokenizer
    self._max_text_len = max_text_len

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    caption = pick_caption(feature(element, self._caption_key), rng)
    ids, truncated = self._tokenizer.encode([caption], self._max_text_len)
    if "latent_mean" in element:  # Pre-tokenized: the stored posterior replaces the image.
      out = {"latent_mean": element["latent_mean"], "latent_logvar": element["latent_logvar"]}
    else:
      out = {"image": load_image(element, self._image_key, self._image_size)}
    out.update(text_ids=ids[0], truncated=truncated[0])
    if self._i2t_caption_key:
      target = pick_caption(feature(element, self._i2t_caption_key), rng)
      out["i2t_text_ids"] = self._tokenizer.encode([target], self._max_text_len)[0][0]
    return out


class _BlockShard(grain.MapDataset):
  """Process p's view of a global stream: element k is global row (k // b)·B + p·b + k % b,
  with b rows per process and B = b·P per global batch. A trailing partial global batch is
  dropped for every process when `whole` (so all hold the same number of batches, as one
  process would), else split in the same way (a process may get fewer of its rows, or none)."""

  def __init__(self, parent: grain.MapDataset, index: int, count: int, rows: int,
               whole: bool = False):
    super().__init__(parent)
    self._index, self._count, self._rows = index, count, rows
    n, per_global = len(parent), rows * count
    full, rem = divmod(n, per_global)
    self._length = full * rows + (0 if whole else max(0, min(rows, rem - index * rows)))

  def __len__(self) -> int:
    return self._length

  def _global(self, k: int) -> int:
    batch, row = divmod(k, self._rows)
    return batch * self._rows * self._count + self._index * self._rows + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return grain.MapDataset.slice(self, index)
    return self._parent[self._global(index)]

  def __str__(self) -> str:
    return f"_BlockShard[{self._index}/{self._count}, {self._rows} rows]"


def _physical_memory() -> int:
  """This host's RAM in bytes."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_fits(knob: str, split: str, nbytes: int, copies: int):
  """A UserError now, not an OOM kill mid-epoch, when `copies` x `nbytes` pass half the RAM."""
  need, ram = nbytes * copies, _physical_memory()
  if need > ram // 2:
    raise UserError(f"data.{knob}: split {split!r} would take {need / 2**30:.1f} GiB decoded "
                    f"({copies} cop{'y' if copies == 1 else 'ies'}), over half of this host's "
                    f"{ram / 2**30:.1f} GiB; set data.{knob}=False")


def _ensure_absl_flags_parsed():
  # grain's worker start-up reads absl flags; outside absl.app.run nobody has parsed them.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)


def _process_defaults(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} is not in [0, process_count={process_count})")
  return process_index, process_count


def make_dataset(data_cfg, tokenizer: Tokenizer, *, split: str, global_batch_size: int,
                 seed: int, process_index: int | None = None, process_count: int | None = None,
                 shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
                 data_dir: str | None = None, source: Sequence | None = None,
                 latents_dir: str | None = None,
                 read_examples: int | None = None) -> grain.IterDataset:
  """Builds the per-process dataset (see `make_iterator`, which iterates it)."""
  process_index, process_count = _process_defaults(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise UserError(f"global batch size {global_batch_size} is not divisible by the "
                    f"{process_count} processes")
  batch_size = global_batch_size // process_count
  if num_epochs is not None and num_epochs < 1:
    raise UserError(f"num_epochs must be >= 1 or None (repeat forever), got {num_epochs}")
  if not 0 <= seed < 2**32:
    raise UserError(f"shuffle seed must be in [0, 2**32), got {seed}")
  if source is None:
    from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
    decoders = None
    if latents_dir and "/" not in data_cfg.image_key:  # The image bytes are never decoded.
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      decoders = {data_cfg.image_key: tfds.decode.SkipDecoding()}
    source = builders.data_source(data_cfg, split, data_dir or data_cfg.get("data_dir"),
                                  decoders=decoders)
  arrays = None
  stream = num_epochs != 1  # Training: the split is read more than once.
  if latents_dir:
    source = _WithLatents(source, latents_dir, split)
  elif data_cfg.get("preload") and stream and (read_examples is None
                                               or read_examples >= len(source)):
    if data_cfg.get("num_workers"):  # Worker processes would each need their own copy.
      logging.warning("data.preload gathers batches in the training process; with "
                      "data.num_workers=%d the workers read split %s record by record",
                      data_cfg.num_workers, split)
    else:
      size = data_cfg.image_size
      _check_fits("preload", split, len(source) * size * size * 3, copies=1)
      arrays = Preloaded.from_source(source, data_cfg, tokenizer)
      if arrays is None:
        logging.warning("data.preload: split %s holds several captions per record, drawn "
                        "anew each epoch; reading it record by record", split)
      else:
        logging.info("input pipeline: split %s read into memory (%.0f MiB of images)", split,
                     arrays.images.nbytes / 2**20)
  if arrays is None and not latents_dir and data_cfg.get("cache_decoded") and stream:
    source = DecodedCache(source, data_cfg.image_key,
                          (data_cfg.caption_key, data_cfg.get("i2t_caption_key")),
                          data_cfg.image_size)
    # Each worker process fills its own.
    _check_fits("cache_decoded", split, source.nbytes(),
                copies=max(1, data_cfg.get("num_workers") or 0))
    logging.info("input pipeline: split %s decoded in memory after its first read (%.0f MiB "
                 "when full)", split, source.nbytes() / 2**20)

  if len(source) < process_count:
    raise UserError(f"split {split!r} has no examples for process {process_index} of "
                    f"{process_count} ({len(source)} examples in all)")
  # The preloaded stream is the same order built on indices: grain's shuffle permutes
  # positions whatever the elements are.
  ds = (grain.MapDataset.range(len(source)) if arrays is not None
        else grain.MapDataset.source(source))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if arrays is None:
    ds = ds.random_map(_Preprocess(data_cfg.image_key, data_cfg.caption_key,
                                   data_cfg.image_size, tokenizer, data_cfg.max_text_len,
                                   data_cfg.get("i2t_caption_key")),
                       seed=seed)
  if process_count > 1:
    # Sharding the one global stream (after shuffle, repeat and the seeded map) in contiguous
    # blocks gives global batch i the same rows, in the same order, for any process count.
    ds = _BlockShard(ds, process_index, process_count, batch_size, whole=drop_remainder)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if len(ds) == 0:  # pylint: disable=g-explicit-length-test
    raise UserError(f"split {split!r}: {len(source)} examples make no full global batch of "
                    f"{batch_size * process_count}; lower the batch size")
  if arrays is not None:
    ds = ds.map(_Gather(arrays))
  prefetch = data_cfg.get("prefetch_batches") or _DEFAULT_PREFETCH
  out = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=data_cfg.get("read_threads") or _DEFAULT_READ_THREADS,
      prefetch_buffer_size=prefetch))
  num_workers = data_cfg.get("num_workers") or 0
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                       per_worker_buffer_size=prefetch))
  return out


def make_iterator(data_cfg, tokenizer: Tokenizer, *, split: str, global_batch_size: int,
                  seed: int, process_index: int | None = None, process_count: int | None = None,
                  shuffle: bool = True, num_epochs: int | None = None,
                  drop_remainder: bool = True, data_dir: str | None = None,
                  source: Sequence | None = None,
                  latents_dir: str | None = None,
                  read_examples: int | None = None) -> grain.DatasetIterator:
  """An iterator over this process's batches; its state round-trips through get/set_state and
  orbax (`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`).

  Args:
    data_cfg: the `data` config section (image_key, caption_key, image_size, max_text_len,
      num_workers, data_dir; optional i2t_caption_key, read_threads, prefetch_batches, and
      cache_decoded: keep each record decoded in memory after its first read, `DecodedCache`,
      when the stream is longer than one epoch).
    tokenizer: the text tokenizer.
    split: TFDS split name.
    global_batch_size: examples per step over all processes; must divide by process_count.
    seed: shuffle seed (same seed -> same order; epoch e uses a permutation seeded by seed + e).
    process_index: this process's shard; default `jax.process_index()`.
    process_count: number of shards; default `jax.process_count()`.
    shuffle: shuffle each epoch.
    num_epochs: passes over the shard; None repeats forever. Batches may straddle epochs.
    drop_remainder: drop a final partial batch (only reachable with finite num_epochs).
    data_dir: TFDS data dir; default `data_cfg.data_dir`.
    source: a random-access source (len + getitem of feature dicts) read instead of TFDS.
    latents_dir: pre-tokenized posteriors of this split (`flowtok data pretokenize`): batches
      carry 'latent_mean' / 'latent_logvar' f32 [b, K, C] instead of 'image', and the image
      bytes are never decoded.
    read_examples: how many examples (all processes) the caller will read, if known. With
      data.preload the split is read into arrays up front (`Preloaded`) only when this is at
      least one epoch (or unknown); a shorter run reads the records it needs as it goes.
  Returns:
    A grain iterator of {'image': f32 [b, S, S, 3] in [0, 1], 'text_ids': i32 [b, L],
    'truncated': bool [b]} (plus 'i2t_text_ids' i32 [b, L] when data.i2t_caption_key names a
    feature) with b = global_batch_size // process_count. Call `close()` when done
    if data.num_workers > 0 (stops the worker processes).
  """
  ds = make_dataset(data_cfg, tokenizer, split=split, global_batch_size=global_batch_size,
                    seed=seed, process_index=process_index, process_count=process_count,
                    shuffle=shuffle, num_epochs=num_epochs, drop_remainder=drop_remainder,
                    data_dir=data_dir, source=source, latents_dir=latents_dir,
                    read_examples=read_examples)
  logging.info("input pipeline: split=%s global_batch=%d seed=%d shuffle=%s epochs=%s workers=%s",
               split, global_batch_size, seed, shuffle, num_epochs, data_cfg.get("num_workers"))
  return iter(ds)


def make_eval_iterator(data_cfg, tokenizer: Tokenizer, *, split: str, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       data_dir: str | None = None,
                       source: Sequence | None = None,
                       whole_batches: bool = False) -> grain.DatasetIterator:
  """One ordered pass over this process's shard; the last batch may be smaller.

  Each process holds its block of every global batch; when the split is not a multiple of
  global_batch_size the last global batch is split unevenly, so processes can end with different
  batch counts: multi-host evaluation must allow for it, or pass `whole_batches` (the trailing
  partial global batch is dropped on every process, and all hold the same batches).
  """
  return make_iterator(data_cfg, tokenizer, split=split, global_batch_size=global_batch_size,
                       seed=0, process_index=process_index, process_count=process_count,
                       shuffle=False, num_epochs=1, drop_remainder=whole_batches,
                       data_dir=data_dir, source=source)
