"""Graph passes on exported files: find each layer's weights, name them, clean up, lower to
standard ONNX for onnxruntime. Passes follow qonnx's contract (``apply(model) -> (model,
modified)``) where they are transformations."""
from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Set

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation
from qonnx.transformation.fold_constants import FoldConstants
from qonnx.transformation.general import (GiveUniqueNodeNames, RemoveStaticGraphInputs,
                                          RemoveUnusedTensors)
from qonnx.transformation.infer_shapes import InferShapes

from qfv_brevitas.export.ops import OP_TYPE
from qfv_brevitas.util.errors import QfvError

__all__ = ["COMPUTE_OPS", "QUANT_OPS", "QONNX_DOMAIN", "default_domain_first", "locate_layers",
           "rename_tensor", "attr", "initializer", "constants", "upstream", "constant_tensors",
           "unshare_weight_quants", "remove_dead_nodes", "apply_transformations",
           "LayerTransformation", "UnshareWeightQuants", "NameLayerWeights",
           "StripNodeDebugInfo", "cleanup_qonnx", "LowerQuantToStandard", "to_onnxruntime"]

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
#: ops a cleanup must not fold away although their inputs are constant
QUANT_OPS = ("Quant", "BipolarQuant", "Trunc", OP_TYPE)
QONNX_DOMAIN = "qonnx.custom_op.general"


def default_domain_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """Put the default ONNX domain first in ``opset_import`` (qonnx's ``FoldConstants`` reads
    ``opset_import[0]`` as the ONNX opset) and make sure our op domain is declared."""
    imports = list(model.opset_import)
    default = [o for o in imports if o.domain in ("", "ai.onnx")]
    rest = [o for o in imports if o.domain not in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(default + rest)
    return model


def _layer_matches(tensor: str, layer: str) -> bool:
    # dynamo names lifted constants by attribute path ("a.b.weight_quant.export_handler.x"),
    # TorchScript by scope ("/a/a.b/weight_quant/export_handler/Constant_output_0"), whose
    # elements are full paths or, deeper down, local names ("/layer3/layer3.1/conv1/..."):
    # compare the whole path, so that a top-level "conv1" is not "layer3.1.conv1".
    if tensor.startswith(layer + ".weight_quant."):
        return True
    head, sep, _ = tensor.partition("/weight_quant/")
    return bool(sep) and head.startswith("/") and scope_path(head[1:].split("/")) == layer


def _node_in_scope(node_name: str, layer: str) -> bool:
    head, sep, _ = node_name.rpartition("/")
    return bool(sep) and head.startswith("/") and scope_path(head[1:].split("/")) == layer


def scope_path(elements: List[str]) -> str:
    """The module path of a TorchScript scope. An element is the module's full path (it
    extends the path so far), its parent's local name and its own (``downsample.0``: child
    ``0`` of the previous element ``downsample``), or its local name alone.

    >>> scope_path(["layer3", "layer3.1", "conv1"]), scope_path(["a", "a.b", "a.b.c"])
    ('layer3.1.conv1', 'a.b.c')
    >>> scope_path(["layer2", "layer2.0", "downsample", "downsample.0"])
    'layer2.0.downsample.0'
    """
    path, prev = "", ""
    for e in elements:
        if not path or e.startswith(path + "."):
            path = e
        elif prev and e.startswith(prev + "."):
            path += e[len(prev):]
        else:
            path = f"{path}.{e}"
        prev = e.rsplit(".", 1)[-1]
    return path


def locate_layers(model: onnx.ModelProto, layers: Iterable[str]) -> Dict[str, str]:
    """For each quantized layer, the tensor its compute node (Conv/Gemm/MatMul) takes as
    weights: the output of the layer's weight subgraph.

    A compute node's weight cone (everything its weight input depends on) holds constants
    named after the exporting module; the exporters share small equal constants (scales,
    zero points) between layers, so each vote counts the tensor's elements: the layer whose
    weight-sized constants are in the cone owns the node. Raises if a
    layer is not found, or found twice with different weights.
    """
    layers = list(layers)
    producers = {o: n for n in model.graph.node for o in n.output}
    sizes = {i.name: int(np.prod(i.dims)) if len(i.dims) else 1 for i in model.graph.initializer}
    inits = set(sizes)
    found: Dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        cone, stack, seen, is_const = [], [node.input[1]], set(), True
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in inits:
                cone.append(t)
            elif t in producers:
                stack.extend(producers[t].input)
            else:  # a graph input: the "weight" is an activation (e.g. attention), not ours
                is_const = False
        if not is_const:
            continue
        votes = Counter()
        for t in cone:
            for l in layers:
                if _layer_matches(t, l):
                    votes[l] += sizes[t]
        if not votes:
            continue
        layer = votes.most_common(1)[0][0]
        # TorchScript shares equal constants between layers (e.g. weights that all round to
        # zero): a compute node named in a layer's scope ("/net/net.3/Gemm") is that layer's
        own = [l for l in layers if _node_in_scope(node.name, l)]
        if len(own) == 1:
            layer = own[0]
        if layer in found and found[layer] != node.input[1]:
            raise RuntimeError(f"layer {layer!r} feeds two different weight tensors")
        found[layer] = node.input[1]
    missing = [l for l in layers if l not in found]
    if missing:
        raise RuntimeError(f"could not find the weights of {missing} in the exported graph")
    return found


def constant_tensors(model: onnx.ModelProto) -> Set[str]:
    """Names of the tensors that depend on initializers only (weight subgraphs), in one pass
    over the graph's nodes in their (topological) order."""
    const = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if all(not t or t in const for t in n.input):
            const.update(n.output)
    return const


def unshare_weight_quants(model: onnx.ModelProto) -> int:
    """Give every consumer of a shared weight-side ``Quant`` node its own copy.

    The dynamo exporter merges identical subexpressions, so two equal bit planes of a layer
    can share one ``Quant`` node; one node per plane is the form's contract, and FINN refuses
    fork nodes there. Returns the number of copies made."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    users: Dict[str, list] = {}
    for n in g.node:
        for i, t in enumerate(n.input):
            users.setdefault(t, []).append((n, i))
    made = 0
    for node in list(g.node):
        if node.op_type != "Quant" or node.input[0] not in inits:
            continue
        for k, (user, pos) in enumerate(users.get(node.output[0], [])[1:], start=1):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name or node.output[0]}_copy{k}"
            del copy.output[:]
            copy.output.append(f"{node.output[0]}_copy{k}")
            g.node.insert(list(g.node).index(node) + 1, copy)
            user.input[pos] = copy.output[0]
            made += 1
    return made


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a tensor everywhere it appears (nodes, initializers, value infos, outputs)."""
    if old == new:
        return
    g = model.graph
    for n in g.node:
        for i, t in enumerate(n.input):
            if t == old:
                n.input[i] = new
        for i, t in enumerate(n.output):
            if t == old:
                n.output[i] = new
    for coll in (g.initializer, g.value_info, g.input, g.output):
        for v in coll:
            if v.name == old:
                v.name = new


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute ``name`` (``default`` if it has none)."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def initializer(g: onnx.GraphProto, name: str) -> Optional[np.ndarray]:
    """The value of initializer ``name`` (None if there is none)."""
    for i in g.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    return None


def constants(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    """Every constant of the graph by name: initializers and ``Constant`` nodes' values."""
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def upstream(tensor: str, producers: Dict[str, onnx.NodeProto]) -> List[onnx.NodeProto]:
    """The nodes ``tensor`` depends on (``producers``: output name -> node)."""
    nodes, seen, stack = [], set(), [tensor]
    while stack:
        n = producers.get(stack.pop())
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        nodes.append(n)
        stack.extend(t for t in n.input if t)
    return nodes


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes none of whose outputs is used (e.g. a replaced weight subgraph)."""
    g = model.graph
    while True:
        used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.node.remove(n)


def apply_transformations(model: onnx.ModelProto, transformations: Sequence[Transformation]
                          ) -> onnx.ModelProto:
    """``model`` with qonnx ``Transformation``s applied in order (each on the result of the
    one before)."""
    # no deep copies, no qonnx cleanup between steps: the export cleans up once at the end
    mw = ModelWrapper(model, fix_missing_initializer_valueinfo=False)
    for t in transformations:
        mw = mw.transform(t, make_deepcopy=False, cleanup=False)
    return mw.model


class StripNodeDebugInfo(Transformation):
    """Drop the exporters' per-node stack traces and doc strings: not for a deployed file."""

    def apply(self, model):
        for node in model.graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
        return model, False


class UnshareWeightQuants(Transformation):
    """Give every consumer of a shared weight-side ``Quant`` node its own copy
    (:func:`unshare_weight_quants`)."""

    def apply(self, model):
        unshare_weight_quants(model.model)
        return model, False


class LayerTransformation(Transformation):
    """A graph rewrite over the export's quantized layers (``layers``: their names, or their
    :class:`~qfv_brevitas.export.layers.LayerExport`s, as the rewrite needs)."""

    def __init__(self, layers: Sequence):
        super().__init__()
        self.layers = list(layers)


class NameLayerWeights(LayerTransformation):
    """Name each quantized layer's weight tensor ``<layer>.weight`` (found by
    :func:`locate_layers`), so that files, metadata and checks refer to layers by name."""

    def apply(self, model):
        found = locate_layers(model.model, self.layers)
        for name in self.layers:
            rename_tensor(model.model, found[name], f"{name}.weight")
        return model, False


class _Cleanup(Transformation):
    def apply(self, model):
        for t in (InferShapes(), FoldConstants(exclude_op_types=list(QUANT_OPS)),
                  RemoveUnusedTensors(), RemoveStaticGraphInputs(), GiveUniqueNodeNames(),
                  InferShapes()):
            model = model.transform(t)
        return model, False


def cleanup_qonnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """qonnx's cleanup (shape inference, constant folding, unused tensors, unique node names)
    that keeps the weight quantizers: ``NMultWeight`` nodes and the ``Quant`` nodes of bit
    planes are not folded into float constants. Tensor names are kept (layer weights are
    named ``<layer>.weight``)."""
    mw = ModelWrapper(default_domain_first(model))
    # qonnx's own cleanup marks its ops' domain the same way (older exports used onnx.brevitas).
    for n in mw.graph.node:
        if n.op_type in ("Quant", "BipolarQuant", "Trunc") and n.domain in ("onnx.brevitas", ""):
            n.domain = QONNX_DOMAIN
    return mw.transform(_Cleanup()).model


class LowerQuantToStandard(Transformation):
    """Replace each QONNX ``Quant`` node by standard ops with the same float semantics as
    qonnx's reference (``x / s + z``, clip, round half to even, ``- z``, ``* s``), and each
    ``BipolarQuant`` by ``where(x >= 0, 1, -1) * s``, and each ``Trunc`` (Brevitas'
    truncating average pool, as qonnx's ``trunc_v2``: round ``x / s + z``, divide by the
    power-of-two ratio of the scales, clip to the output width, round, ``- z / ratio``,
    ``* s_out``), so that onnxruntime can run the graph. Rounding modes: ROUND/HALF_EVEN,
    FLOOR and CEIL."""

    _ROUND = {"ROUND": "Round", "HALF_EVEN": "Round", "FLOOR": "Floor", "CEIL": "Ceil"}

    def apply(self, model):
        g = model.graph
        modified = False
        for idx, node in enumerate(list(g.node)):
            if node.op_type == "BipolarQuant":
                self._bipolar(model, node)
                modified = True
                continue
            if node.op_type == "Trunc":
                self._trunc(model, node)
                modified = True
                continue
            if node.op_type != "Quant":
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            mode = attrs.get("rounding_mode", b"ROUND")
            mode = (mode.decode() if isinstance(mode, bytes) else mode).upper()
            if mode not in self._ROUND:
                raise QfvError(f"Quant node {node.name}: rounding mode {mode} has no standard "
                               "ONNX equivalent here")
            bw = model.get_initializer(node.input[3])
            if bw is None:
                raise QfvError(f"Quant node {node.name}: bit width is not a constant")
            bw = float(np.asarray(bw))
            signed, narrow = int(attrs.get("signed", 1)), int(attrs.get("narrow", 0))
            if bw == 1 and signed:
                raise QfvError(f"Quant node {node.name}: 1-bit signed (bipolar) is not lowered")
            lo = (-(2 ** (bw - 1)) + narrow) if signed else 0.0
            hi = (2 ** (bw - 1) - 1) if signed else (2 ** bw - 1 - narrow)
            x, s, z = node.input[0], node.input[1], node.input[2]
            p = f"{node.name or node.output[0]}_lowered"
            lo_t, hi_t = p + "_min", p + "_max"
            model.set_initializer(lo_t, np.asarray(lo, dtype=np.float32))
            model.set_initializer(hi_t, np.asarray(hi, dtype=np.float32))
            new = [
                helper.make_node("Div", [x, s], [p + "_div"]),
                helper.make_node("Add", [p + "_div", z], [p + "_zp"]),
                helper.make_node("Clip", [p + "_zp", lo_t, hi_t], [p + "_clip"]),
                helper.make_node(self._ROUND[mode], [p + "_clip"], [p + "_int"]),
                helper.make_node("Sub", [p + "_int", z], [p + "_sub"]),
                helper.make_node("Mul", [p + "_sub", s], [node.output[0]]),
            ]
            pos = list(g.node).index(node)
            g.node.remove(node)
            for k, n in enumerate(new):
                g.node.insert(pos + k, n)
            modified = True
        return model, modified


    def _trunc(self, model, node) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("rounding_mode", b"FLOOR")
        mode = (mode.decode() if isinstance(mode, bytes) else mode).upper()
        consts = [model.get_initializer(t) for t in node.input[1:6]]
        if mode not in self._ROUND or len(node.input) != 6 or any(c is None for c in
                                                                  (consts[0], consts[3], consts[4])):
            raise QfvError(f"Trunc node {node.name}: only the constant-scale trunc_v2 form with "
                           "rounding ROUND, FLOOR or CEIL is lowered")
        scale, out_scale, out_bw = (np.asarray(consts[i], dtype=np.float64) for i in (0, 3, 4))
        ratio = 2.0 ** np.round(np.log2(out_scale / scale))
        signed, narrow, bw = int(attrs.get("signed", 1)), int(attrs.get("narrow", 0)), float(out_bw)
        lo = (-(2 ** (bw - 1)) + narrow) if signed else 0.0
        hi = (2 ** (bw - 1) - 1) if signed else (2 ** bw - 1 - narrow)
        x, s, z, s_out = node.input[0], node.input[1], node.input[2], node.input[4]
        p = f"{node.name or node.output[0]}_lowered"
        for name, value in (("_ratio", ratio), ("_min", lo), ("_max", hi)):
            model.set_initializer(p + name, np.asarray(value, dtype=np.float32))
        new = [
            helper.make_node("Div", [x, s], [p + "_div"]),
            helper.make_node("Add", [p + "_div", z], [p + "_zp"]),
            helper.make_node("Round", [p + "_zp"], [p + "_round"]),
            helper.make_node("Div", [p + "_round", p + "_ratio"], [p + "_shift"]),
            helper.make_node("Clip", [p + "_shift", p + "_min", p + "_max"], [p + "_clip"]),
            helper.make_node(self._ROUND[mode], [p + "_clip"], [p + "_int"]),
            helper.make_node("Div", [z, p + "_ratio"], [p + "_zp_out"]),
            helper.make_node("Sub", [p + "_int", p + "_zp_out"], [p + "_sub"]),
            helper.make_node("Mul", [p + "_sub", s_out], [node.output[0]]),
        ]
        pos = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for k, n in enumerate(new):
            model.graph.node.insert(pos + k, n)

    @staticmethod
    def _bipolar(model, node) -> None:
        """``BipolarQuant(x, s) = (x >= 0 ? 1 : -1) * s`` (qonnx's reference)."""
        g = model.graph
        p = f"{node.name or node.output[0]}_lowered"
        model.set_initializer(p + "_zero", np.asarray(0.0, dtype=np.float32))
        model.set_initializer(p + "_pos", np.asarray(1.0, dtype=np.float32))
        model.set_initializer(p + "_neg", np.asarray(-1.0, dtype=np.float32))
        new = [
            helper.make_node("GreaterOrEqual", [node.input[0], p + "_zero"], [p + "_ge"]),
            helper.make_node("Where", [p + "_ge", p + "_pos", p + "_neg"], [p + "_sign"]),
            helper.make_node("Mul", [p + "_sign", node.input[1]], [node.output[0]]),
        ]
        pos = list(g.node).index(node)
        g.node.remove(node)
        for k, n in enumerate(new):
            g.node.insert(pos + k, n)


def to_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an exported file that onnxruntime can run: the weight subgraphs (our op,
    bit planes) folded into constants by qonnx's execution of their ops, the activation
    ``Quant`` nodes lowered to standard ops, our domains dropped."""
    mw = ModelWrapper(default_domain_first(onnx.ModelProto.FromString(model.SerializeToString())))
    mw = mw.transform(FoldConstants())
    mw = mw.transform(LowerQuantToStandard())
    mw = mw.transform(RemoveUnusedTensors())
    left = sorted({n.op_type for n in mw.graph.node if n.domain not in ("", "ai.onnx")})
    if left:
        raise QfvError(f"ops {left} have no onnxruntime equivalent")
    keep = [o for o in mw.model.opset_import if o.domain in ("", "ai.onnx")]
    del mw.model.opset_import[:]
    mw.model.opset_import.extend(keep)
    return mw.model
