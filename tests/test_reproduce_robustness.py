"""faceens.reproduce_robustness: worst case over attacks and robust accuracy, by hand."""

import os
import types

import numpy as np
import pytest

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
  np.testing.assert_array_equal(rr.worst_case_linf(per_attack, pre), [2 / 255, 5 / 255, inf, 0])


def test_budget_tolerances_follow_the_rounding_of_a_step_walk():
  plan = rr.RobustPlan()
  s = np.float32(plan.step_size)
  for b in plan.linf_budgets:
    # I-FGSM reaches b after n sign steps, summed in float32 from a pixel near 1 (the largest
    # rounding): it measures b up to the accumulated rounding, within the tolerance...
    x = np.float32(1.0) - np.float32(b) - np.float32(1e-3)
    adv = x
    for _ in range(int(round(b / plan.step_size))):
      adv = np.float32(adv + s)
    walked = float(np.float64(adv) - np.float64(x))
    pre = np.array([False])
    on = {"ifgsm": {"linf": np.array([walked]), "success": np.array([True])}}
    assert rr.robust_accuracy_linf(on, pre, [b]) == [0.0], (b * 255, walked - b)
    # ...while one step further stays outside.
    beyond = {"ifgsm": {"linf": np.array([walked + plan.step_size]), "success": np.array([True])}}
    assert rr.robust_accuracy_linf(beyond, pre, [b]) == [1.0]
  # L2: an example projected onto the ball of radius b, measured in float32.
  rng = np.random.default_rng(0)
  d = rng.normal(size=64 * 64 * 3).astype(np.float32)
  for b in plan.l2_budgets:
    proj = (d * np.float32(b / np.linalg.norm(d.astype(np.float64)))).astype(np.float32)
    measured = float(np.linalg.norm(proj))
    assert rr.robust_accuracy_l2(np.array([measured]), [b]) == [0.0]
    assert rr.robust_accuracy_l2(np.array([b * 1.001]), [b]) == [1.0]


def _budget_run(seed, per_attack, pre, diagnostic=None):
  """A stored run as ``reproduce_summary`` loads it, at FAR 0.01: its attacks' arrays, the
  worst case, and a diagnostic that must not count."""
  arrays = {"0.01/pre_accepted": pre, "0.01/worst_case_l2": rr.worst_case_l2(per_attack, pre)}
  for name, r in (per_attack | (diagnostic or {})).items():
    arrays |= {f"0.01/{name}/{k}": v for k, v in r.items()}
  return {"seed": seed, "robustness_arrays": arrays,
          "robustness": {"operating_points": {"0.01": {"attacks": dict.fromkeys(per_attack)}}}}


def test_report_rereads_stored_runs_under_the_current_rule(tmp_path):
  import json
  from faceens import reproduce_summary as rs
  plan = rr.RobustPlan(pgd_budgets=(), pgd_l2_budgets=()).as_dict()   # I-FGSM alone
  # One I-FGSM example 2/255 + 8e-7 (80 float32 steps from a pixel near 1): within 2/255 by the
  # current rule; the stored summary, written under an older rule, says the pair held.
  linf = np.array([2 / 255 + 8e-7, 9 / 255])
  arrays = {"0.01/pre_accepted": np.array([False, False]),
            "0.01/ifgsm/l2": np.array([0.4, 0.9]), "0.01/ifgsm/linf": linf,
            "0.01/ifgsm/success": np.array([True, True])}
  arrays["0.01/worst_case_l2"] = arrays["0.01/ifgsm/l2"]
  stale = {"attacks": {"ifgsm": {}}, "robust_accuracy_linf": {"2/255": 1.0}}
  d = tmp_path / "per_run" / "m_s0"
  d.mkdir(parents=True)
  (d / "run.json").write_text(json.dumps({"run": "m_s0", "seed": 0}))
  np.savez(d / "test_pairs.npz", labels=np.array([0]))
  (d / "robustness.json").write_text(json.dumps(
      {"key": {"plan": plan}, "operating_points": {"0.01": stale}}))
  np.savez(d / "robustness.npz", **arrays)
  (run,) = rs.load_runs(str(tmp_path))
  op = run["robustness"]["operating_points"]["0.01"]
  assert op["robust_accuracy_linf"]["2/255"] == 0.5 and op["robust_accuracy_linf"]["8/255"] == 0.5
  assert op["worst_case_l2_median"] == 0.65 and op["robust_accuracy_l2"]["0.05"] == 1.0


def test_claims_on_robust_accuracy_at_a_budget_by_hand():
  from faceens import reproduce_summary as rs
  f = np.array([False] * 4)
  pre = np.array([False, False, False, True])
  single = {"ifgsm": {"l2": np.array([0.3, 0.6, 0.4, 0.0]), "linf": np.array([1, 3, 2, 0]) / 255,
                      "success": ~pre}}
  # SRV: pair 2 withstands everything; a diagnostic breaking every pair at L2 0.1 is ignored.
  srv = {"ifgsm": {"l2": np.array([0.3, 0.6, 9.0, 0.0]), "linf": np.array([1, 3, 9, 0]) / 255,
                   "success": np.array([True, True, False, False])}}
  diag = {"ifgsm:members": {"l2": np.full(4, 0.1), "linf": np.full(4, 0.5 / 255),
                            "success": ~f}}
  runs = {"single": [_budget_run(0, single, pre)], "srv": [_budget_run(0, srv, pre, diag)]}
  # Still rejected within L2 0.5: single pair 1 only; SRV pairs 1, 2 (its pair 3: clean).
  l2 = rs._still_rejected(runs["srv"], "0.01", "l2", 0.5)
  np.testing.assert_array_equal(l2, [[0, 1, 1, 0]])
  # The same share the robustness stage reports: within L_inf 2/255, pairs 1 and 2 of SRV.
  linf = rs._still_rejected(runs["srv"], "0.01", "linf", 2 / 255)
  assert linf.mean() == rr.robust_accuracy_linf(srv, pre, [2 / 255])[0] == 0.5
  # SRV - single at L2 0.5: +0.25 on its only seed; every resample of the 4 pairs gives 0 to 1.
  for view in ("l2<=0.5", "linf<=2/255"):
    c = rs.claims(runs, "0.01", view)[3]
    assert c["claim"].startswith("SRV alone")
    (x,) = c["comparisons"]
    assert x["difference"] == 0.25 and x["per_seed"] == [0.25] and 0 <= x["lo"] <= x["hi"] <= 1
  with pytest.raises(ValueError, match="over_pairs"):
    rs.robustness_difference(l2, l2, over_pairs="max")


def test_pgd_breaks_missed_by_minimal_norm_by_hand():
  pre = np.array([False, False, False, True])
  per_attack = {
      "ifgsm": {"l2": np.array([0.4, 0.9, 2.0, np.nan]), "success": np.array([True, True, False, False])},
      "cw": {"l2": np.array([0.3, 0.7, 1.5, np.nan]), "success": np.array([True, True, True, False])},
      # PGD in L2 at 0.5 breaks pairs 0 (CW found 0.3 too), 1 (the minimal-norm attacks needed
      # 0.7: missed) and 3 (clean, not counted); at 1.0 pairs 1 (CW 0.7 <= 1) and 2 (missed).
      "pgd_l2_0.5": {"l2": np.array([0.5, 0.5, np.nan, 0.1]), "success": np.array([True, True, False, True])},
      "pgd_l2_1": {"l2": np.array([np.nan, 1.0, 1.0, np.nan]), "success": np.array([False, True, True, False])},
  }
  got = rr._missed(per_attack, pre, [(0.5, "0.5"), (1.0, "1")], lambda b: f"pgd_l2_{b:g}", "l2")
  assert got == {"0.5": 1, "1": 1}


def test_plan_attacks_and_budgets():
  plan = rr.RobustPlan()
  cfgs = plan.configs()
  assert set(cfgs) == {"ifgsm", "cw", "bim", "pgd_1", "pgd_2", "pgd_4", "pgd_l2_0.5", "pgd_l2_1"}
  assert cfgs["pgd_l2_0.5"].method == "pgd_l2" and cfgs["pgd_l2_0.5"].epsilon == 0.5
  # BIM's epsilon binds: 200 steps of 1/255 could go 200/255 >> 0.05 = 12.75/255.
  assert cfgs["bim"].epsilon == 0.05 and plan.bim_max_iters * plan.bim_step > plan.bim_epsilon
  assert cfgs["pgd_2"].epsilon == 2 / 255 and cfgs["pgd_2"].step_size == 0.5 / 255
  assert plan.l2_budgets[0] == 0.05 and plan.l2_budgets[-1] == 2.0


def test_hierarchical_bootstrap_by_hand():
  from faceens import reproduce_summary as rs
  b = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]])
  # A = B + 1 on every pair: every resample of the shared pairs differs by exactly 1.
  d = rs.robustness_difference(b + 1.0, b, n=200)
  assert (d["difference"], d["lo"], d["hi"], d["per_seed"]) == (1.0, 1.0, 1.0, [1.0])
  assert rs.robustness_verdict(d) == "more robust"
  d = rs.robustness_difference(b, b, n=200)
  assert (d["lo"], d["hi"]) == (0.0, 0.0) and rs.robustness_verdict(d).startswith("equivalent")
  # Seeds 1 and 3 of A against 2 and 2 of B: the means match (difference 0), but resampling the
  # seeds jointly gives -1, 0 or +1: seed variance makes it "cannot tell".
  a = np.array([[1.0] * 5, [3.0] * 5])
  d = rs.robustness_difference(a, np.full((2, 5), 2.0), n=400)
  assert d["difference"] == 0.0 and (d["lo"], d["hi"]) == (-1.0, 1.0)
  assert d["per_seed"] == [-1.0, 1.0] and rs.robustness_verdict(d) == "cannot tell"
  # Paired seeds: B trails A by 0.1 on each seed although the seeds differ by 2, so every joint
  # resample differs by 0.1 (unpaired resampling would range from -1.9 to +2.1).
  d = rs.robustness_difference(a, a - 0.1, n=400)
  np.testing.assert_allclose([d["difference"], d["lo"], d["hi"]], 0.1, rtol=1e-12)
  assert rs.robustness_verdict(d) == "more robust"
  # Infinite worst cases (no attack succeeded) are robust beyond any finite one; two unbroken
  # medians give an undefined difference, on which no verdict rests.
  inf = np.array([[np.inf] * 5])
  assert rs.robustness_verdict(rs.robustness_difference(inf, b, n=100)) == "more robust"
  d = rs.robustness_difference(inf, inf, n=100)
  assert np.isnan([d["difference"], d["lo"], d["hi"]]).all()
  assert rs.robustness_verdict(d) == "cannot tell" and "undefined" in rs._fmt(d)
  with pytest.raises(ValueError, match="same seeds"):
    rs.robustness_difference(a, b)


def test_family_wise_intervals_by_hand():
  from faceens import reproduce_summary as rs
  draws = np.arange(1000) / 1000
  # Order statistics: 2.5% / 97.5% of 1000 draws are draws 25 and 974 (0-based).
  assert rs._interval(draws) == (0.025, 0.974)
  a = np.array([[0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 1.5, 2.0, 5.0, 6.0]])
  # Keeping more draws extends the same stream: the 95% interval is unchanged.
  short = rs.robustness_difference(a, a[::-1], n=50)
  long = rs.robustness_difference(a, a[::-1], n=50, keep=300)
  assert (short["lo"], short["hi"]) == (long["lo"], long["hi"]) and len(long["draws"]) == 300
  assert "draws" not in short
  # Two comparisons: Bonferroni puts each at 1 - 0.05 / 2, tails of 1.25%: draws 12 and 987.
  def claim(shift):
    return [{"expects": "more robust", "comparisons_missing": 0,
             "comparisons": [{"verdict": "more robust", "draws": draws + shift}]}]
  by_far = {"0.01": claim(0.0), "0.001": claim(-0.02)}
  assert rs.family_wise(by_far) == {"comparisons": 2, "alpha": 0.05, "draws": 1000}
  x0, x1 = by_far["0.01"][0]["comparisons"][0], by_far["0.001"][0]["comparisons"][0]
  assert "draws" not in x0 and x0["family_wise"]["level"] == 0.975
  np.testing.assert_allclose([x0["family_wise"]["lo"], x0["family_wise"]["hi"]], [0.012, 0.987])
  np.testing.assert_allclose([x1["family_wise"]["lo"], x1["family_wise"]["hi"]],
                             [-0.008, 0.967])
  assert by_far["0.01"][0]["family_wise_verdict"] == "supported"
  assert by_far["0.001"][0]["family_wise_verdict"] == "cannot tell"


def test_comparisons_pair_the_seeds_both_methods_have():
  from faceens import reproduce_summary as rs
  a = [{"seed": s, "run": f"a{s}"} for s in (2, 0, 1)]
  b = [{"seed": s, "run": f"b{s}"} for s in (1, 0)]
  ra, rb, seeds = rs.common_seeds(a, b)
  assert seeds == [0, 1] and [r["run"] for r in ra] == ["a0", "a1"]
  assert [r["run"] for r in rb] == ["b0", "b1"]


def test_accuracy_difference_matches_the_protocol():
  from faceens import reproduce_summary as rs
  from faceens import verification
  rng = np.random.default_rng(0)
  issame = np.tile([True, False], 50)
  fold = np.repeat(np.arange(1, 6), 20)

  def run(name, seed, sep):
    d = np.where(issame, rng.uniform(0.0, 1.0, 100), rng.uniform(1.0 - sep, 2.0, 100))
    return {"run": name, "seed": seed,
            "test_pairs": {"insightface": d, "issame": issame.astype(int), "fold": fold}}
  a, b = [run("a0", 0, 0.0), run("a1", 1, 0.0)], [run("b0", 0, 0.6), run("b1", 1, 0.6)]
  boot = rs.bootstrap_accuracies(a + b, n=50)
  d = rs.accuracy_difference([boot["a0"], boot["a1"]], [boot["b0"], boot["b1"]])
  acc = lambda r: verification.kfold_accuracy(r["test_pairs"]["insightface"], issame, folds=fold)[0]  # noqa: E731
  want = [acc(x) - acc(y) for x, y in zip(a, b)]
  np.testing.assert_allclose(d["per_seed"], want, rtol=1e-12)
  np.testing.assert_allclose(d["difference"], np.mean(want), rtol=1e-12)
  assert d["lo"] <= d["difference"] <= d["hi"]
  # Each resample is the protocol on the resampled pairs (checked against kfold_accuracy).
  counts = rs._fold_resamples(fold, 3, seed=0)
  for c, got in zip(counts, boot["a0"][1][:3]):
    idx = np.repeat(np.arange(100), c)
    assert np.isclose(got, verification.kfold_accuracy(
        a[0]["test_pairs"]["insightface"][idx], issame[idx], folds=fold[idx])[0], rtol=1e-12)
  other = run("c0", 0, 0.0)
  other["test_pairs"]["fold"] = np.roll(fold, 1)
  with pytest.raises(ValueError, match="c0: its test pairs differ"):
    rs.bootstrap_accuracies([a[0], other], n=5)


def test_accuracy_seeds_are_paired():
  from faceens import reproduce_summary as rs
  # Seeds far apart (0.5 and 0.75) but B trails A by exactly 0.25 on each seed and resample:
  # joint seed resampling gives exactly 0.25 every time (unpaired: -0.0 to 0.5).
  a = [(0.5, np.full(400, 0.5)), (0.75, np.full(400, 0.75))]
  b = [(0.25, np.full(400, 0.25)), (0.5, np.full(400, 0.5))]
  d = rs.accuracy_difference(a, b)
  assert (d["difference"], d["lo"], d["hi"], d["per_seed"]) == (0.25, 0.25, 0.25, [0.25, 0.25])
  with pytest.raises(ValueError, match="same seeds"):
    rs.accuracy_difference(a, b[:1])


def test_diagnostics_per_run():
  plan = rr.RobustPlan()
  assert set(plan.diagnostics("srv_fdp", 3, 0)) == {"ifgsm:members", "cw:patience150"}
  assert set(plan.diagnostics("single", 1, 0)) == {"cw:patience150"}
  assert set(plan.diagnostics("fdp", 3, 0)) == {"ifgsm:members"}
  assert plan.diagnostics("srv_fdp", 3, 1) == {} and plan.diagnostics("advt", 1, 0) == {}
  cfg, ref, limit = plan.diagnostics("single", 1, 0)["cw:patience150"]
  assert (cfg.cw_patience, cfg.max_iters, ref, limit) == (150, plan.cw_max_iters, "cw", 64)
  # Only the stopping rule differs from the plan's CW (c escalates every 30 in both).
  plan_cw = plan.configs()["cw"]
  assert cfg.escalate_every == plan_cw.escalate_every == 30
  assert rr.dataclasses.replace(cfg, cw_patience=plan.cw_patience, cw_escalate_every=0) == plan_cw


def test_stored_plan_is_the_majority_and_ignores_diagnostic_settings():
  from faceens import reproduce_summary as rs
  base = rr.RobustPlan().as_dict()
  run = lambda plan: {"robustness": {"key": {"plan": plan}, "pairs": 7},  # noqa: E731
                      "calibration": {"key": "k"}}
  other_diag = {**base, "cw_check_patience": 60, "diagnostic_seeds": [1]}
  other = {**base, "pgd_restarts": 9}
  plan, _, pairs = rs._stored_plan({"x": [run(other), run(base), run(other_diag)]})
  assert rs._worst_case_plan(plan) == rs._worst_case_plan(base) and pairs == 7
  assert rs._worst_case_plan(other) != rs._worst_case_plan(base)


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


def test_attack_results_are_cached_resumed_and_reused(run_dir, tmp_path, monkeypatch):
  """An interrupted stage resumes after its last finished attack; a plan that gains an attack runs
  only that one, also when the per-attack cache is gone and only robustness.npz is left."""
  from faceens import api
  from tests.builders import attack_faces
  model = api.load(run_dir)
  xs, xt = attack_faces(model, n=3)
  d0 = np.linalg.norm(model.embed(xs) - model.embed(xt), axis=1)
  pairs = {"src": xs, "tgt": xt, "names": [["a", "b"], ["c", "d"], ["e", "f"]]}
  cal = {"operating_points": {"0.1": {"threshold": float(0.8 * d0.max())}}}
  base = rr.dataclasses.replace(rr.SMOKE_ROBUST_PLAN, diagnostic_seeds=())  # (smoke test's)
  plan = rr.dataclasses.replace(base, pgd_l2_budgets=())
  calls = []
  real = rr._one_attack

  def counting(model, x_src, emb_t, goal, cfg, plan, seed, progress, desc):
    calls.append(desc)
    if fail_at and len(calls) == fail_at:
      raise KeyboardInterrupt
    return real(model, x_src, emb_t, goal, cfg, plan, seed, progress, desc)

  monkeypatch.setattr(rr, "_one_attack", counting)
  released = []   # compiled programs dropped after every attack computed, none when reused
  monkeypatch.setattr(rr.attack, "release_compiled", lambda: released.append(calls[-1]))
  out = tmp_path / "out"
  out.mkdir()
  # ifgsm, cw, bim, then 2 PGD restarts: 5 calls; interrupted in the 4th (the first PGD restart).
  fail_at = 4
  try:
    rr.attack_run(model, pairs, cal, plan, str(out), progress=False)
  except KeyboardInterrupt:
    pass
  assert len(calls) == 4 and not (out / "robustness.json").exists()
  calls.clear()
  fail_at = 0
  released.clear()
  first = rr.attack_run(model, pairs, cal, plan, str(out), progress=False)
  assert [c.split()[-3] if "restart" in c else c.split()[-1] for c in calls] == ["pgd_4", "pgd_4"]
  assert released == calls[-1:]
  # The plan gains fixed-budget L2 PGD; the cache is gone, robustness.npz holds the rest.
  import shutil
  shutil.rmtree(os.path.join(run_dir, "suite_robustness"))
  calls.clear()
  second = rr.attack_run(model, pairs, cal, base, str(out), progress=False)
  assert len(calls) == base.pgd_restarts and all("pgd_l2_1" in c for c in calls)
  for name, entry in first["operating_points"]["0.1"]["attacks"].items():
    assert second["operating_points"]["0.1"]["attacks"][name] == entry   # commit included
    assert entry["computed_with"]
  assert set(second["operating_points"]["0.1"]["pgd_l2_breaks_missed_by_minimal_norm"]) == {"1"}
  # Done with the same plan: nothing runs at all.
  calls.clear()
  released.clear()
  assert rr.attack_run(model, pairs, cal, base, str(out), progress=False) == second and not calls
  assert not released
  # The plan gains the diagnostics (the model is an ensemble of seed 0): only they run, beside
  # the worst case; once the cache is gone they come back from robustness.npz too.
  diag = rr.dataclasses.replace(base, diagnostic_seeds=(0,))
  names = set(diag.diagnostics("srv_fdp", model.num_members, 0))
  assert names == {"ifgsm:members", "cw:patience6"} and model.config.method == "srv_fdp"
  third = rr.attack_run(model, pairs, cal, diag, str(out), progress=False)
  assert sorted(c.split()[-1] for c in calls) == sorted(names)
  point = third["operating_points"]["0.1"]
  assert set(point["diagnostics"]) == names
  # The CW check runs on the first cw_check_pairs (2) attacked pairs only.
  attacked = np.flatnonzero(d0 >= 0.8 * d0.max())
  assert point["diagnostics"]["cw:patience6"]["attacked"] == min(2, len(attacked))
  assert point["diagnostics"]["ifgsm:members"]["attacked"] == len(attacked)
  assert point["worst_case_l2_median"] == second["operating_points"]["0.1"]["worst_case_l2_median"]
  shutil.rmtree(os.path.join(run_dir, "suite_robustness"))
  calls.clear()
  again = rr.attack_run(model, pairs, cal, rr.dataclasses.replace(diag, cw_check_patience=7),
                        str(out), progress=False)
  # (a changed check patience reruns that diagnostic alone)
  assert calls == [f"{model.config.method} FAR 0.1 cw:patience7"]
  # A diagnostic built differently under the same plan settings is rerun too (its settings are
  # part of the run's key), and only it.
  calls.clear()
  real_diag = rr.RobustPlan.diagnostics

  def built_differently(self, *a):
    out = real_diag(self, *a)
    cfg, ref, limit = out["cw:patience7"]
    return out | {"cw:patience7": (rr.dataclasses.replace(cfg, cw_lr=0.02), ref, limit)}
  monkeypatch.setattr(rr.RobustPlan, "diagnostics", built_differently)
  rr.attack_run(model, pairs, cal, rr.dataclasses.replace(diag, cw_check_patience=7), str(out),
                progress=False)
  assert calls == [f"{model.config.method} FAR 0.1 cw:patience7"]
  assert again["operating_points"]["0.1"]["diagnostics"]["ifgsm:members"] == \
      point["diagnostics"]["ifgsm:members"]


def test_transfer_paired_difference_by_hand():
  from faceens import reproduce_transfer as rt
  # Two sources, four common pairs: A is fooled on 3 of 8 (source, pair) cases, B on 7 of 8.
  # Per pair, the mean over sources of A - B: (0, -0.5, -1, -0.5); the difference -0.5.
  a = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], bool)
  b = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  d = rt.paired_difference(a, b, n=500)
  per_pair = np.array([0.0, -0.5, -1.0, -0.5])
  assert np.isclose(d["difference"], per_pair.mean()) and (d["sources"], d["pairs"]) == (2, 4)
  # Every resample's mean lies between the smallest and largest per-pair value.
  assert -1.0 <= d["lo"] <= d["difference"] <= d["hi"] <= 0.0
  assert rt.verdict({"difference": -0.5, "lo": -0.9, "hi": -0.1, "sources": 2, "pairs": 4}) == \
      "resists transfer better"
  same = rt.paired_difference(a, a, n=50)
  assert (same["lo"], same["hi"]) == (0.0, 0.0) and rt.verdict(same) == "no net difference on any pair"
  assert not d["no_net_difference"]
  # Two sources that cancel on a pair: no net difference there, though each source differs.
  flip = rt.paired_difference(np.array([[1], [0]], bool), np.array([[0], [1]], bool), n=50)
  assert flip["no_net_difference"] and rt.verdict(flip) == "no net difference on any pair"
  assert rt.verdict({"difference": 0.0, "lo": -0.2, "hi": 0.2, "sources": 2, "pairs": 4}) == \
      "cannot tell"
  none = rt.paired_difference(np.zeros((0, 4), bool), np.zeros((0, 4), bool))
  assert none["difference"] is None and rt.verdict(none) == "not run"
  same = rt.paired_difference(a, a, n=100)
  assert (same["difference"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)


HOLD = """
import fcntl, os, sys, time
fds = [os.open(p, os.O_CREAT | os.O_RDWR) for p in sys.argv[2:]]
for fd in fds:
  fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[1]))
"""


def _hold(seconds, *paths):
  """A separate process holding ``paths``' locks for ``seconds``, started once it holds them."""
  import subprocess
  import sys
  for p in paths:
    os.makedirs(os.path.dirname(p), exist_ok=True)
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(seconds), *map(str, paths)],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_stage_lock_is_exclusive_and_dies_with_its_process(tmp_path):
  lock = str(tmp_path / "w" / "suite_robustness" / "stage.lock")
  fd = rr.claim(lock)
  assert fd is not None
  assert rr.claim(lock) is None  # a second open file of this process: refused too
  os.close(fd)
  fd = rr.claim(lock)
  assert fd is not None
  os.close(fd)
  holder = _hold(60, lock)
  try:
    assert rr.claim(lock) is None
  finally:
    holder.kill()  # no clean-up of its own: the kernel drops the lock with the process
    holder.wait()
  fd = rr.claim(lock)
  assert fd is not None
  os.close(fd)


class _Suite:
  smoke = True

  def __init__(self, root):
    self.workdir = lambda r: str(root / r)
    self.run_name = lambda r: r


def test_stage_takes_free_runs_first_then_waits_for_held_ones(tmp_path, monkeypatch, capsys):
  suite = _Suite(tmp_path)
  locks = {r: tmp_path / r / "suite_robustness" / "stage.lock" for r in ("a", "b")}
  attacked = []

  class Model:
    config = None

  def fake_attack(model, pairs, calibration, plan, out, progress, code):
    # The lock is held while the run is attacked (probed from another process's view: a new
    # open file description of this process is refused like another process would be).
    assert rr.claim(str(locks[out])) is None and "commit" in code   # the process-start record
    attacked.append(out)
  released = []
  monkeypatch.setattr(rr.api, "load", lambda w: Model())
  monkeypatch.setattr(rr, "attack_run", fake_attack)
  monkeypatch.setattr(rr.attack, "release_compiled", lambda: released.append(list(attacked)))
  holder = _hold(600, locks["a"])
  waits = []

  def wait(seconds):  # the other process finishes while this one waits for it
    waits.append(seconds)
    holder.kill()
    holder.wait()
  monkeypatch.setattr(rr, "time", types.SimpleNamespace(sleep=wait))
  try:
    done = rr.robustness_all(suite, lambda r: r, lambda: ["a", "b"], lambda c: None,
                             lambda r: None, poll_seconds=0.2)
  finally:
    holder.kill()
    holder.wait()
  assert attacked == ["b", "a"] and done == ["b", "a"] and waits == [0.2]
  assert released == [["b"], ["b", "a"]]   # compiled programs dropped after each run
  assert "waiting for the other processes on a" in capsys.readouterr().out
  for p in locks.values():  # released
    fd = rr.claim(str(p))
    assert fd is not None
    os.close(fd)


def test_stage_releases_the_lock_when_an_attack_fails(tmp_path, monkeypatch):
  import pytest
  suite = _Suite(tmp_path)

  def fail(*a, **k):
    raise RuntimeError("attack failed")
  monkeypatch.setattr(rr.api, "load", fail)
  released = []
  monkeypatch.setattr(rr.attack, "release_compiled", lambda: released.append(True))
  with pytest.raises(RuntimeError, match="attack failed"):
    rr.robustness_all(suite, lambda r: r, lambda: ["a"], None, None)
  assert released == [True]
  fd = rr.claim(str(tmp_path / "a" / "suite_robustness" / "stage.lock"))
  assert fd is not None
  os.close(fd)


def test_report_without_exported_runs_says_what_is_missing(tmp_path):
  from faceens import reproduce_summary as rs
  with pytest.raises(FileNotFoundError, match="no exported run under .*per_run.*export stage"):
    rs.write(str(tmp_path))
