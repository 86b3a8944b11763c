"""Shared test set-up: small shapes, a persistent compilation cache across tests and processes."""

import os
import struct
import tempfile

import jax
import pytest

from tests.builders import independent_rec, irheader, random_jpeg, REPO


_CACHE = os.path.join(tempfile.gettempdir(), "faceens-test-jax-cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
# Subprocesses started by tests (CLIs, simulated devices) share the cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
  """A tiny trained srv_fdp run (3 steps, evaluated at step 2 and at the end), shared by tests."""
  from faceens import configs, train
  c = configs.experiment("arcface_srv_fdp", "test")
  c.train.steps = 3
  c.train.eval_every = 2
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(c, workdir, progress=False)
  return workdir


def subprocess_env(**extra) -> dict:
  """This process's environment for a child Python that imports faceens from this checkout."""
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def run_on_simulated_devices(script: str, counts, tmp_path):
  """Runs ``python -c script OUT.npz`` once per device count in ``counts``, all at once.

  Each run has its own number of simulated CPU devices and XLA's cheap compilation pipeline
  (the runs are compared with each other, not with the in-process tests); the processes run
  side by side, as their time is mostly single-threaded compilation. Returns ``{n: npz}``.
  """
  import subprocess
  import sys

  import numpy as np
  procs = {}
  for n in counts:
    env = subprocess_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
                         **FAST_COMPILE_ENV)
    out = str(tmp_path / f"devices{n}.npz")
    procs[n] = (subprocess.Popen([sys.executable, "-c", script, out], env=env, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out)
  try:
    for n, (p, _) in procs.items():
      log, _ = p.communicate(timeout=600)
      assert p.returncode == 0, f"{n} simulated devices:\n{log[-3000:]}"
  finally:
    for p, _ in procs.values():
      if p.poll() is None:
        p.kill()
  return {n: np.load(out) for n, (_, out) in procs.items()}


@pytest.fixture()
def small_rec(tmp_path):
  """InsightFace layout: header record 0 (images 1..5), 5 images, 2 identity records."""
  imgs = [random_jpeg(i) for i in range(5)]
  labels = [0, 0, 1, 1, 1]
  recs = [irheader(2, 0.0) + struct.pack("<2f", 6, 8)]
  recs += [irheader(0, float(y), k + 1) + b for k, (b, y) in enumerate(zip(imgs, labels))]
  recs += [irheader(2, 0.0) + struct.pack("<2f", 1, 3), irheader(2, 0.0) + struct.pack("<2f", 3, 6)]
  path = str(tmp_path / "train.rec")
  independent_rec(path, recs)
  (tmp_path / "property").write_text("2,24,24")
  return path, imgs, labels


# Tests that check shapes, plumbing and consistency (not numbers against a reference) compile with
# XLA's cheap pipeline: a third less compile time for a training step (measured on 2 cores).
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@pytest.fixture
def fast_compile():
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
