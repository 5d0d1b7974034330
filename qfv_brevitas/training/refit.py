"""Refit in place: each N-multiplier layer's levels fitted to its current weights (closed form,
:mod:`qfv_brevitas.core.fitting`); :func:`qfv_brevitas.training.train.fit` runs it every
``TrainConfig.refit_every`` steps."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.util.errors import QfvError

__all__ = ["refit_levels_"]


def _has_device_map(layer: nn.Module) -> bool:
    return layer.weight_quant.chip.has_maps


@torch.no_grad()
def refit_levels_(model: nn.Module, warm: bool = False,
                  layers: Optional[Sequence[str]] = None,
                  skip_device_maps: bool = True) -> List[dict]:
    """Fit every N-multiplier layer's levels to its current weights, in place.

    ``warm=False``: the full fit (:func:`qfv_brevitas.core.fitting.fit_multipliers`, never worse than
    the best uniform grid; ``step``/``fixed`` layers get the best uniform grid);
    ``warm=True``: alternating minimisation from the current levels (cheap, never worse than
    them; ``fixed`` layers are left alone), what :func:`qfv_brevitas.training.train.fit` runs every
    ``TrainConfig.refit_every`` steps. Layers with a fault or variability map attached are
    skipped unless ``skip_device_maps=False`` (the fit knows the ideal levels only; the
    device-aware regularizer fits those). ``layers`` restricts the refit to these names.

    Returns per refitted layer its name and the squared error before and after (sums).

    >>> import brevitas.nn as qnn
    >>> from qfv_brevitas.core.quantizers import NMultWeightQuant
    >>> torch.manual_seed(0) and None
    >>> m = nn.Sequential(qnn.QuantLinear(64, 32, bias=False, weight_quant=NMultWeightQuant,
    ...                                   weight_bit_width=3))
    >>> row = refit_levels_(m)[0]
    >>> row["error_after"] < row["error_before"]
    True
    """
    names = None if layers is None else set(layers)
    found = {n for n, _ in nmult_layers(model)}
    if names is not None and names - found:
        raise QfvError(f"refit_levels_: no N-multiplier layers named {sorted(names - found)}")
    rows = []
    for name, layer in nmult_layers(model):
        if (names is not None and name not in names) or (skip_device_maps
                                                         and _has_device_map(layer)):
            continue
        tq = quant_of(layer)
        before, after = tq.refit_(layer.weight, warm=warm)
        rows.append({"layer": name, "bits": tq.bits, "variant": tq.variant,
                     "error_before": float(before.sum()), "error_after": float(after.sum())})
    return rows
