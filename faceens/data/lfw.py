"""LFW as it is distributed: ``<root>/images/<Name>/<Name>_NNNN.jpg`` (or the person folders
directly in ``<root>``) and the official View 2 ``pairs.txt``.

``pairs.txt``: a header ``<folds> <n>`` (``10 300``), then per fold ``n`` same-person lines
``name i j`` followed by ``n`` different-person lines ``name1 i name2 j``; image numbers start at
1. The folds are person-disjoint, and the official protocol evaluates each fold with a threshold
chosen on the other nine.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from faceens.data.image_folder import DataError
from faceens.data.pairs import load_pair_images


@dataclasses.dataclass(frozen=True)
class Pair:
  name1: str
  index1: int
  name2: str
  index2: int
  same: bool
  fold: int  # 0-based official fold


def read_pairs(path: str) -> list[Pair]:
  """Parses LFW's ``pairs.txt``; a malformed line is a ``DataError`` naming file and line."""
  if not os.path.isfile(path):
    raise DataError(f"LFW pairs file {path} does not exist")
  with open(path) as f:
    lines = [(n, l.split()) for n, l in enumerate(f, 1) if l.strip()]
  if not lines:
    raise DataError(f"{path} is empty; expected LFW's header '10 300' and pair lines")
  head_no, head = lines[0]
  try:
    n_folds, n_per = (int(v) for v in head)
  except ValueError:
    raise DataError(f"{path}:{head_no}: expected the header '<folds> <pairs per half-fold>' "
                    f"(LFW: '10 300'), got {' '.join(head)!r}") from None
  body = lines[1:]
  if len(body) != 2 * n_folds * n_per:
    raise DataError(f"{path}: the header promises {n_folds} folds x {2 * n_per} pairs = "
                    f"{2 * n_folds * n_per} lines, the file has {len(body)}")
  pairs = []
  for k, (lineno, parts) in enumerate(body):
    fold, same = k // (2 * n_per), (k % (2 * n_per)) < n_per
    try:
      if same and len(parts) == 3:
        pairs.append(Pair(parts[0], int(parts[1]), parts[0], int(parts[2]), True, fold))
      elif not same and len(parts) == 4:
        pairs.append(Pair(parts[0], int(parts[1]), parts[2], int(parts[3]), False, fold))
      else:
        raise ValueError
    except ValueError:
      want = "'name i j' (same person)" if same else "'name1 i name2 j' (different people)"
      raise DataError(f"{path}:{lineno}: expected {want} in fold {fold + 1}, got "
                      f"{' '.join(parts)!r}") from None
  return pairs


def images_dir(root: str) -> str:
  """``root/images`` if present, else ``root`` (person folders directly inside)."""
  sub = os.path.join(root, "images")
  return sub if os.path.isdir(sub) else root


def image_path(root: str, name: str, index: int) -> str:
  return os.path.join(images_dir(root), name, f"{name}_{index:04d}.jpg")


def load_pairs(root: str, size: int, fit: str = "pad", pairs_path: str | None = None,
               folds=None):
  """LFW verification pairs as arrays.

  Args:
    root: the LFW folder (``images/`` or person folders, and ``pairs.txt``).
    pairs_path: the pairs file (default ``root/pairs.txt``).
    folds: 0-based official folds to keep (default all ten).

  Returns:
    ``(images uint8 [N, size, size, 3], pairs int64 [P, 2], issame bool [P], fold int [P])``,
    pairs in file order, each image loaded once.
  """
  if not os.path.isdir(root):
    raise DataError(f"LFW folder {root} does not exist; give the folder holding images/ (or the "
                    "person folders) and pairs.txt")
  path = pairs_path or os.path.join(root, "pairs.txt")
  pairs = read_pairs(path)
  if folds is not None:
    folds = set(int(f) for f in folds)
    pairs = [p for p in pairs if p.fold in folds]
  images, index = load_pair_images(_pair_files(root, pairs, path), size, fit)
  return (images, index, np.asarray([p.same for p in pairs], bool),
          np.asarray([p.fold for p in pairs], np.int64))


def _pair_files(root: str, pairs: list[Pair], pairs_path: str) -> list[list[str]]:
  """The two image files of each pair; a missing one is a ``DataError`` naming the pair."""
  files = []
  for p in pairs:
    pair = [image_path(root, name, i) for name, i in ((p.name1, p.index1), (p.name2, p.index2))]
    for f, name, i in zip(pair, (p.name1, p.name2), (p.index1, p.index2)):
      if not os.path.isfile(f):
        raise DataError(f"{pairs_path}: fold {p.fold + 1} names {name} image {i}, but {f} does "
                        "not exist")
    files.append(pair)
  return files


def people(root: str) -> dict[str, int]:
  """``{name: number of images}`` of every person folder."""
  d = images_dir(root)
  return {n: len([f for f in os.listdir(os.path.join(d, n)) if f.lower().endswith(".jpg")])
          for n in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, n))}


def training_identities(root: str, test_folds, pairs_path: str | None = None,
                        min_images: int = 2) -> list[str]:
  """People to train on when ``test_folds`` (0-based) are the test: everyone who appears in no
  pair of a test fold (the folds are person-disjoint, so the models never see a test person),
  with at least ``min_images`` images (softmax heads need a second image to generalise from).
  With LFW's View 2 and folds 6-10 as the test: 826 people, 4,194 images."""
  test_folds = set(int(f) for f in test_folds)
  pairs = read_pairs(pairs_path or os.path.join(root, "pairs.txt"))
  test_people = {n for p in pairs if p.fold in test_folds for n in (p.name1, p.name2)}
  return [n for n, k in people(root).items() if k >= min_images and n not in test_people]


def different_person_pairs(root: str, folds, n: int, seed: int = 0,
                           pairs_path: str | None = None) -> list[Pair]:
  """``n`` of the official different-person pairs of ``folds`` (0-based), seeded and in file
  order: fixed attack pairs of people a model trained on the other folds never saw."""
  folds = set(int(f) for f in folds)
  path = pairs_path or os.path.join(root, "pairs.txt")
  pairs = [p for p in read_pairs(path) if p.fold in folds and not p.same]
  if n > len(pairs):
    raise DataError(f"{n} attack pairs asked for; folds {sorted(f + 1 for f in folds)} of {path} "
                    f"have {len(pairs)} different-person pairs")
  rng = np.random.default_rng(seed)
  return [pairs[i] for i in np.sort(rng.choice(len(pairs), n, replace=False))]


def load_pair_list(root: str, pairs: list[Pair], size: int, fit: str = "pad"):
  """uint8 ``(first images, second images)`` of ``pairs``, each ``[P, size, size, 3]``."""
  images, index = load_pair_images(_pair_files(root, pairs, os.path.join(root, "pairs.txt")),
                                   size, fit)
  return images[index[:, 0]], images[index[:, 1]]
