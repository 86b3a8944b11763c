"""Independent numpy references (float64) the tests compare faceens against."""

import math

import numpy as np



EPS = 1e-6
EPS32 = float(np.finfo(np.float32).eps)


def float32_rounding(depth: int, n: int) -> float:
  """The float32 rounding of a ``depth``-layer computation whose longest reduction has ``n``
  terms, relative to the size of those terms: depth * eps * sqrt(n) (random-walk rounding, each
  layer compounding it)."""
  return depth * EPS32 * np.sqrt(n)


def np_fdp(f, gamma, eps=EPS):
  out = []
  for b in range(f.shape[1]):
    F = f[:, b] / np.linalg.norm(f[:, b], axis=-1, keepdims=True)
    out.append(gamma * np.linalg.slogdet(F @ F.T + eps * np.eye(len(F)))[1])
  return np.array(out)


def np_adp(p, y, alpha, beta, eps=EPS):
  """Pang et al.: entropy of the mean prediction, true label deleted, rows normalised, log det."""
  out = []
  for b in range(p.shape[1]):
    mean = p[:, b].mean(0)
    h = -np.sum(mean * np.log(mean + 1e-20))
    M = np.delete(p[:, b], y[b], axis=1)
    M = M / np.linalg.norm(M, axis=1, keepdims=True)
    out.append(alpha * h + beta * np.linalg.slogdet(M @ M.T + eps * np.eye(len(M)))[1])
  return np.array(out)


def numpy_logits(cos, labels, loss, s, m):
  """Angle-space reference: ArcFace s cos(theta + m) if theta + m <= pi, else s (cos - m sin(pi - m))."""
  out = s * cos.astype(np.float64)
  for idx in np.ndindex(cos.shape[:-1]):
    y = labels[idx[-1]]
    c = float(np.clip(cos[idx + (y,)], -1, 1))
    if loss == "cosface":
      out[idx + (y,)] = s * (c - m)
    else:
      theta = math.acos(c)
      t = math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(math.pi - m)
      out[idx + (y,)] = s * t
  return out


def np_ce(logits, y):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.mean(logp[np.arange(len(y)), y])


def numpy_depthwise(x, k, stride, padding=None):
  """Direct loop reference: out[b,h,w,c] = sum_ij xpad[b, h*s+i, w*s+j, c] k[i,j,0,c]."""
  kh, kw = k.shape[:2]
  ph = (kh - 1) // 2 if padding is None else padding
  pw = (kw - 1) // 2 if padding is None else padding
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  oh = (x.shape[1] + 2 * ph - kh) // stride + 1
  ow = (x.shape[2] + 2 * pw - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, x.shape[3]))
  for h in range(oh):
    for w in range(ow):
      patch = xp[:, h * stride:h * stride + kh, w * stride:w * stride + kw, :]
      out[:, h, w, :] = np.einsum("bijc,ijc->bc", patch, k[:, :, 0, :])
  return out


def numpy_depthwise_grads(x, k, g, stride, padding=None):
  """(dL/dx, dL/dk) of ``L = sum(numpy_depthwise(x, k) * g)``, by scattering each output's taps."""
  kh, kw = k.shape[:2]
  ph = (kh - 1) // 2 if padding is None else padding
  pw = (kw - 1) // 2 if padding is None else padding
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  dxp = np.zeros_like(xp)
  dk = np.zeros_like(k)
  for h in range(g.shape[1]):
    for w in range(g.shape[2]):
      rows, cols = slice(h * stride, h * stride + kh), slice(w * stride, w * stride + kw)
      dk[:, :, 0, :] += np.einsum("bijc,bc->ijc", xp[:, rows, cols, :], g[:, h, w, :])
      dxp[:, rows, cols, :] += np.einsum("ijc,bc->bijc", k[:, :, 0, :], g[:, h, w, :])
  return dxp[:, ph:ph + x.shape[1], pw:pw + x.shape[2], :], dk


def numpy_conv(x, k, stride, pad):
  """Dense NHWC / HWIO convolution by direct loops (symmetric zero padding ``pad``)."""
  kh, kw = k.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh = (xp.shape[1] - kh) // stride + 1
  ow = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, k.shape[3]))
  for h in range(oh):
    for w in range(ow):
      patch = xp[:, h * stride:h * stride + kh, w * stride:w * stride + kw, :]
      out[:, h, w, :] = np.einsum("bijc,ijco->bo", patch, k)
  return out


def numpy_conv_grads(x, k, g, stride, pad):
  """(dL/dx, dL/dk) of ``L = sum(numpy_conv(x, k) * g)``, by scattering each output's patch."""
  kh, kw = k.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dxp, dk = np.zeros_like(xp), np.zeros_like(k)
  for h in range(g.shape[1]):
    for w in range(g.shape[2]):
      rows, cols = slice(h * stride, h * stride + kh), slice(w * stride, w * stride + kw)
      dk += np.einsum("bijc,bo->ijco", xp[:, rows, cols, :], g[:, h, w, :])
      dxp[:, rows, cols, :] += np.einsum("ijco,bo->bijc", k, g[:, h, w, :])
  return dxp[:, pad:pad + x.shape[1], pad:pad + x.shape[2], :], dk


def reference_insightface(emb1, emb2, issame, nfolds=10):
  """InsightFace eval/verification.py calculate_roc, written out with plain loops."""
  thresholds = np.arange(0, 4, 0.01)
  dist = np.sum(np.square(np.subtract(emb1, emb2)), 1)
  n = len(issame)
  sizes = [n // nfolds + (1 if i < n % nfolds else 0) for i in range(nfolds)]  # KFold(shuffle=False)
  starts = np.cumsum([0] + sizes)
  accs, best = [], []
  for f in range(nfolds):
    test = list(range(starts[f], starts[f + 1]))
    train = [i for i in range(n) if i not in set(test)]
    acc_train = []
    for t in thresholds:
      correct = sum((dist[i] < t) == issame[i] for i in train)
      acc_train.append(correct / len(train))
    b = int(np.argmax(acc_train))
    best.append(thresholds[b])
    accs.append(sum((dist[i] < thresholds[b]) == issame[i] for i in test) / len(test))
  return np.mean(accs), np.std(accs), np.mean(best), dist
