"""LOTS (Rozsa, Guenther, Boult 2017): move a face's feature onto a target feature.

Minimise ``||E(x) - t||^2`` over the input ``x`` (pixels in [0, 1]; the model normalises inside)
towards precomputed target features ``t``, with one of these step rules:

  * ``lots``: Rozsa et al.'s step, the gradient scaled by its max-norm: ``x -= a * g / max|g|``
    (the largest pixel change is ``a``; default 1/255, one grey level);
  * ``ifgsm``: sign steps ``x -= a * sign(g)`` (a = 1/255);
  * ``bim``: sign steps projected onto the L_inf ball of radius ``epsilon`` around the source
    (Kurakin et al.; the paper uses epsilon = 0.1);
  * ``mifgsm``: sign steps of the accumulated L1-normalised gradient (Dong et al. 2018, mu = 1);
  * ``pgd``: BIM from a uniform random start in the ball (Madry et al.); ``restarts`` > 1 reruns the
    batch from fresh random starts and keeps each example's least-perturbed success;
  * ``pgd_l2``: PGD in L2 (Madry et al.): steps ``x -= a * g / ||g||_2`` projected onto the L2 ball of
    radius ``epsilon`` around the source (then onto [0, 1], which keeps it inside the ball), from a
    random start: a uniform direction at a radius uniform in ``[0, epsilon]``; ``restarts`` as
    ``pgd``;
  * ``cw``: Carlini-Wagner L2 in tanh space, ``||x - x_s||^2 + c * max(d^2 / goal^2 - 1, 0)``
    (the hinge relative to the goal), minimised with Adam. ``c`` starts at ``cw_c`` and grows
    tenfold after every ``cw_escalate_every`` (default ``max(cw_patience, 10)``) iterations
    without success (in place of Carlini and Wagner's binary search over c). As in their code, the result is the successful iterate
    with the smallest L2: an example is done once it has succeeded and that smallest L2 has not
    improved for ``cw_patience`` iterations (0: the first success, like the other rules).

Every rule also clips to [0, 1]. One jitted ``lax.while_loop`` runs a whole batch: an example is
done the moment its distance falls below its goal (``cw``: see above) and from then on its
``x`` no longer changes (bit for bit); the loop ends when all are done or after ``max_iters``
(default 5000; the paper set no limit). The batch can be sharded over the devices of a
``jax.sharding.Mesh``.

``objective="members"`` attacks every member feature at once (``sum_k ||f_k(x) - t_k||^2``, the
targets being the target image's member features) instead of the ensemble embedding; success is
always judged on the ensemble embedding's distance.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from faceens.models import ensemble

METHODS = ("lots", "ifgsm", "bim", "mifgsm", "pgd", "pgd_l2", "cw")
RANDOM_START = ("pgd", "pgd_l2")  # random starts, and restarts from new ones
OBJECTIVES = ("ensemble", "members")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  method: str = "ifgsm"
  step_size: float = 1.0 / 255     # lots / ifgsm / bim / mifgsm / pgd: pixel units in [0, 1]
  epsilon: float = 0.1             # bim / pgd: L_inf radius (paper: 0.1); pgd_l2: L2 radius
  max_iters: int = 5000            # cap (the paper: none); reported per example
  momentum: float = 1.0            # mifgsm decay mu
  restarts: int = 1                # pgd / pgd_l2: random restarts for the examples still failing
  cw_lr: float = 0.01              # cw: Adam learning rate on tanh-space variables (see README)
  cw_c: float = 0.1                # cw: initial weight of the distance hinge (x10 when stuck)
  cw_patience: int = 20            # cw: iterations without a smaller successful L2 before done
  objective: str = "ensemble"
  # cw: iterations without success before c x10 (0: max(cw_patience, 10)); out of repr, which
  # keys cached results (see ``config_repr``)
  cw_escalate_every: int = dataclasses.field(default=0, repr=False)

  def validate(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown attack method {self.method!r}; valid: {', '.join(METHODS)}")
    if self.objective not in OBJECTIVES:
      raise ValueError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
    if self.max_iters < 1 or self.step_size <= 0 or self.epsilon <= 0 or self.restarts < 1:
      raise ValueError("max_iters >= 1, step_size > 0, epsilon > 0 and restarts >= 1 are required, "
                       f"got {self}")
    if self.method == "cw" and (self.cw_lr <= 0 or self.cw_c <= 0 or self.cw_patience < 0
                                or self.cw_escalate_every < 0):
      raise ValueError("cw needs cw_lr > 0, cw_c > 0, cw_patience >= 0 and cw_escalate_every >= 0, "
                       f"got {self}")
    return self

  @property
  def escalate_every(self) -> int:
    """CW: iterations without success after which c grows tenfold."""
    return self.cw_escalate_every or max(self.cw_patience, 10)


# Fields added after results were cached under keys made of ``dataclasses.asdict``: ``config_dict``
# leaves them out at their default, so those keys (and every result stored under them) stay valid.
_LATER_FIELDS = {"cw_escalate_every": 0}


def config_dict(cfg: AttackConfig) -> dict:
  """``dataclasses.asdict(cfg)`` for cache keys and records (see ``_LATER_FIELDS``)."""
  d = dataclasses.asdict(cfg)
  for k, default in _LATER_FIELDS.items():
    if d[k] == default:
      del d[k]
  return d


def config_repr(cfg: AttackConfig) -> str:
  """``repr(cfg)`` (which leaves out ``_LATER_FIELDS``) and each later field not at its default:
  the repr earlier results were cached under, for a config without later settings."""
  extra = {k: v for k, v in config_dict(cfg).items() if k in _LATER_FIELDS}
  return repr(cfg) + (f" {extra}" if extra else "")


def _bcast(mask, x):
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _per_example(fn):
  """``fn(x) -> [B]`` losses -> ``x -> ([B] losses, [B, ...] per-example gradients)``."""
  def value_and_grad(x):
    losses, vjp = jax.vjp(fn, x)
    return losses, vjp(jnp.ones_like(losses))[0]
  return value_and_grad


def make_losses(features: Callable, targets, objective: str):
  """LOTS' objective (Rozsa et al. 2017): ``x -> (loss [B], dist [B])`` with
  ``loss = ||E(x) - t||^2`` and ``dist = ||E(x) - E(x_t)||`` (``models.ensemble_embedding``).

  ``features(x) -> [K, B, d]`` normalised member features; ``targets``: ``[B, d]`` ensemble
  embeddings (``objective="ensemble"``) or ``[K, B, d]`` member features (``"members"``).
  ``dist`` is always the Euclidean distance of the ensemble embedding to the target's.
  """
  def losses(x):
    f = features(x)
    emb = ensemble.ensemble_embedding(f)
    if objective == "members":
      tgt_emb = ensemble.ensemble_embedding(targets)
      loss = jnp.sum(jnp.square(f - targets), axis=(0, 2))
    else:
      tgt_emb = targets
      loss = jnp.sum(jnp.square(emb - targets), axis=-1)
    dist = jnp.sqrt(jnp.sum(jnp.square(emb - tgt_emb), axis=-1))
    return loss, dist
  return losses


@dataclasses.dataclass(frozen=True)
class StepRule:
  """A gradient step rule: ``init(x0) -> aux`` and ``direction(g, aux, active, cfg) -> (step,
  aux)``; the iterate moves to ``x - cfg.step_size * step``, projected (``project``: ``"linf"`` or
  ``"l2"``) onto that ball of radius ``cfg.epsilon`` around the source, then clipped to [0, 1]."""
  init: Callable
  direction: Callable
  project: str | None = None


def _no_aux(x0):
  return ()


def _lots_direction(g, aux, active, cfg):
  """Rozsa et al.: the gradient scaled by its max-norm (the largest pixel change is the step)."""
  scale = jnp.max(jnp.abs(g), axis=_rest(g), keepdims=True)
  return g / jnp.maximum(scale, 1e-30), aux


def _sign_direction(g, aux, active, cfg):
  """I-FGSM / BIM / PGD: the sign of the gradient."""
  return jnp.sign(g), aux


def _l2_direction(g, aux, active, cfg):
  """PGD in L2: the gradient scaled to unit L2 norm per example."""
  norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=_rest(g), keepdims=True))
  return g / jnp.maximum(norm, 1e-30), aux


def _momentum_direction(g, aux, active, cfg):
  """MI-FGSM (Dong et al. 2018): the sign of ``mu * m + g / ||g||_1``."""
  l1 = jnp.sum(jnp.abs(g), axis=_rest(g), keepdims=True)
  mom = cfg.momentum * aux[0] + g / jnp.maximum(l1, 1e-30)
  return jnp.sign(mom), (jnp.where(_bcast(active, mom), mom, aux[0]),)


STEP_RULES = {
    "lots": StepRule(_no_aux, _lots_direction),
    "ifgsm": StepRule(_no_aux, _sign_direction),
    "bim": StepRule(_no_aux, _sign_direction, project="linf"),
    "pgd": StepRule(_no_aux, _sign_direction, project="linf"),
    "pgd_l2": StepRule(_no_aux, _l2_direction, project="l2"),
    "mifgsm": StepRule(lambda x0: (jnp.zeros_like(x0),), _momentum_direction),
}


def cw_objective(losses, x_src, goal, c_w):
  """Carlini-Wagner L2 in tanh space: ``w -> ||x(w) - x_s||^2 + c * max(d(x(w))^2 / goal^2 - 1,
  0)`` per example, with ``x(w) = (tanh(w) + 1) / 2`` and ``d`` LOTS' distance (``make_losses``).
  """
  def objective(w):
    xw = 0.5 * (jnp.tanh(w) + 1.0)
    _, dist = losses(xw)
    l2 = jnp.sum(jnp.square(xw - x_src), axis=_rest(xw))
    return l2 + c_w * jnp.maximum(jnp.square(dist / goal) - 1.0, 0.0)
  return objective


def _cw_init(losses, x_src, x0, goal, cfg):
  """CW's state: ``(w, Adam m, Adam v, best successful x, its L2^2, iterations since it
  improved, c)`` and whether each example is done before the first iteration."""
  b = x_src.shape[0]
  w0 = jnp.arctanh(jnp.clip(2.0 * x0 - 1.0, -1 + 1e-6, 1 - 1e-6))
  _, d0 = losses(x0)
  ok0 = d0 < goal
  aux0 = (w0, jnp.zeros_like(w0), jnp.zeros_like(w0), x0,
          jnp.where(ok0, jnp.sum(jnp.square(x0 - x_src), axis=_rest(x0)), jnp.inf),
          jnp.zeros((b,), jnp.int32), jnp.full((b,), cfg.cw_c, x0.dtype))
  return aux0, ok0 & (cfg.cw_patience == 0)


def _cw_iteration(losses, x_src, goal, cfg, x, done, iters, aux):
  """One Adam step on ``cw_objective`` for the active examples, then the bookkeeping: the best
  successful iterate, patience, and c x10 when an example has not succeeded for a while."""
  active = ~done
  w, m, v, best_x, best_l2, since, c_w = aux
  _, g = _per_example(cw_objective(losses, x_src, goal, c_w))(w)
  # Adam written out: each example keeps its own step count t, and the committed LFW results
  # were made with exactly these operations (optax.adam rounds lr * m / sqrt(v) differently).
  t = (iters + 1).astype(w.dtype)
  m2 = 0.9 * m + 0.1 * g
  v2 = 0.999 * v + 0.001 * jnp.square(g)
  mhat = m2 / _bcast(1 - 0.9 ** t, m2)
  vhat = v2 / _bcast(1 - 0.999 ** t, v2)
  w2 = w - cfg.cw_lr * mhat / (jnp.sqrt(vhat) + 1e-8)
  keep = _bcast(active, w)
  w2, m2, v2 = (jnp.where(keep, a2, a1) for a1, a2 in zip((w, m, v), (w2, m2, v2)))
  x_new = 0.5 * (jnp.tanh(w2) + 1.0)
  x = jnp.where(_bcast(active, x), x_new, x)
  iters = iters + active.astype(jnp.int32)
  _, dist = losses(x)
  l2 = jnp.sum(jnp.square(x - x_src), axis=_rest(x))
  better = active & (dist < goal) & (l2 < best_l2)
  best_x = jnp.where(_bcast(better, x), x, best_x)
  best_l2 = jnp.where(better, l2, best_l2)
  since = jnp.where(better, 0, since + active.astype(jnp.int32))
  # No success for cw_patience iterations: the distance term weighs 10x more (in place of
  # Carlini and Wagner's search over c).
  stuck = active & ~jnp.isfinite(best_l2) & (since > 0) & (since % cfg.escalate_every == 0)
  c_w = jnp.where(stuck, c_w * 10.0, c_w)
  done = done | (jnp.isfinite(best_l2) & (since >= cfg.cw_patience))
  return x, done, iters, (w2, m2, v2, best_x, best_l2, since, c_w)


def init_state(losses, x_src, x0, goal, cfg: AttackConfig, key):
  """The per-example loop state ``(x, done, iterations, aux)`` before the first iteration; every
  array has the batch as its leading axis, so a subset of examples can be resumed alone."""
  b = x_src.shape[0]
  if cfg.method == "pgd":
    lo, hi = _ball(x_src, cfg)
    x0 = jnp.clip(x0 + jax.random.uniform(key, x0.shape, x0.dtype, -cfg.epsilon, cfg.epsilon),
                  lo, hi)
  if cfg.method == "pgd_l2":
    k_dir, k_rad = jax.random.split(key)
    u = jax.random.normal(k_dir, x0.shape, x0.dtype)
    u = u / jnp.sqrt(jnp.sum(jnp.square(u), axis=_rest(u), keepdims=True))
    r = jax.random.uniform(k_rad, (b,) + (1,) * (x0.ndim - 1), x0.dtype, 0.0, cfg.epsilon)
    x0 = project(x_src, x0 + r * u, cfg, "l2")
  if cfg.method == "cw":
    aux0, done0 = _cw_init(losses, x_src, x0, goal, cfg)
  else:
    # Gradient rules find an example done at the top of its first iteration.
    aux0, done0 = STEP_RULES[cfg.method].init(x0), jnp.zeros((b,), bool)
  return (x0, done0, jnp.zeros((b,), jnp.int32), aux0)


def _rest(a):
  return tuple(range(1, a.ndim))


def _ball(x_src, cfg):
  return jnp.clip(x_src - cfg.epsilon, 0.0, 1.0), jnp.clip(x_src + cfg.epsilon, 0.0, 1.0)


def project(x_src, x, cfg: AttackConfig, ball: str | None):
  """``x`` onto the ``ball`` (``"linf"``, ``"l2"`` or None) of radius ``cfg.epsilon`` around
  ``x_src``, then onto [0, 1]. Clipping after the L2 projection cannot leave the ball: with
  ``x_src`` in [0, 1] it only shrinks each coordinate of ``x - x_src`` towards 0."""
  if ball == "linf":
    lo, hi = _ball(x_src, cfg)
    return jnp.clip(x, lo, hi)
  if ball == "l2":
    d = x - x_src
    norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=_rest(d), keepdims=True))
    x = x_src + d * jnp.minimum(1.0, cfg.epsilon / jnp.maximum(norm, 1e-30))
  return jnp.clip(x, 0.0, 1.0)


def run_state(losses, x_src, state, goal, cfg: AttackConfig):
  """Up to ``cfg.max_iters`` more iterations from ``state`` (``init_state``); the new state.
  Iterations of one example depend on its own state only: resuming a subset gives each of its
  examples the iterations an uninterrupted loop would."""
  def grad_and_dist(x):
    # One forward and backward pass gives the step direction and the current distance.
    loss, vjp, dist = jax.vjp(losses, x, has_aux=True)
    return vjp(jnp.ones_like(loss))[0], dist

  def cond(s):
    i, (_, done, _, _) = s
    return (i < cfg.max_iters) & ~jnp.all(done)

  def body(s):
    i, (x, done, iters, aux) = s
    if cfg.method == "cw":
      return i + 1, _cw_iteration(losses, x_src, goal, cfg, x, done, iters, aux)
    rule = STEP_RULES[cfg.method]
    g, dist = grad_and_dist(x)
    done = done | (dist < goal)
    active = ~done
    step, aux = rule.direction(g, aux, active, cfg)
    x_new = project(x_src, x - cfg.step_size * step, cfg, rule.project)
    x = jnp.where(_bcast(active, x), x_new, x)
    return i + 1, (x, done, iters + active.astype(jnp.int32), aux)

  _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
  return state


def finish(losses, state, goal, cfg: AttackConfig):
  """``(x_adv, iterations, dist, finished)`` of a state: CW's result is its best successful
  iterate; ``finished``: the example needs no further iteration (done, or at its goal)."""
  x_adv, done, iters, aux = state
  if cfg.method == "cw":
    x_adv = jnp.where(_bcast(jnp.isfinite(aux[4]), x_adv), aux[3], x_adv)
  _, dist = losses(x_adv)
  finished = done if cfg.method == "cw" else done | (dist < goal)
  return x_adv, iters, dist, finished


def run_loop(losses, x_src, x0, goal, cfg: AttackConfig, key):
  """The whole attack as one while loop; returns ``(x_adv, iterations, dist)`` with dist
  measured at x_adv."""
  state = run_state(losses, x_src, init_state(losses, x_src, x0, goal, cfg, key), goal, cfg)
  return finish(losses, state, goal, cfg)[:3]


@functools.partial(jax.jit, static_argnames=("apply", "cfg"))
def _attack_jit(apply, variables, x_src, x0, targets, goal, key, cfg):
  losses = make_losses(lambda x: apply(variables, x), targets, cfg.objective)
  return run_loop(losses, x_src, x0, goal, cfg, key)


@functools.partial(jax.jit, static_argnames=("apply", "cfg"))
def init_jit(apply, variables, x_src, x0, targets, goal, key, cfg):
  """``init_state`` for ``apply`` (see ``attack``)."""
  losses = make_losses(lambda x: apply(variables, x), targets, cfg.objective)
  return init_state(losses, x_src, x0, goal, cfg, key)


@functools.partial(jax.jit, static_argnames=("apply", "cfg"))
def chunk_jit(apply, variables, x_src, state, targets, goal, cfg):
  """``cfg.max_iters`` more iterations of ``state``; ``(state, (x_adv, iterations, dist,
  finished))``."""
  losses = make_losses(lambda x: apply(variables, x), targets, cfg.objective)
  state = run_state(losses, x_src, state, goal, cfg)
  return state, finish(losses, state, goal, cfg)


def attack(apply, variables, x_src, targets, goal, cfg: AttackConfig, *, x_init=None, key=None,
           mesh=None) -> dict:
  """Runs one batch. Returns numpy ``x_adv, success, iterations, distance, l2, linf``.

  Args:
    apply: pure ``(variables, x in [0, 1]) -> normalised features [K, B, d]``
      (``faceens.api.FaceModel.apply``; hashable, it is a static jit argument).
    variables: the model's stacked variables (jit argument, not a constant).
    x_src: ``[B, S, S, 3]`` float32 in [0, 1].
    targets: ``[B, d]`` target embeddings, or ``[K, B, d]`` member features for
      ``objective="members"``.
    goal: scalar or ``[B]`` Euclidean distance below which an example is done.
    x_init: start here instead of ``x_src`` (continue an attack towards a smaller goal).
    mesh: shard the batch over this mesh's devices (the batch size must divide evenly).
  """
  cfg.validate()
  x_src = jnp.asarray(x_src, jnp.float32)
  x0 = x_src if x_init is None else jnp.asarray(x_init, jnp.float32)
  goal = jnp.broadcast_to(jnp.asarray(goal, jnp.float32), (x_src.shape[0],))
  targets = jnp.asarray(targets, jnp.float32)
  key = jax.random.PRNGKey(0) if key is None else key
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P
    axis = mesh.axis_names[0]
    if x_src.shape[0] % mesh.size:
      raise ValueError(f"batch {x_src.shape[0]} is not divisible by {mesh.size} devices")
    batch = NamedSharding(mesh, P(axis))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    x_src, x0, goal = (jax.device_put(a, batch) for a in (x_src, x0, goal))
    targets = put(targets, P(None, axis) if targets.ndim == 3 else P(axis))
    variables = put(variables, P())
  # Restarts are a host-side loop (attack_with_restarts): keep them out of the compiled config.
  x_adv, iters, dist = _attack_jit(apply, variables, x_src, x0, targets, goal, key,
                                   dataclasses.replace(cfg, restarts=1))
  x_adv, iters, dist, x_src, goal = jax.device_get((x_adv, iters, dist, x_src, goal))
  delta = (x_adv - x_src).reshape(len(x_adv), -1)
  return {"x_adv": x_adv, "success": dist < goal, "iterations": iters, "distance": dist,
          "l2": np.linalg.norm(delta, axis=1), "linf": np.abs(delta).max(axis=1), "goal": goal}


def attack_with_restarts(apply, variables, x_src, targets, goal, cfg: AttackConfig, *,
                         x_init=None, seed: int = 0, mesh=None) -> dict:
  """``attack``; for ``pgd`` / ``pgd_l2`` with ``restarts > 1`` the batch reruns from new random starts and
  each example keeps its least-perturbed success (iterations add up over restarts)."""
  out = attack(apply, variables, x_src, targets, goal, cfg, x_init=x_init,
               key=jax.random.PRNGKey(seed), mesh=mesh)
  if cfg.method not in RANDOM_START:
    return out
  for r in range(1, cfg.restarts):
    new = attack(apply, variables, x_src, targets, goal, cfg, x_init=x_init,
                 key=jax.random.fold_in(jax.random.PRNGKey(seed), r), mesh=mesh)
    better = new["success"] & (~out["success"] | (new["l2"] < out["l2"]))
    for k in ("x_adv", "success", "distance", "l2", "linf"):
      out[k] = np.where(_np_bcast(better, out[k]), new[k], out[k])
    out["iterations"] = out["iterations"] + new["iterations"]
  return out


def _np_bcast(mask, x):
  return mask.reshape(mask.shape + (1,) * (np.ndim(x) - 1))


def tau_curve(l2: np.ndarray, success: np.ndarray, taus=None) -> list[tuple[float, float]]:
  """Amada et al. Eq. 1: ``tau_Acc = |{x_adv in AX : ||x_adv - x_s||_2 < tau}| / |AX|``.

  ``AX`` is the set of *successful* adversarial examples, so the curve rises to 1 at the largest
  successful perturbation; report the success rate (successes / attempts) beside it. Returns
  ``[(tau, tau_Acc)]``; an empty list when no attack succeeded (the curve is undefined).
  """
  l2, success = np.asarray(l2, np.float64), np.asarray(success, bool)
  if l2.shape != success.shape:
    raise ValueError(f"l2 {l2.shape} and success {success.shape} must have the same shape")
  n_ax = int(success.sum())
  if n_ax == 0:
    return []
  if taus is None:
    top = float(l2[success].max())
    taus = np.linspace(0.0, top * 1.05 + 1e-9, 101)
  ax = l2[success]
  return [(float(t), float(np.sum(ax < t) / n_ax)) for t in taus]
