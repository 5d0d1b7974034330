"""The export-form contract and its registry.

A form is one way of writing an N-multiplier layer into a QONNX file. Each is one class in
one module of this package, registered by name with :func:`register_form`, that declares
everything the export, its checks and its readers need to know about it: the Brevitas export
handler that emits the layer's weights, whether the multipliers go on a fixed-point grid
first, the graph rewrites after the exporter (qonnx ``Transformation``s), what the file's
metadata records per layer, how a file's graph is checked against that metadata, and how the
weights a file computes are read back. Nothing outside this package compares form names:
callers ask the registry (:func:`form_named`) and the form answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
import onnx

from qonnx.transformation.base import Transformation

from qfv_brevitas.export.errors import ExportError
from qfv_brevitas.export.graph import NameLayerWeights, StripNodeDebugInfo, constants
from qfv_brevitas.export.handler import WeightHandler
from qfv_brevitas.export.layers import LayerExport

__all__ = ["ExportForm", "GraphView", "register_form", "unregister_form", "form_named",
           "form_names"]


@dataclass
class GraphView:
    """What the checks read of a file's graph, computed once: its constants, the node that
    produces each tensor and the nodes that use it."""

    consts: Dict[str, np.ndarray]
    producers: Dict[str, onnx.NodeProto]
    users: Dict[str, List[onnx.NodeProto]]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphView":
        users: Dict[str, List[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for t in n.input:
                users.setdefault(t, []).append(n)
        return cls(consts=constants(model),
                   producers={o: n for n in model.graph.node for o in n.output}, users=users)


class ExportForm:
    """One export form. Subclass it in a module of ``qfv_brevitas.export.forms``, set the
    class attributes, implement :meth:`weight_problems` (or :meth:`graph_problems`) and
    decorate the class with :func:`register_form`; ``docs/architecture.md`` walks through an
    example."""

    #: the name users pass (``export_qonnx(..., form=name)``, ``qfv export --form name``)
    name: ClassVar[str]
    #: one line for the command line's help
    help: ClassVar[str]
    #: the Brevitas export handler that emits a layer's weights
    handler: ClassVar[Type[WeightHandler]]
    #: whether ``r`` and ``c`` are rounded to ``m * 2**-f`` before export (``frac_bits`` or
    #: ``data`` + ``max_accuracy_drop`` then choose ``f``)
    needs_fixed_point: ClassVar[bool] = False

    # -- export ---------------------------------------------------------------------------------
    def check_layer(self, info: LayerExport) -> None:
        """Raise :class:`ExportError` naming the layer if this form cannot express it; runs
        before any other work (e.g. an accuracy search)."""

    def finish_layer(self, info: LayerExport, frac_bits: int) -> None:
        """Fixed-point forms: per-layer data of the form once ``f`` is chosen (the layer's
        ``info.fixed_point`` is set)."""

    def transformations(self, layers: Sequence[LayerExport]) -> List[Transformation]:
        """The graph rewrites after the exporter, in order (a cleanup follows them). The
        default names each layer's weight tensor ``<layer>.weight``."""
        return [StripNodeDebugInfo(), NameLayerWeights([i.name for i in layers])]

    def layer_metadata(self, info: LayerExport) -> dict:
        """One layer's entry in the file's metadata."""
        return dict(info.metadata(), weight_tensor=f"{info.name}.weight")

    def metadata(self, layers: Sequence[LayerExport]) -> dict:
        """Entries of the file's metadata about the whole model (besides the layers)."""
        return {}

    def summary(self, metadata: dict) -> List[str]:
        """Lines of :meth:`ExportResult.summary` particular to this form."""
        return []

    # -- reading a file -------------------------------------------------------------------------
    def layer_tensors(self, row: dict) -> List[Optional[str]]:
        """The graph tensors a layer's metadata names (each must exist in the graph)."""
        return [row.get("weight_tensor")]

    def file_weight(self, ctx: Dict[str, np.ndarray], row: dict) -> np.ndarray:
        """The weights a layer of the file computes, from qonnx's execution context."""
        return np.asarray(ctx[row["weight_tensor"]])

    def graph_problems(self, row: dict, view: GraphView) -> List[str]:
        """Where the graph disagrees with a layer's metadata ``row`` (empty if nowhere). The
        default checks the multipliers' shape and finds the node computing the layer's weight
        tensor, then asks :meth:`weight_problems`."""
        layer, wt, bits = row["layer"], row["weight_tensor"], int(row["bits"])
        r = np.asarray(row["r"], dtype=np.float32)
        c = np.asarray(row["c"], dtype=np.float32)
        at = f"layer {layer!r}"
        if r.ndim != 2 or r.shape[1] != bits or c.shape != (r.shape[0],):
            return [f"{at}: the metadata's r {r.shape} / c {c.shape} do not fit {bits} bits"]
        node = view.producers.get(wt)
        if node is None:
            return [f"{at}: no node computes its weight tensor {wt!r}"]
        return self.weight_problems(at, row, node, r, c, view)

    def weight_problems(self, at: str, row: dict, node: onnx.NodeProto, r: np.ndarray,
                        c: np.ndarray, view: GraphView) -> List[str]:
        """Where the node computing a layer's weights (``node``) disagrees with its metadata
        (``r``, ``c`` as float32; ``at`` names the layer for messages)."""
        raise NotImplementedError


_FORMS: Dict[str, ExportForm] = {}


def register_form(cls: Type[ExportForm]) -> Type[ExportForm]:
    """Class decorator: make ``cls`` an export form under ``cls.name``."""
    if not isinstance(getattr(cls, "name", None), str) or cls.name in _FORMS:
        raise ValueError(f"export form {cls.__name__}: needs a new name, got "
                         f"{getattr(cls, 'name', None)!r} (taken: {sorted(_FORMS)})")
    _FORMS[cls.name] = cls()
    return cls


def unregister_form(name: str) -> None:
    """Remove the form called ``name`` from the registry (a plugin's tests clean up with it)."""
    form_named(name)
    del _FORMS[name]


def form_names() -> Tuple[str, ...]:
    """The registered forms' names, in registration order."""
    return tuple(_FORMS)


def form_named(name) -> ExportForm:
    """The registered form called ``name``; :class:`ExportError` for any other value."""
    form = _FORMS.get(name) if isinstance(name, str) else None
    if form is None:
        raise ExportError(f"unknown form {name!r}: choose one of {', '.join(_FORMS)}")
    return form

