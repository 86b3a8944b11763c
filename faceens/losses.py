"""The training loss of every method in Amada et al., from heads and diversity terms.

  single    K = 1, per-member head                 sum_k CE_k
  baseline  K members, per-member heads            sum_k CE_k
  adp       per-member heads                       sum_k CE_k - ADP_{alpha,beta}
  fdp       per-member heads                       sum_k CE_k - FDP_gamma
  srv       one shared class-weight matrix (SRV)   sum_k CE_k
  srv_adp   SRV                                    sum_k CE_k - ADP_{alpha,beta}
  srv_fdp   SRV (the paper's method)               sum_k CE_k - FDP_gamma
  advt      K = 1 with MTER adversarial training   CE + MTER (Zhong & Deng 2019)

CE_k is the batch mean of member k's margin cross-entropy; regularisers are batch means.
ADP's member predictions g_k: the paper does not say which logits feed them with margin heads.
``adp_logits = "cosine"`` (default) uses softmax(s cos theta) without the margin, what the member
predicts at test time; ``"margin"`` uses the margin logits the CE sees.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex

import jax
import jax.numpy as jnp
import optax

from faceens import diversity, heads
from faceens.models.ensemble import l2_normalize

METHODS = ("single", "baseline", "adp", "fdp", "srv", "srv_adp", "srv_fdp", "advt")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  srv: bool
  regularizer: str | None  # None, "adp", "fdp"
  single: bool = False
  adversarial: bool = False


_SPECS = {
    "single": MethodSpec(srv=False, regularizer=None, single=True),
    "baseline": MethodSpec(srv=False, regularizer=None),
    "adp": MethodSpec(srv=False, regularizer="adp"),
    "fdp": MethodSpec(srv=False, regularizer="fdp"),
    "srv": MethodSpec(srv=True, regularizer=None),
    "srv_adp": MethodSpec(srv=True, regularizer="adp"),
    "srv_fdp": MethodSpec(srv=True, regularizer="fdp"),
    "advt": MethodSpec(srv=False, regularizer=None, single=True, adversarial=True),
}


def method_spec(method: str) -> MethodSpec:
  if method not in _SPECS:
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
  return _SPECS[method]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  method: str
  loss: str = "arcface"
  scale: float = 64.0
  margin: float = 0.5
  adp_alpha: float = 2.0
  adp_beta: float = 0.5
  adp_logits: str = "cosine"
  fdp_gamma: float = 10.0
  det_eps: float = diversity.DEFAULT_EPS

  def __post_init__(self):
    method_spec(self.method)
    if self.loss not in heads.LOSSES:
      raise ValueError(f"unknown loss {self.loss!r}; valid: {', '.join(heads.LOSSES)}")
    if self.adp_logits not in ("cosine", "margin"):
      raise ValueError(f"adp_logits must be 'cosine' or 'margin', got {self.adp_logits!r}")


def ensemble_loss(features, class_weights, labels, cfg: LossConfig):
  """Total loss and its parts for member features ``[K, B, d]`` and labels ``[B]``.

  Returns ``(loss, aux)`` with ``aux`` holding ``ce`` (sum over members), ``reg`` (the subtracted
  diversity term, batch mean), ``accuracy`` (per-member top-1 on cosine logits, mean over members)
  and ``member_ce [K]``.
  """
  chex.assert_rank([features, labels], [3, 1])
  spec = method_spec(cfg.method)
  cos = heads.cosines(features, class_weights)                        # [K, B, n]
  logits = heads.margin_logits(cos, labels, cfg.loss, cfg.scale, cfg.margin)
  onehot = jax.nn.one_hot(labels, cos.shape[-1])
  member_ce = jnp.mean(optax.softmax_cross_entropy(logits, onehot[None]), axis=-1)  # [K]
  ce = jnp.sum(member_ce)
  reg = jnp.zeros((), jnp.float32)
  if spec.regularizer == "adp":
    adp_in = cfg.scale * cos if cfg.adp_logits == "cosine" else logits
    probs = jax.nn.softmax(adp_in, axis=-1)
    reg = jnp.mean(diversity.adp(probs, labels, cfg.adp_alpha, cfg.adp_beta, cfg.det_eps))
  elif spec.regularizer == "fdp":
    reg = jnp.mean(diversity.fdp(features, cfg.fdp_gamma, cfg.det_eps))
  accuracy = jnp.mean(jnp.argmax(cos, axis=-1) == labels[None])
  return ce - reg, {"ce": ce, "reg": reg, "accuracy": accuracy, "member_ce": member_ce}


def mter_loss(f_adv, f_src, f_tar, margin: float, valid=None):
  """MTER's hinge (Zhong & Deng 2019), the triplet loss with the adversarial face as anchor.

  ``mean_b relu(||f~(x_adv) - f~(x_src)|| - ||f~(x_adv) - f~(x_tar)|| + m)`` with
  ``f~ = f / ||f||``: ``optax.losses.triplet_margin_loss(anchor=f~(x_adv), positive=f~(x_src),
  negative=f~(x_tar))``.

  Args:
    f_adv, f_src, f_tar: ``[B, d]`` features of the adversarial, source and target faces.
    margin: m (the paper's grid 0.2, 0.6, 1.4, 3.0).
    valid: optional ``[B]`` 0/1 mask of the examples whose target is another identity; the mean
      is over those.

  Returns:
    The scalar loss.
  """
  chex.assert_rank([f_adv, f_src, f_tar], 2)
  chex.assert_equal_shape([f_adv, f_src, f_tar])
  a, s, t = (l2_normalize(x) for x in (f_adv, f_src, f_tar))
  per = optax.losses.triplet_margin_loss(a, s, t, margin=margin, eps=1e-12)
  if valid is None:
    return jnp.mean(per)
  return jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def mter_targets(f_src, labels):
  """MTER's target of each example: the next example of the batch (a roll by one).

  Returns ``(f_tar [B, d], valid [B])``, ``valid`` 0 where the target is the same identity.
  """
  return jnp.roll(f_src, 1, axis=0), (jnp.roll(labels, 1) != labels).astype(jnp.float32)


def advt_loss(craft: Callable, features: Callable, pixels, f_src, labels, margin: float,
              weight: float):
  """The AdvT term added to the CE: ``weight * MTER(f(x_adv), f(x), f(x_tar))``.

  Args:
    craft: ``(pixels, f_tar) -> x_adv``, MTER's attack pulling each face towards its target's
      feature (``train.craft_mter``: sign steps in an L_inf ball).
    features: ``x_adv -> [B, d]`` the trained network's features of the crafted faces (a second
      forward pass in training mode).
    pixels: ``[B, H, W, 3]`` the batch in [0, 1]; ``f_src``: its features ``[B, d]``; ``labels``.
    margin, weight: MTER's m and the term's weight.

  Returns:
    The scalar term (the total loss is CE + this).

  References:
    Zhong & Deng, "Adversarial Learning with Margin-based Triplet Embedding Regularization", 2019.
  """
  f_tar, valid = mter_targets(f_src, labels)
  x_adv = craft(pixels, f_tar)
  return weight * mter_loss(features(x_adv), f_src, f_tar, margin, valid)
