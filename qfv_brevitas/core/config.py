"""Validated configuration dataclasses of quantization (:class:`~qfv_brevitas.util.configbase.QfvConfig`:
checked in ``validate()``, stored with ``to_dict()`` / read with ``from_dict()``)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

from qfv_brevitas.core.widths import check_bits, check_frac_bits
from qfv_brevitas.util.configbase import QfvConfig
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.validate import as_number, check_choice, check_int

__all__ = ["VARIANTS", "FORWARD_MODES", "INITS", "NMultConfig", "LambdaSchedule"]

#: Quantizer variants of the paper's family (eq. 2-4).
VARIANTS = ("nmult", "step", "fixed")
#: Forward modes: ``paper`` (full-precision weights while training, snapped in eval), ``ste``
#: (snapped in the forward pass with a straight-through gradient, no regularizer) and ``both``
#: (STE forward plus the regularizer).
FORWARD_MODES = ("paper", "ste", "both")
#: Initial levels of the weight quantizers: ``lsq`` (symmetric uniform grid, LSQ's step),
#: ``uniform`` (the best-MSE uniform grid), ``fit`` (levels fitted to the weights: the
#: N-multiplier fit for ``nmult``, the best uniform grid for ``step``/``fixed``).
INITS = ("lsq", "uniform", "fit")


@dataclass
class NMultConfig(QfvConfig):
    """How to quantize weights (and, for :func:`qfv_brevitas.quantize_model`, activations).

    Args:
        weight_bits: N, bits per weight of the inner layers (1..8).
        act_bits: bits of the inner layers' input activations (1..8), or ``None`` for float.
        variant: ``"nmult"`` (learnable bit multipliers ``r`` and offset ``c``), ``"step"``
            (uniform levels, learned step and offset, LSQ init) or ``"fixed"`` (uniform, frozen).
        mode: ``"paper"``, ``"ste"`` or ``"both"`` (see :data:`FORWARD_MODES`).
        init: initial levels of the weight quantizers (see :data:`INITS`): ``"lsq"``,
            ``"uniform"`` (best-MSE uniform grid) or ``"fit"`` (levels fitted to the weights);
            ``None`` (default): ``"fit"`` for ``nmult`` (measured best, ``BENCHMARKS.md``),
            ``"lsq"`` for the ``step`` and ``fixed`` baselines (as in the paper).
        per_channel: one ``r``/``c`` per output channel instead of per tensor.
        first_last_bits: weight and input-activation bits of the first and last compute layers
            (paper section 4 keeps them at 8) and of every embedding table (a language model's
            token embedding and LM head), or ``None`` to treat them like the others.
        layer_bits: per-layer weight bit overrides by qualified module name.
        act_collect_stats_steps: training steps over which Brevitas' learned activation scales
            are initialised from statistics before they become plain parameters.
        frac_bits: the integer view of the levels (:mod:`qfv_brevitas.core.intview`):
            ``None`` (off; layers whose integer bias or quant-tensor output needs it switch it
            on themselves), ``"auto"`` or an integer ``f`` in 0..20 (multipliers and offset on
            the grid ``m * 2**-f``, every level an integer times ``2**-f``).

    >>> NMultConfig(weight_bits=4, act_bits=4).weight_bits
    4
    """

    weight_bits: int = 4
    act_bits: Optional[int] = 4
    variant: str = "nmult"
    mode: str = "paper"
    init: Optional[str] = None
    per_channel: bool = False
    first_last_bits: Optional[int] = 8
    layer_bits: Dict[str, int] = field(default_factory=dict)
    act_collect_stats_steps: int = 30
    frac_bits: Union[None, int, str] = None

    def validate(self) -> None:
        self.weight_bits = check_bits(self.weight_bits, "NMultConfig.weight_bits")
        if self.act_bits is not None:
            self.act_bits = check_bits(self.act_bits, "NMultConfig.act_bits")
        if self.first_last_bits is not None:
            self.first_last_bits = check_bits(self.first_last_bits, "NMultConfig.first_last_bits")
        check_choice(self.variant, VARIANTS, "quantizer variant")
        check_choice(self.mode, FORWARD_MODES, "forward mode")
        if self.init is None:
            self.init = "fit" if self.variant == "nmult" else "lsq"
        check_choice(self.init, INITS, "level init")
        self.layer_bits = {k: check_bits(v, f"NMultConfig.layer_bits[{k!r}]")
                           for k, v in dict(self.layer_bits).items()}
        self.act_collect_stats_steps = check_int(self.act_collect_stats_steps,
                                                 "NMultConfig.act_collect_stats_steps", 1)
        self.frac_bits = check_frac_bits(self.frac_bits, "NMultConfig.frac_bits")


@dataclass
class LambdaSchedule(QfvConfig):
    """Regularization strength per epoch: ``start`` held, then an exponential rise to ``end``
    over the final ``rise_epochs`` epochs (paper section 4: 100 -> 2000 over the last 20).

    >>> s = LambdaSchedule(total_epochs=30)
    >>> s(0), s(9), round(s(29))
    (100.0, 100.0, 2000)
    """

    total_epochs: int
    start: float = 100.0
    end: float = 2000.0
    rise_epochs: int = 20

    def validate(self) -> None:
        self.total_epochs = check_int(self.total_epochs, "LambdaSchedule.total_epochs", 1)
        start, end = as_number(self.start), as_number(self.end)
        if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < 0:
            raise QfvError(f"LambdaSchedule.start and .end must be finite and >= 0, got "
                           f"{self.start} and {self.end}")
        self.start, self.end = start, end
        rise = self.rise_epochs
        if isinstance(rise, bool) or not isinstance(rise, numbers.Integral) \
                or not 0 <= rise <= self.total_epochs:
            raise QfvError(
                f"LambdaSchedule.rise_epochs ({self.rise_epochs}) must lie in 0..total_epochs "
                f"({self.total_epochs})")
        self.rise_epochs = int(rise)
        if self.rise_epochs and self.start == 0 < self.end:
            raise QfvError("an exponential rise needs start > 0")

    def __call__(self, epoch: int) -> float:
        if not 0 <= epoch < self.total_epochs:
            raise QfvError(f"epoch {epoch} outside 0..{self.total_epochs - 1}")
        first_rise = self.total_epochs - self.rise_epochs
        if epoch < first_rise or self.start == self.end:
            return float(self.start)
        if epoch == self.total_epochs - 1:
            return float(self.end)
        # Epoch first_rise gets the first step up, the last epoch reaches ``end`` exactly.
        frac = (epoch - first_rise + 1) / self.rise_epochs
        return float(self.start * (self.end / self.start) ** frac)
