"""Transient bit errors: random flips of the stored weight bits, drawn anew on every inference.

Stuck-at faults (:mod:`qfv_brevitas.chip.faults`) are persistent: one map per chip, held by
the layer's chip. Bit flips are a per-forward effect (read disturbs, low-voltage SRAM): each forward pass
of a layer reads every stored bit of every weight flipped with probability ``rate`` (the
bit-error rate, BER), independently. The programmed code ``S`` (nearest level, or the device-aware
code with ``deploy_mapping="aware"``) is read as ``S xor F`` with a fresh random mask ``F``; a
stuck cell stays stuck (the device forces its bit after the flip) and cell variability applies
to the flipped code. So flips compose with attached fault and variability maps.

They are kept apart from the persistent maps, as aihwkit keeps per-forward noise apart from
programmed state: an injector is the reader of the layer's chip
(:class:`qfv_brevitas.core.chip.Chip`), never in the state dict. Each layer draws from its own generator seeded by ``(seed, layer name)``, so a run
is reproducible and the ``k``-th forward pass of a layer sees the same flips whatever else runs.
One draw serves a whole batch; evaluate with ``batch_size=1`` for flips per sample.

- :class:`BitFlipModel`, :func:`attach_bitflips`, :func:`detach_bitflips`;
- the Monte Carlo over seeds (:func:`qfv_brevitas.studies.montecarlo.evaluate_bitflips`) and
  random-bit-error training (:func:`qfv_brevitas.studies.methods.random_bit_error_finetune`)
  are studies built on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from qfv_brevitas.chip.maps import layer_generator, quantized_layers
from qfv_brevitas.core.levels import popcount
from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.util.configbase import QfvConfig
from qfv_brevitas.util.validate import check_fraction, check_layer_dict, check_seed

__all__ = ["BitFlipModel", "BitFlipInjector", "flip_masks", "attach_bitflips",
           "detach_bitflips", "bitflip_injectors"]


@dataclass
class BitFlipModel(QfvConfig):
    """How to flip stored weight bits on each inference.

    Args:
        rate: bit-error rate: probability that a stored bit reads flipped, per bit cell and
            forward pass, in [0, 1].
        seed: seed of the flip streams; each layer's generator is derived from it and the
            layer's name.
        layer_rates: per-layer rates overriding ``rate``, by qualified module name.

    >>> BitFlipModel(rate=0.01, layer_rates={"fc": 0.0}).layer_rate("fc")
    0.0
    >>> BitFlipModel(rate=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    qfv_brevitas.util.errors.QfvError: BitFlipModel.rate must be a number in [0, 1] (a bit-error rate: ...), got 2
    """

    rate: float
    seed: int = 0
    layer_rates: Dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        hint = " (a bit-error rate: 0.01 for 1% of the bits read flipped)"
        self.rate = check_fraction(self.rate, "BitFlipModel.rate", hint)
        self.seed = check_seed(self.seed, "BitFlipModel.seed")
        self.layer_rates = check_layer_dict(self.layer_rates, "BitFlipModel.layer_rates",
                                            lambda v, w: check_fraction(v, w, hint))

    def layer_rate(self, name: str) -> float:
        """The bit-error rate of layer ``name``."""
        return self.layer_rates.get(name, self.rate)


def flip_masks(numel: int, bits: int, rate: float, gen: torch.Generator) -> Tensor:
    """Flat uint8 masks: bit ``i`` of entry ``j`` set with probability ``rate``, independently
    (one float32 uniform per cell, one bit plane at a time, from ``gen`` on the CPU).

    >>> m = flip_masks(6, 3, 1.0, torch.Generator().manual_seed(0))
    >>> m.tolist()
    [7, 7, 7, 7, 7, 7]
    """
    out = torch.zeros(numel, dtype=torch.uint8)
    if rate == 0.0:
        return out
    for i in range(bits):
        out |= (torch.rand(numel, generator=gen) < rate).to(torch.uint8) << i
    return out


class BitFlipInjector:
    """The bit-flip reader of one layer's chip (:meth:`qfv_brevitas.core.chip.Chip.set_flips`):
    every forward pass reads the programmed codes with a fresh random flip mask, so the layer
    computes with what the device reads (in training mode with a straight-through gradient to
    the weights and the exact one to ``r`` and ``c``, as the chip-in-loop forward does). Counts
    the cells it read and flipped (``cells``, ``flipped``)."""

    def __init__(self, name: str, rate: float, bits: int, seed: int):
        self.name, self.rate, self.bits, self.seed = name, float(rate), int(bits), int(seed)
        self.gen = layer_generator("bitflips", self.seed, name)
        self.cells = 0
        self._flipped = []  # per forward pass, a count on the weights' device (no sync)
        self.last_mask: Optional[Tensor] = None

    @property
    def flipped(self) -> int:
        """Bits read flipped so far."""
        self._flipped = [sum(int(t) for t in self._flipped)] if self._flipped else []
        return self._flipped[0] if self._flipped else 0

    def read(self, codes: Tensor) -> Tensor:
        """``codes`` (programmed, ``(G, M)``) as read with a fresh flip mask (uint8)."""
        mask = flip_masks(codes.numel(), self.bits, self.rate, self.gen)
        mask = mask.view(codes.shape)
        if codes.device.type == "cuda":  # drawn on the CPU (reproducible): pinned, async copy
            mask = mask.pin_memory().to(codes.device, non_blocking=True)
        else:
            mask = mask.to(codes.device)
        self.last_mask = mask
        self.cells += codes.numel() * self.bits
        self._flipped.append(popcount(mask, self.bits))
        return codes.to(torch.uint8) ^ mask


def bitflip_injectors(model: nn.Module) -> Dict[str, BitFlipInjector]:
    """``{layer name: injector}`` of the bit-flip readers attached to ``model``."""
    return {name: layer.weight_quant.chip.flips for name, layer in nmult_layers(model)
            if isinstance(layer.weight_quant.chip.flips, BitFlipInjector)}


def attach_bitflips(model: nn.Module, flip_model: BitFlipModel) -> nn.Module:
    """Read every N-multiplier layer's weights with random bit flips at its rate from now on
    (replacing injectors attached before). Fault and variability maps attached to the model
    stay in force. Returns ``model``.

    >>> from qfv_brevitas import NMultConfig, quantize_model
    >>> m = quantize_model(nn.Sequential(nn.Linear(8, 4)), NMultConfig(act_bits=None,
    ...                                                                first_last_bits=None))
    >>> sorted(bitflip_injectors(attach_bitflips(m, BitFlipModel(rate=0.05, seed=1))))
    ['0']
    """
    if not isinstance(flip_model, BitFlipModel):
        raise TypeError(f"attach_bitflips takes a BitFlipModel, got {type(flip_model).__name__}")
    layers = quantized_layers(model, "attach_bitflips", flip_model.layer_rates,
                              "BitFlipModel.layer_rates")
    detach_bitflips(model)
    for name, layer in layers.items():
        layer.weight_quant.chip.set_flips(BitFlipInjector(name, flip_model.layer_rate(name),
                                                          quant_of(layer).bits, flip_model.seed))
    return model


def detach_bitflips(model: nn.Module) -> nn.Module:
    """Remove every bit-flip injector from ``model`` (maps are kept). Returns ``model``."""
    for _, layer in nmult_layers(model):
        layer.weight_quant.chip.set_flips(None)
    return model
