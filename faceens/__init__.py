"""faceens: ensembles of face feature extractors in JAX/Flax, and how hard they are to fool.

Modules: ``faceens.models`` (MobileFaceNet, stacked-parameter ensembles), ``faceens.heads``
(ArcFace / CosFace, SRV), ``faceens.diversity`` (ADP, FDP), ``faceens.losses`` (every method of
Amada et al.), ``faceens.train`` (the training job), ``faceens.data`` (image folders, bundled faces).
"""

__version__ = "0.1.0"
