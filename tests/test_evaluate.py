"""The embedding API, faceens.evaluate / faceens.verify, and the safe .bin reader on a tiny run."""

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import faceens
from faceens import evaluate, verification
from faceens.data import demo, verification_bin
from faceens.data.image_folder import DataError, fit_image
from tests.conftest import REPO

SMALL_LFW = os.path.join(REPO, "..", "shared", "data", "insightface_small_lfw", "small_lfw.bin")
ORL = demo.orl_root()


@pytest.fixture(scope="module")
def model(run_dir):
  return faceens.load(run_dir)


def _orl(identity, i):
  with Image.open(os.path.join(ORL, identity, f"{i}.pgm")) as im:
    return np.asarray(im)


def test_training_logs_periodic_and_final_evaluation(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  evals = [l for l in lines if "eval" in l]
  assert [l["step"] for l in evals] == [2]
  assert 0 <= evals[0]["eval"]["heldout"]["accuracy"] <= 1
  with open(os.path.join(run_dir, "eval.json")) as f:
    ev = json.load(f)
  assert ev["step"] == 3 and ev["datasets"]["heldout"]["pairs"] == 900
  with open(os.path.join(run_dir, "summary.json")) as f:
    s = json.load(f)
  assert s["heldout_accuracy"] == ev["datasets"]["heldout"]["paper"]["accuracy"]


def test_load_and_embed_inputs(model):
  s = model.input_size
  assert (model.num_members, model.embedding_dim, model.step) == (3, 16, 3)
  raw = np.stack([_orl("s31", 1), _orl("s32", 1)])          # uint8 [2, 112, 92], grayscale
  fitted = np.stack([fit_image(Image.fromarray(x), s, model.config.data.fit) for x in raw])
  e_raw = model.embed(raw)
  np.testing.assert_allclose(e_raw, model.embed(fitted), atol=1e-6)
  np.testing.assert_allclose(e_raw, model.embed(fitted.astype(np.float32) / 255), atol=1e-6)
  np.testing.assert_allclose(e_raw, model.embed(raw[..., None].repeat(3, -1)), atol=1e-6)
  # The ensemble embedding is the mean of the normalised member features (not renormalised).
  members = np.stack([model.embed(raw, member=k) for k in range(3)])
  np.testing.assert_allclose(np.linalg.norm(members, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(e_raw, members.mean(0), atol=1e-6)
  assert not np.allclose(members[0], members[1], atol=1e-3)
  # member=k is member k's network alone: compare with the full stack's k-th output.
  np.testing.assert_allclose(model.member_features(raw)[1], members[1], atol=1e-5)
  # flip=True: normalise(E(x) + E(mirror x)).
  mirrored = fitted[:, :, ::-1]
  expected = verification.flip_embedding(e_raw, model.embed(mirrored))
  np.testing.assert_allclose(model.embed(raw, flip=True), expected, atol=1e-5)
  assert not np.allclose(model.embed(raw, flip=True), e_raw / np.linalg.norm(e_raw, axis=1,
                                                                          keepdims=True), atol=1e-3)


def test_embed_rejects_bad_arrays(model):
  with pytest.raises(ValueError, match="input size 32x32"):
    model.embed(np.zeros((1, 40, 40, 3), np.float32))
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    model.embed(np.full((1, 32, 32, 3), 2.0, np.float32))
  with pytest.raises(ValueError, match="member must be None"):
    model.embed(np.zeros((1, 32, 32, 3), np.uint8), member=3)
  with pytest.raises(ValueError, match=r"\[B, H, W\] or \[B, H, W, 3\]"):
    model.embed(np.zeros((32, 32), np.uint8))


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    faceens.load(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="not a faceens run directory"):
    faceens.load(str(tmp_path))


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


def _jpeg(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _write_pairs(tmp_path, lines):
  p = tmp_path / "pairs.txt"
  p.write_text("\n".join(lines) + "\n")
  return str(p)


def test_evaluate_cli_with_bin_and_pairs(run_dir, tmp_path):
  imgs, issame = [], []
  for k in range(10):
    a, b = f"s{31 + k % 10}", f"s{31 + (k + 1) % 10}"
    same = k % 2 == 0
    imgs += [_jpeg(_orl(a, 1)), _jpeg(_orl(a if same else b, 2))]
    issame.append(same)
  bin_path = str(tmp_path / "orl_pairs.bin")
  verification_bin.save_bin(bin_path, imgs, issame)
  rel = os.path.relpath(ORL, tmp_path)
  pairs = _write_pairs(tmp_path, [f"{rel}/s3{i}/1.pgm {rel}/s3{i}/{2 + i % 3}.pgm 1" for i in range(5)]
                       + [f"{rel}/s3{i}/1.pgm {rel}/s3{i + 1}/1.pgm 0" for i in range(5)])
  r = subprocess.run([sys.executable, "-m", "faceens.evaluate", f"--workdir={run_dir}",
                      f"--bins={bin_path}", f"--pairs={pairs}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "orl_pairs" in r.stdout and "member 2" in r.stdout and "paper acc" in r.stdout
  with open(os.path.join(run_dir, "eval.json")) as f:
    ev = json.load(f)
  assert list(ev["datasets"]) == ["orl_pairs", "pairs"]
  for d in ev["datasets"].values():
    assert d["pairs"] == 10 and len(d["members"]) == 3
    assert set(d["tar_at_far"]) == {"0.001", "0.0001"}
  assert faceens.load(run_dir).threshold == ev["datasets"]["orl_pairs"]["threshold"]
  same = os.path.join(ORL, "s31", "1.pgm"), os.path.join(ORL, "s31", "2.pgm")
  r = subprocess.run([sys.executable, "-m", "faceens.verify", f"--workdir={run_dir}", "--json",
                      *same], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["threshold"] == ev["datasets"]["orl_pairs"]["threshold"]
  assert out["same"] == (out["distance"] < out["threshold"])


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
  verification_bin.save_bin(bin_path, [_jpeg(_orl("s31", 1)), b"garbage"], [True])
  with pytest.raises(DataError, match="corrupt.bin: image 1 cannot be decoded"):
    evaluate.bin_set(bin_path, size)
  r = subprocess.run([sys.executable, "-m", "faceens.evaluate", f"--workdir={run_dir}",
                      f"--bins={tmp_path / 'none.bin'}"], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode != 0 and "none.bin does not exist" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- .bin files


@pytest.mark.skipif(not os.path.exists(SMALL_LFW), reason="shared InsightFace fixture not present")
def test_small_lfw_bin_loads():
  images, issame = verification_bin.load_bin(SMALL_LFW)
  assert len(images) == 20 and issame.shape == (10,) and issame.all()
  assert all(b[:2] == b"\xff\xd8" for b in images)  # JPEG
  decoded = verification_bin.decode_images(images, 112, source=SMALL_LFW)
  assert decoded.shape == (20, 112, 112, 3) and 50 < decoded.mean() < 200


def test_bin_round_trip_and_python2_style_pickle(tmp_path):
  imgs = [_jpeg(_orl("s1", i)) for i in (1, 2, 3, 4)]
  p = str(tmp_path / "x.bin")
  verification_bin.save_bin(p, imgs, [True, False])
  got, issame = verification_bin.load_bin(p)
  assert got == imgs and issame.tolist() == [True, False]
  # InsightFace-era files: uint8 arrays of the bytes, protocol 2 (numpy reconstructors).
  p2 = str(tmp_path / "y.bin")
  with open(p2, "wb") as f:
    pickle.dump(([np.frombuffer(b, np.uint8).reshape(-1, 1) for b in imgs], [1, 0]), f, protocol=2)
  got, issame = verification_bin.load_bin(p2)
  assert got == imgs and issame.tolist() == [True, False]


class _Evil:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def test_malicious_bin_executes_nothing(tmp_path):
  marker = tmp_path / "pwned"
  p = str(tmp_path / "evil.bin")
  with open(p, "wb") as f:
    pickle.dump(([_Evil(str(marker))], [True]), f)
  with pytest.raises(DataError, match=r"refusing to load: the pickle references (posix|os|nt)\.system"):
    verification_bin.load_bin(p)
  assert not marker.exists()
  with open(p, "wb") as f:
    f.write(b"\x80\x04garbage")
  with pytest.raises(DataError, match="evil.bin is not a readable verification .bin"):
    verification_bin.load_bin(p)
  with open(p, "wb") as f:
    pickle.dump(([b"a", b"b", b"c"], [True]), f)
  with pytest.raises(DataError, match="3 images but 1 pairs"):
    verification_bin.load_bin(p)
