"""The k-fold verification accuracy on hand-made cases."""

import numpy as np
import pytest

from faceens import verification
from tests.references import reference_insightface


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


# ----------------------------------------------------------------------------- independent reference


def _synthetic(n_pairs=300, d=16, seed=0):
  rng = np.random.default_rng(seed)
  issame = rng.random(n_pairs) < 0.5
  a = rng.normal(size=(n_pairs, d))
  noise = rng.normal(size=(n_pairs, d))
  b = np.where(issame[:, None], a + 0.9 * noise, noise)
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  return norm(a), norm(b), issame


@pytest.mark.parametrize("seed,n_pairs", [(0, 300), (1, 257)])
def test_protocol_matches_independent_insightface_reference(seed, n_pairs):
  e1, e2, issame = _synthetic(n_pairs, seed=seed)
  ref_acc, ref_std, ref_thr, ref_dist = reference_insightface(e1, e2, issame)
  dist = verification.distances(e1, e2, "squared_l2")
  np.testing.assert_allclose(dist, ref_dist, rtol=1e-12)
  acc, std, thr = verification.kfold_accuracy(dist, issame)
  np.testing.assert_allclose([acc, std, thr], [ref_acc, ref_std, ref_thr], rtol=1e-12)
  assert 0.6 < acc < 1.0  # a non-trivial case
  np.testing.assert_allclose(verification.distances(e1, e2, "euclidean"), np.sqrt(ref_dist))


def test_roc_auc_is_the_mann_whitney_statistic():
  e1, e2, issame = _synthetic(200, seed=3)
  dist = np.round(verification.distances(e1, e2), 2)  # ties on purpose
  gen, imp = dist[issame], dist[~issame]
  # P(genuine closer than impostor) + half the ties, over all genuine x impostor pairs.
  mw = ((gen[:, None] < imp[None]).sum() + 0.5 * (gen[:, None] == imp[None]).sum()) / (len(gen) * len(imp))
  np.testing.assert_allclose(verification.roc_auc(dist, issame), mw, rtol=1e-12)
  assert verification.roc_auc(dist[issame], issame[issame]) is None


def test_tar_at_far_against_brute_force():
  rng = np.random.default_rng(0)
  n_gen, n_imp = 500, 20000
  dist = np.concatenate([rng.normal(0.8, 0.3, n_gen), rng.normal(1.8, 0.25, n_imp)])
  issame = np.concatenate([np.ones(n_gen, bool), np.zeros(n_imp, bool)])
  got, why = verification.tar_at_far(dist, issame, fars=(1e-3, 1e-4))
  assert why == {}
  gen, imp = dist[issame], dist[~issame]
  for far in (1e-3, 1e-4):
    best = 0.0
    for t in np.sort(dist):  # accept when dist <= t
      if np.mean(imp <= t) <= far:
        best = max(best, np.mean(gen <= t))
    np.testing.assert_allclose(got[f"{far:g}"], best, rtol=1e-12)
  assert 0 < got["0.0001"] <= got["0.001"] < 1


def test_tar_at_far_unavailable_with_few_impostors():
  dist = np.linspace(0, 2, 40)
  issame = np.arange(40) < 20  # 20 impostor pairs cannot measure FAR 1e-3
  got, why = verification.tar_at_far(dist, issame)
  assert got == {"0.001": None, "0.0001": None}
  assert "needs >= 1000 impostor pairs" in why["0.001"] and "20 impostor" in why["0.001"]


def test_flip_embedding_and_evaluate_keys():
  a = np.array([[3.0, 0.0], [0.0, 1.0]])
  b = np.array([[0.0, 4.0], [0.0, 1.0]])
  np.testing.assert_allclose(verification.flip_embedding(a, b), [[0.6, 0.8], [0.0, 1.0]])
  e1, e2, issame = _synthetic(100)
  out = verification.evaluate(verification.distances(e1, e2), issame)
  assert set(out) >= {"accuracy", "accuracy_std", "threshold", "roc_auc", "tar_at_far"}
  assert out["tar_at_far"]["0.001"] is None and "tar_at_far_unavailable" in out


def test_labels_must_be_binary():
  with pytest.raises(ValueError, match="0/1"):
    verification.kfold_accuracy(np.zeros(10), np.full(10, 2))
  with pytest.raises(ValueError, match="unknown metric 'cosine'"):
    verification.distances(np.zeros((2, 3)), np.zeros((2, 3)), "cosine")


def test_kfold_accuracy_with_explicit_folds_matches_hand_computation():
  # Fold 0 separates at 0.5 < t <= 0.6, fold 1 at 0.9 < t <= 1.0; thresholds 0.0 .. 1.5.
  dist = np.array([0.2, 0.5, 0.6, 0.9, 0.8, 0.9, 1.0, 1.2])
  issame = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
  folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  t = np.round(np.arange(0, 1.5, 0.1), 10)
  acc, std, thr = verification.kfold_accuracy(dist, issame, thresholds=t, folds=folds)
  # Test fold 0: trained on fold 1, the smallest best threshold is 1.0 (all 4 right); on fold 0
  # it accepts all four pairs: 2/4. Test fold 1: trained on fold 0, best 0.6; on fold 1 it
  # rejects 0.8 and 0.9 (same) and rejects both impostors: 2/4.
  assert (acc, std) == (0.5, 0.0)
  assert thr == pytest.approx((1.0 + 0.6) / 2)
  with pytest.raises(ValueError, match="one fold id per pair"):
    verification.kfold_accuracy(dist, issame, folds=folds[:3])
  with pytest.raises(ValueError, match="at least 2 distinct fold ids"):
    verification.kfold_accuracy(dist, issame, folds=np.zeros(8))


def test_threshold_at_far_hand_computed():
  from faceens import calibration
  d = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.6, 0.4, 0.8, 1.0])
  # FAR 0.2 of 10 pairs: at most 2 accepted; the 3rd smallest (0.3) accepts 0.1 and 0.2.
  assert calibration.threshold_at_far(d, 0.2) == (0.3, 0.2)
  # FAR 0.05: floor(0.5) = 0 pairs: the smallest distance, which accepts none.
  assert calibration.threshold_at_far(d, 0.05) == (0.1, 0.0)
  # Ties: 0.5 appears three times; at most 4 accepted -> threshold d[4] = 0.5 accepts 3.
  tied = np.array([0.1, 0.2, 0.3, 0.5, 0.5, 0.5, 0.9, 1.0, 1.1, 1.2])
  assert calibration.threshold_at_far(tied, 0.4) == (0.5, 0.3)
  with pytest.raises(ValueError, match="far must be in"):
    calibration.threshold_at_far(d, 0.0)


def test_impostor_pairs_are_distinct_different_people_and_exclude():
  from faceens import calibration
  labels = np.array([0, 0, 1, 1, 2, 2, 3])
  exclude = [(2, 0), (6, 4)]
  p = calibration.impostor_pairs(labels, 10, seed=3, exclude=exclude)
  assert p.shape == (10, 2) and np.all(p[:, 0] < p[:, 1])
  assert np.all(labels[p[:, 0]] != labels[p[:, 1]])
  assert len({tuple(r) for r in p.tolist()}) == 10
  assert not {(0, 2), (4, 6)} & {tuple(r) for r in p.tolist()}
  # 7 items: 21 pairs, 3 same-person, 2 excluded: 16 impostor pairs in all.
  assert len(calibration.impostor_pairs(labels, 16, seed=0, exclude=exclude)) == 16
  with pytest.raises(ValueError, match="have 16"):
    calibration.impostor_pairs(labels, 17, exclude=exclude)
  np.testing.assert_array_equal(p, calibration.impostor_pairs(labels, 10, seed=3, exclude=exclude))


def test_resampled_accuracy_equals_the_protocol_on_repeated_pairs():
  # Each resample given as counts must give what kfold_accuracy gives on the pairs repeated:
  # both count correct decisions as integers and divide by the same integer sizes.
  e1, e2, issame = _synthetic(240, seed=5)
  dist = verification.distances(e1, e2, "squared_l2")
  folds = np.repeat(np.arange(1, 7), 40)
  rng = np.random.default_rng(0)
  groups = [np.flatnonzero(folds == f) for f in np.unique(folds)]
  idx = [np.concatenate([rng.choice(g, len(g)) for g in groups]) for _ in range(6)]
  counts = np.stack([np.bincount(i, minlength=len(dist)) for i in idx])
  got = verification.kfold_accuracy_resampled(dist, issame, folds, counts)
  want = [verification.kfold_accuracy(dist[i], issame[i], folds=folds[i])[0] for i in idx]
  # A mean of 6 ratios of the same integers in the same order: equal up to the last bit or two.
  np.testing.assert_allclose(got, want, rtol=4 * np.finfo(float).eps, atol=0)
  # Counts of one everywhere is the protocol on the pairs themselves.
  ones = np.ones(len(dist), np.int64)
  np.testing.assert_allclose(verification.kfold_accuracy_resampled(dist, issame, folds, ones),
                             [verification.kfold_accuracy(dist, issame, folds=folds)[0]],
                             rtol=4 * np.finfo(float).eps, atol=0)
  with pytest.raises(ValueError, match="leaves a fold empty"):
    verification.kfold_accuracy_resampled(dist, issame, folds, np.where(folds == 1, 0, 1))
  with pytest.raises(ValueError, match="non-negative integers"):
    verification.kfold_accuracy_resampled(dist, issame, folds, ones * 0.5)
