"""What each N-multiplier layer exports: codes the device holds, multipliers, offset, maps.

One place computes it for every form (the handlers, the metadata, the crossbar files and the
verification all read the same :class:`LayerExport`), so the forms cannot drift apart.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from qfv_brevitas.core.chip import Chip, stuck_counts
from qfv_brevitas.core.groups import GroupLayout
from qfv_brevitas.core.quantizers import nmult_layers, quant_of

__all__ = ["LayerExport", "collect_layers", "decode", "without_maps", "fault_summary",
           "variability_summary"]


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
    extra: Dict[str, object] = field(default_factory=dict)

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

    def planes(self) -> List[Tensor]:
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
        # extra entries starting with "_" are working tensors (e.g. the fixed-point weights)
        row.update({k: v for k, v in self.extra.items() if not k.startswith("_")})
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
def collect_layers(model: nn.Module, device: bool = True) -> List[LayerExport]:
    """Every N-multiplier layer of ``model`` as it deploys.

    ``device=True``: with a fault map attached the codes are those the device holds (stuck bits
    forced), with a variability map the per-cell factors come along: the export computes what
    the imperfect device computes. ``device=False``: the ideal levels (maps ignored).
    """
    out = []
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        w = layer.weight.detach()
        # device=False: the same layer on an ideal chip (each weight's nearest level)
        chip = tq.chip if device else Chip().bind(tq.layout, tq.bits, tq.weight_shape,
                                                  tq.layer_name)
        r, c = tq.multipliers().detach(), tq.offset().detach()
        w2d = tq.checked_groups(w)
        info = LayerExport(
            name=name, bits=tq.bits, variant=tq.variant,
            axis=tq.layout.axis, weight_shape=tuple(w.shape),
            codes=tq.from_groups(chip.held_codes(w2d, r, c), w.shape).to(torch.uint8).cpu(),
            r=r.float().cpu().clone(), c=c.float().cpu().clone())
        if chip.has_faults:
            info.faults = fault_summary(chip.sa0.cpu(), chip.sa1.cpu(), tq.bits)
            info.faults["mapping"] = chip.mapping
        if chip.has_variability:
            info.lrs = chip.lrs.detach().float().cpu()
            info.hrs = None if chip.hrs is None else chip.hrs.detach().float().cpu()
            info.variability = variability_summary(info.lrs, info.hrs)
            info.variability["mapping"] = chip.mapping
        info.weight = (tq.from_groups(chip.snap(w2d, r, c), w.shape) if device
                       else decode(info)).detach().float().cpu()
        out.append(info)
    return out


def decode(info: LayerExport, r: Optional[Tensor] = None, c: Optional[Tensor] = None) -> Tensor:
    """The weights ``info`` describes (torch, the op's formula), optionally with other r, c."""
    from qfv_brevitas.core.levels import level_table

    r = info.r if r is None else r
    c = info.c if c is None else c
    w = info.lookup(level_table(r, c))
    if info.lrs is None and info.hrs is None:
        return w
    N = info.bits
    bits = ((info.to_groups(info.codes.long())[..., None] >> torch.arange(N)) & 1).float()
    dev = torch.zeros_like(bits)
    if info.lrs is not None:
        dev = bits * (info.to_groups(info.lrs) - 1)
    if info.hrs is not None:
        dev = dev + (1 - bits) * info.to_groups(info.hrs)
    return w + info.from_groups((dev * r[:, None, :]).sum(-1))
