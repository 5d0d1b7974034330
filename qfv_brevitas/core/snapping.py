"""Weights on their levels for good: snap them in place, read their N-bit codes, and report per
layer how far the weights lie from the levels (what a model is before it is deployed; the chip's
arithmetic is :mod:`qfv_brevitas.core.device`)."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from qfv_brevitas.core.quantizers import nmult_layers, quant_of

__all__ = ["snap_weights_", "weight_codes", "layer_report", "format_report"]


@torch.no_grad()
def snap_weights_(model: nn.Module) -> Dict[str, Tensor]:
    """Replace every N-multiplier layer's weights by their nearest level, in place.

    Returns each layer's codes (uint8, the weight's shape). Afterwards the regularizer is 0 and
    training- and eval-mode forwards agree.
    """
    codes = {}
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        c = tq.codes(layer.weight)
        layer.weight.copy_(tq.snap(layer.weight))
        codes[name] = c.to(torch.uint8)
    return codes


@torch.no_grad()
def weight_codes(model: nn.Module) -> Dict[str, Tensor]:
    """Each N-multiplier layer's weight codes (uint8): ``level = c + sum_i r_i * bit_i(code)``."""
    return {name: quant_of(layer).codes(layer.weight).to(torch.uint8)
            for name, layer in nmult_layers(model)}


@torch.no_grad()
def layer_report(model: nn.Module) -> List[dict]:
    """Per layer: bits, variant, granularity, ``r``, ``c``, levels and the distance of the
    weights to their nearest level (mean and max), as plain Python values."""
    rows = []
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        w = layer.weight
        dist = (w - tq.snap(w)).abs()
        rows.append({
            "layer": name,
            "bits": tq.bits,
            "variant": tq.variant,
            "mode": tq.mode,
            "per_channel": tq.per_channel,
            "num_weights": w.numel(),
            "r": tq.multipliers().tolist(),
            "c": tq.offset().tolist(),
            "levels": tq.levels().tolist(),
            "mean_distance": float(dist.mean()),
            "max_distance": float(dist.max()),
        })
    return rows


def _fmt(values, limit=4) -> str:
    flat = values[0] if len(values) == 1 else values
    if isinstance(flat[0], list):
        return f"[{len(flat)} channels]"
    s = ", ".join(f"{v:+.4g}" for v in flat[:limit])
    return f"[{s}{', ...' if len(flat) > limit else ''}]"


def format_report(rows: List[dict]) -> str:
    """A fixed-width table of :func:`layer_report` rows."""
    lw = max([5] + [len(r["layer"]) for r in rows])
    head = f"{'layer':<{lw}} {'bits':>4} {'variant':<7} {'gran':<7} {'r':<44} {'c':<12} {'mean d':>9} {'max d':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r["c"][0] if len(r["c"]) == 1 else float("nan")
        cs = f"{c:+.4g}" if len(r["c"]) == 1 else f"[{len(r['c'])} ch]"
        lines.append(
            f"{r['layer']:<{lw}} {r['bits']:>4} {r['variant']:<7} "
            f"{'channel' if r['per_channel'] else 'tensor':<7} {_fmt(r['r']):<44} {cs:<12} "
            f"{r['mean_distance']:>9.3g} {r['max_distance']:>9.3g}")
    return "\n".join(lines)
