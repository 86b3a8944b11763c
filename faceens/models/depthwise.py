"""Depthwise convolution with a per-backend implementation.

XLA:CPU lowers ``feature_group_count == C`` convolutions to a slow generic path (a 28x28x128
depthwise layer at batch 64: ~200 ms forward, ~600 ms gradient on 2 cores; upstream
jax-ml/jax#23713, google/flax#4207, openxla/xla#34273). Written as ``kh * kw`` shifted
multiply-adds, the same layer is a handful of fusible elementwise ops (~5 ms forward).

``shifted`` is written for XLA:CPU's fusions, with a custom VJP:

* the forward never writes a padded copy of ``x``: every tap ``lax.pad``s its product into
  place and XLA fuses the pads into one sum;
* the input gradient is one correlation of the output gradient (zero-interleaved for stride > 1,
  padded once) with the flipped kernel. Autodiff of the shifted forward wrote ``kh * kw``
  padded copies of the full activation, one per tap, and summed them (``multiply_pad_fusion``
  in issue 12's profile: 20% of a step's op time);
* the kernel gradient ``dK[i, j, c] = sum_{b,h,w} xpad[b, h*s+i, w*s+j, c] g[b, h, w, c]`` walks
  the batch in chunks small enough to stay in cache (a ``fori_loop`` over dynamic slices). With
  stride 1 all taps of a chunk are one variadic reduction (one fused loop); with stride > 1 each
  tap reduces its unpadded overlap of ``x`` and ``g`` on its own.

``fused`` is the same arithmetic shaped for GPU/TPU compilers, with no loop anywhere: the
forward and the input gradient are the shifted multiply-adds above (elementwise, so XLA can
fuse them with the BatchNorm and PReLU around them), and the kernel gradient is one variadic
reduction of all ``kh * kw`` tap products over N*H*W (any stride; the CPU form's ``fori_loop``
over cache-sized batch chunks would become serial kernels on a GPU).

On GPU/TPU ``auto`` picks the native grouped convolution (cuDNN / TPU conv units) until the
accelerator probe (``bench/accelerator.py``) shows ``fused`` faster there. All implementations
use the same parameter layout as ``flax.linen.Conv`` with
``feature_group_count=C``: kernel ``[kh, kw, 1, C]``, so checkpoints move between backends.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from faceens.models.backend import choose as choose_backend

IMPLS = ("auto", "shifted", "native", "fused")


def resolve_impl(impl: str) -> str:
  """Maps ``auto`` to ``shifted`` on CPU and ``native`` elsewhere."""
  return choose_backend("depthwise implementation", impl, IMPLS, "shifted", "native")


def native_depthwise(x, kernel, stride: int, padding: int | None = None):
  """Grouped convolution with one group per channel; ``x`` NHWC, ``kernel`` ``[kh, kw, 1, C]``."""
  ph, pw = _paddings(kernel, padding)
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((ph, ph), (pw, pw)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _paddings(kernel, padding):
  kh, kw = kernel.shape[:2]
  return ((kh - 1) // 2 if padding is None else padding,
          (kw - 1) // 2 if padding is None else padding)


def _overlap(size: int, out: int, tap: int, pad: int, stride: int):
  """Output rows ``lo..hi`` whose tap ``tap`` reads a real (unpadded) input row, and that row."""
  lo = max(0, -(-(pad - tap) // stride))
  hi = min(out - 1, (size - 1 + pad - tap) // stride)
  return lo, hi, lo * stride + tap - pad


def _tap_view(x, i, j, out_h, out_w, padding, stride):
  """``((lo, hi), (lw, hw), view)``: the output rows/columns ``lo..hi`` x ``lw..hw`` that tap
  ``(i, j)`` computes from real input, and the strided slice of ``x`` they read; ``None`` when
  the tap only ever reads padding."""
  (ph, pw), (b, in_h, in_w, c) = padding, x.shape
  lo, hi, xh = _overlap(in_h, out_h, i, ph, stride)
  lw, hw, xw = _overlap(in_w, out_w, j, pw, stride)
  if hi < lo or hw < lw:
    return None
  view = lax.slice(x, (0, xh, xw, 0),
                   (b, xh + (hi - lo) * stride + 1, xw + (hw - lw) * stride + 1, c),
                   (1, stride, stride, 1))
  return (lo, hi), (lw, hw), view


def _shifted_forward(x, kernel, stride, padding):
  """``out[b,h,w,c] = sum_ij xpad[b, h*s+i, w*s+j, c] k[i,j,0,c]`` without a padded copy of ``x``.

  Each tap multiplies the strided slice of ``x`` it reads and ``lax.pad``s the product to its
  place in the output; XLA fuses the pads into the sum (one loop, no materialised ``xpad``:
  forward 64 -> 34 ms at 56x56x64 and 73 -> 12 ms at 56x56x128 stride 2, batch 64).
  """
  kh, kw = kernel.shape[:2]
  ph, pw = _paddings(kernel, padding)
  b, in_h, in_w, c = x.shape
  out_h = (in_h + 2 * ph - kh) // stride + 1
  out_w = (in_w + 2 * pw - kw) // stride + 1
  zero = jnp.zeros((), x.dtype)
  out = jnp.zeros((b, out_h, out_w, c), x.dtype)
  for i in range(kh):
    for j in range(kw):
      tap = _tap_view(x, i, j, out_h, out_w, (ph, pw), stride)
      if tap is None:
        continue
      (lo, hi), (lw, hw), view = tap
      out = out + lax.pad(view * kernel[i, j, 0], zero,
                          ((0, 0, 0), (lo, out_h - 1 - hi, 0), (lw, out_w - 1 - hw, 0), (0, 0, 0)))
  return out


def _padded_windows(x, kh: int, kw: int, pads):
  """The ``kh * kw`` windows ``xp[:, i:i+oh, j:j+ow]`` of ``xp = lax.pad(x, pads)``, taps in
  row-major order, with ``oh, ow`` = the padded size minus the kernel size plus one.

  ``pads``: ``((lo, hi, interior), (lo, hi, interior))`` for H and W; interior padding puts
  ``interior`` zeros between rows/columns (the transpose of a strided convolution).
  """
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0),) + tuple(pads) + ((0, 0, 0),))
  oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  return [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + oh, j + ow, xp.shape[3]))
          for i in range(kh) for j in range(kw)]


def _correlate(x, kernel, pads):
  """``out[b,h,w,c] = sum_ij xp[b, h+i, w+j, c] k[i,j,0,c]`` with ``xp = lax.pad(x, pads)``
  (``pads`` as in ``_padded_windows``)."""
  kh, kw = kernel.shape[:2]
  out = None
  taps = [kernel[i, j, 0] for i in range(kh) for j in range(kw)]
  for window, k in zip(_padded_windows(x, kh, kw, pads), taps):
    term = window * k
    out = term if out is None else out + term
  return out


def _input_grad(g, kernel, stride, padding, in_h, in_w):
  """``dx``: ``g`` with ``stride - 1`` zeros between rows and columns, padded, correlated with the
  flipped kernel: one padded copy of ``g`` and one fused sum over the taps.

  (The pad-per-tap form of the forward does not fuse here: inside the backward pass XLA:CPU wrote
  each tap's padded product out, 15% of a step's op time.)
  """
  kh, kw = kernel.shape[:2]
  ph, pw = _paddings(kernel, padding)
  span_h = (g.shape[1] - 1) * stride + 1
  span_w = (g.shape[2] - 1) * stride + 1
  pads = ((kh - 1 - ph, in_h + ph - span_h, stride - 1), (kw - 1 - pw, in_w + pw - span_w, stride - 1))
  return _correlate(g, kernel[::-1, ::-1], pads)


def _batch_chunks(x, g, chunk, target_bytes, taps, width):
  """``sum_n taps(x[n], g[n])`` over batch chunks of ``chunk`` images (``None``: the largest
  divisor of the batch whose slice of ``x`` fits in ``target_bytes``), walked by a ``fori_loop``
  so each chunk's taps re-read data that is still in cache. The chunks are dynamic slices, not a
  reshape, which XLA:CPU turned into a transposed copy for ``lax.map``."""
  b = x.shape[0]
  if chunk is None:
    per_image = x.size // b * x.dtype.itemsize
    target = max(1, target_bytes // max(per_image, 1))
    chunk = max(d for d in range(1, b + 1) if b % d == 0 and d <= target)
  if chunk >= b or b % chunk:
    return taps(x, g)

  def step(n, acc):
    xc = lax.dynamic_slice_in_dim(x, n * chunk, chunk, 0)
    gc = lax.dynamic_slice_in_dim(g, n * chunk, chunk, 0)
    return acc + taps(xc, gc)
  return lax.fori_loop(0, b // chunk, step, jnp.zeros((width, x.shape[3]), jnp.float32))


def _kernel_grad(x, g, kh, kw, stride, padding, chunk):
  """``dK[i, j, c] = sum_{b,h,w} xpad[b, h*s+i, w*s+j, c] g[b, h, w, c]``, batch in chunks.

  Stride 1: each chunk is padded once (in cache) and all ``kh * kw`` tap products go into one
  variadic ``lax.reduce``, which XLA:CPU emits as a single fused loop reading ``x`` and ``g``
  in place. The per-tap sums of the strided form below are handed to XNNPACK, which first
  copies both slices out and then writes the product before summing it. Measured on 2 cores,
  batch 64 (ms, per-tap form -> fused): 56x56x64 72 -> 39, 28x28x128 30 -> 13, 14x14x256
  14 -> 6, 7x7x512 5.7 -> 2.9. With stride 2 the fused loop's strided reads were slower
  (56x56x128: 27 -> 30 ms), so strided layers keep the per-tap form. The fused loop adds up each
  chunk in order, so its float32 rounding is a little larger: 1e-6 of the largest entry at
  56x56x64, batch 64, against float64 (the per-tap form: 2e-7; one chunk of the whole batch:
  1.4e-5).
  """
  out_h, out_w = g.shape[1], g.shape[2]
  c = x.shape[3]
  ph, pw = padding

  def fused_taps(xc, gc):
    pads = ((ph, out_h + kh - 1 - xc.shape[1] - ph, 0), (pw, out_w + kw - 1 - xc.shape[2] - pw, 0))
    prods = [(window * gc).astype(jnp.float32) for window in _padded_windows(xc, kh, kw, pads)]
    sums = lax.reduce(prods, [jnp.zeros((), jnp.float32)] * len(prods),
                      lambda a, b: [u + v for u, v in zip(a, b)], (0, 1, 2))
    return jnp.stack(sums)  # [kh*kw, C]

  def strided_taps(xc, gc):
    sums = []
    for i in range(kh):
      for j in range(kw):
        tap = _tap_view(xc, i, j, out_h, out_w, padding, stride)
        if tap is None:
          sums.append(jnp.zeros((c,), jnp.float32))
          continue
        (lo, hi), (lw, hw), view = tap
        prod = (view * gc[:, lo:hi + 1, lw:hw + 1]).astype(jnp.float32)
        # Rows first: a reduction over the contiguous W axis, then over batch and H.
        sums.append(jnp.sum(jnp.sum(prod, axis=2), axis=(0, 1)))
    return jnp.stack(sums)  # [kh*kw, C]

  # Chunk targets measured per form over every MobileFaceNet layer shape (within 10% of the best
  # chunk for each; one chunk for the whole batch is 2-5x slower): ~450 KB of x for the fused
  # loop, ~1.6 MB for the per-tap form.
  if stride == 1:
    acc = _batch_chunks(x, g, chunk, 450 << 10, fused_taps, kh * kw)
  else:
    acc = _batch_chunks(x, g, chunk, 1600 << 10, strided_taps, kh * kw)
  return acc.reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shifted_depthwise(x, kernel, stride, padding, chunk):
  return _shifted_forward(x, kernel, stride, padding)


def _shifted_fwd(x, kernel, stride, padding, chunk):
  return _shifted_forward(x, kernel, stride, padding), (x, kernel)


def _shifted_bwd(stride, padding, chunk, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  dx = _input_grad(g, kernel, stride, padding, x.shape[1], x.shape[2]).astype(x.dtype)
  dk = _kernel_grad(x, g, kh, kw, stride, _paddings(kernel, padding), chunk).astype(kernel.dtype)
  return dx, dk


_shifted_depthwise.defvjp(_shifted_fwd, _shifted_bwd)


def shifted_depthwise(x, kernel, stride: int, padding: int | None = None,
                      chunk: int | None = None):
  """Depthwise conv as ``kh * kw`` shifted multiply-adds; same result as ``native_depthwise``.

  ``chunk``: batch chunk of the kernel-gradient reduction (``None``: sized per form to stay
  in cache, see ``_kernel_grad``).
  """
  return _shifted_depthwise(x, kernel, stride, padding, chunk)


def _fused_kernel_grad(x, g, kh, kw, stride, padding):
  """``dK[i, j, c] = sum_{b,h,w} xpad[b, h*s+i, w*s+j, c] g[b, h, w, c]`` as one multi-output
  reduction over N*H*W: every tap's strided window of the padded ``x`` times ``g``, summed in
  float32 by a single variadic ``lax.reduce`` (one pass over ``x`` and ``g`` for all taps)."""
  out_h, out_w = g.shape[1], g.shape[2]
  ph, pw = padding
  b, in_h, in_w, c = x.shape
  # Pad so that every window [i + s*h] for h < out_h exists (the high side may need fewer rows
  # than ph, or more when the padding exceeds what the kernel needs).
  hi_h = (out_h - 1) * stride + kh - in_h - ph
  hi_w = (out_w - 1) * stride + kw - in_w - pw
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (ph, hi_h, 0), (pw, hi_w, 0), (0, 0, 0)))
  prods = []
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(xp, (0, i, j, 0),
                         (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                         (1, stride, stride, 1))
      prods.append((window * g).astype(jnp.float32))
  sums = lax.reduce(prods, [jnp.zeros((), jnp.float32)] * len(prods),
                    lambda a, b_: [u + v for u, v in zip(a, b_)], (0, 1, 2))
  return jnp.stack(sums).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fused_depthwise(x, kernel, stride, padding):
  return _shifted_forward(x, kernel, stride, padding)


def _fused_fwd(x, kernel, stride, padding):
  return _shifted_forward(x, kernel, stride, padding), (x, kernel)


def _fused_bwd(stride, padding, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  dx = _input_grad(g, kernel, stride, padding, x.shape[1], x.shape[2]).astype(x.dtype)
  dk = _fused_kernel_grad(x, g, kh, kw, stride, _paddings(kernel, padding)).astype(kernel.dtype)
  return dx, dk


_fused_depthwise.defvjp(_fused_fwd, _fused_bwd)


def fused_depthwise(x, kernel, stride: int, padding: int | None = None):
  """Depthwise conv shaped for GPU/TPU (see the module docstring); same result as
  ``native_depthwise``, no loop in its forward or gradient."""
  return _fused_depthwise(x, kernel, stride, padding)


def depthwise_conv(x, kernel, stride: int = 1, padding: int | None = None, impl: str = "auto"):
  """Depthwise convolution, NHWC; ``impl`` in ``auto`` (per backend), ``shifted``, ``native``,
  ``fused``."""
  impl = resolve_impl(impl)
  if impl == "native":
    return native_depthwise(x, kernel, stride, padding)
  if impl == "fused":
    return fused_depthwise(x, kernel, stride, padding)
  return shifted_depthwise(x, kernel, stride, padding)
