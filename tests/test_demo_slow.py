"""The README's demo end to end (about 4 minutes on 2 cores): slow-marked, in the README's full
test command that CI runs (`python -m pytest -q -m "slow or not slow"`)."""

import json
import os

import pytest

from faceens import configs, train


@pytest.mark.slow
def test_demo_reaches_heldout_accuracy(tmp_path):
  c = configs.experiment("arcface_srv_fdp", "demo")
  summary = train.train_and_evaluate(c, str(tmp_path), progress=False)
  with open(os.path.join(tmp_path, "summary.json")) as f:
    assert json.load(f)["heldout_paper_accuracy"] == summary["heldout_paper_accuracy"]
  assert summary["steps"] == 300
  assert summary["heldout_paper_accuracy"] >= 0.90, summary
