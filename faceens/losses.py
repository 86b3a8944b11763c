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

import jax
import jax.numpy as jnp
import optax

from faceens import diversity, heads

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
  """MTER (Zhong & Deng 2019): mean relu(||f~(x_adv) - f~(x_src)|| - ||f~(x_adv) - f~(x_tar)|| + m).

  Features ``[B, d]`` are L2-normalised first; ``valid [B]`` masks examples without a target of a
  different identity (the mean is over valid examples).
  """
  a, s, t = (x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
             for x in (f_adv, f_src, f_tar))
  d_pos = jnp.sqrt(jnp.sum(jnp.square(a - s), axis=-1) + 1e-12)
  d_neg = jnp.sqrt(jnp.sum(jnp.square(a - t), axis=-1) + 1e-12)
  per = jax.nn.relu(d_pos - d_neg + margin)
  if valid is None:
    return jnp.mean(per)
  return jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1.0)
