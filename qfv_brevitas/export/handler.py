"""The Brevitas seam of the export: a base export handler for the N-multiplier weight proxy
and the QONNX manager that carries one form's handler.

Brevitas matches proxy export handlers on the proxy's exact type, so the library's own
:class:`~qfv_brevitas.core.quantizers.NMultWeightQuantProxy` gets its own handler; the stock one
would export the non-uniform levels as a uniform ``Quant`` node, silently wrong. Each form
(:mod:`qfv_brevitas.export.forms`) subclasses :class:`WeightHandler` and emits its weights
through both torch exporters; activations keep Brevitas' own handlers and export as standard
QONNX ``Quant`` nodes.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Type

import torch
from torch import Tensor, nn

from brevitas.export.onnx.handler import ONNXBaseHandler
from brevitas.export.onnx.qonnx.function import BrevitasQuantOp
from brevitas.export.onnx.qonnx.manager import QONNXDynamoManager, QONNXManager

from qfv_brevitas.core import intview as IV
from qfv_brevitas.core.chip import Chip
from qfv_brevitas.core.quantizers import NMultTensorQuant, NMultWeightQuantProxy
from qfv_brevitas.export.layers import LayerExport

__all__ = ["WeightHandler", "quant_node", "manager_for", "plain_state_dict"]


class WeightHandler(ONNXBaseHandler):
    """Base of every form's handler: finds its layer's :class:`LayerExport` in the
    export-wide table ``layers`` (proxy id -> layer) and returns the proxy's nominal scale,
    zero point and bit width beside the weights that :meth:`weight` emits (with the integer
    view: ``2**-f``, 0 and the integers' width)."""

    handled_layer = NMultWeightQuantProxy
    layers: Dict[int, LayerExport] = {}

    def prepare_for_export(self, module: NMultWeightQuantProxy) -> None:
        try:
            self.info = self.layers[id(module)]
        except KeyError:
            raise RuntimeError("an N-multiplier proxy that the export did not collect: "
                               "export through qfv_brevitas.export.export_qonnx") from None
        info = self.info
        if info.frac_bits is None:
            self.nominal = (torch.ones(()), torch.zeros(()), torch.tensor(float(info.bits)))
        else:
            # The integer view: the scale and width training's IntQuantTensor had, which an
            # integer bias (scale = input scale x weight scale) exports with.
            width = IV.signed_width(*IV.integer_range(info.r, info.c, info.frac_bits))
            self.nominal = (torch.tensor(2.0 ** -info.frac_bits), torch.zeros(()), width)

    def symbolic_execution(self, x: Tensor):
        return (self.weight(),) + self.nominal

    def weight(self) -> Tensor:
        raise NotImplementedError


def quant_node(handler: WeightHandler, x: Tensor, scale: Tensor, bits: int, signed: bool
               ) -> Tensor:
    """A standard QONNX ``Quant`` node (Brevitas' own op, both exporters)."""
    return handler.export_op(BrevitasQuantOp, x, scale, torch.zeros(()),
                             torch.tensor(float(bits)), False, signed, "ROUND")


def manager_for(handler: Type[WeightHandler], layers: Dict[int, LayerExport], dynamo: bool
                ) -> Type[QONNXManager]:
    """A QONNX manager whose weight handler (a subclass of ``handler`` bound to this export's
    ``layers``) puts every N-multiplier layer in its form."""
    bound = type(f"{handler.__name__}ForExport", (handler,), {"layers": layers})
    base = QONNXDynamoManager if dynamo else QONNXManager
    return type("QfvQONNXManager", (base,), {"handlers": [bound] + list(base.handlers),
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
