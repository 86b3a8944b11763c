"""1x1 convolution (a matmul over channels) with a per-backend gradient.

Written as ``jnp.dot(x, w)`` with ``x [N, H, W, I]``, autodiff's kernel gradient contracts
``x`` and the output gradient over N, H and W. XLA:CPU lays that out by first writing the
output gradient (and the BatchNorm backward that produces it) transposed as ``[O, N*H*W]``: one of
the largest copies of the whole training step (the profile in issue 12: 12% of the step in
``copy_bitcast_fusion``, e.g. f32[128, 200704] for one layer). ``dot_vjp`` has a custom VJP
whose kernel gradient is ``dot_general`` over the ``[N*H*W, I]`` and ``[N*H*W, O]`` views,
contracting their leading axes, which XLA:CPU hands to its GEMM without the copy. The input
gradient is ``dy @ w^T`` in both.

``auto`` picks ``dot_vjp`` on CPU and plain ``dot`` elsewhere (GPU/TPU libraries choose their
own layouts). Same values, to float32 rounding (tested against each other and float64 numpy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from faceens.models.backend import choose as choose_backend

IMPLS = ("auto", "dot", "dot_vjp")


def resolve_impl(impl: str) -> str:
  """Maps ``auto`` to ``dot_vjp`` on CPU and ``dot`` elsewhere."""
  return choose_backend("pointwise implementation", impl, IMPLS, "dot_vjp", "dot")


@jax.custom_vjp
def _dot_vjp(x, w):
  return jnp.dot(x, w)


def _dot_vjp_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _dot_vjp_bwd(res, dy):
  x, w = res
  dx = jnp.dot(dy, w.T)
  x2 = x.reshape(-1, x.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  dw = lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_dot_vjp.defvjp(_dot_vjp_fwd, _dot_vjp_bwd)


def pointwise_conv(x, w, impl: str = "auto"):
  """``x [..., I] @ w [I, O]``: a 1x1 convolution without bias over NHWC ``x``."""
  if resolve_impl(impl) == "dot_vjp":
    return _dot_vjp(x, w)
  return jnp.dot(x, w)
