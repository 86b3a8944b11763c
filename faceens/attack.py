"""Attack benchmark of trained runs: ``python -m faceens.attack --workdir=DIR --method=ifgsm,bim,cw``.

White-box (default): LOTS adversarial examples on the run's own ensemble embedding (the paper's
adaptive attack) for N seeded source/target pairs of different people, with every step rule
asked for (``faceens.attacks.lots``); ``<method>:members`` attacks all member features at once.
Per method it writes ``attack_<method>.json`` (summary and the tau-success curve of Amada et al.
Eq. 1) and ``attack_<method>.npz`` (x_src, x_tgt, x_adv float32 NHWC in [0, 1], success,
iterations, goal, distance, l2, linf), and ``attack_summary.json`` says which attack needed the
least perturbation.

Black-box transfer (``--source-workdir=SRC``): adversarial examples are crafted on SRC at feature
distances ``--distances`` (0.2 .. 1.2), each continuing from the previous larger one, and every
run in ``--workdir`` (comma-separated) is asked whether it verifies them as the target person
at its own threshold: ``transfer_<method>.json`` in each of those runs.

Goal: ``--goal=threshold`` (the run's Euclidean verification threshold, the paper's protocol, from
the evaluated set recorded as its default in ``eval.json``, its own validation set, or from
``--threshold_from=SET``; printed at the start and stored as ``goal_source``) or a fixed feature
distance such as ``--goal=0.2``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: glibc reads its tunables at start (faceens.hostenv)
  from faceens import hostenv
  hostenv.reexec_with_hugepage_malloc()

import dataclasses
import gc
import json
import os
import time

import jax
import numpy as np

from faceens import api, evaluate, logs, provenance, sharding
from faceens.attacks import lots
from faceens.data import image_folder
from faceens.data import lfw as lfw_data
from faceens.data.image_folder import DataError
from faceens.models import ensemble


def parse_methods(spec: str) -> list[tuple[str, str, str]]:
  """``"ifgsm,cw,ifgsm:members"`` -> ``[(name, method, objective)]``."""
  out = []
  for item in [m.strip() for m in spec.split(",") if m.strip()]:
    method, _, objective = item.partition(":")
    objective = objective or "ensemble"
    if method not in lots.METHODS:
      raise ValueError(f"unknown attack method {method!r} in --method; valid: "
                       f"{', '.join(lots.METHODS)} (optionally ':members')")
    if objective not in lots.OBJECTIVES:
      raise ValueError(f"unknown objective {objective!r} in --method={item}; valid: "
                       f"{', '.join(lots.OBJECTIVES)}")
    name = method if objective == "ensemble" else f"{method}_{objective}"
    out.append((name, method, objective))
  if not out:
    raise ValueError("--method is empty; valid: " + ", ".join(lots.METHODS))
  return out


def make_pairs(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
  """``n`` distinct seeded (source, target) index pairs of different identities."""
  labels = np.asarray(labels)
  if len(set(labels.tolist())) < 2:
    raise DataError("attack pairs need images of at least two people")
  cand = np.array([(i, j) for i in range(len(labels)) for j in range(len(labels))
                   if labels[i] != labels[j]])
  rng = np.random.default_rng(seed)
  if n > len(cand):
    raise ValueError(f"--pairs={n} exceeds the {len(cand)} different-identity pairs available")
  return cand[np.sort(rng.choice(len(cand), n, replace=False))]


def attack_images(model, images_dir: str | None):
  """uint8 images and labels to draw pairs from: ``images_dir`` or the run's held-out people."""
  c = model.config
  if images_dir:
    faces = image_folder.load_image_folder(images_dir, model.input_size,
                                            image_folder.fit_spec(c))
    return faces.images, faces.labels, images_dir
  held, source = evaluate.heldout_faces(c)
  if held is None:
    raise DataError("this run has no held-out people to attack (an MS1MV2 or TFDS run); pass "
                    "--images=DIR (DIR/<identity>/*.jpg)")
  return held.images, held.labels, source


def lfw_test_pairs(c, n_pairs: int, seed: int = 0):
  """``(src, tgt, pairs)``: ``n_pairs`` seeded official different-person pairs of an LFW run's
  test folds (``data.lfw_test_folds``), uint8 images fitted as the run's inputs."""
  chosen = lfw_data.different_person_pairs(c.data.root, [f - 1 for f in c.data.lfw_test_folds],
                                           n_pairs, seed)
  src, tgt = lfw_data.load_pair_list(c.data.root, chosen, c.data.image_size,
                                     image_folder.fit_spec(c))
  return src, tgt, chosen


def pair_images(model, images_dir: str | None, n_pairs: int, seed: int = 0):
  """``(x_src, x_tgt, pairs, source)``: ``n_pairs`` seeded source/target pairs of different
  people as float images. From ``images_dir`` or the run's held-out people (``pairs``: image
  indices ``[P, 2]``), or for an LFW run (``data.kind=lfw``) the official different-person pairs
  of its test folds (``pairs``: ``"Name_0001 Other_0002"`` strings)."""
  c = model.config
  if not images_dir and c.data.kind == "lfw":
    src, tgt, chosen = lfw_test_pairs(c, n_pairs, seed)
    names = np.array([f"{p.name1}_{p.index1:04d} {p.name2}_{p.index2:04d}" for p in chosen])
    return (model.prepare(src), model.prepare(tgt), names,
            f"{c.data.root} (pairs.txt folds {', '.join(map(str, c.data.lfw_test_folds))})")
  images, labels, source = attack_images(model, images_dir)
  pairs = make_pairs(labels, n_pairs, seed)
  x = model.prepare(images)
  return x[pairs[:, 0]], x[pairs[:, 1]], pairs, source


def _goal_value(model, goal: str) -> float:
  if goal == "threshold":
    if model.paper_threshold is None:
      raise ValueError(f"{model.workdir} has no verification threshold yet; run "
                       f"python -m faceens.evaluate --workdir={model.workdir} or pass --goal=0.2")
    return float(model.paper_threshold)
  try:
    value = float(goal)
  except ValueError:
    raise ValueError(f"--goal must be 'threshold' or a feature distance > 0, got {goal!r}") from None
  if value <= 0:
    raise ValueError(f"--goal must be > 0, got {value}")
  return value


def attack_targets(model, x_tgt, cfg: lots.AttackConfig, batch_size: int = 64):
  """What LOTS pulls towards: the target faces' member features ``[K, N, d]`` for
  ``objective="members"``, else their ensemble embeddings E(x_t) ``[N, d]``."""
  tgt_feats = model.member_features(x_tgt, batch_size=batch_size)
  return tgt_feats if cfg.objective == "members" else ensemble.ensemble_embedding(tgt_feats)


def run_batches(model, x_src, x_tgt, goal, cfg: lots.AttackConfig, *, batch_size: int = 64,
                x_init=None, seed: int = 0, progress: bool = True, desc: str = "attack") -> dict:
  """Attacks every (x_src[i] -> x_tgt[i]) in jitted batches; numpy results and timings."""
  mesh = sharding.attack_mesh()
  n_dev = mesh.size if mesh is not None else 1
  batch_size = -(-batch_size // n_dev) * n_dev
  variables = model.variables
  targets_all = attack_targets(model, x_tgt, cfg, batch_size)
  n = len(x_src)
  goal = np.broadcast_to(np.asarray(goal, np.float32), (n,))

  def batch(i):
    sl = slice(i, min(i + batch_size, n))
    pad = batch_size - (sl.stop - sl.start)
    padn = lambda a, axis=0: np.concatenate(  # noqa: E731
        [a, np.repeat(np.take(a, [-1], axis=axis), pad, axis=axis)], axis=axis) if pad else a
    xs = padn(x_src[sl])
    xi = None if x_init is None else padn(x_init[sl])
    tg = padn(targets_all[:, sl], 1) if cfg.objective == "members" else padn(targets_all[sl])
    g = np.concatenate([goal[sl], np.full(pad, np.inf, np.float32)])  # padding: done at once
    return xs, xi, tg, g, batch_size - pad

  # Compile outside the clock: the same shapes with an infinite goal exit the loop at once.
  t0 = time.perf_counter()
  xs, xi, tg, g, _ = batch(0)
  lots.attack(model.apply, variables, xs, tg, np.full_like(g, np.inf), cfg, x_init=xi, mesh=mesh)
  compile_s = time.perf_counter() - t0
  outs = []
  t0 = time.perf_counter()
  with logs.progress(total=n, disable=not progress, unit="AX", desc=desc) as bar:
    for i in range(0, n, batch_size):
      xs, xi, tg, g, real = batch(i)
      r = lots.attack_with_restarts(model.apply, variables, xs, tg, g, cfg, x_init=xi,
                                    seed=seed + i, mesh=mesh)
      outs.append({k: v[:real] for k, v in r.items()})
      done = sum(int(o["success"].sum()) for o in outs)
      bar.set_postfix(success=f"{done}/{sum(len(o['success']) for o in outs)}",
                      ax_s=f"{done / (time.perf_counter() - t0):.2f}")
      bar.update(real)
  seconds = time.perf_counter() - t0
  jax.block_until_ready(outs[-1]["x_adv"])
  res = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  res["seconds"], res["compile_seconds"] = seconds, compile_s
  return res


def attack_pairs(model, x_src, x_tgt, goal, cfg: lots.AttackConfig, *, batch_size: int = 64,
                 x_init=None, seed: int = 0, progress: bool = True, desc: str = "attack") -> dict:
  """Attacks every (x_src[i] -> x_tgt[i]): on one device with one start per example
  ``run_compacted`` (no time spent on finished examples; its ``seconds`` include compilation),
  otherwise ``run_batches`` (batches sharded over this process's devices, PGD restarts).

  With several processes (``jax.distributed``) process ``p`` of ``P`` attacks the ``p``-th of
  ``P`` contiguous parts of the pairs on its own devices and every process returns the results
  of all pairs. An example's iterations depend on its own state only, so each pair gets the
  result one process would give it; PGD draws its random starts per batch, so its starts (not
  their distribution) depend on the number of processes. ``seconds``: the slowest process.
  """
  n = len(x_src)
  goal = np.broadcast_to(np.asarray(goal, np.float32), (n,))
  count = jax.process_count()
  if count == 1:
    return _attack_here(model, x_src, x_tgt, goal, cfg, batch_size=batch_size, x_init=x_init,
                        seed=seed, progress=progress, desc=desc)
  if n < count:
    raise ValueError(f"{n} pairs cannot be split over {count} processes")
  parts = np.array_split(np.arange(n), count)
  mine = parts[jax.process_index()]
  res = _attack_here(model, x_src[mine], x_tgt[mine], goal[mine], cfg, batch_size=batch_size,
                     x_init=None if x_init is None else x_init[mine], seed=seed,
                     progress=progress, desc=desc)
  return gather_parts(res, [len(p) for p in parts])


def gather_parts(res: dict, sizes: list[int]) -> dict:
  """Every process's ``res`` (arrays over its part; ``seconds``) joined in process order, on
  every process (``multihost_utils.process_allgather``; parts are padded to the largest)."""
  from jax.experimental import multihost_utils
  rows = max(sizes)
  arrays = {k: v for k, v in res.items() if isinstance(v, np.ndarray)}
  padded = {k: np.concatenate([v, np.zeros((rows - len(v),) + v.shape[1:], v.dtype)])
            for k, v in arrays.items()}
  stacked = multihost_utils.process_allgather(padded)           # [processes, rows, ...]
  out = {k: np.concatenate([v[i, :size] for i, size in enumerate(sizes)])
         for k, v in stacked.items()}
  seconds = multihost_utils.process_allgather(np.float64(res["seconds"]))
  out["seconds"] = float(np.max(seconds))
  out["compile_seconds"] = res.get("compile_seconds")
  return out


def _attack_here(model, x_src, x_tgt, goal, cfg: lots.AttackConfig, *, batch_size: int,
                 x_init, seed: int, progress: bool, desc: str) -> dict:
  """``attack_pairs`` on this process's devices."""
  if cfg.restarts > 1 or sharding.attack_mesh() is not None:
    return run_batches(model, x_src, x_tgt, goal, cfg, batch_size=batch_size, x_init=x_init,
                       seed=seed, progress=progress, desc=desc)
  return run_compacted(model, x_src, attack_targets(model, x_tgt, cfg, batch_size), goal, cfg,
                       x_init=x_init, seed=seed, progress=progress, desc=desc)


def bucket_size(n: int) -> int:
  """The smallest power of four >= n (>= 4): few batch shapes, so few compilations."""
  size = 4
  while size < n:
    size *= 4
  return size


def run_compacted(model, x_src, targets, goal, cfg: lots.AttackConfig, *, x_init=None,
                  chunk: int = 8, max_batch: int = 256, seed: int = 0, progress: bool = True,
                  desc: str = "attack") -> dict:
  """``run_batches`` paying only for unfinished examples: the loop runs ``chunk`` iterations at
  a time, and after each chunk the examples still running are packed, with their whole loop
  state (``lots.init_state``: x, CW's Adam moments and best iterate, MI-FGSM's momentum), into
  a batch of the next power of four (at most ``max_batch``, so only a few shapes compile). An
  example's iterations depend on its own state only (the model is in inference mode), so each
  example gets the iterations, success and ``x_adv`` of one uninterrupted ``lots.attack`` loop.

  ``targets``: ``[N, d]`` target embeddings (``objective="ensemble"``) or ``[K, N, d]``.
  Compiled programs stay cached for the process; see ``release_compiled`` when attacking many
  models in one process.
  """
  cfg.validate()
  if cfg.restarts != 1:
    raise ValueError("run_compacted runs one start per example; use run_batches for restarts")
  n = len(x_src)
  x_src = np.asarray(x_src, np.float32)
  goal = np.broadcast_to(np.asarray(goal, np.float32), (n,)).copy()
  members = cfg.objective == "members"
  take = lambda t, i: t[:, i] if members else t[i]  # noqa: E731
  x0 = x_src if x_init is None else np.asarray(x_init, np.float32)
  variables, apply = model.variables, model.apply
  t0 = time.perf_counter()
  # Initial states in batches of max_batch (CW evaluates the start; PGD draws its start).
  states = []
  for i in range(0, n, max_batch):
    sl = np.arange(i, min(n, i + max_batch))
    sel = _pad_index(sl, min(max_batch, bucket_size(len(sl))))
    st = lots.init_jit(apply, variables, x_src[sel], x0[sel], take(targets, sel), goal[sel],
                       jax.random.fold_in(jax.random.PRNGKey(seed), i), cfg)
    states.append(jax.tree.map(lambda a: np.asarray(a)[:len(sl)], st))
  state = jax.tree.map(lambda *a: np.concatenate(a), *states)
  x_adv, iters = np.array(x0), np.zeros(n, np.int64)
  dist = np.full(n, np.inf, np.float32)
  active = np.ones(n, bool)
  done_iters = 0
  with logs.progress(total=n, disable=not progress, unit="AX", desc=desc) as bar:
    while active.any() and done_iters < cfg.max_iters:
      c = dataclasses.replace(cfg, max_iters=min(chunk, cfg.max_iters - done_iters))
      idx = np.flatnonzero(active)
      for s in range(0, len(idx), max_batch):
        part = idx[s:s + max_batch]
        sel = _pad_index(part, min(max_batch, bucket_size(len(part))))
        sub = jax.tree.map(lambda a: a[sel], state)
        sub, (xa, it, d, fin) = lots.chunk_jit(apply, variables, x_src[sel], sub,
                                               take(targets, sel), goal[sel], c)
        k = len(part)
        sub = jax.tree.map(lambda a: np.asarray(a)[:k], sub)
        for leaf, new in zip(jax.tree.leaves(state), jax.tree.leaves(sub)):
          leaf[part] = new
        x_adv[part], iters[part] = np.asarray(xa)[:k], np.asarray(it)[:k]
        dist[part] = np.asarray(d)[:k]
        finished = np.asarray(fin)[:k]
        active[part[finished]] = False
        bar.update(int(finished.sum()))
      done_iters += c.max_iters
      bar.set_postfix(running=int(active.sum()), iteration=done_iters)
  seconds = time.perf_counter() - t0
  delta = (x_adv - x_src).reshape(n, -1)
  return {"x_adv": x_adv, "success": dist < goal, "iterations": iters, "distance": dist,
          "l2": np.linalg.norm(delta, axis=1), "linf": np.abs(delta).max(axis=1), "goal": goal,
          "seconds": seconds, "compile_seconds": None}  # compilation is inside ``seconds``


def release_compiled() -> None:
  """Drops every compiled program (``jax.clear_caches()``) and the garbage that held on to them.

  The attack loops take the model's ``apply`` and the attack's settings as static arguments, so
  every model and every attack setting compiles its own programs (one per batch bucket, see
  ``bucket_size``), and jit keeps them all for the life of the process. On XLA:CPU each program
  holds its own memory mappings: processes of ``faceens.reproduce``'s stages, attacking dozens of
  models with a dozen settings each, reached 38,805 mappings in 40 minutes and died in LLVM
  ("Cannot allocate memory", "Unable to allocate section memory") with RAM to spare, at the
  kernel's default limit of 65,530 (``vm.max_map_count``). A caller attacking many models in one
  process calls this between them (the stages do, after every attack); the next attack compiles
  again.
  """
  jax.clear_caches()
  gc.collect()


def _pad_index(idx: np.ndarray, size: int) -> np.ndarray:
  """``idx`` padded to ``size`` by repeating its last entry (padding rows are discarded)."""
  return np.concatenate([idx, np.repeat(idx[-1:], size - len(idx))])


def summarize(res: dict, cfg: lots.AttackConfig, name: str) -> dict:
  s = res["success"]
  it = res["iterations"]
  l2, linf = res["l2"], res["linf"]
  med = lambda a: float(np.median(a)) if len(a) else None  # noqa: E731
  return {
      "method": name, "n": int(len(s)), "success_rate": float(s.mean()) if len(s) else 0.0,
      "ax_per_s": float(s.sum() / res["seconds"]) if res["seconds"] > 0 else None,
      "seconds": res["seconds"], "compile_seconds": res["compile_seconds"],
      "iterations_median": med(it), "iterations_max": int(it.max()) if len(it) else None,
      "hit_iteration_cap": int(np.sum(it >= cfg.max_iters)), "max_iters": cfg.max_iters,
      "l2_median": med(l2[s]), "linf_median": med(linf[s]), "l2_mean": float(l2[s].mean())
      if s.any() else None, "distance_median": med(res["distance"]),
      "goal_median": med(res["goal"]), "config": {k: v for k, v in vars(cfg).items()},
  }


def _configs(methods, base: lots.AttackConfig):
  for name, method, objective in methods:
    yield name, dataclasses.replace(base, method=method, objective=objective).validate()


def white_box(model, methods, n_pairs: int, goal: str, out_dir: str, *, images_dir=None,
              seed: int = 0, batch_size: int = 64, base: lots.AttackConfig = lots.AttackConfig(),
              progress: bool = True) -> dict:
  """White-box attacks of ``methods`` (``parse_methods``) with the settings of ``base``."""
  x_src, x_tgt, pairs, source = pair_images(model, images_dir, n_pairs, seed)
  g = _goal_value(model, goal)
  is_main = sharding.is_main_process()
  if is_main:
    os.makedirs(out_dir, exist_ok=True)
  summaries = {}
  for name, cfg in _configs(methods, base):
    res = attack_pairs(model, x_src, x_tgt, g, cfg, batch_size=batch_size, seed=seed,
                       progress=progress, desc=name)
    summ = summarize(res, cfg, name)
    summ.update({"workdir": model.workdir, "goal": goal, "goal_value": g,
                 "goal_source": model.threshold_source if goal == "threshold" else "--goal",
                 "pairs_from": source, "seed": seed})
    summaries[name] = summ
    if not is_main:
      continue
    curve = lots.tau_curve(res["l2"], res["success"])
    with open(os.path.join(out_dir, f"attack_{name}.json"), "w") as f:
      # Eq. 1: over the successful AXs only; success_rate (of all attempts) stands beside it.
      json.dump({"summary": summ, "tau_curve": curve, "tau_curve_n_ax": int(res["success"].sum()),
                 "success_rate": summ["success_rate"], "provenance": provenance.record()}, f,
                indent=2)
    np.savez_compressed(os.path.join(out_dir, f"attack_{name}.npz"), x_src=x_src, x_tgt=x_tgt,
                        x_adv=res["x_adv"], success=res["success"], iterations=res["iterations"],
                        goal=res["goal"], distance=res["distance"], l2=res["l2"],
                        linf=res["linf"], pairs=pairs)
  ok = {k: v for k, v in summaries.items() if v["l2_median"] is not None}
  best_rate = max((v["success_rate"] for v in ok.values()), default=0)
  strongest = min((k for k, v in ok.items() if v["success_rate"] == best_rate),
                  key=lambda k: ok[k]["l2_median"], default=None)
  overall = {"workdir": model.workdir, "methods": summaries, "least_perturbation": strongest,
             "note": "least_perturbation: among the attacks with the highest success rate, the "
                     "one with the smallest median L2 perturbation",
             "provenance": provenance.record()}
  if is_main:
    with open(os.path.join(out_dir, "attack_summary.json"), "w") as f:
      json.dump(overall, f, indent=2)
  return overall


def black_box(source_model, target_models, methods, n_pairs: int, distances, *, images_dir=None,
              seed: int = 0, batch_size: int = 64, base: lots.AttackConfig = lots.AttackConfig(),
              out_dirs=None, progress: bool = True) -> dict:
  """Transfer of examples crafted on ``source_model`` to each of ``target_models``."""
  for t in target_models:
    if t.input_size != source_model.input_size:
      raise ValueError(f"{t.workdir} takes {t.input_size}px inputs but the source "
                       f"{source_model.workdir} takes {source_model.input_size}px")
    if t.paper_threshold is None:
      raise ValueError(f"{t.workdir} has no verification threshold; run python -m "
                       f"faceens.evaluate --workdir={t.workdir} first")
  x_src, x_tgt, _, source = pair_images(source_model, images_dir, n_pairs, seed)
  tgt_emb = [t.embed(x_tgt) for t in target_models]
  results = {}
  for name, cfg in _configs(methods, base):
    x_cur, iters_total = None, np.zeros(len(x_src), np.int64)
    points = [[] for _ in target_models]
    for d in sorted(distances, reverse=True):
      res = attack_pairs(source_model, x_src, x_tgt, d, cfg, batch_size=batch_size,
                         x_init=x_cur, seed=seed, progress=progress, desc=f"{name} d<{d:g}")
      x_cur = res["x_adv"]
      iters_total += res["iterations"]
      ok = res["success"]
      for ti, t in enumerate(target_models):
        e = t.embed(res["x_adv"])
        fooled = np.linalg.norm(e - tgt_emb[ti], axis=1) < t.paper_threshold
        points[ti].append({
            "distance": d, "n": int(len(ok)), "source_success_rate": float(ok.mean()),
            "transfer_rate": float(fooled[ok].mean()) if ok.any() else None,
            "transfer_rate_all": float(fooled.mean()),
            "target_threshold": float(t.paper_threshold),
            "target_threshold_source": t.threshold_source,
            "l2_mean": float(res["l2"][ok].mean()) if ok.any() else None,
            "linf_mean": float(res["linf"][ok].mean()) if ok.any() else None,
            "iterations_median": float(np.median(iters_total)),
            "ax_per_s": float(ok.sum() / res["seconds"])})
    for ti, t in enumerate(target_models):
      doc = {"provenance": provenance.record(),
             "source": source_model.workdir, "target": t.workdir, "method": name,
             "pairs_from": source, "seed": seed, "config": vars(cfg),
             "points": sorted(points[ti], key=lambda p: p["distance"])}
      results[(t.workdir, name)] = doc
      if sharding.is_main_process():
        out_dir = out_dirs[ti] if out_dirs else os.path.join(t.workdir, "attacks")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"transfer_{name}.json"), "w") as f:
          json.dump(doc, f, indent=2)
  return results


def _print_white(overall: dict) -> None:
  print(f"{'method':<16} {'n':>5} {'success':>8} {'AX/s':>8} {'iters med/max':>14} "
        f"{'L2 med':>8} {'Linf med':>9}")
  for name, s in overall["methods"].items():
    fmt = lambda v, f=".4f": "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{name:<16} {s['n']:>5} {s['success_rate']:>8.3f} {fmt(s['ax_per_s'], '.2f'):>8} "
          f"{fmt(s['iterations_median'], '.0f'):>6}/{s['iterations_max'] or 0:<7} "
          f"{fmt(s['l2_median']):>8} {fmt(s['linf_median']):>9}")
  print(f"least perturbation: {overall['least_perturbation']}")


def main(argv):
  del argv
  FLAGS = sharding.initialize_job()  # noqa: N806
  base = lots.AttackConfig(max_iters=FLAGS.max_iters, epsilon=FLAGS.epsilon,
                           step_size=FLAGS.step_size, cw_lr=FLAGS.cw_lr, cw_c=FLAGS.cw_c,
                           cw_patience=FLAGS.cw_patience, restarts=FLAGS.restarts)
  kw = dict(images_dir=FLAGS.images, seed=FLAGS.seed, batch_size=FLAGS.batch_size, base=base,
            progress=sharding.is_main_process())
  try:
    methods = parse_methods(FLAGS.method)
    workdirs = [w for w in FLAGS.workdir.split(",") if w]
    if FLAGS.source_workdir:
      distances = [float(d) for d in FLAGS.distances.split(",") if d]
      if not distances or min(distances) <= 0:
        raise ValueError(f"--distances must be positive floats, got {FLAGS.distances!r}")
      src = api.load(FLAGS.source_workdir)
      targets = [api.load(w, threshold_from=FLAGS.threshold_from) for w in workdirs]
      if sharding.is_main_process():
        for t in targets:
          print(f"{t.workdir}: threshold {t.paper_threshold:.4f} (Euclidean, no flip) from "
                f"{t.threshold_source}")
      out_dirs = [FLAGS.out] * len(targets) if FLAGS.out and len(targets) == 1 else None
      res = black_box(src, targets, methods, FLAGS.pairs, distances, out_dirs=out_dirs, **kw)
      for (target, name), doc in res.items() if sharding.is_main_process() else ():
        print(f"{name}: {FLAGS.source_workdir} -> {target}")
        for p in doc["points"]:
          rate = "n/a" if p["transfer_rate"] is None else f"{p['transfer_rate']:.3f}"
          l2 = "n/a" if p["l2_mean"] is None else f"{p['l2_mean']:.3f}"
          print(f"  distance {p['distance']:.2f}: source success {p['source_success_rate']:.3f}, "
                f"transfer {rate}, mean L2 {l2}")
      return
    if len(workdirs) != 1:
      raise ValueError("white-box attacks take one --workdir (several only with --source-workdir)")
    model = api.load(workdirs[0], threshold_from=FLAGS.threshold_from)
    if sharding.is_main_process():
      print(f"goal: {_goal_value(model, FLAGS.goal):.4f} (" + (
          f"the threshold, Euclidean, no flip, from {model.threshold_source})"
          if FLAGS.goal == "threshold" else "a fixed feature distance)"), flush=True)
    out = FLAGS.out or os.path.join(workdirs[0], "attacks")
    overall = white_box(model, methods, FLAGS.pairs, FLAGS.goal, out, **kw)
  except (ValueError, FileNotFoundError, DataError) as e:
    raise SystemExit(f"error: {e}") from None
  if sharding.is_main_process():
    _print_white(overall)
    print(f"wrote {out}/attack_<method>.json, .npz, attack_summary.json")


def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "run directory (several, comma-separated, for transfer)")
  flags.DEFINE_string("method", "ifgsm", "comma-separated: " + ", ".join(lots.METHODS) +
                      "; append ':members' to attack every member feature at once")
  flags.DEFINE_integer("pairs", 100, "number of source/target pairs (different people)")
  flags.DEFINE_string("goal", "threshold", "'threshold' (the run's) or a feature distance")
  flags.DEFINE_string("threshold_from", None, "evaluated set of eval.json whose threshold is the "
                      "goal (and each transfer target's verdict); default: the run's recorded "
                      "one, its own validation set")
  flags.DEFINE_string("source_workdir", None, "black-box: craft on this run, test on --workdir")
  flags.DEFINE_string("distances", "0.2,0.4,0.6,0.8,1.0,1.2", "black-box feature distances")
  flags.DEFINE_string("images", None, "image folder to draw pairs from (default: held-out people)")
  flags.DEFINE_string("out", None, "output folder (default: <workdir>/attacks)")
  flags.DEFINE_integer("seed", 0, "pair sampling seed")
  flags.DEFINE_integer("batch_size", 64, "examples per jitted batch (sharded over devices)")
  flags.DEFINE_integer("max_iters", 5000, "iteration cap (reported)")
  flags.DEFINE_float("epsilon", 0.1, "bim/pgd L_inf radius (paper 0.1); pgd_l2: L2 radius")
  flags.DEFINE_float("step_size", 1 / 255, "sign-step size in [0, 1] pixel units")
  flags.DEFINE_float("cw_lr", 0.01, "cw Adam learning rate on tanh-space variables")
  flags.DEFINE_float("cw_c", 0.1, "cw initial weight of the distance term (x10 when stuck)")
  flags.DEFINE_integer("cw_patience", 20, "cw: iterations without a smaller successful L2")
  flags.DEFINE_integer("restarts", 1, "pgd / pgd_l2 random restarts")
  sharding.define_distributed_flags()
  flags.adopt_module_key_flags(sharding)  # the distributed flags in --help
  for name in ("source_workdir", "batch_size", "max_iters", "step_size", "cw_lr", "cw_c",
               "cw_patience"):
    flags.DEFINE_alias(name.replace("_", "-"), name)  # --source-workdir as well as --source_workdir
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
