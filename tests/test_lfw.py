"""LFW in its own layout (faceens.data.lfw), official folds in the k-fold protocol, evaluate --lfw."""

import os

import numpy as np
import pytest
from PIL import Image

from faceens import evaluate, verification
from faceens.data import demo, lfw
from faceens.data.image_folder import DataError
from tests.conftest import REPO

SHARED_LFW = os.path.join(REPO, "..", "shared", "data", "lfw")
PEOPLE = {"Ann_A": 3, "Bob_B": 2, "Cy_C": 2, "Di_D": 1, "Ed_E": 2}
# Header "2 2": 2 folds, each 2 same-person lines then 2 different-person lines.
PAIRS = """2\t2
Ann_A\t1\t2
Bob_B\t1\t2
Ann_A\t1\tCy_C\t1
Bob_B\t2\tDi_D\t1
Cy_C\t1\t2
Ed_E\t1\t2
Cy_C\t2\tEd_E\t1
Ann_A\t3\tEd_E\t2
"""


def make_lfw(root, people=PEOPLE, pairs=PAIRS, images_subdir=True):
  """A tiny LFW-layout folder of real faces (bundled ORL people s1..s5), 250x250 grayscale JPEG."""
  base = os.path.join(root, "images") if images_subdir else str(root)
  for p, (name, n) in enumerate(people.items()):
    os.makedirs(os.path.join(base, name))
    for i in range(1, n + 1):
      with Image.open(os.path.join(demo.orl_root(), f"s{p + 1}", f"{i}.pgm")) as im:
        im.resize((250, 250)).save(os.path.join(base, name, f"{name}_{i:04d}.jpg"))
  with open(os.path.join(root, "pairs.txt"), "w") as f:
    f.write(pairs)
  return str(root)


def test_read_pairs_official_format(tmp_path):
  root = make_lfw(tmp_path)
  pairs = lfw.read_pairs(os.path.join(root, "pairs.txt"))
  assert len(pairs) == 8
  assert [p.fold for p in pairs] == [0, 0, 0, 0, 1, 1, 1, 1]
  assert [p.same for p in pairs] == [True, True, False, False] * 2
  assert pairs[0] == lfw.Pair("Ann_A", 1, "Ann_A", 2, True, 0)
  assert pairs[7] == lfw.Pair("Ann_A", 3, "Ed_E", 2, False, 1)


@pytest.mark.parametrize("text,match", [
    ("ten 300\n", r"pairs.txt:1: expected the header"),
    ("1 1\nAnn_A 1 2\n", r"promises 1 folds x 2 pairs = 2 lines, the file has 1"),
    ("1 1\nAnn_A 1 2\nAnn_A 1 Bob_B\n", r"pairs.txt:3: expected 'name1 i name2 j' \(different people\) in fold 1"),
    ("1 1\nAnn_A 1 Bob_B 1\nAnn_A 1 Bob_B 1\n", r"pairs.txt:2: expected 'name i j' \(same person\)"),
    ("", r"is empty"),
])
def test_malformed_pairs_are_clear_errors(tmp_path, text, match):
  path = tmp_path / "pairs.txt"
  path.write_text(text)
  with pytest.raises(DataError, match=match):
    lfw.read_pairs(str(path))


def test_load_pairs_reads_each_image_once_and_filters_folds(tmp_path):
  root = make_lfw(tmp_path)
  images, pairs, issame, folds = lfw.load_pairs(root, 32)
  assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8  # each image once
  assert pairs.shape == (8, 2) and folds.tolist() == [0] * 4 + [1] * 4
  assert issame.tolist() == [True, True, False, False] * 2
  # Pair 0 is Ann_A 1 / Ann_A 2; pair 2 reuses Ann_A 1.
  assert pairs[2, 0] == pairs[0, 0]
  im, p, s, f = lfw.load_pairs(root, 32, folds=[1])
  assert len(p) == 4 and f.tolist() == [1] * 4 and len(im) == 5
  # Person folders directly in the root (LFW's tarball layout) work too.
  flat = make_lfw(tmp_path / "flat", images_subdir=False)
  assert lfw.load_pairs(flat, 32)[0].shape == images.shape


def test_missing_image_and_folder_are_clear_errors(tmp_path):
  root = make_lfw(tmp_path)
  os.remove(os.path.join(root, "images", "Ed_E", "Ed_E_0002.jpg"))
  with pytest.raises(DataError, match=r"fold 2 names Ed_E image 2, but .*Ed_E_0002.jpg does not exist"):
    lfw.load_pairs(root, 32)
  with pytest.raises(DataError, match="LFW folder .* does not exist"):
    lfw.load_pairs(str(tmp_path / "nowhere"), 32)


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


def test_evaluate_run_on_lfw_layout(run_dir, tmp_path):
  root = make_lfw(tmp_path)
  out = evaluate.run(run_dir, lfw=root, write=False, progress=False)
  r = out["datasets"]["lfw"]
  assert r["pairs"] == 8 and r["genuine"] == 4 and r["folds"] == "official"
  assert 0.0 <= r["accuracy"] <= 1.0 and len(r["members"]) == 3
  with pytest.raises(DataError, match="at least 2 of LFW's folds"):
    evaluate.run(run_dir, lfw=root, lfw_folds=[1], write=False, progress=False)


@pytest.mark.skipif(not os.path.isdir(SHARED_LFW), reason="the full LFW copy is not beside the repo")
def test_official_lfw_pairs_file():
  """The real pairs.txt: 6,000 pairs in 10 folds; folds 1-5 and 6-10 share no person."""
  pairs = lfw.read_pairs(os.path.join(SHARED_LFW, "pairs.txt"))
  assert len(pairs) == 6000 and sum(p.same for p in pairs) == 3000
  assert sorted(set(p.fold for p in pairs)) == list(range(10))
  first = {n for p in pairs if p.fold < 5 for n in (p.name1, p.name2)}
  second = {n for p in pairs if p.fold >= 5 for n in (p.name1, p.name2)}
  assert not first & second and len(second) == 2195
  for p in pairs[:20] + pairs[-20:]:
    assert os.path.isfile(lfw.image_path(SHARED_LFW, p.name1, p.index1))


# Four folds of one same- and one different-person pair: folds 1-2 (Ann..Dan) and the people in
# no pair (Eve, Fay; Gus has one image) train, folds 3-4 (Hal..Kim) test.
PEOPLE4 = {"Ann": 2, "Bob": 2, "Cat": 3, "Dan": 2, "Eve": 2, "Fay": 3, "Gus": 1, "Hal": 2,
           "Ida": 1, "Jon": 2, "Kim": 1}
PAIRS4 = """4 1
Ann 1 2
Ann 1 Bob 1
Cat 1 3
Cat 2 Dan 1
Hal 1 2
Hal 2 Ida 1
Jon 1 2
Jon 1 Kim 1
"""


def test_training_identities_exclude_the_test_folds(tmp_path):
  root = make_lfw(tmp_path, PEOPLE4, PAIRS4)
  assert lfw.training_identities(root, [2, 3]) == ["Ann", "Bob", "Cat", "Dan", "Eve", "Fay"]
  assert lfw.training_identities(root, [0, 1]) == ["Eve", "Fay", "Hal", "Jon"]


@pytest.mark.skipif(not os.path.isdir(SHARED_LFW), reason="the full LFW copy is not beside the repo")
def test_official_split_sizes():
  """SOURCE.md's numbers: 826 training people with 4,194 images when folds 6-10 are the test."""
  people = lfw.training_identities(SHARED_LFW, range(5, 10))
  counts = lfw.people(SHARED_LFW)
  assert len(people) == 826 and sum(counts[p] for p in people) == 4194


def test_train_on_lfw_layout_and_evaluate_on_unseen_folds(tmp_path):
  from faceens import configs, train
  root = make_lfw(tmp_path / "lfw", PEOPLE4, PAIRS4)
  c = configs.experiment("arcface_single", "lfw")
  configs.validate(c)
  assert (c.data.kind, tuple(c.data.crop), c.data.lfw_test_folds) == ("lfw", (70, 70, 110, 110),
                                                                      (6, 7, 8, 9, 10))
  c.data.root, c.data.lfw_test_folds = root, (3, 4)
  c.data.image_size, c.model.width, c.model.blocks, c.model.embedding_dim = 32, 0.125, (1, 1, 1, 1), 16
  c.train.batch_size, c.train.steps, c.train.checkpoint_every = 8, 2, 2
  source, held = train.load_datasets(c)
  assert source.classes == ["Ann", "Bob", "Cat", "Dan", "Eve", "Fay"] and len(source) == 14
  summary = train.train_and_evaluate(c, str(tmp_path / "run"), progress=False)
  assert set(summary["eval"]) == {"lfw_test"}
  with open(tmp_path / "run" / "eval.json") as f:
    import json
    r = json.load(f)["datasets"]["lfw_test"]
  assert r["pairs"] == 4 and r["folds"] == "official"
  c.data.root = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="LFW not found at .*nowhere"):
    train.load_datasets(c)
