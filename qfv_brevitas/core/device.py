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
from qfv_brevitas.core import search as S

__all__ = ["force_codes", "coefficients", "deviation", "deployed_values", "naive_codes",
           "aware_codes", "aware_codes_raw", "sorted_thresholds", "candidate_values",
           "reachable_codes", "valid_codes", "code_values"]

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


def coefficients(bits: Tensor, lrs: Optional[Tensor], hrs: Optional[Tensor]) -> Tensor:
    """Per-cell factor multiplying ``r_i``: ``S_i lrs_i + (1 - S_i) hrs_i``."""
    coef = bits if lrs is None else bits * lrs
    if hrs is not None:
        coef = coef + (1 - bits) * hrs
    return coef


def deviation(bits: Tensor, r: Tensor, lrs: Optional[Tensor], hrs: Optional[Tensor]) -> Tensor:
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
    return ideal + deviation(bits, r[:, None, :], lrs, hrs)


def naive_codes(w2d: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """Codes of the nearest ideal level (what a device-unaware flow programs)."""
    return S.nearest(w2d, L.level_table(r, c))[1]


@torch.no_grad()
def aware_codes(w2d: Tensor, r: Tensor, c: Tensor, sa0: Optional[Tensor] = None,
                sa1: Optional[Tensor] = None, lrs: Optional[Tensor] = None,
                hrs: Optional[Tensor] = None) -> Tensor:
    """Codes whose deployed value on this device is nearest each weight, ``(G, M)`` int64.

    With faults only, healthy weights take the fast nearest-level search and only weights with a
    stuck bit are searched over their reachable codes. With variability every weight has its
    own level set and all ``2**N`` codes are compared, block by block.
    """
    return aware_codes_raw(w2d, r, c, sa0, sa1, lrs, hrs).long()


def aware_codes_raw(w2d: Tensor, r: Tensor, c: Tensor, sa0: Optional[Tensor] = None,
                 sa1: Optional[Tensor] = None, lrs: Optional[Tensor] = None,
                 hrs: Optional[Tensor] = None) -> Tensor:
    """:func:`aware_codes` as uint8 (the compiled kernel's output) or int64 (torch paths): no
    conversion pass where the caller takes either."""
    G, M = w2d.shape
    N = r.shape[1]
    r, c = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
    if K.usable(w2d, r, c, lrs, hrs, sa0, sa1):
        levels = L.level_table(r, c)
        thr, perm = sorted_thresholds(levels, lrs, hrs)
        return K.aware_fused(w2d, levels, r, thr, perm, sa0, sa1, lrs, hrs, want_codes=True)[2]
    if lrs is None and hrs is None and not S.sync_free(w2d):
        # (On a GPU the exhaustive path below: it needs no host sync for the faulty subset.)
        levels = L.level_table(r, c)
        codes = S.nearest(w2d, levels)[1]
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
        step = max(1, S.CAND_BLOCK >> N)
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
                d = torch.where(valid_codes(all_codes, sa0, sa1, rr, cc), d,
                                torch.full_like(d, float("inf")))
            codes_flat[idx] = d.argmin(1)
        return codes
    # Variability: every weight has its own levels: enumerate codes per block.
    bitsm = L.bit_matrix(N, w2d.dtype, w2d.device)  # (L, N)
    all_codes = torch.arange(1 << N, device=w2d.device)
    levels = L.level_table(r, c)
    codes = torch.empty((G, M), dtype=torch.long, device=w2d.device)
    for r0, r1, c0, c1 in S.blocks(G, M, max(1, S.cand_block(w2d) >> N)):
        wb = w2d[r0:r1, c0:c1]
        vals = candidate_values(levels, r, lrs, hrs, bitsm, r0, r1, c0, c1, wb)
        d = (wb[..., None] - vals).abs()
        ok = reachable_codes(all_codes, sa0, sa1, r0, r1, c0, c1)
        if ok is not None:
            d = torch.where(ok, d, torch.full_like(d, float("inf")))
        codes[r0:r1, c0:c1] = d.argmin(-1)
    return codes


def sorted_thresholds(levels: Tensor, lrs: Optional[Tensor], hrs: Optional[Tensor]):
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


def valid_codes(all_codes: Tensor, sa0, sa1, rr: Tensor, cc: Tensor) -> Tensor:
    """``(m, 2**N)``: which codes respect the stuck bits (uint8 arithmetic: N <= 8)."""
    codes = all_codes.to(torch.uint8)
    ok = torch.ones((rr.numel(), codes.numel()), dtype=torch.bool, device=codes.device)
    if sa0 is not None:
        ok &= (codes & sa0[rr, cc][:, None]) == 0
    if sa1 is not None:
        s1 = sa1[rr, cc][:, None]
        ok &= (codes & s1) == s1
    return ok


def code_values(levels: Tensor, r: Tensor, codes: Tensor, lrs: Optional[Tensor],
                hrs: Optional[Tensor], N: int, r0: int, r1: int
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """Deployed values of the (forced) ``codes`` of rows ``r0:r1`` (``lrs``/``hrs`` already
    cut to the same block), and the cells' bits (``None`` on an ideal device)."""
    v = levels[r0:r1].gather(1, codes.long())
    if lrs is None and hrs is None:
        return v, None
    bits = L.codes_to_bits(codes, N).to(r.dtype)
    return v + deviation(bits, r[r0:r1, None, :], lrs, hrs), bits
