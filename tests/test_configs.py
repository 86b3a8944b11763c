"""faceens.configs and experiments/: every experiment builds and validates, clear errors."""

import json
import os

import pytest

from faceens import configs
from faceens.models import batchnorm, depthwise, pointwise
from tests.builders import EXPERIMENTS, load_experiment, REPO


def test_experiment_full_and_demo_variants_build():
  for path in EXPERIMENTS:
    for variant in ("full", "demo", "lfw", None):
      configs.validate(load_experiment(path, variant))
  full = load_experiment(os.path.join(REPO, "experiments", "arcface_srv_fdp.py"), None)
  assert (full.train.batch_size, full.train.epochs, full.optim.lr) == (256, 20, 1e-3)
  assert (full.loss.scale, full.loss.margin, full.fdp.gamma, full.ensemble.num_members) == (64, .5, 10, 3)
  cos = load_experiment(os.path.join(REPO, "experiments", "cosface_adp.py"), "full")
  assert (cos.loss.margin, cos.adp.alpha, cos.adp.beta) == (0.35, 2.0, 0.5)
  assert load_experiment(os.path.join(REPO, "experiments", "arcface_advt.py"), "full").advt.margin == 0.6


@pytest.mark.parametrize("field,value,match", [
    ("method", "srv_fdb", "unknown method 'srv_fdb'; valid: single, baseline"),
    ("model.head", "gap", "model.head = 'gap' is invalid; valid: gdc, bn_dropout_fc_bn"),
    ("train.batch_size", 0, "train.batch_size = 0 is invalid"),
    ("ensemble.num_members", 1, "ensemble.num_members = 1 is invalid; valid: >= 2"),
    ("data.image_size", 50, "data.image_size = 50 is invalid; valid: a multiple of 16"),
    ("data.kind", "lmdb", "data.kind = 'lmdb' is invalid; valid: orl, image_folder, ms1mv2, tfds"),
])
def test_malformed_config_is_a_clear_error(field, value, match):
  c = configs.experiment("arcface_srv_fdp", "test")
  section, _, key = field.rpartition(".")
  (c[section] if section else c)[key] = value
  with pytest.raises(ValueError, match=match):
    configs.validate(c)


def test_method_groups_are_required_and_unused_ones_ignored(tmp_path):
  c = configs.experiment("arcface_fdp", "test")
  del c["fdp"]
  with pytest.raises(ValueError, match=r"config field fdp = None is invalid; valid: a group with "
                     r"gamma for method 'fdp' \(see experiments/arcface_fdp.py\)"):
    configs.validate(c)
  # Each experiment carries only the groups its method reads; CosFace files are the ArcFace ones
  # with the CosFace head.
  for path in EXPERIMENTS:
    name = os.path.basename(path)[:-3]
    c = configs.experiment(name, "lfw")
    assert {g for g in configs.METHOD_GROUPS if g in c} == {
        g for g in configs.METHOD_GROUPS if configs.uses_group(c.method, g)}, name
    if name.startswith("cosface"):
      arc = configs.experiment(name.replace("cosface", "arcface"), "lfw")
      assert (c.loss.name, c.loss.margin, arc.loss.margin) == ("cosface", 0.35, 0.5)
      c.loss.name, c.loss.margin = "arcface", 0.5
      assert c.to_dict() == arc.to_dict()
  # A run recorded with every group (older runs) has the same recipe as today's experiment.
  c = configs.experiment("arcface_baseline", "test")
  raw = json.loads(c.to_json_best_effort())
  raw["adp"] = {"alpha": 2.0, "beta": 0.5, "logits": "cosine"}
  raw["advt"] = {"margin": 0.6, "iters": 10}
  (tmp_path / "config.json").write_text(json.dumps(raw))
  assert configs.recipe(configs.load_run_config(str(tmp_path))) == configs.recipe(c)
  with pytest.raises(FileNotFoundError, match="no experiment 'arcface_srv_fdb' in .*; valid: "
                     "arcface_adp, arcface_advt"):
    configs.experiment("arcface_srv_fdb")


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant 'tiny'; valid: full, demo, lfw, test"):
    configs.experiment("arcface_srv_fdp", "tiny")


def test_paper_recipe_clips_nothing():
  for method in ("single", "baseline", "srv_fdp"):
    for variant in ("full", "demo"):
      assert configs.experiment(f"arcface_{method}", variant).optim.clip_norm == 0.0
  c = configs.experiment("arcface_srv_fdp", "test")
  c.optim.clip_norm = -1.0
  with pytest.raises(ValueError, match="optim.clip_norm = -1.0 is invalid"):
    configs.validate(c)


@pytest.mark.parametrize("module,field,what,bad", [
    (depthwise, "depthwise_impl", "depthwise", "cudnn"),
    (pointwise, "pointwise_impl", "pointwise", "gemm"),
    (batchnorm, "batchnorm_impl", "batchnorm", "torch")])
def test_unknown_kernel_impl(module, field, what, bad):
  """The per-backend kernel choices: a clear error from the module and from the config."""
  with pytest.raises(ValueError, match=f"unknown {what} implementation '{bad}'; valid: auto"):
    module.resolve_impl(bad)
  c = configs.experiment("arcface_srv_fdp", "test")
  c.model[field] = bad
  with pytest.raises(ValueError, match=f"model.{field} = '{bad}' is invalid"):
    configs.validate(c)
