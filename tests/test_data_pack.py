"""faceens.data.pack_rec and pack_bin: image folders to .rec/.idx and .bin, round trips."""

import os

import numpy as np

from faceens.data import pack_bin, pack_rec, recordio, verification_bin
from tests.builders import jpeg_folder, ORL


def test_pack_rec_round_trip_keeps_bytes_and_labels(tmp_path):
  root = jpeg_folder(tmp_path)
  out = str(tmp_path / "emore")
  r = pack_rec.pack_folder(str(root), out, size=32, keep_bytes=True, progress=False)
  assert (r["images"], r["classes"]) == (12, 3)
  ds = recordio.RecordIODataset(os.path.join(out, "train.rec"))
  want = [((root / f"id{k}" / f"{j}.jpg").read_bytes(), k) for k in range(3) for j in range(4)]
  assert [ds[i] for i in range(len(ds))] == want
  assert open(os.path.join(out, "property")).read() == "3,32,32"
  # InsightFace's identity records: label = [first, end) of the identity's image records.
  for c in range(3):
    label, _, _, _ = recordio.unpack_header(ds.read(13 + c))
    assert label.tolist() == [1 + 4 * c, 5 + 4 * c]
  # --reindex rebuilds the same index.
  idx = os.path.join(out, "train.idx")
  before = open(idx).read()
  os.remove(idx)
  pack_rec.reindex(os.path.join(out, "train.rec"))
  assert open(idx).read() == before


def test_pack_bin_round_trip(tmp_path):
  rel = os.path.relpath(ORL, tmp_path)
  (tmp_path / "pairs.txt").write_text(f"{rel}/s1/1.pgm {rel}/s1/2.pgm 1\n{rel}/s1/1.pgm {rel}/s2/1.pgm 0\n")
  out = str(tmp_path / "x.bin")
  assert pack_bin.pack_pairs(str(tmp_path / "pairs.txt"), out, size=64)["pairs"] == 2
  images, issame = verification_bin.load_bin(out)
  assert issame.tolist() == [True, False] and len(images) == 4
  got = verification_bin.decode_images(images, 64)
  from faceens.data.image_folder import load_image
  want = np.stack([load_image(os.path.join(ORL, p), 64) for p in ("s1/1.pgm", "s1/2.pgm", "s1/1.pgm", "s2/1.pgm")])
  assert np.abs(got.astype(int) - want).mean() < 3  # JPEG q95
