"""Pure torch math of the N-multiplier quantizer family (no Brevitas import).

A quantizer of ``N`` bits over ``G`` groups (``G = 1`` per tensor, ``G = out_channels`` per
channel) is given by bit multipliers ``r`` of shape ``(G, N)`` and an offset ``c`` of shape
``(G,)``. Its ``2**N`` levels are ``level[g, k] = c[g] + sum_i r[g, i] * bit_i(k)`` where
``bit_i(k) = (k >> i) & 1`` (paper eq. 2-4): the level table is indexed by the N-bit *code*.

The nearest-level search over these tables is :mod:`qfv_brevitas.core.search`; the
regularizer's distances are :mod:`qfv_brevitas.core.distance`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from qfv_brevitas.core.widths import MAX_BITS, check_bits  # re-exported: their home is widths
from qfv_brevitas.util.errors import QfvError


__all__ = [
    "MAX_BITS",
    "check_bits",
    "bit_matrix",
    "level_table",
    "uniform_multipliers",
    "lsq_step_init",
    "SortedLevels",
    "sort_levels",
    "codes_to_bits",
    "bits_to_codes",
    "popcount",
    "qp",
    "subset_sum_generators",
    "check_finite",
]


def check_finite(w: Tensor, where: str) -> None:
    """Raise a ValueError naming ``where`` if ``w`` holds NaN or infinite values."""
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise QfvError(
            f"{where}: {bad} of {w.numel()} weights are NaN or infinite; quantizing them would "
            "snap them to an arbitrary level. Check the learning rate / loss scale or the checkpoint.")


def bit_matrix(bits: int, dtype=torch.float32, device=None) -> Tensor:
    """``(2**bits, bits)`` 0/1 matrix whose row ``k`` is the binary code of ``k`` (LSB first)."""
    codes = torch.arange(1 << bits, device=device)
    return ((codes[:, None] >> torch.arange(bits, device=device)) & 1).to(dtype)


def level_table(r: Tensor, c: Tensor) -> Tensor:
    """Levels ``(G, 2**N)`` from multipliers ``r (G, N)`` and offset ``c (G,)``; index = code."""
    if r.dim() != 2 or c.dim() != 1 or c.shape[0] != r.shape[0]:
        raise QfvError(f"r must be (G, N) and c (G,), got {tuple(r.shape)} and {tuple(c.shape)}")
    b = bit_matrix(r.shape[1], r.dtype, r.device)
    # Summed bit by bit in a fixed order, ``c + r_0 b_0 + r_1 b_1 + ...``, not as a matmul:
    # exported graphs (bit planes, the NMultWeight op) compute the same sums in the same order,
    # so a deployed weight is reproduced bit for bit outside torch.
    out = c[:, None] + r[:, :1] * b[:, 0]
    for k in range(1, r.shape[1]):
        out = out + r[:, k:k + 1] * b[:, k]
    return out


def uniform_multipliers(step: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """Multipliers and offset of the symmetric uniform grid ``step * (k - (2**N - 1) / 2)``.

    ``step`` has shape ``(G,)``; returns ``r (G, N) = step * 2**i`` and ``c (G,)``. The grid has
    no zero level (as in the paper's initialisation) and is symmetric about 0.
    """
    pow2 = 2.0 ** torch.arange(bits, dtype=step.dtype, device=step.device)
    r = step[:, None] * pow2
    c = -step * ((1 << bits) - 1) / 2.0
    return r, c


def qp(bits: int) -> int:
    """LSQ's ``Q_P`` for signed weights, ``2**(b-1) - 1``, floored at 1 so that 1 bit is usable."""
    return max((1 << (bits - 1)) - 1, 1)


def lsq_step_init(w2d: Tensor, bits: int) -> Tensor:
    """LSQ step initialisation ``2 * mean|w| / sqrt(Q_P)`` per group (rows of ``w2d``)."""
    step = 2.0 * w2d.detach().abs().mean(dim=1) / (qp(bits) ** 0.5)
    # An all-zero group would give a zero step and coincident levels; keep a tiny positive step.
    return torch.where(step > 0, step, torch.full_like(step, 1e-8))


class SortedLevels(NamedTuple):
    values: Tensor  # (G, L) levels in ascending order
    perm: Tensor  # (G, L) code of each sorted level
    thresholds: Tensor  # (G, L - 1) decision thresholds (midpoints)


def sort_levels(levels: Tensor) -> SortedLevels:
    values, perm = levels.sort(dim=1, stable=True)
    lo, hi = values[:, :-1], values[:, 1:]
    thr = (hi + lo) * 0.5
    # Two levels one ulp apart have a midpoint that rounds onto the lower one, which would send
    # a weight sitting exactly on that level up: put such thresholds on the upper level.
    thr = torch.where(thr > lo, thr, hi)
    return SortedLevels(values, perm, thr)


def codes_to_bits(codes: Tensor, bits: int) -> Tensor:
    """``(..., bits)`` uint8 bit planes of integer codes (LSB first)."""
    shifts = torch.arange(bits, device=codes.device)
    return ((codes.long()[..., None] >> shifts) & 1).to(torch.uint8)


def bits_to_codes(b: Tensor) -> Tensor:
    """Inverse of :func:`codes_to_bits`."""
    weights = 1 << torch.arange(b.shape[-1], device=b.device)
    return (b.long() * weights).sum(-1)


def popcount(mask: Tensor, bits: int) -> Tensor:
    """Set bits among the low ``bits`` bits of an integer tensor, over all its entries: a
    0-dim int64 tensor on ``mask``'s device (no host sync until ``int()``), e.g. the stuck or
    flipped cells of a mask.

    >>> int(popcount(torch.tensor([0b101, 0b011, 0b100], dtype=torch.uint8), 2))
    3
    """
    total = torch.zeros((), dtype=torch.int64, device=mask.device)
    for i in range(bits):
        total = total + ((mask >> i) & 1).sum()
    return total


def subset_sum_generators(levels: Tensor) -> Tensor:
    """``(G, N + 1)`` = ``(r, c)`` with ``{c + <r, S>}`` close to the sorted ``levels``
    ``(G, 2**N)``: the classic reconstruction of a set from its subset sums. The smallest gap
    is a generator ``d``; pairing each level, from the smallest, with the free level nearest to
    it plus ``d`` splits the set into lower and upper halves; the lower half holds the subset
    sums of the other generators; repeat. Exact on exact subset sums; a start otherwise."""
    G, nl = levels.shape
    g = torch.arange(G, device=levels.device)
    gens = []
    v = levels
    while v.shape[1] > 1:
        K = v.shape[1]
        d = v[:, 1] - v[:, 0]
        free = torch.ones(G, K, dtype=torch.bool, device=v.device)
        lows, highs = [], []
        for _ in range(K // 2):
            i = free.int().argmax(1)  # the smallest free level (v is sorted)
            free[g, i] = False
            target = v[g, i] + d
            dist = torch.where(free, (v - target[:, None]).abs(), torch.full_like(v, math.inf))
            j = dist.argmin(1)
            free[g, j] = False
            lows.append(v[g, i])
            highs.append(v[g, j])
        lo, hi = torch.stack(lows, 1), torch.stack(highs, 1)
        gens.append((hi - lo).mean(1))
        v = lo.sort(1).values
    return torch.cat([torch.stack(gens[::-1], 1), v], 1)
