"""The model registry of :mod:`qfv_brevitas.zoo.models`: built-in and registered models by
name, the spiking ones registered by :mod:`qfv_brevitas.snn`, clear errors otherwise."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qfv_brevitas.snn  # noqa: F401  (registers the spiking models)
from qfv_brevitas.snn.models import SPIKING_MODEL_NAMES
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.zoo import models as M


def test_builtin_and_spiking_models_are_registered():
    assert M.MODEL_NAMES == ("small_cnn", "mlp", "resnet18", "vgg")
    assert "tiny_lm" in M.LANGUAGE_MODELS and "tiny_lm" not in M.model_names()
    assert set(M.MODEL_NAMES) | set(SPIKING_MODEL_NAMES) == set(M.model_names())
    assert M.build_model("mlp", (1, 8, 8), 10)(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_register_model_adds_a_builder_and_refuses_a_second_of_the_same_name(monkeypatch):
    monkeypatch.setattr(M, "_REGISTRY", dict(M._REGISTRY))

    @M.register_model("tiny")
    def tiny(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], num_classes))

    assert "tiny" in M.model_names()
    assert M.build_model("tiny", (1, 1, 5), 3)(torch.rand(4, 1, 1, 5)).shape == (4, 3)
    with pytest.raises(QfvError, match="a model named 'tiny' is registered already"):
        M.register_model("tiny")(lambda s, n: nn.Identity())
    with pytest.raises(QfvError, match="a model name is a non-empty str"):
        M.register_model("")


def test_unknown_names_say_what_to_do(monkeypatch):
    with pytest.raises(QfvError, match=r"unknown model 'alexnet'; choose one of small_cnn, mlp"):
        M.build_model("alexnet", (1, 8, 8), 10)
    # Without qfv_brevitas.snn's registrations a spiking name points at the snn extra.
    monkeypatch.setattr(M, "_REGISTRY", {k: v for k, v in M._REGISTRY.items()
                                         if not k.startswith("spiking_")})
    with pytest.raises(QfvError, match=r"spiking models are registered by qfv_brevitas\.snn; "
                                       r"install the snn extra"):
        M.build_model("spiking_mlp", (1, 8, 8), 10)
