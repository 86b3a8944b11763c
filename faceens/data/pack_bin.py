"""Pair list -> verification ``.bin``: ``python -m faceens.data.pack_bin --pairs pairs.txt --out x.bin``.

``pairs.txt`` lines are ``path1 path2 label`` (label 1 = same person; paths relative to the
file's folder), as ``faceens.evaluate --pairs`` reads. Images are fitted to ``--size`` and stored
as JPEG, like InsightFace's ``lfw.bin``; the result loads with InsightFace's
``pickle.load(f, encoding="bytes")`` and with ``faceens.data.verification_bin.load_bin``.
"""

from __future__ import annotations

from faceens.data import verification_bin
from faceens.data.image_folder import DataError
from faceens.data.pack_rec import encode_jpeg
from faceens.data.pairs import read_pairs_file


def pack_pairs(pairs_path: str, out_path: str, size: int = 112, fit: str = "pad",
               quality: int = 95) -> dict:
  faces, pairs, issame = read_pairs_file(pairs_path, size, fit)
  images = []
  for a, b in pairs:
    images += [encode_jpeg(faces[a], quality), encode_jpeg(faces[b], quality)]
  verification_bin.save_bin(out_path, images, issame)
  return {"pairs": len(pairs), "genuine": int(issame.sum()), "out": out_path}


def main(argv):
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  try:
    r = pack_pairs(FLAGS.pairs, FLAGS.out, FLAGS.size, FLAGS.fit, FLAGS.quality)
  except (ValueError, DataError, OSError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {r['pairs']} pairs ({r['genuine']} genuine) to {r['out']}")


def _define_flags():
  from absl import flags
  flags.DEFINE_string("pairs", None, "pair list: 'path1 path2 label' lines")
  flags.DEFINE_string("out", None, "output .bin")
  flags.DEFINE_integer("size", 112, "output image size (square)")
  flags.DEFINE_enum("fit", "pad", ("pad", "crop", "stretch"), "how to make images square")
  flags.DEFINE_integer("quality", 95, "JPEG quality")
  flags.mark_flags_as_required(["pairs", "out"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
