"""Plain torch reference models (no Brevitas): quantize them with
:func:`qfv_brevitas.quantize_model`. Models are built by name from a registry
(:func:`register_model`, :func:`build_model`) that other packages add to (the spiking models of
:mod:`qfv_brevitas.snn`), extended by installed plugins (entry point group
``qfv_brevitas.models``) and by a user's ``module:function`` (see
:mod:`qfv_brevitas.util.plugins`)."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.plugins import (MODELS_GROUP, call_accepting, import_user_object,
                                       is_user_spec, load_plugin, plugin_names)

__all__ = ["SmallCNN", "MLP", "resnet18_cifar", "vgg_cifar", "build_model", "MODEL_NAMES",
           "register_model", "model_names", "user_model"]


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


# -- the registry ------------------------------------------------------------------------------

#: ``name -> (builder, takes_snn)``; filled by :func:`register_model`.
_REGISTRY: Dict[str, Tuple[Callable[..., nn.Module], bool]] = {}


def register_model(name: str, snn: bool = False) -> Callable:
    """Decorator: register ``builder(input_shape, num_classes)`` under ``name`` for
    :func:`build_model` (and so for checkpoints and the ``qfv`` commands). With ``snn=True``
    the builder also takes ``snn``, the spiking settings (a ``SpikingConfig`` dict, or
    ``None``), as a keyword: :mod:`qfv_brevitas.snn` registers its models that way when it is
    imported.

    >>> @register_model("tiny_linear")
    ... def _tiny(input_shape, num_classes):
    ...     return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], num_classes))
    >>> build_model("tiny_linear", (1, 1, 4), 3)(torch.rand(2, 1, 1, 4)).shape
    torch.Size([2, 3])
    >>> del _REGISTRY["tiny_linear"]
    """
    if not isinstance(name, str) or not name:
        raise QfvError(f"register_model: a model name is a non-empty str, got {name!r}")

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name][0] is not builder:
            raise QfvError(f"register_model: a model named {name!r} is registered already")
        _REGISTRY[name] = (builder, bool(snn))
        return builder

    return register


def model_names(spiking: bool = True) -> Tuple[str, ...]:
    """Every registered model name (the spiking ones once :mod:`qfv_brevitas.snn` is
    imported; none with ``spiking=False``), then the installed plugins' (their code is not
    imported)."""
    own = tuple(n for n, (_, takes_snn) in _REGISTRY.items() if spiking or not takes_snn)
    return own + plugin_names(MODELS_GROUP, _REGISTRY)


@register_model("small_cnn")
def _small_cnn(input_shape: Tuple[int, ...], num_classes: int) -> nn.Module:
    return SmallCNN(input_shape[0], num_classes)


@register_model("mlp")
def _mlp(input_shape: Tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes)


@register_model("resnet18")
def _resnet18(input_shape: Tuple[int, ...], num_classes: int) -> nn.Module:
    return resnet18_cifar(num_classes, input_shape[0])


@register_model("vgg")
def _vgg(input_shape: Tuple[int, ...], num_classes: int) -> nn.Module:
    return vgg_cifar(num_classes, input_shape[0], input_size=min(input_shape[1:]))


#: The plain reference models (the spiking ones are :data:`qfv_brevitas.snn.SPIKING_MODEL_NAMES`).
MODEL_NAMES = tuple(_REGISTRY)


def _tiny_lm(input_shape: Tuple[int, ...], num_classes: int) -> nn.Module:
    """The small transformer of :mod:`qfv_brevitas.zoo.lm`: ``input_shape = (context,)``,
    ``num_classes`` = its vocabulary (256 for bytes)."""
    from qfv_brevitas.zoo.lm import TinyLM

    if len(input_shape) != 1:
        raise QfvError(f"tiny_lm takes token sequences: input_shape (context,), got "
                       f"{tuple(input_shape)}")
    return TinyLM(vocab=num_classes, context=int(input_shape[0]))


#: language models :func:`build_model` builds by name (checkpoints of ``qfv lm``); not offered
#: to the image commands' ``--model``
LANGUAGE_MODELS: Dict[str, Callable[..., nn.Module]] = {"tiny_lm": _tiny_lm}


def _register_spiking_models() -> None:
    """Import :mod:`qfv_brevitas.snn`, which registers the spiking models (a layer above the
    zoo: found by name, like a plugin), when its extra is installed."""
    import importlib

    try:
        importlib.import_module("qfv_brevitas.snn")
    except ImportError:
        pass  # the error below says which extra to install


def build_model(name: str, input_shape: Tuple[int, ...], num_classes: int,
                snn: Optional[dict] = None) -> nn.Module:
    """A registered model (:func:`register_model`) by name for inputs of shape ``(C, H, W)``,
    or a language model of :data:`LANGUAGE_MODELS` (``input_shape = (context,)``);
    ``spiking_*`` names are the spiking models of :mod:`qfv_brevitas.snn`, built with
    the spiking settings ``snn`` (a ``SpikingConfig`` dict; ignored by the other models).

    ``name`` may also be an installed plugin's model or ``module:function``: a builder called
    with ``input_shape=`` and ``num_classes=`` for those of the two it names
    (:func:`user_model`)."""
    if is_user_spec(name):
        return user_model(import_user_object(name, "--model"), name, input_shape, num_classes)
    if name in LANGUAGE_MODELS:
        return LANGUAGE_MODELS[name](input_shape, num_classes)
    if name not in _REGISTRY and name in model_names():
        builder = load_plugin(MODELS_GROUP, name, _callable_builder)
        return user_model(builder, name, input_shape, num_classes)
    if name not in _REGISTRY and name.startswith("spiking_"):
        _register_spiking_models()
    if name not in _REGISTRY:
        if name.startswith("spiking_"):
            raise QfvError(
                f"unknown model {name!r}: spiking models are registered by qfv_brevitas.snn; "
                "install the snn extra (pip install 'qfv-brevitas[snn]') and import "
                "qfv_brevitas.snn first")
        raise QfvError(f"unknown model {name!r}; choose one of {', '.join(model_names())}, "
                       "or give module:function (your own builder)")
    builder, takes_snn = _REGISTRY[name]
    if takes_snn:
        return builder(input_shape, num_classes, snn=snn)
    return builder(input_shape, num_classes)


def _callable_builder(name: str, obj) -> Callable[..., nn.Module]:
    """A plugin's model builder, checked to be callable (:func:`load_plugin`)."""
    if not callable(obj):
        raise QfvError(f"a model plugin names a builder function, got a {type(obj).__name__}")
    return obj


def user_model(builder: Callable[..., nn.Module], name: str, input_shape: Tuple[int, ...],
               num_classes: int) -> nn.Module:
    """``builder(input_shape=..., num_classes=...)`` (those of the two it names, see
    :func:`~qfv_brevitas.util.plugins.call_accepting`), checked to be an ``nn.Module``; the
    error names ``name``.

    >>> user_model(lambda num_classes: nn.Linear(4, num_classes), "mine", (4,), 3)
    Linear(in_features=4, out_features=3, bias=True)
    """
    try:
        model = call_accepting(builder, input_shape=tuple(int(d) for d in input_shape),
                               num_classes=int(num_classes))
    except Exception as e:  # the user's code failed: say whose, not "a bug in qfv"
        raise QfvError(f"model {name!r}: its builder raised {type(e).__name__}: "
                       f"{str(e).strip()[:300]}") from e
    if not isinstance(model, nn.Module):
        raise QfvError(f"model {name!r}: its builder returned a {type(model).__name__}, not a "
                       "torch.nn.Module")
    return model
