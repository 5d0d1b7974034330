"""What an imperfect device stores: stuck bits and per-cell variability (torch math and ops).

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

The aware search and the squared distance over deployed values are torch custom ops
(``qfv::aware_fused``, ``qfv::deployed`` with ``qfv::deployed_backward``, ``qfv::scale``): the
compiled CPU kernel or the torch path of this module, one graph node for torch.compile.
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
           "reachable_codes", "valid_codes", "code_values", "aware_codes_torch",
           "aware_fused_op", "scale_op", "deployed_op", "deployed_backward_op",
           "aware_sq_distance", "deployed_sq_distance"]

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
    """:func:`aware_codes` as uint8 (:func:`aware_fused_op`'s output): no conversion pass
    where the caller takes bytes."""
    return aware_fused_op(w2d.detach(), r.detach(), c.detach(), sa0, sa1, lrs, hrs, True,
                          False, False, "")[1]


def aware_codes_torch(w2d: Tensor, r: Tensor, c: Tensor, sa0: Optional[Tensor] = None,
                      sa1: Optional[Tensor] = None, lrs: Optional[Tensor] = None,
                      hrs: Optional[Tensor] = None) -> Tensor:
    """The torch path of :func:`aware_codes` (int64; ``r``, ``c`` in ``w2d``'s dtype): what
    :func:`aware_fused_op` runs where the compiled kernel does not take the tensors."""
    G, M = w2d.shape
    N = r.shape[1]
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


# -- the device-aware searches and distances as torch custom ops --------------------------------
# As for qfv::nearest (core.search): one graph node each for torch.compile / torch.export, the
# compiled kernel or the torch path chosen when it runs. The squared distances are
# differentiable in w, r and c (the codes held fixed).

def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An output that was not asked for (an op returns tensors only)."""
    return like.new_empty(0, dtype=dtype)


@torch.library.custom_op("qfv::aware_fused", mutates_args=())
def aware_fused_op(w2d: Tensor, r: Tensor, c: Tensor, sa0: Optional[Tensor],
                   sa1: Optional[Tensor], lrs: Optional[Tensor], hrs: Optional[Tensor],
                   want_codes: bool, want_resid: bool, want_sums: bool, where: str
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each weight's nearest deployable code on this chip and ``sum (w - v)^2`` over the
    deployed values ``v`` of those codes: ``(total, codes, resid, sums)`` with the total
    (0-dim, ``w2d``'s dtype) and, if asked (else empty), the uint8 codes ``(G, M)``, the
    residuals ``w - v`` and the float64 per-row sums ``(G, N + 1)`` of ``(w - v) coef_i`` and,
    last, of ``w - v``. Non-finite weights raise an error naming ``where`` (``""``: no check).
    One pass on the compiled kernel; else the torch search, then the distance block by
    block."""
    rd, cd = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
    if K.usable(w2d, rd, cd, lrs, hrs, sa0, sa1):
        levels = L.level_table(rd, cd)
        thr, perm = sorted_thresholds(levels, lrs, hrs)
        total, bad, codes, resid, sums = K.aware_fused(
            w2d, levels, rd, thr, perm, sa0, sa1, lrs, hrs, want_codes=want_codes,
            want_resid=want_resid, want_sums=want_sums)
        if bad and where:
            L.check_finite(w2d, where)
        total = torch.tensor(total, dtype=w2d.dtype)
    else:
        if where and not S.sync_free(w2d):
            L.check_finite(w2d, where)
        codes = aware_codes_torch(w2d, rd, cd, sa0, sa1, lrs, hrs).to(torch.uint8)
        total, resid, sums = _deployed_torch(w2d, rd, cd, force_codes(codes, sa0, sa1), lrs,
                                             hrs, None, want_resid, want_sums)
        sums = None if sums is None else sums.to(torch.float64)
    return (total, codes if want_codes else _empty(w2d, torch.uint8),
            resid if want_resid else _empty(w2d),
            sums if want_sums else _empty(w2d, torch.float64))


@aware_fused_op.register_fake
def _aware_fused_fake(w2d, r, c, sa0, sa1, lrs, hrs, want_codes, want_resid, want_sums, where):
    G, M = w2d.shape
    return (w2d.new_empty(()),
            w2d.new_empty((G, M), dtype=torch.uint8) if want_codes else _empty(w2d, torch.uint8),
            w2d.new_empty((G, M)) if want_resid else _empty(w2d),
            w2d.new_empty((G, r.shape[1] + 1), dtype=torch.float64) if want_sums
            else _empty(w2d, torch.float64))


def _aware_fused_setup(ctx, inputs, output) -> None:
    r, c = inputs[1], inputs[2]
    ctx.N, ctx.r_dtype, ctx.c_dtype = r.shape[1], r.dtype, c.dtype
    # Only the total is differentiable: no zero gradients materialised for the (G, M) codes
    # and residuals (a pass over 5n bytes per call).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2], output[3])


def _aware_fused_grad(ctx, g, g_codes, g_resid, g_sums):
    if g is None:
        return (None,) * 11
    resid, sums = ctx.saved_tensors
    need_w, need_r, need_c = ctx.needs_input_grad[:3]
    N = ctx.N
    grad_w = scale_op(resid, 2 * g) if need_w else None
    grad_r = (sums[:, :N] * (-2 * g)).to(ctx.r_dtype) if need_r else None
    grad_c = (sums[:, N] * (-2 * g)).to(ctx.c_dtype) if need_c else None
    return (grad_w, grad_r, grad_c) + (None,) * 8


aware_fused_op.register_autograd(_aware_fused_grad, setup_context=_aware_fused_setup)


@torch.library.custom_op("qfv::scale", mutates_args=())
def scale_op(x: Tensor, s: Tensor) -> Tensor:
    """``x * s`` (``s`` 0-dim), on the compiled kernels' thread pool where they take ``x``."""
    if K.usable(x, s) and s.device.type == "cpu":
        return K.scale(x, float(s))
    return x * s


@scale_op.register_fake
def _scale_fake(x, s):
    return torch.empty_like(x)


@torch.library.custom_op("qfv::deployed", mutates_args=())
def deployed_op(w2d: Tensor, r: Tensor, c: Tensor, forced: Tensor, lrs: Optional[Tensor],
                hrs: Optional[Tensor]) -> Tensor:
    """``sum (w - v)^2`` (0-dim, ``w2d``'s dtype) over the deployed values ``v`` of the codes
    the cells hold (``forced``, uint8); differentiable in ``w2d``, ``r``, ``c``."""
    rd, cd = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
    if K.usable(w2d, rd, lrs, hrs):
        levels = L.level_table(rd, cd)
        return torch.tensor(K.deployed(w2d, levels, rd, forced, lrs, hrs), dtype=w2d.dtype)
    return _deployed_torch(w2d, rd, cd, forced, lrs, hrs, None, False, False)[0]


@deployed_op.register_fake
def _deployed_fake(w2d, r, c, forced, lrs, hrs):
    return w2d.new_empty(())


@torch.library.custom_op("qfv::deployed_backward", mutates_args=())
def deployed_backward_op(g: Tensor, w2d: Tensor, r: Tensor, c: Tensor, forced: Tensor,
                         lrs: Optional[Tensor], hrs: Optional[Tensor], need_w: bool,
                         need_r: bool, need_c: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`deployed_op` times ``g``: ``2 g (w - v)`` to ``w2d`` and
    ``-2 g sum (w - v) dv/dr`` (``dv/dc``) to ``r`` (``c``); empty where not asked for."""
    N = r.shape[1]
    rd, cd = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
    if K.usable(w2d, rd, lrs, hrs, g):
        gf = float(g)
        levels = L.level_table(rd, cd)
        grad_w, sums = K.deployed(w2d, levels, rd, forced, lrs, hrs, True, 2 * gf, need_w,
                                  need_r or need_c)
        scaled = None if sums is None else sums * (-2 * gf)
    else:
        _, grad_w, sums = _deployed_torch(w2d, rd, cd, forced, lrs, hrs, 2 * g, need_w,
                                          need_r or need_c)
        scaled = None if sums is None else sums * (-2 * g)
    # (Copies: an op's outputs may not be views of one another.)
    return (grad_w if need_w else _empty(w2d),
            scaled[:, :N].to(r.dtype, copy=True) if need_r else _empty(r),
            scaled[:, N].to(c.dtype, copy=True) if need_c else _empty(c))


@deployed_backward_op.register_fake
def _deployed_backward_fake(g, w2d, r, c, forced, lrs, hrs, need_w, need_r, need_c):
    return (torch.empty_like(w2d) if need_w else _empty(w2d),
            torch.empty_like(r) if need_r else _empty(r),
            torch.empty_like(c) if need_c else _empty(c))


def _deployed_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _deployed_grad(ctx, g):
    w2d, r, c, forced, lrs, hrs = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = deployed_backward_op(g, w2d, r, c, forced, lrs, hrs, *need)
    return tuple(t if n else None for t, n in zip(grads, need)) + (None,) * 3


deployed_op.register_autograd(_deployed_grad, setup_context=_deployed_setup)


def _deployed_torch(w2d: Tensor, r: Tensor, c: Tensor, forced: Tensor, lrs: Optional[Tensor],
                    hrs: Optional[Tensor], gw: Optional[Tensor], want_w: bool, want_sums: bool
                    ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The torch path of the deployed squared distance, block by block: ``(total, gw (w - v)
    (``gw=None``: ``w - v``) if ``want_w``, the per-row sums (G, N + 1) of ``(w - v) coef_i``
    and of ``w - v`` in ``w2d``'s dtype if ``want_sums``)``. ``r``, ``c`` in ``w2d``'s dtype."""
    G, M = w2d.shape
    N = r.shape[1]
    levels = L.level_table(r, c)
    total = torch.zeros((), dtype=w2d.dtype, device=w2d.device)
    out = torch.empty_like(w2d) if want_w else None
    grad_r, grad_c = torch.zeros_like(r), torch.zeros_like(c)
    plain = lrs is None and hrs is None
    Lv = 1 << N
    sums = torch.zeros(G * Lv, dtype=w2d.dtype, device=w2d.device) if plain else None
    for r0, r1, c0, c1 in S.blocks(G, M, S.block_for(w2d)):
        fb = forced[r0:r1, c0:c1]
        lb = None if lrs is None else lrs[r0:r1, c0:c1]
        hb = None if hrs is None else hrs[r0:r1, c0:c1]
        d = w2d[r0:r1, c0:c1] - code_values(levels, r, fb, lb, hb, N, r0, r1)[0]
        if gw is None:
            dd = d.reshape(-1)
            total += torch.dot(dd, dd)
            if want_w:
                out[r0:r1, c0:c1] = d
        elif want_w:
            torch.mul(d, gw, out=out[r0:r1, c0:c1])
        if not want_sums:
            continue
        if plain:
            # Sum the residuals per stored code; r and c follow through the bit matrix.
            idx = fb.long() + (torch.arange(r0, r1, device=fb.device)[:, None] * Lv)
            sums.index_add_(0, idx.reshape(-1), d.reshape(-1))
            continue
        grad_c[r0:r1] += d.sum(1)
        grad_r[r0:r1] += (d[..., None] * coefficients(L.codes_to_bits(fb, N).to(d.dtype), lb,
                                                      hb)).sum(1)
    if not want_sums:
        return total, out, None
    if plain:
        per_code = sums.view(G, Lv)
        grad_r = per_code @ L.bit_matrix(N, per_code.dtype, per_code.device)
        grad_c = per_code.sum(1)
    return total, out, torch.cat([grad_r, grad_c[:, None]], 1)


def aware_sq_distance(w2d: Tensor, r: Tensor, c: Tensor, sa0: Optional[Tensor] = None,
                      sa1: Optional[Tensor] = None, lrs: Optional[Tensor] = None,
                      hrs: Optional[Tensor] = None, where: str = "weights") -> Tensor:
    """``sum (w - v)^2`` over each weight's nearest deployable value ``v`` on this chip
    (eq. 11/12), differentiable in ``w2d``, ``r``, ``c`` with the codes held fixed: one
    :func:`aware_fused_op`. Non-finite weights raise an error naming ``where``."""
    grad = torch.is_grad_enabled()
    want_w = grad and w2d.requires_grad
    want_rc = grad and (r.requires_grad or c.requires_grad)
    return aware_fused_op(w2d, r, c, sa0, sa1, lrs, hrs, False, want_w, want_rc, where)[0]


def deployed_sq_distance(w2d: Tensor, r: Tensor, c: Tensor, forced: Tensor,
                         lrs: Optional[Tensor] = None, hrs: Optional[Tensor] = None) -> Tensor:
    """``sum (w - v)^2`` over the deployed values of the codes the cells hold (``forced``,
    uint8): one :func:`deployed_op`, differentiable in ``w2d``, ``r``, ``c``."""
    return deployed_op(w2d, r, c, forced, lrs, hrs)
