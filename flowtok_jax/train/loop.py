"""The one train loop: every stage (CLIP, tokenizer, FlowTok, test toys) runs through it.

    train_and_evaluate(config, workdir, stage_name)

  1. Mesh and rules from the config; the stage builds itself (`stage_api.get_builder`).
  2. State: restore `W/checkpoints` -> `config.init.params_from` -> scratch (checkpoint.py), born
     sharded; frozen parts loaded params-only onto their shards.
  3. The train step is jitted once with explicit in/out shardings and the state donated, then
     lowered and compiled before the first step; its memory analysis is logged.
  4. Steps, with logging / evaluation / checkpoints decided by `metrics.itstime`; metrics reach the
     host only on logging steps. SIGTERM/SIGINT save at the current step and return.
  5. A final checkpoint; async saves are always waited for before returning.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flowtok_jax import checkpoint as ckpt_lib
from flowtok_jax import config_lib
from flowtok_jax import metrics as metrics_lib
from flowtok_jax import paths
from flowtok_jax import progress
from flowtok_jax import sharding
from flowtok_jax.errors import UserError
from flowtok_jax.train import stage_api
from flowtok_jax.train.state import TrainState, ema_update


# Stops the caller asked for (checkpointed, exit code 0), unlike a signal or a preemption.
ASKED = (None, "stop_at_step", "stop_at_time", "stop_when")


@dataclasses.dataclass
class RunResult:
  """What `train_and_evaluate` returns.

  Attributes:
    step: the step the run stopped at (checkpointed).
    stopped_by: None when `total_steps` was reached, else 'SIGTERM', 'SIGINT', 'preemption'
      (multi-host: a host was told to stop), 'stop_at_step', 'stop_at_time' or 'stop_when'.
    last_metrics: the last logged train metrics.
    last_eval: the last evaluation scalars.
    start_step: the step the run started (or resumed) from; equal to `step` when the
      checkpoint had already reached total_steps.
  """
  step: int
  stopped_by: str | None
  last_metrics: dict
  last_eval: dict
  start_step: int = 0

  @property
  def exit_code(self) -> int:
    """0 when the run finished (or stopped where asked); 128 + the signal number when a signal
    or a preemption stopped it, so that `flowtok train ... && flowtok export ...` does not go on
    with a half-trained model and a scheduler sees the preemption."""
    if self.stopped_by in ASKED:
      return 0
    return 130 if self.stopped_by == "SIGINT" else 143


def _namespaced(name: str, prefix: str) -> str:
  return name if "/" in name else f"{prefix}/{name}"


def example_batch_1(stage: stage_api.Stage) -> dict[str, np.ndarray]:
  """Zeros shaped like one example of the stage's batch (leading dim 1) for init."""
  return {k: np.zeros((1,) + tuple(np.shape(v))[1:], jax.dtypes.canonicalize_dtype(
      np.asarray(v).dtype if not hasattr(v, "dtype") else v.dtype))
          for k, v in stage.example_batch.items()}


def make_init_fn(stage: stage_api.Stage, batch1: Mapping[str, np.ndarray]):
  """`rng -> TrainState` with boxed params (for eval_shape / born-sharded init)."""
  def init(rng):
    p_rng, a_rng, s_rng = jax.random.split(rng, 3)
    b = {k: jnp.asarray(v) for k, v in batch1.items()}
    params = stage.init(p_rng, b)
    aux_params = aux_opt = None
    if stage.aux is not None:
      aux_params = stage.aux.init(a_rng, b)
      aux_opt = stage.aux.optimizer.init(aux_params)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=stage.optimizer.init(params),
        ema_params=params if stage.ema_decay is not None else None,
        rng=s_rng, aux_params=aux_params, aux_opt_state=aux_opt)
  return init


def use_compilation_cache(tcfg) -> None:
  """Turns on JAX's persistent compilation cache at `train.compilation_cache_dir` (if set).

  Resumed and repeated runs then load the compiled train step instead of recompiling it (25 s
  -> 3 s for the demo's CLIP step on 2 CPU cores). Must precede the process's first compile.
  """
  if tcfg.get("compilation_cache_dir"):
    jax.config.update("jax_compilation_cache_dir",
                      paths.local(tcfg.compilation_cache_dir, "train.compilation_cache_dir"))


def make_train_step(stage: stage_api.Stage):
  """The pure `(state, frozen, batch) -> (state, metrics)` shared by every stage."""
  aux = stage.aux

  def train_step(state: TrainState, frozen, batch):
    step = state.step
    rng = jax.random.fold_in(state.rng, step)
    loss_rng, aux_rng = jax.random.split(rng)

    def loss_of(params):
      loss, out = stage.loss_fn(params, frozen, batch, loss_rng, step, state.aux_params)
      if not isinstance(out, stage_api.LossAux):
        out = stage_api.LossAux(metrics=dict(out))
      return loss, out

    (loss, out), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = stage.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {_namespaced(k, "train"): v for k, v in out.metrics.items()}
    metrics["train/loss"] = loss
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    metrics["train/param_norm"] = optax.tree.norm(params)
    if stage.learning_rate is not None:
      metrics["train/lr"] = stage.learning_rate(step)
    new = state.replace(step=step + 1, params=params, opt_state=opt_state)
    if stage.ema_decay is not None:
      new = new.replace(ema_params=ema_update(state.ema_params, params, stage.ema_decay))

    if aux is not None:
      outputs = jax.lax.stop_gradient(out.outputs)

      def aux_loss_of(aux_params):
        return aux.loss_fn(aux_params, outputs, batch, aux_rng, step)

      def aux_update(_):
        (loss, metrics), grads = jax.value_and_grad(aux_loss_of, has_aux=True)(
            state.aux_params)
        updates, opt_state = aux.optimizer.update(grads, state.aux_opt_state, state.aux_params)
        return optax.apply_updates(state.aux_params, updates), opt_state, loss, metrics

      if aux.start_step > 0:
        # Before start_step the module stays exactly as initialised (params and moments), and
        # its passes do not run: lax.cond executes one branch, so a GAN that starts at step
        # 200k costs nothing before then. Its metrics read 0 until it starts.
        def idle(_):
          _, _, loss, metrics = jax.eval_shape(aux_update, None)
          zeros = lambda s: jnp.zeros(s.shape, s.dtype)
          return (state.aux_params, state.aux_opt_state, zeros(loss),
                  jax.tree.map(zeros, metrics))

        aux_params, aux_opt, aux_loss, aux_metrics = jax.lax.cond(
            step >= aux.start_step, aux_update, idle, None)
      else:
        aux_params, aux_opt, aux_loss, aux_metrics = aux_update(None)
      new = new.replace(aux_params=aux_params, aux_opt_state=aux_opt)
      metrics[f"train/{aux.name}_loss"] = aux_loss
      metrics[f"train/{aux.name}_param_norm"] = optax.tree.norm(aux_params)
      metrics.update({_namespaced(k, "train"): v for k, v in aux_metrics.items()})
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return new, metrics

  return train_step


def fingerprint_clash(ours: Mapping[str, str], meta: Mapping) -> str | None:
  """'NAME: sha256 X... recorded, Y... now' for the first input file whose sha256 differs from
  the one a checkpoint's metadata recorded (None: none differs, or nothing to compare)."""
  recorded = meta.get("fingerprints") or {}
  for name, sha in ours.items():
    if recorded.get(name) and sha and recorded[name] != sha:
      return f"{name}: sha256 {recorded[name][:12]}... recorded, {sha[:12]}... now"
  return None


def load_frozen(stage: stage_api.Stage, batch1, mesh, rules, seed: int,
                pinned: dict | None = None):
  """Frozen parts: loaded params-only (or randomly initialised), sharded by their logical axes.

  Args:
    pinned: name -> the checkpoint step a run recorded for that part (its checkpoint metadata's
      "frozen"); parts not named load the latest step of `part.checkpoint`.
  Returns:
    (name -> params, name -> shardings, name -> the step loaded).
  """
  frozen, shardings, sources = {}, {}, {}
  for i, part in enumerate(stage.frozen):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1000 + i)
    init = lambda r, part=part: part.init(r, {k: jnp.asarray(v) for k, v in batch1.items()})
    clash = part.checkpoint and fingerprint_clash(stage.fingerprints,
                                                  ckpt_lib.latest_meta(part.checkpoint))
    if clash:  # A frozen part that read other token ids than this run.
      raise UserError(f"frozen {part.name} comes from {part.checkpoint}, which trained with "
                      f"another text_tokenizer file ({clash}): every stage must read the same one")
    if part.load is not None:
      from flowtok_jax.tools import convert  # pylint: disable=g-import-not-at-top
      target, sh = sharding.abstract_with_shardings(init, mesh, rules, rng)
      loaded = part.load()
      convert.check_tree(target, loaded, f"frozen {part.name}")
      params = jax.tree.map(lambda a, s: jax.device_put(np.asarray(a, np.float32), s), loaded, sh)
      logging.info("frozen %s: loaded from its weight files", part.name)
    elif part.checkpoint:
      step = (pinned or {}).get(part.name)
      source = ckpt_lib.pin(part.checkpoint, step)
      if step is not None and not os.path.isdir(source):
        raise UserError(f"frozen {part.name}: this run trained with {source}, which is gone "
                        f"(its run trained on and pruned it?)")
      sources[part.name] = int(os.path.basename(source))
      target, sh = sharding.abstract_with_shardings(init, mesh, rules, rng)
      params, _ = ckpt_lib.load_params(source, target, select=part.select,
                                       use_ema=part.use_ema)
      logging.info("frozen %s: loaded from %s", part.name, source)
    else:
      logging.warning("frozen %s: no checkpoint given, randomly initialised", part.name)
      params, sh = sharding.born_sharded(init, mesh, rules, rng)
    frozen[part.name], shardings[part.name] = params, sh
  return frozen, shardings, sources


def _init_from(state: TrainState, path: str, abstract: TrainState) -> TrainState:
  """Copies parameters (params-only) from another run into a freshly initialised state."""
  loaded, missing = ckpt_lib.load_params(path, abstract.params, use_ema=True, allow_missing=True)
  if missing:
    logging.info("init_from %s: %d params not in the checkpoint keep their init: %s", path,
                 len(missing), ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
  params = jax.tree.map(lambda new, old: old if new is None else new, loaded, state.params,
                        is_leaf=lambda x: x is None)
  ema = None
  if state.ema_params is not None:
    # A separate copy: the step donates the state, and one buffer cannot be donated twice.
    ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                  out_shardings=jax.tree.map(lambda a: a.sharding, abstract.ema_params))(params)
  # Adam moments of a params-only load start from zero: the fresh opt_state already is.
  return state.replace(params=params, ema_params=ema)


def _log_compiled(compiled, stage: stage_api.Stage) -> float | None:
  """Logs the compiled step's memory and FLOPs; returns XLA's FLOPs per device (or None)."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    mem = None
  if mem is not None:
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "alias_size_in_bytes")
    logging.info("train step memory per device: %s", ", ".join(
        f"{f.replace('_size_in_bytes', '')}={getattr(mem, f, 0) / 2**20:.1f} MiB"
        for f in fields if hasattr(mem, f)))
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = cost.get("flops") if cost else None
  except Exception:  # pylint: disable=broad-except
    xla_flops = None
  if xla_flops:
    msg = f"train step FLOPs per device (XLA): {xla_flops:.3e}"
    if stage.flops_per_step:
      msg += f"; analytic (global): {stage.flops_per_step:.3e}"
    logging.info(msg)
  return float(xla_flops) if xla_flops else None


def _meta(config, stage_name: str, step: int, mesh, frozen_sources: dict,
          fingerprints=None) -> dict:
  return {"stage": stage_name, "step": int(step), "frozen": dict(frozen_sources),
          "fingerprints": dict(fingerprints or {}),
          "config": json.loads(config.to_json_best_effort()),
          "mesh": dict(mesh.shape), "process_count": jax.process_count(),
          "jax_version": jax.__version__,
          "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def check_ema_decay(tcfg) -> None:
  """`train.ema_decay` is None (no EMA) or in [0, 1): at 1 or above the EMA never leaves the
  random init (or grows without bound) and the evaluated and exported params are garbage."""
  d = tcfg.get("ema_decay")
  if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float))
                        or not 0.0 <= d < 1.0):
    raise UserError(f"train.ema_decay must be None (no EMA) or in [0, 1), got {d!r}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stage_name: str | None = None, *, stop_at_step: int | None = None,
                       stop_at_time: float | None = None,
                       stop_when: Callable[[int], bool] | None = None) -> RunResult:
  """Trains `stage_name` (default `config.train.stage`) in `workdir`, resuming if possible.

  Args:
    config: the full config (per-stage sections are merged by `stage_api.config_for_stage`).
    workdir: run directory: `checkpoints/`, `metrics.jsonl`, `tb/`, `images/`.
    stage_name: a registered stage.
    stop_at_step: stop (with a checkpoint) once this step is done, as a preemption would.
    stop_at_time: stop (with a checkpoint) after the first step dispatched at or after this
      `time.time()` (a wall-clock budget; one process only: hosts' clocks would stop them at
      different steps).
    stop_when: called with each step number once the step is dispatched; True stops the run
      there (with a checkpoint), e.g. to re-plan its length and resume (`flowtok demo` when the
      host slows down). One process only, like stop_at_time.
  Returns:
    RunResult.
  """
  stage_name = stage_name or config.train.stage
  if (stop_at_time is not None or stop_when is not None) and jax.process_count() > 1:
    raise UserError("a wall-clock stop (stop_at_time, stop_when) needs a single process: each "
                    "host's clock would stop it at a different step")
  config = stage_api.config_for_stage(config, stage_name)
  tcfg = config.train
  total_steps = config_lib.steps("total", tcfg)
  check_ema_decay(tcfg)
  use_compilation_cache(tcfg)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.get("sharding"))
  sharding.check_batch_size(tcfg.batch_size, mesh)
  workdir = paths.writable_dir(workdir, "--workdir")
  os.makedirs(workdir, exist_ok=True)
  # Read once: the stage check, the frozen steps and the stage's latent scale all come from it.
  resumed_meta = ckpt_lib.latest_meta(workdir)
  ctx = stage_api.StageContext(mesh=mesh, rules=rules, workdir=workdir,
                               process_index=jax.process_index(),
                               process_count=jax.process_count(),
                               global_batch_size=tcfg.batch_size, seed=config.seed,
                               resumed_meta=resumed_meta)
  stage = stage_api.get_builder(stage_name)(config, ctx)
  logging.info("stage %s: mesh %s, global batch %d, %d steps", stage_name, dict(mesh.shape),
               tcfg.batch_size, total_steps)
  if stage.ema_decay is not None and stage.ema_decay ** total_steps > 0.01:
    # The EMA starts at the initial params; evaluators and export read it.
    logging.warning("ema_decay %g over %d steps leaves %.0f%% of the initial (random) params in "
                    "the EMA that evaluation and export use; lower it or set train.ema_decay=None",
                    stage.ema_decay, total_steps, 100 * stage.ema_decay ** total_steps)

  batch1 = example_batch_1(stage)
  init_fn = make_init_fn(stage, batch1)
  rng = jax.random.PRNGKey(config.seed)
  abstract, state_sh = sharding.abstract_with_shardings(init_fn, mesh, rules, rng)
  # A resumed run reloads the frozen parts it trained with, even if their runs went on.
  frozen, frozen_sh, frozen_sources = load_frozen(stage, batch1, mesh, rules, config.seed,
                                                  pinned=resumed_meta.get("frozen"))
  data_sh = sharding.data_sharding(mesh)
  batch_abstract = {k: jax.ShapeDtypeStruct((tcfg.batch_size,) + v.shape[1:], v.dtype,
                                            sharding=data_sh) for k, v in batch1.items()}

  train_iter = stage.train_iter()
  with ckpt_lib.Checkpointer(workdir, config.checkpoint) as ckpt:
    # Resume order (checkpoint.py): this workdir -> init.params_from -> scratch.
    if ckpt.latest_step() is not None:
      # The stage first: another stage's checkpoint would fail the restore's shape check.
      other = resumed_meta.get("stage", stage_name)  # ({} if unreadable: the restore says why.)
      if other != stage_name:
        raise UserError(f"{workdir} holds a checkpoint of stage {other!r}, "
                        f"not {stage_name!r}: use another workdir")
      clash = fingerprint_clash(stage.fingerprints, resumed_meta)
      if clash:  # Training would go on, silently, with other token ids (or loss weights).
        raise UserError(f"{workdir} trained with another {clash.split(':')[0]} file ({clash}): "
                        "put the run's own back, or train in a new workdir")
      state, _ = ckpt.restore(abstract, train_iter)
      logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    else:
      state, _ = sharding.born_sharded(init_fn, mesh, rules, rng)
      params_from = config.get("init", {}).get("params_from") if config.get("init") else None
      if params_from:
        state = _init_from(state, params_from, abstract)
        logging.info("initialised params from %s", params_from)
    start_step = int(jax.device_get(state.step))
    if start_step >= total_steps:
      logging.info("checkpoint at step %d: nothing left to train (total_steps %d)", start_step,
                   total_steps)
      if hasattr(train_iter, "close"):  # Its restore may have started prefetch workers.
        train_iter.close()
      return RunResult(step=start_step, stopped_by=None, last_metrics={}, last_eval={},
                       start_step=start_step)

    for ev in stage.evaluators:  # Held-out data is read now: a missing split fails here.
      if ev.every_steps and ev.prepare is not None:
        ev.prepare()

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      jitted = jax.jit(make_train_step(stage), in_shardings=(state_sh, frozen_sh, data_sh),
                       out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
      t = time.perf_counter()
      compiled = jitted.lower(abstract, jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), frozen),
                              batch_abstract).compile()
    logging.info("train step compiled in %.1f s", time.perf_counter() - t)
    xla_flops = _log_compiled(compiled, stage)
    # perf/mfu divides the stage's analytic FLOPs or, for a stage without them (CLIP,
    # tokenizer), XLA's count of the compiled step (both branches of a lax.cond counted).
    flops_per_step = stage.flops_per_step or (
        xla_flops * jax.device_count() if xla_flops else None)

    peak = tcfg.get("peak_flops_per_device")
    if flops_per_step and not peak:
      peak = metrics_lib.measure_peak_flops()
      logging.info("measured peak %.3e FLOP/s per device (matmul)", peak)
    throughput = metrics_lib.Throughput(
        tcfg.batch_size, flops_per_step, peak * jax.device_count() if peak else None)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
    progress = _progress(start_step, total_steps, tcfg, stage_name)
    result = RunResult(step=start_step, stopped_by=None, last_metrics={}, last_eval={},
                       start_step=start_step)
    last_good = ckpt.latest_step()
    try:
      with ckpt_lib.PreemptionGuard(enabled=jax.process_count() == 1) as guard:
        throughput.reset(start_step)
        for step in range(start_step + 1, total_steps + 1):
          try:
            host_batch = next(train_iter)
          except StopIteration:
            raise UserError(f"the training data ran out before step {step} of {total_steps} "
                            "(a finite number of epochs?)") from None
          # Only the keys (and dtypes) the step was compiled for; the rest stays on the host.
          batch = sharding.host_to_global(
              {k: np.asarray(host_batch[k], v.dtype) for k, v in batch1.items()}, mesh)
          state, step_metrics = compiled(state, frozen, batch)
          if progress is not None:
            progress.update(1)
          result.step = step

          stop = guard.signal_name
          if stop is None and jax.process_count() > 1 and ckpt.reached_preemption(step):
            stop = "preemption"
          if stop is None and stop_at_step is not None and step >= stop_at_step:
            stop = "stop_at_step"
          if stop is None and stop_at_time is not None and time.time() >= stop_at_time:
            stop = "stop_at_time"
          if stop is None and stop_when is not None and stop_when(step):
            stop = "stop_when"
          if stop and step >= total_steps:
            logging.info("%s arrived with the last step done: the run is complete", stop)
            stop = None  # The final checkpoint is saved below as usual; exit code 0.
          # A signal or preemption has a grace period: save before anything slow (evaluators).
          interrupted = stop not in ASKED

          row = {}
          if metrics_lib.itstime(step, tcfg.log_every_steps, total_steps):
            row = metrics_lib.to_host(step_metrics)
            row.update(throughput.measure(step))
            try:
              metrics_lib.check_finite(row, step, last_good)
            except UserError:
              writer.write_scalars(step, row)  # The diverged step stays visible in the log.
              raise
            result.last_metrics = dict(row)
            if progress is not None:
              progress.set_postfix(loss=f"{row['train/loss']:.4g}", refresh=False)

          due = [ev for ev in stage.evaluators if not interrupted and metrics_lib.itstime(
              step, ev.every_steps, total_steps, last=bool(ev.every_steps))]
          save = bool(stop) or metrics_lib.itstime(step, tcfg.ckpt_every_steps, total_steps)
          if (due or save) and not row:
            # Steps still queued on the device are training time: finish them before the
            # pause, which would otherwise count them as evaluation or checkpoint time.
            jax.block_until_ready(state)
          with throughput.pause():
            for ev in due:
              scalars = _run_evaluator(ev, state, frozen, step, writer)
              result.last_eval.update(scalars)
              row.update(scalars)
            if row:
              writer.write_scalars(step, row)

            if save:
              # Never replace the last good checkpoint by a diverged state: the loss is of the
              # parameters before this step's update, so the norms of what is saved count too.
              metrics_lib.check_finite({k: float(v) for k, v in step_metrics.items()
                                        if metrics_lib.guards_state(k)}, step, last_good)
              ckpt.save(step, state, train_iter,
                        _meta(config, stage_name, step, mesh, frozen_sources,
                              stage.fingerprints))
              last_good = step
          if stop:
            result.stopped_by = stop
            logging.warning("stopped at step %d (%s); checkpoint saved, re-run to resume",
                            step, stop)
            break
    finally:
      if progress is not None:
        progress.close()
      writer.close()
      ckpt.wait()
      if hasattr(train_iter, "close"):
        train_iter.close()
  return result


def _run_evaluator(ev: stage_api.Evaluator, state: TrainState, frozen, step: int,
                   writer: metrics_lib.MetricWriter) -> dict[str, float]:
  t = time.perf_counter()
  res = ev.fn(state.eval_params, frozen, step)
  scalars = {_namespaced(k, "eval"): float(v) for k, v in res.scalars.items()}
  scalars[f"perf/eval_{ev.name}_sec"] = time.perf_counter() - t
  if res.images:
    writer.write_images(step, res.images)
  if res.texts:
    writer.write_texts(step, res.texts)
  logging.info("eval %s at step %d: %s", ev.name, step,
               ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
  return scalars


def _progress(start: int, total: int, tcfg, desc: str):
  """Process 0's progress: a tqdm bar on a terminal, else a line every progress.LOG_SEC."""
  if jax.process_index() != 0 or not tcfg.get("progress_bar", True):
    return None
  return progress.meter(total, desc, initial=start)


