"""Process set-up for XLA:CPU: transparent huge pages for glibc's large allocations.

XLA:CPU allocates a step's buffers afresh on every call, and glibc serves every allocation above
its mmap threshold (32 MB at most) with a fresh ``mmap``, so each training step page-faults its
whole working set in again, 4 KiB at a time. Measured on 2 cores, batch 64, 112 px, K = 1
(``bench/train_step.py``): 800,000 minor page faults and 1.9 s of kernel time per step, 3.46 s
per step. With glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35), malloc asks for
transparent huge pages on those mappings: 1,900 faults, 0.6 s of kernel time, 2.46 s per step,
same results. PyTorch's CPU allocator gets the same pages from the same malloc.

glibc reads tunables once, when a process starts, so the command-line entry points call
``reexec_with_hugepage_malloc()`` before importing JAX: it re-executes the same command line once
with the tunable added to ``GLIBC_TUNABLES``. Nothing happens when the tunable is already there,
on other C libraries or older glibc, when the kernel's transparent huge pages are ``never``, or
when ``FACEENS_NO_HUGEPAGES=1`` is set. Only the standard library is imported here.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FACEENS_NO_HUGEPAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  try:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def _thp_mode() -> str | None:
  try:
    with open(_THP) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def hugepage_env(environ, glibc: tuple[int, int] | None, thp: str | None) -> dict | None:
  """The environment to re-execute with, or ``None`` when there is nothing to gain or do."""
  if environ.get(OPT_OUT, "") not in ("", "0"):
    return None
  if glibc is None or glibc < (2, 35) or thp not in ("always", "madvise"):
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" in current:
    return None  # already set, by us or by the user: theirs wins
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
  return env


def reexec_with_hugepage_malloc() -> None:
  """Re-executes this process's command line once with ``glibc.malloc.hugetlb=1``, if useful.

  Call it first thing in a ``__main__`` block: everything before it runs twice.
  """
  argv = list(getattr(sys, "orig_argv", []))
  if not sys.executable or len(argv) < 2 or argv[1] == "-":
    return  # no command line to repeat (interactive, or a script on standard input)
  env = hugepage_env(os.environ, _glibc_version(), _thp_mode())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], env)
