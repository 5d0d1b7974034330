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

from qfv_brevitas.core.config import LambdaSchedule
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.core.levels import qp
from qfv_brevitas.core.search import sync_free
from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.core.distance import DEFAULT_WIDTH, check_shape, check_width

__all__ = ["layer_factor", "regularization_loss", "QuantRegularizer", "LambdaSchedule"]


def layer_factor(num_weights: int, bits: int) -> float:
    """``alpha_l = 1 / sqrt(n_l * Q_P)`` of paper eq. 6."""
    return 1.0 / math.sqrt(num_weights * qp(bits))


def regularization_loss(model: nn.Module, breakdown: bool = False, shape: str = "sq",
                        width: float = DEFAULT_WIDTH
                        ) -> Union[Tensor, Tuple[Tensor, Dict[str, float]]]:
    """``sum_l alpha_l * sum_i min_q |w_i - q|^2`` over the model's N-multiplier layers.

    Differentiable in the weights, ``r`` and ``c``; 0 when every layer is in ``ste`` mode, and
    an error for a model without N-multiplier layers. With ``breakdown=True`` also returns each
    layer's (weighted) term as a float, for logging. ``shape`` replaces the squared distance
    by another shape of :mod:`qfv_brevitas.core.distance` (``"gauss"``: Gaussian well of width
    ``width`` times the local level spacing; ``"sin"``: SinReQ sinusoid).

    >>> import brevitas.nn as qnn
    >>> from qfv_brevitas.core.quantizers import NMultWeightQuant
    >>> m = nn.Sequential(qnn.QuantLinear(4, 2, bias=False, weight_quant=NMultWeightQuant))
    >>> loss, parts = regularization_loss(m, breakdown=True)
    >>> list(parts), bool(loss >= 0)
    (['0'], True)
    """
    total, terms = _loss_terms(model, shape, width)
    if not breakdown:
        return total
    return total, _floats(terms)


def _loss_terms(model: nn.Module, shape: str = "sq", width: float = DEFAULT_WIDTH
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The loss and each layer's weighted term (detached tensors, no host sync per layer: on
    the CPU the sum's finiteness is checked once, and only a non-finite sum looks for its
    layer)."""
    check_shape(shape)
    total = None
    terms: Dict[str, Tensor] = {}
    used = []
    layers = nmult_layers(model)
    if not layers:
        # Silently 0 would train a model that was meant to be quantized as a float one.
        raise QfvError("regularization_loss: the model has no N-multiplier layers; quantize it "
                       "first with quantize_model() or swap_weight_quant()")
    for name, layer in layers:
        tq = quant_of(layer)
        if not tq.uses_regularizer:
            continue
        w = layer.weight
        dist = tq.distance_unchecked(w, shape, width)
        term = layer_factor(w.numel(), tq.bits) * dist
        total = term if total is None else total + term
        terms[name] = term.detach()
        used.append((name, tq, w, term))
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device), terms
    # One check of the sum: a host sync, so skipped on a GPU and while torch.compile /
    # torch.export trace (a graph break); there fit checks the losses once per epoch.
    if not sync_free(total) and not torch.compiler.is_compiling() \
            and not torch.isfinite(total):
        for name, tq, w, term in used:
            if not torch.isfinite(term):
                tq.raise_not_finite(w)
    return total, terms


def _floats(terms: Dict[str, Tensor]) -> Dict[str, float]:
    """Per-layer terms as floats, read in one transfer."""
    if not terms:
        return {}
    values = torch.stack([t.reshape(()).double() for t in terms.values()]).tolist()
    return dict(zip(terms, values))


class QuantRegularizer:
    """The regularizer with its schedule: ``reg(epoch)`` is ``lambda(epoch) * R(model)``.

    >>> import brevitas.nn as qnn
    >>> from qfv_brevitas.core.quantizers import NMultWeightQuant
    >>> m = nn.Sequential(qnn.QuantLinear(4, 2, bias=False, weight_quant=NMultWeightQuant))
    >>> reg = QuantRegularizer(m, LambdaSchedule(total_epochs=5, rise_epochs=2))
    >>> reg.lam(0)
    100.0
    """

    def __init__(self, model: nn.Module, schedule: LambdaSchedule, shape: str = "sq",
                 width: float = DEFAULT_WIDTH):
        self.model = model
        self.schedule = schedule
        self.shape = check_shape(shape)
        self.width = check_width(width)
        self._terms: Dict[str, Tensor] = {}

    @property
    def last_breakdown(self) -> Dict[str, float]:
        """Each layer's weighted term of the last call, as floats (read when asked for, so
        that a training step on a GPU does not wait for them)."""
        return _floats(self._terms)

    def lam(self, epoch: int) -> float:
        return self.schedule(epoch)

    def unweighted(self) -> Tensor:
        """``R(model)`` without lambda (a training loop multiplies it by the lambda it applies,
        and logs both); also updates ``last_breakdown``."""
        total, self._terms = _loss_terms(self.model, self.shape, self.width)
        return total

    def __call__(self, epoch: int) -> Tensor:
        return self.lam(epoch) * self.unweighted()
