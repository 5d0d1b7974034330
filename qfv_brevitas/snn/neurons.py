"""LIF neurons (spikingjelly, multi-step) and spike encoding of static inputs."""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
from torch import Tensor, nn

from qfv_brevitas.snn.config import SpikingConfig
from qfv_brevitas.util.errors import QfvError

__all__ = ["spikingjelly", "LIF", "rate_encode", "SNNDependencyError"]


class SNNDependencyError(ImportError):
    """spikingjelly (the ``snn`` extra) is not installed.

    Not a :class:`~qfv_brevitas.util.errors.QfvError`: nothing the caller passed is wrong, the
    environment lacks an optional package, so it is an ``ImportError`` as Python code expects
    (``except ImportError`` around optional features); its message is the install hint."""


_SJ = None


def spikingjelly():
    """spikingjelly's ``activation_based`` package, or a clear error saying how to install it."""
    global _SJ
    if _SJ is not None:
        return _SJ
    if importlib.util.find_spec("triton") is None:
        # spikingjelly probes for Triton kernels at import and at its first neuron step, and
        # torch logs "Triton not available" each time on machines without Triton (every CPU
        # machine): nothing a user can act on, so that one logger is quietened.
        logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
    try:
        from spikingjelly import activation_based
        from spikingjelly.activation_based import functional, neuron, surrogate  # noqa: F401
    except ImportError as e:
        raise SNNDependencyError(
            "spiking models need spikingjelly (the snn extra): pip install 'qfv-brevitas[snn]'; "
            "on a CPU-only torch install it without its dependencies, which pull a CUDA torch: "
            "pip install --no-deps 'spikingjelly>=2.0.0' 'loguru>=0.7,<1'"
            f" ({type(e).__name__}: {e})") from e
    _SJ = activation_based
    return _SJ


class LIF(nn.Module):
    """A layer of spikingjelly LIF neurons in multi-step mode, placed where a ReLU was.

    Inside a :class:`~qfv_brevitas.snn.SpikingNet` every stateless layer (Conv, BatchNorm,
    pooling, Linear) sees the time steps folded into the batch, ``(T * N, ...)``, as
    spikingjelly's ``SeqToANNContainer`` does; this layer unfolds its input to
    ``(T, N, ...)``, runs the neurons over the T steps and folds the spikes back. The network
    sets :attr:`T` before each forward pass.

    The membrane state is reset before and after every call: one call holds whole sequences,
    so no state may leak from one batch of samples into the next (the classic silent bug when
    ``functional.reset_net`` is forgotten), and a ReLU module that a model calls twice per
    forward (e.g. ``self.relu`` in a ResNet block) stays correct as one LIF layer.

    >>> lif = LIF(SpikingConfig(T=2))
    >>> lif.T = 2
    >>> lif(torch.full((2 * 3, 5), 3.0)).shape   # T * N = 6 rows of 5 neurons
    torch.Size([6, 5])
    """

    def __init__(self, config: Optional[SpikingConfig] = None):
        super().__init__()
        cfg = config or SpikingConfig()
        sj = spikingjelly()
        sur = sj.surrogate.ATan if cfg.surrogate == "atan" else sj.surrogate.Sigmoid
        self.node = sj.neuron.LIFNode(
            tau=cfg.tau, decay_input=True, v_threshold=cfg.v_threshold, v_reset=cfg.v_reset,
            surrogate_function=sur(alpha=cfg.alpha), detach_reset=cfg.detach_reset,
            step_mode="m")
        self.surrogate = cfg.surrogate
        self.T: Optional[int] = None

    def forward(self, x: Tensor) -> Tensor:
        T = self.T
        if T is None:
            raise RuntimeError("an LIF layer runs inside a SpikingNet, which tells it the number "
                               "of time steps; build the model with to_spiking(model, config)")
        if x.shape[0] % T:
            raise RuntimeError(f"LIF layer got {x.shape[0]} rows, not a multiple of T={T}: a "
                               "layer before it mixed time steps and samples (e.g. a reshape "
                               "over the batch axis)")
        self.node.reset()
        try:
            out = self.node(x.reshape(T, x.shape[0] // T, *x.shape[1:]))
        finally:
            # Dropping the state also drops its autograd graph, so a trained model can be
            # deep-copied (Monte Carlo over fault maps copies the model per trial).
            self.node.reset()
        return out.flatten(0, 1)

    def neuron_params(self) -> dict:
        """The neuron parameters as plain Python values (for export metadata)."""
        n = self.node
        return {"neuron": "LIF", "tau": float(n.tau), "beta": 1.0 / float(n.tau),
                "decay_input": bool(n.decay_input), "v_threshold": float(n.v_threshold),
                "v_reset": None if n.v_reset is None else float(n.v_reset),
                "surrogate": self.surrogate, "surrogate_alpha": float(n.surrogate_function.alpha),
                "detach_reset": bool(n.detach_reset), "step_mode": n.step_mode}

    def extra_repr(self) -> str:
        return f"T={self.T}"


def rate_encode(x: Tensor, T: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Rate coding: ``T`` Bernoulli spike frames per input, ``P(spike) = intensity``.

    ``x`` holds intensities in [0, 1], shape ``(N, ...)``; returns float spikes of shape
    ``(T, N, ...)`` (time first). Each pixel fires on average ``T * x`` times.

    >>> s = rate_encode(torch.tensor([[0.0, 1.0]]), T=3)
    >>> s.shape, s[:, 0].tolist()
    (torch.Size([3, 1, 2]), [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    """
    if isinstance(T, bool) or int(T) != T or T < 1:
        raise QfvError(f"rate coding needs T >= 1 time steps, got {T!r}")
    if x.numel() and (not torch.isfinite(x).all() or float(x.min()) < 0 or float(x.max()) > 1):
        lo, hi = float(x.min()), float(x.max())
        raise QfvError(f"rate coding needs intensities in [0, 1], got values in [{lo:g}, "
                       f"{hi:g}]; scale the inputs to [0, 1] or use encoding='direct'")
    u = torch.rand((int(T),) + tuple(x.shape), generator=generator, device=x.device,
                   dtype=x.dtype if x.is_floating_point() else torch.float32)
    return (u < x).to(u.dtype)
