"""Feature extractors: ``get_model(config)`` builds the configured network (arcface_torch's
``backbones.get_model``); ``normalize_pixels`` / ``normalize_images`` are the input
normalisation every caller uses."""

from __future__ import annotations

import jax.numpy as jnp

from faceens.models import arcface_torch
from faceens.models.mobilefacenet import MobileFaceNet

ARCHS = ("mobilefacenet",) + arcface_torch.ARCHS


def get_model(config):
  """The network of ``config.model`` (one member; ``faceens.models.ensemble`` stacks K):
  ``model.arch`` ``mobilefacenet`` (faceens' own, the paper's), or arcface_torch's ``mbf``,
  ``r18`` ... ``r100`` (``faceens.models.arcface_torch``, for imported published weights)."""
  m = config.model
  arch = m.get("arch", "mobilefacenet")
  if arch in arcface_torch.ARCHS:
    return arcface_torch.get_backbone(arch, m.embedding_dim, scale=m.get("scale", 2),
                                      blocks=tuple(m.blocks), dropout=0.0,
                                      depthwise_impl=m.depthwise_impl)
  if arch != "mobilefacenet":
    raise ValueError(f"unknown model.arch {arch!r}; valid: {', '.join(ARCHS)}")
  return MobileFaceNet(
      embedding_dim=m.embedding_dim, width=m.width, blocks=tuple(m.blocks), head=m.head,
      dropout=m.dropout, depthwise_impl=m.depthwise_impl,
      pointwise_impl=m.pointwise_impl, batchnorm_impl=m.batchnorm_impl,
      dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32)


def normalize_pixels(x):
  """Pixels in [0, 1] -> the network input ``(x - 0.5) / 0.5`` in [-1, 1] (InsightFace)."""
  return (x - 0.5) / 0.5


def normalize_images(images):
  """uint8 ``[B, H, W, 3]`` -> float32 ``(x / 255 - 0.5) / 0.5`` (InsightFace)."""
  return normalize_pixels(images.astype(jnp.float32) / 255.0)
