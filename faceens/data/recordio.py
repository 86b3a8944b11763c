"""MXNet RecordIO (InsightFace ``train.rec`` / ``train.idx`` / ``property``) without mxnet.

Format (dmlc-core ``recordio``): every record is ``uint32 magic 0xced7230a``, ``uint32 lrec``
(``cflag = lrec >> 29``, ``length = lrec & (2**29 - 1)``), ``length`` payload bytes and zero
padding to a multiple of 4. A payload that contains the magic number at a 4-byte aligned
position is split there into parts (cflag 1 = first, 2 = middle, 3 = last; 0 = whole record) and
the magic is re-inserted between parts on reading. The ``.idx`` file has ``key<TAB>offset`` lines.

An image record's payload is an ``IRHeader`` (``<IfQQ``: flag, label, id, id2), then ``flag``
float32 labels when ``flag > 0``, then the encoded image. InsightFace's record 0 is a header
whose labels ``(a, b)`` say that records ``1 .. a - 1`` are images (and ``a .. b - 1`` identity
ranges). ``property`` holds ``num_classes,height,width``.
"""

from __future__ import annotations

import logging
import os
import struct
import threading

import numpy as np

from faceens.data.image_folder import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1


# ----------------------------------------------------------------------------- low level


def encode_lrec(cflag: int, length: int) -> int:
  return (cflag << 29) | length


def pack_header(label, payload: bytes, id_: int = 0, id2: int = 0) -> bytes:
  """IRHeader + extra labels + payload (mxnet ``recordio.pack``)."""
  label = np.atleast_1d(np.asarray(label, np.float32))
  if label.size == 1:
    return _HEADER.pack(0, float(label[0]), id_, id2) + payload
  return _HEADER.pack(label.size, 0.0, id_, id2) + label.tobytes() + payload


def unpack_header(record: bytes, where: str = "") -> tuple[np.ndarray | float, int, int, bytes]:
  """``(label, id, id2, payload)``; label is a float or, when flag > 0, a float32 array."""
  if len(record) < _HEADER.size:
    raise DataError(f"{where}: record of {len(record)} bytes is shorter than its 24-byte header")
  flag, label, id_, id2 = _HEADER.unpack_from(record)
  rest = record[_HEADER.size:]
  if flag > 0:
    if len(rest) < 4 * flag:
      raise DataError(f"{where}: header announces {flag} labels but the record is too short")
    label = np.frombuffer(rest[:4 * flag], np.float32).copy()
    rest = rest[4 * flag:]
  return label, id_, id2, rest


def write_record(f, payload: bytes) -> None:
  """One record, split at aligned magic numbers exactly as dmlc-core's writer does."""
  n = len(payload)
  if n >= 1 << 29:
    raise ValueError(f"record of {n} bytes exceeds RecordIO's 2**29 limit")
  dptr = 0
  for i in range(0, (n >> 2) << 2, 4):
    if payload[i:i + 4] == _MAGIC_BYTES:
      f.write(_MAGIC_BYTES + struct.pack("<I", encode_lrec(1 if dptr == 0 else 2, i - dptr)))
      f.write(payload[dptr:i])
      dptr = i + 4
  f.write(_MAGIC_BYTES + struct.pack("<I", encode_lrec(3 if dptr else 0, n - dptr)))
  f.write(payload[dptr:])
  f.write(b"\0" * (((n + 3) >> 2 << 2) - n))


def _pread(f, n: int, offset: int) -> bytes:
  """Positional read: no shared file position, so reader threads cannot interleave seeks."""
  if hasattr(os, "pread"):
    return os.pread(f.fileno(), n, offset)
  f.seek(offset)  # pragma: no cover (Windows); RecordIODataset then locks around reads
  return f.read(n)


def _read_part(f, path: str, offset: int, size: int) -> tuple[int, bytes, int]:
  """``(cflag, data, next_offset)`` of the part at ``offset``."""
  head = _pread(f, 8, offset)
  if len(head) < 8:
    raise DataError(f"{path}: truncated record header at byte offset {offset} (file has {size} "
                    "bytes)")
  magic, lrec = struct.unpack("<II", head)
  if magic != MAGIC:
    raise DataError(f"{path}: bad magic 0x{magic:08x} at byte offset {offset} (expected "
                    "0xced7230a): not a RecordIO file, or the .idx offset is wrong")
  cflag, length = lrec >> 29, lrec & _LEN_MASK
  data = _pread(f, length, offset + 8)
  if len(data) < length:
    raise DataError(f"{path}: record at byte offset {offset} announces {length} bytes but the "
                    f"file ends after {len(data)} (truncated .rec)")
  return cflag, data, offset + 8 + ((length + 3) >> 2 << 2)


def read_record(f, path: str, offset: int, size: int, allow_multipart: bool = True):
  """``(payload, next_offset)`` of the record starting at ``offset``."""
  cflag, data, nxt = _read_part(f, path, offset, size)
  if cflag == 0:
    return data, nxt
  if cflag != 1:
    raise DataError(f"{path}: record at byte offset {offset} starts with continuation flag "
                    f"{cflag}; the .idx offset points into the middle of a record")
  if not allow_multipart:
    raise DataError(f"{path}: record at byte offset {offset} is a multi-part record "
                    "(allow_multipart=False)")
  parts = [data]
  while True:
    cflag, data, nxt = _read_part(f, path, nxt, size)
    if cflag not in (2, 3):
      raise DataError(f"{path}: multi-part record at byte offset {offset} is broken (part with "
                      f"flag {cflag})")
    parts.append(data)
    if cflag == 3:
      return _MAGIC_BYTES.join(parts), nxt


# ----------------------------------------------------------------------------- dataset


def scan_offsets(rec_path: str) -> dict[int, int]:
  """Offsets of every record by walking the file (keys 0, 1, 2, ... in file order)."""
  size = os.path.getsize(rec_path)
  offsets, off, key = {}, 0, 0
  with open(rec_path, "rb") as f:
    while off < size:
      offsets[key] = off
      _, off = read_record(f, rec_path, off, size, allow_multipart=True)
      key += 1
  if not offsets:
    raise DataError(f"{rec_path} is empty")
  return offsets


def read_property(path: str) -> tuple[int, int, int]:
  """``(num_classes, height, width)`` from an InsightFace ``property`` file."""
  try:
    with open(path) as f:
      parts = [int(p) for p in f.read().strip().split(",")]
    if len(parts) != 3 or min(parts) < 1:
      raise ValueError(parts)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: expected 'num_classes,height,width' (e.g. 85742,112,112): {e}") from None
  return tuple(parts)


class RecordIODataset:
  """Random access to the image records of an InsightFace RecordIO file.

  ``ds[i] -> (encoded image bytes, int label)``; ``len(ds)`` image records. Picklable (the file
  is reopened in each process), so it can feed grain worker processes.
  """

  def __init__(self, rec_path: str, idx_path: str | None = None, property_path: str | None = None,
               allow_multipart: bool = True):
    if not os.path.isfile(rec_path):
      raise DataError(f"RecordIO file {rec_path} does not exist")
    self.rec_path = rec_path
    self.size = os.path.getsize(rec_path)
    self.allow_multipart = allow_multipart
    idx_path = idx_path if idx_path is not None else os.path.splitext(rec_path)[0] + ".idx"
    if os.path.isfile(idx_path):
      self.offsets = self._read_idx(idx_path)
      self.idx_path = idx_path
    else:
      logging.warning("%s not found: scanning %s once for record offsets (write an index with "
                      "python -m faceens.data.pack_rec --reindex)", idx_path, rec_path)
      self.offsets = self.scan()
      self.idx_path = None
    self._f = None
    self._lock = threading.Lock()
    self.num_classes = None
    prop = property_path or os.path.join(os.path.dirname(rec_path), "property")
    if os.path.isfile(prop):
      self.num_classes, self.height, self.width = read_property(prop)
    self._image_keys = self._find_images()

  # -- set-up

  def _read_idx(self, path: str) -> dict[int, int]:
    offsets = {}
    with open(path) as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        parts = line.split("\t")
        try:
          key, off = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
          raise DataError(f"{path}:{lineno}: expected 'key<TAB>offset', got {line.strip()!r}") from None
        if not 0 <= off <= self.size - 8:
          raise DataError(f"{path}:{lineno}: offset {off} of record {key} is past the end of "
                          f"{self.rec_path} ({self.size} bytes): the .idx does not belong to "
                          "this .rec, or the .rec is truncated")
        offsets[key] = off
    if not offsets:
      raise DataError(f"{path} lists no records")
    return offsets

  def scan(self) -> dict[int, int]:
    return scan_offsets(self.rec_path)

  def _find_images(self) -> np.ndarray:
    if 0 in self.offsets:
      label, _, _, _ = unpack_header(self.read(0), f"{self.rec_path} record 0")
      if isinstance(label, np.ndarray) and label.size >= 1:
        end = int(label[0])
        keys = np.arange(1, end, dtype=np.int64)
        missing = [k for k in keys[:10].tolist() + keys[-10:].tolist() if k not in self.offsets]
        if missing:
          raise DataError(f"{self.rec_path}: header record says images are records 1..{end - 1} "
                          f"but the index lacks records {missing}")
        return keys
    return np.asarray(sorted(self.offsets), np.int64)  # no InsightFace header: every record

  # -- access

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_f"] = None
    d.pop("_lock", None)
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._lock = threading.Lock()

  def _file(self):
    if self._f is None:
      with self._lock:
        if self._f is None:
          self._f = open(self.rec_path, "rb")
    return self._f

  def read(self, key: int) -> bytes:
    """Raw payload of record ``key`` (safe to call from several threads)."""
    if key not in self.offsets:
      raise DataError(f"{self.rec_path}: no record {key} in the index")
    f = self._file()
    if hasattr(os, "pread"):
      payload, _ = read_record(f, self.rec_path, self.offsets[key], self.size,
                               self.allow_multipart)
    else:  # pragma: no cover
      with self._lock:
        payload, _ = read_record(f, self.rec_path, self.offsets[key], self.size,
                                 self.allow_multipart)
    return payload

  def __len__(self) -> int:
    return len(self._image_keys)

  def __getitem__(self, i: int) -> tuple[bytes, int]:
    key = int(self._image_keys[i])
    where = f"{self.rec_path} record {key}"
    label, _, _, img = unpack_header(self.read(key), where)
    lab = float(label[0]) if isinstance(label, np.ndarray) else float(label)
    y = int(lab)
    if y != lab or y < 0 or (self.num_classes is not None and y >= self.num_classes):
      valid = f"0..{self.num_classes - 1} (property)" if self.num_classes else ">= 0"
      raise DataError(f"{where}: label {lab} is outside the valid range {valid}")
    if not img:
      raise DataError(f"{where}: empty image payload")
    return img, y

  def labels(self) -> np.ndarray:
    """Every image's label (reads all headers once)."""
    return np.asarray([self[i][1] for i in range(len(self))], np.int64)

  def close(self):
    if self._f is not None:
      self._f.close()
      self._f = None


def write_dataset(out_dir: str, encoded_images, labels, num_classes: int, height: int,
                  width: int) -> None:
  """``train.rec`` / ``train.idx`` / ``property`` in InsightFace's layout (images sorted by label)."""
  labels = np.asarray(labels, np.int64)
  order = np.argsort(labels, kind="stable")
  n = len(labels)
  os.makedirs(out_dir, exist_ok=True)
  rec, idx = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
  with open(rec, "wb") as f, open(idx, "w") as fi:
    def put(key, payload):
      fi.write(f"{key}\t{f.tell()}\n")
      write_record(f, payload)
    # Record 0: images are 1..n, identity records n+1..n+num_classes.
    put(0, pack_header([n + 1, n + 1 + num_classes], b""))
    starts = {}
    for key, i in enumerate(order, start=1):
      starts.setdefault(int(labels[i]), key)
      put(key, pack_header(float(labels[i]), bytes(encoded_images[i]), id_=key))
    for c in range(num_classes):
      s = starts.get(c, 0)
      e = s + int(np.sum(labels == c)) if s else 0
      put(n + 1 + c, pack_header([s, e], b""))
  with open(os.path.join(out_dir, "property"), "w") as f:
    f.write(f"{num_classes},{height},{width}")
