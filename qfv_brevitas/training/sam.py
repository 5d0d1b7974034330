"""Sharpness-aware updates (SAM), the training scheme of FlatENN's sharpness-aware quantization.

One SAM step from weights ``w`` with loss ``L``: take the gradient ``g = dL/dw``, move to the
worst nearby point ``w + e`` with ``e = rho * g / ||g||`` (one global norm over all perturbed
tensors), take the gradient there, move back to ``w`` and let the optimizer apply the gradient
of ``w + e``. Minima found this way are flat: a perturbation of the weights (a flipped or stuck
bit) costs less loss. FlatENN applies it to quantized training; here it runs inside
:func:`qfv_brevitas.training.train.fit` whenever ``TrainConfig.sam_rho > 0``, so it combines with
QAT (the loss includes the regularizer) and with the fault- and variability-aware fine-tunes of
:mod:`qfv_brevitas.chip.repair`.

The perturbation moves the network's own parameters (weights, biases, BatchNorm affine), not the
quantizer's ``r``/``c``/step nor the activation scales: those define the grid, not the point on it.
BatchNorm running statistics are frozen during the perturbed pass so that each batch updates them
once, at ``w``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, List

import torch
from torch import Tensor, nn

from qfv_brevitas.util.validate import check_real

__all__ = ["sam_params", "SharpnessAware", "check_rho"]


def check_rho(rho: Any, what: str = "SAM radius rho", off_at_zero: bool = False) -> float:
    """``rho`` as a float: a finite SAM radius > 0 (>= 0 with ``off_at_zero``: 0 turns SAM
    off); the one check of every setting that holds a SAM radius.

    >>> check_rho(0, "TrainConfig.sam_rho", off_at_zero=True)
    0.0
    """
    hint = " (the SAM radius, e.g. 0.05; 0 = plain updates)" if off_at_zero else \
        " (the SAM radius, e.g. 0.05)"
    return check_real(rho, what, strict=not off_at_zero, hint=hint)


def sam_params(model: nn.Module) -> List[nn.Parameter]:
    """The parameters SAM perturbs: every trainable parameter except quantizer parameters
    (``r``, ``c``, step: names containing ``.weight_quant.``) and activation-quantizer scales
    (names containing ``_quant.``), the split of :func:`qfv_brevitas.training.train.param_groups`.

    >>> len(sam_params(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))))   # w, b, gamma, beta
    4
    """
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad or "_quant." in name or name.startswith("weight_quant."):
            continue
        out.append(p)
    return out


class SharpnessAware:
    """The two moves of a SAM step around an existing optimizer.

    Usage, per batch: ``loss.backward(); sam.ascend()``, then inside
    ``with sam.frozen_norm_stats():`` the loss again at the perturbed point, ``zero_grad`` and
    ``backward``; then ``sam.restore()`` and ``optimizer.step()``.

    >>> lin = nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
    >>> lin.weight.grad = torch.tensor([[3.0, 4.0]])
    >>> sam = SharpnessAware(lin, rho=0.5)
    >>> sam.ascend()  # ||g||; each weight moves by 0.5 * g / ||g|| = (0.3, 0.4)
    5.0
    >>> [round(v, 4) for v in lin.weight.data[0].tolist()]
    [3.3, 4.4]
    >>> sam.restore(); lin.weight.data.tolist()
    [[3.0, 4.0]]
    """

    def __init__(self, model: nn.Module, rho: float):
        self.model = model
        self.rho = check_rho(rho)
        self.params = sam_params(model)
        self._saved: List[Tensor] = []

    @torch.no_grad()
    def ascend(self) -> float:
        """Move each parameter by ``rho * g / ||g||`` (gradients from the last backward pass);
        returns ``||g||``. A zero gradient moves nothing."""
        if self._saved:
            raise RuntimeError("SharpnessAware.ascend() called twice without restore()")
        grads = [p.grad for p in self.params]
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
        scale = self.rho / norm if norm > 0 else 0.0
        # The starting point is kept as is (not recomputed as (w + e) - e): restore is exact.
        self._saved = [p.detach().clone() for p in self.params]
        for p, g in zip(self.params, grads):
            if g is not None:
                p.add_(g, alpha=scale)
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Undo :meth:`ascend` exactly (the gradients are left as they are)."""
        for p, w in zip(self.params, self._saved):
            p.copy_(w)
        self._saved = []

    @contextlib.contextmanager
    def frozen_norm_stats(self) -> Iterator[None]:
        """BatchNorm layers do not update their running statistics inside the block (they
        are put back on exit: run the backward pass inside the block, as autograd keeps
        them for it)."""
        norms = [m for m in self.model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                 and m.running_mean is not None]
        states = [(m.running_mean.clone(), m.running_var.clone(),
                   m.num_batches_tracked.clone()) for m in norms]
        try:
            yield
        finally:
            for m, (mean, var, nbt) in zip(norms, states):
                with torch.no_grad():
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(nbt)
