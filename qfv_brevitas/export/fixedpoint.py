"""The fixed-point form: multipliers and offset rounded onto the grid ``m * 2**-f``.

Then every level is an integer times ``2**-f`` and a layer's weights are one standard QONNX
``Quant`` node (scale ``2**-f``, the integer width the levels need), which hls4ml and FINN take
unchanged. Rounding moves each multiplier by at most ``2**-(f+1)``; :func:`choose_frac_bits`
picks the smallest ``f`` whose accuracy change stays within a bound.

A layer trained with the integer view (:mod:`qfv_brevitas.core.intview`) already computes
with multipliers on its own grid ``2**-f``: it exports on that grid, at the signed integer width
training used, whatever ``f`` the other layers get, so its export changes nothing.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from qfv_brevitas.core.intview import MAX_FRAC_BITS, MAX_INT_BITS
from qfv_brevitas.core.levels import level_table
from qfv_brevitas.core.quantizers import nmult_layers
from qfv_brevitas.export.layers import FixedPointLayer, LayerExport
from qfv_brevitas.util.errors import QfvError

__all__ = ["round_to_grid", "fixed_point_layer", "fixed_point_model", "choose_frac_bits",
           "on_training_grids",
           "int_bits", "MAX_FRAC_BITS"]



def round_to_grid(t: Tensor, frac_bits: int) -> Tensor:
    """``t`` rounded to the nearest multiple of ``2**-frac_bits`` (half to even).

    >>> round_to_grid(torch.tensor([0.3, -0.7]), 2).tolist()
    [0.25, -0.75]
    """
    s = 2.0 ** frac_bits
    return (t.double() * s).round().div(s).to(t.dtype)


def int_bits(lo: int, hi: int):
    """Smallest width holding the integer range [lo, hi]: (bits, signed). A signed width is
    at least 2: QONNX executes a 1-bit signed ``Quant`` as bipolar (-1/+1), not as Brevitas'
    integers -1/0.

    >>> int_bits(0, 5), int_bits(-3, 3), int_bits(-1, 0)
    ((3, False), (3, True), (2, True))
    """
    if lo >= 0:
        return max(1, int(hi).bit_length()), False
    b = 2
    while not (-(1 << (b - 1)) <= lo and hi <= (1 << (b - 1)) - 1):
        b += 1
    return b, True


@torch.no_grad()
def fixed_point_layer(info: LayerExport, frac_bits: int) -> dict:
    """Round ``info``'s multipliers to ``2**-frac_bits``: sets ``info.fixed_point`` (a
    :class:`~qfv_brevitas.export.layers.FixedPointLayer` holding the deployed weights ``int *
    2**-f``, float32) and returns its description as the file's metadata stores it (integer
    width, signedness, multiplier and weight errors). A layer trained with the integer view
    keeps its own grid and its signed width (``frac_bits`` does not apply to it)."""
    own = info.frac_bits is not None
    if own:
        frac_bits = info.frac_bits
    if not 0 <= int(frac_bits) <= MAX_FRAC_BITS:
        raise QfvError(f"frac_bits must be in 0..{MAX_FRAC_BITS}, got {frac_bits}")
    if info.lrs is not None or info.hrs is not None:
        raise QfvError(f"layer {info.name!r} has a variability map attached: a device whose "
                       "cells vary is not on a fixed-point grid; export it in the 'compact' or "
                       "'bitplanes' form, or with with_maps=False")
    f = int(frac_bits)
    s = 2.0 ** f
    mr = (info.r.double() * s).round()
    mc = (info.c.double() * s).round()
    table = level_table(mr, mc)  # exact integers (float64)
    lo, hi = int(table.min()), int(table.max())
    # a layer trained on its grid keeps training's IntQuantTensor type: signed (a range
    # reaching -1 has the signed width of lo..hi)
    bits, signed = int_bits(min(lo, -1) if own else lo, hi)
    if bits > MAX_INT_BITS:
        raise QfvError(f"layer {info.name!r}: at frac_bits={f} its levels need {bits}-bit "
                       f"integers (more than {MAX_INT_BITS}); use fewer fractional bits")
    w = (info.lookup(table) / s).float()
    r_err = float((mr / s - info.r.double()).abs().max())
    c_err = float((mc / s - info.c.double()).abs().max())
    info.fixed_point = FixedPointLayer(
        frac_bits=f, int_bits=bits, signed=signed, int_min=lo, int_max=hi,
        r_fixed=(mr / s).tolist(), c_fixed=(mc / s).tolist(),
        max_multiplier_error=max(r_err, c_err),
        max_weight_error=float((w.double() - info.weight.double()).abs().max()), weight=w)
    return info.fixed_point.metadata()


def on_training_grids(layers: Sequence[LayerExport]) -> bool:
    """If every layer was trained on the integer view, round each to its own grid (there is no
    ``f`` to choose) and return True; else change nothing and return False."""
    if not all(info.frac_bits is not None for info in layers):
        return False
    for info in layers:
        fixed_point_layer(info, info.frac_bits)
    return True


def fixed_point_model(model: nn.Module, layers: Sequence[LayerExport]) -> nn.Module:
    """A copy of ``model`` computing with the fixed-point weights of ``layers`` (each layer's
    weight replaced by ``int * 2**-f`` and its quantizer bypassed; a layer trained with the
    integer view keeps its quantizer, which computes exactly that): the torch reference of
    the fixed-point export."""
    twin = copy.deepcopy(model)
    by_name = dict(nmult_layers(twin))
    for info in layers:
        if info.frac_bits is not None:
            continue  # trained on its grid: its quantizer already computes int * 2**-f
        layer = by_name[info.name]
        with torch.no_grad():
            layer.weight.copy_(info.fixed_point.weight.to(layer.weight))
        layer.weight_quant.disable_quant = True
    return twin.eval()


def choose_frac_bits(model: nn.Module, layers: Sequence[LayerExport],
                     accuracy: Callable[[nn.Module], float], max_drop: float,
                     candidates: Optional[Sequence[int]] = None) -> dict:
    """The smallest ``f`` whose fixed-point model's accuracy is at most ``max_drop``
    (percentage points) below the model's own. Returns ``{"frac_bits", "accuracy",
    "reference_accuracy", "tried": {f: accuracy}}``; raises if no candidate qualifies.
    Layers trained with the integer view keep their own grid; if every layer was, there is
    nothing to choose (``frac_bits`` ``None``)."""
    if not max_drop >= 0:
        raise QfvError(f"max accuracy drop must be >= 0 points, got {max_drop}")
    ref = 100.0 * accuracy(model)
    if on_training_grids(layers):
        acc = 100.0 * accuracy(fixed_point_model(model, layers))
        return {"frac_bits": None, "accuracy": acc, "reference_accuracy": ref, "tried": {}}
    tried: Dict[int, float] = {}
    for f in (candidates if candidates is not None else range(0, MAX_FRAC_BITS + 1)):
        try:
            for info in layers:
                fixed_point_layer(info, f)
        except ValueError as e:
            if "integers" in str(e):
                break  # more fractional bits only widen the integers further
            raise
        acc = 100.0 * accuracy(fixed_point_model(model, layers))
        tried[f] = acc
        if ref - acc <= max_drop:
            return {"frac_bits": f, "accuracy": acc, "reference_accuracy": ref, "tried": tried}
    raise QfvError(f"no fractional width up to {max(tried) if tried else 0} keeps the accuracy "
                   f"within {max_drop} points of {ref:.2f}% (tried {tried}); allow a larger "
                   "drop or pass frac_bits")
