"""Speed measurements behind `flowtok bench WHAT`.

    flowtok bench pipeline --config configs/demo.py --data_dir D --batch_size 64 --num_workers 2
    flowtok bench train --config configs/demo.py --stage flowtok --batch_size 32
    flowtok bench sample --config configs/demo.py --batch_size 16 --sample_steps 20

Each benchmark returns a flat dict of numbers (printed as JSON by the CLI). Times exclude one-off
costs that the name does not claim: the pipeline benchmark reports the first batch (worker start,
file opening) separately from the steady-state rate.
"""
from __future__ import annotations

import resource
import statistics
import time

from flowtok_jax import flops as _flops
from flowtok_jax.errors import UserError

# Captions read to train the throw-away tokenizer of the pipeline benchmark: a closed caption
# grammar is covered by far fewer, and tokenizing cost barely depends on the vocabulary.
_BENCH_TOKENIZER_CAPTIONS = 1000


def bench_pipeline(config, data_dir: str | None, num_batches: int = 50,
                   num_workers: int | None = None, batch_size: int = 64,
                   split: str | None = None, seed: int = 0) -> dict:
  """Measures the training input pipeline on one process.

  Args:
    config: full config; reads `config.data` and `config.text_tokenizer`.
    data_dir: TFDS data dir holding the built dataset; default `config.data.data_dir`.
    num_batches: batches timed after the first one.
    num_workers: grain worker processes; default `config.data.num_workers`.
    batch_size: examples per batch (the global batch of a 1-process run).
    split: split to read; default `config.data.train_split`.
    seed: shuffle seed.
  Returns:
    {'examples_per_sec', 'batches_per_sec', 'first_batch_s', 'batch_size', 'num_batches',
     'num_workers', 'image_size'}; rates count batches after the first; 'first_batch_s' counts
    building the iterator too (with data.preload: reading the split into memory).
  """
  # Imported here so `flowtok --help` stays fast.
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top

  if num_batches < 1:
    raise UserError(f"num_batches must be >= 1, got {num_batches}")
  data_cfg = config.data.copy_and_resolve_references()
  data_dir = data_dir or data_cfg.get("data_dir")
  if not data_dir:
    raise UserError("no data dir: pass --data_dir or set config.data.data_dir")
  split = split or data_cfg.train_split
  with data_cfg.unlocked():
    if num_workers is not None:
      data_cfg.num_workers = num_workers
  captions = builders.read_captions(data_cfg, split, data_dir, limit=_BENCH_TOKENIZER_CAPTIONS)
  tokenizer = text_tokenizer.TextTokenizer.train(
      captions, config.text_tokenizer.vocab_size,
      model_type=config.text_tokenizer.get("model_type", "unigram"))

  start = time.perf_counter()  # With data.preload the iterator reads the split when built.
  it = pipeline.make_iterator(data_cfg, tokenizer, split=split, global_batch_size=batch_size,
                              seed=seed, process_index=0, process_count=1, data_dir=data_dir,
                              read_examples=(num_batches + 1) * batch_size)
  try:
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num_batches):
      next(it)
    elapsed = time.perf_counter() - start
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
  return {
      "examples_per_sec": round(num_batches * batch_size / elapsed, 1),
      "batches_per_sec": round(num_batches / elapsed, 2),
      "first_batch_s": round(first, 3),
      "batch_size": batch_size,
      "num_batches": num_batches,
      "num_workers": data_cfg.num_workers,
      "image_size": data_cfg.image_size,
  }


# -- train step and sampling (issue 7) ----------------------------------------------------------

# 2048³ f32 reaches the CPU BLAS plateau (accelerators use metrics' default, 8192³ bf16).
PEAK_MATMUL_SIZE_CPU = 2048

def _peak_flops_per_device(previous: float = 0.0) -> float:
  """Measured matmul FLOP/s of one device: the MFU denominator (metrics.measure_peak_flops).

  Benchmarks measure it before and after their timed calls and keep the larger value, so a
  moment of contention on a shared machine does not lower the denominator (and inflate MFU).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flowtok_jax import metrics  # pylint: disable=g-import-not-at-top
  n = PEAK_MATMUL_SIZE_CPU if jax.devices()[0].platform == "cpu" else None
  return max(previous, metrics.measure_peak_flops(n=n, repeats=10))


def _mesh_peak(peak_per_device: float, num_devices: int) -> float:
  """The MFU denominator of a whole mesh: peak × devices, except on CPU, where fake host devices
  (--xla_force_host_platform_device_count) share the cores that one device's matmul already
  saturates, so the machine's peak is the one-device measurement."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.devices()[0].platform == "cpu":
    return peak_per_device
  return peak_per_device * num_devices


def _memory(compiled) -> dict:
  """Per-device memory: XLA's plan for the program and, where the runtime reports it, the peak."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    mem = None
  if mem is not None:
    for f in ("argument", "output", "alias", "temp"):
      out[f"{f}_mib"] = round(getattr(mem, f"{f}_size_in_bytes", 0) / 2**20, 2)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_device_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  # CPU devices report nothing: the process's high-water resident memory (params, activations
  # and everything else the process holds) is the closest measure there.
  out["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  return out


def _time_calls(call, repeats: int) -> list[float]:
  import jax  # pylint: disable=g-import-not-at-top
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t)
  return times


def _compile_train(config, stage: str | None, batch_size: int | None):
  """(program, mesh, compiled step, lower seconds, compile seconds) of a stage's train step."""
  import jax  # pylint: disable=g-import-not-at-top
  from flowtok_jax import sharding  # pylint: disable=g-import-not-at-top
  from flowtok_jax.tools import programs  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  prog = programs.train_program(config, mesh, stage_name=stage, batch_size=batch_size,
                                process_count=jax.process_count())
  t = time.perf_counter()
  lowered = prog.lower()
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  return prog, mesh, compiled, lower_s, time.perf_counter() - t


def _check_counts(steps: int, warmup: int) -> None:
  if steps < 1 or warmup < 0:
    raise UserError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")


def _stepper(prog, compiled):
  """A no-argument call that runs one train step on random weights and one random batch (the
  state is donated, so each call feeds the next the state the last one returned)."""
  state, frozen, batch = prog.make_args()
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], frozen, batch)
    return holder["state"], metrics
  return step


def train_step_seconds(config, stage: str, *, steps: int = 40, warmup: int = 5) -> float:
  """Median wall time (s) of `stage`'s compiled train step on this host, at the stage's batch
  size, over `steps` steps after `warmup` (random weights and data: the speed does not depend on
  them)."""
  _check_counts(steps, warmup)
  prog, _, compiled, _, _ = _compile_train(config, stage, None)
  step = _stepper(prog, compiled)
  _time_calls(step, warmup)
  return statistics.median(_time_calls(step, steps))


def bench_train(config, *, stage: str | None = None, batch_size: int | None = None,
                steps: int = 5, warmup: int = 1) -> dict:
  """Compiles and times the train step on this host's devices with random weights and data.

  The step is `train/loop.py`'s (same shardings, state donated); frozen parts are random, the
  batch is one random batch reused. MFU = analytic FLOPs (flops.py; the stage's
  `flops_per_step` when it has one, else XLA's count) / step time / the mesh's peak (measured
  matmul peak × devices; on CPU the one measurement, since fake host devices share the cores).

  Args:
    config: full config; the mesh comes from `config.mesh`.
    stage: stage to benchmark (default config.train.stage).
    batch_size: global batch (default config.train.batch_size).
    steps: timed steps after `warmup` untimed ones.
    warmup: untimed steps (the first runs allocate buffers).
  Returns:
    A flat dict of timings, rates, FLOPs, MFU and memory (see the keys).
  """
  _check_counts(steps, warmup)
  prog, mesh, compiled, lower_s, compile_s = _compile_train(config, stage, batch_size)
  step = _stepper(prog, compiled)
  _time_calls(step, warmup)
  peak = _peak_flops_per_device()
  times = _time_calls(step, steps)
  step_s = statistics.median(times)
  devices = mesh.size
  peak = _peak_flops_per_device(peak)
  xla = _flops.xla_flops(compiled)
  out = {"stage": stage or config.train.stage, "devices": devices,
         "mesh": dict(mesh.shape), "batch_size": prog.examples,
         "dtype": config.get("model_dtype", "float32"),
         "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
         "step_s": round(step_s, 6), "step_s_min": round(min(times), 6),
         "examples_per_sec": round(prog.examples / step_s, 2),
         "peak_flops_per_device": peak, "peak_flops": _mesh_peak(peak, devices),
         "warmup_steps": warmup, "xla_flops_per_step": xla * devices if xla else None}
  # A stage without analytic FLOPs (CLIP, tokenizer) is measured by XLA's count, as the train
  # loop's perf/mfu does; `flops_source` says which.
  flops = prog.flops or (xla * devices if xla else None)
  if flops:
    achieved = flops / step_s
    out.update(flops_per_step=flops, flops_per_example=flops / prog.examples,
               flops_per_sec=achieved, mfu=round(achieved / _mesh_peak(peak, devices), 4),
               flops_source="analytic" if prog.flops else "xla")
    if xla and prog.flops:
      out["xla_over_analytic"] = round(xla * devices / prog.flops, 3)
  out.update(_memory(compiled))
  return out


def bench_sample(config, *, batch_size: int | None = None, steps: int | None = None,
                 cfg_scale: float | None = None, repeats: int = 3) -> dict:
  """Times text -> image (and image -> caption for two-direction configs) generation.

  Each direction is one compiled program (ODE with CFG + decoders, `inference.py`) on random
  weights; rates count a whole batch per call after one untimed call.

  Returns:
    {'images_per_sec', ['captions_per_sec'], '<dir>_compile_s', '<dir>_call_s',
     '<dir>_flops_per_example', '<dir>_mfu', 'steps', 'cfg_scale', 'batch_size', ...}.
  """
  from flowtok_jax import sharding  # pylint: disable=g-import-not-at-top
  from flowtok_jax.tools import programs  # pylint: disable=g-import-not-at-top
  if repeats < 1:
    raise UserError(f"repeats must be >= 1, got {repeats}")
  mesh = sharding.make_mesh(config.mesh)
  directions = ["t2i"]
  if config.flow.get("two_directions") and config.get("text_decoder") is not None:
    directions.append("i2t")
  peak = _peak_flops_per_device()
  out = {"devices": mesh.size}
  for d in directions:
    prog = programs.sample_program(config, mesh, direction=d, batch_size=batch_size,
                                   steps=steps, cfg_scale=cfg_scale)
    t = time.perf_counter()
    compiled = prog.lower().compile()
    out[f"{d}_compile_s"] = round(time.perf_counter() - t, 2)
    args = prog.make_args()
    _time_calls(lambda: compiled(*args), 1)
    call_s = statistics.median(_time_calls(lambda: compiled(*args), repeats))
    rate = "images_per_sec" if d == "t2i" else "captions_per_sec"
    out[rate] = round(prog.examples / call_s, 3)
    out[f"{d}_call_s"] = round(call_s, 4)
    peak = _peak_flops_per_device(peak)
    out[f"{d}_flops_per_example"] = prog.flops / prog.examples
    out[f"{d}_mfu"] = round(prog.flops / call_s / _mesh_peak(peak, mesh.size), 4)
    out["batch_size"] = prog.examples
  out["peak_flops_per_device"] = peak
  sc = config.get("sample") or {}
  out["steps"] = steps if steps is not None else sc.get("steps", 20)
  out["cfg_scale"] = cfg_scale if cfg_scale is not None else sc.get("cfg_scale", 2.0)
  out["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  return out


def bench_fid(*, batch_size: int = 50, repeats: int = 3, image_size: int = 256) -> dict:
  """Times the FID Inception-v3 (`evaluation/inception.py`) on random weights and images.

  `network_*` is one compiled call on a [B, 299, 299, 3] batch; `resize_ms_per_image` is the
  host resize of one image_size² image to 299² that `flowtok fid` does before it; `images_per_sec`
  counts both, serially, as `flowtok fid` runs them (image decoding not included).

  Returns:
    {'images_per_sec', 'network_images_per_sec', 'network_call_s', 'compile_s',
     'flops_per_image', 'mfu', 'resize_ms_per_image', 'batch_size', 'image_size', ...}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flowtok_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  if repeats < 1:
    raise UserError(f"repeats must be >= 1, got {repeats}")
  size = inception.INPUT_SIZE
  module = inception.FIDInceptionV3()
  rng = np.random.default_rng(0)
  # Random weights without compiling an init: the speed does not depend on the values.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, leaf: (np.ones if path[-1].key == "var" else np.zeros)(leaf.shape, np.float32)
      if path[0].key == "batch_stats" else rng.normal(0, 0.05, leaf.shape).astype(np.float32),
      inception.abstract_variables())
  x = rng.uniform(size=(batch_size, size, size, 3)).astype(np.float32)
  peak = _peak_flops_per_device()
  t = time.perf_counter()
  compiled = jax.jit(module.apply).lower(variables, x).compile()
  compile_s = time.perf_counter() - t
  _time_calls(lambda: compiled(variables, x), 1)
  call_s = statistics.median(_time_calls(lambda: compiled(variables, x), repeats))
  peak = _peak_flops_per_device(peak)
  image = np.random.default_rng(1).integers(0, 256, (image_size, image_size, 3), np.uint8)
  t = time.perf_counter()
  for _ in range(20):
    inception.resize(image.astype(np.float32) / 255.0)
  resize_s = (time.perf_counter() - t) / 20
  flops = _flops.xla_flops(compiled)
  out = {"batch_size": batch_size, "image_size": image_size, "compile_s": round(compile_s, 2),
         "network_call_s": round(call_s, 4),
         "network_images_per_sec": round(batch_size / call_s, 3),
         "resize_ms_per_image": round(resize_s * 1e3, 2),
         "images_per_sec": round(batch_size / (call_s + batch_size * resize_s), 3),
         "peak_flops_per_device": peak,
         "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
  if flops:
    out["flops_per_image"] = flops / batch_size
    out["mfu"] = round(flops / call_s / peak, 4)
  return out
