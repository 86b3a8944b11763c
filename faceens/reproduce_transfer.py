"""The transfer stage of ``faceens.reproduce`` (suite v2): black-box transfer between the suite's
models on common pairs, at common operating points, with paired intervals.

Targets are the first training seed of every method (``Suite.seeds[0]``; AdvT's other margins
are left out). Sources: the same models (each no target of its own examples), and, in the
``cross_seed`` section, the second seed's finished runs, so that every source is another
training run than every target (one seed fixes the initial weights of every method's member 0).
At each operating point of the calibration (``FAR`` f: every model at the threshold that accepts
f of random different-person pairs of the test people):

  * each source's I-FGSM examples, crafted on the suite's attack pairs until the *source* accepts
    them at its own FAR-f threshold (``RobustPlan``'s I-FGSM settings), kept in
    ``<source workdir>/suite_transfer/<far>_ifgsm.npz``;
  * the **common pairs**: attack pairs that no model of the set accepts before any perturbation
    at f, so every (source, target) rate has the same denominator; a source's failure counts as
    not transferred;
  * per (source, target) the transfer rate: the share of common pairs whose source example the
    target accepts at its own FAR-f threshold;
  * per target, its mean rate over every other source, and, for the pairs of targets the
    paper's claims compare, the difference of the two rates over the sources they share (neither
    of them), with a 95% bootstrap interval over the common pairs (paired: the same resampled
    pairs for both targets and every source).

Minimal examples sit just past their source's threshold, so they say little about deeper
attacks (the paper: "very well forged AXs often ... can again deceive"). So each source also
crafts **fixed-budget** examples (``TransferPlan``: L_inf PGD at 4/255 and 8/255, 20 steps of a
quarter of the budget from a random start, no early stop), the same at every operating point;
there the rate is the share of common pairs whose example the target accepts, whether or not the
source does (the source's own rate is recorded beside it), with the same comparisons.

Results: ``<out>/transfer_v2.json`` (matrix, per-pair verdicts, comparisons) per operating point,
the fixed-budget ones under ``fixed_budget``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from faceens import api, attack, provenance
from faceens.attacks import lots
from faceens.models import ensemble
from faceens.reproduce_robustness import SMOKE_ROBUST_PLAN, RobustPlan, _cached

BOOTSTRAP = 2000
# Target pairs the claims compare: (A, B) reads "A resists transfer better than B" if A's rate is
# lower (the difference A - B below 0).
COMPARISONS = (("baseline", "single"), ("srv", "baseline"), ("fdp", "baseline"),
               ("adp", "baseline"), ("srv_fdp", "srv"), ("srv_fdp", "baseline"),
               ("srv_adp", "srv"), ("advt", "baseline"))


def craft(model, pairs: dict, goal: float, plan: RobustPlan, cache: str, progress: bool) -> dict:
  """I-FGSM examples of ``model`` on ``pairs`` to ``goal``; cached in ``cache`` (an .npz) under
  the settings, the checkpoint step, the pairs and the goal."""
  cfg = plan.configs()["ifgsm"]
  key = json.dumps({"config": lots.config_repr(cfg), "step": model.step, "pairs": pairs["names"],
                    "goal": goal}, sort_keys=True)

  def compute():
    x_src, x_tgt = model.prepare(pairs["src"]), model.prepare(pairs["tgt"])
    emb_t = ensemble.ensemble_embedding(model.member_features(x_tgt))
    r = attack.run_compacted(model, x_src, emb_t, goal, cfg, chunk=plan.chunk,
                             max_batch=plan.batch_size, progress=progress,
                             desc=f"transfer source {model.config.method} d<{goal:.3f}")
    attack.release_compiled()
    return {"x_adv": np.asarray(r["x_adv"], np.float32), "success": np.asarray(r["success"])}
  return _cached(os.path.dirname(cache), os.path.splitext(os.path.basename(cache))[0], key,
                 compute)


def paired_difference(fooled_a: np.ndarray, fooled_b: np.ndarray, n: int = BOOTSTRAP,
                      seed: int = 0) -> dict:
  """``fooled_*``: ``[S, P]`` booleans (sources x common pairs) of two targets. The mean over
  sources of A's rate minus B's, with a 95% bootstrap interval resampling the pairs (the same
  pairs for both targets and all sources)."""
  a, b = np.asarray(fooled_a, float), np.asarray(fooled_b, float)
  p = a.shape[1] if a.ndim == 2 else 0
  if a.size == 0:   # no source shared by both targets, or no common pair
    return {"difference": None, "lo": None, "hi": None, "sources": int(a.shape[0]),
            "pairs": int(p)}
  diff = float(a.mean() - b.mean())
  rng = np.random.default_rng(seed)
  stats = np.empty(n)
  per_pair = (a - b).mean(axis=0)          # the mean over sources, per pair
  for i in range(n):
    stats[i] = per_pair[rng.integers(0, p, p)].mean()
  s = np.sort(stats)
  return {"difference": diff, "lo": float(s[int(0.025 * n)]),
          "hi": float(s[int(np.ceil(0.975 * n)) - 1]), "sources": int(a.shape[0]), "pairs": int(p),
          "no_net_difference": bool(np.all(per_pair == 0))}


def verdict(d: dict) -> str:
  if d["pairs"] == 0 or d["sources"] == 0:
    return "not run"
  if d.get("no_net_difference"):
    # on every pair the sources fooled both targets equally often, so no resample can differ
    # (no margin was fixed in advance for transfer rates: stated as observed, not as equivalence)
    return "no net difference on any pair"
  if d["hi"] < 0:
    return "resists transfer better"
  if d["lo"] > 0:
    return "resists transfer worse"
  return "cannot tell"


def craft_budget(model, pairs: dict, cfg: lots.AttackConfig, plan: RobustPlan, cache: str,
                 progress: bool) -> dict:
  """Fixed-budget examples of ``model`` on ``pairs``: ``cfg`` (PGD) for all its steps (goal 0:
  no early stop; its last iterate); independent of any threshold, so one set serves every
  operating point. Cached like ``craft``."""
  # The random starts depend on the batching (one key per batch of plan.batch_size).
  key = json.dumps({"config": lots.config_dict(cfg), "step": model.step,
                    "pairs": pairs["names"], "goal": 0.0, "batch_size": plan.batch_size,
                    "seed": 0}, sort_keys=True)

  def compute():
    x_src, x_tgt = model.prepare(pairs["src"]), model.prepare(pairs["tgt"])
    emb_t = ensemble.ensemble_embedding(model.member_features(x_tgt))
    r = attack.run_compacted(model, x_src, emb_t, 0.0, cfg, chunk=plan.chunk,
                             max_batch=plan.batch_size, seed=0, progress=progress,
                             desc=f"transfer source {model.config.method} "
                                  f"L_inf {cfg.epsilon * 255:g}/255")
    attack.release_compiled()
    return {"x_adv": np.asarray(r["x_adv"], np.float32),
            "linf": np.asarray(r["linf"], np.float32), "iterations": np.asarray(r["iterations"])}
  return _cached(os.path.dirname(cache), os.path.splitext(os.path.basename(cache))[0], key,
                 compute)


@dataclasses.dataclass(frozen=True)
class TransferPlan:
  """The fixed-budget transfer attack: L_inf PGD from a random start, ``steps`` steps of
  ``budget / 4``, no early stop, at each budget."""
  budgets: tuple[float, ...] = (4.0 / 255, 8.0 / 255)
  steps: int = 20

  def configs(self) -> dict[str, lots.AttackConfig]:
    return {f"pgd_{b * 255:g}": lots.AttackConfig(method="pgd", epsilon=b, step_size=b / 4,
                                                  max_iters=self.steps).validate()
            for b in self.budgets}


SMOKE_TRANSFER_PLAN = TransferPlan(budgets=(8.0 / 255,), steps=3)


def _point(sources: list, targets: list, fooled: dict, source_success: dict,
           common: np.ndarray) -> dict:
  """One operating point's rates from ``fooled[s][t]`` and ``source_success[s]`` (per-pair
  booleans over all attack pairs), on the ``common`` pairs. A target's mean and the comparisons
  use the sources of other methods only (``s != t``; ``s`` not in the compared pair)."""
  idx = np.flatnonzero(common)
  matrix = {s: {t: float(v[idx].mean()) if len(idx) else None for t, v in row.items()}
            for s, row in fooled.items()}
  mean_rate = {}
  for t in targets:
    others = [fooled[s][t][idx].mean() for s in sources if s != t]
    mean_rate[t] = float(np.mean(others)) if len(idx) and others else None
  comps = []
  for a, b in COMPARISONS:
    if a not in targets or b not in targets:
      continue
    shared = [s for s in sources if s not in (a, b)]
    d = paired_difference(np.array([fooled[s][a][idx] for s in shared], bool).reshape(
        len(shared), len(idx)), np.array([fooled[s][b][idx] for s in shared], bool).reshape(
        len(shared), len(idx)))
    comps.append({"a": a, "b": b, **d, "verdict": verdict(d)})
  return {"common_pairs": int(len(idx)),
          "source_success_rate": {s: float(v[idx].mean()) if len(idx) else None
                                  for s, v in source_success.items()},
          "transfer_rate": matrix, "mean_rate_from_other_sources": mean_rate,
          "comparisons": comps,
          "per_pair": {"common": common.astype(int).tolist(),
                       "source_success": {s: v.astype(int).tolist()
                                          for s, v in source_success.items()},
                       "fooled": {s: {t: v.astype(int).tolist() for t, v in row.items()}
                                  for s, row in fooled.items()}}}


def transfer_between(sources: dict, targets: dict, pairs: dict, calibration: dict, plan: RobustPlan,
                     tplan: TransferPlan, progress: bool = True,
                     kinds: tuple[str, ...] = ("minimal", "fixed"),
                     clean: dict | None = None) -> dict:
  """Transfer from ``sources`` to ``targets`` (each ``{method: FaceModel}``; ``calibration``
  ``{workdir: run.json calibration}`` of every model). The same models on both sides (one seed):
  a model is no target of its own examples; otherwise (sources of another seed) every source
  meets every target, its own method included. ``{"operating_points", "fixed_budget"}``, the
  first for ``"minimal"`` in ``kinds``, the second for ``"fixed"``. ``clean``: a dict kept
  across calls, of each model's target embeddings and clean distances."""
  same = all(sources.get(m) is targets[m] for m in targets) and set(sources) == set(targets)
  models = {id(m): m for m in [*sources.values(), *targets.values()]}
  embs = {} if clean is None else clean
  for m in models.values():
    if id(m) not in embs:
      e_tgt = m.embed(m.prepare(pairs["tgt"]))
      embs[id(m)] = (e_tgt, np.linalg.norm(m.embed(m.prepare(pairs["src"])) - e_tgt, axis=1))
  fars = sorted(set.intersection(*[set(calibration[m.workdir]["operating_points"])
                                   for m in models.values()]), key=float, reverse=True)
  thr = {far: {id(m): float(calibration[m.workdir]["operating_points"][far]["threshold"])
               for m in models.values()} for far in fars}
  # The common pairs of an operating point: no model of either side accepts them before any
  # perturbation.
  common = {far: ~np.any([embs[i][1] < thr[far][i] for i in models], axis=0) for far in fars}

  def dist(model, x):
    return np.linalg.norm(model.embed(x) - embs[id(model)][0], axis=1)

  def pairs_of(s):
    return [t for t in targets if not (same and t == s)]

  out = {"sources": {s: m.workdir for s, m in sources.items()},
         "targets": {t: m.workdir for t, m in targets.items()},
         "operating_points": {}, "fixed_budget": {}}
  for far in fars if "minimal" in kinds else ():
    fooled: dict[str, dict[str, np.ndarray]] = {}
    source_success = {}
    for s, sm in sources.items():
      ex = craft(sm, pairs, thr[far][id(sm)], plan,
                 os.path.join(sm.workdir, "suite_transfer", f"{far}_ifgsm.npz"), progress)
      source_success[s] = ex["success"]
      # A minimal example that failed on its source counts as not transferred.
      fooled[s] = {t: ex["success"] & (dist(targets[t], ex["x_adv"]) < thr[far][id(targets[t])])
                   for t in pairs_of(s)}
    out["operating_points"][far] = {
        "thresholds": {t: thr[far][id(m)] for t, m in targets.items()},
        "source_thresholds": {s: thr[far][id(m)] for s, m in sources.items()},
        "pre_accepted": {t: int((embs[id(m)][1] < thr[far][id(m)]).sum())
                         for t, m in targets.items()},
        **_point(list(sources), list(targets), fooled, source_success, common[far])}
    if progress:
      mean = out["operating_points"][far]["mean_rate_from_other_sources"]
      print(f"transfer at FAR {far}: {int(common[far].sum())} common pairs; mean rate per "
            "target: " + ", ".join(f"{t} {r:.3f}" for t, r in mean.items() if r is not None),
            flush=True)
  for name, cfg in tplan.configs().items() if "fixed" in kinds else ():
    dists, own = {}, {}
    for s, sm in sources.items():
      ex = craft_budget(sm, pairs, cfg, plan,
                        os.path.join(sm.workdir, "suite_transfer", f"{name}.npz"), progress)
      dists[s] = {t: dist(targets[t], ex["x_adv"]) for t in pairs_of(s)}
      own[s] = dist(sm, ex["x_adv"])
    entry = {"epsilon": cfg.epsilon, "steps": cfg.max_iters, "step_size": cfg.step_size,
             "operating_points": {}}
    for far in fars:
      # Fixed-budget examples are what a black-box attacker would send whether or not the
      # source accepts them: the target's acceptance alone counts.
      fooled = {s: {t: d < thr[far][id(targets[t])] for t, d in row.items()}
                for s, row in dists.items()}
      source_success = {s: own[s] < thr[far][id(sm)] for s, sm in sources.items()}
      entry["operating_points"][far] = _point(list(sources), list(targets), fooled,
                                              source_success, common[far])
      if progress:
        mean = entry["operating_points"][far]["mean_rate_from_other_sources"]
        print(f"transfer {name} at FAR {far}: mean rate per target: " + ", ".join(
            f"{t} {r:.3f}" for t, r in mean.items() if r is not None), flush=True)
    out["fixed_budget"][name] = entry
  return out


def parameter_correlation(a, b) -> float | None:
  """Pearson correlation of member 0's backbone parameters of two models (every leaf, stacked
  over members, taken at index 0, all concatenated): the single model and member 0 of an
  ensemble of one seed start from the same weights. None if member 0's shapes differ."""
  la, lb = jax.tree.leaves(a.variables["params"]), jax.tree.leaves(b.variables["params"])
  if [x.shape[1:] for x in la] != [x.shape[1:] for x in lb]:
    return None
  va = np.concatenate([np.asarray(x[0], np.float64).ravel() for x in la])
  vb = np.concatenate([np.asarray(x[0], np.float64).ravel() for x in lb])
  return float(np.corrcoef(va, vb)[0, 1])


def transfer_all(suite, models: dict, pairs: dict, calibration: dict, progress: bool = True,
                 second_seed: dict | None = None) -> dict:
  """The stage (see the module docstring) on ``models`` (``{method: FaceModel}``, first seed)
  and, as sources of the cross-seed section, ``second_seed`` (``{method: FaceModel}``, the
  second seed's finished runs); ``calibration``: ``{workdir: run.json calibration}``. Writes and
  returns ``<suite.out>/transfer_v2.json``."""
  plan = SMOKE_ROBUST_PLAN if suite.smoke else RobustPlan()
  tplan = SMOKE_TRANSFER_PLAN if suite.smoke else TransferPlan()
  clean: dict = {}
  same = transfer_between(models, models, pairs, calibration, plan, tplan, progress, clean=clean)
  doc = {"methods": list(models), "runs": {m: models[m].workdir for m in models},
         "attack": "ifgsm", "plan": plan.as_dict(), "pairs": pairs["names"],
         "operating_points": same["operating_points"],
         "fixed_budget": {"plan": json.loads(json.dumps(dataclasses.asdict(tplan))),
                          "attacks": same["fixed_budget"]},
         "provenance": provenance.record()}
  doc["parameter_correlation"] = {
      "same_seed": {f"{a}/{b}": r for i, a in enumerate(models) for b in list(models)[i + 1:]
                    if (r := parameter_correlation(models[a], models[b])) is not None},
      "across_seeds": {m: r for m in (second_seed or {})
                       if (r := parameter_correlation(models[m], second_seed[m])) is not None}}
  path = os.path.join(suite.out, "transfer_v2.json")

  def save():
    with open(path + ".tmp", "w") as f:
      json.dump(doc, f)
    os.replace(path + ".tmp", path)
  save()
  if second_seed:
    if progress:
      print(f"transfer across seeds: {len(second_seed)} sources of the second seed", flush=True)
    # The cheap fixed-budget part first, saved before the minimal examples are crafted.
    doc["cross_seed"] = transfer_between(second_seed, models, pairs, calibration, plan, tplan,
                                         progress, kinds=("fixed",), clean=clean)
    doc["cross_seed"].update(source_seed=suite.seeds[1], target_seed=suite.seeds[0])
    save()
    doc["cross_seed"]["operating_points"] = transfer_between(
        second_seed, models, pairs, calibration, plan, tplan, progress, kinds=("minimal",),
        clean=clean)["operating_points"]
    save()
  return doc


def load_models(suite, trained: list, seed: int | None = None) -> dict:
  """``{method: FaceModel}`` of one seed's finished runs (default the first; AdvT's own margin
  only)."""
  seed = suite.seeds[0] if seed is None else seed
  out = {}
  for run in trained:
    if run.seed == seed and run.advt_margin is None:
      out[run.method] = api.load(suite.workdir(run))
  return out
