"""MobileFaceNet, depthwise implementations and the stacked-parameter ensemble."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceens.models import depthwise, ensemble
from faceens.models.mobilefacenet import MobileFaceNet, PReLU


def numpy_depthwise(x, k, stride):
  """Direct loop reference: out[b,h,w,c] = sum_ij xpad[b, h*s+i, w*s+j, c] k[i,j,0,c]."""
  kh, kw = k.shape[:2]
  ph, pw = (kh - 1) // 2, (kw - 1) // 2
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  oh = (x.shape[1] + 2 * ph - kh) // stride + 1
  ow = (x.shape[2] + 2 * pw - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, x.shape[3]))
  for h in range(oh):
    for w in range(ow):
      patch = xp[:, h * stride:h * stride + kh, w * stride:w * stride + kw, :]
      out[:, h, w, :] = np.einsum("bijc,ijc->bc", patch, k[:, :, 0, :])
  return out


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


def test_prelu_is_per_channel_at_025():
  m = PReLU()
  x = jnp.asarray([[-2.0, 1.0, -4.0]])
  v = m.init(jax.random.PRNGKey(0), x)
  chex.assert_shape(v["params"]["slope"], (3,))
  np.testing.assert_allclose(v["params"]["slope"], 0.25)
  slope = jnp.asarray([0.1, 0.2, 0.3])
  np.testing.assert_allclose(m.apply({"params": {"slope": slope}}, x), [[-0.2, 1.0, -1.2]], rtol=1e-6)


TINY = dict(width=0.125, blocks=(1, 1, 1, 1), embedding_dim=16)


@pytest.mark.parametrize("head,size", [("gdc", 32), ("bn_dropout_fc_bn", 64)])
def test_mobilefacenet_shapes_and_dtypes(head, size):
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


@pytest.mark.parametrize("train", [False, True])
def test_ensemble_vmap_equals_each_member_and_unrolled(train):
  m = MobileFaceNet(depthwise_impl="shifted", **TINY)
  x = jax.random.uniform(jax.random.PRNGKey(3), (4, 32, 32, 3))
  v = ensemble.init_members(m, jax.random.PRNGKey(0), 3, x[:1])
  chex.assert_tree_shape_prefix(v, (3,))
  rng = jax.random.PRNGKey(5) if train else None
  apply = jax.jit(lambda vv, xx, strategy: ensemble.apply_members(
      m, vv, xx, train=train, rng=rng, strategy=strategy), static_argnums=2)
  out_v = apply(v, x, "vmap")
  out_u = apply(v, x, "unrolled")
  feats_v = out_v[0] if train else out_v
  feats_u = out_u[0] if train else out_u
  chex.assert_shape(feats_v, (3, 4, 16))
  np.testing.assert_allclose(feats_v, feats_u, rtol=1e-4, atol=1e-4)
  if train:
    chex.assert_trees_all_close(out_v[1], out_u[1], rtol=1e-4, atol=1e-4)
  # Members differ (independent keys), and each equals applying that member alone.
  assert not np.allclose(feats_v[0], feats_v[1])
  for k in range(3):
    vk = ensemble.member(v, k)
    if train:
      alone = jax.jit(lambda vv: m.apply(vv, x, train=True, rngs={"dropout": jax.random.fold_in(rng, k)},
                                         mutable=["batch_stats"])[0])(vk)
    else:
      alone = jax.jit(m.apply)(vk, x)
    np.testing.assert_allclose(feats_v[k], alone, rtol=1e-4, atol=1e-4)


def test_ensemble_embedding_is_mean_of_normalized():
  f = np.random.default_rng(0).normal(size=(3, 5, 8))
  f_tilde = f / np.linalg.norm(f, axis=-1, keepdims=True)
  ref = (f_tilde[0] + f_tilde[1] + f_tilde[2]) / 3  # E(x) = (1/K) sum_k f~_k, not renormalised
  normalized = ensemble.l2_normalize(jnp.asarray(f, jnp.float32))
  np.testing.assert_allclose(ensemble.ensemble_embedding(normalized), ref, rtol=1e-5)
  np.testing.assert_allclose(ensemble.ensemble_embedding(f_tilde), ref, rtol=1e-12)  # numpy in, out
  assert isinstance(ensemble.ensemble_embedding(f_tilde), np.ndarray)
  with pytest.raises(AssertionError, match="rank"):
    ensemble.ensemble_embedding(f_tilde[0])


def test_unknown_strategy():
  with pytest.raises(ValueError, match="unknown ensemble strategy 'pmap'"):
    ensemble.resolve_strategy("pmap")
