"""The attack stage of ``faceens.reproduce``: the same attacks on every run of a suite.

Per run (``<run>/suite_attacks/``, each file skipped when it exists with the same plan):

  * ``test_pairs.npz``: the per-pair distances of LFW folds 6-10 under both protocols, the labels
    and folds, so the report can recompute (and bootstrap) every accuracy;
  * ``<attack>.npz`` / ``.json``: white-box LOTS on the fixed different-person attack pairs
    (``attack_pairs``), goal = the run's own Euclidean threshold (the paper's protocol). Pairs the
    run accepts as the same person before any perturbation are counted (``pre_accepted``) and not
    attacked: they would put a jump at tau = 0 in the tau curves;
and in the runs folder ``transfer_from_single.json`` (with the crafted examples in ``.npz``):
black-box transfer of I-FGSM examples crafted on the single model at fixed feature distances
(Amada et al. Fig. 4), the source's perturbation per distance (Fig. 5).

The step sizes are chosen so that the median successful I-FGSM example on the single model takes
tens of iterations (``Plan``): a sign step of 1/255 moves a 64x64x3 image by 0.43 in L2, and
weak models fall in two such steps, which makes tau curves step functions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np

from faceens import api, attack, calibration, evaluate
from faceens.attacks import lots
from faceens.data import image_folder
from faceens.data import lfw as lfw_data
from faceens.data.image_folder import load_image
from faceens.models import ensemble


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every attack setting of a suite (stored beside each result; a change reruns the attack)."""
  n_pairs: int = 200
  seed: int = 0
  # Sign step 1/10200 (1/40 of a grey level): 0.0109 in L2 at 64x64x3. At 1/255 the single LFW
  # model falls in a median of 1.5 steps, at 1/2040 of 7.5 and at 1/8160 of 28.5 (200 pairs,
  # its own threshold).
  step_size: float = 1.0 / 10200
  epsilon: float = 0.1              # BIM L_inf radius (paper)
  # 1000 steps reach at most 1000/10200 = 0.098 < epsilon in L_inf: the BIM projection can never
  # act, so BIM equals I-FGSM step for step (derived, not rerun; see ``bim_equals_ifgsm``).
  max_iters: int = 1000
  # CW: Adam in tanh space. On the single model, lr 0.01 with patience 10 took a median of 24.5
  # iterations and perturbed no less than I-FGSM (L2 0.35 vs 0.34): steps too coarse to refine;
  # lr 0.002 had 14% of the pairs done after 88 iterations, too slow for the suite's budget.
  cw_lr: float = 0.005
  cw_c: float = 0.1
  cw_patience: int = 15
  cw_max_iters: int = 300
  chunk: int = 8                    # compacted loop: iterations between re-packing
  distances: tuple[float, ...] = (1.2, 1.0, 0.8, 0.6, 0.4)  # black-box goals (Fig. 4 / 5)
  # Per run in this order; the adaptive attack on ensembles comes last.
  white_box: tuple[str, ...] = ("ifgsm", "bim", "cw")
  adaptive: str = "ifgsm:members"   # on ensembles: every member's feature pulled at once
  batch_size: int = 256
  # Common operating points: thresholds at these false-accept rates on n_impostor random
  # different-person pairs of the test people (Euclidean on E(x), the attacks' protocol), the
  # attack pairs left out.
  fars: tuple[float, ...] = (1e-2, 1e-3)
  n_impostor: int = 200_000

  def bim_equals_ifgsm(self) -> bool:
    """True when no sign-step example can leave BIM's L_inf ball: the two rules coincide."""
    return self.max_iters * self.step_size <= self.epsilon

  def attack_config(self, name: str) -> lots.AttackConfig:
    method, _, objective = name.partition(":")
    cw = method == "cw"
    return lots.AttackConfig(method=method, objective=objective or "ensemble",
                             step_size=self.step_size, epsilon=self.epsilon,
                             max_iters=self.cw_max_iters if cw else self.max_iters,
                             cw_lr=self.cw_lr, cw_c=self.cw_c,
                             cw_patience=self.cw_patience).validate()

  def as_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def key(self, name: str) -> dict:
    """What a stored white-box result must match to be reused: the pairs and the attack."""
    cfg = json.loads(json.dumps(lots.config_dict(self.attack_config(name))))
    return {"n_pairs": self.n_pairs, "seed": self.seed, "attack": cfg}


SMOKE_PLAN = Plan(n_pairs=4, step_size=2.0 / 255, max_iters=12, cw_max_iters=12, chunk=4,
                  distances=(1.0, 0.8), batch_size=16, fars=(0.1, 0.01), n_impostor=500)  # 12 x 2/255 = 0.094: BIM derived too


def file_name(attack_name: str) -> str:
  return attack_name.replace(":", "_")


def attack_pair_names(c, plan: Plan) -> list[tuple]:
  """``(name1, number1, name2, number2, fold)`` of the suite's attack pairs (no image loaded)."""
  chosen = lfw_data.different_person_pairs(c.data.root, [f - 1 for f in c.data.lfw_test_folds],
                                           plan.n_pairs, plan.seed)
  return [(p.name1, p.index1, p.name2, p.index2, p.fold + 1) for p in chosen]


def attack_pairs(c, plan: Plan) -> dict:
  """``plan.n_pairs`` different-person pairs of the suite's test folds (seeded, fixed for every
  run; ``c``: a run config of the suite, whose ``data.root`` is the suite's LFW): uint8 source and target images at the runs' input size, with LFW names and numbers."""
  src, tgt, chosen = attack.lfw_test_pairs(c, plan.n_pairs, plan.seed)
  return {"src": src, "tgt": tgt,
          "names": [(p.name1, p.index1, p.name2, p.index2, p.fold + 1) for p in chosen]}


def load_json(path):
  """A JSON file's contents, ``None`` if it does not exist."""
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return None


@functools.lru_cache(maxsize=2)
def test_people_images(root: str, folds: tuple[int, ...], size: int, fit) -> tuple:
  """``(images uint8 [N, S, S, 3], person ids [N], [(name, number), ...])``: every image of the
  people in the official pairs of ``folds`` (1-based), fitted as the runs' inputs; loaded once
  per process for all runs of a suite."""
  pairs = lfw_data.read_pairs(os.path.join(root, "pairs.txt"))
  names = sorted({n for p in pairs if p.fold + 1 in folds for n in (p.name1, p.name2)})
  counts = lfw_data.people(root)
  files = [(n, i) for n in names for i in range(1, counts.get(n, 0) + 1)]
  images = np.stack([load_image(lfw_data.image_path(root, n, i), size, fit) for n, i in files])
  person = {n: k for k, n in enumerate(names)}
  return images, np.array([person[n] for n, _ in files]), files


def calibrate(model, plan: Plan, attack_names, out_dir: str) -> dict:
  """``calibration.json``: the run's thresholds at ``plan.fars`` (see ``Plan.fars``) and the
  share of the attack pairs each accepts before any attack. Reused when it exists with the same
  settings."""
  path = os.path.join(out_dir, "calibration.json")
  key = {"fars": list(plan.fars), "n_impostor": plan.n_impostor, "seed": plan.seed,
         "n_pairs": plan.n_pairs}
  done = load_json(path)
  if done is not None and done.get("key") == key:
    return done
  c = model.config
  images, person, files = test_people_images(c.data.root, tuple(c.data.lfw_test_folds),
                                             c.data.image_size, image_folder.fit_spec(c))
  index = {f: k for k, f in enumerate(files)}
  exclude = [(index[(a, i)], index[(b, j)]) for a, i, b, j, _ in attack_names
             if (a, i) in index and (b, j) in index]
  pairs = calibration.impostor_pairs(person, plan.n_impostor, seed=plan.seed, exclude=exclude)
  emb = model.embed(images)
  d = np.linalg.norm(emb[pairs[:, 0]] - emb[pairs[:, 1]], axis=1)
  ex = np.asarray(exclude, np.int64).reshape(-1, 2)
  att = np.linalg.norm(emb[ex[:, 0]] - emb[ex[:, 1]], axis=1) if len(ex) else None
  points = {}
  for far in plan.fars:
    t, emp = calibration.threshold_at_far(d, far)
    points[f"{far:g}"] = {"threshold": t, "empirical_far": emp,
                          "attack_pairs_accepted_clean": None if att is None
                          else float(np.mean(att < t))}
  doc = {"key": key, "protocol": "paper: Euclidean distance between ensemble embeddings, no flip",
         "images": int(len(images)), "people": int(person.max() + 1),
         "impostor_pairs": int(len(pairs)), "excluded_attack_pairs": len(exclude),
         "operating_points": points,
         "own_threshold": float(model.paper_threshold) if model.paper_threshold else None,
         "own_threshold_far": (float(np.mean(d < model.paper_threshold))
                               if model.paper_threshold else None),
         "impostor_quantiles": {f"{q:g}": float(np.quantile(d, q))
                                for q in (1e-4, 1e-3, 1e-2, 0.1, 0.5)}}
  with open(path, "w") as f:
    json.dump(doc, f, indent=2)
  return doc


def test_pair_distances(model, out_dir: str) -> str:
  """``test_pairs.npz``: per-pair distances of the run's test set (both protocols, members)."""
  path = os.path.join(out_dir, "test_pairs.npz")
  if os.path.isfile(path):
    return path
  s = evaluate.lfw_test_set(model.config)
  feats = model.member_features(s.images)
  flips = model.member_features(s.images, flip=True)
  d = evaluate.pair_distances(feats, flips, s.pairs)
  np.savez_compressed(path, issame=s.issame, fold=s.folds + 1, **d)
  return path


def white_box(model, pairs: dict, plan: Plan, out_dir: str, names, progress: bool = True) -> dict:
  """Runs each attack of ``names`` on ``model`` (skipping finished ones); ``{name: summary}``."""
  x_src, x_tgt = model.prepare(pairs["src"]), model.prepare(pairs["tgt"])
  feats_t = model.member_features(x_tgt)
  emb_t = ensemble.ensemble_embedding(feats_t)
  d0 = np.linalg.norm(model.embed(x_src) - emb_t, axis=1)
  thr = float(model.paper_threshold)
  pre = d0 < thr
  todo = np.flatnonzero(~pre)
  out = {}
  for name in names:
    json_path = os.path.join(out_dir, f"{file_name(name)}.json")
    old = load_json(json_path)
    if old is not None and old.get("key") == plan.key(name) and old.get("step") == model.step:
      out[name] = old
      continue
    cfg = plan.attack_config(name)
    if cfg.method == "bim" and plan.bim_equals_ifgsm() and "ifgsm" in out:
      out[name] = _derive_bim(out["ifgsm"], cfg, plan, out_dir, json_path)
      continue
    targets = feats_t if cfg.objective == "members" else emb_t
    sub_t = targets[:, todo] if cfg.objective == "members" else targets[todo]
    desc = f"{model.config.method} {name}"
    r = attack.run_compacted(model, x_src[todo], sub_t, thr, cfg, chunk=plan.chunk,
                             max_batch=plan.batch_size, seed=plan.seed, progress=progress,
                             desc=desc)
    n = len(x_src)
    l2, success = np.full(n, np.nan), np.zeros(n, bool)
    iters, dist, linf = np.zeros(n, np.int64), d0.copy(), np.full(n, np.nan)
    l2[todo], success[todo], iters[todo] = r["l2"], r["success"], r["iterations"]
    dist[todo], linf[todo] = r["distance"], r["linf"]
    np.savez_compressed(os.path.join(out_dir, f"{file_name(name)}.npz"), l2=l2, success=success,
                        iterations=iters, distance=dist, linf=linf, pre_accepted=pre,
                        clean_distance=d0)
    ok = success[todo]
    it = iters[todo][ok]
    summary = {
        "attack": name, "config": lots.config_dict(cfg), "key": plan.key(name),
        "step": model.step, "threshold": thr, "pairs": int(n), "pre_accepted": int(pre.sum()),
        "attacked": int(len(todo)), "success_rate": float(ok.mean()) if len(todo) else None,
        "iterations_median": float(np.median(it)) if len(it) else None,
        "iterations_max": int(iters.max()), "hit_cap": int(np.sum(iters[todo] >= cfg.max_iters)),
        "l2_median": float(np.median(l2[todo][ok])) if ok.any() else None,
        "linf_max": float(np.nanmax(linf[todo][ok])) if ok.any() else None,
        "seconds": r["seconds"], "tau_curve": lots.tau_curve(l2[todo], ok)}
    with open(json_path, "w") as f:
      json.dump(summary, f, indent=2)
    out[name] = summary
    if progress:
      print(f"  {name}: success {summary['success_rate']}, median iterations "
            f"{summary['iterations_median']}, median L2 {summary['l2_median']}, "
            f"{r['seconds']:.0f} s", flush=True)
  return out


def _derive_bim(ifgsm: dict, cfg, plan: Plan, out_dir: str, json_path: str) -> dict:
  """BIM's results when ``Plan.bim_equals_ifgsm``: I-FGSM's, with the reason recorded."""
  src = os.path.join(out_dir, f"{file_name(ifgsm['attack'])}.npz")
  with np.load(src) as z:
    np.savez_compressed(os.path.join(out_dir, "bim.npz"), **dict(z))
  summary = dict(ifgsm, attack="bim", config=lots.config_dict(cfg), key=plan.key("bim"),
                 derived_from="ifgsm: max_iters x step_size <= epsilon, so the L_inf projection "
                              "never acts and BIM takes the same steps as I-FGSM")
  with open(json_path, "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def craft_transfer_set(source, pairs: dict, plan: Plan, runs_dir: str,
                       progress: bool = True) -> dict:
  """I-FGSM on ``source`` to each of ``plan.distances`` (largest first, each continuing from the
  previous examples, as the paper's sets of growing effort). Kept in
  ``runs_dir/transfer_from_<method>.npz`` (reused while the pairs and settings match), so that a
  run trained later only needs its embeddings."""
  path = os.path.join(runs_dir, f"transfer_from_{source.config.method}.npz")
  key = json.dumps(dict(plan.key("ifgsm"), distances=list(plan.distances),
                        source_step=source.step), sort_keys=True)
  if os.path.isfile(path):
    with np.load(path) as z:
      if str(z["key"]) == key:
        return {k: z[k] for k in z.files}
  x_src, x_tgt = source.prepare(pairs["src"]), source.prepare(pairs["tgt"])
  emb_t = source.embed(x_tgt)
  cfg = plan.attack_config("ifgsm")
  x_cur, iters = None, np.zeros(len(x_src), np.int64)
  out = {"key": np.asarray(key), "distances": np.sort(np.asarray(plan.distances))[::-1]}
  xs, ok, l2, linf, its = [], [], [], [], []
  for d in out["distances"]:
    r = attack.run_compacted(source, x_src, emb_t, float(d), cfg, x_init=x_cur,
                             chunk=plan.chunk, max_batch=plan.batch_size, progress=progress,
                             desc=f"transfer d<{d:g}")
    x_cur = r["x_adv"]
    iters = iters + r["iterations"]
    xs.append(x_cur)
    ok.append(r["success"])
    l2.append(r["l2"])
    linf.append(r["linf"])
    its.append(iters.copy())
  out.update(x_adv=np.stack(xs), success=np.stack(ok), l2=np.stack(l2), linf=np.stack(linf),
             iterations=np.stack(its))
  np.savez(path, **out)
  return out


def transfer(source, targets: dict, pairs: dict, plan: Plan, runs_dir: str,
             progress: bool = True) -> dict:
  """Each target run's verdict, at its own threshold, on the examples crafted on ``source``
  (``craft_transfer_set``). Results: ``runs_dir/transfer_from_<source>.json``."""
  crafted = craft_transfer_set(source, pairs, plan, runs_dir, progress)
  x_src, x_tgt = source.prepare(pairs["src"]), source.prepare(pairs["tgt"])
  points = []
  clean, tgt_emb = {}, {}
  for m, t in targets.items():
    tgt_emb[m] = t.embed(x_tgt)
    clean[m] = np.linalg.norm(t.embed(x_src) - tgt_emb[m], axis=1) < t.paper_threshold
  for j, d in enumerate(crafted["distances"]):
    ok, l2, linf = crafted["success"][j], crafted["l2"][j], crafted["linf"][j]
    its = crafted["iterations"][j]
    point = {"distance": float(d), "source_success_rate": float(ok.mean()),
             "l2_mean": float(l2[ok].mean()) if ok.any() else None,
             "l2_median": float(np.median(l2[ok])) if ok.any() else None,
             "linf_mean": float(linf[ok].mean()) if ok.any() else None,
             "iterations_median": float(np.median(its[ok])) if ok.any() else None,
             "success": ok.tolist(), "targets": {}}
    for m, t in targets.items():
      fooled = np.linalg.norm(t.embed(crafted["x_adv"][j]) - tgt_emb[m], axis=1) < t.paper_threshold
      use = ok & ~clean[m]  # AXs that succeeded on the source, pairs the target did not accept
      point["targets"][m] = {"transfer_rate": float(fooled[use].mean()) if use.any() else None,
                             "n": int(use.sum()), "fooled": fooled.tolist(),
                             "clean_accepted": int(clean[m].sum())}
    points.append(point)
  doc = {"source": source.workdir, "key": json.loads(str(crafted["key"])), "attack": "ifgsm",
         "targets": {m: t.workdir for m, t in targets.items()},
         "thresholds": {m: float(t.paper_threshold) for m, t in targets.items()},
         "points": sorted(points, key=lambda p: p["distance"])}
  with open(os.path.join(runs_dir, f"transfer_from_{source.config.method}.json"), "w") as f:
    json.dump(doc, f, indent=2)
  return doc


def plan_for(suite) -> Plan:
  return SMOKE_PLAN if suite.smoke else Plan()


def attack_all(suite, trained, progress: bool = True) -> None:
  """The attack stage of ``faceens.reproduce``. ``trained()`` -> ``{method: config}`` of the
  suite's finished runs, asked again after every task, so runs that finish training meanwhile
  (in another process) are attacked too. Next task, by priority: the paper's white-box attacks
  on a run without them; the transfer from the single model when a run is missing from it; the
  adaptive attack on an ensemble without it. An interrupted stage has the common comparison
  first."""
  plan = plan_for(suite)
  runs = trained()
  if not runs:
    raise ValueError(f"no trained run in {suite.runs_dir}; run the train stage first")
  pairs = attack_pairs(next(iter(runs.values())), plan)
  models, white, adaptive, transferred = {}, set(), set(), set()

  def load(m):
    if m not in models:
      models[m] = api.load(suite.workdir(m))
      out = _out_dir(suite, m)
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, "pairs.json"), "w") as f:
        json.dump({"pairs": pairs["names"], "seed": plan.seed}, f)
    return models[m]

  while True:
    runs = trained()
    todo = [m for m in runs if m not in white]
    if todo:
      m = todo[0]
      if progress:
        print(f"[{len(white) + 1}/{len(runs)}] white-box attacks on {suite.run_name(m)}", flush=True)
      model = load(m)
      test_pair_distances(model, _out_dir(suite, m))
      white_box(model, pairs, plan, _out_dir(suite, m), list(plan.white_box), progress=progress)
      white.add(m)
      continue
    targets = {m for m in runs if m != "single"}
    if "single" in runs and targets and targets != transferred:
      if progress:
        print(f"black-box transfer from the single model to {', '.join(sorted(targets))}",
              flush=True)
      transfer(load("single"), {m: load(m) for m in runs if m != "single"}, pairs, plan,
               suite.runs_dir, progress=progress)
      transferred = targets
      continue
    # The paper's method first: the adaptive attack is the test its robustness claim must pass.
    todo = sorted((m for m in runs if m not in adaptive and plan.adaptive),
                  key=lambda m: m != "srv_fdp")
    if not todo:
      return
    m = todo[0]
    adaptive.add(m)
    model = load(m)
    if model.num_members > 1:
      if progress:
        print(f"adaptive attack ({plan.adaptive}) on {suite.run_name(m)}", flush=True)
      white_box(model, pairs, plan, _out_dir(suite, m), [plan.adaptive], progress=progress)


def _out_dir(suite, method: str) -> str:
  return os.path.join(suite.workdir(method), "suite_attacks")
