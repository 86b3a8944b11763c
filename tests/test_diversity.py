"""ADP and FDP against numpy (np.linalg.slogdet), finite differences, and identical members."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceens import diversity, losses
from tests.references import EPS, np_adp, np_fdp


def _probs(rng, k, b, n):
  z = rng.normal(size=(k, b, n))
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_fdp_matches_numpy():
  f = np.random.default_rng(0).normal(size=(3, 6, 16))
  np.testing.assert_allclose(diversity.fdp(jnp.asarray(f, jnp.float32), 10.0),
                             np_fdp(f, 10.0), rtol=1e-4, atol=1e-4)


def test_adp_matches_numpy():
  rng = np.random.default_rng(1)
  p = _probs(rng, 3, 6, 10)
  y = rng.integers(0, 10, size=6)
  np.testing.assert_allclose(diversity.adp(jnp.asarray(p, jnp.float32), jnp.asarray(y), 2.0, 0.5),
                             np_adp(p, y, 2.0, 0.5), rtol=1e-4, atol=1e-4)


def _fd_check(fn, x, eps=1e-5, n_dirs=3, seed=0):
  """Directional derivatives of fn (float64 under enable_x64) vs central differences."""
  g = jax.grad(fn)(x)
  rng = np.random.default_rng(seed)
  for _ in range(n_dirs):
    v = jnp.asarray(rng.normal(size=x.shape))
    fd = (fn(x + eps * v) - fn(x - eps * v)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-6, atol=1e-8)


def test_fdp_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    f = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 8)), jnp.float64)
    _fd_check(lambda z: jnp.sum(diversity.fdp(z, 10.0)), f)


def test_adp_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(3, 4, 7)), jnp.float64)
    y = jnp.asarray(rng.integers(0, 7, size=4))
    _fd_check(lambda z: jnp.sum(diversity.adp(jax.nn.softmax(z), y, 2.0, 10.0)), logits)


@pytest.mark.parametrize("method", ["adp", "fdp", "srv_adp", "srv_fdp"])
def test_identical_members_stay_finite(method):
  """All members equal: Gram all-ones (rank 1); the ridge keeps loss and gradients finite."""
  one = np.random.default_rng(4).normal(size=(1, 5, 8)).astype(np.float32)
  f = jnp.asarray(np.repeat(one, 3, axis=0))
  srv = method.startswith("srv")
  w = jnp.asarray(np.random.default_rng(5).normal(size=(8, 6) if srv else (3, 8, 6)), jnp.float32)
  if not srv:
    w = jnp.broadcast_to(w[:1], w.shape)
  y = jnp.asarray([0, 1, 2, 3, 4])
  cfg = losses.LossConfig(method=method, fdp_gamma=10.0, adp_beta=0.5)
  fn = lambda f_, w_: losses.ensemble_loss(f_, w_, y, cfg)[0]  # noqa: E731
  val = fn(f, w)
  gf, gw = jax.grad(fn, argnums=(0, 1))(f, w)
  assert np.isfinite(float(val))
  assert np.all(np.isfinite(gf)) and np.all(np.isfinite(gw))
  # The log-det of an all-ones Gram: det = eps^(K-1) (K + eps). Checked in float64: there the
  # Gram's entries err by ~10 float64 eps (normalising, a dot of 8 terms), which moves the two
  # eigenvalues of size eps by ~2e-15 / 1e-6 relative, so the log-det by ~1e-8 at most. (In
  # float32 the same rounding, ~1e-7 per entry, is a tenth of the ridge: the log-det is then only
  # known to ~1, and the finiteness above is what float32 must give.)
  if method.endswith("fdp"):
    with jax.enable_x64(True):
      np.testing.assert_allclose(diversity.fdp(jnp.asarray(f, jnp.float64), 1.0),
                                 2 * np.log(EPS) + np.log(3 + EPS), rtol=0, atol=1e-8)
