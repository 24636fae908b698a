"""Orbax checkpoints: train state + grain iterator + metadata; resume order; preemption save.

Layout: `W/checkpoints/<step>/{state, data_iter, meta}`, written asynchronously by an orbax
`CheckpointManager` that keeps the newest `checkpoint.max_to_keep`. Orbax commits a step only once
every item is written, and deletes old steps only after a newer one is committed, so a crash or a
failed save never removes the last good checkpoint.

Resume order (how `train/loop.py` decides where the state comes from; the first that applies wins):
  1. `W/checkpoints` has a committed step -> restore the whole state (params, optimizer, EMA, aux,
     step, rng) and the data iterator's position, onto the current mesh, and continue the exact
     same trajectory. The checkpoint must be of the same stage and shapes (else a UserError naming
     the first mismatched parameter).
  2. `config.init.params_from` is set -> start at step 0 with parameters (params-only: no optimizer
     state, no step) copied from that workdir's latest checkpoint; parameters the checkpoint lacks
     keep their fresh initialisation (e.g. a new direction embedding), shapes must match.
  3. Otherwise -> fresh initialisation from `config.seed`.
Frozen parts of a stage (`FrozenPart.checkpoint`, e.g. `config.init.clip_from`) are always loaded
params-only with `load_params`, whatever the branch.

Restores always go through an abstract target carrying the current shardings: a checkpoint saved
on one device mesh restores onto any other. The data position is saved per process, so a full
resume needs the same number of processes (hosts); `init.params_from` takes the parameters
anywhere. A changed optimizer layout (e.g. clip_norm turned on) is a config mismatch, not damage.

Preemption: `PreemptionGuard` turns SIGTERM / SIGINT into a flag the loop checks after every step;
the loop then saves at the current step, waits for the write and returns. On multi-host runs the
decision also goes through orbax's `reached_preemption` so that all hosts stop at the same step.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import signal
import sys
import threading
from typing import Any, Sequence

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from flowtok_jax import paths
from flowtok_jax.errors import UserError

ITEMS = ("state", "data_iter", "meta")
# Subtrees of the state whose shapes are checked (with names) before a restore.
_PARAM_FIELDS = ("params", "ema_params", "aux_params")


def quiet_orbax():
  """Orbax logs every save phase at INFO through absl; keep run logs to warnings from it, minus
  the one every read-only open makes (we open finished runs read-only on purpose). Also drops
  the closed-event-loop reports that follow a failed read (`_quiet_closed_loop`)."""
  absl_logger = logging.getLogger("absl")
  if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
    absl_logger.setLevel(logging.WARNING)
  if _READ_ONLY_NOTICE not in absl_logger.filters:
    absl_logger.addFilter(_READ_ONLY_NOTICE)
  _quiet_closed_loop()


def _not_read_only_notice(record: logging.LogRecord) -> bool:
  msg = str(record.msg)
  return not (msg.startswith("Given directory is read only")
              or msg.startswith("CheckpointManagerOptions.read_only=True"))


_READ_ONLY_NOTICE = _not_read_only_notice


def _handlers():
  return {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
          "data_iter": grain.checkpoint.CheckpointHandler()}


def resolve_dir(path: str) -> tuple[str, int | None]:
  """Finds the checkpoint manager directory (and step) that `path` names.

  Accepts a workdir (holding `checkpoints/`), a checkpoints directory, or one step's directory.

  Returns:
    (manager directory, step or None for the latest).
  """
  path = paths.local(path, "checkpoint")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(base)
  if os.path.isdir(path):
    return path, None
  raise UserError(f"no checkpoint at {path}")


def resolve_step(path: str) -> tuple[str, int]:
  """(manager directory, step) of the checkpoint `path` names: its latest when it names none."""
  directory, step = resolve_dir(path)
  if step is None:
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
    if not steps:
      raise UserError(f"no checkpoint at {path}")
    step = max(steps)
  return directory, step


def _manager(directory: str, *, max_to_keep: int | None = None, async_save: bool = True,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, enable_async_checkpointing=async_save,
      read_only=read_only, create=not read_only, save_interval_steps=0 if read_only else 1)
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS,
                               item_handlers=_handlers())


def _flat_shapes(tree: Any, prefix: str) -> dict[str, tuple[int, ...]]:
  """'params/a/kernel' -> shape, for arrays, ShapeDtypeStructs and orbax ArrayMetadata."""
  out = {}
  def one(path, leaf):
    if hasattr(leaf, "shape"):
      out["/".join([prefix] + [_key(k) for k in path])] = tuple(leaf.shape)
  jax.tree_util.tree_map_with_path(one, tree)
  return out


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def check_shapes(saved: dict[str, tuple], target: dict[str, tuple], where: str, *,
                 allow_missing: bool = False) -> list[str]:
  """Raises a UserError at the first parameter whose shape differs (or is absent).

  Returns:
    Target names the checkpoint lacks (only when `allow_missing`).
  """
  missing = []
  for name, shape in target.items():
    if name not in saved:
      if allow_missing:
        missing.append(name)
        continue
      raise UserError(f"checkpoint {where} does not match the config: it has no {name} "
                      f"(expected shape {shape})")
    if tuple(saved[name]) != tuple(shape):
      raise UserError(f"checkpoint {where} does not match the config: {name} has shape "
                      f"{tuple(saved[name])} in the checkpoint but {tuple(shape)} in the config")
  return missing


def _resume_hint(mngr: ocp.CheckpointManager, step: int, where: str) -> str:
  """Names the step a run could resume from instead of a damaged `step` ('' if none)."""
  earlier = [s for s in mngr.all_steps() if s < step]
  return (f"; to resume from step {max(earlier)} instead, move {where} out of the way"
          if earlier else "")


def _saved_tree(mngr: ocp.CheckpointManager, step: int, where: str, resume: bool = False
                ) -> Any:
  try:
    meta = mngr.item_metadata(step)["state"]
  except Exception as e:  # pylint: disable=broad-except
    hint = _resume_hint(mngr, step, where) if resume else ""
    raise UserError(f"cannot read checkpoint {where} (damaged?): {_error_line(e)}{hint}"
                    ) from None
  if meta is None:
    hint = _resume_hint(mngr, step, where) if resume else ""
    raise UserError(f"checkpoint {where} has no readable train state (damaged: its state/ "
                    f"metadata is missing?){hint}")
  return getattr(meta, "tree", meta)


_MISMATCH_ADVICE = ("the train state's layout differs (optimizer settings such as optim.clip_norm "
                    "changed?): resume with the run's own config, or start a new workdir")


def _check_process_count(where: str):
  """A UserError when the data position was saved by another number of processes: each process
  resumes its own shard of the input pipeline, so the job must keep its process count."""
  names = glob.glob(os.path.join(where, "data_iter", "process_*-of-*.json"))
  counts = {int(m.group(1)) for m in (re.search(r"-of-(\d+)\.json$", n) for n in names) if m}
  if len(counts) == 1 and counts != {jax.process_count()}:
    raise UserError(f"checkpoint {where} was written by {counts.pop()} processes, this job has "
                    f"{jax.process_count()}: the data position resumes per process, so resume "
                    "with the same number of hosts (the parameters alone: init.params_from)")


def _error_line(e: BaseException) -> str:
  """`Type: first line` of an exception, without TensorStore's spec dump."""
  text = str(e).splitlines()[0] if str(e) else ""
  text = re.split(r" See full TensorStore details| \[tensorstore_spec=", text)[0]
  return f"{type(e).__name__}: {text[:300]}"


def _quiet_closed_loop():
  """When a read fails (damaged array data), orbax's reads still in flight finish on a closed
  asyncio loop and Python reports each as an unraisable 'Event loop is closed' traceback around
  our one error line. This drops exactly those reports (and the asyncio records of
  `_drop_unretrieved_read_error`); any other unraisable exception is reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, "quiets_closed_loop", False):
    return
  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)
  hook.quiets_closed_loop = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_drop_unretrieved_read_error)


def _drop_unretrieved_read_error(record: logging.LogRecord) -> bool:
  """The same failed read can also leave orbax tasks whose TensorStore error nobody retrieves;
  asyncio logs each ('Task exception was never retrieved'). The error reaches the user through
  the read that failed, so these records are dropped; asyncio's other records are kept."""
  exc = record.exc_info[1] if record.exc_info else None
  return not (str(record.msg).startswith("Task exception was never retrieved")
              and exc is not None and "tensorstore_spec" in str(exc))


class Checkpointer:
  """The run's checkpoint manager (`W/checkpoints`); use as a context manager.

  Args:
    workdir: the run's work directory.
    cfg: the `checkpoint` config section (max_to_keep, async_save).
  """

  def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
    quiet_orbax()
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._mngr = _manager(self.directory, max_to_keep=cfg.max_to_keep,
                          async_save=cfg.async_save)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, meta: dict):
    """Starts saving (async): the state's device buffers are copied before this returns."""
    if step in self._mngr.all_steps():
      return
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: Any, data_iter: Any, step: int | None = None
              ) -> tuple[Any, dict]:
    """Restores state (onto `abstract_state`'s shardings) and the iterator position in place.

    Args:
      abstract_state: tree of `jax.ShapeDtypeStruct` with shardings, shaped like the state.
      data_iter: the fresh training iterator; its position is set from the checkpoint.
      step: which step; default the latest.
    Returns:
      (state, metadata dict).
    """
    step = self._mngr.latest_step() if step is None else step
    where = os.path.join(self.directory, str(step))
    saved = _saved_tree(self._mngr, step, where, resume=True)
    for field in _PARAM_FIELDS:
      target = getattr(abstract_state, field, None)
      saved_sub = saved.get(field) if isinstance(saved, dict) else None
      if target is None and not saved_sub:
        continue
      if (target is None) != (not saved_sub):
        raise UserError(f"checkpoint {where} does not match the config: {field} is "
                        f"{'absent' if not saved_sub else 'present'} in the checkpoint but "
                        f"{'absent' if target is None else 'present'} in the config")
      check_shapes(_flat_shapes(saved_sub, field), _flat_shapes(target, field), where)
    _check_process_count(where)
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
                  abstract_state)),
          data_iter=grain.checkpoint.CheckpointRestore(data_iter),
          meta=ocp.args.JsonRestore()))
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if "tree structures do not match" in str(e):  # Readable, but not this config's state.
        raise UserError(f"checkpoint {where} does not match the config: {_MISMATCH_ADVICE} "
                        f"({_error_line(e)})") from None
      raise UserError(f"cannot restore checkpoint {where} (damaged?): {_error_line(e)}"
                      f"{_resume_hint(self._mngr, step, where)}") from None
    return restored["state"], dict(restored["meta"] or {})

  def wait(self):
    """Blocks until pending async saves are committed."""
    self._mngr.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """Orbax's multi-host preemption sync point (False when jax.distributed is not running)."""
    try:
      return bool(self._mngr.reached_preemption(step))
    except Exception:  # pylint: disable=broad-except
      return False

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def pin(path: str, step: int | None = None) -> str:
  """The step directory of `path` (a workdir, checkpoints dir or step dir): `step`, else the
  step `path` names, else its latest. Runs record the step of each frozen part they load, so a
  resume and an export read the same weights even after that part's run trains on."""
  directory, named = resolve_dir(path)
  step = named if step is None else step
  if step is None:
    mngr = _manager(directory, read_only=True)
    try:
      step = mngr.latest_step()
    finally:
      mngr.close()
    if step is None:
      raise UserError(f"no checkpoint at {path}")
  return os.path.join(directory, str(step))


def _saved_meta(mngr, step: int) -> dict:
  """The metadata saved with checkpoint `step` ({} when it is unreadable: the restore proper
  reports what is wrong)."""
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"] or {})
  except Exception:  # pylint: disable=broad-except
    return {}


def latest_meta(workdir: str) -> dict:
  """The metadata of `workdir`'s latest checkpoint ({} when it has none or it is unreadable)."""
  directory = os.path.join(paths.local(workdir, "--workdir"), "checkpoints")
  if not os.path.isdir(directory):
    return {}
  quiet_orbax()
  mngr = _manager(directory, read_only=True)
  try:
    step = mngr.latest_step()
    return {} if step is None else _saved_meta(mngr, step)
  except Exception:  # pylint: disable=broad-except
    return {}  # The restore proper reports what is wrong.
  finally:
    mngr.close()


def load_params(path: str, target: Any, *, select: Sequence[str] = (), use_ema: bool = True,
                allow_missing: bool = False) -> tuple[Any, list[str]]:
  """Loads (a subtree of) a checkpoint's parameters only, onto `target`'s shardings.

  Args:
    path: a workdir, its `checkpoints/` directory or one step's directory (latest step if none).
    target: tree of `jax.ShapeDtypeStruct` with shardings: what to load, shaped as wanted.
    select: path inside the saved parameter tree (e.g. `('text',)`); `()` takes the whole tree.
    use_ema: read `ema_params` (falling back to `params` when the checkpoint has no EMA).
    allow_missing: parameters of `target` absent from the checkpoint are returned as None leaves
      and listed, instead of being an error (init_from into a grown model).
  Returns:
    (params tree shaped like `target`, with None where missing; names of the missing params).
  """
  quiet_orbax()
  directory, step = resolve_dir(path)
  mngr = _manager(directory, read_only=True)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint at {path}")
    where = os.path.join(directory, str(step))
    saved = _saved_tree(mngr, step, where)
    field = "ema_params" if use_ema and saved.get("ema_params") else "params"
    sub = saved.get(field)
    for i, k in enumerate(select):
      if not isinstance(sub, dict) or k not in sub:
        stage = _saved_meta(mngr, step).get("stage")
        raise UserError(f"checkpoint {where} has no {'/'.join([field, *select[:i + 1]])}"
                        + (f": it is a {stage!r}-stage checkpoint" if stage else ""))
      sub = sub[k]
    prefix = "/".join([field, *select])
    missing = check_shapes(_flat_shapes(sub, prefix), _flat_shapes(target, prefix), where,
                           allow_missing=allow_missing)
    present = _drop(target, {m[len(prefix) + 1:] for m in missing})
    wrapped = present
    for k in reversed((field, *select)):
      wrapped = {k: wrapped}
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          wrapped, restore_args=ocp.checkpoint_utils.construct_restore_args(wrapped),
          partial_restore=True)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      # Damaged array data (truncated or overwritten files) surfaces here, after the metadata
      # checks above passed.
      raise UserError(f"cannot read the parameters of checkpoint {where} (damaged?): "
                      f"{_error_line(e)}") from None
    for k in (field, *select):
      restored = restored[k]
    return _fill(target, restored), missing
  finally:
    mngr.close()


def _drop(tree: Any, names: set[str]) -> Any:
  """A nested-dict copy of `tree` without the leaves whose '/'-joined path is in `names`."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    sub = {n[len(str(k)) + 1:] for n in names if n.startswith(f"{k}/")}
    if str(k) in names:
      continue
    v = _drop(v, sub) if isinstance(v, dict) else v
    if not (isinstance(v, dict) and not v and isinstance(tree[k], dict) and tree[k]):
      out[k] = v
  return out


def _fill(target: Any, restored: Any) -> Any:
  """`restored` laid out like `target` (nested dicts), None where the checkpoint had nothing."""
  if isinstance(target, dict):
    restored = restored if isinstance(restored, dict) else {}
    return {k: _fill(v, restored.get(k)) for k, v in target.items()}
  return restored


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag for the loop (main thread only); restores the handlers.

  Args:
    enabled: install the handlers. Multi-host runs leave SIGTERM to JAX's preemption notifier
      (read through `Checkpointer.reached_preemption`), which makes every host stop at the same
      step; a per-host Python flag could not.
  """

  def __init__(self, enabled: bool = True):
    self.signal_name: str | None = None
    self._enabled = enabled
    self._old = {}

  def __enter__(self):
    if self._enabled and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now.
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint at the end of this step", self.signal_name)

  @property
  def stop(self) -> bool:
    return self.signal_name is not None

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
