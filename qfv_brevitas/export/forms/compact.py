"""The compact form: one ``qfv_brevitas.export.ops::NMultWeight`` node per layer holding the
uint8 codes, ``r`` and ``c`` (and a varying device's per-cell factors); spec in
``docs/ops/NMultWeight.md``."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import onnx
import torch
import torch.onnx
from torch import Tensor
from torch.autograd import Function

from brevitas.export.onnx.function import DynamoFn
from qonnx.transformation.base import Transformation

from qfv_brevitas.export.arrays import channels_note, fmt, same
from qfv_brevitas.export.forms.base import ExportForm, GraphView, register_form
from qfv_brevitas.export.graph import attr, rename_tensor
from qfv_brevitas.export.handler import WeightHandler
from qfv_brevitas.export.layers import LayerExport
from qfv_brevitas.export.ops import DOMAIN, OP_TYPE, OP_VERSION

__all__ = ["CompactForm", "CompactHandler", "DeclareOpDomain", "NameCompactInputs"]

#: the op's inputs in order (the last two only with a variability map)
ROLES = ("codes", "r", "c", "lrs", "hrs")


class _NMultWeightTorchScriptFn(Function):

    @staticmethod
    def symbolic(g, codes, r, c, lrs, hrs, weight, bits, axis, layer, variant):
        ins = [codes, r, c] + [t for t in (lrs, hrs) if t is not None]
        ret = g.op(f"{DOMAIN}::{OP_TYPE}", *ins, bit_width_i=bits, axis_i=axis, layer_s=layer,
                   variant_s=variant)
        ret.setType(weight.type())  # a conv needs its kernel's shape at export time
        return ret

    @staticmethod
    def forward(ctx, codes, r, c, lrs, hrs, weight, bits, axis, layer, variant):
        return weight.clone()


class _NMultWeightDynamoFn(DynamoFn):

    @staticmethod
    def symbolic(codes, r, c, lrs, hrs, weight, bits, axis, layer, variant):
        ins = tuple([codes, r, c] + [t for t in (lrs, hrs) if t is not None])
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{OP_TYPE}", ins,
            {"bit_width": bits, "axis": axis, "layer": layer, "variant": variant},
            dtype=weight.dtype, shape=weight.shape, version=OP_VERSION)


class _NMultWeightOp:
    torchscript = _NMultWeightTorchScriptFn
    dynamo = _NMultWeightDynamoFn


class CompactHandler(WeightHandler):
    """One ``NMultWeight`` node per layer: uint8 codes, ``r``, ``c`` (and the device's cells)."""

    def prepare_for_export(self, module):
        super().prepare_for_export(module)
        i = self.info
        self.codes, self.r, self.c, self.lrs, self.hrs = i.codes, i.r, i.c, i.lrs, i.hrs

    def weight(self) -> Tensor:
        i = self.info
        return self.export_op(_NMultWeightOp, self.codes, self.r, self.c, self.lrs, self.hrs,
                              i.weight, i.bits, i.axis, i.name, i.variant)


class DeclareOpDomain(Transformation):
    """Declare the ``NMultWeight`` op's domain in the file's ``opset_import``."""

    def apply(self, model):
        if not any(o.domain == DOMAIN for o in model.model.opset_import):
            model.model.opset_import.add(domain=DOMAIN, version=1)
        return model, False


class NameCompactInputs(Transformation):
    """Name each ``NMultWeight`` node's constant inputs ``<layer>.weight_<role>`` (codes, r,
    c, lrs, hrs)."""

    def apply(self, model):
        proto = model.model
        inits = {i.name for i in proto.graph.initializer}
        for node in proto.graph.node:
            if node.op_type != OP_TYPE:
                continue
            layer = attr(node, "layer").decode()
            for pos, role in enumerate(ROLES[:len(node.input)]):
                if node.input[pos] in inits:
                    rename_tensor(proto, node.input[pos], f"{layer}.weight_{role}")
                    inits = {i.name for i in proto.graph.initializer}
        return model, False


@register_form
class CompactForm(ExportForm):
    name = "compact"
    help = "one NMultWeight node per layer: uint8 codes, r, c (onnxruntime after folding)"
    handler = CompactHandler

    def transformations(self, layers: Sequence[LayerExport]) -> List[Transformation]:
        return [DeclareOpDomain()] + super().transformations(layers) + [NameCompactInputs()]

    def weight_problems(self, at: str, row: dict, node: onnx.NodeProto, r: np.ndarray,
                        c: np.ndarray, view: GraphView) -> List[str]:
        """The ``NMultWeight`` node: its attributes, its codes (uint8, the weight's shape, in
        the N-bit range) and ``r``, ``c`` equal to the metadata's."""
        bits, axis = int(row["bits"]), int(row.get("axis", -1))
        shape = tuple(row["weight_shape"])
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            return [f"{at}: its weight comes from a {node.op_type} node, not {OP_TYPE}"]
        out: List[str] = []
        for name, want in (("bit_width", bits), ("axis", axis)):
            if attr(node, name) != want:
                out.append(f"{at}: the {OP_TYPE} node's {name} is {attr(node, name)!r}, the "
                           f"metadata says {want!r}")
        if (attr(node, "layer") or b"").decode() != row["layer"]:
            out.append(f"{at}: the {OP_TYPE} node belongs to layer {attr(node, 'layer')!r}")
        codes, gr, gc = (view.consts.get(t) for t in node.input[:3])
        if codes is None or gr is None or gc is None:
            return out + [f"{at}: codes, r and c must be constants of the file"]
        if codes.dtype != np.uint8 or tuple(codes.shape) != shape:
            out.append(f"{at}: codes are {codes.dtype} {tuple(codes.shape)}, expected uint8 "
                       f"{shape}")
        elif codes.size and int(codes.max()) >= 1 << bits:
            bad = int(np.argmax(codes.reshape(-1) >= 1 << bits))
            out.append(f"{at}: code {int(codes.reshape(-1)[bad])} at flat index {bad} is out of "
                       f"the {bits}-bit range 0..{(1 << bits) - 1}")
        if not same(gr, r) or gr.shape != r.shape:
            out.append(f"{at}: r in the graph {fmt(gr)} differs from the metadata's {fmt(r)}"
                       f"{channels_note(gr, r)}")
        if not same(gc, c):
            out.append(f"{at}: c in the graph {fmt(gc)} differs from the metadata's {fmt(c)}"
                       f"{channels_note(gc, c)}")
        return out
