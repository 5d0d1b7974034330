"""How a weight tensor is viewed as groups of one quantizer's levels.

A per-tensor quantizer has one group (one row of ``r``); a per-channel one has one group per
output channel along ``axis``. :class:`GroupLayout` turns a weight (optionally with trailing
per-cell dimensions, e.g. variability factors of shape ``weight.shape + (N,)``) into rows
``(G, M, ...)`` and back; the quantizer, its chip and the exporter all use it.

>>> import torch
>>> lay = GroupLayout(axis=0)
>>> w = torch.arange(6.).reshape(2, 3)
>>> lay.to_groups(w).tolist(), GroupLayout(-1).to_groups(w).shape
([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], torch.Size([1, 6]))
>>> torch.equal(GroupLayout(1).from_groups(GroupLayout(1).to_groups(w), w.shape), w)
True
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from torch import Tensor

__all__ = ["GroupLayout"]


class GroupLayout(NamedTuple):
    """Rows of a weight: ``axis`` is the output-channel axis, or ``-1`` for one row."""

    axis: int = -1

    @property
    def per_channel(self) -> bool:
        return self.axis >= 0

    def to_groups(self, t: Tensor, tail: int = 0) -> Tensor:
        """``t`` as ``(G, M, *last tail dims)``: one row per group."""
        rest = tuple(t.shape[t.dim() - tail:]) if tail else ()
        if self.axis < 0:
            return t.reshape((1, -1) + rest)
        return t.movedim(self.axis, 0).reshape((t.shape[self.axis], -1) + rest)

    def from_groups(self, t2d: Tensor, shape: Sequence[int]) -> Tensor:
        """Inverse of :meth:`to_groups` (``tail=0``): a ``(G, M)`` tensor back to ``shape``."""
        if self.axis < 0:
            return t2d.reshape(tuple(shape))
        moved = list(shape)
        moved.insert(0, moved.pop(self.axis))
        return t2d.reshape(moved).movedim(0, self.axis)
