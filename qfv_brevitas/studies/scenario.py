"""What a study puts a model on: one :class:`Scenario` per kind of imperfect chip and level.

A scenario carries every setting of its kind: stuck-at faults (``level`` = stuck-cell
fraction, ``sa1_fraction``), per-cell variability (``level`` = LRS sigma/mu, ``hrs_on_off``,
``distribution``, the between-chip and per-layer shared components ``chip_sigma`` /
``layer_shared_sigma``, and ``devices_per_chip`` maps drawn on each chip) or transient bit flips
(``level`` = bit-error rate). :meth:`Scenario.attach` puts the map (or flip stream) of one seed
on a model; the first and last (8-bit) layers stay ideal with ``layers="inner"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from torch import nn

from qfv_brevitas.chip.bitflips import BitFlipModel, attach_bitflips
from qfv_brevitas.chip.faults import FaultModel, attach_faults, sample_fault_map
from qfv_brevitas.chip.variability import (VariabilityModel, attach_variability,
                                           sample_variability_map)
from qfv_brevitas.core.quantizers import nmult_layers
from qfv_brevitas.util.configbase import QfvConfig
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.validate import check_choice, check_fraction, check_positive_int

__all__ = ["SCENARIO_KINDS", "LAYER_SETS", "Scenario", "scenarios", "check_levels",
           "edge_layers", "exempt_layers"]

#: The kinds of imperfect chip a study knows.
SCENARIO_KINDS = ("faults", "bitflips", "variability")
#: ``inner``: the first and last (8-bit) layers stay ideal (the paper's setup); ``all``: every
#: N-multiplier layer is on the imperfect device.
LAYER_SETS = ("inner", "all")
_VARIABILITY_ONLY = {"hrs_on_off": None, "distribution": "normal", "chip_sigma": 0.0,
                     "layer_shared_sigma": 0.0, "devices_per_chip": 1}


def check_levels(levels: Sequence[float], what: str, upper: Optional[float]) -> List[float]:
    """``levels`` as a non-empty list of finite floats in ``[0, upper]`` (``>= 0`` without
    an upper bound); ``what`` names them in the error (``"fault rates"``).

    >>> check_levels([0, 0.1], "fault rates", 1.0)
    [0.0, 0.1]
    """
    levels = [float(v) for v in levels]
    if not levels:
        raise QfvError(f"give at least one {what}")
    for v in levels:
        if not math.isfinite(v) or v < 0 or (upper is not None and v > upper):
            rng = f"[0, {upper}]" if upper is not None else ">= 0"
            raise QfvError(f"{what} must be in {rng}, got {v}")
    return levels


def edge_layers(model: nn.Module) -> List[str]:
    """First and last N-multiplier layers (registration order): the 8-bit edges of a model
    made by :func:`qfv_brevitas.quantize_model`."""
    names = [n for n, _ in nmult_layers(model)]
    return list(dict.fromkeys([names[0], names[-1]])) if len(names) > 1 else []


def exempt_layers(model: nn.Module, layers: str) -> Dict[str, float]:
    """Per-layer level overrides that keep the edge layers ideal for ``layers="inner"``
    (``{name: 0.0}``), none for ``"all"``."""
    check_choice(layers, LAYER_SETS, "layer set")
    return {n: 0.0 for n in edge_layers(model)} if layers == "inner" else {}


@dataclass
class Scenario(QfvConfig):
    """One kind of imperfect chip: ``kind`` in :data:`SCENARIO_KINDS` at ``level`` (stuck-cell
    fraction, bit-error rate, or LRS sigma/mu), with the settings of its kind (the others keep
    their defaults): ``sa1_fraction`` for faults; ``hrs_on_off``, ``distribution``,
    ``chip_sigma``, ``layer_shared_sigma``, ``devices_per_chip`` for variability (as in
    :class:`qfv_brevitas.VariabilityModel`; consecutive groups of ``devices_per_chip`` trials
    share one chip).

    >>> Scenario("variability", 0.2, chip_sigma=0.1).label
    'LRS 20% + chip 10%'
    >>> Scenario.from_dict(Scenario("faults", 0.1, sa1_fraction=0.3).to_dict()).sa1_fraction
    0.3
    >>> Scenario("bitflip", 0.01)
    Traceback (most recent call last):
    ...
    qfv_brevitas.util.errors.QfvError: unknown scenario kind 'bitflip'; choose one of faults, bitflips, variability
    """

    kind: str
    level: float
    sa1_fraction: float = 0.5
    hrs_on_off: Optional[float] = None
    distribution: str = "normal"
    chip_sigma: float = 0.0
    layer_shared_sigma: float = 0.0
    devices_per_chip: int = 1

    def validate(self) -> None:
        check_choice(self.kind, SCENARIO_KINDS, "scenario kind")
        if self.kind == "variability":
            self.level = check_levels([self.level], "sigma/mu", None)[0]
        else:
            self.level = check_fraction(self.level, f"{self.kind} scenario level",
                                        " (a fraction of bit cells)")
        for name in ("chip_sigma", "layer_shared_sigma"):
            setattr(self, name, check_levels([getattr(self, name)], f"Scenario.{name}",
                                             None)[0])
        try:
            self.devices_per_chip = check_positive_int(self.devices_per_chip,
                                                       "devices_per_chip")
        except QfvError:
            raise QfvError(f"devices_per_chip must be an integer >= 1, got "
                           f"{self.devices_per_chip!r}") from None
        for name, default in _VARIABILITY_ONLY.items():
            if self.kind != "variability" and getattr(self, name) != default:
                raise QfvError(f"Scenario.{name} applies to variability scenarios only, "
                               f"not to {self.kind!r}")
        if self.kind != "faults" and self.sa1_fraction != 0.5:
            raise QfvError(f"Scenario.sa1_fraction applies to faults scenarios only, "
                           f"not to {self.kind!r}")
        self.device_model(seed=0)  # the chip's own checks (sa1_fraction, hrs_on_off, ...)

    @property
    def is_ideal(self) -> bool:
        """No device effect at all: level 0 and, for variability, no HRS leak and no shared
        component. Then there is no map to draw and every method deploys its model on the
        ideal device. Sigma 0 with ``hrs_on_off`` is not ideal: every "0" cell still leaks
        ``r_i / hrs_on_off`` (the sigma -> 0 limit of the sweep, not its ideal row)."""
        if self.kind == "variability" and (self.hrs_on_off is not None or self.chip_sigma
                                           or self.layer_shared_sigma):
            return False
        return self.level == 0

    @property
    def label(self) -> str:
        pct = f"{100 * self.level:g}%"
        if self.kind == "faults":
            return f"stuck-at {pct}"
        if self.kind == "bitflips":
            return f"BER {pct}"
        out = f"LRS {pct}"
        if self.distribution != "normal":
            out += f" {self.distribution}"
        if self.hrs_on_off is not None:
            out += f" HRS 1/{self.hrs_on_off:g}"
        if self.chip_sigma:
            out += f" + chip {100 * self.chip_sigma:g}%"
        if self.layer_shared_sigma:
            out += f" + layer {100 * self.layer_shared_sigma:g}%"
        return out

    def device_model(self, seed: int, chip_seed: Optional[int] = None,
                     exempt: Optional[Dict[str, float]] = None):
        """The chip's model of this scenario for map seed ``seed``: a :class:`FaultModel`,
        :class:`VariabilityModel` (its shared components drawn from ``chip_seed``) or
        :class:`BitFlipModel`; ``exempt`` layers are kept ideal."""
        exempt = dict(exempt or {})
        if self.kind == "faults":
            return FaultModel(rate=self.level, sa1_fraction=self.sa1_fraction, seed=seed,
                              layer_rates=exempt)
        if self.kind == "bitflips":
            return BitFlipModel(rate=self.level, seed=seed, layer_rates=exempt)
        return VariabilityModel(sigma=self.level, hrs_on_off=self.hrs_on_off,
                                distribution=self.distribution, seed=seed,
                                layer_sigmas=exempt, chip_sigma=self.chip_sigma,
                                layer_shared_sigma=self.layer_shared_sigma, chip_seed=chip_seed)

    def attach(self, model: nn.Module, seed: int, trial: int = 0, layers: str = "inner"
               ) -> nn.Module:
        """Put trial ``trial`` of this scenario on ``model``: its map (or flip stream) drawn
        from ``seed + trial``; a variability chip's shared components from
        ``seed + trial // devices_per_chip``. Returns ``model``."""
        exempt = exempt_layers(model, layers)
        dm = self.device_model(seed + trial, seed + trial // self.devices_per_chip, exempt)
        if self.kind == "faults":
            return attach_faults(model, sample_fault_map(model, dm))
        if self.kind == "bitflips":
            return attach_bitflips(model, dm)
        return attach_variability(model, sample_variability_map(model, dm))


def scenarios(stuck: Sequence[float] = (), ber: Sequence[float] = (),
              sigmas: Sequence[float] = (), chip_sigma: float = 0.0, **variability
              ) -> List[Scenario]:
    """Scenarios from lists of stuck-at rates, bit-error rates and LRS sigmas; with
    ``chip_sigma > 0`` each sigma appears twice, without and with the between-chip component.
    ``variability``: further :class:`Scenario` settings of the sigma scenarios
    (``hrs_on_off``, ``distribution``, ``layer_shared_sigma``).

    >>> [s.label for s in scenarios(stuck=[0.1], ber=[0.01], sigmas=[0.2], chip_sigma=0.1)]
    ['stuck-at 10%', 'BER 1%', 'LRS 20%', 'LRS 20% + chip 10%']
    >>> [s.label for s in scenarios(sigmas=[0.2], hrs_on_off=10, distribution="lognormal")]
    ['LRS 20% lognormal HRS 1/10']
    """
    out = [Scenario("faults", r) for r in stuck] + [Scenario("bitflips", r) for r in ber]
    for s in sigmas:
        out.append(Scenario("variability", s, **variability))
        if chip_sigma:
            out.append(Scenario("variability", s, chip_sigma=chip_sigma, **variability))
    return out
