"""ArcFace / CosFace logits and SRV against a numpy reference, including edge angles."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceens import heads
from tests.references import numpy_logits


EDGE_ANGLES = [0.0, 1e-3, 0.5, math.pi / 2, math.pi - 0.5 - 1e-3, math.pi - 0.5 + 1e-3,
               math.pi - 1e-3, math.pi]


@pytest.mark.parametrize("loss,m", [("arcface", 0.5), ("cosface", 0.35)])
def test_margin_logits_match_numpy_at_edge_angles(loss, m):
  n = 4
  cos = np.random.default_rng(0).uniform(-1, 1, size=(2, len(EDGE_ANGLES), n)).astype(np.float32)
  labels = np.arange(len(EDGE_ANGLES)) % n
  for b, theta in enumerate(EDGE_ANGLES):
    cos[:, b, labels[b]] = math.cos(theta)
  got = jax.jit(lambda c: heads.margin_logits(c, jnp.asarray(labels), loss, 64.0, m))(cos)
  np.testing.assert_allclose(got, numpy_logits(cos, labels, loss, 64.0, m), rtol=1e-5, atol=2e-3)


def test_arcface_hand_values():
  # theta = pi/3, m = 0.5: s cos(pi/3 + 0.5) = 64 * cos(1.5471975511965976) = 1.5078...
  got = heads.margin_logits(jnp.asarray([[math.cos(math.pi / 3), 0.2]]), jnp.asarray([0]),
                            "arcface", 64.0, 0.5)
  np.testing.assert_allclose(got, [[64 * math.cos(math.pi / 3 + 0.5), 64 * 0.2]], rtol=1e-5)
  # theta = pi: fallback cos - m sin(pi - m) = -1 - 0.5 sin(pi - 0.5).
  got = heads.margin_logits(jnp.asarray([[-1.0, 0.0]]), jnp.asarray([0]), "arcface", 1.0, 0.5)
  np.testing.assert_allclose(got[0, 0], -1 - 0.5 * math.sin(math.pi - 0.5), rtol=1e-6)


def test_arcface_gradient_finite_at_cos_one():
  g = jax.grad(lambda c: jnp.sum(heads.margin_logits(c, jnp.asarray([0, 1]), "arcface", 64., 0.5)))(
      jnp.asarray([[1.0, 0.0], [0.3, -1.0]]))
  assert np.all(np.isfinite(g))


def test_cosines_per_member_and_srv():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(3, 5, 8)).astype(np.float32)
  w_srv = np.asarray(heads.init_class_weights(jax.random.PRNGKey(0), 3, 8, 7, srv=True))
  w_mem = np.asarray(heads.init_class_weights(jax.random.PRNGKey(0), 3, 8, 7, srv=False))
  chex.assert_shape(w_srv, (8, 7))  # SRV: exactly one [d, n] array for all members
  chex.assert_shape(w_mem, (3, 8, 7))
  f64 = f.astype(np.float64)
  fn = f64 / np.linalg.norm(f64, axis=-1, keepdims=True)
  # Cosines of float32 unit vectors in d = 8: two normalisations and a dot of d terms, each term
  # at most 1 in size, err by at most ~(d + 6) float32 eps (worst case, no cancellation needed).
  atol = (8 + 6) * float(np.finfo(np.float32).eps)
  w_srv64, w_mem64 = w_srv.astype(np.float64), w_mem.astype(np.float64)
  np.testing.assert_allclose(heads.cosines(f, w_srv),
                             fn @ (w_srv64 / np.linalg.norm(w_srv64, axis=0)), rtol=0, atol=atol)
  ref = np.stack([fn[k] @ (w_mem64[k] / np.linalg.norm(w_mem64[k], axis=0)) for k in range(3)])
  np.testing.assert_allclose(heads.cosines(f, w_mem), ref, rtol=0, atol=atol)


def test_unknown_loss():
  with pytest.raises(ValueError, match="unknown loss 'sphereface'; valid: arcface, cosface"):
    heads.margin_logits(jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), "sphereface", 64., .5)
