"""Feature extractors: ``get_model(config)`` builds the configured network (arcface_torch's
``backbones.get_model``); ``normalize_pixels`` / ``normalize_images`` are the input
normalisation every caller uses."""

from __future__ import annotations

import jax.numpy as jnp

from faceens.models.mobilefacenet import MobileFaceNet


def get_model(config) -> MobileFaceNet:
  """The MobileFaceNet of ``config.model`` (one member; ``faceens.models.ensemble`` stacks K)."""
  m = config.model
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
