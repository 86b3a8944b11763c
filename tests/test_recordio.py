"""RecordIO, pack tools, the grain pipeline, TFDS builders and bad input: fast, on real faces."""

import io
import json
import logging
import os
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from faceens.data import demo, pack_bin, pack_rec, pipeline, recordio, verification_bin
from faceens.data.image_folder import DataError

ORL = demo.orl_root()
MAGIC = 0xCED7230A


def independent_rec(path, records):
  """A .rec / .idx written straight from the format description (no multi-part records)."""
  offsets = []
  with open(path, "wb") as f:
    for payload in records:
      offsets.append(f.tell())
      f.write(struct.pack("<II", MAGIC, len(payload)))  # cflag 0
      f.write(payload + b"\0" * (-len(payload) % 4))
  with open(path[:-4] + ".idx", "w") as f:
    f.writelines(f"{k}\t{o}\n" for k, o in enumerate(offsets))


def irheader(flag, label, id_=0, id2=0):
  return struct.pack("<IfQQ", flag, label, id_, id2)


def _jpeg(seed, size=24):
  arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG")
  return buf.getvalue()


@pytest.fixture()
def small_rec(tmp_path):
  """InsightFace layout: header record 0 (images 1..5), 5 images, 2 identity records."""
  imgs = [_jpeg(i) for i in range(5)]
  labels = [0, 0, 1, 1, 1]
  recs = [irheader(2, 0.0) + struct.pack("<2f", 6, 8)]
  recs += [irheader(0, float(y), k + 1) + b for k, (b, y) in enumerate(zip(imgs, labels))]
  recs += [irheader(2, 0.0) + struct.pack("<2f", 1, 3), irheader(2, 0.0) + struct.pack("<2f", 3, 6)]
  path = str(tmp_path / "train.rec")
  independent_rec(path, recs)
  (tmp_path / "property").write_text("2,24,24")
  return path, imgs, labels


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


def _folder(tmp_path, n_ids=3, per=4):
  root = tmp_path / "faces"
  for k in range(n_ids):
    d = root / f"id{k}"
    d.mkdir(parents=True)
    for j in range(per):
      (d / f"{j}.jpg").write_bytes(_jpeg(100 * k + j, 32))
  return root


def test_pack_rec_round_trip_keeps_bytes_and_labels(tmp_path):
  root = _folder(tmp_path)
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


# ----------------------------------------------------------------------------- bad input


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


def test_corrupt_jpeg_in_the_pipeline(tmp_path):
  good = [(_jpeg(i), i % 2, f"img{i}") for i in range(6)]
  bad = good[:3] + [(b"\xff\xd8\xff garbage", 1, "img3-corrupt")] + good[4:]
  kw = dict(global_batch=2, image_size=16, process_index=0, process_count=1, read_threads=1)
  with pytest.raises(DataError, match="img3-corrupt: cannot decode image"):
    it = iter(pipeline.build(bad, **kw))
    for _ in range(6):
      next(it)
  it = iter(pipeline.build(bad, skip_bad=True, **kw))
  seen = [next(it) for _ in range(10)]
  assert all(x.shape == (2, 16, 16, 3) for x, _ in seen)


def test_empty_folder_and_non_image_file(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="has no identity sub-folders with images"):
    pipeline.ImageFolderSource(str(tmp_path / "empty"))
  root = _folder(tmp_path, 2, 2)
  (root / "id0" / "notes.txt").write_text("hello")
  with pytest.raises(DataError, match=r"notes.txt is not an image file"):
    pipeline.ImageFolderSource(str(root))
  assert len(pipeline.ImageFolderSource(str(root), skip_bad=True)) == 4


# ----------------------------------------------------------------------------- pipeline


def _array_source(n=12):
  images = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(n)])
  return pipeline.ArraySource(images, np.arange(n))


def _take(ds, k):
  it = iter(ds)
  return [next(it) for _ in range(k)]


def test_pipeline_epochs_determinism_and_host_shards():
  src = _array_source(12)
  kw = dict(global_batch=4, image_size=8, flip=False, process_index=0, process_count=1,
            read_threads=1)
  a = _take(pipeline.build(src, seed=1, **kw), 6)           # 24 examples = two epochs
  b = _take(pipeline.build(src, seed=1, **kw), 6)
  c = _take(pipeline.build(src, seed=2, **kw), 6)
  labels = np.concatenate([y for _, y in a])
  assert sorted(labels[:12]) == list(range(12)) and sorted(labels[12:]) == list(range(12))
  assert not np.array_equal(labels[:12], labels[12:])       # reshuffled each epoch
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert not all(np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
  for x, y in a:  # the image is the one of the label (constant value = index)
    np.testing.assert_array_equal(x[:, 0, 0, 0], y)
  hosts = [np.concatenate([y for _, y in _take(pipeline.build(
      src, seed=1, global_batch=4, image_size=8, process_index=i, process_count=2,
      read_threads=1), 3)]) for i in range(2)]
  assert set(hosts[0]).isdisjoint(hosts[1]) and len(set(hosts[0]) | set(hosts[1])) == 12


def test_pipeline_resume_from_iterator_state_and_flip():
  src = _array_source(12)
  src.images = np.stack([np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3) + i for i in range(12)])
  ds = pipeline.build(src, seed=3, global_batch=4, image_size=8, flip=True, max_shift=1,
                      contrast=0.2, brightness=10, process_index=0, process_count=1,
                      read_threads=2)
  it = iter(ds)
  for _ in range(2):
    next(it)
  state = it.get_state()
  cont = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for (x1, y1), (x2, y2) in zip(cont, [next(it2) for _ in range(3)]):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
  # Flip only (no shift/photometric): each output is the source image or its mirror, both occur.
  ds = pipeline.build(src, seed=3, global_batch=4, image_size=8, flip=True, process_index=0,
                      process_count=1, read_threads=1)
  flips = []
  for x, y in _take(ds, 6):
    for xi, yi in zip(x, y):
      orig = src.images[yi]
      assert np.array_equal(xi, orig) or np.array_equal(xi, orig[:, ::-1])
      flips.append(not np.array_equal(xi, orig))
  assert 0 < sum(flips) < len(flips)


def test_pipeline_worker_processes_are_deterministic_and_resumable(small_rec):
  # Worker w builds the batches of its own slice, so the order depends on the worker count
  # (a run resumes with the count it was started with), but not on timing.
  path, _, _ = small_rec
  src = pipeline.RecordIOSource(path)
  ds = pipeline.build(src, seed=0, global_batch=2, image_size=16, process_index=0,
                      process_count=1, workers=2)
  a, b = _take(ds, 4), _take(ds, 4)
  it = iter(ds)
  next(it)
  state = it.get_state()
  rest = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for (x1, y1), (x2, y2), (x3, y3) in zip(a[1:], b[1:], [next(it2) for _ in range(3)]):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(x1, x3)
    np.testing.assert_array_equal(y1, y3)
  for (x1, _), (x2, _) in zip(a[1:], rest):
    np.testing.assert_array_equal(x1, x2)


# ----------------------------------------------------------------------------- TFDS and training


def test_tfds_builders_serve_the_rec_and_bin(small_rec, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import faceens.data.tfds  # noqa: F401
  path, imgs, labels = small_rec
  manual = os.path.dirname(path)
  b = tfds.builder("ms1mv2", data_dir=str(tmp_path / "tfds"))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  src = tfds.data_source("ms1mv2", split="train", data_dir=str(tmp_path / "tfds"),
                         decoders={"image": tfds.decode.SkipDecoding()})
  assert len(src) == 5 and b.info.metadata["num_classes"] == 2
  got = sorted((int(r["record"]), bytes(r["image"]), int(r["label"])) for r in (src[i] for i in range(5)))
  assert got == [(k + 1, imgs[k], labels[k]) for k in range(5)]
  verification_bin.save_bin(os.path.join(manual, "lfw.bin"), imgs[:4], [True, False])
  b = tfds.builder("face_verification/lfw", data_dir=str(tmp_path / "tfds"))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  pairs = b.as_data_source(split="test")
  assert len(pairs) == 2 and {bool(pairs[i]["issame"]) for i in range(2)} == {True, False}
  assert pairs[0]["image1"].shape == (24, 24, 3)


def test_training_on_a_faces_emore_directory(tmp_path):
  from faceens import configs, train
  emore = str(tmp_path / "emore")
  pack_rec.pack_folder(ORL, emore, size=32, progress=False)
  rel = os.path.relpath(ORL, tmp_path)
  lines = [f"{rel}/s3{i}/1.pgm {rel}/s3{i}/2.pgm 1\n{rel}/s3{i}/1.pgm {rel}/s3{i + 1}/1.pgm 0" for i in range(5)]
  (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
  pack_bin.pack_pairs(str(tmp_path / "pairs.txt"), os.path.join(emore, "lfw.bin"), size=32)
  c = configs.experiment("arcface_srv_fdp", "test")
  c.data.kind, c.data.root = "ms1mv2", emore
  c.train.steps, c.train.eval_every = 2, 1
  s = train.train_and_evaluate(c, str(tmp_path / "w"), progress=False)
  assert s["steps"] == 2 and np.isfinite(s["final_loss"]) and "lfw" in s["eval"]
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    assert any("lfw" in json.loads(l).get("eval", {}) for l in f)
