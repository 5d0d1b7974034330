"""qfv-brevitas: quantization-, fault- and variability-aware training for Brevitas.

N-multiplier weight quantizers (levels ``<r, S> + c``), the regularizer of the paper's
eq. 6/7 with its lambda schedule, model conversion, deployment helpers.
"""
from .config import MODES, VARIANTS, LambdaSchedule, NMultConfig
from .convert import ConversionError, quantize_model, set_forward_mode, swap_weight_quant
from .deploy import format_report, layer_report, snap_weights_, weight_codes
from .faults import (FaultMap, FaultMapError, FaultModel, attach_faults, detach_faults,
                     sample_fault_map)
from .variability import (VariabilityMap, VariabilityMapError, VariabilityModel,
                          attach_variability, detach_variability, sample_variability_map)
from .repair import (chip_in_loop_finetune, fault_aware_finetune, remap_to_valid_,
                     set_deploy_mapping, variability_aware_finetune)
from .evaluate import (MonteCarloResult, compare_faults, compare_variability, evaluate_faults,
                       evaluate_variability)
from .quantizers import (FixedLevelWeightPerChannelQuant, FixedLevelWeightQuant,
                         LearnedStepWeightPerChannelQuant, LearnedStepWeightQuant,
                         NMultTensorQuant, NMultWeightPerChannelQuant, NMultWeightQuant,
                         NMultWeightQuantProxy, nmult_layers, quant_of)
from .regularizer import QuantRegularizer, layer_factor, regularization_loss
from .shapes import SHAPES, shaped_distance_to_levels
from .bitflip import (BitFlipModel, attach_bitflips, detach_bitflips, evaluate_bitflips,
                      random_bit_error_finetune)
from .sam import SharpnessAware
from .selftune import (ReferenceStats, calibration_batch, reference_statistics,
                       remove_self_tuning, self_tune)
from .compare import CompareConfig, MethodComparison, Scenario, compare_methods, scenarios
from .snn import (SpikingConfig, SpikingNet, run_snn_experiment, snn_export_metadata,
                  to_spiking)  # building spiking layers needs the snn extra (spikingjelly)

__version__ = "0.1.0"

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
    "variability_aware_finetune", "MonteCarloResult", "compare_faults", "compare_variability",
    "evaluate_faults", "evaluate_variability",
    "SpikingConfig", "SpikingNet", "run_snn_experiment", "snn_export_metadata", "to_spiking",
    "SHAPES", "shaped_distance_to_levels", "BitFlipModel", "attach_bitflips", "detach_bitflips",
    "evaluate_bitflips", "random_bit_error_finetune", "SharpnessAware", "ReferenceStats",
    "calibration_batch", "reference_statistics", "remove_self_tuning", "self_tune",
    "CompareConfig", "MethodComparison", "Scenario", "compare_methods", "scenarios",
]
