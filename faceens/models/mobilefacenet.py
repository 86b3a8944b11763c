"""MobileFaceNet (Chen et al. 2018, arXiv:1804.07573) as InsightFace's ``mbf`` backbone, in Flax linen.

Matches ``insightface/recognition/arcface_torch/backbones/mobilefacenet.py``:

  ConvBlock(3 -> 64w, 3x3, s2)              conv + BN + per-channel PReLU
  ConvBlock(64w -> 64w, 3x3 depthwise)       (blocks[0] == 1; else a residual stage)
  DepthWise(64w -> 64w, hidden 128w, s2)     1x1 expand, 3x3 depthwise, 1x1 linear project
  Residual x blocks[1] (64w, hidden 128w)
  DepthWise(64w -> 128w, hidden 256w, s2)
  Residual x blocks[2] (128w, hidden 256w)
  DepthWise(128w -> 128w, hidden 512w, s2)
  Residual x blocks[3] (128w, hidden 512w)
  ConvBlock(128w -> 512, 1x1)
  embedding head -> d

``w`` is the width multiplier; ``w = 1`` with ``blocks = (1, 4, 6, 2)`` is Chen et al.'s network
(bottleneck expansion 2, 4 at the down-sampling blocks) and InsightFace's ``MobileFaceNet(scale=1)``.
InsightFace's ``get_model("mbf")`` uses ``scale=2``, which doubles every channel count but keeps the
hidden widths fixed (expansion 1, grouped rather than depthwise 3x3 convs); ``width=2`` here keeps
expansion 2 and depthwise convs, so it has more parameters than ``mbf`` scale 2.

Embedding heads:
  * ``gdc``: InsightFace mbf's GDC: global depthwise conv over the whole last map (linear, BN),
    flatten, linear to d without bias, BN.
  * ``bn_dropout_fc_bn``: the paper's (Amada et al., "Implementation Details"): BN - Dropout(0.4) -
    FC d - BN on the flattened last feature map.

BatchNorm uses PyTorch's defaults (momentum 0.1 -> Flax 0.9, eps 1e-5); in the conv blocks it is
``faceens.models.batchnorm`` (Flax's BatchNorm, or on CPU the same function with a hand-written
gradient). Inputs are NHWC floats, normalised as ``(x / 255 - 0.5) / 0.5``. Any input size divisible
by 16 works (112 default; 32-64 for tests and the CPU demo).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from faceens.models.batchnorm import PReLU, batch_norm_act  # noqa: F401 (PReLU re-exported)
from faceens.models.batchnorm import resolve_impl as resolve_batchnorm_impl
from faceens.models.depthwise import depthwise_conv, resolve_impl
from faceens.models.pointwise import patch_conv, pointwise_conv
from faceens.models.pointwise import resolve_impl as resolve_pointwise_impl

HEADS = ("gdc", "bn_dropout_fc_bn")

_BN = dict(momentum=0.9, epsilon=1e-5)


class DepthwiseConv(nn.Module):
  """kxk depthwise conv without bias; parameter layout of ``nn.Conv(feature_group_count=C)``."""

  kernel_size: int = 3
  stride: int = 1
  padding: int | None = None  # None: (k - 1) // 2, as InsightFace's padding=(1, 1)
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                         (self.kernel_size, self.kernel_size, 1, c))
    return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                          self.padding, self.impl)


class PointwiseConv(nn.Module):
  """1x1 conv without bias as a matmul over channels; layout of ``nn.Conv`` (kernel ``[1, 1, I, O]``).

  XLA:CPU runs a 1x1 ``conv_general_dilated`` and its gradients far slower than the same
  contraction written as a dot, which it hands to its GEMM kernels; ``faceens.models.pointwise``
  also gives it a kernel gradient without a transposed copy.
  """

  features: int
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features))
    return pointwise_conv(x.astype(self.dtype), kernel[0, 0].astype(self.dtype), self.impl)


class DenseConv(nn.Module):
  """kxk conv without bias, padding ``(k - 1) // 2``; parameter layout of ``nn.Conv``.

  On CPU (``impl`` ``dot_vjp``) one GEMM over patch columns (``faceens.models.pointwise``).
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
    return patch_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, (k - 1) // 2,
                      self.impl)


class ConvBN(nn.Module):
  """Conv (1x1, kxk or depthwise) + BN, optionally + PReLU (InsightFace ConvBlock / LinearBlock)."""

  features: int
  kernel_size: int = 1
  stride: int = 1
  depthwise: bool = False
  act: bool = True
  impl: str = "auto"
  pw_impl: str = "auto"
  bn_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depthwise:
      if self.features != x.shape[-1]:
        raise ValueError(f"depthwise conv keeps channels: {x.shape[-1]} -> {self.features}")
      x = DepthwiseConv(self.kernel_size, self.stride, impl=self.impl, dtype=self.dtype)(x)
    elif self.kernel_size == 1 and self.stride == 1:
      x = PointwiseConv(self.features, self.pw_impl, dtype=self.dtype, name="Conv_0")(x)
    else:
      x = DenseConv(self.features, self.kernel_size, self.stride, self.pw_impl, dtype=self.dtype,
                    name="Conv_0")(x)
    return batch_norm_act(x, train, self.act, self.bn_impl, self.dtype, **_BN)


class DepthWiseBlock(nn.Module):
  """Inverted bottleneck: 1x1 expand (PReLU), 3x3 depthwise (PReLU), 1x1 project (linear)."""

  out_features: int
  hidden: int
  stride: int = 1
  residual: bool = False
  impl: str = "auto"
  pw_impl: str = "auto"
  bn_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    shortcut = x
    kw = dict(impl=self.impl, pw_impl=self.pw_impl, bn_impl=self.bn_impl, dtype=self.dtype)
    y = ConvBN(self.hidden, 1, **kw)(x, train)
    y = ConvBN(self.hidden, 3, self.stride, depthwise=True, **kw)(y, train)
    y = ConvBN(self.out_features, 1, act=False, **kw)(y, train)
    return shortcut + y if self.residual else y


class MobileFaceNet(nn.Module):
  """MobileFaceNet feature extractor; returns the un-normalised d-dim feature ``[B, d]``."""

  embedding_dim: int = 512
  width: float = 1.0
  blocks: Sequence[int] = (1, 4, 6, 2)
  head: str = "gdc"
  dropout: float = 0.4
  conv_out: int = 512
  depthwise_impl: str = "auto"
  pointwise_impl: str = "auto"
  batchnorm_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.head not in HEADS:
      raise ValueError(f"unknown embedding head {self.head!r}; valid: {', '.join(HEADS)}")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"MobileFaceNet expects NHWC images with 3 channels, got shape {x.shape}")
    if x.shape[1] % 16 or x.shape[2] % 16:
      raise ValueError(f"input height and width must be multiples of 16, got {x.shape[1:3]}")
    if len(self.blocks) != 4 or min(self.blocks) < 1:
      raise ValueError(f"blocks must be 4 positive integers, got {tuple(self.blocks)}")
    impl = resolve_impl(self.depthwise_impl)
    c = lambda n: max(8, int(round(n * self.width)))  # noqa: E731
    kw = dict(impl=impl, pw_impl=resolve_pointwise_impl(self.pointwise_impl),
              bn_impl=resolve_batchnorm_impl(self.batchnorm_impl), dtype=self.dtype)
    x = x.astype(self.dtype)
    x = ConvBN(c(64), 3, 2, **kw)(x, train)
    if self.blocks[0] == 1:
      x = ConvBN(c(64), 3, 1, depthwise=True, **kw)(x, train)
    else:
      for _ in range(self.blocks[0]):
        x = DepthWiseBlock(c(64), c(64), residual=True, **kw)(x, train)
    stages = ((c(64), c(128), self.blocks[1]), (c(128), c(256), self.blocks[2]),
              (c(128), c(512), self.blocks[3]))
    for out, hidden, n in stages:
      x = DepthWiseBlock(out, hidden, stride=2, **kw)(x, train)
      for _ in range(n):
        x = DepthWiseBlock(out, hidden, residual=True, **kw)(x, train)
    x = ConvBN(self.conv_out, 1, **kw)(x, train)
    if self.head == "gdc":
      # Global depthwise conv: a "valid" depthwise conv whose kernel covers the whole last map
      # (7x7 at 112 px), i.e. a per-channel weighted spatial sum.
      kernel = self.param("gdc_kernel", nn.initializers.lecun_normal(),
                          (x.shape[1], x.shape[2], 1, x.shape[3]))
      x = jnp.einsum("bhwc,hwc->bc", x, kernel[:, :, 0, :].astype(self.dtype))
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name="gdc_bn", **_BN)(x)
      x = nn.Dense(self.embedding_dim, use_bias=False, dtype=self.dtype, name="fc")(x)
    else:
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name="pre_bn", **_BN)(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = x.reshape(x.shape[0], -1)
      x = nn.Dense(self.embedding_dim, dtype=self.dtype, name="fc")(x)
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name="feature_bn", **_BN)(x)
    return x.astype(jnp.float32)
