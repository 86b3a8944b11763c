"""Margin heads: normalised class weights, ArcFace and CosFace logits, per-member or shared (SRV).

cos(theta_{k,l}) = W~^k_l . f~_k(x) (Amada et al., "Our Solution"). Per-member heads have class
weights ``[K, d, n]``; SRV ("shared representative vectors") has exactly one ``[d, n]`` array that
every member is scored against, so cos(psi_k(x, l)) = W~_l . f~_k(x).

ArcFace (Deng et al. 2019): target logit s * cos(theta_y + m), with InsightFace's fallback
s * (cos(theta_y) - m * sin(pi - m)) when theta_y + m > pi (i.e. cos(theta_y) <= cos(pi - m)),
which keeps the target logit monotone in theta_y. CosFace (Wang et al. 2018): s * (cos(theta_y) - m).
Other logits: s * cos(theta_l). Paper: s = 64, ArcFace m = 0.5, CosFace m = 0.35.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from faceens.models.ensemble import l2_normalize

LOSSES = ("arcface", "cosface")


def init_class_weights(key, num_members: int, dim: int, num_classes: int, srv: bool):
  """N(0, 0.01) class weights as InsightFace; ``[d, n]`` for SRV, else ``[K, d, n]``."""
  shape = (dim, num_classes) if srv else (num_members, dim, num_classes)
  return 0.01 * jax.random.normal(key, shape, jnp.float32)


def cosines(features, weights):
  """cos(theta_{k,l}) = W~^k_l . f~_k(x) (per-member heads) or W~_l . f~_k(x) (SRV).

  Args:
    features: ``[K, B, d]`` member features f_k(x) (normalised here).
    weights: ``[K, d, n]`` per-member class weights, or ``[d, n]``: SRV's one shared matrix.

  Returns:
    ``[K, B, n]`` cosines.

  References:
    Amada et al., "Our Solution" (SRV); Deng et al. 2019 (normalised weights and features).
  """
  chex.assert_rank(features, 3)
  chex.assert_rank(weights, {2, 3})
  f = l2_normalize(features, axis=-1)
  w = l2_normalize(weights, axis=-2)
  if w.ndim == 2:  # SRV: one W shared by all members
    return jnp.einsum("kbd,dn->kbn", f, w)
  if w.shape[0] != f.shape[0]:
    raise ValueError(f"class weights for {w.shape[0]} members, features of {f.shape[0]}")
  return jnp.einsum("kbd,kdn->kbn", f, w)


def _safe_sin(cos):
  """sin(theta) = sqrt(1 - cos^2) with a zero (not NaN) gradient at |cos| = 1."""
  s2 = 1.0 - jnp.square(cos)
  pos = s2 > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s2, 1.0)), 0.0)


def arcface_target(cos_y, margin: float):
  """cos(theta_y + m), or cos(theta_y) - m sin(pi - m) when theta_y + m > pi."""
  cos_m, sin_m = math.cos(margin), math.sin(margin)
  threshold = math.cos(math.pi - margin)
  phi = cos_y * cos_m - _safe_sin(cos_y) * sin_m
  return jnp.where(cos_y > threshold, phi, cos_y - margin * math.sin(math.pi - margin))


def margin_logits(cos, labels, loss: str, scale: float, margin: float):
  """L_ARC / L_COS logits: s cos(theta_l) for l != y, and for the true class y
  s cos(theta_y + m) (ArcFace, with InsightFace's fallback) or s (cos(theta_y) - m) (CosFace).

  Args:
    cos: ``[..., B, n]`` cosines (``cosines``); labels: ``[B]`` true classes.
    loss: ``arcface`` or ``cosface``; scale: s; margin: m.

  Returns:
    Logits of ``cos``'s shape; their softmax cross-entropy is the member's margin loss.

  References:
    Deng et al., ArcFace, 2019; Wang et al., CosFace, 2018.
  """
  if loss not in LOSSES:
    raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
  chex.assert_rank(labels, 1)
  chex.assert_axis_dimension(cos, -2, labels.shape[0])
  cos = jnp.clip(cos, -1.0, 1.0)
  onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=bool)
  cos_y = jnp.sum(jnp.where(onehot, cos, 0.0), axis=-1, keepdims=True)
  target = arcface_target(cos_y, margin) if loss == "arcface" else cos_y - margin
  return scale * jnp.where(onehot, target, cos)
