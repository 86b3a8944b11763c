"""The embedding API, faceens.evaluate / faceens.verify, and the safe .bin reader on a tiny run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import faceens
from faceens import evaluate, verification
from faceens.data import demo, verification_bin
from faceens.data.image_folder import DataError
from tests.builders import jpeg_bytes, make_lfw, orl_face, REPO


ORL = demo.orl_root()


def test_evaluate_features_matches_direct_computation():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(2, 40, 8))
  f /= np.linalg.norm(f, axis=-1, keepdims=True)
  ff = rng.normal(size=(2, 40, 8))
  ff /= np.linalg.norm(ff, axis=-1, keepdims=True)
  pairs = np.stack([np.arange(0, 40, 2), np.arange(1, 40, 2)], 1)
  issame = np.arange(20) % 2 == 0
  out = evaluate.evaluate_features(f, ff, pairs, issame)
  e = f.mean(0) + ff.mean(0)
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  d = np.sum((e[pairs[:, 0]] - e[pairs[:, 1]]) ** 2, 1)
  assert out["accuracy"] == verification.kfold_accuracy(d, issame)[0]
  dp = np.linalg.norm(f.mean(0)[pairs[:, 0]] - f.mean(0)[pairs[:, 1]], axis=1)
  assert out["paper"]["threshold"] == verification.kfold_accuracy(dp, issame)[2]
  e1 = f[1] + ff[1]
  e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
  d1 = np.sum((e1[pairs[:, 0]] - e1[pairs[:, 1]]) ** 2, 1)
  assert out["members"][1]["accuracy"] == verification.kfold_accuracy(d1, issame)[0]


def _write_pairs(tmp_path, lines):
  p = tmp_path / "pairs.txt"
  p.write_text("\n".join(lines) + "\n")
  return str(p)


def test_evaluate_cli_with_bin_and_pairs(run_dir, tmp_path):
  imgs, issame = [], []
  for k in range(10):
    a, b = f"s{31 + k % 10}", f"s{31 + (k + 1) % 10}"
    same = k % 2 == 0
    imgs += [jpeg_bytes(orl_face(a, 1)), jpeg_bytes(orl_face(a if same else b, 2))]
    issame.append(same)
  bin_path = str(tmp_path / "orl_pairs.bin")
  verification_bin.save_bin(bin_path, imgs, issame)
  rel = os.path.relpath(ORL, tmp_path)
  pairs = _write_pairs(tmp_path, [f"{rel}/s3{i}/1.pgm {rel}/s3{i}/{2 + i % 3}.pgm 1" for i in range(5)]
                       + [f"{rel}/s3{i}/1.pgm {rel}/s3{i + 1}/1.pgm 0" for i in range(5)])
  with open(os.path.join(run_dir, "eval.json")) as f:
    before = json.load(f)
  assert before["threshold_from"] == "heldout"  # the run's own validation set, from training
  default = faceens.load(run_dir)
  assert default.threshold == before["datasets"]["heldout"]["threshold"]
  assert default.paper_threshold == before["datasets"]["heldout"]["paper"]["threshold"]
  r = subprocess.run([sys.executable, "-m", "faceens.evaluate", f"--workdir={run_dir}",
                      f"--bins={bin_path}", f"--pairs={pairs}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "orl_pairs" in r.stdout and "member 2" in r.stdout and "paper acc" in r.stdout
  assert "thresholds of 'heldout'" in r.stdout
  with open(os.path.join(run_dir, "eval.json")) as f:
    ev = json.load(f)
  # Merged: the training's held-out set is kept, untouched, beside the two new sets.
  assert list(ev["datasets"]) == ["heldout", "orl_pairs", "pairs"]
  assert ev["datasets"]["heldout"] == before["datasets"]["heldout"]
  assert ev["threshold_from"] == "heldout"
  for name in ("orl_pairs", "pairs"):
    d = ev["datasets"][name]
    assert d["pairs"] == 10 and len(d["members"]) == 3 and d["step"] == 3
    assert set(d["tar_at_far"]) == {"0.001", "0.0001"}
  # The default threshold did not move; another set's is there on request, and says so.
  model = faceens.load(run_dir)
  assert (model.threshold, model.paper_threshold) == (default.threshold, default.paper_threshold)
  assert model.threshold_source.startswith("eval.json:heldout (the recorded default")
  chosen = faceens.load(run_dir, threshold_from="orl_pairs")
  assert chosen.threshold == ev["datasets"]["orl_pairs"]["threshold"]
  assert chosen.threshold_source.startswith("eval.json:orl_pairs (chosen")
  with pytest.raises(ValueError, match="no such evaluated set .*evaluated: heldout, orl_pairs"):
    faceens.load(run_dir, threshold_from="lfw")
  same = os.path.join(ORL, "s31", "1.pgm"), os.path.join(ORL, "s31", "2.pgm")
  verify = lambda *flags: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "faceens.verify", f"--workdir={run_dir}", "--json", *flags, *same],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  for flags, thr, source in (((), default.threshold, "eval.json:heldout"),
                             (("--threshold_from=orl_pairs",), chosen.threshold,
                              "eval.json:orl_pairs"),
                             (("--threshold_from=0.5",), 0.5, "--threshold_from")):
    r = verify(*flags)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["threshold"] == thr and out["threshold_source"].startswith(source)
    assert out["same"] == (out["distance"] < out["threshold"])
  r = verify("--threshold_from=nope")
  assert r.returncode != 0 and "no such evaluated set" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_bad_inputs(run_dir, tmp_path):
  size = 32
  with pytest.raises(DataError, match="does not exist"):
    evaluate.pairs_file_set(str(tmp_path / "missing.txt"), size)
  with pytest.raises(DataError, match="has no pairs"):
    evaluate.pairs_file_set(_write_pairs(tmp_path, ["# nothing"]), size)
  one = os.path.join(ORL, "s31", "1.pgm")
  with pytest.raises(DataError, match=r"pairs.txt:1: label must be 1 \(same person\) or 0"):
    evaluate.pairs_file_set(_write_pairs(tmp_path, [f"{one} {one} 2"]), size)
  with pytest.raises(DataError, match=r"pairs.txt:1: expected 'path1 path2 label'"):
    evaluate.pairs_file_set(_write_pairs(tmp_path, [f"{one} 1"]), size)
  with pytest.raises(DataError, match="missing.jpg does not exist"):
    evaluate.pairs_file_set(_write_pairs(tmp_path, [f"{one} missing.jpg 1"]), size)
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8 not a jpeg")
  with pytest.raises(DataError, match="cannot decode image .*bad.jpg"):
    evaluate.pairs_file_set(_write_pairs(tmp_path, [f"{one} bad.jpg 0"]), size)
  bin_path = str(tmp_path / "corrupt.bin")
  verification_bin.save_bin(bin_path, [jpeg_bytes(orl_face("s31", 1)), b"garbage"], [True])
  with pytest.raises(DataError, match="corrupt.bin: image 1 cannot be decoded"):
    evaluate.bin_set(bin_path, size)
  r = subprocess.run([sys.executable, "-m", "faceens.evaluate", f"--workdir={run_dir}",
                      f"--bins={tmp_path / 'none.bin'}"], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode != 0 and "none.bin does not exist" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- .bin files


def test_evaluate_run_on_lfw_layout(run_dir, tmp_path):
  root = make_lfw(tmp_path)
  out = evaluate.run(run_dir, lfw=root, write=False, progress=False)
  r = out["datasets"]["lfw"]
  assert r["pairs"] == 8 and r["genuine"] == 4 and r["folds"] == "official"
  assert 0.0 <= r["accuracy"] <= 1.0 and len(r["members"]) == 3
  with pytest.raises(DataError, match="at least 2 of LFW's folds"):
    evaluate.run(run_dir, lfw=root, lfw_folds=[1], write=False, progress=False)
