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

``patch_conv`` applies the same idea to the network's one dense kxk convolution (the stem, 3 -> 64
channels, 3x3, stride 2): XLA:CPU's convolution ran it at about 4 GFLOP/s (89 ms forward and
48 ms kernel gradient plus 30 ms of transposes at batch 64, 112 px, 2 cores, issue 12's profile)
because 3 input channels leave its kernels little to vectorise. Written as one GEMM over
``kh * kw * I`` patch columns (an im2col of 27 columns, built by one fused concatenate), both
the forward and the kernel gradient are GEMMs. The input gradient, needed only by attacks and
adversarial training, stays autodiff's transposed convolution.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from faceens.models.backend import choose as choose_backend

IMPLS = ("auto", "dot", "dot_vjp")


def resolve_impl(impl: str) -> str:
  """Maps ``auto`` to ``dot_vjp`` on CPU and ``dot`` elsewhere."""
  return choose_backend("pointwise implementation", impl, IMPLS, "dot_vjp", "dot")


def _weight_grad_dot(a, b):
  """``a^T b`` over the leading axis with float32 accumulation. XLA:CPU has no bf16 x bf16 -> f32
  dot (``UNIMPLEMENTED: Unsupported element type for DotThunk``): there the bf16 operands are
  widened first, which gives the same float32 sums."""
  if a.dtype != jnp.float32 and jax.default_backend() == "cpu":
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


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
  dw = _weight_grad_dot(x2, dy2).astype(w.dtype)
  return dx, dw


_dot_vjp.defvjp(_dot_vjp_fwd, _dot_vjp_bwd)


def _patches(x, kh: int, kw: int, stride: int, pad: int):
  """``[N, OH, OW, kh*kw*I]``: column ``(i*kw + j)*I + c`` holds ``xpad[n, h*s+i, w*s+j, c]``."""
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh = (xp.shape[1] - kh) // stride + 1
  ow = (xp.shape[2] - kw) // stride + 1
  return jnp.concatenate([
      lax.slice(xp, (0, i, j, 0),
                (xp.shape[0], i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, xp.shape[3]),
                (1, stride, stride, 1))
      for i in range(kh) for j in range(kw)], axis=-1)


def _native_conv(x, kernel, stride, pad):
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _patch_conv(x, kernel, stride, pad):
  kh, kw, i, o = kernel.shape
  return jnp.dot(_patches(x, kh, kw, stride, pad), kernel.reshape(kh * kw * i, o))


def _patch_conv_fwd(x, kernel, stride, pad):
  return _patch_conv(x, kernel, stride, pad), (x, kernel)


def _patch_conv_bwd(stride, pad, res, dy):
  x, kernel = res
  kh, kw, i, o = kernel.shape
  cols = _patches(x, kh, kw, stride, pad)
  dk = _weight_grad_dot(cols.reshape(-1, kh * kw * i), dy.reshape(-1, o))
  _, vjp_x = jax.vjp(lambda xx: _native_conv(xx, kernel, stride, pad), x)
  (dx,) = vjp_x(dy)
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_patch_conv.defvjp(_patch_conv_fwd, _patch_conv_bwd)


def patch_conv(x, kernel, stride: int, pad: int, impl: str = "auto"):
  """Dense kxk convolution, NHWC ``x``, HWIO ``kernel``, symmetric ``pad``, no bias.

  ``dot_vjp`` (``auto`` on CPU): one GEMM over im2col patches, kernel gradient a GEMM too;
  ``dot``: XLA's convolution (``lax.conv_general_dilated``), as ``flax.linen.Conv``.
  """
  if resolve_impl(impl) == "dot_vjp":
    return _patch_conv(x, kernel, stride, pad)
  return _native_conv(x, kernel, stride, pad)


def pointwise_conv(x, w, impl: str = "auto"):
  """``x [..., I] @ w [I, O]``: a 1x1 convolution without bias over NHWC ``x``."""
  if resolve_impl(impl) == "dot_vjp":
    return _dot_vjp(x, w)
  return jnp.dot(x, w)
