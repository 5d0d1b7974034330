"""Checks of an exported graph against its metadata and against a fresh export.

- :func:`check_domains`: every node's op domain is ONNX, QONNX or this library's: qonnx imports
  a node's domain as a Python module to run it, so a file naming another module is refused
  before anything runs.
- :func:`graph_digest`: the SHA-256 of the graph stored beside the metadata at export time, so
  any later change of a weight, code or scale (a flipped byte) is noticed.
- :func:`graph_problems`: each layer of the metadata against the graph (``qfv inspect``):
  bit width, ``r`` and ``c`` exactly, codes / bit planes / fixed-point integers in range,
  the plane-parallel form's 1-bit planes, integer multipliers and offsets.
- :func:`compare_graphs`: two graphs node by node and parameter by parameter, exactly
  (``qfv verify``: the file against what its checkpoint exports).
"""
from __future__ import annotations

import hashlib
from typing import Dict, List

import numpy as np
import onnx
from onnx import numpy_helper

from qfv_brevitas.export.ops import DOMAIN, OP_TYPE
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


def _constants(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _upstream(tensor: str, producers) -> list:
    nodes, seen, stack = [], set(), [tensor]
    while stack:
        n = producers.get(stack.pop())
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        nodes.append(n)
        stack.extend(t for t in n.input if t)
    return nodes


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.size == b.size and np.array_equal(a.reshape(-1).astype(np.float32),
                                               b.reshape(-1).astype(np.float32))


def _fmt(a) -> str:
    a = np.asarray(a).reshape(-1)
    s = ", ".join(f"{v:.6g}" for v in a[:4])
    return f"[{s}{', ...' if a.size > 4 else ''}]"


def _level_table(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``(G, 2**N)`` levels summed bit by bit in the export's order (float64 for dyadics)."""
    n = r.shape[1]
    k = np.arange(1 << n)
    b = (k[:, None] >> np.arange(n)) & 1
    return c[:, None] + (b[None, :, :] * r[:, None, :]).sum(-1)


def _groups(t: np.ndarray, axis: int) -> np.ndarray:
    if axis < 0:
        return t.reshape(1, -1)
    return np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)


def graph_problems(model: onnx.ModelProto, info: dict) -> List[str]:
    """Where the graph disagrees with its metadata ``info`` (empty if nowhere)."""
    problems: List[str] = []
    consts = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    form = info.get("form")
    users: Dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    for row in info.get("layers", []):
        try:
            if form == "planes":
                problems += _planes_problems(row, consts, producers, users)
            else:
                problems += _layer_problems(row, form, consts, producers)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            problems.append(f"layer {row.get('layer')!r}: malformed metadata or graph ({e})")
    return problems


def _is_unit_quant(q, consts, bits: int = 1, signed: bool = False) -> bool:
    """A QONNX ``Quant`` node with scale 1, zero point 0, this bit width and signedness."""
    if q is None or q.op_type != "Quant" or len(q.input) < 4:
        return False
    scale, zero, width = (consts.get(t) for t in q.input[1:4])
    return (scale is not None and zero is not None and width is not None and _same(scale, 1.0)
            and _same(zero, 0.0) and _same(width, float(bits))
            and bool(_attr(q, "signed", 1)) == signed)


def _planes_problems(row, consts, producers, users) -> List[str]:
    """The plane-parallel form: per layer N 0/1 planes behind 1-bit unsigned ``Quant`` nodes,
    each feeding one ``Conv``/``MatMul``; the integer multipliers per plane and the integer
    offsets equal to the metadata's ``r``, ``c`` rounded to ``2**-f``; the scale ``2**-f``."""
    layer, bits = row["layer"], int(row["bits"])
    shape = tuple(row["weight_shape"])
    at = f"layer {layer!r}"
    pl, fx = row["planes"], row["fixed_point"]
    t = pl["tensors"]
    f = int(pl["frac_bits"])
    out: List[str] = []
    if f != int(fx["frac_bits"]):
        out.append(f"{at}: planes at f = {f} but fixed point at f = {fx['frac_bits']}")
    r = np.asarray(row["r"], np.float64)
    c = np.asarray(row["c"], np.float64)
    m = np.asarray(pl["multipliers"], np.float64)
    mc = np.asarray(pl["offset"], np.float64)
    if m.shape != r.shape or mc.shape != c.shape:
        return [f"{at}: the metadata's multipliers {m.shape} / offset {mc.shape} do not fit r "
                f"{r.shape} / c {c.shape}"]
    if not (np.array_equal(m, np.round(r * 2.0 ** f))
            and np.array_equal(mc, np.round(c * 2.0 ** f))):
        out.append(f"{at}: the integer multipliers / offset are not r, c rounded to 2^-{f}")
    out_ch = shape[0]
    if m.shape[0] == 1:
        m, mc = np.repeat(m, out_ch, 0), np.repeat(mc, out_ch, 0)
    layout = shape if t.get("layout") != "matmul" else (shape[1], shape[0])
    if len(t["planes"]) != bits or len(t["plane_outputs"]) != bits or \
            len(t["multipliers"]) != bits:
        return out + [f"{at}: {len(t['planes'])} planes in the metadata for {bits} bits"]
    for k, (name, q_out, mult) in enumerate(zip(t["planes"], t["plane_outputs"],
                                                t["multipliers"])):
        plane = consts.get(name)
        if plane is None or tuple(plane.shape) != layout or not np.isin(plane, (0.0, 1.0)).all():
            out.append(f"{at}: bit plane {k} ({name!r}) is not a 0/1 constant of shape {layout}")
        q = producers.get(q_out)
        if q is None or q.input[0] != name or not _is_unit_quant(q, consts):
            out.append(f"{at}: bit plane {k} is not read through a 1-bit unsigned Quant node "
                       "with scale 1")
        ops = sorted({n.op_type for n in users.get(q_out, [])})
        if ops not in (["Conv"], ["MatMul"]):
            out.append(f"{at}: bit plane {k} feeds {ops or 'nothing'}, not one Conv/MatMul")
        v = consts.get(mult)
        if v is None or not _same(v, m[:, k]):
            out.append(f"{at}: plane {k}'s multipliers in the graph {_fmt(v)} are not the "
                       f"metadata's {_fmt(m[:, k])}")
    scale = consts.get(t["scale"])
    if scale is None or not _same(scale, 2.0 ** -f):
        out.append(f"{at}: the planes' scale is {_fmt(scale)}, the metadata says 2^-{f}")
    if pl.get("offset_layer"):
        ones = consts.get(t.get("ones"))
        if ones is None or not np.all(ones == 1.0):
            out.append(f"{at}: the offset layer's weights are not all ones")
        if not _is_unit_quant(producers.get(t.get("ones_output")), consts):
            out.append(f"{at}: the all-ones weights are not read through a 1-bit Quant node")
        off = consts.get(t.get("offset"))
        if off is None or not _same(off, mc):
            out.append(f"{at}: the integer offsets in the graph {_fmt(off)} are not the "
                       f"metadata's {_fmt(mc)}")
    elif np.any(mc != 0):
        out.append(f"{at}: nonzero offsets but no offset layer")
    return out


def _layer_problems(row, form, consts, producers) -> List[str]:
    layer, wt, bits = row["layer"], row["weight_tensor"], int(row["bits"])
    shape, axis = tuple(row["weight_shape"]), int(row.get("axis", -1))
    r = np.asarray(row["r"], dtype=np.float32)
    c = np.asarray(row["c"], dtype=np.float32)
    at = f"layer {layer!r}"
    if r.ndim != 2 or r.shape[1] != bits or c.shape != (r.shape[0],):
        return [f"{at}: the metadata's r {r.shape} / c {c.shape} do not fit {bits} bits"]
    node = producers.get(wt)
    if node is None:
        return [f"{at}: no node computes its weight tensor {wt!r}"]
    out: List[str] = []
    if form == "compact":
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            return [f"{at}: its weight comes from a {node.op_type} node, not {OP_TYPE}"]
        for name, want in (("bit_width", bits), ("axis", axis)):
            if _attr(node, name) != want:
                out.append(f"{at}: the {OP_TYPE} node's {name} is {_attr(node, name)!r}, the "
                           f"metadata says {want!r}")
        if (_attr(node, "layer") or b"").decode() != layer:
            out.append(f"{at}: the {OP_TYPE} node belongs to layer {_attr(node, 'layer')!r}")
        codes, gr, gc = (consts.get(t) for t in node.input[:3])
        if codes is None or gr is None or gc is None:
            return out + [f"{at}: codes, r and c must be constants of the file"]
        if codes.dtype != np.uint8 or tuple(codes.shape) != shape:
            out.append(f"{at}: codes are {codes.dtype} {tuple(codes.shape)}, expected uint8 "
                       f"{shape}")
        elif codes.size and int(codes.max()) >= 1 << bits:
            bad = int(np.argmax(codes.reshape(-1) >= 1 << bits))
            out.append(f"{at}: code {int(codes.reshape(-1)[bad])} at flat index {bad} is out of "
                       f"the {bits}-bit range 0..{(1 << bits) - 1}")
        if not _same(gr, r) or gr.shape != r.shape:
            out.append(f"{at}: r in the graph {_fmt(gr)} differs from the metadata's {_fmt(r)}")
        if not _same(gc, c):
            out.append(f"{at}: c in the graph {_fmt(gc)} differs from the metadata's {_fmt(c)}")
    elif form == "bitplanes":
        sub = _upstream(wt, producers)
        quants = [n for n in sub if n.op_type == "Quant"]
        if not quants:
            out.append(f"{at}: no bit planes in its weight graph")
        for q in quants:
            plane, scale, zero, width = (consts.get(t) for t in q.input[:4])
            if plane is None or tuple(plane.shape) != shape or \
                    not np.isin(plane, (0.0, 1.0)).all():
                out.append(f"{at}: bit plane {q.input[0]!r} is not a 0/1 tensor of shape {shape}")
            if not (_same(scale, 1.0) and _same(zero, 0.0) and _same(width, 1.0)) or \
                    _attr(q, "signed", 1) != 0:
                out.append(f"{at}: plane quantizer {q.name or q.output[0]!r} is not 1-bit "
                           "unsigned with scale 1")
        operands = [consts[t] for n in sub if n.op_type in ("Mul", "Add") for t in n.input
                    if t in consts]
        for k in range(bits):
            if not any(_same(v, r[:, k]) for v in operands):
                out.append(f"{at}: the metadata's multiplier r_{k} = {_fmt(r[:, k])} is not in "
                           "the graph")
        if not any(_same(v, c) for v in operands):
            out.append(f"{at}: the metadata's offset c = {_fmt(c)} is not in the graph")
        if not row.get("variability"):
            known = [r[:, k] for k in range(bits)] + [c]
            for v in operands:
                if v.size == r.shape[0] and not any(_same(v, w) for w in known):
                    out.append(f"{at}: constant {_fmt(v)} in its weight graph is neither a "
                               "multiplier r nor the offset c of the metadata")
    elif form == "fixed":
        fx = row.get("fixed_point") or {}
        if node.op_type != "Quant":
            return [f"{at}: its weight comes from a {node.op_type} node, not Quant"]
        values, scale, zero, width = (consts.get(t) for t in node.input[:4])
        f = int(fx["frac_bits"])
        if values is None or tuple(values.shape) != shape:
            return out + [f"{at}: its fixed-point weights are not a constant of shape {shape}"]
        if not _same(scale, 2.0 ** -f) or not _same(zero, 0.0):
            out.append(f"{at}: the Quant scale is {_fmt(scale)}, the metadata says 2^-{f}")
        if not _same(width, fx["int_bits"]) or bool(_attr(node, "signed", 1)) != fx["signed"]:
            out.append(f"{at}: the Quant node is {_fmt(width)}-bit "
                       f"{'signed' if _attr(node, 'signed', 1) else 'unsigned'}, the metadata "
                       f"says {fx['int_bits']}-bit {'signed' if fx['signed'] else 'unsigned'}")
        ints = values.astype(np.float64) * 2.0 ** f  # the Quant input: integer * 2^-f
        if not np.array_equal(ints, np.round(ints)) or ints.min() < fx["int_min"] or \
                ints.max() > fx["int_max"]:
            out.append(f"{at}: fixed-point integers outside {fx['int_min']}..{fx['int_max']} or "
                       "not integers")
        else:
            table = _level_table(np.asarray(fx["r_fixed"], np.float64),
                                 np.asarray(fx["c_fixed"], np.float64)) * 2.0 ** f
            g = _groups(ints, axis)
            for i in range(g.shape[0]):
                if not np.isin(g[i], table[i if table.shape[0] > 1 else 0]).all():
                    out.append(f"{at}: a weight (channel {i}) is not a level of the metadata's "
                               "fixed-point r and c")
                    break
    return out


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
