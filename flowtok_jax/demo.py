"""`flowtok demo`: the whole pipeline on the captioned-shapes world, on a laptop-class CPU.

Stages run in order and each is skipped when its output already exists in the workdir, so
re-running resumes:

  1. data      build the captioned_shapes TFDS dataset (ArrayRecord) in W/data
  2. preview   W/preview.png: a grid of training images with their captions
  3. text      train the sentencepiece model on the training captions -> W/text_tokenizer.model

Per-stage wall time goes to W/metrics.json (`time/<stage>_sec`).
"""
from __future__ import annotations

import json
import logging
import os
import time

from flowtok_jax import config_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "demo.py")


def _merge_metrics(workdir: str, new: dict) -> dict:
  path = os.path.join(workdir, "metrics.json")
  metrics = {}
  if os.path.exists(path):
    with open(path) as f:
      metrics = json.load(f)
  metrics.update(new)
  with open(path + ".tmp", "w") as f:
    json.dump(metrics, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return metrics


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "text_tokenizer.model")


def run_demo(workdir: str, config_arg: str | None = None, overrides=()) -> dict:
  """Runs every demo stage that is not done yet; returns the merged metrics.

  Args:
    workdir: output directory (created); holds data, models, report and metrics.
    config_arg: `path[:arg]` of the config; defaults to the repository's configs/demo.py.
    overrides: `key=value` config overrides.
  Returns:
    The content of W/metrics.json.
  """
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top

  config = config_lib.load(config_arg or DEFAULT_CONFIG,
                           [f"data.data_dir={os.path.join(workdir, 'data')}", *overrides])
  os.makedirs(workdir, exist_ok=True)
  times = {}

  t0 = time.time()
  logging.info("demo stage 1/3: dataset -> %s", config.data.data_dir)
  logging.info("%s", builders.build(config.data, config.data.data_dir))
  times["time/data_sec"] = time.time() - t0

  t0 = time.time()
  preview = os.path.join(workdir, "preview.png")
  builders.write_preview(config.data, config.data.data_dir, split=config.data.train_split,
                         num=16, out=preview)
  logging.info("demo stage 2/3: preview -> %s", preview)
  times["time/preview_sec"] = time.time() - t0

  t0 = time.time()
  tok_path = tokenizer_path(workdir)
  if not os.path.exists(tok_path):
    captions = builders.read_captions(config.data, config.data.train_split, config.data.data_dir,
                                      limit=config.text_tokenizer.num_captions)
    tok = text_tokenizer.train_from_config(config.text_tokenizer, captions)
    tok.save(tok_path)
  tok = text_tokenizer.TextTokenizer.load(tok_path)
  logging.info("demo stage 3/3: text tokenizer (vocab %d) -> %s", tok.vocab_size, tok_path)
  times["time/text_tokenizer_sec"] = time.time() - t0
  return _merge_metrics(workdir, {**times, "text/vocab_size": tok.vocab_size})
