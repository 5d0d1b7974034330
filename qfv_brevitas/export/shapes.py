"""The shapes a graph computes, inferred by onnx before anything runs it, and their bounds.

A file's declared shapes are only what it says: a broadcasting ``Add`` of a ``(N, 1)`` input
and a ``(1, M)`` weight computes ``N x M`` values whatever the file declares, and qonnx
allocates what the declarations say. So onnx's own shape inference (strict: a declared shape
that disagrees with the inferred one is an error) runs over a stand-in of the graph in which
the forms' custom ops are shape-equal standard ops (qonnx's ``Quant``, ``BipolarQuant``,
``Trunc``: the shape of their input; ``NMultWeight``: the shape of its codes), and every node's
outputs must come out with static shapes within
:data:`~qfv_brevitas.export.structure.MAX_TENSOR_ELEMENTS`, and all of them together within
:func:`~qfv_brevitas.export.structure.element_budget` (qonnx keeps every one); each must also
be declared in the file (an export declares every tensor; qonnx runs nothing else). The
stand-in keeps the large initializers as typed graph inputs (their data is not needed for
shapes), so it costs the graph's structure, not its weights, in memory.
"""
from __future__ import annotations

from typing import Dict, List

import onnx
from onnx import TensorProto, helper

from qfv_brevitas.export.graph import QONNX_DOMAIN
from qfv_brevitas.export.ops import DOMAIN, OP_TYPE
from qfv_brevitas.export.structure import (MAX_PROBLEMS, MAX_RANK, MAX_TENSOR_ELEMENTS,
                                           element_budget, shown)

__all__ = ["inferred_shape_problems", "stand_in"]

#: custom ops whose output has the shape of their first input
_SAME_SHAPE = {(QONNX_DOMAIN, "Quant"), (QONNX_DOMAIN, "BipolarQuant"),
               (QONNX_DOMAIN, "Trunc")}
#: initializers up to this many elements stay (shape constants feed Reshape's inference)
_KEEP_ELEMENTS = 64


def _stand_in_node(n: onnx.NodeProto) -> onnx.NodeProto:
    if (n.domain, n.op_type) in _SAME_SHAPE:
        return helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name)
    if (n.domain, n.op_type) == (DOMAIN, OP_TYPE):
        return helper.make_node("Cast", [n.input[0]], [n.output[0]], name=n.name,
                                to=TensorProto.FLOAT)
    return n


def stand_in(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for onnx's shape inference: custom ops replaced by shape-equal
    standard ones, initializers over a few elements turned into typed graph inputs."""
    g = model.graph
    keep = [t for t in g.initializer if len(t.dims) <= MAX_RANK and
            _size(t.dims) <= _KEEP_ELEMENTS]
    moved = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in g.initializer if len(t.dims) > MAX_RANK or _size(t.dims) > _KEEP_ELEMENTS]
    graph = helper.make_graph([_stand_in_node(n) for n in g.node], g.name or "graph",
                              list(g.input) + moved, list(g.output), keep,
                              value_info=list(g.value_info))
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    out = helper.make_model(graph, opset_imports=opsets)
    out.ir_version = model.ir_version
    return out


def _size(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return shown(lines[-1] if lines else type(e).__name__, 200)


def _inferred_types(model: onnx.ModelProto):
    """Tensor name -> type onnx infers for ``model``'s stand-in; raises onnx's errors."""
    inferred = onnx.shape_inference.infer_shapes(stand_in(model), check_type=True,
                                                 strict_mode=True, data_prop=True)
    g = inferred.graph
    return {vi.name: vi.type for vi in [*g.input, *g.output, *g.value_info]}


def inferred_shape_problems(model: onnx.ModelProto) -> List[str]:
    """Where the shapes onnx infers for ``model`` (see the module doc) disagree with the
    declared ones, are not static, exceed the bounds, or are not declared; empty if nowhere
    (the sizes first: they say most about a file). Call it on a graph that passed
    :func:`~qfv_brevitas.export.structure.static_problems` (its ops are the forms' own, its
    declarations bounded)."""
    try:
        types: Dict[str, onnx.TypeProto] = _inferred_types(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError,
            RuntimeError) as e:
        return [f"the graph's shapes do not add up: {_first_line(e)}"]
    inits = {t.name for t in model.graph.initializer}
    declared = {vi.name for vi in [*model.graph.output, *model.graph.value_info]
                if vi.type.tensor_type.HasField("shape")}
    sizes: List[str] = []
    undeclared: List[str] = []
    total = 0
    for n in model.graph.node:
        for o in n.output:
            if not o or o in inits:
                continue
            where = f"tensor {shown(o)} (output of {shown(n.op_type, 40)} node {shown(n.name)})"
            t = types.get(o)
            dims = t.tensor_type.shape.dim if t is not None and \
                t.tensor_type.HasField("shape") else None
            if dims is None or any(not d.HasField("dim_value") for d in dims):
                sizes.append(f"{where}: its shape cannot be inferred before running the graph")
            elif _size(d.dim_value for d in dims) > MAX_TENSOR_ELEMENTS:
                sizes.append(f"{where} would hold {_size(d.dim_value for d in dims)} elements "
                             f"(at most {MAX_TENSOR_ELEMENTS} per tensor)")
            else:
                total += _size(d.dim_value for d in dims)
                if o not in declared:
                    undeclared.append(f"{where} has no declared shape (qonnx runs only a graph "
                                      "whose every tensor is declared, as an export's is)")
    budget = element_budget(model.graph)
    if total > budget:
        sizes.append(f"the graph's nodes would compute {total} elements in all (at most "
                     f"{budget} for this file's weights)")
    return (sizes + undeclared)[:MAX_PROBLEMS]
