"""Spiking versions of ordinary networks: :class:`SpikingNet` and :func:`to_spiking`."""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from qfv_brevitas.core.config import NMultConfig
from qfv_brevitas.core.convert import ConversionError, quantize_model, set_submodule
from qfv_brevitas.snn.config import SpikingConfig
from qfv_brevitas.snn.neurons import LIF, rate_encode, spikingjelly
from qfv_brevitas.util.errors import QfvError, QfvTypeError

__all__ = ["SpikingNet", "to_spiking", "snn_export_metadata", "lif_layers", "spiking_net"]

_MAXPOOL = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}
_ADAPTIVE = {nn.AdaptiveMaxPool1d: nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d: nn.AdaptiveAvgPool2d,
             nn.AdaptiveMaxPool3d: nn.AdaptiveAvgPool3d}
# Activations with no spiking counterpart here: converting around them silently would leave
# an analog non-linearity in a "spiking" network.
_OTHER_ACTIVATIONS = (nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                      nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanh,
                      nn.Sigmoid, nn.Softplus, nn.RReLU)


def _sample_desc(ndim: int) -> str:
    return "C, H, W" if ndim == 3 else ", ".join(f"d{i}" for i in range(1, ndim + 1))


class SpikingNet(nn.Module):
    """A network whose ReLUs are LIF neurons, run over ``T`` time steps (spikingjelly
    multi-step mode), taking and returning what its non-spiking original did.

    Input, with ``sample`` the shape of one sample (``C, H, W`` for images):

    * a static batch ``(N, *sample)``: encoded into ``T`` steps by ``config.encoding``
      (``rate``: Bernoulli spikes from intensities in [0, 1]; ``direct``: the same analog input
      at every step); refused with ``encoding="none"``;
    * a sequence with a time axis: ``(T, N, *sample)`` for ``layout="time_first"``
      (spikingjelly's convention) or ``(N, T, *sample)`` for ``layout="batch_first"`` (what a
      DataLoader over frame datasets yields); ``T`` must equal ``config.T``.

    Output: the last layer's output averaged over the T steps, ``(N, classes)``, so that the
    library's training, evaluation, fault and variability functions use a spiking model
    exactly as they use its non-spiking original. The neurons' state is reset at every call
    (``functional.reset_net``): samples never see each other's membrane potentials.

    >>> torch.manual_seed(0) is not None
    True
    >>> net = to_spiking(nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
    ...                  SpikingConfig(T=5, sample_ndim=1))
    >>> net(torch.rand(2, 4)).shape   # static input, rate-coded over 5 steps
    torch.Size([2, 3])
    >>> net(torch.rand(5, 2, 4)).shape   # already a (T, N, features) sequence
    torch.Size([2, 3])
    """

    def __init__(self, body: nn.Module, config: Optional[SpikingConfig] = None):
        super().__init__()
        self.body = body
        self.config = config or SpikingConfig()

    @property
    def T(self) -> int:
        """Time steps per sample (settable: ``net.T = 10``)."""
        return self.config.T

    @T.setter
    def T(self, value: int) -> None:
        self.config = dataclasses.replace(self.config, T=value)

    def lifs(self) -> List[Tuple[str, LIF]]:
        """``(name, layer)`` of every LIF layer, in registration order."""
        return lif_layers(self)

    def to_sequence(self, x: Tensor) -> Tensor:
        """The time-first sequence ``(T, N, *sample)`` the network runs on for input ``x``."""
        cfg = self.config
        if not isinstance(x, Tensor):
            raise QfvTypeError(f"a spiking model takes a tensor, got {type(x).__name__}")
        nd, sample = cfg.sample_ndim, _sample_desc(cfg.sample_ndim)
        seq_desc = f"(T, N, {sample})" if cfg.layout == "time_first" else f"(N, T, {sample})"
        if x.dim() == nd + 1:
            if cfg.encoding == "none":
                raise QfvError(
                    f"this spiking model takes sequences {seq_desc} (layout={cfg.layout!r}, "
                    f"T={cfg.T}) but got a static batch of shape {tuple(x.shape)}, read as "
                    f"(N, {sample}); encode it first (rate_encode(x, T)) or build the model "
                    "with SpikingConfig(encoding='rate' or 'direct') to encode it inside")
            if cfg.encoding == "rate":
                gen = None
                if not self.training:
                    gen = torch.Generator(device=x.device).manual_seed(cfg.eval_seed)
                return rate_encode(x, cfg.T, generator=gen)
            return x.unsqueeze(0).expand(cfg.T, *x.shape)
        if x.dim() == nd + 2:
            seq = x if cfg.layout == "time_first" else x.transpose(0, 1)
            t = seq.shape[0]
            if t == 0:
                raise QfvError(f"input of shape {tuple(x.shape)}, read as {seq_desc}, has "
                               "T = 0 time steps; a spiking model needs at least one")
            if t != cfg.T:
                other = x.shape[1] if cfg.layout == "time_first" else x.shape[0]
                if other == cfg.T:
                    swap = "batch_first" if cfg.layout == "time_first" else "time_first"
                    hint = (f"; its other leading axis has {cfg.T} entries, so it looks like the "
                            f"other layout: transpose it (x.transpose(0, 1)) or build the model "
                            f"with SpikingConfig(layout={swap!r})")
                else:
                    hint = f"; to run the model at {t} steps set model.T = {t}"
                raise QfvError(f"input of shape {tuple(x.shape)}, read as {seq_desc}, has "
                               f"T={t} time steps but the model runs T={cfg.T}{hint}")
            return seq
        static = "" if cfg.encoding == "none" else f"a static batch (N, {sample}) or "
        raise QfvError(f"this spiking model takes {static}a sequence {seq_desc}, got a "
                       f"{x.dim()}-D input of shape {tuple(x.shape)}; set "
                       "SpikingConfig(sample_ndim=...) if one sample is not C, H, W")

    def forward(self, x: Tensor) -> Tensor:
        seq = self.to_sequence(x)
        T, N = seq.shape[0], seq.shape[1]
        for _, lif in self.lifs():
            lif.T = T
        # Every stateful spikingjelly module starts from its reset value: nothing carries over
        # from the previous batch (the LIF layers also reset themselves at each call).
        spikingjelly().functional.reset_net(self)
        out = self.body(seq.flatten(0, 1))
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != T * N:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise RuntimeError(f"the network body returned {shape}, expected T * N = {T * N} "
                               "rows (one output per time step and sample)")
        return out.reshape(T, N, *out.shape[1:]).mean(0)

    def extra_repr(self) -> str:
        c = self.config
        return (f"T={c.T}, tau={c.tau}, v_threshold={c.v_threshold}, v_reset={c.v_reset}, "
                f"encoding={c.encoding!r}, layout={c.layout!r}")


def spiking_net(model: nn.Module) -> Optional[SpikingNet]:
    """The :class:`SpikingNet` of ``model`` (itself or its first submodule that is one), or
    ``None`` for a model that is not spiking."""
    return next((m for m in model.modules() if isinstance(m, SpikingNet)), None)


def lif_layers(model: nn.Module) -> List[Tuple[str, LIF]]:
    """``(name, layer)`` for every :class:`LIF` layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LIF)]


def _avg_pool_for(name: str, m: nn.Module) -> nn.Module:
    if type(m) in _ADAPTIVE:
        return _ADAPTIVE[type(m)](m.output_size)
    dilation = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,)
    if any(d != 1 for d in dilation):
        raise ConversionError(f"max-pooling layer {name!r} has dilation {m.dilation}; average "
                              "pooling has none: use dilation=1")
    if m.return_indices:
        raise ConversionError(f"max-pooling layer {name!r} returns indices, which average "
                              "pooling has not")
    # Padding counts only real inputs, as the max it replaces ignored its -inf padding.
    return _MAXPOOL[type(m)](m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode,
                             count_include_pad=False)


def to_spiking(model: nn.Module, config: Optional[SpikingConfig] = None,
               nmult: Optional[NMultConfig] = None, inplace: bool = False,
               keep: Iterable[str] = ()) -> SpikingNet:
    """The spiking version of a plain torch network: every ``nn.ReLU`` becomes a layer of LIF
    neurons, every max-pooling an average pooling (paper section 4.2), and the whole runs over
    ``config.T`` steps as a :class:`SpikingNet`.

    With ``nmult``, the synaptic (Conv/Linear) layers also get N-multiplier weights through
    :func:`qfv_brevitas.quantize_model` -- the same call as for a non-spiking network, so
    ``to_spiking(m, cfg, nmult)`` equals ``quantize_model(to_spiking(m, cfg), nmult)``. Spikes
    are the activations, so ``nmult.act_bits`` must be ``None``.

    Args:
        model: a plain torch network whose activations are ``nn.ReLU`` modules (a
            ``torch.relu`` call inside ``forward`` cannot be replaced).
        config: neurons, time steps, encoding and input layout.
        nmult: optional weight quantization.
        inplace: convert ``model`` itself instead of a deep copy.
        keep: qualified names of activation modules to leave as they are.

    >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    ...                   nn.Linear(4, 2))
    >>> s = to_spiking(m, SpikingConfig(T=2), NMultConfig(weight_bits=4, act_bits=None))
    >>> [type(l).__name__ for l in s.body]
    ['QuantConv2d', 'LIF', 'AvgPool2d', 'Flatten', 'QuantLinear']
    >>> s(torch.rand(3, 1, 4, 4)).shape
    torch.Size([3, 2])
    """
    cfg = config or SpikingConfig()
    if not isinstance(model, nn.Module):
        raise QfvTypeError(f"to_spiking takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, SpikingNet) or lif_layers(model):
        raise ConversionError("the model is already spiking; to quantize it, call "
                              "quantize_model(model, NMultConfig(act_bits=None))")
    if nmult is not None and nmult.act_bits is not None:
        raise ConversionError(
            f"spikes are the activations of a spiking network, so only weights are quantized: "
            f"use NMultConfig(act_bits=None) (got act_bits={nmult.act_bits})")
    keep = set(keep)
    names = {n for n, _ in model.named_modules()}
    unknown = keep - names
    if unknown:
        raise ConversionError(f"keep names not in the model: {sorted(unknown)}")
    spikingjelly()  # a clear install hint before any work
    if not inplace:
        model = copy.deepcopy(model)
    plan = []
    for name, m in model.named_modules():
        if name in keep or not name:
            continue
        if type(m) is nn.ReLU:
            plan.append((name, LIF(cfg)))
        elif type(m) in _MAXPOOL or type(m) in _ADAPTIVE:
            plan.append((name, _avg_pool_for(name, m)))
        elif isinstance(m, _OTHER_ACTIVATIONS):
            raise ConversionError(
                f"activation {name!r} ({type(m).__name__}) has no spiking counterpart: replace "
                "it by nn.ReLU (it becomes an LIF layer), or pass its name in keep=() to leave "
                "it analog")
    if not any(isinstance(new, LIF) for _, new in plan):
        raise ConversionError(
            "the model has no nn.ReLU module to turn into LIF neurons; if its forward calls "
            "torch.relu / F.relu, use nn.ReLU modules instead")
    for name, new in plan:
        new.train(model.training)
        set_submodule(model, name, new)
    net = SpikingNet(model, cfg)
    net.train(model.training)
    if nmult is not None:
        net = quantize_model(net, nmult, inplace=True)
    return net


def snn_export_metadata(model: nn.Module) -> dict:
    """What an exporter needs besides the synaptic layers: time handling and the parameters of
    each LIF layer, as JSON-serialisable data.

    >>> net = to_spiking(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
    ...                  SpikingConfig(T=4, sample_ndim=1))
    >>> meta = snn_export_metadata(net)
    >>> meta["T"], meta["step_mode"], meta["lif_layers"]["body.1"]["beta"]
    (4, 'multi-step', 0.25)
    """
    net = spiking_net(model)
    if net is None:
        raise QfvError("not a spiking model: build one with to_spiking(model, config)")
    cfg = net.config
    return {
        "format": "qfv-snn/1",
        "T": cfg.T,
        "step_mode": "multi-step",
        "input_layout": "(T, N, ...)" if cfg.layout == "time_first" else "(N, T, ...)",
        "encoding": cfg.encoding,
        "encoding_note": {"rate": "Bernoulli spikes, P = intensity in [0, 1], per step",
                          "direct": "the analog input repeated at every step",
                          "none": "inputs carry their own time axis"}[cfg.encoding],
        "time_folding": "stateless layers run on (T * N, ...); LIF layers unfold to (T, N, ...)",
        "output_decoding": "mean over the T steps of the last layer's output",
        "state_reset": "every forward call (each call holds whole sequences)",
        "lif_layers": {name: lif.neuron_params() for name, lif in lif_layers(net)},
    }
