"""Accelerator probe: which compiler settings and depthwise form make faceens fastest on this GPU.
One process, one device call (about 6 minutes on one H100 / H200 with compilation):

  PYTHONPATH=. python3 bench/probe.py --out $OUT/probe.json
  python bench/probe.py --smoke --out /tmp/probe_smoke.json      # CPU, toy sizes, every row

Rows, most informative first (``--budget`` seconds; rows past it are recorded as skipped):

1. The K = 3 bf16 train step (``baseline``, 112 px, batch 256, width 1, GDC head, CosFace over
   1000 classes; ``bench/train_step.jax_step``) and the attack step (forward + input gradient of
   ``||E(x) - t||^2`` on a single model, batch 256), for depthwise ``native`` (cuDNN's grouped
   convolution) and ``fused`` (``faceens.models.depthwise``), each compiled at XLA GPU autotune
   levels 0, 2 and 4 and at level 2 without Triton GEMM fusions, each with a per-function
   ``compiler_options`` (one process, no flag changes): compile seconds, median step seconds and
   the top device ops of a 3-step profile.
2. MobileFaceNet's depthwise layers (the shapes the network really has, read off its trace):
   forward and forward+backward milliseconds for native, fused and PyTorch's channels_last
   grouped conv (cuDNN with its heuristics) on the same device.

The first level-4 compilation writes XLA's autotune results next to the JSON
(``<out>.autotune.txt``, ``--xla_gpu_dump_autotune_results_to``): later runs can load them with
``XLA_FLAGS=--xla_gpu_load_autotune_results_from=FILE`` instead of tuning again. On CPU the GPU
options are accepted and ignored: ``--smoke`` checks that every row runs, not its speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import accelerator  # noqa: E402  (header, Report, Budget, top_device_ops)
import train_step as train_bench  # noqa: E402

# XLA GPU settings compared (DebugOptions fields, per compilation).
TUNINGS = {
    "autotune0": {"xla_gpu_autotune_level": 0},
    "autotune2": {"xla_gpu_autotune_level": 2},
    "autotune2_no_triton_gemm": {"xla_gpu_autotune_level": 2, "xla_gpu_enable_triton_gemm": False},
    "autotune4": {"xla_gpu_autotune_level": 4},
}
IMPLS = ("native", "fused")


@dataclasses.dataclass(frozen=True)
class ProbeSizes(accelerator.Sizes):
  """The accelerator check's network and batch sizes (112 px, batch 256, width 1, K = 3)."""
  layer_reps: int = 20  # timed calls per depthwise layer (median)


FULL = ProbeSizes()
SMOKE = ProbeSizes(**(dataclasses.asdict(accelerator.SMOKE) | {"layer_reps": 2}))


def _median_s(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _profile(one, tmp: str, name: str) -> list[dict]:
  trace = os.path.join(tmp, name)
  train_bench.trace_steps(one, trace)
  return accelerator.top_device_ops(trace, n=10)


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


def step_rows(sz: ProbeSizes, report, budget, tmp: str, autotune_file: str) -> None:
  wrote_autotune = False
  for workload, build in (("train_k%d_bf16" % sz.members, train_row), ("attack_single", attack_row)):
    for tuning, options in TUNINGS.items():
      for impl in IMPLS:
        what = f"{workload} {impl} {tuning}"
        if budget.left() <= 0:
          report.skip(what, "budget spent")
          continue
        opts = dict(options)
        if tuning == "autotune4" and not wrote_autotune:
          opts["xla_gpu_dump_autotune_results_to"] = autotune_file
          wrote_autotune = True
        try:
          one, compile_s = build(sz, impl, opts)
          step_s = _median_s(one, sz.steps)
          row = {"workload": workload, "depthwise": impl, "tuning": tuning, "options": options,
                 "compile_s": compile_s, "step_s": step_s,
                 "img_per_s": sz.batch / step_s,
                 "top_ops": _profile(one, tmp, what.replace(" ", "_"))}
        except Exception as e:  # a compiler failure is a result, not the end of the probe
          row = {"workload": workload, "depthwise": impl, "tuning": tuning,
                 "error": f"{type(e).__name__}: {e}"[:1000]}
        report.doc["steps"].append(row)
        report.write()
        print(f"{what}: " + (f"compile {row['compile_s']:.1f} s, step {row['step_s'] * 1e3:.1f} ms"
                             if "error" not in row else row["error"][:200]), flush=True)
  if os.path.isfile(autotune_file):
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


def layer_rows(sz: ProbeSizes, report, budget, torch_device: str | None) -> None:
  import jax
  import jax.numpy as jnp
  from faceens.models import depthwise
  for layer in depthwise_layers(sz):
    if budget.left() <= 0:
      report.skip(f"depthwise layer {layer}", "budget spent")
      continue
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=layer["x"]).astype(np.float32))
    k = jnp.asarray(rng.normal(size=layer["kernel"]).astype(np.float32))
    row = dict(layer)
    for impl in IMPLS:
      fwd = jax.jit(lambda a, b, impl=impl: depthwise.depthwise_conv(
          a, b, layer["stride"], layer["padding"], impl=impl))
      both = jax.jit(lambda a, b, impl=impl: jax.grad(lambda u, w: jnp.sum(jnp.square(
          depthwise.depthwise_conv(u, w, layer["stride"], layer["padding"], impl=impl))),
          argnums=(0, 1))(a, b))
      jax.block_until_ready(fwd(x, k))
      jax.block_until_ready(both(x, k))
      row[f"{impl}_fwd_ms"] = 1e3 * _median_s(lambda: jax.block_until_ready(fwd(x, k)),
                                              sz.layer_reps)
      row[f"{impl}_fwd_bwd_ms"] = 1e3 * _median_s(lambda: jax.block_until_ready(both(x, k)),
                                                  sz.layer_reps)
    if torch_device:
      row.update(_torch_layer(layer, torch_device, sz.layer_reps))
    report.doc["depthwise_layers"].append(row)
    report.write()
    print(f"depthwise {layer['x']} s{layer['stride']}: " + ", ".join(
        f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_ms")), flush=True)


def _torch_layer(layer: dict, device: str, reps: int) -> dict:
  import torch
  n, h, w, c = layer["x"]
  kh, kw = layer["kernel"][:2]
  pad = (kh - 1) // 2 if layer["padding"] is None else layer["padding"]
  x = torch.randn(n, c, h, w, device=device).to(memory_format=torch.channels_last)
  x.requires_grad_(True)
  conv = torch.nn.Conv2d(c, c, (kh, kw), layer["stride"], pad, groups=c, bias=False).to(device)
  conv = conv.to(memory_format=torch.channels_last)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def fwd():
    with torch.no_grad():
      conv(x)
    sync()

  def both():
    conv(x).square().sum().backward()
    sync()
  fwd()
  both()
  return {"torch_fwd_ms": 1e3 * _median_s(fwd, reps), "torch_fwd_bwd_ms": 1e3 * _median_s(both, reps)}


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
  budget = accelerator.Budget(a.budget if a.budget is not None else
                              (float("inf") if a.smoke else 330.0))
  with tempfile.TemporaryDirectory() as tmp:
    step_rows(sz, report, budget, tmp, os.path.splitext(out)[0] + ".autotune.txt")
    layer_rows(sz, report, budget, torch_device)
  report.doc["best"] = summary(report.doc)
  report.write()
  print(json.dumps(report.doc["best"], indent=1))
  print(f"wrote {out}")
  return 0 if report.doc["best"] else 1


if __name__ == "__main__":
  sys.exit(main())
