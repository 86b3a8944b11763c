"""Real training steps on the bundled ORL faces: learning, resume, multi-device, configs, errors."""

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
from faceens.data import demo, image_folder, pack_bin, pack_rec
from tests.builders import EXPERIMENTS, load_experiment, make_lfw, ORL, PAIRS4, PEOPLE4, REPO
from tests.conftest import run_on_simulated_devices
from tests.references import float32_rounding


STEP_COSFACE = ("single", "srv_fdp")  # CosFace configs that also run a training step


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
def test_every_experiment_test_variant_runs_a_step(path, fast_compile):
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
  chex.assert_tree_all_finite((run.state.params, run.state.batch_stats))
  head = run.state.params["head"]
  k = c.ensemble.num_members
  assert head.shape == ((c.model.embedding_dim, 30) if "srv" in method else (k, c.model.embedding_dim, 30))
  chex.assert_tree_shape_prefix(run.state.params["backbone"], (k,))  # members stacked on axis 0


def test_bf16_step_with_the_cpu_kernels(fast_compile):
  # bf16 compute with the CPU kernels ("auto": dot_vjp, shifted depthwise, fused BN) under XLA's
  # cheap pipeline, as bench/accelerator.py --smoke runs it: XLA:CPU has no bf16 x bf16 -> f32
  # dot there, which the GEMM-form weight gradients must not ask for.
  losses = []
  for dtype in ("float32", "bfloat16"):
    c = configs.experiment("arcface_srv_fdp", "test")
    c.model.depthwise_impl = c.model.pointwise_impl = c.model.batchnorm_impl = "auto"
    c.model.dtype = dtype
    run = Run(c)
    m = run.step(0)
    chex.assert_tree_all_finite(run.state.params)
    losses.append(float(m["loss"]))
  # The loss (s * cosines through CE, ~10^2 here) from bf16 features: the gate of the
  # accelerator script's bf16 check (5%), not a rounding bound.
  assert abs(losses[1] - losses[0]) <= 5e-2 * abs(losses[0]), losses


def _params(workdir, c):
  state = train.load_state(c, workdir, 30)
  return jax.device_get((state.params, state.batch_stats, state.opt_state))


def test_resume_is_bit_identical(tmp_path, fast_compile):
  c = configs.experiment("arcface_srv_fdp", "test")
  c.model.head = "bn_dropout_fc_bn"  # exercises the per-step dropout key too
  c.train.steps, c.train.checkpoint_every = 4, 2
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  sa = train.train_and_evaluate(c, a, progress=False)
  assert train.train_and_evaluate(c, b, stop_after=3, progress=False)["stopped"]
  sb = train.train_and_evaluate(c, b, progress=False)
  assert sb["resumed_from"] == 2 and sa["resumed_from"] == 0
  chex.assert_trees_all_equal(_params(a, c), _params(b, c))  # bit for bit
  assert sa["final_loss"] == sb["final_loss"]
  with open(os.path.join(b, "metrics.jsonl")) as f:
    assert [json.loads(l)["step"] for l in f] == [1, 2, 3, 4]
  with open(os.path.join(a, "summary.json")) as f:
    summary = json.load(f)
  for key in ("steps", "final_loss", "train_seconds", "img_per_s", "heldout_paper_accuracy"):
    assert key in summary
  assert 0.0 <= summary["heldout_paper_accuracy"] <= 1.0


ONE_STEP = textwrap.dedent("""
    import sys, jax, numpy as np
    from faceens import configs, train
    c = configs.experiment("arcface_srv_fdp", "test")
    c.train.batch_size = 8
    run = train.setup(c)
    init = jax.tree.leaves(jax.device_get((run.state.params, run.state.batch_stats)))
    m = jax.device_get(run.step())
    leaves = jax.tree.leaves(jax.device_get((run.state.params, run.state.batch_stats)))
    np.savez(sys.argv[1], n=jax.device_count(), loss=m["loss"], *leaves,
             n_params=len(jax.tree.leaves(run.state.params)),
             **{f"init_{i}": a for i, a in enumerate(init)})
""")


def test_four_simulated_devices_equal_one(tmp_path):
  outs = run_on_simulated_devices(ONE_STEP, (1, 4), tmp_path)
  assert int(outs[1]["n"]) == 1 and int(outs[4]["n"]) == 4
  # Bounds from the arithmetic: sharding changes the order of the batch reductions (BatchNorm's
  # statistics, the gradients' sums), so features differ by float32 rounding, ~eps * sqrt(n) per
  # layer (random walk; n up to the stem's 8 * 16 * 16 positions) over ~20 layers: `rel`,
  # relative to unit-norm features and to each leaf's update; the loss sees it through the
  # logits' scale s.
  eps = float(np.finfo(np.float32).eps)
  rel = float32_rounding(20, 8 * 16 * 16)
  np.testing.assert_allclose(outs[4]["loss"], outs[1]["loss"], rtol=0, atol=64.0 * rel)
  keys = [k for k in outs[1].files if k.startswith("arr_")]
  assert len(keys) > 10
  # The step moves each leaf by a sum over the batch whose terms can cancel (a BatchNorm bias
  # feeding another BatchNorm moves by rounding alone), so the size of those terms is bounded by
  # the largest move among the parameters (and among the running statistics, for those):
  # sharding may change a move by `rel` of that, and adding it to the old value rounds by eps.
  n_params = int(outs[1]["n_params"])
  moves = [float(np.abs(outs[1][k] - outs[1][f"init_{i}"]).max()) for i, k in enumerate(keys)]
  for i, k in enumerate(keys):
    a, b, a0 = outs[1][k], outs[4][k], outs[1][f"init_{i}"]
    np.testing.assert_array_equal(outs[4][f"init_{i}"], a0)  # the same start
    scale = max(moves[:n_params]) if i < n_params else max(moves[n_params:])
    np.testing.assert_allclose(b, a, rtol=2 * eps, atol=rel * scale, err_msg=k)


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
def test_member_updates_are_independent(clip_norm, fast_compile):
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
    # float32: a norm of 27 squares (~(n / 2 + 2) eps worst case, with the square root), a divide
    # and a multiply: (n + 4) eps bounds it.
    rtol = (27 + 4) * float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(out["backbone"]["a"][k], g["backbone"]["a"][k] * scale, rtol=rtol)
    np.testing.assert_allclose(out["backbone"]["b"][k], g["backbone"]["b"][k] * scale, rtol=rtol)
  np.testing.assert_array_equal(out["head"], g["head"])  # class weights are never clipped


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


def test_training_on_a_faces_emore_directory(tmp_path, fast_compile):
  from faceens import configs, train
  emore = str(tmp_path / "emore")
  pack_rec.pack_folder(ORL, emore, size=32, progress=False)
  rel = os.path.relpath(ORL, tmp_path)
  lines = [f"{rel}/s3{i}/1.pgm {rel}/s3{i}/2.pgm 1\n{rel}/s3{i}/1.pgm {rel}/s3{i + 1}/1.pgm 0" for i in range(5)]
  (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
  pack_bin.pack_pairs(str(tmp_path / "pairs.txt"), os.path.join(emore, "lfw.bin"), size=32)
  c = configs.experiment("arcface_srv_fdp", "test")
  c.data.kind, c.data.root = "ms1mv2", emore
  c.train.steps, c.train.eval_every = 2, 1
  s = train.train_and_evaluate(c, str(tmp_path / "w"), progress=False)
  assert s["steps"] == 2 and np.isfinite(s["final_loss"]) and "lfw" in s["eval"]
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    assert any("eval/lfw/accuracy" in json.loads(l) for l in f)


def test_train_on_lfw_layout_and_evaluate_on_unseen_folds(tmp_path):
  from faceens import configs, train
  root = make_lfw(tmp_path / "lfw", PEOPLE4, PAIRS4)
  c = configs.experiment("arcface_single", "lfw")
  configs.validate(c)
  assert (c.data.kind, tuple(c.data.crop), c.data.lfw_test_folds) == ("lfw", (70, 70, 110, 110),
                                                                      (6, 7, 8, 9, 10))
  c.data.root, c.data.lfw_test_folds = root, (3, 4)
  c.data.image_size, c.model.width, c.model.blocks, c.model.embedding_dim = 32, 0.125, (1, 1, 1, 1), 16
  c.train.batch_size, c.train.steps, c.train.checkpoint_every = 8, 2, 2
  source, held = train.load_datasets(c)
  assert source.classes == ["Ann", "Bob", "Cat", "Dan", "Eve", "Fay"] and len(source) == 14
  summary = train.train_and_evaluate(c, str(tmp_path / "run"), progress=False)
  assert set(summary["eval"]) == {"lfw_test"}
  with open(tmp_path / "run" / "eval.json") as f:
    import json
    r = json.load(f)["datasets"]["lfw_test"]
  assert r["pairs"] == 4 and r["folds"] == "official"
  c.data.root = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="LFW not found at .*nowhere"):
    train.load_datasets(c)


def test_training_logs_periodic_and_final_evaluation(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  # One record shape: {"step", "<group>/<name>": float}; training rows every step (log_every 1).
  assert all(isinstance(v, float) for l in lines for k, v in l.items() if k != "step")
  assert [l["step"] for l in lines if "train/loss" in l] == [1, 2, 3]
  evals = [l for l in lines if "eval/heldout/accuracy" in l]
  assert [l["step"] for l in evals] == [2]
  assert 0 <= evals[0]["eval/heldout/accuracy"] <= 1
  assert {"eval/heldout/member_accuracy/0", "eval/heldout/paper_accuracy"} <= set(evals[0])
  # The same scalars as TensorBoard event files (TFRecord framing: length, crc, Event, crc).
  import glob
  import struct
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*")):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        scalars[(v.tag, event.step)] = v.simple_value
  for l in lines:
    for k, v in l.items():
      if k != "step":
        assert scalars[(k, l["step"])] == pytest.approx(v, rel=1e-6)  # stored as float32

  with open(os.path.join(run_dir, "eval.json")) as f:  # faceens.evaluate tests rewrite its sets
    assert json.load(f)["step"] == 3
  with open(os.path.join(run_dir, "summary.json")) as f:
    s = json.load(f)
  assert s["heldout_pairs"] == 900
  assert s["heldout_paper_accuracy"] == s["eval"]["heldout"]["paper_accuracy"]
