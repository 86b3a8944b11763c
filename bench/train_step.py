"""Train-step throughput: faceens (JAX) against the same network and loss in PyTorch, same machine.

  python -m pip install -e ".[bench]"
  python bench/train_step.py --out bench/results/train_step.json [--members 1,3] [--steps 5]

MobileFaceNet width 1, blocks (1, 4, 6, 2), GDC head, d = 512, 112x112, batch 64, CosFace
(s = 64, m = 0.35) over 1000 classes, SGD momentum 0.9 with weight decay 5e-4; K members with
per-member class weights (the ``baseline`` method). JAX: one jitted ``train_step`` from
``faceens.train``. PyTorch: InsightFace's ``arcface_torch`` MobileFaceNet written out below, eager,
NCHW and channels_last, members in a Python loop, one optimizer. Median images/s over ``--steps``
timed steps after compilation and one warm-up step; the contenders take turns in blocks of 3 steps
(the first of each untimed), so a slow spell of a shared machine hits all of them.
``--profile DIR`` adds XLA:CPU's op time per fusion kind (a ``jax.profiler`` trace of 3 steps) and
PyTorch channels_last's self time per aten op (``torch.profiler``, 2 steps).
Writes JSON; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH, SIZE, CLASSES = 64, 112, 1000


# ----------------------------------------------------------------------------- JAX


def jax_step(members: int, depthwise_impl: str = "auto", strategy: str = "auto", *,
             batchnorm_impl: str = "auto", dtype: str = "float32", batch: int = BATCH,
             size: int = SIZE, classes: int = CLASSES, width: float = 1.0, blocks=(1, 4, 6, 2),
             embedding_dim: int = 512, compiler_options: dict | None = None):
  """faceens' jitted train step (the ``baseline`` method for K > 1), compiled and run once.

  ``compiler_options``: XLA options for this step's compilation only (e.g.
  ``{"xla_gpu_autotune_level": 2}``). Returns ``(one, info)``: ``one()`` runs one more step and
  returns its loss (synchronised).
  """
  import jax
  from faceens import configs, models, sharding, train

  c = configs.experiment("cosface_single" if members == 1 else "cosface_baseline", "full")
  c.ensemble.num_members = members
  c.model.head = "gdc"
  c.model.depthwise_impl = depthwise_impl
  c.model.batchnorm_impl = batchnorm_impl
  c.model.dtype = dtype
  c.model.width, c.model.blocks, c.model.embedding_dim = width, tuple(blocks), embedding_dim
  c.data.image_size = size
  c.ensemble.strategy = strategy
  c.train.batch_size = batch
  opt = train.make_optimizer(c, 1000)
  model = models.get_model(c)
  mesh = sharding.make_mesh()
  box = {"state": sharding.replicate(train.create_train_state(c, classes, opt), mesh)}
  step = sharding.shard_train_step(train.make_train_step(c, model, opt), mesh, box["state"])
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  y = rng.integers(0, classes, batch).astype(np.int32)
  xb, yb = sharding.put_batch(mesh, x, y)
  t0 = time.perf_counter()
  if compiler_options:
    step = step.lower(box["state"], xb, yb).compile(compiler_options=compiler_options)

  def one():
    box["state"], m = step(box["state"], xb, yb)
    return float(jax.block_until_ready(m)["loss"])

  one()
  info = {"compile_s": time.perf_counter() - t0, "backend": jax.default_backend(),
          "depthwise_impl": depthwise_impl, "batchnorm_impl": batchnorm_impl, "strategy": strategy,
          "dtype": dtype}
  return one, info


def time_interleaved(steps: int, block: int = 3, **ones) -> dict:
  """Median seconds per call of each ``one()``, the contenders taking turns in blocks.

  Each turn runs ``block`` calls of one contender and times all but the first: the first call
  after another contender pays for the memory that contender left behind (measured: the first
  JAX step after a PyTorch step took 4.4 s against 2.2 s for the next, most of it in the
  kernel's page handling), which a training run that only runs one of them never pays. Taking
  turns, rather than timing all of A and then all of B, spreads slow spells of a shared machine
  over every contender. ``steps`` timed calls each, in ``ceil(steps / (block - 1))`` turns.
  """
  block = max(block, 2) if len(ones) > 1 else 1
  times = {name: [] for name in ones}
  last = {name: one() for name, one in ones.items()}  # warm-up
  while min(len(v) for v in times.values()) < steps:
    for name, one in ones.items():
      for i in range(block):
        t = time.perf_counter()
        last[name] = one()
        if i > 0 or block == 1:
          times[name].append(time.perf_counter() - t)
  return {name: {"step_s": float(np.median(v[:steps])), "steps_s": v[:steps], "loss": last[name]}
          for name, v in times.items()}


def bench_jax(members: int, steps: int, depthwise_impl: str = "auto", strategy: str = "auto", *,
              dtype: str = "float32", batch: int = BATCH, size: int = SIZE, classes: int = CLASSES,
              width: float = 1.0, blocks=(1, 4, 6, 2), embedding_dim: int = 512,
              profile_dir: str | None = None):
  """Median images/s of faceens' jitted train step (the ``baseline`` method for K > 1).

  ``profile_dir``: afterwards, trace 3 more steps there with ``jax.profiler`` (perfetto trace).
  """
  one, info = jax_step(members, depthwise_impl, strategy, dtype=dtype, batch=batch, size=size,
                       classes=classes, width=width, blocks=blocks, embedding_dim=embedding_dim)
  t = time_interleaved(steps, jax=one)["jax"]
  assert np.isfinite(t["loss"])
  if profile_dir:
    trace_steps(one, profile_dir)
  return {"img_per_s": batch / t["step_s"], **t, **info}


def trace_steps(one, trace_dir: str, steps: int = 3):
  """Runs ``steps`` calls of ``one()`` under ``jax.profiler`` (a perfetto trace in ``trace_dir``)."""
  import jax
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      one()


def cpu_profile_by_kind(trace_dir: str, n: int = 12) -> dict:
  """XLA:CPU op time per step grouped by fusion kind (``ynn_fusion.12`` -> ``ynn_fusion``).

  Sums the ops on XLA's worker threads of a ``jax.profiler`` perfetto trace, divided by the
  number of traced steps. On 2 threads the op time can exceed the step's wall time.
  """
  import collections
  import glob
  import gzip
  import re
  paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
    events = json.load(f)["traceEvents"]
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  ops = [e for e in events if e.get("ph") == "X" and "run_id" in e.get("args", {})
         and threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
         and not e["name"].startswith(("ThunkExecutor", "end:", "SlinkyThreadPool"))]
  steps = len({e["args"]["run_id"] for e in ops}) or 1
  ms, count = collections.Counter(), collections.Counter()
  for e in ops:
    kind = re.sub(r"[._]\d+$", "", e["name"])
    ms[kind] += e["dur"] / 1e3 / steps
    count[kind] += 1
  total = sum(ms.values())
  return {"op_ms_per_step": total, "ops_per_step": len(ops) // steps, "steps": steps,
          "top": [{"kind": k, "ms": v, "share": v / total, "ops": count[k] // steps}
                  for k, v in ms.most_common(n)]}


# ----------------------------------------------------------------------------- PyTorch


def torch_profile_by_op(one, steps: int = 2, n: int = 8) -> dict:
  """PyTorch's own profiler over ``steps`` calls of ``one()``: self CPU time per aten op per step
  (the main thread's view: an op's time includes its intra-op worker threads)."""
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      one()
  rows = sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)
  total = sum(r.self_cpu_time_total for r in rows) / 1e3 / steps
  return {"self_ms_per_step": total, "steps": steps,
          "top": [{"op": r.key, "ms": r.self_cpu_time_total / 1e3 / steps,
                   "share": r.self_cpu_time_total / 1e3 / steps / total, "calls": r.count // steps}
                  for r in rows[:n]]}


def torch_model(members: int, *, classes: int = CLASSES, width: float = 1.0,
                blocks=(1, 4, 6, 2), d: int = 512, size: int = SIZE):
  """arcface_torch's MobileFaceNet (GDC head) x K with per-member CosFace class weights."""
  import torch
  from torch import nn

  c = lambda n: max(8, int(round(n * width)))  # noqa: E731  (faceens' width rule)

  class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k=1, s=1, p=0, groups=1, act=True):
      super().__init__()
      layers = [nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(cout)]
      if act:
        layers.append(nn.PReLU(cout))
      self.layers = nn.Sequential(*layers)

    def forward(self, x):
      return self.layers(x)

  class DepthWise(nn.Module):
    def __init__(self, cin, cout, hidden, s=1, residual=False):
      super().__init__()
      self.residual = residual
      self.layers = nn.Sequential(ConvBlock(cin, hidden), ConvBlock(hidden, hidden, 3, s, 1, hidden),
                                  ConvBlock(hidden, cout, act=False))

    def forward(self, x):
      return x + self.layers(x) if self.residual else self.layers(x)

  class MobileFaceNet(nn.Module):
    def __init__(self):
      super().__init__()
      layers = [ConvBlock(3, c(64), 3, 2, 1), ConvBlock(c(64), c(64), 3, 1, 1, groups=c(64))]
      for cin, cout, hidden, n in ((c(64), c(64), c(128), blocks[1]), (c(64), c(128), c(256), blocks[2]),
                                   (c(128), c(128), c(512), blocks[3])):
        layers.append(DepthWise(cin, cout, hidden, 2))
        layers += [DepthWise(cout, cout, hidden, 1, True) for _ in range(n)]
      layers.append(ConvBlock(c(128), 512))
      self.layers = nn.Sequential(*layers)
      self.gdc = ConvBlock(512, 512, size // 16, 1, 0, groups=512, act=False)
      self.fc = nn.Linear(512, d, bias=False)
      self.bn = nn.BatchNorm1d(d)

    def forward(self, x):
      x = self.gdc(self.layers(x)).flatten(1)
      return self.bn(self.fc(x))

  class Ensemble(nn.Module):
    def __init__(self):
      super().__init__()
      self.members = nn.ModuleList([MobileFaceNet() for _ in range(members)])
      self.w = nn.Parameter(0.01 * torch.randn(members, d, classes))

    def forward(self, x, y):
      loss = 0.0
      onehot = nn.functional.one_hot(y, classes).float()
      for k, m in enumerate(self.members):
        f = nn.functional.normalize(m(x).float(), dim=1)
        cos = f @ nn.functional.normalize(self.w[k], dim=0)
        logits = 64.0 * (cos - 0.35 * onehot)
        loss = loss + nn.functional.cross_entropy(logits, y)
      return loss

  return Ensemble()


def torch_step(members: int, channels_last: bool, *, device: str = "cpu", bf16: bool = False,
               compile: bool = False, batch: int = BATCH, size: int = SIZE,
               classes: int = CLASSES, width: float = 1.0, blocks=(1, 4, 6, 2),
               embedding_dim: int = 512):
  """The same network and loss in PyTorch (eager, or ``torch.compile``), run once.

  One optimizer over all K members and heads, no gradient clipping (faceens' paper recipe);
  ``bf16``: autocast to bfloat16 (parameters and the loss stay float32). Returns ``(one, info)``.
  """
  import torch
  torch.manual_seed(0)
  model = torch_model(members, classes=classes, width=width, blocks=blocks, d=embedding_dim,
                      size=size).to(device)
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
  x = torch.randn(batch, 3, size, size, device=device)
  y = torch.randint(0, classes, (batch,), device=device)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  model.train()
  forward = torch.compile(model) if compile else model
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

  def one():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
      loss = forward(x, y)
    loss.backward()
    opt.step()
    sync()
    return float(loss.detach())

  t0 = time.perf_counter()
  one()
  info = {"first_step_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
          "channels_last": channels_last, "bf16": bf16, "compile": compile, "device": device,
          "torch": torch.__version__}
  return one, info


def bench_torch(members: int, steps: int, channels_last: bool, *, device: str = "cpu",
                bf16: bool = False, compile: bool = False, batch: int = BATCH, size: int = SIZE,
                classes: int = CLASSES, width: float = 1.0, blocks=(1, 4, 6, 2),
                embedding_dim: int = 512):
  """Median images/s of ``torch_step``."""
  one, info = torch_step(members, channels_last, device=device, bf16=bf16, compile=compile,
                         batch=batch, size=size, classes=classes, width=width, blocks=blocks,
                         embedding_dim=embedding_dim)
  t = time_interleaved(steps, torch=one)["torch"]
  return {"img_per_s": batch / t["step_s"], **t, **info}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--members", default="1,3")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--out", default="bench/results/train_step.json")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--profile", default=None,
                 help="directory: trace 3 JAX steps per K there; add the op time per fusion kind "
                      "and PyTorch channels_last's time per aten op to the JSON")
  a = p.parse_args()
  import jax
  results = {"batch": BATCH, "size": SIZE, "classes": CLASSES, "machine": platform.machine(),
             "cpu_count": os.cpu_count(), "jax": jax.__version__,
             "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
             "timing": "median of --steps steps per contender, contenders taking turns in blocks of 3 "
                       "steps whose first step is not timed",
             "runs": []}
  for k in [int(s) for s in a.members.split(",")]:
    one, info = jax_step(k)
    ones, infos = {"jax": one}, {"jax": info}
    if not a.no_torch:
      for name, cl in (("torch_nchw", False), ("torch_channels_last", True)):
        ones[name], infos[name] = torch_step(k, cl)
    timed = time_interleaved(a.steps, **ones)
    row = {"members": k}
    for name in ones:
      row[name] = {"img_per_s": BATCH / timed[name]["step_s"], **timed[name], **infos[name]}
    print(f"K={k} jax: {row['jax']['img_per_s']:.1f} img/s (compile {info['compile_s']:.0f} s)",
          flush=True)
    if not a.no_torch:
      best = max(row["torch_nchw"]["img_per_s"], row["torch_channels_last"]["img_per_s"])
      row["speedup_vs_best_torch"] = row["jax"]["img_per_s"] / best
      print(f"K={k} torch: NCHW {row['torch_nchw']['img_per_s']:.1f}, channels_last "
            f"{row['torch_channels_last']['img_per_s']:.1f} img/s; JAX / best torch = "
            f"{row['speedup_vs_best_torch']:.2f}x", flush=True)
    if a.profile:
      trace_dir = os.path.join(a.profile, f"k{k}")
      trace_steps(one, trace_dir)
      row["jax_profile"] = cpu_profile_by_kind(trace_dir)
      for r in row["jax_profile"]["top"][:6]:
        print(f"  {r['share']:6.1%} {r['ms']:7.0f} ms {r['ops']:5d} ops  {r['kind']}")
      if not a.no_torch:
        row["torch_channels_last_profile"] = torch_profile_by_op(ones["torch_channels_last"])
        for r in row["torch_channels_last_profile"]["top"][:6]:
          print(f"  torch {r['share']:6.1%} {r['ms']:7.0f} ms {r['calls']:5d} calls  {r['op']}")
    del ones
    results["runs"].append(row)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  from faceens import hostenv
  hostenv.reexec_with_hugepage_malloc()  # as the faceens commands do; PyTorch shares the malloc
  main()
