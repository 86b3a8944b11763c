"""Suite v2's report: ``REPORT.md`` and ``results.json`` from the exported per-run results
alone (``<out>/per_run/<run>/``: ``run.json``, ``test_pairs.npz``, ``robustness.json`` /
``.npz``), so it can be rewritten in any checkout, without the run directories.

Statistics (fixed before looking at any result):

  * a method's robustness at an operating point: the mean over its training seeds of the median
    over the attack pairs of the per-pair worst-case L2 (pairs accepted clean count as 0, pairs
    no attack broke as infinite); its clean accuracy: the mean over seeds of the official-fold
    accuracy (InsightFace protocol) on the 3,000 test pairs;
  * a comparison A - B rests on the training seeds both methods have, paired: one seed fixes
    the initial weights and the batch order of every method's run (the single model and AdvT
    start from member 0's), so same-seed runs are related and the seed is a shared factor;
  * intervals: 95% percentile bootstrap, hierarchical: the common seeds resampled jointly, then
    the pairs (the same resampled pairs for every seed and both sides: the attack pairs are
    common to all runs; test pairs within their official folds). With 3 seeds, resampling seeds
    cannot reach beyond the seeds' own range, so the seed part of an interval covers less than
    its nominal 95%: each comparison also lists every seed's own difference;
  * verdicts on a difference A - B, checked in this order: ``more robust`` (interval above 0),
    ``less robust`` (below 0), ``equivalent`` (inside +-``L2_MARGIN``), else ``cannot tell``
    (also when the interval is undefined: both medians unbroken in some draw); for accuracy,
    ``no loss`` when the interval's lower end is above -``ACCURACY_MARGIN``, ``loss`` when its
    upper end is below it, else ``cannot tell``.

Changed after the first results (stated in the report): the seeds were resampled independently
per method, over every seed each had, and the accuracy interval used 300 draws.
"""

from __future__ import annotations

import json
import os

import numpy as np

from faceens import plot, provenance, verification
from faceens.reproduce_robustness import (L2_RTOL, LINF_RTOL, RobustPlan, derived,
                                          robust_accuracy_l2, still_rejected, worst_case_l2,
                                          worst_case_linf)
# (the rule applied to the stored numbers, so a report follows the current rule)
from faceens.reproduce_transfer import verdict as transfer_verdict

L2_MARGIN = 0.02          # L2 in [0, 1] pixels at 64x64x3 (one sign step of 1/255 moves 0.43)
ACCURACY_MARGIN = 0.01    # one percentage point
BOOTSTRAP = 2000
ACC_BOOTSTRAP = 2000
# Draws behind the family-wise check of the claims' robustness comparisons: the same stream as
# the 95% intervals (whose first BOOTSTRAP draws they are), long enough that the Bonferroni tails
# (0.05 / 2m of the draws, m about 30) hold more than a handful of draws each.
FAMILY_BOOTSTRAP = 20000
FAMILY_ALPHA = 0.05
LABELS = {"single": "single", "baseline": "baseline", "adp": "ADP", "fdp": "FDP", "srv": "SRV",
          "srv_adp": "SRV+ADP", "srv_fdp": "SRV+FDP", "advt": "AdvT (m 0.6)"}
ENSEMBLES = ("baseline", "adp", "fdp", "srv", "srv_adp")


def method_key(run: dict) -> str:
  """``advt`` at the experiment's margin 0.6, ``advt_m1.4`` at another; else the method."""
  m = run["method"]
  if m == "advt" and run.get("advt_margin") not in (None, 0.6):
    return f"advt_m{run['advt_margin']:g}"
  return m


def label(key: str) -> str:
  return LABELS.get(key) or (f"AdvT (m {key.split('_m')[1]})" if key.startswith("advt_m") else key)


def load_runs(out: str) -> list[dict]:
  """Every exported run under ``out/per_run`` with its arrays (robustness may be missing)."""
  root = os.path.join(out, "per_run")
  runs = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    d = os.path.join(root, name)
    path = os.path.join(d, "run.json")
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      run = json.load(f)
    with np.load(os.path.join(d, "test_pairs.npz")) as z:
      run["test_pairs"] = {k: z[k] for k in z.files}
    run["robustness"] = None
    if os.path.isfile(os.path.join(d, "robustness.json")):
      with open(os.path.join(d, "robustness.json")) as f:
        run["robustness"] = json.load(f)
      with np.load(os.path.join(d, "robustness.npz")) as z:
        run["robustness_arrays"] = {k: z[k] for k in z.files}
      _rederive(run)
    runs.append(run)
  return runs


def _rederive(run: dict) -> None:
  """Each operating point's summary recomputed from the run's stored per-pair arrays under the
  current rule (``reproduce_robustness.derived``, e.g. its budget tolerances) and the run's own
  plan, so runs attacked under an older rule are read like the rest."""
  for far, op in run["robustness"]["operating_points"].items():
    op.update(derived(_per_attack(run, far), run["robustness_arrays"][f"{far}/pre_accepted"],
                      run["robustness"]["key"]["plan"]))


def _per_attack(run: dict, far: str) -> dict:
  """The stored per-pair arrays of the attacks counted for the worst case (no diagnostics)."""
  a = run["robustness_arrays"]
  return {n: {k: a[f"{far}/{n}/{k}"] for k in ("l2", "linf", "success")}
          for n in run["robustness"]["operating_points"][far]["attacks"]}


def _interval(stats: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
  """The alpha/2 and 1 - alpha/2 order statistics (inf-safe; 2.5% / 97.5% by default); nan, nan
  when any draw is undefined (inf - inf: both sides' medians unbroken), which no verdict can rest
  on."""
  s = np.sort(np.asarray(stats, float))
  if np.isnan(s).any():
    return float("nan"), float("nan")
  n = len(s)
  return (float(s[min(int(alpha / 2 * n), n - 1)]),
          float(s[max(int(np.ceil((1 - alpha / 2) * n)) - 1, 0)]))


def _paired(a, b, what: str):
  if len(a) != len(b) or not len(a):
    raise ValueError(f"{what}: the two sides must hold the same seeds, in the same order "
                     f"(got {len(a)} and {len(b)})")


def robustness_difference(a: np.ndarray, b: np.ndarray, n: int = BOOTSTRAP, seed: int = 0,
                          keep: int = 0, over_pairs: str = "median") -> dict:
  """``a``, ``b`` ``[S, P]``: per-pair worst-case L2 of two methods on the same pairs, row s of
  both from the same training seed (which fixes both runs' initial weights and batch order).
  Mean over seeds of the median over pairs (``over_pairs="mean"``: of the mean, e.g. of 0/1
  "still rejected under a budget", a robust accuracy), A - B, with the hierarchical bootstrap
  interval:
  the seeds resampled jointly (paired), then the pairs, shared by every seed and both sides;
  ``per_seed``: each seed's own difference. ``keep`` > ``n``: ``draws`` holds the first ``keep``
  draws of the same stream (the interval still comes from the first ``n``)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  _paired(a, b, "robustness_difference")
  if a.shape != b.shape:
    raise ValueError(f"robustness_difference: [seeds, pairs] {a.shape} vs {b.shape}")

  if over_pairs not in ("median", "mean"):
    raise ValueError(f"robustness_difference: over_pairs must be 'median' or 'mean', got "
                     f"{over_pairs!r}")
  reduce = np.median if over_pairs == "median" else np.mean

  def stat(x):
    return np.mean(reduce(x, axis=-1), axis=-1)
  rng = np.random.default_rng(seed)
  s, p = a.shape
  total = max(n, keep)
  # One draw: seed rows si, then pair columns idx shared by every seed and both sides (drawn in
  # this order, draw by draw, so a longer stream extends a shorter one).
  si, idx = np.empty((total, s), int), np.empty((total, p), int)
  for i in range(total):
    si[i], idx[i] = rng.integers(0, s, s), rng.integers(0, p, p)
  diffs = np.empty(total)
  with np.errstate(invalid="ignore"):
    for lo in range(0, total, 1000):
      sl = slice(lo, lo + 1000)
      rows, cols = si[sl][:, :, None], idx[sl][:, None, :]
      diffs[sl] = stat(a[rows, cols]) - stat(b[rows, cols])
    diff = float(stat(a) - stat(b))
    per_seed = reduce(a, axis=1) - reduce(b, axis=1)
  lo, hi = _interval(diffs[:n])
  out = {"difference": diff, "lo": lo, "hi": hi,
         "per_seed": [float(v) for v in per_seed], "pairs": int(p)}
  if keep > n:
    out["draws"] = diffs
  return out


def _fold_resamples(folds: np.ndarray, n: int, seed: int) -> np.ndarray:
  """``[n, P]`` bootstrap draws of the test pairs as counts, resampled within each fold."""
  rng = np.random.default_rng(seed)
  groups = [np.flatnonzero(folds == f) for f in np.unique(folds)]
  counts = np.zeros((n, len(folds)), np.int64)
  for i in range(n):
    for g in groups:
      np.add.at(counts[i], rng.choice(g, len(g)), 1)
  return counts


def bootstrap_accuracies(runs: list[dict], n: int = ACC_BOOTSTRAP, seed: int = 0) -> dict:
  """``{run name: (accuracy, [n] accuracies of the shared resamples of the test pairs)}``, the
  official-fold accuracy (InsightFace protocol) of every run on the same ``n`` resamples
  (``verification.kfold_accuracy_resampled``). Every run has the same test pairs and folds."""
  first = runs[0]["test_pairs"]
  issame, folds = first["issame"].astype(bool), first["fold"]
  for r in runs:
    if not (np.array_equal(r["test_pairs"]["issame"].astype(bool), issame)
            and np.array_equal(r["test_pairs"]["fold"], folds)):
      raise ValueError(f"{r['run']}: its test pairs differ from {runs[0]['run']}'s "
                       "(labels or folds): re-export the runs")
  counts = _fold_resamples(folds, n, seed)
  out = {}
  for r in runs:
    d = r["test_pairs"]["insightface"]
    out[r["run"]] = (verification.kfold_accuracy(d, issame, folds=folds)[0],
                     verification.kfold_accuracy_resampled(d, issame, folds, counts))
  return out


def accuracy_difference(a: list, b: list, seed: int = 0) -> dict:
  """``a``, ``b``: per seed (same seeds, same order), ``(accuracy, [B] resampled accuracies)``
  from ``bootstrap_accuracies``. Mean accuracy of A minus B, with the hierarchical bootstrap:
  seeds resampled jointly, then the shared test-pair resamples."""
  _paired(a, b, "accuracy_difference")
  acc_a, acc_b = np.array([x[0] for x in a]), np.array([x[0] for x in b])
  boot_a, boot_b = np.stack([x[1] for x in a]), np.stack([x[1] for x in b])
  rng = np.random.default_rng(seed)
  s, draws = boot_a.shape
  si = rng.integers(0, s, (draws, s))
  cols = np.arange(draws)[:, None]
  diffs = boot_a.T[cols, si].mean(1) - boot_b.T[cols, si].mean(1)
  lo, hi = _interval(diffs)
  return {"difference": float(acc_a.mean() - acc_b.mean()), "lo": lo, "hi": hi,
          "per_seed": [float(v) for v in acc_a - acc_b]}


def common_seeds(a: list[dict], b: list[dict]) -> tuple[list[dict], list[dict], list[int]]:
  """The runs of ``a`` and ``b`` from the training seeds both have, paired in seed order."""
  sa, sb = {r["seed"]: r for r in a}, {r["seed"]: r for r in b}
  seeds = sorted(set(sa) & set(sb))
  return [sa[s] for s in seeds], [sb[s] for s in seeds], seeds


def robustness_verdict(d: dict, margin: float = L2_MARGIN) -> str:
  if d["lo"] > 0:
    return "more robust"
  if d["hi"] < 0:
    return "less robust"
  if -margin <= d["lo"] and d["hi"] <= margin:
    return f"equivalent (within +-{margin:g})"
  return "cannot tell"


def accuracy_verdict(d: dict) -> str:
  if d["lo"] > -ACCURACY_MARGIN:
    return "no loss"
  if d["hi"] < -ACCURACY_MARGIN:
    return "loss"
  return "cannot tell"


ATTACK_VIEWS = ("worst_case", "ifgsm", "cw", "bim")
# The claims read on robust accuracy at one budget instead of the median L2: (view, norm, budget).
# Chosen after the robustness tables were seen, as budgets where the non-AdvT models' robust
# accuracy is far from 0 and 1 (the report says so). Their equivalence margin is L2_MARGIN's
# number read as a share of pairs (``ROBUST_ACCURACY_MARGIN``), also set after the results.
BUDGET_VIEWS = (("l2<=0.5", "l2", 0.5), ("linf<=2/255", "linf", 2.0 / 255))
ROBUST_ACCURACY_MARGIN = L2_MARGIN
# The readings beside the headline worst case, one column each in the claims tables.
CLAIM_VIEWS = ATTACK_VIEWS[1:] + tuple(v[0] for v in BUDGET_VIEWS)


def _still_rejected(runs: list[dict], far: str, norm: str, budget: float) -> np.ndarray:
  """``[S, P]`` 1.0 where the pair withstands every attack's examples (counted for the worst
  case) within ``budget`` in ``norm``, else 0.0 (pre-accepted pairs 0): the mean over pairs is
  robust accuracy by the robustness stage's rule (``robust_accuracy_l2`` / ``_linf``) at this
  budget."""
  out = []
  for r in runs:
    if norm == "l2":
      worst, rtol = r["robustness_arrays"][f"{far}/worst_case_l2"], L2_RTOL
    else:
      worst = worst_case_linf(_per_attack(r, far), r["robustness_arrays"][f"{far}/pre_accepted"])
      rtol = LINF_RTOL
    out.append(still_rejected(worst, budget, rtol))
  return np.stack(out).astype(float)


def _worst(runs: list[dict], far: str, attack: str = "worst_case") -> np.ndarray:
  """``[S, P]`` per-seed, per-pair L2 at ``far``: the worst case over attacks, or one attack's
  (inf where it failed, 0 where the pair was accepted clean, as in the worst case)."""
  if attack == "worst_case":
    return np.stack([r["robustness_arrays"][f"{far}/worst_case_l2"] for r in runs])
  arrays = [r["robustness_arrays"] for r in runs]
  return np.stack([worst_case_l2({attack: {"l2": a[f"{far}/{attack}/l2"],
                                           "success": a[f"{far}/{attack}/success"]}},
                                 a[f"{far}/pre_accepted"]) for a in arrays])


def claims(groups: dict, far: str, attack: str = "worst_case", keep: int = 0) -> list[dict]:
  """One entry per claim of the paper at operating point ``far``: the comparisons behind it,
  each with its verdict, and the paper's expectation; on the worst case over attacks (the
  headline), on one ``attack``'s minimal L2, or on robust accuracy at a budget (``attack`` one of
  ``BUDGET_VIEWS``' names: the difference of the shares of pairs still rejected). ``keep``:
  bootstrap draws kept per comparison (``draws``, for ``family_wise``)."""
  # The seeds attacked so far; a comparison rests on the seeds both sides have ("seeds").
  have = {k: [r for r in v if r["robustness"]] for k, v in groups.items()}

  def cmp(a, b):
    ra, rb, seeds = common_seeds(have.get(a, []), have.get(b, []))
    if not seeds:
      return None
    budget = {name: (norm, size) for name, norm, size in BUDGET_VIEWS}.get(attack)
    if budget:
      d = robustness_difference(_still_rejected(ra, far, *budget),
                                _still_rejected(rb, far, *budget), keep=keep, over_pairs="mean")
    else:
      d = robustness_difference(_worst(ra, far, attack), _worst(rb, far, attack), keep=keep)
    return {"a": a, "b": b, **d, "seeds": seeds,
            "verdict": robustness_verdict(d, ROBUST_ACCURACY_MARGIN if budget else L2_MARGIN)}
  out = []
  for m in ("baseline", "adp", "fdp"):
    out.append({"claim": f"{label(m)} does not enhance robustness over the single model",
                "expects": "equivalent or less robust", "pairs": [(m, "single")]})
  out.append({"claim": "SRV alone enhances robustness over the single model",
              "expects": "more robust", "pairs": [("srv", "single")]})
  out.append({"claim": "SRV+ADP does not enhance robustness over SRV",
              "expects": "equivalent or less robust", "pairs": [("srv_adp", "srv")]})
  out.append({"claim": "SRV+FDP is the most robust of the ensembles (and beats the single model)",
              "expects": "more robust",
              "pairs": [("srv_fdp", m) for m in ("single",) + ENSEMBLES]})
  advts = sorted(k for k in groups if k.startswith("advt")) or ["advt"]
  out.append({"claim": "SRV+FDP is more robust than adversarial training (every margin trained)",
              "expects": "more robust", "pairs": [("srv_fdp", m) for m in advts]})
  for c in out:
    done = [cmp(a, b) for a, b in c.pop("pairs")]
    c["comparisons"] = [x for x in done if x is not None]
    c["comparisons_missing"] = len(done) - len(c["comparisons"])
    c["verdict"] = _claim_verdict(c)
  return out


def family_wise(claims_by_far: dict, alpha: float = FAMILY_ALPHA) -> dict:
  """Bonferroni over every comparison behind the claims (``{far: claims(..., keep=...)}``, the
  family: all claims at all operating points): each comparison gets ``family_wise`` (its
  interval at 1 - alpha / m from its kept draws, and the verdict read from it) and each claim a
  ``family_wise_verdict``; the draws are dropped. Returns ``{"comparisons": m, "alpha": alpha,
  "draws": ...}``."""
  comps = [x for cs in claims_by_far.values() for c in cs for x in c["comparisons"]]
  m = len(comps)
  draws = min((len(x["draws"]) for x in comps), default=0)
  for x in comps:
    lo, hi = _interval(x.pop("draws"), alpha / m)
    x["family_wise"] = {"lo": lo, "hi": hi, "level": 1 - alpha / m,
                        "verdict": robustness_verdict({"lo": lo, "hi": hi})}
  for cs in claims_by_far.values():
    for c in cs:
      c["family_wise_verdict"] = _claim_verdict(
          c, [x["family_wise"]["verdict"] for x in c["comparisons"]])
  return {"comparisons": m, "alpha": alpha, "draws": draws}


def _claim_verdict(c: dict, vs: list[str] | None = None) -> str:
  """``supported`` / ``contradicted`` / ``cannot tell`` from the comparisons behind a claim (or
  from the verdicts ``vs`` of those comparisons); ``incomplete`` while some are not run (unless
  one already contradicts it)."""
  vs = [x["verdict"] for x in c["comparisons"]] if vs is None else vs
  n, missing = len(vs) + c["comparisons_missing"], c["comparisons_missing"]
  if c["expects"] == "more robust":
    against = any(v == "less robust" or v.startswith("equivalent") for v in vs)
    ok = bool(vs) and all(v == "more robust" for v in vs)
  else:
    against = any(v == "more robust" for v in vs)
    ok = bool(vs) and all(v == "less robust" or v.startswith("equivalent") for v in vs)
  if against:
    return "contradicted"
  if not vs:
    return "not run"
  if missing:
    return f"incomplete ({len(vs)} of {n} comparisons run{', so far consistent' if ok else ''})"
  return "supported" if ok else "cannot tell"


def write(out: str) -> str:
  """``REPORT.md`` and ``results.json`` in ``out``; returns the report's path."""
  runs = load_runs(out)
  if not runs:
    raise FileNotFoundError(f"no exported run under {os.path.join(out, 'per_run')} (each needs "
                            "run.json and test_pairs.npz): run the export stage first")
  groups: dict[str, list] = {}
  for r in runs:
    groups.setdefault(method_key(r), []).append(r)
  fars = sorted({f for r in runs if r["robustness"] for f in r["robustness"]["operating_points"]},
                key=float, reverse=True)
  results = {"methods": {}, "claims": {}, "accuracy_vs_single": {},
             "margins": {"l2": L2_MARGIN, "accuracy": ACCURACY_MARGIN,
                         "robust_accuracy": ROBUST_ACCURACY_MARGIN},
             "provenance": provenance.record()}
  for key, rs in sorted(groups.items()):
    results["methods"][key] = [_run_record(r) for r in rs]
  results["claims_by_attack"] = {}
  for far in fars:
    results["claims"][far] = claims(groups, far, keep=FAMILY_BOOTSTRAP)
    results["claims_by_attack"][far] = {
        a: claims(groups, far, a) for a in CLAIM_VIEWS}
  results["family_wise"] = family_wise(results["claims"])
  if "single" in groups:
    boot = bootstrap_accuracies(runs)
    for key, rs in sorted(groups.items()):
      if key != "single":
        ra, rb, seeds = common_seeds(rs, groups["single"])
        if seeds:
          d = accuracy_difference([boot[r["run"]] for r in ra], [boot[r["run"]] for r in rb])
          results["accuracy_vs_single"][key] = d | {"seeds": seeds,
                                                    "verdict": accuracy_verdict(d)}
  tpath = os.path.join(out, "transfer_v2.json")
  transfer = None
  if os.path.isfile(tpath):
    with open(tpath) as f:
      transfer = json.load(f)
    results["transfer"] = _summary_points(transfer["operating_points"])
    results["transfer_fixed_budget"] = {
        name: _summary_points(e["operating_points"])
        for name, e in transfer.get("fixed_budget", {}).get("attacks", {}).items()}
    if "cross_seed" in transfer:
      c = transfer["cross_seed"]
      results["transfer_cross_seed"] = {
          "sources": c["sources"], "targets": c["targets"],
          "minimal": _summary_points(c.get("operating_points", {})),
          "fixed_budget": {name: _summary_points(e["operating_points"])
                           for name, e in c["fixed_budget"].items()}}
  results["compute"] = compute_seconds(runs)
  results["figures"] = robustness_figures(groups, fars, out)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(_json_safe(results), f, allow_nan=False)
  path = os.path.join(out, "REPORT.md")
  with open(path, "w") as f:
    f.write(_markdown(groups, fars, results, transfer))
  return path


def _json_safe(x):
  """Strict JSON: an undefined number (nan) becomes null, an infinite one "inf" / "-inf"."""
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (float, np.floating)) and not np.isfinite(x):
    return None if np.isnan(x) else ("inf" if x > 0 else "-inf")
  return x


def ordered(groups: dict) -> list[str]:
  """The method keys of ``groups`` in the paper's order, AdvT margins last."""
  order = ["single", "baseline", "adp", "fdp", "srv", "srv_adp", "srv_fdp"] + sorted(
      k for k in groups if k.startswith("advt"))
  return [k for k in order if k in groups]


def robustness_figures(groups: dict, fars: list, out: str) -> dict:
  """Per operating point, ``robustness_v2_far<far>.png``: robust accuracy against the L2 budget
  (from each seed's per-pair worst case, ``robust_accuracy_l2``) and against the L_inf budgets of
  the plan (``robust_accuracy_linf``, every attack's examples), one line per method: the mean
  over its attacked seeds, shaded between the seeds' lowest and highest. ``{far: file name}``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = {}
  grid = np.linspace(0.0, 2.0, 201)
  for far in fars:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k in ordered(groups):
      rs = [r for r in groups[k] if r["robustness"] and far in r["robustness"]["operating_points"]]
      if not rs:
        continue
      l2 = np.array([robust_accuracy_l2(r["robustness_arrays"][f"{far}/worst_case_l2"], grid)
                     for r in rs])
      linf_points = [r["robustness"]["operating_points"][far]["robust_accuracy_linf"] for r in rs]
      names = list(linf_points[0])
      budgets = [float(n.split("/")[0]) for n in names]
      linf = np.array([[p[n] for n in names] for p in linf_points])
      for ax, x, y in ((ax1, grid, l2), (ax2, budgets, linf)):
        line, = ax.plot(x, y.mean(0), marker="o" if ax is ax2 else None, ms=3,
                        label=f"{label(k)} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
        if len(rs) > 1:
          ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15)
    ax1.set(xlabel="L2 budget (pixels in [0, 1])", ylabel="robust accuracy (pairs still rejected)",
            title=f"worst case over attacks, FAR {far}", ylim=(0, 1.02))
    ax2.set(xlabel="L_inf budget (/255)", ylabel="robust accuracy",
            title=f"any attack's example, FAR {far}", ylim=(0, 1.02))
    ax2.grid(alpha=0.3)
    name = f"robustness_v2_far{far}.png"
    plot.save(fig, os.path.join(out, name), ax1)
    written[far] = name
  return written


def _summary_points(points: dict) -> dict:
  """Transfer results per operating point without their per-pair verdicts; each comparison's
  verdict by the current rule (``reproduce_transfer.verdict``)."""
  out = {far: {k: v for k, v in p.items() if k != "per_pair"} for far, p in points.items()}
  for p in out.values():
    p["comparisons"] = [c | {"verdict": transfer_verdict(c)} if c.get("difference") is not None
                        else c for c in p.get("comparisons", [])]
  return out


def compute_seconds(runs: list[dict]) -> dict:
  """Wall seconds each run's processes recorded: training (its summary's ``train_seconds``) and
  the robustness stage's attacks (the sum of each attack's ``seconds``, diagnostics included),
  per run and in total."""
  per_run = {}
  for r in runs:
    attacks = None
    if r["robustness"]:
      points = r["robustness"]["operating_points"].values()
      attacks = float(sum(a.get("seconds", 0.0) for p in points
                          for a in (*p["attacks"].values(), *p.get("diagnostics", {}).values())))
    per_run[r["run"]] = {"train": float(r["summary"]["train_seconds"]), "robustness": attacks,
                         "resumed": bool(r["summary"].get("resumed_from"))}
  return {"per_run": per_run,
          # A resumed run's summary times only its last process: the total is then a lower bound.
          "train_resumed_runs": sum(v["resumed"] for v in per_run.values()),
          "train_total": float(sum(v["train"] for v in per_run.values())),
          "robustness_total": float(sum(v["robustness"] or 0.0 for v in per_run.values())),
          "robustness_runs": sum(v["robustness"] is not None for v in per_run.values())}


def _round(a, digits=5):
  return [None if not np.isfinite(v) else round(float(v), digits) for v in np.asarray(a, float)]


def _run_record(r: dict) -> dict:
  tp = r["test_pairs"]
  rec = {"run": r["run"], "seed": r["seed"], "advt_margin": r.get("advt_margin"),
         "operating_points": [{"far": float(f), "threshold": p["threshold"],
                               "empirical_far": p.get("empirical_far")}
                              for f, p in r["calibration"]["operating_points"].items()],
         "config": r["config"], "trained_with": r.get("trained_with"),
         "exported_with": r.get("exported_with"), "lfw_test": r["lfw_test"],
         "calibration": r["calibration"],
         "test_pairs": {"insightface": _round(tp["insightface"]), "paper": _round(tp["paper"]),
                        "members_paper": [_round(m) for m in tp["members_paper"]],
                        "issame": tp["issame"].astype(int).tolist(),
                        "fold": tp["fold"].astype(int).tolist()}}
  if r["robustness"]:
    rec["robustness"] = r["robustness"]["operating_points"]
    rec["attack_pairs"] = r["robustness"]["key"]["pairs"]
    rec["per_pair"] = {k: (_round(v) if v.dtype.kind == "f" else v.astype(int).tolist())
                       for k, v in r["robustness_arrays"].items()}
  return rec


def _num(v) -> str:
  return "undefined" if np.isnan(v) else ("+inf" if v > 0 else "-inf") if np.isinf(v) else f"{v:+.3f}"


def _fmt(d: dict) -> str:
  return f"{_num(d['difference'])} [{_num(d['lo'])}, {_num(d['hi'])}]"


def _seeds(d: dict) -> str:
  """``seed 0`` or ``seeds 0, 1, 2: +0.110, +0.131, +0.090 per seed``."""
  if len(d["seeds"]) == 1:
    return f"seed {d['seeds'][0]}"
  return (f"seeds {', '.join(map(str, d['seeds']))}: "
          + ", ".join(_num(v) for v in d["per_seed"]) + " per seed")


def _transfer_tables(rows: list, cols: list, points: dict, heading: str,
                     row_label=label) -> list[str]:
  L = []
  for far, p in points.items():
    L += ["", f"{heading} at FAR {far}: {p['common_pairs']} common pairs", "",
          "| source \\ target | " + " | ".join(label(m) for m in cols) + " | source itself |",
          "| --- |" + " --- |" * (len(cols) + 1)]
    for s in rows:
      row = [("-" if t not in p["transfer_rate"][s] else "%.2f" % p["transfer_rate"][s][t]
              if p["transfer_rate"][s][t] is not None else "n/a") for t in cols]
      own = p.get("source_success_rate", {}).get(s)
      row.append("n/a" if own is None else "%.2f" % own)
      L.append(f"| {row_label(s)} | " + " | ".join(row) + " |")
    mean = p["mean_rate_from_other_sources"]
    L.append("| mean from the other methods' sources | " + " | ".join(
        "n/a" if mean[t] is None else "%.3f" % mean[t] for t in cols) + " | |")
    if p["comparisons"]:
      L += ["", "Target A minus target B, mean over the sources of neither method (95% bootstrap "
            "over the common pairs, paired):", ""]
      for c in p["comparisons"]:
        L.append(f"- {label(c['a'])} - {label(c['b'])}: " + (
            "not run (no source besides the two, or no common pair)" if c["difference"] is None
            else f"{_fmt(c)} over {c['sources']} sources: **{transfer_verdict(c)}**"))
  return L


def _transfer_section(rows: list, cols: list, part: dict, row_label=label) -> list[str]:
  """Minimal and fixed-budget tables of one ``transfer_between`` result."""
  L = ["", "**Minimal examples**: I-FGSM on each source until the source accepts them at its own "
       "threshold of the operating point; a source's failure counts as not transferred."]
  if not part.get("operating_points"):
    L[-1] += " Not run yet."
  L += _transfer_tables(rows, cols, part.get("operating_points", {}), "#### Minimal examples",
                        row_label)
  fixed = part.get("fixed_budget", {})
  if fixed:
    L += ["", "**Fixed-budget examples**: L_inf PGD on each source from a random start, "
          "every step taken (no early stop: as deep as the budget allows), the same examples at "
          "every operating point; the target's acceptance counts whether or not the source "
          "accepts."]
    for e in fixed.values():
      L += _transfer_tables(rows, cols, e["operating_points"],
                            f"#### L_inf {e['epsilon'] * 255:g}/255 ({e['steps']} steps of "
                            f"{e['step_size'] * 255:g}/255)", row_label)
  return L


def _transfer_markdown(transfer: dict) -> list[str]:
  methods = transfer["methods"]
  L = ["", "## Black-box transfer", "",
       "The rate is the share of the **common pairs** (the attack pairs no model accepts before "
       "any perturbation at that operating point) whose source example the target accepts at "
       "its own threshold of the same point (`faceens/reproduce_transfer.py`, "
       "`transfer_v2.json`); the last column is the source's own (white-box) rate."]
  cross = transfer.get("cross_seed")
  if cross:
    sources = list(cross["sources"])
    L += ["", "### Across seeds: sources of the second training seed, targets of the first", "",
          "Every source is another training run than every target, its own method included "
          "(the diagonal: the same method retrained). Sources: "
          + ", ".join(label(s) for s in sources) + "."]
    L += _transfer_section(sources, methods, cross,
                           lambda s: f"{label(s)} (seed {cross['source_seed']})")
  L += ["", "### Within the first seed", "",
        "Caution: one training seed fixes the initial weights and the batch order of every "
        "ensemble, and the single model and AdvT start from the weights of member 0 of every "
        "ensemble of that seed; so same-seed models of different methods are close relatives: "
        "transfer between them measures shared initialisation as much as the method."]
  corr = transfer.get("parameter_correlation", {})
  if corr.get("same_seed"):
    same, across = list(corr["same_seed"].values()), list(corr.get("across_seeds", {}).values())
    L[-1] += (f" Correlation of member 0's backbone parameters between same-seed models: "
              f"{min(same):.3f} to {max(same):.3f}" + (
                  f"; between two seeds of one method: {min(across):.3f} to {max(across):.3f}"
                  if across else "") + " (`parameter_correlation` in `transfer_v2.json`).")
  fixed = transfer.get("fixed_budget", {}).get("attacks", {})
  L += _transfer_section(methods, methods, {"operating_points": transfer["operating_points"],
                                            "fixed_budget": fixed})
  return L


def _worst_case_plan(plan: dict) -> dict:
  """The settings of a stored plan that the worst case depends on (not the diagnostics')."""
  return {k: v for k, v in plan.items() if not k.startswith(("diagnostic", "cw_check"))}


def _stored_plan(groups: dict) -> tuple[dict, dict, int]:
  """The attack plan, calibration key and attack-pair count stored with the runs: the plan most
  attacked runs have (a change of plan reruns every run, so they agree once the stage is done;
  ``_markdown`` names the runs whose worst case came from another)."""
  runs = [r for rs in groups.values() for r in rs]
  attacked = [r for r in runs if r["robustness"]]
  plans = [r["robustness"]["key"]["plan"] for r in attacked]
  plan = (max(plans, key=lambda p: sum(_worst_case_plan(q) == _worst_case_plan(p) for q in plans))
          if plans else RobustPlan().as_dict())
  pairs = attacked[0]["robustness"]["pairs"] if attacked else "the attack"
  return plan, runs[0]["calibration"]["key"], pairs


def changes(groups: dict, plan: dict, cal: dict, pairs) -> list[str]:
  """What changed from the first report and why, with the numbers of the plan the runs used
  (``_stored_plan``)."""
  fars = " and ".join(f"{f:g}" for f in cal["fars"])
  margins = sorted({r["config"]["advt"]["margin"] for k, rs in groups.items()
                    if k.startswith("advt") for r in rs})
  restarts = plan["pgd_restarts"]
  runs = [r for rs in groups.values() for r in rs]
  untracked = sorted(r["run"] for r in runs if not r.get("trained_with"))
  unknown = sum(1 for r in runs if r["robustness"]
                for p in r["robustness"]["operating_points"].values()
                for a in (*p["attacks"].values(), *p.get("diagnostics", {}).values())
                if a.get("computed_with") in (None, "unknown"))
  return [
      "## What changed from the first report (`REPORT_v1.md`, one seed) and why", "",
      "- **Operating points.** The first report attacked each model at its own accuracy-optimal "
      "threshold, whose clean false-accept rate on the test impostor pairs ran from 13% to 23% "
      "and ranked the seven non-AdvT methods almost exactly as their median L2 did: the L2 gains "
      f"could be threshold effects. Here every model is attacked at thresholds accepting {fars} "
      f"of {cal['n_impostor']:,} random different-person pairs of the test people (the attack "
      "pairs excluded).",
      "- **Seeds.** One training seed per method before, intervals over pairs only. Here up to "
      f"{max(len(rs) for rs in groups.values())} seeds per method; a comparison rests on "
      "the seeds both methods have, paired (one seed fixes both runs' initial weights and batch "
      "order), and its interval resamples those seeds, then pairs.",
      "- **Worst case.** I-FGSM alone before (CW needed about 0.74x its L2). Here the per-pair "
      f"smallest L2 over I-FGSM, CW (run until {plan['cw_patience']} iterations bring no "
      f"smaller L2, at most {plan['cw_max_iters']}), BIM and PGD with {restarts} random "
      "restarts; `ifgsm:members` (the first report's attack, an over-constrained objective) is "
      f"kept as a diagnostic on the first seed's ensembles at FAR {plan.get('diagnostic_far', 0.01):g}"
      ", outside the worst case, beside a check of CW's stopping rule.",
      "- **Fixed budgets.** BIM's epsilon could not be reached before (1,000 steps of 1/10,200 "
      "stay below it: it was I-FGSM). Here BIM takes sign steps of "
      f"{plan['bim_step'] * 255:g}/255 inside L_inf {plan['bim_epsilon']:g} on [0, 1] pixels "
      f"({plan['bim_epsilon'] * 255:g}/255: the paper's 0.1, read on arcface_torch's [-1, 1] "
      f"inputs, as the paper does not state its scale), up to {plan['bim_max_iters']} steps, so "
      "the bound is reachable (BIM still stops at the first accepted example, so on weak models "
      "it may never reach it). Robust accuracy is reported under L2 and L_inf budgets, with "
      "fixed-budget PGD as a gradient-masking check.",
      "- **Verdicts.** \"Does not improve\" held before whenever the interval was not above 0, "
      "so non-significance counted as support and significant harm was hidden. Here: more robust "
      "/ less robust / equivalent within a margin fixed in advance / cannot tell; \"most "
      "robust\" against the ensembles and against AdvT separately.",
      "- **Pre-accepted pairs** were dropped per model before (medians over different pairs); "
      f"here they count as broken at L2 0, so every median is over the same {pairs} pairs.",
      "- **Transfer**: per-target denominators and no intervals before, and all models came from "
      "one seed. Here one set of common pairs, paired bootstrap intervals, fixed-budget "
      "examples, and sources from another training seed than their targets.",
      ("- **AdvT** at margin" + ("s " if len(margins) > 1 else " ")
       + ", ".join(f"{m:g}" for m in margins) + " (only 0.6 before)." if margins else
       "- **AdvT**: not trained yet (the first report: margin 0.6 only)."),
      "- **Provenance**: `results.json` records per run the seed, resolved config, commit, "
      "library versions, calibration, test-pair and member distances, pair identities, and per "
      "attack and pair L2, L_inf, success, iterations and final distance; per attack the commit "
      "that computed it (`computed_with`). A commit ending `+dirty` ran with uncommitted changes "
      "to tracked files." + (
          f" Not recorded: the training commit (`trained_with`) of {', '.join(untracked)}, "
          "trained before the training stage recorded it." if untracked else "") + (
          f" {unknown} attacks have no commit: computed before attacks recorded it "
          "(`computed_with` null) or outside a git checkout (`unknown`)." if unknown else ""),
      ""]


def _masking_note(groups: dict, far: str, pairs, budgets) -> list[str]:
  """What the L2 masking check's counts above 0 mean, with their largest value."""
  per_run = [list(r["robustness"]["operating_points"][far].get(
      "pgd_l2_breaks_missed_by_minimal_norm", {}).values())
      for rs in groups.values() for r in rs if r["robustness"]]
  runs = sum(any(c) for c in per_run)
  if not runs:
    return []
  return ["", f"Masking check: counts above 0 in {runs} runs, at most "
          f"{max(max(c) for c in per_run if c)} of {pairs} "
          "pairs at a budget: on those pairs I-FGSM, CW and BIM missed an example that "
          "fixed-budget L2 PGD found. The worst case takes PGD's examples, so the medians and "
          f"the robust accuracy at L2 {' and '.join(f'{b:g}' for b in budgets)} count them; "
          "between and beyond those budgets the L2 curve may be slightly optimistic on such "
          "pairs."]


def _diagnostic_table(groups: dict, far: str) -> list[str]:
  """The diagnostics (``RobustPlan.diagnostics``) beside the attack each is checked against,
  on the same pairs."""
  rows = []
  f = lambda v, fmt: "n/a" if v is None else fmt % v  # noqa: E731
  for k in ordered(groups):
    for r in groups[k]:
      point = (r["robustness"] or {}).get("operating_points", {}).get(far, {})
      for name, d in point.get("diagnostics", {}).items():
        arr = r["robustness_arrays"]
        ok = arr[f"{far}/{name}/success"] & arr[f"{far}/{d['reference']}/success"]
        ratio = arr[f"{far}/{name}/l2"][ok] / arr[f"{far}/{d['reference']}/l2"][ok]
        rows.append(f"| {label(k)} (seed {r['seed']}) | `{name}` vs `{d['reference']}` | "
                    f"{d['attacked']} | "
                    f"{f(d['success_rate'], '%.2f')} / {f(d['reference_success_rate'], '%.2f')} | "
                    f"{f(d['l2_median'], '%.3f')} / {f(d['reference_l2_median'], '%.3f')} | "
                    f"{f(d['l2_ratio_median'], '%.3f')} | "
                    f"{f(float(ratio.min()) if len(ratio) else None, '%.3f')} | "
                    f"{d['smaller_than_reference']} | {int(np.sum(ratio < 0.99))} |")
  if not rows:
    return []
  return ["", "Diagnostics, not part of the worst case: `ifgsm:members` (the first report's "
          "attack, pulling every member's feature to the target's at once) against I-FGSM on the "
          "ensemble embedding, same step and cap; `cw:patience<n>` (CW waiting longer for a "
          "smaller L2 before it stops, on the first attacked pairs: waiting costs up to CW's cap "
          "on every pair) against the plan's CW: whether CW's stopping rule left smaller "
          "examples. Both on the same pairs; median L2 over the pairs each broke; ratio per "
          "pair over the pairs both broke (median and smallest); then the pairs where the "
          f"diagnostic found a smaller example (by more than {L2_RTOL:g} relative) or the only "
          "one, and those where it was more than 1% smaller.", "",
          "| run | diagnostic vs attack | pairs | success | median L2 | L2 ratio: median | "
          "smallest | smaller | > 1% smaller |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"] + rows


def _budget_width_note(by: dict) -> str:
  widths = [x["hi"] - x["lo"] for v, _, _ in BUDGET_VIEWS for c in by.get(v, [])
            for x in c["comparisons"] if np.isfinite(x["hi"] - x["lo"])]
  if not widths:
    return ""
  return (f"; the narrowest of their intervals is {min(widths):.3f} wide" + (
      ", so \"equivalent\" is out of reach" if min(widths) >= 2 * ROBUST_ACCURACY_MARGIN
      else ""))


def _reading(results: dict, fars: list) -> str:
  """How to read a robustness verdict, with the interval widths and seed counts of this report."""
  comps = [x for far in fars for c in results["claims"][far] for x in c["comparisons"]]
  widths = [x["hi"] - x["lo"] for x in comps if np.isfinite(x["hi"] - x["lo"])]
  seeds = max((len(x["seeds"]) for x in comps), default=0)
  text = ("How to read a verdict on a difference A - B (95% interval, mean over the seeds both "
          "have): **more robust** if the interval is above 0, else **less robust** if below 0, "
          f"else **equivalent** if it lies inside +-{L2_MARGIN:g} L2, else **cannot tell**, in "
          "that order (so a difference that is significant but smaller than the margin reads "
          f"more or less robust). Equivalence needs an interval narrower than {2 * L2_MARGIN:g}")
  if widths:
    text += f"; the narrowest here is {min(widths):.3f} wide" + (
        ", so \"equivalent\" is out of reach at this scale and \"does not enhance\" claims are "
        "supported only by significant harm" if min(widths) >= 2 * L2_MARGIN else "")
  text += "."
  if seeds == 1:
    text += (" So far every robustness comparison rests on one seed: its interval covers the "
             "pairs only, not seed variance.")
  elif seeds > 1:
    text += (f" On {seeds} seeds, resampling seeds cannot reach beyond the seeds' own range, so "
             "an interval's seed part covers less than 95%: each comparison lists every seed's "
             "own difference.")
  fw = results.get("family_wise")
  if fw and fw["comparisons"]:
    text += (f" Multiplicity: each interval is a 95% interval for its own comparison, and the "
             f"claims rest on {fw['comparisons']} robustness comparisons (every operating point), "
             "so a few significant verdicts could be chance. The column \"family-wise\" of each "
             "claims table reads every comparison from its "
             f"{1 - fw['alpha'] / fw['comparisons']:.2%} interval (Bonferroni over the "
             f"{fw['comparisons']}, from {fw['draws']:,} draws of the same bootstrap), so that all "
             f"of them hold together with {1 - fw['alpha']:.0%} confidence. Accuracy and transfer "
             "comparisons are not adjusted.")
  return text


def _markdown(groups: dict, fars: list, results: dict, transfer: dict | None = None) -> str:
  keys = ordered(groups)
  adv = next((r["config"]["advt"] for k in keys if k.startswith("advt") for r in groups[k]), None)
  plan, cal, pairs = _stored_plan(groups)
  odd = [r["run"] for rs in groups.values() for r in rs if r["robustness"] and
         _worst_case_plan(r["robustness"]["key"]["plan"]) != _worst_case_plan(plan)]
  plan_warning = ([f"**Warning**: the worst case of {', '.join(odd)} comes from another attack "
                   "plan than most runs' (`key.plan` in their `robustness.json`): rerun the "
                   "robustness stage before reading their comparisons.", ""] if odd else [])
  linf = ", ".join(f"{b * 255:g}" for b in plan["pgd_budgets"])
  l2 = ", ".join(f"{b:g}" for b in plan["pgd_l2_budgets"])
  pending = [r["run"] for k in keys for r in groups[k] if not r["robustness"]]
  L = ["# LFW: the paper's comparison, suite v2" + (
           f" (in progress: {len(pending)} of {sum(len(groups[k]) for k in keys)} runs not "
           "attacked yet)" if pending else ""), "",
       "Generated by `python -m faceens.reproduce --suite=lfw --lfw=DIR --out=reports/lfw` "
       "(stages train, export, robustness, transfer) from `per_run/` and `transfer_v2.json`; "
       "statistics and margins in "
       "`faceens/reproduce_summary.py`. The margins were fixed before any result was seen: L2 "
       f"margin +-{L2_MARGIN:g}, accuracy margin {ACCURACY_MARGIN:g}. Two choices changed after "
       "the first results, on review: seeds are compared paired (the seeds both methods have, "
       "resampled jointly; before, each method's seeds were resampled on their own), and the "
       "accuracy interval takes 2,000 draws (300 before, which left a verdict to Monte Carlo "
       "noise). Runs: "
       + ", ".join(f"{label(k)} x{len(groups[k])}" for k in keys) + "; attacked white-box: "
       + (", ".join(f"{label(k)} x{n}" for k in keys
                    if (n := sum(bool(r["robustness"]) for r in groups[k]))) or "none")
       + ". Model size: the `lfw` variant's MobileFaceNet at 64 px for every method."
       + (f" AdvT crafts its MTER examples with {adv['iters']} sign steps of "
          f"{adv['step_size'] * 255:.3g}/255 inside {adv['epsilon'] * 255:.3g}/255 (the full "
          "recipe: 10 of 1/255), for this CPU's budget." if adv else ""),
       ""] + plan_warning + [
       _reading(results, fars), ""] + changes(groups, plan, cal, pairs) + [
       "## Clean accuracy (LFW folds 6-10, 3,000 pairs, InsightFace protocol) and operating points",
       "", "| method | seeds | accuracy per seed | own threshold's FAR | threshold at FAR 1e-2 / 1e-3 |",
       "| --- | --- | --- | --- | --- |"]
  for k in keys:
    rs = groups[k]
    acc = ", ".join(f"{r['lfw_test']['accuracy']:.3f}" for r in rs)
    own = ", ".join(f"{r['calibration']['own_threshold_far']:.3f}" for r in rs)
    thr = ", ".join(" / ".join(f"{p['threshold']:.3f}" for p in
                               r["calibration"]["operating_points"].values()) for r in rs)
    L.append(f"| {label(k)} | {len(rs)} | {acc} | {own} | {thr} |")
  if results["accuracy_vs_single"]:
    L += ["", "Accuracy minus the single model's (mean over seeds, 95% hierarchical bootstrap):", ""]
    for k, d in results["accuracy_vs_single"].items():
      L.append(f"- {label(k)}: {_fmt(d)}: **{d['verdict']}** ({_seeds(d)})")
  for far in fars:
    L += ["", f"## Robustness at FAR {far} (threshold accepting {float(far):.1%} of random "
          "different-person pairs of the test people)", "",
          f"Worst case over I-FGSM, CW, BIM and PGD (L_inf {linf}/255 and L2 {l2}, "
          f"{plan['pgd_restarts']} random restarts each) per pair; median over the {pairs} "
          "attack pairs, per seed. Robust accuracy: "
          "share of the pairs still rejected. Masking check: pairs fixed-budget L2 PGD breaks "
          "within 0.5 / 1 where the minimal-norm attacks (I-FGSM, CW, BIM) found no example "
          "that small (0 expected). PGD's L_inf budgets stop at "
          f"{max(plan['pgd_budgets']) * 255:g}/255, so robust accuracy at larger L_inf budgets "
          "counts the minimal-norm attacks' examples only.", "",
          "| method | worst-case L2 median | robust acc. L2 <= 0.5 | L2 <= 1 | L_inf <= 2/255 | "
          "L_inf <= 8/255 | pre-accepted | masking check |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in keys:
      rs = [r for r in groups[k] if r["robustness"]]
      if not rs:
        continue
      pts = [r["robustness"]["operating_points"][far] for r in rs]

      def l2_at(b, rs=rs):
        return ", ".join("%.2f" % np.mean(r["robustness_arrays"][f"{far}/worst_case_l2"] >
                                          b * (1 + L2_RTOL)) for r in rs)

      def col(get, fmt, pts=pts):
        return ", ".join(fmt % get(p) for p in pts)
      def masking(p):
        m = p.get("pgd_l2_breaks_missed_by_minimal_norm")
        return "not run" if not m else " / ".join(str(v) for v in m.values())
      L.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
          label(k), col(lambda p: p["worst_case_l2_median"], "%.3f"), l2_at(0.5), l2_at(1.0),
          col(lambda p: p["robust_accuracy_linf"]["2/255"], "%.2f"),
          col(lambda p: p["robust_accuracy_linf"]["8/255"], "%.2f"),
          col(lambda p: p["pre_accepted"], "%d"), ", ".join(masking(p) for p in pts)))
    L += _masking_note(groups, far, pairs, plan["pgd_l2_budgets"]) + _diagnostic_table(groups, far)
    if far in results.get("figures", {}):
      L += ["", f"![robust accuracy at FAR {far}]({results['figures'][far]})"]
    L += ["", "### The paper's claims (worst case over attacks)", ""]
    for c in results["claims"][far]:
      ev = "; ".join(f"{label(x['a'])} - {label(x['b'])}: {_fmt(x)} ({x['verdict']}; "
                     f"{_seeds(x)})" for x in c["comparisons"]) or "not run yet"
      L.append(f"- **{c['verdict']}**: {c['claim']} (expects: {c['expects']}). {ev}")
    by = results["claims_by_attack"][far]
    L += ["", "The same claims read family-wise (the worst case, every comparison at its "
          "Bonferroni level: see how to read a verdict above), judged on one attack's L2 "
          "alone (a claim that holds for "
          "I-FGSM but not the worst case rests on a weak attack; BIM's is the L2 of its first "
          "accepted example inside its L_inf bound, and a pair it cannot break inside the bound "
          "counts as unbroken), and judged on robust accuracy at one budget instead of the "
          "median worst-case L2 (the difference of the shares of pairs still rejected, every "
          "attack's examples counted, same bootstrap). The two budgets and their equivalence "
          f"margin, +-{ROBUST_ACCURACY_MARGIN:g} of robust accuracy (the L2 margin's number), "
          "were chosen after these tables were seen"
          + _budget_width_note(results["claims_by_attack"][far]) + ". None of these columns is "
          "adjusted for multiplicity; the comparisons behind each cell are in `results.json`, "
          "`claims_by_attack`:", "",
          "| claim | worst case | worst case, family-wise | I-FGSM | CW | BIM | robust acc. "
          "L2 <= 0.5 | robust acc. L_inf <= 2/255 |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, c in enumerate(results["claims"][far]):
      L.append(f"| {c['claim']} | {c['verdict']} | {c.get('family_wise_verdict', '-')} | "
               + " | ".join(by[v][i]["verdict"] for v in CLAIM_VIEWS) + " |")
  if transfer:
    L += _transfer_markdown(transfer)
  cost = results["compute"]
  L += ["", f"Compute, as each process recorded it on this 2-core CPU (training and attack "
        f"processes often ran at the same time, so the sum exceeds the elapsed time): training "
        f"{cost['train_total'] / 3600:.1f} h for {len(cost['per_run'])} runs"
        + (f" (at least: {cost['train_resumed_runs']} resumed runs count their last process "
           "only)" if cost["train_resumed_runs"] else "")
        + f", white-box attacks {cost['robustness_total'] / 3600:.1f} h for "
        f"{cost['robustness_runs']} runs; transfer crafting is not counted (per run in "
        "`results.json`, `compute`)."]
  L += ["", "Robust accuracy under an L2 budget b: the share of pairs whose worst-case L2 exceeds "
        f"b (an example of exactly b breaks the pair, up to {L2_RTOL:g} relative for the "
        "rounding of its norm); under an L_inf budget b: the share with no example of L_inf <= "
        f"b (1 + {LINF_RTOL:g}) from any attack (I-FGSM's float32 walk of sign steps lands up to "
        "1.06e-4 relative above the budget it reaches; one step more, 1/10200, lies outside "
        "at every budget here). Both are recomputed from the stored per-pair arrays under this rule for every run. "
        "`results.json` holds every run's config, provenance, "
        "calibration, test-pair distances with labels and folds, and per attack and pair the "
        "L2, L_inf, success, iterations and final distance, and the worst case.", ""]
  return "\n".join(L)
