"""InsightFace verification ``.bin`` files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...).

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` holds the encoded images (JPEG/PNG
bytes, or uint8 numpy arrays of those bytes), images ``2i`` and ``2i + 1`` form pair ``i``, and
``issame_list[i]`` says whether they show the same person.

Pickles can run arbitrary code on load, so ``load_bin`` never calls ``pickle.load``: its
unpickler resolves only the handful of globals such files really contain (numpy's array
reconstructors and ``_codecs.encode`` for Python-2 byte strings) and refuses anything else
(``os.system``, ``builtins.eval``, ...) before it is called.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
from PIL import Image, UnidentifiedImageError

from faceens.data.image_folder import DataError, fit_image

# (module, name) -> callable; every other global is refused.
def _latin1_encode(obj, encoding="latin1", errors="strict"):
  # Protocol-2 pickles from Python 2 store byte strings as _codecs.encode(unicode, "latin1").
  if encoding not in ("latin1", "latin-1") or errors != "strict" or not isinstance(obj, str):
    raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
  return obj.encode("latin1")


def _allowed() -> dict:
  allowed = {
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
      ("_codecs", "encode"): _latin1_encode,
  }
  try:
    from numpy._core import multiarray as ma
  except ImportError:  # numpy < 2
    from numpy.core import multiarray as ma
  for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(mod, "_reconstruct")] = ma._reconstruct
    allowed[(mod, "scalar")] = ma.scalar
  return allowed


class _SafeUnpickler(pickle.Unpickler):

  def __init__(self, file, path):
    super().__init__(file, encoding="bytes")
    self._path = path
    self._ok = _allowed()

  def find_class(self, module, name):
    fn = self._ok.get((module, name))
    if fn is None:
      raise DataError(
          f"{self._path}: refusing to load: the pickle references {module}.{name}, which a "
          "verification .bin never contains (allowed: numpy array reconstruction only). "
          "The file is corrupt or malicious; nothing in it was executed")
    return fn

  def persistent_load(self, pid):
    raise DataError(f"{self._path}: refusing to load: persistent ids are not allowed")


def load_bin(path: str) -> tuple[list[bytes], np.ndarray]:
  """``(encoded images, issame [P] bool)`` of an InsightFace verification ``.bin``."""
  if not os.path.isfile(path):
    raise DataError(f"verification file {path} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  try:
    obj = _SafeUnpickler(io.BytesIO(data), path).load()
  except DataError:
    raise
  except Exception as e:  # truncated or not a pickle at all
    raise DataError(f"{path} is not a readable verification .bin (a pickle of (images, "
                    f"issame)): {type(e).__name__}: {e}") from None
  if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
    raise DataError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
  bins, issame = obj
  images = []
  for i, b in enumerate(bins):
    if isinstance(b, np.ndarray) and b.dtype == np.uint8:
      b = b.tobytes()
    elif isinstance(b, bytearray):
      b = bytes(b)
    if not isinstance(b, bytes) or not b:
      raise DataError(f"{path}: image {i} is {type(b).__name__}, expected encoded image bytes")
    images.append(b)
  issame = np.asarray(list(issame))
  if issame.ndim != 1 or not np.all(np.isin(issame, (0, 1))):
    raise DataError(f"{path}: issame must be a list of booleans (0/1)")
  if len(images) != 2 * len(issame):
    raise DataError(f"{path}: {len(images)} images but {len(issame)} pairs; a .bin holds "
                    "2 images per pair")
  return images, issame.astype(bool)


def save_bin(path: str, images, issame) -> None:
  """Writes ``(images, issame)`` as InsightFace does (``pickle.dump`` of bytes and bools)."""
  images = [bytes(b) for b in images]
  issame = [bool(s) for s in issame]
  if len(images) != 2 * len(issame):
    raise ValueError(f"{len(images)} images for {len(issame)} pairs; need 2 per pair")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump((images, issame), f, protocol=4)


def decode_images(encoded, size: int, fit: str = "pad", source: str = "") -> np.ndarray:
  """Encoded images -> uint8 ``[N, size, size, 3]``; an undecodable one raises ``DataError``."""
  out = np.empty((len(encoded), size, size, 3), np.uint8)
  for i, b in enumerate(encoded):
    try:
      with Image.open(io.BytesIO(b)) as img:
        img.load()
        out[i] = fit_image(img, size, fit)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      raise DataError(f"{source or 'encoded images'}: image {i} cannot be decoded: {e}") from None
  return out
