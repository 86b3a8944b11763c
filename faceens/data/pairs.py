"""Verification pair lists: ``path1 path2 label`` lines (VGG2-style), read into images and pairs."""

from __future__ import annotations

import os

import numpy as np

from faceens.data.image_folder import DataError, load_image


def read_pairs_file(path: str, size: int, fit: str = "pad"):
  """``(images uint8 [N, size, size, 3], pairs int64 [P, 2], issame bool [P])`` from a file of
  ``path1 path2 label`` lines (paths relative to the file's folder; ``#`` comments)."""
  if not os.path.isfile(path):
    raise DataError(f"pairs file {path} does not exist")
  base = os.path.dirname(os.path.abspath(path))
  pairs, issame = [], []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      parts = line.split()
      if len(parts) != 3:
        raise DataError(f"{path}:{lineno}: expected 'path1 path2 label', got {line!r}")
      if parts[2] not in ("0", "1"):
        raise DataError(f"{path}:{lineno}: label must be 1 (same person) or 0 (different), "
                        f"got {parts[2]!r}")
      full = [p if os.path.isabs(p) else os.path.join(base, p) for p in parts[:2]]
      for f in full:
        if not os.path.isfile(f):
          raise DataError(f"{path}:{lineno}: image {f} does not exist")
      pairs.append(full)
      issame.append(parts[2] == "1")
  if not pairs:
    raise DataError(f"pairs file {path} has no pairs (expected lines 'path1 path2 label')")
  images, index = load_pair_images(pairs, size, fit)
  return images, index, np.asarray(issame)


def load_pair_images(pairs, size: int, fit: str = "pad"):
  """Image-path pairs ``[(a, b), ...]`` -> ``(images uint8 [N, size, size, 3], pairs int64
  [P, 2])``: every distinct file loaded once, pairs as indices into ``images``."""
  index, files = {}, []
  for pair in pairs:
    for f in pair:
      if f not in index:
        index[f] = len(files)
        files.append(f)
  images = (np.stack([load_image(f, size, fit) for f in files]) if files
            else np.zeros((0, size, size, 3), np.uint8))
  ids = np.asarray([[index[a], index[b]] for a, b in pairs], np.int64).reshape(-1, 2)
  return images, ids
