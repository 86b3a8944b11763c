"""LOTS attacks: closed forms on a linear embedding, early stop, projections, sharding, CLI, plots."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import faceens
from faceens import api, configs, train
from faceens.attacks import lots
from tests.builders import attack_faces
from tests.conftest import run_on_simulated_devices


def linear_apply(variables, x):
  """A linear 'feature extractor' [B, 2, 2, 1] -> [1, B, 4]: E(x) = x W (no normalisation)."""
  return (x.reshape(x.shape[0], -1) @ variables["W"])[None]


ID = {"W": jnp.eye(4)}


def test_ifgsm_on_identity_embedding_matches_closed_form():
  # E(x) = x, x0 = 0, target t = 0.5 * 1: every sign step moves all 4 pixels by a = 1/64 towards
  # 0.5, so after n steps dist = 2 (0.5 - n a); the first n with dist < goal is the stop.
  a = 1 / 64
  x0 = np.zeros((3, 2, 2, 1), np.float32)
  t = np.full((3, 4), 0.5, np.float32)
  goals = np.array([0.05, 0.3, 0.6], np.float32)
  cfg = lots.AttackConfig(method="ifgsm", step_size=a, max_iters=1000)
  r = lots.attack(linear_apply, ID, x0, t, goals, cfg)
  n = np.floor((0.5 - goals / 2) / a).astype(int) + 1
  np.testing.assert_array_equal(r["iterations"], n)
  np.testing.assert_array_equal(r["x_adv"].reshape(3, 4), np.repeat(n[:, None] * a, 4, 1))
  np.testing.assert_allclose(r["distance"], 2 * (0.5 - n * a), rtol=1e-6)
  assert r["success"].all()
  np.testing.assert_allclose(r["l2"], 2 * n * a, rtol=1e-6)
  np.testing.assert_allclose(r["linf"], n * a, rtol=1e-6)


def test_lots_step_moves_along_the_target_direction():
  # Gradient 2 (x - t) with x on the segment [0, t]: LOTS scales it to max-norm a, so
  # x_n = n a t / max(t) until the goal; the direction never changes.
  a = 1 / 128
  t = np.array([[0.4, 0.2, 0.1, 0.0]], np.float32)
  goal = 0.05
  r = lots.attack(linear_apply, ID, np.zeros((1, 2, 2, 1), np.float32), t, goal,
                  lots.AttackConfig(method="lots", step_size=a, max_iters=1000))
  norm_t = np.linalg.norm(t)
  # dist after n steps = |t| (1 - n a / 0.4)
  n = int(np.floor((1 - goal / norm_t) * 0.4 / a)) + 1
  assert r["iterations"][0] == n
  np.testing.assert_allclose(r["x_adv"].reshape(1, 4), n * a * t / 0.4, rtol=1e-5, atol=1e-7)


def test_done_examples_stay_bit_identical():
  rng = np.random.default_rng(0)
  w = {"W": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}
  x0 = rng.uniform(0.3, 0.7, (4, 2, 2, 1)).astype(np.float32)
  t = rng.normal(size=(4, 4)).astype(np.float32)
  goals = np.array([1e-9, 1e-9, 10.0, 10.0], np.float32)  # 2, 3 done at once; 0, 1 never
  goals[2] = float(np.linalg.norm(x0[2].reshape(-1) @ np.asarray(w["W"]) - t[2])) * 0.9
  long = lots.attack(linear_apply, w, x0, t, goals, lots.AttackConfig(
      method="ifgsm", step_size=0.01, max_iters=60))
  k2 = int(long["iterations"][2])
  assert long["success"][2] and 1 <= k2 < 30
  short = lots.attack(linear_apply, w, x0, t, goals, lots.AttackConfig(
      method="ifgsm", step_size=0.01, max_iters=k2 + 2))
  assert short["iterations"][3] == 0 and (short["x_adv"][3] == x0[3]).all()
  np.testing.assert_array_equal(long["x_adv"][2:], short["x_adv"][2:])
  np.testing.assert_array_equal(long["iterations"][2:], short["iterations"][2:])
  assert not np.array_equal(long["x_adv"][0], short["x_adv"][0])
  assert (long["iterations"][:2] == 60).all() and not long["success"][:2].any()


@pytest.fixture(scope="module")
def small_model():
  """An initialised (untrained) test-size ensemble; attacks do not need a good model."""
  c = configs.experiment("arcface_srv_fdp", "test")
  state = train.create_train_state(c, 30, train.make_optimizer(c, 10))
  return api.FaceModel(c, {"params": state.params["backbone"], "batch_stats": state.batch_stats})


def test_bim_stays_in_the_eps_ball_and_success_agrees_with_reembedding(small_model):
  xs, xt = attack_faces(small_model)
  t = small_model.embed(xt)
  d0 = np.linalg.norm(small_model.embed(xs) - t, axis=1)
  eps = 0.03
  cfg = lots.AttackConfig(method="bim", step_size=0.01, epsilon=eps, max_iters=40)
  r = lots.attack(small_model.apply, small_model.variables, xs, t, 0.6 * d0, cfg)
  delta = r["x_adv"] - xs
  assert np.abs(delta).max() <= eps + 1e-6
  assert r["x_adv"].min() >= 0 and r["x_adv"].max() <= 1
  assert np.isclose(np.abs(delta).max(), eps, atol=1e-6)  # the ball is actually reached
  d = np.linalg.norm(small_model.embed(r["x_adv"]) - t, axis=1)
  np.testing.assert_allclose(d, r["distance"], atol=1e-4)
  margin = np.abs(d - 0.6 * d0) > 1e-4
  np.testing.assert_array_equal((d < 0.6 * d0)[margin], r["success"][margin])
  assert r["success"].any()


def test_cw_perturbs_less_than_ifgsm(run_dir):
  model = faceens.load(run_dir)
  xs, xt = attack_faces(model, n=8, seed=1)
  t = model.embed(xt)
  goal = 0.5 * np.linalg.norm(model.embed(xs) - t, axis=1)
  out = {}
  for m in ("ifgsm", "cw"):
    out[m] = lots.attack(model.apply, model.variables, xs, t, goal,
                         lots.AttackConfig(method=m, max_iters=300))
    assert out[m]["success"].all(), m
  assert np.median(out["cw"]["l2"]) < np.median(out["ifgsm"]["l2"])


def test_members_objective_and_pgd_restarts(small_model):
  xs, xt = attack_faces(small_model, n=4)
  feats = small_model.member_features(xt)
  t = feats.mean(0)
  goal = 0.7 * np.linalg.norm(small_model.embed(xs) - t, axis=1)
  r = lots.attack(small_model.apply, small_model.variables, xs, feats, goal,
                  lots.AttackConfig(method="ifgsm", objective="members", max_iters=200))
  assert r["success"].all()
  cfg = lots.AttackConfig(method="pgd", epsilon=0.05, max_iters=50, restarts=3)
  one = lots.attack_with_restarts(small_model.apply, small_model.variables, xs, t, goal,
                                  lots.AttackConfig(method="pgd", epsilon=0.05, max_iters=50))
  three = lots.attack_with_restarts(small_model.apply, small_model.variables, xs, t, goal, cfg)
  assert (three["success"] >= one["success"]).all()
  both = one["success"] & three["success"]
  assert (three["l2"][both] <= one["l2"][both] + 1e-6).all()
  assert np.abs(three["x_adv"] - xs).max() <= 0.05 + 1e-6


def test_l2_projection_matches_numpy():
  rng = np.random.default_rng(0)
  x_src = rng.uniform(0, 1, (5, 2, 2, 1)).astype(np.float32)
  x = (x_src + rng.normal(0, 0.4, x_src.shape)).astype(np.float32)
  x[0] = x_src[0] + 0.01  # inside the ball: only the [0, 1] clip applies
  cfg = lots.AttackConfig(method="pgd_l2", epsilon=0.3)
  got = np.asarray(lots.project(jnp.asarray(x_src), jnp.asarray(x), cfg, "l2"))
  d = (x - x_src).reshape(5, -1).astype(np.float64)
  n = np.linalg.norm(d, axis=1, keepdims=True)
  want = np.clip(x_src.reshape(5, -1) + d * np.minimum(1.0, 0.3 / n), 0, 1).reshape(x.shape)
  # float32 rounding of a 4-element norm and one multiply: a few eps of values <= 1.
  np.testing.assert_allclose(got, want, atol=8 * np.finfo(np.float32).eps)
  assert (np.linalg.norm((got - x_src).reshape(5, -1), axis=1) <= 0.3 * (1 + 1e-6)).all()


def test_pgd_l2_converges_to_the_closest_point_of_the_ball():
  # E(x) = x, target t out of reach: the loss ||x - t||^2 over the L2 ball of radius eps around
  # x_s is smallest at x* = x_s + eps (t - x_s) / ||t - x_s||; normalised steps of eps / 4 from
  # any random start move along the sphere towards it and stay there (a fixed point).
  eps = 0.1
  x_src = np.full((3, 2, 2, 1), 0.5, np.float32)
  t = np.array([[0.9, 0.5, 0.3, 0.6], [0.1, 0.1, 0.9, 0.9], [0.5, 0.5, 0.5, 0.95]], np.float32)
  cfg = lots.AttackConfig(method="pgd_l2", epsilon=eps, step_size=eps / 4, max_iters=300)
  r = lots.attack(linear_apply, ID, x_src, t, 0.01, cfg)
  u = (t - 0.5) / np.linalg.norm(t - 0.5, axis=1, keepdims=True)
  np.testing.assert_allclose(r["x_adv"].reshape(3, 4), 0.5 + eps * u, atol=1e-5)
  assert not r["success"].any() and (r["iterations"] == 300).all()
  np.testing.assert_allclose(r["distance"], np.linalg.norm(t - 0.5, axis=1) - eps, atol=1e-5)
  assert (r["l2"] <= eps * (1 + 1e-6)).all()
  # The random starts (a goal of inf is met before the first step): inside the ball, distinct.
  starts = lots.attack(linear_apply, ID, x_src, t, np.inf, cfg, key=jax.random.PRNGKey(3))
  assert (starts["iterations"] == 0).all() and (starts["l2"] <= eps * (1 + 1e-6)).all()
  assert (starts["l2"] > 0).all() and len(np.unique(starts["x_adv"].reshape(3, 4), axis=0)) == 3


def test_tau_curve_is_eq1_and_monotone():
  l2 = np.array([0.5, 1.0, 2.0, 3.0])
  success = np.array([True, True, False, True])
  curve = lots.tau_curve(l2, success, taus=[0.4, 0.6, 1.5, 2.5, 3.5])
  # Eq. 1 divides by |AX|, the 3 successful examples (the failed one at L2 2.0 is not in AX).
  assert curve == [(0.4, 0.0), (0.6, 1 / 3), (1.5, 2 / 3), (2.5, 2 / 3), (3.5, 1.0)]
  assert lots.tau_curve(l2, np.zeros(4, bool)) == []
  with pytest.raises(ValueError, match="same shape"):
    lots.tau_curve(l2, success[:3])
  rng = np.random.default_rng(0)
  rates = [r for _, r in lots.tau_curve(rng.exponential(size=200), rng.random(200) < 0.8)]
  assert all(b >= a for a, b in zip(rates, rates[1:])) and rates[0] == 0.0


SHARDED = textwrap.dedent("""
    import sys, jax, numpy as np
    from faceens import api, configs, sharding, train
    from faceens.attacks import lots
    from tests.builders import attack_faces
    c = configs.experiment("arcface_srv_fdp", "test")
    # The CPU kernels: per-example float results do not depend on the batch split (with XLA's
    # vmapped members, sharding changes the rounding and a sign step can flip at a gradient ~0).
    c.model.depthwise_impl = c.model.pointwise_impl = c.ensemble.strategy = "auto"
    state = train.create_train_state(c, 30, train.make_optimizer(c, 10))
    m = api.FaceModel(c, {"params": state.params["backbone"], "batch_stats": state.batch_stats})
    xs, xt = attack_faces(m, n=8)
    t = m.embed(xt)
    goal = 0.6 * np.linalg.norm(m.embed(xs) - t, axis=1)
    mesh = sharding.make_mesh() if jax.device_count() > 1 else None
    r = lots.attack(m.apply, m.variables, xs, t, goal, lots.AttackConfig(max_iters=30), mesh=mesh)
    np.savez(sys.argv[1], n=jax.device_count(), **{k: v for k, v in r.items()})
""")


def test_four_simulated_devices_equal_one(tmp_path):
  outs = run_on_simulated_devices(SHARDED, (1, 4), tmp_path)
  assert int(outs[4]["n"]) == 4
  np.testing.assert_array_equal(outs[4]["iterations"], outs[1]["iterations"])
  np.testing.assert_array_equal(outs[4]["success"], outs[1]["success"])
  np.testing.assert_allclose(outs[4]["x_adv"], outs[1]["x_adv"], atol=1e-6)
