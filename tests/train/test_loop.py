"""The one train loop on the toy stage: learning, exact resume, CLI, guards, 8 devices, SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flowtok_jax import cli, metrics, progress
from flowtok_jax.errors import UserError
from flowtok_jax.train import loop

import toy_stage  # pylint: disable=g-bad-import-order

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
STEPS = 12


def _config(**train):
  c = toy_stage.toy_config(**{"total_steps": STEPS, "eval_every_steps": 6, **train})
  return c


def _losses(workdir):
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """12 steps in one go on 1 device; the reference trajectory."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = loop.train_and_evaluate(_config(), workdir, "toy")
  return workdir, result


def test_loss_drops_and_everything_is_logged(straight_run):
  workdir, result = straight_run
  assert result.step == STEPS and result.stopped_by is None
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  first = sum(losses[s] for s in (1, 2, 3)) / 3
  last = sum(losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
  assert last < 0.5 * first, (first, last)
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  by_step = {r["step"]: r for r in rows}
  assert len(rows) == STEPS  # one line per logged step, eval merged into it
  for key in ("perf/examples_per_sec", "perf/mfu", "train/lr", "train/grad_norm"):
    assert key in by_step[STEPS]
  assert "eval/mse" in by_step[6] and "eval/mse" in by_step[STEPS] and "eval/mse" not in by_step[5]
  assert os.listdir(os.path.join(workdir, "tb"))
  # Checkpoints every 4 steps plus the final one, newest 2 kept.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["8", "12"]


def test_queued_steps_finish_before_a_save_or_evaluation_is_timed_as_a_pause(tmp_path,
                                                                               monkeypatch):
  """perf/* leaves out evaluation and checkpoint time. Steps dispatched ahead of the device
  must finish first: counted inside the pause, a save one step before a logged step had read
  92 steps/s (MFU 1.69) for a stage that ran 13."""
  import jax  # pylint: disable=g-import-not-at-top
  blocked, block = [], jax.block_until_ready
  def record(x):
    blocked.append(int(x.step))
    return block(x)
  monkeypatch.setattr(jax, "block_until_ready", record)
  # Logged at 5, 10, 12; saved at 4, 8, 12; evaluated at 6, 12. Steps 5, 10 and 12 have synced.
  loop.train_and_evaluate(_config(log_every_steps=5), str(tmp_path), "toy")
  assert blocked == [4, 6, 8]


def test_a_stage_without_analytic_flops_reports_mfu_from_xlas_count(tmp_path, monkeypatch):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from flowtok_jax.train import stage_api  # pylint: disable=g-import-not-at-top
  build = stage_api.get_builder("toy")
  monkeypatch.setitem(stage_api._REGISTRY, "toy",  # pylint: disable=protected-access
                      lambda c, ctx: dataclasses.replace(build(c, ctx), flops_per_step=None))
  workdir = str(tmp_path)
  loop.train_and_evaluate(_config(total_steps=4, eval_every_steps=0), workdir, "toy")
  last = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
  assert last["perf/mfu"] > 0 and last["perf/tflops_per_sec"] > 0


@pytest.mark.parametrize("decay", [1.0, 2.0, -0.5, float("nan")])
def test_an_ema_decay_outside_0_1_is_refused_before_any_work(tmp_path, decay):
  with pytest.raises(UserError, match="train.ema_decay must be None"):
    loop.train_and_evaluate(_config(ema_decay=decay), str(tmp_path / "w"), "toy")
  assert not os.path.exists(tmp_path / "w")


def test_resume_is_exact_through_the_cli(straight_run, tmp_path, capsys):
  ref = _losses(straight_run[0])
  workdir = str(tmp_path / "resumed")
  first = loop.train_and_evaluate(_config(), workdir, "toy", stop_at_step=STEPS // 2)
  assert (first.step, first.stopped_by) == (STEPS // 2, "stop_at_step")
  # Second half: `flowtok train` on the same workdir resumes from step 6.
  cli.main(["train", "--config", os.path.join(HERE, "toy_config.py"), "--workdir", workdir,
            f"--config.train.total_steps={STEPS}", "--config.train.eval_every_steps=6"])
  assert '"step": 12' in capsys.readouterr().out
  got = _losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))  # each step logged exactly once
  assert got == ref  # bit-identical losses


def test_stop_at_time_checkpoints_and_resumes_exactly(straight_run, tmp_path):
  """A wall-clock stop (the demo's budget) ends the run after the step in progress, with a
  checkpoint and exit code 0; a re-run without one continues the same trajectory."""
  ref = _losses(straight_run[0])
  workdir = str(tmp_path / "deadline")
  first = loop.train_and_evaluate(_config(), workdir, "toy", stop_at_time=time.time())
  assert (first.step, first.stopped_by, first.exit_code) == (1, "stop_at_time", 0)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  # A deadline far ahead changes nothing.
  second = loop.train_and_evaluate(_config(), workdir, "toy", stop_at_time=time.time() + 3600)
  assert (second.start_step, second.step, second.stopped_by) == (1, STEPS, None)
  assert _losses(workdir) == ref


def test_stop_when_checkpoints_and_resumes_exactly(straight_run, tmp_path):
  """A caller's predicate (the demo's pace check) stops the run after the step it returns True
  for, with a checkpoint and exit code 0; it sees every step once; the resumed run continues the
  same trajectory."""
  ref = _losses(straight_run[0])
  workdir = str(tmp_path / "when")
  seen = []
  first = loop.train_and_evaluate(_config(), workdir, "toy",
                                  stop_when=lambda step: seen.append(step) or step == 5)
  assert (first.step, first.stopped_by, first.exit_code) == (5, "stop_when", 0)
  assert seen == [1, 2, 3, 4, 5]
  assert max(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == 5
  second = loop.train_and_evaluate(_config(), workdir, "toy", stop_when=lambda step: False)
  assert (second.start_step, second.step, second.stopped_by) == (5, STEPS, None)
  assert _losses(workdir) == ref


def test_progress_off_a_terminal_is_whole_lines_naming_the_stage(tmp_path, capsys, monkeypatch):
  """Logs and pipes get newline-terminated progress (first step, every interval, the end) with
  the stage's name, the step count and the ETA; never a bar's carriage returns."""
  monkeypatch.setattr(progress, "LOG_SEC", 3600.0)
  result = loop.train_and_evaluate(_config(progress_bar=True), str(tmp_path / "w"), "toy")
  assert result.step == STEPS
  err = capsys.readouterr().err
  assert "\r" not in err
  lines = [line for line in err.splitlines() if line.startswith("toy: ")]
  assert len(lines) == 2, err  # After step 1 and at the end (the interval never passes).
  assert f" 1/{STEPS} [" in lines[0] and f"100% {STEPS}/{STEPS} [" in lines[1], lines
  assert "step/s" in lines[1] and "loss=" in lines[1], lines


def test_checkpoint_of_other_shapes_is_refused(straight_run):
  config = _config()
  config.toy.hidden = 48
  with pytest.raises(UserError, match=r"params/Dense_0/bias has shape \(32,\) in the checkpoint "
                                      r"but \(48,\) in the config"):
    loop.train_and_evaluate(config, straight_run[0], "toy")


def test_another_stages_checkpoint_is_named_as_such(straight_run):
  from flowtok_jax.train import stage_api  # pylint: disable=g-import-not-at-top
  stage_api.register("toy_renamed")(toy_stage.build_toy)
  config = _config()
  config.toy.hidden = 8  # Its shapes differ too: the stage must be named before any restore.
  with pytest.raises(UserError, match="holds a checkpoint of stage 'toy', not 'toy_renamed'"):
    loop.train_and_evaluate(config, straight_run[0], "toy_renamed")


def test_a_changed_optimizer_or_process_count_is_a_mismatch_not_damage(straight_run, monkeypatch):
  """Neither is a damaged checkpoint: no advice to move good checkpoints out of the way."""
  from flowtok_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  config = _config()
  config.optim.clip_norm = 1.0  # Another optimizer chain: another state layout.
  with pytest.raises(UserError, match="does not match the config: the train state's layout") as e:
    loop.train_and_evaluate(config, straight_run[0], "toy")
  assert "damaged" not in str(e.value) and "out of the way" not in str(e.value)
  where = os.path.join(straight_run[0], "checkpoints", str(STEPS))
  ckpt_lib._check_process_count(where)  # pylint: disable=protected-access
  monkeypatch.setattr(ckpt_lib.jax, "process_count", lambda: 2)
  with pytest.raises(UserError, match="written by 1 processes, this job has 2"):
    ckpt_lib._check_process_count(where)  # pylint: disable=protected-access


def test_init_from_copies_params(straight_run, tmp_path):
  config = _config(total_steps=1)
  config.init.params_from = straight_run[0]
  loop.train_and_evaluate(config, str(tmp_path), "toy")
  # Starts from the trained (EMA) params: far below the fresh model's ~1.0 first loss.
  assert _losses(str(tmp_path))[1] < 0.5 * _losses(straight_run[0])[1]


def test_a_nan_update_under_a_finite_loss_is_never_saved(tmp_path):
  """The loss is of the parameters before the update; a NaN update at a checkpoint step must not
  become the 'last good' checkpoint."""
  config = _config(ckpt_every_steps=2, log_every_steps=100)
  config.toy.nan_grad_at_step = 3  # The 4th step: a checkpoint step, not a logging step.
  workdir = str(tmp_path / "w")
  with pytest.raises(UserError, match=r"non-finite train/grad_norm \(nan\) at step 4.*step 2 kept"):
    loop.train_and_evaluate(config, workdir, "toy")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2"]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = _config(ckpt_every_steps=2)
  config.toy.nan_at_step = 4  # the 5th step
  with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 5.*step 4 kept"):
    loop.train_and_evaluate(config, str(tmp_path), "toy")
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["2", "4"]
  assert _losses(str(tmp_path))[5] == "nan"  # the diverged step is logged before stopping


def _run_toy(workdir, *overrides, env=None):
  return subprocess.Popen(
      [sys.executable, os.path.join(HERE, "toy_stage.py"), workdir, *overrides],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_eight_devices_give_the_same_losses(straight_run, tmp_path):
  workdir = str(tmp_path)
  proc = _run_toy(workdir, "mesh.shape=(2,2,2)", f"train.total_steps={STEPS}",
                  "train.eval_every_steps=6",
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out[-3000:]
  ref, got = _losses(straight_run[0]), _losses(workdir)
  assert sorted(got) == sorted(ref)
  for step, loss in ref.items():
    assert got[step] == pytest.approx(loss, rel=1e-5), step


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  workdir = str(tmp_path)
  proc = _run_toy(workdir, "train.total_steps=500", "train.ckpt_every_steps=1000",
                  "train.sleep_per_step=0.1")
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and len(open(path).readlines()) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert "stopped_by=SIGTERM" in out, out[-3000:]
  saved = int(out.split("RESULT step=")[1].split()[0])
  assert 2 <= saved < 500
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(saved)]
  # The checkpoint restores: two more steps continue from it.
  config = toy_stage.toy_config(total_steps=saved + 2)
  result = loop.train_and_evaluate(config, workdir, "toy")
  assert result.step == saved + 2
  assert sorted(_losses(workdir)) == list(range(1, saved + 3))


class _SignalAt:
  """Stands in for PreemptionGuard: reports SIGTERM from the `at`-th step on (one read a step)."""

  def __init__(self, at):
    self.at, self.reads = at, 0

  def __call__(self, enabled=True):
    del enabled
    return self

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  @property
  def signal_name(self):
    self.reads += 1
    return "SIGTERM" if self.reads >= self.at else None


def test_a_signal_saves_before_evaluating_and_the_last_step_completes(monkeypatch, tmp_path):
  from flowtok_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  # At an evaluation step: the checkpoint is written, the (slow) evaluation is not run.
  monkeypatch.setattr(ckpt_lib, "PreemptionGuard", _SignalAt(6))
  workdir = str(tmp_path / "eval_step")
  result = loop.train_and_evaluate(_config(), workdir, "toy")
  assert (result.step, result.stopped_by, result.exit_code) == (6, "SIGTERM", 143)
  rows = {r["step"]: r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}
  assert "eval/mse" not in rows[6]
  assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))
  # During the last step: the run is complete, not stopped (exit 0, final evaluation made).
  monkeypatch.setattr(ckpt_lib, "PreemptionGuard", _SignalAt(STEPS))
  workdir = str(tmp_path / "last_step")
  result = loop.train_and_evaluate(_config(), workdir, "toy")
  assert (result.step, result.stopped_by, result.exit_code) == (STEPS, None, 0)
  rows = {r["step"]: r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}
  assert "eval/mse" in rows[STEPS]


@pytest.mark.parametrize("stopped_by, code", [(None, 0), ("stop_at_step", 0), ("stop_when", 0),
                                              ("SIGINT", 130), ("SIGTERM", 143),
                                              ("preemption", 143)])
def test_flowtok_train_exits_non_zero_when_a_signal_stopped_it(monkeypatch, tmp_path, capsys,
                                                               stopped_by, code):
  """`flowtok train ... && flowtok export ...` must not export a run a signal interrupted."""
  from flowtok_jax import cli  # pylint: disable=g-import-not-at-top
  result = loop.RunResult(step=7, stopped_by=stopped_by, last_metrics={}, last_eval={})
  monkeypatch.setattr(loop, "train_and_evaluate", lambda *a, **k: result)
  argv = ["train", "--config", os.path.join(REPO, "configs", "demo.py:runlocal"), "--workdir",
          str(tmp_path)]
  if code:
    with pytest.raises(SystemExit) as e:
      cli.main(argv)
    assert e.value.code == code
  else:
    assert cli.main(argv) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stopped_by"] == stopped_by


def test_muon_state_checkpoints_and_resumes_exactly(tmp_path):
  """Muon's partitioned state (masked nodes where AdamW takes a leaf) shards, saves, restores."""
  def config():
    c = _config()
    c.optim.update(name="muon", muon_include=r"Dense_0/kernel$", lr=3e-3)
    return c
  ref = loop.train_and_evaluate(config(), str(tmp_path / "straight"), "toy")
  workdir = str(tmp_path / "resumed")
  loop.train_and_evaluate(config(), workdir, "toy", stop_at_step=STEPS // 2)
  second = loop.train_and_evaluate(config(), workdir, "toy")
  assert (second.start_step, second.step) == (STEPS // 2, STEPS)
  losses = _losses(workdir)
  assert losses == _losses(str(tmp_path / "straight")) and ref.step == STEPS
  assert losses[STEPS] < losses[1]
