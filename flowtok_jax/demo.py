"""`flowtok demo`: the whole pipeline on the captioned-shapes world, on a laptop-class CPU.

Stages run in order; each resumes or is skipped when its output already exists in the workdir,
so re-running continues where a stopped run left off:

  data       build the captioned_shapes TFDS dataset (ArrayRecord)        -> W/data
  preview    a grid of training images with their captions                -> W/preview.png
  text       sentencepiece model trained on the training captions         -> W/text_tokenizer.model
  clip       contrastive pretraining of the tiny CLIP (frozen text tower) -> W/clip
  tokenizer  FlowTiTok image tokenizer                                     -> W/tokenizer
  flowtok    one DiT trained in both directions with one train step        -> W/flowtok
  export     the inference bundle (EMA params, tokenizer, config)          -> W/bundle
  eval       T2I / I2T / tokenizer metrics on test, compositional, val     -> W/eval
  report     metrics table, sample grids, stage times, loss curves         -> W/report.html

W/metrics.json gathers the evaluation results and per-stage wall times (`time/<stage>_sec`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

import ml_collections

from flowtok_jax import config_lib
from flowtok_jax import paths
from flowtok_jax.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "demo.py")
TRAIN_STAGES = ("clip", "tokenizer", "flowtok")
# The demo's quality bars (issue 6): name -> (metric written by the evaluation, minimum).
QUALITY_BARS = {
    "tokenizer_parser_recon": ("eval/tokenizer/val/parser_recon", 0.95),
    "t2i_test_accuracy": ("eval/t2i/test/accuracy", 0.85),
    "i2t_test_exact": ("eval/i2t/test/exact", 0.85),
}
# A parser-read bar counts only when the parser read the ground truth of that split (DESIGN §7:
# >= 99 %, else the number is void).
BAR_VALIDITY = {
    "tokenizer_parser_recon": ("eval/tokenizer/val/parser_gt", 0.99),
    "t2i_test_accuracy": ("eval/t2i/test/valid", 1.0),
}


def quality_bars(metrics: dict) -> dict:
  """`bar/<name>/{value,target,met,short_by}` for each quality bar. A missing metric, or one
  whose parser check failed (BAR_VALIDITY), is not met and has no short_by (None)."""
  out = {}
  for name, (key, target) in QUALITY_BARS.items():
    value = metrics.get(key)
    check = BAR_VALIDITY.get(name)
    valid = check is None or (metrics.get(check[0]) or 0.0) >= check[1]
    met = value is not None and valid and value >= target
    short = None if value is None or not valid else max(0.0, target - value)
    out.update({f"bar/{name}/value": value, f"bar/{name}/target": target,
                f"bar/{name}/met": met, f"bar/{name}/valid": valid,
                f"bar/{name}/short_by": short})
    logging.info("quality bar %s: %s = %s (bar %.2f) -> %s", name, key, value, target,
                 "met" if met else "MISSED")
  return out


def _read_metrics(workdir: str) -> dict:
  """W/metrics.json ({} before the first stage)."""
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _merge_metrics(workdir: str, new: dict) -> dict:
  """Merges `new` into W/metrics.json (written atomically) and returns the whole file."""
  metrics = _read_metrics(workdir)
  metrics.update(new)
  _write_metrics(workdir, metrics)
  return metrics


def _write_metrics(workdir: str, metrics: dict) -> None:
  """W/metrics.json, written atomically."""
  path = os.path.join(workdir, "metrics.json")
  with open(path + ".tmp", "w") as f:
    json.dump(metrics, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def _drop_metrics(workdir: str, prefixes: tuple[str, ...]) -> None:
  """Removes the keys starting with any of `prefixes` from W/metrics.json (atomically)."""
  metrics = _read_metrics(workdir)
  kept = {k: v for k, v in metrics.items() if not k.startswith(prefixes)}
  if len(kept) != len(metrics):
    _write_metrics(workdir, kept)


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "text_tokenizer.model")


def demo_config(workdir: str, config_arg: str | None = None, overrides=()):
  """The demo config with every path pointing into the workdir (user overrides win)."""
  w = os.path.abspath(workdir)
  wiring = [f"data.data_dir={os.path.join(w, 'data')}",
            f"init.clip_from={os.path.join(w, 'clip')}",
            f"init.tokenizer_from={os.path.join(w, 'tokenizer')}",
            f"train.compilation_cache_dir={os.path.join(w, 'jax_cache')}"]
  return config_lib.load(config_arg or DEFAULT_CONFIG, [*wiring, *overrides])


# Returned by a stage function that found its output done: its recorded time is kept.
SKIPPED = {"_skipped": True}


class _Timer:
  """Records each stage's wall time into metrics.json as soon as the stage ends.

  A stage that returns SKIPPED (its output was already there) keeps the time recorded when it
  did its work, so a re-run's report still shows what each stage cost.
  """

  def __init__(self, workdir: str, num_stages: int):
    self.workdir, self.num_stages, self.index = workdir, num_stages, 0

  def run(self, name: str, fn: Callable[[], dict | None]) -> dict:
    self.index += 1
    logging.info("demo stage %d/%d: %s", self.index, self.num_stages, name)
    t0 = time.time()
    extra = dict(fn() or {})
    seconds = time.time() - t0
    key = f"time/{name}_sec"
    if extra.pop("_skipped", False) and key in _read_metrics(self.workdir):
      logging.info("demo stage %s was already done: its recorded time is kept", name)
      return _merge_metrics(self.workdir, extra)
    logging.info("demo stage %s done in %.1f s", name, seconds)
    return _merge_metrics(self.workdir, {key: seconds, **extra})


class Stopped(KeyboardInterrupt):
  """A training stage stopped by a signal (checkpointed); `exit_code` is 130 or 143."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def _train_stage(config, workdir: str, stage: str, stop_at_time: float | None = None,
                 fill: bool = False, pace: PaceCheck | None = None) -> dict:
  """Trains one stage; {} when a `PaceCheck` stopped it (to be re-planned and resumed)."""
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top
  result = loop.train_and_evaluate(config, os.path.join(workdir, stage), stage,
                                   stop_at_time=stop_at_time, stop_when=pace)
  if result.stopped_by == "stop_when":
    return {}
  budget = result.stopped_by == "stop_at_time"
  if result.stopped_by and not budget:
    raise Stopped(f"{stage} stopped by {result.stopped_by} at step {result.step}",
                  result.exit_code)
  if budget and fill:
    logging.info("%s trained until the budget's deadline: %d steps (budget.fill_last_stage)",
                 stage, result.step)
  elif budget:
    logging.warning("%s stopped at step %d by the demo's time budget (budget.total_sec): the "
                    "export and evaluation use that checkpoint; re-run to train on",
                    stage, result.step)
  if result.step == result.start_step:
    return SKIPPED
  out = {f"{stage}/final_step": result.step}
  if stop_at_time is not None:
    out[f"{stage}/stopped_by_budget"] = float(budget)
  for key, value in {**result.last_metrics, **result.last_eval}.items():
    if isinstance(value, (int, float)):
      out[f"{stage}/{key}"] = value
  return out


def run_demo(workdir: str, config_arg: str | None = None, overrides=()) -> dict:
  """Runs every demo stage that is not done yet; returns the merged metrics.

  Args:
    workdir: output directory (created); holds data, runs, bundle, report and metrics.
    config_arg: `path[:arg]` of the config; defaults to the repository's configs/demo.py.
    overrides: `key=value` config overrides.
  Returns:
    The content of W/metrics.json.
  """
  from flowtok_jax import export  # pylint: disable=g-import-not-at-top
  from flowtok_jax import inference  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  from flowtok_jax.evaluation import run_eval  # pylint: disable=g-import-not-at-top
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top

  started = time.time()
  workdir = paths.writable_dir(workdir, "--workdir")
  _not_inside_a_run(workdir)
  config = demo_config(workdir, config_arg, overrides)
  candidates = _i2t_steps_candidates(config)
  # The last training stage stops (checkpointed) where the demo would otherwise overrun its
  # wall-clock budget. Checked, like the candidates, before any work; set once f is known.
  budget_deadline(config, started)
  _check_scaling(config, overrides)
  _check_optimizers(config)
  same_models(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  _record_models(config, workdir)
  # Before the process's first compile (the peak's matmul, the step timed for the plan), so that
  # re-runs load every compiled train step.
  loop.use_compilation_cache(config.train)
  deadline = _plan(config, workdir, overrides, started)
  if deadline is not None:
    logging.info("demo: training ends by %.0f s from the start (budget.total_sec %g)",
                 deadline - started, config.budget.total_sec)
  timer = _Timer(workdir, 6 + len(TRAIN_STAGES))
  data_cfg, data_dir = config.data, config.data.data_dir

  def data():
    summary = builders.build(data_cfg, data_dir)
    logging.info("%s", summary)
    return SKIPPED if summary.endswith("(already built)") else None
  timer.run("data", data)
  timer.run("preview", lambda: builders.write_preview(
      data_cfg, data_dir, split=data_cfg.train_split, num=16,
      out=os.path.join(workdir, "preview.png")) and None)

  def text():
    path = tokenizer_path(workdir)
    done = os.path.exists(path)
    if not done:
      text_tokenizer.train_on_split(config, data_dir, path)
    return {"text/vocab_size": text_tokenizer.load(path).vocab_size,
            **(SKIPPED if done else {})}
  timer.run("text_tokenizer", text)

  fill = filled_stage(config, overrides)

  def train(stage: str, last: bool) -> dict:
    nonlocal config, deadline
    pace = pace_check(config, workdir, stage, overrides)
    out = _train_stage(config, workdir, stage, stop_at_time=deadline if last else None,
                       fill=stage == fill, pace=pace)
    if pace is None or pace.scale is None:
      return out
    # Its loop ran too slowly for the plan: the plan is redone at the rate measured there (this
    # stage's steps and the deadline), recorded so that a re-run keeps it, and the stage resumes.
    _merge_metrics(workdir, {"budget/replanned_step_scale": pace.scale,
                             "budget/replanned_at_step": pace.step,
                             "budget/replanned_steps_per_sec": pace.rate})
    config = demo_config(workdir, config_arg, overrides)
    deadline = _plan(config, workdir, overrides, started)
    logging.warning("demo stage %s ran %.1f steps/s in its loop (below %.1f: the timed rate x "
                    "budget.loop_share x (1 - budget.replan_tolerance)): re-planned at factor "
                    "%.2f, resuming from step %d", stage, pace.rate, pace.expected_rate,
                    pace.scale, pace.step)
    return _train_stage(config, workdir, stage, stop_at_time=deadline if last else None,
                        fill=stage == fill)

  for stage in TRAIN_STAGES:
    last = stage == TRAIN_STAGES[-1]
    checkpoints = os.path.join(workdir, stage, "checkpoints")
    if (stage == fill and _read_metrics(workdir).get(f"{stage}/stopped_by_budget") == 1.0
        and os.path.isdir(checkpoints) and os.listdir(checkpoints)):
      # It trained until an earlier run's deadline: that is its plan, done (a run stopped by a
      # signal records no such flag, and trains on; without its checkpoints it trains anew).
      logging.info("demo stage %s trained until the budget's deadline in an earlier run: kept",
                   stage)
      timer.run(stage, lambda: SKIPPED)
      continue
    timer.run(stage, lambda stage=stage, last=last: train(stage, last))

  bundle = os.path.join(workdir, "bundle")
  flowtok_ckpt = os.path.join(workdir, "flowtok", "checkpoints")

  def do_export():
    run = os.path.join(workdir, "flowtok")
    out = {}
    if _up_to_date(bundle, flowtok_ckpt) and _intact(bundle):
      logging.info("bundle %s is newer than the flowtok checkpoints: kept", bundle)
    else:
      out["export/bytes"] = export.export_bundle(run, bundle).get("bytes", 0)
    meta = inference.read_bundle_meta(bundle)
    default = meta["defaults"]["i2t"]["steps"]
    chosen = _read_metrics(workdir).get("export/i2t_steps")
    # Choose the I2T steps unless this bundle already carries the choice (a run stopped between
    # the export and the choice re-does the choice, not the export).
    if candidates and meta["capabilities"]["i2t"] and (out or chosen != default):
      steps, exact = run_eval.select_i2t_steps(
          bundle, data_dir, candidates, split=data_cfg.eval_split,
          num=config.eval.get("num"), batch_size=config.eval.get("batch_size") or 32)
      out.update({f"export/i2t_{data_cfg.eval_split}_exact_at_{k}_steps": v
                  for k, v in exact.items()})
      out["export/i2t_steps"] = steps
      if steps != default:
        export.export_bundle(run, bundle, i2t_steps=steps)
    return out or SKIPPED
  timer.run("export", do_export)

  eval_dir = os.path.join(workdir, "eval")
  # The evaluation is redone every run: none of an earlier run's numbers may outlive it (a key
  # this run does not write would otherwise still count towards the bars).
  _drop_metrics(workdir, ("eval/", "bar/"))
  results = timer.run("eval", lambda: run_eval.demo_eval(config, bundle, eval_dir))
  # The stages' recorded times (up to the evaluation; the report comes after), so that a re-run
  # that skips finished stages reports what the whole pipeline cost, not its own few seconds.
  stage_secs = [v for k, v in results.items() if k.startswith("time/") and k.endswith("_sec")
                and k not in ("time/total_sec", "time/report_sec")]
  _merge_metrics(workdir, {"time/total_sec": sum(stage_secs), **quality_bars(results)})
  timer.run("report", lambda: run_eval.demo_report(
      workdir, eval_dir, os.path.join(workdir, "report.html")) and None)
  return _read_metrics(workdir)


# What a demo's stages are built from: another value in a re-run on the same workdir would meet
# checkpoints, a dataset or a text tokenizer made for a different model. (Step counts, learning
# rates and the budget may change between runs: a re-run trains on.)
MODEL_KEYS = ("data.name", "data.image_size", "data.max_text_len", "data.shapes",
              "data.folder", "text_tokenizer.vocab_size", "text_tokenizer.model_type",
              "text_tokenizer.lowercase", "text_tokenizer.num_captions", "clip_text",
              "clip_image", "tokenizer", "text_vae", "align_mlp", "text_decoder", "flow")
MODELS_FILE = "demo_models.json"


def _models_of(config) -> dict:
  out = {}
  for key in MODEL_KEYS:
    node = config
    for part in key.split("."):
      node = node.get(part) if node is not None else None
    out[key] = node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node
  return json.loads(json.dumps(out, sort_keys=True, default=str))  # Tuples as lists.


def _without_none(node):
  """A `_models_of` entry with its None-valued keys left out, at every depth."""
  if isinstance(node, dict):
    return {k: _without_none(v) for k, v in node.items() if v is not None}
  return node


def same_models(config, workdir: str):
  """Refuses a re-run whose models or data differ from the ones W's stages were made with (e.g.
  `configs/demo.py` on a workdir of `configs/demo.py:runlocal`), before any work."""
  path = os.path.join(workdir, MODELS_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      before = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); remove it to run on") from None
  now = _models_of(config)
  for key in MODEL_KEYS:
    # A key added to the config since W was made, at None (its default: off), is W's model.
    was, new = _without_none(before.get(key)), _without_none(now.get(key))
    if was != new:
      while isinstance(was, dict) and isinstance(new, dict):
        sub = next(k for k in sorted(set(was) | set(new)) if was.get(k) != new.get(k))
        key, was, new = f"{key}.{sub}", was.get(sub), new.get(sub)
      raise UserError(f"{workdir} was made with {key} = {was!r}, this config has {new!r} (another "
                      "config, or :runlocal on one side?): re-run with the same config, or "
                      "give another --workdir")


def _record_models(config, workdir: str):
  path = os.path.join(workdir, MODELS_FILE)
  if not os.path.exists(path):
    with open(path + ".tmp", "w") as f:
      json.dump(_models_of(config), f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _not_inside_a_run(workdir: str):
  """A demo's workdir is not a stage's run or a bundle: W/clip as W would nest a second demo
  inside the first."""
  from flowtok_jax import inference  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"--workdir {workdir} is a training stage's run (it holds checkpoints/); "
                    f"give the demo's own directory ({os.path.dirname(os.path.abspath(workdir))}?)")
  if os.path.isfile(os.path.join(workdir, inference.BUNDLE_JSON)):
    raise UserError(f"--workdir {workdir} is a bundle; give the demo's own directory")


def _plan(config, workdir: str, overrides, started: float) -> float | None:
  """Plans the demo in `config` (the stages' MFU peak and steps, from what W/metrics.json
  records or this host measures) and returns the training deadline (`budget_deadline`)."""
  host_peak(config, workdir)
  return budget_deadline(config, started, scale_steps(config, workdir, overrides))


def budget_deadline(config, started: float, scale: float = 1.0) -> float | None:
  """The `time.time()` by which training must stop for the demo to end within its budget.

  `config.budget.total_sec` (None: no budget) less what follows training, counted from `started`
  (the demo's start): the export and evaluation, `budget.after_training_sec` at the reference
  speed and that over the host factor `scale` (f) on a faster host, plus `budget.margin_sec`
  (start-up, the last checkpoint, the report and the host's drift), which does not scale.
  """
  section = config.get("budget") or {}
  total = section.get("total_sec")
  if total is None:
    return None
  after, margin = section.get("after_training_sec") or 0.0, section.get("margin_sec") or 0.0
  if total <= 0 or after < 0 or margin < 0 or after + margin >= total:
    raise UserError(f"budget.total_sec must be > 0 and above budget.after_training_sec + "
                    f"budget.margin_sec (each >= 0), got {total}, {after} and {margin}")
  if scale < 1:
    raise UserError(f"the host factor must be >= 1, got {scale}")
  return started + float(total) - float(margin) - float(after) / float(scale)


def scale_steps(config, workdir: str, overrides=()) -> float:
  """Scales the step counts of `budget.scaled_stages` to this host's speed (in place).

  The recipe's steps fit the budget on the slowest host measured. The host factor is
  f = r / `budget.reference_steps_per_sec`, clipped to [1, `budget.max_step_scale`], where r is
  the train-step rate of `budget.timed_stage` on this host (`step_rate`): a host whose rate is
  the reference or less trains the steps as written; on a faster one, stage s trains
  1 + w_s·(f − 1) times its steps, w_s = `budget.scaled_stages[s]` (the tokenizer gains most per
  second, so it gets the larger share). Checkpoint and evaluation periods scale with the run, so
  a stage still checkpoints and evaluates as often. f is measured once and recorded in
  W/metrics.json (`budget/step_scale`), so a re-run resumes the same plan; where the timed
  stage's loop ran too slowly for it (`PaceCheck`), the factor measured there
  (`budget/replanned_step_scale`) replaces it. A stage whose `total_steps` the user set on the
  command line trains exactly that many steps.

  Args:
    config: the demo config; `config.stages.<stage>.train` is updated.
    workdir: the demo's workdir (metrics.json).
    overrides: the user's `key=value` overrides.
  Returns:
    The host factor f the plan follows (1.0 when scaling is off or no stage is scaled).
  """
  from flowtok_jax.train import stage_api  # pylint: disable=g-import-not-at-top
  section = config.get("budget") or {}
  if not section.get("scale_steps"):
    return 1.0
  weights = {s: float(w) for s, w in (section.get("scaled_stages") or {}).items()
             if not _steps_given(s, overrides)}
  if not weights:
    return 1.0
  metrics = _read_metrics(workdir)
  recorded = metrics.get("budget/step_scale")
  if recorded is None:
    rate = step_rate(config, workdir)
    scale = host_factor(rate / float(section.reference_steps_per_sec),
                        float(section.max_step_scale))
    _merge_metrics(workdir, {"budget/step_scale": scale})
    logging.info("%s train step: %.1f steps/s on this host (budget.reference_steps_per_sec "
                 "%.3g): factor %.2f", section.timed_stage, rate,
                 section.reference_steps_per_sec, scale)
  else:
    scale = float(recorded)
  # The timed stage's loop ran well below the timed rate and the plan was redone (`PaceCheck`):
  # the stages still to train, and the deadline, follow the rate measured there.
  scale = float(metrics.get("budget/replanned_step_scale") or scale)
  fill = filled_stage(config, overrides)
  for stage, weight in weights.items():
    train = stage_api.config_for_stage(config, stage).train
    total = int(train.total_steps)
    # The filled stage plans the steps of the fastest host allowed (f = max_step_scale): the
    # budget's deadline, not the plan, ends it on the hosts measured.
    factor = step_factor(weight, float(section.max_step_scale) if stage == fill else scale)
    updates = {"total_steps": max(1, round(total * factor))}
    for key in ("ckpt_every_steps", "eval_every_steps"):
      if train.get(key):  # As many saves / evaluations as before: a period rounded down could
        # add one a step before the final one (tokenizer 1150 -> 4025 steps: 575 -> 2012 saved
        # at 2012, 4024 and 4025).
        count = max(1, total // int(train[key]))
        updates[key] = -(-updates["total_steps"] // count)
    with config.unlocked():
      config.stages[stage].train.update(updates)  # _check_scaling: the section exists.
    if stage == fill:
      logging.info("demo stage %s: trains until the budget's deadline, at most %d steps "
                   "(budget.fill_last_stage)", stage, updates["total_steps"])
    else:
      logging.info("demo stage %s: %d steps (x %.2f for this host)", stage,
                   updates["total_steps"], factor)
  return scale


def host_factor(ratio: float, cap: float) -> float:
  """f: a step rate over the reference rate, clipped to [1, cap], to 2 decimals."""
  return round(min(cap, max(1.0, ratio)), 2)


def step_factor(weight: float, scale: float) -> float:
  """The multiple of its written steps a stage of weight w trains at host factor f."""
  return 1.0 + float(weight) * (scale - 1.0)


class PaceCheck:
  """`stop_when` for the timed stage: stops it where its loop runs well below the plan's rate.

  The plan fixes the stage's steps from one timing of its step (`step_rate`); a host that slows
  down afterwards would stretch the stage and leave the filled stage (FlowTok) what remains
  (a fresh clone timed 18.8 steps/s, then ran its tokenizer's loop at 12.1: 5405 steps took
  467 s, and FlowTok got 1901 steps; docs/benchmarks.md, "twenty-eighth pass"). From
  `min(50, 10 %)` of its steps after it starts, the stage's loop rate is measured over windows
  of 15 % of its steps, up to 60 % of them. A window that runs below
  (1 - `budget.replan_tolerance`) x `budget.loop_share` x the timed rate stops the stage
  (checkpointed) if the plan at that rate, f' = rate / (loop_share x reference rate), is at
  least a window shorter and a window or more past here; `run_demo` records f' and resumes the
  stage with the new plan (one restart: ~10 s for the tokenizer's compile and data).
  """

  def __init__(self, total_steps: int, expected_rate: float,
               steps_at: Callable[[float], tuple[float, int]],
               clock: Callable[[], float] = time.perf_counter):
    """`steps_at(rate)` -> (f', the stage's total steps at f'); `expected_rate`: the loop
    rate below which that is asked (steps/s)."""
    self.total_steps, self.expected_rate = total_steps, expected_rate
    self.window = max(1, -(-15 * total_steps // 100))
    self._skip = min(50, -(-total_steps // 10))
    self._steps_at, self._clock = steps_at, clock
    self._first = self._last = None
    self.rate = self.scale = self.new_total = self.step = None

  def __call__(self, step: int) -> bool:
    if self._first is None:
      self._first = step + self._skip
    offset = step - self._first
    if offset < 0 or offset % self.window or step > 0.6 * self.total_steps:
      return False
    now, last = self._clock(), self._last
    self._last = now
    if last is None:
      return False
    rate = self.window / max(now - last, 1e-9)
    if rate >= self.expected_rate:
      return False
    scale, total = self._steps_at(rate)
    # Worth a restart only if it saves a window or more; and too late if the new plan would end
    # within a window of here (its learning-rate schedule needs a tail to decay over).
    if not step + self.window <= total <= self.total_steps - self.window:
      return False
    self.rate, self.scale, self.new_total, self.step = rate, scale, total, step
    return True


def pace_check(config, workdir: str, stage: str, overrides=()) -> PaceCheck | None:
  """The `PaceCheck` for `stage`, or None: only the timed stage (`budget.timed_stage`) of a
  scaled plan with a budget, when it is scaled, not the filled stage, and not re-planned yet."""
  from flowtok_jax.train import stage_api  # pylint: disable=g-import-not-at-top
  section = config.get("budget") or {}
  tolerance = section.get("replan_tolerance")
  metrics = _read_metrics(workdir)
  timed_rate = metrics.get("budget/steps_per_sec")
  weight = (section.get("scaled_stages") or {}).get(stage)
  if (tolerance is None or not section.get("scale_steps") or section.get("total_sec") is None
      or stage != section.get("timed_stage") or not weight or not timed_rate
      or stage == filled_stage(config, overrides) or _steps_given(stage, overrides)
      or metrics.get("budget/replanned_step_scale")):
    return None
  share, ref = float(section.loop_share), float(section.reference_steps_per_sec)
  scale = float(metrics["budget/step_scale"])
  total = int(stage_api.config_for_stage(config, stage).train.total_steps)
  # The steps as written (f = 1), for the decision; the resumed stage's steps are scale_steps'.
  base = total / step_factor(weight, scale)

  def steps_at(rate: float) -> tuple[float, int]:
    new = host_factor(rate / (share * ref), scale)
    return new, max(1, round(base * step_factor(weight, new)))

  return PaceCheck(total, (1.0 - float(tolerance)) * share * float(timed_rate), steps_at)


def filled_stage(config, overrides=()) -> str | None:
  """The training stage that trains until the budget's deadline, or None.

  With `budget.fill_last_stage` (and a budget, and step scaling on), the last training stage
  (FlowTok) plans the steps of the fastest host allowed and the deadline guard ends it: the
  time that earlier stages leave is its, whatever the host's speed. Its learning rate must not
  depend on where it stops (`_check_scaling`). A stage whose `total_steps` the user set trains
  exactly that many steps.
  """
  section = config.get("budget") or {}
  stage = TRAIN_STAGES[-1]
  if not (section.get("fill_last_stage") and section.get("scale_steps")
          and section.get("total_sec") is not None
          and stage in (section.get("scaled_stages") or {})):
    return None
  return None if _steps_given(stage, overrides) else stage


def _steps_given(stage: str, overrides) -> bool:
  """Whether the user's overrides set `stages.<stage>.train.total_steps` (trained as given)."""
  key = f"stages.{stage}.train.total_steps"
  return any(o.split("=", 1)[0].strip() == key for o in overrides)


def step_rate(config, workdir: str) -> float:
  """Train steps per second of `budget.timed_stage` on this host, measured once per workdir
  (`budget/steps_per_sec` in W/metrics.json).

  The stage's real compiled step is timed on random weights and data (median of 40 steps after
  5: ~2 s for the demo's tokenizer, plus its compile; its learning-rate schedule is the one
  before scaling, so the stage compiles its own). What it cost is recorded as
  `budget/step_timing_sec`. The plan used to follow the host's matmul
  peak, which read 2.3-3.7e11 FLOP/s on one host whose training speed did not move; the step's
  own rate is what the stages' time depends on (docs/benchmarks.md, "twenty-first pass").
  """
  from flowtok_jax.tools import bench  # pylint: disable=g-import-not-at-top
  rate = _read_metrics(workdir).get("budget/steps_per_sec")
  if not rate:
    t = time.time()
    rate = 1.0 / bench.train_step_seconds(config, config.budget.timed_stage)
    # What the timing cost (its compile, mostly): outside every stage's time/<stage>_sec.
    _merge_metrics(workdir, {"budget/steps_per_sec": rate,
                             "budget/step_timing_sec": time.time() - t})
  return float(rate)


def host_peak(config, workdir: str) -> float:
  """The host's matmul peak (FLOP/s), measured once per workdir (`budget/peak_flops` in
  W/metrics.json) and set as every stage's `train.peak_flops_per_device` unless the user set
  one: the stages' perf/mfu then share one denominator instead of each measuring again."""
  from flowtok_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  peak = _read_metrics(workdir).get("budget/peak_flops")
  if not peak:
    # Best of 100 matmuls (~1.2 s): the 2-core VMs measured dip for a second or so at a time,
    # and best-of-5 read 1.1-2.1e11 on one host within a minute (best-of-100: 2.0-2.2e11),
    # which moved the demo's plan by a third of its steps.
    peak = metrics_lib.measure_peak_flops(repeats=100)
    _merge_metrics(workdir, {"budget/peak_flops": peak})
  if not config.train.get("peak_flops_per_device"):
    with config.unlocked():
      config.train.peak_flops_per_device = float(peak)
  return float(peak)


def _check_optimizers(config) -> None:
  """Builds each training stage's optimizer once and checks its EMA decay, so that a bad
  setting of a later stage (e.g. `stages.flowtok.optim.name`) is refused before the earlier
  stages train."""
  from flowtok_jax.train import loop, optim, stage_api  # pylint: disable=g-import-not-at-top
  for stage in TRAIN_STAGES:
    stage_config = stage_api.config_for_stage(config, stage)
    optim.make(stage_config.optim, total_steps=stage_config.train.total_steps)
    loop.check_ema_decay(stage_config.train)


def _check_scaling(config, overrides=()) -> None:
  """`budget.scaled_stages` / `timed_stage` / `reference_steps_per_sec` / `max_step_scale` /
  `fill_last_stage` / `replan_tolerance` / `loop_share`, checked before any work."""
  section = config.get("budget") or {}
  if not section.get("scale_steps"):
    return
  weights = dict(section.get("scaled_stages") or {})
  unknown = set(weights) - set(TRAIN_STAGES)
  if unknown:
    raise UserError(f"budget.scaled_stages: {sorted(unknown)} are not demo training stages "
                    f"{TRAIN_STAGES}")
  for stage, weight in weights.items():
    if not isinstance(weight, (int, float)) or weight < 0:
      raise UserError(f"budget.scaled_stages.{stage} must be a weight >= 0, got {weight!r}")
    if "train" not in ((config.get("stages") or {}).get(stage) or {}):
      raise UserError(f"budget.scaled_stages: {stage!r} has no config.stages.{stage}.train "
                      "section to scale")
  ref, cap = section.get("reference_steps_per_sec"), section.get("max_step_scale")
  if not ref or ref <= 0 or cap is None or cap < 1:
    raise UserError(f"budget.scale_steps needs budget.reference_steps_per_sec > 0 and "
                    f"budget.max_step_scale >= 1, got {ref} and {cap}")
  timed = section.get("timed_stage")
  if timed not in TRAIN_STAGES:
    raise UserError(f"budget.timed_stage must be one of {TRAIN_STAGES}, got {timed!r}")
  tolerance, share = section.get("replan_tolerance"), section.get("loop_share")
  if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1
                                    and isinstance(share, (int, float)) and 0 < share <= 1):
    raise UserError(f"budget.replan_tolerance must be in [0, 1) (None: off) and "
                    f"budget.loop_share in (0, 1], got {tolerance!r} and {share!r}")
  fill = filled_stage(config, overrides)
  if fill:
    from flowtok_jax.train import stage_api  # pylint: disable=g-import-not-at-top
    schedule = stage_api.config_for_stage(config, fill).optim.get("schedule", "constant")
    if schedule != "constant":
      raise UserError(f"budget.fill_last_stage: stages.{fill}'s learning-rate schedule must be "
                      f"'constant' (the deadline, not total_steps, ends it), got {schedule!r}")


def _i2t_steps_candidates(config) -> tuple[int, ...]:
  """`eval.i2t_steps_candidates`, checked before any work: positive ints, chosen on a held-out
  split (`data.eval_split`) that the evaluation does not report."""
  from flowtok_jax.evaluation import run_eval, shapes_eval  # pylint: disable=g-import-not-at-top
  raw = (config.get("eval") or {}).get("i2t_steps_candidates")
  if not raw:
    return ()
  counts = run_eval.check_step_candidates(raw)
  split = shapes_eval.held_out_split(config.data.eval_split,
                                     "the I2T step choice (on a held-out split)")
  reported = run_eval.parse_splits(config.eval.get("splits") or "test,compositional")
  if split in reported:
    raise UserError(f"the I2T steps are chosen on data.eval_split={split!r}, which eval.splits "
                    "also reports: choose them on another held-out split")
  return tuple(counts)


def _intact(bundle: str) -> bool:
  """True when the bundle's files are all there and match their checksums; else it is logged
  (and the demo exports it again instead of evaluating a damaged one)."""
  from flowtok_jax import inference  # pylint: disable=g-import-not-at-top
  try:
    meta = inference.read_bundle_meta(bundle)
    for name in meta.get("files") or {}:
      inference.check_file(bundle, meta, name)
  except UserError as e:
    logging.warning("%s: exporting it again", e)
    return False
  return True


def _up_to_date(output: str, source: str) -> bool:
  """True when `output` exists and is newer than everything in `source`."""
  if not os.path.exists(output):
    return False
  newest = max((os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(source)
                for f in fs), default=0.0)
  return os.path.getmtime(output) >= newest
