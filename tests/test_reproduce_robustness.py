"""faceens.reproduce_robustness: worst case over attacks and robust accuracy, by hand."""

import numpy as np

from faceens import reproduce_robustness as rr


def test_worst_case_and_robust_accuracy_hand_computed():
  inf = np.inf
  pre = np.array([False, False, False, True])
  per_attack = {
      # pair 0: both succeed (0.5, 0.3); pair 1: only CW (0.8); pair 2: none; pair 3: clean.
      "ifgsm": {"l2": np.array([0.5, 0.9, 1.0, np.nan]), "linf": np.array([2, 3, 3, np.nan]) / 255,
                "success": np.array([True, False, False, False])},
      "cw": {"l2": np.array([0.3, 0.8, 1.5, np.nan]), "linf": np.array([4, 5, 6, np.nan]) / 255,
             "success": np.array([True, True, False, False])},
  }
  worst = rr.worst_case_l2(per_attack, pre)
  np.testing.assert_array_equal(worst, [0.3, 0.8, inf, 0.0])
  # Budgets 0.3 (pair 0 broken at exactly its L2), 0.5, 1.0: still rejected 2/4, 2/4, 1/4.
  assert rr.robust_accuracy_l2(worst, [0.3, 0.5, 1.0]) == [0.5, 0.5, 0.25]
  # L_inf 1/255: only the clean pair broken; 2/255: + pair 0 (I-FGSM); 5/255: + pair 1 (CW).
  assert rr.robust_accuracy_linf(per_attack, pre, [1 / 255, 2 / 255, 5 / 255]) == [0.75, 0.5, 0.25]


def test_plan_attacks_and_budgets():
  plan = rr.RobustPlan()
  cfgs = plan.configs()
  assert set(cfgs) == {"ifgsm", "cw", "bim", "pgd_1", "pgd_2", "pgd_4"}
  # BIM's epsilon binds: 200 steps of 1/255 could go 200/255 >> 0.05 = 12.75/255.
  assert cfgs["bim"].epsilon == 0.05 and plan.bim_max_iters * plan.bim_step > plan.bim_epsilon
  assert cfgs["pgd_2"].epsilon == 2 / 255 and cfgs["pgd_2"].step_size == 0.5 / 255
  assert plan.l2_budgets[0] == 0.05 and plan.l2_budgets[-1] == 2.0


def test_hierarchical_bootstrap_by_hand():
  from faceens import reproduce_summary as rs
  b = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]])
  # A = B + 1 on every pair: every resample of the shared pairs differs by exactly 1.
  d = rs.robustness_difference(b + 1.0, b, n=200)
  assert (d["difference"], d["lo"], d["hi"]) == (1.0, 1.0, 1.0)
  assert rs.robustness_verdict(d) == "more robust"
  d = rs.robustness_difference(b, b, n=200)
  assert (d["lo"], d["hi"]) == (0.0, 0.0) and rs.robustness_verdict(d).startswith("equivalent")
  # Two seeds of A at 1 and 3 against one of B at 2: the mean matches (difference 0), but
  # resampling A's seeds gives -1, 0 or +1: seed variance makes it "cannot tell".
  a = np.array([[1.0] * 5, [3.0] * 5])
  d = rs.robustness_difference(a, np.full((1, 5), 2.0), n=400)
  assert d["difference"] == 0.0 and (d["lo"], d["hi"]) == (-1.0, 1.0)
  assert rs.robustness_verdict(d) == "cannot tell"
  # Infinite worst cases (no attack succeeded) are robust beyond any finite one.
  inf = np.array([[np.inf] * 5])
  assert rs.robustness_verdict(rs.robustness_difference(inf, b, n=100)) == "more robust"


def test_accuracy_difference_matches_the_protocol():
  from faceens import reproduce_summary as rs
  from faceens import verification
  rng = np.random.default_rng(0)
  issame = np.tile([True, False], 50)
  fold = np.repeat(np.arange(1, 6), 20)

  def run(sep):
    d = np.where(issame, rng.uniform(0.0, 1.0, 100), rng.uniform(1.0 - sep, 2.0, 100))
    return {"test_pairs": {"insightface": d, "issame": issame.astype(int), "fold": fold}}
  a, b = [run(0.0)], [run(0.6), run(0.6)]
  d = rs.accuracy_difference(a, b, n=50)
  acc = lambda r: verification.kfold_accuracy(r["test_pairs"]["insightface"], issame, folds=fold)[0]  # noqa: E731
  assert np.isclose(d["difference"], acc(a[0]) - np.mean([acc(r) for r in b]))
  assert d["lo"] <= d["difference"] <= d["hi"] and d["seeds"] == [1, 2]


def test_claim_verdicts_need_every_comparison():
  from faceens import reproduce_summary as rs
  more = {"verdict": "more robust"}
  same = {"verdict": "equivalent (within +-0.02)"}
  claim = lambda vs, missing, expects="more robust": rs._claim_verdict(  # noqa: E731
      {"comparisons": vs, "comparisons_missing": missing, "expects": expects})
  assert claim([more, more], 0) == "supported"
  assert claim([more], 5) == "incomplete (1 of 6 comparisons run, so far consistent)"
  assert claim([more, same], 4) == "contradicted"   # one contradiction settles it
  assert claim([more, {"verdict": "cannot tell"}], 0) == "cannot tell"
  assert claim([], 1) == "not run"
  assert claim([same], 0, "equivalent or less robust") == "supported"
  assert claim([more], 0, "equivalent or less robust") == "contradicted"
