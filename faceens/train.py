"""Training of K-member MobileFaceNet ensembles: ``python -m faceens.train --config=... --workdir=DIR``.

  python -m faceens.train --config=experiments/arcface_srv_fdp.py:demo --workdir=runs/srv_fdp
  python -m faceens.train --config=experiments/arcface_srv_fdp.py --config.data.root=faces_emore ...

One pure, jitted ``train_step(state, batch) -> (state, metrics)``; data parallel over every device
(``faceens.sharding``: batch sharded on the ``data`` axis, parameters replicated; XLA inserts
the gradient all-reduce and computes BatchNorm statistics over the global batch). Several
processes (``faceens.sharding.initialize_distributed``): ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` on every process, or ``--distributed`` where JAX detects the
cluster; each process reads its rows of every global batch.

Writes to DIR: ``checkpoints/`` (orbax; every ``train.checkpoint_every`` steps and at the end; a
restarted run resumes from the latest and ends bit-identical to an uninterrupted one),
``config.json``, ``metrics.jsonl`` (one record shape: ``{"step": N, "train/loss": ...}`` every
log step, ``{"step": N, "eval/<set>/accuracy": ...}`` after each evaluation), the same scalars as
TensorBoard event files in ``tensorboard/``, and ``summary.json``. Progress: a bar on a terminal,
a plain line every ``train.log_every`` steps in a log file (``faceens.logs``).
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: glibc reads its tunables at start (faceens.hostenv)
  from faceens import hostenv
  hostenv.reexec_with_hugepage_malloc()

import dataclasses
import json
import logging
import os
import time
from typing import Any

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp

from faceens import api, configs, evaluate, heads, logs, losses, models, provenance, sharding
from faceens.attacks import lots
from faceens.data import demo as demo_data
from faceens.data import image_folder
from faceens.data import lfw as lfw_data
from faceens.data import pipeline
from faceens.models import ensemble
from faceens.models.ensemble import l2_normalize


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any        # {"backbone": stacked [K, ...] params, "head": [d, n] (SRV) or [K, d, n]}
  batch_stats: Any   # stacked [K, ...]
  opt_state: Any
  rng: jax.Array     # raw uint32[2] key; dropout key of step t = fold_in(rng, t)


# ----------------------------------------------------------------------------- model & optimizer


def total_steps(c, steps_per_epoch: int) -> int:
  return int(c.train.steps) if c.train.steps > 0 else int(c.train.epochs * steps_per_epoch)


def learning_rate_schedule(c, num_steps: int):
  """Piecewise-constant decay at fractions ``optim.decay_at`` of training, optional linear warmup."""
  boundaries = {int(round(f * num_steps)): c.optim.decay_factor for f in c.optim.decay_at}
  sched = optax.piecewise_constant_schedule(c.optim.lr, boundaries)
  if c.optim.warmup_steps > 0:
    warm = optax.linear_schedule(0.0, c.optim.lr, c.optim.warmup_steps)
    sched = optax.join_schedules([warm, sched], [c.optim.warmup_steps])
  return sched


def clip_member_backbones(max_norm: float) -> optax.GradientTransformation:
  """Clips each member's backbone gradient to global norm ``max_norm``, independently.

  The gradient tree is ``{"backbone": leaves stacked [K, ...], "head": ...}``. Member k's norm is
  taken over slice k of every backbone leaf, and only slice k is scaled, so no member's gradient
  changes another's update (``optax.clip_by_global_norm`` over the whole tree would couple them).
  The class weights (``head``, shared by all members under SRV) are never clipped, as in
  arcface_torch, which clips its backbone only.
  """
  if not max_norm > 0:
    raise ValueError(f"clip_member_backbones needs max_norm > 0, got {max_norm}")

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates["backbone"])
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
             for g in leaves)                                             # [K]
    norm = jnp.sqrt(sq)
    scale = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)
    backbone = jax.tree.map(
        lambda g: (g * scale.reshape((-1,) + (1,) * (g.ndim - 1))).astype(g.dtype),
        updates["backbone"])
    return dict(updates, backbone=backbone), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(c, num_steps: int) -> optax.GradientTransformation:
  """The configured optimiser; members' updates are independent of each other (tested)."""
  sched = learning_rate_schedule(c, num_steps)
  parts = []
  if c.optim.clip_norm > 0:
    parts.append(clip_member_backbones(c.optim.clip_norm))
  if c.optim.name == "sgd":
    # PyTorch SGD semantics (what ArcFace uses): grad + wd * p, then momentum.
    parts += [optax.add_decayed_weights(c.optim.weight_decay),
              optax.sgd(sched, momentum=c.optim.momentum)]
  elif c.optim.name == "adam":
    parts += [optax.add_decayed_weights(c.optim.weight_decay), optax.adam(sched)]
  else:
    parts.append(optax.adamw(sched, weight_decay=c.optim.weight_decay))
  return optax.chain(*parts)


def create_train_state(c, num_classes: int, optimizer) -> TrainState:
  spec = losses.method_spec(c.method)
  model = models.get_model(c)
  key = jax.random.PRNGKey(c.seed)
  k_model, k_head, k_rng = jax.random.split(key, 3)
  sample = jnp.zeros((1, c.data.image_size, c.data.image_size, 3), jnp.float32)
  variables = ensemble.init_members(model, k_model, c.ensemble.num_members, sample)
  params = {
      "backbone": variables["params"],
      "head": heads.init_class_weights(k_head, c.ensemble.num_members, c.model.embedding_dim,
                                       num_classes, srv=spec.srv),
  }
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"], opt_state=optimizer.init(params),
                    rng=k_rng)


# ----------------------------------------------------------------------------- MTER (AdvT)


def craft_mter(apply_eval, pixels, target_features, c):
  """MTER's adversarial examples with the attack code (``faceens.attacks``): ``advt.iters``
  sign steps in [0, 1] pixel space pulling member 0's normalised feature towards
  ``target_features``, projected to the L_inf ball ``advt.epsilon`` around the source (BIM).

  ``apply_eval(x_normalised) -> [K, B, d]``.
  """
  tgt = jax.lax.stop_gradient(l2_normalize(target_features))
  features = lambda p: l2_normalize(apply_eval(models.normalize_pixels(p))[:1])  # noqa: E731
  cfg = lots.AttackConfig(method="bim", step_size=c.advt.step_size, epsilon=c.advt.epsilon,
                          max_iters=c.advt.iters)
  # Goal 0: no example is ever done, every example takes exactly advt.iters steps.
  goal = jnp.zeros(pixels.shape[:1], jnp.float32)
  x_adv, _, _ = lots.run_loop(lots.make_losses(features, tgt, "ensemble"), pixels, pixels, goal,
                              cfg, None)
  return jax.lax.stop_gradient(x_adv)


# ----------------------------------------------------------------------------- train step


def make_train_step(c, model: nn.Module, optimizer):
  """Returns the pure ``train_step(state, images_uint8, labels) -> (state, metrics)``."""
  loss_cfg = configs.loss_config(c)
  spec = losses.method_spec(c.method)
  strategy = c.ensemble.strategy

  def loss_fn(params, batch_stats, images, labels, rng):
    x = models.normalize_images(images)
    variables = {"params": params["backbone"], "batch_stats": batch_stats}
    feats, new_stats = ensemble.apply_members(model, variables, x, train=True, rng=rng,
                                              strategy=strategy)
    loss, aux = losses.ensemble_loss(feats, params["head"], labels, loss_cfg)
    if spec.adversarial:
      apply_eval = lambda z: ensemble.apply_members(model, variables, z, strategy=strategy)  # noqa: E731

      def adv_features(x_adv):  # the second forward pass, in training mode
        f_adv, _ = ensemble.apply_members(model, variables, models.normalize_pixels(x_adv),
                                          train=True, rng=jax.random.fold_in(rng, 7919),
                                          strategy=strategy)
        return f_adv[0]

      term = losses.advt_loss(lambda p, t: craft_mter(apply_eval, p, t, c), adv_features,
                              images.astype(jnp.float32) / 255.0, feats[0], labels,
                              c.advt.margin, c.advt.weight)
      loss = loss + term
      aux = dict(aux, reg=-term)
    return loss, (aux, new_stats)

  def train_step(state: TrainState, images, labels):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (aux, new_stats)), grads = grad_fn(state.params, state.batch_stats, images, labels, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # 1 when the loss, the gradient and the new state are finite: no checkpoint is saved otherwise.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_all_finite(params)
              & tree_all_finite(new_stats))
    metrics = {"loss": loss, "ce": aux["ce"], "reg": aux["reg"], "accuracy": aux["accuracy"],
               "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def tree_all_finite(tree) -> jax.Array:
  """True when every element of every leaf is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ----------------------------------------------------------------------------- data


MS1MV2_HELP = (
    "MS1MV2 (InsightFace 'faces_emore': train.rec, train.idx, property, lfw.bin, cfp_fp.bin, "
    "agedb_30.bin) is expected in the directory given by --config.data.root. Download it from "
    "InsightFace's dataset page (recognition/_datasets_) and unpack it there. To try faceens "
    "without it, run the ':demo' variant, which trains on the bundled ORL faces, e.g. "
    "python -m faceens.train --config=experiments/arcface_srv_fdp.py:demo --workdir=runs/demo")


def load_datasets(c):
  """``(training source, held-out FaceSet or None)`` for the configured data.

  The training source is random-access (``faceens.data.pipeline``): the ORL / image folder read
  lazily, or InsightFace's ``train.rec`` for ``ms1mv2``.
  """
  fit, skip = image_folder.fit_spec(c), c.data.skip_bad
  if c.data.kind == "orl":
    root = c.data.root or demo_data.orl_root()
    train = pipeline.ImageFolderSource(root, demo_data.TRAIN_IDENTITIES, skip)
    held = image_folder.load_image_folder(root, c.data.image_size, fit,
                                          demo_data.HELDOUT_IDENTITIES, skip)
    return train, held
  if c.data.kind == "image_folder":
    if not c.data.root:
      raise ValueError("config field data.root is empty; set --config.data.root=DIR with "
                       "DIR/<identity>/<image>.{jpg,png,pgm}")
    train = pipeline.ImageFolderSource(c.data.root, skip_bad=skip)
    held = (image_folder.load_image_folder(c.data.heldout_root, c.data.image_size, fit,
                                           skip_bad=skip) if c.data.heldout_root else None)
    return train, held
  if c.data.kind == "tfds":
    return tfds_source(c), None
  if c.data.kind == "lfw":
    if not c.data.root or not os.path.isdir(c.data.root):
      raise FileNotFoundError(
          f"LFW not found at {c.data.root or '(data.root is not set)'}: set "
          "--config.data.root=DIR with DIR/images/<Name>/<Name>_NNNN.jpg and the official "
          "DIR/pairs.txt (LFW as distributed by UMass, vis-www.cs.umass.edu/lfw)")
    people = lfw_data.training_identities(c.data.root, [f - 1 for f in c.data.lfw_test_folds])
    return pipeline.ImageFolderSource(lfw_data.images_dir(c.data.root), people, skip), None
  root = c.data.root
  rec = os.path.join(root, "train.rec") if root else ""
  if not root or not os.path.exists(rec):
    where = f"'{root}'" if root else "(data.root is not set)"
    raise FileNotFoundError(f"MS1MV2 training data not found at {where}. {MS1MV2_HELP}")
  train = pipeline.RecordIOSource(rec)
  if train.num_classes is None:
    raise image_folder.DataError(f"{os.path.join(root, 'property')} is missing; it gives the "
                                 "number of identities ('num_classes,112,112')")
  return train, None


# ----------------------------------------------------------------------------- evaluation


def tfds_source(c):
  """The ``train`` split of a prepared TFDS dataset (``data.tfds_name`` under ``data.root``)."""
  try:
    import tensorflow_datasets as tfds

    import faceens.data.tfds  # noqa: F401  (registers the builders)
  except ImportError as e:
    raise ValueError(f"data.kind=tfds needs tensorflow-datasets: pip install -e '.[tfds]' ({e})") from None
  try:
    builder = tfds.builder(c.data.tfds_name, data_dir=c.data.root or None)
    src = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  except Exception as e:  # tfds raises many types for "not prepared"
    raise FileNotFoundError(f"TFDS dataset {c.data.tfds_name!r} is not prepared under "
                            f"{c.data.root or '~/tensorflow_datasets'}: {e}") from None
  source = pipeline.TFDSSource(src, c.data.tfds_name)
  num_classes = builder.info.metadata.get("num_classes") if builder.info.metadata else None
  if not num_classes:
    raise image_folder.DataError(f"TFDS dataset {c.data.tfds_name!r} has no num_classes in its "
                                 "metadata (build it with faceens.data.tfds from a directory "
                                 "holding faces_emore's property file)")
  source.num_classes = int(num_classes)
  return source


def make_pipeline(c, source):
  """The grain pipeline of this host's batches for ``source`` (``faceens.data.pipeline``)."""
  return pipeline.build(
      source, global_batch=c.train.batch_size, image_size=c.data.image_size, seed=c.seed,
      fit=image_folder.fit_spec(c), flip=c.data.flip, max_shift=c.data.max_shift,
      contrast=c.data.contrast, brightness=c.data.brightness, skip_bad=c.data.skip_bad,
      workers=pipeline.worker_count(c.data.workers), read_threads=c.data.read_threads,
      prefetch=c.data.prefetch)


def run_evaluation(c, face_model, state: TrainState, sets) -> dict:
  """``faceens.evaluate`` metrics of the current state on ``sets``."""
  face_model.variables = _variables(state)
  return evaluate.evaluate_model(face_model, sets)


def heldout_summary(results: dict) -> dict:
  """summary.json's ``heldout_*`` keys from the ``heldout`` evaluation; every accuracy names its
  protocol. ``paper``: Amada et al.'s, Euclidean distance between ensemble embeddings (mean of
  normalised member features), no flip; ``insightface``: InsightFace's, flip, squared L2;
  ``heldout_member_paper_accuracy``: each member alone (paper protocol).
  """
  r = results["heldout"]
  return {"heldout_paper_accuracy": r["paper"]["accuracy"],
          "heldout_paper_accuracy_std": r["paper"]["accuracy_std"],
          "heldout_paper_threshold": r["paper"]["threshold"],
          "heldout_paper_roc_auc": r["paper"]["roc_auc"],
          "heldout_insightface_accuracy": r["accuracy"],
          "heldout_member_paper_accuracy": [m["paper"]["accuracy"] for m in r["members"]],
          "heldout_pairs": r["pairs"]}


# ----------------------------------------------------------------------------- loop


class NonFiniteLossError(FloatingPointError):
  pass


def _non_finite_error(m: dict, done: int, c, last_good: int | None) -> NonFiniteLossError:
  kept = (f"the last good checkpoint (step {last_good}) is kept and a restart resumes from it"
          if last_good is not None else "no checkpoint was saved")
  return NonFiniteLossError(
      f"training became non-finite at step {done} (loss={float(m['loss'])}, ce={float(m['ce'])}, "
      f"reg={float(m['reg'])}, grad_norm={float(m['grad_norm'])}); {kept}. Lower optim.lr "
      f"(now {c.optim.lr}) or the regulariser weight (adp.beta / fdp.gamma), set "
      "optim.clip_norm (per-member backbone clipping), or check the input data")


def _checkpoint_manager(workdir: str, c):
  options = ocp.CheckpointManagerOptions(save_interval_steps=c.train.checkpoint_every,
                                         max_to_keep=c.train.keep_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def restore_or_init(mngr, state: TrainState, data_iter=None) -> TrainState:
  """The latest checkpointed state (and, given ``data_iter``, its input-pipeline position)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  # Newest first; a non-finite checkpoint (written by an older faceens) is skipped with a warning.
  for step in sorted(mngr.all_steps(), reverse=True):
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))["state"]
    if not bool(tree_all_finite((restored.params, restored.batch_stats))):
      logging.warning("checkpoint at step %d holds non-finite parameters: deleted, trying an "
                      "earlier one", step)
      mngr.delete(step)  # the run will save this step again
      continue
    logging.info("resumed from checkpoint at step %d", step)
    return restored
  if mngr.all_steps():
    raise NonFiniteLossError(f"every checkpoint in {mngr.directory} holds non-finite parameters; "
                             "move them away to start again")
  return state


def _truncate_metrics(path: str, step: int) -> None:
  """Drops metric lines logged after the checkpoint a resumed run restarts from."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
  with open(path, "w") as f:
    f.writelines(lines)


@dataclasses.dataclass
class Setup:
  """Everything a run holds before its first step (``setup``): data, model, state, step."""
  c: ml_collections.ConfigDict
  train_set: Any
  held: Any
  data_iter: Any
  num_steps: int
  model: nn.Module
  mesh: Any
  state: TrainState
  step_fn: Any
  eval_sets: list
  face_model: Any                   # api.FaceModel bound to the state, or None without eval sets
  mngr: Any = None                  # orbax CheckpointManager; None without a workdir
  start: int = 0                    # the step training resumes from

  def next_batch(self):
    """The next global batch, placed on the mesh."""
    images, labels = next(self.data_iter)
    return sharding.put_batch(self.mesh, images, labels)

  def step(self):
    """One training step; the (device) metrics."""
    self.state, metrics = self.step_fn(self.state, *self.next_batch())
    return metrics


def setup(c: ml_collections.ConfigDict, workdir: str | None = None) -> Setup:
  """Validates ``c`` and builds a run: data pipeline, model, optimizer, sharded state and step,
  evaluation sets; with ``workdir``, the checkpoint manager and the state restored from it."""
  configs.validate(c)
  train_set, held = load_datasets(c)
  if c.train.batch_size > len(train_set):
    raise ValueError(f"config field train.batch_size = {c.train.batch_size} exceeds the "
                     f"{len(train_set)} training images")
  mesh = sharding.make_mesh()
  if c.train.batch_size % mesh.size:
    raise ValueError(f"config field train.batch_size = {c.train.batch_size} must be divisible "
                     f"by the number of devices ({mesh.size})")
  data_iter = iter(make_pipeline(c, train_set))
  num_steps = total_steps(c, pipeline.steps_per_epoch(train_set, c.train.batch_size))
  optimizer = make_optimizer(c, num_steps)
  model = models.get_model(c)
  # Replicated before a restore: orbax then restores straight into the mesh's sharding, which
  # every process can address (a restored single-device array is not, with several processes).
  state = sharding.replicate(create_train_state(c, train_set.num_classes, optimizer), mesh)
  mngr = None
  if workdir is not None:
    mngr = _checkpoint_manager(workdir, c)
    state = restore_or_init(mngr, state, data_iter)
  start = int(state.step)
  step_fn = sharding.shard_train_step(make_train_step(c, model, optimizer), mesh, state)
  eval_sets = evaluate.run_sets(
      c, held, c.data.heldout_root or c.data.root or "bundled ORL s31-s40")
  if c.train.eval_every and not eval_sets:
    raise ValueError(f"config field train.eval_every = {c.train.eval_every} needs evaluation "
                     "pairs: data.kind=orl, image_folder with data.heldout_root, or ms1mv2 with "
                     "lfw.bin / cfp_fp.bin / agedb_30.bin in data.root")
  face_model = api.FaceModel(c, _variables(state)) if eval_sets else None
  return Setup(c, train_set, held, data_iter, num_steps, model, mesh, state, step_fn, eval_sets,
               face_model, mngr, start)


def _variables(state: TrainState) -> dict:
  return {"params": state.params["backbone"], "batch_stats": state.batch_stats}


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
                       progress: bool = True) -> dict:
  """Trains (resuming from ``workdir`` if it holds checkpoints), evaluates, writes summary.json.

  ``stop_after``: stop after this many steps as if the process were killed (for resume tests):
  nothing is saved beyond the regular checkpoints and no summary is written.
  """
  os.makedirs(workdir, exist_ok=True)
  run = setup(c, workdir)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if sharding.is_main_process():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=2))
    _truncate_metrics(metrics_path, run.start)
    if progress:
      _print_start(run)
  writer = logs.MetricWriter(workdir, enabled=sharding.is_main_process())
  try:
    t_loop = time.perf_counter()
    log = train_loop(run, writer, stop_after=stop_after, progress=progress)
    if log is None:
      return {"steps": int(run.state.step), "stopped": True}
    del run.data_iter  # stops grain's worker processes and frees their shared memory
    return finish(run, workdir, log, time.perf_counter() - t_loop)
  finally:
    writer.close()


def _print_start(run: Setup) -> None:
  c, n = run.c, _backbone_params(run.state)
  print("method=%s loss=%s K=%d backbone params=%.2fM (%.2fM per member) train images=%d "
        "classes=%d steps=%d (from %d) devices=%d" % (
            c.method, c.loss.name, c.ensemble.num_members, n / 1e6,
            n / 1e6 / c.ensemble.num_members, len(run.train_set), run.train_set.num_classes,
            run.num_steps, run.start, run.mesh.size), flush=True)


def _backbone_params(state: TrainState) -> int:
  return int(sum(x.size for x in jax.tree.leaves(state.params["backbone"])))


@dataclasses.dataclass
class _Log:
  """What the loop measured: the last logged metrics and the steady-state throughput."""
  last: dict = dataclasses.field(default_factory=dict)
  steady_images: int = 0
  steady_time: float = 0.0


def train_loop(run: Setup, writer: logs.MetricWriter, *, stop_after: int | None = None,
               progress: bool = True) -> _Log | None:
  """Steps ``run`` (from ``setup(c, workdir)``) to ``run.num_steps``: logs every ``train.log_every`` steps, evaluates every
  ``train.eval_every``, checkpoints every ``train.checkpoint_every`` (never a non-finite state).
  Returns None when stopped early by ``stop_after``."""
  c, mngr, is_main = run.c, run.mngr, sharding.is_main_process()
  schedule = learning_rate_schedule(c, run.num_steps)
  bar = logs.progress(total=run.num_steps, initial=run.start, disable=not (progress and is_main),
                      unit="step", desc=f"{c.loss.name}_{c.method}", every=c.train.log_every)
  log, t_window, n_window, compiled = _Log(), time.perf_counter(), 0, False
  metrics = None
  for step in range(run.start, run.num_steps):
    prev_metrics, metrics = metrics, run.step()
    if prev_metrics is not None:
      # At most two steps in flight: the host prepares batch t + 1 while step t runs, and the
      # progress bar and ETA follow real compute rather than asynchronous dispatch.
      jax.block_until_ready(prev_metrics)
    n_window += c.train.batch_size
    done = step + 1
    if not compiled:  # the first step's time is compilation: not counted in img/s
      jax.block_until_ready(metrics)
      compiled, t_window, n_window = True, time.perf_counter(), 0
    is_log = done % c.train.log_every == 0 or done == run.num_steps
    will_save = done == run.num_steps or mngr.should_save(done)
    if is_log or will_save:
      m = jax.device_get(metrics)
      if not m["finite"]:  # never log or checkpoint a non-finite state: every resume would load it
        _close_quietly(mngr, bar)
        raise _non_finite_error(m, done, c, mngr.latest_step())
    if is_log:
      now = time.perf_counter()
      ips = n_window / max(now - t_window, 1e-9) if n_window else None  # None: not measured
      log.steady_images, log.steady_time = log.steady_images + n_window, log.steady_time + (
          now - t_window if n_window else 0.0)
      t_window, n_window = now, 0
      log.last = {k: float(v) for k, v in m.items() if k != "finite"}
      writer.write(done, {"train": {"lr": float(schedule(step)), "img_per_s": ips, **log.last}})
      bar.set_postfix(loss=f"{log.last['loss']:.3f}", ce=f"{log.last['ce']:.3f}",
                      reg=f"{log.last['reg']:.3f}", acc=f"{log.last['accuracy']:.2f}",
                      img_s="n/a" if ips is None else f"{ips:.1f}")
    if c.train.eval_every and done % c.train.eval_every == 0 and done != run.num_steps:
      _evaluate_during_training(run, done, writer, bar if progress and is_main else None)
    bar.update(1)
    if will_save:
      mngr.save(done, args=_save_args(run.state, run.data_iter), force=(done == run.num_steps))
    if stop_after is not None and done >= stop_after:
      _close_quietly(mngr, bar)
      return None
  _close_quietly(mngr, bar)
  return log


def _evaluate_during_training(run: Setup, done: int, writer: logs.MetricWriter, bar) -> None:
  results = run_evaluation(run.c, run.face_model, run.state, run.eval_sets)
  writer.write(done, {"eval": {
      name: {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"],
             "roc_auc": r["roc_auc"], "paper_accuracy": r["paper"]["accuracy"],
             "member_accuracy": [m["accuracy"] for m in r["members"]]}
      for name, r in results.items()}})
  if bar is not None:
    bar.write(f"step {done}: " + ", ".join(
        f"{n} accuracy {r['accuracy']:.4f} (paper {r['paper']['accuracy']:.4f})"
        for n, r in results.items()))


def finish(run: Setup, workdir: str, log: _Log, train_seconds: float) -> dict:
  """The final evaluation (``eval.json``) and ``summary.json``; returns the summary."""
  c, last = run.c, log.last
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if not last and os.path.exists(metrics_path):  # already finished: report the logged end
    with open(metrics_path) as f:
      lines = [json.loads(l) for l in f if l.strip()]
    # train/<name> records (older runs: flat training rows).
    lines = [{k.removeprefix("train/"): v for k, v in l.items()} for l in lines
             if "train/loss" in l or "loss" in l]
    last = {k: v for k, v in lines[-1].items() if k not in ("step", "lr", "img_per_s")} if lines else {}
  summary = {
      "method": c.method, "loss": c.loss.name, "variant": c.variant,
      "num_members": c.ensemble.num_members, "steps": run.num_steps, "resumed_from": run.start,
      "final_loss": last.get("loss", float("nan")), "final_ce": last.get("ce", float("nan")),
      "final_reg": last.get("reg", float("nan")), "final_train_accuracy": last.get("accuracy"),
      "train_seconds": train_seconds,
      "img_per_s": log.steady_images / log.steady_time if log.steady_time > 0 else float("nan"),
      "backbone_params": _backbone_params(run.state), "devices": int(run.mesh.size),
      "backend": jax.default_backend(), "heldout_paper_accuracy": None,
      "provenance": provenance.record(),
  }
  is_main = sharding.is_main_process()
  if run.eval_sets:
    results = run_evaluation(c, run.face_model, run.state, run.eval_sets)
    if "heldout" in results:
      summary.update(heldout_summary(results))
    summary["eval"] = {n: {"insightface_accuracy": r["accuracy"],
                           "paper_accuracy": r["paper"]["accuracy"]}
                       for n, r in results.items()}
    if is_main:
      evaluate.write_eval_json(workdir, c, int(run.state.step), run.face_model.num_members, results)
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def _close_quietly(mngr, bar) -> None:
  """Waits for pending checkpoint writes, then closes the manager and the progress bar."""
  mngr.wait_until_finished()
  mngr.close()
  bar.close()


def _save_args(state, data_iter=None):
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  return ocp.args.Composite(**items)


def load_state(c, workdir: str, num_classes: int) -> TrainState:
  """The latest checkpointed state of a run (for evaluation and tests)."""
  optimizer = make_optimizer(c, max(1, total_steps(c, 1)))
  state = create_train_state(c, num_classes, optimizer)
  mngr = _checkpoint_manager(workdir, c)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
  state = restore_or_init(mngr, state)
  mngr.close()
  return state


# ----------------------------------------------------------------------------- CLI


def _print_summary(summary: dict, workdir: str) -> None:
  keys = ["method", "loss", "num_members", "steps", "final_loss", "train_seconds", "img_per_s",
          "heldout_paper_accuracy", "heldout_insightface_accuracy",
          "heldout_member_paper_accuracy"]
  print("\n" + "=" * 60)
  for k in keys:
    v = summary.get(k)
    if isinstance(v, float):
      v = f"{v:.4f}"
    elif isinstance(v, list):
      v = "[" + ", ".join(f"{x:.4f}" for x in v) + "]"
    print(f"{k:>30}: {v}")
  for name, r in (summary.get("eval") or {}).items():
    print(f"{'eval ' + name:>30}: accuracy {r['insightface_accuracy']:.4f} (InsightFace), "
          f"{r['paper_accuracy']:.4f} (paper)")
  print(f"{'files':>30}: " + ", ".join(os.path.join(workdir, f) for f in
                                     ("summary.json", "eval.json", "metrics.jsonl", "config.json",
                                      "checkpoints/")))
  print("=" * 60)


def main(argv):
  del argv
  from absl import flags
  try:
    c = flags.FLAGS.config
    c.get("method")  # a config file that failed to load raises on first use
  except OSError as e:
    raise _config_file_error(e) from None
  if flags.FLAGS.print_config:  # before joining any multi-process run
    print("\n".join(f"{k} = {v!r}" for k, v in configs.flat_fields(c)))
    return
  FLAGS = sharding.initialize_job()  # noqa: N806
  if not FLAGS.workdir:
    raise SystemExit("error: --workdir is required (the run's output folder), e.g. "
                     "--workdir=runs/demo")
  try:
    summary = train_and_evaluate(c, FLAGS.workdir)
  except (ValueError, FileNotFoundError, NotImplementedError, image_folder.DataError,
          NonFiniteLossError) as e:
    raise SystemExit(f"error: {e}") from None
  if sharding.is_main_process():
    _print_summary(summary, FLAGS.workdir)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", None, "experiments/<loss>_<method>.py[:variant] (a file, or the name of an "
      "experiment shipped with faceens, e.g. arcface_srv_fdp:demo); fields are overridden with "
      "--config.<field>=<value>, --print_config lists them", lock_config=True)
  flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, summary)")
  flags.DEFINE_bool("print_config", False, "print every config field with its value (after the "
                    "--config.<field> overrides) and exit")
  sharding.define_distributed_flags()
  flags.adopt_module_key_flags(sharding)  # the distributed flags in --help
  flags.mark_flags_as_required(["config"])


def parse_flags(argv):
  """absl's flag parsing, with a one-line error for a mistyped config override or config file
  (ml_collections raises ``AttributeError`` / ``OSError`` from deep inside for those)."""
  from absl import flags
  argv = list(argv)
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      argv[i] = "--config=" + configs.resolve_config_path(a[len("--config="):])
    elif a == "--config" and i + 1 < len(argv):
      argv[i + 1] = configs.resolve_config_path(argv[i + 1])
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Traceback" in text:  # config_flags puts the config file's traceback in the message
      lines = [l.strip() for l in text.splitlines() if l.strip()]
      text = f"{lines[0]} {lines[-1]}"
    raise SystemExit(f"error: {text}") from None
  except (AttributeError, KeyError) as e:
    # ml_collections: "'gama'\nDid you mean \"gamma\" instead of \"gama\"?", repr-quoted.
    text = str(e.args[0]) if e.args else str(e)
    while text[:1] in "'\"" and text[-1:] == text[:1] and len(text) > 1:
      text = text[1:-1].encode().decode("unicode_escape")
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    field = lines[0].strip("'\"") if lines else "?"
    arg = next((a for a in argv[1:] if a.startswith("--config.") and field in a), "--config.?")
    hint = f" {lines[1]}" if len(lines) > 1 else ""
    raise SystemExit(f"error: {arg.split('=')[0]}: the config has no field {field!r}.{hint} "
                     "(--print_config lists the fields and their values)") from None
  except OSError as e:
    raise _config_file_error(e) from None
  except ValueError as e:  # raised by the experiment's get_config (e.g. an unknown variant)
    raise SystemExit(f"error: --config: {e}") from None


def _config_file_error(e: OSError) -> SystemExit:
  cause = e.__cause__ or e
  lines = [l.strip() for l in str(cause).splitlines() if l.strip()]
  detail = lines[-1] if lines else str(cause)
  return SystemExit(f"error: --config could not be loaded ({detail}); give an "
                    "experiments/<loss>_<method>.py[:variant] file, e.g. "
                    "--config=experiments/arcface_srv_fdp.py:demo")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main, flags_parser=parse_flags)
