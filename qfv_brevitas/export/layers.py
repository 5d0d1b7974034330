"""What each N-multiplier layer exports: codes the device holds, multipliers, offset, maps.

One place computes it for every form (the handlers, the metadata, the crossbar files and the
verification all read the same :class:`LayerExport`), so the forms cannot drift apart.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
from torch import Tensor, nn

from qfv_brevitas.core.chip import stuck_counts
from qfv_brevitas.core.device import deployed_values
from qfv_brevitas.core.groups import GroupLayout
from qfv_brevitas.core.quantizers import nmult_layers, quant_of

__all__ = ["LayerExport", "FixedPointLayer", "PlanesLayer", "PlaneTensors", "collect_layers",
           "decode", "without_maps", "fault_summary", "variability_summary"]


@dataclass
class FixedPointLayer:
    """A layer's multipliers and offset rounded to ``m * 2**-f`` (the ``fixed`` and ``planes``
    forms; :func:`~qfv_brevitas.export.fixedpoint.fixed_point_layer`)."""

    frac_bits: int
    int_bits: int                  # width of the integer levels
    signed: bool
    int_min: int
    int_max: int
    r_fixed: list                  # (G, N) rounded multipliers
    c_fixed: list                  # (G,) rounded offset
    max_multiplier_error: float
    max_weight_error: float
    weight: Tensor = field(repr=False)  # the deployed weights ``int * 2**-f`` (float32)

    def metadata(self) -> dict:
        """The layer's ``fixed_point`` entry in the file's metadata."""
        return {k: v for k, v in asdict(self).items() if k != "weight"}


@dataclass
class PlaneTensors:
    """The graph tensors of one plane-parallel layer (names), written by the graph rewrite."""

    planes: List[str]              # the 0/1 initializers, LSB first
    plane_outputs: List[str]       # their Quant nodes' outputs
    multipliers: List[str]         # the integer multipliers per plane
    scale: str                     # 2**-f
    layout: str                    # "matmul": planes stored (in, out); "weight": as the weight
    ones: Optional[str] = None     # the all-ones offset layer and its Quant output
    ones_output: Optional[str] = None
    offset: Optional[str] = None   # the integer offsets and their Quant (or Mul) input
    offset_output: Optional[str] = None

    def metadata(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class PlanesLayer:
    """A layer in the plane-parallel form: integer multipliers per plane and channel, integer
    offsets, their widths and the weight memory (:func:`~qfv_brevitas.export.forms.planes.
    planes_layer`)."""

    frac_bits: int
    planes: int                    # N
    multipliers: list              # (G, N) integers
    offset: list                   # (G,) integers
    multiplier_bits: int
    offset_bits: int
    offset_layer: bool             # whether a nonzero offset needs the all-ones layer
    memory: dict                   # bits: planes, ones, multipliers, offset, total
    tensors: Optional[PlaneTensors] = None

    def metadata(self) -> dict:
        """The layer's ``planes`` entry in the file's metadata."""
        row = {k: getattr(self, k) for k in ("frac_bits", "planes", "multipliers", "offset",
                                             "multiplier_bits", "offset_bits", "offset_layer")}
        row["memory"] = dict(self.memory)
        if self.tensors is not None:
            row["tensors"] = self.tensors.metadata()
        return row


@dataclass
class LayerExport:
    """One quantized layer as deployed (all tensors detached, float32 / uint8, on the CPU)."""

    name: str
    bits: int
    variant: str
    axis: int                      # channel axis of r's rows, -1 per tensor
    weight_shape: tuple
    codes: Tensor                  # uint8, weight shape: the codes the device holds
    r: Tensor                      # (G, N)
    c: Tensor                      # (G,)
    lrs: Optional[Tensor] = None   # weight shape + (N,)
    hrs: Optional[Tensor] = None
    faults: Optional[dict] = None
    variability: Optional[dict] = None
    weight: Optional[Tensor] = None  # what the torch model computes with (reference)
    frac_bits: Optional[int] = None  # the integer view's grid 2**-f (trained on it), if any
    fixed_point: Optional[FixedPointLayer] = None  # set by the fixed-point forms
    planes: Optional[PlanesLayer] = None           # set by the plane-parallel form

    @property
    def granularity(self) -> str:
        return "tensor" if self.axis < 0 else "channel"

    def broadcast(self, t: Tensor) -> Tensor:
        """A per-group vector ``(G,)`` shaped to broadcast against the weight."""
        if self.axis < 0:
            return t.reshape([1] * len(self.weight_shape))
        shape = [1] * len(self.weight_shape)
        shape[self.axis] = -1
        return t.reshape(shape)

    def to_groups(self, t: Tensor) -> Tensor:
        """``t`` (the weight's shape, optionally with trailing dims) as ``(G, M, ...)``: one
        row per group of ``r``."""
        return GroupLayout(self.axis).to_groups(t, tail=t.dim() - len(self.weight_shape))

    def from_groups(self, t2d: Tensor) -> Tensor:
        """Inverse of :meth:`to_groups` for a ``(G, M)`` tensor: back to the weight's shape."""
        return GroupLayout(self.axis).from_groups(t2d, self.weight_shape)

    def lookup(self, table: Tensor) -> Tensor:
        """``table[g, code]`` for every weight, in the weight's shape (``table``: ``(G, 2**N)``
        indexed by code, e.g. a level table)."""
        return self.from_groups(table.gather(1, self.to_groups(self.codes.long())))

    def bit_planes(self) -> List[Tensor]:
        """Bit plane ``k`` (float 0/1, the weight's shape) of the held codes, LSB first."""
        c = self.codes.long()
        return [((c >> k) & 1).to(torch.float32) for k in range(self.bits)]

    def metadata(self) -> dict:
        row = {
            "layer": self.name, "bits": self.bits, "variant": self.variant,
            "granularity": self.granularity, "axis": self.axis,
            "weight_shape": list(self.weight_shape),
            "r": self.r.tolist(), "c": self.c.tolist(),
            "faults": self.faults, "variability": self.variability,
        }
        if self.frac_bits is not None:
            row["integer_view"] = {"frac_bits": self.frac_bits}
        if self.fixed_point is not None:
            row["fixed_point"] = self.fixed_point.metadata()
        if self.planes is not None:
            row["planes"] = self.planes.metadata()
        return row


def fault_summary(sa0: Tensor, sa1: Tensor, bits: int) -> dict:
    """A layer's fault entry in the file's metadata (:func:`qfv_brevitas.core.chip.stuck_counts`
    under the file's keys)."""
    n = stuck_counts(sa0, sa1, bits)
    return {"cells": n["cells"], "stuck_at_0": n["sa0"], "stuck_at_1": n["sa1"],
            "rate": n["fraction"], "weights_affected": n["weights"]}


def variability_summary(lrs: Tensor, hrs: Optional[Tensor]) -> dict:
    out = {"lrs_mean": float(lrs.mean()), "lrs_std": float(lrs.std()) if lrs.numel() > 1 else 0.0,
           "lrs_min": float(lrs.min()), "lrs_max": float(lrs.max())}
    if hrs is not None:
        out.update(hrs_mean=float(hrs.mean()), hrs_max=float(hrs.max()))
    return out


def without_maps(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every fault and variability map removed: the
    ideal device."""
    twin = copy.deepcopy(model)
    for _, layer in nmult_layers(twin):
        layer.weight_quant.chip.clear_faults()
        layer.weight_quant.chip.clear_variability()
    return twin.eval()


@torch.no_grad()
def collect_layers(model: nn.Module) -> List[LayerExport]:
    """Every N-multiplier layer of ``model`` as its chip deploys it: with a fault map attached
    the codes are those the device holds (stuck bits forced), with a variability map the
    per-cell factors come along, so the export computes what the imperfect device computes.
    For the ideal levels, collect the layers of :func:`without_maps` ``(model)``.
    """
    out = []
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        w = layer.weight.detach()
        chip = tq.chip
        r, c = tq.multipliers().detach(), tq.offset().detach()
        w2d = tq.checked_groups(w)
        info = LayerExport(
            name=name, bits=tq.bits, variant=tq.variant,
            axis=tq.layout.axis, weight_shape=tuple(w.shape),
            codes=tq.from_groups(chip.held_codes(w2d, r, c), w.shape).to(torch.uint8).cpu(),
            r=r.float().cpu().clone(), c=c.float().cpu().clone(), frac_bits=tq.frac_bits)
        if chip.has_faults:
            info.faults = fault_summary(chip.sa0.cpu(), chip.sa1.cpu(), tq.bits)
            info.faults["mapping"] = chip.mapping
        if chip.has_variability:
            info.lrs = chip.lrs.detach().float().cpu()
            info.hrs = None if chip.hrs is None else chip.hrs.detach().float().cpu()
            info.variability = variability_summary(info.lrs, info.hrs)
            info.variability["mapping"] = chip.mapping
        info.weight = tq.from_groups(chip.snap(w2d, r, c), w.shape).detach().float().cpu()
        out.append(info)
    return out


def decode(info: LayerExport, r: Optional[Tensor] = None, c: Optional[Tensor] = None) -> Tensor:
    """The weights ``info`` describes (the chip's deployed values of its held codes, with its
    cells' factors), optionally with other r, c."""
    r = info.r if r is None else r
    c = info.c if c is None else c
    cells = [None if t is None else info.to_groups(t) for t in (info.lrs, info.hrs)]
    return info.from_groups(deployed_values(info.to_groups(info.codes.long()), r, c,
                                            lrs=cells[0], hrs=cells[1]))
