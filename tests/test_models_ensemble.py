"""faceens.models.ensemble: K members by vmap or unrolled, and E(x)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceens.models import ensemble
from faceens.models.mobilefacenet import MobileFaceNet
from tests.builders import TINY


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
