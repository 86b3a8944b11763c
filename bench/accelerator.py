"""Accelerator check: correctness on the GPU first, then train-step and attack speed against a
PyTorch CUDA reference in the same run. One command, at most ~8 minutes on one H100 / H200:

  PYTHONPATH=. python3 bench/accelerator.py --out $OUT/accelerator.json
  python bench/accelerator.py --smoke --out /tmp/accelerator_smoke.json   # CPU, toy sizes, ~1 min

1. Header: versions (python, jax, jaxlib, flax, optax, torch) and the device (name, memory).
2. Correctness on the device, at ``highest`` matmul precision, before any timing:
   ``vmap`` ensemble == unrolled members (features and one train step), native depthwise ==
   shifted form == fused form (forward, input and kernel gradients), bf16 train-step loss within
   5% of fp32, one LOTS attack on the device == the same attack on the host CPU. A failure exits non-zero
   before timing (``--time-anyway`` times regardless and still exits non-zero).
3. Train step images/s, 112 px, batch 256 (the paper's), MobileFaceNet width 1 with the GDC
   head, CosFace over 1000 classes, SGD: K = 1 and K = 3 (``baseline``), fp32 and bf16, ``vmap``
   and unrolled members; PyTorch: the same network and loss (``bench/train_step.py``), eager
   channels_last with bf16 autocast for the bf16 rows, K = 3 as three models in one step, and
   ``torch.compile`` when the budget allows. The top device ops of a jax profile of the K = 3
   bf16 step are recorded (``profiles``).
4. Attack adversarial examples/s: LOTS I-FGSM (1/255 sign steps) to feature distance 0.2 and to
   the model's own threshold, on a single model and a K = 3 SRV + FDP ensemble trained here for a
   few hundred steps on the bundled ORL faces at 112 px, 1024 pairs of held-out people, batches of
   256 and 1024; PyTorch: the same weights ported (``bench/attack.py``) running the same batched
   loop with a done mask.
5. The LFW suite is not part of this run: the library has no LFW reader yet.

Everything goes to one JSON (rewritten after every row, so a run cut short keeps what it
measured) and a short table is printed. ``--budget`` (seconds) skips the remaining rows, each
recorded as skipped, once it is spent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import gzip
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import attack as attack_bench  # noqa: E402  (bench/attack.py: the PyTorch port and loop)
import train_step as train_bench  # noqa: E402  (bench/train_step.py: both train steps)


@dataclasses.dataclass(frozen=True)
class Sizes:
  size: int = 112
  width: float = 1.0
  blocks: tuple = (1, 4, 6, 2)
  embedding_dim: int = 512
  batch: int = 256
  classes: int = 1000
  steps: int = 10                  # timed train steps (median)
  check_batch: int = 16            # correctness checks
  dw_shape: tuple = (32, 28, 28, 128)
  attack_train_steps: int = 300    # steps of the models attacked (ORL, batch 64)
  attack_pairs: int = 1024
  attack_batches: tuple = (256, 1024)
  attack_max_iters: int = 1000
  workers: int = 4
  members: int = 3                 # K of the ensemble rows (the paper's 3)

  def train_step_kwargs(self) -> dict:
    """The network, batch and head sizes both train-step benchmarks take."""
    return dict(batch=self.batch, size=self.size, classes=self.classes, width=self.width,
                blocks=self.blocks, embedding_dim=self.embedding_dim)


FULL = Sizes()
# Correctness checks compare code paths, not speed: the same ops on a shallower network compile
# in a fraction of the time.
FULL_CHECK = dataclasses.replace(FULL, size=64, width=0.5, blocks=(1, 2, 2, 1), embedding_dim=128)
SMOKE = Sizes(size=32, width=0.125, blocks=(1, 1, 1, 1), embedding_dim=16, batch=8, classes=30,
              steps=2, check_batch=4, dw_shape=(2, 8, 8, 16), attack_train_steps=3,
              attack_pairs=16, attack_batches=(8, 16), attack_max_iters=20, workers=0,
              members=2)


class Budget:
  def __init__(self, seconds: float):
    self.t0, self.seconds = time.perf_counter(), seconds

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.t0)


class Report:
  """The JSON document, rewritten after every row."""

  def __init__(self, path: str):
    self.path = path
    self.doc = {"header": {}, "correctness": {}, "train_step": [], "attack": [], "skipped": [],
                "profiles": {}, "goals": {}}

  def write(self):
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.doc, f, indent=2, default=float)
    os.replace(tmp, self.path)

  def skip(self, what: str, why: str):
    self.doc["skipped"].append({"what": what, "why": why})
    print(f"skipped {what}: {why}", flush=True)
    self.write()


# ----------------------------------------------------------------------------- header


def header(torch_ok: bool) -> dict:
  import flax
  import jax
  import jaxlib
  import optax
  dev = jax.devices()[0]
  h = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
       "flax": flax.__version__, "optax": optax.__version__, "backend": jax.default_backend(),
       "device": getattr(dev, "device_kind", str(dev)), "device_count": jax.device_count(),
       "machine": platform.machine(), "cpu_count": os.cpu_count(),
       "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  with contextlib.suppress(Exception):
    h["device_memory_gib"] = dev.memory_stats()["bytes_limit"] / 2**30
  if torch_ok:
    import torch
    h["torch"] = torch.__version__
    h["torch_cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available():
      h["torch_device"] = torch.cuda.get_device_name(0)
  else:
    h["torch"] = None
  return h


# ----------------------------------------------------------------------------- correctness


def _config(method: str, sz: Sizes, **over):
  from faceens import configs
  loss = "cosface" if method in ("single", "baseline") else "arcface"
  c = configs.experiment(f"{loss}_{method}", "full")
  c.model.head = "gdc"
  c.model.width, c.model.blocks, c.model.embedding_dim = sz.width, tuple(sz.blocks), sz.embedding_dim
  c.data.image_size = sz.size
  if method != "single":
    c.ensemble.num_members = sz.members
  for key, value in over.items():
    section, _, field = key.partition("__")
    c[section][field] = value
  return c


def _rel(a, b) -> float:
  """max |a - b| / max |b| over all leaves."""
  import jax
  la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  num = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
            for x, y in zip(la, lb))
  den = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in lb)
  return num / max(den, 1e-30)


def _check(name, value, tol, extra=None) -> dict:
  ok = bool(np.isfinite(value) and value <= tol)
  print(f"  {'ok  ' if ok else 'FAIL'} {name}: {value:.3g} (tolerance {tol:g})", flush=True)
  return {"value": value, "tolerance": tol, "ok": ok, **(extra or {})}


def check_ensemble_steps(sz: Sizes) -> dict:
  """SRV + FDP ensemble: ``jax.vmap`` over stacked members == members one after another
  (features and one train step, fp32), and the bf16 step's loss within 5% of the fp32 one."""
  import jax
  from faceens import models, train
  from faceens.models import ensemble
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (sz.check_batch, sz.size, sz.size, 3), dtype=np.uint8)
  y = rng.integers(0, sz.classes, sz.check_batch).astype(np.int32)
  results = {}
  for strategy, dtype in (("vmap", "float32"), ("unrolled", "float32"), ("vmap", "bfloat16")):
    c = _config("srv_fdp", sz, ensemble__strategy=strategy, model__dtype=dtype)
    opt = train.make_optimizer(c, 100)
    model = models.get_model(c)
    state = train.create_train_state(c, sz.classes, opt)
    feats = None
    if dtype == "float32":
      variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
      feats = jax.jit(lambda v, z, m=model, s=strategy: ensemble.apply_members(m, v, z, strategy=s))(
          variables, models.normalize_images(x))
    # Default precision for the bf16 step (what training uses); the fp32 ones run under the
    # caller's "highest".
    with jax.default_matmul_precision("default") if dtype == "bfloat16" else contextlib.nullcontext():
      new, m = jax.jit(train.make_train_step(c, model, opt))(state, x, y)
    update = jax.tree.map(lambda a, b: a - b, new.params, state.params)
    results[(strategy, dtype)] = (feats, new.params, float(m["loss"]), update)
  v, u, b = results[("vmap", "float32")], results[("unrolled", "float32")], results[("vmap", "bfloat16")]
  return {
      "features": _check("vmap == unrolled, features", _rel(v[0], u[0]), 1e-4),
      # Recorded, not a gate: relative to the parameters themselves (an H200 run gave 3.7e-5
      # against the 1e-5 this once had, with loss and features equal); the gate below measures
      # the same difference against the size of the update (lr * gradient) it belongs to.
      "train_step_params_info": {"value": _rel(v[1], u[1])},
      "train_step_update": _check("vmap == unrolled, the update of one step", _rel(v[3], u[3]),
                                  1e-2),
      "train_step_loss": _check("vmap == unrolled, loss", abs(v[2] - u[2]) / abs(u[2]), 1e-5),
      "bf16_loss": _check("bf16 train-step loss vs fp32 (relative)", abs(b[2] - v[2]) / abs(v[2]),
                          5e-2, {"fp32": v[2], "bf16": b[2]}),
  }


def check_depthwise(sz: Sizes) -> dict:
  """Native grouped conv == 9 shifted multiply-adds (the CPU form) == the fused GPU form (custom
  VJPs): forward, d/dx, d/dkernel."""
  import jax
  import jax.numpy as jnp
  from faceens.models import depthwise
  out = {}
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, sz.dw_shape, jnp.float32)
  kernel = jax.random.normal(kk, (3, 3, 1, sz.dw_shape[-1]), jnp.float32) * 0.3
  for stride in (1, 2):
    res = {}
    for impl in ("native", "shifted", "fused"):
      f = jax.jit(lambda a, w, impl=impl: depthwise.depthwise_conv(a, w, stride, None, impl))
      y, vjp = jax.vjp(f, x, kernel)
      g = jax.random.normal(kg, y.shape, y.dtype)
      res[impl] = (y,) + tuple(vjp(g))
    for i, part in enumerate(("forward", "grad_x", "grad_kernel")):
      out[f"stride{stride}_{part}"] = _check(f"depthwise native == shifted, stride {stride}, {part}",
                                             _rel(res["native"][i], res["shifted"][i]), 1e-5)
      out[f"stride{stride}_{part}_fused"] = _check(
          f"depthwise native == fused, stride {stride}, {part}",
          _rel(res["native"][i], res["fused"][i]), 1e-5)
  return out


def check_attack_device_vs_cpu() -> dict:
  """LOTS (max-norm-scaled gradient steps, 10 iterations) on an ensemble: device == host CPU."""
  import jax
  from faceens import api, train
  from faceens.attacks import lots
  sz = SMOKE
  c = _config("srv_fdp", sz)
  state = train.create_train_state(c, sz.classes, train.make_optimizer(c, 10))
  variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
  model = api.FaceModel(c, variables)
  rng = np.random.default_rng(2)
  xs = rng.random((8, sz.size, sz.size, 3), dtype=np.float32)
  xt = rng.random((8, sz.size, sz.size, 3), dtype=np.float32)
  cfg = lots.AttackConfig(method="lots", max_iters=10)
  goal = np.zeros(8, np.float32)  # never reached: every example takes all 10 steps

  def run():
    v = jax.device_put(variables)
    targets = np.asarray(jax.jit(model.apply)(v, xt)).mean(axis=0)
    return lots.attack(model.apply, v, xs, targets, goal, cfg)

  dev = run()
  if jax.default_backend() == "cpu":
    host = dev  # no accelerator (--smoke): the code path runs once
  else:
    with jax.default_device(jax.devices("cpu")[0]):
      host = run()
  out = {"x_adv": _check("attack on device == host CPU, x_adv (max abs, pixels in [0, 1])",
                         float(np.max(np.abs(dev["x_adv"] - host["x_adv"]))), 2e-3),
         "distance": _check("attack on device == host CPU, final distance (max abs)",
                            float(np.max(np.abs(dev["distance"] - host["distance"]))), 1e-3)}
  out["iterations_equal"] = bool(np.array_equal(dev["iterations"], host["iterations"]))
  return out


def _guarded(fn, *args) -> dict:
  """A check that raises is a failed check with its error, not the end of the run."""
  import traceback
  try:
    return fn(*args)
  except Exception as e:
    print(f"  FAIL {fn.__name__}: {type(e).__name__}: {e}", flush=True)
    return {"error": {"ok": False, "message": f"{type(e).__name__}: {e}"[:1000],
                      "traceback": traceback.format_exc()[-3000:]}}


def correctness(sz: Sizes) -> dict:
  import jax
  print("correctness (matmul precision: highest)", flush=True)
  with jax.default_matmul_precision("highest"):
    out = {"ensemble_steps": _guarded(check_ensemble_steps, sz),
           "depthwise": _guarded(check_depthwise, sz),
           "attack_device_vs_cpu": _guarded(check_attack_device_vs_cpu)}
  out["ok"] = all(v["ok"] for group in out.values() if isinstance(group, dict)
                  for v in group.values() if isinstance(v, dict) and "ok" in v)
  return out


# ----------------------------------------------------------------------------- profile


def top_device_ops(trace_dir: str, n: int = 15) -> list[dict]:
  """Top ops by summed duration in a ``jax.profiler`` perfetto trace (device lanes if any)."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not paths:
    return []
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
    doc = json.load(f)
  events = doc["traceEvents"] if isinstance(doc, dict) else doc
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name" and "args" in e}
  device_pids = {p for p, name in names.items() if "GPU" in name or "TPU" in name}
  totals: dict[str, float] = {}
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    if device_pids and e.get("pid") not in device_pids:
      continue
    if e["name"].startswith("$") or "Execute" in e["name"] or "PjitFunction" in e["name"]:
      continue  # host-side Python frames and runtime wrappers (CPU traces)
    totals[e["name"]] = totals.get(e["name"], 0.0) + float(e["dur"])
  total = sum(totals.values()) or 1.0
  top = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
  return [{"op": k, "ms": v / 1e3, "share": v / total} for k, v in top]


# ----------------------------------------------------------------------------- train step


def train_rows(sz: Sizes, report: Report, budget: Budget, torch_device: str | None, tmp: str):
  common = sz.train_step_kwargs()
  # (K, dtype, strategy, PyTorch reference runs): most important first.
  k = sz.members
  rows = [(k, "bfloat16", "vmap", True), (1, "bfloat16", "vmap", True), (1, "float32", "vmap", True),
          (k, "float32", "vmap", True), (k, "bfloat16", "unrolled", False),
          (k, "float32", "unrolled", False)]
  if sz is SMOKE:  # every code path once: both dtypes, both strategies, both K
    rows = [(k, "bfloat16", "vmap", True), (1, "float32", "unrolled", True)]
  torch_cache = {}
  for k, dtype, strategy, with_torch in rows:
    name = f"K={k} {dtype} {strategy}"
    if budget.left() < 45:
      report.skip(f"train step {name}", f"budget ({budget.seconds:.0f} s) spent")
      continue
    row = {"members": k, "dtype": dtype, "strategy": strategy, **common}
    # The ensemble bf16 step (the first row) is also profiled: where its device time goes.
    first = not report.doc["train_step"] and k > 1
    trace_dir = os.path.join(tmp, "profile") if first else None
    try:
      row["jax"] = train_bench.bench_jax(k, sz.steps, "auto", strategy, dtype=dtype,
                                         profile_dir=trace_dir, **common)
      if trace_dir:
        report.doc["profiles"][f"train_K{k}_{dtype}_{strategy}"] = top_device_ops(trace_dir)
    except Exception as e:
      report.skip(f"train step {name}", f"faceens failed: {type(e).__name__}: {e}"[:1000])
      continue
    key = (k, dtype)
    if torch_device and with_torch and key not in torch_cache:
      try:
        torch_cache[key] = train_bench.bench_torch(k, sz.steps, True, device=torch_device,
                                                   bf16=dtype == "bfloat16", **common)
      except Exception as e:
        report.skip(f"PyTorch train step K={k} {dtype}", f"{type(e).__name__}: {e}"[:1000])
    if torch_device and key in torch_cache:
      row["torch_eager_channels_last"] = torch_cache[key]
      row["speedup_vs_torch_eager"] = row["jax"]["img_per_s"] / torch_cache[key]["img_per_s"]
    report.doc["train_step"].append(row)
    print(f"train step {name}: jax {row['jax']['img_per_s']:.0f} img/s (compile "
          f"{row['jax']['compile_s']:.0f} s)" + (
              f", torch eager {row['torch_eager_channels_last']['img_per_s']:.0f} img/s, ratio "
              f"{row['speedup_vs_torch_eager']:.2f}x" if "speedup_vs_torch_eager" in row else ""),
          flush=True)
    report.write()


def torch_compile_rows(sz: Sizes, report: Report, budget: Budget, torch_device: str):
  common = sz.train_step_kwargs()
  for k in (sz.members, 1):
    if budget.left() < 120:
      report.skip(f"torch.compile K={k} bf16", "budget left under 120 s")
      continue
    try:
      r = train_bench.bench_torch(k, sz.steps, True, device=torch_device, bf16=True, compile=True,
                                  **common)
    except Exception as e:  # a compiler failure is a result, not a crash of the whole run
      r = {"error": f"{type(e).__name__}: {e}"[:500]}
    for row in report.doc["train_step"]:
      if row["members"] == k and row["dtype"] == "bfloat16" and row["strategy"] == "vmap":
        row["torch_compile_channels_last"] = r
        if "img_per_s" in r:
          row["speedup_vs_torch_compile"] = row["jax"]["img_per_s"] / r["img_per_s"]
    print(f"torch.compile K={k} bf16: " + (f"{r['img_per_s']:.0f} img/s (first step "
                                          f"{r['first_step_s']:.0f} s)" if "img_per_s" in r
                                          else r["error"]), flush=True)
    report.write()


# ----------------------------------------------------------------------------- attacks


def train_attack_model(method: str, sz: Sizes, workdir: str):
  """A model to attack: ``method`` trained on the bundled ORL faces (s1-s30) at ``sz.size``."""
  from faceens import configs, train
  c = configs.experiment(f"arcface_{method}", "demo")
  c.data.image_size = sz.size
  c.model.width, c.model.blocks, c.model.embedding_dim = sz.width, tuple(sz.blocks), sz.embedding_dim
  c.data.workers = sz.workers
  if method != "single":
    c.ensemble.num_members = sz.members
  c.train.steps = sz.attack_train_steps
  c.train.checkpoint_every = sz.attack_train_steps
  c.train.eval_every = 0
  c.train.batch_size = min(c.train.batch_size, 64 if sz is FULL else 8)
  t0 = time.perf_counter()
  summary = train.train_and_evaluate(c, workdir, progress=False)
  return summary, time.perf_counter() - t0


def attack_rows(sz: Sizes, report: Report, budget: Budget, torch_device: str | None, tmp: str):
  for method in ("single", "srv_fdp"):
    if budget.left() < 60:
      report.skip(f"attacks on {method}", "budget left under 60 s")
      continue
    try:
      _attack_model_rows(method, sz, report, budget, torch_device, tmp)
    except Exception as e:
      import traceback
      report.skip(f"attacks on {method}", f"{type(e).__name__}: {e}"[:1000])
      report.doc["skipped"][-1]["traceback"] = traceback.format_exc()[-3000:]
      report.write()


def _attack_model_rows(method: str, sz: Sizes, report: Report, budget: Budget,
                       torch_device: str | None, tmp: str):
  import jax

  import faceens
  from faceens import attack as attack_cli
  from faceens.attacks import lots
  workdir = os.path.join(tmp, method)
  summary, seconds = train_attack_model(method, sz, workdir)
  model = faceens.load(workdir)
  images, labels, _ = attack_cli.attack_images(model, None)
  pairs = attack_cli.make_pairs(labels, sz.attack_pairs, seed=0)
  x = model.prepare(images)
  xs, xt = x[pairs[:, 0]], x[pairs[:, 1]]
  trained = {"method": method, "members": model.num_members, "train_seconds": seconds,
             "train_steps": sz.attack_train_steps,
             "heldout_paper_accuracy": summary["heldout_paper_accuracy"],
             "threshold": model.paper_threshold}
  net = None
  if torch_device:
    import torch
    variables = jax.device_get(model.variables)
    net = (attack_bench.torch_mobilefacenet(variables, model.config) if model.num_members == 1
           else attack_bench.torch_ensemble(variables, model.config)).to(torch_device)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(torch_device)  # noqa: E731
    with torch.no_grad():
      tgt_all = torch.cat([net(to_t(xt[i:i + 256])) for i in range(0, len(xt), 256)])
    port_err = float(np.abs(tgt_all.cpu().numpy() - model.embed(xt, batch_size=256)).max())
    trained["torch_port_max_abs_err"] = port_err
    print(f"{method}: PyTorch port max |feature difference| {port_err:.1e}", flush=True)
  cfg = lots.AttackConfig(method="ifgsm", max_iters=sz.attack_max_iters)
  for goal_name in ("0.2", "threshold"):
    goal = attack_cli._goal_value(model, goal_name)
    for batch in sz.attack_batches:
      if budget.left() < 30:
        report.skip(f"attack {method} goal {goal_name} batch {batch}", "budget left under 30 s")
        continue
      res = attack_cli.run_batches(model, xs, xt, goal, cfg, batch_size=batch, progress=False)
      row = {**trained, "goal": goal_name, "goal_value": goal, "batch": batch,
             "pairs": len(xs), "step_size": cfg.step_size, "max_iters": cfg.max_iters,
             "jax": {"ax_per_s": float(res["success"].sum() / res["seconds"]),
                     "seconds": res["seconds"], "compile_s": res["compile_seconds"],
                     "success_rate": float(res["success"].mean()),
                     "iterations_median": float(np.median(res["iterations"])),
                     "iterations_max": int(res["iterations"].max())}}
      if net is not None:
        t0 = time.perf_counter()
        ok, its = [], []
        for i in range(0, len(xs), batch):
          _, o, it = attack_bench.torch_lots_ifgsm(net, to_t(xs[i:i + batch]),
                                                   tgt_all[i:i + batch], goal, cfg.step_size,
                                                   cfg.max_iters)
          ok.append(o.cpu().numpy())
          its.append(it.cpu().numpy())
        if torch_device.startswith("cuda"):
          torch.cuda.synchronize()
        tt = time.perf_counter() - t0
        ok, its = np.concatenate(ok), np.concatenate(its)
        row["torch_batched"] = {"ax_per_s": float(ok.sum() / tt), "seconds": tt,
                                "success_rate": float(ok.mean()),
                                "iterations_median": float(np.median(its)),
                                "iterations_equal_to_jax": float(np.mean(its == res["iterations"]))}
        row["speedup_vs_torch_batched"] = row["jax"]["ax_per_s"] / row["torch_batched"]["ax_per_s"]
      report.doc["attack"].append(row)
      print(f"attack {method} goal {goal_name} ({goal:.3f}) batch {batch}: jax "
            f"{row['jax']['ax_per_s']:.0f} AX/s (iterations median {row['jax']['iterations_median']:.0f}"
            f", max {row['jax']['iterations_max']})" + (
                f", torch {row['torch_batched']['ax_per_s']:.0f} AX/s, ratio "
                f"{row['speedup_vs_torch_batched']:.2f}x" if net is not None else ""), flush=True)
      report.write()


# ----------------------------------------------------------------------------- goals, table


def goals(doc: dict) -> dict:
  g = {}
  for row in doc["train_step"]:
    if (row["members"] > 1, row["dtype"], row["strategy"]) == (True, "bfloat16", "vmap") and \
        "speedup_vs_torch_eager" in row:
      g[f"train_K{row['members']}_bf16_vs_torch_eager >= 1.5"] = {"value": row["speedup_vs_torch_eager"],
                                                  "met": row["speedup_vs_torch_eager"] >= 1.5}
  for row in doc["attack"]:
    if row["method"] == "single" and row["goal"] == "0.2":
      key = f"batch {row['batch']}"
      g[f"attack_single_0.2_{key} >= 1000 AX/s"] = {"value": row["jax"]["ax_per_s"],
                                                     "met": row["jax"]["ax_per_s"] >= 1000}
      if "speedup_vs_torch_batched" in row:
        g[f"attack_single_0.2_{key} vs torch >= 2"] = {"value": row["speedup_vs_torch_batched"],
                                                        "met": row["speedup_vs_torch_batched"] >= 2}
  return g


def print_table(doc: dict):
  h = doc["header"]
  print(f"\n{h.get('device')} ({h.get('backend')}), jax {h.get('jax')}, torch {h.get('torch')}")
  print("| train step | faceens img/s | PyTorch eager img/s | ratio | torch.compile img/s |")
  print("| --- | --- | --- | --- | --- |")
  for r in doc["train_step"]:
    t = r.get("torch_eager_channels_last", {}).get("img_per_s")
    tc = r.get("torch_compile_channels_last", {}).get("img_per_s")
    print(f"| K={r['members']} {r['dtype']} {r['strategy']} | {r['jax']['img_per_s']:.0f} | "
          f"{t if t is None else round(t)} | {r.get('speedup_vs_torch_eager', float('nan')):.2f} | "
          f"{tc if tc is None else round(tc)} |")
  print("\n| attack (I-FGSM) | goal | batch | faceens AX/s | PyTorch AX/s | ratio | iterations median |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in doc["attack"]:
    t = r.get("torch_batched", {}).get("ax_per_s")
    print(f"| {r['method']} (K={r['members']}) | {r['goal']} ({r['goal_value']:.3f}) | {r['batch']} | "
          f"{r['jax']['ax_per_s']:.0f} | {t if t is None else round(t)} | "
          f"{r.get('speedup_vs_torch_batched', float('nan')):.2f} | {r['jax']['iterations_median']:.0f} |")
  for k, v in doc["goals"].items():
    print(f"goal {k}: {v['value']:.2f} {'met' if v['met'] else 'NOT met'}")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="toy sizes on CPU, every step, ~1 minute")
  p.add_argument("--out", default=None, help="JSON path (default: $OUT/accelerator.json or "
                                             "bench/results/accelerator.json)")
  p.add_argument("--budget", type=float, default=450.0, help="seconds; later rows are skipped")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
  p.add_argument("--skip-correctness", action="store_true",
                 help="timing only (the checks ran in an earlier run of the same session)")
  p.add_argument("--time-anyway", action="store_true",
                 help="time even if a correctness check failed (the exit status stays 1)")
  a = p.parse_args(argv)
  if a.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Toy sizes: compile time dominates, and the smoke run checks code paths, not speed.
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  out = a.out or (os.path.join(os.environ["OUT"], "accelerator.json") if os.environ.get("OUT")
                  else os.path.join(BENCH, "results", "accelerator.json"))
  import jax
  sz = SMOKE if a.smoke else FULL
  budget = Budget(a.budget)
  report = Report(out)
  torch_device = None
  if not a.no_torch:
    try:
      import torch
      torch_device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
      if jax.default_backend() != "cpu" and torch_device == "cpu":
        torch_device = None  # a CPU reference says nothing about the accelerator
    except ImportError:
      report.skip("PyTorch reference", "torch is not installed")
  report.doc["header"] = header(torch_device is not None)
  report.doc["header"].update({"smoke": a.smoke, "sizes": dataclasses.asdict(sz),
                               "torch_device": torch_device, "budget_s": a.budget})
  report.doc["lfw_suite"] = ("not part of this script: python -m faceens.reproduce --suite=lfw "
                              "--lfw=DIR runs it (reports/lfw on CPU)")
  print(json.dumps(report.doc["header"]), flush=True)
  report.write()

  t0 = time.perf_counter()
  if a.skip_correctness:
    report.doc["correctness"] = {"ok": True, "skipped": "--skip-correctness"}
  else:
    report.doc["correctness"] = correctness(FULL_CHECK if sz is FULL else sz)
  report.doc["correctness"]["seconds"] = time.perf_counter() - t0
  report.doc["header"]["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  report.write()
  ok = report.doc["correctness"]["ok"]
  if not ok:
    print("CORRECTNESS FAILED: see 'correctness' in " + out, file=sys.stderr, flush=True)
    if not a.time_anyway:
      return 1

  with tempfile.TemporaryDirectory() as tmp:
    train_rows(sz, report, budget, torch_device, tmp)
    attack_rows(sz, report, budget, torch_device, tmp)
    if torch_device and not a.no_compile and not a.smoke:
      torch_compile_rows(sz, report, budget, torch_device)
  report.doc["goals"] = goals(report.doc)
  report.doc["wall_s"] = time.perf_counter() - budget.t0
  report.write()
  print_table(report.doc)
  print(f"wrote {out} ({report.doc['wall_s']:.0f} s)")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
