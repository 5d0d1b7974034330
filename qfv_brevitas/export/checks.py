"""Checks of an exported graph against its metadata and against a fresh export.

- :func:`check_domains`: every node's op domain, in every subgraph too, is ONNX, QONNX or this
  library's: qonnx imports a node's domain as a Python module to run it, so a file naming
  another module is refused before anything runs (a file a user gives gets the whole
  structural check of :mod:`qfv_brevitas.export.structure` first).
- :func:`graph_digest`: the SHA-256 of the graph stored beside the metadata at export time, so
  any later change of a weight, code or scale (a flipped byte) is noticed.
- :func:`graph_problems`: each layer of the metadata against the graph (``qfv inspect``), by
  the file's form (``qfv_brevitas.export.forms``): bit width, ``r`` and ``c`` exactly, codes /
  bit planes / fixed-point integers in range, the plane-parallel form's 1-bit planes, integer
  multipliers and offsets; and (:func:`coverage_problems`) every quantized layer of the graph
  is one the metadata describes, every layer it describes one of the graph.
- :func:`compare_graphs`: two graphs node by node and parameter by parameter, exactly
  (``qfv verify``: the file against what its checkpoint exports).
"""
from __future__ import annotations

import hashlib
from typing import Dict, List

import numpy as np
import onnx
from onnx import numpy_helper

from qfv_brevitas.export.errors import ExportError
from qfv_brevitas.export.forms import ExportForm, GraphView, form_named
from qfv_brevitas.export.graph import COMPUTE_OPS, constant_tensors, upstream
from qfv_brevitas.export.ops import DOMAIN, OP_TYPE
from qfv_brevitas.export.structure import NodeAt, shown, walk_nodes
from qfv_brevitas.util.errors import QfvError

__all__ = ["ALLOWED_DOMAINS", "QUANTIZER_OPS", "check_domains", "graph_digest",
           "graph_problems", "coverage_problems", "compare_graphs"]

#: Op domains a file of this library may use: standard ONNX, QONNX's op set, and its own.
ALLOWED_DOMAINS = ("", "ai.onnx", "qonnx.custom_op.general", DOMAIN)
#: ops that quantize: a compute node whose constant weights come through one is a quantized
#: layer, which the metadata must describe
QUANTIZER_OPS = ("Quant", "BipolarQuant", "Trunc", "MultiThreshold", OP_TYPE)
#: no bound: a file's nodes are bounded by its bytes
_EVERY_NODE = 1 << 62


def check_domains(model: onnx.ModelProto, where: str, error=QfvError) -> None:
    """Raise ``error`` if a node, in the graph or in any subgraph a node carries, uses an op
    domain outside :data:`ALLOWED_DOMAINS`."""
    for at in walk_nodes(model.graph, max_nodes=_EVERY_NODE):
        if at.node.domain not in ALLOWED_DOMAINS:
            raise error(f"{where}: {at.label()} uses the op domain {shown(at.node.domain)}, "
                        "which is not ONNX, QONNX or qfv-brevitas; refusing to run it (qonnx "
                        "would import that module to execute the node)")


def graph_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the graph (nodes, initializers, inputs, outputs), metadata excluded."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def graph_problems(model: onnx.ModelProto, info: dict) -> List[str]:
    """Where the graph disagrees with its metadata ``info`` (empty if nowhere): each layer
    checked by its form (:meth:`~qfv_brevitas.export.forms.ExportForm.graph_problems`)."""
    try:
        form = form_named(info.get("form"))
    except ExportError as e:
        return [f"the metadata's form: {e}"]
    view = GraphView.of(model)
    problems: List[str] = []
    for row in info.get("layers", []):
        try:
            problems += form.graph_problems(row, view)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            problems.append(f"layer {row.get('layer')!r}: malformed metadata or graph ({e})")
    return problems + coverage_problems(model, info, form)


def _weight_inputs(node: onnx.NodeProto, const) -> List[str]:
    """The constant operands of a compute node: its weights (a MatMul may hold them on
    either side)."""
    slots = (0, 1) if node.op_type == "MatMul" else (1,)
    return [node.input[i] for i in slots if i < len(node.input) and node.input[i] in const]


def coverage_problems(model: onnx.ModelProto, info: dict, form: ExportForm) -> List[str]:
    """Where the graph's quantized layers and the metadata's layers differ: a compute node
    (Conv, Gemm, MatMul, ConvTranspose) whose constant weights come through a quantizer
    (:data:`QUANTIZER_OPS`) but are none of the tensors the metadata names for its layers
    (:meth:`~qfv_brevitas.export.forms.ExportForm.layer_tensors`), or a metadata layer whose
    tensors no compute node takes as weights. Empty if they agree."""
    rows = [r for r in info.get("layers", []) if isinstance(r, dict)]
    owner: Dict[str, int] = {}
    for i, row in enumerate(rows):
        try:
            for t in form.layer_tensors(row):
                if isinstance(t, str) and t:
                    owner.setdefault(t, i)
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # a malformed row: graph_problems says so
    const = constant_tensors(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    used, extra = set(), []
    for n in model.graph.node:
        if n.op_type not in COMPUTE_OPS or n.domain not in ("", "ai.onnx"):
            continue
        for w in _weight_inputs(n, const):
            if w in owner:
                used.add(owner[w])
                continue
            quants = [q for q in upstream(w, producers) if q.op_type in QUANTIZER_OPS]
            if quants:
                extra.append(f"{NodeAt(n, '').label()} takes quantized weights (from "
                             f"{NodeAt(quants[0], '').label()}) that the metadata does not "
                             "describe as a layer")
    missing = [f"layer {shown(r.get('layer'))} of the metadata is not in the graph: no "
               f"{'/'.join(COMPUTE_OPS)} node takes its weights"
               for i, r in enumerate(rows) if i not in used]
    return extra + missing


def _canonical(model: onnx.ModelProto):
    """Nodes with tensor names replaced by their order of appearance, and each initializer
    under that name: two exports of one model agree here whatever random names cleanup gave."""
    g, names = model.graph, {}

    def nm(t: str) -> str:
        return "" if not t else names.setdefault(t, f"%{len(names)}")

    for i in g.input:
        nm(i.name)
    nodes = []
    for n in g.node:
        attrs = tuple(sorted((a.name, a.SerializeToString()) for a in n.attribute))
        nodes.append((n.domain, n.op_type, tuple(nm(i) for i in n.input),
                      tuple(nm(o) for o in n.output), attrs, n))
    outs = tuple(nm(o.name) for o in g.output)
    inits = {}
    for i in g.initializer:
        inits[names.get(i.name, f"unused {i.name}")] = (i.name, numpy_helper.to_array(i))
    return nodes, outs, inits


def compare_graphs(expected: onnx.ModelProto, actual: onnx.ModelProto, limit: int = 12
                   ) -> List[str]:
    """Every difference between ``actual`` and ``expected``: node types, connections,
    attributes, and every parameter (weights, biases, codes, scales, zero points, bit widths,
    thresholds) bit for bit. Empty when they are the same graph up to tensor names."""
    en, eo, ei = _canonical(expected)
    an, ao, ai = _canonical(actual)
    diffs: List[str] = []
    if len(en) != len(an):
        diffs.append(f"the file has {len(an)} nodes, the checkpoint's export {len(en)}")
    users: Dict[str, str] = {}
    for e, a in zip(en, an):
        node = a[5]
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        if e[:2] != a[:2]:
            diffs.append(f"{label}: expected a {e[1]} node here")
            break
        if e[2] != a[2] or e[3] != a[3] or e[4] != a[4]:
            diffs.append(f"{label}: other inputs, outputs or attributes than in the checkpoint's "
                         "export")
        for pos, t in enumerate(a[2]):
            users.setdefault(t, f"input {pos} of {label}")
    if eo != ao:
        diffs.append("the graph outputs differ from the checkpoint's export")
    for key in sorted(set(ei) | set(ai)):
        if key not in ai or key not in ei:
            diffs.append(f"parameter {key}: only in the {'file' if key in ai else 'export'}")
            continue
        name, a = ai[key]
        _, e = ei[key]
        if a.dtype != e.dtype or a.shape != e.shape:
            diffs.append(f"parameter {name!r} ({users.get(key, 'unused')}): {a.dtype} "
                         f"{a.shape} in the file, {e.dtype} {e.shape} in the checkpoint's export")
        elif a.tobytes() != e.tobytes():
            diff = ""
            if np.issubdtype(a.dtype, np.number):
                d = np.abs(a.astype(np.float64) - e.astype(np.float64))
                j = int(np.argmax(d))
                diff = (f": max |diff| {d.max():.4g} at index {j} (file {a.reshape(-1)[j]!r}, "
                        f"checkpoint {e.reshape(-1)[j]!r})")
            diffs.append(f"parameter {name!r} ({users.get(key, 'unused')}) differs{diff}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs
