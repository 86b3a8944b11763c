"""arcface_torch's backbones in Flax, with its parameter names: published checkpoints load 1:1.

InsightFace's ``recognition/arcface_torch/backbones`` defines the models people deploy and
study: ``iresnet18`` ... ``iresnet100`` (``r18`` ... ``r100``) and ``get_mbf`` (its
MobileFaceNet, ``scale`` 2 by default). These modules follow that definition layer for layer
(kernel sizes, strides, paddings, groups, BatchNorm eps 1e-5, per-channel PReLU, the output
BN-dropout-FC-BN head with the FC over the channel-major flattened map), and name every
submodule after its PyTorch ``state_dict`` path with each ``Sequential`` / ``ModuleList`` index
joined to its parent by ``_`` (``layer1.0.conv1`` -> ``layer1_0/conv1``, ``layers.2.layers.1``
-> ``layers_2/layers_1``), which ``faceens.import_model`` relies on.

Input: NHWC, RGB, ``(x - 127.5) / 127.5``, 112x112 for the published weights (faceens'
``normalize_pixels`` of [0, 1] pixels is the same map). Output: the un-normalised embedding.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from faceens.models.batchnorm import PReLU
from faceens.models.depthwise import depthwise_conv

# arcface_torch's names -> blocks per stage of IResNet.
IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3),
                  "r100": (3, 13, 30, 3)}
ARCHS = ("mbf",) + tuple(IRESNET_LAYERS)
_EPS = 1e-5


def _bn(train: bool, name: str):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=_EPS, name=name)


class _Conv(nn.Module):
  """``nn.Conv2d(..., bias=False)`` with PyTorch's symmetric padding and groups; a depthwise
  convolution (groups == channels) runs as ``faceens.models.depthwise`` (fast on CPU)."""
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    if c_in % self.groups or self.features % self.groups:
      raise ValueError(f"a conv with {self.groups} groups needs channels divisible by them, got "
                       f"{c_in} -> {self.features}")
    k = self.param("kernel", nn.initializers.lecun_normal(),
                   (self.kernel, self.kernel, c_in // self.groups, self.features)).astype(x.dtype)
    if self.groups == c_in == self.features and self.groups > 1:
      return depthwise_conv(x, k, self.stride, self.padding, self.depthwise_impl)
    return lax.conv_general_dilated(x, k, (self.stride, self.stride),
                                    ((self.padding, self.padding),) * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=self.groups)


class _ConvBlock(nn.Module):
  """arcface_torch ``ConvBlock`` (conv, BN, PReLU) or ``LinearBlock`` (conv, BN; ``act=False``):
  ``layers_0`` / ``layers_1`` / ``layers_2``."""
  features: int
  kernel: int = 1
  stride: int = 1
  padding: int = 0
  groups: int = 1
  act: bool = True
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    x = _Conv(self.features, self.kernel, self.stride, self.padding, self.groups,
              self.depthwise_impl, name="layers_0")(x)
    x = _bn(train, "layers_1")(x)
    return PReLU(name="layers_2")(x) if self.act else x


class _DepthWise(nn.Module):
  """arcface_torch ``DepthWise``: 1x1 to ``groups`` channels, a grouped kxk, 1x1 linear."""
  out_c: int
  groups: int
  stride: int = 2
  residual: bool = False
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(depthwise_impl=self.depthwise_impl)
    y = _ConvBlock(self.groups, name="layers_0", **kw)(x, train)
    y = _ConvBlock(self.groups, 3, self.stride, 1, groups=self.groups, name="layers_1", **kw)(
        y, train)
    y = _ConvBlock(self.out_c, act=False, name="layers_2", **kw)(y, train)
    return x + y if self.residual else y


class _Residual(nn.Module):
  """arcface_torch ``Residual``: ``num_block`` residual ``DepthWise`` blocks (``layers_i``)."""
  c: int
  num_block: int
  groups: int
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_block):
      x = _DepthWise(self.c, self.groups, 1, True, self.depthwise_impl, name=f"layers_{i}")(x, train)
    return x


class ArcMobileFaceNet(nn.Module):
  """arcface_torch ``get_mbf(fp16, num_features, blocks, scale)``. At ``blocks[0] == 1`` its
  second layer is a 3x3 convolution with 64 groups over ``64 * scale`` channels: depthwise at
  scale 1, two channels per group at scale 2 (as arcface_torch writes it)."""
  num_features: int = 512
  blocks: Sequence[int] = (1, 4, 6, 2)
  scale: int = 2
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    s, b, kw = self.scale, tuple(self.blocks), dict(depthwise_impl=self.depthwise_impl)
    x = _ConvBlock(64 * s, 3, 2, 1, name="layers_0", **kw)(x, train)
    if b[0] == 1:
      x = _ConvBlock(64 * s, 3, 1, 1, groups=64, name="layers_1", **kw)(x, train)
    else:
      x = _Residual(64 * s, b[0], 128, name="layers_1", **kw)(x, train)
    x = _DepthWise(64 * s, 128, name="layers_2", **kw)(x, train)
    x = _Residual(64 * s, b[1], 128, name="layers_3", **kw)(x, train)
    x = _DepthWise(128 * s, 256, name="layers_4", **kw)(x, train)
    x = _Residual(128 * s, b[2], 256, name="layers_5", **kw)(x, train)
    x = _DepthWise(128 * s, 512, name="layers_6", **kw)(x, train)
    x = _Residual(128 * s, b[3], 256, name="layers_7", **kw)(x, train)
    x = _ConvBlock(512, name="conv_sep", **kw)(x, train)
    return _GDC(self.num_features, self.depthwise_impl, name="features")(x, train)


class _GDC(nn.Module):
  """arcface_torch ``GDC``: a linear global depthwise conv over the whole map, flatten, a
  bias-free FC, BatchNorm1d (``layers_0`` / ``layers_2`` / ``layers_3``)."""
  num_features: int
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    k = x.shape[1]
    x = _ConvBlock(x.shape[-1], k, 1, 0, groups=x.shape[-1], act=False, name="layers_0",
                   depthwise_impl=self.depthwise_impl)(x, train)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.num_features, use_bias=False, name="layers_2")(x)
    return _bn(train, "layers_3")(x)


class _IBasicBlock(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    out = _bn(train, "bn1")(x)
    out = _Conv(self.planes, 3, 1, 1, name="conv1")(out)
    out = _bn(train, "bn2")(out)
    out = PReLU(name="prelu")(out)
    out = _Conv(self.planes, 3, self.stride, 1, name="conv2")(out)
    out = _bn(train, "bn3")(out)
    identity = x
    if self.downsample:
      identity = _Conv(self.planes, 1, self.stride, 0, name="downsample_0")(x)
      identity = _bn(train, "downsample_1")(identity)
    return out + identity


class IResNet(nn.Module):
  """arcface_torch ``iresnet{18,34,50,100}``: ``layers`` blocks per stage; the output head is
  BN - dropout - FC over the channel-major (NCHW) flattened 512-channel map - BN1d."""
  layers: Sequence[int] = (3, 4, 14, 3)
  num_features: int = 512
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _Conv(64, 3, 1, 1, name="conv1")(x)
    x = _bn(train, "bn1")(x)
    x = PReLU(name="prelu")(x)
    inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), self.layers)):
      for i in range(n):
        stride = 2 if i == 0 else 1
        down = i == 0 and (stride != 1 or inplanes != planes)
        x = _IBasicBlock(planes, stride, down, name=f"layer{stage + 1}_{i}")(x, train)
        inplanes = planes
    x = _bn(train, "bn2")(x)
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch.flatten of NCHW
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_features, name="fc")(x)
    return _bn(train, "features")(x)


def get_backbone(arch: str, num_features: int = 512, *, scale: int = 2, blocks=(1, 4, 6, 2),
                 dropout: float = 0.0, depthwise_impl: str = "auto") -> nn.Module:
  """arcface_torch's ``get_model(name)`` for ``mbf`` and ``r18`` ... ``r100``."""
  if arch == "mbf":
    return ArcMobileFaceNet(num_features, tuple(blocks), scale, depthwise_impl)
  if arch in IRESNET_LAYERS:
    return IResNet(IRESNET_LAYERS[arch], num_features, dropout)
  raise ValueError(f"unknown arcface_torch architecture {arch!r}; valid: {', '.join(ARCHS)}")
