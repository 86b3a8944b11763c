"""Depthwise convolution with a per-backend implementation.

XLA:CPU lowers ``feature_group_count == C`` convolutions to a slow generic path (a 28x28x128
depthwise layer at batch 64: ~200 ms forward, ~600 ms gradient on 2 cores; upstream
jax-ml/jax#23713, google/flax#4207, openxla/xla#34273). Written as ``kh * kw`` shifted
multiply-adds, the same layer is a handful of fusible elementwise ops (~5 ms forward).

The kernel gradient of the shifted form is memory-bound: each of the ``kh * kw`` taps is a
full reduction over ``x`` and the output gradient. ``_shifted_depthwise`` therefore has a
custom VJP whose kernel gradient walks the batch in small chunks (``lax.map``), so every tap's
product-reduction re-reads a chunk that is still in cache instead of the whole activation.

On GPU/TPU the native grouped convolution (cuDNN / TPU conv units) is used. Both
implementations use the same parameter layout as ``flax.linen.Conv`` with
``feature_group_count=C``: kernel ``[kh, kw, 1, C]``, so checkpoints move between backends.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from faceens.models.backend import choose as choose_backend

IMPLS = ("auto", "shifted", "native")


def resolve_impl(impl: str) -> str:
  """Maps ``auto`` to ``shifted`` on CPU and ``native`` elsewhere."""
  return choose_backend("depthwise implementation", impl, IMPLS, "shifted", "native")


def _pad_amounts(size: int, k: int, stride: int) -> tuple[int, int, int]:
  """SAME-style symmetric padding of ``(k - 1) // 2`` (PyTorch ``padding=k//2``), output size."""
  pad = (k - 1) // 2
  out = (size + 2 * pad - k) // stride + 1
  return pad, pad, out


def native_depthwise(x, kernel, stride: int, padding: int | None = None):
  """Grouped convolution with one group per channel; ``x`` NHWC, ``kernel`` ``[kh, kw, 1, C]``."""
  kh, kw = kernel.shape[:2]
  ph = (kh - 1) // 2 if padding is None else padding
  pw = (kw - 1) // 2 if padding is None else padding
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((ph, ph), (pw, pw)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _taps(xp, kh, kw, stride, oh, ow):
  """Yields ``(i, j, view)`` with ``view[b, h, w, c] = xp[b, i + h*stride, j + w*stride, c]``."""
  for i in range(kh):
    for j in range(kw):
      yield i, j, lax.slice(
          xp, (0, i, j, 0),
          (xp.shape[0], i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, xp.shape[3]),
          (1, stride, stride, 1))


def _shifted_forward(x, kernel, stride, padding):
  kh, kw = kernel.shape[:2]
  ph = (kh - 1) // 2 if padding is None else padding
  pw = (kw - 1) // 2 if padding is None else padding
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  oh = (x.shape[1] + 2 * ph - kh) // stride + 1
  ow = (x.shape[2] + 2 * pw - kw) // stride + 1
  out = None
  for i, j, view in _taps(xp, kh, kw, stride, oh, ow):
    term = view * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


def _kernel_grad_chunked(xp, g, kh, kw, stride, chunk):
  """dK[i, j, c] = sum_{b,h,w} xp[b, i + h*s, j + w*s, c] * g[b, h, w, c], batch in chunks."""
  b = xp.shape[0]
  oh, ow = g.shape[1], g.shape[2]

  def one_chunk(args):
    xc, gc = args
    taps = [jnp.sum(view * gc, axis=(0, 1, 2)) for _, _, view in _taps(xc, kh, kw, stride, oh, ow)]
    return jnp.stack(taps)  # [kh*kw, C]

  if chunk is None:
    # ~2 MiB of input per chunk keeps a chunk's taps in cache (measured: 28x28x128 at batch 64,
    # kernel gradient 131 ms unchunked, 50 ms in chunks of 4 images, on 2 cores).
    per_image = xp.size // b * xp.dtype.itemsize
    target = max(1, (2 << 20) // max(per_image, 1))
    chunk = max(d for d in range(1, b + 1) if b % d == 0 and d <= target)
  if chunk >= b or b % chunk:
    acc = one_chunk((xp, g))
  else:
    xs = xp.reshape((b // chunk, chunk) + xp.shape[1:])
    gs = g.reshape((b // chunk, chunk) + g.shape[1:])
    acc = jnp.sum(lax.map(one_chunk, (xs, gs)), axis=0)
  return acc.reshape(kh, kw, 1, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shifted_depthwise(x, kernel, stride, padding, chunk):
  return _shifted_forward(x, kernel, stride, padding)


def _shifted_fwd(x, kernel, stride, padding, chunk):
  return _shifted_forward(x, kernel, stride, padding), (x, kernel)


def _shifted_bwd(stride, padding, chunk, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  ph = (kh - 1) // 2 if padding is None else padding
  pw = (kw - 1) // 2 if padding is None else padding
  # Input gradient: the transpose of the shifted forward (pads and adds that XLA fuses).
  _, vjp_x = jax.vjp(lambda xx: _shifted_forward(xx, kernel, stride, padding), x)
  (dx,) = vjp_x(g)
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  dk = _kernel_grad_chunked(xp, g, kh, kw, stride, chunk).astype(kernel.dtype)
  return dx, dk


_shifted_depthwise.defvjp(_shifted_fwd, _shifted_bwd)


def shifted_depthwise(x, kernel, stride: int, padding: int | None = None,
                      chunk: int | None = None):
  """Depthwise conv as ``kh * kw`` shifted multiply-adds; same result as ``native_depthwise``.

  ``chunk``: batch chunk of the kernel-gradient reduction (``None``: sized to ~2 MiB of input).
  """
  return _shifted_depthwise(x, kernel, stride, padding, chunk)


def depthwise_conv(x, kernel, stride: int = 1, padding: int | None = None, impl: str = "auto"):
  """Depthwise convolution, NHWC; ``impl`` in ``auto`` (per backend), ``shifted``, ``native``."""
  impl = resolve_impl(impl)
  if impl == "native":
    return native_depthwise(x, kernel, stride, padding)
  return shifted_depthwise(x, kernel, stride, padding)
