"""BatchNorm (+ per-channel PReLU) with a hand-written training-mode gradient for XLA:CPU.

Written with ``flax.linen.BatchNorm`` and a ``jnp.where`` PReLU, autodiff keeps the centred
input ``x - mean`` and the pre-activation ``z`` for the backward pass, so XLA:CPU writes three
full-size tensors per layer in the forward pass (``x - mean``, ``z``, the output) and several
more in the backward pass, each a memory pass over up to 103 MB at batch 64, 112 px (issue 12:
``broadcast_subtract`` and ``broadcast_add`` fusions, a quarter of the train step's op time).
``fused`` computes the same function with a custom VJP that keeps only ``x`` (the convolution's
output, alive anyway) and per-channel vectors:

  forward   mean, var = E[x], max(E[x^2] - E[x]^2, 0)      (Flax's ``use_fast_variance``)
            a = scale / sqrt(var + eps),  b = bias - mean * a
            z = a * x + b,  y = where(z >= 0, z, slope * z)  (one pass, one write)
  backward  dz = where(z >= 0, dy, slope * dy)              (z recomputed from x)
            dslope = sum where(z < 0, dy * z, 0),  dbias = sum dz,
            dscale = (sum dz * x - mean * sum dz) / sqrt(var + eps)
            dx = a * (dz - dbias / M - (x - mean) * dscale / (M sqrt(var + eps)))
               + dmean / M + 2 dvar (x - mean) / M           (M = N * H * W)

(the last line carries the cotangents of the returned statistics, zero in training). The K = 1
train step (``bench/train_step.py``: batch 64, 112 px, 2 cores, both forms in one process) went
from 1.94 to 1.53 s with it, and from 1.76 to 1.62 s with ``dscale`` computed from ``sum dz x``
(see ``_bn_bwd``). Same values as Flax to float32 rounding, same variables
(``BatchNorm_0/{scale, bias}``, ``batch_stats`` ``mean`` / ``var``, ``PReLU_0/slope``) and the same
running-average update. ``auto`` picks ``fused`` on CPU and Flax's BatchNorm elsewhere. In
evaluation mode ``fused`` is the plain expression ``a * x + b`` (then PReLU) under autodiff, as
attacks need.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from faceens.models.backend import choose as choose_backend

IMPLS = ("auto", "flax", "fused")


def resolve_impl(impl: str) -> str:
  """Maps ``auto`` to ``fused`` on CPU and ``flax`` elsewhere."""
  return choose_backend("batchnorm implementation", impl, IMPLS, "fused", "flax")


def _channel_sum(t):
  return jnp.sum(t.reshape(-1, t.shape[-1]), axis=0)


def _stats(x):
  m = x.size // x.shape[-1]
  mean = _channel_sum(x) / m
  var = jnp.maximum(_channel_sum(jnp.square(x)) / m - jnp.square(mean), 0.0)
  return mean, var


def _affine(scale, bias, mean, var, eps):
  a = scale * lax.rsqrt(var + eps)
  return a, bias - mean * a


def _act(z, slope):
  return z if slope is None else jnp.where(z >= 0, z, slope * z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm_train(x, scale, bias, slope, eps: float):
  """``(y, mean, var)``: batch-statistics BatchNorm of float32 ``x [..., C]`` over all leading
  axes, then PReLU with per-channel ``slope`` (``None``: no activation)."""
  return _bn_fwd(x, scale, bias, slope, eps)[0]


def _bn_fwd(x, scale, bias, slope, eps):
  mean, var = _stats(x)
  a, b = _affine(scale, bias, mean, var, eps)
  return (_act(x * a + b, slope), mean, var), (x, scale, bias, slope, mean, var)


def _bn_bwd(eps, res, cotangents):
  x, scale, bias, slope, mean, var = res
  dy, dmean, dvar = cotangents
  m = x.size // x.shape[-1]
  rstd = lax.rsqrt(var + eps)
  a, b = _affine(scale, bias, mean, var, eps)
  xc = x - mean
  if slope is None:
    dz, dslope = dy, None
  else:
    z = x * a + b
    neg = z < 0
    dz = jnp.where(neg, slope * dy, dy)
    dslope = _channel_sum(jnp.where(neg, dy * z, 0.0))
  dbias = _channel_sum(dz)
  # sum dz (x - mean) as sum dz x - mean sum dz: XLA then hands both sums to its reduction kernels
  # without writing x - mean out first (K = 1 step 1.76 -> 1.62 s, same process). The cancellation
  # costs ~eps |mean| / std relative, less than the variance's own eps (mean / std)^2 above.
  dxhat = (_channel_sum(dz * x) - mean * dbias) * rstd  # = dscale
  dx = a * (dz - dbias / m - xc * (dxhat * rstd / m)) + dmean / m + xc * (2.0 * dvar / m)
  return dx, dxhat, dbias, dslope


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


def _slope_param(module: nn.Module, channels: int, init_slope: float):
  return module.param("slope", nn.initializers.constant(init_slope), (channels,))


class PReLU(nn.Module):
  """Per-channel PReLU (PyTorch ``nn.PReLU(C)``), slopes initialised at 0.25.

  Flax's ``nn.PReLU`` has a single scalar slope, which is not InsightFace's.
  """

  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x):
    return _act(x, _slope_param(self, x.shape[-1], self.init_slope).astype(x.dtype))


class _Slope(nn.Module):
  """``PReLU``'s variable (``PReLU_0/slope``) without applying it: the fused op does."""

  init_slope: float = 0.25

  @nn.compact
  def __call__(self, channels: int):
    return _slope_param(self, channels, self.init_slope)


class FusedBatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` over the last axis (Flax's variables, initialisers and
  running-average update), optionally followed by the PReLU whose ``slope`` is passed in, with
  ``batch_norm_train``'s gradient in training mode."""

  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, slope=None):
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if train:
      y, mean, var = batch_norm_train(x32, scale, bias, slope, self.epsilon)
      if not self.is_initializing():
        mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    else:
      a, b = _affine(scale, bias, ra_mean.value, ra_var.value, self.epsilon)
      y = _act(x32 * a + b, slope)
    return y.astype(self.dtype)


def batch_norm_act(x, train: bool, act: bool, impl: str, dtype, momentum: float, epsilon: float):
  """BatchNorm ``BatchNorm_0`` (+ PReLU ``PReLU_0`` when ``act``) inside a compact module.

  ``impl`` ``flax``: ``flax.linen.BatchNorm`` then ``PReLU``; ``fused``: ``FusedBatchNorm`` with
  the same variables.
  """
  if resolve_impl(impl) == "flax":
    x = nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                     dtype=dtype, name="BatchNorm_0")(x)
    return PReLU(name="PReLU_0")(x) if act else x
  slope = _Slope(name="PReLU_0")(x.shape[-1]) if act else None
  return FusedBatchNorm(momentum, epsilon, dtype, name="BatchNorm_0")(x, train, slope)
