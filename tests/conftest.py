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


def run_on_simulated_devices(script: str, n: int, tmp_path):
  """Runs ``python -c script OUT.npz`` with ``n`` simulated CPU devices; returns the npz."""
  import subprocess
  import sys

  import numpy as np
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = str(tmp_path / f"devices{n}.npz")
  subprocess.run([sys.executable, "-c", script, out], check=True, env=env, cwd=REPO)
  return np.load(out)


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
