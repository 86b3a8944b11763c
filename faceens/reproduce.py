"""The paper's comparison in one resumable command:

  python -m faceens.reproduce --suite=lfw --lfw=DIR --out=reports/lfw

Stages (``--stages``, default all, in this order):

  * ``train``: every ArcFace method of the paper (``experiments/arcface_<method>.py:lfw``) for
    each training seed (``--seeds``, default 0,1,2), in ``--runs/<loss>_<method>_s<seed>``, and
    AdvT at the paper's other MTER margins (``--advt_margins``, default 0.2,1.4,3.0; first seed
    only) in ``--runs/<loss>_advt_m<margin>_s<seed>``: a finished run is reused, an interrupted
    one resumes from its last checkpoint; each run ends with its evaluation on the 3,000 pairs of
    LFW folds 6-10. Seeds first, in order: an interrupted suite has whole seeds.
  * ``export``: each finished run's clean results, kept with the report so that they outlive the
    run directories: ``--out/per_run/<run>/run.json`` (method, seed, margin, the resolved config,
    training summary, LFW test metrics, thresholds calibrated to common false-accept rates on
    random different-person pairs of the test people (``reproduce_attacks.calibrate``),
    provenance) and ``test_pairs.npz`` (per-pair distances of
    the 3,000 test pairs under both protocols, members too, labels, folds). Safe to run beside a
    training process: it only reads finished runs.
  * ``robustness``: suite v2's white-box attacks at the common operating points, the worst case
    over attacks per pair and fixed-budget robust accuracy (``faceens.reproduce_robustness``),
    into ``--out/per_run/<run>/robustness.*``.
  * ``transfer``: suite v2's black-box transfer between the first seed's models on the pairs no
    model accepts clean, at the common operating points, with paired intervals
    (``faceens.reproduce_transfer``), into ``--out/transfer_v2.json``.
  * ``attack``: the first report's white-box LOTS attacks on every run over the same fixed different-person pairs of
    folds 6-10, black-box transfer from the single model, an adaptive attack on the ensembles
    (``faceens.reproduce_attacks``); per-run results in ``--runs/<run>/suite_attacks``.
  * ``report``: suite v2's ``REPORT.md`` and ``results.json`` from ``--out/per_run`` alone
    (``faceens.reproduce_summary``), and the first report's ``REPORT_v1.md``, figures and
    ``results_v1.json`` (``faceens.reproduce_report``).

``--smoke`` runs the whole pipeline on two methods with tiny models and a few steps.
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: glibc reads its tunables at start (faceens.hostenv)
  from faceens import hostenv
  hostenv.reexec_with_hugepage_malloc()

import dataclasses
import json
import os
import shutil
import time

import ml_collections

import jax

from faceens import (api, configs, logs, losses, provenance, reproduce_attacks, reproduce_report,
                     reproduce_robustness, reproduce_summary, reproduce_transfer, train)

SUITES = ("lfw",)
STAGES = ("train", "export", "robustness", "transfer", "attack", "report")
ARCFACE_METHODS = ("single", "baseline", "adp", "fdp", "srv", "srv_adp", "srv_fdp", "advt")
SMOKE_METHODS = ("single", "srv_fdp")
DEFAULT_SEEDS = (0, 1, 2)
# MTER margins of the paper's Fig. 3 besides the experiment's own 0.6.
DEFAULT_ADVT_MARGINS = (0.2, 1.4, 3.0)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of a suite: a method, its training seed and (AdvT) a non-default margin."""
  method: str
  seed: int = 0
  advt_margin: float | None = None  # None: the experiment's own

  def name(self, loss: str) -> str:
    margin = "" if self.advt_margin is None else f"_m{self.advt_margin:g}"
    return f"{loss}_{self.method}{margin}_s{self.seed}"


@dataclasses.dataclass(frozen=True)
class Suite:
  """What one invocation compares: the runs, where they live, and the data."""
  name: str
  lfw: str
  runs_dir: str
  out: str
  methods: tuple[str, ...]
  loss: str = "arcface"
  smoke: bool = False
  seeds: tuple[int, ...] = (0,)
  advt_margins: tuple[float, ...] = ()

  def runs(self) -> list[RunSpec]:
    """Every training run, seed by seed, then AdvT's other margins at the first seed."""
    out = [RunSpec(m, s) for s in self.seeds for m in self.methods]
    if "advt" in self.methods:
      out += [RunSpec("advt", self.seeds[0], m) for m in self.advt_margins]
    return out

  def spec(self, run) -> RunSpec:
    """A ``RunSpec``, or a method name meaning that method at the first seed."""
    return run if isinstance(run, RunSpec) else RunSpec(run, self.seeds[0])

  def run_name(self, run) -> str:
    return self.spec(run).name(self.loss)

  def workdir(self, run) -> str:
    return os.path.join(self.runs_dir, self.run_name(run))


def run_config(suite: Suite, run) -> ml_collections.ConfigDict:
  """The ``lfw`` variant of ``experiments/<loss>_<method>.py`` on ``suite.lfw`` with the run's
  seed and margin (tiny if smoke). ``run``: a ``RunSpec`` or a method name (first seed)."""
  spec = suite.spec(run)
  method = spec.method
  c = configs.experiment(f"{suite.loss}_{method}", "lfw")
  c.data.root = suite.lfw
  c.seed = spec.seed
  if spec.advt_margin is not None:
    c.advt.margin = float(spec.advt_margin)
  if suite.smoke:
    c.data.image_size = 32
    c.data.crop = (70, 70, 110, 110)
    c.model.width = 0.125
    c.model.blocks = (1, 1, 1, 1)
    c.model.embedding_dim = 16
    if configs.uses_group(method, "advt"):
      c.advt.iters = 1
    c.train.batch_size = 8
    c.train.steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
  configs.validate(c)
  return c


def is_trained(workdir: str, c) -> bool:
  """A run is finished when its summary says it reached the configured number of steps and its
  evaluation is written. A finished run trained with other settings is an error (a suite never
  mixes recipes)."""
  path = os.path.join(workdir, "summary.json")
  if not (os.path.isfile(path) and os.path.isfile(os.path.join(workdir, "eval.json"))):
    return False
  with open(path) as f:
    s = json.load(f)
  done = s.get("steps") == c.train.steps and s.get("method") == c.method
  if done:
    old, new = configs.recipe(configs.load_run_config(workdir)), configs.recipe(c)
    if old != new:
      diff = sorted(f"{k}.{kk}" if isinstance(v, dict) else k for k, v in new.items()
                    for kk in (v if isinstance(v, dict) else [None])
                    if (old.get(k) != v if not isinstance(v, dict)
                        else (old.get(k) or {}).get(kk) != v[kk]))
      raise ValueError(f"{workdir} was trained with other settings ({', '.join(diff)}); give "
                       "this suite another --runs folder")
  return done


def cost_units(c) -> float:
  """Relative training cost of a run (forward+backward passes of one member per image): K member
  passes, plus MTER's ``advt.iters`` input-gradient passes and its second forward."""
  units = float(c.ensemble.num_members)
  if losses.method_spec(c.method).adversarial:
    units += 0.7 * c.advt.iters + 1.0
  return units * c.train.steps


def estimate_seconds(suite: Suite) -> dict[RunSpec, float]:
  """Seconds left per unfinished run, from the measured speed of the finished ones (or 1 s per
  unit and step before any has finished)."""
  done_s, done_u, todo = 0.0, 0.0, {}
  for m in suite.runs():
    c = run_config(suite, m)
    w = suite.workdir(m)
    if is_trained(w, c):
      with open(os.path.join(w, "summary.json")) as f:
        s = json.load(f)
      if s.get("resumed_from") == 0:
        done_s += s["train_seconds"]
        done_u += cost_units(c)
    else:
      todo[m] = cost_units(c)
  rate = done_s / done_u if done_u else 1.0 / 3
  return {m: u * rate for m, u in todo.items()}


def train_all(suite: Suite, progress: bool = True) -> dict[RunSpec, dict]:
  """Trains (or reuses, or resumes) every run of the suite; ``{RunSpec: summary}``."""
  summaries = {}
  runs = suite.runs()
  for i, m in enumerate(runs):
    c = run_config(suite, m)
    w = suite.workdir(m)
    if is_trained(w, c):
      with open(os.path.join(w, "summary.json")) as f:
        summaries[m] = json.load(f)
      if progress:
        print(f"[{i + 1}/{len(runs)}] {suite.run_name(m)}: trained, reused ({w})",
              flush=True)
      continue
    left = estimate_seconds(suite)
    if progress:
      print(f"[{i + 1}/{len(runs)}] {suite.run_name(m)}: training in {w}; estimated "
            f"{left[m] / 60:.0f} min for this run, {sum(left.values()) / 60:.0f} min for the "
            f"{len(left)} runs left", flush=True)
    t0 = time.perf_counter()
    summaries[m] = train.train_and_evaluate(c, w, progress=progress)
    if progress:
      acc = summaries[m].get("eval", {}).get("lfw_test", {}).get("insightface_accuracy")
      print(f"[{i + 1}/{len(runs)}] {suite.run_name(m)}: done in "
            f"{(time.perf_counter() - t0) / 60:.1f} min, test accuracy {acc}", flush=True)
  return summaries


def export_dir(suite: Suite, run) -> str:
  return os.path.join(suite.out, "per_run", suite.run_name(run))


def export_run(suite: Suite, run) -> str | None:
  """Writes a finished run's clean results to ``export_dir`` (see the module docstring); returns
  the folder, or ``None`` if the run has not finished. A run exported before is left as it is
  unless its training summary changed."""
  spec = suite.spec(run)
  c, w = run_config(suite, spec), suite.workdir(spec)
  if not is_trained(w, c):
    return None
  dest = export_dir(suite, spec)
  with open(os.path.join(w, "summary.json")) as f:
    summary = json.load(f)
  done = reproduce_attacks.load_json(os.path.join(dest, "run.json"))
  if done is not None and done.get("summary") == summary and "calibration" in done and \
      os.path.isfile(os.path.join(dest, "test_pairs.npz")):
    return dest
  os.makedirs(dest, exist_ok=True)
  att = os.path.join(w, "suite_attacks")
  os.makedirs(att, exist_ok=True)
  model = api.load(w)
  tp = reproduce_attacks.test_pair_distances(model, att)
  shutil.copyfile(tp, os.path.join(dest, "test_pairs.npz"))
  plan = reproduce_attacks.plan_for(suite)
  cal = reproduce_attacks.calibrate(model, plan, reproduce_attacks.attack_pair_names(c, plan), att)
  with open(os.path.join(w, "eval.json")) as f:
    test = json.load(f)["datasets"]["lfw_test"]
  doc = {"run": suite.run_name(spec), "method": spec.method, "seed": spec.seed,
         "advt_margin": (float(c.advt.margin) if configs.uses_group(c.method, "advt") else None),
         "config": configs.recipe(c), "summary": summary,
         "lfw_test": {k: test[k] for k in ("accuracy", "accuracy_std", "threshold", "roc_auc",
                                           "tar_at_far", "pairs", "paper")},
         "calibration": cal,
         "trained_with": summary.get("provenance"), "exported_with": provenance.record()}
  with open(os.path.join(dest, "run.json"), "w") as f:
    json.dump(doc, f, indent=2)
  return dest


def export_all(suite: Suite, progress: bool = True) -> list[str]:
  """``export_run`` for every run of the suite; returns the folders written or kept."""
  out = []
  for spec in suite.runs():
    dest = export_run(suite, spec)
    if dest is not None:
      out.append(dest)
  if progress:
    where = os.path.join(suite.out, "per_run")
    print(f"exported {len(out)} of {len(suite.runs())} runs to {where}", flush=True)
  return out


def robustness_stage(suite: Suite, progress: bool = True) -> list[str]:
  """``reproduce_robustness.robustness_all`` over the suite's finished runs (exported first)."""
  plan = reproduce_attacks.plan_for(suite)
  pairs = {}

  def pairs_for(c):
    if not pairs:
      pairs.update(reproduce_attacks.attack_pairs(c, plan))
    return pairs

  def calibration_for(run):
    with open(os.path.join(export_run(suite, run), "run.json")) as f:
      return json.load(f)["calibration"]

  # The first seed's runs, AdvT margins included, come first: every claim is then judged on one
  # seed before further seeds narrow the intervals.
  trained = lambda: sorted((r for r in suite.runs()  # noqa: E731
                            if is_trained(suite.workdir(r), run_config(suite, r))),
                           key=lambda r: suite.seeds.index(r.seed))
  return reproduce_robustness.robustness_all(suite, lambda r: export_dir(suite, r), trained,
                                             pairs_for, calibration_for, progress=progress)


def transfer_stage(suite: Suite, progress: bool = True) -> dict | None:
  """``reproduce_transfer.transfer_all`` over the first seed's finished runs, with the second
  seed's finished runs as the cross-seed sources (all exported first); None when fewer than two
  runs of the first seed are finished."""
  trained = [r for r in suite.runs() if is_trained(suite.workdir(r), run_config(suite, r))]
  models = reproduce_transfer.load_models(suite, trained)
  if len(models) < 2:
    if progress:
      print("transfer: fewer than two finished runs of the first seed; skipped", flush=True)
    return None
  second = (reproduce_transfer.load_models(suite, trained, suite.seeds[1])
            if len(suite.seeds) > 1 else {})
  calibration = {}
  groups = [(suite.seeds[0], models)] + ([(suite.seeds[1], second)] if second else [])
  for seed, group in groups:
    for m, model in group.items():
      with open(os.path.join(export_run(suite, RunSpec(m, seed)), "run.json")) as f:
        calibration[model.workdir] = json.load(f)["calibration"]
  plan = reproduce_attacks.plan_for(suite)
  pairs = reproduce_attacks.attack_pairs(run_config(suite, next(iter(models))), plan)
  return reproduce_transfer.transfer_all(suite, models, pairs, calibration, progress=progress,
                                         second_seed=second)


def trained_configs(suite: Suite) -> dict:
  """``{method: config}`` of the suite's finished runs, in the suite's order."""
  out = {}
  for m in suite.methods:
    c = run_config(suite, m)
    if is_trained(suite.workdir(m), c):
      out[m] = c
  return out


def _numbers(flag: str, text: str | None, kind, default: tuple) -> tuple:
  """A comma-separated flag's values (``default`` when not given), or a one-line error."""
  if text is None:
    return default
  try:
    return tuple(kind(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise ValueError(f"--{flag}={text!r}: expected comma-separated numbers") from None


def make_suite(name: str, lfw: str, runs_dir: str, out: str, methods: str | None,
               smoke: bool, seeds: str | None = None, advt_margins: str | None = None) -> Suite:
  if name not in SUITES:
    raise ValueError(f"unknown --suite={name!r}; valid: {', '.join(SUITES)}")
  if not lfw or not os.path.isfile(os.path.join(lfw, "pairs.txt")):
    raise ValueError(f"--lfw={lfw!r} must be an LFW folder holding pairs.txt and images/ "
                     "(LFW as distributed)")
  default = SMOKE_METHODS if smoke else ARCFACE_METHODS
  chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else default
  for m in chosen:
    if m not in ARCFACE_METHODS:
      raise ValueError(f"unknown method {m!r} in --methods; valid: {', '.join(ARCFACE_METHODS)}")
  seed_list = _numbers("seeds", seeds, int, (0,) if smoke else DEFAULT_SEEDS)
  if not seed_list or min(seed_list) < 0 or len(set(seed_list)) != len(seed_list):
    raise ValueError(f"--seeds={seeds!r}: expected distinct integers >= 0, e.g. 0,1,2")
  margins = _numbers("advt_margins", advt_margins, float, () if smoke else DEFAULT_ADVT_MARGINS)
  if any(not 0 < m < 10 for m in margins):
    raise ValueError(f"--advt_margins={advt_margins!r}: expected MTER margins in (0, 10), e.g. "
                     "0.2,1.4,3.0")
  return Suite(name, lfw, runs_dir, out, chosen, smoke=smoke, seeds=seed_list,
               advt_margins=margins)


def main(argv):
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  logs.default_verbosity()
  stages = [s.strip() for s in FLAGS.stages.split(",") if s.strip()]
  try:
    for s in stages:
      if s not in STAGES:
        raise ValueError(f"unknown stage {s!r} in --stages; valid: {', '.join(STAGES)}")
    runs_dir = FLAGS.runs or os.path.join("runs", f"{FLAGS.suite}_suite" + ("_smoke" if FLAGS.smoke else ""))
    suite = make_suite(FLAGS.suite, FLAGS.lfw, runs_dir, FLAGS.out, FLAGS.methods, FLAGS.smoke,
                       FLAGS.seeds, FLAGS.advt_margins)
    t0 = time.perf_counter()
    if "train" in stages:
      train_all(suite)
    # Runs of one suite share their architecture: attacks compile once for all of them (unless
    # the user keeps a compilation cache of their own).
    if not jax.config.jax_compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", os.path.join(runs_dir, ".jax_cache"))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if "export" in stages:
      export_all(suite)
    if "robustness" in stages:
      robustness_stage(suite)
    if "transfer" in stages:
      transfer_stage(suite)
    if "attack" in stages:
      reproduce_attacks.attack_all(suite, lambda: trained_configs(suite))
    if "report" in stages:
      path = reproduce_report.write_report(suite)
      print(f"wrote {path}")
      print(f"wrote {reproduce_summary.write(suite.out)}")
    print(f"suite stages {','.join(stages)} took {(time.perf_counter() - t0) / 60:.1f} min")
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None


def _define_flags():
  from absl import flags
  flags.DEFINE_string("suite", "lfw", "which comparison: " + ", ".join(SUITES))
  flags.DEFINE_string("lfw", None, "LFW folder as distributed (images/, pairs.txt)")
  flags.DEFINE_string("out", "reports/lfw", "report folder (REPORT.md, results.json, per_run/, figures)")
  flags.DEFINE_string("runs", None, "run directories (checkpoints; default runs/<suite>_suite)")
  flags.DEFINE_string("methods", None, "comma-separated subset of: " + ", ".join(ARCFACE_METHODS))
  flags.DEFINE_string("stages", ",".join(STAGES), "comma-separated: " + ", ".join(STAGES))
  flags.DEFINE_string("seeds", None, "comma-separated training seeds (default 0,1,2; smoke: 0)")
  flags.DEFINE_string("advt_margins", None, "comma-separated MTER margins trained besides the "
                      "experiment's 0.6, first seed only (default 0.2,1.4,3.0; smoke: none)")
  flags.DEFINE_bool("smoke", False, "two methods, tiny models, a few steps: the pipeline in minutes")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
