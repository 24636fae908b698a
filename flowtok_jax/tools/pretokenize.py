"""Pre-tokenization: a trained tokenizer's posterior parameters, stored per dataset record.

FlowTok trains on a frozen tokenizer, so its encoder gives the same posterior for an image at
every epoch. At scale the posteriors are computed once and training reads [K, C] tokens instead of
decoding and encoding images (SPEC §3.2, DESIGN §2):

    flowtok data pretokenize --config CFG --data_dir D --tokenizer W_TOK --out L [--splits train]
    flowtok train --config CFG --workdir W --config.data.latents_dir=L ...

`L` holds, per split, `<split>.mean.npy` and `<split>.logvar.npy` (float16 [N, K, C]; row i is
record i of `builders.data_source(data, split)`, so they join the TFDS records by index and every
shuffle, shard and resume of the pipeline carries over), and `latents.json`, which says what made
them: the tokenizer checkpoint (directory and step) and the prepared dataset, which training
checks against `init.tokenizer_from` and `data.data_dir`. Training still samples z = mean + σ·ε each step (`flowtok_stage.image_sample`). Images are
decoded and resized exactly as the training pipeline does (`pipeline.load_image`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Sequence

import numpy as np

from flowtok_jax import paths
from flowtok_jax import progress as progress_lib
from flowtok_jax.errors import UserError

META_FILE = "latents.json"
DTYPE = np.float16  # As the reference's stored posteriors (2 bytes per value).


def split_file(latents_dir: str, split: str, part: str) -> str:
  """`<latents_dir>/<split>.<part>.npy` with the split spec made file-safe ('train[:90%]' ...)."""
  return os.path.join(latents_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}.{part}.npy")


def read_meta(latents_dir: str) -> dict:
  path = os.path.join(latents_dir, META_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("splits", {}), dict):
      raise ValueError("not a latents description")
    return meta
  except FileNotFoundError:
    raise UserError(f"{latents_dir} holds no pre-tokenized latents ({META_FILE} missing): run "
                    "`flowtok data pretokenize` first") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable or corrupt ({type(e).__name__})") from None


def dataset_id(data_cfg, data_dir: str) -> str:
  """The prepared dataset's identity: TFDS name/config/version (captioned_shapes' config name
  fixes its content), where it lives, and a fingerprint of its files (name, size, mtime): a
  rebuilt dataset (e.g. an image folder with an edited captions.jsonl, same record count) gets
  a new identity, so latents stored for the old records are refused."""
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  builder = builders._prepared_builder(data_cfg, data_dir)  # pylint: disable=protected-access
  digest = hashlib.sha256()
  root = os.fspath(builder.data_path)
  for name in sorted(os.listdir(root)):
    st = os.stat(os.path.join(root, name))
    digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
  return f"{builder.info.full_name} @ {os.path.abspath(data_dir)} #{digest.hexdigest()[:16]}"


def tokenizer_checkpoint(path: str) -> dict:
  """{'dir', 'step'} of the tokenizer checkpoint `path` names (its latest step)."""
  from flowtok_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  directory, step = ckpt_lib.resolve_step(path)
  return {"dir": directory, "step": int(step)}


def check_sources(meta: dict, config) -> None:
  """UserError unless the latents were made by the tokenizer checkpoint this run loads
  (`init.tokenizer_from`: its encoder evaluates and its decoder is exported) and from this
  run's prepared dataset."""
  path = (config.get("init") or {}).get("tokenizer_from")
  if not path:
    raise UserError("data.latents_dir needs init.tokenizer_from: the tokenizer that made the "
                    "latents (its encoder evaluates held-out images, its decoder is exported)")
  want = tokenizer_checkpoint(path)
  if meta.get("tokenizer_checkpoint") != want:
    raise UserError(f"the latents in {config.data.latents_dir} were made by tokenizer "
                    f"checkpoint {meta.get('tokenizer_checkpoint')}, this run loads {want}: "
                    "pretokenize again")
  data_id = dataset_id(config.data, config.data.data_dir)
  if meta.get("dataset_id") != data_id:
    raise UserError(f"the latents in {config.data.latents_dir} were made from "
                    f"{meta.get('dataset_id')!r}, this run reads {data_id!r}: pretokenize again")


def check_meta(meta: dict, config, split: str) -> None:
  """UserError unless the stored latents fit this config (tokens, channels, pixels, dataset)."""
  want = {"num_tokens": int(config.tokenizer.num_tokens),
          "token_channels": int(config.tokenizer.token_channels),
          "image_size": int(config.data.image_size), "dataset": str(config.data.name)}
  for key, value in want.items():
    if meta.get(key) != value:
      raise UserError(f"pre-tokenized latents were made with {key}={meta.get(key)!r}, this "
                      f"config has {value!r}: pretokenize again for this config")
  if split not in meta.get("splits", {}):
    raise UserError(f"no pre-tokenized latents for split {split!r} (have: "
                    f"{', '.join(meta.get('splits', {})) or 'none'})")


def open_split(latents_dir: str, split: str,
               num_records: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mean, logvar) of a split as read-only memory maps, float16 [N, K, C]; with `num_records`
  (the dataset split's length), a row count that differs is a UserError."""
  out = []
  for part in ("mean", "logvar"):
    path = split_file(latents_dir, split, part)
    try:
      out.append(np.load(path, mmap_mode="r"))
    except (OSError, ValueError) as e:
      raise UserError(f"cannot read pre-tokenized latents {path}: {e}") from None
  if out[0].shape != out[1].shape or out[0].ndim != 3 or out[0].dtype != DTYPE:
    raise UserError(f"pre-tokenized split {split!r}: mean {out[0].shape} {out[0].dtype} and "
                    f"logvar {out[1].shape} {out[1].dtype} are not a matching float16 [N, K, C]")
  meta = read_meta(latents_dir)
  if out[0].shape[1:] != (meta.get("num_tokens"), meta.get("token_channels")):
    raise UserError(f"pre-tokenized split {split!r} holds [N, K, C] = {out[0].shape} but "
                    f"{META_FILE} says K = {meta.get('num_tokens')}, C = "
                    f"{meta.get('token_channels')}")
  if num_records is not None and len(out[0]) != num_records:
    raise UserError(f"pre-tokenized split {split!r} has {len(out[0])} rows but the dataset has "
                    f"{num_records} records: pretokenize again")
  return out[0], out[1]


def pretokenize(config, tokenizer_workdir: str, data_dir: str, out: str,
                splits: Sequence[str] = ("train",), batch_size: int = 64,
                progress: bool = True) -> dict:
  """Encodes every record of `splits` with the tokenizer checkpoint's encoder and stores the
  posterior parameters in `out` (see the module docstring).

  Args:
    config: a config with `data`, `tokenizer` (and `init.tokenizer_select`, if the tokenizer
      sits under a prefix of its checkpoint).
    tokenizer_workdir: the tokenizer stage's workdir (or a checkpoint directory); the EMA
      parameters when it has them, as the flowtok stage loads them.
    data_dir: TFDS data dir of `config.data`.
    out: directory to write (created; existing splits are replaced).
    splits: TFDS split specs.
    batch_size: images per encoder call (one compiled shape; the last batch is padded).
    progress: progress with an ETA per split (a bar on a terminal, lines in a log).
  Returns:
    The metadata written to `latents.json`.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flowtok_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import builders, pipeline  # pylint: disable=g-import-not-at-top
  from flowtok_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    raise UserError("flowtok data pretokenize runs on one process")
  if batch_size < 1:
    raise UserError(f"batch size must be >= 1, got {batch_size}")
  splits = [s.strip() for s in splits if s.strip()]
  if not splits:
    raise UserError("no splits to pretokenize")
  out = paths.writable_dir(out, "--out")
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, META_FILE)):
    raise UserError(f"--out {out} is a non-empty directory that holds no latents; refusing to "
                    "write into it")
  tc = tok_lib.TokenizerConfig.from_config(config.tokenizer, dtype="float32")
  if config.data.image_size != tc.image_size:
    raise UserError(f"data.image_size = {config.data.image_size} must equal "
                    f"tokenizer.image_size = {tc.image_size}")
  encoder = tok_lib.FlowTiTokEncoder(tc)
  s = tc.image_size
  abstract = jax.eval_shape(lambda: nn.meta.unbox(
      encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))["params"]))
  select = tuple(config.get("init", {}).get("tokenizer_select", ()) or ()) + ("encoder",)
  stage = ckpt_lib.latest_meta(tokenizer_workdir).get("stage")
  if stage not in (None, "tokenizer"):  # (None: a checkpoint directory, or converted weights.)
    raise UserError(f"--tokenizer {tokenizer_workdir} holds a {stage!r}-stage checkpoint; give "
                    "the tokenizer stage's workdir (in the demo: W/tokenizer)")
  source_ckpt = tokenizer_checkpoint(tokenizer_workdir)
  params, _ = ckpt_lib.load_params(os.path.join(source_ckpt["dir"], str(source_ckpt["step"])),
                                   abstract, select=select)
  encode = jax.jit(lambda x: encoder.apply({"params": params}, x))

  # Every split is opened (and found non-empty) before anything is written.
  sources = {split: builders.data_source(config.data, split, data_dir) for split in splits}
  for split, source in sources.items():
    if not len(source):
      raise UserError(f"split {split!r} has no records")

  os.makedirs(out, exist_ok=True)
  meta_path = os.path.join(out, META_FILE)
  meta = {"num_tokens": tc.num_tokens, "token_channels": tc.token_channels, "image_size": s,
          "dataset": str(config.data.name), "dataset_id": dataset_id(config.data, data_dir),
          "image_key": config.data.image_key,
          "tokenizer_checkpoint": source_ckpt,
          "dtype": np.dtype(DTYPE).name, "splits": {}}
  keys = ("num_tokens", "token_channels", "image_size", "dataset", "dataset_id", "image_key",
          "tokenizer_checkpoint", "dtype")
  if os.path.exists(meta_path):  # Keep the splits made earlier by the same tokenizer and data.
    old = read_meta(out)
    if all(old.get(k) == meta[k] for k in keys):
      meta["splits"] = {k: v for k, v in old.get("splits", {}).items() if k not in splits}

  def write_meta():
    tmp_meta = meta_path + ".tmp"
    with open(tmp_meta, "w") as f:
      json.dump(meta, f, indent=1)
    os.replace(tmp_meta, meta_path)

  # The splits being (re)made are absent from latents.json until their files are whole, so a
  # crash part-way leaves no description vouching for files of another tokenizer.
  write_meta()
  for split, source in sources.items():
    n = len(source)
    files = {part: split_file(out, split, part) for part in ("mean", "logvar")}
    tmp = {part: path + ".tmp" for part, path in files.items()}
    arrays = {part: np.lib.format.open_memmap(tmp[part], mode="w+", dtype=DTYPE,
                                              shape=(n, tc.num_tokens, tc.token_channels))
              for part in files}
    bar = progress_lib.meter(n, f"pretokenize {split}", unit="image") if progress else None
    for start in range(0, n, batch_size):
      rows = range(start, min(start + batch_size, n))
      images = np.zeros((batch_size, s, s, 3), np.float32)
      for j, i in enumerate(rows):
        images[j] = pipeline.load_image(source[i], config.data.image_key, s)
      mean, logvar = jax.device_get(encode(images))
      for part, value in (("mean", mean), ("logvar", logvar)):
        stored = value[:len(rows)].astype(DTYPE)
        if not np.isfinite(stored).all():
          raise UserError(f"split {split!r}, records {start}..{start + len(rows) - 1}: the "
                          f"posterior {part} is not finite in float16 (|value| > 65504?)")
        arrays[part][start:start + len(rows)] = stored
      if bar is not None:
        bar.update(len(rows))
    if bar is not None:
      bar.close()
    for a in arrays.values():
      a.flush()
    arrays.clear()  # Closes the maps before their files move.
    for part in files:
      os.replace(tmp[part], files[part])  # Whole files only: a crash leaves no partial split.
    meta["splits"][split] = n
    write_meta()
    logging.info("pretokenized %s: %d records -> %s", split, n, out)
  return meta
