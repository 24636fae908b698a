r"""Thin absl entry point for training, as launched on every host of a TPU pod.

    python launch/train.py --config configs/flowtok_b.py --workdir runs/x \
        [--config.train.total_steps=100] [--stage flowtok] [--distributed]

It does what `flowtok train` does (same library call, same config overrides); `--distributed`
first starts multi-host JAX (cluster from the environment, or --coordinator/--num_processes/
--process_id for local multi-process runs). Running under absl also parses the flags grain's
worker processes read.
"""
import sys

from absl import app
from absl import flags

from flowtok_jax import config_lib
from flowtok_jax.errors import UserError

_CONFIG = flags.DEFINE_string("config", None, "config file with optional argument", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory; re-running resumes", required=True)
_STAGE = flags.DEFINE_string("stage", None, "stage to train (default: config.train.stage)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize first")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (local runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (local runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (local runs)")


def _split_config_overrides(argv):
  """Pulls `--config.key=value` out of argv (absl does not know those flags)."""
  rest, overrides = [], []
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      overrides.append(a[len("--config."):])
    else:
      rest.append(a)
  return rest, overrides


_ARGV, _OVERRIDES = _split_config_overrides(sys.argv)


def main(argv):
  del argv
  from flowtok_jax import sharding  # pylint: disable=g-import-not-at-top
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    if _DISTRIBUTED.value or _COORDINATOR.value:
      sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = config_lib.load(_CONFIG.value, _OVERRIDES)
    result = loop.train_and_evaluate(config, _WORKDIR.value, _STAGE.value)
  except UserError as e:
    print(f"flowtok: error: {e}", file=sys.stderr)
    sys.exit(2)
  if result.stopped_by:
    print(f"stopped at step {result.step} ({result.stopped_by})")
  else:
    print(f"finished at step {result.step}")
  if result.exit_code:  # Stopped by a signal (preemption): the scheduler must see a failure.
    sys.exit(result.exit_code)


def _parse_flags(argv):
  """absl's parser, with a bad or missing flag as one error line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"flowtok: error: {e}", file=sys.stderr)
    sys.exit(2)
  except SystemExit as e:  # absl's --help / --helpshort / --helpfull print, then exit 1.
    if e.code == 1 and _HELP_FLAGS.intersection(argv[1:]):
      sys.exit(0)
    raise


_HELP_FLAGS = frozenset(f"--{h}" for h in ("help", "helpshort", "helpfull", "helpxml")) | {"-?"}


if __name__ == "__main__":
  app.run(main, argv=_ARGV, flags_parser=_parse_flags)
