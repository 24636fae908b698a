"""Run metrics: `W/metrics.jsonl`, TensorBoard events in `W/tb/`, progress bar, speed and MFU.

Every logged step is one JSON line, flat and namespaced:
    {"step": 100, "train/loss": 0.41, "train/lr": 0.0004, "perf/examples_per_sec": 812.0,
     "perf/mfu": 0.31, ...}
Only process 0 writes. On resume, lines for steps after the restored step (logged before a crash
but not covered by the checkpoint) are dropped, so the file always describes one trajectory.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax.errors import UserError


def itstime(step: int, every: int | None, total: int, *, last: bool = True) -> bool:
  """Whether a periodic action fires after `step` (1-based count of finished steps).

  Fires every `every` steps and, when `last`, after the final step; `every` <= 0 or None never
  fires (except at the end when `last`).
  """
  if last and step == total:
    return True
  return bool(every) and every > 0 and step % every == 0


def guards_state(key: str) -> bool:
  """Whether a step metric must be finite for the step's state to be kept: the loss and every
  `*_norm` / `*_loss` (gradient and parameter norms: the state about to be saved)."""
  return key == "train/loss" or key.endswith(("_norm", "_loss"))


def check_finite(metrics: Mapping[str, float], step: int, last_good: int | None):
  """Raises a UserError naming the step when a metric that `guards_state` is NaN or infinite."""
  bad = [(k, v) for k, v in metrics.items() if guards_state(k) and not math.isfinite(v)]
  if bad:
    kept = f"checkpoint at step {last_good} kept" if last_good is not None else "no checkpoint"
    key, value = min(bad, key=lambda kv: kv[0] != "train/loss")  # The loss first, if it is bad.
    what = "loss" if key == "train/loss" else key
    raise UserError(f"non-finite {what} ({value}) at step {step}; stopping ({kept})")


class Throughput:
  """Examples/s and MFU over the steps since the previous call, excluding paused time.

  Args:
    batch_size: global examples per step.
    flops_per_step: analytic FLOPs per step (global), or None.
    peak_flops: FLOP/s of the whole mesh (per-device peak x devices), or None.
  """

  def __init__(self, batch_size: int, flops_per_step: float | None, peak_flops: float | None):
    self.batch_size = batch_size
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.reset(0)

  def reset(self, step: int):
    self._t0 = time.perf_counter()
    self._step0 = step
    self._paused = 0.0

  def pause(self):
    """Context manager: time spent inside (eval, checkpoint) is not counted as training."""
    outer = self

    class _Pause:
      def __enter__(self):
        self.t = time.perf_counter()

      def __exit__(self, *exc):
        outer._paused += time.perf_counter() - self.t
    return _Pause()

  def measure(self, step: int) -> dict[str, float]:
    """perf/* metrics since the last call (the caller has synchronised with the device)."""
    dt = time.perf_counter() - self._t0 - self._paused
    steps = step - self._step0
    self.reset(step)
    if steps <= 0 or dt <= 0:
      return {}
    out = {"perf/steps_per_sec": steps / dt,
           "perf/examples_per_sec": steps * self.batch_size / dt}
    if self.flops_per_step:
      achieved = self.flops_per_step * steps / dt
      out["perf/tflops_per_sec"] = achieved / 1e12
      if self.peak_flops:
        out["perf/mfu"] = achieved / self.peak_flops
    return out


def measure_peak_flops(n: int | None = None, dtype=None, repeats: int = 5) -> float:
  """Measured matmul FLOP/s of one device (best of `repeats`), the MFU denominator when the
  config gives none. bf16 inputs with f32 accumulation on accelerators, f32 on CPU."""
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  n = n or (1024 if on_cpu else 8192)
  dtype = dtype or (jnp.float32 if on_cpu else jnp.bfloat16)
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Device scalars -> Python floats (one transfer for the whole dict)."""
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


class MetricWriter:
  """Appends to `W/metrics.jsonl` and TensorBoard (`W/tb/`) on process 0; no-op elsewhere.

  Args:
    workdir: the run's work directory.
    resume_step: the step the run starts from; lines beyond it are dropped.
    enabled: write (default: process 0 only).
  """

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    _truncate_after(self.path, resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    try:
      self._tb = _summary_writer_cls()(os.path.join(workdir, "tb"), flush_secs=30)
    except ImportError:  # TensorBoard output is optional; metrics.jsonl is the contract.
      logging.warning("tensorboardX is not installed: no TensorBoard events")

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _json_number(v) for k, v in sorted(scalars.items())})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Saves each `[N, H, W, 3]` batch as a PNG grid `W/images/<name>/<step>.png`."""
    paths = {}
    if not self.enabled:
      return paths
    from PIL import Image  # pylint: disable=g-import-not-at-top
    root = os.path.dirname(self.path)
    for name, batch in images.items():
      grid = image_grid(batch)
      path = os.path.join(root, "images", name, f"{int(step):08d}.png")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(grid).save(path)
      paths[name] = path
      if self._tb is not None:
        self._tb.add_image(name, grid, int(step), dataformats="HWC")
    return paths

  def write_texts(self, step: int, texts: Mapping[str, str]):
    if self.enabled and self._tb is not None:
      for name, text in texts.items():
        self._tb.add_text(name, text, int(step))

  def close(self):
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _summary_writer_cls():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch at module level when it is installed (the optional parity extra),
  which costs seconds at every run start only to accept torch tensors; we pass numpy.
  """
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # Makes `import torch` raise ImportError inside tensorboardX.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter


def image_grid(batch: np.ndarray, cols: int | None = None) -> np.ndarray:
  """[N, H, W, C] uint8 or float in [0, 1] -> one uint8 [rows*H, cols*W, 3] grid."""
  batch = np.asarray(batch)
  if batch.ndim == 3:
    batch = batch[None]
  if batch.dtype != np.uint8:
    batch = (np.clip(batch, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  if batch.shape[-1] == 1:
    batch = np.repeat(batch, 3, axis=-1)
  n, h, w, c = batch.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = batch[i]
  return grid


def _json_number(v: float):
  # JSON has no NaN/Infinity; write them as strings so the line stays valid JSON.
  v = float(v)
  return v if math.isfinite(v) else str(v)


def _truncate_after(path: str, step: int):
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      continue  # A torn last line from a crash.
  if len(keep) != len(lines):
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(keep)


def read_jsonl(path: str) -> list[dict]:
  """The rows of a metrics.jsonl file."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
