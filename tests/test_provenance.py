"""``provenance.git_commit`` on a throwaway git checkout."""

import shutil
import subprocess

import pytest

from faceens import provenance


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_is_dirty_for_code_changes_but_not_for_reports(tmp_path):
  git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True,  # noqa: E731
                                  text=True).stdout.strip()
  git("init", "-q")
  (tmp_path / "pkg").mkdir()
  (tmp_path / "reports").mkdir()
  (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
  (tmp_path / "reports" / "r.json").write_text("{}\n")
  git("add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
  head = git("rev-parse", "HEAD")
  where = str(tmp_path / "pkg")
  assert provenance.git_commit(where) == head
  (tmp_path / "reports" / "r.json").write_text('{"a": 1}\n')   # a job's output: still clean
  (tmp_path / "new_untracked.py").write_text("")
  assert provenance.git_commit(where) == head
  (tmp_path / "pkg" / "code.py").write_text("x = 2\n")          # code: dirty
  assert provenance.git_commit(where) == head + "+dirty"
