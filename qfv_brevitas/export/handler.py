"""Brevitas export handlers for the N-multiplier weight proxy, one per exported form.

Brevitas matches proxy export handlers on the proxy's exact type, so the library's own
:class:`~qfv_brevitas.core.quantizers.NMultWeightQuantProxy` gets its own handler here; the stock one
would export the non-uniform levels as a uniform ``Quant`` node, silently wrong. Each handler
emits its form through both torch exporters (a ``torch.autograd.Function`` with a TorchScript
``symbolic`` and a dynamo function through ``torch.onnx.ops``); activations keep Brevitas' own
handlers and export as standard QONNX ``Quant`` nodes.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Type

import torch
import torch.onnx
from torch import Tensor, nn
from torch.autograd import Function

from brevitas.export.onnx.function import DynamoFn
from brevitas.export.onnx.handler import ONNXBaseHandler
from brevitas.export.onnx.qonnx.function import BrevitasQuantOp
from brevitas.export.onnx.qonnx.manager import QONNXDynamoManager, QONNXManager

from qfv_brevitas.core.chip import Chip
from qfv_brevitas.core.quantizers import NMultTensorQuant, NMultWeightQuantProxy
from qfv_brevitas.export.layers import LayerExport
from qfv_brevitas.export.ops import DOMAIN, OP_TYPE, OP_VERSION

__all__ = ["FORMS", "manager_for", "plain_state_dict"]

FORMS = ("compact", "bitplanes", "fixed", "planes")


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


class _Handler(ONNXBaseHandler):
    """Base: finds its layer's :class:`LayerExport` in the export-wide table."""

    handled_layer = NMultWeightQuantProxy
    layers: Dict[int, LayerExport] = {}

    def prepare_for_export(self, module: NMultWeightQuantProxy) -> None:
        try:
            self.info = self.layers[id(module)]
        except KeyError:
            raise RuntimeError("an N-multiplier proxy that the export did not collect: "
                               "export through qfv_brevitas.export.export_qonnx") from None
        self.nominal = (torch.ones(()), torch.zeros(()), torch.tensor(float(self.info.bits)))

    def symbolic_execution(self, x: Tensor):
        return (self.weight(),) + self.nominal

    def weight(self) -> Tensor:
        raise NotImplementedError


class CompactHandler(_Handler):
    """One ``NMultWeight`` node per layer: uint8 codes, ``r``, ``c`` (and the device's cells)."""

    def prepare_for_export(self, module):
        super().prepare_for_export(module)
        i = self.info
        self.codes, self.r, self.c, self.lrs, self.hrs = i.codes, i.r, i.c, i.lrs, i.hrs

    def weight(self) -> Tensor:
        i = self.info
        return self.export_op(_NMultWeightOp, self.codes, self.r, self.c, self.lrs, self.hrs,
                              i.weight, i.bits, i.axis, i.name, i.variant)


def _quant(handler, x: Tensor, scale: Tensor, bits: int, signed: bool) -> Tensor:
    """A standard QONNX ``Quant`` node (Brevitas' own op, both exporters)."""
    return handler.export_op(BrevitasQuantOp, x, scale, torch.zeros(()),
                             torch.tensor(float(bits)), False, signed, "ROUND")


class BitPlanesHandler(_Handler):
    """``c + r_0 Quant(B_0) + r_1 Quant(B_1) + ...``: 1-bit unsigned planes, standard ops only."""

    def prepare_for_export(self, module):
        super().prepare_for_export(module)
        i = self.info
        self.planes = i.planes()
        self.rk = [i.broadcast(i.r[:, k].contiguous()) for k in range(i.bits)]
        self.cb = i.broadcast(i.c)
        self.one = torch.ones(())
        if i.lrs is not None:
            self.lrs_dev = [(i.lrs[..., k] - 1).contiguous() for k in range(i.bits)]
        if i.hrs is not None:
            self.hrs_k = [i.hrs[..., k].contiguous() for k in range(i.bits)]

    def weight(self) -> Tensor:
        i = self.info
        qs = [_quant(self, b, self.one, 1, False) for b in self.planes]
        acc = self.cb + qs[0] * self.rk[0]
        for k in range(1, i.bits):
            acc = acc + qs[k] * self.rk[k]
        if i.lrs is None and i.hrs is None:
            return acc
        # The device: each cell's deviation from its ideal contribution, scaled by r_k.
        dev = None
        for k in range(i.bits):
            d = qs[k] * self.lrs_dev[k] if i.lrs is not None else torch.zeros_like(qs[k])
            if i.hrs is not None:
                d = d + (1 - qs[k]) * self.hrs_k[k]
            term = d * self.rk[k]
            dev = term if dev is None else dev + term
        return acc + dev


class FixedPointHandler(_Handler):
    """One standard ``Quant`` node: weights ``integer * 2**-f`` (multipliers on that grid)."""

    def prepare_for_export(self, module):
        super().prepare_for_export(module)
        fx = self.info.extra["fixed_point"]
        self.w = self.info.extra["_fixed_weight"]
        self.scale = torch.tensor(2.0 ** -fx["frac_bits"])
        self.bits, self.signed = fx["int_bits"], fx["signed"]

    def weight(self) -> Tensor:
        return _quant(self, self.w, self.scale, self.bits, self.signed)


# The plane-parallel form changes the layer's computation, not only its weights: its layers are
# exported with their fixed-point weights, then split into planes on the graph
# (:func:`~qfv_brevitas.export.planes.split_into_planes`).
_HANDLERS = {"compact": CompactHandler, "bitplanes": BitPlanesHandler,
             "fixed": FixedPointHandler, "planes": FixedPointHandler}


def manager_for(form: str, layers: Dict[int, LayerExport], dynamo: bool) -> Type[QONNXManager]:
    """A QONNX manager whose handlers put this export's layers in ``form``."""
    handler = type(f"{_HANDLERS[form].__name__}ForExport", (_HANDLERS[form],), {"layers": layers})
    base = QONNXDynamoManager if dynamo else QONNXManager
    return type("QfvQONNXManager", (base,), {"handlers": [handler] + list(base.handlers),
                                             "_fn_cache": [], "_fn_to_cache": []})


@contextlib.contextmanager
def plain_state_dict() -> Iterator[None]:
    """The TorchScript exporter detaches every state-dict entry, and the library's modules keep
    their configuration as a dict in ``_extra_state``: hide it for the export's duration."""
    classes = (Chip, NMultTensorQuant)
    saved = {cls: cls.__dict__["get_extra_state"] for cls in classes}
    try:
        for cls in classes:
            cls.get_extra_state = nn.Module.get_extra_state
        yield
    finally:
        for cls, fn in saved.items():
            cls.get_extra_state = fn
