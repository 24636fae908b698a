r"""Expands a config's `get_sweep(add, arg)` into one launch command per run.

    python launch/sweep.py --config configs/flowtok_xl.py:sweep=batch \
        --workdir_root /gcs/BUCKET/sweeps/xl_batch --dry_run
    python launch/sweep.py --config configs/i2t_coco.py:sweep=cfg --workdir_root runs/cfg \
        --command 'flowtok bench sample --config {config} {overrides}' --dry_run

`get_sweep(add, arg)` calls `add(**{"dotted.key": value, ...})` once per run; every run is
loaded (config + overrides) before anything starts, so an unknown key or a bad value fails the
whole sweep up front. A run's name is built from its overrides (`lr=0.0002-batch_size=2048`) and
its workdir is `<workdir_root>/<name>`. The default command is `launch/train.py` with the
overrides as `--config.key=value` flags; `--command` is a template with the fields {config},
{workdir}, {overrides} and {name} (wrap it in `launch/tpu_pod.sh run ... --` to run on a pod).
Without --dry_run the commands run one after the other here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Any, Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from flowtok_jax import config_lib  # pylint: disable=wrong-import-position
from flowtok_jax.errors import UserError  # pylint: disable=wrong-import-position

DEFAULT_COMMAND = ("{python} " + os.path.join("launch", "train.py")
                   + " --config {config} --workdir {workdir} {overrides}")


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of a sweep: a name and the `key=value` overrides of the base config."""
  name: str
  overrides: tuple[tuple[str, Any], ...]

  def override_flags(self) -> list[str]:
    return [f"--config.{k}={_literal(v)}" for k, v in self.overrides]


def _literal(value: Any) -> str:
  """A value as `config_lib` reads it back (repr of tuples/lists, plain text otherwise)."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def _name(overrides: Sequence[tuple[str, Any]]) -> str:
  parts = []
  for key, value in overrides:
    text = _literal(value).replace(" ", "").replace("/", "_")
    parts.append(f"{key.rsplit('.', 1)[-1]}={text}")
  return "-".join(parts) or "base"


def expand(config_arg: str) -> list[Run]:
  """The runs of `path[:arg]`'s `get_sweep`, each checked by loading its config.

  Raises:
    UserError: the file has no get_sweep, the sweep is empty, two runs share a name, or a run's
      overrides do not apply to the config.
  """
  path, _, arg = config_arg.partition(":")
  module = config_lib.load_module(path)
  if not hasattr(module, "get_sweep"):
    raise UserError(f"config file {path} defines no get_sweep(add, arg)")
  runs: list[Run] = []

  def add(**overrides):
    runs.append(Run(_name(list(overrides.items())), tuple(overrides.items())))

  with config_lib.errors_in(path):
    module.get_sweep(add, arg or None)
  if not runs:
    raise UserError(f"{config_arg}: get_sweep added no runs")
  names = [r.name for r in runs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise UserError(f"{config_arg}: several runs are named {dupes[0]!r}")
  for run in runs:
    config_lib.load(config_arg, [f"{k}={_literal(v)}" for k, v in run.overrides])
  return runs


def commands(config_arg: str, runs: Sequence[Run], workdir_root: str,
             template: str = DEFAULT_COMMAND, extra: Sequence[str] = ()) -> list[str]:
  """Shell command lines, one per run (`extra` flags appended to each)."""
  out = []
  for run in runs:
    flags = " ".join(shlex.quote(f) for f in list(run.override_flags()) + list(extra))
    out.append(template.format(
        python=shlex.quote(sys.executable), config=shlex.quote(config_arg),
        workdir=shlex.quote(workdir_root.rstrip("/") + "/" + run.name), overrides=flags,
        name=shlex.quote(run.name)).strip())
  return out


def main(argv: Sequence[str] | None = None,
         run_command: Callable[[str], int] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="config file with its argument, path[:arg]")
  p.add_argument("--workdir_root", default="runs/sweep", help="each run works in ROOT/<name>")
  p.add_argument("--command", default=DEFAULT_COMMAND,
                 help="command template: {config} {workdir} {overrides} {name} {python}")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--keep_going", action="store_true", help="run the rest after a failure")
  args, extra = p.parse_known_args(argv)
  try:
    lines = commands(args.config, expand(args.config), args.workdir_root, args.command, extra)
  except (UserError, KeyError, IndexError, ValueError) as e:
    print(f"sweep: error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    print("\n".join(lines))
    return 0
  run_command = run_command or (lambda line: subprocess.run(line, shell=True, cwd=REPO).returncode)
  status = 0
  for i, line in enumerate(lines):
    print(f"[{i + 1}/{len(lines)}] {line}", flush=True)
    rc = run_command(line)
    if rc:
      status = status or rc
      print(f"sweep: run {i + 1} failed with exit code {rc}", file=sys.stderr)
      if not args.keep_going:
        break
  return status


if __name__ == "__main__":
  sys.exit(main())
