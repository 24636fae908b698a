"""Speed measurements behind `flowtok bench WHAT`.

    flowtok bench pipeline --config configs/demo.py --data_dir D --batch_size 64 --num_workers 2

Each benchmark returns a flat dict of numbers (printed as JSON by the CLI). Times exclude one-off
costs that the name does not claim: the pipeline benchmark reports the first batch (worker start,
file opening) separately from the steady-state rate.
"""
from __future__ import annotations

import time

from flowtok_jax.errors import UserError

# Captions read to train the throw-away tokenizer of the pipeline benchmark: a closed caption
# grammar is covered by far fewer, and tokenizing cost barely depends on the vocabulary.
_BENCH_TOKENIZER_CAPTIONS = 1000


def bench_pipeline(config, data_dir: str | None, num_batches: int = 50,
                   num_workers: int | None = None, batch_size: int = 64,
                   split: str | None = None, seed: int = 0) -> dict:
  """Measures the training input pipeline on one process.

  Args:
    config: full config; reads `config.data` and `config.text_tokenizer`.
    data_dir: TFDS data dir holding the built dataset; default `config.data.data_dir`.
    num_batches: batches timed after the first one.
    num_workers: grain worker processes; default `config.data.num_workers`.
    batch_size: examples per batch (the global batch of a 1-process run).
    split: split to read; default `config.data.train_split`.
    seed: shuffle seed.
  Returns:
    {'examples_per_sec', 'batches_per_sec', 'first_batch_s', 'batch_size', 'num_batches',
     'num_workers', 'image_size'}; rates count batches after the first.
  """
  # Imported here so `flowtok --help` stays fast.
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top

  if num_batches < 1:
    raise UserError(f"num_batches must be >= 1, got {num_batches}")
  data_cfg = config.data.copy_and_resolve_references()
  data_dir = data_dir or data_cfg.get("data_dir")
  if not data_dir:
    raise UserError("no data dir: pass --data_dir or set config.data.data_dir")
  split = split or data_cfg.train_split
  with data_cfg.unlocked():
    if num_workers is not None:
      data_cfg.num_workers = num_workers
  captions = builders.read_captions(data_cfg, split, data_dir, limit=_BENCH_TOKENIZER_CAPTIONS)
  tokenizer = text_tokenizer.TextTokenizer.train(
      captions, config.text_tokenizer.vocab_size,
      model_type=config.text_tokenizer.get("model_type", "unigram"))

  it = pipeline.make_iterator(data_cfg, tokenizer, split=split, global_batch_size=batch_size,
                              seed=seed, process_index=0, process_count=1, data_dir=data_dir)
  try:
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num_batches):
      next(it)
    elapsed = time.perf_counter() - start
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
  return {
      "examples_per_sec": round(num_batches * batch_size / elapsed, 1),
      "batches_per_sec": round(num_batches / elapsed, 2),
      "first_batch_s": round(first, 3),
      "batch_size": batch_size,
      "num_batches": num_batches,
      "num_workers": data_cfg.num_workers,
      "image_size": data_cfg.image_size,
  }
