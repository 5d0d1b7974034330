"""Make a quantized model work on its imperfect device (paper sections 3.6, 3.7).

- :func:`remap_to_valid_`: nearest-valid-level mapping of the fault-affected weights
  (the FAQ/Matic baseline, and the periodic remap of fault-aware training).
- :func:`fault_aware_finetune`: the fault-aware regularizer (eq. 11, unreachable levels
  excluded) plus a remap every ``remap_every`` epochs; deployed with aware mapping.
- :func:`variability_aware_finetune`: the regularizer over each weight's own perturbed level
  set (eq. 12); deployed with aware mapping.
- :func:`chip_in_loop_finetune`: the simulated chip-in-loop baseline: training through the
  deployed (faulty/perturbed) weights with a straight-through gradient.

Each works on a model with maps attached (:func:`qfv_brevitas.chip.faults.attach_faults`,
:func:`qfv_brevitas.chip.variability.attach_variability`) and fine-tunes it in place.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from qfv_brevitas.core.chip import MAPPINGS
from qfv_brevitas.util.validate import check_choice
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.core.convert import set_forward_mode
from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.training.train import TrainConfig, fit

__all__ = ["set_deploy_mapping", "remap_to_valid_", "fault_aware_finetune",
           "variability_aware_finetune", "chip_in_loop_finetune", "has_device_maps"]


def set_deploy_mapping(model: nn.Module, mapping: str) -> nn.Module:
    """How codes are chosen for the device: ``"naive"`` (nearest ideal level, then the device
    does what it does) or ``"aware"`` (the code whose deployed value is nearest: nearest-valid
    level mapping for faults, the weight's own perturbed levels for variability)."""
    check_choice(mapping, MAPPINGS, "deploy mapping")
    for _, layer in nmult_layers(model):
        layer.weight_quant.chip.set_mapping(mapping)
    return model


def has_device_maps(model: nn.Module) -> bool:
    return any(l.weight_quant.chip.has_maps for _, l in nmult_layers(model))


def _require_maps(model: nn.Module, what: str, faults: bool = False) -> None:
    layers = nmult_layers(model)
    if not layers:
        raise QfvError(f"{what}: the model has no N-multiplier layer")
    if faults and not any(l.weight_quant.chip.has_faults for _, l in layers):
        raise QfvError(f"{what}: no fault map attached (qfv_brevitas.chip.faults.attach_faults)")
    if not faults and not has_device_maps(model):
        raise QfvError(f"{what}: no fault or variability map attached")


@torch.no_grad()
def remap_to_valid_(model: nn.Module) -> Dict[str, int]:
    """Move every weight with a stuck bit onto the nearest level it can still reach (its
    nearest deployable value), in place. Returns the number of weights moved per layer."""
    moved = {}
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        chip = tq.chip
        if not chip.has_faults:
            continue
        w2d = tq.to_groups(layer.weight.detach())
        v = chip.nearest_values(w2d, tq.multipliers().detach(), tq.offset().detach())
        sa0, sa1 = chip.maps()[:2]
        faulty = (sa0 | sa1) != 0
        new = torch.where(faulty, v.to(w2d.dtype), w2d)
        layer.weight.copy_(tq.from_groups(new, layer.weight.shape))
        moved[name] = int(faulty.sum())
    return moved


def fault_aware_finetune(model: nn.Module, train: Dataset, test: Optional[Dataset],
                         cfg: TrainConfig, remap_every: int = 4, progress: bool = True,
                         **fit_kw) -> dict:
    """Fault-aware training (eq. 11 plus periodic nearest-valid-level remapping) of a model
    with a fault map attached; afterwards it deploys with aware mapping. ``fit_kw``:
    :func:`fit`'s ``loss_fn``, ``optimizer``, ``metrics`` (e.g. a language model's)."""
    _require_maps(model, "fault_aware_finetune", faults=True)
    if remap_every < 1:
        raise QfvError(f"remap_every must be >= 1, got {remap_every}")
    set_forward_mode(model, "paper")
    set_deploy_mapping(model, "aware")
    remap_to_valid_(model)

    def epoch_end(epoch: int) -> None:
        if (epoch + 1) % remap_every == 0 or epoch == cfg.epochs - 1:
            remap_to_valid_(model)

    return fit(model, train, test, cfg, desc="fault-aware", progress=progress,
               epoch_end=epoch_end, **fit_kw)


def variability_aware_finetune(model: nn.Module, train: Dataset, test: Optional[Dataset],
                               cfg: TrainConfig, progress: bool = True) -> dict:
    """Variability-aware training: the regularizer pulls each weight to the nearest of its own
    perturbed levels; afterwards the model deploys with aware mapping."""
    _require_maps(model, "variability_aware_finetune")
    set_forward_mode(model, "paper")
    set_deploy_mapping(model, "aware")
    return fit(model, train, test, cfg, desc="variability-aware", progress=progress)


def chip_in_loop_finetune(model: nn.Module, train: Dataset, test: Optional[Dataset],
                          cfg: TrainConfig, progress: bool = True) -> dict:
    """Simulated chip-in-loop retraining: the forward pass uses what the device holds for the
    naively programmed codes, gradients pass straight through to the weights."""
    _require_maps(model, "chip_in_loop_finetune")
    set_forward_mode(model, "ste")
    set_deploy_mapping(model, "naive")
    return fit(model, train, test, cfg, desc="chip-in-loop", progress=progress)
