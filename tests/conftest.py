"""Shared fixtures: CPU-only JAX, the repository's demo config, a tiny built shapes dataset."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Before anything imports jax.
# Tests run tiny models, so XLA compile time dominates: the lowest backend optimisation level
# compiles several times faster on CPU and keeps results deterministic. Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.py")


@pytest.fixture(scope="session")
def runlocal_config():
  """`configs/demo.py:runlocal`, locked (as the CLI loads it)."""
  from flowtok_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load(DEMO_CONFIG + ":runlocal")


@pytest.fixture(scope="session")
def shapes_data_dir(runlocal_config, tmp_path_factory):
  """captioned_shapes at runlocal sizes, built once per session (per xdist worker).

  Returns:
    (data_config, data_dir): the `data` section of `configs/demo.py:runlocal` and the TFDS data
    dir holding the built dataset (train 256, val/test/compositional 64 each, 64 px).
  """
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builders.build(runlocal_config.data, data_dir)
  return runlocal_config.data, data_dir


# -- export / inference / eval: a tiny bundle from fake runs (tests/tiny_bundle.py) --------------

@pytest.fixture(scope="session")
def tiny_runs(shapes_data_dir, tmp_path_factory):
  """Untrained clip / tokenizer / flowtok runs written as checkpoints (no training)."""
  import tiny_bundle  # pylint: disable=g-import-not-at-top
  data_cfg, data_dir = shapes_data_dir
  return tiny_bundle.make_runs(str(tmp_path_factory.mktemp("runs")), data_cfg, data_dir)


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_runs):
  """The two-way run exported with 4-step sampler defaults (no jax.export programs)."""
  from flowtok_jax import export  # pylint: disable=g-import-not-at-top
  out = os.path.join(tiny_runs.root, "bundle")
  export.export_bundle(tiny_runs.flowtok, out, steps=4)
  return out
