"""faceens.models.pointwise: the GEMM forms (1x1 and patch convs) equal plain autodiff and float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceens import configs, models
from faceens.models import ensemble, pointwise
from tests.references import float32_rounding, numpy_conv, numpy_conv_grads


def test_dot_vjp_matches_dot_and_numpy_forward_and_gradients():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 4, 6))
  w = rng.normal(size=(6, 7))
  dy = rng.normal(size=(3, 5, 4, 7))  # the cotangent: loss = sum(dy * conv(x, w))
  ref_y = np.einsum("nhwi,io->nhwo", x, w)
  ref_dx = np.einsum("nhwo,io->nhwi", dy, w)
  ref_dw = np.einsum("nhwi,nhwo->io", x, dy)
  for impl in ("dot", "dot_vjp"):
    f = lambda a, b: jnp.sum(jnp.asarray(dy, jnp.float32) * pointwise.pointwise_conv(a, b, impl))  # noqa: E731,B023
    xs, ws = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    np.testing.assert_allclose(pointwise.pointwise_conv(xs, ws, impl), ref_y, rtol=1e-5, atol=1e-5)
    dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(xs, ws)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-4)
  # bf16 compute, jitted (XLA:CPU has no bf16 x bf16 -> f32 dot: the operands are widened): the
  # kernel gradient is the float32 sum over N*H*W of the bf16 operands, rounded once to bf16.
  x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  _, dw16 = jax.jit(jax.grad(lambda a, b: jnp.sum(pointwise.pointwise_conv(a, b, "dot_vjp")),
                             argnums=(0, 1)))(x16, w16)
  assert dw16.dtype == jnp.bfloat16
  xr = np.asarray(x16, np.float64)
  ref16 = np.einsum("nhwi,nhwo->io", xr, np.ones(dy.shape))
  n = x.size // x.shape[-1]  # terms per sum
  bound = 2.0 ** -8 * np.abs(ref16) + n * 2.0 ** -24 * np.abs(xr).sum(axis=(0, 1, 2))[:, None]
  assert np.all(np.abs(np.asarray(dw16, np.float64) - ref16) <= bound)


@pytest.mark.parametrize("ksize,stride,size", [(3, 2, 8), (3, 2, 7), (3, 1, 6), (5, 2, 9)])
def test_patch_conv_matches_numpy_forward_and_gradients(ksize, stride, size):
  rng = np.random.default_rng(ksize + stride + size)
  x = rng.normal(size=(2, size, size + 1, 3))
  k = rng.normal(size=(ksize, ksize, 3, 4))
  pad = (ksize - 1) // 2
  ref = numpy_conv(x, k, stride, pad)
  dy = rng.normal(size=ref.shape)
  ref_dx, ref_dk = numpy_conv_grads(x, k, dy, stride, pad)
  for impl in ("dot", "dot_vjp"):
    f = jax.jit(lambda a, b, impl=impl: pointwise.patch_conv(a, b, stride, pad, impl))
    xs, ks = jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32)
    y, vjp = jax.vjp(f, xs, ks)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    dx, dk = vjp(jnp.asarray(dy, jnp.float32))
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-4)
  # bf16 under jit: the kernel gradient's float32 sums of the bf16 operands, rounded to bf16.
  x16, k16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
  dy16 = jnp.asarray(dy, jnp.bfloat16)
  _, vjp = jax.vjp(jax.jit(lambda a, b: pointwise.patch_conv(a, b, stride, pad, "dot_vjp")), x16, k16)
  _, dk16 = jax.jit(vjp)(dy16)
  assert dk16.dtype == jnp.bfloat16
  xr, dyr = np.asarray(x16, np.float64), np.asarray(dy16, np.float64)
  _, ref16 = numpy_conv_grads(xr, np.asarray(k16, np.float64), dyr, stride, pad)
  _, mag = numpy_conv_grads(np.abs(xr), np.abs(np.asarray(k16, np.float64)), np.abs(dyr), stride, pad)
  n = dy.size // dy.shape[-1]
  assert np.all(np.abs(np.asarray(dk16, np.float64) - ref16) <= 2.0 ** -8 * np.abs(ref16) + n * 2.0 ** -24 * mag)


def test_network_gradients_agree_between_impls():
  """The test network's parameter gradients with each 1x1 form: in float64 the same to 1e-7, in
  float32 each within float32 rounding of float64."""
  c = configs.experiment("arcface_srv_fdp", "test")
  c.model.batchnorm_impl = "flax"
  x = np.random.default_rng(1).uniform(-1, 1, size=(4, 32, 32, 3))
  v1 = jax.tree.map(np.asarray, ensemble.member(ensemble.init_members(
      models.get_model(c), jax.random.PRNGKey(0), 1, jnp.zeros((1, 32, 32, 3))), 0))

  def grads(impl, dtype):
    c.model.pointwise_impl = impl
    model = models.get_model(c).clone(dtype=dtype)
    v = jax.tree.map(lambda a: jnp.asarray(a, dtype), v1)

    def loss(params):
      out, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]},
                           jnp.asarray(x, dtype), train=True,
                           rngs={"dropout": jax.random.PRNGKey(2)}, mutable=["batch_stats"])
      return jnp.sum(jnp.square(out))
    return [np.asarray(g, np.float64) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(v["params"]))]
  with jax.enable_x64(True):
    ref, vjp64 = grads("dot", jnp.float64), grads("dot_vjp", jnp.float64)
  # This loss (sum of squared BN outputs) gives gradients whose terms cancel, so a leaf's own
  # value can be far below the terms it sums: float32 rounding is bounded against the tree's
  # largest gradient, eps * sqrt(n) * depth (random-walk rounding of the longest reduction, the
  # stem's 4 * 16 * 16 positions, compounded through the layers), as in
  # tests/test_models_batchnorm.py.
  big = max(float(np.abs(g).max()) for g in ref)
  floor = float32_rounding(16, 4 * 16 * 16)
  for r, a in zip(ref, vjp64):
    np.testing.assert_allclose(a, r, rtol=1e-7, atol=1e-9 * big)
  for impl in ("dot", "dot_vjp"):
    for i, (r, a) in enumerate(zip(ref, grads(impl, jnp.float32))):
      assert np.abs(a - r).max() <= floor * big, (impl, i, np.abs(a - r).max() / big, floor)
