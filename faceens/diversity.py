"""Ensemble diversity terms: ADP (Pang et al. 2019) and FDP (Amada et al.), via log-determinants.

Both are *subtracted* from the sum of member cross-entropies (Amada et al., L_{E,M,ADP} and
L_{E,M,SRV,FDP}). Log-determinants use ``jnp.linalg.slogdet`` of the K x K Gram matrix plus a
ridge ``eps * I``. With ``eps = 1e-6`` (Pang et al.'s ``det_offset``) the terms stay finite when
all members are identical: the Gram is then all-ones (rank 1) and
det(G + eps I) = eps^(K-1) (K + eps) > 0, so the log-det is about (K - 1) log eps.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from faceens.models.ensemble import l2_normalize

DEFAULT_EPS = 1e-6
LOG_OFFSET = 1e-20  # Pang et al.'s log_offset inside the entropy


def gram_logdet(rows, eps: float = DEFAULT_EPS):
  """log det(R R^T + eps I) for rows ``[..., K, m]``; returns ``[...]``."""
  gram = jnp.einsum("...km,...lm->...kl", rows, rows)
  k = rows.shape[-2]
  _, logdet = jnp.linalg.slogdet(gram + eps * jnp.eye(k, dtype=gram.dtype))
  return logdet


def ensemble_entropy(probs):
  """H(mean_k g_k) for member predictions ``[K, B, n]``; returns ``[B]``."""
  mean = jnp.mean(probs, axis=0)
  return -jnp.sum(mean * jnp.log(mean + LOG_OFFSET), axis=-1)


def adp_log_det(probs, labels, eps: float = DEFAULT_EPS):
  """log det(M M^T + eps I), M = member predictions without the true label, rows L2-normalised.

  As Pang et al.'s official code: the true-label column is removed (here: zeroed, which leaves
  the Gram unchanged), each member's remaining vector is L2-normalised. ``probs [K, B, n]``.
  """
  keep = 1.0 - jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)  # [B, n]
  non_true = l2_normalize(probs * keep[None], axis=-1)                       # [K, B, n]
  return gram_logdet(jnp.swapaxes(non_true, 0, 1), eps)                      # [B]


def adp(probs, labels, alpha: float, beta: float, eps: float = DEFAULT_EPS):
  """ADP_{alpha,beta}(x, y) = alpha H(mean_k g_k) + beta log det(M~ M~^T + eps I).

  Args:
    probs: ``[K, B, n]`` member predictions g_k(x) (softmax over classes).
    labels: ``[B]`` true classes (deleted from M before the determinant).
    alpha, beta: the weights of the ensemble entropy and the log ensemble diversity.
    eps: the ridge of the log det (Pang et al.'s det_offset).

  Returns:
    ``[B]`` per-example values; the loss subtracts their batch mean.

  References:
    Pang et al., "Improving Adversarial Robustness via Promoting Ensemble Diversity", 2019.
  """
  chex.assert_rank([probs, labels], [3, 1])
  chex.assert_axis_dimension(probs, 1, labels.shape[0])
  return alpha * ensemble_entropy(probs) + beta * adp_log_det(probs, labels, eps)


def fdp(features, gamma: float, eps: float = DEFAULT_EPS):
  """FDP_gamma(x) = gamma log det(F~ F~^T + eps I), F~ the K normalised member features as rows.

  Args:
    features: ``[K, B, d]`` member features f_k(x) (normalised here).
    gamma: the weight (the paper's grid 1, 10, 50; 10 best).
    eps: the ridge of the log det.

  Returns:
    ``[B]`` per-example values; the loss subtracts their batch mean.

  References:
    Amada et al., the feature diversity promoting term (L_{E,M,SRV,FDP}).
  """
  chex.assert_rank(features, 3)
  normed = l2_normalize(features, axis=-1)
  return gamma * gram_logdet(jnp.swapaxes(normed, 0, 1), eps)
