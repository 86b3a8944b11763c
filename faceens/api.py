"""Embedding API of a trained run: ``faceens.load(workdir)``.

    model = faceens.load("runs/demo")
    emb = model.embed(images)                # uint8 [B, H, W(, 3)] of any size -> [B, d]
    emb0 = model.embed(images, member=0)     # member 0's normalised feature
    f = model.embedding_fn()                 # jax function [B, S, S, 3] in [0, 1] -> [B, d]

Pixels: uint8 arrays are resized to the model input exactly as the training data was
(``config.data.fit`` and ``config.data.crop``); float arrays must already be ``[B, S, S, 3]`` in
[0, 1] (what the attacks produce) and are used as they are. Inside, pixels become ``(x - 0.5) / 0.5``, the training
normalisation.

Embeddings: member k's is ``f_k(x) / ||f_k(x)||``; the ensemble's (``member=None``) is Amada et
al.'s ``E(x) = mean_k f_k(x) / ||f_k(x)||`` (not renormalised). ``flip=True`` gives InsightFace's
test-time flip ``normalise(e(x) + e(flip(x)))`` of the chosen embedding.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from PIL import Image

from faceens import configs, logs, models
from faceens.data.image_folder import fit_image, fit_spec
from faceens.models import ensemble
from faceens.verification import flip_embedding


class FaceModel:
  """A trained ensemble (or single model) as an embedding function."""

  def __init__(self, config, variables: dict, workdir: str | None = None, step: int | None = None,
               threshold_from: str | None = None):
    self.config = config
    self.variables = variables
    self.workdir = workdir
    self.step = step
    self.model = models.get_model(config)
    self.input_size = int(config.data.image_size)
    self.num_members = ensemble.num_members(variables)
    self.embedding_dim = int(config.model.embedding_dim)
    self._jit_apply = None
    # threshold: InsightFace's (squared L2 with flip), verify's; paper_threshold: Euclidean on
    # E(x) without flip, the attacks' goal; threshold_source: the evaluated set they come from.
    self.threshold, self.paper_threshold, self.threshold_source = _thresholds(
        workdir, threshold_from, step)

  def __repr__(self):
    return (f"FaceModel({self.config.loss.name}_{self.config.method}, K={self.num_members}, "
            f"input {self.input_size}px, d={self.embedding_dim}, step={self.step})")

  # ------------------------------------------------------------------ jax functions (pure)

  def member_variables(self, member=None):
    """Stacked variables of the ensemble (``None``) or of member ``k`` (a stack of one)."""
    if member is None:
      return self.variables
    if not isinstance(member, (int, np.integer)) or not 0 <= member < self.num_members:
      raise ValueError(f"member must be None (ensemble) or an integer in "
                       f"[0, {self.num_members - 1}], got {member!r}")
    return jax.tree.map(lambda v: v[member:member + 1], self.variables)

  def apply(self, variables, x):
    """Pure: ``(stacked variables, x [B, S, S, 3] in [0, 1]) -> normalised features [K, B, d]``."""
    f = ensemble.apply_members(self.model, variables, models.normalize_pixels(x),
                               strategy=self.config.ensemble.strategy)
    return ensemble.l2_normalize(f)

  def features_fn(self, member=None):
    """``x -> normalised features [K', B, d]`` with the variables bound (K' = 1 for a member)."""
    variables = self.member_variables(member)
    return lambda x: self.apply(variables, x)

  def embedding_fn(self, member=None):
    """``x [B, S, S, 3] in [0, 1] -> [B, d]`` with the variables bound; differentiable."""
    features = self.features_fn(member)
    return lambda x: ensemble.ensemble_embedding(features(x))

  # ------------------------------------------------------------------ numpy API

  def prepare(self, images) -> np.ndarray:
    """Images -> float32 ``[B, S, S, 3]`` in [0, 1] at the model's input size."""
    x = np.asarray(images)
    s = self.input_size
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"images must be [B, H, W] or [B, H, W, 3], got shape {np.shape(images)}")
    if x.dtype == np.uint8:
      if x.shape[1:] == (s, s, 3):
        return x.astype(np.float32) / 255.0
      mode = "L" if x.shape[-1] == 1 else "RGB"
      out = [fit_image(Image.fromarray(im[..., 0] if mode == "L" else im, mode), s,
                       fit_spec(self.config)) for im in x]
      return np.stack(out).astype(np.float32) / 255.0
    if np.issubdtype(x.dtype, np.floating):
      if x.shape[1:3] != (s, s):
        raise ValueError(f"float images must be at the model's input size {s}x{s} (got "
                         f"{x.shape[1]}x{x.shape[2]}); pass uint8 images to have them resized")
      if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1 or not np.isfinite(x).all()):
        raise ValueError("float images must be finite and in [0, 1]")
      if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
      return x.astype(np.float32)
    raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")

  def _compiled_apply(self):
    if self._jit_apply is None:
      self._jit_apply = jax.jit(self.apply)  # variables are an argument: one compile per shape
    return self._jit_apply

  def member_features(self, images, *, member=None, flip: bool = False, batch_size: int = 64,
                      progress: bool = False, desc: str = "embedding") -> np.ndarray:
    """Normalised features ``[K', B, d]`` (numpy), in fixed-size jitted batches."""
    x = self.prepare(images)
    if flip:
      x = np.ascontiguousarray(x[:, :, ::-1])
    fn = functools.partial(self._compiled_apply(), self.member_variables(member))
    outs = []
    with logs.progress(total=len(x), disable=not progress, unit="img", desc=desc,
                       leave=False) as bar:
      for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        pad = batch_size - len(chunk)
        if pad:
          chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        outs.append(np.asarray(fn(chunk))[:, :batch_size - pad])
        bar.update(batch_size - pad)
    if not outs:
      return np.zeros((self.num_members if member is None else 1, 0, self.embedding_dim),
                      np.float32)
    return np.concatenate(outs, axis=1)

  def embed(self, images, member=None, flip: bool = False, batch_size: int = 64,
            progress: bool = False) -> np.ndarray:
    """Embeddings ``[B, d]`` (see the module docstring)."""
    emb = ensemble.ensemble_embedding(self.member_features(
        images, member=member, batch_size=batch_size, progress=progress))
    if flip:
      emb_f = ensemble.ensemble_embedding(self.member_features(
          images, member=member, flip=True, batch_size=batch_size, progress=progress))
      emb = flip_embedding(emb, emb_f).astype(np.float32)
    return emb


class CombinedModel(FaceModel):
  """An ensemble of runs of different architectures (``faceens.import_model`` with several
  ``--arch``): E(x) is the mean of all their members' normalised features, one embedding
  function for evaluation and attacks like a trained ensemble. ``variables`` is a tuple with one
  stacked variables tree per run (``None`` for runs left out by ``member_variables``)."""

  def __init__(self, runs: list[FaceModel], workdir: str | None = None,
               threshold_from: str | None = None):
    if not runs:
      raise ValueError("a combined model needs at least one run")
    sizes = {(r.input_size, r.embedding_dim) for r in runs}
    if len(sizes) > 1:
      raise ValueError("the runs of a combined model need one input size and embedding size, got "
                       + ", ".join(f"{r.workdir}: {r.input_size}px, d={r.embedding_dim}"
                                   for r in runs))
    self.runs = list(runs)
    self.config = copy.deepcopy(runs[0].config)
    self.config.ensemble.num_members = sum(r.num_members for r in runs)
    self.variables = tuple(r.variables for r in runs)
    self.workdir = workdir
    self.step = 0
    self.model = None
    self.input_size, self.embedding_dim = runs[0].input_size, runs[0].embedding_dim
    self.num_members = int(self.config.ensemble.num_members)
    self._jit_apply = None
    self.threshold, self.paper_threshold, self.threshold_source = _thresholds(
        workdir, threshold_from, None)

  def __repr__(self):
    parts = ", ".join(f"{r.config.model.get('arch', 'mobilefacenet')} x{r.num_members}"
                      for r in self.runs)
    return f"CombinedModel({parts}, input {self.input_size}px, d={self.embedding_dim})"

  def member_variables(self, member=None):
    """All runs' variables (``None``), or member ``k``'s: its run's stack of one, ``None`` for
    the other runs."""
    if member is None:
      return self.variables
    if not isinstance(member, (int, np.integer)) or not 0 <= member < self.num_members:
      raise ValueError(f"member must be None (ensemble) or an integer in "
                       f"[0, {self.num_members - 1}], got {member!r}")
    out, first = [], 0
    for r in self.runs:
      local = member - first
      out.append(r.member_variables(int(local)) if 0 <= local < r.num_members else None)
      first += r.num_members
    return tuple(out)

  def apply(self, variables, x):
    """Pure: ``(tuple of stacked variables, x) -> normalised features [K, B, d]`` of every run
    whose variables are given, in run order."""
    return jnp.concatenate([r.apply(v, x) for r, v in zip(self.runs, variables) if v is not None],
                           axis=0)


COMBINED = "combined.json"


def _thresholds(workdir, threshold_from: str | None = None, step: int | None = None):
  """``(squared-L2 flip threshold, Euclidean no-flip threshold, source)`` of one evaluated set of
  ``workdir/eval.json``: ``threshold_from``, else the set recorded there as the default
  (``threshold_from``: the run's own validation set unless the user chose another), else for
  files written before that was recorded the first set; else the held-out threshold of
  ``summary.json``. ``source`` says which, and at which checkpoint step it was evaluated."""
  if not workdir:
    if threshold_from:
      raise ValueError("threshold_from needs a run directory with an eval.json")
    return None, None, None
  path = os.path.join(workdir, "eval.json")
  ev = {}
  if os.path.isfile(path):
    with open(path) as f:
      ev = json.load(f)
  sets = ev.get("datasets") or {}
  if threshold_from is not None and threshold_from not in sets:
    have = ", ".join(sets) or "none"
    raise ValueError(f"threshold_from={threshold_from!r}: {path} has no such evaluated set "
                     f"(evaluated: {have}); run python -m faceens.evaluate on it first")
  name = threshold_from or (ev.get("threshold_from") if ev.get("threshold_from") in sets
                            else next(iter(sets), None))
  if name is not None:
    d = sets[name]
    why = ("chosen" if threshold_from else "the recorded default" if ev.get("threshold_from")
           else "first set of an eval.json without a recorded default")
    at = d.get("step", ev.get("step"))
    source = f"eval.json:{name} ({why}, evaluated at step {at})"
    if step is not None and at is not None and at != step:
      source += f"; WARNING: the loaded checkpoint is step {step}"
    return d.get("threshold"), (d.get("paper") or {}).get("threshold"), source
  path = os.path.join(workdir, "summary.json")
  if os.path.isfile(path):
    with open(path) as f:
      s = json.load(f)
    # heldout_threshold: summaries written before the protocol was named in every key.
    return (None, s.get("heldout_paper_threshold", s.get("heldout_threshold")),
            "summary.json:heldout")
  return None, None, None


def _restore(checkpoint_dir: str, step: int | None):
  """``(step, state tree)`` of the latest (or ``step``) checkpoint, placed on this process's first
  device whatever the devices or processes that saved it."""
  mngr = ocp.CheckpointManager(checkpoint_dir)
  try:
    steps = mngr.all_steps()
  finally:
    mngr.close()
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {checkpoint_dir}")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} under {checkpoint_dir}; "
                            f"available: {sorted(steps)}")
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = lambda tree: jax.tree.map(  # noqa: E731
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)
  path = os.path.join(checkpoint_dir, str(step), "state")
  if not os.path.isdir(path):  # checkpoints written before the input pipeline was saved alongside
    path = os.path.join(checkpoint_dir, str(step), "default")
  handler = ocp.StandardCheckpointHandler()
  try:
    item = epath.Path(path)
    raw = handler.restore(item, args=ocp.args.StandardRestore(target(handler.metadata(item))))
  finally:
    handler.close()
  return step, raw


def load(workdir: str, step: int | None = None, threshold_from: str | None = None) -> FaceModel:
  """Loads the latest (or ``step``) checkpoint of a ``faceens.train`` run directory.

  Its thresholds (``threshold``, ``paper_threshold``) come from one evaluated set of
  ``eval.json``: ``threshold_from`` if given, else the run's recorded default (its own validation
  set); ``threshold_source`` names it."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"run directory {workdir!r} does not exist")
  if os.path.isfile(os.path.join(workdir, COMBINED)):
    path = os.path.join(workdir, COMBINED)
    if step is not None:
      raise ValueError(f"{workdir} is a combined model (one checkpoint per run): step is not "
                       "supported")
    try:
      with open(path) as f:
        names = json.load(f)["runs"]
      if not isinstance(names, list) or not all(isinstance(r, str) for r in names):
        raise TypeError
    except (ValueError, KeyError, TypeError):
      raise ValueError(f"{path} must be JSON {{\"runs\": [run folders relative to it]}}") from None
    runs = [load(os.path.join(workdir, r)) for r in names]
    return CombinedModel(runs, workdir=workdir, threshold_from=threshold_from)
  c = configs.load_run_config(workdir)
  ckpt = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(ckpt):
    raise FileNotFoundError(f"{ckpt} does not exist: the run has not saved a checkpoint yet")
  step, raw = _restore(ckpt, step)
  variables = {"params": raw["params"]["backbone"], "batch_stats": raw["batch_stats"]}
  variables = jax.tree.map(jnp.asarray, variables)
  return FaceModel(c, variables, workdir=workdir, step=int(step), threshold_from=threshold_from)
