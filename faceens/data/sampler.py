"""Deterministic, resumable batch order over an in-memory dataset.

The batch of step t is a pure function of ``(seed, t)``: the example stream is the
concatenation of per-epoch permutations ``rng(seed, epoch).permutation(n)``, and step t takes
stream positions ``[t * B, (t + 1) * B)``. A run resumed at step t therefore sees exactly the
batches an uninterrupted run would, with no iterator state to checkpoint. Each host takes its
contiguous slice of the global batch (``process_index``).
"""

from __future__ import annotations

import numpy as np


class EpochSampler:

  def __init__(self, num_examples: int, global_batch: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    if num_examples < 1:
      raise ValueError("cannot sample batches from an empty dataset")
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not divisible by {process_count} hosts")
    self.n, self.batch, self.seed = num_examples, global_batch, seed
    self.process_index, self.process_count = process_index, process_count
    self._perms: dict[int, np.ndarray] = {}

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.n // self.batch)

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.clear()
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    return self._perms[epoch]

  def global_indices(self, step: int) -> np.ndarray:
    pos = step * self.batch + np.arange(self.batch)
    epochs, offsets = pos // self.n, pos % self.n
    return np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets)], np.int64)

  def flips(self, step: int) -> np.ndarray:
    """Per-example random horizontal flip decisions of step ``step`` (global batch)."""
    return np.random.default_rng([self.seed, step, 1]).random(self.batch) < 0.5

  def local_slice(self) -> slice:
    per = self.batch // self.process_count
    return slice(self.process_index * per, (self.process_index + 1) * per)

  def shifts(self, step: int, max_shift: int) -> np.ndarray:
    """Per-example random translations ``[B, 2]`` in ``[-max_shift, max_shift]`` (global batch)."""
    rng = np.random.default_rng([self.seed, step, 2])
    return rng.integers(-max_shift, max_shift + 1, size=(self.batch, 2))

  def photometric(self, step: int, contrast: float, brightness: float) -> np.ndarray:
    """Per-example contrast factors and brightness offsets ``[B, 2]`` (global batch)."""
    rng = np.random.default_rng([self.seed, step, 3])
    return np.stack([rng.uniform(1 - contrast, 1 + contrast, self.batch),
                     rng.uniform(-brightness, brightness, self.batch)], axis=1)

  def local_batch(self, images: np.ndarray, labels: np.ndarray, step: int, flip: bool = True,
                  max_shift: int = 0, contrast: float = 0.0, brightness: float = 0.0):
    """This host's part of step ``step``'s batch: ``(uint8 images [b, H, W, 3], int32 labels)``.

    Augmentation, a pure function of ``(seed, step)``: random horizontal flip, random
    translation by up to ``max_shift`` pixels with zero fill (pad-and-crop), and random contrast
    (factor in ``1 +- contrast`` about the image mean) and brightness (offset in
    ``+- brightness`` grey levels).
    """
    sl = self.local_slice()
    idx = self.global_indices(step)[sl]
    x = images[idx]
    if flip:
      f = self.flips(step)[sl]
      x = np.where(f[:, None, None, None], x[:, :, ::-1], x)
    if max_shift > 0:
      x = translate(x, self.shifts(step, max_shift)[sl])
    if contrast > 0 or brightness > 0:
      factor, offset = self.photometric(step, contrast, brightness)[sl].T
      x = adjust(x, factor, offset)
    return np.ascontiguousarray(x), labels[idx].astype(np.int32)


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
