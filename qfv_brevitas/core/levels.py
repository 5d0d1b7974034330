"""Pure torch math of the N-multiplier quantizer family (no Brevitas import).

A quantizer of ``N`` bits over ``G`` groups (``G = 1`` per tensor, ``G = out_channels`` per
channel) is given by bit multipliers ``r`` of shape ``(G, N)`` and an offset ``c`` of shape
``(G,)``. Its ``2**N`` levels are ``level[g, k] = c[g] + sum_i r[g, i] * bit_i(k)`` where
``bit_i(k) = (k >> i) & 1`` (paper eq. 2-4): the level table is indexed by the N-bit *code*.

Nearest-level search (paper eq. 5) never materialises an ``n x 2**N`` tensor: the levels are
sorted, the decision thresholds (midpoints, eq. 1) are bucketed into a small per-group lookup
table of equal-width cells, and each weight needs one cell lookup and one comparison. Memory is
O(n) at any N; time is a handful of elementwise passes. When the thresholds are too crowded for
the table (distinct thresholds sharing a cell) the search falls back to ``torch.searchsorted``,
which is exact too, only slower.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from qfv_brevitas.core import kernels as K

__all__ = [
    "MAX_BITS",
    "check_bits",
    "bit_matrix",
    "level_table",
    "uniform_multipliers",
    "lsq_step_init",
    "SortedLevels",
    "sort_levels",
    "nearest_sorted_index",
    "nearest",
    "codes_to_bits",
    "bits_to_codes",
    "sq_distance_to_levels",
    "snap_ste",
    "qp",
    "check_finite",
]

MAX_BITS = 8
# Upper bound on the lookup-table entries (all groups together) of the nearest-level search.
_MAX_TABLE = 1 << 22


def check_bits(bits, where: str = "quantizer") -> int:
    """Validate an N-bit width: an ``int`` in ``1..8`` (``MAX_BITS``)."""
    if isinstance(bits, Tensor):
        bits = bits.item()
    if isinstance(bits, (bool, str, bytes)) or not isinstance(bits, numbers.Real) or \
            not math.isfinite(bits) or not float(bits).is_integer():
        raise ValueError(f"{where}: bit width must be an integer in 1..{MAX_BITS}, got {bits!r}")
    bits = int(bits)
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(
            f"{where}: bit width must be in 1..{MAX_BITS}, got {bits}. N-multiplier levels are "
            f"enumerated as 2**N codes; use 1..{MAX_BITS} bits.")
    return bits


def check_finite(w: Tensor, where: str) -> None:
    """Raise a ValueError naming ``where`` if ``w`` holds NaN or infinite values."""
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(
            f"{where}: {bad} of {w.numel()} weights are NaN or infinite; quantizing them would "
            "snap them to an arbitrary level. Check the learning rate / loss scale or the checkpoint.")


def bit_matrix(bits: int, dtype=torch.float32, device=None) -> Tensor:
    """``(2**bits, bits)`` 0/1 matrix whose row ``k`` is the binary code of ``k`` (LSB first)."""
    codes = torch.arange(1 << bits, device=device)
    return ((codes[:, None] >> torch.arange(bits, device=device)) & 1).to(dtype)


def level_table(r: Tensor, c: Tensor) -> Tensor:
    """Levels ``(G, 2**N)`` from multipliers ``r (G, N)`` and offset ``c (G,)``; index = code."""
    if r.dim() != 2 or c.dim() != 1 or c.shape[0] != r.shape[0]:
        raise ValueError(f"r must be (G, N) and c (G,), got {tuple(r.shape)} and {tuple(c.shape)}")
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


# Elements per block of the blocked passes below: small enough that a block's temporaries stay
# in cache (the passes are memory-bound), large enough that per-op overhead is negligible.
_BLOCK = 1 << 18


#: Test switch: CPU tensors take the code paths written for GPUs (no host sync, whole-tensor
#: ops), so that a CPU-only machine can check them (tests/test_gpu.py).
_GPU_PATHS_ON_CPU = False


def sync_free(t: Tensor) -> bool:
    """Whether ``t`` takes the GPU code paths: no host syncs, one tile per tensor."""
    return t.device.type != "cpu" or _GPU_PATHS_ON_CPU


def _block_for(t: Tensor) -> Optional[int]:
    """Tile size for the torch paths on ``t``'s device: cache-sized blocks on the CPU; on a GPU
    one tile (every extra tile is another round of kernel launches)."""
    return 1 << 62 if sync_free(t) else None


def _blocks(G: int, M: int, block: Optional[int] = None):
    """Yield ``(r0, r1, c0, c1)`` tiles of a ``(G, M)`` array of about ``block`` elements."""
    block = block or _BLOCK
    if M >= block:
        for r in range(G):
            for c0 in range(0, M, block):
                yield r, r + 1, c0, min(c0 + block, M)
    else:
        rows = max(1, block // max(M, 1))
        for r0 in range(0, G, rows):
            yield r0, min(r0 + rows, G), 0, M


class _LevelIndex:
    """Sorted levels of a ``(G, L)`` table plus a lookup table for nearest-level search."""

    def __init__(self, levels: Tensor, dtype: torch.dtype):
        levels = levels.detach()
        s = sort_levels(levels)
        self.G, self.L = levels.shape
        self.perm = s.perm
        self.values = s.values.to(dtype).contiguous()
        self.thr = s.thresholds.to(dtype).contiguous()
        # The compiled CPU kernel builds its own table. On a GPU, searchsorted: the table's
        # checks would each be a host sync.
        self.native = K.usable(self.thr)
        self.lut = None if self.native or sync_free(levels) else self._build_lut()

    def _build_lut(self):
        G, T = self.thr.shape
        thr = self.thr
        if not bool(torch.isfinite(thr).all()):
            return None  # non-finite levels: searchsorted decides, check_finite reports
        cells = max(4 * (T + 1), 16)
        t0 = thr[:, :1]
        span = thr[:, -1:] - t0
        if T > 1:
            # Cell width from the smallest positive gap so distinct thresholds get distinct cells.
            gaps = thr[:, 1:] - thr[:, :-1]
            pos = torch.where(gaps > 0, gaps, torch.full_like(gaps, float("inf")))
            min_gap = pos.min(dim=1, keepdim=True).values
            need = torch.where(torch.isfinite(min_gap), span / min_gap, torch.zeros_like(span))
            need_max = float(need.max()) * 2 + 2
            if not math.isfinite(need_max) or need_max * G > _MAX_TABLE:
                return None  # gaps far below the span: searchsorted
            cells = max(cells, int(need_max))
        if G * cells > _MAX_TABLE:
            return None
        inv_h = torch.where(span > 0, cells / span, torch.ones_like(span))
        shift = -t0 * inv_h
        tc = self._cell(thr, shift, inv_h, cells).long()
        row = torch.arange(G, device=thr.device)[:, None]
        tc_flat = (tc + row * cells).reshape(-1)
        count = torch.zeros(G * cells, dtype=torch.long, device=thr.device)
        count.index_add_(0, tc_flat, torch.ones_like(tc_flat))
        if int(count.max()) > 1:
            # Two thresholds in one cell: coincident levels or gaps below the table's
            # resolution. searchsorted is exact in both cases.
            return None
        # Thresholds in earlier cells of the same group.
        base = (torch.cumsum(count.view(G, cells), 1) - count.view(G, cells)).reshape(-1)
        thr_at = torch.full((G * cells,), float("inf"), dtype=thr.dtype, device=thr.device)
        thr_at[tc_flat] = thr.reshape(-1)
        cell_off = (row * cells).to(torch.int32)
        return cells, shift, inv_h, base.to(torch.uint8), thr_at, cell_off

    @staticmethod
    def _cell(x: Tensor, shift: Tensor, inv_h: Tensor, cells: int) -> Tensor:
        # One monotone float formula for thresholds and weights alike, so that
        # cell(t) < cell(w) implies t < w exactly, whatever the rounding. Truncation of the
        # clamped non-negative value is floor.
        return torch.addcmul(shift, x, inv_h).clamp_(0, cells - 1).to(torch.int32)

    def index_block(self, wb: Tensor, r0: int, r1: int) -> Tensor:
        """uint8 index into the sorted levels of each weight of a block of rows ``r0:r1``."""
        try:
            return self._index_block(wb, r0, r1)
        except (IndexError, RuntimeError):
            # A NaN weight casts to an arbitrary cell index; say what is wrong instead.
            check_finite(wb, "weights")
            raise

    def _index_block(self, wb: Tensor, r0: int, r1: int) -> Tensor:
        if self.native:
            return K.nearest(wb, self.thr[r0:r1], self.values[r0:r1], False)[0]
        if self.lut is None:
            return torch.searchsorted(self.thr[r0:r1], wb.contiguous(), right=True).to(torch.uint8)
        cells, shift, inv_h, base, thr_at, cell_off = self.lut
        k = self._cell(wb, shift[r0:r1], inv_h[r0:r1], cells)
        if self.G > 1:
            k += cell_off[r0:r1]
        idx = base[k]
        idx += wb >= thr_at[k]
        return idx

    def values_block(self, idx: Tensor, r0: int, r1: int) -> Tensor:
        if self.G == 1:
            return self.values.view(-1)[idx.int()]
        return self.values[r0:r1].gather(1, idx.long())

    def flat_index(self, idx: Tensor, r0: int) -> Tensor:
        """Index into the flattened ``(G * L)`` sorted table, int64."""
        if self.G == 1:
            return idx.long().view(-1)
        row = torch.arange(r0, r0 + idx.shape[0], device=idx.device)[:, None] * self.L
        return (idx.long() + row).view(-1)

    def sorted_to_levels(self, sorted_grad: Tensor) -> Tensor:
        """Scatter a ``(G, L)`` gradient over sorted levels back to code order."""
        return torch.zeros_like(sorted_grad).scatter_(1, self.perm, sorted_grad)

    def distinct_neighbours(self) -> Tuple[Tensor, Tensor]:
        """``(up, down)``, ``(G, L)`` int64: for each sorted level the sorted index of the
        nearest strictly larger (smaller) level, ``-1`` where there is none. Coincident levels
        are skipped, so the spacing between a level and either neighbour is > 0 (the local
        spacing that the regularizer shapes of :mod:`qfv_brevitas.core.shapes` are scaled by)."""
        v = self.values
        G, n = v.shape
        idx = torch.arange(n, device=v.device).expand(G, n)
        rises = v[:, 1:] > v[:, :-1]  # a new distinct value starts at k + 1
        # up[j] = first start of a run after j; down[j] = last end of a run before j.
        starts = torch.where(rises, idx[:, 1:], n)
        up = torch.cat([starts.flip(1).cummin(1).values.flip(1),
                        torch.full((G, 1), n, device=v.device)], 1)
        ends = torch.where(rises, idx[:, :-1], -1)
        down = torch.cat([torch.full((G, 1), -1, device=v.device), ends.cummax(1).values], 1)
        return torch.where(up >= n, -1, up), down

    def search(self, w2d: Tensor) -> Tensor:
        """uint8 sorted index ``(G, M)`` of each weight's nearest level."""
        G, M = w2d.shape
        if self.native:
            return K.nearest(w2d, self.thr, self.values, False)[0]
        out = torch.empty((G, M), dtype=torch.uint8, device=w2d.device)
        for r0, r1, c0, c1 in _blocks(G, M, _block_for(w2d)):
            out[r0:r1, c0:c1] = self.index_block(w2d[r0:r1, c0:c1], r0, r1)
        return out


def nearest_sorted_index(w2d: Tensor, levels: Tensor) -> Tensor:
    """Index into the ascending levels of each weight's nearest level, ``(G, M)`` int64.

    Equals ``#{thresholds <= w}``: a weight on a threshold goes to the upper level (eq. 1).
    """
    with torch.no_grad():
        return _LevelIndex(levels, w2d.dtype).search(w2d).long()


def nearest(w2d: Tensor, levels: Tensor) -> Tuple[Tensor, Tensor]:
    """Nearest level and its code for each weight.

    ``w2d`` is ``(G, M)`` (one row per group), ``levels`` is ``(G, 2**N)`` indexed by code.
    Returns ``(values, codes)``, both ``(G, M)``; no gradient flows.

    >>> r, c = uniform_multipliers(torch.tensor([1.0]), 2)
    >>> nearest(torch.tensor([[-2.0, 0.1, 0.6, 5.0]]), level_table(r, c))
    (tensor([[-1.5000,  0.5000,  0.5000,  1.5000]]), tensor([[0, 2, 2, 3]]))
    """
    with torch.no_grad():
        li = _LevelIndex(levels, w2d.dtype)
        idx = li.search(w2d)
        if li.G == 1:  # one table: plain indexing, no int64 copy of the index
            idx = idx.int()
            return li.values.view(-1)[idx].view(w2d.shape), li.perm.view(-1)[idx].view(w2d.shape)
        idx = idx.long()
        return li.values.gather(1, idx), li.perm.gather(1, idx)


def codes_to_bits(codes: Tensor, bits: int) -> Tensor:
    """``(..., bits)`` uint8 bit planes of integer codes (LSB first)."""
    shifts = torch.arange(bits, device=codes.device)
    return ((codes.long()[..., None] >> shifts) & 1).to(torch.uint8)


def bits_to_codes(b: Tensor) -> Tensor:
    """Inverse of :func:`codes_to_bits`."""
    weights = 1 << torch.arange(b.shape[-1], device=b.device)
    return (b.long() * weights).sum(-1)


class _NearestSqDistance(torch.autograd.Function):
    """``sum_i min_q (w_i - q)^2`` with gradients to the weights and to the level table.

    d/dw = 2 (w - q*); d/dlevel_j = -2 * sum over weights snapped to j of (w - q*). The level
    table's gradient flows on to ``r`` and ``c`` through ``level_table`` (a tiny matmul), which
    is exactly what eq. 7 implies: d/dr_i = -2 sum (w - q*) bit_i(code), d/dc = -2 sum (w - q*).
    Only a uint8 index per weight is kept for the backward pass.
    """

    @staticmethod
    def forward(ctx, w2d: Tensor, levels: Tensor) -> Tensor:
        li = _LevelIndex(levels, w2d.dtype)
        G, M = w2d.shape
        ctx.li = li
        if li.native and K.usable(w2d):
            # One pass: search, index and the sum of squares (added in double).
            idx, tot, _ = K.nearest(w2d, li.thr, li.values, True)
            ctx.save_for_backward(w2d, idx)
            return torch.tensor(tot, dtype=w2d.dtype)
        idx = torch.empty((G, M), dtype=torch.uint8, device=w2d.device)
        total = torch.zeros((), dtype=w2d.dtype, device=w2d.device)
        for r0, r1, c0, c1 in _blocks(G, M, _block_for(w2d)):
            wb = w2d[r0:r1, c0:c1]
            ib = li.index_block(wb, r0, r1)
            idx[r0:r1, c0:c1] = ib
            d = (wb - li.values_block(ib, r0, r1)).reshape(-1)
            total += torch.dot(d, d)
        ctx.li = li
        ctx.save_for_backward(w2d, idx)
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        w2d, idx = ctx.saved_tensors
        li: _LevelIndex = ctx.li
        G, M = w2d.shape
        need_w, need_lv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if li.native and K.usable(w2d, g):
            gf = float(g)
            grad_w, sums = K.nearest_backward(w2d, idx, li.values, 2 * gf, need_w, need_lv)
            grad_levels = None
            if need_lv:
                grad_levels = li.sorted_to_levels((sums * (-2 * gf)).to(w2d.dtype))
            return grad_w, grad_levels
        grad_w = torch.empty_like(w2d) if need_w else None
        sums = torch.zeros(G * li.L, dtype=w2d.dtype, device=w2d.device) if need_lv else None
        for r0, r1, c0, c1 in _blocks(G, M, _block_for(w2d)):
            ib = idx[r0:r1, c0:c1]
            d = w2d[r0:r1, c0:c1] - li.values_block(ib, r0, r1)
            if need_w:
                torch.mul(d, 2 * g, out=grad_w[r0:r1, c0:c1])
            if need_lv:
                sums.index_add_(0, li.flat_index(ib, r0), d.reshape(-1))
        grad_levels = None
        if need_lv:
            grad_levels = li.sorted_to_levels((sums.view(G, li.L) * (-2 * g)))
        return grad_w, grad_levels


class _SnapSTE(torch.autograd.Function):
    """Nearest level in the forward pass; straight-through to the weights in the backward pass,
    and the level table receives the gradient of the levels the weights were snapped to."""

    @staticmethod
    def forward(ctx, w2d: Tensor, levels: Tensor) -> Tensor:
        li = _LevelIndex(levels, w2d.dtype)
        idx = li.search(w2d)
        out = torch.empty_like(w2d)
        block = None if not sync_free(w2d) and not li.native else 1 << 62
        for r0, r1, c0, c1 in _blocks(*w2d.shape, block):
            out[r0:r1, c0:c1] = li.values_block(idx[r0:r1, c0:c1], r0, r1)
        ctx.li = li
        ctx.save_for_backward(idx)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (idx,) = ctx.saved_tensors
        li: _LevelIndex = ctx.li
        grad_levels = None
        if ctx.needs_input_grad[1]:
            G, M = idx.shape
            sums = torch.zeros(G * li.L, dtype=g.dtype, device=g.device)
            for r0, r1, c0, c1 in _blocks(G, M, _block_for(g)):
                sums.index_add_(0, li.flat_index(idx[r0:r1, c0:c1], r0),
                                g[r0:r1, c0:c1].reshape(-1))
            grad_levels = li.sorted_to_levels(sums.view(G, li.L))
        return (g if ctx.needs_input_grad[0] else None), grad_levels


def snap_ste(w2d: Tensor, levels: Tensor) -> Tensor:
    """Snap to the nearest level with a straight-through gradient to ``w2d`` and the exact
    gradient to ``levels`` (hence to ``r`` and ``c``)."""
    return _SnapSTE.apply(w2d, levels)


def sq_distance_to_levels(w2d: Tensor, levels: Tensor) -> Tensor:
    """Sum over weights of the squared distance to the nearest level (eq. 6/7, one layer).

    Differentiable in ``w2d`` and in ``levels`` (and so in ``r`` and ``c``). O(n) memory.

    >>> r, c = uniform_multipliers(torch.tensor([1.0]), 2)
    >>> float(sq_distance_to_levels(torch.tensor([[0.5, 0.75]]), level_table(r, c)))
    0.0625
    """
    return _NearestSqDistance.apply(w2d, levels)
