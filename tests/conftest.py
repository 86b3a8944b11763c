"""Shared test set-up: small shapes, a persistent compilation cache across tests and processes."""

import os
import tempfile

import jax
import pytest

_CACHE = os.path.join(tempfile.gettempdir(), "faceens-test-jax-cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
  """A tiny trained srv_fdp run (3 steps, evaluated at step 2 and at the end), shared by tests."""
  from faceens import configs, train
  c = configs.method_config("srv_fdp", "arcface", "test")
  c.train.steps = 3
  c.train.eval_every = 2
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(c, workdir, progress=False)
  return workdir
