"""metrics.jsonl / TensorBoard writer, periodic-action timing, non-finite guard, throughput."""
import os

import numpy as np
import pytest

from flowtok_jax import metrics
from flowtok_jax.errors import UserError


def test_itstime():
  fired = [s for s in range(1, 11) if metrics.itstime(s, 4, 10)]
  assert fired == [4, 8, 10]  # every 4 and the last step
  assert [s for s in range(1, 11) if metrics.itstime(s, 0, 10)] == [10]
  assert not any(metrics.itstime(s, 0, 10, last=False) for s in range(1, 11))


def test_writer_jsonl_tb_and_truncation_on_resume(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3, 4):
    w.write_scalars(step, {"train/loss": 1.0 / step, "perf/mfu": 0.5})
  w.write_scalars(5, {"train/loss": float("nan")})
  paths = w.write_images(4, {"samples": np.random.default_rng(0).random((5, 8, 8, 3))})
  w.close()
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert rows[0] == {"step": 1, "perf/mfu": 0.5, "train/loss": 1.0}
  assert rows[-1] == {"step": 5, "train/loss": "nan"}  # valid JSON even for NaN
  assert os.listdir(tmp_path / "tb")
  assert paths["samples"].endswith(os.path.join("images", "samples", "00000004.png"))
  # A run resumed from the step-2 checkpoint drops what was logged after it.
  w = metrics.MetricWriter(str(tmp_path), resume_step=2, enabled=True)
  w.write_scalars(3, {"train/loss": 9.0})
  w.close()
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["train/loss"] == 9.0


def test_disabled_writer_writes_nothing(tmp_path):
  w = metrics.MetricWriter(str(tmp_path / "w"), enabled=False)
  w.write_scalars(1, {"train/loss": 1.0})
  w.close()
  assert not os.path.exists(tmp_path / "w")


def test_check_finite_names_step_and_checkpoint():
  metrics.check_finite({"train/loss": 0.3}, 5, 4)
  with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 7.*step 5 kept"):
    metrics.check_finite({"train/loss": float("nan")}, 7, 5)
  with pytest.raises(UserError, match="at step 1"):
    metrics.check_finite({"train/loss": float("inf")}, 1, None)
  # The state about to be saved: parameter and gradient norms (the loss first when both fail).
  with pytest.raises(UserError, match=r"non-finite train/param_norm \(inf\) at step 3"):
    metrics.check_finite({"train/loss": 0.3, "train/param_norm": float("inf")}, 3, 2)
  with pytest.raises(UserError, match=r"non-finite loss \(nan\)"):
    metrics.check_finite({"train/grad_norm": float("nan"), "train/loss": float("nan")}, 3, 2)
  metrics.check_finite({"train/loss": 0.3, "train/lr": float("nan")}, 3, 2)  # Not the state.


def test_throughput_and_mfu():
  t = metrics.Throughput(batch_size=10, flops_per_step=1e9, peak_flops=4e9)
  t._t0 -= 2.0  # pretend 2 s passed for 4 steps  pylint: disable=protected-access
  out = t.measure(4)
  assert out["perf/examples_per_sec"] == pytest.approx(20.0, rel=0.05)
  assert out["perf/mfu"] == pytest.approx(0.5, rel=0.05)  # 2e9 FLOP/s of 4e9


def test_image_grid():
  g = metrics.image_grid(np.ones((5, 4, 6, 3), np.float32))
  assert g.shape == (8, 18, 3) and g.dtype == np.uint8  # 2 rows x 3 columns
  assert g[:4, :6].min() == 255 and g[4:, 12:].max() == 0  # the 6th cell is empty
