"""faceens.import_model: arcface_torch state_dicts and ONNX graphs into faceens, equal to
PyTorch's and onnxruntime's embeddings.

No published weights are reachable here: the tests build PyTorch references of the
architectures (``tests/torch_backbones.py``) with random weights and BatchNorm statistics, save
their ``state_dict`` as ``.pth`` or export them with ``torch.onnx.export`` (both exporters: they
fold BatchNorms into convolutions and, the dynamo one, into the output FC), import them, and
compare faceens' embeddings with PyTorch's and onnxruntime's (eval mode) on the same images.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import faceens  # noqa: E402
from faceens import import_model  # noqa: E402
from tests import torch_backbones as tb  # noqa: E402
from tests.builders import ORL, REPO  # noqa: E402
from tests.conftest import subprocess_env  # noqa: E402
from tests.references import float32_rounding  # noqa: E402


def _bound(depth: int, fan_in: int) -> float:
  """float32 rounding of a ``depth``-layer forward pass whose longest dot product has ``fan_in``
  terms, relative to a unit-norm embedding: depth * eps * sqrt(fan_in) (random-walk rounding),
  twice over, since both sides of a comparison (PyTorch's float32 and ours) carry it."""
  return 2 * float32_rounding(depth, fan_in)


def _torch_embedding(net, x):
  with torch.no_grad():
    t = torch.from_numpy(np.ascontiguousarray(((x - 0.5) / 0.5).transpose(0, 3, 1, 2)))
    e = net(t).numpy().astype(np.float64)
  return e / np.linalg.norm(e, axis=1, keepdims=True)


def _export_onnx(net, path, dynamo: bool):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(net.eval(), (torch.zeros(1, 3, 112, 112),), path, dynamo=dynamo,
                      input_names=["data"], verbose=False)
  return path


def _ort_embedding(path, x):
  ort = pytest.importorskip("onnxruntime")
  sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  name = sess.get_inputs()[0].name
  rows = [sess.run(None, {name: ((x[i:i + 1] - 0.5) / 0.5).transpose(0, 3, 1, 2)})[0]
          for i in range(len(x))]   # one image at a time: the export fixed the batch at 1
  e = np.concatenate(rows).astype(np.float64)
  return e / np.linalg.norm(e, axis=1, keepdims=True)


def _cli(*args):
  """``python -m <args>`` from the checkout, with XLA's slow optimisations off (tiny inputs)."""
  env = subprocess_env(JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def _orl_pairs(tmp_path):
  """A pairs.txt of 5 same-person and 5 different-person ORL pairs, paths relative to it."""
  rel = os.path.relpath(ORL, tmp_path)
  pairs = tmp_path / "pairs.txt"
  pairs.write_text("".join(f"{rel}/s3{i}/1.pgm {rel}/s3{i}/2.pgm 1\n{rel}/s3{i}/1.pgm "
                           f"{rel}/s3{i + 1}/1.pgm 0\n" for i in range(1, 6)))
  return pairs


def _import(tmp_path, net, arch, name):
  path = str(tmp_path / f"{name}.pth")
  torch.save(net.state_dict(), path)
  workdir = str(tmp_path / name)
  doc = import_model.run(path, arch, workdir)
  return faceens.load(workdir), doc, path


# (arch, PyTorch reference, depth in layers, the longest dot product)
CASES = {
    # scale 2 with blocks[0] == 1: the second layer is 64 groups of 2 channels, not depthwise.
    "mbf_scale2": ("mbf", lambda: tb.MobileFaceNet(128, (1, 1, 2, 1), scale=2), 30, 512),
    "mbf_scale1": ("mbf", lambda: tb.MobileFaceNet(64, (2, 1, 1, 1), scale=1), 30, 512),
    "r18": ("r18", lambda: tb.IResNet((2, 2, 2, 2), 128), 20, 512 * 49),
}


@pytest.mark.parametrize("case", list(CASES))
def test_imported_embeddings_equal_pytorch(case, tmp_path):
  arch, build, depth, fan_in = CASES[case]
  net = tb.randomize(build(), seed=len(case))
  model, doc, _ = _import(tmp_path, net, arch, case)
  assert model.input_size == 112 and model.num_members == 1
  assert doc["input"].startswith("RGB, 112x112") and doc["arch"] == arch and doc["members"] == 1
  x = np.random.default_rng(0).random((3, 112, 112, 3), dtype=np.float32)
  ref = _torch_embedding(net, x)
  got = model.embed(x).astype(np.float64)  # K = 1: E(x) is the normalised feature
  err = float(np.abs(got - ref).max())
  print(f"IMPORT {case}: max abs {err:.2e}, bound {_bound(depth, fan_in):.2e}")
  assert err <= _bound(depth, fan_in), (case, err, _bound(depth, fan_in))
  # The weights matter: another random network is far from this one.
  other = _torch_embedding(tb.randomize(build(), seed=99), x)
  assert np.abs(other - ref).max() > 100 * _bound(depth, fan_in)


@pytest.mark.parametrize("exporter", ["dynamo", pytest.param("torchscript", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", list(CASES))
def test_imported_onnx_equals_pytorch_and_onnxruntime(case, exporter, tmp_path):
  onnx = pytest.importorskip("onnx")
  arch, build, depth, fan_in = CASES[case]
  net = tb.randomize(build(), seed=len(case))
  path = _export_onnx(net, str(tmp_path / f"{case}.onnx"), exporter == "dynamo")
  graph = onnx.load(path).graph
  bn_modules = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
  bn_nodes = sum(n.op_type == "BatchNormalization" for n in graph.node)
  assert bn_nodes < bn_modules  # the export folded BatchNorms: the case this import must undo
  doc = import_model.run(path, arch, str(tmp_path / "run"))
  assert doc["format"] == "onnx" and doc["arch"] == arch
  model = faceens.load(str(tmp_path / "run"))
  x = np.random.default_rng(0).random((3, 112, 112, 3), dtype=np.float32)
  got = model.embed(x).astype(np.float64)
  bound = _bound(depth, fan_in)
  for ref_name, ref in (("pytorch", _torch_embedding(net, x)), ("onnxruntime", _ort_embedding(path, x))):
    err = float(np.abs(got - ref).max())
    print(f"IMPORT ONNX {case} {exporter} vs {ref_name}: max abs {err:.2e}, bound {bound:.2e} "
          f"({bn_modules - bn_nodes} of {bn_modules} BatchNorms folded in the file)")
    assert err <= bound, (case, exporter, ref_name, err, bound)


def test_bad_onnx_files_are_one_line_errors(tmp_path):
  onnx = pytest.importorskip("onnx")
  from onnx import helper, numpy_helper
  net = tb.randomize(tb.IResNet((2, 2, 2, 2), 32), seed=4)
  good = _export_onnx(net, str(tmp_path / "r18.onnx"), dynamo=False)
  cases = []

  def variant(name, edit):
    m = onnx.load(good)
    edit(m.graph)
    path = str(tmp_path / f"{name}.onnx")
    onnx.save(m, path)
    return path

  def normalise_inside(g):   # MXNet conversions: (x - 127.5) * 0.0078125 in the graph
    g.initializer.extend([numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                          numpy_helper.from_array(np.array(0.0078125, np.float32), "scale")])
    old = g.input[0].name
    g.input[0].name = "raw"
    g.node.insert(0, helper.make_node("Mul", ["centred", "scale"], [old], name="_mulscalar0"))
    g.node.insert(0, helper.make_node("Sub", ["raw", "mean"], ["centred"], name="_minusscalar0"))
  cases.append((variant("mxnet", normalise_inside), "r18",
                "node _minusscalar0 (Sub) before the first convolution: the graph normalises its "
                "input itself"))

  def epsilon(g):
    bn = next(n for n in g.node if n.op_type == "BatchNormalization")
    next(a for a in bn.attribute if a.name == "epsilon").f = 2e-5
  cases.append((variant("eps", epsilon), "r18", "has epsilon 2e-05; arcface_torch's BatchNorm"))

  def extra_layer(g):
    prelu = next(n for n in g.node if n.op_type == "PRelu")
    g.node.append(helper.make_node("PRelu", [g.output[0].name, prelu.input[1]], ["extra"],
                                   name="extra_prelu"))
  cases.append((variant("extra", extra_layer), "r18",
                "1 parametric nodes are left over after mapping every layer of r18 (first: node "
                "extra_prelu (PRelu))"))
  cases.append((good, "r34", "no node left for layer1_2/"))  # r34 has a 3rd block in stage 1
  cases.append((good, "mbf", "not an arcface_torch MobileFaceNet"))
  # Gemm's alpha and beta are folded into the weight and bias: x (W / 2)^T * 2 + (2 b) * 0.5.
  def scaled_gemm(g):
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    for idx, factor in ((1, 0.5), (2, 2.0)):
      t = next(t for t in g.initializer if t.name == gemm.input[idx])
      t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
    kept = [a for a in gemm.attribute if a.name not in ("alpha", "beta")]
    del gemm.attribute[:]
    gemm.attribute.extend(kept + [helper.make_attribute("alpha", 2.0),
                                  helper.make_attribute("beta", 0.5)])
  import_model.run(variant("gemm", scaled_gemm), "r18", str(tmp_path / "gemm"))
  x = np.random.default_rng(3).random((2, 112, 112, 3), dtype=np.float32)
  err = np.abs(faceens.load(str(tmp_path / "gemm")).embed(x) - _torch_embedding(net, x)).max()
  assert err <= _bound(20, 512 * 49), err
  garbage = tmp_path / "garbage.onnx"
  garbage.write_bytes(b"\x08\x07not a protobuf at all" * 10)
  cases.append((str(garbage), "r18", "cannot be read as an ONNX model"))
  for i, (path, arch, message) in enumerate(cases):
    with pytest.raises(import_model.ModelImportError) as e:
      import_model.run(path, arch, str(tmp_path / f"bad{i}"))
    assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))


def test_bad_files_are_one_line_errors(tmp_path):
  net = tb.randomize(tb.MobileFaceNet(64, (1, 1, 1, 1), scale=1))
  state = net.state_dict()
  cases = []
  missing = dict(state)
  missing.pop("conv_sep.layers.1.running_var")
  cases.append((missing, "mbf", "1 tensors of the architecture are missing"))
  shaped = dict(state)
  shaped["conv_sep.layers.0.weight"] = torch.zeros(512, 127, 1, 1)
  cases.append((shaped, "mbf", "conv_sep.layers.0.weight has shape (512, 127, 1, 1)"))
  cases.append((state, "r18", "no features.weight: not an arcface_torch r18 state_dict"))
  extra = dict(state)
  extra["head.weight"] = torch.zeros(3, 3)
  cases.append((extra, "mbf", "unexpected tensor head.weight"))
  for i, (sd, arch, message) in enumerate(cases):
    path = str(tmp_path / f"bad{i}.pth")
    torch.save(sd, path)
    with pytest.raises(import_model.ModelImportError, match=message.replace("(", r"\(")
                       .replace(")", r"\)")):
      import_model.run(path, arch, str(tmp_path / f"bad{i}"))


class _Payload:
  def __reduce__(self):
    return (os.system, (f"touch {_Payload.marker}",))


def test_a_pickle_with_code_is_refused_and_does_not_run(tmp_path):
  _Payload.marker = str(tmp_path / "ran")
  path = str(tmp_path / "evil.pth")
  torch.save({"conv1.weight": torch.zeros(1), "x": _Payload()}, path)
  r = subprocess.run([sys.executable, "-m", "faceens.import_model", f"--from={path}",
                      "--arch=r18", f"--workdir={tmp_path / 'evil'}"], cwd=REPO,
                     env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "weights_only=True" in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert not os.path.exists(_Payload.marker)


def test_imported_model_runs_through_evaluate_and_attack(tmp_path):
  net = tb.randomize(tb.MobileFaceNet(64, (1, 1, 1, 1), scale=1))
  path = str(tmp_path / "mbf.pth")
  torch.save(net.state_dict(), path)
  workdir = str(tmp_path / "run")
  r = _cli("faceens.import_model", f"--from={path}", "--arch=mbf", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "imported mbf" in r.stdout
  r = _cli("faceens.evaluate", f"--workdir={workdir}", f"--pairs={_orl_pairs(tmp_path)}")
  assert r.returncode == 0, r.stderr[-2000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    ev = json.load(f)
  assert ev["threshold_from"] == "pairs" and ev["datasets"]["pairs"]["pairs"] == 10
  r = _cli("faceens.attack", f"--workdir={workdir}", "--method=ifgsm", "--pairs=4",
          f"--images={ORL}", "--max_iters=3", "--goal=threshold")
  assert r.returncode == 0, r.stderr[-2000:]
  with open(os.path.join(workdir, "attacks", "attack_ifgsm.json")) as f:
    res = json.load(f)
  assert res["summary"]["n"] == 4 and res["summary"]["goal_source"].startswith("eval.json:pairs")


def test_published_models_as_one_ensemble(tmp_path):
  nets = [tb.randomize(tb.MobileFaceNet(64, (1, 1, 1, 1), scale=1), seed=s) for s in (1, 2, 3)]
  paths = []
  for i, net in enumerate(nets):
    paths.append(str(tmp_path / f"m{i}.pth"))
    torch.save(net.state_dict(), paths[-1])
  doc = import_model.run(",".join(paths), "mbf", str(tmp_path / "ens"))
  model = faceens.load(str(tmp_path / "ens"))
  assert doc["members"] == 3 and model.num_members == 3
  x = np.random.default_rng(1).random((2, 112, 112, 3), dtype=np.float32)
  refs = [_torch_embedding(n, x) for n in nets]
  # E(x): the mean of the members' normalised embeddings (not renormalised); member k alone.
  bound = _bound(30, 512)
  assert np.abs(model.embed(x) - np.mean(refs, axis=0)).max() <= bound
  assert np.abs(model.embed(x, member=2) - refs[2]).max() <= bound
  # A .pth and an .onnx file form one ensemble too.
  onnx_path = _export_onnx(nets[2], str(tmp_path / "m2.onnx"), dynamo=True)
  doc = import_model.run(f"{paths[0]},{onnx_path}", "mbf", str(tmp_path / "mixed"))
  assert doc["formats"] == ["pytorch state_dict", "onnx"]
  mixed = faceens.load(str(tmp_path / "mixed"))
  assert np.abs(mixed.embed(x) - np.mean([refs[0], refs[2]], axis=0)).max() <= bound
  other = tb.randomize(tb.MobileFaceNet(32, (1, 1, 1, 1), scale=1))
  torch.save(other.state_dict(), str(tmp_path / "d32.pth"))
  with pytest.raises(import_model.ModelImportError, match="the members differ in shape"):
    import_model.run(f"{paths[0]},{tmp_path / 'd32.pth'}", "mbf", str(tmp_path / "bad"))


def test_ensemble_of_different_architectures_and_transfer_between_imports(tmp_path):
  mbf = tb.randomize(tb.MobileFaceNet(64, (1, 1, 1, 1), scale=1), seed=5)
  r18 = tb.randomize(tb.IResNet((2, 2, 2, 2), 64), seed=6)
  mbf_path = str(tmp_path / "mbf.pth")
  torch.save(mbf.state_dict(), mbf_path)
  r18_path = _export_onnx(r18, str(tmp_path / "r18.onnx"), dynamo=True)
  doc = import_model.run(f"{mbf_path},{r18_path},{mbf_path}", "mbf,r18,mbf", str(tmp_path / "mix"))
  assert doc["members"] == 3 and doc["runs"] == ["members/0_mbf", "members/1_r18"]
  model = faceens.load(str(tmp_path / "mix"))
  assert model.num_members == 3 and "mbf x2, r18 x1" in repr(model)
  x = np.random.default_rng(2).random((2, 112, 112, 3), dtype=np.float32)
  ref_m, ref_r = _torch_embedding(mbf, x), _torch_embedding(r18, x)
  # The deeper of the two networks (the MobileFaceNet, 30 layers, fan-in 512) and the widest
  # reduction (the r18's fc over 512 channels x 7 x 7), as in CASES.
  bound = max(_bound(30, 512), _bound(20, 512 * 49))
  # E(x): the mean over all three members; they are numbered run by run (both mbf files first).
  assert doc["member_files"] == [os.path.abspath(p) for p in (mbf_path, mbf_path, r18_path)]
  assert np.abs(model.embed(x) - (2 * ref_m + ref_r) / 3).max() <= bound
  assert np.abs(model.embed(x, member=2) - ref_r).max() <= bound
  assert np.abs(model.embed(x, member=1) - ref_m).max() <= bound
  # White-box: the attacks differentiate through every run of the combined model.
  from faceens.attacks import lots
  r = lots.attack(model.apply, model.variables, x[:1], model.embed(x[1:2]), 1e-3,
                  lots.AttackConfig(method="ifgsm", max_iters=2))
  assert r["iterations"][0] == 2 and r["distance"][0] < np.linalg.norm(
      model.embed(x[:1]) - model.embed(x[1:2]))
  with pytest.raises(import_model.ModelImportError, match="2 architectures for 3 files"):
    import_model.run(f"{mbf_path},{r18_path},{mbf_path}", "mbf,r18", str(tmp_path / "bad"))
  # Transfer from one imported model to another: examples crafted on the mbf alone, judged by
  # the r18 alone at its threshold (evaluated first).
  import_model.run(r18_path, "r18", str(tmp_path / "r18"))
  import_model.run(mbf_path, "mbf", str(tmp_path / "mbf"))
  r = _cli("faceens.evaluate", f"--workdir={tmp_path / 'r18'}", f"--pairs={_orl_pairs(tmp_path)}")
  assert r.returncode == 0, r.stderr[-2000:]
  r = _cli("faceens.attack", f"--workdir={tmp_path / 'r18'}", f"--source_workdir={tmp_path / 'mbf'}",
          "--method=ifgsm", "--pairs=4", f"--images={ORL}", "--max_iters=3", "--distances=0.5",
          f"--out={tmp_path / 'transfer'}")
  assert r.returncode == 0, r.stderr[-2000:]
  with open(tmp_path / "transfer" / "transfer_ifgsm.json") as f:
    res = json.load(f)
  assert res["source"].endswith("mbf") and res["target"].endswith("r18")
  assert [p["distance"] for p in res["points"]] == [0.5]
