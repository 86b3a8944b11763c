"""faceens.sharding across processes: two real JAX processes on localhost (gloo collectives).

Training on 2 processes x 1 device equals 1 process x 2 simulated devices; killing both processes
after a checkpoint and restarting them resumes bit for bit; a 2-process attack gives every pair
the result of a 1-process attack.
"""

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time

import chex
import numpy as np
import pytest

import faceens
from faceens import attack as attack_cli
from faceens import configs, sharding, train
from faceens.attacks import lots
from tests.builders import REPO
from tests.conftest import FAST_COMPILE_ENV, subprocess_env

STEPS, EVERY = 4, 2
CONFIG = ["--config=experiments/arcface_srv_fdp.py:test", f"--config.train.steps={STEPS}",
          f"--config.train.checkpoint_every={EVERY}"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra):
  return subprocess_env(**FAST_COMPILE_ENV, **extra)


def launch(argv_for, n: int, tmp_path, name: str, *, env_for=None, until: str | None = None,
           timeout: float = 300.0) -> list[str]:
  """Starts ``n`` processes (``argv_for(rank, address)``) and waits until every one exits with 0,
  or with ``until``, until every one has printed that line, then kills them all with SIGKILL.
  Kills every process on failure or after ``timeout`` seconds; returns their outputs."""
  address = f"127.0.0.1:{_free_port()}"
  logs = [tmp_path / f"{name}{i}.log" for i in range(n)]
  procs = []
  try:
    for i in range(n):
      with open(logs[i], "w") as f:
        procs.append(subprocess.Popen(argv_for(i, address), cwd=REPO, stdout=f,
                                      stderr=subprocess.STDOUT,
                                      env=env_for(i, address) if env_for else _env()))
    deadline = time.monotonic() + timeout
    while True:
      texts = [p.read_text() for p in logs]
      codes = [p.poll() for p in procs]
      if until is not None and all(until in t for t in texts):
        return texts
      if any(c not in (None, 0) for c in codes) or (until is not None and any(
          c is not None for c in codes)):
        raise AssertionError(f"{name}: exit codes {codes}\n" + "\n".join(t[-3000:] for t in texts))
      if until is None and all(c == 0 for c in codes):
        return texts
      if time.monotonic() > deadline:
        raise AssertionError(f"{name}: still running after {timeout:.0f} s\n" +
                             "\n".join(t[-3000:] for t in texts))
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
      p.wait()


def _train_cli(rank, address, workdir):
  return [sys.executable, "-m", "faceens.train", *CONFIG, f"--workdir={workdir}",
          f"--coordinator_address={address}", "--num_processes=2", f"--process_id={rank}"]


# Killed run: the environment-variable form; stops after step 3 (checkpoint at 2), says so and
# waits to be killed.
STOPPED = textwrap.dedent(f"""
    import sys, time
    from faceens import sharding
    sharding.initialize_distributed()
    from faceens import configs, train
    c = configs.experiment("arcface_srv_fdp", "test")
    c.train.steps, c.train.checkpoint_every = {STEPS}, {EVERY}
    assert train.train_and_evaluate(c, sys.argv[1], stop_after=3, progress=False)["stopped"]
    print("STOPPED", flush=True)
    time.sleep(600)
""")


def _params(workdir):
  c = configs.experiment("arcface_srv_fdp", "test")
  c.train.steps = STEPS
  state = train.load_state(c, workdir, num_classes=30)
  return {"params": state.params, "batch_stats": state.batch_stats, "step": state.step}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same 4-step run: 1 process x 2 simulated devices, 2 processes x 1 device, and 2
  processes killed (SIGKILL) after step 3 (checkpoint at step 2) and restarted. Plumbing, so
  XLA's cheap pipeline everywhere (``FAST_COMPILE_ENV``)."""
  tmp = tmp_path_factory.mktemp("runs")
  one = tmp / "two_devices"
  # The one-process run goes beside the first two-process run (its time is mostly compilation).
  with open(tmp / "one.log", "w") as log:
    single = subprocess.Popen([sys.executable, "-m", "faceens.train", *CONFIG, f"--workdir={one}"],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  try:
    two = tmp / "two_processes"
    launch(lambda i, a: _train_cli(i, a, two), 2, tmp, "train")
    assert single.wait(timeout=300) == 0, (tmp / "one.log").read_text()[-3000:]
  finally:
    if single.poll() is None:
      single.kill()
      single.wait()
  killed = tmp / "killed"
  launch(lambda i, a: [sys.executable, "-c", STOPPED, str(killed)], 2, tmp, "stopped",
         env_for=lambda i, a: _env(JAX_COORDINATOR_ADDRESS=a, JAX_NUM_PROCESSES="2",
                                   JAX_PROCESS_ID=str(i)), until="STOPPED")
  launch(lambda i, a: _train_cli(i, a, killed), 2, tmp, "resumed")
  return one, two, killed


def test_two_processes_train_like_two_devices_and_resume_after_a_kill(runs):
  one, two, killed = runs
  p_one, p_two, p_killed = (_params(d) for d in runs)
  assert int(p_two["step"]) == STEPS
  chex.assert_trees_all_close(p_two, p_one, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_equal(p_killed, p_two)            # the restart resumed bit for bit
  summaries = [json.loads((d / "summary.json").read_text()) for d in runs]
  assert [s["devices"] for s in summaries] == [2, 2, 2]
  assert summaries[2]["resumed_from"] == EVERY
  np.testing.assert_allclose(summaries[1]["final_loss"], summaries[0]["final_loss"], rtol=1e-4)
  assert summaries[1]["final_loss"] == summaries[2]["final_loss"]
  assert summaries[1]["heldout_paper_accuracy"] == pytest.approx(summaries[0]["heldout_paper_accuracy"],
                                                           abs=0.01)
  with open(two / "metrics.jsonl") as f:                   # written once, by process 0
    assert [json.loads(l)["step"] for l in f] == list(range(1, STEPS + 1))


def test_two_process_attack_gives_every_pair_the_one_process_result(runs, tmp_path, fast_compile):
  """7 pairs: process 0 attacks 4, process 1 attacks 3; process 0 writes every pair's result."""
  workdir = runs[0]
  args = ["--method=ifgsm,cw", "--pairs=7", "--goal=0.4", "--max_iters=30", "--seed=3"]
  launch(lambda i, a: [sys.executable, "-m", "faceens.attack", f"--workdir={workdir}", *args,
                       f"--out={tmp_path / 'two'}", f"--coordinator_address={a}",
                       "--num_processes=2", f"--process_id={i}"], 2, tmp_path, "attack")
  model = faceens.load(str(workdir))
  base = lots.AttackConfig(max_iters=30)
  attack_cli.white_box(model, attack_cli.parse_methods("ifgsm,cw"), 7, "0.4",
                       str(tmp_path / "one"), seed=3, base=base, progress=False)
  for name in ("ifgsm", "cw"):
    one, two = (np.load(tmp_path / d / f"attack_{name}.npz") for d in ("one", "two"))
    np.testing.assert_array_equal(two["pairs"], one["pairs"])
    assert 0 < one["success"].sum(), name
    np.testing.assert_array_equal(two["iterations"], one["iterations"])
    np.testing.assert_array_equal(two["success"], one["success"])
    np.testing.assert_allclose(two["x_adv"], one["x_adv"], atol=1e-6)
    np.testing.assert_allclose(two["distance"], one["distance"], atol=1e-5)


def test_explicit_form_errors_are_clear(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ValueError, match="missing: --num_processes, --process_id"):
    sharding.initialize_distributed("127.0.0.1:1234")
  with pytest.raises(ValueError, match=r"--process_id must be in 0\.\.1 for --num_processes=2"):
    sharding.initialize_distributed("127.0.0.1:1234", 2, 2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    sharding.initialize_distributed("127.0.0.1:1234", process_id=0)
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  r = subprocess.run([sys.executable, "-m", "faceens.train", *CONFIG, "--workdir=unused",
                      "--num_processes=2"], cwd=REPO, capture_output=True, text=True, timeout=120,
                     env=_env())
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "error: the explicit multi-process form needs" in r.stderr
  assert "missing: --coordinator_address, --process_id" in r.stderr
