"""faceens: ensembles of face feature extractors in JAX/Flax, and how hard they are to fool.

Modules: ``faceens.models`` (MobileFaceNet, stacked-parameter ensembles), ``faceens.heads``
(ArcFace / CosFace, SRV), ``faceens.diversity`` (ADP, FDP), ``faceens.losses`` (every method of
Amada et al.), ``faceens.train`` (the training job), ``faceens.data`` (image folders, bundled faces),
``faceens.load(workdir)`` (embedding API of a trained run, ``faceens.api``).
"""

__version__ = "0.1.0"

__all__ = ["load", "FaceModel"]


def __getattr__(name):
  # ``faceens.load`` without importing JAX on ``import faceens``.
  if name in ("load", "FaceModel"):
    from faceens import api
    return getattr(api, name)
  raise AttributeError(f"module 'faceens' has no attribute {name!r}")
