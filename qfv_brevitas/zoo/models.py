"""Plain torch reference models (no Brevitas): quantize them with
:func:`qfv_brevitas.quantize_model`."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["SmallCNN", "MLP", "resnet18_cifar", "vgg_cifar", "build_model", "MODEL_NAMES"]

MODEL_NAMES = ("small_cnn", "mlp", "resnet18", "vgg")


class SmallCNN(nn.Module):
    """Three conv blocks and two linear layers; fits 8x8 digits and 28x28 MNIST alike."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w // 2, 3, padding=1, bias=False), nn.BatchNorm2d(w // 2),
            nn.ReLU(),
            nn.Conv2d(w // 2, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w, 2 * w), nn.ReLU(), nn.Linear(2 * w, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        layers, prev = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))  # residual add


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool), plain torch."""

    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNetCIFAR:
    """ResNet-18 for 32x32 inputs (11.2M parameters at width 64)."""
    return ResNetCIFAR((2, 2, 2, 2), num_classes, in_channels, width)


def vgg_cifar(num_classes: int = 10, in_channels: int = 3,
              cfg: Sequence = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
              input_size: int = 32) -> nn.Module:
    """VGG-11-style network with BatchNorm, plain torch; its five poolings fit 32x32 inputs.
    For smaller inputs (``input_size``, the smaller side) the poolings that would leave less
    than one pixel are left out (8x8 digits keep three, 28x28 images four).

    >>> vgg_cifar(10, 1, input_size=8)(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    layers, cin, size = [], in_channels, int(input_size)
    for v in cfg:
        if v == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def build_model(name: str, input_shape: Tuple[int, ...], num_classes: int,
                snn: Optional[dict] = None) -> nn.Module:
    """A reference model by name for inputs of shape ``(C, H, W)``; ``spiking_*`` names are
    the spiking models of :mod:`qfv_brevitas.snn`, built with ``SpikingConfig(**snn)``."""
    if name.startswith("spiking_"):
        from qfv_brevitas.snn import SpikingConfig, build_spiking_model  # spikingjelly: the snn extra

        return build_spiking_model(name, input_shape, num_classes,
                                   SpikingConfig(**(snn or {})))
    if name == "small_cnn":
        return SmallCNN(input_shape[0], num_classes)
    if name == "mlp":
        n = 1
        for d in input_shape:
            n *= d
        return MLP(n, num_classes)
    if name == "resnet18":
        return resnet18_cifar(num_classes, input_shape[0])
    if name == "vgg":
        return vgg_cifar(num_classes, input_shape[0], input_size=min(input_shape[1:]))
    raise ValueError(f"unknown model {name!r}; choose small_cnn, mlp, resnet18 or vgg")
