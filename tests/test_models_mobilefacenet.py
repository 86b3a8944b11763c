"""faceens.models.mobilefacenet (and get_model): shapes, parameter count, PReLU, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceens.models.mobilefacenet import MobileFaceNet, PReLU
from tests.builders import TINY


def test_prelu_is_per_channel_at_025():
  m = PReLU()
  x = jnp.asarray([[-2.0, 1.0, -4.0]])
  v = m.init(jax.random.PRNGKey(0), x)
  chex.assert_shape(v["params"]["slope"], (3,))
  np.testing.assert_allclose(v["params"]["slope"], 0.25)
  slope = jnp.asarray([0.1, 0.2, 0.3])
  np.testing.assert_allclose(m.apply({"params": {"slope": slope}}, x), [[-0.2, 1.0, -1.2]], rtol=1e-6)


@pytest.mark.parametrize("head,size", [("gdc", 32), ("bn_dropout_fc_bn", 64)])
def test_mobilefacenet_shapes_and_dtypes(head, size, fast_compile):
  m = MobileFaceNet(head=head, **TINY)
  x = jnp.zeros((2, size, size, 3))
  v = jax.jit(m.init)({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x)
  out = jax.jit(m.apply)(v, x)
  chex.assert_shape(out, (2, 16))
  chex.assert_type(out, jnp.float32)
  out, upd = jax.jit(lambda vv, xx: m.apply(vv, xx, train=True, rngs={"dropout": jax.random.PRNGKey(2)},
                                            mutable=["batch_stats"]))(v, x)
  chex.assert_shape(out, (2, 16))
  assert set(upd) == {"batch_stats"}
  mb = MobileFaceNet(head=head, dtype=jnp.bfloat16, **TINY)
  out_bf16 = jax.jit(mb.apply)(v, x)
  chex.assert_type(out_bf16, jnp.float32)
  np.testing.assert_allclose(out_bf16, out_f32 := jax.jit(m.apply)(v, x), rtol=0.1, atol=0.1 * float(jnp.std(out_f32)))


def test_full_width_parameter_count():
  """Width 1, blocks (1, 4, 6, 2), GDC head, d = 512: Chen et al.'s MobileFaceNet."""
  m = MobileFaceNet()
  v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3))))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))
  # Conv/dense weights + BN scale/bias + PReLU slopes, counted by hand from the layer table
  # (InsightFace's mxnet MobileFaceNet reports 0.99M without BN/PReLU and with d = 128 after GDC).
  assert n == 1_339_264


def test_bad_input_shapes():
  m = MobileFaceNet(**TINY)
  with pytest.raises(ValueError, match="multiples of 16"):
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 30, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))


def test_model_impls_agree():
  x = jax.random.uniform(jax.random.PRNGKey(3), (2, 32, 32, 3))
  a = MobileFaceNet(depthwise_impl="shifted", **TINY)
  b = MobileFaceNet(depthwise_impl="native", **TINY)
  v = jax.jit(a.init)(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(jax.jit(a.apply)(v, x), jax.jit(b.apply)(v, x), rtol=1e-4, atol=1e-4)
