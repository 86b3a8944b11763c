"""The k-fold verification accuracy on hand-made cases."""

import numpy as np
import pytest

from faceens import verification


def test_separable_distances_give_known_threshold():
  # Every fold holds genuine 0.10, 0.15, 0.20, 0.25, 0.305 and impostor 0.6 .. 0.9: every fold is
  # perfect, and the first best threshold on the 0.01 grid is the first t > 0.305, i.e. 0.31.
  fold_dist = np.array([0.1, 0.6, 0.15, 0.7, 0.2, 0.8, 0.25, 0.85, 0.305, 0.9])
  dist = np.tile(fold_dist, 10)
  issame = np.tile([True, False], 50)
  acc, std, thr = verification.kfold_accuracy(dist, issame)
  assert (acc, std) == (1.0, 0.0)
  np.testing.assert_allclose(thr, 0.31, atol=1e-9)


def test_one_overlap_costs_one_fold():
  dist = np.tile([0.2, 0.8], 10).astype(float)
  issame = np.tile([True, False], 10)
  dist[0] = 0.9  # one genuine pair far apart: fold 0 (pairs 0, 1) gets 1 of 2 right
  acc, _, _ = verification.kfold_accuracy(dist, issame)
  np.testing.assert_allclose(acc, (9 * 1.0 + 0.5) / 10)


def test_bad_shapes():
  with pytest.raises(ValueError, match="must be 1-D and equal length"):
    verification.kfold_accuracy(np.zeros(10), np.zeros(9, bool))
