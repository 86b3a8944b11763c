"""What the jobs report while they run: progress on a terminal or in a log file, and metrics.

``progress(...)``: a tqdm bar on a terminal; off a terminal (a pipe, a SLURM log) plain lines
instead, one every ``every`` units (training: every ``train.log_every`` steps) or every
``interval`` seconds, and one at the end, each with the count, rate, ETA and the latest
postfix (loss, ...). A bar's carriage returns would make a log file one endless line.

``MetricWriter``: ``metrics.jsonl`` with one record shape, ``{"step": N, "<group>/<name>": value,
...}`` (``train/loss``, ``eval/heldout/accuracy``, ...), and the same scalars as TensorBoard
event files in ``<workdir>/tensorboard`` (tensorboardX).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from tqdm import tqdm


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class LineProgress:
  """tqdm's ``update`` / ``set_postfix`` / ``write`` / ``close`` as plain, newline-ended lines."""

  def __init__(self, total: int | None, *, initial: int = 0, desc: str = "", unit: str = "it",
               every: int | None = None, interval: float = 30.0, stream=None, disable=False):
    self.total, self.n, self.desc, self.unit = total, initial, desc, unit
    self.every, self.interval, self.disable = every, interval, disable
    self.stream = stream or sys.stderr
    self.postfix: dict = {}
    self._t0 = self._last_t = time.perf_counter()
    self._n0 = initial
    self._closed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def set_postfix(self, **kw):
    self.postfix = {k: v for k, v in kw.items()}

  def write(self, text: str):
    if not self.disable:
      print(text, file=self.stream, flush=True)

  def line(self) -> str:
    elapsed = time.perf_counter() - self._t0
    rate = (self.n - self._n0) / elapsed if elapsed > 0 else float("nan")
    parts = [f"{self.desc}: " if self.desc else ""]
    if self.total:
      parts.append(f"{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)")
      eta = (self.total - self.n) / rate if rate and rate > 0 else float("nan")
      tail = f", elapsed {_duration(elapsed)}, ETA {_duration(eta)}"
    else:
      parts.append(f"{self.n} {self.unit}")
      tail = f", elapsed {_duration(elapsed)}"
    parts.append(f", {rate:.2f} {self.unit}/s{tail}")
    if self.postfix:
      parts.append(", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items()))
    return "".join(parts)

  def update(self, n: int = 1):
    before, self.n = self.n, self.n + n
    now = time.perf_counter()
    due = (self.every and self.n // self.every > before // self.every) or (
        not self.every and now - self._last_t >= self.interval)
    if due and not (self.total and self.n >= self.total):  # the end line comes from close()
      self._last_t = now
      self.write(self.line())

  def close(self):
    if not self._closed and self.n > self._n0:
      self.write(self.line())
    self._closed = True


def progress(total: int | None = None, *, initial: int = 0, desc: str = "", unit: str = "it",
             disable: bool = False, every: int | None = None, interval: float = 30.0,
             leave: bool = True, stream=None):
  """A tqdm bar on a terminal, ``LineProgress`` off one (see the module docstring). ``leave``:
  keep the finished bar / print the end line (``False`` for short inner loops: off a terminal
  they print nothing)."""
  stream = stream or sys.stderr
  if _is_terminal(stream):
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable,
                dynamic_ncols=True, leave=leave, file=stream)
  return LineProgress(total, initial=initial, desc=desc, unit=unit, every=every,
                      interval=interval, stream=stream, disable=disable or not leave)


def flatten(record: dict, prefix: str = "") -> dict:
  """``{"eval": {"heldout": {"accuracy": 0.9}}}`` -> ``{"eval/heldout/accuracy": 0.9}``; lists
  become ``name/0``, ``name/1``, ...; ``None`` values are dropped."""
  out = {}
  for key, value in record.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "/"))
    elif isinstance(value, (list, tuple)):
      out.update(flatten({str(i): v for i, v in enumerate(value)}, name + "/"))
    elif value is not None:
      out[name] = float(value)
  return out


class MetricWriter:
  """``metrics.jsonl`` plus TensorBoard event files, written by one process (``enabled``)."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> dict:
    """Appends ``{"step": step, **flatten(scalars)}``; returns the record."""
    record = {"step": int(step), **flatten(scalars)}
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
      if self._tb is not None:
        for name, value in record.items():
          if name != "step":
            self._tb.add_scalar(name, value, step)
        self._tb.flush()
    return record

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def default_verbosity() -> None:
  """absl logs at WARNING in the command-line jobs (orbax logs every checkpoint at INFO) unless
  the user asked for a level with ``--verbosity`` / ``-v``."""
  from absl import flags
  from absl import logging as absl_logging
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
