"""qfv-brevitas: quantization-, fault- and variability-aware training for Brevitas.

The public face, grouped by what a user does; building blocks are one level down
(:mod:`qfv_brevitas.core`, :mod:`qfv_brevitas.chip`, :mod:`qfv_brevitas.zoo`), whole jobs in
:mod:`qfv_brevitas.studies` (Monte Carlo studies, method comparisons, experiments, PTQ) and
:mod:`qfv_brevitas.export` (QONNX). Importing this package loads no plotting and no study code.

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
from qfv_brevitas.chip.bitflips import BitFlipModel, attach_bitflips, detach_bitflips
from qfv_brevitas.chip.faults import (FaultMap, FaultModel, attach_faults, detach_faults,
                                      sample_fault_map)
from qfv_brevitas.chip.repair import (chip_in_loop_finetune, fault_aware_finetune,
                                      remap_to_valid_, set_deploy_mapping,
                                      variability_aware_finetune)
from qfv_brevitas.chip.variability import (VariabilityMap, VariabilityModel, attach_variability,
                                           detach_variability, sample_variability_map)
from qfv_brevitas.core.config import LambdaSchedule, NMultConfig
from qfv_brevitas.core.convert import quantize_model, swap_weight_quant
from qfv_brevitas.core.quantizers import NMultWeightQuant, nmult_layers, quant_of
from qfv_brevitas.core.snapping import format_report, layer_report, snap_weights_, weight_codes
from qfv_brevitas.snn.config import SpikingConfig
from qfv_brevitas.snn.network import to_spiking  # also registers the spiking models in zoo
from qfv_brevitas.training.refit import refit_levels_
from qfv_brevitas.training.regularizer import QuantRegularizer, regularization_loss
from qfv_brevitas.training.train import TrainConfig, evaluate, fit
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.version import __version__
from qfv_brevitas.zoo.checkpoint import load_checkpoint, save_checkpoint

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
