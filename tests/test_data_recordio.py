"""faceens.data.recordio: MXNet RecordIO read without mxnet, against files written independently."""

import logging
import os
import shutil
import struct

import numpy as np
import pytest

from faceens.data import recordio
from faceens.data.image_folder import DataError
from tests.builders import MAGIC


def test_reads_an_independently_written_rec(small_rec):
  path, imgs, labels = small_rec
  ds = recordio.RecordIODataset(path)
  assert len(ds) == 5 and ds.num_classes == 2 and (ds.height, ds.width) == (24, 24)
  for i in range(5):
    assert ds[i] == (imgs[i], labels[i])
  assert ds.labels().tolist() == labels


def test_missing_idx_is_scanned_with_a_warning(small_rec, caplog):
  path, imgs, _ = small_rec
  os.remove(path[:-4] + ".idx")
  with caplog.at_level(logging.WARNING):
    ds = recordio.RecordIODataset(path)
  assert "train.idx not found: scanning" in caplog.text
  assert len(ds) == 5 and ds[4][0] == imgs[4]


def test_concurrent_reads_from_threads(small_rec):
  # grain reads with several threads; a shared seek position would mix records up.
  from concurrent.futures import ThreadPoolExecutor
  path, imgs, labels = small_rec
  ds = recordio.RecordIODataset(path)
  order = np.random.default_rng(0).integers(0, 5, 400)
  with ThreadPoolExecutor(8) as ex:
    got = list(ex.map(lambda i: ds[int(i)], order))
  assert got == [(imgs[i], labels[i]) for i in order]


def test_multipart_records_split_and_rejoin_like_dmlc(tmp_path):
  magic = struct.pack("<I", MAGIC)
  payload = b"abcd" + magic + b"efghijkl" + magic + b"xyz"   # magic at aligned offsets 4, 16
  path = str(tmp_path / "m.rec")
  with open(path, "wb") as f:
    recordio.write_record(f, payload)
    recordio.write_record(f, b"tail")
  raw = open(path, "rb").read()
  # Parts as dmlc-core writes them: (cflag 1, "abcd"), (cflag 2, "efghijkl"), (cflag 3, "xyz" + pad).
  heads = [struct.unpack_from("<II", raw, o) for o in (0, 12, 28)]
  assert [(m, l >> 29, l & (2**29 - 1)) for m, l in heads] == [(MAGIC, 1, 4), (MAGIC, 2, 8), (MAGIC, 3, 3)]
  with open(path, "rb") as f:
    got, nxt = recordio.read_record(f, path, 0, len(raw))
    assert got == payload
    assert recordio.read_record(f, path, nxt, len(raw))[0] == b"tail"
    with pytest.raises(DataError, match="multi-part record"):
      recordio.read_record(f, path, 0, len(raw), allow_multipart=False)
    with pytest.raises(DataError, match="starts with continuation flag 2"):
      recordio.read_record(f, path, 12, len(raw))


def test_bad_rec_files_name_file_and_offset(small_rec, tmp_path):
  path, _, _ = small_rec
  raw = open(path, "rb").read()
  offsets = [int(l.split("\t")[1]) for l in open(path[:-4] + ".idx")]
  trunc = str(tmp_path / "trunc.rec")
  open(trunc, "wb").write(raw[:offsets[3] + 20])
  shutil.copy(path[:-4] + ".idx", trunc[:-4] + ".idx")
  with pytest.raises(DataError, match=r"past the end of .*trunc.rec"):
    recordio.RecordIODataset(trunc)  # the index points beyond the truncated file
  os.remove(trunc[:-4] + ".idx")
  with pytest.raises(DataError, match=rf"trunc.rec: record at byte offset {offsets[3]} announces \d+ bytes but the file ends"):
    recordio.RecordIODataset(trunc)
  bad = str(tmp_path / "bad.rec")
  open(bad, "wb").write(raw[:offsets[2]] + b"\x00\x00\x00\x00" + raw[offsets[2] + 4:])
  shutil.copy(path[:-4] + ".idx", bad[:-4] + ".idx")
  ds = recordio.RecordIODataset(bad)
  with pytest.raises(DataError, match=rf"bad.rec: bad magic 0x00000000 at byte offset {offsets[2]}"):
    ds[1]
  (tmp_path / "property").write_text("1,24,24")  # labels 1 are now out of range
  ds = recordio.RecordIODataset(path)
  assert ds[0][1] == 0
  with pytest.raises(DataError, match=r"record 3: label 1.0 is outside the valid range 0..0 \(property\)"):
    ds[2]
