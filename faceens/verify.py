"""Same person or not: ``python -m faceens.verify --workdir=DIR a.jpg b.jpg``.

Uses InsightFace's protocol (flip test-time augmentation, squared L2 distance) and the threshold
of one evaluated set of ``DIR/eval.json``: the run's recorded default (its own validation set),
``--threshold_from=SET`` for another set, or ``--threshold_from=NUMBER`` (``--threshold``) for
a number. The output says which.
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: glibc reads its tunables at start (faceens.hostenv)
  from faceens import hostenv
  hostenv.reexec_with_hugepage_malloc()

import json
import os
import sys
import types

import numpy as np

from faceens import api, logs, verification
from faceens.data.image_folder import DataError, fit_spec, load_image


def _image(model, image) -> np.ndarray:
  """One aligned face crop: a path, or an array (uint8 ``[H, W]`` / ``[H, W, 3]`` of any size, or
  float ``[S, S(, 3)]`` in [0, 1] at the model's input size) -> float ``[S, S, 3]``."""
  if isinstance(image, (str, os.PathLike)):
    return load_image(os.fspath(image), model.input_size, fit_spec(model.config))
  return model.prepare(np.asarray(image)[None])[0]


def verify(model, image_a, image_b, threshold: float | None = None,
           member: int | None = None) -> dict:
  """Same person or not: ``faceens.verify(model, a, b)``.

  Args:
    model: a ``faceens.FaceModel`` (``faceens.load(workdir)``).
    image_a, image_b: aligned face crops, each an image path or an array (see ``_image``).
    threshold: squared-L2 threshold; default ``model.threshold`` (from ``eval.json``, see
      ``faceens.load``'s ``threshold_from``).
    member: use member ``k`` alone instead of the ensemble.

  Returns:
    ``{"distance", "threshold", "same", "threshold_source", "metric", "member", "image_a",
    "image_b"}``: InsightFace's protocol, flip test-time augmentation and the squared L2
    distance between the normalised embeddings; ``same`` is ``distance < threshold``.
  """
  images = np.stack([_image(model, im) for im in (image_a, image_b)])
  emb = model.embed(images, member=member, flip=True)
  dist = float(verification.distances(emb[:1], emb[1:], "squared_l2")[0])
  source = "given"
  if threshold is None:
    threshold, source = model.threshold, model.threshold_source
  if threshold is None:
    raise ValueError(f"no threshold: run python -m faceens.evaluate --workdir={model.workdir} "
                     "first, or pass --threshold_from=NUMBER")
  name = lambda im: os.fspath(im) if isinstance(im, (str, os.PathLike)) else "array"  # noqa: E731
  return {"image_a": name(image_a), "image_b": name(image_b), "distance": dist,
          "threshold": float(threshold), "same": bool(dist < threshold),
          "metric": "squared_l2 (flip TTA)", "member": member, "threshold_source": source}


class _CallableModule(types.ModuleType):
  """``faceens.verify`` is this module; calling it calls ``verify``."""

  def __call__(self, *args, **kwargs):
    return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  logs.default_verbosity()
  paths = argv[1:]
  if len(paths) != 2:
    raise SystemExit(f"error: expected two image paths, got {len(paths)}: "
                     "python -m faceens.verify --workdir=DIR a.jpg b.jpg")
  try:
    threshold, source, threshold_from = FLAGS.threshold, "--threshold", FLAGS.threshold_from
    if threshold_from is not None and threshold is not None:
      raise ValueError("give --threshold or --threshold_from, not both")
    try:
      threshold, source, threshold_from = float(threshold_from), "--threshold_from", None
    except (TypeError, ValueError):
      pass  # a set name of eval.json, or None
    model = api.load(FLAGS.workdir, threshold_from=threshold_from)
    r = verify(model, *paths, threshold=threshold, member=FLAGS.member)
    if threshold is not None:
      r["threshold_source"] = source
  except (ValueError, FileNotFoundError, DataError) as e:
    raise SystemExit(f"error: {e}") from None
  if FLAGS.json:
    print(json.dumps(r))
    return
  verdict = "SAME person" if r["same"] else "DIFFERENT people"
  print(f"distance {r['distance']:.4f} {'<' if r['same'] else '>='} threshold "
        f"{r['threshold']:.4f} ({r['threshold_source']}): {verdict}")


def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "run directory written by faceens.train")
  flags.DEFINE_string("threshold_from", None, "an evaluated set of eval.json whose threshold to "
                      "use, or a squared-L2 threshold (default: the run's recorded set, its own "
                      "validation set)")
  flags.DEFINE_float("threshold", None, "squared-L2 threshold (same as --threshold_from=NUMBER)")
  flags.DEFINE_integer("member", None, "use member k alone (default: the ensemble)")
  flags.DEFINE_bool("json", False, "print the result as JSON")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
