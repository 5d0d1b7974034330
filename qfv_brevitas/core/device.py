"""What an imperfect device stores: stuck bits and per-cell variability (pure torch math).

A weight programmed with code ``S`` is stored in ``N`` bit cells. Stuck-at faults force bits:
``S' = (S & ~sa0) | sa1``. Device-to-device variability scales each cell's contribution (paper
eq. 12): a "1" (LRS) cell contributes ``r_i * lrs_i``, a "0" (HRS) cell ``r_i * hrs_i`` (0 for an
ideal device). The deployed value is ``c + sum_i r_i * (S'_i lrs_i + (1 - S'_i) hrs_i)``.

Layouts follow :mod:`qfv_brevitas.core.levels`: weights ``(G, M)``, ``r (G, N)``, ``c (G,)``,
``sa0``/``sa1`` uint8 ``(G, M)``, ``lrs``/``hrs`` ``(G, M, N)`` (either may be ``None``).

Two ways to choose the code: *naive* programming targets the nearest ideal level (what a
fault-unaware flow does); *aware* programming picks the code whose deployed value on this device
is nearest (nearest-valid-level mapping for faults, eq. 11; the weight's own perturbed level set
for variability). Both use O(n) memory: candidates are enumerated per block of weights.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from qfv_brevitas.core import kernels as K
from qfv_brevitas.core import levels as L

__all__ = ["force_codes", "deployed_values", "naive_codes", "aware_codes",
           "deployed_sq_distance", "aware_sq_distance"]

# Weights per block times candidate codes: bounds the temporaries of the exhaustive search.
_CAND_BLOCK = 1 << 20
# The same on a GPU: fewer, larger blocks (each block is a round of kernel launches), still
# O(n) memory (a block's temporaries are a few hundred MB at most).
_CAND_BLOCK_GPU = 1 << 25


def _cand_block(t: Tensor) -> int:
    return _CAND_BLOCK_GPU if L.sync_free(t) else _CAND_BLOCK


def force_codes(codes: Tensor, sa0: Optional[Tensor], sa1: Optional[Tensor]) -> Tensor:
    """Codes as the device stores them: stuck-at-0 bits cleared, stuck-at-1 bits set.

    >>> force_codes(torch.tensor([0b1011]), torch.tensor([0b0010]), torch.tensor([0b0100]))
    tensor([13])
    """
    if sa0 is None and sa1 is None:
        return codes
    out = codes.to(torch.uint8)  # N <= 8: byte arithmetic, 8x less traffic than int64
    if sa0 is not None:
        out = out & ~sa0
    if sa1 is not None:
        out = out | sa1
    return out.to(codes.dtype)


def _coefficients(bits: Tensor, lrs: Optional[Tensor], hrs: Optional[Tensor]) -> Tensor:
    """Per-cell factor multiplying ``r_i``: ``S_i lrs_i + (1 - S_i) hrs_i``."""
    coef = bits if lrs is None else bits * lrs
    if hrs is not None:
        coef = coef + (1 - bits) * hrs
    return coef


def _deviation(bits: Tensor, r: Tensor, lrs: Optional[Tensor], hrs: Optional[Tensor]) -> Tensor:
    """Deployed minus ideal value: ``sum_i r_i (S_i (lrs_i - 1) + (1 - S_i) hrs_i)``.

    Computed as a deviation added to the ideal level so that an ideal device (lrs = 1,
    hrs = 0) gives the ideal level bit for bit, whatever the summation order."""
    dev = torch.zeros_like(bits) if lrs is None else bits * (lrs - 1)
    if hrs is not None:
        dev = dev + (1 - bits) * hrs
    return (dev * r).sum(-1)


def deployed_values(codes: Tensor, r: Tensor, c: Tensor, sa0: Optional[Tensor] = None,
                    sa1: Optional[Tensor] = None, lrs: Optional[Tensor] = None,
                    hrs: Optional[Tensor] = None) -> Tensor:
    """Values ``(G, M)`` the device holds for programmed ``codes``; differentiable in r, c."""
    forced = force_codes(codes, sa0, sa1)
    ideal = L.level_table(r, c).gather(1, forced.long())
    if lrs is None and hrs is None:
        return ideal
    bits = L.codes_to_bits(forced, r.shape[1]).to(r.dtype)
    return ideal + _deviation(bits, r[:, None, :], lrs, hrs)


def naive_codes(w2d: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """Codes of the nearest ideal level (what a device-unaware flow programs)."""
    return L.nearest(w2d, L.level_table(r, c))[1]


@torch.no_grad()
def aware_codes(w2d: Tensor, r: Tensor, c: Tensor, sa0: Optional[Tensor] = None,
                sa1: Optional[Tensor] = None, lrs: Optional[Tensor] = None,
                hrs: Optional[Tensor] = None) -> Tensor:
    """Codes whose deployed value on this device is nearest each weight, ``(G, M)`` int64.

    With faults only, healthy weights take the fast nearest-level search and only weights with a
    stuck bit are searched over their reachable codes. With variability every weight has its
    own level set and all ``2**N`` codes are compared, block by block.
    """
    return _aware_codes(w2d, r, c, sa0, sa1, lrs, hrs).long()


def _aware_codes(w2d: Tensor, r: Tensor, c: Tensor, sa0: Optional[Tensor] = None,
                 sa1: Optional[Tensor] = None, lrs: Optional[Tensor] = None,
                 hrs: Optional[Tensor] = None) -> Tensor:
    """:func:`aware_codes` as uint8 (the compiled kernel's output) or int64 (torch paths)."""
    G, M = w2d.shape
    N = r.shape[1]
    r, c = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
    if K.usable(w2d, r, c, lrs, hrs, sa0, sa1):
        levels = L.level_table(r, c)
        thr, perm = _sorted_thresholds(levels, lrs, hrs)
        return K.aware_fused(w2d, levels, r, thr, perm, sa0, sa1, lrs, hrs, want_codes=True)[2]
    if lrs is None and hrs is None and not L.sync_free(w2d):
        # (On a GPU the exhaustive path below: it needs no host sync for the faulty subset.)
        levels = L.level_table(r, c)
        codes = L.nearest(w2d, levels)[1]
        if sa0 is None and sa1 is None:
            return codes
        s0 = sa0 if sa0 is not None else torch.zeros_like(sa1)
        s1 = sa1 if sa1 is not None else torch.zeros_like(sa0)
        # Flat positions of the weights with a stuck bit, and their (sa0, sa1) pattern.
        flat = ((s0 | s1) != 0).view(-1).nonzero().squeeze(1)
        if flat.numel() == 0:
            return codes
        # Reachable codes depend only on the weight's (sa0, sa1) pattern: one table of
        # +inf penalties per pattern replaces per-weight validity arithmetic.
        all_codes = torch.arange(1 << N, device=w2d.device)
        table = None
        if N <= 6:
            pat = torch.arange(1 << (2 * N), device=w2d.device)
            p0, p1 = (pat >> N)[:, None], (pat & ((1 << N) - 1))[:, None]
            ok = ((all_codes & p0) == 0) & ((all_codes & p1) == p1)
            table = torch.where(ok, 0.0, float("inf")).to(w2d.dtype)  # (4**N, 2**N)
        step = max(1, _CAND_BLOCK >> N)
        w_flat, s0f, s1f, codes_flat = w2d.reshape(-1), s0.reshape(-1), s1.reshape(-1), codes.view(-1)
        for a in range(0, flat.numel(), step):
            idx = flat[a:a + step]
            # One level table per tensor broadcasts; per channel each weight needs its row.
            lv = levels if G == 1 else levels[idx // M]
            d = (w_flat[idx][:, None] - lv).abs()  # (m, L)
            if table is not None:
                d += table[(s0f[idx].long() << N) | s1f[idx].long()]
            else:
                rr, cc = idx // M, idx % M
                d = torch.where(_valid(all_codes, sa0, sa1, rr, cc), d,
                                torch.full_like(d, float("inf")))
            codes_flat[idx] = d.argmin(1)
        return codes
    # Variability: every weight has its own levels: enumerate codes per block.
    bitsm = L.bit_matrix(N, w2d.dtype, w2d.device)  # (L, N)
    all_codes = torch.arange(1 << N, device=w2d.device)
    levels = L.level_table(r, c)
    codes = torch.empty((G, M), dtype=torch.long, device=w2d.device)
    for r0, r1, c0, c1 in L._blocks(G, M, max(1, _cand_block(w2d) >> N)):
        wb = w2d[r0:r1, c0:c1]
        vals = candidate_values(levels, r, lrs, hrs, bitsm, r0, r1, c0, c1, wb)
        d = (wb[..., None] - vals).abs()
        ok = reachable_codes(all_codes, sa0, sa1, r0, r1, c0, c1)
        if ok is not None:
            d = torch.where(ok, d, torch.full_like(d, float("inf")))
        codes[r0:r1, c0:c1] = d.argmin(-1)
    return codes


def _sorted_thresholds(levels: Tensor, lrs: Optional[Tensor], hrs: Optional[Tensor]):
    """Sorted thresholds and codes of the sorted levels (``levels.sort_levels``), which the
    compiled search takes for the weights of an ideal device; ``(None, None)`` with
    variability (every weight has its own levels there)."""
    if lrs is not None or hrs is not None:
        return None, None
    s = L.sort_levels(levels)
    return s.thresholds.contiguous(), s.perm


def candidate_values(levels: Tensor, r: Tensor, lrs: Optional[Tensor], hrs: Optional[Tensor],
                     bitsm: Tensor, r0: int, r1: int, c0: int, c1: int, wb: Tensor) -> Tensor:
    """Every code's deployed value for the weights of block ``[r0:r1, c0:c1]``, ``(g, m, L)``:
    ``level(S) + sum_i r_i hrs_i + sum_i S_i r_i (lrs_i - 1 - hrs_i)``."""
    rb = r[r0:r1, None, :]
    h = torch.zeros_like(wb)[..., None] if hrs is None else hrs[r0:r1, c0:c1]
    a = torch.ones_like(wb)[..., None] if lrs is None else lrs[r0:r1, c0:c1]
    base = (h * rb).sum(-1)
    return (levels[r0:r1, None, :] + base[..., None]) + ((a - 1 - h) * rb) @ bitsm.t()


def reachable_codes(all_codes: Tensor, sa0: Optional[Tensor], sa1: Optional[Tensor], r0: int,
                    r1: int, c0: int, c1: int) -> Optional[Tensor]:
    """``(g, m, L)`` bool: which codes each weight of the block can hold given its stuck bits
    (``None`` without a fault map)."""
    if sa0 is None and sa1 is None:
        return None
    u8 = all_codes.to(torch.uint8)
    ok = None
    if sa0 is not None:
        ok = (u8 & sa0[r0:r1, c0:c1][..., None]) == 0
    if sa1 is not None:
        s1 = sa1[r0:r1, c0:c1][..., None]
        hit = (u8 & s1) == s1
        ok = hit if ok is None else ok & hit
    return ok


def _valid(all_codes: Tensor, sa0, sa1, rr: Tensor, cc: Tensor) -> Tensor:
    """``(m, 2**N)``: which codes respect the stuck bits (uint8 arithmetic: N <= 8)."""
    codes = all_codes.to(torch.uint8)
    ok = torch.ones((rr.numel(), codes.numel()), dtype=torch.bool, device=codes.device)
    if sa0 is not None:
        ok &= (codes & sa0[rr, cc][:, None]) == 0
    if sa1 is not None:
        s1 = sa1[rr, cc][:, None]
        ok &= (codes & s1) == s1
    return ok


class _DeployedSqDistance(torch.autograd.Function):
    """``sum (w - v(S))^2`` for given programmed codes, with v the deployed value; gradients:
    d/dw = 2 (w - v), d/dr_i = -2 sum (w - v) coef_i, d/dc = -2 sum (w - v)."""

    @staticmethod
    def forward(ctx, w2d, r, c, forced, lrs, hrs):
        G, M = w2d.shape
        N = r.shape[1]
        total = torch.zeros((), dtype=w2d.dtype, device=w2d.device)
        rd, cd = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
        levels = L.level_table(rd, cd)
        ctx.save_for_backward(w2d, r, c, forced, lrs, hrs)
        if K.usable(w2d, rd, lrs, hrs):
            return torch.tensor(K.deployed(w2d, levels, rd, forced, lrs, hrs), dtype=w2d.dtype)
        for r0, r1, c0, c1 in L._blocks(G, M, L._block_for(w2d)):
            d = w2d[r0:r1, c0:c1] - _block_values(levels, rd, cd, forced, lrs, hrs, N,
                                                   r0, r1, c0, c1)
            d = d.reshape(-1)
            total += torch.dot(d, d)
        return total

    @staticmethod
    def backward(ctx, g):
        w2d, r, c, forced, lrs, hrs = ctx.saved_tensors
        G, M = w2d.shape
        N = r.shape[1]
        rd, cd = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
        levels = L.level_table(rd, cd)
        need_w, need_r, need_c = ctx.needs_input_grad[:3]
        if K.usable(w2d, rd, lrs, hrs, g):
            gf = float(g)
            grad_w, sums = K.deployed(w2d, levels, rd, forced, lrs, hrs, True, 2 * gf, need_w,
                                      need_r or need_c)
            grad_r = (sums[:, :N] * (-2 * gf)).to(r.dtype) if need_r else None
            grad_c = (sums[:, N] * (-2 * gf)).to(c.dtype) if need_c else None
            return grad_w, grad_r, grad_c, None, None, None
        grad_w = torch.empty_like(w2d) if need_w else None
        grad_r = torch.zeros_like(rd)
        grad_c = torch.zeros_like(cd)
        plain = lrs is None and hrs is None
        Lv = 1 << N
        sums = torch.zeros(G * Lv, dtype=w2d.dtype, device=w2d.device) if plain else None
        for r0, r1, c0, c1 in L._blocks(G, M, L._block_for(w2d)):
            fb = forced[r0:r1, c0:c1]
            d = w2d[r0:r1, c0:c1] - _block_values(levels, rd, cd, forced, lrs, hrs, N,
                                                   r0, r1, c0, c1)
            if need_w:
                torch.mul(d, 2 * g, out=grad_w[r0:r1, c0:c1])
            if not (need_r or need_c):
                continue
            if plain:
                # Sum the residuals per stored code; r and c follow through the bit matrix.
                idx = fb.long() + (torch.arange(r0, r1, device=fb.device)[:, None] * Lv)
                sums.index_add_(0, idx.reshape(-1), d.reshape(-1))
                continue
            grad_c[r0:r1] += d.sum(1)
            bits = L.codes_to_bits(fb, N).to(d.dtype)
            lb = None if lrs is None else lrs[r0:r1, c0:c1]
            hb = None if hrs is None else hrs[r0:r1, c0:c1]
            coef = _coefficients(bits, lb, hb)
            grad_r[r0:r1] += (d[..., None] * coef).sum(1)
        if plain and (need_r or need_c):
            per_code = sums.view(G, Lv)
            grad_r = per_code @ L.bit_matrix(N, per_code.dtype, per_code.device)
            grad_c = per_code.sum(1)
        grad_r = (grad_r * (-2 * g)).to(r.dtype) if need_r else None
        grad_c = (grad_c * (-2 * g)).to(c.dtype) if need_c else None
        return grad_w, grad_r, grad_c, None, None, None


def _block_values(levels, r, c, forced, lrs, hrs, N, r0, r1, c0, c1) -> Tensor:
    lb = None if lrs is None else lrs[r0:r1, c0:c1]
    hb = None if hrs is None else hrs[r0:r1, c0:c1]
    return code_values(levels, r, forced[r0:r1, c0:c1], lb, hb, N, r0, r1)[0]


def code_values(levels: Tensor, r: Tensor, codes: Tensor, lrs: Optional[Tensor],
                hrs: Optional[Tensor], N: int, r0: int, r1: int
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """Deployed values of the (forced) ``codes`` of rows ``r0:r1`` (``lrs``/``hrs`` already
    cut to the same block), and the cells' bits (``None`` on an ideal device)."""
    v = levels[r0:r1].gather(1, codes.long())
    if lrs is None and hrs is None:
        return v, None
    bits = L.codes_to_bits(codes, N).to(r.dtype)
    return v + _deviation(bits, r[r0:r1, None, :], lrs, hrs), bits


def deployed_sq_distance(w2d: Tensor, r: Tensor, c: Tensor, codes: Tensor,
                         sa0: Optional[Tensor] = None, sa1: Optional[Tensor] = None,
                         lrs: Optional[Tensor] = None, hrs: Optional[Tensor] = None) -> Tensor:
    """``sum_i (w_i - v_i)^2`` with ``v_i`` the deployed value of ``codes`` on this device.

    With ``codes = aware_codes(...)`` this is the fault-aware regularizer (eq. 11, unreachable
    levels excluded outright) and the variability-aware regularizer (eq. 12). Differentiable
    in ``w2d``, ``r`` and ``c``; O(n) memory.
    """
    # Byte codes throughout (N <= 8): forcing and the saved index stay one byte per weight.
    forced = force_codes(codes if codes.dtype == torch.uint8 else codes.to(torch.uint8), sa0, sa1)
    return _DeployedSqDistance.apply(w2d, r, c, forced, lrs, hrs)


class _AwareSqDistance(torch.autograd.Function):
    """:func:`aware_sq_distance` on the compiled kernel: the search, the distance and the sums
    that the backward pass needs in one pass over the weights and their per-cell data; the
    backward pass only scales the saved residuals ``w - v`` (one float per weight)."""

    @staticmethod
    def forward(ctx, w2d, r, c, sa0, sa1, lrs, hrs, where):
        rd, cd = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
        levels = L.level_table(rd, cd)
        thr, perm = _sorted_thresholds(levels, lrs, hrs)
        need_w, need_r, need_c = ctx.needs_input_grad[:3]
        total, bad, _, resid, sums = K.aware_fused(w2d.detach(), levels, rd, thr, perm, sa0,
                                                   sa1, lrs, hrs, want_resid=need_w,
                                                   want_sums=need_r or need_c)
        if bad:
            L.check_finite(w2d, where)
        ctx.N, ctx.r_dtype, ctx.c_dtype = r.shape[1], r.dtype, c.dtype
        ctx.save_for_backward(resid, sums)
        return torch.tensor(total, dtype=w2d.dtype)

    @staticmethod
    def backward(ctx, g):
        resid, sums = ctx.saved_tensors
        need_w, need_r, need_c = ctx.needs_input_grad[:3]
        gf, N = float(g), ctx.N
        grad_w = K.scale(resid, 2 * gf) if need_w else None
        grad_r = (sums[:, :N] * (-2 * gf)).to(ctx.r_dtype) if need_r else None
        grad_c = (sums[:, N] * (-2 * gf)).to(ctx.c_dtype) if need_c else None
        return grad_w, grad_r, grad_c, None, None, None, None, None


def aware_sq_distance(w2d: Tensor, r: Tensor, c: Tensor, sa0: Optional[Tensor] = None,
                      sa1: Optional[Tensor] = None, lrs: Optional[Tensor] = None,
                      hrs: Optional[Tensor] = None, where: str = "weights") -> Tensor:
    """``sum_i min_S (w_i - v_i(S))^2`` over the values each weight can take on this device:
    the fault-aware (eq. 11) and variability-aware (eq. 12) regularizer of one layer.

    Equal to ``deployed_sq_distance(w2d, r, c, aware_codes(w2d, ...), ...)`` with the same
    gradients (the codes are held fixed). On the CPU kernels the search and the distance are
    one pass that reads each weight's stuck bits and cell factors once; the backward pass
    scales the residuals kept from it (O(n) memory: one float per weight). Non-finite weights
    raise a ``ValueError`` naming ``where``.

    Levels -0.75, -0.25, 0.25, 0.75 (codes 0..3); the second weight's low bit is stuck at 0,
    so it cannot hold -0.25 and goes to -0.75 or 0.25, both 0.5 away:

    >>> w = torch.tensor([[0.25, -0.25]])
    >>> r, c = torch.tensor([[0.5, 1.0]]), torch.tensor([-0.75])
    >>> sa0 = torch.tensor([[0, 1]], dtype=torch.uint8)
    >>> float(aware_sq_distance(w, r, c, sa0, torch.zeros_like(sa0)))
    0.25
    """
    if K.usable(w2d, r.detach().to(w2d.dtype), lrs, hrs, sa0, sa1) and r.device.type == "cpu" \
            and c.device.type == "cpu":
        return _AwareSqDistance.apply(w2d, r, c, sa0, sa1, lrs, hrs, where)
    if not L.sync_free(w2d):  # (on a GPU the regularizer's one check of the sum reports NaNs)
        L.check_finite(w2d, where)
    codes = _aware_codes(w2d.detach(), r, c, sa0, sa1, lrs, hrs)
    return deployed_sq_distance(w2d, r, c, codes, sa0, sa1, lrs, hrs)
