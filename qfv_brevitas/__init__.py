"""qfv-brevitas: quantization-, fault- and variability-aware training for Brevitas.

N-multiplier weight quantizers (levels ``<r, S> + c``), the regularizer of the paper's
eq. 6/7 with its lambda schedule, model conversion, deployment helpers.
"""
from qfv_brevitas.core.config import MODES, VARIANTS, LambdaSchedule, NMultConfig
from qfv_brevitas.core.convert import ConversionError, quantize_model, set_forward_mode, swap_weight_quant
from qfv_brevitas.core.deploy import format_report, layer_report, snap_weights_, weight_codes
from qfv_brevitas.chip.faults import (FaultMap, FaultMapError, FaultModel, attach_faults, detach_faults,
                     sample_fault_map)
from qfv_brevitas.chip.variability import (VariabilityMap, VariabilityMapError, VariabilityModel,
                          attach_variability, detach_variability, sample_variability_map)
from qfv_brevitas.chip.repair import (chip_in_loop_finetune, fault_aware_finetune, remap_to_valid_,
                     set_deploy_mapping, variability_aware_finetune)
from qfv_brevitas.studies.montecarlo import (compare_faults, compare_variability, evaluate_bitflips,
                                            evaluate_faults, evaluate_variability)
from qfv_brevitas.studies.results import StudyResult
from qfv_brevitas.core.quantizers import (FixedLevelWeightPerChannelQuant, FixedLevelWeightQuant,
                         LearnedStepWeightPerChannelQuant, LearnedStepWeightQuant,
                         NMultTensorQuant, NMultWeightPerChannelQuant, NMultWeightQuant,
                         NMultWeightQuantProxy, nmult_layers, quant_of)
from qfv_brevitas.core.regularizer import QuantRegularizer, layer_factor, regularization_loss
from qfv_brevitas.core.shapes import SHAPES, shaped_distance_to_levels
from qfv_brevitas.chip.bitflips import BitFlipModel, attach_bitflips, detach_bitflips
from qfv_brevitas.studies.methods import random_bit_error_finetune
from qfv_brevitas.core.sam import SharpnessAware
from qfv_brevitas.chip.selftune import (ReferenceStats, calibration_batch, reference_statistics,
                       remove_self_tuning, self_tune)
from qfv_brevitas.studies.compare import compare_methods
from qfv_brevitas.studies.engine import CompareConfig
from qfv_brevitas.studies.scenario import Scenario, scenarios
from qfv_brevitas.snn import (SpikingConfig, SpikingNet, run_snn_experiment, snn_export_metadata,
                  to_spiking)  # building spiking layers needs the snn extra (spikingjelly)

from qfv_brevitas.util.version import __version__

__all__ = [
    "MODES", "VARIANTS", "LambdaSchedule", "NMultConfig", "ConversionError", "quantize_model",
    "set_forward_mode", "swap_weight_quant", "format_report", "layer_report", "snap_weights_",
    "weight_codes", "FixedLevelWeightPerChannelQuant", "FixedLevelWeightQuant",
    "LearnedStepWeightPerChannelQuant", "LearnedStepWeightQuant", "NMultTensorQuant",
    "NMultWeightPerChannelQuant", "NMultWeightQuant", "NMultWeightQuantProxy", "nmult_layers",
    "quant_of", "QuantRegularizer", "layer_factor", "regularization_loss",
    "FaultMap", "FaultMapError", "FaultModel", "attach_faults", "detach_faults",
    "sample_fault_map", "VariabilityMap", "VariabilityMapError", "VariabilityModel",
    "attach_variability", "detach_variability", "sample_variability_map",
    "chip_in_loop_finetune", "fault_aware_finetune", "remap_to_valid_", "set_deploy_mapping",
    "variability_aware_finetune", "StudyResult", "compare_faults", "compare_variability",
    "evaluate_faults", "evaluate_variability",
    "SpikingConfig", "SpikingNet", "run_snn_experiment", "snn_export_metadata", "to_spiking",
    "SHAPES", "shaped_distance_to_levels", "BitFlipModel", "attach_bitflips", "detach_bitflips",
    "evaluate_bitflips", "random_bit_error_finetune", "SharpnessAware", "ReferenceStats",
    "calibration_batch", "reference_statistics", "remove_self_tuning", "self_tune",
    "CompareConfig", "Scenario", "compare_methods", "scenarios",
]
