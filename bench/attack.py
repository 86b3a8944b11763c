"""Adversarial examples per second: faceens' batched, jitted LOTS against PyTorch, same machine.

  python -m pip install -e ".[bench]"
  python bench/attack.py --workdir=runs/demo_single --out bench/results/attack.json

LOTS with I-FGSM sign steps (1/255) towards the target's feature, goal: feature distance 0.2,
per-example early stop, on a trained single model (K = 1). The PyTorch side is the same network
with the same weights (ported from the checkpoint and checked to give the same features) and the
same attack, written two ways:

  * ``torch_loop``: one example at a time until it reaches the goal (how LOTS is usually run, and
    how the paper's 10.97 s per example was measured);
  * ``torch_batched``: the whole batch per step with a done mask (a strong eager reference).

JAX, two ways: ``faceens.attack.run_batches`` (one ``lax.while_loop`` per batch, which runs until
its slowest example) and ``faceens.attack.run_compacted`` (chunks of 8 iterations over the
examples still running, packed into power-of-four batches: what ``faceens.attack`` uses), each
with compilation excluded (a first run compiles, the second is timed). AX/s = successful
adversarial examples / attack wall time. Writes JSON; prints a table.
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


# ----------------------------------------------------------------------------- PyTorch port


def torch_mobilefacenet(variables: dict, config, member: int = 0):
  """A PyTorch MobileFaceNet holding member ``member``'s weights of a faceens checkpoint (eval
  mode); its forward takes NCHW images in [0, 1] and returns the normalised feature."""
  import torch
  from torch import nn

  params = variables["params"]  # stacked on a member axis
  stats = variables["batch_stats"]
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731

  def bn2d(p, s, n):
    b = nn.BatchNorm2d(n, eps=1e-5)
    b.weight.data, b.bias.data = t(np.asarray(p["scale"])[member]), t(np.asarray(p["bias"])[member])
    b.running_mean.data, b.running_var.data = t(np.asarray(s["mean"])[member]), t(np.asarray(s["var"])[member])
    return b

  class ConvBN(nn.Module):
    def __init__(self, p, s, stride):
      super().__init__()
      if "DepthwiseConv_0" in p:
        k = np.asarray(p["DepthwiseConv_0"]["kernel"])[member]          # [k, k, 1, C]
        c = k.shape[-1]
        self.conv = nn.Conv2d(c, c, k.shape[0], stride, (k.shape[0] - 1) // 2, groups=c, bias=False)
      else:
        k = np.asarray(p["Conv_0"]["kernel"])[member]                   # [k, k, I, O]
        self.conv = nn.Conv2d(k.shape[2], k.shape[3], k.shape[0], stride, (k.shape[0] - 1) // 2,
                              bias=False)
      self.conv.weight.data = t(k.transpose(3, 2, 0, 1))
      n = k.shape[-1]
      self.bn = bn2d(p["BatchNorm_0"], s["BatchNorm_0"], n)
      self.act = None
      if "PReLU_0" in p:
        self.act = nn.PReLU(n)
        self.act.weight.data = t(np.asarray(p["PReLU_0"]["slope"])[member])

    def forward(self, x):
      x = self.bn(self.conv(x))
      return self.act(x) if self.act is not None else x

  class Block(nn.Module):
    def __init__(self, p, s, stride, residual):
      super().__init__()
      self.residual = residual
      self.layers = nn.Sequential(ConvBN(p["ConvBN_0"], s["ConvBN_0"], 1),
                                  ConvBN(p["ConvBN_1"], s["ConvBN_1"], stride),
                                  ConvBN(p["ConvBN_2"], s["ConvBN_2"], 1))

    def forward(self, x):
      return x + self.layers(x) if self.residual else self.layers(x)

  if config.model.head != "gdc" or config.model.blocks[0] != 1:
    raise ValueError("the PyTorch port covers the gdc head with blocks[0] == 1")
  blocks = tuple(config.model.blocks)
  starts = {0, 1 + blocks[1], 2 + blocks[1] + blocks[2]}
  n_blocks = 3 + sum(blocks[1:])

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      layers = [ConvBN(params["ConvBN_0"], stats["ConvBN_0"], 2),
                ConvBN(params["ConvBN_1"], stats["ConvBN_1"], 1)]
      for i in range(n_blocks):
        name = f"DepthWiseBlock_{i}"
        layers.append(Block(params[name], stats[name], 2 if i in starts else 1, i not in starts))
      layers.append(ConvBN(params["ConvBN_2"], stats["ConvBN_2"], 1))
      self.body = nn.Sequential(*layers)
      g = np.asarray(params["gdc_kernel"])[member]                        # [h, w, 1, C]
      self.gdc = nn.Parameter(t(g[:, :, 0, :].transpose(2, 0, 1)))   # [C, h, w]
      gb = nn.BatchNorm1d(g.shape[-1], eps=1e-5)
      gb.weight.data, gb.bias.data = t(np.asarray(params["gdc_bn"]["scale"])[member]), t(np.asarray(params["gdc_bn"]["bias"])[member])
      gb.running_mean.data, gb.running_var.data = t(np.asarray(stats["gdc_bn"]["mean"])[member]), t(np.asarray(stats["gdc_bn"]["var"])[member])
      self.gdc_bn = gb
      fc = np.asarray(params["fc"]["kernel"])[member]
      self.fc = nn.Linear(fc.shape[0], fc.shape[1], bias=False)
      self.fc.weight.data = t(fc.T)
      fb = nn.BatchNorm1d(fc.shape[1], eps=1e-5)
      fb.weight.data, fb.bias.data = t(np.asarray(params["feature_bn"]["scale"])[member]), t(np.asarray(params["feature_bn"]["bias"])[member])
      fb.running_mean.data, fb.running_var.data = t(np.asarray(stats["feature_bn"]["mean"])[member]), t(np.asarray(stats["feature_bn"]["var"])[member])
      self.feature_bn = fb

    def forward(self, x01):                                          # NCHW in [0, 1]
      x = self.body((x01 - 0.5) / 0.5)
      x = (x * self.gdc[None]).sum(dim=(2, 3))
      f = self.feature_bn(self.fc(self.gdc_bn(x)))
      return torch.nn.functional.normalize(f, dim=1)

  return Net().eval()


def torch_ensemble(variables: dict, config):
  """E(x) = mean_k f_k(x) / ||f_k(x)|| over every member of a faceens checkpoint, in PyTorch."""
  import torch
  import jax
  k = jax.tree.leaves(variables["params"])[0].shape[0]
  nets = torch.nn.ModuleList([torch_mobilefacenet(variables, config, m) for m in range(k)])

  class Ensemble(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.nets = nets

    def forward(self, x01):
      return torch.stack([n(x01) for n in self.nets]).mean(dim=0)

  return Ensemble().eval()



def torch_lots_ifgsm(net, x_src, target, goal, step, max_iters):
  """I-FGSM LOTS on a batch with a done mask; returns (x_adv, success, iterations)."""
  import torch
  x = x_src.clone()
  done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
  iters = torch.zeros(len(x), dtype=torch.int64, device=x.device)
  for it in range(max_iters + 1):
    # As the JAX loop: one forward gives the distance (done check) and the loss to differentiate.
    x.requires_grad_(True)
    f = net(x)
    dist = (f - target).norm(dim=1)
    done |= (dist < goal).detach()
    if bool(done.all()) or it == max_iters:
      break
    (g,) = torch.autograd.grad(((f - target) ** 2).sum(), x)
    with torch.no_grad():
      active = ~done
      x = torch.where(active[:, None, None, None], (x - step * g.sign()).clamp(0, 1), x).detach()
      iters += active.long()
  x = x.detach()
  return x, done, iters


# ----------------------------------------------------------------------------- main


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/demo_single", help="a trained single-model run")
  p.add_argument("--pairs", type=int, default=64)
  p.add_argument("--loop-pairs", type=int, default=8, help="pairs for the one-at-a-time loop")
  p.add_argument("--goal", type=float, default=0.2)
  p.add_argument("--max-iters", type=int, default=5000)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--out", default="bench/results/attack.json")
  p.add_argument("--images", default=None,
                  help="DIR/<identity>/*: faces to attack when the run has no held-out people "
                       "(e.g. faceens/assets/orl_faces for an LFW run)")
  p.add_argument("--no-torch", action="store_true")
  a = p.parse_args()

  import jax

  import faceens
  from faceens import attack as attack_cli
  from faceens.attacks import lots
  model = faceens.load(a.workdir)
  if model.num_members != 1:
    raise SystemExit(f"error: {a.workdir} has K = {model.num_members}; the benchmark attacks the "
                     "single model (train experiments/arcface_single.py:demo)")
  images, labels, _ = attack_cli.attack_images(model, a.images)
  pairs = attack_cli.make_pairs(labels, a.pairs, seed=0)
  x = model.prepare(images)
  xs, xt = x[pairs[:, 0]], x[pairs[:, 1]]
  cfg = lots.AttackConfig(method="ifgsm", max_iters=a.max_iters)
  res = attack_cli.run_batches(model, xs, xt, a.goal, cfg, batch_size=a.batch, progress=False)
  jax_row = {"ax_per_s": float(res["success"].sum() / res["seconds"]), "seconds": res["seconds"],
             "compile_s": res["compile_seconds"], "success_rate": float(res["success"].mean()),
             "iterations_median": float(np.median(res["iterations"])),
             "iterations_max": int(res["iterations"].max()), "batch": a.batch,
             "backend": jax.default_backend(), "devices": jax.device_count()}
  emb_t = model.embed(xt)
  attack_cli.run_compacted(model, xs, emb_t, a.goal, cfg, progress=False)  # compiles
  rc = attack_cli.run_compacted(model, xs, emb_t, a.goal, cfg, progress=False)
  jax_row["compacted"] = {
      "ax_per_s": float(rc["success"].sum() / rc["seconds"]), "seconds": rc["seconds"],
      "success_rate": float(rc["success"].mean()),
      "same_iterations_as_run_batches": bool(np.array_equal(rc["iterations"], res["iterations"]))}
  print(f"jax compacted: {jax_row['compacted']['ax_per_s']:.2f} AX/s "
        f"(same iterations as one loop per batch: {jax_row['compacted']['same_iterations_as_run_batches']})",
        flush=True)
  print(f"jax ({jax.default_backend()}): {jax_row['ax_per_s']:.2f} AX/s, {a.pairs} pairs, "
        f"success {jax_row['success_rate']:.2f}, iterations median {jax_row['iterations_median']:.0f}"
        f" (compile {jax_row['compile_s']:.1f} s)", flush=True)
  out = {"workdir": a.workdir, "goal": a.goal, "pairs": a.pairs, "input_size": model.input_size,
         "model": {"width": model.config.model.width, "blocks": list(model.config.model.blocks),
                   "embedding_dim": model.embedding_dim},
         "machine": platform.machine(), "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
         "jax": jax_row, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
  if not a.no_torch:
    import torch
    net = torch_mobilefacenet(jax.device_get(model.variables), model.config)
    to_t = lambda arr: torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
      ft = net(to_t(xt)).numpy()
    fj = model.embed(xt)
    port_err = float(np.abs(ft - fj).max())
    print(f"PyTorch port: max |feature difference| = {port_err:.2e}", flush=True)
    if port_err > 1e-3:
      raise SystemExit("error: the PyTorch port does not reproduce the JAX features")
    tgt = torch.from_numpy(ft)
    step = 1.0 / 255
    t0 = time.perf_counter()
    _, ok_b, it_b = torch_lots_ifgsm(net, to_t(xs), tgt, a.goal, step, a.max_iters)
    tb = time.perf_counter() - t0
    n_loop = min(a.loop_pairs, a.pairs)
    t0 = time.perf_counter()
    ok_l, it_l = [], []
    for i in range(n_loop):
      _, ok, it = torch_lots_ifgsm(net, to_t(xs[i:i + 1]), tgt[i:i + 1], a.goal, step, a.max_iters)
      ok_l.append(bool(ok[0]))
      it_l.append(int(it[0]))
    tl = time.perf_counter() - t0
    out["torch"] = {
        "version": torch.__version__, "threads": torch.get_num_threads(), "port_max_abs_err": port_err,
        "batched": {"ax_per_s": float(ok_b.sum()) / tb, "seconds": tb,
                    "success_rate": float(ok_b.float().mean()),
                    "iterations_median": float(it_b.float().median()),
                    "iterations_equal_to_jax": float(np.mean(it_b.numpy() == res["iterations"]))},
        "loop": {"ax_per_s": sum(ok_l) / tl, "seconds": tl, "pairs": n_loop,
                 "iterations_median": float(np.median(it_l))}}
    out["speedup_vs_torch_loop"] = jax_row["ax_per_s"] / out["torch"]["loop"]["ax_per_s"]
    out["speedup_vs_torch_batched"] = jax_row["ax_per_s"] / out["torch"]["batched"]["ax_per_s"]
    out["speedup_compacted_vs_torch_batched"] = (jax_row["compacted"]["ax_per_s"]
                                                 / out["torch"]["batched"]["ax_per_s"])
    print(f"torch batched: {out['torch']['batched']['ax_per_s']:.2f} AX/s; one at a time: "
          f"{out['torch']['loop']['ax_per_s']:.2f} AX/s; JAX / loop = "
          f"{out['speedup_vs_torch_loop']:.1f}x, JAX / batched = {out['speedup_vs_torch_batched']:.2f}x"
          f", JAX compacted / batched = {out['speedup_compacted_vs_torch_batched']:.2f}x")
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  from faceens import hostenv
  hostenv.reexec_with_hugepage_malloc()  # as the faceens commands do; PyTorch shares the malloc
  main()
