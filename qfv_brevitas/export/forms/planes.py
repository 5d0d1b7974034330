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

:func:`planes_layer` computes a layer's integers; :class:`SplitIntoPlanes` rewrites an exported
graph (every layer's ``Conv``/``Gemm`` fed by ``<layer>.weight``) into that form;
:func:`file_weights` decodes the weights a plane-parallel file computes (for verification).
The layers are exported by the fixed form's handler first (their fixed-point weights), then
split on the graph.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qonnx.transformation.base import Transformation

from qfv_brevitas.export import fixedpoint as FX
from qfv_brevitas.export.arrays import channels_note, fmt, same
from qfv_brevitas.export.errors import ExportError
from qfv_brevitas.export.forms.base import ExportForm, GraphView, register_form
from qfv_brevitas.export.forms.fixed import FixedPointHandler, rounding_problems
from qfv_brevitas.export.graph import (QONNX_DOMAIN, LayerTransformation, attr, initializer,
                                       remove_dead_nodes)
from qfv_brevitas.export.layers import LayerExport, PlanesLayer, PlaneTensors
from qfv_brevitas.util.errors import QfvError

__all__ = ["PlanesForm", "SplitIntoPlanes", "check_layer", "planes_layer", "file_weights",
           "memory_bits", "PLANE_OPS"]

#: compute ops a layer may be exported as for this form (Linear: Gemm with transB=1)
PLANE_OPS = ("Conv", "Gemm")


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
            "expresses; export it in the 'compact' or 'bitplanes' form, or with "
            "with_maps=False")
    if info.axis not in (-1, 0):
        raise QfvError(f"layer {info.name!r}: multipliers along weight axis {info.axis}; the "
                       "plane-parallel form scales output channels (axis 0) only")


@torch.no_grad()
def planes_layer(info: LayerExport, frac_bits: int) -> dict:
    """Round ``info``'s multipliers to ``2**-frac_bits`` (exactly as the fixed form does) and
    describe the layer's planes: integer multipliers ``m`` ``(G, N)`` and offset ``m_c``
    ``(G,)``, their widths, and the weight memory. Sets ``info.planes`` and returns its
    metadata.

    A variability map cannot be expressed this way (every cell has its own factor, not one per
    plane and channel): refused. Fault maps are fine: the planes hold the codes the chip holds.
    """
    check_layer(info)
    FX.fixed_point_layer(info, frac_bits)
    fx = info.fixed_point
    s = 2.0 ** fx.frac_bits
    m = (torch.tensor(fx.r_fixed, dtype=torch.float64) * s).round().long()
    mc = (torch.tensor(fx.c_fixed, dtype=torch.float64) * s).round().long()
    pl = PlanesLayer(frac_bits=fx.frac_bits, planes=info.bits, multipliers=m.tolist(),
                     offset=mc.tolist(), multiplier_bits=_signed_width(m.flatten().tolist()),
                     offset_bits=_signed_width(mc.tolist()),
                     offset_layer=bool((mc != 0).any()), memory={})
    pl.memory = memory_bits(info, pl)
    pl.memory["fixed_form_bits"] = int(np.prod(info.weight_shape)) * fx.int_bits
    info.planes = pl
    return pl.metadata()


def memory_bits(info: LayerExport, pl: PlanesLayer, groups: int = 1) -> dict:
    """Weight memory of a layer in the plane-parallel form, in bits: N bits per weight, the
    all-ones offset layer (one output channel of the weight's fan-in; for a grouped
    convolution one per output channel), and the integer multipliers (one per plane and
    output channel, plus the offset's)."""
    shape = info.weight_shape
    n = int(np.prod(shape))
    out_ch = shape[0]
    fan_in = n // out_ch
    planes = info.bits * n
    ones = (fan_in if groups == 1 else n) if pl.offset_layer else 0
    mult = out_ch * info.bits * pl.multiplier_bits
    off = out_ch * pl.offset_bits if pl.offset_layer else 0
    total = planes + ones + mult + off
    return {"weights": n, "plane_bits": planes, "ones_bits": ones, "multiplier_bits": mult,
            "offset_bits": off, "total_bits": total, "bits_per_weight": total / n}


# -- graph rewrite --------------------------------------------------------------------------------
def _init(g: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
    return name


def _compute_node(model: onnx.ModelProto, info: LayerExport) -> onnx.NodeProto:
    """The one ``Conv``/``Gemm`` that takes ``<layer>.weight`` as its weight (raises
    naming the layer otherwise)."""
    wname = f"{info.name}.weight"
    users = [n for n in model.graph.node if wname in list(n.input)]
    if len(users) != 1 or users[0].op_type not in PLANE_OPS or \
            list(users[0].input).index(wname) != 1:
        ops = sorted({n.op_type for n in users}) or ["nothing"]
        raise QfvError(
            f"layer {info.name!r}: its weights feed {', '.join(ops)}; the plane-parallel "
            f"form splits {' and '.join(PLANE_OPS)} layers only (Conv1d/2d/3d, Linear)")
    node = users[0]
    if node.op_type == "Gemm" and (attr(node, "transB", 0) != 1 or attr(node, "transA", 0)
                                   or attr(node, "alpha", 1.0) != 1.0):
        raise QfvError(f"layer {info.name!r}: a Gemm other than x @ W.T (+ b) is not "
                       "supported by the plane-parallel form")
    return node


class SplitIntoPlanes(LayerTransformation):
    """Rewrite each layer's compute node (a ``Conv`` or ``Gemm`` whose weight input is the
    tensor ``<layer>.weight``) into its plane-parallel form (see the module docstring); the
    layer's old weight subgraph is removed. Tensors are named after the layer:
    ``<layer>.weight_plane<k>`` the 0/1 initializers (``..._q`` their ``Quant`` outputs),
    ``<layer>.mult<k>`` the integer multipliers, ``<layer>.weight_ones`` and
    ``<layer>.offset_mult`` the offset layers, ``<layer>.planes_scale`` ``2**-f``; each layer's
    ``info.planes.tensors`` lists them. Raises naming the layer when its compute node is not
    one this form supports. ``layers``: the :class:`LayerExport`s."""

    def apply(self, model):
        proto = model.model
        for info in self.layers:
            _LayerSplit(proto, _compute_node(proto, info), info).run()
        remove_dead_nodes(proto)
        return model, False


class _LayerSplit:
    """The nodes that replace one layer's compute node, built in order."""

    def __init__(self, model: onnx.ModelProto, node: onnx.NodeProto, info: LayerExport):
        self.g, self.node, self.info, self.pl = model.graph, node, info, info.planes
        self.L = info.name
        self.shape = list(info.weight_shape)
        self.op = node.op_type
        out_ch = self.shape[0]
        self.bshape = ([1, out_ch] + [1] * (len(self.shape) - 2) if self.op == "Conv"
                       else [1, out_ch])  # per-output-channel constants against the output
        self.groups = int(attr(node, "group", 1)) if self.op == "Conv" else 1
        m = np.asarray(self.pl.multipliers, dtype=np.float64)          # (G, N)
        mc = np.asarray(self.pl.offset, dtype=np.float64)              # (G,)
        if m.shape[0] == 1:
            m, mc = np.repeat(m, out_ch, 0), np.repeat(mc, out_ch, 0)
        self.m, self.mc = m, mc
        # A Linear layer's planes are MatMuls with (in, out) weights: qonnx's GemmToMatMul (used
        # by hls4ml's and FINN's readers) needs a Gemm's bias input, which the planes lack.
        self.matmul = self.op == "Gemm"
        self.new: List[onnx.NodeProto] = []
        self.zero = _init(self.g, f"{self.L}.planes_zero_point", np.zeros(()))
        self.one = _init(self.g, f"{self.L}.planes_unit_scale", np.ones(()))

    def lay(self, a: np.ndarray) -> np.ndarray:
        """A weight array in the layout of the node that reads it."""
        return np.ascontiguousarray(a.T) if self.matmul else a

    def quant(self, value: np.ndarray, name: str, bits: int, signed: bool) -> str:
        """A standard QONNX ``Quant`` node (scale 1, zero point 0) over an integer
        initializer ``name``; returns its output ``<name>_q``."""
        _init(self.g, name, value)
        width = _init(self.g, f"{name}_bit_width", np.asarray(float(bits)))
        self.new.append(helper.make_node("Quant", [name, self.one, self.zero, width],
                                         [f"{name}_q"], name=f"{name}_quant",
                                         domain=QONNX_DOMAIN, signed=int(signed), narrow=0,
                                         rounding_mode="ROUND"))
        return f"{name}_q"

    def compute(self, inp: str, weight: str, out: str, conv_attrs: bool = True) -> str:
        """The layer's own Conv (same strides, pads, groups) or, for a Gemm, ``x @ W`` (a
        MatMul), no bias; ``conv_attrs=False``: a plain 1x1 convolution."""
        c = helper.make_node("MatMul" if self.matmul else self.op, [inp, weight], [out],
                             name=f"{out}_{'matmul' if self.matmul else self.op.lower()}")
        if self.matmul:
            pass
        elif conv_attrs:
            c.attribute.extend(self.node.attribute)
        else:  # 1x1, every attribute explicit (FINN's conv lowering reads them all)
            d = len(self.shape) - 2
            c.attribute.extend([helper.make_attribute("kernel_shape", [1] * d),
                                helper.make_attribute("strides", [1] * d),
                                helper.make_attribute("pads", [0] * (2 * d)),
                                helper.make_attribute("dilations", [1] * d),
                                helper.make_attribute("group", 1)])
        self.new.append(c)
        return out

    def add(self, a: str, b: str, name: str) -> str:
        self.new.append(helper.make_node("Add", [a, b], [name], name=name))
        return name

    def run(self) -> None:
        acc, tensors = self.planes()
        if self.pl.offset_layer:
            y, ones, ones_out, off, off_out = self.offset()
            tensors.update(ones=ones, ones_output=ones_out, offset=off, offset_output=off_out)
            # the offset branch first: hls4ml 1.3 rewires a scale it moves below a layer into
            # the consumer's first input only (Add is commutative: nothing else changes)
            acc = self.add(y, acc, f"{self.L}.sum_offset")
        scale = _init(self.g, f"{self.L}.planes_scale", np.asarray(2.0 ** -self.pl.frac_bits))
        self.output(acc, scale)
        pos = list(self.g.node).index(self.node)
        self.g.node.remove(self.node)
        for i, n in enumerate(self.new):
            self.g.node.insert(pos + i, n)
        self.pl.tensors = PlaneTensors(scale=scale, layout="matmul" if self.matmul else "weight",
                                       **tensors)
        self.pl.memory = dict(self.pl.memory, **memory_bits(self.info, self.pl, self.groups))

    def planes(self):
        """``sum_k m_k * layer(x, B_k)``; returns its tensor and the planes' tensor names."""
        L, x = self.L, self.node.input[0]
        codes = self.info.codes.long().numpy()
        tensors: Dict[str, list] = {"planes": [], "plane_outputs": [], "multipliers": []}
        acc = None
        for k in range(self.info.bits):
            plane = ((codes >> k) & 1).astype(np.float32)
            b = self.quant(self.lay(plane), f"{L}.weight_plane{k}", 1, False)
            y = self.compute(x, b, f"{L}.out_plane{k}")
            mult = _init(self.g, f"{L}.mult{k}", self.m[:, k].reshape(self.bshape))
            self.new.append(helper.make_node("Mul", [y, mult], [f"{y}_scaled"], name=f"{y}_mul"))
            tensors["planes"].append(f"{L}.weight_plane{k}")
            tensors["plane_outputs"].append(b)
            tensors["multipliers"].append(mult)
            acc = f"{y}_scaled" if acc is None else self.add(acc, f"{y}_scaled", f"{L}.sum{k}")
        return acc, tensors

    def offset(self):
        """``m_c * layer(x, 1)``: returns its tensor, the all-ones weights, their Quant output,
        the offsets and the tensor that carries them into the sum."""
        L, x, shape, mc = self.L, self.node.input[0], self.shape, self.mc
        signed = bool((mc < 0).any())
        if self.groups == 1:
            # one all-ones output channel (the receptive-field sum), then a 1 -> out_ch layer
            # holding the integer offsets: both standard layers with Quant weights
            ones = self.quant(self.lay(np.ones([1] + shape[1:], np.float32)),
                              f"{L}.weight_ones", 1, False)
            s = self.compute(x, ones, f"{L}.out_ones")
            off = self.quant(self.lay(mc.reshape([shape[0], 1] + [1] * (len(shape) - 2))),
                             f"{L}.offset_mult", self.pl.offset_bits, signed)
            y = self.compute(s, off, f"{L}.out_offset", conv_attrs=False)
        else:  # grouped: each output channel sums its own group's inputs
            ones = self.quant(np.ones(shape, np.float32), f"{L}.weight_ones", 1, False)
            s = self.compute(x, ones, f"{L}.out_ones")
            off = _init(self.g, f"{L}.offset_mult", mc.reshape(self.bshape))
            self.new.append(helper.make_node("Mul", [s, off], [f"{L}.out_offset"],
                                             name=f"{L}.out_offset_mul"))
            y = f"{L}.out_offset"
        return y, f"{L}.weight_ones", ones, f"{L}.offset_mult", off

    def output(self, acc: str, scale: str) -> None:
        """``2**-f * acc (+ bias)`` into the compute node's own output tensor."""
        L, node = self.L, self.node
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out = node.output[0]
        self.new.append(helper.make_node("Mul", [acc, scale],
                                         [out if bias is None else f"{L}.out_scaled"],
                                         name=f"{L}.out_scale_mul"))
        if bias is None:
            return
        b = bias
        if self.op == "Conv":  # Conv's B is (O,): broadcast it over the output's channel axis
            arr = initializer(self.g, bias)
            if arr is None:
                raise QfvError(f"layer {L!r}: its bias is not a constant")
            b = _init(self.g, f"{L}.planes_bias", arr.reshape(self.bshape))
        elif attr(node, "beta", 1.0) != 1.0:
            raise QfvError(f"layer {L!r}: a Gemm with beta != 1 is not supported by the "
                           "plane-parallel form")
        self.new.append(helper.make_node("Add", [f"{L}.out_scaled", b], [out],
                                         name=f"{L}.bias_add"))


# -- reading a file -------------------------------------------------------------------------------
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

    w = np.zeros(shape, np.float64)
    for b, mk in zip(t["plane_outputs"], t["multipliers"]):
        w = w + np.asarray(tensors[mk], dtype=np.float64).reshape(per_ch) * arr(b)
    if "ones_output" in t:
        w = w + arr(t["offset_output"]).reshape(per_ch) * np.broadcast_to(arr(t["ones_output"]),
                                                                           shape)
    return w * float(np.asarray(tensors[t["scale"]]))


def _is_unit_quant(q: Optional[onnx.NodeProto], consts: Dict[str, np.ndarray]) -> bool:
    """A QONNX ``Quant`` node with scale 1, zero point 0, 1 bit, unsigned."""
    if q is None or q.op_type != "Quant" or len(q.input) < 4:
        return False
    scale, zero, width = (consts.get(t) for t in q.input[1:4])
    return (scale is not None and zero is not None and width is not None and same(scale, 1.0)
            and same(zero, 0.0) and same(width, 1.0) and not bool(attr(q, "signed", 1)))


def _integer_problems(at: str, row: dict, m: np.ndarray, mc: np.ndarray) -> List[str]:
    """The metadata's integers ``m``, ``mc`` and its fixed-point ``r``, ``c`` against its own
    ``r``, ``c`` rounded to ``2**-f``, channel by channel."""
    pl, fx = row["planes"], row["fixed_point"]
    f = int(pl["frac_bits"])
    out: List[str] = []
    if f != int(fx["frac_bits"]):
        out.append(f"{at}: planes at f = {f} but fixed point at f = {fx['frac_bits']}")
    out += rounding_problems(at, "integer multipliers", m, row["r"], f)
    out += rounding_problems(at, "integer offsets", mc, row["c"], f)
    s = 2.0 ** f
    out += rounding_problems(at, "fixed-point multipliers * 2^f",
                             np.asarray(fx["r_fixed"], np.float64) * s, row["r"], f)
    return out + rounding_problems(at, "fixed-point offsets * 2^f",
                                   np.asarray(fx["c_fixed"], np.float64) * s, row["c"], f)


def _plane_problems(at: str, row: dict, m: np.ndarray, view: GraphView) -> List[str]:
    """Each plane: a 0/1 constant behind a 1-bit unsigned ``Quant`` feeding one Conv/MatMul,
    scaled by the metadata's integer multipliers ``m`` (per output channel)."""
    t, shape = row["planes"]["tensors"], tuple(row["weight_shape"])
    layout = shape if t.get("layout") != "matmul" else (shape[1], shape[0])
    out: List[str] = []
    for k, (name, q_out, mult) in enumerate(zip(t["planes"], t["plane_outputs"],
                                                t["multipliers"])):
        plane = view.consts.get(name)
        if plane is None or tuple(plane.shape) != layout or not np.isin(plane, (0.0, 1.0)).all():
            out.append(f"{at}: bit plane {k} ({name!r}) is not a 0/1 constant of shape {layout}")
        q = view.producers.get(q_out)
        if q is None or q.input[0] != name or not _is_unit_quant(q, view.consts):
            out.append(f"{at}: bit plane {k} is not read through a 1-bit unsigned Quant node "
                       "with scale 1")
        ops = sorted({n.op_type for n in view.users.get(q_out, [])})
        if ops not in (["Conv"], ["MatMul"]):
            out.append(f"{at}: bit plane {k} feeds {ops or 'nothing'}, not one Conv/MatMul")
        v = view.consts.get(mult)
        if v is None or not same(v, m[:, k]):
            out.append(f"{at}: plane {k}'s multipliers in the graph {fmt(v)} are not the "
                       f"metadata's {fmt(m[:, k])}{channels_note(v, m[:, k])}")
    return out


def _offset_problems(at: str, row: dict, mc: np.ndarray, view: GraphView) -> List[str]:
    """The all-ones layer behind a 1-bit ``Quant`` and the metadata's integer offsets ``mc``;
    no offset layer only when every offset is 0."""
    pl, t = row["planes"], row["planes"]["tensors"]
    out: List[str] = []
    if pl.get("offset_layer"):
        ones = view.consts.get(t.get("ones"))
        if ones is None or not np.all(ones == 1.0):
            out.append(f"{at}: the offset layer's weights are not all ones")
        if not _is_unit_quant(view.producers.get(t.get("ones_output")), view.consts):
            out.append(f"{at}: the all-ones weights are not read through a 1-bit Quant node")
        off = view.consts.get(t.get("offset"))
        if off is None or not same(off, mc):
            out.append(f"{at}: the integer offsets in the graph {fmt(off)} are not the "
                       f"metadata's {fmt(mc)}{channels_note(off, mc)}")
    elif np.any(mc != 0):
        out.append(f"{at}: nonzero offsets but no offset layer")
    return out


@register_form
class PlanesForm(ExportForm):
    name = "planes"
    help = "plane-parallel: N layers with 1-bit weights and integer multipliers (FPGAs)"
    handler = FixedPointHandler  # the fixed-point weights, split into planes on the graph
    needs_fixed_point = True

    def check_layer(self, info: LayerExport) -> None:
        try:
            check_layer(info)
        except ValueError as e:
            raise ExportError(str(e)) from None

    def finish_layer(self, info: LayerExport, frac_bits: int) -> None:
        planes_layer(info, frac_bits)

    def transformations(self, layers: Sequence[LayerExport]) -> List[Transformation]:
        return super().transformations(layers) + [SplitIntoPlanes(layers)]

    def layer_metadata(self, info: LayerExport) -> dict:
        return info.metadata()  # no single weight tensor: the planes' tensors instead

    def metadata(self, layers: Sequence[LayerExport]) -> dict:
        """Weight memory of the plane-parallel file against the fixed form's, whole model."""
        mem = [info.planes.memory for info in layers]
        n = sum(m["weights"] for m in mem)
        total = sum(m["total_bits"] for m in mem)
        fixed = sum(m["fixed_form_bits"] for m in mem)
        return {"planes": {"weights": n, "weight_bits": sum(m["plane_bits"] for m in mem),
                           "total_bits": total, "bits_per_weight": total / n,
                           "fixed_form_bits": fixed, "fixed_form_bits_per_weight": fixed / n}}

    def summary(self, metadata: dict) -> List[str]:
        pl = metadata["planes"]
        return [f"planes: {pl['weight_bits']} weight bits in 1-bit planes + "
                f"{pl['total_bits'] - pl['weight_bits']} bits of multipliers and offset "
                f"layers = {pl['bits_per_weight']:.3f} bits per weight (fixed form: "
                f"{pl['fixed_form_bits_per_weight']:.3f})"]

    def layer_tensors(self, row: dict) -> List[Optional[str]]:
        """Its planes, multipliers and scale (no single weight tensor)."""
        if "weight_tensor" in row or not isinstance(row.get("planes"), dict):
            return [row.get("weight_tensor")]
        t = row["planes"].get("tensors")
        if not isinstance(t, dict):
            return [None]
        out = [v for k in ("planes", "plane_outputs", "multipliers") for v in t.get(k) or []]
        out += [t[k] for k in ("scale", "ones", "ones_output", "offset", "offset_output")
                if k in t]
        return out or [None]

    def file_weight(self, ctx: Dict[str, np.ndarray], row: dict) -> np.ndarray:
        return file_weights(ctx, row["planes"], row["weight_shape"])

    def graph_problems(self, row: dict, view: GraphView) -> List[str]:
        """Per layer N 0/1 planes behind 1-bit unsigned ``Quant`` nodes, each feeding one
        ``Conv``/``MatMul``; the integer multipliers per plane and the integer offsets equal
        to the metadata's ``r``, ``c`` rounded to ``2**-f``; the scale ``2**-f``."""
        at, bits = f"layer {row['layer']!r}", int(row["bits"])
        pl = row["planes"]
        t, f = pl["tensors"], int(pl["frac_bits"])
        m = np.asarray(pl["multipliers"], np.float64)
        mc = np.asarray(pl["offset"], np.float64)
        r, c = np.asarray(row["r"]), np.asarray(row["c"])
        if m.shape != r.shape or mc.shape != c.shape:
            return [f"{at}: the metadata's multipliers {m.shape} / offset {mc.shape} do not fit "
                    f"r {r.shape} / c {c.shape}"]
        out = _integer_problems(at, row, m, mc)
        if m.shape[0] == 1:
            out_ch = tuple(row["weight_shape"])[0]
            m, mc = np.repeat(m, out_ch, 0), np.repeat(mc, out_ch, 0)
        if len(t["planes"]) != bits or len(t["plane_outputs"]) != bits or \
                len(t["multipliers"]) != bits:
            return out + [f"{at}: {len(t['planes'])} planes in the metadata for {bits} bits"]
        out += _plane_problems(at, row, m, view)
        scale = view.consts.get(t["scale"])
        if scale is None or not same(scale, 2.0 ** -f):
            out.append(f"{at}: the planes' scale is {fmt(scale)}, the metadata says 2^-{f}")
        return out + _offset_problems(at, row, mc, view)
