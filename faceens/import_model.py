"""Published face models into faceens: ``python -m faceens.import_model --from=backbone.pth
--arch=r50 --workdir=runs/r50`` (or ``--from=w600k_r50.onnx``).

Reads an arcface_torch ``state_dict`` (``backbone.pth`` of ``mbf``, ``r18``, ``r34``, ``r50``,
``r100``) without executing pickled code (``torch.load(..., weights_only=True)``: a pickle that
names anything but tensors and containers is refused), maps every tensor onto the Flax backbone
of ``faceens.models.arcface_torch`` by its name (convolution kernels OIHW -> HWIO, linear
weights transposed, BatchNorm weight / bias / running statistics, PReLU slopes), checks every
name and shape, and writes a run directory that ``faceens.load``, ``evaluate``, ``verify``,
``attack`` and the plots accept: ``config.json`` (method ``single``, ``model.arch``),
``checkpoints/0`` and ``import.json`` (the source file, its SHA-256 and the input convention:
RGB, 112x112, ``(x - 127.5) / 127.5``). Several files of one architecture
(``--from=a.pth,b.pth,c.pth``) become one ensemble of K members: E(x) is the mean of their
normalised embeddings, attacked as one model like faceens' own ensembles. Files of different
architectures (``--from=r50.onnx,mbf.pth --arch=r50,mbf``) form one too (``combined.json``, one
run per architecture under ``members/``).

An ``.onnx`` file (InsightFace's model packs, or ``torch.onnx.export`` of an arcface_torch
backbone) is mapped by the graph's structure, with BatchNorms folded into convolutions undone
(``faceens.import_onnx``). Files of both formats can form one ensemble.

PyTorch is needed for ``.pth`` files, the ``onnx`` package for ``.onnx`` files:
``pip install "faceens[import]"``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX: glibc reads its tunables at start (faceens.hostenv)
  from faceens import hostenv
  hostenv.reexec_with_hugepage_malloc()

import hashlib
import json
import os
import re

import numpy as np

INPUT_CONVENTION = "RGB, 112x112 aligned face crops, (x - 127.5) / 127.5 (faceens: [0, 1] pixels)"


class ModelImportError(ValueError):
  """A file that is not the checkpoint it claims to be; the message names the file and tensor."""


def read_pth(path: str) -> dict[str, np.ndarray]:
  """A PyTorch ``state_dict`` as numpy arrays, loaded with ``weights_only=True`` (no pickled code
  runs). Accepts a bare ``state_dict`` or one under ``state_dict`` / ``model``; strips DDP's
  ``module.`` prefix."""
  if not os.path.isfile(path):
    raise ModelImportError(f"{path} does not exist")
  try:
    import torch
  except ImportError:
    raise ModelImportError("reading .pth files needs PyTorch: pip install \"faceens[import]\"") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, ...)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ModelImportError(f"{path} cannot be read as a PyTorch state_dict with weights_only=True "
                       f"(a pickle that would run code is refused): {first}") from None
  if isinstance(obj, dict):
    for key in ("state_dict", "model"):
      if key in obj and isinstance(obj[key], dict):
        obj = obj[key]
  if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
    raise ModelImportError(f"{path} holds no state_dict of tensors (got {type(obj).__name__})")
  return {re.sub(r"^module\.", "", k): v.detach().cpu().numpy() for k, v in obj.items()}


def _flax_path(key: str) -> tuple[list[str], str]:
  """``layer1.0.conv1.weight`` -> ``(["layer1_0", "conv1"], "weight")``: each numeric token is
  joined to its parent (a ``Sequential`` / ``ModuleList`` index)."""
  tokens = key.split(".")
  mods: list[str] = []
  for t in tokens[:-1]:
    if t.isdigit() and mods:
      mods[-1] = f"{mods[-1]}_{t}"
    else:
      mods.append(t)
  return mods, tokens[-1]


def infer_mbf(state: dict[str, np.ndarray]) -> dict:
  """``{"scale", "blocks", "num_features"}`` of an arcface_torch MobileFaceNet state_dict."""
  try:
    scale = state["layers.0.layers.0.weight"].shape[0] // 64
    nf = state["features.layers.3.weight"].shape[0]
  except KeyError as e:
    raise ModelImportError(f"not an arcface_torch MobileFaceNet: no {e.args[0]}") from None

  def count(stage):
    pattern = re.compile(rf"layers\.{stage}\.layers\.(\d+)\.layers\.")
    return len({m.group(1) for m in map(pattern.match, state) if m})
  first = 1 if "layers.1.layers.0.weight" in state else count(1)
  return {"scale": int(scale), "blocks": (first, count(3), count(5), count(7)),
          "num_features": int(nf)}


def infer_num_features(state: dict[str, np.ndarray], arch: str) -> int:
  key = "features.layers.3.weight" if arch == "mbf" else "features.weight"
  if key not in state:
    raise ModelImportError(f"no {key}: not an arcface_torch {arch} state_dict")
  return int(state[key].shape[0])


def to_variables(state: dict[str, np.ndarray], template, source: str = "state_dict") -> dict:
  """Maps ``state`` (PyTorch names and layouts) onto ``template`` (the Flax variables of the
  matching backbone, arrays or shape structs): ``{"params", "batch_stats"}`` of numpy arrays.
  Every tensor must find its place and every Flax leaf must be filled, with matching shapes."""
  import jax
  flat = {tuple(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(template)}
  out: dict[tuple, np.ndarray] = {}
  for key, value in state.items():
    mods, leaf = _flax_path(key)
    if leaf == "num_batches_tracked":
      continue
    if leaf in ("running_mean", "running_var"):
      dest = ("batch_stats", *mods, "mean" if leaf == "running_mean" else "var")
      array = value
    elif leaf == "bias":
      dest, array = ("params", *mods, "bias"), value
    elif leaf == "weight":
      candidates = [("params", *mods, n) for n in ("kernel", "scale", "slope")]
      dest = next((c for c in candidates if c in flat), None)
      if dest is None:
        raise ModelImportError(f"{source}: unexpected tensor {key} {tuple(value.shape)}: the chosen "
                           "architecture has no such layer (another --arch?)")
      if dest[-1] == "kernel" and value.ndim == 4:
        array = np.transpose(value, (2, 3, 1, 0))        # OIHW -> HWIO
      elif dest[-1] == "kernel":
        array = np.transpose(value)                      # Linear [out, in] -> [in, out]
      else:
        array = value
    else:
      raise ModelImportError(f"{source}: unexpected tensor {key} {tuple(value.shape)}")
    if dest not in flat:
      raise ModelImportError(f"{source}: unexpected tensor {key} {tuple(value.shape)}: the chosen "
                         "architecture has no such layer (another --arch?)")
    want = tuple(flat[dest].shape)
    if tuple(array.shape) != want:
      raise ModelImportError(f"{source}: {key} has shape {tuple(value.shape)}, the architecture needs "
                         f"{want} in faceens' layout ({'/'.join(dest)}): another --arch or size?")
    out[dest] = np.asarray(array, np.float32)
  missing = [p for p in flat if p not in out]
  if missing:
    names = ", ".join("/".join(p) for p in missing[:5])
    raise ModelImportError(f"{source}: {len(missing)} tensors of the architecture are missing "
                       f"(e.g. {names}): a truncated file or another --arch?")
  tree: dict = {}
  for path, array in out.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = array
  return tree


def model_config(arch: str, num_features: int, mbf: dict | None = None, members: int = 1):
  """The faceens config of an imported model (``members`` > 1: an ensemble of that many
  published models, the ``baseline`` method): ``model.arch`` and the 112 px input."""
  from faceens import configs
  c = configs.experiment("arcface_single" if members == 1 else "arcface_baseline", "full")
  c.ensemble.num_members = members
  c.model.arch = arch
  c.model.embedding_dim = num_features
  if mbf:
    c.model.scale, c.model.blocks = mbf["scale"], tuple(mbf["blocks"])
  c.data.image_size = 112
  configs.validate(c)
  return c


def read_member(path: str, arch: str) -> tuple[dict, int, dict | None, int, str]:
  """One published model file as ``(variables, num_features, mbf or None, tensors, format)``:
  a ``.pth`` / ``.pt`` state_dict, or an ``.onnx`` graph (``faceens.import_onnx``)."""
  import jax
  import jax.numpy as jnp
  from faceens import import_onnx, models
  from faceens.models import arcface_torch
  if arch not in arcface_torch.ARCHS:
    raise ModelImportError(f"unknown --arch={arch!r}; valid: {', '.join(arcface_torch.ARCHS)}")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".onnx":
    if not os.path.isfile(path):
      raise ModelImportError(f"{path} does not exist")
    try:
      tree, nf, mbf, count = import_onnx.read(path, arch)
    except import_onnx.OnnxImportError as e:
      raise ModelImportError(str(e)) from None
    return tree, nf, mbf, count, "onnx"
  if ext not in (".pth", ".pt"):
    raise ModelImportError(f"--from={path}: expected a PyTorch .pth / .pt state_dict or an .onnx "
                           "model")
  state = read_pth(path)
  mbf = infer_mbf(state) if arch == "mbf" else None
  nf = mbf["num_features"] if mbf else infer_num_features(state, arch)
  model = models.get_model(model_config(arch, nf, mbf))
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 112, 112, 3)), train=False))
  return to_variables(state, template, path), nf, mbf, len(state), "pytorch state_dict"


def _write_run(members: list, paths: list[str], arch: str, workdir: str) -> dict:
  """One run directory of same-shaped members (``read_member`` results) stacked on K."""
  import jax
  import orbax.checkpoint as ocp
  from faceens import provenance
  _, nf, mbf, _, _ = members[0]
  c = model_config(arch, nf, mbf, members=len(members))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2))
  stacked = jax.tree.map(lambda *a: np.stack(a), *[m[0] for m in members])
  tree = {"params": {"backbone": stacked["params"]}, "batch_stats": stacked["batch_stats"]}
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               item_names=("state",))
  mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)), force=True)
  mngr.wait_until_finished()
  mngr.close()
  formats = sorted({m[4] for m in members})
  doc = {"from": [os.path.abspath(s) for s in paths], "format": ", ".join(formats),
         "formats": [m[4] for m in members], "sha256": [_sha256(p) for p in paths],
         "arch": arch, "members": len(members), "num_features": nf, "mbf": mbf,
         "input": INPUT_CONVENTION, "tensors": members[0][3],
         "imported_with": provenance.record()}
  with open(os.path.join(workdir, "import.json"), "w") as f:
    json.dump(doc, f, indent=2)
  return doc


def import_members(paths: list[str], archs: list[str], workdir: str) -> dict:
  """Writes a run directory for the models in ``paths`` (``archs``: one architecture per file):
  one ensemble, E(x) = the mean of all their normalised embeddings. Files of one architecture
  and size are stacked into one run (K members, vmapped like a trained ensemble); files of
  different architectures become one run each under ``workdir/members/`` and ``combined.json``
  lists them (``faceens.api.CombinedModel``); members are numbered run by run
  (``member_files`` in ``import.json``). Returns ``import.json``."""
  from faceens import api
  members = [read_member(p, a) for p, a in zip(paths, archs)]
  groups: dict[str, list[int]] = {}
  for i, (m, a) in enumerate(zip(members, archs)):
    groups.setdefault(json.dumps([a, m[2]]), []).append(i)
  dims = {m[1] for m in members}
  if len(dims) > 1:
    raise ModelImportError("the members differ in shape: " + "; ".join(
        f"{src}: d = {m[1]}, {m[2] or a}" for m, src, a in zip(members, paths, archs)) +
        " (an ensemble needs one embedding size)")
  if len(groups) == 1:
    return _write_run(members, paths, archs[0], workdir)
  runs, docs = [], []
  for g, idx in enumerate(groups.values()):
    rel = os.path.join("members", f"{g}_{archs[idx[0]]}")
    docs.append(_write_run([members[i] for i in idx], [paths[i] for i in idx], archs[idx[0]],
                           os.path.join(workdir, rel)))
    runs.append(rel)
  with open(os.path.join(workdir, api.COMBINED), "w") as f:
    json.dump({"runs": runs}, f, indent=2)
  doc = {"from": [os.path.abspath(p) for p in paths], "format": ", ".join(
      sorted({f for d in docs for f in d["formats"]})), "arch": "+".join(d["arch"] for d in docs),
         "members": len(members), "runs": runs,
         # member k of the ensemble (``embed(..., member=k)``): runs in order, files in each
         "member_files": [d2 for d in docs for d2 in d["from"]],
         "sha256": [h for d in docs for h in d["sha256"]], "num_features": members[0][1],
         "input": INPUT_CONVENTION, "tensors": sum(m[3] for m in members),
         "imported_with": docs[0]["imported_with"]}
  with open(os.path.join(workdir, "import.json"), "w") as f:
    json.dump(doc, f, indent=2)
  return doc


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def run(source: str, arch: str, workdir: str) -> dict:
  """Imports ``source`` (a ``.pth`` / ``.onnx``, or several comma-separated: one ensemble) as
  ``arch`` (one name for every file, or one per file)."""
  if os.path.exists(os.path.join(workdir, "checkpoints")) or os.path.exists(
      os.path.join(workdir, "combined.json")):
    raise ModelImportError(f"{workdir} already holds a run; give a new --workdir")
  sources = [p for p in source.split(",") if p]
  archs = [a for a in arch.split(",") if a]
  if not sources:
    raise ModelImportError("--from is empty: give a .pth or .onnx file")
  if len(archs) == 1:
    archs = archs * len(sources)
  if len(archs) != len(sources):
    raise ModelImportError(f"--arch names {len(archs)} architectures for {len(sources)} files: "
                           "give one for all files or one per file")
  return import_members(sources, archs, workdir)


def main(argv):
  del argv
  from absl import flags
  from faceens import logs
  FLAGS = flags.FLAGS  # noqa: N806
  logs.default_verbosity()
  try:
    doc = run(FLAGS["from"].value, FLAGS.arch, FLAGS.workdir)
  except (ModelImportError, ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  each = "in all" if "runs" in doc else "each"
  print(f"imported {doc['arch']} x{doc['members']} ({doc['tensors']} tensors {each}, d = "
        f"{doc['num_features']}) from {', '.join(doc['from'])} into {FLAGS.workdir}; input: "
        f"{doc['input']}")
  print(f"next: python -m faceens.evaluate --workdir={FLAGS.workdir} --lfw=DIR (or --bins=...)")


def _define_flags():
  from absl import flags
  from faceens.models import arcface_torch
  flags.DEFINE_string("from", None, "the model: an arcface_torch backbone.pth or an ONNX file "
                      "(e.g. InsightFace's w600k_r50.onnx), or several comma-separated (same "
                      "--arch): one ensemble of them")
  flags.DEFINE_string("arch", None, "arcface_torch's architecture name (" +
                      ", ".join(arcface_torch.ARCHS) + "), one for all files or comma-separated "
                      "one per file (an ensemble of different architectures)")
  flags.DEFINE_string("workdir", None, "the run directory to write")
  flags.mark_flags_as_required(["from", "arch", "workdir"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
