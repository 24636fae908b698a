"""Checks on paths the user asks us to write, made before any work is done.

A directory or file to be written must not be, or lie under, an existing file, and its nearest
existing ancestor must be writable; otherwise the command stops at once with one error line
instead of failing with a traceback after minutes (or hours) of work.
"""
from __future__ import annotations

import os

from flowtok_jax.errors import UserError


def _expand(path: str) -> str:
  return os.path.abspath(os.path.expanduser(str(path)))


def _is_url(path: str) -> bool:
  return "://" in str(path)  # gs://bucket/...: checked by the storage layer, not here.


def _check_ancestors(path: str, what: str, given: str) -> None:
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"{what} {given}: {parent} is a file, not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"{what} {given}: {parent} is not writable")


def writable_dir(path: str, what: str, *, existing_may_be_read_only: bool = False) -> str:
  """The absolute path of a directory we will create or write into.

  Args:
    path: as given (may start with ~).
    what: how the message names it, e.g. '--out' or '--workdir'.
    existing_may_be_read_only: an existing directory is accepted without write permission (a
      prepared dataset on a read-only mount); only a missing one must be creatable.
  Raises:
    UserError: `path` is a file, lies under a file, or cannot be written for permissions.
  """
  if not path:
    raise UserError(f"{what} is empty")
  if _is_url(path):
    return str(path)
  full = _expand(path)
  if os.path.exists(full) and not os.path.isdir(full):
    raise UserError(f"{what} {path} is a file; give a directory")
  if os.path.isdir(full):
    if not existing_may_be_read_only and not os.access(full, os.W_OK | os.X_OK):
      raise UserError(f"{what} {path} is not writable")
    return full
  _check_ancestors(full, what, path)
  return full


def writable_file(path: str, what: str) -> str:
  """The absolute path of a file we will (over)write: not a directory, not under a file."""
  if not path:
    raise UserError(f"{what} is empty")
  if _is_url(path):
    return str(path)
  full = _expand(path)
  if os.path.isdir(full):
    raise UserError(f"{what} {path} is a directory; give a file path")
  _check_ancestors(full, what, path)
  return full
