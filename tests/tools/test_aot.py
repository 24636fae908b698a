"""flowtok aot: compile for a TPU topology on this CPU machine (needs libtpu, the `tpu` extra)."""
import json
import os
import subprocess
import sys
import types

import pytest

from flowtok_jax import config_lib
from flowtok_jax.errors import UserError
from flowtok_jax.tools import aot

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_CONFIG = os.path.join(REPO, "tests", "train", "toy_config.py")


def _has_libtpu() -> bool:
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


needs_libtpu = pytest.mark.skipif(
    not _has_libtpu(), reason="libtpu is not installed (pip install 'jax[tpu]==0.10.2', the "
                              "`tpu` extra)")


# tests/train/conftest.py turns on a process-wide persistent compilation cache, and jax decides
# once per process whether to use it: in a pytest-xdist worker that also ran the train tests, a
# TPU-topology compile looks the program up there and warns that it cannot load an executable
# without a TPU client. Harmless (the compile goes on); `flowtok aot` alone never enables it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning")

def test_memory_report_counts_donated_buffers_once_and_judges_the_fit():
  mem = types.SimpleNamespace(argument_size_in_bytes=10 << 30, output_size_in_bytes=9 << 30,
                              alias_size_in_bytes=9 << 30, temp_size_in_bytes=5 << 30,
                              generated_code_size_in_bytes=1 << 30)
  compiled = types.SimpleNamespace(memory_analysis=lambda: mem)
  report = aot.memory_report(compiled, 16 * 2**30)
  assert report["total_bytes"] == 16 << 30 and report["fits"]
  assert not aot.memory_report(compiled, 15.9 * 2**30)["fits"]


def test_unknown_generation_is_a_user_error():
  with pytest.raises(UserError, match="unknown TPU generation 'v9'"):
    aot.chip_of("v9:2x2")
  assert aot.chip_of("v5p:2x2x1").hbm_gib == 95 and aot.chip_of("v5e:2x2").hbm_gib == 16


def test_accelerator_type_names_the_slice():
  assert aot.accelerator_type("v5p:2x2x1") == "v5p-8"  # v4 / v5p names count TensorCores.
  assert aot.accelerator_type("v4:2x2x2") == "v4-16"
  assert aot.accelerator_type("v5e:4x4") == "v5litepod-16"
  assert aot.accelerator_type("v6e:2x2") == "v6e-4"
  assert aot.accelerator_type("v5p:two") is None


@needs_libtpu
def test_mesh_must_fit_the_topology():
  config = config_lib.load(TOY_CONFIG, ["mesh.shape=(3, 1, 1)"])
  with pytest.raises(UserError, match=r"needs 3 devices, but 4 are available"):
    aot.run(config, "v5e:2x2", what=("train",))
  with pytest.raises(UserError, match="cannot describe TPU topology 'v5p:3x3x3x3'"):
    aot.run(config, "v5p:3x3x3x3", what=("train",))


@needs_libtpu
def test_cli_compiles_the_loop_train_step_for_a_small_topology():
  # The train loop's step (toy stage: an MLP with logical axes), FSDP x tensor over 4 v5e chips.
  out = subprocess.run(
      [sys.executable, "-m", "flowtok_jax", "aot", "--config", TOY_CONFIG, "--topology",
       "v5e:2x2", "--what", "train", "--config.mesh.shape=(1, 2, 2)",
       "--config.train.batch_size=16"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4 and result["hbm_per_device_gib"] == 16
  (train,) = result["programs"]
  assert train["program"] == "train" and train["examples"] == 16
  assert train["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2} and train["fits"]
  assert 0 < train["total_bytes"] < 64 << 20 and train["argument_bytes"] > 0
  # The state is donated: the new state reuses its buffers.
  assert train["alias_bytes"] > 0
  assert train["xla_flops_per_device"] > 0 and train["analytic_flops_per_device"] > 0
  assert "fits" in out.stdout and "v5e:2x2: 4 devices on 1 host(s)" in out.stdout
  # libtpu's TPU-VM lookups (accelerator type, worker hostnames) print nothing on a CPU host.
  assert "could not determine" not in out.stderr and "worker hostname" not in out.stderr, (
      out.stderr[-2000:])


@needs_libtpu
def test_tiny_flowtok_captioning_sampler_compiles_for_v5e():
  # The real FlowTok I2T program (encoder, ODE with CFG in one loop, text decoder), data-parallel.
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py:runlocal"))
  result = aot.run(config, "v5e:2x2", what=("caption",), sample_batch=8, steps=2)
  (caption,) = result["programs"]
  assert caption["program"] == "sample_i2t" and caption["examples"] == 8
  assert caption["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and caption["fits"]
  assert caption["hlo_while_loops"] >= 1  # the ODE: XLA counts its body once
  assert caption["xla_flops_per_device"] < caption["analytic_flops_per_device"]


@needs_libtpu
@pytest.mark.skipif(not os.environ.get("FLOWTOK_SLOW_TESTS"),
                    reason="compiles the whole FlowTok step and sampler for TPU (minutes on 2 "
                           "cores); set FLOWTOK_SLOW_TESTS=1")
def test_tiny_flowtok_train_step_and_sampler_compile_for_v5p():
  config = config_lib.load(os.path.join(REPO, "configs", "flowtok.py:runlocal"))
  result = aot.run(config, "v5p:2x2x1", what=("train", "sample"), sample_batch=8, steps=2)
  train, sample = result["programs"]
  assert train["fits"] and sample["fits"] and sample["examples"] == 8
  assert train["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  # At this width elementwise work is a visible share of XLA's count; the matmuls dominate.
  ratio = train["xla_flops_per_device"] / train["analytic_flops_per_device"]
  assert 0.9 < ratio < 1.5
