"""faceens.hostenv: when the commands re-execute themselves with glibc's huge-page malloc."""

import subprocess
import sys

import pytest

from faceens import hostenv
from tests.conftest import subprocess_env


@pytest.mark.parametrize("environ,glibc,thp,expected", [
    ({}, (2, 36), "madvise", "glibc.malloc.hugetlb=1"),
    ({}, (2, 35), "always", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise",
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # the user's wins
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise", None),  # already re-executed
    ({}, (2, 34), "madvise", None),   # the tunable is new in glibc 2.35
    ({}, None, "madvise", None),      # musl, macOS, Windows
    ({}, (2, 36), "never", None),     # no transparent huge pages to ask for
    ({}, (2, 36), None, None),
    ({"FACEENS_NO_HUGEPAGES": "1"}, (2, 36), "madvise", None),
    ({"FACEENS_NO_HUGEPAGES": "0"}, (2, 36), "madvise", "glibc.malloc.hugetlb=1"),
])
def test_hugepage_env(environ, glibc, thp, expected):
  env = hostenv.hugepage_env(environ, glibc, thp)
  if expected is None:
    assert env is None
  else:
    assert env["GLIBC_TUNABLES"] == expected
    assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == {
        k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}


def _run(tmp_path, **extra_env):
  script = tmp_path / "probe.py"
  script.write_text(
      "import os, sys\n"
      "print('start', os.environ.get('GLIBC_TUNABLES', ''), flush=True)\n"
      "from faceens import hostenv\n"
      "hostenv.reexec_with_hugepage_malloc()\n"
      "print('args', sys.argv[1:], os.environ.get('GLIBC_TUNABLES', ''))\n")
  env = subprocess_env(**extra_env)
  env.pop("GLIBC_TUNABLES", None)
  if hostenv.OPT_OUT not in extra_env:
    env.pop(hostenv.OPT_OUT, None)
  out = subprocess.run([sys.executable, str(script), "--a=1", "b"], env=env, capture_output=True,
                       text=True, timeout=60, check=True)
  return out.stdout.splitlines()


@pytest.mark.skipif(hostenv.hugepage_env({}, hostenv._glibc_version(), hostenv._thp_mode()) is None,
                    reason="this machine has no glibc >= 2.35 with transparent huge pages")
def test_reexec_runs_the_same_command_once_with_the_tunable(tmp_path):
  lines = _run(tmp_path)
  # The lines before the re-execution run twice; the process continues once, with its arguments.
  assert lines == ["start ", "start glibc.malloc.hugetlb=1",
                   "args ['--a=1', 'b'] glibc.malloc.hugetlb=1"]
  assert _run(tmp_path, FACEENS_NO_HUGEPAGES="1") == ["start ", "args ['--a=1', 'b'] "]
