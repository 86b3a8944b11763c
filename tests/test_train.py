"""Real training steps on the bundled ORL faces: learning, resume, multi-device, configs, errors."""

import glob
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceens import api, configs, heads, train
from faceens.data import demo, image_folder, pipeline
from tests.conftest import REPO, run_on_simulated_devices

STEP_COSFACE = ("single", "srv_fdp")  # CosFace configs that also run a training step
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))


def load_experiment(path, variant):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


class Run:
  """The trainer's pieces without checkpoints, for step-level tests."""

  def __init__(self, c):
    configs.validate(c)
    self.c = c
    self.source, self.held = train.load_datasets(c)
    self.data = iter(train.make_pipeline(c, self.source))
    self.train_set = image_folder.load_image_folder(demo.orl_root(), c.data.image_size, c.data.fit,
                                                    demo.TRAIN_IDENTITIES)
    steps = train.total_steps(c, pipeline.steps_per_epoch(self.source, c.train.batch_size))
    self.model = train.build_model(c)
    opt = train.make_optimizer(c, steps)
    self.mesh = train.make_mesh()
    self.state = train.replicate(train.create_train_state(c, self.train_set.num_classes, opt), self.mesh)
    self.step_fn = train.shard_train_step(train.make_train_step(c, self.model, opt), self.mesh,
                                          self.state)
    self.face_model = api.FaceModel(c, self.variables())

  def variables(self):
    return {"params": self.state.params["backbone"], "batch_stats": self.state.batch_stats}

  def step(self, t):
    del t  # the pipeline yields the batches in order
    x, y = next(self.data)
    self.state, m = self.step_fn(self.state, *train.put_batch(self.mesh, x, y))
    return jax.device_get(m)

  def train_accuracy(self, n=120):
    """Eval-mode top-1 of the cosine head on a fixed subset of training images, member mean."""
    self.face_model.variables = self.variables()
    idx = np.arange(0, len(self.train_set), max(1, len(self.train_set) // n))
    feats = self.face_model.member_features(self.train_set.images[idx], batch_size=len(idx))
    cos = heads.cosines(jnp.asarray(feats), self.state.params["head"])
    return float(np.mean(np.argmax(cos, -1) == self.train_set.labels[idx][None]))


def test_real_steps_on_orl_raise_training_accuracy():
  c = configs.method_config("srv_fdp", "arcface", "test")
  c.optim.name, c.optim.lr, c.loss.scale = "adamw", 3e-3, 16.0
  c.train.batch_size, c.train.steps = 32, 40
  run = Run(c)
  before = run.train_accuracy()
  losses = [float(run.step(t)["loss"]) for t in range(c.train.steps)]
  after = run.train_accuracy()
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  assert before < 0.15 and after > before + 0.3, (before, after)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[os.path.basename(p)[:-3] for p in EXPERIMENTS])
def test_every_experiment_test_variant_runs_a_step(path):
  c = load_experiment(path, "test")
  name = os.path.basename(path)[:-3]
  loss, method = name.split("_", 1)
  assert (c.loss.name, c.method) == (loss, method)
  if loss == "cosface" and method not in STEP_COSFACE:
    # CosFace differs from ArcFace only in the head (tested numerically in test_heads); build and
    # check its state, and leave the compile-heavy step to the ArcFace twin (suite time).
    state = train.create_train_state(c, 30, train.make_optimizer(c, 2))
    head = state.params["head"]
    k = c.ensemble.num_members
    assert head.shape == ((c.model.embedding_dim, 30) if "srv" in method else (k, c.model.embedding_dim, 30))
    return
  run = Run(c)
  m = run.step(0)
  assert int(run.state.step) == 1
  assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
  head = run.state.params["head"]
  k = c.ensemble.num_members
  assert head.shape == ((c.model.embedding_dim, 30) if "srv" in method else (k, c.model.embedding_dim, 30))
  assert jax.tree.leaves(run.state.params["backbone"])[0].shape[0] == k


def test_experiment_full_and_demo_variants_build():
  for path in EXPERIMENTS:
    for variant in ("full", "demo", None):
      configs.validate(load_experiment(path, variant))
  full = load_experiment(os.path.join(REPO, "experiments", "arcface_srv_fdp.py"), None)
  assert (full.train.batch_size, full.train.epochs, full.optim.lr) == (256, 20, 1e-3)
  assert (full.loss.scale, full.loss.margin, full.fdp.gamma, full.ensemble.num_members) == (64, .5, 10, 3)
  cos = load_experiment(os.path.join(REPO, "experiments", "cosface_adp.py"), "full")
  assert (cos.loss.margin, cos.adp.alpha, cos.adp.beta) == (0.35, 2.0, 0.5)
  assert load_experiment(os.path.join(REPO, "experiments", "arcface_advt.py"), "full").advt.margin == 0.6


def _params(workdir, c):
  state = train.load_state(c, workdir, 30)
  return jax.tree.leaves(jax.device_get((state.params, state.batch_stats, state.opt_state)))


def test_resume_is_bit_identical(tmp_path):
  c = configs.method_config("srv_fdp", "arcface", "test")
  c.model.head = "bn_dropout_fc_bn"  # exercises the per-step dropout key too
  c.train.steps, c.train.checkpoint_every = 4, 2
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  sa = train.train_and_evaluate(c, a, progress=False)
  assert train.train_and_evaluate(c, b, stop_after=3, progress=False)["stopped"]
  sb = train.train_and_evaluate(c, b, progress=False)
  assert sb["resumed_from"] == 2 and sa["resumed_from"] == 0
  for x, y in zip(_params(a, c), _params(b, c)):
    np.testing.assert_array_equal(x, y)
  assert sa["final_loss"] == sb["final_loss"]
  with open(os.path.join(b, "metrics.jsonl")) as f:
    assert [json.loads(l)["step"] for l in f] == [1, 2, 3, 4]
  with open(os.path.join(a, "summary.json")) as f:
    summary = json.load(f)
  for key in ("steps", "final_loss", "train_seconds", "img_per_s", "heldout_accuracy"):
    assert key in summary
  assert 0.0 <= summary["heldout_accuracy"] <= 1.0


ONE_STEP = textwrap.dedent("""
    import sys, jax, numpy as np
    from faceens import configs
    from tests.test_train import Run
    c = configs.method_config("srv_fdp", "arcface", "test")
    c.train.batch_size = 8
    run = Run(c)
    m = run.step(0)
    leaves = jax.tree.leaves(jax.device_get((run.state.params, run.state.batch_stats)))
    np.savez(sys.argv[1], n=jax.device_count(), loss=m["loss"], *leaves)
""")


def test_four_simulated_devices_equal_one(tmp_path):
  outs = {n: run_on_simulated_devices(ONE_STEP, n, tmp_path) for n in (1, 4)}
  assert int(outs[1]["n"]) == 1 and int(outs[4]["n"]) == 4
  np.testing.assert_allclose(outs[4]["loss"], outs[1]["loss"], rtol=1e-5)
  keys = [k for k in outs[1].files if k.startswith("arr_")]
  assert len(keys) > 10
  for k in keys:
    np.testing.assert_allclose(outs[4][k], outs[1][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("method", "srv_fdb", "unknown method 'srv_fdb'; valid: single, baseline"),
    ("model.head", "gap", "model.head = 'gap' is invalid; valid: gdc, bn_dropout_fc_bn"),
    ("train.batch_size", 0, "train.batch_size = 0 is invalid"),
    ("ensemble.num_members", 1, "ensemble.num_members = 1 is invalid; valid: >= 2"),
    ("data.image_size", 50, "data.image_size = 50 is invalid; valid: a multiple of 16"),
    ("data.kind", "lmdb", "data.kind = 'lmdb' is invalid; valid: orl, image_folder, ms1mv2, tfds"),
])
def test_malformed_config_is_a_clear_error(field, value, match):
  c = configs.method_config("srv_fdp", "arcface", "test")
  section, _, key = field.rpartition(".")
  (c[section] if section else c)[key] = value
  with pytest.raises(ValueError, match=match):
    configs.validate(c)


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant 'tiny'; valid: full, demo, test"):
    configs.method_config("srv_fdp", "arcface", "tiny")


def _cli(*args, tmp_path):
  return subprocess.run([sys.executable, "-m", "faceens.train", *args, f"--workdir={tmp_path}/w"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_errors_are_clear(tmp_path):
  r = _cli("--config=experiments/arcface_srv_fdp.py:test", "--config.method=srv_fdb", tmp_path=tmp_path)
  assert r.returncode != 0 and "unknown method 'srv_fdb'" in r.stderr and "Traceback" not in r.stderr
  r = _cli("--config=experiments/arcface_srv_fdp.py", "--config.data.root=nowhere", tmp_path=tmp_path)
  assert r.returncode != 0 and "MS1MV2 training data not found at 'nowhere'" in r.stderr
  assert ":demo" in r.stderr
