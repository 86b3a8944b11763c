"""PyTorch references of arcface_torch's ``get_mbf`` and ``iresnet*`` for the import tests,
written for these tests from the architecture as arcface_torch defines it (module names and
``state_dict`` keys as there): conv-BN-PReLU blocks, the MobileFaceNet DepthWise / Residual /
GDC structure with its absolute group counts, IBasicBlock (BN, conv, BN, PReLU, conv, BN, plus
a 1x1 conv + BN shortcut when the shape changes) and the BN-dropout-FC-BN output head."""

import torch
from torch import nn


def _seq(*mods):
  return nn.Sequential(*mods)


class ConvBlock(nn.Module):
  def __init__(self, cin, cout, k=1, s=1, p=0, groups=1, act=True):
    super().__init__()
    mods = [nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
      mods.append(nn.PReLU(cout))
    self.layers = _seq(*mods)

  def forward(self, x):
    return self.layers(x)


class DepthWise(nn.Module):
  def __init__(self, cin, cout, residual=False, stride=2, groups=1):
    super().__init__()
    self.residual = residual
    self.layers = _seq(ConvBlock(cin, groups), ConvBlock(groups, groups, 3, stride, 1, groups=groups),
                       ConvBlock(groups, cout, act=False))

  def forward(self, x):
    y = self.layers(x)
    return x + y if self.residual else y


class Residual(nn.Module):
  def __init__(self, c, n, groups):
    super().__init__()
    self.layers = _seq(*[DepthWise(c, c, True, 1, groups) for _ in range(n)])

  def forward(self, x):
    return self.layers(x)


class GDC(nn.Module):
  def __init__(self, nf):
    super().__init__()
    self.layers = _seq(ConvBlock(512, 512, 7, 1, 0, groups=512, act=False), nn.Flatten(),
                       nn.Linear(512, nf, bias=False), nn.BatchNorm1d(nf))

  def forward(self, x):
    return self.layers(x)


class MobileFaceNet(nn.Module):
  def __init__(self, nf=512, blocks=(1, 4, 6, 2), scale=2):
    super().__init__()
    s = scale
    self.layers = nn.ModuleList([ConvBlock(3, 64 * s, 3, 2, 1)])
    if blocks[0] == 1:
      self.layers.append(ConvBlock(64 * s, 64 * s, 3, 1, 1, groups=64))
    else:
      self.layers.append(Residual(64 * s, blocks[0], 128))
    self.layers.extend([DepthWise(64 * s, 64 * s, groups=128), Residual(64 * s, blocks[1], 128),
                        DepthWise(64 * s, 128 * s, groups=256), Residual(128 * s, blocks[2], 256),
                        DepthWise(128 * s, 128 * s, groups=512), Residual(128 * s, blocks[3], 256)])
    self.conv_sep = ConvBlock(128 * s, 512)
    self.features = GDC(nf)

  def forward(self, x):
    for f in self.layers:
      x = f(x)
    return self.features(self.conv_sep(x))


class IBasicBlock(nn.Module):
  def __init__(self, cin, planes, stride=1, downsample=None):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
    self.conv1 = nn.Conv2d(cin, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
    self.prelu = nn.PReLU(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
    self.downsample = downsample

  def forward(self, x):
    out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
  def __init__(self, layers, nf=512):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
    self.prelu = nn.PReLU(64)
    cin = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
      down = _seq(nn.Conv2d(cin, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
      blocks = [IBasicBlock(cin, planes, 2, down)] + [IBasicBlock(planes, planes)
                                                     for _ in range(n - 1)]
      setattr(self, f"layer{i + 1}", _seq(*blocks))
      cin = planes
    self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
    self.dropout = nn.Dropout(0.0)
    self.fc = nn.Linear(512 * 7 * 7, nf)
    self.features = nn.BatchNorm1d(nf, eps=1e-5)

  def forward(self, x):
    x = self.prelu(self.bn1(self.conv1(x)))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = torch.flatten(self.bn2(x), 1)
    return self.features(self.fc(self.dropout(x)))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights and BatchNorm statistics (not the identity a fresh model has), eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("prelu.weight") or ".layers.2.weight" in name and p.ndim == 1:
        p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.05)
      elif p.ndim == 1:
        p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    for m in model.modules():
      if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
  return model.eval()
