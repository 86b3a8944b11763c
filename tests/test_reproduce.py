"""faceens.reproduce --smoke end to end on a tiny LFW-layout folder of real faces."""

import json
import os
import subprocess
import sys

import numpy as np

import faceens
from faceens import attack, provenance, reproduce_attacks, reproduce_report, verification
from faceens.attacks import lots
from tests.builders import make_lfw
from tests.conftest import FAST_COMPILE_ENV, subprocess_env
from tests.references import float32_rounding


# 10 person-disjoint folds of one same-person and one different-person pair each: people P00-P09
# appear in folds 1-5 only (the training people), P10-P19 in folds 6-10 (the test).
PEOPLE20 = {f"P{i:02d}": 4 for i in range(20)}
PAIRS20 = "10\t1\n" + "".join(f"P{2 * f:02d}\t1\t2\nP{2 * f:02d}\t3\tP{2 * f + 1:02d}\t1\n"
                              for f in range(10))


def _distance_margin(model) -> float:
  """How far a feature distance of ``model`` can move between two passes (other batch sizes,
  another process): each unit-norm embedding by float32 rounding, ~eps * sqrt(fan-in) per layer
  (random walk; fan-in at most the fc's 512) over ~20 layers, per component, on both sides."""
  return 2 * np.sqrt(model.embedding_dim) * float32_rounding(20, 512)


def _run(args, cwd):
  env = subprocess_env(**FAST_COMPILE_ENV)
  return subprocess.run([sys.executable, "-m", "faceens.reproduce", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


def test_smoke_suite_end_to_end_and_resumable(tmp_path):
  root = make_lfw(tmp_path / "lfw", PEOPLE20, PAIRS20)
  out, runs = tmp_path / "report", tmp_path / "runs"
  args = ["--smoke", f"--lfw={root}", f"--out={out}", f"--runs={runs}"]
  r = _run(args, tmp_path)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  report = (out / "REPORT_v1.md").read_text()
  assert "suite v2's `REPORT.md` replaces them" in report
  for claim in ("SRV alone improves robustness", "SRV+FDP is the most robust",
                "Transfer from the single model is lowest to SRV+FDP"):
    assert claim in report
  assert "not trained yet: baseline" not in report  # the smoke suite is single and SRV+FDP
  res = json.loads((out / "results_v1.json").read_text())
  assert set(res["methods"]) == {"single", "srv_fdp"}
  for m, entry in res["methods"].items():
    # The accuracy is recomputable from the stored per-pair distances (official folds).
    tp = entry["test_pairs"]
    acc = verification.kfold_accuracy(np.array(tp["insightface"]), np.array(tp["issame"], bool),
                                      folds=np.array(tp["fold"]))[0]
    with open(runs / f"arcface_{m}_s0" / "eval.json") as f:
      assert np.isclose(acc, json.load(f)["datasets"]["lfw_test"]["accuracy"], atol=1e-9)
    assert len(tp["issame"]) == 10 and set(tp["fold"]) == {6, 7, 8, 9, 10}
    want = {"ifgsm", "bim", "cw"} | ({"ifgsm:members"} if m == "srv_fdp" else set())
    assert set(entry["attacks"]) == want
    a = entry["attacks"]["ifgsm"]
    pp = a["per_pair"]
    assert len(pp["l2"]) == 4 and a["pre_accepted"] == sum(pp["pre_accepted"])
    attacked = ~np.array(pp["pre_accepted"], bool)
    l2 = np.array([np.nan if v is None else v for v in pp["l2"]])
    # The stored tau curve is Eq. 1 of the stored per-pair results.
    np.testing.assert_allclose(
        np.array(a["tau_curve"]),
        np.array(lots.tau_curve(l2[attacked], np.array(pp["success"], bool)[attacked])), atol=1e-4)
    assert entry["attacks"]["bim"]["derived_from"].startswith("ifgsm")
  # The export stage keeps each run's clean results with the report (they outlive runs/).
  for m in ("single", "srv_fdp"):
    run = json.loads((out / "per_run" / f"arcface_{m}_s0" / "run.json").read_text())
    assert (run["method"], run["seed"], run["config"]["seed"]) == (m, 0, 0)
    assert run["exported_with"]["jax"] and run["trained_with"]["jax"]
    with np.load(out / "per_run" / f"arcface_{m}_s0" / "test_pairs.npz") as z:
      acc = verification.kfold_accuracy(z["insightface"], z["issame"].astype(bool),
                                        folds=z["fold"])[0]
    assert np.isclose(acc, run["lfw_test"]["accuracy"], atol=1e-9)
    # Operating points on 500 impostor pairs of the 10 test people (40 images): FAR 0.1 and 0.01
    # accept at most 50 and 5 of them.
    cal = run["calibration"]
    assert (cal["images"], cal["people"], cal["impostor_pairs"]) == (40, 10, 500)
    for far, point in cal["operating_points"].items():
      assert point["empirical_far"] <= float(far)
    t = [cal["operating_points"][f]["threshold"] for f in ("0.1", "0.01")]
    assert t[0] >= t[1]
    # The robustness stage at both operating points: every attack on the 4 pairs, the per-pair
    # worst case recomputable from the stored per-attack results.
    rob = json.loads((out / "per_run" / f"arcface_{m}_s0" / "robustness.json").read_text())
    assert set(rob["operating_points"]) == {"0.1", "0.01"}
    with np.load(out / "per_run" / f"arcface_{m}_s0" / "robustness.npz") as z:
      for far, point in rob["operating_points"].items():
        assert set(point["attacks"]) == {"ifgsm", "cw", "bim", "pgd_4", "pgd_l2_1"}
        assert point["pre_accepted"] + point["attacked"] == 4
        l2 = np.stack([np.where(z[f"{far}/{a}/success"], z[f"{far}/{a}/l2"], np.inf)
                       for a in point["attacks"]]).min(axis=0)
        l2 = np.where(z[f"{far}/pre_accepted"], 0.0, l2)
        np.testing.assert_array_equal(l2, z[f"{far}/worst_case_l2"])
        assert point["robust_accuracy_l2"]["2"] == np.mean(l2 > 2.0)
        # ifgsm:members: a diagnostic on the ensemble's first seed at the plan's diagnostic
        # operating point, beside (not in) the worst case; every attack names its commit.
        diag = point.get("diagnostics", {})
        want = {"srv_fdp": {"ifgsm:members", "cw:patience6"}, "single": {"cw:patience6"}}[m]
        assert set(diag) == (want if far == "0.1" else set())
        for name, d in diag.items():
          # "smaller": pairs only the diagnostic broke, or broke with a smaller example.
          ok, ref_ok = z[f"{far}/{name}/success"], z[f"{far}/{d['reference']}/success"]
          with np.errstate(invalid="ignore"):
            smaller = ok & (~ref_ok | (z[f"{far}/{name}/l2"] < z[f"{far}/{d['reference']}/l2"]
                                       * (1 - 1e-5)))
          assert d["smaller_than_reference"] == smaller.sum()
        for a in (*point["attacks"].values(), *diag.values()):
          assert a["computed_with"] == (provenance.git_commit() or "unknown")
    assert rob["written_with"]["jax"] and "commit" in rob["written_with"]
  # Suite v2's report, from per_run/ alone: both operating points, a verdict per claim.
  v2 = json.loads((out / "results.json").read_text())
  assert set(v2["claims"]) == {"0.1", "0.01"} and set(v2["methods"]) == {"single", "srv_fdp"}
  verdicts = {c["claim"]: c["verdict"] for c in v2["claims"]["0.01"]}
  assert verdicts["SRV alone enhances robustness over the single model"] == "not run"
  # Only the single model to compare with: incomplete (unless already contradicted).
  most = verdicts["SRV+FDP is the most robust of the ensembles (and beats the single model)"]
  assert most.startswith("incomplete (1 of 6 comparisons run") or most == "contradicted"
  assert v2["accuracy_vs_single"]["srv_fdp"]["verdict"] in ("no loss", "loss", "cannot tell")
  assert "## Robustness at FAR 0.01" in (out / "REPORT.md").read_text()
  # Every run attacked: the title no longer says the suite is in progress.
  assert (out / "REPORT.md").read_text().splitlines()[0] == "# LFW: the paper's comparison, suite v2"
  # The "what changed" section quotes the plan the runs used (the smoke plan here).
  from faceens.reproduce_robustness import SMOKE_ROBUST_PLAN
  assert (f"BIM and PGD with {SMOKE_ROBUST_PLAN.pgd_restarts} random restarts"
          in (out / "REPORT.md").read_text())
  assert v2["figures"] == {f: f"robustness_v2_far{f}.png" for f in ("0.1", "0.01")}
  for name in v2["figures"].values():
    assert (out / name).stat().st_size > 0 and f"]({name})" in (out / "REPORT.md").read_text()
  # Compute: training seconds from each run's summary, attack seconds summed over its attacks.
  for m in ("single", "srv_fdp"):
    run = json.loads((out / "per_run" / f"arcface_{m}_s0" / "run.json").read_text())
    rob = json.loads((out / "per_run" / f"arcface_{m}_s0" / "robustness.json").read_text())
    cost = v2["compute"]["per_run"][f"arcface_{m}_s0"]
    assert cost["train"] == run["summary"]["train_seconds"] > 0
    assert np.isclose(cost["robustness"], sum(
        a["seconds"] for p in rob["operating_points"].values()
        for a in (*p["attacks"].values(), *p.get("diagnostics", {}).values())), rtol=1e-12)
  assert v2["compute"]["robustness_runs"] == 2
  assert res["transfer"] is not None and set(res["transfer"]["targets"]) == {"srv_fdp"}
  # Suite v2's transfer: both directions on the pairs neither model accepts clean; each rate is
  # recomputable from the stored per-pair verdicts.
  tr = json.loads((out / "transfer_v2.json").read_text())
  assert tr["methods"] == ["single", "srv_fdp"] and set(tr["operating_points"]) == {"0.1", "0.01"}
  for far, point in tr["operating_points"].items():
    common = np.array(point["per_pair"]["common"], bool)
    assert point["common_pairs"] == common.sum() <= 4
    for s, t in (("single", "srv_fdp"), ("srv_fdp", "single")):
      fooled = np.array(point["per_pair"]["fooled"][s][t], bool)
      want = fooled[common].mean() if common.any() else None
      assert point["transfer_rate"][s][t] == want
  # Fixed-budget transfer: the cached examples stay inside the L_inf ball, and each verdict is the
  # target's distance to the target feature, recomputed here, against its threshold.
  fixed = tr["fixed_budget"]["attacks"]
  assert list(fixed) == ["pgd_8"] and fixed["pgd_8"]["steps"] == 3
  eps = fixed["pgd_8"]["epsilon"]
  models = {m: faceens.load(str(runs / f"arcface_{m}_s0")) for m in ("single", "srv_fdp")}
  ap = reproduce_attacks.attack_pairs(models["single"].config, reproduce_attacks.SMOKE_PLAN)
  assert json.loads(json.dumps(ap["names"])) == tr["pairs"]
  p_src, p_tgt = ap["src"], ap["tgt"]
  for s, t in (("single", "srv_fdp"), ("srv_fdp", "single")):
    with np.load(runs / f"arcface_{s}_s0" / "suite_transfer" / "pgd_8.npz") as z:
      x_adv = z["x_adv"]
      assert (z["iterations"] == 3).all()   # every step taken: no early stop
    # A projected pixel is off the ball's edge by float32 rounding of x +- eps (x in [0, 1]).
    assert 0.0 <= x_adv.min() and x_adv.max() <= 1.0
    src = models[s].prepare(p_src)
    assert np.abs(x_adv - src).max() <= eps + 2 * np.finfo(np.float32).eps
    d = np.linalg.norm(models[t].embed(x_adv) - models[t].embed(models[t].prepare(p_tgt)), axis=1)
    for far, point in fixed["pgd_8"]["operating_points"].items():
      thr = tr["operating_points"][far]["thresholds"][t]
      fooled = np.array(point["per_pair"]["fooled"][s][t], bool)
      # Distances within float32 rounding of the threshold could go either way between passes.
      clear = np.abs(d - thr) > _distance_margin(models[t])
      assert clear.mean() > 0.5, (d, thr)
      np.testing.assert_array_equal(fooled[clear], (d < thr)[clear])
      common = np.array(point["per_pair"]["common"], bool)
      assert point["transfer_rate"][s][t] == (fooled[common].mean() if common.any() else None)
  assert "L_inf 8/255 (3 steps of 2/255)" in (out / "REPORT.md").read_text()
  assert os.path.isfile(out / "tau_ifgsm.png") and os.path.isfile(out / "transfer.png")

  # faceens.attack on an LFW run draws its pairs from the official test folds' different people.
  x_src, x_tgt, names, source = attack.pair_images(faceens.load(str(runs / "arcface_single_s0")),
                                                   None, 3)
  assert x_src.shape == x_tgt.shape == (3, 32, 32, 3) and "folds 6, 7, 8, 9, 10" in source
  test_people = {f"P{i:02d}" for i in range(10, 20)}
  assert all(n.split()[0][:3] in test_people and n.split()[1][:3] in test_people for n in names)
  assert all(n.split()[0][:3] != n.split()[1][:3] for n in names)

  # A second invocation reuses every run and attack: nothing is recomputed.
  stamp = {p: os.path.getmtime(p) for p in runs.rglob("*.npz")}
  r = _run(args, tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("trained, reused") == 2
  assert {p: os.path.getmtime(p) for p in runs.rglob("*.npz")} == stamp

  # A second seed: its runs become the cross-seed transfer sources, every first-seed model a
  # target, the source's own method included (the diagonal).
  r = _run(args + ["--seeds=0,1", "--stages=train,export,transfer"], tmp_path)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  tr = json.loads((out / "transfer_v2.json").read_text())
  cross = tr["cross_seed"]
  assert (cross["source_seed"], cross["target_seed"]) == (1, 0)
  assert all(w.endswith("_s1") for w in cross["sources"].values())
  assert all(w.endswith("_s0") for w in cross["targets"].values())
  # Parameters: the same seed's and the other seed's run of one method are different runs.
  assert set(tr["parameter_correlation"]["across_seeds"]) == {"single", "srv_fdp"}
  corr = tr["parameter_correlation"]
  assert all(-1 <= v < 1 - 1e-6 for v in corr["across_seeds"].values())
  # One seed: the single model starts from member 0 of the ensemble's initial weights, and a few
  # training steps keep them far closer than two seeds of one method.
  assert corr["same_seed"]["single/srv_fdp"] > max(corr["across_seeds"].values())
  for s in ("single", "srv_fdp"):
    with np.load(runs / f"arcface_{s}_s1" / "suite_transfer" / "pgd_8.npz") as z:
      x_adv = z["x_adv"]
    for t in ("single", "srv_fdp"):
      d = np.linalg.norm(models[t].embed(x_adv) - models[t].embed(models[t].prepare(p_tgt)),
                         axis=1)
      for far, point in cross["fixed_budget"]["pgd_8"]["operating_points"].items():
        thr = tr["operating_points"][far]["thresholds"][t]
        fooled = np.array(point["per_pair"]["fooled"][s][t], bool)
        clear = np.abs(d - thr) > _distance_margin(models[t])
        assert clear.mean() > 0.5, (d, thr)
        np.testing.assert_array_equal(fooled[clear], (d < thr)[clear])
  report = (out / "REPORT.md").read_text()
  assert "### Across seeds" not in report   # the report stage did not run


def test_paired_difference_against_hand_computation():
  a = np.array([1.0, 2.0, np.inf, np.nan, 4.0])
  b = np.array([0.5, 1.0, 1.0, 3.0, np.nan])
  d = reproduce_report.paired_difference(a, b, n=200)
  # Pairs 0-2 are attacked by both: medians 2.0 and 1.0.
  assert d["n"] == 3 and d["difference"] == 1.0
  assert d["lo"] <= 1.0 <= d["hi"]
  acc, lo, hi = reproduce_report.bootstrap_accuracy(
      np.array([0.1, 0.2, 0.9, 0.8, 0.15, 0.95]), np.array([1, 1, 0, 0, 1, 0], bool),
      np.array([1, 1, 1, 2, 2, 2]), n=50)
  # Fold 1's threshold comes from fold 2: the smallest grid value separating it is 0.16, which
  # rejects fold 1's genuine pair at 0.2 (2/3); fold 2 with fold 1's 0.21: 3/3. Mean 5/6.
  assert np.isclose(acc, 5 / 6) and lo <= hi


def test_bad_arguments_are_one_line_errors(tmp_path):
  r = _run(["--lfw=" + str(tmp_path / "none"), "--stages=train"], tmp_path)
  assert r.returncode != 0 and "must be an LFW folder holding pairs.txt" in r.stderr
  root = make_lfw(tmp_path / "lfw", PEOPLE20, PAIRS20)
  r = _run([f"--lfw={root}", "--methods=single,foo"], tmp_path)
  assert "unknown method 'foo'" in r.stderr and "Traceback" not in r.stderr
  r = _run([f"--lfw={root}", "--stages=train,plot"], tmp_path)
  assert "unknown stage 'plot'" in r.stderr


def test_robustness_queue_finishes_the_first_seed_and_its_advt_margins_first(tmp_path,
                                                                             monkeypatch):
  from faceens import reproduce, reproduce_robustness
  suite = reproduce.Suite("lfw", str(tmp_path), str(tmp_path / "runs"), str(tmp_path / "out"),
                          ("single", "advt"), seeds=(2, 0), advt_margins=(1.4,))
  unfinished = reproduce.RunSpec("single", 0)
  monkeypatch.setattr(reproduce, "is_trained", lambda w, c: not w.endswith("single_s0"))
  seen = {}
  monkeypatch.setattr(reproduce_robustness, "robustness_all",
                      lambda suite, export_dir, trained, *a, **k: seen.setdefault("q", trained()))
  reproduce.robustness_stage(suite, progress=False)
  R = reproduce.RunSpec
  assert unfinished not in seen["q"]
  assert seen["q"] == [R("single", 2), R("advt", 2), R("advt", 2, 1.4), R("advt", 0)]
