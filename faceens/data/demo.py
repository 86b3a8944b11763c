"""The bundled demo faces: the ORL / AT&T Database of Faces (Olivetti Research Laboratory).

40 identities x 10 grayscale 92x112 photographs, shipped in ``faceens/assets/orl_faces`` with
the dataset's README (credit to Olivetti Research Laboratory; Samaria & Harter 1994).
Identities s1-s30 train; s31-s40 are held out for verification on unseen people.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

TRAIN_IDENTITIES = tuple(f"s{i}" for i in range(1, 31))
HELDOUT_IDENTITIES = tuple(f"s{i}" for i in range(31, 41))


def orl_root() -> str:
  """Path of the bundled ORL folder inside the installed package."""
  from importlib import resources
  return str(resources.files("faceens.assets") / "orl_faces")


def balanced_pairs(labels: np.ndarray, seed: int = 0, max_genuine: int | None = None):
  """All genuine pairs (same label) and as many seeded random impostor pairs.

  Returns ``(pairs [P, 2] int, issame [P] bool)`` with P = 2 * #genuine, genuine first.
  """
  labels = np.asarray(labels)
  genuine = [(i, j) for i, j in itertools.combinations(range(len(labels)), 2)
             if labels[i] == labels[j]]
  rng = np.random.default_rng(seed)
  if max_genuine is not None and len(genuine) > max_genuine:
    genuine = [genuine[i] for i in sorted(rng.choice(len(genuine), max_genuine, replace=False))]
  impostor = set()
  n = len(labels)
  if len(set(labels.tolist())) < 2:
    raise ValueError("impostor pairs need at least two identities")
  while len(impostor) < len(genuine):
    i, j = sorted(rng.choice(n, 2, replace=False).tolist())
    if labels[i] != labels[j]:
      impostor.add((i, j))
  impostor = sorted(impostor)
  # Interleave so that every fold of a 10-fold split is balanced.
  pairs = [p for pair in zip(genuine, impostor) for p in pair]
  issame = np.array([k % 2 == 0 for k in range(len(pairs))])
  return np.asarray(pairs, np.int64), issame


def exists(root: str | None = None) -> bool:
  return os.path.isdir(root or orl_root())
