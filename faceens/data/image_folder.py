"""Image-folder datasets: ``root/<identity>/*.{jpg,jpeg,png,pgm,bmp}``, one folder per identity.

Identities are the sorted sub-folder names; labels are their indices. Every image becomes
3-channel uint8 (grayscale is repeated) of ``size x size``: resized with its aspect ratio kept so
that the longer side is ``size``, then zero-padded to a square (``fit="pad"``), or centre-cropped
to a square then resized (``fit="crop"``), or resized ignoring the aspect ratio (``fit="stretch"``).

A fixed box can be cut out first (``config.data.crop = (top, left, height, width)``, e.g. the
face region of aligned 250x250 LFW images): ``fit_spec(config)`` gives the ``fit`` string every
loader takes, ``"<fit>@top,left,height,width"``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".bmp")
FITS = ("pad", "crop", "stretch")


class DataError(ValueError):
  """Bad input data; the message names the file and what is wrong."""


@dataclasses.dataclass
class FaceSet:
  images: np.ndarray   # [N, size, size, 3] uint8
  labels: np.ndarray   # [N] int32
  classes: list[str]   # identity names, index = label
  paths: list[str]

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_classes(self) -> int:
    return len(self.classes)


def fit_spec(config) -> str:
  """The ``fit`` string of a config: ``data.fit``, with ``data.crop``'s box when one is set."""
  crop = tuple(config.data.get("crop", ()) or ())
  return f"{config.data.fit}@{','.join(str(int(v)) for v in crop)}" if crop else config.data.fit


def parse_fit(fit: str) -> tuple[str, tuple[int, int, int, int] | None]:
  """``"pad"`` -> ``("pad", None)``; ``"pad@70,70,110,110"`` -> ``("pad", (70, 70, 110, 110))``."""
  mode, _, box = fit.partition("@")
  if mode not in FITS:
    raise ValueError(f"unknown fit {mode!r}; valid: {', '.join(FITS)}")
  if not box:
    return mode, None
  try:
    t, l, h, w = (int(v) for v in box.split(","))
  except ValueError:
    raise ValueError(f"crop box {box!r} must be 4 integers top,left,height,width") from None
  if min(t, l) < 0 or min(h, w) < 1:
    raise ValueError(f"crop box {box!r}: top and left must be >= 0, height and width >= 1")
  return mode, (t, l, h, w)


def fit_image(img: Image.Image, size: int, fit: str = "pad") -> np.ndarray:
  """PIL image -> ``[size, size, 3]`` uint8 (see module docstring for ``fit``)."""
  fit, box = parse_fit(fit)
  img = img.convert("RGB")
  if box is not None:
    t, l, h, w = box
    if t + h > img.size[1] or l + w > img.size[0]:
      raise ValueError(f"crop box (top {t}, left {l}, height {h}, width {w}) does not fit in a "
                       f"{img.size[0]}x{img.size[1]} image")
    img = img.crop((l, t, l + w, t + h))
  w, h = img.size
  if fit == "stretch":
    return np.asarray(img.resize((size, size), Image.BILINEAR), np.uint8)
  if fit == "crop":
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((size, size), Image.BILINEAR), np.uint8)
  scale = size / max(w, h)
  nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
  resized = np.asarray(img.resize((nw, nh), Image.BILINEAR), np.uint8)
  out = np.zeros((size, size, 3), np.uint8)
  top, left = (size - nh) // 2, (size - nw) // 2
  out[top:top + nh, left:left + nw] = resized
  return out


def load_image(path: str, size: int, fit: str = "pad") -> np.ndarray:
  try:
    with Image.open(path) as img:
      img.load()
      return fit_image(img, size, fit)
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise DataError(f"cannot decode image {path}: {e}") from e
  except ValueError as e:  # a crop box outside the image
    raise DataError(f"image {path}: {e}") from None


def list_identities(root: str) -> list[tuple[str, list[str]]]:
  """[(identity, [image paths])] sorted; raises ``DataError`` on a missing or empty root."""
  if not os.path.isdir(root):
    raise DataError(f"image folder {root!r} does not exist or is not a directory; expected "
                    "root/<identity>/<image>.{jpg,png,pgm}")
  out = []
  for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if not os.path.isdir(d):
      continue
    files = sorted(os.path.join(d, f) for f in os.listdir(d)
                   if os.path.isfile(os.path.join(d, f)) and not f.startswith("."))
    if files:
      out.append((name, files))
  if not out:
    raise DataError(f"image folder {root!r} has no identity sub-folders with images; expected "
                    "root/<identity>/<image>.{jpg,png,pgm}")
  return out


def _natural_key(s: str):
  import re
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def list_image_files(root: str, identities: Sequence[str] | None = None, skip_bad: bool = False):
  """``(identity names, [(path, label)], skipped non-image paths)`` of an image folder.

  ``identities``: restrict to these folder names (in this order); ``None``: all, sorted
  naturally (``s2`` before ``s10``). A file without an image extension raises ``DataError``
  naming it, or with ``skip_bad`` is returned in ``skipped``.
  """
  found = dict(list_identities(root))
  if identities is None:
    names = sorted(found, key=_natural_key)
  else:
    missing = [n for n in identities if n not in found]
    if missing:
      raise DataError(f"identities {missing} not found under {root!r}; found {len(found)} folders")
    names = list(identities)
  files, skipped = [], []
  for label, name in enumerate(names):
    for p in found[name]:
      if p.lower().endswith(IMAGE_EXTENSIONS):
        files.append((p, label))
      elif skip_bad:
        skipped.append(p)
      else:
        raise DataError(f"{p} is not an image file (valid extensions: "
                        f"{', '.join(IMAGE_EXTENSIONS)}); set skip_bad (config data.skip_bad) "
                        "to skip such files")
  return names, files, skipped


def read_each(files, read, skip_bad: bool, skipped: list):
  """``read(path)`` for each ``(path, label)``: ``(outputs, labels, paths)`` of the files read.

  A ``DataError`` propagates, or with ``skip_bad`` the path is appended to ``skipped``.
  """
  outputs, labels, paths = [], [], []
  for p, label in files:
    try:
      outputs.append(read(p))
    except DataError:
      if not skip_bad:
        raise
      skipped.append(p)
      continue
    labels.append(label)
    paths.append(p)
  return outputs, labels, paths


def load_image_folder(root: str, size: int, fit: str = "pad", identities: Sequence[str] | None = None,
                      skip_bad: bool = False) -> FaceSet:
  """Loads a whole image folder into memory.

  Args:
    identities: restrict to these identity folder names (in this order); ``None``: all, sorted
      naturally (``s2`` before ``s10``).
    skip_bad: skip files that are not decodable images (counted, with a warning) instead of
      raising ``DataError`` naming the file.
  """
  names, files, skipped = list_image_files(root, identities, skip_bad)
  images, labels, paths = read_each(files, lambda p: load_image(p, size, fit), skip_bad, skipped)
  if skipped:
    logging.warning("skipped %d unreadable or non-image files under %s (first: %s)",
                    len(skipped), root, skipped[0])
  if not images:
    raise DataError(f"no decodable images under {root!r}")
  return FaceSet(np.stack(images), np.asarray(labels, np.int32), names, paths)
