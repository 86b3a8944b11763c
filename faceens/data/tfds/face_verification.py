"""TFDS builder for InsightFace verification ``.bin`` sets (LFW, CFP-FP, AgeDB-30, ...)."""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds

from faceens.data import verification_bin

SETS = ("lfw", "cfp_fp", "agedb_30", "cfp_ff", "calfw", "cplfw", "vgg2_fp")


class FaceVerification(tfds.core.GeneratorBasedBuilder):
  """Verification pairs ``(image1, image2, issame)`` from ``<manual_dir>/<config>.bin``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "From InsightFace .bin files (read without unpickling code)."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"{n}.bin") for n in SETS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the InsightFace verification files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...) in the "
      "manual dir; python -m faceens.data.pack_bin writes new ones from a pair list.")

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image1": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "image2": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "issame": tfds.features.Scalar(dtype=np.bool_),
        }),
        homepage="https://github.com/deepinsight/insightface/tree/master/recognition/_datasets_",
    )

  def _split_generators(self, dl_manager):
    path = os.path.join(str(dl_manager.manual_dir), f"{self.builder_config.name}.bin")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {"test": self._generate_examples(path)}

  def _generate_examples(self, path):
    images, issame = verification_bin.load_bin(path)
    for i, same in enumerate(issame):
      yield i, {"image1": io.BytesIO(images[2 * i]), "image2": io.BytesIO(images[2 * i + 1]),
                "issame": bool(same)}
