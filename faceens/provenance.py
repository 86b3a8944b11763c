"""Where a result came from: ``record()`` for every JSON the jobs write.

The faceens version, the git commit of the checkout it runs from (``None`` for an installed
package, ``+dirty`` when tracked files outside ``reports/`` differ from it), the jax / jaxlib / flax versions, the
device kind and count, and a UTC timestamp.
"""

from __future__ import annotations

import datetime
import os
import subprocess


def git_commit(path: str | None = None) -> str | None:
  """The commit of the git checkout holding ``path`` (default: this package), ``+dirty`` if
  tracked files differ from it; ``None`` outside a checkout or without git."""
  here = path or os.path.dirname(os.path.abspath(__file__))
  try:
    run = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True,  # noqa: E731
                                    timeout=10)
    head = run("rev-parse", "HEAD")
    if head.returncode != 0:
      return None
    # Results the jobs write into the checkout (``reports/``) are not code: they leave it clean.
    dirty = run("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                ":(top,exclude)reports").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def record() -> dict:
  """``{"faceens", "commit", "jax", "jaxlib", "flax", "backend", "device_kind", "devices",
  "time_utc"}`` of this process."""
  import flax
  import jax
  import jaxlib

  import faceens
  devices = jax.devices()
  return {"faceens": faceens.__version__, "commit": git_commit(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "devices": len(devices),
          "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
