"""Checks of an exported graph against its metadata and against a fresh export.

- :func:`check_domains`: every node's op domain is ONNX, QONNX or this library's: qonnx imports
  a node's domain as a Python module to run it, so a file naming another module is refused
  before anything runs.
- :func:`graph_digest`: the SHA-256 of the graph stored beside the metadata at export time, so
  any later change of a weight, code or scale (a flipped byte) is noticed.
- :func:`graph_problems`: each layer of the metadata against the graph (``qfv inspect``), by
  the file's form (``qfv_brevitas.export.forms``): bit width, ``r`` and ``c`` exactly, codes /
  bit planes / fixed-point integers in range, the plane-parallel form's 1-bit planes, integer
  multipliers and offsets.
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
from qfv_brevitas.export.forms import GraphView, form_named
from qfv_brevitas.export.ops import DOMAIN
from qfv_brevitas.util.errors import QfvError

__all__ = ["ALLOWED_DOMAINS", "check_domains", "graph_digest", "graph_problems",
           "compare_graphs"]

#: Op domains a file of this library may use: standard ONNX, QONNX's op set, and its own.
ALLOWED_DOMAINS = ("", "ai.onnx", "qonnx.custom_op.general", DOMAIN)


def check_domains(model: onnx.ModelProto, where: str, error=QfvError) -> None:
    """Raise ``error`` if a node uses an op domain outside :data:`ALLOWED_DOMAINS`."""
    for n in model.graph.node:
        if n.domain not in ALLOWED_DOMAINS:
            raise error(f"{where}: node {n.name or n.op_type!r} uses the op domain {n.domain!r}, "
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
    return problems


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
