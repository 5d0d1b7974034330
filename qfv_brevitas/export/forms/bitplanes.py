"""The bit-plane form: standard ops only, ``c + r_0 Quant(B_0) + r_1 Quant(B_1) + ...`` with
1-bit unsigned planes ``B_k`` of the codes the device holds (and, with a variability map, each
cell's deviation ``r_k (B_k (lrs_k - 1) + (1 - B_k) hrs_k)``)."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import onnx
import torch
from torch import Tensor

from qonnx.transformation.base import Transformation

from qfv_brevitas.export.arrays import channels_note, differing_channels, fmt, same
from qfv_brevitas.export.forms.base import ExportForm, GraphView, register_form
from qfv_brevitas.export.graph import UnshareWeightQuants, attr, upstream
from qfv_brevitas.export.handler import WeightHandler, quant_node
from qfv_brevitas.export.layers import LayerExport

__all__ = ["BitPlanesForm", "BitPlanesHandler"]


def _nearest_note(candidates: Sequence[np.ndarray], want: np.ndarray) -> str:
    """Which channels of ``want`` differ in the candidate closest to it (the fewest channels
    differing), for a message: a tampered channel of a per-channel constant is named."""
    sized = [v for v in candidates if np.asarray(v).size == np.asarray(want).size]
    if not sized:
        return ""
    return channels_note(min(sized, key=lambda v: len(differing_channels(v, want))), want)


class BitPlanesHandler(WeightHandler):
    """``c + r_0 Quant(B_0) + r_1 Quant(B_1) + ...``: 1-bit unsigned planes, standard ops only."""

    def prepare_for_export(self, module):
        super().prepare_for_export(module)
        i = self.info
        self.planes = i.bit_planes()
        self.rk = [i.broadcast(i.r[:, k].contiguous()) for k in range(i.bits)]
        self.cb = i.broadcast(i.c)
        self.one = torch.ones(())
        if i.lrs is not None:
            self.lrs_dev = [(i.lrs[..., k] - 1).contiguous() for k in range(i.bits)]
        if i.hrs is not None:
            self.hrs_k = [i.hrs[..., k].contiguous() for k in range(i.bits)]

    def weight(self) -> Tensor:
        i = self.info
        qs = [quant_node(self, b, self.one, 1, False) for b in self.planes]
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


@register_form
class BitPlanesForm(ExportForm):
    name = "bitplanes"
    help = "standard ops only: c + sum_k r_k * Quant(B_k), 1-bit planes"
    handler = BitPlanesHandler

    def transformations(self, layers: Sequence[LayerExport]) -> List[Transformation]:
        # the dynamo exporter merges equal planes into one Quant node: one node per plane
        return [UnshareWeightQuants()] + super().transformations(layers)

    def weight_problems(self, at: str, row: dict, node: onnx.NodeProto, r: np.ndarray,
                        c: np.ndarray, view: GraphView) -> List[str]:
        """Every ``Quant`` node of the weight's subgraph 1-bit unsigned with scale 1 over a 0/1
        plane of the weight's shape; every multiplier ``r_k`` and the offset ``c`` among the
        subgraph's constants, and (without a variability map) no other per-group constant."""
        bits, shape = int(row["bits"]), tuple(row["weight_shape"])
        sub = upstream(row["weight_tensor"], view.producers)
        consts = view.consts
        out: List[str] = []
        quants = [n for n in sub if n.op_type == "Quant"]
        if not quants:
            out.append(f"{at}: no bit planes in its weight graph")
        for q in quants:
            plane, scale, zero, width = (consts.get(t) for t in q.input[:4])
            if plane is None or tuple(plane.shape) != shape or \
                    not np.isin(plane, (0.0, 1.0)).all():
                out.append(f"{at}: bit plane {q.input[0]!r} is not a 0/1 tensor of shape {shape}")
            if not (same(scale, 1.0) and same(zero, 0.0) and same(width, 1.0)) or \
                    attr(q, "signed", 1) != 0:
                out.append(f"{at}: plane quantizer {q.name or q.output[0]!r} is not 1-bit "
                           "unsigned with scale 1")
        operands = [consts[t] for n in sub if n.op_type in ("Mul", "Add") for t in n.input
                    if t in consts]
        for k in range(bits):
            if not any(same(v, r[:, k]) for v in operands):
                out.append(f"{at}: the metadata's multiplier r_{k} = {fmt(r[:, k])} is not in "
                           f"the graph{_nearest_note(operands, r[:, k])}")
        if not any(same(v, c) for v in operands):
            out.append(f"{at}: the metadata's offset c = {fmt(c)} is not in the graph"
                       f"{_nearest_note(operands, c)}")
        if not row.get("variability"):
            known = [r[:, k] for k in range(bits)] + [c]
            for v in operands:
                if v.size == r.shape[0] and not any(same(v, w) for w in known):
                    near = min(known, key=lambda w: len(differing_channels(v, w)))
                    out.append(f"{at}: constant {fmt(v)} in its weight graph is neither a "
                               "multiplier r nor the offset c of the metadata"
                               f"{channels_note(v, near)}")
        return out
