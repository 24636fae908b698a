"""Checks on paths the user asks us to write, made before any work is done.

A directory or file to be written must not be, or lie under, an existing file, and its nearest
existing ancestor must be writable; otherwise the command stops at once with one error line
instead of failing with a traceback after minutes (or hours) of work.
"""
from __future__ import annotations

import os

from flowtok_jax.errors import UserError


def resolve(path: str) -> str:
  """The absolute, ~-expanded form of a local path; a URL (gs://...) unchanged."""
  if "://" in str(path):  # Checked by the storage layer, not here.
    return str(path)
  return os.path.abspath(os.path.expanduser(str(path)))


def local(path: str, what: str) -> str:
  """`resolve(path)` for a path this project reads or writes with file-system calls (work
  directories, checkpoints to load, outputs): a URL is a UserError saying to mount the bucket."""
  if "://" in str(path):
    raise UserError(f"{what} {path}: object-store URLs are not read or written directly; mount "
                    "the bucket (e.g. Cloud Storage FUSE: gcsfuse BUCKET /gcs/BUCKET) and give "
                    "the mounted path")
  return resolve(path)


def _resolve_given(path: str, what: str) -> str:
  if not path:
    raise UserError(f"{what} is empty")
  return local(path, what)


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
  full = _resolve_given(path, what)
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
  full = _resolve_given(path, what)
  if os.path.isdir(full):
    raise UserError(f"{what} {path} is a directory; give a file path")
  _check_ancestors(full, what, path)
  return full
