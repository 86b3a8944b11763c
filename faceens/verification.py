"""Face verification metrics: InsightFace's k-fold protocol, ROC-AUC and TAR@FAR.

InsightFace's ``eval/verification.py`` (the protocol behind every LFW / CFP-FP / AgeDB-30 number):

  * embedding of an image = L2-normalise(E(x) + E(flip(x)))  (``flip_embedding``);
  * distance = squared L2 between the two embeddings of a pair;
  * "same person" when distance < threshold; thresholds 0, 0.01, ..., 3.99;
  * 10 contiguous folds (``KFold(shuffle=False)``): the threshold with the best accuracy on the
    9 training folds is applied to the held-out fold; report mean and std of the 10 accuracies and
    the mean best threshold.

Amada et al. instead use the plain Euclidean distance between ensemble embeddings without flip
(``metric="euclidean"``). ROC-AUC and TAR@FAR use every pair (no folds), with the similarity
score ``-distance``.
"""

from __future__ import annotations

import numpy as np

METRICS = ("squared_l2", "euclidean")
THRESHOLDS = np.arange(0, 4, 0.01)
FARS = (1e-3, 1e-4)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def flip_embedding(emb: np.ndarray, emb_flipped: np.ndarray) -> np.ndarray:
  """InsightFace's test-time flip: ``normalise(E(x) + E(flip(x)))``."""
  return l2_normalize(np.asarray(emb, np.float64) + np.asarray(emb_flipped, np.float64))


def distances(emb1: np.ndarray, emb2: np.ndarray, metric: str = "squared_l2") -> np.ndarray:
  """Per-pair distance between rows of ``emb1`` and ``emb2`` ([P, d] each)."""
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
  emb1, emb2 = np.asarray(emb1, np.float64), np.asarray(emb2, np.float64)
  if emb1.shape != emb2.shape or emb1.ndim != 2:
    raise ValueError(f"embeddings {emb1.shape} and {emb2.shape} must both be [pairs, dim]")
  sq = np.sum(np.square(emb1 - emb2), axis=1)
  return sq if metric == "squared_l2" else np.sqrt(sq)


def pair_distances(emb: np.ndarray, pairs: np.ndarray, metric: str = "euclidean") -> np.ndarray:
  """Distance between ``emb[i]`` and ``emb[j]`` for index pairs ``[P, 2]``."""
  emb = np.asarray(emb, np.float64)
  return distances(emb[pairs[:, 0]], emb[pairs[:, 1]], metric)


def _check(dist, issame):
  dist = np.asarray(dist, np.float64)
  issame = np.asarray(issame)
  if dist.shape != issame.shape or dist.ndim != 1:
    raise ValueError(f"dist {dist.shape} and issame {issame.shape} must be 1-D and equal length")
  if issame.dtype != bool:
    if not np.all(np.isin(issame, (0, 1))):
      raise ValueError("issame labels must be 0/1 or booleans")
    issame = issame.astype(bool)
  return dist, issame


def accuracy_at(threshold: float, dist: np.ndarray, issame: np.ndarray) -> float:
  predict = dist < threshold
  return float(np.mean(predict == issame))


def _fold_groups(folds, dist) -> list[np.ndarray]:
  """The pair indices of each explicit fold id (sorted ids), checked against ``dist``."""
  ids = np.asarray(folds)
  if ids.shape != dist.shape:
    raise ValueError(f"folds {ids.shape} must give one fold id per pair {dist.shape}")
  groups = [np.flatnonzero(ids == f) for f in np.unique(ids)]
  if len(groups) < 2:
    raise ValueError("explicit folds need at least 2 distinct fold ids")
  return groups


def kfold_accuracy(dist, issame, thresholds=None, nfolds: int = 10, folds=None):
  """Returns ``(accuracy_mean, accuracy_std, best_threshold_mean)`` over ``nfolds`` folds.

  ``folds``: a fold id per pair (e.g. LFW's official, person-disjoint folds); default
  ``nfolds`` contiguous folds. Ties between thresholds go to the smallest one (``np.argmax``, as
  InsightFace).
  """
  dist, issame = _check(dist, issame)
  if folds is None:
    if len(dist) < nfolds:
      raise ValueError(f"{len(dist)} pairs is fewer than {nfolds} folds")
    folds = np.array_split(np.arange(len(dist)), nfolds)  # sklearn KFold(shuffle=False) sizes
  else:
    folds = _fold_groups(folds, dist)
  thresholds = THRESHOLDS if thresholds is None else np.asarray(thresholds, np.float64)
  correct = (dist[None, :] < thresholds[:, None]) == issame[None, :]   # [T, P]
  total = correct.sum(axis=1)
  accs, best = [], []
  for test_idx in folds:
    n_train = len(dist) - len(test_idx)
    train_acc = (total - correct[:, test_idx].sum(axis=1)) / n_train
    i = int(np.argmax(train_acc))
    best.append(thresholds[i])
    accs.append(correct[i, test_idx].mean())
  return float(np.mean(accs)), float(np.std(accs)), float(np.mean(best))


def kfold_accuracy_resampled(dist, issame, folds, counts, thresholds=None) -> np.ndarray:
  """``kfold_accuracy(...)[0]`` of many resamples of the pairs at once: ``counts`` ``[B, P]``
  (or ``[P]``) says how often each pair occurs in each resample (a bootstrap draw as counts);
  ``folds`` a fold id per pair, and every resample must keep at least one pair in every fold.
  The same arithmetic as ``kfold_accuracy`` on the repeated pairs (integer counts of correct
  decisions per fold and threshold, the smallest best threshold), as one matrix product per
  fold instead of one pass per resample. Returns ``[B]`` accuracies."""
  dist, issame = _check(dist, issame)
  counts = np.asarray(counts)
  if counts.ndim == 1:
    counts = counts[None]
  if counts.ndim != 2 or counts.shape[1] != len(dist):
    raise ValueError(f"counts {counts.shape} must be [resamples, {len(dist)} pairs]")
  if counts.dtype.kind not in "iu" or (counts < 0).any():
    raise ValueError("counts must be non-negative integers (occurrences of each pair)")
  groups = _fold_groups(folds, dist)
  thresholds = THRESHOLDS if thresholds is None else np.asarray(thresholds, np.float64)
  correct = ((dist[:, None] < thresholds[None, :]) == issame[:, None]).astype(np.float64)  # [P, T]
  # Integer-valued float64 sums (exact below 2**53): correct decisions per resample, fold, threshold.
  hits = np.stack([counts[:, g].astype(np.float64) @ correct[g] for g in groups], 1)  # [B, F, T]
  sizes = np.stack([counts[:, g].sum(1) for g in groups], 1)                         # [B, F]
  if (sizes == 0).any():
    raise ValueError("a resample leaves a fold empty: resample within each fold")
  total, n = hits.sum(1), sizes.sum(1)
  rows = np.arange(len(counts))
  accs = []
  for f in range(len(groups)):
    train = (total - hits[:, f]) / (n - sizes[:, f])[:, None]
    best = np.argmax(train, axis=1)
    accs.append(hits[rows, f, best] / sizes[:, f])
  return np.mean(np.stack(accs, 1), axis=1)


def roc(dist, issame):
  """``(fpr, tpr, thresholds)`` of "same when distance <= threshold" (scikit-learn)."""
  from sklearn.metrics import roc_curve
  dist, issame = _check(dist, issame)
  fpr, tpr, thr = roc_curve(issame, -dist, drop_intermediate=False)
  return fpr, tpr, -thr


def roc_auc(dist, issame) -> float | None:
  """Area under the ROC curve; ``None`` when only one class is present."""
  from sklearn.metrics import roc_auc_score
  dist, issame = _check(dist, issame)
  if issame.all() or not issame.any():
    return None
  return float(roc_auc_score(issame, -dist))


def tar_at_far(dist, issame, fars=FARS) -> tuple[dict, dict]:
  """True accept rate at each false accept rate.

  TAR@FAR = the largest TPR over thresholds whose FPR <= FAR. A FAR below one impostor pair
  (``FAR * #impostors < 1``) cannot be measured: its value is ``None`` and the second dict says why.
  Keys are ``f"{far:g}"``.
  """
  dist, issame = _check(dist, issame)
  n_imp = int((~issame).sum())
  values, unavailable = {}, {}
  fpr, tpr, _ = roc(dist, issame) if issame.any() and n_imp else (None, None, None)
  for far in fars:
    key = f"{far:g}"
    if not issame.any() or far * n_imp < 1:
      values[key] = None
      unavailable[key] = (f"needs >= {int(np.ceil(1 / far))} impostor pairs and a genuine pair; "
                          f"{n_imp} impostor / {int(issame.sum())} genuine here")
      continue
    ok = fpr <= far + 1e-12
    values[key] = float(tpr[ok].max())
  return values, unavailable


def evaluate(dist, issame, nfolds: int = 10, folds=None) -> dict:
  """All metrics of one set of pair distances (see the module docstring)."""
  dist, issame = _check(dist, issame)
  acc, std, thr = kfold_accuracy(dist, issame, nfolds=nfolds, folds=folds)
  tar, why = tar_at_far(dist, issame)
  out = {"accuracy": acc, "accuracy_std": std, "threshold": thr, "roc_auc": roc_auc(dist, issame),
         "tar_at_far": tar, "pairs": int(len(dist)), "genuine": int(issame.sum())}
  if why:
    out["tar_at_far_unavailable"] = why
  return out
