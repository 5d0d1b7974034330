"""What a graph from a file may hold, checked before anything walks it deeply or runs it.

An ONNX file is a program: qonnx imports a node's op domain as a Python module to run it,
``Loop``/``Scan`` run as long as their trip count says, a value-info entry sizes the buffers
qonnx allocates, and a broadcasting op's output can be far larger than the file. A file a user
gives is held to what this library's export forms write (:data:`ALLOWED_OPS`, collected from
the forms' own exports and kept by a test that exports every form), walked everywhere, also in
the subgraphs a node attribute carries:

- every node (subgraphs included) in an allowed op domain with an allowed op type; control
  flow (``Loop``, ``If``, ``Scan``) and any node carrying a subgraph refused by name, with
  where it is; no model-local functions;
- at most :data:`MAX_NODES` nodes; attributes of the kinds the forms use, each at most
  :data:`MAX_ATTR_ITEMS` long; names at most :data:`MAX_NAME_CHARS`;
- IR version and opsets within what this onnx knows, one entry per domain;
- declared tensor types: tensors only, rank at most :data:`MAX_RANK`, every dimension at most
  :data:`MAX_DIM`, at most :data:`MAX_TENSOR_ELEMENTS` elements each and
  :func:`element_budget` in all (qonnx allocates every declared tensor up front);
- initializers and constant attributes consistent with their bytes (``dims`` product x item
  size = the bytes stored), of the element types the forms write, never external data;
- the shapes onnx infers for every node's outputs (the forms' custom ops stood in for by
  shape-equal standard ops) within the same bounds, and equal to any that the file declares.

:func:`static_problems` lists what is wrong with all but the inferred shapes
(:mod:`qfv_brevitas.export.shapes`); :mod:`qfv_brevitas.export.untrusted` runs both on every
file a user gives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

import onnx
from onnx import AttributeProto, TensorProto, helper

from qfv_brevitas.export.graph import QONNX_DOMAIN
from qfv_brevitas.export.ops import DOMAIN, OP_TYPE, OP_VERSION

__all__ = ["ALLOWED_OPS", "ALLOWED_DTYPES", "CONTROL_FLOW", "MAX_NODES", "MAX_RANK",
           "MAX_DIM", "MAX_TENSOR_ELEMENTS", "MAX_DECLARED_ELEMENTS", "DECLARED_PER_STORED",
           "element_budget", "MAX_ATTR_ITEMS",
           "MAX_NAME_CHARS", "MIN_OPSET", "MAX_PROBLEMS", "NodeAt", "walk_nodes", "shown",
           "tensor_problems", "static_problems"]

#: Op types per op domain that the export forms write (``tools/export_ops.py`` exports every
#: form of the zoo's models with both exporters and prints what they hold; the test
#: ``tests/export/test_structure.py`` keeps every form's output within this list).
ALLOWED_OPS: Dict[str, FrozenSet[str]] = {
    "": frozenset({
        # the layers around the quantized ones (Linear, Conv, BatchNorm, pools, residual adds)
        "Add", "AveragePool", "BatchNormalization", "Conv", "Flatten", "Gemm",
        "GlobalAveragePool", "MatMul", "MaxPool", "Mul", "ReduceMean", "Relu", "Reshape",
        # the spiking models' LIF neurons unrolled over time
        "Cast", "Concat", "Div", "GreaterOrEqual", "Slice", "Squeeze", "Sub", "Unsqueeze"}),
    QONNX_DOMAIN: frozenset({"BipolarQuant", "Quant", "Trunc"}),
    DOMAIN: frozenset({OP_TYPE}),
}
#: the default domain's other spelling
_ONNX_DOMAINS = ("", "ai.onnx")
#: ops that run a subgraph: refused by name wherever they are
CONTROL_FLOW = ("Loop", "If", "Scan")
#: element types of initializers, constants and declared tensors the forms write (bool: the
#: spiking neurons' comparisons)
ALLOWED_DTYPES: FrozenSet[int] = frozenset({TensorProto.FLOAT, TensorProto.UINT8,
                                            TensorProto.INT64, TensorProto.BOOL})
#: attribute kinds the forms write (no subgraphs, sparse tensors or type protos)
_ATTR_TYPES = {AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.STRING,
               AttributeProto.TENSOR, AttributeProto.FLOATS, AttributeProto.INTS,
               AttributeProto.STRINGS}
_SUBGRAPH_TYPES = {AttributeProto.GRAPH, AttributeProto.GRAPHS}

#: nodes in a file, all graphs together (the largest export measured, ResNet-18 in the
#: plane-parallel form, has 466)
MAX_NODES = 10_000
#: tensor rank (Conv3d weights are rank 5)
MAX_RANK = 8
#: one dimension of a tensor
MAX_DIM = 1 << 24
#: elements of one tensor, declared or inferred (64 MiB of float32)
MAX_TENSOR_ELEMENTS = 1 << 24
#: elements of all declared tensors together (qonnx allocates them all before running),
#: beyond :data:`DECLARED_PER_STORED` per element stored in the file: a weight-side subgraph
#: (bit planes, their products and sums) computes a few tensors of each weight's size
MAX_DECLARED_ELEMENTS = 1 << 26
#: declared elements allowed per element of the file's initializers (ResNet-18's bit-plane
#: form declares 4 per stored element)
DECLARED_PER_STORED = 8
#: items of one list attribute (kernel shapes, pads, strides: a few per spatial axis)
MAX_ATTR_ITEMS = 64
#: characters of a name or string attribute
MAX_NAME_CHARS = 4096
#: the oldest default-domain opset a form writes against
MIN_OPSET = 13
#: versions of the non-default domains
_DOMAIN_VERSIONS = {QONNX_DOMAIN: (1, 2), DOMAIN: (OP_VERSION, OP_VERSION)}
#: problems listed before the walk stops (a hostile file may hold millions)
MAX_PROBLEMS = 20


def shown(name: str, limit: int = 60) -> str:
    """A name from a file as it may be printed: quoted, control characters escaped,
    shortened."""
    text = str(name)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


@dataclass
class NodeAt:
    """A node and where it sits: ``where`` is "" for the main graph, else the chain of nodes
    and attributes whose subgraph holds it."""

    node: onnx.NodeProto
    where: str

    def label(self) -> str:
        n = self.node
        name = n.name or (n.output[0] if n.output else "")
        inside = f" inside {self.where}" if self.where else ""
        return f"{shown(n.op_type, 40)} node {shown(name)}{inside}"


def walk_nodes(graph: onnx.GraphProto, max_nodes: int = MAX_NODES) -> Iterator[NodeAt]:
    """Every node of ``graph`` and of every subgraph a node attribute carries (``GRAPH``,
    ``GRAPHS``: Loop, If, Scan, or any custom op), depth first, at most ``max_nodes + 1``
    (the caller sees that there are too many)."""
    stack: List[Tuple[onnx.GraphProto, str]] = [(graph, "")]
    seen = 0
    while stack:
        g, where = stack.pop()
        for n in g.node:
            seen += 1
            yield NodeAt(n, where)
            if seen > max_nodes:
                return
            at = NodeAt(n, where).label()
            for a in n.attribute:
                subs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)
                stack.extend((s, f"{at} (attribute {shown(a.name, 40)})") for s in subs)


def _dtype_name(code: int) -> str:
    return TensorProto.DataType.Name(code) if code in TensorProto.DataType.values() \
        else f"{code} (unknown)"


def _elements(dims) -> int:
    return math.prod(int(d) for d in dims)


def _dims_problem(dims, what: str) -> Optional[str]:
    if len(dims) > MAX_RANK:
        return f"{what} has rank {len(dims)} (at most {MAX_RANK})"
    bad = [int(d) for d in dims if not 0 <= int(d) <= MAX_DIM]
    if bad:
        return f"{what} has dimension {bad[0]} (each in 0..{MAX_DIM})"
    if _elements(dims) > MAX_TENSOR_ELEMENTS:
        return (f"{what} has {_elements(dims)} elements (at most {MAX_TENSOR_ELEMENTS} per "
                "tensor)")
    return None


def tensor_problems(t: TensorProto, what: str) -> List[str]:
    """A stored tensor (initializer or constant attribute): its data here, of an allowed
    element type, its dimensions bounded and its bytes exactly what they say."""
    if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
        return [f"{what} keeps its data in an external file; external data is refused (an "
                "export of this library stores every tensor in the .onnx file)"]
    if t.HasField("segment"):
        return [f"{what} is a segment of a tensor; refused"]
    if t.data_type not in ALLOWED_DTYPES:
        return [f"{what} has element type {_dtype_name(t.data_type)}, not one the export "
                "forms write"]
    p = _dims_problem(t.dims, what)
    if p:
        return [p]
    n = _elements(t.dims)
    field = helper.tensor_dtype_to_field(t.data_type)
    typed = len(getattr(t, field))
    stored = [f for f in ("float_data", "int32_data", "int64_data", "double_data",
                          "uint64_data", "string_data") if len(getattr(t, f))]
    if stored and (t.raw_data or stored != [field]):
        fields = ", ".join(stored + ["raw_data"] * bool(t.raw_data))
        return [f"{what} stores its values in {fields}; one field ({field} or raw_data) "
                "expected"]
    if t.raw_data:
        want = n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if len(t.raw_data) != want:
            return [f"{what} has dims {list(t.dims)} ({n} elements, {want} bytes) but "
                    f"{len(t.raw_data)} bytes of data"]
    elif typed != n:
        return [f"{what} has dims {list(t.dims)} ({n} elements) but {typed} stored values"]
    return []


def _attribute_problems(at: NodeAt) -> List[str]:
    out = []
    for a in at.node.attribute:
        what = f"attribute {shown(a.name, 40)} of {at.label()}"
        if a.type in _SUBGRAPH_TYPES:
            out.append(f"{what} carries a subgraph; no export form writes one")
        elif a.type not in _ATTR_TYPES or a.ref_attr_name:
            out.append(f"{what} is of kind {a.type}, not one the export forms write")
        elif max(len(a.ints), len(a.floats), len(a.strings), len(a.tensors)) > MAX_ATTR_ITEMS:
            out.append(f"{what} holds more than {MAX_ATTR_ITEMS} items")
        elif len(a.s) > MAX_NAME_CHARS or any(len(s) > MAX_NAME_CHARS for s in a.strings):
            out.append(f"{what} holds a string over {MAX_NAME_CHARS} characters")
        elif a.type == AttributeProto.TENSOR:
            out += tensor_problems(a.t, what)
    return out


def _node_problems(at: NodeAt) -> List[str]:
    n = at.node
    if n.op_type in CONTROL_FLOW:
        return [f"control flow: {at.label()}; no export form writes Loop, If or Scan (they run "
                "subgraphs as long as their inputs say)"]
    allowed = ALLOWED_OPS.get("" if n.domain in _ONNX_DOMAINS else n.domain)
    if allowed is None:
        return [f"{at.label()} uses the op domain {shown(n.domain)}, which is not ONNX, QONNX "
                "or qfv-brevitas; refusing it (qonnx would import that module to run the node)"]
    if n.op_type not in allowed:
        return [f"{at.label()}: op {shown(n.op_type, 40)} of domain {shown(n.domain or 'ai.onnx')} "
                "is not one the export forms write"]
    names = [n.name, *n.input, *n.output]
    if any(len(s) > MAX_NAME_CHARS for s in names) or \
            len(n.input) + len(n.output) > MAX_ATTR_ITEMS:
        return [f"{at.label()}: over {MAX_ATTR_ITEMS} inputs and outputs or a name over "
                f"{MAX_NAME_CHARS} characters"]
    return _attribute_problems(at)


def _version_problems(model: onnx.ModelProto) -> List[str]:
    out = []
    if not 3 <= model.ir_version <= onnx.IR_VERSION:
        out.append(f"IR version {model.ir_version} (this onnx reads 3..{onnx.IR_VERSION})")
    seen = set()
    top = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        d = "" if o.domain in _ONNX_DOMAINS else o.domain
        lo, hi = (MIN_OPSET, top) if d == "" else _DOMAIN_VERSIONS.get(d, (None, None))
        if d in seen:
            out.append(f"op domain {shown(o.domain)} is imported twice")
        elif lo is None:
            out.append(f"imports the op domain {shown(o.domain)}, which is not ONNX, QONNX or "
                       "qfv-brevitas; refusing it")
        elif not lo <= o.version <= hi:
            out.append(f"opset {o.version} of domain {shown(o.domain or 'ai.onnx')} (expected "
                       f"{lo}..{hi})")
        seen.add(d)
    if "" not in seen:
        out.append("no ONNX opset imported")
    if len(model.functions):
        out.append(f"{len(model.functions)} model-local function(s) (e.g. "
                   f"{shown(model.functions[0].name)}); no export form writes one")
    return out


def element_budget(g: onnx.GraphProto) -> int:
    """How many elements the tensors of ``g`` may hold together: :data:`MAX_DECLARED_ELEMENTS`
    plus :data:`DECLARED_PER_STORED` per element of its initializers (whose bytes are in the
    file: checked by :func:`tensor_problems`)."""
    stored = sum(_elements(t.dims) for t in g.initializer)
    return MAX_DECLARED_ELEMENTS + DECLARED_PER_STORED * stored


def _declared_problems(g: onnx.GraphProto) -> List[str]:
    """The declared types of the graph's inputs, outputs and value infos."""
    out, total = [], 0
    if not 1 <= len(g.input) <= MAX_ATTR_ITEMS or not 1 <= len(g.output) <= MAX_ATTR_ITEMS:
        out.append(f"the graph has {len(g.input)} inputs and {len(g.output)} outputs "
                   f"(1..{MAX_ATTR_ITEMS} each)")
    for vi in [*g.input, *g.output, *g.value_info]:
        what = f"tensor {shown(vi.name)}"
        if vi.type.WhichOneof("value") != "tensor_type":
            out.append(f"{what} is declared as a {vi.type.WhichOneof('value')}, not a tensor")
            continue
        tt = vi.type.tensor_type
        if tt.elem_type not in ALLOWED_DTYPES:
            out.append(f"{what} is declared with element type {_dtype_name(tt.elem_type)}, not "
                       "one the export forms write")
        dims = [d.dim_value for d in tt.shape.dim]
        p = _dims_problem(dims, what)
        if p:
            out.append(p)
        elif any(len(d.dim_param) > 64 for d in tt.shape.dim):
            out.append(f"{what} has a symbolic dimension name over 64 characters")
        else:
            total += _elements(dims)
    budget = element_budget(g)
    if total > budget:
        out.append(f"the declared tensors hold {total} elements in all (at most {budget} for "
                   "this file's weights: qonnx allocates every one before running)")
    return out


def static_problems(model: onnx.ModelProto) -> List[str]:
    """Everything in ``model`` outside what the export forms write, but for the inferred
    shapes (see the module doc), up to :data:`MAX_PROBLEMS`; empty if nothing. One walk over
    the nodes (subgraphs included), the stored tensors and the declarations."""
    out = _version_problems(model)
    g = model.graph
    for count, at in enumerate(walk_nodes(g), 1):
        if count > MAX_NODES:
            out.append(f"more than {MAX_NODES} nodes")
            break
        out += _node_problems(at)
        if len(out) >= MAX_PROBLEMS:
            return out
    if len(g.sparse_initializer):
        out.append("sparse initializers; no export form writes one")
    for t in g.initializer:
        out += tensor_problems(t, f"initializer {shown(t.name)}")
        if len(out) >= MAX_PROBLEMS:
            return out
    return out + _declared_problems(g)
