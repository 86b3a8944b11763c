"""faceens.attack: the attack jobs (white-box, transfer, plots), compaction, CLI errors."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import faceens
from faceens import attack as attack_cli, plot
from faceens.attacks import lots
from tests.builders import attack_faces, REPO


def test_attack_cli_transfer_and_plots(run_dir, tmp_path):
  r = subprocess.run([sys.executable, "-m", "faceens.attack", f"--workdir={run_dir}",
                      "--method=ifgsm,cw", "--pairs=6", "--batch_size=4", "--max_iters=200"],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  assert "least perturbation" in r.stdout
  out = os.path.join(run_dir, "attacks")
  for m in ("ifgsm", "cw"):
    with open(os.path.join(out, f"attack_{m}.json")) as f:
      doc = json.load(f)
    s = doc["summary"]
    assert s["n"] == 6 and 0 <= s["success_rate"] <= 1 and s["max_iters"] == 200
    npz = np.load(os.path.join(out, f"attack_{m}.npz"))
    assert npz["x_adv"].shape == npz["x_src"].shape == (6, 32, 32, 3)
    assert npz["x_adv"].dtype == np.float32
    np.testing.assert_allclose(
        np.linalg.norm((npz["x_adv"] - npz["x_src"]).reshape(6, -1), axis=1), npz["l2"], rtol=1e-5)
  # Black-box transfer from the run to itself: every example that succeeds on the source
  # at a distance below the run's own threshold also fools it.
  model = faceens.load(run_dir)
  d = [0.5 * model.paper_threshold, 0.9 * model.paper_threshold]
  res = attack_cli.black_box(model, [model], attack_cli.parse_methods("ifgsm"), 6, d,
                             base=lots.AttackConfig(max_iters=300), batch_size=8, progress=False)
  pts = res[(run_dir, "ifgsm")]["points"]
  assert [p["distance"] for p in pts] == sorted(d)
  for p in pts:
    if p["source_success_rate"] > 0:
      assert p["transfer_rate"] == 1.0
  written = plot.plot([run_dir], str(tmp_path / "fig"))
  names = sorted(os.path.basename(p) for p in written)
  assert names == ["perturbation_ifgsm.png", "tau_cw.png", "tau_ifgsm.png", "transfer_ifgsm.png"]
  assert all(os.path.getsize(p) > 5000 for p in written)


def test_attack_cli_errors(tmp_path):
  r = subprocess.run([sys.executable, "-m", "faceens.attack", f"--workdir={tmp_path}/none",
                      "--method=ifgsm"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
  r = subprocess.run([sys.executable, "-m", "faceens.attack", f"--workdir={tmp_path}",
                      "--method=fgsm"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "unknown attack method 'fgsm'" in r.stderr


@pytest.mark.parametrize("method,objective", [("ifgsm", "ensemble"), ("bim", "members"),
                                              ("cw", "ensemble"), ("mifgsm", "ensemble")])
def test_compacted_loop_equals_one_long_loop(run_dir, method, objective, fast_compile):
  """Chunks of a few iterations over the still-running examples only (faceens.attack.run_compacted)
  give each example the same iterations, success and x_adv as one lax.while_loop over the batch,
  also for the rules with state beyond x (CW's Adam moments, best iterate and c; momentum)."""
  model = faceens.load(run_dir)
  xs, xt = attack_faces(model, n=12, seed=2)
  feats = model.member_features(xt)
  t = feats if objective == "members" else feats.mean(0)
  d0 = np.linalg.norm(model.embed(xs) - feats.mean(0), axis=1)
  goal = np.linspace(0.5, 1.02, len(xs)) * d0  # a spread of iteration counts; the last: at once
  cfg = lots.AttackConfig(method=method, objective=objective, step_size=0.5 / 255, epsilon=0.02,
                          max_iters=44, cw_lr=0.002, cw_patience=3)  # 11 chunks: one compile
  long = lots.attack(model.apply, model.variables, xs, t, goal, cfg)
  short = attack_cli.run_compacted(model, xs, t, goal, cfg, chunk=4, progress=False)
  assert len(set(long["iterations"].tolist())) > 3 and long["iterations"].max() > 8, long
  assert long["success"].sum() > 3
  np.testing.assert_array_equal(short["iterations"], long["iterations"])
  np.testing.assert_array_equal(short["success"], long["success"])
  np.testing.assert_allclose(short["x_adv"], long["x_adv"], atol=1e-6)
  np.testing.assert_allclose(short["distance"], long["distance"], atol=1e-5)
  np.testing.assert_allclose(short["l2"], long["l2"], atol=1e-5)


def test_cw_with_more_patience_and_the_same_escalation_extends_the_search(run_dir, fast_compile):
  """CW's stopping rule: waiting longer for a smaller L2, with c escalating on the same schedule,
  follows the same trajectory past the point where the shorter patience stopped, so its best
  successful L2 can only be smaller or equal, pair by pair."""
  model = faceens.load(run_dir)
  xs, xt = attack_faces(model, n=8, seed=3)
  t = model.member_features(xt).mean(0)
  goal = 0.8 * np.linalg.norm(model.embed(xs) - t, axis=1)
  short = lots.AttackConfig(method="cw", cw_lr=0.01, cw_patience=3, max_iters=60)
  assert short.escalate_every == 10 and lots.config_dict(short) == {
      k: v for k, v in dataclasses.asdict(short).items() if k != "cw_escalate_every"}
  long = dataclasses.replace(short, cw_patience=15, cw_escalate_every=10)
  assert "cw_escalate_every" in lots.config_dict(long)
  a = lots.attack(model.apply, model.variables, xs, t, goal, short)
  b = lots.attack(model.apply, model.variables, xs, t, goal, long)
  assert a["success"].sum() >= 3 and (b["iterations"] >= a["iterations"]).all()
  assert (b["success"] >= a["success"]).all()
  ok = a["success"]
  # The same float32 ops on the same inputs: equal, or smaller once it searched on.
  assert (b["l2"][ok] <= a["l2"][ok] * (1 + 1e-6)).all()
  assert (b["l2"][ok] < a["l2"][ok] * (1 - 1e-6)).any()   # the longer wait found something


def test_bad_config_errors():
  with pytest.raises(ValueError, match="unknown attack method 'fgsm'; valid: lots, ifgsm"):
    lots.AttackConfig(method="fgsm").validate()
  with pytest.raises(ValueError, match="unknown attack method 'fgsm' in --method"):
    attack_cli.parse_methods("ifgsm,fgsm")
  assert attack_cli.parse_methods("cw,ifgsm:members") == [("cw", "cw", "ensemble"),
                                                           ("ifgsm_members", "ifgsm", "members")]


def test_release_compiled_empties_the_attack_programs_and_the_next_attack_recompiles(
    run_dir, fast_compile):
  """Every model and attack setting compiles its own loop programs, kept for the process (on
  XLA:CPU each holds memory mappings, limited per process): ``release_compiled`` drops them all,
  and the same attack afterwards compiles again and gives the same examples."""
  model = faceens.load(run_dir)
  xs, xt = attack_faces(model, n=4, seed=5)
  t = model.member_features(xt).mean(0)
  goal = 0.7 * np.linalg.norm(model.embed(xs) - t, axis=1)
  cfg = lots.AttackConfig(method="ifgsm", step_size=1 / 255, max_iters=8)
  first = attack_cli.run_compacted(model, xs, t, goal, cfg, chunk=4, progress=False)
  assert lots.chunk_jit._cache_size() >= 1 and lots.init_jit._cache_size() >= 1
  attack_cli.release_compiled()
  assert lots.chunk_jit._cache_size() == 0 and lots.init_jit._cache_size() == 0
  again = attack_cli.run_compacted(model, xs, t, goal, cfg, chunk=4, progress=False)
  assert lots.chunk_jit._cache_size() >= 1
  for k in ("iterations", "success", "x_adv"):
    np.testing.assert_array_equal(again[k], first[k])
