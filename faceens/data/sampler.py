"""Image augmentations used by the input pipeline (``faceens.data.pipeline``)."""

from __future__ import annotations

import numpy as np


def translate(x: np.ndarray, shifts: np.ndarray) -> np.ndarray:
  """Shifts each image ``x[i]`` by ``shifts[i] = (dy, dx)`` pixels, filling with zeros."""
  out = np.zeros_like(x)
  h, w = x.shape[1:3]
  for i, (dy, dx) in enumerate(shifts):
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[i, yd, xd] = x[i, ys, xs]
  return out


def adjust(x: np.ndarray, factor: np.ndarray, offset: np.ndarray) -> np.ndarray:
  """``clip((x - mean) * factor + mean + offset)`` per image, back to uint8."""
  xf = x.astype(np.float32)
  mean = xf.mean(axis=(1, 2, 3), keepdims=True)
  out = (xf - mean) * factor[:, None, None, None] + mean + offset[:, None, None, None]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)
