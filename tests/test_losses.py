"""Method losses against numpy, and the MTER triplet term."""

import jax.numpy as jnp
import numpy as np
import pytest

from faceens import losses
from tests.references import np_adp, np_ce, np_fdp, numpy_logits


def _setup(srv, k=3, b=6, d=8, n=5, seed=0):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(k, b, d))
  w = rng.normal(size=(d, n) if srv else (k, d, n))
  y = rng.integers(0, n, size=b)
  return f, w, y


@pytest.mark.parametrize("method", ["single", "baseline", "adp", "fdp", "srv", "srv_adp", "srv_fdp"])
@pytest.mark.parametrize("loss,m", [("arcface", 0.5), ("cosface", 0.35)])
def test_method_loss_matches_numpy(method, loss, m):
  spec = losses.method_spec(method)
  f, w, y = _setup(spec.srv, k=1 if spec.single else 3)
  cfg = losses.LossConfig(method=method, loss=loss, scale=16.0, margin=m, adp_alpha=2.0,
                          adp_beta=0.5, fdp_gamma=10.0)
  total, aux = losses.ensemble_loss(jnp.asarray(f, jnp.float32), jnp.asarray(w, jnp.float32),
                                    jnp.asarray(y), cfg)
  fn = f / np.linalg.norm(f, axis=-1, keepdims=True)
  wk = [w if spec.srv else w[k] for k in range(len(f))]
  cos = np.stack([fn[k] @ (wk[k] / np.linalg.norm(wk[k], axis=0)) for k in range(len(f))])
  ce = sum(np_ce(numpy_logits(cos[k:k + 1], y, loss, 16.0, m)[0], y) for k in range(len(f)))
  reg = 0.0
  if spec.regularizer == "fdp":
    reg = np.mean(np_fdp(f, 10.0))
  elif spec.regularizer == "adp":
    z = 16.0 * cos  # ADP on the cosine logits (default adp_logits="cosine")
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    reg = np.mean(np_adp(p, y, 2.0, 0.5))
  np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-4)
  np.testing.assert_allclose(float(total), ce - reg, rtol=1e-4, atol=1e-4)


def test_unknown_method_is_a_clear_error():
  with pytest.raises(ValueError, match=r"unknown method 'srv_fdb'; valid: single, baseline, adp"):
    losses.LossConfig(method="srv_fdb")


def test_mter_loss_matches_numpy():
  rng = np.random.default_rng(0)
  a, s, t = (rng.normal(size=(6, 8)) for _ in range(3))
  valid = np.array([1, 1, 0, 1, 1, 1], np.float32)
  n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  per = np.maximum(np.linalg.norm(n(a) - n(s), axis=-1) - np.linalg.norm(n(a) - n(t), axis=-1) + 0.6, 0)
  ref = np.sum(per * valid) / valid.sum()
  got = losses.mter_loss(*(jnp.asarray(x, jnp.float32) for x in (a, s, t)), 0.6, jnp.asarray(valid))
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_advt_loss_targets_next_example_and_masks_same_identity():
  rng = np.random.default_rng(1)
  pixels = rng.uniform(size=(5, 4, 4, 3))
  proj = rng.normal(size=(48, 6))
  labels = np.array([0, 0, 1, 2, 2])
  feat = lambda x: x.reshape(len(x), -1) @ proj  # noqa: E731  a linear "network"
  f_src = feat(pixels)
  # craft: a fixed move of every face halfway towards its target's pixels (np.roll by one)
  x_adv = 0.5 * (pixels + np.roll(pixels, 1, axis=0))
  n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  a, s, t = n(feat(x_adv)), n(f_src), n(np.roll(f_src, 1, axis=0))
  per = np.maximum(np.linalg.norm(a - s, axis=-1) - np.linalg.norm(a - t, axis=-1) + 0.6, 0)
  # example b's target is example b - 1 (b = 0: the last); labels 0,0,1,2,2 against 2,0,0,1,2
  valid = np.array([1, 0, 1, 1, 0])
  ref = 2.0 * np.sum(per * valid) / valid.sum()
  seen = []

  def craft(p, f_tar):
    seen.append(np.asarray(f_tar))
    return 0.5 * (p + jnp.roll(p, 1, axis=0))

  got = losses.advt_loss(craft, lambda x: x.reshape(len(x), -1) @ jnp.asarray(proj, jnp.float32),
                         jnp.asarray(pixels, jnp.float32), jnp.asarray(f_src, jnp.float32),
                         jnp.asarray(labels), 0.6, 2.0)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  np.testing.assert_allclose(seen[0], np.roll(f_src, 1, axis=0), rtol=1e-5)
