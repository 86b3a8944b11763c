"""TFDS builder for InsightFace's MS1MV2 (``faces_emore``) from its RecordIO files."""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds

from faceens.data import recordio


class Ms1mv2(tfds.core.GeneratorBasedBuilder):
  """MS1MV2 aligned 112x112 faces with identity labels, from ``train.rec`` / ``train.idx``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "From InsightFace RecordIO, JPEG bytes passed through."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put InsightFace's faces_emore files (train.rec, train.idx, property) in the manual dir "
      "(tfds.download.DownloadConfig(manual_dir=...)); any faces_emore-layout directory works, "
      "e.g. one written by python -m faceens.data.pack_rec.")

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Labels as plain integers: the class count lives in faces_emore's ``property`` file.
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.Scalar(dtype=np.int64),
            "record": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/deepinsight/insightface/tree/master/recognition/_datasets_",
    )

  def _split_generators(self, dl_manager):
    manual = str(dl_manager.manual_dir)
    rec = os.path.join(manual, "train.rec")
    if not os.path.isfile(rec):
      raise FileNotFoundError(f"{rec} not found. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    prop = os.path.join(manual, "property")
    if os.path.isfile(prop):
      self.info.metadata["num_classes"], height, width = recordio.read_property(prop)
      self.info.metadata["image_size"] = [height, width]
    return {"train": self._generate_examples(rec)}

  def _generate_examples(self, rec):
    ds = recordio.RecordIODataset(rec)
    for i in range(len(ds)):
      img, label = ds[i]
      key = int(ds._image_keys[i])
      yield key, {"image": io.BytesIO(img), "label": label, "record": key}
