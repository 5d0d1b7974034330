"""Levels fitted to the weights (pure torch, no Brevitas import).

For the weights of each group (a row of a ``(G, M)`` view: one per tensor or per output
channel) and ``N`` bits:

- :func:`best_uniform_grid`: the uniform grid ``c + s * k`` (``k = 0 .. 2**N - 1``) with the
  least squared error;
- :func:`fit_multipliers`: N-multiplier levels ``c + sum_i r_i * bit_i(k)`` (paper eq. 4) with
  the least squared error that alternating minimisation finds, never worse than the best
  uniform grid: codes = nearest level; then ``(r, c)`` = least squares given the codes (the
  ``(N+1) x (N+1)`` normal equations); repeat. Started from several grids (the best uniform
  grids, LSQ's grid, the least-squares projection of the Lloyd-Max levels) and the best kept;
- :func:`lloyd_max`: ``2**N`` free levels (1-D k-means, Lloyd's algorithm), the reference for
  what any N-bit scalar quantizer can do;
- :func:`grid_error`: the squared error of a level table, with the library's own nearest-level
  search (what the quantizer will deploy).

How: each group's weights are sorted once (``O(n log n)``, ``O(n)`` memory) and centred on
their mean, with float64 prefix sums of ``w`` and ``w**2``. For sorted levels the decision
thresholds cut the sorted weights into contiguous runs, so the nearest-level assignment of
every weight, and each level's count, sum and sum of squares, follow from ``2**N - 1`` binary
searches and prefix-sum differences: ``O(2**N log M)`` per group and iteration instead of a
pass over the weights, and never an ``n x 2**N`` tensor. The normal equations are accumulated
per code from these sums (``A = sum_k n_k b_k b_k^T``, ``b_k = (bits of k, 1)``).

Each least-squares step is proximal, ``min_x E(x) + eps ||x - x_prev||^2`` with ``eps = 1e-12 M``:
it equals the plain solve where the codes determine ``(r, c)`` (to ~1e-12 relative) and keeps
the previous value along directions no used code determines (unused codes, singular systems),
and since ``x_prev`` is feasible, the error can never increase. Each start keeps the best
iterate seen. A final check with :func:`grid_error` in the weights' dtype guarantees the
result is never worse than the best uniform grid (or, when warm-started, than its start) as
the quantizer evaluates it.

Many groups (per output channel) take the batched search of :func:`fit_multipliers`: the
same starts, screened early, each stopping on its own, in chunks of groups.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from qfv_brevitas.core import levels as L
from qfv_brevitas.core import search as S
from qfv_brevitas.util.errors import QfvError

__all__ = [
    "UniformGrid",
    "FitResult",
    "LloydMax",
    "best_uniform_grid",
    "fit_multipliers",
    "lloyd_max",
    "grid_error",
    "nonuniformity",
]

_F64 = torch.float64
#: Weight of the proximal term per weight of the group (see the module docstring).
_PROX = 1e-12
#: Relative improvement below which an alternation counts as converged.
_TOL = 1e-10
#: Uniform-grid starts (clipping ranges) of the uniform search.
_UNIFORM_STARTS = 16
#: Best uniform grids that start an N-multiplier alternation each (coarse search).
_NMULT_FROM_UNIFORM = 8
#: Coarse search: runs the weights are compressed to, Sobol starts over ``log r_i`` (in units
#: of the weights' std), and how many of its best results are refined on all the weights.
_COARSE_POINTS = 512
_SOBOL_STARTS = 32
_LOG_R_RANGE = (-3.0, 1.5)
_REFINE = 4
#: Dense look at the uniform grids: a budget of (grid, level, point) evaluations, and how
#: many of the best grids start an alternation.
_DENSE_BUDGET = 1 << 24
_DENSE_KEEP = 16
#: Lloyd-Max: runs the weights are compressed to for the exact dynamic programme.
_DP_POINTS = 256
#: N-multiplier fit: runs for the exact Lloyd-Max start (cheap enough for many groups).
_DP_START_POINTS = 64
#: Iteration cap of the coarse searches; uniform grids refined on all the weights.
_COARSE_ITERS = 60
#: The coarse searches only rank starts: they stop once no start gains this much an iteration.
_COARSE_TOL = 1e-4
_UNIFORM_REFINE = 3
#: Batched search (many groups, e.g. per output channel of a language model): from this many
#: groups ``fit_multipliers`` searches each group on its own terms (see ``_alternate``), in
#: chunks of ``_CHUNK_GROUPS`` groups (caps the float64 copies and the per-(group, start,
#: level) tables; results do not depend on the chunk size).
_BATCHED_GROUPS = 128
_CHUNK_GROUPS = 4096
#: Batched search: every start runs this many iterations, then only each group's best few go
#: on (uniform grids, N-multiplier starts); the dense look at uniform grids has a budget per
#: group instead of per call.
_SCREEN_ITERS = 4
_SCREEN_KEEP_UNIFORM = 6
_SCREEN_KEEP_NMULT = 6
_SCREEN_KEEP_FINE = 2
_DENSE_BUDGET_GROUP = 1 << 14
#: Batched: iteration cap of the coarse searches (they only rank starts).
_COARSE_ITERS_BATCHED = 30


class UniformGrid(NamedTuple):
    """A uniform grid per group: levels ``offset + step * k``, ``k = 0 .. 2**bits - 1``."""

    step: Tensor  # (G,)
    offset: Tensor  # (G,)
    error: Tensor  # (G,) float64: sum of squared errors of the group's weights

    def multipliers(self, bits: int) -> Tuple[Tensor, Tensor]:
        """``(r, c)`` of this grid in the N-multiplier form (``r_i = step * 2**i``)."""
        pow2 = 2.0 ** torch.arange(bits, dtype=self.step.dtype, device=self.step.device)
        return self.step[:, None] * pow2, self.offset


class FitResult(NamedTuple):
    """Fitted N-multiplier levels per group."""

    r: Tensor  # (G, N)
    c: Tensor  # (G,)
    error: Tensor  # (G,) float64: sum of squared errors with these levels
    #: the best uniform grid found (``None`` for a warm start without search); ``error`` is
    #: never above ``uniform.error``
    uniform: Optional[UniformGrid]


class LloydMax(NamedTuple):
    """``2**N`` free levels per group (1-D k-means)."""

    levels: Tensor  # (G, 2**N), ascending
    error: Tensor  # (G,) float64


def _check_weights(w2d: Tensor, where: str) -> None:
    """Refuse what no fit can take: not a non-empty ``(G, M)`` float tensor, or non-finite."""
    if w2d.dim() != 2 or w2d.shape[0] < 1 or w2d.shape[1] < 1:
        raise QfvError(f"{where}: weights must be a non-empty (G, M) tensor, got shape "
                       f"{tuple(w2d.shape)}")
    if not w2d.is_floating_point():
        raise QfvError(f"{where}: weights must be floating point, got {w2d.dtype}")
    L.check_finite(w2d, where)


class _Sorted:
    """Each group's weights sorted, centred on the group mean, with float64 prefix sums."""

    def __init__(self, w2d: Tensor, where: str, checked: bool = False):
        if not checked:
            _check_weights(w2d, where)
        w = w2d.detach()
        self.G, self.M = w.shape
        ws = torch.sort(w, dim=1).values.to(_F64)
        self.mean = ws.mean(1)
        ws -= self.mean[:, None]
        self.ws = ws.contiguous()
        zero = ws.new_zeros(self.G, 1)
        self.p1 = torch.cat([zero, ws.cumsum(1)], 1)
        self.p2 = torch.cat([zero, (ws * ws).cumsum(1)], 1)
        #: groups whose weights are all equal: any grid through that value is exact
        self.constant = ws[:, -1] == ws[:, 0]
        #: prefix counts when the points are bins of several weights (see ``compress``)
        self.pc: Optional[Tensor] = None

    def select(self, rows: Tensor) -> "_Sorted":
        """The groups ``rows`` only (an index tensor)."""
        out = _Sorted.__new__(_Sorted)
        out.G, out.M = int(rows.numel()), self.M
        out.mean, out.constant = self.mean[rows], self.constant[rows]
        out.ws, out.p1, out.p2 = self.ws[rows], self.p1[rows], self.p2[rows]
        out.pc = None if self.pc is None else self.pc[rows]
        return out

    def compress(self, points: int) -> "_Sorted":
        """The same weights as ``points`` runs of about equal count (each a point at its
        mean): errors of an assignment of whole runs are exact, only a run that straddles a
        threshold is assigned as one. For cheap searches over many starts."""
        if self.M <= points:
            return self
        out = _Sorted.__new__(_Sorted)
        edges = torch.linspace(0, self.M, points + 1, device=self.ws.device).round().long()
        out.G, out.M, out.mean, out.constant = self.G, self.M, self.mean, self.constant
        out.p1 = self.p1[:, edges].contiguous()
        out.p2 = self.p2[:, edges].contiguous()
        out.pc = edges.to(_F64).expand(self.G, -1).contiguous()
        out.ws = (out.p1.diff(dim=1) / out.pc.diff(dim=1)).contiguous()
        return out

    def runs(self, levels: Tensor):
        """Nearest-level assignment of ``levels`` ``(G, K, L)`` (centred, any order).

        Returns ``(err (G, K), n, s1, s2, sorted values, perm)`` with the per-sorted-level
        count, sum and sum of squares ``(G, K, L)``; a weight on a threshold goes to the upper
        level, as in :func:`qfv_brevitas.core.search.nearest`."""
        G, K, nl = levels.shape
        vals, perm = levels.sort(-1)
        thr = (vals[..., 1:] + vals[..., :-1]) * 0.5
        b = torch.searchsorted(self.ws, thr.reshape(G, -1).contiguous()).view(G, K, nl - 1)
        P = self.ws.shape[1]
        edges = torch.cat([b.new_zeros(G, K, 1), b, b.new_full((G, K, 1), P)], -1)
        flat = edges.view(G, -1)
        p1 = self.p1.gather(1, flat).view(G, K, nl + 1)
        p2 = self.p2.gather(1, flat).view(G, K, nl + 1)
        if self.pc is None:
            n = edges.diff(dim=-1).to(_F64)
        else:
            n = self.pc.gather(1, flat).view(G, K, nl + 1).diff(dim=-1)
        s1 = p1.diff(dim=-1)
        s2 = p2.diff(dim=-1)
        err = (s2 - 2 * vals * s1 + n * vals * vals).sum(-1).clamp_min(0)
        return err, n, s1, s2, vals, perm

    def code_stats(self, levels: Tensor):
        """``(err (G, K), n (G, K, L), s1 (G, K, L))`` per code (index into ``levels``)."""
        err, n, s1, _, _, perm = self.runs(levels)
        return err, torch.zeros_like(n).scatter_(-1, perm, n), \
            torch.zeros_like(s1).scatter_(-1, perm, s1)


def _nmult_basis(bits: int, device) -> Tensor:
    """``(2**N, N + 1)``: row ``k`` is ``(bit_0(k), ..., bit_{N-1}(k), 1)``."""
    b = L.bit_matrix(bits, _F64, device)
    return torch.cat([b, torch.ones(b.shape[0], 1, dtype=_F64, device=device)], 1)


def _uniform_basis(bits: int, device) -> Tensor:
    """``(2**N, 2)``: row ``k`` is ``(k, 1)``."""
    k = torch.arange(1 << bits, dtype=_F64, device=device)
    return torch.stack([k, torch.ones_like(k)], 1)


def _ls_step(n: Tensor, s1: Tensor, basis: Tensor, x_prev: Tensor, M: int) -> Tensor:
    """Proximal least squares of ``x`` given per-code counts ``n`` and sums ``s1``."""
    D = basis.shape[1]
    outer = (basis[:, :, None] * basis[:, None, :]).reshape(-1, D * D)  # (L, D*D)
    A = (n @ outer).view(*n.shape[:-1], D, D)  # sum_k n_k b_k b_k^T
    rhs = s1 @ basis  # sum_k s1_k b_k
    eps = _PROX * M
    A = A + eps * torch.eye(D, dtype=_F64, device=A.device)
    rhs = rhs + eps * x_prev
    x, info = torch.linalg.solve_ex(A, rhs)  # LU: as fast as Cholesky at these sizes
    ok = (info == 0) & torch.isfinite(x).all(-1)
    return torch.where(ok.unsqueeze(-1), x, x_prev)


def _keep_best(x: Tensor, err: Tensor, best_x: Tensor, best_err: Tensor,
               tol: float) -> Tuple[Tensor, Tensor, bool]:
    """One step of an iteration that keeps each start's best iterate (the alternation and
    Lloyd's both): ``x (G, K, D)`` with errors ``err (G, K)`` replaces the best so far where it
    is lower. Returns the new best, its errors, and whether any start gained more than ``tol``
    of its error (else the iteration has converged)."""
    better = err < best_err
    gain = torch.where(better, best_err - err, torch.zeros_like(err))
    progress = bool((gain > tol * err.clamp_min(1e-300)).any())
    return (torch.where(better.unsqueeze(-1), x, best_x), torch.where(better, err, best_err),
            progress)


def _gained(err: Tensor, best_err: Tensor, tol: float) -> Tensor:
    """``(G, K)``: the starts whose error fell by more than ``tol`` of it this iteration."""
    return (best_err - err) > tol * err.clamp_min(1e-300)


def _screen(keep: int, err: Tensor, *tables: Tensor) -> Tuple[Tensor, ...]:
    """Each group's ``keep`` starts of least ``err`` (ties: the earlier start), from each of
    ``tables`` (``(G, K)`` or ``(G, K, D)``)."""
    idx = err.argsort(dim=1, stable=True)[:, :keep]
    return tuple(t.gather(1, idx) if t.dim() == 2 else
                 t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in tables)


def _alternate(sw: _Sorted, basis: Tensor, x: Tensor, max_iter: int,
               tol: float = _TOL, batched: bool = False,
               keep: int = 0) -> Tuple[Tensor, Tensor]:
    """Alternating minimisation from each start ``x (G, K, D)``; best iterate and its error.

    All starts iterate until none gains more than ``tol``; ``batched``: see
    :func:`_alternate_batched`."""
    if batched:
        return _alternate_batched(sw, basis, x, max_iter, tol, keep)
    best_x = x.clone()
    best_err = torch.full(x.shape[:2], float("inf"), dtype=_F64, device=x.device)
    for _ in range(max(1, max_iter)):
        err, n, s1 = sw.code_stats(x @ basis.T)
        best_x, best_err, progress = _keep_best(x, err, best_x, best_err, tol)
        if not progress:
            break
        x = _ls_step(n, s1, basis, x, sw.M)
    return best_x, best_err


def _alternate_batched(sw: _Sorted, basis: Tensor, x: Tensor, max_iter: int, tol: float,
                       keep: int) -> Tuple[Tensor, Tensor]:
    """:func:`_alternate` for many groups: each start stops on its own once it gains no more
    than ``tol`` (a group's result then does not depend on the other groups of the call, so
    chunks of groups give the same results), the groups with no start left are dropped from
    the iteration, and with ``keep`` only each group's ``keep`` best starts go on after
    ``_SCREEN_ITERS`` iterations (most of the many coarse starts end far from the best;
    screening them early is what makes a search per output channel affordable)."""
    best_x = x.clone()
    best_err = torch.full(x.shape[:2], float("inf"), dtype=_F64, device=x.device)
    active = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    out: Optional[Tuple[Tensor, Tensor, Tensor]] = None  # (best_x, best_err, rows) of all groups
    sub = sw
    for it in range(max(1, max_iter)):
        err, n, s1 = sub.code_stats(x @ basis.T)
        active &= _gained(err, best_err, tol)
        best_x, best_err, _ = _keep_best(x, err, best_x, best_err, tol)
        if not bool(active.any()):
            break
        x = torch.where(active.unsqueeze(-1), _ls_step(n, s1, basis, x, sw.M), x)
        if keep and it + 1 == _SCREEN_ITERS and x.shape[1] > keep:
            x, best_x, best_err, active = _screen(keep, best_err, x, best_x, best_err, active)
        if (keep and it + 1 < _SCREEN_ITERS) or x.shape[1] > keep > 0:
            continue
        live = active.any(1)
        if not bool(live.any()):  # (screening can keep only finished starts)
            break
        if 2 * int(live.sum()) < live.numel():  # compact: drop the finished groups
            if out is None:
                out = (best_x.clone(), best_err.clone(), torch.arange(sw.G, device=x.device))
            out[0][out[2]], out[1][out[2]] = best_x, best_err
            out = (out[0], out[1], out[2][live])
            sub = sw.select(out[2])
            x, best_x, best_err, active = x[live], best_x[live], best_err[live], active[live]
    if out is None:
        return best_x, best_err
    out[0][out[2]], out[1][out[2]] = best_x, best_err
    return out[0], out[1]


def _pick(x: Tensor, err: Tensor) -> Tuple[Tensor, Tensor]:
    """Per group the start with the least error: ``(G, D)`` and ``(G,)``."""
    k = err.argmin(1)
    g = torch.arange(x.shape[0], device=x.device)
    return x[g, k], err[g, k]


def _uniform_starts(sw: _Sorted, bits: int, lsq_step: Tensor) -> Tensor:
    """``(G, S, 2)`` starts ``(step, offset)``: symmetric grids whose end levels sit at central
    quantile ranges from the middle 20% of the weights to all of them, and LSQ's grid."""
    nl = 1 << bits
    M = sw.M
    t = torch.linspace(0.02, 1.0, _UNIFORM_STARTS, dtype=_F64, device=sw.ws.device)
    tail = (1.0 / M) ** t  # share of the weights outside the range
    lo = ((tail / 2) * (M - 1)).floor().long().clamp(0, M - 1)
    hi = (M - 1) - lo
    half = torch.maximum(-sw.ws[:, lo], sw.ws[:, hi])  # (G, S)
    half = torch.cat([half, sw.ws[:, -1:].abs().maximum(sw.ws[:, :1].abs())], 1)
    step = 2 * half / (nl - 1)
    lsq = lsq_step.to(_F64)[:, None]
    step = torch.cat([step, lsq], 1)
    offset = -step * (nl - 1) / 2
    return torch.stack([step, offset], -1)


def _dense_uniform_starts(coarse: _Sorted, bits: int, batched: bool = False) -> Tensor:
    """``(G, K, 2)``: the best ``_DENSE_KEEP`` of a dense grid of uniform grids (steps from
    1/1000 of the range up to twice the range, centres across it and a bit beyond), evaluated
    without iterating.
    Alternation from a few starts can miss the best grid when the weights are few or
    clustered; a dense look at the whole ``(step, offset)`` plane does not."""
    nl = 1 << bits
    dev = coarse.ws.device
    lo, hi = coarse.ws[:, 0], coarse.ws[:, -1]
    span = (hi - lo).clamp_min(1e-300)
    # As many grids as a fixed budget of (grid, level, point) triples allows: dense where
    # the weights are few (where the error surface is rugged), at least 20 x 10.
    # (Batched: a budget per group, so that chunks of groups give the same grids.)
    n = _DENSE_BUDGET_GROUP // max(1, coarse.ws.shape[1] * nl) if batched else \
        _DENSE_BUDGET // max(1, coarse.G * coarse.ws.shape[1] * nl)
    lo_steps, lo_pos = (12, 6) if batched else (20, 10)
    n_steps = max(lo_steps, min(64, int(math.sqrt(2 * n))))
    n_pos = max(lo_pos, min(64, n // n_steps))
    # Steps up to twice the one that spans the weights: grids with end levels left unused
    # (in effect fewer, wider-spaced levels) win on clustered weights.
    f = torch.logspace(-3, math.log10(2.0), n_steps, dtype=_F64, device=dev)
    pos = torch.linspace(-0.25, 1.25, n_pos, dtype=_F64, device=dev)
    step = (span / (nl - 1))[:, None, None] * f[None, :, None]  # (G, S, 1)
    mid = lo[:, None, None] + span[:, None, None] * pos[None, None, :]  # (G, 1, A)
    # Positions across the range are coarse next to a small step (heavy tails): also every
    # eighth of a step around the median.
    med = coarse.ws[:, coarse.ws.shape[1] // 2][:, None, None]
    phase = torch.arange(8, dtype=_F64, device=dev) / 8
    mid = torch.cat([mid.expand(-1, n_steps, -1), med + step * phase], 2)
    off = (mid - step * (nl - 1) / 2).reshape(coarse.G, -1)
    step = step.expand(-1, -1, mid.shape[2]).reshape(coarse.G, -1)
    k = torch.arange(nl, dtype=_F64, device=dev)
    err = coarse.runs(off[..., None] + step[..., None] * k)[0]
    keep = err.topk(min(_DENSE_KEEP, err.shape[1]), dim=1, largest=False).indices
    return torch.stack([step.gather(1, keep), off.gather(1, keep)], -1)


def _two_means(sw: _Sorted) -> Tensor:
    """``(G, 1, 2)``: the exact best 2-level quantizer ``(step, offset)`` (every split of the
    sorted weights in two runs, by prefix sums): 1-bit uniform, N-multiplier and Lloyd-Max
    levels are all this."""
    M = sw.M
    n1 = torch.arange(1, M, dtype=_F64, device=sw.ws.device)
    a1, q1 = sw.p1[:, 1:M], sw.p2[:, 1:M]
    a2, q2 = sw.p1[:, -1:] - a1, sw.p2[:, -1:] - q1
    err = (q1 - a1 * a1 / n1) + (q2 - a2 * a2 / (M - n1))
    j = err.argmin(1, keepdim=True)
    m1 = a1.gather(1, j) / n1[j]
    m2 = a2.gather(1, j) / (M - n1[j])
    return torch.stack([m2 - m1, m1], -1)


def _uniform_search(sw: _Sorted, bits: int, lsq_step: Tensor, max_iter: int,
                    extra: Optional[Tensor] = None,
                    batched: bool = False) -> Tuple[Tensor, Tensor]:
    """Uniform grids ``(G, S, 2)`` (centred), best first, and their errors ``(G, S)``: all
    starts converged on the compressed weights (``batched``: the best
    ``_SCREEN_KEEP_UNIFORM`` after a few iterations), the best ``_UNIFORM_REFINE`` of them (and
    ``extra`` starts) then on all the weights."""
    basis = _uniform_basis(bits, sw.ws.device)
    coarse = sw.compress(_COARSE_POINTS)
    starts = [_uniform_starts(sw, bits, lsq_step), _dense_uniform_starts(coarse, bits, batched)]
    if bits == 1 and sw.M > 1:
        exact = _two_means(sw)
        starts.append(exact)
        extra = exact if extra is None else torch.cat([extra, exact], 1)
    x, err = _alternate(coarse, basis, torch.cat(starts, 1),
                        _COARSE_ITERS_BATCHED if batched else _COARSE_ITERS, _COARSE_TOL,
                        batched, _SCREEN_KEEP_UNIFORM if batched else 0)
    order = err.argsort(1)
    x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    fine = x[:, :_UNIFORM_REFINE] if extra is None else torch.cat([x[:, :_UNIFORM_REFINE],
                                                                    extra], 1)
    xf, ef = _alternate(sw, basis, fine, max_iter, batched=batched)
    order = ef.argsort(1)
    xf = xf.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    # The coarse ones after the refined ones (their errors are on the compressed weights).
    return torch.cat([xf, x[:, _UNIFORM_REFINE:]], 1), torch.cat(
        [ef.gather(1, order), err.gather(1, err.argsort(1))[:, _UNIFORM_REFINE:]], 1)


def _positive_step(step: Tensor, offset: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """The same grid with a non-negative step."""
    neg = step < 0
    return step.abs(), torch.where(neg, offset + step * ((1 << bits) - 1), offset)


def _positive_multipliers(r: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """The same level set with ``r >= 0``: ``r_i b_i = -|r_i| + |r_i| (1 - b_i)``."""
    return r.abs(), c + torch.where(r < 0, r, torch.zeros_like(r)).sum(1)


def _lsq_step(w2d: Tensor, bits: int) -> Tensor:
    return L.lsq_step_init(w2d, bits)


def _check(w2d: Tensor, bits, where: str) -> int:
    return L.check_bits(bits, where)


def _uniform_result(sw: _Sorted, w2d: Tensor, bits: int, x: Tensor) -> UniformGrid:
    """Centred ``(step, offset)`` ``(G, 2)`` -> a :class:`UniformGrid` in ``w2d``'s dtype, with
    constant groups on their value and the error as the quantizer evaluates it."""
    step, off = _positive_step(x[:, 0], x[:, 1] + sw.mean, bits)
    step, off = step.to(w2d.dtype), off.to(w2d.dtype)
    # Constant weights: the first level on their value (exact); LSQ's step (floored) apart.
    const = sw.constant
    if bool(const.any()):
        step = torch.where(const, _lsq_step(w2d, bits), step)
        off = torch.where(const, w2d[:, 0].detach(), off)
    r, c = UniformGrid(step, off, step).multipliers(bits)
    return UniformGrid(step, off, grid_error(w2d, L.level_table(r, c)))


@torch.no_grad()
def best_uniform_grid(w2d: Tensor, bits: int, init: Optional[Tuple[Tensor, Tensor]] = None,
                      search: bool = True, max_iter: int = 100) -> UniformGrid:
    """The uniform grid of ``2**bits`` levels with the least squared error, per group.

    A uniform grid is fixed by its clipping range; the search starts alternating minimisation
    (codes, then ``(step, offset)`` by least squares) from 17 symmetric ranges (central
    quantiles of the weights, up to the largest magnitude) and from LSQ's step on the weights
    compressed to 512 equal-count runs, refines the 3 best on all the weights and keeps the
    best. ``init=(step, offset)`` adds a start; with ``search=False`` it is the only one
    (a warm refit; the result is then never worse than ``init``).

    >>> w = torch.tensor([[-3.0, -1.0, 1.0, 3.0, 3.0]])
    >>> g = best_uniform_grid(w, 2)
    >>> g.step, g.offset, g.error
    (tensor([2.]), tensor([-3.]), tensor([0.], dtype=torch.float64))
    """
    bits = _check(w2d, bits, "best_uniform_grid")
    sw = _Sorted(w2d, "best_uniform_grid")
    x_init = None
    if init is not None:
        step0, off0 = (t.detach().to(_F64).reshape(-1) for t in init)
        x_init = torch.stack([step0, off0 - sw.mean], -1)[:, None]
    if not search and x_init is None:
        raise QfvError("best_uniform_grid: search=False needs init=(step, offset)")
    if search:
        x = _uniform_search(sw, bits, _lsq_step(w2d, bits), max_iter, x_init)[0][:, 0]
    else:
        x = _alternate(sw, _uniform_basis(bits, sw.ws.device), x_init, max_iter)[0][:, 0]
    best = _uniform_result(sw, w2d, bits, x)
    if x_init is not None:
        start = _uniform_result(sw, w2d, bits, x_init[:, 0])
        worse = best.error > start.error
        best = UniformGrid(*(torch.where(worse, s, b) for b, s in zip(best, start)))
    return best


def _lloyd(sw: _Sorted, levels: Tensor, max_iter: int,
           batched: bool = False) -> Tuple[Tensor, Tensor]:
    """Lloyd's algorithm from ``levels (G, K, L)`` (centred): best levels seen and errors
    (``batched``: each start stops on its own, as in :func:`_alternate`)."""
    best = levels.clone()
    best_err = torch.full(levels.shape[:2], float("inf"), dtype=_F64, device=levels.device)
    active = torch.ones(levels.shape[:2], dtype=torch.bool, device=levels.device)
    lv = levels
    for _ in range(max(1, max_iter)):
        err, n, s1, _, vals, _ = sw.runs(lv)
        if batched:
            active &= _gained(err, best_err, _TOL)
        best, best_err, progress = _keep_best(vals, err, best, best_err, _TOL)
        if not (bool(active.any()) if batched else progress):
            break
        # Centroids; an empty cell keeps its level.
        new = torch.where(n > 0, s1 / n.clamp_min(1), vals)
        lv = torch.where(active.unsqueeze(-1), new, vals) if batched else new
    return best, best_err


def _kmeans_dp(pts: _Sorted, k: int, chunk: int = 16) -> Tensor:
    """``(G, min(k, P))`` centred levels of the optimal ``k``-level quantizer of ``pts`` (runs of
    weights, each assigned whole), by dynamic programming over contiguous partitions of the
    sorted runs (1-D k-means is solved exactly this way): ``O(k P**2)`` per group."""
    G = pts.G
    P = pts.ws.shape[1]
    pc = pts.pc if pts.pc is not None else torch.arange(
        P + 1, dtype=_F64, device=pts.ws.device).expand(G, -1)
    k = min(k, P)
    out = []
    for g0 in range(0, G, chunk):
        c0, s1, s2 = pc[g0:g0 + chunk], pts.p1[g0:g0 + chunk], pts.p2[g0:g0 + chunk]
        n = c0[:, None, :] - c0[:, :, None]  # (g, i, j): weights in runs i..j-1
        a = s1[:, None, :] - s1[:, :, None]
        cost = (s2[:, None, :] - s2[:, :, None]) - a * a / n.clamp_min(1)
        cost = torch.where(n > 0, cost.clamp_min(0), torch.full_like(cost, math.inf))
        best = cost[:, 0, :]  # one level for runs 0..j-1
        back = []
        for _ in range(1, k):
            tot = best[:, :, None] + cost  # split at i: levels so far on 0..i-1, one on i..j-1
            best, arg = tot.min(1)
            back.append(arg)
        # Walk back from j = P to the run boundaries, then the levels (run centroids).
        g = torch.arange(c0.shape[0], device=c0.device)
        j = torch.full((c0.shape[0],), P, dtype=torch.long, device=c0.device)
        bounds = [j]
        for arg in reversed(back):
            j = arg[g, j]
            bounds.append(j)
        bounds.append(torch.zeros_like(j))
        b = torch.stack(bounds[::-1], 1)  # (g, k + 1), non-decreasing
        cnt = c0.gather(1, b).diff(dim=1)
        tot = s1.gather(1, b).diff(dim=1)
        out.append(tot / cnt)  # every level holds at least one run (k <= P)
    return torch.cat(out, 0)


def _quantile_levels(sw: _Sorted, bits: int) -> Tensor:
    """``(G, L)`` centroids of ``2**bits`` equal-count runs of the sorted weights."""
    nl = 1 << bits
    edges = torch.linspace(0, sw.M, nl + 1, device=sw.ws.device).round().long()
    p1 = sw.p1[:, edges]
    n = edges.diff().to(_F64)
    mid = sw.ws[:, (edges[:-1] + edges[1:]).div(2, rounding_mode="floor").clamp(max=sw.M - 1)]
    return torch.where(n > 0, p1.diff(dim=1) / n.clamp_min(1), mid)


@torch.no_grad()
def lloyd_max(w2d: Tensor, bits: int, init: Optional[Tensor] = None,
              max_iter: int = 500) -> LloydMax:
    """``2**bits`` free levels per group minimising the squared error (1-D k-means).

    Lloyd's algorithm (nearest level, then each level to the mean of its weights) from the
    exact optimum for the weights compressed to 256 equal-count runs (dynamic programming over
    contiguous partitions; exact outright for up to 256 weights per group), from the best
    uniform grid, from equal-count cells and from ``init`` (``(G, 2**bits)`` levels, e.g.
    fitted ones); the best result is kept. The reference for what any ``bits``-bit scalar
    quantizer can do, so for how much the additive structure of N-multiplier levels costs.
    Errors are float64 sums over each group.

    >>> w = torch.tensor([[0.0, 0.1, 5.0, 5.2, 9.0]])
    >>> lm = lloyd_max(w, 1)
    >>> lm.levels
    tensor([[0.0500, 6.4000]])
    """
    bits = _check(w2d, bits, "lloyd_max")
    sw = _Sorted(w2d, "lloyd_max")
    uni = _uniform_search(sw, bits, _lsq_step(w2d, bits), 100)[0][:, 0]
    starts = [uni[:, None, 1:2] + uni[:, None, 0:1] * _uniform_basis(bits, sw.ws.device)[:, 0],
              _quantile_levels(sw, bits)[:, None]]
    if init is not None:
        if tuple(init.shape) != (sw.G, 1 << bits):
            raise QfvError(f"lloyd_max: init must be (G, 2**bits) = {(sw.G, 1 << bits)}, got "
                           f"{tuple(init.shape)}")
        starts.append((init.detach().to(_F64) - sw.mean[:, None])[:, None])
    # The exact optimum for the weights compressed to _DP_POINTS runs (exact for as few
    # weights), padded with its top level if there are fewer runs than levels.
    dp = _kmeans_dp(sw.compress(_DP_POINTS), 1 << bits)
    if dp.shape[1] < 1 << bits:
        dp = torch.cat([dp, dp[:, -1:].expand(-1, (1 << bits) - dp.shape[1])], 1)
    starts.append(dp[:, None])
    lv, err = _lloyd(sw, torch.cat(starts, 1), max_iter)
    g = torch.arange(sw.G, device=lv.device)
    k = err.argmin(1)
    levels = (lv[g, k] + sw.mean[:, None]).to(w2d.dtype)
    levels = torch.where(sw.constant[:, None], w2d[:, :1].detach().expand_as(levels), levels)
    return LloydMax(levels.sort(1).values, torch.where(sw.constant, 0.0, err[g, k]))


def _coarse_search(sw: _Sorted, bits: int, ux: Tensor, uerr: Tensor, w2d: Tensor,
                   batched: bool = False) -> Tensor:
    """``(G, T, N + 1)`` promising N-multiplier starts, found on the weights compressed to
    ``_COARSE_POINTS`` runs from many starts.

    Alternating minimisation only moves within one ordering of the ``2**N`` level sums: from
    the uniform grid (``r_i ~ 2**i``) it never reaches the orderings where ``r_0 + r_1 > r_2``
    etc., which fit bell-shaped weights better (measured: Gaussian N=4 ends 1.20x Lloyd-Max
    from the uniform start, 1.04x from the best of many). So the starts also cover the
    multipliers' ratios: a Sobol sequence over ``log r_i`` (deterministic), plus the best
    uniform grids, LSQ's grid and two readings of Lloyd-Max levels as N-multiplier levels."""
    dev = sw.ws.device
    basis = _nmult_basis(bits, dev)
    pow2 = 2.0 ** torch.arange(bits, dtype=_F64, device=dev)
    coarse = sw.compress(_COARSE_POINTS)
    std = (sw.p2[:, -1] / sw.M).sqrt()  # the weights are centred
    sob = torch.quasirandom.SobolEngine(bits, scramble=False).draw(_SOBOL_STARTS)
    r = std[:, None, None] * torch.exp(_LOG_R_RANGE[0] + (_LOG_R_RANGE[1] - _LOG_R_RANGE[0])
                                       * sob.to(_F64).to(dev))[None]
    starts = [torch.cat([r, -r.sum(-1, keepdim=True) / 2], -1)]
    top = uerr.argsort(1)[:, :_NMULT_FROM_UNIFORM]
    ut = ux.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    starts.append(torch.cat([ut[..., :1] * pow2, ut[..., 1:]], -1))
    step = _lsq_step(w2d, bits).to(_F64)
    starts.append(torch.cat([step[:, None] * pow2, (-step * ((1 << bits) - 1) / 2)[:, None]],
                            1)[:, None])
    # Lloyd-Max levels: from the best uniform grid, and the exact optimum for the weights in
    # _DP_START_POINTS runs, each polished by Lloyd on the compressed weights. Two starts from
    # each: least squares with code k on the k-th smallest level, and the levels taken apart
    # into multipliers as a set of subset sums (exact when they are one).
    nl = 1 << bits
    best_u = ut[:, 0]
    lm0 = (best_u[:, 1:2] + best_u[:, 0:1] * _uniform_basis(bits, dev)[:, 0])[:, None]
    dp = _kmeans_dp(sw.compress(_DP_START_POINTS), nl)
    if dp.shape[1] < nl:
        dp = torch.cat([dp, dp[:, -1:].expand(-1, nl - dp.shape[1])], 1)
    lm, _ = _lloyd(coarse, torch.cat([lm0, dp[:, None]], 1),
                   _COARSE_ITERS_BATCHED if batched else _COARSE_ITERS, batched)
    _, n, s1, _, vals, _ = coarse.runs(lm)
    starts.append(_ls_step(n, s1, basis, starts[1][:, :1].expand(-1, 2, -1), sw.M))
    starts.append(torch.stack([L.subset_sum_generators(vals[:, k]) for k in range(2)], 1))
    x, err = _alternate(coarse, basis, torch.cat(starts, 1),
                        _COARSE_ITERS_BATCHED if batched else _COARSE_ITERS, _COARSE_TOL,
                        batched, _SCREEN_KEEP_NMULT if batched else 0)
    keep = err.argsort(1)[:, :_REFINE]
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def fit_multipliers(w2d: Tensor, bits: int, init: Optional[Tuple[Tensor, Tensor]] = None,
                    search: bool = True, max_iter: int = 200, batched: Optional[bool] = None,
                    chunk: int = _CHUNK_GROUPS) -> FitResult:
    """Fit N-multiplier levels ``c + sum_i r_i bit_i(k)`` to each group's weights.

    Alternating minimisation (module docstring) from several starts: the best uniform grids
    found by :func:`best_uniform_grid`, LSQ's grid, the least-squares projection of the
    Lloyd-Max levels, and ``init=(r, c)`` if given; the best result per group is kept, so it
    is never worse than the best uniform grid. With ``search=False`` only ``init`` is used
    (a warm refit, e.g. during training; never worse than ``init``). ``r`` comes back
    non-negative (the same level set). Groups of equal weights get the exact grid through
    their value. Returns a :class:`FitResult` in ``w2d``'s dtype.

    ``batched`` (default: a search over at least 128 groups, e.g. per output channel) fits
    the groups in chunks of ``chunk`` groups, each start stopping on its own and only each
    group's best few coarse starts going on after a few iterations: the cost of a per-channel
    fit of a language model's weights comes near a per-tensor one, and memory stays bounded
    by the chunk (``BENCHMARKS.md``). A group's result does not depend on ``chunk`` or on the
    other groups; ``batched=False`` is the exhaustive search of smaller calls.

    Weights on an additive grid are recovered (up to the order and sign of the multipliers):

    >>> w = torch.tensor([[-2.0, -1.0, 1.0, 2.0] * 3])   # r = (1, 3), c = -2
    >>> f = fit_multipliers(w, 2)
    >>> f.r.sort(1).values, f.c, bool(f.error < 1e-12)
    (tensor([[1., 3.]]), tensor([-2.]), True)
    >>> round(float(f.uniform.error), 6)   # the best uniform grid of 4 levels cannot do that
    0.6
    """
    bits = _check(w2d, bits, "fit_multipliers")
    _check_weights(w2d, "fit_multipliers")
    G = w2d.shape[0]
    if init is not None:
        r0, c0 = init
        if tuple(r0.shape) != (G, bits) or tuple(c0.reshape(-1).shape) != (G,):
            raise QfvError(f"fit_multipliers: init must be r ({G}, {bits}) and c ({G},), got "
                           f"{tuple(r0.shape)} and {tuple(c0.shape)}")
        init = (r0, c0.reshape(-1))
    elif not search:
        raise QfvError("fit_multipliers: search=False needs init=(r, c)")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise QfvError(f"fit_multipliers: chunk must be a positive int, got {chunk!r}")
    if batched is None:
        batched = search and G >= _BATCHED_GROUPS
    if not batched:
        return _fit_groups(w2d, bits, init, search, max_iter, False)
    parts = [_fit_groups(w2d[g0:g0 + chunk], bits,
                         None if init is None else (init[0][g0:g0 + chunk],
                                                    init[1][g0:g0 + chunk]),
                         search, max_iter, True) for g0 in range(0, G, chunk)]
    if len(parts) == 1:
        return parts[0]
    uniform = None if parts[0].uniform is None else UniformGrid(
        *(torch.cat(t) for t in zip(*(p.uniform for p in parts))))
    return FitResult(*(torch.cat([getattr(p, k) for p in parts]) for k in ("r", "c", "error")),
                     uniform)


def _fit_groups(w2d: Tensor, bits: int, init: Optional[Tuple[Tensor, Tensor]], search: bool,
                max_iter: int, batched: bool) -> FitResult:
    """:func:`fit_multipliers` on checked arguments (one chunk of groups when ``batched``)."""
    sw = _Sorted(w2d, "fit_multipliers", checked=True)
    dev = sw.ws.device
    basis = _nmult_basis(bits, dev)
    pow2 = 2.0 ** torch.arange(bits, dtype=_F64, device=dev)
    uniform = None
    starts = []
    if init is not None:
        starts.append(torch.cat([init[0].detach().to(_F64), (init[1].detach().to(_F64)
                                                             - sw.mean)[:, None]], 1)[:, None])
    if search:
        ux, uerr = _uniform_search(sw, bits, _lsq_step(w2d, bits), 100, batched=batched)
        best_u = ux[:, 0]
        uniform = _uniform_result(sw, w2d, bits, best_u)
        starts.append(torch.cat([best_u[:, :1] * pow2, best_u[:, 1:]], 1)[:, None])
        starts.append(_coarse_search(sw, bits, ux, uerr, w2d, batched))
    x, err = _alternate(sw, basis, torch.cat(starts, 1), max_iter, batched=batched,
                        keep=_SCREEN_KEEP_FINE if batched else 0)
    x = _pick(x, err)[0]
    r, c = _positive_multipliers(x[:, :bits], x[:, bits] + sw.mean)
    r, c = r.to(w2d.dtype), c.to(w2d.dtype)
    if bool(sw.constant.any()):
        step = _lsq_step(w2d, bits)
        r = torch.where(sw.constant[:, None], step[:, None] * pow2.to(r.dtype), r)
        c = torch.where(sw.constant, w2d[:, 0].detach(), c)
    error = grid_error(w2d, L.level_table(r, c))
    # The guarantee, in the quantizer's own arithmetic: never worse than the best uniform
    # grid (or the warm start).
    fallbacks = []
    if uniform is not None:
        fallbacks.append((*uniform.multipliers(bits), uniform.error))
    if init is not None:
        ri, ci = init[0].detach().to(w2d.dtype), init[1].detach().to(w2d.dtype)
        fallbacks.append((ri, ci, grid_error(w2d, L.level_table(ri, ci))))
    for rf, cf, ef in fallbacks:
        worse = error > ef
        r = torch.where(worse[:, None], rf, r)
        c = torch.where(worse, cf, c)
        error = torch.where(worse, ef, error)
    return FitResult(r, c, error, uniform)


@torch.no_grad()
def grid_error(w2d: Tensor, levels: Tensor) -> Tensor:
    """Sum of squared distances of each group's weights to their nearest level, ``(G,)``
    float64: the nearest level by the quantizer's own search in ``w2d``'s dtype (what it
    deploys; blocked, O(n) memory), the distances in float64.

    >>> grid_error(torch.tensor([[0.0, 0.4, 1.0]]), torch.tensor([[0.0, 1.0]]))
    tensor([0.1600], dtype=torch.float64)
    """
    li = S.LevelIndex(levels, w2d.dtype)
    G, M = w2d.shape
    out = torch.zeros(G, dtype=_F64, device=w2d.device)
    for r0, r1, c0, c1 in S.blocks(G, M):
        wb = w2d[r0:r1, c0:c1].detach()
        q = li.values_block(li.index_block(wb, r0, r1), r0, r1)
        d = wb.to(_F64) - q.view(wb.shape).to(_F64)
        out[r0:r1] += (d * d).sum(1)
    return out


def nonuniformity(r: Tensor) -> Tensor:
    """``max_i |r_i / (r_0 2**i) - 1|`` per group: 0 for a uniform grid (bit 0 the smallest)."""
    pow2 = 2.0 ** torch.arange(r.shape[1], dtype=r.dtype, device=r.device)
    ratio = r / (r[:, :1] * pow2)
    return (ratio - 1).abs().amax(1)
