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
