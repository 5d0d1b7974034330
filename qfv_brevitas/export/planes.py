"""The plane-parallel form: each N-multiplier layer as N parallel layers with 1-bit weights.

With the multipliers and the offset on the fixed-point grid ``m * 2**-f`` (as the ``fixed`` form
rounds them), a layer's weights are ``W = 2**-f (m_c + sum_k m_k B_k)`` with ``B_k`` the
{0, 1} bit planes of the codes the device holds, and since the layer is linear in its weights

    layer(x, W) = 2**-f * ( sum_k m_k * layer(x, B_k) + m_c * layer(x, 1) ) + bias

with ``m_k``, ``m_c`` integers per output channel (one value per layer for a per-tensor
quantizer). Each ``layer(x, B_k)`` is the original Conv/Gemm with 1-bit unsigned weights (a
standard QONNX ``Quant`` node, scale 1), so a deployment stores exactly N bits per weight plus
the integer multipliers. The offset term ``layer(x, 1)`` is the sum of the inputs over each
output's receptive field; it is the same for every output channel, so it is one extra layer with
a single all-ones output channel, followed by a ``1 -> out_channels`` layer (Gemm, or 1x1 Conv)
whose integer weights are ``m_c`` (for a grouped convolution, where each output channel sums
its own group: an all-ones layer of the full shape and a per-channel ``Mul`` by ``m_c``).
Everything is a standard op (``Quant``, ``Conv``/``Gemm``, ``Mul``, ``Add``), so FINN and hls4ml
map each plane to a layer with 1-bit weights.

:func:`planes_layer` computes a layer's integers; :func:`split_into_planes` rewrites an exported
graph (every layer's ``Conv``/``Gemm`` fed by ``<layer>.weight``) into that form;
:func:`file_weights` decodes the weights a plane-parallel file computes (for verification).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qfv_brevitas.export import fixedpoint as FX
from qfv_brevitas.export.layers import LayerExport
from qfv_brevitas.util.errors import QfvError

__all__ = ["check_layer", "planes_layer", "split_into_planes", "file_weights", "memory_bits",
           "PLANE_OPS"]

#: compute ops a layer may be exported as for this form (Linear: Gemm with transB=1)
PLANE_OPS = ("Conv", "Gemm")
_QONNX_DOMAIN = "qonnx.custom_op.general"


def _signed_width(values: Sequence[int]) -> int:
    """Bits of the smallest two's-complement (or unsigned, if no value is negative) integer
    type holding ``values`` (at least 2 when signed: a 1-bit signed ``Quant`` is not one that
    every runtime takes)."""
    bits, signed = FX.int_bits(int(min(values)), int(max(values)))
    return max(bits, 2) if signed else bits


def check_layer(info: LayerExport) -> None:
    """Raise ``ValueError`` naming the layer if the plane-parallel form cannot express it: a
    variability map (every cell has its own factor, not one per plane and channel), or
    multipliers along another axis than the output channels."""
    if info.lrs is not None or info.hrs is not None:
        raise QfvError(
            f"layer {info.name!r} has a variability map attached: in the plane-parallel form "
            "each plane is scaled by one integer multiplier per output channel, but a varying "
            "device gives every cell its own factor, which no per-channel multiplier "
            "expresses; export it in the 'compact' or 'bitplanes' form, or with device=False")
    if info.axis not in (-1, 0):
        raise QfvError(f"layer {info.name!r}: multipliers along weight axis {info.axis}; the "
                       "plane-parallel form scales output channels (axis 0) only")


@torch.no_grad()
def planes_layer(info: LayerExport, frac_bits: int) -> dict:
    """Round ``info``'s multipliers to ``2**-frac_bits`` (exactly as the fixed form does) and
    describe the layer's planes: integer multipliers ``m`` ``(G, N)`` and offset ``m_c``
    ``(G,)``, their widths, and the weight memory. Stored in ``info.extra["planes"]``.

    A variability map cannot be expressed this way (every cell has its own factor, not one per
    plane and channel): refused. Fault maps are fine: the planes hold the codes the chip holds.
    """
    check_layer(info)
    fx = FX.fixed_point_layer(info, frac_bits)
    s = 2.0 ** fx["frac_bits"]
    m = (torch.tensor(fx["r_fixed"], dtype=torch.float64) * s).round().long()
    mc = (torch.tensor(fx["c_fixed"], dtype=torch.float64) * s).round().long()
    n_weights = int(np.prod(info.weight_shape))
    row = {
        "frac_bits": fx["frac_bits"], "planes": info.bits,
        "multipliers": m.tolist(), "offset": mc.tolist(),
        "multiplier_bits": _signed_width(m.flatten().tolist()),
        "offset_bits": _signed_width(mc.tolist()),
        "offset_layer": bool((mc != 0).any()),
    }
    row["memory"] = memory_bits(info, row)
    row["memory"]["fixed_form_bits"] = n_weights * fx["int_bits"]
    info.extra["planes"] = row
    return row


def memory_bits(info: LayerExport, row: dict, groups: int = 1) -> dict:
    """Weight memory of a layer in the plane-parallel form, in bits: N bits per weight, the
    all-ones offset layer (one output channel of the weight's fan-in; for a grouped
    convolution one per output channel), and the integer multipliers (one per plane and
    output channel, plus the offset's)."""
    shape = info.weight_shape
    n = int(np.prod(shape))
    out_ch = shape[0]
    fan_in = n // out_ch
    planes = info.bits * n
    ones = (fan_in if groups == 1 else n) if row["offset_layer"] else 0
    mult = out_ch * info.bits * row["multiplier_bits"]
    off = out_ch * row["offset_bits"] if row["offset_layer"] else 0
    total = planes + ones + mult + off
    return {"weights": n, "plane_bits": planes, "ones_bits": ones, "multiplier_bits": mult,
            "offset_bits": off, "total_bits": total, "bits_per_weight": total / n}


# -- graph rewrite --------------------------------------------------------------------------------
def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _init(g: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
    return name


def _bshape(op: str, out_ch: int, rank: int) -> List[int]:
    """Shape of a per-output-channel constant broadcasting against the layer's output."""
    if op == "Conv":
        return [1, out_ch] + [1] * (rank - 2)
    return [1, out_ch]


def split_into_planes(model: onnx.ModelProto, layers: Sequence[LayerExport]) -> onnx.ModelProto:
    """Rewrite each layer's compute node (a ``Conv`` or ``Gemm`` whose weight input is the
    tensor ``<layer>.weight``) into its plane-parallel form (see the module docstring); the
    layer's old weight subgraph is removed. Tensors are named after the layer:
    ``<layer>.weight_plane<k>`` the 0/1 initializers (``..._q`` their ``Quant`` outputs),
    ``<layer>.mult<k>`` the integer multipliers, ``<layer>.weight_ones`` and
    ``<layer>.offset_mult`` the offset layers, ``<layer>.planes_scale`` ``2**-f``; each layer's
    ``info.extra["planes"]["tensors"]`` lists them. Raises ``ValueError`` naming the layer when
    its compute node is not one this form supports."""
    g = model.graph
    for info in layers:
        row = info.extra["planes"]
        wname = f"{info.name}.weight"
        users = [n for n in g.node if wname in list(n.input)]
        if len(users) != 1 or users[0].op_type not in PLANE_OPS or \
                list(users[0].input).index(wname) != 1:
            ops = sorted({n.op_type for n in users}) or ["nothing"]
            raise QfvError(
                f"layer {info.name!r}: its weights feed {', '.join(ops)}; the plane-parallel "
                f"form splits {' and '.join(PLANE_OPS)} layers only (Conv1d/2d/3d, Linear)")
        node = users[0]
        if node.op_type == "Gemm" and (_attr(node, "transB", 0) != 1 or _attr(node, "transA", 0)
                                       or _attr(node, "alpha", 1.0) != 1.0):
            raise QfvError(f"layer {info.name!r}: a Gemm other than x @ W.T (+ b) is not "
                           "supported by the plane-parallel form")
        _split_layer(model, node, info, row)
    _remove_dead_nodes(model)
    return model


def _split_layer(model: onnx.ModelProto, node: onnx.NodeProto, info: LayerExport, row: dict):
    g = model.graph
    L = info.name
    shape = list(info.weight_shape)
    out_ch = shape[0]
    op = node.op_type
    rank = len(shape) if op == "Conv" else 2
    bshape = _bshape(op, out_ch, rank)
    groups = int(_attr(node, "group", 1)) if op == "Conv" else 1
    m = np.asarray(row["multipliers"], dtype=np.float64)          # (G, N)
    mc = np.asarray(row["offset"], dtype=np.float64)              # (G,)
    if m.shape[0] == 1:
        m, mc = np.repeat(m, out_ch, 0), np.repeat(mc, out_ch, 0)
    # A Linear layer's planes are MatMuls with (in, out) weights: qonnx's GemmToMatMul (used
    # by hls4ml's and FINN's readers) needs a Gemm's bias input, which the planes do not have.
    matmul = op == "Gemm"
    lay = (lambda a: np.ascontiguousarray(a.T)) if matmul else (lambda a: a)
    x = node.input[0]
    new: List[onnx.NodeProto] = []
    zero = _init(g, f"{L}.planes_zero_point", np.zeros(()))
    one = _init(g, f"{L}.planes_unit_scale", np.ones(()))

    def quant(value: np.ndarray, name: str, bits: int, signed: bool) -> str:
        """A standard QONNX ``Quant`` node (scale 1, zero point 0) over an integer
        initializer ``name``; returns its output ``<name>_q``."""
        _init(g, name, value)
        width = _init(g, f"{name}_bit_width", np.asarray(float(bits)))
        new.append(helper.make_node("Quant", [name, one, zero, width], [f"{name}_q"],
                                    name=f"{name}_quant", domain=_QONNX_DOMAIN,
                                    signed=int(signed), narrow=0, rounding_mode="ROUND"))
        return f"{name}_q"

    def compute(inp: str, weight: str, out: str, conv_attrs: bool = True) -> str:
        """The layer's own Conv (same strides, pads, groups) or, for a Gemm, ``x @ W`` (a
        MatMul), no bias; ``conv_attrs=False``: a plain 1x1 convolution."""
        c = helper.make_node("MatMul" if matmul else op, [inp, weight], [out],
                             name=f"{out}_{'matmul' if matmul else op.lower()}")
        if matmul:
            pass
        elif conv_attrs:
            c.attribute.extend(node.attribute)
        else:  # 1x1, every attribute explicit (FINN's conv lowering reads them all)
            d = len(shape) - 2
            c.attribute.extend([helper.make_attribute("kernel_shape", [1] * d),
                                helper.make_attribute("strides", [1] * d),
                                helper.make_attribute("pads", [0] * (2 * d)),
                                helper.make_attribute("dilations", [1] * d),
                                helper.make_attribute("group", 1)])
        new.append(c)
        return out

    def scaled(y: str, mult: np.ndarray, name: str) -> str:
        k = _init(g, name, mult.reshape(bshape))
        new.append(helper.make_node("Mul", [y, k], [f"{y}_scaled"], name=f"{y}_mul"))
        return f"{y}_scaled"

    tensors: Dict[str, object] = {"planes": [], "plane_outputs": [], "multipliers": []}
    codes = info.codes.long().numpy()
    acc = None
    for k in range(info.bits):
        plane = ((codes >> k) & 1).astype(np.float32)
        b = quant(lay(plane), f"{L}.weight_plane{k}", 1, False)
        y = scaled(compute(x, b, f"{L}.out_plane{k}"), m[:, k], f"{L}.mult{k}")
        tensors["planes"].append(f"{L}.weight_plane{k}")
        tensors["plane_outputs"].append(b)
        tensors["multipliers"].append(f"{L}.mult{k}")
        acc = y if acc is None else _add(new, acc, y, f"{L}.sum{k}")
    if row["offset_layer"]:
        bits = row["offset_bits"]
        signed = bool((mc < 0).any())
        if groups == 1:
            # one all-ones output channel (the receptive-field sum), then a 1 -> out_ch layer
            # holding the integer offsets: both standard layers with Quant weights
            ones = quant(lay(np.ones([1] + shape[1:], np.float32)), f"{L}.weight_ones", 1,
                         False)
            s = compute(x, ones, f"{L}.out_ones")
            off = quant(lay(mc.reshape([out_ch, 1] + [1] * (len(shape) - 2))),
                        f"{L}.offset_mult", bits, signed)
            y = compute(s, off, f"{L}.out_offset", conv_attrs=False)
        else:  # grouped: each output channel sums its own group's inputs
            ones = quant(np.ones(shape, np.float32), f"{L}.weight_ones", 1, False)
            s = compute(x, ones, f"{L}.out_ones")
            off = _init(g, f"{L}.offset_mult", mc.reshape(bshape))
            new.append(helper.make_node("Mul", [s, off], [f"{L}.out_offset"],
                                        name=f"{L}.out_offset_mul"))
            y = f"{L}.out_offset"
        tensors.update(ones=f"{L}.weight_ones", ones_output=ones, offset=f"{L}.offset_mult",
                       offset_output=off)
        # the offset branch first: hls4ml 1.3 rewires a scale it moves below a layer into the
        # consumer's first input only (Add is commutative: nothing else changes)
        acc = _add(new, y, acc, f"{L}.sum_offset")
    scale = _init(g, f"{L}.planes_scale", np.asarray(2.0 ** -row["frac_bits"]))
    tensors.update(scale=scale, layout="matmul" if matmul else "weight")
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    new.append(helper.make_node("Mul", [acc, scale], [out if bias is None else f"{L}.out_scaled"],
                                name=f"{L}.out_scale_mul"))
    if bias is not None:
        b = bias
        if op == "Conv":  # Conv's B is (O,): broadcast it over the output's channel axis
            arr = _initializer(g, bias)
            if arr is None:
                raise QfvError(f"layer {L!r}: its bias is not a constant")
            b = _init(g, f"{L}.planes_bias", arr.reshape(bshape))
        elif _attr(node, "beta", 1.0) != 1.0:
            raise QfvError(f"layer {L!r}: a Gemm with beta != 1 is not supported by the "
                           "plane-parallel form")
        new.append(helper.make_node("Add", [f"{L}.out_scaled", b], [out], name=f"{L}.bias_add"))
    pos = list(g.node).index(node)
    g.node.remove(node)
    for i, n in enumerate(new):
        g.node.insert(pos + i, n)
    row["tensors"] = tensors
    row["memory"] = dict(row["memory"], **memory_bits(info, row, groups))


def _add(new: list, a: str, b: str, name: str) -> str:
    new.append(helper.make_node("Add", [a, b], [name], name=name))
    return name


def _initializer(g: onnx.GraphProto, name: str) -> Optional[np.ndarray]:
    for i in g.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    return None


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes none of whose outputs is used (the replaced weight subgraphs)."""
    g = model.graph
    while True:
        used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.node.remove(n)


def file_weights(tensors: Dict[str, np.ndarray], row: dict, weight_shape: Sequence[int]
                 ) -> np.ndarray:
    """The weights a plane-parallel layer computes, decoded from the file's own tensors
    (``tensors``: name -> value, e.g. qonnx's execution context; ``row``: the layer's
    ``planes`` metadata): ``scale * (sum_k mult_k * B_k + offset * ones)``, each multiplier
    broadcast along the output channels (float64)."""
    t = row["tensors"]
    shape = list(weight_shape)
    per_ch = [-1] + [1] * (len(shape) - 1)

    def arr(name):  # in the weight's own layout (a Linear layer's planes are stored (in, out))
        a = np.asarray(tensors[name], dtype=np.float64)
        return a.T if t.get("layout") == "matmul" else a

    def vec(name):
        return arr(name).reshape(per_ch)

    w = np.zeros(shape, np.float64)
    for b, mk in zip(t["plane_outputs"], t["multipliers"]):
        w = w + np.asarray(tensors[mk], dtype=np.float64).reshape(per_ch) * arr(b)
    if "ones_output" in t:
        w = w + vec(t["offset_output"]) * np.broadcast_to(arr(t["ones_output"]), shape)
    return w * float(np.asarray(tensors[t["scale"]]))
