"""qfv-brevitas: quantization-, fault- and variability-aware training for Brevitas.

The public face, grouped by what a user does; building blocks are one level down
(:mod:`qfv_brevitas.core`, :mod:`qfv_brevitas.chip`, :mod:`qfv_brevitas.zoo`), whole jobs in
:mod:`qfv_brevitas.studies` (Monte Carlo studies, method comparisons, experiments, PTQ) and
:mod:`qfv_brevitas.export` (QONNX). Importing this package loads nothing heavy: each public name is imported on
first use (so ``import qfv_brevitas`` and ``qfv --help`` do not import torch).

- quantize: :class:`NMultConfig`, :func:`quantize_model`, :func:`swap_weight_quant`,
  :class:`NMultWeightQuant` (the Brevitas injector), :func:`quant_of`, :func:`nmult_layers`
- train: :class:`TrainConfig`, :func:`fit`, :func:`evaluate`, :class:`LambdaSchedule`,
  :class:`QuantRegularizer`, :func:`regularization_loss`, :func:`refit_levels_`
- deploy: :func:`snap_weights_`, :func:`weight_codes`, :func:`layer_report`, :func:`format_report`
- the chip: :class:`FaultModel` / :class:`FaultMap` (stuck bits), :class:`VariabilityModel` /
  :class:`VariabilityMap` (per-cell variability), :class:`BitFlipModel` (transient flips), their
  ``sample_*`` / ``attach_*`` / ``detach_*`` functions, and the repairs
  :func:`set_deploy_mapping`, :func:`remap_to_valid_`, :func:`fault_aware_finetune`,
  :func:`variability_aware_finetune`, :func:`chip_in_loop_finetune`
- files: :func:`save_checkpoint`, :func:`load_checkpoint`
- spiking networks: :class:`SpikingConfig`, :func:`to_spiking`
- errors: :class:`QfvError` (every error for bad input)
"""
import importlib
from typing import Any, List

from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.version import __version__

#: where each public name lives: loaded on first use (PEP 562), so that ``import qfv_brevitas``
#: and ``qfv --help`` do not import torch, Brevitas or the chip models until a name is used.
_PUBLIC = {
    "BitFlipModel": "qfv_brevitas.chip.bitflips",
    "attach_bitflips": "qfv_brevitas.chip.bitflips",
    "detach_bitflips": "qfv_brevitas.chip.bitflips",
    "FaultMap": "qfv_brevitas.chip.faults",
    "FaultModel": "qfv_brevitas.chip.faults",
    "attach_faults": "qfv_brevitas.chip.faults",
    "detach_faults": "qfv_brevitas.chip.faults",
    "sample_fault_map": "qfv_brevitas.chip.faults",
    "chip_in_loop_finetune": "qfv_brevitas.chip.repair",
    "fault_aware_finetune": "qfv_brevitas.chip.repair",
    "remap_to_valid_": "qfv_brevitas.chip.repair",
    "set_deploy_mapping": "qfv_brevitas.chip.repair",
    "variability_aware_finetune": "qfv_brevitas.chip.repair",
    "VariabilityMap": "qfv_brevitas.chip.variability",
    "VariabilityModel": "qfv_brevitas.chip.variability",
    "attach_variability": "qfv_brevitas.chip.variability",
    "detach_variability": "qfv_brevitas.chip.variability",
    "sample_variability_map": "qfv_brevitas.chip.variability",
    "LambdaSchedule": "qfv_brevitas.core.config",
    "NMultConfig": "qfv_brevitas.core.config",
    "quantize_model": "qfv_brevitas.core.convert",
    "swap_weight_quant": "qfv_brevitas.core.convert",
    "NMultWeightQuant": "qfv_brevitas.core.quantizers",
    "nmult_layers": "qfv_brevitas.core.quantizers",
    "quant_of": "qfv_brevitas.core.quantizers",
    "format_report": "qfv_brevitas.core.snapping",
    "layer_report": "qfv_brevitas.core.snapping",
    "snap_weights_": "qfv_brevitas.core.snapping",
    "weight_codes": "qfv_brevitas.core.snapping",
    "SpikingConfig": "qfv_brevitas.snn.config",
    "to_spiking": "qfv_brevitas.snn.network",
    "refit_levels_": "qfv_brevitas.training.refit",
    "QuantRegularizer": "qfv_brevitas.training.regularizer",
    "regularization_loss": "qfv_brevitas.training.regularizer",
    "TrainConfig": "qfv_brevitas.training.train",
    "evaluate": "qfv_brevitas.training.train",
    "fit": "qfv_brevitas.training.train",
    "load_checkpoint": "qfv_brevitas.zoo.checkpoint",
    "save_checkpoint": "qfv_brevitas.zoo.checkpoint",
}


def __getattr__(name: str) -> Any:
    """The public name ``name``, imported from its module on first use (and kept)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'qfv_brevitas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = [
    # quantize
    "NMultConfig", "quantize_model", "swap_weight_quant", "NMultWeightQuant", "quant_of",
    "nmult_layers",
    # train
    "TrainConfig", "fit", "evaluate", "LambdaSchedule", "QuantRegularizer",
    "regularization_loss", "refit_levels_",
    # deploy
    "snap_weights_", "weight_codes", "layer_report", "format_report",
    # the chip
    "FaultModel", "FaultMap", "sample_fault_map", "attach_faults", "detach_faults",
    "VariabilityModel", "VariabilityMap", "sample_variability_map", "attach_variability",
    "detach_variability", "BitFlipModel", "attach_bitflips", "detach_bitflips",
    "set_deploy_mapping", "remap_to_valid_", "fault_aware_finetune",
    "variability_aware_finetune", "chip_in_loop_finetune",
    # files
    "save_checkpoint", "load_checkpoint",
    # spiking networks
    "SpikingConfig", "to_spiking",
    # errors
    "QfvError", "__version__",
]
