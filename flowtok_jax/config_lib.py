"""Configs: loading `configs/<exp>.py:arg`, typed arguments, validated overrides, durations.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict` and, where a sweep makes
sense, `get_sweep(add, arg=None)`. The argument string after the colon is read by `parse_arg`:

    configs/demo.py:variant=B,runlocal   ->   ConfigDict(variant='B', runlocal=True)

Overrides come from the command line as `--config.key.sub=value`; an unknown key or a value that
does not parse as the key's type is a `UserError` naming the key.
"""
from __future__ import annotations

import ast
import copy
import importlib.machinery
import importlib.util
import logging
import math
import os
import re
import traceback
from typing import Any, Iterable, Mapping

import ml_collections

from flowtok_jax.errors import UserError


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses `'k1=v1,k2,k3=v3'` into a ConfigDict typed after the defaults in `spec`.

  A bare `k` means `k=True`. Every key must appear in `spec`; values are cast to the type of the
  default (bool accepts true/false/1/0/yes/no).

  Args:
    arg: the text after the colon in `--config path:arg`, or None.
    **spec: the accepted keys and their defaults.
  Returns:
    A ConfigDict with every key of `spec`, overridden where `arg` says so.
  """
  out = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      raise UserError(f"unknown config argument {key!r} (accepted: {', '.join(sorted(spec))})")
    if not sep:
      value = "true"
    out[key] = _cast(value.strip(), spec[key], key)
  return out


def _cast(text: str, default: Any, key: str) -> Any:
  """Casts `text` to the type of `default`; `key` names the setting in errors."""
  try:
    if isinstance(default, bool):
      low = text.lower()
      if low in ("1", "true", "yes", "on"):
        return True
      if low in ("0", "false", "no", "off"):
        return False
      raise ValueError(text)
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, str) or default is None:
      return text
    if isinstance(default, (tuple, list)):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return type(default)(value)
  except (ValueError, SyntaxError) as e:
    raise UserError(f"config key {key!r}: cannot read {text!r} as {type(default).__name__}") from e
  raise UserError(f"config key {key!r}: cannot override a value of type {type(default).__name__}")


def load_module(path: str):
  """Imports a config file by path and returns the module."""
  if os.path.isdir(path):
    raise UserError(f"config file {path} is a directory")
  if not os.path.isfile(path):
    raise UserError(f"config file not found: {path}")
  name = "flowtok_config_" + os.path.splitext(os.path.basename(path))[0]
  # An explicit source loader: the file's suffix (.py or not) must not decide how it is read.
  spec = importlib.util.spec_from_file_location(
      name, path, loader=importlib.machinery.SourceFileLoader(name, path))
  module = importlib.util.module_from_spec(spec)
  with errors_in(path):
    spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} defines no get_config(arg)")
  return module


class errors_in:
  """Turns an exception raised by the code of config file `path` into a one-line UserError.

  The message names the deepest line of `path` on the traceback (or, for a SyntaxError, the line
  that does not parse). UserErrors pass through unchanged.
  """

  def __init__(self, path: str):
    self.path = path

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if error is None or isinstance(error, UserError) or not isinstance(error, Exception):
      return False
    real = os.path.realpath(self.path)
    if isinstance(error, SyntaxError) and error.filename and (
        os.path.realpath(error.filename) == real):
      line = error.lineno
    else:
      frames = [f for f in traceback.extract_tb(tb) if os.path.realpath(f.filename) == real]
      line = frames[-1].lineno if frames else None
    where = f"{self.path}, line {line}" if line else self.path
    detail = error.msg if isinstance(error, SyntaxError) else str(error)
    raise UserError(f"config file {where}: {type(error).__name__}: {detail}") from error


def load(config_arg: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path[:arg]`, applies `key=value` overrides, and locks the result.

  Args:
    config_arg: `configs/demo.py` or `configs/demo.py:runlocal`.
    overrides: strings `key.sub=value` (the `--config.` prefix already removed).
  Returns:
    The config, locked: adding a key afterwards is an error.
  """
  path, _, arg = config_arg.partition(":")
  module = load_module(path)
  with errors_in(path):
    config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"config file {path}: get_config returned {type(config).__name__}, "
                    "not an ml_collections.ConfigDict")
  config = apply_overrides(config, overrides)
  check_sizes(config)
  config.lock()
  return config


# Integer settings whose name says they count or measure something a model or batch has at least
# one of (flow.depth, tokenizer.patch_size, train.batch_size, data.max_text_len, ...).
_SIZE_KEY = re.compile(r"(^|_)(depth|width|heads|channels|size|len|num_tokens|hidden|ffn_dim|"
                       r"embed_dim)$")


def check_sizes(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """UserError for a size-like integer setting below 1 (a depth of -1 would build no blocks)."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      check_sizes(value, f"{prefix}{key}.")
    elif (_SIZE_KEY.search(key) and isinstance(value, int) and not isinstance(value, bool)
          and value < 1):
      raise UserError(f"config key {prefix}{key} must be at least 1, got {value}")


def set_typed(section: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
  """`section[key] = value`, where ml_collections keeps the type of the value already there (ints
  widen to floats): another type is a UserError naming `config.<where>.<key>`, not a TypeError."""
  try:
    section[key] = value
  except TypeError:
    kind = type(section[key]).__name__
    raise UserError(f"config.{where}.{key} must be of type {kind}, like the value it replaces "
                    f"({section[key]!r}), got {value!r}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]):
  """Applies `key.sub=value` strings; unknown keys and unreadable values are UserErrors."""
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"config override {item!r} must look like key=value")
    if not all(key.split(".")):
      raise UserError(f"config override {item!r} has an empty key (or key part): write "
                      "--config.section.key=value")
    _open_stage_key(config, key)
    parent, leaf = _resolve(config, key)
    current = parent[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise UserError(f"config key {key!r} is a section, not a value")
    parent[leaf] = _cast_override(value, current, key)
    _check_not_shadowed(config, key)
  return config


def _open_stage_key(config: ml_collections.ConfigDict, dotted: str):
  """Lets `stages.<name>.<section>.<key>` name any `<section>.<key>` of the config that the stage
  does not set yet (e.g. `stages.flowtok.optim.schedule`): the slot is created holding the shared
  value, so the override is cast to its type and `stage_api.config_for_stage` merges it."""
  parts = dotted.split(".")
  stages = config.get("stages")
  if (len(parts) < 4 or parts[0] != "stages" or not isinstance(stages, ml_collections.ConfigDict)
      or parts[1] not in stages):
    return
  node, shared = stages[parts[1]], config
  for part in parts[2:]:
    if not isinstance(shared, ml_collections.ConfigDict) or part not in shared:
      return  # Not a key of the config either: _resolve names it.
    shared = shared[part]
    if part not in node:
      with node.unlocked():
        node[part] = (ml_collections.ConfigDict() if isinstance(shared, ml_collections.ConfigDict)
                      else copy.deepcopy(shared))
    node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
      return


def _check_not_shadowed(config: ml_collections.ConfigDict, key: str):
  """Warns when a multi-stage config's `stages.<name>.<key>` replaces an overridden `<key>` for
  some stages (stage_api.config_for_stage merges those in last), naming the keys to set."""
  stages = config.get("stages")
  if not stages or key.startswith("stages."):
    return
  def has(node, parts):
    for part in parts:
      if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
        return False
      node = node[part]
    return True
  shadowing = [n for n in stages.keys() if has(stages[n], key.split("."))]
  if shadowing:
    logging.warning("override %r does not reach the stages that set it themselves; to change "
                    "it there, override %s", key,
                    ", ".join(f"stages.{n}.{key}" for n in shadowing))


def _resolve(config: ml_collections.ConfigDict, dotted: str):
  """Finds the parent ConfigDict and leaf name of a dotted key, or raises naming the bad part."""
  parts = dotted.split(".")
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      where = ".".join(parts[:i]) or "<top>"
      options = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, Mapping)) else []
      hint = _closest(part, options)
      raise UserError(f"unknown config key {dotted!r}: no {part!r} in {where}"
                      + (f" (did you mean {hint!r}?)" if hint else ""))
    if i == len(parts) - 1:
      return node, part
    node = node[part]
  raise AssertionError("unreachable")


def _closest(word: str, options: list[str]) -> str | None:
  import difflib  # pylint: disable=g-import-not-at-top
  found = difflib.get_close_matches(word, options, n=1)
  return found[0] if found else None


def _cast_override(text: str, current: Any, key: str) -> Any:
  if text == "None" and isinstance(current, (int, float, tuple, list)) and not isinstance(
      current, bool):
    return None  # Unsets an optional number a config chose (e.g. ema_decay, i2t_t_loc).
  if current is None:
    # An unset optional value: take Python literals when they parse, else the string.
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  return _cast(text, current, key)


def steps(prefix: str, config: ml_collections.ConfigDict, *, examples_per_epoch: int | None = None,
          batch_size: int | None = None) -> int:
  """Turns a duration given as `<prefix>_steps|_epochs|_examples` into a number of steps.

  Exactly one of the three keys must be set (not None). Epochs and examples need the batch size
  (`config.batch_size` if not given); epochs also need `examples_per_epoch`.

  Args:
    prefix: e.g. 'total' for total_steps / total_epochs / total_examples.
    config: the (sub)config holding the keys.
    examples_per_epoch: size of the training split, for `_epochs`.
    batch_size: global batch size; defaults to `config.batch_size`.
  Returns:
    The duration in steps (rounded up, at least 1 when the duration is positive).
  """
  given = {unit: config.get(f"{prefix}_{unit}") for unit in ("steps", "epochs", "examples")}
  given = {unit: v for unit, v in given.items() if v is not None}
  if len(given) != 1:
    raise UserError(f"set exactly one of {prefix}_steps, {prefix}_epochs, {prefix}_examples "
                    f"(got {sorted(given) or 'none'})")
  (unit, value), = given.items()
  if value < 0:
    raise UserError(f"{prefix}_{unit} must be >= 0, got {value}")
  if unit == "steps":
    return int(value)
  batch_size = batch_size or config.get("batch_size")
  if not batch_size:
    raise UserError(f"{prefix}_{unit} needs a batch_size to be turned into steps")
  if unit == "examples":
    return int(math.ceil(value / batch_size))
  if not examples_per_epoch:
    raise UserError(f"{prefix}_epochs needs the number of examples per epoch")
  return int(math.ceil(value * examples_per_epoch / batch_size))
