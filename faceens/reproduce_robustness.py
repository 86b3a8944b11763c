"""The robustness stage of ``faceens.reproduce`` (suite v2): white-box attacks at common
operating points, the worst case over attacks, and fixed-budget robust accuracy.

For every finished run, on the suite's attack pairs (``reproduce_attacks.attack_pairs``: the
same different-person pairs of LFW's test folds for every run) and at each operating point of
its calibration (``reproduce_attacks.calibrate``: the thresholds at which the run accepts
``far`` of random different-person pairs of the test people), ``RobustPlan``'s attacks:

  * ``ifgsm``: minimal-norm sign steps (LOTS' I-FGSM) until the pair is accepted;
  * ``cw``: Carlini-Wagner L2, run until its best successful L2 stops improving
    (``cw_patience`` iterations) or ``cw_max_iters``;
  * ``bim``: the paper's bounded iterative method, sign steps projected onto an L_inf ball of
    ``bim_epsilon``: the paper's epsilon 0.1 is taken to be on arcface_torch's [-1, 1] input
    scale (the paper does not say), i.e. 0.05 on our [0, 1] pixels, 12.75 grey levels;
  * ``pgd``: fixed-budget L_inf PGD at each of ``pgd_budgets`` with ``pgd_restarts`` random
    starts: a pair is broken at a budget if any restart reaches the goal inside it.

Per pair and attack: L2, L_inf, success, iterations, clean and final distance. Pairs the run
accepts before any perturbation (``pre_accepted``) count as broken with a perturbation of 0.
Per pair, ``worst_case_l2`` is the smallest L2 of any successful example of any attack (inf if
none succeeded), the headline robustness number; robust accuracy under an L2 budget follows from
it, under an L_inf budget from every successful example's L_inf (PGD's included).
``pgd_breaks_missed_by_minimal_norm`` counts, per L_inf budget, the pairs PGD breaks inside it
where no minimal-norm attack's example is that small in L_inf. I-FGSM, CW and BIM minimise L2 (or
stop at the goal), not L_inf, so such pairs are expected and are not by themselves a sign of
gradient masking. The check in L2 is ``pgd_l2_breaks_missed_by_minimal_norm``: per L2 budget of
``pgd_l2_budgets``, the pairs fixed-budget L2 PGD (``pgd_l2_<budget>``, ``pgd_restarts`` random
starts) breaks inside it while the minimal-norm attacks found no example of L2 <= budget. Those
attacks minimise L2, so a count above 0 means they missed easier examples (e.g. gradient masking
that random starts get around); the worst case includes PGD's examples either way.

Diagnostics run on runs of ``diagnostic_seeds`` at ``diagnostic_far``, beside the worst case
and never part of it (``diagnostics`` in the summary, each against an attack of the plan on the
same pairs: the median L2 ratio on the pairs both broke, and the pairs where it found a smaller
example): ``ifgsm:members`` on ensembles (the first report's attack: I-FGSM on
``sum_k ||f_k(x) - t_k||^2``, every member feature pulled to the target's at once, success judged
on the ensemble embedding), an over-constrained objective, weaker by construction, against
``ifgsm``; and ``cw:patience<cw_check_patience>`` on the runs of ``cw_check_methods``, on the
first ``cw_check_pairs`` attacked pairs (CW that waits long costs up to its 1,000 iterations on
every pair), against ``cw``: the same CW (c escalating on the same schedule) that waits longer
before it stops, so its search extends the plan's CW's; whether CW's stopping rule left smaller
examples unfound.
Every attack records the code commit that computed it (``computed_with``: the commit of the
process's checkout when it started, ``unknown`` outside a git checkout, ``None`` for results
computed before commits were kept) and ``robustness.json`` the process that wrote it.

Results go to ``<out>/per_run/<run>/robustness.json`` (summary, curves) and
``robustness.npz`` (per-pair arrays), so they outlive the run directories. Each attack's result
is also kept as it finishes in ``<workdir>/suite_robustness/`` (keyed by its settings, the
checkpoint step, the pairs and the threshold), so an interrupted stage resumes after the last
finished attack and a plan that gains an attack runs only that one; results of an attack whose
settings did not change are also taken from an existing ``robustness.npz``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

try:
  import fcntl
except ImportError:  # Windows: no flock; one process per stage
  fcntl = None

from faceens import api, attack, provenance
from faceens.attacks import lots
from faceens.models import ensemble


@dataclasses.dataclass(frozen=True)
class RobustPlan:
  """Every setting of the stage (stored beside each result; a change reruns it)."""
  step_size: float = 1.0 / 10200       # I-FGSM: the first report's fine sign step
  max_iters: int = 1000
  cw_lr: float = 0.005
  cw_c: float = 0.1
  cw_patience: int = 30                # "until it stops improving"
  cw_max_iters: int = 1000
  bim_epsilon: float = 0.05            # the paper's 0.1 on [-1, 1] inputs (see the docstring)
  bim_step: float = 1.0 / 255
  bim_max_iters: int = 200
  pgd_budgets: tuple[float, ...] = (1.0 / 255, 2.0 / 255, 4.0 / 255)
  pgd_restarts: int = 5
  pgd_steps: int = 20                  # per restart, step = budget / 4
  pgd_l2_budgets: tuple[float, ...] = (0.5, 1.0)  # fixed-budget L2 PGD: the masking check in L2
  l2_budgets: tuple[float, ...] = tuple(float(v) for v in np.round(np.geomspace(0.05, 2.0, 12), 4))
  linf_budgets: tuple[float, ...] = (0.5 / 255, 1.0 / 255, 2.0 / 255, 4.0 / 255, 8.0 / 255)
  chunk: int = 8
  batch_size: int = 256
  # Diagnostics beside the worst case, never part of it, on runs of these seeds at this operating
  # point: the first report's ``ifgsm:members`` (every member feature pulled at once) on
  # ensembles, and CW's stopping rule checked by the same CW with a longer patience (name
  # "cw:patience<n>") on these methods' runs, on the first ``cw_check_pairs`` attacked pairs.
  diagnostic_far: float = 0.01
  diagnostic_seeds: tuple[int, ...] = (0,)
  cw_check_patience: int = 150
  cw_check_methods: tuple[str, ...] = ("single", "srv_fdp")
  cw_check_pairs: int = 64

  def diagnostics(self, method: str, num_members: int, seed: int) -> dict:
    """``{name: (config, the attack of the plan it is compared with, at most this many of the
    attacked pairs or None for all)}`` for a run of ``method`` with ``num_members`` members
    trained with ``seed``."""
    if seed not in self.diagnostic_seeds:
      return {}
    out = {}
    if num_members > 1:
      out["ifgsm:members"] = (lots.AttackConfig(method="ifgsm", objective="members",
                                                step_size=self.step_size,
                                                max_iters=self.max_iters).validate(), "ifgsm", None)
    if method in self.cw_check_methods:
      out[f"cw:patience{self.cw_check_patience}"] = (
          lots.AttackConfig(method="cw", cw_lr=self.cw_lr, cw_c=self.cw_c,
                            cw_patience=self.cw_check_patience, max_iters=self.cw_max_iters,
                            # c escalates as in the plan's CW: only the stopping rule differs
                            cw_escalate_every=max(self.cw_patience, 10)).validate(),
          "cw", self.cw_check_pairs)
    return out

  def configs(self) -> dict[str, lots.AttackConfig]:
    out = {"ifgsm": lots.AttackConfig(method="ifgsm", step_size=self.step_size,
                                      max_iters=self.max_iters),
           "cw": lots.AttackConfig(method="cw", cw_lr=self.cw_lr, cw_c=self.cw_c,
                                   cw_patience=self.cw_patience, max_iters=self.cw_max_iters),
           "bim": lots.AttackConfig(method="bim", step_size=self.bim_step,
                                    epsilon=self.bim_epsilon, max_iters=self.bim_max_iters)}
    for b in self.pgd_budgets:
      out[f"pgd_{b * 255:g}"] = lots.AttackConfig(method="pgd", epsilon=b, step_size=b / 4,
                                                  max_iters=self.pgd_steps)
    for b in self.pgd_l2_budgets:
      out[f"pgd_l2_{b:g}"] = lots.AttackConfig(method="pgd_l2", epsilon=b, step_size=b / 4,
                                               max_iters=self.pgd_steps)
    return {k: v.validate() for k, v in out.items()}

  def as_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


SMOKE_ROBUST_PLAN = RobustPlan(step_size=2.0 / 255, max_iters=12, cw_max_iters=12, cw_patience=3,
                               bim_max_iters=6, pgd_budgets=(4.0 / 255,), pgd_restarts=2,
                               pgd_steps=4, pgd_l2_budgets=(1.0,), chunk=4, batch_size=16,
                               diagnostic_far=0.1, cw_check_patience=6, cw_check_pairs=2)

FIELDS = ("l2", "linf", "success", "iterations", "distance")
# Relative slack on L2 budgets: an example projected onto the ball of radius b measures b up to
# float32 rounding of its norm (summation over the pixels, the projection's scale, the re-measured
# norm: a few 1e-7 relative), so "within b" means L2 <= b (1 + L2_RTOL).
L2_RTOL = 1e-5
# And L_inf <= b (1 + LINF_RTOL). I-FGSM never projects: it reaches b after n = b / s sign steps
# of s, each addition rounding by less than 6e-8 (an ulp of a pixel in [0, 1)) and, near 1, in
# the same direction every step, so an example on the budget measures up to b (1 + 6e-8 / s):
# b (1 + 6.1e-4) at the plan's s = 1/10200 (on the stored LFW suite, thousands of I-FGSM
# examples measure above n s, by up to 1.06e-4 relative, as the walk in the test does).
# Projected attacks (PGD, BIM) are off by half an ulp at most. The next grid point, b + s, stays
# outside for every L_inf budget below s / LINF_RTOL = 25/255 at that step.
LINF_RTOL = 1e-3


def _one_attack(model, x_src, emb_t, goal, cfg, plan: RobustPlan, seed: int, progress, desc):
  r = attack.run_compacted(model, x_src, emb_t, goal, cfg, chunk=plan.chunk,
                           max_batch=plan.batch_size, seed=seed, progress=progress, desc=desc)
  return {k: np.asarray(r[k]) for k in ("l2", "linf", "success", "iterations", "distance")} | {
      "seconds": float(r["seconds"])}


def _pgd(model, x_src, emb_t, goal, cfg, plan: RobustPlan, progress, desc):
  """``pgd_restarts`` random starts; per pair the least-L2 success (or the last restart)."""
  best = None
  seconds = 0.0
  for k in range(plan.pgd_restarts):
    r = _one_attack(model, x_src, emb_t, goal, cfg, plan, seed=1000 + k, progress=progress,
                    desc=f"{desc} restart {k + 1}")
    seconds += r["seconds"]
    if best is None:
      best = r
      continue
    better = r["success"] & (~best["success"] | (r["l2"] < best["l2"]))
    for key in ("l2", "linf", "success", "distance"):
      best[key] = np.where(better, r[key], best[key])
    best["iterations"] = best["iterations"] + r["iterations"]  # the work spent on the pair
  best["seconds"] = seconds
  return best


def worst_case_l2(per_attack: dict, pre_accepted) -> np.ndarray:
  """Per pair, the smallest L2 of a successful example over ``per_attack`` (``{name: {"l2",
  "success"}}``); 0 where the pair is accepted clean, inf where no attack succeeded."""
  n = len(pre_accepted)
  best = np.full(n, np.inf)
  for r in per_attack.values():
    best = np.where(r["success"] & (r["l2"] < best), r["l2"], best)
  return np.where(pre_accepted, 0.0, best)


def still_rejected(worst: np.ndarray, budget: float, rtol: float) -> np.ndarray:
  """Per pair: the worst case lies beyond ``budget`` (an example of the budget's size, up to
  ``rtol`` relative, breaks the pair)."""
  return np.asarray(worst) > budget * (1 + rtol)


def robust_accuracy_l2(worst: np.ndarray, budgets) -> list[float]:
  """Share of the pairs still rejected under each L2 budget: worst-case L2 above the budget
  (up to ``L2_RTOL``)."""
  return [float(np.mean(still_rejected(worst, b, L2_RTOL))) for b in budgets]


def worst_case_linf(per_attack: dict, pre_accepted) -> np.ndarray:
  """Per pair, the smallest L_inf of a successful example over ``per_attack`` (``{name:
  {"linf", "success"}}``); 0 where the pair is accepted clean, inf where no attack succeeded."""
  return worst_case_l2({k: {"l2": r["linf"], "success": r["success"]}
                        for k, r in per_attack.items()}, pre_accepted)


def robust_accuracy_linf(per_attack: dict, pre_accepted, budgets) -> list[float]:
  """Share of the pairs with no successful example of L_inf <= budget (any attack)."""
  worst = worst_case_linf(per_attack, pre_accepted)
  return [float(np.mean(still_rejected(worst, b, LINF_RTOL))) for b in budgets]


def _attack_key(cfg, plan: RobustPlan, name: str, step: int, pairs: list, goal: float,
                limit: int | None = None) -> str:
  """What one attack's per-pair result depends on (its cache key); ``limit``: a diagnostic on
  the first ``limit`` attacked pairs only."""
  restarts = plan.pgd_restarts if name.startswith("pgd") else 1
  key = {"config": lots.config_dict(cfg), "restarts": restarts, "step": step, "pairs": pairs,
         "threshold": goal}
  return json.dumps(key | ({"max_pairs": limit} if limit is not None else {}), sort_keys=True)


def _previous_results(out_dir: str, n: int):
  """``(far, name, cfg, plan, step, pairs, goal) -> full result or None``, from an existing
  ``robustness.json`` / ``.npz`` (what an earlier plan already computed)."""
  path = os.path.join(out_dir, "robustness.json")
  if not (os.path.isfile(path) and os.path.isfile(os.path.join(out_dir, "robustness.npz"))):
    return lambda *a: None
  with open(path) as f:
    doc = json.load(f)
  with np.load(os.path.join(out_dir, "robustness.npz")) as z:
    arrays = {k: z[k] for k in z.files}
  key = doc.get("key", {})

  def lookup(far, name, cfg, plan, step, pairs, goal, limit=None):
    point = doc.get("operating_points", {}).get(far, {})
    entry = point.get("attacks", {}).get(name) or point.get("diagnostics", {}).get(name)
    old_plan = key.get("plan", {})
    if (entry is None or key.get("step") != step or key.get("pairs") != pairs
        or entry.get("max_pairs") != limit):
      return None
    restarts = old_plan.get("pgd_restarts") if name.startswith("pgd") else 1
    want_restarts = plan.pgd_restarts if name.startswith("pgd") else 1
    if (point.get("threshold") != goal or restarts != want_restarts
        or entry.get("config") != json.loads(json.dumps(lots.config_dict(cfg)))):
      return None
    try:
      full = {k: arrays[f"{far}/{name}/{k}"] for k in FIELDS}
    except KeyError:
      return None
    if any(len(v) != n for v in full.values()):
      return None
    # (no None into the cache's npz: it would need pickling to load)
    commit = entry.get("computed_with")
    return full | {"seconds": float(entry.get("seconds", 0.0))} | (
        {"computed_with": commit} if commit else {})
  return lookup


def _cached(cache_dir: str, tag: str, key: str, compute) -> dict:
  """``compute()`` (a dict of arrays and numbers), kept in ``cache_dir/tag.npz`` under ``key``;
  numbers come back as Python scalars."""
  path = os.path.join(cache_dir, tag + ".npz")
  if os.path.isfile(path):
    with np.load(path) as z:
      if str(z["key"]) == key:
        return {k: z[k].item() if z[k].ndim == 0 else z[k] for k in z.files if k != "key"}
  r = compute()
  os.makedirs(cache_dir, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, key=np.asarray(key), **{k: np.asarray(v) for k, v in r.items()})
  os.replace(tmp, path)
  return r


def _missed(per_attack: dict, pre, budgets, pgd_name, norm: str) -> dict:
  """Per budget: pairs the fixed-budget attack ``pgd_name(b)`` breaks inside ``b`` that no
  minimal-norm attack (every non-PGD attack) broke with an example of ``norm`` <= ``b``."""
  minimal = {k: v for k, v in per_attack.items() if not k.startswith("pgd")}
  out = {}
  for b, label in budgets:
    by_pgd = per_attack[pgd_name(b)]["success"]
    by_minimal = np.zeros(len(pre), bool)
    rtol = L2_RTOL if norm == "l2" else LINF_RTOL
    for r in minimal.values():
      by_minimal |= r["success"] & ~still_rejected(r[norm], b, rtol)
    out[label] = int(np.sum(by_pgd & ~by_minimal & ~pre))
  return out


def derived(per_attack: dict, pre, plan: dict) -> dict:
  """What an operating point's summary derives from its attacks' per-pair arrays (``{name: {"l2",
  "linf", "success"}}``, diagnostics left out) under ``plan``'s budgets (``RobustPlan.as_dict``):
  the worst-case median, robust accuracy under L2 and L_inf budgets, and the masking checks. The
  report recomputes it from the stored arrays, so every run is read under the current rule."""
  worst = worst_case_l2(per_attack, pre)
  return {
      "worst_case_l2_median": float(np.median(worst)),
      "robust_accuracy_l2": dict(zip([f"{b:g}" for b in plan["l2_budgets"]],
                                     robust_accuracy_l2(worst, plan["l2_budgets"]))),
      "robust_accuracy_linf": dict(zip([f"{b * 255:g}/255" for b in plan["linf_budgets"]],
                                       robust_accuracy_linf(per_attack, pre,
                                                            plan["linf_budgets"]))),
      "pgd_breaks_missed_by_minimal_norm": _missed(
          per_attack, pre, [(b, f"{b * 255:g}/255") for b in plan["pgd_budgets"]],
          lambda b: f"pgd_{b * 255:g}", "linf"),
      "pgd_l2_breaks_missed_by_minimal_norm": _missed(
          per_attack, pre, [(b, f"{b:g}") for b in plan["pgd_l2_budgets"]],
          lambda b: f"pgd_l2_{b:g}", "l2")}


def _against(diag: dict, per_attack: dict, todo, reference: str) -> dict:
  """A diagnostic against the plan's ``reference`` attack on the pairs ``todo`` it ran on: the
  reference's success and median L2 there, the median L2 ratio over the pairs both broke, and
  the pairs where the diagnostic found a smaller example than the reference (by more than
  ``L2_RTOL``) or the only one."""
  ref = per_attack[reference]
  ok, ref_ok = diag["success"][todo], ref["success"][todo]
  both = ok & ref_ok
  l2, ref_l2 = diag["l2"][todo], ref["l2"][todo]
  smaller = ok & (~ref_ok | (l2 < ref_l2 * (1 - L2_RTOL)))
  return {"reference": reference,
          "reference_success_rate": float(ref_ok.mean()) if len(todo) else None,
          "reference_l2_median": float(np.median(ref_l2[ref_ok])) if ref_ok.any() else None,
          "l2_ratio_median": float(np.median(l2[both] / ref_l2[both])) if both.any() else None,
          "smaller_than_reference": int(smaller.sum())}


def attack_run(model, pairs: dict, calibration_doc: dict, plan: RobustPlan, out_dir: str,
               progress: bool = True, code: dict | None = None) -> dict:
  """The stage on one run (see the module docstring); reused when done with the same plan.
  ``code``: ``provenance.record()`` taken when the process started (its commit is the code it
  loaded; the checkout may have moved on since), recorded with every attack it computes."""
  path = os.path.join(out_dir, "robustness.json")
  diagnostics = plan.diagnostics(model.config.method, model.num_members, model.config.seed)
  key = {"plan": plan.as_dict(), "step": model.step, "pairs": pairs["names"],
         "operating_points": {f: p["threshold"]
                              for f, p in calibration_doc["operating_points"].items()},
         # the diagnostics' own settings (a change in how one is built reruns it)
         "diagnostics": {k: [lots.config_dict(c), ref, limit]
                         for k, (c, ref, limit) in diagnostics.items()}}
  if os.path.isfile(path):
    with open(path) as f:
      done = json.load(f)
    if done.get("key") == json.loads(json.dumps(key)):
      return done
  x_src, x_tgt = model.prepare(pairs["src"]), model.prepare(pairs["tgt"])
  feats_t = model.member_features(x_tgt)
  emb_t = ensemble.ensemble_embedding(feats_t)
  d0 = np.linalg.norm(model.embed(x_src) - emb_t, axis=1)
  n = len(x_src)
  previous = _previous_results(out_dir, n)
  cache_dir = os.path.join(model.workdir, "suite_robustness")
  pair_names = json.loads(json.dumps(pairs["names"]))
  arrays, summary = {"clean_distance": d0}, {}
  code = code or provenance.record()
  commit = code["commit"] or "unknown"
  for far, point in calibration_doc["operating_points"].items():
    goal = float(point["threshold"])
    pre = d0 < goal
    todo = np.flatnonzero(~pre)
    summary[far] = {"threshold": goal, "pre_accepted": int(pre.sum()), "attacked": int(len(todo)),
                    "attacks": {}}
    per_attack = {}
    runs = [(name, cfg, None) for name, cfg in plan.configs().items()]
    if diagnostics and float(far) == plan.diagnostic_far:
      runs += [(name, cfg, limit) for name, (cfg, _, limit) in diagnostics.items()]
      summary[far]["diagnostics"] = {}
    for name, cfg, limit in runs:
      desc = f"{model.config.method} FAR {far} {name}"
      sub = todo[:limit]   # the pairs this attack runs on (all attacked pairs unless limited)

      def compute(name=name, cfg=cfg, desc=desc, sub=sub, limit=limit):
        old = previous(far, name, cfg, plan, model.step, pair_names, goal, limit)
        if old is not None:
          return old
        targets = feats_t[:, sub] if cfg.objective == "members" else emb_t[sub]
        if not len(sub):
          r = {"l2": np.zeros(0), "linf": np.zeros(0), "success": np.zeros(0, bool),
               "iterations": np.zeros(0, np.int64), "distance": np.zeros(0), "seconds": 0.0}
        elif name.startswith("pgd"):
          r = _pgd(model, x_src[sub], targets, goal, cfg, plan, progress, desc)
        else:
          r = _one_attack(model, x_src[sub], targets, goal, cfg, plan, seed=0,
                          progress=progress, desc=desc)
        attack.release_compiled()   # this attack's programs (see its docstring)
        full = {"l2": np.full(n, np.nan), "linf": np.full(n, np.nan),
                "success": np.zeros(n, bool), "iterations": np.zeros(n, np.int64),
                "distance": d0.copy()}
        for k in full:
          full[k][sub] = r[k]
        return full | {"seconds": r["seconds"], "computed_with": commit}

      full = _cached(cache_dir, f"{far}_{name.replace(':', '_')}",
                     _attack_key(cfg, plan, name, model.step, pair_names, goal, limit), compute)
      seconds = full.pop("seconds")
      # The code commit that computed it; None for results computed before commits were kept.
      computed_with = full.pop("computed_with", None)
      for k, v in full.items():
        arrays[f"{far}/{name}/{k}"] = v
      ok = full["success"][sub]
      entry = {
          "config": lots.config_dict(cfg), "success_rate": float(ok.mean()) if len(sub) else None,
          "l2_median": float(np.median(full["l2"][sub][ok])) if ok.any() else None,
          "iterations_median": float(np.median(full["iterations"][sub])) if len(sub) else None,
          "hit_cap": int(np.sum(full["iterations"][sub] >= cfg.max_iters * (
              plan.pgd_restarts if name.startswith("pgd") else 1))),
          "seconds": seconds, "computed_with": computed_with}
      if name in diagnostics:
        summary[far]["diagnostics"][name] = entry | {"max_pairs": limit, "attacked": len(sub)} | (
            _against(full, per_attack, sub, diagnostics[name][1]))
      else:
        per_attack[name] = full
        summary[far]["attacks"][name] = entry
      if progress:
        print(f"  FAR {far} {name}: success {entry['success_rate']}, median L2 "
              f"{entry['l2_median']}, {seconds:.0f} s", flush=True)
    arrays[f"{far}/worst_case_l2"] = worst_case_l2(per_attack, pre)
    arrays[f"{far}/pre_accepted"] = pre
    summary[far].update(derived(per_attack, pre, plan.as_dict()))
  tmp = os.path.join(out_dir, "robustness.tmp.npz")
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, os.path.join(out_dir, "robustness.npz"))
  doc = {"key": key, "pairs": int(n), "operating_points": summary,
         "written_with": code}
  with open(path + ".tmp", "w") as f:
    json.dump(doc, f, indent=2)
  os.replace(path + ".tmp", path)
  return doc


def claim(path: str) -> int | None:
  """An exclusive, non-blocking ``flock`` on the file ``path`` (created if missing, never
  deleted): the open descriptor while this process holds it (``os.close`` releases it), None
  while another process does. The kernel releases the lock when its process exits, however it
  exits, so a crashed stage leaves nothing to clean up. (Across hosts it needs a file system
  whose ``flock`` is shared, e.g. local disks or NFSv4; without ``fcntl``, on Windows, it never
  refuses: run one process per stage there.)"""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
  if fcntl is None:
    return fd
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  return fd


def robustness_all(suite, export_dir, trained_runs, pairs_for, calibration_for,
                   progress: bool = True, poll_seconds: float = 60.0) -> list[str]:
  """The stage over every finished run of ``suite`` (``trained_runs()``: their specs, asked again
  after each run so runs finishing meanwhile are attacked too); returns the runs this process
  attacked (or found done).

  Several processes can share the queue (one per core, each ``--stages=robustness``): each
  takes a run under a lock (``<workdir>/suite_robustness/stage.lock``) and passes over the runs
  others hold; when only those are left it waits for them (``poll_seconds``), so the stage ends
  in every process only when every run is done, and a run whose process died is taken over."""
  plan = SMOKE_ROBUST_PLAN if suite.smoke else RobustPlan()
  code = provenance.record()   # the code this process loaded, whatever the checkout does later
  done: list = []
  waiting = False
  while True:
    todo = [r for r in trained_runs() if r not in done]
    if not todo:
      return [suite.run_name(r) for r in done]
    for run in todo:
      fd = claim(os.path.join(suite.workdir(run), "suite_robustness", "stage.lock"))
      if fd is not None:
        break
    else:
      if progress and not waiting:
        print("robustness: waiting for the other processes on "
              + ", ".join(suite.run_name(r) for r in todo), flush=True)
      waiting = True
      time.sleep(poll_seconds)
      continue
    waiting = False
    try:
      if progress:
        print(f"robustness: {suite.run_name(run)}", flush=True)
      model = api.load(suite.workdir(run))
      attack_run(model, pairs_for(model.config), calibration_for(run), plan, export_dir(run),
                 progress=progress, code=code)
    finally:
      os.close(fd)
      model = None
      attack.release_compiled()
    done.append(run)
