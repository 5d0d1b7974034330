"""The quantization regularizer of paper eq. 6/7 over a whole model, and its lambda schedule.

``loss = task_loss + lambda * sum_l alpha_l * sum_i min_q |w_i - q|^2`` with
``alpha_l = 1 / sqrt(n_l * Q_P)`` (LSQ's gradient scale, ``Q_P = 2**(b-1) - 1`` floored at 1).
Layers in ``ste`` mode are trained through the quantizer instead and are left out.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple, Union

import torch
from torch import Tensor, nn

from .config import LambdaSchedule
from .levels import qp
from .quantizers import nmult_layers, quant_of
from .shapes import check_shape, check_width, layer_distance

__all__ = ["layer_factor", "regularization_loss", "QuantRegularizer", "LambdaSchedule"]


def layer_factor(num_weights: int, bits: int) -> float:
    """``alpha_l = 1 / sqrt(n_l * Q_P)`` of paper eq. 6."""
    return 1.0 / math.sqrt(num_weights * qp(bits))


def regularization_loss(model: nn.Module, breakdown: bool = False, shape: str = "sq",
                        width: float = 0.25
                        ) -> Union[Tensor, Tuple[Tensor, Dict[str, float]]]:
    """``sum_l alpha_l * sum_i min_q |w_i - q|^2`` over the model's N-multiplier layers.

    Differentiable in the weights, ``r`` and ``c``. With ``breakdown=True`` also returns each
    layer's (weighted) term as a float, for logging. ``shape`` replaces the squared distance
    by another shape of :mod:`qfv_brevitas.shapes` (``"gauss"``: Gaussian well of width
    ``width`` times the local level spacing; ``"sin"``: SinReQ sinusoid).

    >>> import brevitas.nn as qnn
    >>> from qfv_brevitas.quantizers import NMultWeightQuant
    >>> m = nn.Sequential(qnn.QuantLinear(4, 2, bias=False, weight_quant=NMultWeightQuant))
    >>> loss, parts = regularization_loss(m, breakdown=True)
    >>> list(parts), bool(loss >= 0)
    (['0'], True)
    """
    check_shape(shape)
    total = None
    parts: Dict[str, float] = {}
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        if not tq.uses_regularizer:
            continue
        w = layer.weight
        dist = tq.distance(w) if shape == "sq" else layer_distance(tq, w, shape, width)
        term = layer_factor(w.numel(), tq.bits) * dist
        total = term if total is None else total + term
        if breakdown:
            parts[name] = float(term.detach())
    if total is None:
        p = next(model.parameters(), None)
        total = torch.zeros((), device=None if p is None else p.device)
    return (total, parts) if breakdown else total


class QuantRegularizer:
    """The regularizer with its schedule: ``reg(epoch)`` is ``lambda(epoch) * R(model)``.

    >>> import brevitas.nn as qnn
    >>> from qfv_brevitas.quantizers import NMultWeightQuant
    >>> m = nn.Sequential(qnn.QuantLinear(4, 2, bias=False, weight_quant=NMultWeightQuant))
    >>> reg = QuantRegularizer(m, LambdaSchedule(total_epochs=5, rise_epochs=2))
    >>> reg.lam(0)
    100.0
    """

    def __init__(self, model: nn.Module, schedule: LambdaSchedule, shape: str = "sq",
                 width: float = 0.25):
        self.model = model
        self.schedule = schedule
        self.shape = check_shape(shape)
        self.width = check_width(width)
        self.last_breakdown: Dict[str, float] = {}

    def lam(self, epoch: int) -> float:
        return self.schedule(epoch)

    def unweighted(self) -> Tensor:
        """``R(model)`` without lambda (a training loop multiplies it by the lambda it applies,
        and logs both); also updates ``last_breakdown``."""
        total, self.last_breakdown = regularization_loss(self.model, breakdown=True,
                                                         shape=self.shape, width=self.width)
        return total

    def __call__(self, epoch: int) -> Tensor:
        return self.lam(epoch) * self.unweighted()
