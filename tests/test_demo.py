"""`flowtok demo` end to end at a tiny size: every stage runs and every output file appears."""
import functools
import itertools
import json
import os
import shutil

import pytest

from flowtok_jax import demo

# A few steps per stage: this checks the wiring, not the quality (docs/benchmarks.md has that).
# Each stage sets its own eval / checkpoint periods, so the stages' evaluators run once, at their
# last step, and the end-of-stage checkpoint is the only one.
TINY = ["stages.clip.train.total_steps=2", "stages.tokenizer.train.total_steps=2",
        "stages.flowtok.train.total_steps=2", "train.log_every_steps=1",
        "train.progress_bar=False", "eval.num=4", "eval.batch_size=4", "eval.frechet_steps=2",
        "eval.steps=2"]
# The runlocal config trains its few steps on any host; the step-scaling tests turn it on (and
# FlowTok's filling of the budget off, but where they test it).
SCALED = ["budget.scale_steps=True", "budget.fill_last_stage=False"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal", TINY)
  return workdir, metrics


def test_demo_writes_every_output(demo_run):
  workdir, metrics = demo_run
  for name in ("preview.png", "text_tokenizer.model", "report.html", "metrics.json",
               "bundle", "eval/eval.json", "clip/metrics.jsonl", "tokenizer/metrics.jsonl",
               "flowtok/metrics.jsonl"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f) == metrics
  for stage in ("data", "text_tokenizer", "clip", "tokenizer", "flowtok", "export", "eval"):
    assert metrics[f"time/{stage}_sec"] >= 0
  for key in ("eval/t2i/test/accuracy", "eval/i2t/test/exact", "eval/tokenizer/val/psnr",
              "eval/tokenizer/val/parser_recon", "eval/t2i/test/parser_gt"):
    assert key in metrics, key
  # Two steps of training cannot meet the bars: they must be reported as missed, with the gap.
  assert metrics["bar/t2i_test_accuracy/met"] is False
  assert metrics["bar/t2i_test_accuracy/short_by"] > 0
  assert metrics["flowtok/final_step"] == 2 and metrics["flowtok/train/frac_i2t"] >= 0
  # One matmul-peak measurement (step scaling off here) is every stage's MFU denominator.
  assert metrics["budget/peak_flops"] > 0
  for stage in ("clip", "tokenizer", "flowtok"):
    assert metrics[f"{stage}/perf/mfu"] > 0, stage
  # The bundle's I2T steps were chosen on val among the runlocal candidates (1, 4); with no
  # caption right at either (two training steps), the default 20 stays.
  exact = {k: metrics[f"export/i2t_val_exact_at_{k}_steps"] for k in (1, 4)}
  best = max((1, 4), key=lambda k: (exact[k], -k))
  assert metrics["export/i2t_steps"] == (best if exact[best] > 0 else 20)
  with open(os.path.join(workdir, "bundle", "bundle.json")) as f:
    defaults = json.load(f)["defaults"]
  assert defaults["i2t"]["steps"] == metrics["export/i2t_steps"]
  assert defaults["t2i"]["steps"] == 20
  with open(os.path.join(workdir, "report.html")) as f:
    page = f.read()
  assert "eval/t2i/test/accuracy" in page and "<img" in page


def test_demo_rerun_resumes_without_retraining(demo_run):
  workdir, first = demo_run
  stamp = os.path.getmtime(os.path.join(workdir, "text_tokenizer.model"))
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal", TINY)
  assert os.path.getmtime(os.path.join(workdir, "text_tokenizer.model")) == stamp
  for stage in ("clip", "tokenizer", "flowtok"):
    assert metrics[f"{stage}/final_step"] == 2
  # Skipped stages keep the times of the run that did their work; the total adds those up.
  for stage in ("data", "text_tokenizer", "clip", "tokenizer", "flowtok", "export"):
    assert metrics[f"time/{stage}_sec"] == first[f"time/{stage}_sec"], stage
  stages = [v for k, v in metrics.items() if k.startswith("time/") and k != "time/total_sec"
            and k != "time/report_sec"]
  assert metrics["time/total_sec"] == pytest.approx(sum(stages))


def test_a_demo_stopped_between_export_and_the_step_choice_makes_the_choice(demo_run,
                                                                            monkeypatch):
  """The bundle is newer than the checkpoints, but the choice was never recorded."""
  from flowtok_jax.evaluation import run_eval  # pylint: disable=g-import-not-at-top
  workdir, _ = demo_run
  metrics = demo._read_metrics(workdir)  # pylint: disable=protected-access
  metrics.pop("export/i2t_steps")
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(metrics, f)
  monkeypatch.setattr(run_eval, "select_i2t_steps", lambda *a, **k: (4, {1: 0.25, 4: 0.5}))
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal", TINY)
  assert metrics["export/i2t_steps"] == 4 and metrics["export/i2t_val_exact_at_4_steps"] == 0.5
  with open(os.path.join(workdir, "bundle", "bundle.json")) as f:
    assert json.load(f)["defaults"]["i2t"]["steps"] == 4


def test_a_demo_over_its_time_budget_stops_flowtok_and_still_exports(demo_run, tmp_path):
  """On a machine too slow for the budget, FlowTok stops early (checkpointed), the bundle and
  evaluation use that checkpoint, and metrics.json says so; earlier stages are untouched."""
  workdir = str(tmp_path / "w")
  shutil.copytree(demo_run[0], workdir)
  # Two more FlowTok steps asked for, and a budget already spent when FlowTok starts.
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal",
                          [*TINY, "stages.flowtok.train.total_steps=4", "budget.total_sec=1",
                           "budget.after_training_sec=0.5", "budget.margin_sec=0"])
  assert metrics["flowtok/final_step"] == 3 and metrics["flowtok/stopped_by_budget"] == 1.0
  # The resumed run recorded (and reloaded) the frozen steps it trained with.
  from flowtok_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  assert ckpt_lib.latest_meta(os.path.join(workdir, "flowtok"))["frozen"] == {
      "clip_text": 2, "image_encoder": 2}
  for stage in ("clip", "tokenizer"):
    assert metrics[f"{stage}/final_step"] == 2
  with open(os.path.join(workdir, "bundle", "bundle.json")) as f:
    assert json.load(f)["source"]["step"] == 3
  assert "eval/i2t/test/exact" in metrics


def _fake_peak(monkeypatch, flops):
  from flowtok_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(metrics_lib, "measure_peak_flops", lambda *a, **k: flops)


def _fake_rate(monkeypatch, steps_per_sec):
  """The timed train step (`demo.step_rate`) runs at `steps_per_sec` on this 'host'."""
  from flowtok_jax.tools import bench  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(bench, "train_step_seconds", lambda *a, **k: 1.0 / steps_per_sec)


def _steps(config, stage):
  from flowtok_jax.train import stage_api  # pylint: disable=g-import-not-at-top
  train = stage_api.config_for_stage(config, stage).train
  return train.total_steps, train.ckpt_every_steps, train.eval_every_steps


def test_a_faster_host_trains_proportionally_more_steps(monkeypatch, tmp_path):
  workdir = str(tmp_path)
  config = demo.demo_config(workdir, demo.DEFAULT_CONFIG + ":runlocal", SCALED)
  ref = config.budget.reference_steps_per_sec
  assert _steps(config, "tokenizer") == (20, 10, 10)
  _fake_rate(monkeypatch, 1.5 * ref)
  _fake_peak(monkeypatch, 3e11)
  demo.host_peak(config, workdir)
  assert demo.scale_steps(config, workdir) == 1.5
  # Host factor 1.5: FlowTok (weight 3.0) trains 1 + 3.0 * 0.5 = 2.5 times its steps, the
  # tokenizer (weight 2.5) 1 + 2.5 * 0.5 = 2.25 times. Checkpoint and evaluation periods scale
  # with the run; CLIP (not in scaled_stages) does not.
  assert dict(config.budget.scaled_stages) == {"tokenizer": 2.5, "flowtok": 3.0}
  assert _steps(config, "tokenizer") == (45, 23, 23)  # Saved at 23 and 45, as at 10 and 20.
  assert _steps(config, "flowtok")[0] == 50 and _steps(config, "clip")[0] == 20
  recorded = demo._read_metrics(workdir)  # pylint: disable=protected-access
  assert recorded["budget/step_scale"] == 1.5
  assert recorded["budget/steps_per_sec"] == pytest.approx(1.5 * ref)
  # The one peak measurement is every stage's MFU denominator (they do not measure again).
  from flowtok_jax.train import stage_api  # pylint: disable=g-import-not-at-top
  assert stage_api.config_for_stage(config, "clip").train.peak_flops_per_device == 3e11
  # A re-run keeps the recorded plan, whatever the host measures now.
  _fake_rate(monkeypatch, 0.5 * ref)
  _fake_peak(monkeypatch, 1e11)
  config = demo.demo_config(workdir, demo.DEFAULT_CONFIG + ":runlocal", SCALED)
  assert demo.scale_steps(config, workdir) == 1.5 and _steps(config, "flowtok")[0] == 50
  assert demo.host_peak(config, workdir) == 3e11  # The recorded peak, not a new one.
  assert config.train.peak_flops_per_device == 3e11


def test_the_plan_times_the_real_train_step(tmp_path):
  # Unfaked: the runlocal tokenizer's compiled step, timed on this host, sets f (recorded).
  workdir = str(tmp_path)
  config = demo.demo_config(workdir, demo.DEFAULT_CONFIG + ":runlocal", SCALED)
  rate = demo.step_rate(config, workdir)
  recorded = demo._read_metrics(workdir)  # pylint: disable=protected-access
  assert rate > 0 and recorded["budget/steps_per_sec"] == rate
  assert recorded["budget/step_timing_sec"] > 0
  expected = round(min(config.budget.max_step_scale,
                       max(1.0, rate / config.budget.reference_steps_per_sec)), 2)
  assert demo.scale_steps(config, workdir) == expected


@pytest.mark.parametrize("rate, overrides, scale, flowtok_steps", [
    (0.5, [], 1.0, 20),  # A slower host than the reference trains the steps as written...
    (9.0, [], 3.0, 140),  # ...a much faster one at most max_step_scale: 1 + 3.0 * 2.0 times.
    (1.5, ["stages.flowtok.train.total_steps=7"], 1.5, 7),  # Set by the user: as given.
    (1.5, ["budget.scale_steps=False"], 1.0, 20),
    (1.5, ["budget.scaled_stages.flowtok=1.0"], 1.5, 30),  # Its weight: 1 + 1 * 0.5.
    (1.5, ["budget.scaled_stages.flowtok=0.0"], 1.5, 20),  # Weight 0: as written.
])
def test_step_scale_limits(monkeypatch, tmp_path, rate, overrides, scale, flowtok_steps):
  overrides = [*SCALED, *overrides]
  config = demo.demo_config(str(tmp_path), demo.DEFAULT_CONFIG + ":runlocal", overrides)
  _fake_rate(monkeypatch, rate * config.budget.reference_steps_per_sec)
  assert demo.scale_steps(config, str(tmp_path), overrides) == scale
  assert _steps(config, "flowtok")[0] == flowtok_steps


def test_a_scaled_demo_trains_and_records_the_scaled_steps(demo_run, monkeypatch, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(demo_run[0], workdir)
  # The copied run (scaling off) recorded no plan, so this one times the step: faked here.
  recorded = demo._read_metrics(workdir)  # pylint: disable=protected-access
  assert "budget/steps_per_sec" not in recorded
  _fake_rate(monkeypatch, 1.5 * demo.demo_config(workdir).budget.reference_steps_per_sec)
  # FlowTok's steps come from the runlocal config (20), so they scale: it trains on to 50.
  tiny = [*SCALED, *(o for o in TINY if not o.startswith("stages.flowtok.train.total_steps"))]
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal", tiny)
  assert metrics["budget/step_scale"] == 1.5 and metrics["flowtok/final_step"] == 50
  assert metrics["tokenizer/final_step"] == 2  # Set in TINY: not scaled, not retrained.


def test_the_last_stage_fills_the_budget(monkeypatch, tmp_path):
  """budget.fill_last_stage: FlowTok plans the fastest host's steps, and the deadline ends it."""
  fill = ["budget.scale_steps=True", "budget.fill_last_stage=True"]
  config = demo.demo_config(str(tmp_path), demo.DEFAULT_CONFIG + ":runlocal", fill)
  _fake_rate(monkeypatch, 1.5 * config.budget.reference_steps_per_sec)
  assert demo.filled_stage(config) == "flowtok"
  assert demo.scale_steps(config, str(tmp_path), fill) == 1.5
  # f = 1.5, but FlowTok plans f = max_step_scale (3.0): 1 + 3.0 * 2.0 = 7 times its 20 steps,
  # saved as often as its plan says (every 70); the tokenizer keeps its own plan.
  assert _steps(config, "flowtok")[:2] == (140, 70)
  assert _steps(config, "tokenizer")[0] == 45
  # Not without a deadline, nor when the user set FlowTok's steps.
  for extra in (["budget.total_sec=None"], ["stages.flowtok.train.total_steps=7"]):
    config = demo.demo_config(str(tmp_path), demo.DEFAULT_CONFIG + ":runlocal", fill + extra)
    assert demo.filled_stage(config, fill + extra) is None
  # A stage the deadline ends must not have a schedule that waits for total_steps.
  config = demo.demo_config(str(tmp_path), demo.DEFAULT_CONFIG + ":runlocal",
                            fill + ["stages.flowtok.optim.schedule=cosine"])
  with pytest.raises(demo.UserError, match="fill_last_stage.*'constant'"):
    demo._check_scaling(config)  # pylint: disable=protected-access


def test_a_filled_stage_stops_at_the_deadline_and_a_rerun_keeps_it(demo_run, monkeypatch,
                                                                    tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(demo_run[0], workdir)
  _fake_rate(monkeypatch, 1.5 * demo.demo_config(workdir).budget.reference_steps_per_sec)
  tiny = [*(o for o in TINY if not o.startswith("stages.flowtok.train.total_steps")),
          "budget.scale_steps=True", "budget.fill_last_stage=True"]
  # A budget spent when FlowTok starts: it takes one step (from the copied run's 2) and stops.
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal",
                          [*tiny, "budget.total_sec=1", "budget.after_training_sec=0.5",
                           "budget.margin_sec=0"])
  assert metrics["flowtok/final_step"] == 3 and metrics["flowtok/stopped_by_budget"] == 1.0
  # A re-run with all the time in the world: FlowTok reached its deadline, so it is done.
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal", tiny)
  assert metrics["flowtok/final_step"] == 3
  with open(os.path.join(workdir, "bundle", "bundle.json")) as f:
    assert json.load(f)["source"]["step"] == 3
  # Without its checkpoints it is not done: it trains anew (one step, to its deadline again).
  shutil.rmtree(os.path.join(workdir, "flowtok", "checkpoints"))
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal",
                          [*tiny, "budget.total_sec=1", "budget.after_training_sec=0.5",
                           "budget.margin_sec=0"])
  assert metrics["flowtok/final_step"] == 1 and metrics["flowtok/stopped_by_budget"] == 1.0


def _clock(step_sec=1.0):
  """A clock that advances `step_sec` each time it is read."""
  ticks = itertools.count()
  return lambda: step_sec * next(ticks)


@pytest.mark.parametrize("tick, planned, stops_at, asks", [
    (1.0, 50, None, 0),  # 15 steps a second: above the expected rate (10), no new plan asked.
    (2.0, 50, 26, 1),  # 7.5 steps/s: re-planned at the first measured window's end.
    (2.0, 90, None, 3),  # Shorter by less than a window (15): not worth the restart.
    (2.0, 30, None, 3),  # It would end within a window of the check: too late.
])
def test_the_pace_check_stops_a_slow_stage_for_a_worthwhile_replan(tick, planned, stops_at,
                                                                   asks):
  asked = []

  def steps_at(rate):
    asked.append(rate)
    return 1.2, planned

  pace = demo.PaceCheck(100, 10.0, steps_at, clock=_clock(tick))
  assert pace.window == 15
  stopped = next(([step] for step in range(1, 101) if pace(step)), [])  # The loop stops there.
  # From step 11 (10 % of the plan after its first step) in windows of 15, up to 60 %: the
  # clock is read at steps 11, 26, 41 and 56, so three windows are measured.
  assert asked == [7.5] * asks
  assert stopped == ([stops_at] if stops_at else [])
  if stops_at:
    assert (pace.step, pace.scale, pace.new_total, pace.rate) == (26, 1.2, planned, 7.5)
  # A resumed stage measures from where it resumed (here: nothing left before 60 %).
  late = demo.PaceCheck(100, 10.0, steps_at, clock=_clock(100.0))
  assert not any(late(step) for step in range(40, 101))


def test_a_stage_slower_than_its_plan_is_replanned_and_resumed(demo_run, monkeypatch, tmp_path):
  """The tokenizer's loop runs (by a fake clock) at 7 steps/s against a timed 11.4 (f 1.5): it
  stops at the end of its first window, f is measured again (1.08), the plan is redone and the
  stage resumes to the new plan's end; a re-run keeps it."""
  workdir = str(tmp_path / "w")
  shutil.copytree(demo_run[0], workdir)
  shutil.rmtree(os.path.join(workdir, "flowtok"))  # It trains on the tokenizer trained here.
  ref = demo.demo_config(workdir).budget.reference_steps_per_sec
  _fake_rate(monkeypatch, 1.5 * ref)
  monkeypatch.setattr(demo, "PaceCheck", functools.partial(demo.PaceCheck, clock=_clock()))
  tiny = [*SCALED, *(o for o in TINY if not o.startswith("stages.tokenizer.train.total_steps"))]
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal", tiny)
  # Planned 20 x (1 + 2.5 x 0.5) = 45 steps from the copied run's 2: measured from step 8 (3 +
  # 10 % of 45) in windows of 7, so it stopped at 15; 7 / (0.85 x 7.6) = 1.08: 24 steps.
  assert metrics["budget/step_scale"] == 1.5
  assert metrics["budget/replanned_step_scale"] == 1.08
  assert metrics["budget/replanned_at_step"] == 15
  assert metrics["budget/replanned_steps_per_sec"] == pytest.approx(7.0)
  assert metrics["tokenizer/final_step"] == 24
  from flowtok_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  assert ckpt_lib.latest_meta(os.path.join(workdir, "tokenizer"))["step"] == 24
  # A re-run keeps the re-planned plan: nothing left to train, and no second check.
  config = demo.demo_config(workdir, demo.DEFAULT_CONFIG + ":runlocal", tiny)
  assert demo.scale_steps(config, workdir, tiny) == 1.08 and _steps(config, "tokenizer")[0] == 24
  assert demo.pace_check(config, workdir, "tokenizer", tiny) is None
  again = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal", tiny)
  assert again["tokenizer/final_step"] == 24
  assert again["time/tokenizer_sec"] == metrics["time/tokenizer_sec"]


def test_only_the_timed_stage_of_a_budgeted_plan_is_paced(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = demo.demo_config(workdir, demo.DEFAULT_CONFIG + ":runlocal", SCALED)
  _fake_rate(monkeypatch, 1.5 * config.budget.reference_steps_per_sec)
  demo.scale_steps(config, workdir, SCALED)
  pace = demo.pace_check(config, workdir, "tokenizer", SCALED)
  assert pace.total_steps == 45
  section = config.budget
  assert pace.expected_rate == pytest.approx((1 - section.replan_tolerance) * section.loop_share
                                             * 1.5 * section.reference_steps_per_sec)
  assert demo.pace_check(config, workdir, "flowtok", SCALED) is None
  given = [*SCALED, "stages.tokenizer.train.total_steps=30"]
  assert demo.pace_check(config, workdir, "tokenizer", given) is None
  for override in ("budget.replan_tolerance=None", "budget.total_sec=None"):
    config = demo.demo_config(workdir, demo.DEFAULT_CONFIG + ":runlocal", [*SCALED, override])
    assert demo.pace_check(config, workdir, "tokenizer", SCALED) is None, override


def test_only_training_stages_scale():
  config = demo.demo_config("w", demo.DEFAULT_CONFIG + ":runlocal", SCALED)
  with config.unlocked():
    config.budget.scaled_stages.export = 1.0
  with pytest.raises(demo.UserError, match="not demo training stages"):
    demo._check_scaling(config)  # pylint: disable=protected-access


def test_quality_bars_need_a_valid_parser_and_a_value():
  good = {"eval/tokenizer/val/parser_recon": 0.97, "eval/tokenizer/val/parser_gt": 1.0,
          "eval/t2i/test/accuracy": 0.9, "eval/t2i/test/valid": 1.0, "eval/i2t/test/exact": 0.5}
  bars = demo.quality_bars(good)
  assert bars["bar/t2i_test_accuracy/met"] and bars["bar/tokenizer_parser_recon/met"]
  assert not bars["bar/i2t_test_exact/met"]
  assert bars["bar/i2t_test_exact/short_by"] == pytest.approx(0.35)
  # A parser that failed its ground-truth check voids the number (DESIGN §7).
  bars = demo.quality_bars({**good, "eval/t2i/test/valid": 0.0,
                            "eval/tokenizer/val/parser_gt": 0.9})
  for name in ("t2i_test_accuracy", "tokenizer_parser_recon"):
    assert not bars[f"bar/{name}/met"] and not bars[f"bar/{name}/valid"]
    assert bars[f"bar/{name}/short_by"] is None
  # A missing metric is not met, and not "short by 0".
  bars = demo.quality_bars({})
  assert not bars["bar/i2t_test_exact/met"] and bars["bar/i2t_test_exact/short_by"] is None


def test_a_rerun_keeps_no_stale_evaluation_numbers(demo_run, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(demo_run[0], workdir)
  with open(os.path.join(workdir, "metrics.json")) as f:
    stale = json.load(f)
  stale["eval/i2t/test/exact"] = 0.99  # As if an earlier evaluation had written it...
  stale["eval/i2t/nosuch/exact"] = 0.5
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(stale, f)
  # ...and this one reports only the compositional split.
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal",
                          [*TINY, "eval.splits=compositional"])
  assert "eval/i2t/test/exact" not in metrics and "eval/i2t/nosuch/exact" not in metrics
  assert metrics["bar/i2t_test_exact/met"] is False
  assert "eval/i2t/compositional/exact" in metrics


def test_budget_deadline():
  config = demo.demo_config("w", demo.DEFAULT_CONFIG + ":runlocal", [])
  assert demo.budget_deadline(config, 100.0) == 100.0 + 900.0 - 40.0 - 110.0
  # A host twice the reference speed exports and evaluates in half the time; the margin stays.
  assert demo.budget_deadline(config, 100.0, 2.0) == 100.0 + 900.0 - 40.0 - 55.0
  config.budget.total_sec = None
  assert demo.budget_deadline(config, 100.0) is None
  config.budget.total_sec, config.budget.after_training_sec = 60.0, 20.0
  with pytest.raises(demo.UserError, match="budget.total_sec"):
    demo.budget_deadline(config, 0.0)  # 20 + 40 s of margin leave no time to train.


@pytest.mark.parametrize("override, match", [
    ("budget.total_sec=-5", "budget.total_sec"),
    ("eval.i2t_steps_candidates=(0, 1)", "positive integers"),  # The I2T step choice.
    ("data.eval_split=test", "also reports"),
    ("data.eval_split=train", "never reads the training split"),
    ("budget.max_step_scale=0.5", "max_step_scale"),  # The step scaling (on: SCALED).
    ("budget.reference_steps_per_sec=0", "reference_steps_per_sec"),
    ("budget.timed_stage=export", "budget.timed_stage"),
    ("budget.scaled_stages.tokenizer=-1.0", "weight >= 0"),
    ("budget.replan_tolerance=1.5", "replan_tolerance"),
    ("budget.loop_share=0", "loop_share"),
    ("stages.flowtok.optim.name=sgd", "optim.name"),  # A later stage's optimizer.
    ("stages.tokenizer.optim.schedule=linear", "optim.schedule"),
    ("stages.flowtok.train.ema_decay=2.0", "ema_decay"),  # A later stage's EMA.
    ("stages.flowtok.optim.lr=nan", "optim.lr"),  # NaN would train on NaN.
    ("stages.clip.optim.b2=1.5", "optim.b2"),
])
def test_a_bad_setting_is_refused_before_any_work(tmp_path, override, match):
  with pytest.raises(demo.UserError, match=match):
    demo.run_demo(str(tmp_path / "w"), demo.DEFAULT_CONFIG + ":runlocal",
                  [*TINY, *SCALED, override])
  assert not os.path.exists(tmp_path / "w" / "data")


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_demo_stage_stopped_by_a_signal_exits_with_its_code(monkeypatch, capsys, tmp_path,
                                                              signal_name, code):
  from cli_run import run_cli  # pylint: disable=g-import-not-at-top
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top
  result = loop.RunResult(step=3, stopped_by=signal_name, last_metrics={}, last_eval={},
                          start_step=0)
  monkeypatch.setattr(loop, "train_and_evaluate", lambda *a, **k: result)
  with pytest.raises(demo.Stopped) as e:
    demo._train_stage(None, str(tmp_path), "clip")  # pylint: disable=protected-access
  assert e.value.exit_code == code
  monkeypatch.setattr(demo, "run_demo", lambda *a, **k: demo._train_stage(  # pylint: disable=protected-access
      None, str(tmp_path), "clip"))
  exit_code, _, err = run_cli(["demo", "--workdir", str(tmp_path)], capsys)
  assert exit_code == code and "clip stopped by " + signal_name in err


def test_a_swapped_text_tokenizer_is_refused_on_resume_and_export(demo_run, tmp_path):
  """Another sentencepiece model in W/ would map the same captions to other ids: training on
  them or shipping them with the model is a silent wrong result."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from flowtok_jax import export  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "w")
  shutil.copytree(demo_run[0], workdir)
  caps = [f"a {c} {s} at the {where}" for c in ("red", "blue", "green")
          for s in ("circle", "square", "triangle") for where in ("top", "left", "bottom")]
  other = text_tokenizer.train_from_config(ml_collections.ConfigDict(dict(
      vocab_size=40, model_type="word", lowercase=True, num_captions=None)), caps)
  with open(os.path.join(workdir, "text_tokenizer.model"), "wb") as f:
    f.write(other.to_bytes())
  with pytest.raises(demo.UserError, match="trained with another text_tokenizer file"):
    demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal", TINY)
  with pytest.raises(demo.UserError, match="is not the text tokenizer .* trained with"):
    export.export_bundle(os.path.join(workdir, "flowtok"), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b")


def test_a_rerun_exports_a_damaged_bundle_again(demo_run, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(demo_run[0], workdir)
  params = os.path.join(workdir, "bundle", "params.msgpack")
  with open(params, "r+b") as f:
    f.truncate(os.path.getsize(params) // 2)
  metrics = demo.run_demo(workdir, demo.DEFAULT_CONFIG + ":runlocal", TINY)
  from flowtok_jax import inference  # pylint: disable=g-import-not-at-top
  inference.load_bundle(os.path.join(workdir, "bundle"))  # Exported again: intact.
  assert "eval/i2t/test/exact" in metrics


def test_evaluating_with_the_demos_workdir_as_data_dir_points_at_w_data(demo_run, capsys):
  from cli_run import assert_one_error, run_cli  # pylint: disable=g-import-not-at-top
  workdir = demo_run[0]
  before = sorted(os.listdir(workdir))
  code, _, err = run_cli(["eval", "--bundle", os.path.join(workdir, "bundle"), "--data_dir",
                          workdir, "--num", "4", "--out", os.path.join(workdir, "e2")], capsys)
  assert_one_error(code, err, f"give --data_dir {os.path.join(workdir, 'data')}")
  assert sorted(os.listdir(workdir)) == before  # No second dataset written into W.


def test_a_stage_reading_another_text_tokenizer_than_its_frozen_clip_is_refused(demo_run,
                                                                                 tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = demo_run[0]
  caps = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]
  other = text_tokenizer.train_from_config(ml_collections.ConfigDict(dict(
      vocab_size=30, model_type="word", lowercase=True, num_captions=None)), caps)
  model = tmp_path / "other.model"
  model.write_bytes(other.to_bytes())
  config = demo.demo_config(str(tmp_path), demo.DEFAULT_CONFIG + ":runlocal", [
      *TINY, f"data.data_dir={os.path.join(workdir, 'data')}",
      f"init.clip_from={os.path.join(workdir, 'clip')}", f"text_tokenizer.path={model}"])
  with pytest.raises(demo.UserError, match="frozen clip_text comes from .* another "
                     "text_tokenizer file"):
    loop.train_and_evaluate(config, str(tmp_path / "tok"), "tokenizer")


def test_a_rerun_with_other_models_is_refused_before_any_work(demo_run, tmp_path):
  """`configs/demo.py` on a `:runlocal` workdir would meet checkpoints of other shapes stages
  later; it is refused up front, naming the first key that differs, and W stays as it was."""
  workdir, _ = demo_run
  assert os.path.isfile(os.path.join(workdir, demo.MODELS_FILE))
  w = tmp_path / "w"
  w.mkdir()
  for name in (demo.MODELS_FILE, "metrics.json"):
    shutil.copy(os.path.join(workdir, name), w / name)
  before = {p.name: p.read_bytes() for p in w.iterdir()}
  with pytest.raises(demo.UserError,
                     match=r"data.shapes.num_compositional = 64, this config has 1000"):
    demo.run_demo(str(w), demo.DEFAULT_CONFIG, [])
  assert {p.name: p.read_bytes() for p in w.iterdir()} == before
  # A key the config has gained since W was made is W's model at None (off), not when set.
  config = demo.demo_config(str(w), demo.DEFAULT_CONFIG + ":runlocal", [])
  with open(w / demo.MODELS_FILE) as f:
    recorded = json.load(f)
  del recorded["tokenizer"]["latent_scale"], recorded["data.shapes"]["num_val"]
  with open(w / demo.MODELS_FILE, "w") as f:
    json.dump(recorded, f)
  config.tokenizer.latent_scale, config.data.shapes.num_val = None, None
  demo.same_models(config, str(w))
  config.tokenizer.latent_scale = 0.5
  with pytest.raises(demo.UserError, match=r"tokenizer.latent_scale = None, this config has 0.5"):
    demo.same_models(config, str(w))
  config.tokenizer.latent_scale, config.data.shapes.num_val = None, 64
  with pytest.raises(demo.UserError, match=r"data.shapes.num_val = None, this config has 64"):
    demo.same_models(config, str(w))
  # A stage's run or a bundle is not a demo's workdir.
  for inner in ("clip", "bundle"):
    with pytest.raises(demo.UserError, match="is a training stage's run|is a bundle"):
      demo.run_demo(os.path.join(workdir, inner), demo.DEFAULT_CONFIG + ":runlocal", TINY)
