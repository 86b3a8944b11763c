"""faceens.models.batchnorm: the fused BatchNorm + PReLU against float64 numpy (forward, and its
VJP against central differences) and against Flax's BatchNorm + PReLU (variables, running
averages, outputs, gradients; one layer and the whole network)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceens import configs, models
from faceens.models import batchnorm, ensemble
from faceens.models.mobilefacenet import PReLU
from tests.references import float32_rounding

EPS = 1e-5


def np_bn_act(x, scale, bias, slope, eps=EPS):
  """float64 reference: biased batch variance over all axes but the last, then PReLU."""
  axes = tuple(range(x.ndim - 1))
  mean, var = x.mean(axes), x.var(axes)
  z = (x - mean) / np.sqrt(var + eps) * scale + bias
  return (z if slope is None else np.where(z >= 0, z, slope * z)), mean, var


def _inputs(shape, seed=0, offset=0.5):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = rng.normal(size=shape) * 2 + offset
  return x, rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.uniform(0.1, 0.4, c)


@pytest.mark.parametrize("act", [True, False])
def test_forward_matches_float64_numpy(act):
  x, scale, bias, slope = _inputs((4, 6, 5, 8))
  slope = slope if act else None
  f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
  y, mean, var = batchnorm.batch_norm_train(f32(x), f32(scale), f32(bias), f32(slope), EPS)
  ry, rmean, rvar = np_bn_act(x, scale, bias, slope)
  np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, rvar, rtol=1e-5)


@pytest.mark.parametrize("act,offset", [(True, 0.5), (False, 0.5), (True, 16.0)])
def test_vjp_matches_central_differences(act, offset):
  """<vjp(g), v> against d/dt <g, f(p + t v)> by float64 central differences, for each input and
  with cotangents on all three outputs (y, mean, var); offset 16 puts the mean at 8 standard
  deviations, where the float32 sums cancel most."""
  # Inputs and cotangents rounded to float32 first: the reference differentiates the function at
  # exactly the point the float32 VJP sees.
  r32 = lambda a: None if a is None else np.asarray(np.asarray(a, np.float32), np.float64)  # noqa: E731
  x, scale, bias, slope = map(r32, _inputs((3, 4, 4, 5), seed=1, offset=offset))
  prim = dict(x=x, scale=scale, bias=bias, slope=slope if act else None)
  rng = np.random.default_rng(2)
  gy, gmean, gvar = map(r32, (rng.normal(size=x.shape), rng.normal(size=5), rng.normal(size=5)))

  def np_obj(p):
    y, mean, var = np_bn_act(p["x"], p["scale"], p["bias"], p["slope"])
    return np.sum(gy * y) + gmean @ mean + gvar @ var

  f32 = {k: None if v is None else jnp.asarray(v, jnp.float32) for k, v in prim.items()}
  _, pull = jax.vjp(lambda p: batchnorm.batch_norm_train(p["x"], p["scale"], p["bias"], p["slope"],
                                                         EPS), f32)
  (grads,) = pull(tuple(jnp.asarray(g, jnp.float32) for g in (gy, gmean, gvar)))
  h = 1e-6
  # The float32 VJP's rounding: sums of n terms (eps * n each, worst case), amplified by the
  # cancellation in x - mean (cond = 1 + max|x| / smallest standard deviation), against the size
  # of the terms of <vjp, v>; plus the central difference's own rounding (float64 eps * |obj| / h).
  eps32, n = float(np.finfo(np.float32).eps), x.size // x.shape[-1]
  cond = 1 + np.abs(x).max() / np.sqrt(x.var(axis=(0, 1, 2)) + EPS).min()
  fd_err = 10 * np.finfo(np.float64).eps * abs(np_obj(prim)) / h
  for name, value in prim.items():
    if value is None:
      assert grads[name] is None
      continue
    v = rng.normal(size=value.shape)
    plus = dict(prim, **{name: value + h * v})
    minus = dict(prim, **{name: value - h * v})
    fd = (np_obj(plus) - np_obj(minus)) / (2 * h)
    g = np.asarray(grads[name], np.float64)
    got = float(np.sum(g * v))
    tol = eps32 * n * cond * float(np.sum(np.abs(g * v))) + fd_err
    assert abs(got - fd) <= tol, (name, got, fd, tol)


class _FlaxRef(nn.Module):
  act: bool = True

  @nn.compact
  def __call__(self, x, train):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS, name="BatchNorm_0")(x)
    return PReLU(name="PReLU_0")(x) if self.act else x


class _Fused(nn.Module):
  act: bool = True

  @nn.compact
  def __call__(self, x, train):
    return batchnorm.batch_norm_act(x, train, self.act, "fused", jnp.float32, 0.9, EPS)


@pytest.mark.parametrize("act", [True, False])
def test_fused_module_equals_flax_batchnorm_and_prelu(act):
  x, *_ = _inputs((4, 8, 8, 16), seed=3)
  x = jnp.asarray(x, jnp.float32)
  ref, fused = _FlaxRef(act), _Fused(act)
  v = ref.init(jax.random.PRNGKey(0), x, False)
  v_fused = fused.init(jax.random.PRNGKey(0), x, False)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v_fused)
  for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_fused)):
    np.testing.assert_array_equal(a, b)
  rng = np.random.default_rng(4)
  c = x.shape[-1]
  params = {"BatchNorm_0": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=c), jnp.float32)}}
  if act:
    params["PReLU_0"] = {"slope": jnp.asarray(rng.uniform(0.1, 0.4, c), jnp.float32)}
  stats = {"BatchNorm_0": {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
                           "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}}
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  out = {}
  for name, m in (("flax", ref), ("fused", fused)):
    def loss(p, xx, m=m):
      y, upd = m.apply({"params": p, "batch_stats": stats}, xx, True, mutable=["batch_stats"])
      return jnp.sum(y * w), (y, upd)
    (_, (y, upd)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    y_eval = jax.jit(lambda p, xx, m=m: m.apply({"params": p, "batch_stats": stats}, xx, False))(
        params, x)
    out[name] = (y, upd, grads, y_eval)
  for a, b in zip(jax.tree.leaves(out["flax"]), jax.tree.leaves(out["fused"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def _network_grads(impl, dtype, x, w, variables):
  c = configs.experiment("arcface_srv_fdp", "test")
  c.model.batchnorm_impl = impl
  model = models.get_model(c).clone(dtype=dtype)
  v = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)

  def loss(params):
    out, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, jnp.asarray(x, dtype),
                           train=True, rngs={"dropout": jax.random.PRNGKey(2)}, mutable=["batch_stats"])
    return jnp.sum(out * jnp.asarray(w, dtype)), upd
  grads, upd = jax.jit(jax.grad(loss, has_aux=True))(v["params"])
  return jax.tree.map(np.asarray, (grads, upd))


def test_network_gradients_and_updates_agree_between_impls():
  """The test network (8 px-wide channels, 32 px) trained one step, Flax's BatchNorm against the
  fused one: in float64 the same to 1e-7; in float32 both within float32 rounding of float64."""
  c = configs.experiment("arcface_srv_fdp", "test")
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, size=(8, 32, 32, 3))
  w = rng.normal(size=(8, c.model.embedding_dim))
  v = ensemble.member(ensemble.init_members(models.get_model(c), jax.random.PRNGKey(0), 1,
                                            jnp.zeros((1, 32, 32, 3))), 0)
  v = jax.tree.map(np.asarray, v)
  with jax.enable_x64(True):
    ref = _network_grads("flax", jnp.float64, x, w, v)
    fused64 = _network_grads("fused", jnp.float64, x, w, v)
  flax32 = _network_grads("flax", jnp.float32, x, w, v)
  fused32 = _network_grads("fused", jnp.float32, x, w, v)
  # Both implementations agree to 1e-7 in float64 (above): that is the correctness check. In
  # float32 each must stay within the rounding the arithmetic allows, with a bound from the
  # arithmetic, not from one machine's rounding (nor from the other implementation's error on it):
  # - float32 sums of n terms err by up to ~eps * sqrt(n) relative to the size of their terms
  #   (random-walk rounding), compounded through the network's layers: eps * sqrt(n) * depth, with
  #   n the longest reduction (the stem's output, 8 * 16 * 16 positions);
  # - the size of the terms: a gradient leaf is a sum of products whose parts cancel (a BN scale's
  #   gradient sums x_hat * g over positions), so its own value can be far below its terms; the
  #   largest gradient of the tree bounds them. A running mean is judged against its layer's
  #   standard deviation (a mean near 0 next to inputs of spread 1 carries the inputs' rounding)
  #   and any batch statistic against the largest of the tree of statistics.
  floor = float32_rounding(16, 8 * 16 * 16)
  grads_big, stats_big = (max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(t)) for t in ref)
  big = max(grads_big, stats_big)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(ref)]
  leaves = dict(zip(paths, jax.tree.leaves(ref)))
  n_grads = len(jax.tree.leaves(ref[0]))
  for i, (path, r, a, b, f) in enumerate(zip(paths, *(jax.tree.leaves(t) for t in
                                                        (ref, fused64, flax32, fused32)))):
    np.testing.assert_allclose(a, r, rtol=1e-7, atol=1e-9 * big)
    scale = grads_big if i < n_grads else stats_big
    if path.endswith("['mean']"):
      scale = max(scale, float(np.sqrt(leaves[path[:-len("['mean']")] + "['var']"].max())))
    for name, got in (("flax", b), ("fused", f)):
      err = float(np.abs(got - r).max()) / scale
      assert err <= floor, (path, name, err, floor)
