"""Brevitas' post-training toolbox on a quantized model, N-multiplier or stock Brevitas alike:
activation calibration, GPTQ / GPFQ error compensation and bias correction, each run over a few
calibration batches with Brevitas' own context managers (``brevitas.graph.calibrate``,
``brevitas.graph.gptq``, ``brevitas.graph.gpfq``).

Brevitas' GPTQ and GPFQ take the N-multiplier quantizers unchanged: they ask the layer for
``quant_weight(subtensor_slice_list=...)`` of one input column at a time, and an N-multiplier
quantizer snaps that column to its nearest level with the layer's ``r``/``c`` held fixed, which
is GPTQ over the N-multiplier levels (``tests/studies/test_calibration.py`` checks it against a
direct implementation of the GPTQ update). The compensated float weights stay in
``layer.weight``: every one of them snaps to the level GPTQ chose, so checkpoints, export and the
chip models see the compensated levels.

The order is Brevitas' own (``brevitas_examples`` PTQ): activations calibrated first, then the
weights compensated against quantized inputs, then biases corrected against the float model.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.validate import check_choice, check_count

__all__ = ["COMPENSATIONS", "calibration_batches", "calibrate_activations", "compensate_errors",
           "correct_biases", "drop_weight_orig", "apply_toolbox",
           "activation_quantizers"]

#: Error compensation methods (Brevitas' ``gptq_mode`` and ``gpfq_mode``).
COMPENSATIONS = ("gptq", "gpfq")


def calibration_batches(data, samples: int = 256, batch_size: int = 128) -> List[Tensor]:
    """The inputs of the first ``samples`` items of ``data`` (a Dataset of ``(x, y)`` or of
    inputs), in batches of ``batch_size``, in the data set's order (no shuffling: the same
    calibration set on every run)."""
    from torch.utils.data import DataLoader

    samples = check_count(samples, "calibration samples")
    batch_size = check_count(batch_size, "calibration batch size")
    out, seen = [], 0
    for item in DataLoader(data, batch_size=min(batch_size, samples)):
        x = item[0] if isinstance(item, (list, tuple)) else item
        x = x[:samples - seen]
        out.append(x)
        seen += len(x)
        if seen >= samples:
            break
    if not out:
        raise QfvError("calibration data is empty: give at least one sample")
    return out


def activation_quantizers(model: nn.Module) -> List[nn.Module]:
    """The enabled input/output activation quantizer proxies of ``model``'s Brevitas layers
    and ``QuantIdentity``/``QuantReLU``-style modules (the ones calibration sets)."""
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase

    return [m for m in model.modules()
            if isinstance(m, ActQuantProxyFromInjectorBase) and m.is_quant_enabled]


def _run(model: nn.Module, batches: Iterable[Tensor]) -> None:
    for x in batches:
        model(x)


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Sequence[Tensor]) -> nn.Module:
    """Set every activation quantizer's scale from statistics over ``batches`` with Brevitas'
    ``calibration_mode`` (weights and activations unquantized while the statistics are
    collected, as Brevitas does), in place; the model is left in eval mode."""
    from brevitas.graph.calibrate import calibration_mode

    if not activation_quantizers(model):
        raise QfvError("the model has no activation quantizer to calibrate")
    model.eval()
    with calibration_mode(model):
        _run(model, batches)
    return model


@torch.no_grad()
def compensate_errors(model: nn.Module, batches: Sequence[Tensor],
                      method: str = "gptq", act_order: bool = False,
                      keep_weight_orig: bool = False) -> nn.Module:
    """GPTQ (or GPFQ) error compensation of every quantized layer, one layer after the other,
    with Brevitas' ``gptq_mode`` / ``gpfq_mode`` over ``batches`` (with quantized activations
    where the model has them), in place.

    Each input column's weights are quantized with the layer's own quantizer (for an
    N-multiplier layer: snapped to its nearest level, ``r``/``c`` fixed) and the error is
    carried to the columns not yet quantized through the Cholesky factor of the inverse
    Hessian of the layer's inputs. ``act_order``: columns in decreasing order of the
    Hessian's diagonal (Brevitas' option; off by default, as in Brevitas). ``keep_weight_orig``: the layers keep Brevitas'
    ``weight_orig`` buffer (the float weights before compensation, which Brevitas uses while
    weight quantization is disabled, e.g. as bias correction's float reference) until
    :func:`drop_weight_orig`."""
    from brevitas.graph.gpfq import gpfq_mode
    from brevitas.graph.gptq import gptq_mode

    method = check_choice(method, COMPENSATIONS, "error compensation")
    mode = gptq_mode if method == "gptq" else gpfq_mode
    for name, layer in nmult_layers(model):
        if not quant_of(layer).chip.is_ideal:
            raise QfvError(f"layer {name!r}: its chip carries fault or variability maps or bit "
                           "flips; error compensation works on the ideal levels: compensate "
                           "first, then attach the maps")
    model.eval()
    _init_weight_quantizers(model)
    with mode(model, use_quant_activations=True, create_weight_orig=True,
              act_order=act_order) as algo:
        for _ in range(algo.num_layers):
            _run(algo.model, batches)
            algo.update()
    return model if keep_weight_orig else drop_weight_orig(model)


def _init_weight_quantizers(model: nn.Module) -> None:
    """Quantize each layer's weights once: Brevitas' statistics-based scales (MSE, ...) are
    set on the first call, and GPTQ refuses a quantizer that has not been initialised."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    for m in model.modules():
        if isinstance(m, QuantWeightBiasInputOutputLayer) and m.weight_quant.is_quant_enabled:
            m.quant_weight()


def drop_weight_orig(model: nn.Module) -> nn.Module:
    """Remove the ``weight_orig`` buffers that compensation leaves (so the state dict is the
    layers' own again)."""
    for m in model.modules():
        if "weight_orig" in dict(m.named_buffers(recurse=False)):
            del m.weight_orig
    return model


@torch.no_grad()
def correct_biases(model: nn.Module, batches: Sequence[Tensor]) -> nn.Module:
    """Brevitas' bias correction (``bias_correction_mode``): each quantized layer's bias moves
    by the mean difference between its float and its quantized outputs over ``batches``, per
    output channel, in place. Layers without a bias are left without one (the model's
    structure and state dict keys do not change)."""
    from brevitas.graph.calibrate import bias_correction_mode

    model.eval()
    with bias_correction_mode(model, skip_if_no_bias=True):
        _run(model, batches)
    return model


def apply_toolbox(model: nn.Module, batches: Sequence[Tensor], *, calibrate: bool = False,
                  compensation: Optional[str] = None, bias_correction: bool = False,
                  act_order: bool = False) -> nn.Module:
    """The toolbox in Brevitas' order: activation calibration (``calibrate``), error
    compensation (``compensation``: ``"gptq"``, ``"gpfq"`` or ``None``; ``act_order`` as in
    :func:`compensate_errors`), bias correction; in place, eval mode. Returns ``model``."""
    if compensation is not None:
        check_choice(compensation, COMPENSATIONS, "error compensation")
    if calibrate:
        calibrate_activations(model, batches)
    if compensation is not None:
        compensate_errors(model, batches, compensation, act_order, keep_weight_orig=True)
    if bias_correction:
        correct_biases(model, batches)
    drop_weight_orig(model)
    return model.eval()
