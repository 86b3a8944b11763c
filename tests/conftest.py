"""Shared test set-up: small shapes, a persistent compilation cache across tests and processes."""

import os
import tempfile

import jax

_CACHE = os.path.join(tempfile.gettempdir(), "faceens-test-jax-cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
