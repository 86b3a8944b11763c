"""Image folder -> InsightFace RecordIO: ``python -m faceens.data.pack_rec --images DIR --out DIR``.

Writes ``train.rec``, ``train.idx`` and ``property`` readable by InsightFace (mxnet) and by
``faceens.data.recordio``. Identities are the sorted sub-folders of ``--images``; each image is
fitted to ``--size`` (``--fit``: pad, crop or stretch) and stored as JPEG (``--quality``), or,
with ``--keep_bytes``, stored exactly as the file is (it must be a JPEG or PNG already).
``--reindex --rec FILE`` writes a missing ``.idx`` for an existing ``.rec`` instead.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np

from faceens import logs
from faceens.data import image_folder, recordio
from faceens.data.image_folder import DataError


def encode_jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def encode_file(path: str, size: int, fit: str = "pad", quality: int = 95,
                keep_bytes: bool = False) -> bytes:
  """The bytes to store for one image file (validated by decoding it)."""
  arr = image_folder.load_image(path, size, fit)  # raises DataError naming the file
  if not keep_bytes:
    return encode_jpeg(arr, quality)
  with open(path, "rb") as f:
    data = f.read()
  if not (data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"):
    raise DataError(f"{path}: --keep_bytes stores files as they are, which needs JPEG or PNG; "
                    "drop --keep_bytes to re-encode it as JPEG")
  return data


def pack_folder(images_dir: str, out_dir: str, size: int = 112, fit: str = "pad",
                quality: int = 95, keep_bytes: bool = False, skip_bad: bool = False,
                progress: bool = True) -> dict:
  names, files, skipped = image_folder.list_image_files(images_dir, skip_bad=skip_bad)
  # A bar on a terminal, periodic lines in a log (logs.progress).
  with logs.progress(total=len(files), disable=not progress, unit="img", desc="pack_rec") as bar:
    def encode(p):
      try:
        return encode_file(p, size, fit, quality, keep_bytes)
      finally:
        bar.update(1)
    encoded, labels, _ = image_folder.read_each(files, encode, skip_bad, skipped)
  if skipped:
    logging.warning("skipped %d unreadable files (first: %s)", len(skipped), skipped[0])
  if not encoded:
    raise DataError(f"no decodable images under {images_dir}")
  recordio.write_dataset(out_dir, encoded, labels, len(names), size, size)
  return {"images": len(encoded), "classes": len(names), "skipped": len(skipped),
          "out": out_dir}


def reindex(rec_path: str) -> str:
  offsets = recordio.scan_offsets(rec_path)
  idx = os.path.splitext(rec_path)[0] + ".idx"
  with open(idx, "w") as f:
    for k, off in offsets.items():
      f.write(f"{k}\t{off}\n")
  return idx


def main(argv):
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  try:
    if FLAGS.reindex:
      if not FLAGS.rec:
        raise ValueError("--reindex needs --rec=FILE.rec")
      print(f"wrote {reindex(FLAGS.rec)}")
      return
    if not FLAGS.images or not FLAGS.out:
      raise ValueError("--images=DIR and --out=DIR are required")
    r = pack_folder(FLAGS.images, FLAGS.out, FLAGS.size, FLAGS.fit, FLAGS.quality,
                    FLAGS.keep_bytes, FLAGS.skip_bad)
  except (ValueError, DataError, OSError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {r['images']} images of {r['classes']} identities to {r['out']}/train.rec, "
        f"train.idx, property" + (f" (skipped {r['skipped']})" if r["skipped"] else ""))


def _define_flags():
  from absl import flags
  flags.DEFINE_string("images", None, "image folder DIR/<identity>/<image>")
  flags.DEFINE_string("out", None, "output folder for train.rec, train.idx, property")
  flags.DEFINE_integer("size", 112, "output image size (square)")
  flags.DEFINE_enum("fit", "pad", image_folder.FITS, "how to make images square")
  flags.DEFINE_integer("quality", 95, "JPEG quality")
  flags.DEFINE_bool("keep_bytes", False, "store JPEG/PNG files as they are (no resize)")
  flags.DEFINE_bool("skip_bad", False, "skip undecodable files (counted) instead of failing")
  flags.DEFINE_bool("reindex", False, "write the .idx of an existing --rec")
  flags.DEFINE_string("rec", None, "with --reindex: the .rec file")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
