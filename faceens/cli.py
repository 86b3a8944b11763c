"""Console entry points (``pyproject.toml`` ``[project.scripts]``): ``faceens-train``,
``faceens-evaluate``, ``faceens-attack``, ``faceens-verify``, ``faceens-reproduce``,
``faceens-import-model``. Each is the same job as ``python -m faceens.<job>``, with the same
flags."""

from __future__ import annotations

import importlib
import sys

from faceens import hostenv


def _run(job: str) -> None:
  hostenv.reexec_with_hugepage_malloc()  # before JAX is imported: see faceens.hostenv
  from absl import app
  module = importlib.import_module(f"faceens.{job}")
  module._define_flags()
  # --help lists the main module's key flags, and the main module of a console script is the
  # script itself: give it the job's flags (and those the job adopted, the distributed ones).
  from absl import flags
  fv = flags.FLAGS
  for flag in fv.get_key_flags_for_module(module.__name__):
    fv.register_key_flag_for_module(sys.argv[0], flag)
  parser = getattr(module, "parse_flags", None)
  app.run(module.main, **({"flags_parser": parser} if parser else {}))


def train() -> None:
  _run("train")


def evaluate() -> None:
  _run("evaluate")


def attack() -> None:
  _run("attack")


def verify() -> None:
  _run("verify")


def reproduce() -> None:
  _run("reproduce")


def import_model() -> None:
  _run("import_model")
