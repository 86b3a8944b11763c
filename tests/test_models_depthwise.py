"""faceens.models.depthwise: every implementation against numpy, forward and kernel gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceens.models import depthwise
from tests.references import numpy_depthwise


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_depthwise_impls_match_numpy_and_each_other(stride, size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, size, size, 5)).astype(np.float32)
  k = rng.normal(size=(3, 3, 1, 5)).astype(np.float32)
  ref = numpy_depthwise(x.astype(np.float64), k.astype(np.float64), stride)
  for impl in ("shifted", "native"):
    out = jax.jit(lambda a, b: depthwise.depthwise_conv(a, b, stride, impl=impl))(x, k)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

  def loss(impl):
    return lambda a, b: jnp.sum(jnp.sin(depthwise.depthwise_conv(a, b, stride, impl=impl)))

  gs = jax.grad(loss("shifted"), argnums=(0, 1))(x, k)
  gn = jax.grad(loss("native"), argnums=(0, 1))(x, k)
  for a, b in zip(gs, gn):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_shifted_kernel_gradient_chunking_is_exact():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 6, 6, 4)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32)
  grads = [jax.grad(lambda kk: jnp.sum(depthwise.shifted_depthwise(x, kk, 1, chunk=c) ** 2))(k)
           for c in (1, 2, 8, None)]
  for g in grads[1:]:
    np.testing.assert_allclose(g, grads[0], rtol=1e-5)


def test_unknown_depthwise_impl():
  with pytest.raises(ValueError, match="unknown depthwise implementation 'cudnn'; valid: auto"):
    depthwise.resolve_impl("cudnn")
