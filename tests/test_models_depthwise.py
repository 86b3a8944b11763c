"""faceens.models.depthwise: every implementation against float64 numpy, forward and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceens.models import depthwise
from tests.references import numpy_depthwise, numpy_depthwise_grads


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_depthwise_impls_match_numpy_and_each_other(stride, size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, size, size, 5)).astype(np.float32)
  k = rng.normal(size=(3, 3, 1, 5)).astype(np.float32)
  ref = numpy_depthwise(x.astype(np.float64), k.astype(np.float64), stride)
  for impl in ("shifted", "native", "fused"):
    out = jax.jit(lambda a, b: depthwise.depthwise_conv(a, b, stride, impl=impl))(x, k)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

  def loss(impl):
    return lambda a, b: jnp.sum(jnp.sin(depthwise.depthwise_conv(a, b, stride, impl=impl)))

  gs = jax.grad(loss("shifted"), argnums=(0, 1))(x, k)
  gn = jax.grad(loss("native"), argnums=(0, 1))(x, k)
  for a, b in zip(gs, gn):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ksize,stride,padding,size", [
    (3, 1, None, 7), (3, 2, None, 8), (3, 2, None, 7), (3, 3, None, 10), (5, 1, None, 6),
    (5, 2, 2, 9), (3, 1, 0, 6), (3, 2, 0, 9), (5, 1, 1, 7), (3, 1, 2, 5), (7, 1, 0, 7)])
@pytest.mark.parametrize("impl", ["shifted", "native", "fused"])
def test_gradients_match_float64_numpy(impl, ksize, stride, padding, size):
  """dL/dx and dL/dK of L = sum(out * g) against the scatter reference, for odd and even sizes,
  strides up to 3, kernels 3-7 and paddings from none to more than the kernel needs (the
  shifted VJP's interleaved zeros, overlaps and all-padding taps)."""
  rng = np.random.default_rng(ksize * 100 + stride * 10 + size)
  x = rng.normal(size=(4, size, size + 1, 3))
  k = rng.normal(size=(ksize, ksize, 1, 3))
  out = numpy_depthwise(x, k, stride, padding)
  g = rng.normal(size=out.shape)
  dx_ref, dk_ref = numpy_depthwise_grads(x, k, g, stride, padding)
  f = jax.jit(lambda a, b: depthwise.depthwise_conv(a, b, stride, padding, impl=impl))
  np.testing.assert_allclose(f(x.astype(np.float32), k.astype(np.float32)), out, rtol=1e-5,
                             atol=1e-5)
  _, vjp = jax.vjp(f, jnp.float32(x), jnp.float32(k))
  dx, dk = vjp(jnp.float32(g))
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_shifted_kernel_gradient_chunking_is_exact(stride):
  """Every batch chunk of both kernel-gradient forms (fused for stride 1, per tap otherwise)
  against the float64 scatter reference."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 6, 7, 4))
  k = rng.normal(size=(3, 3, 1, 4))
  g = rng.normal(size=numpy_depthwise(x, k, stride).shape)
  _, dk_ref = numpy_depthwise_grads(x, k, g, stride, None)
  for c in (1, 2, 4, 8, None):
    _, vjp = jax.vjp(functools.partial(depthwise.shifted_depthwise, jnp.float32(x), stride=stride,
                                       chunk=c), jnp.float32(k))
    np.testing.assert_allclose(vjp(jnp.float32(g))[0], dk_ref, rtol=1e-5, atol=1e-4,
                               err_msg=f"chunk={c}")


@pytest.mark.parametrize("stride", [1, 2])
def test_fused_form_lowers_for_cuda_without_loops(stride):
  """The GPU-shaped form's forward and both gradients, exported for CUDA on this CPU machine:
  no while loop (the CPU form's batch chunks would be serial kernels), no grouped convolution."""
  x = jax.ShapeDtypeStruct((8, 16, 16, 32), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 1, 32), jnp.float32)

  def step(a, b):
    out, vjp = jax.vjp(lambda u, v: depthwise.depthwise_conv(u, v, stride, impl="fused"), a, b)
    return out, vjp(jnp.ones_like(out))
  text = jax.export.export(jax.jit(step), platforms=["cuda"])(x, k).mlir_module()
  assert "stablehlo.while" not in text and "feature_group_count" not in text
  assert "stablehlo.reduce" in text
  # The CPU form does loop (a check that the test can see a loop where one is).
  cpu = jax.export.export(jax.jit(lambda a, b: jax.vjp(
      lambda u, v: depthwise.shifted_depthwise(u, v, stride, chunk=2), a, b)[1](
          jnp.ones((8, 16 // stride, 16 // stride, 32)))), platforms=["cuda"])(x, k).mlir_module()
  assert "stablehlo.while" in cpu
