"""The fixed-point form: ``r`` and ``c`` rounded to ``m * 2**-f``
(:mod:`qfv_brevitas.export.fixedpoint`), so every level is an integer times ``2**-f`` and a
layer's weights are one standard QONNX ``Quant`` node (scale ``2**-f``, the integer width the
levels need), which hls4ml and FINN take unchanged."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import onnx
import torch
from torch import Tensor

from qonnx.transformation.base import Transformation

from qfv_brevitas.export.arrays import channels_note, fmt, groups, level_table, same
from qfv_brevitas.export.forms.base import ExportForm, GraphView, register_form
from qfv_brevitas.export.graph import LayerTransformation, attr, rename_tensor
from qfv_brevitas.export.handler import WeightHandler, quant_node
from qfv_brevitas.export.layers import LayerExport

__all__ = ["FixedPointForm", "FixedPointHandler", "NameFixedWeights", "rounding_problems"]


def rounding_problems(at: str, what: str, integers, real, f: int) -> List[str]:
    """Where the metadata's fixed-point ``integers`` (``what``: their name) are not its real
    ``real`` values rounded to ``2**-f`` (half to even), channel by channel: one entry naming
    the channels, or none."""
    ints = np.asarray(integers, np.float64)
    want = np.round(np.asarray(real, np.float64) * 2.0 ** f)
    if ints.shape == want.shape and np.array_equal(ints, want):
        return []
    return [f"{at}: the metadata's {what} {fmt(ints)} are not {fmt(real)} rounded to 2^-{f}"
            f"{channels_note(ints, want)}"]


class FixedPointHandler(WeightHandler):
    """One standard ``Quant`` node: weights ``integer * 2**-f`` (multipliers on that grid)."""

    def prepare_for_export(self, module):
        super().prepare_for_export(module)
        fx = self.info.fixed_point
        self.w = fx.weight
        self.scale = torch.tensor(2.0 ** -fx.frac_bits)
        self.bits, self.signed = fx.int_bits, fx.signed

    def weight(self) -> Tensor:
        return quant_node(self, self.w, self.scale, self.bits, self.signed)


class NameFixedWeights(LayerTransformation):
    """Name the fixed-point weights each layer's ``Quant`` node reads
    ``<layer>.weight_fixed`` (``layers``: their names)."""

    def apply(self, model):
        proto = model.model
        for name in self.layers:
            prod = next(n for n in proto.graph.node if f"{name}.weight" in n.output)
            rename_tensor(proto, prod.input[0], f"{name}.weight_fixed")
        return model, False


@register_form
class FixedPointForm(ExportForm):
    name = "fixed"
    help = "r, c rounded to m * 2**-f; one standard Quant node per layer (hls4ml, FINN)"
    handler = FixedPointHandler
    needs_fixed_point = True

    def transformations(self, layers: Sequence[LayerExport]) -> List[Transformation]:
        return super().transformations(layers) + [NameFixedWeights([i.name for i in layers])]

    def weight_problems(self, at: str, row: dict, node: onnx.NodeProto, r: np.ndarray,
                        c: np.ndarray, view: GraphView) -> List[str]:
        """The ``Quant`` node: scale ``2**-f``, zero point 0, the metadata's integer width and
        signedness; the metadata's rounded ``r``, ``c`` its ``r``, ``c`` rounded to ``2**-f``;
        its input integers in range, and each a level of the rounded ``r``, ``c`` of its own
        channel (a problem names the channel)."""
        fx = row.get("fixed_point") or {}
        shape, axis = tuple(row["weight_shape"]), int(row.get("axis", -1))
        if node.op_type != "Quant":
            return [f"{at}: its weight comes from a {node.op_type} node, not Quant"]
        out: List[str] = []
        values, scale, zero, width = (view.consts.get(t) for t in node.input[:4])
        f = int(fx["frac_bits"])
        if values is None or tuple(values.shape) != shape:
            return out + [f"{at}: its fixed-point weights are not a constant of shape {shape}"]
        if not same(scale, 2.0 ** -f) or not same(zero, 0.0):
            out.append(f"{at}: the Quant scale is {fmt(scale)}, the metadata says 2^-{f}")
        if not same(width, fx["int_bits"]) or bool(attr(node, "signed", 1)) != fx["signed"]:
            out.append(f"{at}: the Quant node is {fmt(width)}-bit "
                       f"{'signed' if attr(node, 'signed', 1) else 'unsigned'}, the metadata "
                       f"says {fx['int_bits']}-bit {'signed' if fx['signed'] else 'unsigned'}")
        s = 2.0 ** f
        out += rounding_problems(at, "fixed-point multipliers * 2^f",
                                 np.asarray(fx["r_fixed"], np.float64) * s, r, f)
        out += rounding_problems(at, "fixed-point offsets * 2^f",
                                 np.asarray(fx["c_fixed"], np.float64) * s, c, f)
        ints = values.astype(np.float64) * s  # the Quant input: integer * 2^-f
        if not np.array_equal(ints, np.round(ints)) or ints.min() < fx["int_min"] or \
                ints.max() > fx["int_max"]:
            out.append(f"{at}: fixed-point integers outside {fx['int_min']}..{fx['int_max']} or "
                       "not integers")
            return out
        table = level_table(np.asarray(fx["r_fixed"], np.float64),
                            np.asarray(fx["c_fixed"], np.float64)) * s
        g = groups(ints, axis)
        for i in range(g.shape[0]):
            if not np.isin(g[i], table[i if table.shape[0] > 1 else 0]).all():
                out.append(f"{at}: a weight (channel {i}) is not a level of the metadata's "
                           "fixed-point r and c")
                break
        return out
