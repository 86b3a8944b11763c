"""Operating points: verification thresholds calibrated to a false-accept rate.

A model attacked at its own accuracy-optimal threshold is attacked at its own false-accept rate,
and models then differ in how much they accept before any attack. Comparing robustness needs a
common operating point: for each model, the threshold under which a fixed share ``far`` of many
random different-person pairs is accepted (accept = distance < threshold).
"""

from __future__ import annotations

import numpy as np


def impostor_pairs(labels, n: int, seed: int = 0, exclude=()) -> np.ndarray:
  """``n`` distinct unordered pairs ``[n, 2]`` (``i < j``) of items with different labels, drawn
  uniformly (seeded), leaving out the unordered pairs in ``exclude``."""
  labels = np.asarray(labels)
  m = len(labels)
  banned = {(min(a, b), max(a, b)) for a, b in exclude}
  _, counts = np.unique(labels, return_counts=True)
  total = m * (m - 1) // 2 - int(np.sum(counts * (counts - 1) // 2))
  if n > total - len(banned):
    raise ValueError(f"{n} impostor pairs asked for; {m} items of {len(np.unique(labels))} "
                     f"identities have {total - len(banned)}")
  rng = np.random.default_rng(seed)
  chosen: set = set()
  while len(chosen) < n:
    a = rng.integers(0, m, 2 * (n - len(chosen)) + 16)
    b = rng.integers(0, m, len(a))
    for i, j in zip(a.tolist(), b.tolist()):
      if labels[i] == labels[j]:
        continue
      key = (min(i, j), max(i, j))
      if key in banned or key in chosen:
        continue
      chosen.add(key)
      if len(chosen) == n:
        break
  return np.array(sorted(chosen), np.int64).reshape(-1, 2)


def threshold_at_far(distances, far: float) -> tuple[float, float]:
  """``(threshold, empirical far)``: the largest threshold among the distances under which at most
  ``floor(far * n)`` of the ``n`` impostor ``distances`` are accepted (``d < threshold``), and
  the share that is."""
  d = np.sort(np.asarray(distances, np.float64))
  if not len(d):
    raise ValueError("no impostor distances to calibrate on")
  if not 0 < far < 1:
    raise ValueError(f"far must be in (0, 1), got {far}")
  k = int(np.floor(far * len(d)))
  t = float(d[k])
  return t, float(np.mean(d < t))
