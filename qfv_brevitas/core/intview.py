"""The integer view of N-multiplier levels: multipliers and offset on the grid ``m * 2**-f``.

With ``r_k = m_k 2**-f`` and ``c = m_c 2**-f`` (integers ``m``), every level
``<r, S> + c = (<m, S> + m_c) 2**-f`` is an integer times one scale, so a layer's weights are
a Brevitas ``IntQuantTensor`` (scale ``2**-f``, zero point 0, the width those integers need)
and Brevitas' integer machinery (``Int32Bias``, quant tensors between layers, accumulator
widths) and the FPGA flows take them as they take a uniform quantizer's.

While training the multipliers stay real parameters and are rounded in the forward pass with a
straight-through gradient (:func:`round_ste`), so the regularizer, the refits and the optimizer
see the rounded levels and still move ``r`` and ``c``.

>>> r = torch.tensor([[0.26, 0.49]]); c = torch.tensor([-0.37])
>>> round_ste(r, 3).tolist(), round_ste(c, 3).tolist()
([[0.25, 0.5]], [-0.375])
>>> lo, hi = integer_range(r, c, 3); int(lo), int(hi), int(signed_width(lo, hi))
(-3, 3, 3)
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from qfv_brevitas.core.fitting import grid_error
from qfv_brevitas.core.levels import level_table
from qfv_brevitas.core.widths import MAX_FRAC_BITS, check_frac_bits  # re-exported (home: widths)
from qfv_brevitas.util.errors import QfvError

__all__ = ["MAX_FRAC_BITS", "MAX_INT_BITS", "AUTO_TOLERANCE", "check_frac_bits", "round_ste",
           "grid_integers", "integer_range", "signed_width", "choose_frac_bits"]

#: Integers must stay exact in float32 (24-bit significand).
MAX_INT_BITS = 24
#: ``frac_bits="auto"``: the smallest ``f`` whose levels' squared error to the weights is at
#: most this fraction above that of the unrounded levels.
AUTO_TOLERANCE = 0.01


def round_ste(t: Tensor, frac_bits: int) -> Tensor:
    """``t`` rounded to the nearest multiple of ``2**-frac_bits`` (half to even) in the
    forward pass, the identity in the backward pass. Scaling by a power of two is exact, so
    the rounded values are exactly ``m * 2**-f``."""
    s = float(2 ** frac_bits)
    return t + (torch.round(t.detach() * s) / s - t.detach())


def grid_integers(t: Tensor, frac_bits: int) -> Tensor:
    """The integers ``m`` of ``t`` on the grid (float64, exact)."""
    return torch.round(t.detach().double() * float(2 ** frac_bits))


def integer_range(r: Tensor, c: Tensor, frac_bits: int) -> Tuple[Tensor, Tensor]:
    """Smallest and largest integer level ``<m, S> + m_c`` over all groups (0-dim float64
    tensors; tensor ops only, so no host sync)."""
    m, mc = grid_integers(r, frac_bits), grid_integers(c, frac_bits)
    lo = (mc + m.clamp(max=0).sum(dim=1)).min()
    hi = (mc + m.clamp(min=0).sum(dim=1)).max()
    return lo, hi


def signed_width(lo: Tensor, hi: Tensor) -> Tensor:
    """Bits of the smallest signed integer type holding ``lo..hi`` (a float tensor, as Brevitas
    keeps bit widths): ``b`` with ``-2**(b-1) <= lo`` and ``hi <= 2**(b-1) - 1``."""
    # float64: log2 of 2**k + 1 rounds to k in float32 for k >= ~20 (a width one bit short)
    span = torch.maximum(-lo.double(), hi.double() + 1).clamp(min=1)
    return (torch.log2(span).ceil() + 1).float()


def choose_frac_bits(w2d: Tensor, r: Tensor, c: Tensor, tolerance: float = AUTO_TOLERANCE
                     ) -> int:
    """The smallest ``f`` whose rounded levels fit the weights ``w2d`` (``(G, M)``) within
    ``tolerance`` of the unrounded levels' squared error, with integers of at most
    ``MAX_INT_BITS`` bits. Weights that sit exactly on the levels (error 0) take the smallest
    ``f`` that moves no multiplier by more than ``tolerance`` times the smallest one."""
    w2d, r, c = w2d.detach(), r.detach().double(), c.detach().double()
    base = float(grid_error(w2d, level_table(r, c)).sum())
    smallest = float(r.abs().clamp(min=1e-30).min())
    for f in range(MAX_FRAC_BITS + 1):
        lo, hi = integer_range(r, c, f)
        if int(signed_width(lo, hi)) > MAX_INT_BITS:
            break
        s = float(2 ** f)
        if base > 0:
            err = float(grid_error(w2d, level_table(torch.round(r * s) / s,
                                                    torch.round(c * s) / s)).sum())
            if err <= (1 + tolerance) * base:
                return f
        elif 0.5 / s <= tolerance * smallest:
            return f
    raise QfvError(f"no grid 2^-f with f <= {MAX_FRAC_BITS} and integers of at most "
                   f"{MAX_INT_BITS} bits keeps these levels within {tolerance:.0%} of their "
                   "error: give frac_bits explicitly")
