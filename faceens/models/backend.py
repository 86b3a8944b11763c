"""Per-backend choices of the model code (depthwise and 1x1 kernels, ensemble execution)."""

from __future__ import annotations

import jax


def choose(what: str, value: str, valid, cpu: str, accelerator: str) -> str:
  """``value`` checked against ``valid`` (a clear error otherwise); ``auto`` becomes ``cpu`` on
  XLA:CPU and ``accelerator`` on GPU/TPU."""
  if value not in valid:
    raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
  if value == "auto":
    return cpu if jax.default_backend() == "cpu" else accelerator
  return value
