"""Nearest-level search over level tables, block by block (pure torch math + the compiled
CPU kernels).

Nearest-level search (paper eq. 5) never materialises an ``n x 2**N`` tensor: the levels are
sorted, the decision thresholds (midpoints, eq. 1) are bucketed into a small per-group lookup
table of equal-width cells, and each weight needs one cell lookup and one comparison. Memory is
O(n) at any N; time is a handful of elementwise passes. When the thresholds are too crowded for
the table (distinct thresholds sharing a cell) the search falls back to ``torch.searchsorted``,
which is exact too, only slower.

The search is the torch custom op ``qfv::nearest`` (:func:`nearest_op`; with the squared
distance to the nearest level and its registered gradient, eq. 7): the compiled CPU kernel or
the torch search below, whichever takes the tensors, behind one graph node that torch.compile
and torch.export trace.

Every blocked pass of the library (the search, the distances of
:mod:`qfv_brevitas.core.distance`, the device-aware search of :mod:`qfv_brevitas.core.device`,
the fit of :mod:`qfv_brevitas.core.fitting`) tiles its ``(G, M)`` weights with :func:`blocks`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from qfv_brevitas.core import kernels as K
from qfv_brevitas.core.levels import check_finite, sort_levels

__all__ = ["BLOCK", "CAND_BLOCK", "GPU_PATHS_ON_CPU", "sync_free", "block_for", "cand_block",
           "blocks", "LevelIndex", "nearest_sorted_index", "values_block", "flat_index",
           "nearest_op", "nearest_backward_op", "sorted_for_search", "sq_distance", "nearest",
           "snap_ste"]

# Upper bound on the lookup-table entries (all groups together) of the nearest-level search.
MAX_TABLE = 1 << 22

# Weights per block times candidate codes: bounds the temporaries of the exhaustive searches
# over all 2**N codes (device-aware search and neighbours).
CAND_BLOCK = 1 << 20
# The same on a GPU: fewer, larger blocks (each block is a round of kernel launches), still
# O(n) memory (a block's temporaries are a few hundred MB at most).
CAND_BLOCK_GPU = 1 << 25


# Elements per block of the blocked passes below: small enough that a block's temporaries stay
# in cache (the passes are memory-bound), large enough that per-op overhead is negligible.
BLOCK = 1 << 18


#: Test switch: CPU tensors take the code paths written for GPUs (no host sync, whole-tensor
#: ops), so that a CPU-only machine can check them (tests/test_gpu.py).
GPU_PATHS_ON_CPU = False


def sync_free(t: Tensor) -> bool:
    """Whether ``t`` takes the GPU code paths: no host syncs, one tile per tensor."""
    return t.device.type != "cpu" or GPU_PATHS_ON_CPU


def block_for(t: Tensor) -> Optional[int]:
    """Tile size for the torch paths on ``t``'s device: cache-sized blocks on the CPU; on a GPU
    one tile (every extra tile is another round of kernel launches)."""
    return 1 << 62 if sync_free(t) else None


def cand_block(t: Tensor) -> int:
    """Weights times candidate codes per block of an exhaustive search on ``t``'s device."""
    return CAND_BLOCK_GPU if sync_free(t) else CAND_BLOCK


def blocks(G: int, M: int, block: Optional[int] = None):
    """Yield ``(r0, r1, c0, c1)`` tiles of a ``(G, M)`` array of about ``block`` elements."""
    block = block or BLOCK
    if M >= block:
        for r in range(G):
            for c0 in range(0, M, block):
                yield r, r + 1, c0, min(c0 + block, M)
    else:
        rows = max(1, block // max(M, 1))
        for r0 in range(0, G, rows):
            yield r0, min(r0 + rows, G), 0, M


#: dtypes whose nearest-level search may use the lookup table (exact cell arithmetic)
LUT_DTYPES = (torch.float32, torch.float64)


class LevelIndex:
    """Sorted levels of a ``(G, L)`` table plus a lookup table for nearest-level search."""

    def __init__(self, levels: Tensor, dtype: torch.dtype):
        s = sort_levels(levels.detach())
        self._setup(s.values.to(dtype).contiguous(), s.thresholds.to(dtype).contiguous(),
                    s.perm, K.usable(s.thresholds.to(dtype)))

    @classmethod
    def of_sorted(cls, thr: Tensor, values: Tensor) -> "LevelIndex":
        """The torch search over levels already sorted (the search op's inputs; no codes)."""
        li = cls.__new__(cls)
        li._setup(values, thr, None, False)
        return li

    def _setup(self, values: Tensor, thr: Tensor, perm: Optional[Tensor], native: bool) -> None:
        self.G, self.L = values.shape
        self.perm, self.values, self.thr = perm, values, thr
        # The compiled CPU kernel builds its own table. On a GPU, searchsorted: the table's
        # checks would each be a host sync.
        self.native = native
        # Half-precision dtypes: the table's cell arithmetic is not exact there (bfloat16 holds
        # integers exactly only up to 256), searchsorted compares in the dtype exactly.
        self.lut = None if self.native or sync_free(values) or values.dtype not in LUT_DTYPES \
            else self._build_lut()

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
            if not math.isfinite(need_max) or need_max * G > MAX_TABLE:
                return None  # gaps far below the span: searchsorted
            cells = max(cells, int(need_max))
        if G * cells > MAX_TABLE:
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
            return nearest_op(wb, self.thr[r0:r1], self.values[r0:r1], False)[1]
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
        return values_block(self.values, idx, r0, r1)

    def flat_index(self, idx: Tensor, r0: int) -> Tensor:
        """Index into the flattened ``(G * L)`` sorted table, int64."""
        return flat_index(idx, r0, self.L, self.G)

    def sorted_to_levels(self, sorted_grad: Tensor) -> Tensor:
        """Scatter a ``(G, L)`` gradient over sorted levels back to code order."""
        return torch.zeros_like(sorted_grad).scatter_(1, self.perm, sorted_grad)

    def distinct_neighbours(self) -> Tuple[Tensor, Tensor]:
        """``(up, down)``, ``(G, L)`` int64: for each sorted level the sorted index of the
        nearest strictly larger (smaller) level, ``-1`` where there is none. Coincident levels
        are skipped, so the spacing between a level and either neighbour is > 0 (the local
        spacing that the regularizer shapes of :mod:`qfv_brevitas.core.distance` are scaled by)."""
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

    def search(self, w2d: Tensor, with_total: bool = False) -> Tuple[Tensor, Tensor]:
        """uint8 sorted index ``(G, M)`` of each weight's nearest level and, ``with_total``,
        ``sum (w - q)^2`` (0-dim, ``w2d``'s dtype; else 0): one pass on the kernel, else block
        by block in torch."""
        if self.native:
            total, idx = nearest_op(w2d, self.thr, self.values, with_total)
            return idx, total
        G, M = w2d.shape
        idx = torch.empty((G, M), dtype=torch.uint8, device=w2d.device)
        total = torch.zeros((), dtype=w2d.dtype, device=w2d.device)
        for r0, r1, c0, c1 in blocks(G, M, block_for(w2d)):
            wb = w2d[r0:r1, c0:c1]
            ib = self.index_block(wb, r0, r1)
            idx[r0:r1, c0:c1] = ib
            if with_total:
                d = (wb - self.values_block(ib, r0, r1)).reshape(-1)
                total += torch.dot(d, d)
        return idx, total


def nearest_sorted_index(w2d: Tensor, levels: Tensor) -> Tensor:
    """Index into the ascending levels of each weight's nearest level, ``(G, M)`` int64.

    Equals ``#{thresholds <= w}``: a weight on a threshold goes to the upper level (eq. 1).
    """
    with torch.no_grad():
        return LevelIndex(levels, w2d.dtype).search(w2d)[0].long()


def values_block(values: Tensor, idx: Tensor, r0: int, r1: int) -> Tensor:
    """``values[g, idx]`` for the rows ``r0:r1`` of a ``(G, L)`` table (one table: plain
    indexing)."""
    if values.shape[0] == 1:
        return values.view(-1)[idx.int()]
    return values[r0:r1].gather(1, idx.long())


def flat_index(idx: Tensor, r0: int, n: int, G: int) -> Tensor:
    """Index into a flattened ``(G * n)`` table of the rows from ``r0`` on, int64."""
    if G == 1:
        return idx.long().view(-1)
    row = torch.arange(r0, r0 + idx.shape[0], device=idx.device)[:, None] * n
    return (idx.long() + row).view(-1)


# -- the search as torch custom ops -------------------------------------------------------------
# torch.compile and torch.export cannot see into a ctypes call. As custom ops (a fake
# implementation for tracing, a registered autograd) the search is one node of a graph; the
# compiled kernel or the torch path behind it is chosen when the node runs (kernels.usable).

@torch.library.custom_op("qfv::nearest", mutates_args=())
def nearest_op(w2d: Tensor, thr: Tensor, values: Tensor, with_total: bool
               ) -> Tuple[Tensor, Tensor]:
    """``(total, idx)``: with ``with_total`` the squared distance ``sum (w - q)^2`` of the
    weights to their nearest levels (0-dim, ``w2d``'s dtype; else 0), and the sorted index
    (uint8 ``(G, M)``) of each weight's nearest level among the ascending ``values``
    ``(G, L)`` (thresholds ``thr`` ``(G, L - 1)``, both in ``w2d``'s dtype). The total is
    differentiable in ``w2d`` and ``values`` (eq. 7). The compiled kernel where it takes the
    tensors (one pass, the sum in double), else the blocked torch search."""
    if K.usable(w2d, thr, values):
        idx, total, _ = K.nearest(w2d, thr, values, with_total)
        return torch.tensor(total if with_total else 0.0, dtype=w2d.dtype), idx
    idx, total = LevelIndex.of_sorted(thr, values).search(w2d, with_total)
    return total, idx


@nearest_op.register_fake
def _nearest_fake(w2d, thr, values, with_total):
    return w2d.new_empty(()), w2d.new_empty(w2d.shape, dtype=torch.uint8)


@torch.library.custom_op("qfv::nearest_backward", mutates_args=())
def nearest_backward_op(g: Tensor, w2d: Tensor, idx: Tensor, values: Tensor, need_w: bool,
                        need_values: bool) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`nearest_op`'s total times ``g``: ``2 g (w - q)`` to the weights and
    ``-2 g sum (w - q)`` over the weights at each sorted level (eq. 7); an empty tensor for one
    not asked for."""
    if K.usable(w2d, g, values):
        gf = float(g)
        grad_w, sums = K.nearest_backward(w2d, idx, values, 2 * gf, need_w, need_values)
        grad_v = (sums * (-2 * gf)).to(w2d.dtype) if need_values else None
    else:
        grad_w, grad_v = _nearest_backward_torch(g, w2d, idx, values, need_w, need_values)
    return (grad_w if need_w else w2d.new_empty(0)), (grad_v if need_values else
                                                         w2d.new_empty(0))


@nearest_backward_op.register_fake
def _nearest_backward_fake(g, w2d, idx, values, need_w, need_values):
    return (torch.empty_like(w2d) if need_w else w2d.new_empty(0),
            values.new_empty(values.shape, dtype=w2d.dtype) if need_values else w2d.new_empty(0))


def _nearest_backward_torch(g: Tensor, w2d: Tensor, idx: Tensor, values: Tensor, need_w: bool,
                            need_v: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    G, M = w2d.shape
    L = values.shape[1]
    grad_w = torch.empty_like(w2d) if need_w else None
    sums = torch.zeros(G * L, dtype=w2d.dtype, device=w2d.device) if need_v else None
    for r0, r1, c0, c1 in blocks(G, M, block_for(w2d)):
        ib = idx[r0:r1, c0:c1]
        d = w2d[r0:r1, c0:c1] - values_block(values, ib, r0, r1)
        if need_w:
            torch.mul(d, 2 * g, out=grad_w[r0:r1, c0:c1])
        if need_v:
            sums.index_add_(0, flat_index(ib, r0, L, G), d.reshape(-1))
    return grad_w, ((sums.view(G, L) * (-2 * g)) if need_v else None)


def _nearest_setup(ctx, inputs, output) -> None:
    w2d, _, values, _ = inputs
    # No zero gradients materialised for the (G, M) index: a pass over n bytes per call.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(w2d, output[1], values)


def _nearest_grad(ctx, g_total, g_idx):
    w2d, idx, values = ctx.saved_tensors
    need_w, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if g_total is None:
        return None, None, None, None
    grad_w, grad_v = nearest_backward_op(g_total, w2d, idx, values, need_w, need_v)
    return (grad_w if need_w else None), None, (grad_v if need_v else None), None


nearest_op.register_autograd(_nearest_grad, setup_context=_nearest_setup)


def sorted_for_search(levels: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """``(values, thresholds, perm)`` of a level table as :func:`nearest_op` takes them:
    sorted, in the weights' dtype; the values keep the gradient to ``levels`` (sorting's
    backward puts it back in code order), the thresholds do not."""
    s = sort_levels(levels)
    return s.values.to(dtype), s.thresholds.detach().to(dtype), s.perm


def sq_distance(w2d: Tensor, levels: Tensor) -> Tensor:
    """``sum (w - q)^2`` over the weights, ``q`` the nearest level (paper eq. 6/7): one
    :func:`nearest_op`, differentiable in ``w2d`` and ``levels`` (d/dw = 2 (w - q*);
    d/dlevel_j = -2 sum over the weights snapped to j of (w - q*)); one uint8 index per weight
    is kept for the backward pass."""
    values, thr, _ = sorted_for_search(levels, w2d.dtype)
    return nearest_op(w2d, thr, values, True)[0]


def nearest(w2d: Tensor, levels: Tensor) -> Tuple[Tensor, Tensor]:
    """Nearest level and its code for each weight.

    ``w2d`` is ``(G, M)`` (one row per group), ``levels`` is ``(G, 2**N)`` indexed by code.
    Returns ``(values, codes)``, both ``(G, M)``; no gradient flows.

    >>> from qfv_brevitas.core.levels import level_table, uniform_multipliers
    >>> r, c = uniform_multipliers(torch.tensor([1.0]), 2)
    >>> nearest(torch.tensor([[-2.0, 0.1, 0.6, 5.0]]), level_table(r, c))
    (tensor([[-1.5000,  0.5000,  0.5000,  1.5000]]), tensor([[0, 2, 2, 3]]))
    """
    with torch.no_grad():
        values, thr, perm = sorted_for_search(levels.detach(), w2d.dtype)
        idx = nearest_op(w2d, thr, values, False)[1]
        if values.shape[0] == 1:  # one table: plain indexing, no int64 copy of the index
            idx = idx.int()
            return values.view(-1)[idx].view(w2d.shape), perm.view(-1)[idx].view(w2d.shape)
        idx = idx.long()
        return values.gather(1, idx), perm.gather(1, idx)


class _SnapSTE(torch.autograd.Function):
    """Nearest level in the forward pass; straight-through to the weights in the backward pass,
    and the level table receives the gradient of the levels the weights were snapped to.
    Tensors only on ``ctx`` and no host sync: torch.compile traces it whole."""

    @staticmethod
    def forward(ctx, w2d: Tensor, levels: Tensor) -> Tensor:
        values, thr, perm = sorted_for_search(levels.detach(), w2d.dtype)
        idx = nearest_op(w2d, thr, values, False)[1]
        out = torch.empty_like(w2d)
        for r0, r1, c0, c1 in blocks(*w2d.shape, block_for(w2d)):
            out[r0:r1, c0:c1] = values_block(values, idx[r0:r1, c0:c1], r0, r1)
        ctx.save_for_backward(idx, perm)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        idx, perm = ctx.saved_tensors
        grad_levels = None
        if ctx.needs_input_grad[1]:
            G, M = idx.shape
            n = perm.shape[1]
            sums = torch.zeros(G * n, dtype=g.dtype, device=g.device)
            for r0, r1, c0, c1 in blocks(G, M, block_for(g)):
                sums.index_add_(0, flat_index(idx[r0:r1, c0:c1], r0, n, G),
                                g[r0:r1, c0:c1].reshape(-1))
            grad_levels = torch.zeros_like(perm, dtype=g.dtype).scatter_(1, perm, sums.view(G, n))
        return (g if ctx.needs_input_grad[0] else None), grad_levels


def snap_ste(w2d: Tensor, levels: Tensor) -> Tensor:
    """Snap to the nearest level with a straight-through gradient to ``w2d`` and the exact
    gradient to ``levels`` (hence to ``r`` and ``c``)."""
    return _SnapSTE.apply(w2d, levels)
