"""Real training steps on the bundled ORL faces: learning, resume, multi-device, configs, errors."""

import glob
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from faceens import api, configs, heads, models, train
from faceens.data import demo, image_folder
from tests.conftest import REPO, run_on_simulated_devices

STEP_COSFACE = ("single", "srv_fdp")  # CosFace configs that also run a training step
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))


def load_experiment(path, variant):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


class Run:
  """``train.setup`` without a workdir (no checkpoints), with a training-accuracy probe."""

  def __init__(self, c):
    self.run = train.setup(c)
    self.train_set = image_folder.load_image_folder(demo.orl_root(), c.data.image_size, c.data.fit,
                                                    demo.TRAIN_IDENTITIES)
    self.face_model = api.FaceModel(c, self.variables())

  @property
  def state(self):
    return self.run.state

  def variables(self):
    return {"params": self.state.params["backbone"], "batch_stats": self.state.batch_stats}

  def step(self, t):
    del t  # the pipeline yields the batches in order
    return jax.device_get(self.run.step())

  def train_accuracy(self, n=120):
    """Eval-mode top-1 of the cosine head on a fixed subset of training images, member mean."""
    self.face_model.variables = self.variables()
    idx = np.arange(0, len(self.train_set), max(1, len(self.train_set) // n))
    feats = self.face_model.member_features(self.train_set.images[idx], batch_size=len(idx))
    cos = heads.cosines(jnp.asarray(feats), self.state.params["head"])
    return float(np.mean(np.argmax(cos, -1) == self.train_set.labels[idx][None]))


def test_real_steps_on_orl_raise_training_accuracy():
  c = configs.experiment("arcface_srv_fdp", "test")
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
    for variant in ("full", "demo", "lfw", None):
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
  c = configs.experiment("arcface_srv_fdp", "test")
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
    c = configs.experiment("arcface_srv_fdp", "test")
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


def _cli(*args, tmp_path):
  return subprocess.run([sys.executable, "-m", "faceens.train", *args, f"--workdir={tmp_path}/w"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_errors_are_clear(tmp_path):
  r = _cli("--config=experiments/arcface_srv_fdp.py:test", "--config.method=srv_fdb", tmp_path=tmp_path)
  assert r.returncode != 0 and "unknown method 'srv_fdb'" in r.stderr and "Traceback" not in r.stderr
  r = _cli("--config=experiments/arcface_srv_fdp.py", "--config.data.root=nowhere", tmp_path=tmp_path)
  assert r.returncode != 0 and "MS1MV2 training data not found at 'nowhere'" in r.stderr
  assert ":demo" in r.stderr
  for args, match in [
      (("--config=experiments/arcface_srv_fdp.py:test", "--config.fdp.gama=3"),
       "error: --config.fdp.gama: the config has no field 'gama'. Did you mean \"gamma\""),
      (("--config=experiments/arcface_srv_fdpp.py:test",),
       "error: --config could not be loaded ([Errno 2] No such file or directory"),
      (("--config=experiments/arcface_srv_fdp.py:tiny",), "unknown variant 'tiny'; valid: full"),
  ]:
    r = _cli(*args, tmp_path=tmp_path)
    assert r.returncode != 0 and match in r.stderr and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- optimiser, members


def _member_as_single(state: train.TrainState, k: int, c_single, opt) -> train.TrainState:
  """A K = 1 state holding member k of an ensemble state (per-member heads)."""
  take = lambda t: jax.tree.map(lambda a: a[k:k + 1], t)  # noqa: E731
  params = {"backbone": take(state.params["backbone"]), "head": state.params["head"][k:k + 1]}
  return train.TrainState(step=state.step, params=params, batch_stats=take(state.batch_stats),
                          opt_state=opt.init(params), rng=state.rng)


@pytest.mark.parametrize("clip_norm", [0.0, 0.05])
def test_member_updates_are_independent(clip_norm):
  """A baseline ensemble's member k after one step equals member k trained alone on the batch:
  no clipping (the paper), and per-member backbone clipping small enough to be active."""
  c = configs.experiment("arcface_baseline", "test")
  c.ensemble.num_members, c.ensemble.strategy = 2, "unrolled"
  c.optim.clip_norm = clip_norm
  cs = configs.experiment("arcface_single", "test")
  cs.optim.clip_norm = clip_norm
  opt, opt_s = train.make_optimizer(c, 10), train.make_optimizer(cs, 10)
  state = train.create_train_state(c, 30, opt)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, 30, 8).astype(np.int32)
  step = jax.jit(train.make_train_step(c, models.get_model(c), opt))
  step_s = jax.jit(train.make_train_step(cs, models.get_model(cs), opt_s))
  new, m = step(state, x, y)
  assert m["finite"] == 1.0
  if clip_norm:  # the clip is active: the raw backbone gradient is far above 0.05
    assert m["grad_norm"] > 10 * clip_norm
  for k in range(2):
    alone, _ = step_s(_member_as_single(state, k, cs, opt_s), x, y)
    got = jax.tree.map(lambda a: a[k:k + 1], (new.params["backbone"], new.batch_stats))
    got = (got, new.params["head"][k:k + 1])
    want = ((alone.params["backbone"], alone.batch_stats), alone.params["head"])
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_clip_member_backbones_matches_numpy():
  rng = np.random.default_rng(1)
  g = {"backbone": {"a": rng.normal(size=(3, 4, 5)), "b": rng.normal(size=(3, 7))},
       "head": 100 * rng.normal(size=(6, 2))}
  g = jax.tree.map(lambda a: a.astype(np.float32), g)
  out, _ = train.clip_member_backbones(2.0).update(jax.tree.map(jnp.asarray, g), optax.EmptyState())
  for k in range(3):
    norm = np.sqrt(np.sum(g["backbone"]["a"][k] ** 2) + np.sum(g["backbone"]["b"][k] ** 2))
    scale = min(1.0, 2.0 / norm)
    np.testing.assert_allclose(out["backbone"]["a"][k], g["backbone"]["a"][k] * scale, rtol=1e-6)
    np.testing.assert_allclose(out["backbone"]["b"][k], g["backbone"]["b"][k] * scale, rtol=1e-6)
  np.testing.assert_array_equal(out["head"], g["head"])  # class weights are never clipped


def test_paper_recipe_clips_nothing():
  for method in ("single", "baseline", "srv_fdp"):
    for variant in ("full", "demo"):
      assert configs.experiment(f"arcface_{method}", variant).optim.clip_norm == 0.0
  c = configs.experiment("arcface_srv_fdp", "test")
  c.optim.clip_norm = -1.0
  with pytest.raises(ValueError, match="optim.clip_norm = -1.0 is invalid"):
    configs.validate(c)


# ----------------------------------------------------------------------------- non-finite states


def test_non_finite_state_is_never_checkpointed(tmp_path):
  """lr 1e30 blows the parameters up within a few steps; log steps are too rare to notice, the
  check at each save must: the run stops with the hint and every saved checkpoint is finite."""
  c = configs.experiment("arcface_single", "test")
  c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 1e30, 0.0
  c.train.steps, c.train.checkpoint_every, c.train.log_every = 6, 1, 1000
  with pytest.raises(train.NonFiniteLossError, match="training became non-finite at step") as e:
    train.train_and_evaluate(c, str(tmp_path), progress=False)
  assert "lower optim.lr" in str(e.value).lower()
  import orbax.checkpoint as ocp
  steps = ocp.CheckpointManager(str(tmp_path / "checkpoints")).all_steps()
  assert steps, "the first step is finite and must have been saved"
  assert f"the last good checkpoint (step {max(steps)}) is kept" in str(e.value)
  state = train.create_train_state(c, 30, train.make_optimizer(c, 6))
  mngr = train._checkpoint_manager(str(tmp_path), c)
  for s in steps:
    restored = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, state))))["state"]
    assert bool(train.tree_all_finite((restored.params, restored.batch_stats))), s
  mngr.close()


def test_resume_skips_a_non_finite_checkpoint(tmp_path):
  c = configs.experiment("arcface_single", "test")
  c.train.steps, c.train.checkpoint_every = 2, 1
  train.train_and_evaluate(c, str(tmp_path), stop_after=1, progress=False)
  good = train.load_state(c, str(tmp_path), 30)
  bad = good.replace(step=good.step + 1,
                     params=jax.tree.map(lambda a: a * jnp.nan, good.params))
  mngr = train._checkpoint_manager(str(tmp_path), c)
  mngr.save(2, args=train._save_args(bad), force=True)  # as an older faceens could have
  mngr.wait_until_finished()
  fresh = train.create_train_state(c, 30, train.make_optimizer(c, 2))
  restored = train.restore_or_init(mngr, fresh)
  assert int(restored.step) == 1 and mngr.all_steps() == [1]
  chex.assert_trees_all_equal(jax.device_get(restored.params), jax.device_get(good.params))
  mngr.close()
