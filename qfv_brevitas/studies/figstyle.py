"""How figures name and colour a study's methods, the same in every figure.

A method keeps its colour from figure to figure: the library's methods take the colours of
:data:`PALETTE` in a fixed order (:data:`METHOD_LABELS`), so ``paper`` is the same green in a
fault sweep and in ``compare.png`` whichever methods a figure shows; any other (registered)
method takes a colour of :data:`EXTRA_PALETTE` chosen by a checksum of its name (stable across
runs and machines; two such methods may share one). A self-tuned row ``X+selftune`` has ``X``'s
colour (drawn hatched or dashed). Legends use words (:func:`method_label`), not registry names.
Plain Python: nothing here imports matplotlib.

>>> method_label("paper+selftune")
'device-aware fine-tune (paper) + self-tuning'
>>> method_colour("paper") == method_colour("paper+selftune") != method_colour("none")
True
"""
from __future__ import annotations

import zlib
from typing import Dict, Tuple

__all__ = ["METHOD_LABELS", "PALETTE", "EXTRA_PALETTE", "SELFTUNE_SUFFIX", "method_label",
           "method_colour", "base_method", "is_selftuned", "LEVEL_UNITS", "VARIANT_LABELS"]

#: The library's methods in their fixed colour order, with the words a legend shows.
METHOD_LABELS: Dict[str, str] = {
    "none": "no correction (nearest ideal level)",
    "nearest_valid": "nearest valid level (aware mapping)",
    "paper": "device-aware fine-tune (paper)",
    "gauss": "device-aware fine-tune, Gaussian wells",
    "sin": "device-aware fine-tune, SinReQ",
    "chip_in_loop": "chip-in-the-loop fine-tune",
    "saq_aware": "device-aware fine-tune + SAM",
    "random_bit_error": "random-bit-error training",
    "saq": "sharpness-aware QAT (SAQ)",
    "selftune": "self-tuning only (no labels)",
}
#: Colour ``i`` belongs to the ``i``-th method of :data:`METHOD_LABELS` (matplotlib's tab10).
PALETTE: Tuple[str, ...] = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
#: Colours of other methods (dark shades, none in :data:`PALETTE`), picked by name checksum.
EXTRA_PALETTE: Tuple[str, ...] = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
                                  "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363")
#: How a row of a method after self-tuning is named (``paper+selftune``).
SELFTUNE_SUFFIX = "+selftune"
#: Quantizer variants in words (:data:`qfv_brevitas.core.config.VARIANTS`).
VARIANT_LABELS: Dict[str, str] = {"nmult": "N-multiplier", "step": "learned-step",
                                  "fixed": "fixed-level"}
#: The unit of a sweep's level (tables, CSV and figure axes all give the level as a fraction).
LEVEL_UNITS: Dict[str, str] = {
    "bit-fault rate": "fraction of bit cells stuck",
    "bit-error rate": "fraction of bits flipped",
    "sigma/mu": "spread of a cell's conductance, 0.1 = 10%",
}


def base_method(name: str) -> str:
    """The registered method of a row name (``paper+selftune`` -> ``paper``)."""
    return name[:-len(SELFTUNE_SUFFIX)] if is_selftuned(name) else name


def is_selftuned(name: str) -> bool:
    """Whether the row ``name`` is a method's model after self-tuning on the chip."""
    return name.endswith(SELFTUNE_SUFFIX)


def method_label(name: str) -> str:
    """The words a legend shows for the row ``name``: the library's methods by what they do,
    any other by its registered name; `` + self-tuning`` after a self-tuned row."""
    base = base_method(name)
    label = METHOD_LABELS.get(base, base)
    return label + " + self-tuning" if is_selftuned(name) else label


def method_colour(name: str) -> str:
    """The colour of the row ``name`` in every figure (see the module docstring)."""
    base = base_method(name)
    order = list(METHOD_LABELS)
    if base in order:
        return PALETTE[order.index(base) % len(PALETTE)]
    return EXTRA_PALETTE[zlib.crc32(base.encode()) % len(EXTRA_PALETTE)]
