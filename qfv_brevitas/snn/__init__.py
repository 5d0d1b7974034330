"""Spiking neural networks with N-multiplier weights (paper sections 3.5 and 4.2).

ReLUs become spikingjelly LIF neurons (multi-step over ``T`` steps), max-pooling becomes average
pooling, and only the synaptic (Conv/Linear) weights are quantized: spikes are the
activations. A spiking model takes and returns what its non-spiking original did (static
images are rate-coded inside), so training, fault and variability evaluation and repair work
on it unchanged::

    snn = to_spiking(my_net, SpikingConfig(T=4))                    # ReLU -> LIF
    q = quantize_model(snn, NMultConfig(weight_bits=4, act_bits=None))  # the usual call

Importing this package needs nothing extra; building a spiking layer needs spikingjelly
(the ``snn`` extra), and says so when it is missing. Importing it registers the spiking models
by name (:func:`qfv_brevitas.zoo.models.build_model`, checkpoints). The spiking job,
:func:`run_snn_experiment` and :func:`format_snn_results` (:mod:`qfv_brevitas.snn.experiment`,
which uses the experiment code of :mod:`qfv_brevitas.studies`), loads on first use.
"""
from qfv_brevitas.snn.config import ENCODINGS, LAYOUTS, SURROGATES, SpikingConfig
from qfv_brevitas.snn.data import (NEUROMORPHIC, SNN_DATASETS, SNNData, load_neuromorphic, load_snn_dataset,
                   rate_coded_digits, synthetic_events)
from qfv_brevitas.snn.models import (SPIKING_MODEL_NAMES, DigitsCNN, ResNet19, bn_mlp, build_spiking_model, spiking_mlp,
                     spiking_resnet19, spiking_small_cnn, spiking_vgg11)
from qfv_brevitas.snn.network import SpikingNet, lif_layers, snn_export_metadata, to_spiking
from qfv_brevitas.snn.neurons import LIF, SNNDependencyError, rate_encode

__all__ = [
    "ENCODINGS", "LAYOUTS", "SURROGATES", "SpikingConfig", "NEUROMORPHIC", "SNN_DATASETS",
    "SNNData", "load_neuromorphic", "load_snn_dataset", "rate_coded_digits", "synthetic_events",
    "format_snn_results", "run_snn_experiment", "SPIKING_MODEL_NAMES", "DigitsCNN", "ResNet19", "bn_mlp",
    "build_spiking_model", "spiking_mlp", "spiking_resnet19", "spiking_small_cnn",
    "spiking_vgg11", "SpikingNet", "lif_layers", "snn_export_metadata", "to_spiking", "LIF",
    "SNNDependencyError", "rate_encode",
]

_LAZY = {"run_snn_experiment", "format_snn_results"}


def __getattr__(name: str):
    # The spiking job pulls in the studies layer: loaded when first asked for, not on import.
    if name in _LAZY:
        from qfv_brevitas.snn import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
