"""faceens.data.pairs: balanced verification pairs."""

import numpy as np

from faceens.data import demo


def test_balanced_pairs():
  labels = np.repeat(np.arange(10), 10)
  pairs, issame = demo.balanced_pairs(labels, seed=0)
  assert len(pairs) == 900 and issame.sum() == 450  # C(10, 2) * 10 genuine, as many impostor
  same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
  np.testing.assert_array_equal(same, issame)
  assert len({tuple(p) for p in pairs}) == 900
  # Every contiguous tenth (one fold) is balanced.
  for fold in np.array_split(issame, 10):
    assert fold.sum() == len(fold) // 2
  np.testing.assert_array_equal(demo.balanced_pairs(labels, seed=0)[0], pairs)
