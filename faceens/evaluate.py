"""Verification of a trained run: ``python -m faceens.evaluate --workdir=DIR``.

For every evaluation set it reports, for the ensemble and for each member:

  * InsightFace's protocol (``faceens.verification``): flip test-time augmentation, squared L2,
    10-fold accuracy +- std, mean best threshold, ROC-AUC, TAR@FAR 1e-3 / 1e-4;
  * under ``paper``: Amada et al.'s plain Euclidean distance between ensemble embeddings without
    flip (accuracy, threshold, ROC-AUC); its threshold is the attacks' default goal.

Sets: ``--bins=a.bin,b.bin`` (InsightFace verification files), ``--pairs=pairs.txt`` (lines
``path1 path2 label``, label 1 = same person, paths relative to the file's folder; VGG2-style pair
lists), ``--lfw=DIR`` (LFW in its own layout with the official ``pairs.txt``, evaluated with
the official person-disjoint folds; ``--lfw_folds=6,7,8,9,10`` keeps some), or by default the
run's own (``run_sets``): the bundled held-out identities for the demo, a held-out image folder,
LFW's test folds for ``data.kind=lfw``, or ``lfw``, ``cfp_fp`` and ``agedb_30`` next to the
MS1MV2 training data.
Results are merged into ``DIR/eval.json``: a set evaluated again is replaced, every other set is
kept. The thresholds that ``verify``, ``attack`` and ``faceens.load`` use come from one set,
recorded there as ``threshold_from``: the run's own validation set unless
``--threshold_from=SET`` chooses another (``faceens.api`` explains the choice per call).
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: glibc reads its tunables at start (faceens.hostenv)
  from faceens import hostenv
  hostenv.reexec_with_hugepage_malloc()

import dataclasses
import json
import os

import numpy as np

from faceens import api, logs, provenance, verification
from faceens.data import demo as demo_data
from faceens.data import image_folder
from faceens.data import lfw as lfw_data
from faceens.data import pairs as pairs_data
from faceens.data import verification_bin
from faceens.data.image_folder import DataError
from faceens.models import ensemble

STANDARD_BINS = ("lfw", "cfp_fp", "agedb_30")


@dataclasses.dataclass
class EvalSet:
  name: str
  images: np.ndarray   # uint8 [N, S, S, 3]
  pairs: np.ndarray    # [P, 2] indices into images
  issame: np.ndarray   # [P] bool
  source: str
  folds: np.ndarray | None = None  # [P] fold ids (LFW's official folds); None: 10 contiguous


# ----------------------------------------------------------------------------- loading sets


def heldout_faces(c) -> tuple[image_folder.FaceSet, str] | tuple[None, None]:
  """The run's held-out people (``(FaceSet, source)``), or ``(None, None)``."""
  size, fit = c.data.image_size, image_folder.fit_spec(c)
  if c.data.kind == "orl":
    root = c.data.root or demo_data.orl_root()
    return image_folder.load_image_folder(root, size, fit, demo_data.HELDOUT_IDENTITIES,
                                          c.data.skip_bad), root
  if c.data.kind == "image_folder" and c.data.heldout_root:
    root = c.data.heldout_root
    return image_folder.load_image_folder(root, size, fit, skip_bad=c.data.skip_bad), root
  return None, None


def faceset_pairs(name: str, faces: image_folder.FaceSet, seed: int, source: str) -> EvalSet:
  """All genuine pairs of a set of identities and as many seeded impostor pairs."""
  pairs, issame = demo_data.balanced_pairs(faces.labels, seed=seed)
  return EvalSet(name, faces.images, pairs, issame, source)


def bin_set(path: str, size: int, fit: str = "pad") -> EvalSet:
  encoded, issame = verification_bin.load_bin(path)
  if not len(issame):
    raise DataError(f"{path} holds no pairs")
  images = verification_bin.decode_images(encoded, size, fit, source=path)
  pairs = np.arange(len(encoded)).reshape(-1, 2)
  name = os.path.splitext(os.path.basename(path))[0]
  return EvalSet(name, images, pairs, issame, path)


def pairs_file_set(path: str, size: int, fit: str = "pad") -> EvalSet:
  """``path1 path2 label`` lines (``faceens.data.pairs.read_pairs_file``) as an evaluation set."""
  images, pairs, issame = pairs_data.read_pairs_file(path, size, fit)
  name = os.path.splitext(os.path.basename(path))[0]
  return EvalSet(name, images, pairs, issame, path)


def lfw_set(root: str, size: int, fit: str = "pad", folds=None, name: str = "lfw") -> EvalSet:
  """LFW's official pairs from its own layout (``faceens.data.lfw``), with the official folds."""
  images, pairs, issame, fold = lfw_data.load_pairs(root, size, fit, folds=folds)
  if len(np.unique(fold)) < 2:
    raise DataError(f"the protocol needs at least 2 of LFW's folds (a threshold is chosen on the "
                    f"others), got {len(np.unique(fold))} from {root}")
  return EvalSet(name, images, pairs, issame, root, folds=fold)


def lfw_test_set(c) -> EvalSet:
  """``data.kind=lfw``: the pairs of the held-out official folds (``data.lfw_test_folds``)."""
  return lfw_set(c.data.root, c.data.image_size, image_folder.fit_spec(c),
                 folds=[f - 1 for f in c.data.lfw_test_folds], name="lfw_test")


def standard_bin_sets(c) -> list[EvalSet]:
  """``lfw``, ``cfp_fp``, ``agedb_30`` ``.bin`` files found in ``data.root`` (maybe none)."""
  paths = [os.path.join(c.data.root, f"{n}.bin") for n in STANDARD_BINS]
  return [bin_set(p, c.data.image_size, image_folder.fit_spec(c)) for p in paths if os.path.isfile(p)]


def run_sets(c, held: image_folder.FaceSet | None = None, held_source: str | None = None
             ) -> list[EvalSet]:
  """The sets a run is evaluated on, during and after training and by default here: its
  held-out identities (balanced pairs), LFW's test folds (``data.kind=lfw``), or the standard
  ``.bin`` files beside MS1MV2 (maybe none). ``held``: the held-out people if the caller has
  loaded them already (``held_source`` names them)."""
  if held is None:
    held, held_source = heldout_faces(c)
  if held is not None:
    return [faceset_pairs("heldout", held, c.train.heldout_pairs_seed, held_source)]
  if c.data.kind == "lfw":
    return [lfw_test_set(c)]
  if c.data.kind == "ms1mv2" and c.data.root:
    return standard_bin_sets(c)
  return []


def default_sets(c) -> list[EvalSet]:
  """``run_sets``, or an error saying what to pass when the run has none."""
  sets = run_sets(c)
  if sets:
    return sets
  if c.data.kind == "ms1mv2" and c.data.root:
    raise DataError(f"no {', '.join(n + '.bin' for n in STANDARD_BINS)} in {c.data.root}; pass "
                    "--bins=a.bin,b.bin or --pairs=pairs.txt")
  raise DataError("this run has no default evaluation set (no held-out identities); pass "
                  "--bins=a.bin,b.bin or --pairs=pairs.txt")


# ----------------------------------------------------------------------------- metrics


def _summary(metrics: dict) -> dict:
  keys = ("accuracy", "accuracy_std", "threshold", "roc_auc")
  return {k: metrics[k] for k in keys}


def pair_distances(feats: np.ndarray, feats_flip: np.ndarray, pairs: np.ndarray) -> dict:
  """Per-pair distances under both protocols from normalised member features ``[K, N, d]`` of the
  images and their flips: ``insightface`` (squared L2 of normalise(E(x) + E(flip x))), ``paper``
  (Euclidean between ensemble embeddings E(x) = mean of member features, no flip), and the same
  for each member (``members_insightface`` / ``members_paper``, ``[K, P]``)."""
  V = verification
  feats, feats_flip = np.asarray(feats, np.float64), np.asarray(feats_flip, np.float64)
  a, b = pairs[:, 0], pairs[:, 1]
  ens = ensemble.ensemble_embedding(feats)
  emb = V.flip_embedding(ens, ensemble.ensemble_embedding(feats_flip))
  flipped = [V.flip_embedding(f, ff) for f, ff in zip(feats, feats_flip)]
  return {"insightface": V.distances(emb[a], emb[b], "squared_l2"),
          "paper": V.distances(ens[a], ens[b], "euclidean"),
          "members_insightface": np.stack([V.distances(e[a], e[b], "squared_l2") for e in flipped]),
          "members_paper": np.stack([V.distances(f[a], f[b], "euclidean") for f in feats])}


def evaluate_features(feats: np.ndarray, feats_flip: np.ndarray, pairs: np.ndarray,
                      issame: np.ndarray, folds=None) -> dict:
  """Metrics from normalised member features ``[K, N, d]`` of the images and their flips
  (``folds``: a fold id per pair, else 10 contiguous folds)."""
  ev = lambda d: verification.evaluate(d, issame, folds=folds)  # noqa: E731
  d = pair_distances(feats, feats_flip, pairs)
  out = ev(d["insightface"])
  out["paper"] = _summary(ev(d["paper"]))
  out["members"] = []
  for d_k, p_k in zip(d["members_insightface"], d["members_paper"]):
    m = ev(d_k)
    m = _summary(m) | {"tar_at_far": m["tar_at_far"]}
    m["paper"] = _summary(ev(p_k))
    out["members"].append(m)
  return out


def evaluate_model(model, sets, *, batch_size: int = 64, progress: bool = False) -> dict:
  """``{name: metrics}`` for a ``faceens.api.FaceModel`` over ``EvalSet``s."""
  results = {}
  for s in sets:
    feats = model.member_features(s.images, batch_size=batch_size, progress=progress,
                                  desc=s.name)
    flips = model.member_features(s.images, flip=True, batch_size=batch_size, progress=progress,
                                  desc=f"{s.name} (flipped)")
    results[s.name] = (evaluate_features(feats, flips, s.pairs, s.issame, s.folds)
                       | {"source": s.source,
                          "folds": "official" if s.folds is not None else "10 contiguous"})
  return results


# ----------------------------------------------------------------------------- report


def _fmt(v, spec=".4f"):
  return "n/a" if v is None else format(v, spec)


def format_table(results: dict) -> str:
  head = (f"{'dataset':<12} {'pairs':>6} {'model':<9} {'accuracy':>16} {'thr':>5} {'AUC':>6} "
          f"{'TAR@1e-3':>8} {'TAR@1e-4':>8} | {'paper acc':>9} {'thr':>5}")
  lines = [head, "-" * len(head)]
  for name, r in results.items():
    rows = [("ensemble", r)] + [(f"member {k}", m) for k, m in enumerate(r["members"])]
    for i, (who, m) in enumerate(rows):
      tar = m.get("tar_at_far", {})
      lines.append(
          f"{name if i == 0 else '':<12} {r['pairs'] if i == 0 else '':>6} {who:<9} "
          f"{m['accuracy']:>9.4f}+-{m['accuracy_std']:.3f} {m['threshold']:>5.2f} "
          f"{_fmt(m['roc_auc']):>6} {_fmt(tar.get('0.001')):>8} {_fmt(tar.get('0.0001')):>8} | "
          f"{m['paper']['accuracy']:>9.4f} {m['paper']['threshold']:>5.2f}")
  lines.append("accuracy: InsightFace protocol (flip, squared L2, 10 contiguous folds, or LFW's "
               "official folds); paper: Euclidean, no flip; n/a: too few pairs for that FAR")
  return "\n".join(lines)


def run(workdir: str, bins=(), pairs=(), *, lfw: str | None = None, lfw_folds=None,
        batch_size: int = 64, step: int | None = None, progress: bool = True,
        write: bool = True, threshold_from: str | None = None) -> dict:
  """Evaluates a run directory; returns (and merges into ``workdir/eval.json``) the results of
  every set evaluated so far (``write_eval_json``)."""
  model = api.load(workdir, step=step)
  c = model.config
  size, fit = model.input_size, image_folder.fit_spec(c)
  sets = [bin_set(p, size, fit) for p in bins] + [pairs_file_set(p, size, fit) for p in pairs]
  if lfw:
    sets.append(lfw_set(lfw, size, fit, folds=lfw_folds))
  if not sets:
    sets = default_sets(c)
  names = [s.name for s in sets]
  if len(set(names)) != len(names):
    raise DataError(f"evaluation sets need distinct file names, got {names}")
  results = evaluate_model(model, sets, batch_size=batch_size, progress=progress)
  return write_eval_json(workdir, c, model.step, model.num_members, results, write=write,
                         threshold_from=threshold_from)


def own_set_names(c) -> list[str]:
  """The names ``run_sets(c)`` gives, without loading any image: the run's own validation sets."""
  if c.data.kind == "orl" or (c.data.kind == "image_folder" and c.data.heldout_root):
    return ["heldout"]
  if c.data.kind == "lfw":
    return ["lfw_test"]
  if c.data.kind == "ms1mv2" and c.data.root:
    return [n for n in STANDARD_BINS if os.path.isfile(os.path.join(c.data.root, f"{n}.bin"))]
  return []


def default_threshold_set(c, names, recorded: str | None = None) -> str | None:
  """Which evaluated set's threshold ``verify``, ``attack`` and ``faceens.load`` use by default:
  the one recorded before (never replaced by a later evaluation), else the run's own validation
  set, else the first set evaluated."""
  if recorded in names:
    return recorded
  own = [n for n in own_set_names(c) if n in names]
  return own[0] if own else next(iter(names), None)


def write_eval_json(workdir, c, step, num_members, results, write: bool = True,
                    threshold_from: str | None = None) -> dict:
  """Merges ``results`` into ``workdir/eval.json``: a set evaluated again is replaced, every other
  set is kept, each with the checkpoint step it was evaluated at. ``threshold_from`` (a set name)
  changes the recorded default threshold source; otherwise it stays what it was."""
  path = os.path.join(workdir, "eval.json")
  old = {}
  if os.path.isfile(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except ValueError as e:
      raise DataError(f"{path} is not valid JSON ({e}); move it away to start a new one") from None
  datasets = dict(old.get("datasets") or {})
  datasets.update({name: r | {"step": step} for name, r in results.items()})
  if threshold_from is not None and threshold_from not in datasets:
    raise DataError(f"threshold_from={threshold_from!r} is not an evaluated set; evaluated: "
                    f"{', '.join(datasets)}")
  out = {"step": step, "method": c.method, "loss": c.loss.name, "num_members": num_members,
         "protocol": "InsightFace: normalise(E(x) + E(flip x)), squared L2, thresholds 0..4 "
                     "step 0.01, 10 contiguous folds; paper: Euclidean on E(x), no flip",
         "threshold_from": threshold_from or default_threshold_set(c, datasets,
                                                                   old.get("threshold_from")),
         "provenance": provenance.record(), "datasets": datasets}
  if write:
    with open(path, "w") as f:
      json.dump(out, f, indent=2)
  return out


def main(argv):
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  logs.default_verbosity()
  split = lambda s: [p for p in (s or "").split(",") if p]
  try:
    folds = [int(f) - 1 for f in split(FLAGS.lfw_folds)] or None
    if folds and any(not 0 <= f < 10 for f in folds):
      raise ValueError(f"--lfw_folds={FLAGS.lfw_folds}: LFW's folds are numbered 1 to 10")
    out = run(FLAGS.workdir, split(FLAGS.bins), split(FLAGS.pairs), lfw=FLAGS.lfw or None,
              lfw_folds=folds, batch_size=FLAGS.batch_size, step=FLAGS.step,
              threshold_from=FLAGS.threshold_from or None)
  except (ValueError, FileNotFoundError, DataError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"{out['loss']}_{out['method']} (K={out['num_members']}, step {out['step']})")
  print(format_table(out["datasets"]))
  src = out["threshold_from"]
  print(f"verify and attack use the thresholds of '{src}' (step {out['datasets'][src]['step']}) "
        "by default; --threshold_from=SET on evaluate changes that, on verify / attack it "
        "chooses per call")
  print(f"wrote {os.path.join(FLAGS.workdir, 'eval.json')} (sets: {', '.join(out['datasets'])})")


def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "run directory written by faceens.train")
  flags.DEFINE_string("bins", "", "comma-separated InsightFace verification .bin files")
  flags.DEFINE_string("pairs", "", "comma-separated pair lists ('path1 path2 label' lines)")
  flags.DEFINE_string("lfw", "", "an LFW folder in LFW's own layout (images/<Name>/<Name>_NNNN.jpg "
                      "and the official pairs.txt): its 6,000 pairs with the official folds")
  flags.DEFINE_string("lfw_folds", "", "comma-separated official folds 1-10 to keep (e.g. "
                      "6,7,8,9,10: people never seen by a model trained on folds 1-5)")
  flags.DEFINE_integer("batch_size", 64, "images per jitted batch")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
  flags.DEFINE_string("threshold_from", "", "record this evaluated set as the default threshold "
                      "source of verify / attack (default: kept as recorded; first time: the "
                      "run's own validation set)")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
