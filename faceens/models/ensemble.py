"""K feature extractors as one ensemble: stacked parameters, applied with ``jax.vmap``.

Member k's variables are slice ``k`` of every leaf (leading axis K). ``apply_members`` runs all
members on the same batch and returns features ``[K, B, d]``. Two execution strategies give the
same numbers (tested):

  * ``vmap``: ``jax.vmap`` over the stacked variables; fuses into batched kernels on GPU/TPU.
  * ``unrolled``: the K members one after another inside the same ``jit``. On XLA:CPU ``vmap``
    turns each depthwise conv into one with K times the groups, which compiles slowly and runs
    several times slower (``PERF_NOTES``: K = 3, 0.9 img/s vmapped vs 4.1 img/s unrolled).

``auto`` picks ``unrolled`` on CPU and ``vmap`` elsewhere. K = 1 (the single model) is the same
code with a stack of one.

Ensemble embedding (``ensemble_embedding``): E(x) = (1/K) sum_k f_k(x) / ||f_k(x)||, not
renormalised.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from faceens.models.backend import choose as choose_backend

STRATEGIES = ("auto", "vmap", "unrolled")


def resolve_strategy(strategy: str) -> str:
  """``auto``: ``unrolled`` on CPU, ``vmap`` elsewhere."""
  return choose_backend("ensemble strategy", strategy, STRATEGIES, "unrolled", "vmap")


@functools.partial(jax.jit, static_argnums=0)
def _init_one(model: nn.Module, key: jax.Array, sample_input):
  pkey, dkey = jax.random.split(key)
  return model.init({"params": pkey, "dropout": dkey}, sample_input, train=False)


def init_members(model: nn.Module, key: jax.Array, num_members: int, sample_input) -> dict:
  """Initialises K members with K independent keys; returns variables stacked on axis 0."""
  if num_members < 1:
    raise ValueError(f"num_members must be >= 1, got {num_members}")
  keys = jax.random.split(key, num_members)
  if hasattr(model, "depthwise_impl"):
    # Same parameters whatever the depthwise implementation; the native conv compiles fastest.
    model = model.clone(depthwise_impl="native")
  # One compiled single-member init, cached per model definition, called K times.
  members = [_init_one(model, keys[k], sample_input) for k in range(num_members)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *members)


def member(variables: Any, k: int) -> Any:
  """Variables of member k (slice k of every stacked leaf)."""
  return jax.tree.map(lambda v: v[k], variables)


def num_members(variables: Any) -> int:
  return jax.tree.leaves(variables)[0].shape[0]


def apply_members(model: nn.Module, variables: dict, x, *, train: bool = False,
                  rng: jax.Array | None = None, strategy: str = "auto"):
  """Applies every member to ``x``.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` stacked on a leading K axis.
    x: ``[B, H, W, 3]`` input, shared by all members.
    train: BatchNorm in training mode (batch statistics) and dropout on.
    rng: dropout key (required when ``train``); member k uses ``fold_in(rng, k)``.

  Returns:
    ``features [K, B, d]`` and, when ``train``, the updated stacked ``batch_stats``.
  """
  strategy = resolve_strategy(strategy)
  k_members = num_members(variables)
  if train and rng is None:
    raise ValueError("apply_members(train=True) needs a dropout rng")
  member_keys = (jnp.stack([jax.random.fold_in(rng, k) for k in range(k_members)])
                 if train else None)

  def apply_one(v, key):
    if train:
      feats, updates = model.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
      return feats, updates["batch_stats"]
    return model.apply(v, x, train=False), None

  if strategy == "vmap":
    if train:
      return jax.vmap(apply_one)(variables, member_keys)
    return jax.vmap(lambda v: apply_one(v, None)[0])(variables)

  outs = [apply_one(member(variables, k), member_keys[k] if train else None)
          for k in range(k_members)]
  feats = jnp.stack([o[0] for o in outs])
  if not train:
    return feats
  stats = jax.tree.map(lambda *s: jnp.stack(s), *[o[1] for o in outs])
  return feats, stats


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """x / ||x||, with the norm clamped at ``eps`` (PyTorch ``F.normalize``)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def ensemble_embedding(member_features):
  """The ensemble embedding E(x) = (1/K) sum_k f~_k(x), not renormalised (Amada et al.).

  The one definition used by training-time evaluation, the embedding API, verification and the
  attacks (LOTS' objective and its success test).

  Args:
    member_features: ``[K, B, d]`` L2-normalised member features f~_k(x) = f_k(x) / ||f_k(x)||
      (``FaceModel.apply``'s output), a numpy or a JAX array.

  Returns:
    ``[B, d]``, the same kind of array.
  """
  chex.assert_rank(member_features, 3)
  return member_features.mean(axis=0)
