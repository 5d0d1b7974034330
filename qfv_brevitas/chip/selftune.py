"""Self-tuning at inference: per-layer activation recalibration of one simulated chip.

The analog-PIM self-tuning idea: variability shared by a whole chip (or layer) shifts and scales
each layer's outputs in a way that training cannot anticipate, but that is visible in the output
statistics. So, on the chip, without labels and without touching a weight: run a small unlabeled
calibration batch, and give each N-multiplier layer a per-channel affine correction
``y -> a * y + b`` that restores the mean and standard deviation its outputs have on the ideal
device (the *reference statistics*, recorded once from the model before it met the chip).

The corrections are fitted in one forward pass, layer by layer in execution order: a layer's
correction is computed from its outputs with the corrections of the layers before it already in
place, so on the calibration batch every corrected layer reproduces the reference mean and std.
They are forward hooks holding two small tensors per layer: :func:`remove_self_tuning` takes
them off and leaves the model exactly as it was.

>>> import torch
>>> from torch import nn
>>> from qfv_brevitas import NMultConfig, quantize_model
>>> m = quantize_model(nn.Sequential(nn.Linear(4, 3)), NMultConfig(act_bits=None,
...                                                                first_last_bits=None))
>>> x = torch.randn(16, 4)
>>> ref = reference_statistics(m, x)
>>> tuning = self_tune(m, x, ref)
>>> sorted(tuning.layers), tuning.remove()
(['0'], None)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from qfv_brevitas.util.validate import check_choice, check_count
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.core.quantizers import nmult_layers

__all__ = ["SELFTUNE_MODES", "ReferenceStats", "SelfTuning", "reference_statistics",
           "layer_statistics", "self_tune", "remove_self_tuning", "calibration_batch"]

#: ``affine``: restore mean and std per channel; ``shift``: the mean only.
SELFTUNE_MODES = ("affine", "shift")


def _channel_dim(layer: nn.Module, out: Tensor) -> int:
    # Linear layers keep features last (also for (B, T, F) inputs); convolutions on axis 1.
    return out.dim() - 1 if isinstance(layer, nn.Linear) else 1


def _stats(out: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std of a layer's output, in float64."""
    y = out.detach().double().movedim(dim, -1).reshape(-1, out.shape[dim])
    return y.mean(0), y.std(0, unbiased=False)


@dataclass
class ReferenceStats:
    """Per-layer, per-channel output ``mean`` and ``std`` (float64) of a model on the ideal
    device, and the input shape (without the batch axis) they were recorded on."""

    mean: Dict[str, Tensor]
    std: Dict[str, Tensor]
    input_shape: Tuple[int, ...]

    @property
    def layers(self) -> List[str]:
        return list(self.mean)


def _check_batch(x, input_shape: Optional[Tuple[int, ...]], what: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise QfvError(f"{what}: the calibration batch must be a floating-point tensor of "
                       f"unlabeled inputs (batch first), got "
                       f"{getattr(x, 'dtype', type(x).__name__)}; pass images only, not "
                       "(images, labels)")
    if x.dim() < 2 or x.shape[0] < 2:
        raise QfvError(f"{what}: the calibration batch needs a batch axis with at least 2 "
                       f"inputs to estimate a standard deviation, got shape {tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise QfvError(f"{what}: the calibration batch has inputs of shape "
                       f"{tuple(x.shape[1:])} but the reference statistics were recorded on "
                       f"inputs of shape {tuple(input_shape)}; pass a batch of the model's "
                       f"own inputs, shape (B, {', '.join(map(str, input_shape))})")
    return x


def _run_hooked(model: nn.Module, x: Tensor, hook_of=None) -> None:
    """One eval-mode forward pass of ``x``, with ``hook_of(name, layer)`` as a temporary
    forward hook on each N-multiplier layer."""
    handles = [] if hook_of is None else [layer.register_forward_hook(hook_of(name, layer))
                                          for name, layer in nmult_layers(model)]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()


def layer_statistics(model: nn.Module, x: Tensor) -> ReferenceStats:
    """Per-channel output mean and std of every N-multiplier layer of ``model`` as it is (maps,
    bit flips and self-tuning included), on the batch ``x``, in eval mode."""
    _check_batch(x, None, "layer_statistics")
    mean: Dict[str, Tensor] = {}
    std: Dict[str, Tensor] = {}

    def hook_of(name, layer):
        def hook(mod, inputs, out):
            if name not in mean:  # a layer used twice: its first call
                mean[name], std[name] = _stats(out, _channel_dim(layer, out))
        return hook

    _run_hooked(model, x, hook_of)
    if not mean:
        raise QfvError("the model has no N-multiplier layer to take statistics of")
    return ReferenceStats(mean, std, tuple(x.shape[1:]))


def reference_statistics(model: nn.Module, x: Tensor) -> ReferenceStats:
    """The reference for :func:`self_tune`: ``model``'s layer statistics on the ideal device,
    i.e. on a copy with its fault and variability maps, bit-flip injectors and self-tuning
    removed (``model`` itself is not changed)."""
    from qfv_brevitas.chip.bitflips import detach_bitflips
    from qfv_brevitas.chip.faults import detach_faults
    from qfv_brevitas.chip.variability import detach_variability

    ideal = copy.deepcopy(model)
    detach_faults(ideal)
    detach_variability(ideal)
    detach_bitflips(ideal)
    remove_self_tuning(ideal)
    return layer_statistics(ideal, x)


class _Correction:
    """Forward hook ``y -> scale * y + shift`` per channel.

    States: ``"fit"`` fits on the next call from that call's outputs (the one-pass
    calibration); ``"pending"`` passes outputs through; ``"collect"`` accumulates per-channel
    sums over calls (several passes) until :meth:`finish` fits; ``"fitted"`` applies."""

    def __init__(self, name: str, mean: Tensor, std: Tensor, dim: int, mode: str, eps: float):
        self.name, self.ref_mean, self.ref_std = name, mean, std
        self.dim, self.mode, self.eps = dim, mode, eps
        self.state = "fit"
        self.scale: Optional[Tensor] = None
        self.shift: Optional[Tensor] = None
        self._sums: Optional[Tuple[float, Tensor, Tensor]] = None

    def _view(self, t: Tensor, out: Tensor) -> Tensor:
        shape = [1] * out.dim()
        shape[self.dim] = -1
        return t.to(dtype=out.dtype, device=out.device).view(shape)

    def _check(self, out: Tensor) -> None:
        if out.shape[self.dim] != self.ref_mean.numel():
            raise QfvError(
                f"self-tuning layer {self.name!r}: {out.shape[self.dim]} output channels "
                f"but the reference statistics have {self.ref_mean.numel()}; record them "
                "from this model")

    def _fit(self, mean: Tensor, std: Tensor) -> None:
        ref_std = self.ref_std.to(mean.device)
        # A channel with (almost) no spread on the chip cannot be rescaled: shift it only.
        ok = (std > self.eps) & (self.mode == "affine")
        self.scale = torch.where(ok, ref_std / std.clamp(min=self.eps), torch.ones_like(std))
        self.shift = self.ref_mean.to(mean.device) - self.scale * mean
        self.state = "fitted"

    def finish(self) -> None:
        """Fit from the outputs collected over several calls (pooled mean and std)."""
        n, s1, s2 = self._sums
        mean = s1 / n
        self._fit(mean, (s2 / n - mean * mean).clamp(min=0).sqrt())
        self._sums = None

    def __call__(self, module, inputs, out):
        if self.state == "pending":
            return out
        if self.state == "collect":
            self._check(out)
            y = out.detach().double().movedim(self.dim, -1).reshape(-1, out.shape[self.dim])
            n, s1, s2 = self._sums or (0, 0.0, 0.0)
            self._sums = (n + y.shape[0], s1 + y.sum(0), s2 + (y * y).sum(0))
            return out
        if self.state == "fit":
            self._check(out)
            self._fit(*_stats(out, self.dim))
        return out * self._view(self.scale, out) + self._view(self.shift, out)


class SelfTuning:
    """The corrections attached by :func:`self_tune`: ``scale[name]``, ``shift[name]``
    (per channel, float64) and :meth:`remove`."""

    def __init__(self, model: nn.Module, hooks: Dict[str, "_Correction"]):
        self.model = model
        self._hooks = hooks

    @property
    def layers(self) -> List[str]:
        return list(self._hooks)

    @property
    def scale(self) -> Dict[str, Tensor]:
        return {n: h.scale for n, h in self._hooks.items()}

    @property
    def shift(self) -> Dict[str, Tensor]:
        return {n: h.shift for n, h in self._hooks.items()}

    def remove(self) -> None:
        """Take the corrections off the model (same as :func:`remove_self_tuning`)."""
        remove_self_tuning(self.model)


def remove_self_tuning(model: nn.Module) -> nn.Module:
    """Remove every self-tuning correction from ``model``; returns ``model``."""
    for _, layer in nmult_layers(model):
        for key in [k for k, h in layer._forward_hooks.items() if isinstance(h, _Correction)]:
            del layer._forward_hooks[key]
    return model


def self_tune(model: nn.Module, calib: Tensor, reference: Optional[ReferenceStats] = None,
              mode: str = "affine", eps: float = 1e-8, passes: int = 1) -> SelfTuning:
    """Recalibrate ``model`` (a simulated chip: maps and/or bit flips attached) on the
    unlabeled batch ``calib``: each N-multiplier layer gets a per-channel affine correction of
    its outputs restoring ``reference`` (default: :func:`reference_statistics` of the model
    itself, i.e. the same weights on the ideal device). No labels, no weight update; a previous
    self-tuning is replaced. ``mode="shift"`` corrects the means only.

    ``passes > 1`` pools each layer's statistics over that many forward passes of ``calib``
    (layer by layer, ``passes`` passes per layer): with transient bit flips attached every pass
    reads other flips, and the correction targets their average effect instead of one draw.

    Raises ValueError for a calibration batch that is not a float tensor of the reference's
    input shape with at least 2 inputs, or statistics of another model.
    """
    check_choice(mode, SELFTUNE_MODES, "self-tuning mode")
    passes = check_count(passes, "self_tune: passes")
    layers = dict(nmult_layers(model))
    if not layers:
        raise QfvError("self_tune: the model has no N-multiplier layer")
    remove_self_tuning(model)
    if reference is None:
        _check_batch(calib, None, "self_tune")
        reference = reference_statistics(model, calib)
    if not isinstance(reference, ReferenceStats):
        raise TypeError(f"self_tune: reference must be ReferenceStats (from "
                        f"reference_statistics), got {type(reference).__name__}")
    _check_batch(calib, reference.input_shape, "self_tune")
    if set(reference.layers) != set(layers):
        raise QfvError(f"self_tune: the reference statistics are of layers "
                       f"{sorted(reference.layers)} but the model's N-multiplier layers are "
                       f"{sorted(layers)}; record them with reference_statistics(model, x) "
                       "on this model")
    order: List[str] = []
    if passes > 1:  # the layers' execution order, from one plain pass
        _run_hooked(model, calib, lambda n, l: (lambda *a: order.append(n)))
        order = list(dict.fromkeys(order))
    hooks: Dict[str, _Correction] = {}
    for name, layer in layers.items():
        dim = -1 if isinstance(layer, nn.Linear) else 1
        hooks[name] = _Correction(name, reference.mean[name], reference.std[name], dim, mode,
                                  eps)
        layer.register_forward_hook(hooks[name])
    try:
        if passes == 1:
            # One pass fits every layer in execution order: each hook sees the corrected
            # outputs of the layers before it.
            _run_hooked(model, calib)
        else:
            for h in hooks.values():
                h.state = "pending"
            for name in order:  # earlier layers already corrected, later ones pass through
                hooks[name].state = "collect"
                for _ in range(int(passes)):
                    _run_hooked(model, calib)
                hooks[name].finish()
    except BaseException:
        remove_self_tuning(model)
        raise
    unfitted = [n for n, h in hooks.items() if h.state != "fitted"]
    if unfitted:
        remove_self_tuning(model)
        raise QfvError(f"self_tune: layers {unfitted} did not run on the calibration batch")
    return SelfTuning(model, hooks)


def calibration_batch(dataset: Dataset, size: int = 64, seed: int = 0) -> Tensor:
    """``size`` inputs (no labels) drawn without replacement from ``dataset`` with ``seed``.

    >>> from torch.utils.data import TensorDataset
    >>> ds = TensorDataset(torch.arange(10.0)[:, None], torch.zeros(10))
    >>> calibration_batch(ds, 3, seed=1).shape
    torch.Size([3, 1])
    """
    size = check_count(size, "calibration batch size", 2)
    n = len(dataset)
    if size > n:
        raise QfvError(f"calibration batch size must be at most the {n} inputs of the data, "
                       f"got {size}")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:int(size)]
    return torch.stack([dataset[int(i)][0] for i in idx])
