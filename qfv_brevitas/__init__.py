"""qfv-brevitas: quantization-, fault- and variability-aware training for Brevitas.

N-multiplier weight quantizers (levels ``<r, S> + c``), the regularizer of the paper's
eq. 6/7 with its lambda schedule, model conversion, deployment helpers.
"""
from .config import MODES, VARIANTS, LambdaSchedule, NMultConfig
from .convert import ConversionError, quantize_model, set_forward_mode, swap_weight_quant
from .deploy import format_report, layer_report, snap_weights_, weight_codes
from .quantizers import (FixedLevelWeightPerChannelQuant, FixedLevelWeightQuant,
                         LearnedStepWeightPerChannelQuant, LearnedStepWeightQuant,
                         NMultTensorQuant, NMultWeightPerChannelQuant, NMultWeightQuant,
                         NMultWeightQuantProxy, nmult_layers, quant_of)
from .regularizer import QuantRegularizer, layer_factor, regularization_loss

__version__ = "0.1.0"

__all__ = [
    "MODES", "VARIANTS", "LambdaSchedule", "NMultConfig", "ConversionError", "quantize_model",
    "set_forward_mode", "swap_weight_quant", "format_report", "layer_report", "snap_weights_",
    "weight_codes", "FixedLevelWeightPerChannelQuant", "FixedLevelWeightQuant",
    "LearnedStepWeightPerChannelQuant", "LearnedStepWeightQuant", "NMultTensorQuant",
    "NMultWeightPerChannelQuant", "NMultWeightQuant", "NMultWeightQuantProxy", "nmult_layers",
    "quant_of", "QuantRegularizer", "layer_factor", "regularization_loss",
]
