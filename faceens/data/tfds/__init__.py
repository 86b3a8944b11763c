"""TFDS builders (ArrayRecord, random access via ``tfds.data_source``; no TensorFlow needed).

Importing this package registers ``faceens_ms1mv2`` and ``faceens_face_verification``::

    import tensorflow_datasets as tfds
    import faceens.data.tfds  # noqa: F401
    builder = tfds.builder("faceens_ms1mv2", data_dir=DATA, config="default")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=EMORE))
    source = builder.as_data_source(split="train")     # source[i] -> {"image", "label"}

Images are stored as the JPEG bytes of the RecordIO / ``.bin`` files (never re-encoded, which
would need TensorFlow). Install with ``pip install -e ".[tfds]"``.
"""

from faceens.data.tfds.face_verification import FaceVerification
from faceens.data.tfds.ms1mv2 import Ms1mv2

__all__ = ["Ms1mv2", "FaceVerification"]
