"""Verification accuracy with InsightFace's k-fold protocol (``eval/verification.py``).

Distances below a threshold mean "same person". Thresholds are swept on the training folds and
the best one is applied to the held-out fold; folds are contiguous (``KFold(shuffle=False)``).
"""

from __future__ import annotations

import numpy as np


def accuracy_at(threshold: float, dist: np.ndarray, issame: np.ndarray) -> float:
  predict = dist < threshold
  return float(np.mean(predict == issame))


def kfold_accuracy(dist, issame, thresholds=None, nfolds: int = 10):
  """Returns ``(accuracy_mean, accuracy_std, best_threshold_mean)`` over ``nfolds`` folds."""
  dist = np.asarray(dist, np.float64)
  issame = np.asarray(issame, bool)
  if dist.shape != issame.shape or dist.ndim != 1:
    raise ValueError(f"dist {dist.shape} and issame {issame.shape} must be 1-D and equal length")
  if len(dist) < nfolds:
    raise ValueError(f"{len(dist)} pairs is fewer than {nfolds} folds")
  thresholds = np.arange(0, 4, 0.01) if thresholds is None else np.asarray(thresholds)
  folds = np.array_split(np.arange(len(dist)), nfolds)  # sklearn KFold(shuffle=False) sizes
  accs, best = [], []
  for test_idx in folds:
    train_mask = np.ones(len(dist), bool)
    train_mask[test_idx] = False
    train_acc = [accuracy_at(t, dist[train_mask], issame[train_mask]) for t in thresholds]
    t_best = thresholds[int(np.argmax(train_acc))]
    best.append(t_best)
    accs.append(accuracy_at(t_best, dist[test_idx], issame[test_idx]))
  return float(np.mean(accs)), float(np.std(accs)), float(np.mean(best))


def pair_distances(emb: np.ndarray, pairs: np.ndarray) -> np.ndarray:
  """Euclidean distance ``||E(x_i) - E(x_j)||`` for index pairs ``[P, 2]`` (Amada et al.)."""
  emb = np.asarray(emb, np.float64)
  return np.linalg.norm(emb[pairs[:, 0]] - emb[pairs[:, 1]], axis=1)
