"""Spiking reference models: VGG-11 and ResNet-19 of the paper (section 4.2), and small ones
for the digits. Each is a plain torch network made spiking by :func:`to_spiking` (ReLU -> LIF,
max-pooling -> average pooling); quantize it with :func:`qfv_brevitas.quantize_model` and
``NMultConfig(act_bits=None)``. Importing this module registers them under their names in
:func:`qfv_brevitas.zoo.models.build_model`'s registry."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from qfv_brevitas.snn.config import SpikingConfig
from qfv_brevitas.snn.network import SpikingNet, to_spiking
from qfv_brevitas.util.validate import check_choice
from qfv_brevitas.zoo.models import ResNetCIFAR, register_model, vgg_cifar

__all__ = ["ResNet19", "DigitsCNN", "bn_mlp", "spiking_vgg11", "spiking_resnet19", "spiking_small_cnn", "spiking_mlp",
           "build_spiking_model", "SPIKING_MODEL_NAMES"]

#: VGG-11's convolution plan ("M" = pooling, average in the spiking version).
VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class ResNet19(ResNetCIFAR):
    """ResNet-19 (Zheng et al., 2021): a 3x3 stem, three stages of basic blocks (3, 3, 2) at
    ``width``, ``2 * width`` and ``4 * width`` channels (128/256/512 in the paper), global
    average pooling and two linear layers (``4 * width`` -> 256 -> classes): 19 weight layers.
    Plain torch with ReLU; :func:`spiking_resnet19` makes it spiking."""

    def __init__(self, num_classes: int = 10, in_channels: int = 2, width: int = 128,
                 hidden: int = 256):
        # The CIFAR ResNet's stem and stages, with (3, 3, 2) blocks and a two-layer head.
        super().__init__((3, 3, 2), num_classes, in_channels, width)
        cin = self.fc.in_features
        del self.fc
        self.fc1 = nn.Linear(cin, hidden)
        self.relu_fc = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc2(self.relu_fc(self.fc1(torch.flatten(self.pool(x), 1))))


def _cfg(config: Optional[SpikingConfig], **defaults) -> SpikingConfig:
    if config is None:
        return SpikingConfig(**defaults)
    return config


def spiking_vgg11(num_classes: int = 10, in_channels: int = 2, width: int = 64,
                  config: Optional[SpikingConfig] = None) -> SpikingNet:
    """Spiking VGG-11 with BatchNorm (widths 64..512 at ``width=64``), average pooling,
    global average pooling and a linear classifier; for 48x48 event frames by default
    (``encoding="none"``, batch-first ``(N, T, 2, 48, 48)`` batches as the loaders give).

    >>> spiking_vgg11(10, width=8, config=SpikingConfig(T=2, encoding="none"))(
    ...     torch.rand(2, 3, 2, 48, 48)).shape
    torch.Size([3, 10])
    """
    plan = tuple(v if v == "M" else max(1, v * width // 64) for v in VGG11)
    return to_spiking(vgg_cifar(num_classes, in_channels, plan),
                      _cfg(config, T=10, encoding="none", layout="batch_first"))


def spiking_resnet19(num_classes: int = 10, in_channels: int = 2, width: int = 128,
                     config: Optional[SpikingConfig] = None) -> SpikingNet:
    """Spiking ResNet-19 (LIF after each block's residual add); defaults as
    :func:`spiking_vgg11`.

    >>> spiking_resnet19(10, width=4, config=SpikingConfig(T=2, encoding="none"))(
    ...     torch.rand(2, 3, 2, 16, 16)).shape
    torch.Size([3, 10])
    """
    return to_spiking(ResNet19(num_classes, in_channels, width),
                      _cfg(config, T=10, encoding="none", layout="batch_first"))


class DigitsCNN(nn.Module):
    """A small plain CNN made to spike well: every hidden synaptic layer is followed by
    BatchNorm (normalised currents keep the LIF layers firing from the start; a hidden Linear
    without it, as in :class:`~qfv_brevitas.zoo.models.SmallCNN`, starts silent at tau = 4 and does
    not learn) and the readout is a single Linear layer. Max-pooling and ReLU, like any user
    network: :func:`spiking_small_cnn` converts it."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * w, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def bn_mlp(in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (128, 64)
           ) -> nn.Sequential:
    """A plain MLP (flattening its input) with BatchNorm before each ReLU."""
    layers, prev = [nn.Flatten()], in_features
    for h in hidden:
        layers += [nn.Linear(prev, h, bias=False), nn.BatchNorm1d(h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def spiking_small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16,
                      config: Optional[SpikingConfig] = None) -> SpikingNet:
    """:class:`DigitsCNN`, spiking; rate-codes static images by default (digits, MNIST).

    >>> spiking_small_cnn(width=8)(torch.rand(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """
    return to_spiking(DigitsCNN(in_channels, num_classes, width), _cfg(config))


def spiking_mlp(in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (128, 64),
                config: Optional[SpikingConfig] = None) -> SpikingNet:
    """:func:`bn_mlp`, spiking."""
    return to_spiking(bn_mlp(in_features, num_classes, hidden), _cfg(config))


#: ``name -> builder(input_shape, num_classes, config)`` of the spiking reference models.
_BUILDERS: Dict[str, Callable[..., SpikingNet]] = {}


def _spiking_model(name: str) -> Callable:
    """Decorator: register ``builder(input_shape, num_classes, config)`` under ``name`` for
    :func:`build_spiking_model` and in :func:`qfv_brevitas.zoo.models.register_model`'s registry
    (there with the settings as a ``SpikingConfig`` dict, as checkpoints store them)."""

    def register(builder: Callable[..., SpikingNet]) -> Callable[..., SpikingNet]:
        _BUILDERS[name] = builder

        @register_model(name, snn=True)
        def from_settings(input_shape, num_classes, snn: Optional[dict] = None) -> SpikingNet:
            return builder(input_shape, num_classes, SpikingConfig.from_dict(snn or {}))

        return builder

    return register


@_spiking_model("spiking_small_cnn")
def _small_cnn(input_shape, num_classes, config):
    return spiking_small_cnn(num_classes, input_shape[0], config=config)


@_spiking_model("spiking_mlp")
def _mlp(input_shape, num_classes, config):
    return spiking_mlp(math.prod(input_shape), num_classes, config=config)


@_spiking_model("spiking_vgg11")
def _vgg11(input_shape, num_classes, config):
    return spiking_vgg11(num_classes, input_shape[0], config=config)


@_spiking_model("spiking_resnet19")
def _resnet19(input_shape, num_classes, config):
    return spiking_resnet19(num_classes, input_shape[0], config=config)


SPIKING_MODEL_NAMES = tuple(_BUILDERS)


def build_spiking_model(name: str, input_shape: Tuple[int, ...], num_classes: int,
                        config: Optional[SpikingConfig] = None) -> SpikingNet:
    """A spiking reference model by name for samples of shape ``(C, H, W)`` (one frame).

    >>> build_spiking_model("spiking_mlp", (1, 8, 8), 10, SpikingConfig(T=2)).T
    2
    """
    check_choice(name, SPIKING_MODEL_NAMES, "spiking model")
    return _BUILDERS[name](input_shape, num_classes, config)
