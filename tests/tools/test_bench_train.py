"""flowtok bench train: the loop's train step timed on random data, with analytic MFU."""
import json
import os

import pytest

from flowtok_jax import cli
from flowtok_jax import config_lib
from flowtok_jax.errors import UserError
from flowtok_jax.tools import bench

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_CONFIG = os.path.join(REPO, "tests", "train", "toy_config.py")


def test_bench_train_reports_rates_flops_mfu_and_memory(capsys, monkeypatch):
  monkeypatch.setattr(bench, "PEAK_MATMUL_SIZE_CPU", 512)  # a quicker peak measurement
  cli.main(["bench", "train", "--config", TOY_CONFIG, "--batch_size", "16", "--steps", "3",
            "--warmup", "2"])
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r["bench"] == "train" and r["stage"] == "toy" and r["batch_size"] == 16
  assert r["compile_s"] > 0 and 0 < r["step_s_min"] <= r["step_s"]
  assert abs(r["examples_per_sec"] - 16 / r["step_s"]) < 0.02 * r["examples_per_sec"]
  # The toy stage's own analytic count (6 · B · weights) at batch 16, and MFU from it.
  assert r["flops_per_step"] == 6 * 16 * (16 * 32 + 32 * 4) and r["flops_source"] == "analytic"
  assert abs(r["mfu"] - r["flops_per_sec"] / r["peak_flops_per_device"]) < 1e-3
  assert r["warmup_steps"] == 2 and r["peak_flops"] == r["peak_flops_per_device"]
  assert r["peak_flops_per_device"] > 1e8  # a measured matmul, not a default
  assert r["xla_flops_per_step"] > 0 and r["temp_mib"] >= 0 and r["max_rss_mib"] > 0


def test_bench_train_of_a_stage_without_analytic_flops_uses_xlas_count(capsys, monkeypatch):
  monkeypatch.setattr(bench, "PEAK_MATMUL_SIZE_CPU", 512)
  demo = os.path.join(REPO, "configs", "demo.py") + ":runlocal"
  cli.main(["bench", "train", "--config", demo, "--stage", "tokenizer", "--batch_size", "4",
            "--steps", "2", "--warmup", "1"])
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r["stage"] == "tokenizer" and r["flops_source"] == "xla"
  assert r["flops_per_step"] == r["xla_flops_per_step"] > 0 and r["mfu"] > 0


def test_mesh_peak_counts_cpu_host_devices_once(monkeypatch):
  """Fake CPU devices share the cores one device's matmul saturates: the machine's peak is the
  one measurement; accelerator chips add up."""
  import jax  # pylint: disable=g-import-not-at-top

  class Dev:
    def __init__(self, platform):
      self.platform = platform

  monkeypatch.setattr(jax, "devices", lambda: [Dev("cpu")])
  assert bench._mesh_peak(1e11, 8) == 1e11
  monkeypatch.setattr(jax, "devices", lambda: [Dev("tpu")])
  assert bench._mesh_peak(1e14, 8) == 8e14


def test_step_counts_are_checked_before_any_compile():
  """Both timers refuse no timed steps or a negative warm-up with one line, before compiling."""
  config = config_lib.load(TOY_CONFIG)
  for call in (lambda **kw: bench.train_step_seconds(config, "toy", **kw),
               lambda **kw: bench.bench_train(config, **kw)):
    for steps, warmup in ((0, 1), (3, -1)):
      with pytest.raises(UserError, match="steps must be >= 1 and warmup >= 0"):
        call(steps=steps, warmup=warmup)
