"""ONNX face recognition models (InsightFace's model packs, ``torch.onnx.export`` of arcface_torch)
onto faceens' arcface_torch backbones (``faceens.models.arcface_torch``).

An exported graph keeps no trustworthy names (InsightFace's files call their tensors ``683``, and
exporters fold each BatchNorm that follows a convolution into the convolution's weights and
bias), so the mapping goes by structure: the Flax backbone is traced once to list its layers in
execution order (convolution, BatchNorm, PReLU, dense) with their shapes, strides, paddings and
groups; the graph's nodes (topologically ordered, as ONNX requires) are read the same way, and
each Flax layer takes the first unused node of its kind whose shape and attributes agree. A
BatchNorm the export folded into the convolution (or the fully connected layer) before it
becomes the identity map plus the folded bias (scale 1, mean 0, variance 1 - eps); a convolution
bias in front of an unfolded BatchNorm moves into its running mean. Everything else is an error
that names the node: an operator outside these networks (e.g. an input normalisation inside the
graph, as MXNet conversions have), a layer left over or missing, a BatchNorm epsilon other
than 1e-5.

Reading uses the ``onnx`` package (protobuf; no code runs): ``pip install "faceens[import]"``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Operators of arcface_torch's networks in an export, besides the parametric ones.
_PLUMBING = {"Add", "Flatten", "Reshape", "Identity", "Constant", "Dropout", "Shape", "Gather",
             "Unsqueeze", "Concat", "Cast", "Squeeze", "Transpose"}
_PARAMETRIC = {"Conv", "BatchNormalization", "PRelu", "Gemm", "MatMul"}
BN_EPS = 1e-5


class OnnxImportError(ValueError):
  """An ONNX file that does not hold the chosen architecture (the message names the node)."""


@dataclasses.dataclass
class Layer:
  """One parametric layer of the traced Flax backbone, in execution order."""
  kind: str                 # conv / bn / prelu / dense
  path: tuple[str, ...]     # the module's path in the variables tree
  shape: tuple[int, ...]    # conv: HWIO kernel; bn / prelu: (C,); dense: (in, out)
  stride: int = 1
  padding: int = 0
  groups: int = 1
  bias: bool = False        # dense only


def trace_layers(module, image_size: int = 112) -> tuple[list[Layer], dict]:
  """The parametric layers of ``module`` (an arcface_torch backbone) in the order they run, and
  the shapes of its variables (``jax.eval_shape`` of ``init``)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from faceens.models import arcface_torch
  from faceens.models.batchnorm import PReLU
  layers: list[Layer] = []

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    x = args[0]
    if isinstance(mod, arcface_torch._Conv):
      c_in = x.shape[-1]
      layers.append(Layer("conv", tuple(mod.path), (mod.kernel, mod.kernel, c_in // mod.groups,
                                                     mod.features), mod.stride, mod.padding,
                          mod.groups))
    elif isinstance(mod, nn.BatchNorm):
      layers.append(Layer("bn", tuple(mod.path), (x.shape[-1],)))
    elif isinstance(mod, PReLU):
      layers.append(Layer("prelu", tuple(mod.path), (x.shape[-1],)))
    elif isinstance(mod, nn.Dense):
      layers.append(Layer("dense", tuple(mod.path), (x.shape[-1], mod.features),
                          bias=mod.use_bias))
    return out

  def init():
    with nn.intercept_methods(interceptor):
      return module.init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)),
                         train=False)
  shapes = jax.eval_shape(init)
  # Calls nested in a call (a conv inside a block) append on return, innermost first; a module
  # is called once, so its order of return is the order the layers run.
  return layers, shapes


class Graph:
  """An ONNX graph's nodes, constant tensors (initializers and Constant nodes, through Identity)
  and consumers of every value."""

  def __init__(self, path: str):
    try:
      import onnx
      from onnx import numpy_helper
    except ImportError:
      raise OnnxImportError("reading .onnx files needs the onnx package: "
                            "pip install \"faceens[import]\"") from None
    try:
      model = onnx.load(path)
    except Exception as e:  # noqa: BLE001  (protobuf DecodeError, OSError, ...)
      raise OnnxImportError(f"{path} cannot be read as an ONNX model: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                            ) from None
    self.path = path
    g = model.graph
    if not len(g.node):
      raise OnnxImportError(f"{path}: the ONNX graph has no nodes")
    self.nodes = list(g.node)
    try:
      self.const: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t)
                                           for t in g.initializer}
      for n in self.nodes:
        if n.op_type == "Constant":
          for a in n.attribute:
            if a.name == "value":
              self.const[n.output[0]] = numpy_helper.to_array(a.t)
        elif n.op_type == "Identity" and n.input[0] in self.const:
          self.const[n.output[0]] = self.const[n.input[0]]
    except Exception as e:  # noqa: BLE001  (missing external data, unsupported dtypes, ...)
      raise OnnxImportError(f"{path}: a weight tensor cannot be read ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    self.consumers: dict[str, list] = {}
    for n in self.nodes:
      for i in n.input:
        self.consumers.setdefault(i, []).append(n)
    inputs = [i for i in g.input if i.name not in self.const]
    if len(inputs) != 1:
      raise OnnxImportError(f"{path}: expected one image input, the graph has "
                            f"{[i.name for i in inputs]}")
    self.input = inputs[0].name

  def attr(self, node, name, default=None):
    from onnx import helper
    for a in node.attribute:
      if a.name == name:
        return helper.get_attribute_value(a)
    return default

  def tensor(self, node, index: int) -> np.ndarray | None:
    if index >= len(node.input) or not node.input[index]:
      return None
    name = node.input[index]
    if name not in self.const:
      raise OnnxImportError(f"{self.path}: input {index} ({name}) of {describe(node)} is not a "
                            "constant: weights computed inside the graph are not supported")
    return np.asarray(self.const[name], np.float32)

  def only_consumer(self, value: str, op_type: str):
    """The single node reading ``value`` if it is an ``op_type``, else None."""
    users = self.consumers.get(value, [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def describe(node) -> str:
  return f"node {node.name or '?'} ({node.op_type})"


def _check_ops(graph: Graph, arch: str):
  first = next((n for n in graph.nodes if n.op_type in _PARAMETRIC), None)
  for n in graph.nodes:
    if n.op_type in _PARAMETRIC or n.op_type in _PLUMBING:
      continue
    where = ("before the first convolution: the graph normalises its input itself (MXNet "
             "conversions do; faceens expects arcface_torch's (x - 127.5) / 127.5 outside the "
             "graph)") if first is not None and graph.nodes.index(n) < graph.nodes.index(first) \
        else f"which arcface_torch's {arch} does not have"
    raise OnnxImportError(f"{graph.path}: {describe(n)} {where}; operators of the network: "
                          f"{', '.join(sorted(_PARAMETRIC | _PLUMBING))}")


def _conv_matches(graph: Graph, node, layer: Layer) -> bool:
  w = graph.const.get(node.input[1])
  if w is None or w.ndim != 4:
    return False
  kh, kw, cin, cout = layer.shape
  pads = list(graph.attr(node, "pads", [0, 0, 0, 0]))
  strides = list(graph.attr(node, "strides", [1, 1]))
  auto_pad = graph.attr(node, "auto_pad", b"NOTSET")
  if auto_pad not in (b"NOTSET", "NOTSET"):
    return False
  return (tuple(w.shape) == (cout, cin, kh, kw) and int(graph.attr(node, "group", 1)) == layer.groups
          and pads == [layer.padding] * 4 and strides == [layer.stride] * 2
          and list(graph.attr(node, "dilations", [1, 1])) == [1, 1])


def _dense_weight(graph: Graph, node) -> np.ndarray | None:
  """A Gemm / MatMul's weight as ``[in, out]``, Gemm's ``alpha`` folded in (None if it is not
  ``y = alpha x W(^T) + beta b``)."""
  w = graph.const.get(node.input[1])
  if w is None or w.ndim != 2:
    return None
  w = np.asarray(w, np.float32)
  if node.op_type == "Gemm":
    if graph.attr(node, "transA", 0):
      return None
    w = w.T if graph.attr(node, "transB", 0) else w
    return w * np.float32(graph.attr(node, "alpha", 1.0))
  return w


def _flat_bias(b, n: int, graph: Graph, node):
  """A bias of ``n`` values, also when stored as ``[1, n]`` (None stays None)."""
  if b is None:
    return None
  b = np.asarray(b, np.float32)
  if b.size != n:
    raise OnnxImportError(f"{graph.path}: the bias of {describe(node)} has shape {b.shape}, "
                          f"{n} values expected")
  return b.reshape(n)


def _dense_bias(graph: Graph, node, n: int):
  """``(bias or None, output value)`` of a Gemm (``beta`` folded in), or of a MatMul with an
  Add of a constant."""
  if node.op_type == "Gemm":
    b = _flat_bias(graph.tensor(node, 2), n, graph, node)
    return (None if b is None else b * np.float32(graph.attr(node, "beta", 1.0))), node.output[0]
  add = graph.only_consumer(node.output[0], "Add")
  if add is not None:
    other = [i for i in add.input if i != node.output[0]]
    if other and other[0] in graph.const:
      return _flat_bias(graph.const[other[0]], n, graph, add), add.output[0]
  return None, node.output[0]


def _bn_from_node(graph: Graph, node, channels: int, extra_shift=None) -> dict:
  eps = float(graph.attr(node, "epsilon", 1e-5))
  if abs(eps - BN_EPS) > 1e-9:
    raise OnnxImportError(f"{graph.path}: {describe(node)} has epsilon {eps:g}; arcface_torch's "
                          f"BatchNorm (and faceens') uses {BN_EPS:g}")
  scale, bias, mean, var = (graph.tensor(node, i) for i in range(1, 5))
  if any(t is None or t.shape != (channels,) for t in (scale, bias, mean, var)):
    raise OnnxImportError(f"{graph.path}: {describe(node)} does not hold {channels} channels")
  if extra_shift is not None:    # BN(y + c) = BN'(y) with running mean - c
    mean = mean - extra_shift
  return {"scale": scale, "bias": bias, "mean": mean, "var": var}


def _identity_bn(bias: np.ndarray | None, channels: int) -> dict:
  """A BatchNorm that the export folded away: y -> y + bias (scale 1, mean 0, var 1 - eps)."""
  return {"scale": np.ones(channels, np.float32),
          "bias": np.zeros(channels, np.float32) if bias is None else bias,
          "mean": np.zeros(channels, np.float32),
          "var": np.full(channels, 1.0 - BN_EPS, np.float32)}


def map_graph(graph: Graph, layers: list[Layer], arch: str) -> dict[tuple, dict]:
  """``{layer path: {name: array}}`` for every traced layer (see the module docstring)."""
  _check_ops(graph, arch)
  pending = [n for n in graph.nodes if n.op_type in _PARAMETRIC]
  used: set[int] = set()
  out: dict[tuple, dict] = {}

  def take(pred, what):
    for i, n in enumerate(pending):
      if i not in used and pred(n):
        used.add(i)
        return n
    raise OnnxImportError(f"{graph.path}: no node left for {what}: not an arcface_torch {arch} "
                          "of this size (another --arch?)")

  def claim(node):
    used.add(next(i for i, n in enumerate(pending) if n is node))

  i = 0
  while i < len(layers):
    layer = layers[i]
    name = "/".join(layer.path)
    nxt = layers[i + 1] if i + 1 < len(layers) else None
    if layer.kind in ("conv", "dense"):
      if layer.kind == "conv":
        node = take(lambda n: n.op_type == "Conv" and _conv_matches(graph, n, layer),
                    f"{name} (conv {layer.shape[0]}x{layer.shape[1]}, {layer.shape[2] * layer.groups}"
                    f" -> {layer.shape[3]} channels, stride {layer.stride}, {layer.groups} groups)")
        kernel = np.transpose(graph.tensor(node, 1), (2, 3, 1, 0))       # OIHW -> HWIO
        channels = layer.shape[3]
        bias, value = _flat_bias(graph.tensor(node, 2), channels, graph, node), node.output[0]
        entry = {"kernel": kernel}
      else:
        node = take(lambda n: n.op_type in ("Gemm", "MatMul")
                    and (w := _dense_weight(graph, n)) is not None and w.shape == layer.shape,
                    f"{name} (fully connected {layer.shape[0]} -> {layer.shape[1]})")
        channels = layer.shape[1]
        bias, value = _dense_bias(graph, node, channels)
        entry = {"kernel": _dense_weight(graph, node)}
      followed_by_bn = nxt is not None and nxt.kind == "bn" and nxt.shape == (channels,)
      bn_node = graph.only_consumer(value, "BatchNormalization") if followed_by_bn else None
      if layer.kind == "dense" and layer.bias:
        # The layer's own bias takes the node's, unless the export folded the BatchNorm after
        # it: then the folded bias belongs to that BatchNorm (the identity plus a shift).
        folded = followed_by_bn and bn_node is None
        entry["bias"] = np.zeros(channels, np.float32) if folded or bias is None else bias
        bias = bias if folded else None
      out[layer.path] = entry
      if followed_by_bn:
        if bn_node is not None:
          claim(bn_node)
          out[nxt.path] = _bn_from_node(graph, bn_node, channels, extra_shift=bias)
        else:
          out[nxt.path] = _identity_bn(bias, channels)
        i += 2
        continue
      if bias is not None:
        raise OnnxImportError(f"{graph.path}: {describe(node)} has a bias that {name} lacks")
    elif layer.kind == "bn":
      node = take(lambda n: n.op_type == "BatchNormalization"
                  and graph.const.get(n.input[1]) is not None
                  and graph.const[n.input[1]].shape == layer.shape,
                  f"{name} (BatchNorm over {layer.shape[0]} channels)")
      out[layer.path] = _bn_from_node(graph, node, layer.shape[0])
    elif layer.kind == "prelu":
      node = take(lambda n: n.op_type == "PRelu" and graph.const.get(n.input[1]) is not None
                  and graph.const[n.input[1]].size == layer.shape[0],
                  f"{name} (PReLU over {layer.shape[0]} channels)")
      out[layer.path] = {"slope": graph.tensor(node, 1).reshape(layer.shape)}
    i += 1
  left = [pending[j] for j in range(len(pending)) if j not in used]
  if left:
    raise OnnxImportError(f"{graph.path}: {len(left)} parametric nodes are left over after "
                          f"mapping every layer of {arch} (first: {describe(left[0])}): a larger "
                          "network, or another --arch?")
  return out


def infer_mbf(graph: Graph) -> dict:
  """``{"scale", "blocks", "num_features"}`` of an exported arcface_torch MobileFaceNet, from its
  convolutions: stride-2 grouped 3x3 convolutions end the stages, and each residual DepthWise
  block has one stride-1 grouped 3x3 convolution."""
  convs = [n for n in graph.nodes if n.op_type == "Conv"]
  if not convs:
    raise OnnxImportError(f"{graph.path}: no convolutions: not a MobileFaceNet")
  scale = graph.const[convs[0].input[1]].shape[0] // 64 if convs[0].input[1] in graph.const else 0
  counts, current = [], 0
  for n in convs[1:]:
    w = graph.const.get(n.input[1])
    if w is None or w.shape[2:] != (3, 3) or int(graph.attr(n, "group", 1)) == 1:
      continue
    if list(graph.attr(n, "strides", [1, 1])) == [2, 2]:
      counts.append(current)
      current = 0
    else:
      current += 1
  counts.append(current)
  denses = [n for n in graph.nodes if n.op_type in ("Gemm", "MatMul")]
  w = _dense_weight(graph, denses[-1]) if denses else None
  if scale < 1 or len(counts) != 4 or w is None:
    raise OnnxImportError(f"{graph.path}: not an arcface_torch MobileFaceNet (stride-2 grouped "
                          f"convolutions split it into {len(counts)} stages, 4 expected)")
  return {"scale": int(scale), "blocks": tuple(int(c) for c in counts),
          "num_features": int(w.shape[1])}


def infer_num_features(graph: Graph) -> int:
  denses = [n for n in graph.nodes if n.op_type in ("Gemm", "MatMul")]
  w = _dense_weight(graph, denses[-1]) if denses else None
  if w is None:
    raise OnnxImportError(f"{graph.path}: no fully connected output layer (Gemm / MatMul)")
  return int(w.shape[1])


def read(path: str, arch: str):
  """``(variables {"params", "batch_stats"} of numpy arrays, num_features, mbf or None,
  parametric node count)`` of the ONNX file at ``path`` as arcface_torch's ``arch``."""
  from faceens.models import arcface_torch
  graph = Graph(path)
  mbf = infer_mbf(graph) if arch == "mbf" else None
  nf = mbf["num_features"] if mbf else infer_num_features(graph)
  module = arcface_torch.get_backbone(arch, nf, **({"scale": mbf["scale"],
                                                    "blocks": mbf["blocks"]} if mbf else {}))
  layers, shapes = trace_layers(module)
  mapped = map_graph(graph, layers, arch)
  tree: dict = {"params": {}, "batch_stats": {}}
  for path, entry in mapped.items():
    for leaf, array in entry.items():
      col = "batch_stats" if leaf in ("mean", "var") else "params"
      node = tree[col]
      for p in path:
        node = node.setdefault(p, {})
      node[leaf] = np.asarray(array, np.float32)
  _check_against(shapes, tree, graph.path)
  count = sum(1 for n in graph.nodes if n.op_type in _PARAMETRIC)
  return tree, nf, mbf, count


def _check_against(shapes, tree, source):
  import jax
  want = {jax.tree_util.keystr(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_leaves_with_path(shapes)}
  got = {jax.tree_util.keystr(p): tuple(v.shape)
         for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  if want != got:
    missing = sorted(set(want) - set(got))[:3]
    wrong = [k for k in want if k in got and want[k] != got[k]][:3]
    raise OnnxImportError(f"{source}: the mapped variables do not fill the network (missing "
                          f"{missing}, wrong shapes {wrong})")
