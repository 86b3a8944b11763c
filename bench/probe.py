"""Accelerator probe: which compiler settings and depthwise form make faceens fastest on this GPU.
One process, one device call (about 6 minutes on one H100 / H200 with compilation):

  PYTHONPATH=. python3 bench/probe.py --out $OUT/probe.json
  python bench/probe.py --smoke --out /tmp/probe_smoke.json      # CPU, toy sizes, every row

Rows, cheapest answers first (``--budget`` seconds from the process start; a row starts only
while at least the longest row so far is left, else it is recorded as skipped; the JSON is
rewritten after every row, so a kill loses the row in progress only):

1. The K = 3 bf16 train step (``baseline``, 112 px, batch 256, width 1, GDC head, CosFace over
   1000 classes; ``bench/train_step.jax_step``) and the attack step (forward + input gradient of
   ``||E(x) - t||^2`` on a single model, batch 256), for depthwise ``native`` (cuDNN's grouped
   convolution) and ``fused`` (``faceens.models.depthwise``), with XLA's GPU autotuning off
   (level 0), each with a per-function ``compiler_options`` (one process, no flag changes):
   compile seconds, median step seconds and the top device ops of a 3-step profile.
2. MobileFaceNet's depthwise layers (the shapes the network really has, read off its trace), in
   bfloat16 as the train step runs them: forward and forward+backward milliseconds for native,
   fused and PyTorch's channels_last grouped conv (cuDNN with its heuristics) on the same device,
   each the median over batches of calls (one synchronisation per batch, so launch latency does
   not hide the kernels).
3. The same steps tuned: level 4 (XLA's default; every tuned row writes XLA's autotune results
   next to the JSON, ``<out>.autotune.txt``, ``--xla_gpu_dump_autotune_results_to``, which later
   runs can load with ``XLA_FLAGS=--xla_gpu_load_autotune_results_from=FILE`` instead of tuning
   again),
   level 4 without Triton GEMM fusions, then level 2. Levels 2 to 4 time the same candidates
   (they differ in buffer initialisation and result checks), and XLA keeps one autotune cache per
   process, keyed on the fused computation, not the level: a tuned row after the first reuses
   its choices where the computations match, so only the first tuned row's ``compile_s`` includes
   the tuning (``tuned_after``).

On CPU the GPU options are accepted and ignored: ``--smoke`` checks that every row runs, not its
speed.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()   # the budget counts from here: imports and device start-up included

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import accelerator  # noqa: E402  (header, Report, Budget, top_device_ops)
import train_step as train_bench  # noqa: E402

# XLA GPU settings compared (DebugOptions fields, per compilation).
UNTUNED = {"autotune0": {"xla_gpu_autotune_level": 0}}
TUNED = {
    "autotune4": {"xla_gpu_autotune_level": 4},
    "autotune4_no_triton_gemm": {"xla_gpu_autotune_level": 4, "xla_gpu_enable_triton_gemm": False},
    "autotune2": {"xla_gpu_autotune_level": 2},
}
TUNINGS = UNTUNED | TUNED
IMPLS = ("native", "fused")


@dataclasses.dataclass(frozen=True)
class ProbeSizes(accelerator.Sizes):
  """The accelerator check's network and batch sizes (112 px, batch 256, width 1, K = 3)."""
  layer_reps: int = 20   # timed batches per depthwise layer (median)
  layer_calls: int = 10  # calls per batch, one synchronisation each


FULL = ProbeSizes()
SMOKE = ProbeSizes(**(dataclasses.asdict(accelerator.SMOKE) | {"layer_reps": 2,
                                                                 "layer_calls": 2}))


def _median_s(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _profile(one, tmp: str, name: str) -> list[dict] | str:
  """The top device ops of 3 steps, or the profiler's error (the row's timings stand)."""
  try:
    trace = os.path.join(tmp, name)
    train_bench.trace_steps(one, trace)
    return accelerator.top_device_ops(trace, n=10)
  except Exception as e:  # noqa: BLE001  (a profiler failure must not cost the row)
    return f"profile failed: {type(e).__name__}: {e}"[:500]


class RowBudget:
  """``--budget`` seconds from ``T0``; a row may start while the longest row so far fits."""

  def __init__(self, seconds: float):
    self.seconds, self.longest = seconds, 0.0

  def fits(self) -> bool:
    return self.seconds - (time.perf_counter() - T0) > self.longest

  def took(self, seconds: float) -> None:
    self.longest = max(self.longest, seconds)


# ----------------------------------------------------------------------------- steps


def train_row(sz: ProbeSizes, impl: str, options: dict):
  """The K-member bf16 train step: ``(one, compile_s)``."""
  one, info = train_bench.jax_step(
      sz.members, impl, "vmap", dtype="bfloat16", batch=sz.batch, size=sz.size,
      classes=sz.classes, width=sz.width, blocks=sz.blocks, embedding_dim=sz.embedding_dim,
      compiler_options=options)
  return one, info["compile_s"]


def attack_row(sz: ProbeSizes, impl: str, options: dict):
  """Forward + input gradient of ``||E(x) - t||^2`` on one model (LOTS' step, without the
  update): ``(one, compile_s)``."""
  import jax
  import jax.numpy as jnp
  from faceens import api, train
  c = accelerator._config("single", sz)
  c.model.depthwise_impl = impl
  state = train.create_train_state(c, sz.classes, train.make_optimizer(c, 10))
  model = api.FaceModel(c, {"params": state.params["backbone"], "batch_stats": state.batch_stats})
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((sz.batch, sz.size, sz.size, 3), dtype=np.float32))
  t = jnp.asarray(rng.normal(size=(sz.batch, sz.embedding_dim)).astype(np.float32) * 0.05)
  v = jax.device_put(model.variables)

  def step(variables, xx, tt):
    loss = lambda u: jnp.sum(jnp.square(  # noqa: E731
        model.apply(variables, u).mean(axis=0) - tt))
    return jax.value_and_grad(loss)(xx)

  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(v, x, t).compile(compiler_options=options)

  def one():
    return float(jax.block_until_ready(compiled(v, x, t))[0])
  one()
  return one, time.perf_counter() - t0


def step_rows(sz: ProbeSizes, report, budget: RowBudget, tmp: str, tunings: dict,
              autotune_file: str | None = None) -> None:
  """One row per tuning x workload x depthwise form. ``autotune_file``: every compilation dumps
  XLA's autotune results there (the process's whole cache, rewritten each time, so the file
  holds every tuned row's choices however far the budget goes)."""
  plan = [(t, w, i) for t in tunings for w in ("train", "attack") for i in IMPLS]
  tuned_before = [r["tuning"] for r in report.doc["steps"] if r["tuning"] in TUNED]
  for tuning, which, impl in plan:
    workload, build = (("train_k%d_bf16" % sz.members, train_row) if which == "train"
                       else ("attack_single", attack_row))
    what = f"{workload} {impl} {tuning}"
    if not budget.fits():
      report.skip(what, "budget spent")
      continue
    opts = dict(tunings[tuning])
    if autotune_file:
      opts["xla_gpu_dump_autotune_results_to"] = autotune_file
    t0 = time.perf_counter()
    try:
      one, compile_s = build(sz, impl, opts)
      step_s = _median_s(one, sz.steps)
      row = {"workload": workload, "depthwise": impl, "tuning": tuning,
             "options": tunings[tuning], "compile_s": compile_s, "step_s": step_s,
             "img_per_s": sz.batch / step_s,
             "top_ops": _profile(one, tmp, what.replace(" ", "_"))}
    except Exception as e:  # noqa: BLE001  (a compiler failure is a result, not the end)
      row = {"workload": workload, "depthwise": impl, "tuning": tuning,
             "error": f"{type(e).__name__}: {e}"[:1000]}
    if tuning in TUNED and tuned_before:
      row["tuned_after"] = sorted(set(tuned_before))
    if tuning in TUNED:
      tuned_before.append(tuning)
    budget.took(time.perf_counter() - t0)
    report.doc["steps"].append(row)
    report.write()
    print(f"{what}: " + (f"compile {row['compile_s']:.1f} s, step {row['step_s'] * 1e3:.1f} ms"
                         if "error" not in row else row["error"][:200]), flush=True)
  if autotune_file and os.path.isfile(autotune_file):
    report.doc["autotune_results"] = os.path.basename(autotune_file)


# ----------------------------------------------------------------------------- layers


def depthwise_layers(sz: ProbeSizes) -> list[dict]:
  """``{"x": shape, "kernel": shape, "stride", "padding"}`` of every distinct depthwise call of
  MobileFaceNet at these sizes, read off an abstract trace of the network."""
  import jax
  from faceens import models
  from faceens.models import mobilefacenet
  c = accelerator._config("single", sz)
  seen, real = [], mobilefacenet.depthwise_conv

  def record(x, kernel, stride=1, padding=None, impl="auto"):
    key = {"x": [sz.batch, *x.shape[1:]], "kernel": list(kernel.shape), "stride": int(stride),
           "padding": padding}
    if key not in seen:
      seen.append(key)
    return real(x, kernel, stride, padding, impl)
  mobilefacenet.depthwise_conv = record
  try:
    model = models.get_model(c)
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                      jax.numpy.zeros((1, sz.size, sz.size, 3)), train=False))
  finally:
    mobilefacenet.depthwise_conv = real
  return seen


LAYER_DTYPE = "bfloat16"   # the train step's compute dtype


def _per_call_ms(fn, sync, sz: ProbeSizes) -> float:
  """Milliseconds per call: the median over ``layer_reps`` batches of ``layer_calls`` calls,
  one ``sync`` per batch."""
  def batch():
    for _ in range(sz.layer_calls):
      out = fn()
    sync(out)
  batch()   # warm-up (compilation, cuDNN's plan)
  return 1e3 * _median_s(batch, sz.layer_reps) / sz.layer_calls


def layer_rows(sz: ProbeSizes, report, budget: RowBudget, torch_device: str | None) -> None:
  import jax
  import jax.numpy as jnp
  from faceens.models import depthwise
  for layer in depthwise_layers(sz):
    if not budget.fits():
      report.skip(f"depthwise layer {layer}", "budget spent")
      continue
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=layer["x"]), LAYER_DTYPE)
    k = jnp.asarray(rng.normal(size=layer["kernel"]), LAYER_DTYPE)
    row = dict(layer, dtype=LAYER_DTYPE)
    for impl in IMPLS:
      try:
        fwd = jax.jit(lambda a, b, impl=impl: depthwise.depthwise_conv(
            a, b, layer["stride"], layer["padding"], impl=impl))
        both = jax.jit(lambda a, b, impl=impl: jax.grad(lambda u, w: jnp.sum(jnp.square(
            depthwise.depthwise_conv(u, w, layer["stride"], layer["padding"], impl=impl)
            .astype(jnp.float32))), argnums=(0, 1))(a, b))
        row[f"{impl}_fwd_ms"] = _per_call_ms(lambda: fwd(x, k), jax.block_until_ready, sz)
        row[f"{impl}_fwd_bwd_ms"] = _per_call_ms(lambda: both(x, k), jax.block_until_ready, sz)
      except Exception as e:  # noqa: BLE001  (one form's failure is a result)
        row[f"{impl}_error"] = f"{type(e).__name__}: {e}"[:500]
    if torch_device:
      try:
        row.update(_torch_layer(layer, torch_device, sz))
      except Exception as e:  # noqa: BLE001
        row["torch_error"] = f"{type(e).__name__}: {e}"[:500]
    budget.took(time.perf_counter() - t0)
    report.doc["depthwise_layers"].append(row)
    report.write()
    print(f"depthwise {layer['x']} s{layer['stride']}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms")), flush=True)


def _torch_layer(layer: dict, device: str, sz: ProbeSizes) -> dict:
  import torch
  n, h, w, c = layer["x"]
  kh, kw = layer["kernel"][:2]
  pad = (kh - 1) // 2 if layer["padding"] is None else layer["padding"]
  dtype = getattr(torch, LAYER_DTYPE)
  x = torch.randn(n, c, h, w, device=device, dtype=dtype).to(memory_format=torch.channels_last)
  x.requires_grad_(True)
  conv = torch.nn.Conv2d(c, c, (kh, kw), layer["stride"], pad, groups=c, bias=False)
  conv = conv.to(device=device, dtype=dtype, memory_format=torch.channels_last)

  def sync(_):
    if device == "cuda":
      torch.cuda.synchronize()

  def fwd():
    with torch.no_grad():
      return conv(x)

  def both():  # both gradients, nothing accumulated into .grad
    return torch.autograd.grad(conv(x).float().square().sum(), (x, conv.weight))
  return {"torch_fwd_ms": _per_call_ms(fwd, sync, sz),
          "torch_fwd_bwd_ms": _per_call_ms(both, sync, sz)}


# ----------------------------------------------------------------------------- main


def summary(doc: dict) -> dict:
  """The fastest configuration per workload (rows without errors)."""
  best = {}
  for row in doc["steps"]:
    if "step_s" in row and (row["workload"] not in best or
                            row["step_s"] < best[row["workload"]]["step_s"]):
      best[row["workload"]] = {k: row[k] for k in ("depthwise", "tuning", "step_s", "compile_s")}
  return best


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=None, help="JSON path (default: $OUT/probe.json)")
  p.add_argument("--smoke", action="store_true", help="toy sizes on CPU, every row")
  p.add_argument("--budget", type=float, default=None,
                 help="seconds before rows are skipped (default 330; --smoke: no limit, every row "
                      "must run)")
  p.add_argument("--no-torch", action="store_true", help="no PyTorch layer timings")
  a = p.parse_args(argv)
  if a.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  out = a.out or os.path.join(os.environ.get("OUT", "."), "probe.json")
  import jax
  sz = SMOKE if a.smoke else FULL
  torch_device = None
  if not a.no_torch:
    try:
      import torch
      torch_device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    except ImportError:
      torch_device = None
  report = accelerator.Report(out)
  report.doc = {"header": accelerator.header(torch_device is not None), "steps": [],
                "depthwise_layers": [], "skipped": [], "best": {}}
  report.doc["header"].update({"smoke": a.smoke, "sizes": dataclasses.asdict(sz),
                               "torch_device": torch_device, "budget_s": a.budget,
                               "xla_flags": os.environ.get("XLA_FLAGS", ""),
                               "backend": jax.default_backend()})
  budget = RowBudget(a.budget if a.budget is not None else (float("inf") if a.smoke else 330.0))
  with tempfile.TemporaryDirectory() as tmp:
    step_rows(sz, report, budget, tmp, UNTUNED)
    layer_rows(sz, report, budget, torch_device)
    step_rows(sz, report, budget, tmp, TUNED, os.path.splitext(out)[0] + ".autotune.txt")
  report.doc["best"] = summary(report.doc)
  report.write()
  print(json.dumps(report.doc["best"], indent=1))
  print(f"wrote {out}")
  return 0 if report.doc["best"] else 1


if __name__ == "__main__":
  sys.exit(main())
