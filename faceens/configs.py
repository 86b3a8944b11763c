"""The paper's training recipe, shared by every ``experiments/<loss>_<method>.py`` file, and its
validation.

``base_config(loss, variant)`` is everything an experiment does not choose itself: the network,
data, optimiser and schedule of Amada et al. ("Implementation Details"). Each experiment file
adds its method: ``c.method``, the number of members K and the settings of its diversity term or
adversarial training, each with the paper's reason beside it (the flax-examples pattern of a
default config plus overrides). ``experiment(name, variant)`` loads one by name.

Variants:

  * ``full``: the paper recipe: MS1MV2 112x112, MobileFaceNet with the BN-Dropout-FC-BN head,
    batch 256, 20 epochs, lr 1e-3 divided by 10 at epochs 12, 15, 18, s = 64, ArcFace m = 0.5 /
    CosFace m = 0.35. Days on one GPU.
  * ``demo``: the bundled ORL faces on a 2-core CPU in about 4 minutes (K = 3).
  * ``lfw``: LFW in its own layout (``--config.data.root=DIR``): people of folds 1-5 and in no
    pair train, the 3,000 pairs of folds 6-10 test; 3-10 minutes per model on a 2-core CPU
    (AdvT longer: every step crafts its examples).
  * ``test``: a few seconds; tiny widths and 32x32 inputs.

Hyper-parameter grids of the paper are plain overrides: ``--config.adp.beta=10``,
``--config.fdp.gamma=50``, ``--config.advt.margin=1.4``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import ml_collections

from faceens import heads, losses
from faceens.data import image_folder
from faceens.models import arcface_torch, batchnorm, depthwise, ensemble, mobilefacenet, pointwise

VARIANTS = ("full", "demo", "lfw", "test")
DATA_KINDS = ("orl", "image_folder", "ms1mv2", "tfds", "lfw")
OPTIMIZERS = ("sgd", "adam", "adamw")
# The experiment files, shipped inside the package (``experiments/`` at the top of a checkout
# links here, so the flagship command's ``--config=experiments/<name>.py`` works from a checkout).
EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent / "experiments"

# Paper margins (Amada et al. follow Wang et al. 2018 / Deng et al. 2019).
PAPER_MARGIN = {"arcface": 0.5, "cosface": 0.35}
# The method groups an experiment adds, and which methods use each.
METHOD_GROUPS = {"adp": ("alpha", "beta", "logits"), "fdp": ("gamma",),
                 "advt": ("margin", "iters", "step_size", "epsilon", "weight")}


def group(**fields) -> ml_collections.ConfigDict:
  """A config group, e.g. ``c.fdp = configs.group(gamma=10.0)``."""
  return ml_collections.ConfigDict(fields)


def uses_group(method: str, name: str) -> bool:
  """Whether ``method`` reads the config group ``name`` (``adp``, ``fdp`` or ``advt``)."""
  spec = losses.method_spec(method)
  return spec.adversarial if name == "advt" else spec.regularizer == name


def set_loss(c: ml_collections.ConfigDict, loss: str) -> ml_collections.ConfigDict:
  """The margin head ``loss`` with the paper's s = 64 and its margin m; returns ``c``."""
  if loss not in heads.LOSSES:
    raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(heads.LOSSES)}")
  c.loss.name = loss
  c.loss.margin = PAPER_MARGIN[loss]
  return c


def resolve_config_path(arg: str) -> str:
  """``--config`` as given, or, when that file does not exist, the experiment shipped with the
  package: ``experiments/arcface_srv_fdp.py:demo`` from any folder, or ``arcface_srv_fdp:demo``.
  The ``:variant`` suffix is kept."""
  path, sep, variant = arg.partition(":")
  if os.path.exists(path):
    return arg
  name = os.path.basename(path)
  name = name[:-3] if name.endswith(".py") else name
  shipped = EXPERIMENTS_DIR / f"{name}.py"
  return f"{shipped}{sep}{variant}" if shipped.is_file() else arg


def experiment(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of ``experiments/<name>.py``: ``experiment("arcface_fdp", "lfw")``."""
  path = EXPERIMENTS_DIR / f"{name}.py"
  if not path.is_file():
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*_*.py"))
    valid = ", ".join(names) or "none (the package was installed without its experiments/)"
    raise FileNotFoundError(f"no experiment {name!r} in {EXPERIMENTS_DIR}; valid: {valid}")
  spec = importlib.util.spec_from_file_location(f"faceens_experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def base_config(loss: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """The paper recipe with the ``loss`` margin head, before an experiment sets its method."""
  variant = variant or "full"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")

  c = ml_collections.ConfigDict()
  c.method = ""                     # set by the experiment: one of losses.METHODS
  c.variant = variant
  c.seed = 0

  c.loss = ml_collections.ConfigDict()
  c.loss.name = ""
  c.loss.scale = 64.0
  c.loss.margin = 0.0
  set_loss(c, loss)

  c.diversity = group(eps=1e-6)     # ridge in ADP/FDP's log det (Pang et al.)

  c.model = ml_collections.ConfigDict()
  c.model.arch = "mobilefacenet"    # or arcface_torch's mbf, r18 .. r100 (imported weights)
  c.model.scale = 2                 # arch=mbf: arcface_torch's width multiplier
  c.model.width = 1.0
  c.model.blocks = (1, 4, 6, 2)
  c.model.embedding_dim = 512
  c.model.head = "bn_dropout_fc_bn"  # the paper's; "gdc" is InsightFace mbf's
  c.model.dropout = 0.4
  c.model.depthwise_impl = "auto"   # shifted adds on CPU, native grouped conv on GPU/TPU; or fused
  c.model.pointwise_impl = "auto"   # 1x1 convs: a copy-free kernel gradient on CPU, dot elsewhere
  c.model.batchnorm_impl = "auto"   # conv blocks' BN + PReLU: a fused gradient on CPU, Flax's elsewhere
  c.model.dtype = "float32"         # "bfloat16": bf16 compute, fp32 parameters and loss

  c.ensemble = ml_collections.ConfigDict()
  c.ensemble.num_members = 3        # K = 3 in every ensemble of the paper; single models set 1
  c.ensemble.strategy = "auto"      # unrolled members on CPU, vmap on GPU/TPU

  c.data = ml_collections.ConfigDict()
  c.data.kind = "ms1mv2"
  c.data.root = ""                  # faces_emore directory (train.rec, train.idx, property)
  c.data.heldout_root = ""          # image_folder only: unseen identities for heldout_paper_accuracy
  c.data.tfds_name = "ms1mv2"       # kind=tfds: a prepared faceens.data.tfds dataset (root = data_dir)
  c.data.image_size = 112
  c.data.fit = "pad"
  # (top, left, height, width) cut out of every image before it is fitted (training, evaluation,
  # the embedding API and attacks alike); () = the whole image. Aligned 250x250 LFW: the face
  # is roughly the central 110x110 pixels.
  c.data.crop = ()
  c.data.flip = True
  c.data.max_shift = 0              # random translation (pixels), pad-and-crop augmentation
  c.data.contrast = 0.0             # random contrast factor in 1 +- contrast
  c.data.brightness = 0.0           # random brightness offset in +- brightness grey levels
  c.data.lfw_test_folds = (6, 7, 8, 9, 10)  # kind=lfw: official folds held out as the test
  c.data.skip_bad = False           # skip undecodable images (counted, warned) instead of failing
  c.data.workers = -1               # grain worker processes; -1: CPU cores - 1; 0: in-process
  c.data.read_threads = 4           # grain reader threads per process
  c.data.prefetch = 2               # batches buffered per worker

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"
  c.optim.lr = 1e-3                 # paper
  c.optim.momentum = 0.9            # ArcFace recipe (Deng et al.), which the paper follows
  c.optim.weight_decay = 5e-4       # ArcFace recipe
  c.optim.decay_at = (0.6, 0.75, 0.9)  # fractions of training: epochs 12, 15, 18 of 20
  c.optim.decay_factor = 0.1
  c.optim.warmup_steps = 0
  # The paper clips nothing. > 0: clip each member's own backbone gradient at this global norm
  # (arcface_torch clips its one backbone at 5); never across members, never the class weights.
  c.optim.clip_norm = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256          # global batch (paper)
  c.train.epochs = 20
  c.train.steps = 0                 # > 0 overrides epochs
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.train.heldout_pairs_seed = 0
  c.train.eval_every = 0            # > 0: verification on the held-out pairs every N steps

  if variant in ("demo", "lfw"):
    _cpu_recipe(c)
  if variant == "demo":
    # ~4 minutes on 2 CPU cores including compilation; srv_fdp: heldout_paper_accuracy 0.927 on
    # s31-s40 (0.926 with test-time flip; members alone 0.908 / 0.883 / 0.931), as the README.
    c.data.kind = "orl"
    c.data.max_shift = 6
    c.train.steps = 300
    c.train.eval_every = 100
  elif variant == "lfw":
    # LFW in its own layout (--config.data.root=DIR): train on the people of folds 1-5 and those
    # in no pair (>= 2 images: 826 people, 4,194 images), test on the 3,000 pairs of folds 6-10
    # (2,195 people never seen). The demo network on the central 110x110 face box at 64 px;
    # measured on 2 CPU cores (2026-11 kernels): K = 3 ensembles 9-10 min, single 2.9 min for
    # 600 steps (~9 epochs); earlier kernels: srv_fdp 16.7 min, single 5.9 min; test accuracy
    # 0.822 / 0.823 (InsightFace protocol, official folds 6-10).
    c.data.kind = "lfw"
    c.data.crop = (70, 70, 110, 110)
    c.data.max_shift = 4
    c.train.steps = 600
    c.train.eval_every = 0
  elif variant == "test":
    # Seconds per step, for tests of the plumbing. XLA's own kernels compile 3x faster than the
    # CPU-tuned ones that "auto" picks (one srv_fdp step with XLA's cheap pipeline: 6 s instead
    # of 19 s on 2 cores), which only pay off at real sizes; tests/test_models_* check the CPU
    # kernels against these (forward and gradients), the demo trains with them.
    c.model.depthwise_impl, c.model.pointwise_impl, c.ensemble.strategy = "native", "dot", "vmap"
    c.data.kind = "orl"
    c.data.image_size = 32
    c.data.workers = 0
    c.model.width = 0.125
    c.model.blocks = (1, 1, 1, 1)
    c.model.embedding_dim = 16
    c.model.head = "gdc"
    c.optim.lr = 1e-2
    c.train.batch_size = 8
    c.train.steps = 2
    c.train.log_every = 1
    c.train.checkpoint_every = 1
  return c


def _cpu_recipe(c: ml_collections.ConfigDict) -> None:
  """What the ``demo`` and ``lfw`` variants share: a half-width MobileFaceNet at 64 px that
  learns from a few thousand faces in minutes on a 2-core CPU."""
  c.data.image_size = 64
  c.data.workers = 0              # in-memory-sized data: decoding in-process keeps both cores
  # Few training images: augmentation is what generalises to unseen people (ORL held-out
  # verification, single model, 300 steps: 0.88 with flips + shifts, 0.92 adding photometric).
  c.data.contrast = 0.3
  c.data.brightness = 30.0
  c.model.width = 0.5
  c.model.blocks = (1, 2, 3, 1)
  c.model.embedding_dim = 128
  c.model.head = "gdc"            # the FC head over a 4x4 map overfits 300 images
  c.optim.name = "adamw"          # converges in minutes; the paper's SGD recipe needs epochs
  c.optim.lr = 2e-3
  c.optim.weight_decay = 5e-4
  c.optim.warmup_steps = 20
  c.loss.scale = 32.0             # s = 64 with tens of classes and few steps saturates the softmax
  c.train.batch_size = 64
  c.train.log_every = 25
  c.train.checkpoint_every = 100


def models_archs() -> tuple[str, ...]:
  return ("mobilefacenet",) + arcface_torch.ARCHS


def flat_fields(c: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, object]]:
  """``[("fdp.gamma", 10.0), ...]``: every field by the dotted name ``--config.<name>`` takes."""
  out = []
  for key in sorted(c.keys()):
    value = c[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += flat_fields(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


def _fail(field: str, value, valid: str):
  raise ValueError(f"config field {field} = {value!r} is invalid; valid: {valid}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the field for any invalid setting."""
  for field in ("method", "loss", "model", "ensemble", "data", "optim", "train"):
    if field not in c:
      raise ValueError(f"config has no field {field!r}; build configs with an "
                       "experiments/<loss>_<method>.py file (faceens.configs.experiment)")
  spec = losses.method_spec(c.method)
  for name, fields in METHOD_GROUPS.items():
    if uses_group(c.method, name) and (name not in c or any(f not in c[name] for f in fields)):
      _fail(name, c.get(name), f"a group with {', '.join(fields)} for method {c.method!r} "
            f"(see experiments/arcface_{c.method}.py)")
  if c.loss.name not in heads.LOSSES:
    _fail("loss.name", c.loss.name, ", ".join(heads.LOSSES))
  if not c.loss.scale > 0:
    _fail("loss.scale", c.loss.scale, "a positive float (paper: 64)")
  if not 0 <= c.loss.margin < 3.14159:
    _fail("loss.margin", c.loss.margin, "0 <= m < pi (paper: ArcFace 0.5, CosFace 0.35)")
  k = c.ensemble.num_members
  if spec.single and k != 1:
    _fail("ensemble.num_members", k, f"1 for method {c.method!r}")
  if not spec.single and k < 2:
    _fail("ensemble.num_members", k, f">= 2 for ensemble method {c.method!r} (paper: 3)")
  if c.ensemble.strategy not in ensemble.STRATEGIES:
    _fail("ensemble.strategy", c.ensemble.strategy, ", ".join(ensemble.STRATEGIES))
  if c.model.get("arch", "mobilefacenet") not in models_archs():
    _fail("model.arch", c.model.arch, ", ".join(models_archs()))
  if c.model.head not in mobilefacenet.HEADS:
    _fail("model.head", c.model.head, ", ".join(mobilefacenet.HEADS))
  if c.model.depthwise_impl not in depthwise.IMPLS:
    _fail("model.depthwise_impl", c.model.depthwise_impl, ", ".join(depthwise.IMPLS))
  if c.model.pointwise_impl not in pointwise.IMPLS:
    _fail("model.pointwise_impl", c.model.pointwise_impl, ", ".join(pointwise.IMPLS))
  if c.model.batchnorm_impl not in batchnorm.IMPLS:
    _fail("model.batchnorm_impl", c.model.batchnorm_impl, ", ".join(batchnorm.IMPLS))
  if c.model.dtype not in ("float32", "bfloat16"):
    _fail("model.dtype", c.model.dtype, "float32, bfloat16")
  if not c.model.width > 0:
    _fail("model.width", c.model.width, "a positive float (1.0 = MobileFaceNet)")
  if len(tuple(c.model.blocks)) != 4 or min(c.model.blocks) < 1:
    _fail("model.blocks", c.model.blocks, "4 positive integers, e.g. (1, 4, 6, 2)")
  if c.data.image_size % 16 or c.data.image_size < 16:
    _fail("data.image_size", c.data.image_size, "a multiple of 16 (112 for MS1MV2)")
  if c.data.fit not in image_folder.FITS:
    _fail("data.fit", c.data.fit, ", ".join(image_folder.FITS))
  try:
    image_folder.parse_fit(image_folder.fit_spec(c))  # the one definition of a valid crop box
  except ValueError as e:
    _fail("data.crop", tuple(c.data.crop), f"() or (top, left, height, width), e.g. "
          f"(70, 70, 110, 110) for aligned 250x250 LFW ({e})")
  if c.data.kind == "lfw" and (not c.data.lfw_test_folds or
                               any(not 1 <= f <= 10 for f in c.data.lfw_test_folds)):
    _fail("data.lfw_test_folds", c.data.lfw_test_folds, "official folds 1-10, e.g. (6, 7, 8, 9, 10)")
  if c.data.kind not in DATA_KINDS:
    _fail("data.kind", c.data.kind, ", ".join(DATA_KINDS))
  if c.optim.name not in OPTIMIZERS:
    _fail("optim.name", c.optim.name, ", ".join(OPTIMIZERS))
  if not c.optim.lr > 0:
    _fail("optim.lr", c.optim.lr, "a positive float")
  if c.optim.clip_norm < 0:
    _fail("optim.clip_norm", c.optim.clip_norm,
          "0 (no clipping, the paper) or a positive per-member backbone gradient norm")
  if any(not 0 < f < 1 for f in c.optim.decay_at):
    _fail("optim.decay_at", c.optim.decay_at, "fractions of training in (0, 1)")
  if c.train.batch_size < 2:
    _fail("train.batch_size", c.train.batch_size, "an integer >= 2")
  if c.train.steps < 0 or (c.train.steps == 0 and c.train.epochs <= 0):
    _fail("train.steps", c.train.steps, "> 0, or 0 with train.epochs > 0")
  if c.train.checkpoint_every < 1 or c.train.log_every < 1:
    _fail("train.checkpoint_every/log_every", (c.train.checkpoint_every, c.train.log_every),
          "integers >= 1")
  if c.train.get("eval_every", 0) < 0:
    _fail("train.eval_every", c.train.eval_every, "an integer >= 0 (0: evaluate at the end only)")
  if spec.regularizer == "adp" and c.adp.logits not in ("cosine", "margin"):
    _fail("adp.logits", c.adp.logits, "cosine, margin")
  if not c.diversity.eps > 0:
    _fail("diversity.eps", c.diversity.eps, "a small positive float (default 1e-6)")
  if spec.adversarial and (c.advt.iters < 1 or c.advt.step_size <= 0 or c.advt.epsilon <= 0):
    _fail("advt", dict(c.advt), "iters >= 1, step_size > 0, epsilon > 0")


def loss_config(c: ml_collections.ConfigDict) -> losses.LossConfig:
  """The loss settings of a validated config (a method's unused groups are absent)."""
  extra = {}
  if uses_group(c.method, "adp"):
    extra = dict(adp_alpha=float(c.adp.alpha), adp_beta=float(c.adp.beta), adp_logits=c.adp.logits)
  if uses_group(c.method, "fdp"):
    extra = dict(fdp_gamma=float(c.fdp.gamma))
  return losses.LossConfig(method=c.method, loss=c.loss.name, scale=float(c.loss.scale),
                           margin=float(c.loss.margin), det_eps=float(c.diversity.eps), **extra)


def recipe(c: ml_collections.ConfigDict) -> dict:
  """What makes a run what it is, as a plain dict: the config without the data path (runs move)
  and without the method groups the method does not read (older runs recorded all of them)."""
  d = json.loads(c.to_json_best_effort())
  d["data"].pop("root", None)
  for name in METHOD_GROUPS:
    if not uses_group(c.method, name):
      d.pop(name, None)
  return d


def _merge(dst: ml_collections.ConfigDict, src: dict, prefix: str = "") -> None:
  for key, value in src.items():
    if key not in dst:
      dst[key] = value  # a field this version does not know: kept as written
    elif isinstance(dst[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(dst[key], value, f"{prefix}{key}.")
    elif isinstance(dst[key], tuple) and isinstance(value, list):
      dst[key] = tuple(value)
    else:
      dst[key] = value


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (``workdir/config.json``), on today's defaults."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a faceens run directory "
                            "(python -m faceens.train --config=... --workdir=DIR writes it)")
  try:
    with open(path) as f:
      raw = json.load(f)
    c = base_config(raw["loss"]["name"], raw.get("variant", "full"))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is not a valid faceens config: {e}") from None
  _merge(c, raw)
  validate(c)
  return c
