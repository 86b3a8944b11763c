"""faceens.data.tfds: the TFDS builders serve the same records as the .rec and .bin."""

import os

import pytest

from faceens.data import verification_bin


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
