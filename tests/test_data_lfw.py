"""faceens.data.lfw: LFW in its own layout, official pairs.txt and folds."""

import os

import numpy as np
import pytest

from faceens.data import lfw
from faceens.data.image_folder import DataError
from tests.builders import make_lfw, PAIRS4, PEOPLE4, SHARED_LFW


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
