"""Stuck-at bit faults of the N-bit weight cells: sample, save, load, validate, attach.

Each weight of an N-multiplier layer is stored as an N-bit code in N bit cells; its level is
``c + sum_i r_i * bit_i(code)``. A cell stuck at 0 (SA0) or 1 (SA1) forces its bit whatever
the code (paper section 3.6). A :class:`FaultMap` holds, per layer, two ``uint8`` masks of the
weight's shape: bit ``i`` of ``sa0[j]`` set means bit ``i`` of weight ``j`` is stuck at 0, of
``sa1[j]`` stuck at 1.

A map is a persistent effect: sampled once from an explicit seed, attached to the layers'
weight proxies as buffers (so it travels with the state dict), saved and loaded on its own.

- :class:`FaultModel`: bit-fault rate, SA1 share, per-layer rates, seed.
- :func:`sample_fault_map`: one map per model, reproducible on any machine; each layer draws
  from its own generator seeded by ``(seed, layer name)``, so adding, removing or reordering
  other layers leaves a layer's map unchanged. At a fixed seed the stuck cells are nested in
  the rate: every cell stuck at rate ``p`` is stuck at any rate ``q > p`` (one uniform number
  per cell, compared with the rate), which makes rate sweeps monotone rather than noisy.
- :func:`attach_faults`, :func:`detach_faults`: put a map on a model, take it off.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from qfv_brevitas.chip.maps import (LayerMaps, attach_layer_maps, detach_layer_maps,
                                    layer_generator, quantized_layers)
from qfv_brevitas.core.chip import check_stuck_masks, stuck_counts
from qfv_brevitas.core.quantizers import quant_of
from qfv_brevitas.util.configbase import QfvConfig
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.validate import check_fraction, check_layer_dict, check_seed, check_type

__all__ = ["FaultModel", "FaultMap", "FaultMapError", "sample_fault_map", "attach_faults",
           "detach_faults"]

FORMAT = "qfv-brevitas/faultmap/1"


class FaultMapError(QfvError):
    """A fault map is malformed, unreadable, or does not fit the model it is used with."""


# -- configuration ------------------------------------------------------------------------------

@dataclass
class FaultModel(QfvConfig):
    """How to draw stuck-at faults.

    Args:
        rate: fraction of weight bit cells that are stuck (the paper's bit-fault rate), in [0, 1].
        sa1_fraction: probability that a stuck cell is stuck at 1 (else at 0), in [0, 1].
        layer_rates: per-layer rates overriding ``rate``, by qualified module name.
        seed: seed of the map; each layer's generator is derived from it and the layer's name.

    >>> FaultModel(rate=0.1, layer_rates={"features.0": 0.0}).layer_rate("features.3")
    0.1
    >>> FaultModel(rate=10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    qfv_brevitas.util.errors.QfvError: FaultModel.rate must be a number in [0, 1] (a fraction of bit cells: ...), got 10
    """

    rate: float
    sa1_fraction: float = 0.5
    layer_rates: Dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def validate(self) -> None:
        hint = " (a fraction of bit cells: 0.01 for 1%)"
        self.rate = check_fraction(self.rate, "FaultModel.rate", hint)
        self.sa1_fraction = check_fraction(
            self.sa1_fraction, "FaultModel.sa1_fraction",
            " (the share of stuck cells stuck at 1: 0 for stuck-at-0 only, 1 for stuck-at-1 only)")
        self.layer_rates = check_layer_dict(self.layer_rates, "FaultModel.layer_rates",
                                            lambda v, w: check_fraction(v, w, hint))
        self.seed = check_seed(self.seed, "FaultModel.seed")

    def layer_rate(self, name: str) -> float:
        """The bit-fault rate of layer ``name``."""
        return self.layer_rates.get(name, self.rate)


# -- the map ------------------------------------------------------------------------------------

class FaultMap(LayerMaps):
    """Stuck-at masks per layer: ``layers[name] = (sa0, sa1)``, ``uint8`` tensors of the
    weight's shape, with the layer's bit width in ``bits[name]``.

    ``meta`` is the :class:`FaultModel` (as a dict) that sampled the map, or ``None`` for a
    map measured on hardware. The constructor checks the masks themselves (dtype, shapes, no
    cell stuck both ways, no stuck bit at or above the bit width); :meth:`validate` checks the
    map against a model. Saving, loading and the checks they share with a variability map are
    :class:`~qfv_brevitas.chip.maps.LayerMaps`'.

    >>> sa0 = torch.tensor([[0, 1], [0, 0]], dtype=torch.uint8)
    >>> sa1 = torch.tensor([[2, 0], [0, 4]], dtype=torch.uint8)
    >>> fmap = FaultMap({"fc": (sa0, sa1)}, bits={"fc": 3})
    >>> fmap.summary()["fc"]["stuck"], fmap.stuck_fraction()
    (3, 0.25)
    """

    FORMAT = FORMAT
    ERROR = FaultMapError
    WHAT = "fault map"
    PARTS = ("sa0", "sa1")
    PAIR = "(sa0, sa1) of uint8 tensors"
    PAYLOAD = "stuck bits"
    MODEL = FaultModel

    layers: Dict[str, Tuple[Tensor, Tensor]]

    @classmethod
    def check_pair(cls, sa0: Any, sa1: Any, bits: int, where: str) -> Tuple[Tensor, Tensor]:
        """uint8 masks of one shape, no cell stuck both ways, no stuck bit at or above
        ``bits``."""
        for label, t in (("sa0", sa0), ("sa1", sa1)):
            if not isinstance(t, Tensor) or t.dtype != torch.uint8:
                raise FaultMapError(
                    f"{where}: {label} must be a torch.uint8 tensor, got "
                    f"{getattr(t, 'dtype', type(t).__name__)}; convert with .to(torch.uint8)")
        if sa0.shape != sa1.shape:
            raise FaultMapError(f"{where}: sa0 has shape {tuple(sa0.shape)} but sa1 "
                                f"{tuple(sa1.shape)}; both have the weight's shape")
        check_stuck_masks(sa0, sa1, bits, where, FaultMapError)
        return sa0, sa1

    def check_fit(self, name: str, shape: Tuple[int, ...], bits: int) -> None:
        """Masks of the weight's shape, made for its bit width, no stuck bit above it."""
        sa0, sa1 = self.layers[name]
        if tuple(sa0.shape) != shape or tuple(sa1.shape) != shape:
            raise FaultMapError(
                f"fault map layer {name!r}: masks of shape {tuple(sa0.shape)} but the "
                f"layer's weight has shape {shape}. Sample the map from this model.")
        if self.bits[name] != bits:
            raise FaultMapError(
                f"fault map layer {name!r}: map made for {self.bits[name]}-bit weights but the "
                f"layer has {bits}-bit weights. Sample the map from this model.")
        check_stuck_masks(sa0, sa1, bits, f"fault map layer {name!r}", FaultMapError)

    @staticmethod
    def set_on(chip: Any, pair: Tuple[Tensor, Tensor], weight: Tensor) -> None:
        chip.set_faults(*pair, like=weight)

    @staticmethod
    def clear_on(chip: Any) -> None:
        chip.clear_faults()

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Weight shape per layer."""
        return {n: tuple(sa0.shape) for n, (sa0, _) in self.layers.items()}

    def describe(self) -> str:
        return f"stuck fraction {self.stuck_fraction():.4g}"

    def stuck_fraction(self) -> float:
        """Stuck bit cells over all bit cells of the map's layers (0.0 for an empty map)."""
        counts = [stuck_counts(*self.layers[n], self.bits[n]) for n in self.layers]
        cells = sum(c["cells"] for c in counts)
        return sum(c["stuck"] for c in counts) / cells if cells else 0.0

    def summary(self) -> Dict[str, Dict[str, Any]]:
        """Per layer: ``shape``, ``bits``, ``cells``, ``stuck``, ``sa0``, ``sa1``, ``fraction``
        (:func:`qfv_brevitas.core.chip.stuck_counts`)."""
        out = {}
        for name, (sa0, sa1) in self.layers.items():
            n = stuck_counts(sa0, sa1, self.bits[name])
            out[name] = {"shape": tuple(sa0.shape), "bits": self.bits[name], "cells": n["cells"],
                         "stuck": n["stuck"], "sa0": n["sa0"], "sa1": n["sa1"],
                         "fraction": n["fraction"]}
        return out


# -- sampling and attaching ----------------------------------------------------------------------

def _sample_masks(numel: int, bits: int, rate: float, sa1_fraction: float,
                  gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Flat ``(sa0, sa1)`` masks: one uniform ``u`` per cell (float64, one bit plane at a time);
    stuck if ``u < rate``, and SA1 if ``u < rate * sa1_fraction``: P(SA1 | stuck) is exactly
    ``sa1_fraction``, and stuck sets are nested in the rate at a fixed seed."""
    sa0 = torch.zeros(numel, dtype=torch.uint8)
    sa1 = torch.zeros(numel, dtype=torch.uint8)
    if rate == 0.0:
        return sa0, sa1
    t1 = rate * sa1_fraction  # <= rate in floating point as sa1_fraction <= 1
    for i in range(bits):
        u = torch.rand(numel, generator=gen, dtype=torch.float64)
        stuck, one = u < rate, u < t1
        sa1 |= one.to(torch.uint8) << i
        sa0 |= (stuck ^ one).to(torch.uint8) << i
    return sa0, sa1


def sample_fault_map(model: nn.Module, fault_model: FaultModel) -> FaultMap:
    """Draw a stuck-at map for every N-multiplier layer of ``model``: each of the ``bits``
    cells of each weight is stuck independently with the layer's rate.

    Reproducible on any machine: each layer draws on the CPU from a generator seeded by
    ``(fault_model.seed, layer name)``; the masks are then moved to the weight's device.

    >>> from qfv_brevitas import NMultConfig, quantize_model
    >>> model = quantize_model(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)),
    ...                        NMultConfig(weight_bits=4, act_bits=None, first_last_bits=None))
    >>> fmap = sample_fault_map(model, FaultModel(rate=0.1, layer_rates={"2": 0.0}, seed=1))
    >>> fmap.bits, fmap.shapes["0"], fmap.summary()["2"]["stuck"]
    ({'0': 4, '2': 4}, (8, 16), 0)
    """
    check_type(fault_model, FaultModel, "sample_fault_map")
    layers = quantized_layers(model, "sample_fault_map", fault_model.layer_rates,
                              "FaultModel.layer_rates")
    masks, bits = {}, {}
    for name, layer in layers.items():
        w = layer.weight
        bits[name] = quant_of(layer).bits
        gen = layer_generator("faults", fault_model.seed, name)
        sa0, sa1 = _sample_masks(w.numel(), bits[name], fault_model.layer_rate(name),
                                 fault_model.sa1_fraction, gen)
        masks[name] = (sa0.view(w.shape).to(w.device), sa1.view(w.shape).to(w.device))
    return FaultMap(masks, bits, fault_model.to_dict())


def attach_faults(model: nn.Module, fault_map: FaultMap) -> nn.Module:
    """Validate ``fault_map`` against ``model`` and set each layer's stuck bits on its weight
    chip (:class:`qfv_brevitas.core.chip.Chip`, ``weight_quant.chip.sa0``/``sa1``, saved with
    the state dict).
    Layers without an entry are made fault-free. Returns ``model``."""
    return attach_layer_maps(model, fault_map, FaultMap, "attach_faults")


def detach_faults(model: nn.Module) -> nn.Module:
    """Make every N-multiplier layer of ``model`` fault-free again. Returns ``model``."""
    return detach_layer_maps(model, FaultMap)
