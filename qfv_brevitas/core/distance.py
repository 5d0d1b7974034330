"""The regularizer's distance: one core for every shape, on an ideal grid and on a chip.

:func:`ideal_distance` (over the ideal level grid, paper eq. 6/7) and :func:`chip_distance`
(over the values each weight can reach on a chip with stuck bits, eq. 11, or per-cell
variability, eq. 12) compute every per-layer distance of the library, for a :class:`Shape`
(``SQ``, ``GAUSS``, ``SIN``); :class:`qfv_brevitas.core.chip.Chip` picks one. The squared
distance (the default) is one torch custom op with a registered gradient (``qfv::nearest``
of :mod:`qfv_brevitas.core.search`, ``qfv::aware_fused`` / ``qfv::deployed`` of
:mod:`qfv_brevitas.core.device`: the compiled CPU kernel where it is built, else the torch
path), which torch.compile and torch.export trace; the shapes with a spacing are the autograd
functions :class:`IdealDistance` and :class:`ChipDistance` (pure torch, eager).

Shapes. The paper's eq. 6/7 charges each weight ``d**2``, ``d`` its distance to the nearest level. Two
other shapes from the related work are offered, each a function of ``d`` and of the *local
level spacing* ``h``: the distance between the weight's nearest level and the nearest distinct
level on the weight's side of it (on the other side where there is none, i.e. beyond the
outermost level).

- ``"sq"``: ``d**2`` (the paper; the default).
- ``"gauss"``: a Gaussian well ``1 - exp(-d**2 / sigma**2)`` with ``sigma = width * h``
  (QFALT-style bounded penalty: weights near a level are pulled hard, weights near a decision
  threshold hardly at all).
- ``"sin"``: SinReQ's sinusoid ``sin**2(pi * d / h)``. On a uniform grid (``step``/``fixed``
  variants) ``h`` is the step and this is SinReQ's ``sin**2(pi * (w - c) / step)`` exactly; on an
  N-multiplier grid the period follows the local spacing, so the shape is zero on every level,
  peaks at every threshold and is smooth (C1) everywhere.

Both are multiplied by ``sigma**2`` resp. ``(h / pi)**2``, which gives them the curvature of
``d**2`` at a level: the paper's lambda schedule (100 -> 2000) carries over unchanged. Beyond
half a spacing from the nearest level (only possible outside the grid's range), where the
Gaussian would saturate and the sinusoid would repeat (a phantom level), each shape continues
with its value and slope there plus ``(|d| - h/2)**2``, so weights outside the range are still
pulled in; for ``"sq"`` this continuation is ``d**2`` itself.

The device-aware forms (stuck bits: eq. 11; per-cell variability: eq. 12) use each weight's own
reachable level set: its nearest deployable value and the nearest distinct deployable value
beside it. A weight that can reach only one value (all its bits stuck) has no spacing; its term
is ``d**2``, the limit of both shapes as ``h`` grows.

Memory is O(n) like the paper's path: the search is the blocked nearest-level machinery of
:mod:`qfv_brevitas.core.search` (one byte per weight kept for the backward pass) and the device-aware
neighbour search enumerates candidate codes block by block.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from qfv_brevitas.core import device as D
from qfv_brevitas.core import levels as L
from qfv_brevitas.core import search as S
from qfv_brevitas.util.errors import QfvError

__all__ = ["SHAPES", "DEFAULT_WIDTH", "Shape", "SQ", "GAUSS", "SIN", "shape_of", "check_shape",
           "check_width", "shape_terms", "IdealDistance", "ChipDistance", "ideal_distance",
           "chip_distance", "neighbour_codes"]

#: Default Gaussian width as a fraction of the local spacing: at a threshold (half a spacing
#: away) the well is at 98% of its depth, so the shape is nearly flat there.
DEFAULT_WIDTH = 0.25


# -- shapes -----------------------------------------------------------------------------------

class Shape:
    """A regularizer shape: the per-weight penalty ``f(d, h)`` of the signed distance ``d`` to
    the nearest level and the local spacing ``h`` (see the module docstring), with its partial
    derivatives. :meth:`terms` is all that the two distance functions need of a shape."""

    name = ""

    def terms(self, d: Tensor, h: Tensor, width: float = DEFAULT_WIDTH, grads: bool = True
              ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Per-weight value ``f(d, h)`` and its partials ``df/dd``, ``df/dh`` (``None`` with
        ``grads=False``: the forward pass needs the value only). ``h = inf``: no spacing, the
        term is ``d**2``."""
        finite = torch.isfinite(h)
        all_finite = bool(finite.all())
        if not all_finite:
            h = torch.where(finite, h, torch.ones_like(h))
        u = d.abs() - 0.5 * h
        f, fd, fh = self._terms(d, h, u, u > 0, width, grads)
        if not all_finite:  # no spacing: the limit d**2
            f = torch.where(finite, f, d * d)
            if grads:
                fd = torch.where(finite, fd, 2 * d)
                fh = torch.where(finite, fh, torch.zeros_like(d))
        return f, fd, fh

    def _terms(self, d, h, u, outer, width, grads):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Shape({self.name!r})"


class _Squared(Shape):
    """``d**2``: the paper's eq. 6/7 (no spacing involved)."""

    name = "sq"

    def terms(self, d, h, width=DEFAULT_WIDTH, grads=True):
        return d * d, (2 * d if grads else None), (torch.zeros_like(d) if grads else None)


class _Gaussian(Shape):
    """A Gaussian well ``sigma**2 (1 - exp(-d**2 / sigma**2))``, ``sigma = width * h``."""

    name = "gauss"

    def _terms(self, d, h, u, outer, width, grads):
        k = width
        s = k * h
        e = torch.exp(-(d * d) / (s * s))
        e0 = math.exp(-1.0 / (4 * k * k))  # the well's value at half a spacing: constant in h
        f = torch.where(outer, s * s * (1 - e0) + h * e0 * u + u * u, s * s * (1 - e))
        fd = fh = None
        if grads:
            fd = torch.where(outer, torch.sign(d) * (h * e0 + 2 * u), 2 * d * e)
            fh = torch.where(outer, 2 * k * k * h * (1 - e0) + e0 * u - 0.5 * h * e0 - u,
                             2 * k * s * (1 - e) - 2 * k * (d * d / s) * e)
        return f, fd, fh


class _Sinusoid(Shape):
    """SinReQ's ``(h / pi)**2 sin**2(pi d / h)``."""

    name = "sin"

    def _terms(self, d, h, u, outer, width, grads):
        t = math.pi * d / h
        sn = torch.sin(t)
        hp = h / math.pi
        f = torch.where(outer, hp * hp + u * u, hp * hp * sn * sn)
        fd = fh = None
        if grads:
            s2 = torch.sin(2 * t)
            fd = torch.where(outer, torch.sign(d) * 2 * u, hp * s2)
            fh = torch.where(outer, 2 * h / math.pi ** 2 - u,
                             2 * h / math.pi ** 2 * sn * sn - d / math.pi * s2)
        return f, fd, fh


SQ, GAUSS, SIN = _Squared(), _Gaussian(), _Sinusoid()
_BY_NAME = {s.name: s for s in (SQ, GAUSS, SIN)}
#: Regularizer shapes by name.
SHAPES = tuple(_BY_NAME)


def check_shape(shape: str) -> str:
    """``shape`` if it names a regularizer shape, else a ValueError listing them."""
    if not isinstance(shape, str) or shape not in SHAPES:
        raise QfvError(f"unknown regularizer shape {shape!r}; choose one of "
                         f"{', '.join(SHAPES)} (sq: the paper's squared distance, gauss: "
                         "Gaussian well, sin: SinReQ sinusoid)")
    return shape


def check_width(width) -> float:
    """The Gaussian width (a fraction of the local level spacing) as a float > 0."""
    try:
        x = float(width)
    except (TypeError, ValueError):
        x = float("nan")
    if isinstance(width, bool) or not (math.isfinite(x) and x > 0):
        raise QfvError(f"regularizer width must be a finite number > 0 (the Gaussian sigma "
                         f"as a fraction of the local level spacing, e.g. 0.25), got {width!r}")
    return x


def shape_of(shape: Union[str, Shape]) -> Shape:
    """The :class:`Shape` named ``shape`` (or ``shape`` itself); an error listing them else."""
    if isinstance(shape, Shape):
        return shape
    return _BY_NAME[check_shape(shape)]


def shape_terms(d: Tensor, h: Tensor, shape: Union[str, Shape], width: float = DEFAULT_WIDTH,
                grads: bool = True) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``shape_of(shape).terms(d, h, width, grads)``: per-weight value ``f(d, h)`` and its
    partial derivatives ``df/dd``, ``df/dh``; ``d`` is the signed distance to the nearest level,
    ``h > 0`` the local spacing (``inf``: no spacing, the term is ``d**2``).

    >>> f, fd, fh = shape_terms(torch.tensor([0.0, 0.5]), torch.tensor([1.0, 1.0]), "sin")
    >>> [round(v, 4) for v in f.tolist()], round(float(f[1] * math.pi ** 2), 4)
    ([0.0, 0.1013], 1.0)
    """
    return shape_of(shape).terms(d, h, width, grads)


# -- block helpers ------------------------------------------------------------------------------

def _take(table: Tensor, idx: Tensor, r0: int, r1: int) -> Tensor:
    """``table[g, idx]`` for a block of rows ``r0:r1`` of a ``(G, L)`` table."""
    if table.shape[0] == 1:
        return table.view(-1)[idx.long()]
    return table[r0:r1].gather(1, idx.long())


def _flat(idx: Tensor, r0: int, n: int, G: int) -> Tensor:
    idx = idx.long()
    if G == 1:
        return idx.reshape(-1)
    row = torch.arange(r0, r0 + idx.shape[0], device=idx.device)[:, None] * n
    return (idx + row).reshape(-1)


def _geometry(li, up: Tensor, down: Tensor, wb: Tensor, ib: Tensor, r0: int, r1: int):
    """Nearest level, local neighbour, ``d``, ``h`` and ``sign(v_nb - v)`` of a block."""
    v = li.values_block(ib, r0, r1)
    upj, downj = _take(up, ib, r0, r1), _take(down, ib, r0, r1)
    nb = torch.where(((wb >= v) & (upj >= 0)) | (downj < 0), upj, downj)
    vn = _take(li.values, nb, r0, r1)
    return nb, wb - v, (vn - v).abs(), torch.where(nb > ib.long(), 1.0, -1.0).to(wb.dtype)


def _no_spacing(shape: str, where: str, g: int, value: float, n: int) -> QfvError:
    return QfvError(
        f"regularizer shape {shape!r} of {where}: all {n} levels of group {g} coincide "
        f"(value {value:g}), so there is no level spacing to scale the shape by. Its "
        "multipliers r are all zero; re-initialise the quantizer, or use shape 'sq'.")



# -- the ideal grid -------------------------------------------------------------------------------

class IdealDistance(torch.autograd.Function):
    """``sum_i f(w_i - q_i, h_i)`` over the ideal grid (``q_i`` the nearest level) for a shape
    with a spacing (``GAUSS``, ``SIN``), with gradients to the weights and to the level table
    (and through it to ``r`` and ``c``): d/dw = f_d; the nearest level gets ``-f_d - s f_h``
    and the neighbour ``s f_h`` (``s`` the sign of ``v_nb - q``, as ``h = |v_nb - q|``). The
    squared distance is the search op itself (:func:`qfv_brevitas.core.search.sq_distance`).
    """

    @staticmethod
    def forward(ctx, w2d: Tensor, levels: Tensor, shape: Shape, width: float, where: str):
        li = S.LevelIndex(levels, w2d.dtype)
        ctx.li, ctx.shape_, ctx.width, ctx.lv_dtype = li, shape, width, levels.dtype
        return _ideal_shaped_forward(ctx, li, w2d, shape, width, where)

    @staticmethod
    def backward(ctx, g: Tensor):
        w2d, idx = ctx.saved_tensors
        grad_w, grad_levels = _ideal_shaped_backward(ctx, g, w2d, idx, ctx.li,
                                                     ctx.needs_input_grad[0],
                                                     ctx.needs_input_grad[1])
        return grad_w, grad_levels, None, None, None


def _ideal_shaped_forward(ctx, li, w2d: Tensor, shape: Shape, width: float, where: str):
    up, down = li.distinct_neighbours()
    flat = (up[:, 0] < 0).nonzero()
    if flat.numel():
        g = int(flat[0])
        raise _no_spacing(shape.name, where, g, float(li.values[g, 0]), li.L)
    G, M = w2d.shape
    idx = torch.empty((G, M), dtype=torch.uint8, device=w2d.device)
    total = torch.zeros((), dtype=w2d.dtype, device=w2d.device)
    for r0, r1, c0, c1 in S.blocks(G, M):
        wb = w2d[r0:r1, c0:c1]
        ib = li.index_block(wb, r0, r1)
        idx[r0:r1, c0:c1] = ib
        _, d, h, _ = _geometry(li, up, down, wb, ib, r0, r1)
        total += shape.terms(d, h, width, grads=False)[0].sum()
    ctx.up, ctx.down = up, down
    ctx.save_for_backward(w2d, idx)
    return total


def _ideal_shaped_backward(ctx, g: Tensor, w2d: Tensor, idx: Tensor, li, need_w: bool,
                           need_lv: bool):
    G, M = w2d.shape
    grad_w = torch.empty_like(w2d) if need_w else None
    sums = torch.zeros(G * li.L, dtype=w2d.dtype, device=w2d.device) if need_lv else None
    for r0, r1, c0, c1 in S.blocks(G, M):
        wb, ib = w2d[r0:r1, c0:c1], idx[r0:r1, c0:c1]
        nb, d, h, s = _geometry(li, ctx.up, ctx.down, wb, ib, r0, r1)
        _, fd, fh = ctx.shape_.terms(d, h, ctx.width)
        if need_w:
            torch.mul(fd, g, out=grad_w[r0:r1, c0:c1])
        if need_lv:
            sfh = s * fh
            sums.index_add_(0, _flat(ib, r0, li.L, G), (-fd - sfh).reshape(-1))
            sums.index_add_(0, _flat(nb, r0, li.L, G), sfh.reshape(-1))
    grad_levels = None
    if need_lv:
        grad_levels = li.sorted_to_levels(sums.view(G, li.L) * g).to(ctx.lv_dtype)
    return grad_w, grad_levels


def ideal_distance(w2d: Tensor, levels: Tensor, shape: Union[str, Shape] = "sq",
                   width: float = DEFAULT_WIDTH, where: str = "layer") -> Tensor:
    """Sum over weights of the shaped distance to the nearest level (one layer, ideal grid).

    ``w2d`` is ``(G, M)`` (one row per group), ``levels`` ``(G, 2**N)`` indexed by code.
    Differentiable in ``w2d`` and ``levels`` (and so in ``r`` and ``c``); O(n) memory. A group
    whose levels all coincide has no spacing: an error for ``"gauss"`` and ``"sin"``.

    >>> r, c = L.uniform_multipliers(torch.tensor([1.0]), 2)   # levels -1.5 -0.5 0.5 1.5
    >>> lv = L.level_table(r, c)
    >>> float(ideal_distance(torch.tensor([[0.5, 0.75]]), lv))
    0.0625
    >>> [round(float(ideal_distance(torch.tensor([[w]]), lv, "sin")), 4)
    ...  for w in (0.5, 0.75, 1.0)]
    [0.0, 0.0507, 0.1013]
    """
    shape = shape_of(shape)
    if shape is SQ:
        return S.sq_distance(w2d, levels)
    return IdealDistance.apply(w2d, levels, shape, check_width(width), where)


# -- on a chip ------------------------------------------------------------------------------------

def _pick(vals: Tensor, ok: Optional[Tensor], vstar: Tensor, w: Tensor) -> Tensor:
    """Code of the nearest distinct valid value beside ``vstar`` on ``w``'s side (else the other
    side; ``-1`` if none), over the last axis of candidate values ``vals``."""
    gt, lt = vals > vstar, vals < vstar
    if ok is not None:
        gt, lt = gt & ok, lt & ok
    a = torch.where(gt, vals, torch.full_like(vals, float("inf"))).argmin(-1)
    b = torch.where(lt, vals, torch.full_like(vals, float("-inf"))).argmax(-1)
    has_a, has_b = gt.any(-1), lt.any(-1)
    use_a = has_a & ((w >= vstar[..., 0]) | ~has_b)
    return torch.where(use_a, a, torch.where(has_b, b, torch.full_like(b, -1)))


@torch.no_grad()
def neighbour_codes(w2d: Tensor, r: Tensor, c: Tensor, codes: Tensor,
                    sa0: Optional[Tensor] = None, sa1: Optional[Tensor] = None,
                    lrs: Optional[Tensor] = None, hrs: Optional[Tensor] = None) -> Tensor:
    """For each weight programmed with ``codes`` (its nearest deployable value, e.g. from
    :func:`qfv_brevitas.core.device.aware_codes`): the code of the nearest *distinct* value this
    device can hold for it, on the weight's side of its value (on the other side where there is
    none). ``(G, M)`` int16, ``-1`` for a weight that can hold only one value.

    Without variability, weights with no stuck bit read their neighbour from the ideal grid's
    table; the others (and every weight under variability) compare all ``2**N`` codes, block by
    block (O(n) memory).
    """
    G, M = w2d.shape
    N = r.shape[1]
    r, c = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
    levels = L.level_table(r, c)
    all_codes = torch.arange(1 << N, device=w2d.device)
    out = torch.empty((G, M), dtype=torch.int16, device=w2d.device)
    if lrs is None and hrs is None:
        li = S.LevelIndex(levels, w2d.dtype)
        up, down = li.distinct_neighbours()
        inv = torch.empty_like(li.perm).scatter_(1, li.perm, torch.arange(
            li.L, device=w2d.device).expand(G, li.L).contiguous())  # code -> sorted index
        for r0, r1, c0, c1 in S.blocks(G, M):
            j = _take(inv, codes[r0:r1, c0:c1], r0, r1)
            v = _take(li.values, j, r0, r1)
            upj, downj = _take(up, j, r0, r1), _take(down, j, r0, r1)
            wb = w2d[r0:r1, c0:c1]
            nb = torch.where(((wb >= v) & (upj >= 0)) | (downj < 0), upj, downj)
            code = _take(li.perm, nb.clamp(min=0), r0, r1)
            out[r0:r1, c0:c1] = torch.where(nb >= 0, code, -1).to(torch.int16)
        if sa0 is None and sa1 is None:
            return out
        # Weights with a stuck bit: only the codes that respect their stuck bits.
        flat = (((sa0 if sa0 is not None else 0) | (sa1 if sa1 is not None else 0)) != 0
                ).reshape(-1).nonzero().squeeze(1)
        step = max(1, S.CAND_BLOCK >> N)
        out_flat, w_flat, codes_flat = out.view(-1), w2d.reshape(-1), codes.reshape(-1)
        for a in range(0, flat.numel(), step):
            idx = flat[a:a + step]
            rr, cc = idx // M, idx % M
            vals = levels[rr]  # (m, L)
            ok = D.valid_codes(all_codes, sa0, sa1, rr, cc)
            vstar = vals.gather(1, codes_flat[idx].long()[:, None])
            out_flat[idx] = _pick(vals, ok, vstar, w_flat[idx]).to(torch.int16)
        return out
    bitsm = L.bit_matrix(N, w2d.dtype, w2d.device)
    for r0, r1, c0, c1 in S.blocks(G, M, max(1, S.CAND_BLOCK >> N)):
        wb = w2d[r0:r1, c0:c1]
        # The candidate values aware_codes compares, and the codes the stuck bits allow.
        vals = D.candidate_values(levels, r, lrs, hrs, bitsm, r0, r1, c0, c1, wb)
        ok = D.reachable_codes(all_codes, sa0, sa1, r0, r1, c0, c1)
        vstar = vals.gather(-1, codes[r0:r1, c0:c1].long()[..., None])
        out[r0:r1, c0:c1] = _pick(vals, ok, vstar, wb).to(torch.int16)
    return out



class ChipDistance(torch.autograd.Function):
    """``sum_i f(w_i - v_i, h_i)`` for a shape with a spacing, with ``v_i`` the deployed value
    of weight ``i``'s programmed code on a chip (stuck bits forced, cell variability applied)
    and ``h_i`` the spacing to the nearest distinct value the same cells can hold beside it
    (``nb``, :func:`neighbour_codes`); gradients to ``w``, ``r`` and ``c`` (each deployed value
    is linear in them: ``dv/dr_i`` is the cell's coefficient, ``dv/dc = 1``), the codes held
    fixed. The squared distance is one op of :mod:`qfv_brevitas.core.device`
    (``aware_sq_distance``, ``deployed_sq_distance``).
    """

    @staticmethod
    def forward(ctx, w2d, r, c, lrs, hrs, forced, nb, shape, width):
        ctx.shape_, ctx.width = shape, width
        return _chip_shaped_forward(ctx, w2d, r, c, forced, nb, lrs, hrs, shape, width)

    @staticmethod
    def backward(ctx, g):
        return _chip_shaped_backward(ctx, g) + (None,) * 6


def _chip_shaped_forward(ctx, w2d, r, c, forced, nb, lrs, hrs, shape, width):
    G, M = w2d.shape
    N = r.shape[1]
    rd, cd = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
    levels = L.level_table(rd, cd)
    total = torch.zeros((), dtype=w2d.dtype, device=w2d.device)
    for blk in S.blocks(G, M):
        d, h, *_ = _shaped_block(w2d, rd, levels, forced, nb, lrs, hrs,
                                                  N, blk)
        total += shape.terms(d, h, width, grads=False)[0].sum()
    ctx.save_for_backward(w2d, r, c, forced, nb, lrs, hrs)
    return total


def _shaped_block(w2d, r, levels, forced, nb, lrs, hrs, N, blk):
    r0, r1, c0, c1 = blk
    lb = None if lrs is None else lrs[r0:r1, c0:c1]
    hb = None if hrs is None else hrs[r0:r1, c0:c1]
    fb, nbb = forced[r0:r1, c0:c1], nb[r0:r1, c0:c1]
    has = nbb >= 0
    nbc = nbb.clamp(min=0).to(torch.uint8)  # valid codes: they respect the stuck bits
    v, bits = D.code_values(levels, r, fb, lb, hb, N, r0, r1)
    vn, nbits = D.code_values(levels, r, nbc, lb, hb, N, r0, r1)
    h = torch.where(has, (vn - v).abs(), torch.full_like(v, float("inf")))
    s = torch.where(vn > v, 1.0, -1.0).to(v.dtype) * has
    return w2d[r0:r1, c0:c1] - v, h, s, fb, nbc, bits, nbits, lb, hb


def _chip_shaped_backward(ctx, g):
    w2d, r, c, forced, nb, lrs, hrs = ctx.saved_tensors
    G, M = w2d.shape
    N = r.shape[1]
    rd, cd = r.detach().to(w2d.dtype), c.detach().to(w2d.dtype)
    levels = L.level_table(rd, cd)
    need_w, need_r, need_c = ctx.needs_input_grad[:3]
    grad_w = torch.empty_like(w2d) if need_w else None
    grad_r, grad_c = torch.zeros_like(rd), torch.zeros_like(cd)
    for blk in S.blocks(G, M):
        r0, r1, c0, c1 = blk
        d, h, s, fb, nbc, bits, nbits, lb, hb = _shaped_block(
            w2d, rd, levels, forced, nb, lrs, hrs, N, blk)
        _, fd, fh = ctx.shape_.terms(d, h, ctx.width)
        if need_w:
            torch.mul(fd, g, out=grad_w[r0:r1, c0:c1])
        if not (need_r or need_c):
            continue
        gv = -fd - s * fh  # d term / d v (the programmed value)
        gn = s * fh  # d term / d v' (the neighbour's value)
        grad_c[r0:r1] += (gv + gn).sum(1)
        if bits is None:
            bits = L.codes_to_bits(fb, N).to(rd.dtype)
            nbits = L.codes_to_bits(nbc, N).to(rd.dtype)
        grad_r[r0:r1] += (gv[..., None] * D.coefficients(bits, lb, hb)
                          + gn[..., None] * D.coefficients(nbits, lb, hb)).sum(1)
    grad_r = (grad_r * g).to(r.dtype) if need_r else None
    grad_c = (grad_c * g).to(c.dtype) if need_c else None
    return grad_w, grad_r, grad_c


def chip_distance(w2d: Tensor, r: Tensor, c: Tensor, sa0: Optional[Tensor] = None,
                  sa1: Optional[Tensor] = None, lrs: Optional[Tensor] = None,
                  hrs: Optional[Tensor] = None, shape: Union[str, Shape] = "sq",
                  width: float = DEFAULT_WIDTH, where: str = "weights",
                  codes: Optional[Tensor] = None) -> Tensor:
    """The device-aware regularizer of one layer: ``sum_i f(w_i - v_i, h_i)`` over the values
    each weight can take on this chip (fault-aware, eq. 11; variability-aware, eq. 12), with a
    shape. ``codes`` are the programmed codes (default: each weight's nearest deployable value,
    :func:`qfv_brevitas.core.device.aware_codes`; the distance is then equal to that of the
    squared shape over the reachable values, with the same gradients, the codes held fixed);
    the spacing is to the nearest distinct value the same cells can hold beside it.
    Differentiable in ``w2d``, ``r``, ``c``; O(n) memory. Non-finite weights raise an error
    naming ``where``.

    Levels -0.75, -0.25, 0.25, 0.75 (codes 0..3); the second weight's low bit is stuck at 0,
    so it cannot hold -0.25 and goes to -0.75 or 0.25, both 0.5 away:

    >>> w = torch.tensor([[0.25, -0.25]])
    >>> r, c = torch.tensor([[0.5, 1.0]]), torch.tensor([-0.75])
    >>> sa0 = torch.tensor([[0, 1]], dtype=torch.uint8)
    >>> float(chip_distance(w, r, c, sa0, torch.zeros_like(sa0)))
    0.25

    The sinusoid on levels -1.5 -0.5 0.5 1.5: both weights at 0 go to 0.5; the first (healthy)
    has spacing 1: (1/pi)^2; the second (low bit stuck at 0: only -1.5 and 0.5) spacing 2:
    (2/pi)^2 sin^2(pi/4):

    >>> r, c = L.uniform_multipliers(torch.tensor([1.0]), 2)
    >>> w = torch.tensor([[0.0, 0.0]])
    >>> sa0 = torch.tensor([[0, 0b01]], dtype=torch.uint8)
    >>> round(float(chip_distance(w, r, c, sa0, torch.zeros_like(sa0), shape="sin")), 4)
    0.304
    """
    shape = shape_of(shape)
    if shape is SQ and codes is None:  # one op: the search and the distance in one pass
        return D.aware_sq_distance(w2d, r, c, sa0, sa1, lrs, hrs, where)
    if shape is SQ:
        return D.deployed_sq_distance(w2d, r, c, _forced(codes, sa0, sa1), lrs, hrs)
    width = check_width(width)
    lv = L.level_table(r.detach(), c.detach())
    flat = (lv.max(1).values == lv.min(1).values).nonzero()
    if flat.numel():  # a degenerate grid, whatever the device does to it
        g = int(flat[0])
        raise _no_spacing(shape.name, where, g, float(lv[g, 0]), lv.shape[1])
    if codes is None:
        if not S.sync_free(w2d):  # (on a GPU the regularizer's one check of the sum reports NaNs)
            L.check_finite(w2d, where)
        codes = D.aware_codes_raw(w2d.detach(), r, c, sa0, sa1, lrs, hrs)
    forced = _forced(codes, sa0, sa1)
    nb = neighbour_codes(w2d.detach(), r, c, forced, sa0, sa1, lrs, hrs)
    return ChipDistance.apply(w2d, r, c, lrs, hrs, forced, nb, shape, width)


def _forced(codes: Tensor, sa0: Optional[Tensor], sa1: Optional[Tensor]) -> Tensor:
    # Byte codes throughout (N <= 8): forcing and the saved index stay one byte per weight.
    return D.force_codes(codes if codes.dtype == torch.uint8 else codes.to(torch.uint8),
                         sa0, sa1)
