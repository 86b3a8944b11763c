"""Every command in README.md and bench/README.md is one the code accepts.

Each shell command of the docs' ``bash`` blocks is checked against the program it calls: every
``--flag`` it uses must be a flag of that program (``--helpfull`` of the faceens jobs, ``--help``
of the bench scripts), every ``--config.<field>`` a field of the config, every extra in
``pip install ".[x]"`` an extra of pyproject.toml; the training commands also run for real up to
their resolved config (``--print_config``), and the README's two main commands are exactly the
ones CI and the demo test run.
"""

import functools
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from tests.builders import REPO
from tests.conftest import subprocess_env

DOCS = ("README.md", os.path.join("bench", "README.md"))


def _commands(doc: str) -> list[str]:
  with open(os.path.join(REPO, doc)) as f:
    text = f.read()
  out = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #")[0].strip()
      if line and not line.startswith("#"):
        out += [part.strip() for part in line.split("&&")]
  # Commands quoted inline in the text, `python -m faceens.x ...`, `faceens-x ...`.
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  inline = r"`((?:python3? -m faceens|faceens-|python3? bench/|PYTHONPATH=\. python3 bench/)[^`]*)`"
  out += [m.replace("...", "").strip() for m in re.findall(inline, text)]
  return out


ALL = [(doc, cmd) for doc in DOCS for cmd in _commands(doc)]


def _program(cmd: str):
  """``(kind, name, args)``: ``("job", "faceens.train", args)``, ``("script", "bench/x.py", args)``,
  ``("pip", None, args)``, ``("pytest", None, args)``."""
  words = shlex.split(cmd)
  while words and "=" in words[0] and not words[0].startswith("-"):
    words = words[1:]  # VAR=value prefixes
  if words[:3] == ["python", "-m", "pip"] or words[:1] == ["pip"]:
    return "pip", None, words
  if words[:3] == ["python", "-m", "pytest"]:
    return "pytest", None, words[3:]
  if words[:2] in (["python", "-m"], ["python3", "-m"]):
    return "job", words[2], words[3:]
  if words[0].startswith("faceens-"):
    return "job", "faceens." + words[0][len("faceens-"):], words[1:]
  if words[0] in ("python", "python3") and words[1].endswith(".py"):
    return "script", words[1], words[2:]
  raise AssertionError(f"a docs command of unknown kind: {cmd!r}")


@functools.lru_cache(maxsize=None)
def _help(kind: str, name: str) -> str:
  argv = ([sys.executable, "-m", name, "--helpfull"] if kind == "job"
          else [sys.executable, name, "--help"])
  r = subprocess.run(argv, cwd=REPO, env=subprocess_env(JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode in (0, 1), r.stderr[-2000:]
  return r.stdout + r.stderr


def _flags(args) -> list[str]:
  return [a[2:].split("=")[0] for a in args if a.startswith("--")]


@pytest.mark.parametrize("doc,cmd", ALL, ids=[f"{d}:{c[:60]}" for d, c in ALL])
def test_docs_command_is_accepted(doc, cmd):
  kind, name, args = _program(cmd)
  if kind == "pip":
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
      extras = set(tomllib.load(f)["project"]["optional-dependencies"])
    for spec in args:
      for extra in re.findall(r"\[([^\]]+)\]", spec):
        assert set(extra.split(",")) <= extras, (cmd, extras)
    return
  if kind == "pytest":
    return  # the test commands are the ones CI runs (test_readme_commands_are_what_ci_runs)
  if not args and cmd.split()[0].startswith("faceens-"):
    # a console script named in the text: it must be one pyproject.toml installs
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
      scripts = tomllib.load(f)["project"]["scripts"]
    assert cmd.split()[0] in scripts, (cmd, scripts)
    return
  help_text = _help(kind, name)
  for flag in _flags(args):
    if flag.startswith("config."):
      continue  # checked against the config below
    base = flag[2:] if flag.startswith("no") and f"--[no]{flag[2:]}" in help_text else flag
    # absl lists "  --[no]name: help", argparse "  --name VALUE  help" at the start of a line.
    assert re.search(rf"^\s+(--\S+, )?--(\[no\])?{re.escape(base)}(:|\s|,|$)", help_text,
                     re.M), \
        f"{doc}: {cmd!r} uses --{flag}, which {name} does not take"
  if name == "faceens.train":
    r = subprocess.run([sys.executable, "-m", name, *args, "--print_config"], cwd=REPO,
                       env=subprocess_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"{doc}: {cmd!r} --print_config: {r.stderr[-1500:]}"
    fields = {line.split(" = ")[0] for line in r.stdout.splitlines() if " = " in line}
    for flag in _flags(args):
      if flag.startswith("config."):
        assert flag[len("config."):] in fields, f"{doc}: {cmd!r}: no config field {flag}"


def test_readme_commands_are_what_ci_runs():
  readme = _commands("README.md")
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = [l.strip() for l in f if l.strip() and not l.startswith("#")]
  full = 'python -m pytest -q -m "slow or not slow"'
  assert full in readme and ci[-1] == full           # CI runs the README's full test command
  assert "python -m pytest -q" in readme               # and the quick one is there for daily use
  demo = ("python -m faceens.train --config=experiments/arcface_srv_fdp.py:demo "
          "--workdir=runs/demo")
  assert demo in readme                                # what tests/test_demo_slow.py trains
