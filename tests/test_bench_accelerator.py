"""The accelerator script (bench/accelerator.py) end to end at toy sizes on CPU (``--smoke``), so
that it still runs when a GPU is at hand. Slow-marked (about 1.5-2.5 minutes on 2 cores, nearly
all compilation): the README's full test command, which CI runs, includes it; run it before
every accelerator run."""

import json
import os
import subprocess
import sys

import pytest

from tests.builders import REPO


@pytest.mark.slow
def test_accelerator_smoke_runs_every_step(tmp_path):
  out = tmp_path / "accelerator.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # --smoke compiles with the cheap pipeline itself
  r = subprocess.run([sys.executable, "bench/accelerator.py", "--smoke", f"--out={out}"], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc["header"]["smoke"] and doc["header"]["backend"] == "cpu"
  c = doc["correctness"]
  assert c["ok"], c
  # Every check ran and compared something (float32 on one CPU: equal to rounding).
  assert c["ensemble_steps"]["features"]["value"] < 1e-5
  assert c["ensemble_steps"]["bf16_loss"]["value"] < 5e-2
  assert {k for k in c["depthwise"]} == {f"stride{s}_{p}{f}" for s in (1, 2)
                                         for p in ("forward", "grad_x", "grad_kernel")
                                         for f in ("", "_fused")}
  assert not doc["skipped"] or all(s["what"] == "PyTorch reference" for s in doc["skipped"])
  rows = {(r["members"], r["dtype"], r["strategy"]) for r in doc["train_step"]}
  assert rows == {(2, "bfloat16", "vmap"), (1, "float32", "unrolled")}
  assert all(r["jax"]["img_per_s"] > 0 for r in doc["train_step"])
  assert doc["profiles"]["train_K2_bfloat16_vmap"], "the profile of the ensemble step is empty"
  attacks = {(r["method"], r["goal"], r["batch"]) for r in doc["attack"]}
  assert attacks == {(m, g, b) for m in ("single", "srv_fdp") for g in ("0.2", "threshold")
                     for b in (8, 16)}
  for row in doc["attack"]:
    assert 0.0 <= row["jax"]["success_rate"] <= 1.0 and row["pairs"] == 16
  if doc["header"]["torch"]:  # the PyTorch reference ran: same features, rows compared
    assert all("speedup_vs_torch_eager" in r for r in doc["train_step"])
    assert all(r["torch_port_max_abs_err"] < 1e-3 for r in doc["attack"])
    assert all("speedup_vs_torch_batched" in r for r in doc["attack"])


@pytest.mark.slow
def test_probe_smoke_runs_every_row(tmp_path):
  """bench/probe.py --smoke (about 2 minutes on 2 cores): every workload x depthwise form x XLA
  setting compiles, runs and is profiled; every depthwise layer of the network is timed."""
  out = tmp_path / "probe.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "bench/probe.py", "--smoke", f"--out={out}"], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc["header"]["smoke"] and not doc["skipped"]
  rows = {(s["workload"], s["depthwise"], s["tuning"]): s for s in doc["steps"]}
  assert set(rows) == {(w, i, t) for w in ("train_k2_bf16", "attack_single")
                       for i in ("native", "fused")
                       for t in ("autotune0", "autotune4", "autotune4_no_triton_gemm", "autotune2")}
  for s in rows.values():
    assert "error" not in s, s
    assert s["step_s"] > 0 and s["compile_s"] > 0 and isinstance(s["top_ops"], list) and s["top_ops"]
  # Untuned rows, then the layer table, then tuned rows (each after the first says so).
  order = [s["tuning"] for s in doc["steps"]]
  assert order[:4] == ["autotune0"] * 4 and "tuned_after" not in doc["steps"][4]
  assert all(s["tuned_after"] for s in doc["steps"][5:])
  layers = doc["depthwise_layers"]
  # The smoke network (blocks 1,1,1,1): the stem's depthwise, then a stride-2 and a stride-1
  # layer per stage.
  assert [l["stride"] for l in layers] == [1, 2, 1, 2, 1, 2, 1]
  impls = ("native", "fused") + (("torch",) if doc["header"]["torch_device"] else ())
  for l in layers:
    assert l["dtype"] == "bfloat16" and not any(k.endswith("_error") for k in l), l
    assert all(l[f"{impl}_{p}_ms"] > 0 for impl in impls for p in ("fwd", "fwd_bwd"))
  assert set(doc["best"]) == {"train_k2_bf16", "attack_single"}
