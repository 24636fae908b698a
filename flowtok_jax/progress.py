"""Progress with an ETA: a tqdm bar on a terminal, whole lines in logs and pipes."""
from __future__ import annotations

import sys
import time

LOG_SEC = 30.0  # Seconds between progress lines off a terminal.


def meter(total: int, desc: str, *, unit: str = "step", initial: int = 0,
          interval: float | None = None):
  """A tqdm bar when stderr is a terminal, else a `LineProgress` (a line every `interval` s)."""
  if sys.stderr.isatty():
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                smoothing=0.1)
  return LineProgress(total, initial, desc, sys.stderr, LOG_SEC if interval is None else interval,
                      unit=unit)


class LineProgress:
  """tqdm's progress text as whole lines, for logs and pipes (a bar's carriage returns would
  make one endless line there): after the first step, every `interval` seconds, and at the end.

  The subset of tqdm's interface used here: update, set_postfix, close.
  """
  FORMAT = ("{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} "
            "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
  # The first line comes after one update, too early for a rate or an ETA worth printing.
  FIRST_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [started{postfix}]"

  def __init__(self, total: int, initial: int, desc: str, file, interval: float,
               unit: str = "step"):
    self.total, self.initial, self.n, self.desc, self.unit = total, initial, initial, desc, unit
    self.file, self.interval = file, interval
    self.postfix = None
    self.start = time.monotonic()
    self.last_time, self.last_n = None, initial  # The last line written.

  def update(self, n: int = 1):
    self.n += n
    now = time.monotonic()
    if self.last_time is None or now - self.last_time >= self.interval:
      self._write(now)

  def set_postfix(self, refresh: bool = False, **kwargs):
    del refresh
    self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

  def close(self):
    if self.n != self.last_n:
      self._write(time.monotonic())

  def _write(self, now: float):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self.file.write(tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc,
                                      unit=self.unit, postfix=self.postfix, initial=self.initial,
                                      bar_format=self.FORMAT if self.last_time is not None
                                      else self.FIRST_FORMAT) + "\n")
    self.file.flush()
    self.last_time, self.last_n = now, self.n
