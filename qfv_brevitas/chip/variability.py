"""Device-to-device variability of the N-bit weight cells: sample, save, load, validate, attach.

Each bit cell ``i`` of weight ``j`` gets its own factors (paper eq. 12, extended to HRS as the
paper's section 3.7 suggests): a cell holding "1" (low-resistance state, LRS) contributes
``lrs[j, i] * r_i`` (ideal factor 1), a cell holding "0" (HRS) contributes ``hrs[j, i] * r_i``
(ideal 0). The deployed value of code ``S`` is
``c + sum_i r_i * (S_i * lrs[j, i] + (1 - S_i) * hrs[j, i])``.

A :class:`VariabilityMap` holds, per layer, ``lrs`` and optionally ``hrs``, float tensors of
shape ``weight.shape + (bits,)``. Like a fault map it is a persistent effect: sampled once from
an explicit seed, attached to the layers' chips (``weight_quant.chip.lrs`` and
``hrs``) that travel with the state dict. A model can carry a fault map and a variability
map at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from qfv_brevitas.chip.maps import (LayerMaps, attach_layer_maps, detach_layer_maps,
                                    layer_generator, quantized_layers)
from qfv_brevitas.core.quantizers import quant_of
from qfv_brevitas.util.configbase import QfvConfig
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.validate import (check_choice, check_layer_dict, check_real, check_seed,
                                        check_type)

__all__ = ["DISTRIBUTIONS", "VariabilityModel", "VariabilityMap", "VariabilityMapError",
           "sample_variability_map", "attach_variability", "detach_variability"]

FORMAT = "qfv-brevitas/varmap/1"
#: Distributions of a cell's factor around its nominal value.
DISTRIBUTIONS = ("normal", "lognormal")


class VariabilityMapError(QfvError):
    """A variability map is malformed, unreadable, or does not fit the model it is used with."""


def _check_sigma(value: Any, what: str) -> float:
    return check_real(value, what, hint=" (the relative spread sigma/mu of a cell's "
                                        "conductance: 0.1 for 10%)")


@dataclass
class VariabilityModel(QfvConfig):
    """How to draw per-cell variability factors.

    Args:
        sigma: relative spread (std over mean) of a "1" (LRS) cell's contribution; 0 is ideal.
        hrs_on_off: LRS/HRS conductance ratio (> 1). With it, a "0" cell contributes
            ``r_i / hrs_on_off`` on average (its nominal "1" value over the ratio), varied with
            ``hrs_sigma`` independently of the cell's LRS factor; without it a "0" cell
            contributes nothing (the paper's LRS-only model).
        hrs_sigma: relative spread of the HRS contribution; ``None`` uses each layer's LRS sigma.
        distribution: ``"normal"``: factor ``1 + sigma * z``, ``z ~ N(0, 1)``, clipped at 0
            because a conductance cannot be negative (the clip matters from sigma ~0.3 on: 0.04%
            of cells at 0.3, 2.3% at 0.5; the paper's reference leaves negative factors).
            ``"lognormal"``: factor ``exp(mu + s * z)`` with ``s**2 = log(1 + sigma**2)`` and
            ``mu = -s**2 / 2``, so mean 1 and std ``sigma`` exactly and always positive.
        seed: seed of the map; each layer's generator is derived from it and the layer's name.
        layer_sigmas: per-layer LRS sigmas overriding ``sigma``, by qualified module name.
        chip_sigma: relative spread of a *between-chip* component: one factor (same
            distribution, mean 1) drawn per chip multiplies every cell's factors, LRS and HRS,
            of every layer (a chip whose conductances all run high or low). 0: none.
        layer_shared_sigma: relative spread of a component shared by all cells of one layer
            (one factor per layer and chip, e.g. one crossbar array per layer). 0: none.
            A layer whose ``layer_sigmas`` entry is 0 is kept off the analog device: it gets
            no shared component either (how ``layers="inner"`` keeps the 8-bit edges ideal).
        chip_seed: seed of the shared components; ``None`` uses ``seed``. Maps with the same
            ``chip_seed`` and different ``seed`` are different devices of the same chip: Monte
            Carlo over chips varies ``chip_seed``, over devices within a chip ``seed``.

    The per-device factors depend only on ``seed``, ``sigma``, ``hrs_*`` and ``distribution``:
    a map with shared components is the map without them times the shared factors (recorded in
    the map's ``meta["shared_factors"]``).

    >>> VariabilityModel(sigma=0.1, hrs_on_off=10, layer_sigmas={"fc": 0.2}).layer_sigmas
    {'fc': 0.2}
    >>> VariabilityModel(sigma=0.1, distribution="gauss")
    Traceback (most recent call last):
    ...
    qfv_brevitas.util.errors.QfvError: unknown VariabilityModel.distribution 'gauss'; choose one of normal, lognormal
    """

    sigma: float
    hrs_on_off: Optional[float] = None
    hrs_sigma: Optional[float] = None
    distribution: str = "normal"
    seed: int = 0
    layer_sigmas: Dict[str, float] = field(default_factory=dict)
    chip_sigma: float = 0.0
    layer_shared_sigma: float = 0.0
    chip_seed: Optional[int] = None

    def validate(self) -> None:
        self.sigma = _check_sigma(self.sigma, "VariabilityModel.sigma")
        self.chip_sigma = _check_sigma(self.chip_sigma, "VariabilityModel.chip_sigma")
        self.layer_shared_sigma = _check_sigma(self.layer_shared_sigma,
                                               "VariabilityModel.layer_shared_sigma")
        if self.chip_seed is not None:
            self.chip_seed = check_seed(self.chip_seed, "VariabilityModel.chip_seed")
        if self.hrs_on_off is not None:
            self.hrs_on_off = check_real(
                self.hrs_on_off, "VariabilityModel.hrs_on_off", 1, strict=True,
                hint=" (the LRS/HRS conductance ratio, e.g. 10 or 100), or None for no HRS "
                     "current")
        if self.hrs_sigma is not None:
            self.hrs_sigma = _check_sigma(self.hrs_sigma, "VariabilityModel.hrs_sigma")
            if self.hrs_on_off is None:
                raise QfvError("VariabilityModel.hrs_sigma is set but hrs_on_off is None: give "
                                 "hrs_on_off (the LRS/HRS ratio) to model HRS current")
        check_choice(self.distribution, DISTRIBUTIONS, "VariabilityModel.distribution")
        self.seed = check_seed(self.seed, "VariabilityModel.seed")
        self.layer_sigmas = check_layer_dict(self.layer_sigmas, "VariabilityModel.layer_sigmas",
                                             _check_sigma)

    def layer_sigma(self, name: str) -> float:
        """The LRS sigma of layer ``name``."""
        return self.layer_sigmas.get(name, self.sigma)


def _factors(z: Tensor, sigma: float, distribution: str) -> Tensor:
    """Factors of mean 1 and std ``sigma`` (before the normal's clip) from standard normals."""
    if distribution == "normal":
        return (1.0 + sigma * z).clamp_(min=0.0)
    s2 = math.log1p(sigma * sigma)
    return torch.exp(math.sqrt(s2) * z - s2 / 2)


# -- the map ------------------------------------------------------------------------------------

class VariabilityMap(LayerMaps):
    """Per-cell factors per layer: ``layers[name] = (lrs, hrs)``, float tensors of shape
    ``weight.shape + (bits,)`` (``hrs`` may be ``None``: "0" cells contribute nothing), with
    the layer's bit width in ``bits[name]``.

    ``meta`` is the :class:`VariabilityModel` (as a dict) that sampled the map, or ``None`` for
    a measured map. The constructor checks the factors (finite, >= 0, last axis = bits);
    :meth:`validate` checks the map against a model. Saving, loading and the checks they share
    with a fault map are :class:`~qfv_brevitas.chip.maps.LayerMaps`'.

    >>> vmap = VariabilityMap({"fc": (torch.full((2, 3, 4), 1.5), None)}, bits={"fc": 4})
    >>> vmap.shapes, vmap.summary()["fc"]["lrs_mean"]
    ({'fc': (2, 3)}, 1.5)
    """

    FORMAT = FORMAT
    ERROR = VariabilityMapError
    WHAT = "variability map"
    PARTS = ("lrs", "hrs")
    PAIR = "(lrs, hrs or None)"
    PAYLOAD = "variability factors"
    MODEL = VariabilityModel

    layers: Dict[str, Tuple[Tensor, Optional[Tensor]]]

    @classmethod
    def check_pair(cls, lrs: Any, hrs: Any, bits: int, where: str
                   ) -> Tuple[Tensor, Optional[Tensor]]:
        """Finite factors >= 0 of shape ``weight shape + (bits,)``; ``hrs`` may be ``None``."""
        for label, t in (("lrs", lrs), ("hrs", hrs)):
            if t is None and label == "hrs":
                continue
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise VariabilityMapError(
                    f"{where}: {label} must be a floating-point tensor, got "
                    f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() < 1 or t.shape[-1] != bits:
                raise VariabilityMapError(
                    f"{where}: {label} has shape {tuple(t.shape)}; expected weight shape + "
                    f"({bits},), one factor per bit cell")
            if t.numel() and not bool((torch.isfinite(t) & (t >= 0)).all()):
                raise VariabilityMapError(
                    f"{where}: {label} factors must be finite and >= 0 (a conductance "
                    f"cannot be negative); min {float(t.min())}, max {float(t.max())}")
        if hrs is not None and hrs.shape != lrs.shape:
            raise VariabilityMapError(f"{where}: lrs has shape {tuple(lrs.shape)} but hrs "
                                      f"{tuple(hrs.shape)}")
        return lrs, hrs

    def check_fit(self, name: str, shape: Tuple[int, ...], bits: int) -> None:
        """Factors made for the weight's bit width, of shape ``weight shape + (bits,)``."""
        lrs, _ = self.layers[name]
        if self.bits[name] != bits:
            raise VariabilityMapError(
                f"variability map layer {name!r}: map made for {self.bits[name]}-bit weights "
                f"but the layer has {bits}-bit weights. Sample the map from this model.")
        if tuple(lrs.shape) != shape + (bits,):
            raise VariabilityMapError(
                f"variability map layer {name!r}: factors of shape {tuple(lrs.shape)} but "
                f"the layer needs weight shape + bits = {shape + (bits,)}. Sample the map "
                f"from this model.")

    @staticmethod
    def set_on(chip: Any, pair: Tuple[Tensor, Optional[Tensor]], weight: Tensor) -> None:
        chip.set_variability(*pair, like=weight)

    @staticmethod
    def clear_on(chip: Any) -> None:
        chip.clear_variability()

    @classmethod
    def read_meta(cls, meta: Any) -> Optional[dict]:
        """The stored ``meta`` (of any version) read through
        :meth:`VariabilityModel.from_dict`, its ``shared_factors`` kept."""
        if meta is None:
            return None
        if not isinstance(meta, dict):
            raise VariabilityMapError(f"its meta must be a dict of VariabilityModel settings, "
                                      f"got {type(meta).__name__}")
        settings = {k: v for k, v in meta.items() if k != "shared_factors"}
        out = VariabilityModel.from_dict(settings).to_dict()
        if "shared_factors" in meta:
            out["shared_factors"] = meta["shared_factors"]
        return out

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Weight shape per layer (the factors' shape without the last, per-bit axis)."""
        return {n: tuple(lrs.shape[:-1]) for n, (lrs, _) in self.layers.items()}

    def describe(self) -> str:
        return "LRS+HRS" if any(h is not None for _, h in self.layers.values()) else "LRS"

    def summary(self) -> Dict[str, Dict[str, Any]]:
        """Per layer: ``shape``, ``bits``, ``cells``, ``lrs_mean``/``std``/``min``/``max`` and
        ``hrs_mean``/``hrs_std`` (``None`` without HRS)."""
        out = {}
        for name, (lrs, hrs) in self.layers.items():
            x = lrs.detach().double()
            row = {"shape": tuple(lrs.shape[:-1]), "bits": self.bits[name], "cells": lrs.numel(),
                   "lrs_mean": float(x.mean()), "lrs_std": float(x.std()) if x.numel() > 1 else 0.0,
                   "lrs_min": float(x.min()), "lrs_max": float(x.max()),
                   "hrs_mean": None, "hrs_std": None}
            if hrs is not None:
                h = hrs.detach().double()
                row["hrs_mean"] = float(h.mean())
                row["hrs_std"] = float(h.std()) if h.numel() > 1 else 0.0
            out[name] = row
        return out


# -- sampling and attaching ----------------------------------------------------------------------

def sample_variability_map(model: nn.Module, var_model: VariabilityModel) -> VariabilityMap:
    """Draw per-cell factors for every N-multiplier layer of ``model``.

    Reproducible on any machine: each layer draws on the CPU from a generator seeded by
    ``(var_model.seed, layer name)``, LRS normals first, then HRS normals; the factors are
    moved to the weight's device. The LRS factors do not depend on the HRS settings.

    >>> from qfv_brevitas import NMultConfig, quantize_model
    >>> model = quantize_model(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)),
    ...                        NMultConfig(weight_bits=4, act_bits=None, first_last_bits=None))
    >>> vmap = sample_variability_map(model, VariabilityModel(sigma=0.1, hrs_on_off=10, seed=1))
    >>> tuple(vmap.layers["0"][0].shape), round(vmap.summary()["0"]["hrs_mean"], 1)
    ((8, 16, 4), 0.1)
    """
    check_type(var_model, VariabilityModel, "sample_variability_map")
    layers = quantized_layers(model, "sample_variability_map", var_model.layer_sigmas,
                              "VariabilityModel.layer_sigmas")
    factors, bits = {}, {}
    shared = _shared_factors(var_model, list(layers))
    for name, layer in layers.items():
        w = layer.weight
        bits[name] = quant_of(layer).bits
        shape = tuple(w.shape) + (bits[name],)
        gen = layer_generator("variability", var_model.seed, name)
        sigma = var_model.layer_sigma(name)
        lrs = _factors(torch.randn(shape, generator=gen), sigma, var_model.distribution)
        hrs = None
        if var_model.hrs_on_off is not None:
            hsigma = sigma if var_model.hrs_sigma is None else var_model.hrs_sigma
            hrs = _factors(torch.randn(shape, generator=gen), hsigma, var_model.distribution)
            hrs = hrs / var_model.hrs_on_off
        if shared is not None and var_model.layer_sigmas.get(name) != 0:
            f = shared["chip"] * shared["layers"][name]
            lrs = lrs * f
            hrs = None if hrs is None else hrs * f
        factors[name] = (lrs.to(w.device), None if hrs is None else hrs.to(w.device))
    meta = var_model.to_dict()
    if shared is not None:
        meta["shared_factors"] = shared
    return VariabilityMap(factors, bits, meta)


def _shared_factors(var_model: VariabilityModel, names) -> Optional[dict]:
    """The chip factor and each layer's shared factor (floats), or ``None`` without shared
    components. Drawn from their own generators, so the per-device draws do not move."""
    if var_model.chip_sigma == 0 and var_model.layer_shared_sigma == 0:
        return None
    seed = var_model.seed if var_model.chip_seed is None else var_model.chip_seed

    def draw(domain: str, name: str, sigma: float) -> float:
        if sigma == 0:
            return 1.0
        z = torch.randn(1, generator=layer_generator(domain, seed, name), dtype=torch.float64)
        return float(_factors(z, sigma, var_model.distribution))

    return {"chip": draw("variability-chip", "", var_model.chip_sigma),
            "layers": {n: draw("variability-layer", n, var_model.layer_shared_sigma)
                       for n in names}}


def attach_variability(model: nn.Module, var_map: VariabilityMap) -> nn.Module:
    """Validate ``var_map`` against ``model`` and set each layer's factors on its chip
    (``weight_quant.chip.lrs``/``hrs``, saved with the state dict). Layers without
    an entry are made ideal. Faults attached to the model are kept. Returns ``model``."""
    return attach_layer_maps(model, var_map, VariabilityMap, "attach_variability")


def detach_variability(model: nn.Module) -> nn.Module:
    """Make every N-multiplier layer of ``model`` ideal again (faults are kept). Returns
    ``model``."""
    return detach_layer_maps(model, VariabilityMap)
