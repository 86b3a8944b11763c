"""faceens: ensembles of face feature extractors in JAX/Flax, and how hard they are to fool.

The API (imported lazily: ``import faceens`` does not import JAX):

  * ``faceens.load(workdir)`` -> ``FaceModel``: a trained run as an embedding function
    (``model.embed(images)``, ``model.threshold``; ``faceens.api``);
  * ``faceens.verify(model, a, b)``: same person or not, for two aligned face crops given as
    image paths or arrays (``faceens.verify``).

Inputs are aligned face crops (MTCNN-style alignment, as in MS1MV2 / LFW), not raw photos.

Modules: ``faceens.models`` (MobileFaceNet, stacked-parameter ensembles), ``faceens.heads``
(ArcFace / CosFace, SRV), ``faceens.diversity`` (ADP, FDP), ``faceens.losses`` (every method of
Amada et al.), ``faceens.attacks`` (LOTS), ``faceens.data`` (image folders, RecordIO, LFW,
bundled faces) and the jobs ``train``, ``evaluate``, ``verify``, ``attack``, ``reproduce``
(``python -m faceens.<job>`` or ``faceens-<job>``).
"""

__version__ = "0.1.0"

__all__ = ["FaceModel", "load", "verify"]

_SUBMODULES = ("api", "attack", "attacks", "configs", "data", "diversity", "evaluate", "heads",
               "losses", "models", "reproduce", "train", "verification", "verify")


def __getattr__(name):
  # ``faceens.load`` without importing JAX on ``import faceens``.
  if name in ("load", "FaceModel"):
    from faceens import api
    return getattr(api, name)
  if name == "verify":  # the module is callable: faceens.verify(model, a, b)
    import importlib
    return importlib.import_module("faceens.verify")
  raise AttributeError(f"module 'faceens' has no attribute {name!r}")


def __dir__():
  return sorted(set(__all__) | set(_SUBMODULES) | {"__version__"})
