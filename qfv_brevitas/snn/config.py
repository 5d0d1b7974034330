"""How a spiking model runs: neurons, time steps, input encoding and layout."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from qfv_brevitas.util.budgets import MAX_TIME_STEPS
from qfv_brevitas.util.configbase import QfvConfig
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.validate import check_choice, check_seed

__all__ = ["SpikingConfig", "SURROGATES", "ENCODINGS", "LAYOUTS"]

#: Surrogate gradients of the spike function (spikingjelly's ``surrogate.ATan`` and
#: ``surrogate.Sigmoid``); the paper uses arctan.
SURROGATES = ("atan", "sigmoid")
#: What a spiking model does with a static input ``(N, *sample)``: ``rate`` turns intensities in
#: [0, 1] into Bernoulli spike trains, ``direct`` feeds the same analog input at every step (the
#: first layer then acts as the encoder), ``none`` accepts only inputs that already have time.
ENCODINGS = ("rate", "direct", "none")
#: How an input with a time axis is laid out: ``time_first`` is spikingjelly's multi-step
#: ``(T, N, C, H, W)``; ``batch_first`` is ``(N, T, C, H, W)``, what a DataLoader over samples
#: of shape ``(T, C, H, W)`` (spikingjelly's frame datasets) yields.
LAYOUTS = ("time_first", "batch_first")


@dataclass
class SpikingConfig(QfvConfig):
    """Neuron model and time handling of a spiking network (paper section 3.5 / 4.2).

    LIF dynamics (spikingjelly's ``LIFNode`` with ``decay_input=True``):
    ``H[t] = V[t-1] + beta * (X[t] - (V[t-1] - V_reset))`` with ``beta = 1 / tau``; a spike
    when ``H[t] >= v_threshold``, then ``V[t] = V_reset`` (hard reset) or ``H[t] - v_threshold``
    with ``v_reset=None`` (soft reset).

    Args:
        T: time steps per sample (>= 1).
        tau: membrane time constant (> 1); the paper's decay ``beta = 0.25`` is ``tau = 4``.
        v_threshold: firing threshold. 0.5 by default: with ``beta = 0.25`` an input reaches
            only a quarter of its value in the membrane per step, and at spikingjelly's 1.0 the
            neurons start nearly silent (measured on the digits at T=4: 91.7% after 10 epochs
            against 95.3% at 0.5, same seed and learning rate).
        v_reset: reset potential (the paper's 0), or ``None`` for reset by subtraction.
        surrogate: surrogate gradient, one of :data:`SURROGATES` (paper: ``"atan"``).
        surrogate_alpha: its sharpness (spikingjelly's default is 2 for arctan, 4 for sigmoid).
        detach_reset: detach the reset from the graph in backward.
        encoding: what to do with a static input, one of :data:`ENCODINGS`.
        layout: how an input that has a time axis is read, one of :data:`LAYOUTS`.
        sample_ndim: dimensions of one sample without time (3 for ``C, H, W`` images, 1 for
            feature vectors); it tells a static input from one with a time axis.
        eval_seed: in eval mode rate coding draws its spikes from a generator seeded with this at
            every call, so evaluating the same batch twice gives the same accuracy (Monte Carlo
            over fault maps then varies only with the maps). Training draws from torch's
            global generator.

    >>> cfg = SpikingConfig(T=4)
    >>> cfg.beta, cfg.encoding, cfg.layout
    (0.25, 'rate', 'time_first')
    """

    T: int = 4
    tau: float = 4.0
    v_threshold: float = 0.5
    v_reset: Optional[float] = 0.0
    surrogate: str = "atan"
    surrogate_alpha: Optional[float] = None
    detach_reset: bool = False
    encoding: str = "rate"
    layout: str = "time_first"
    sample_ndim: int = 3
    eval_seed: int = 0

    def validate(self) -> None:
        try:
            t = float(self.T) if not isinstance(self.T, bool) else math.nan
        except (TypeError, ValueError):
            t = math.nan
        if not t.is_integer() or t < 1:
            raise QfvError(f"SpikingConfig.T must be a whole number of time steps >= 1, got "
                           f"{self.T!r}; a spiking model needs at least one step (e.g. T=4)")
        if t > MAX_TIME_STEPS:  # what a checkpoint may hold (zoo.checkpoint reads no more)
            raise QfvError(f"SpikingConfig.T must be at most {MAX_TIME_STEPS} time steps, got "
                           f"{self.T!r}")
        self.T = int(self.T)
        self.tau = float(self.tau)
        if not math.isfinite(self.tau) or self.tau <= 1.0:
            raise QfvError(f"SpikingConfig.tau must be > 1 (decay beta = 1/tau < 1), got "
                           f"{self.tau}; the paper's beta = 0.25 is tau = 4")
        self.v_threshold = float(self.v_threshold)
        if self.v_reset is not None:
            self.v_reset = float(self.v_reset)
            if not self.v_reset < self.v_threshold:
                raise QfvError(f"SpikingConfig.v_reset ({self.v_reset}) must lie below "
                               f"v_threshold ({self.v_threshold})")
        if not math.isfinite(self.v_threshold):
            raise QfvError("SpikingConfig.v_threshold must be finite")
        check_choice(self.surrogate, SURROGATES, "surrogate")
        if self.surrogate_alpha is not None:
            self.surrogate_alpha = float(self.surrogate_alpha)
            if not (math.isfinite(self.surrogate_alpha) and self.surrogate_alpha > 0):
                raise QfvError(f"SpikingConfig.surrogate_alpha must be > 0, got "
                               f"{self.surrogate_alpha}")
        check_choice(self.encoding, ENCODINGS, "encoding")
        if self.layout not in LAYOUTS:
            raise QfvError(f"unknown layout {self.layout!r}; choose 'time_first' for "
                           "(T, N, C, H, W) or 'batch_first' for (N, T, C, H, W)")
        if isinstance(self.sample_ndim, bool) or int(self.sample_ndim) < 1:
            raise QfvError(f"SpikingConfig.sample_ndim must be >= 1 (3 for C, H, W images), "
                           f"got {self.sample_ndim!r}")
        self.sample_ndim = int(self.sample_ndim)
        self.eval_seed = check_seed(self.eval_seed, "SpikingConfig.eval_seed")

    @property
    def beta(self) -> float:
        """Membrane decay of the paper's eq. 8, ``1 / tau``."""
        return 1.0 / self.tau

    @property
    def alpha(self) -> float:
        """The surrogate's sharpness (spikingjelly's default when not given)."""
        if self.surrogate_alpha is not None:
            return self.surrogate_alpha
        return 2.0 if self.surrogate == "atan" else 4.0
