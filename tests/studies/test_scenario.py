"""Tests of ``qfv_brevitas.studies.scenario``: a Scenario carries every setting of its kind,
round-trips through to_dict/from_dict, refuses settings of another kind, and draws trial ``k``'s
map from ``seed + k`` (a variability chip's shared components from ``seed + k //
devices_per_chip``)."""
from __future__ import annotations

import copy

import pytest
import torch

from qfv_brevitas import (FaultModel, VariabilityModel, attach_faults, attach_variability,
                          nmult_layers, sample_fault_map, sample_variability_map)
from qfv_brevitas.studies.engine import CompareConfig
from qfv_brevitas.studies.scenario import Scenario, edge_layers, exempt_layers, scenarios
from qfv_brevitas.training.train import TrainConfig
from qfv_brevitas.util.configbase import VERSION_KEY


@pytest.mark.parametrize("sc", [
    Scenario("faults", 0.1, sa1_fraction=0.25),
    Scenario("bitflips", 0.02),
    Scenario("variability", 0.3, hrs_on_off=10.0, distribution="lognormal", chip_sigma=0.1,
             layer_shared_sigma=0.05, devices_per_chip=3),
])
def test_scenario_round_trips_through_a_dict(sc):
    d = sc.to_dict()
    assert d[VERSION_KEY] == Scenario.VERSION and d["kind"] == sc.kind
    assert Scenario.from_dict(d) == sc
    assert Scenario.from_dict({k: v for k, v in d.items() if k != VERSION_KEY}) == sc
    with pytest.raises(ValueError, match="unknown setting"):
        Scenario.from_dict(dict(d, sigma=0.1))


def test_compare_config_round_trips_with_its_finetune():
    cfg = CompareConfig(trials=3, seed=7, finetune=TrainConfig(epochs=2, lr=0.01,
                                                               lambda_rise_epochs=1),
                        sam_rho=0.1, layers="all")
    back = CompareConfig.from_dict(cfg.to_dict())
    assert back == cfg and isinstance(back.finetune, TrainConfig)
    assert CompareConfig().finetune.epochs == 4  # default_finetune(): one default


@pytest.mark.parametrize("kw,match", [
    (dict(kind="faults", level=0.1, chip_sigma=0.1), "chip_sigma applies to variability"),
    (dict(kind="bitflips", level=0.1, hrs_on_off=10), "hrs_on_off applies to variability"),
    (dict(kind="faults", level=0.1, distribution="lognormal"), "distribution applies to"),
    (dict(kind="variability", level=0.1, sa1_fraction=0.2), "sa1_fraction applies to faults"),
    (dict(kind="variability", level=0.1, distribution="cauchy"), "distribution"),
    (dict(kind="variability", level=0.1, hrs_on_off=0), "hrs_on_off"),
    (dict(kind="faults", level=0.1, sa1_fraction=2), "sa1_fraction"),
    (dict(kind="variability", level=0.1, devices_per_chip=0),
     "devices_per_chip must be an integer >= 1"),
    (dict(kind="variability", level=-0.1), r"sigma/mu must be in >= 0"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Scenario(**kw)


def test_labels_name_every_variability_setting():
    assert [s.label for s in scenarios(sigmas=[0.2], chip_sigma=0.1, hrs_on_off=10,
                                       distribution="lognormal")] == [
        "LRS 20% lognormal HRS 1/10", "LRS 20% lognormal HRS 1/10 + chip 10%"]


def test_attach_draws_the_map_of_seed_plus_trial(trained):
    model, _ = trained
    exempt = exempt_layers(model, "inner")
    assert exempt == dict.fromkeys(edge_layers(model), 0.0) and exempt_layers(model, "all") == {}
    x = torch.zeros(2, 1, 8, 8).normal_(generator=torch.Generator().manual_seed(0))
    sc = Scenario("faults", 0.2, sa1_fraction=0.3)
    got = sc.attach(copy.deepcopy(model), seed=5, trial=2)
    ref = attach_faults(copy.deepcopy(model), sample_fault_map(model, FaultModel(
        0.2, sa1_fraction=0.3, seed=7, layer_rates=exempt)))
    with torch.no_grad():
        assert torch.equal(got(x), ref(x))
    var = Scenario("variability", 0.2, chip_sigma=0.2, devices_per_chip=2, hrs_on_off=5)
    got = var.attach(copy.deepcopy(model), seed=5, trial=3, layers="all")
    ref = attach_variability(copy.deepcopy(model), sample_variability_map(model, VariabilityModel(
        0.2, seed=8, chip_sigma=0.2, chip_seed=6, hrs_on_off=5)))
    with torch.no_grad():
        assert torch.equal(got(x), ref(x))
    assert all(l.weight_quant.chip.has_variability for _, l in nmult_layers(got))


@pytest.mark.parametrize("scenario, ideal", [
    (Scenario("variability", 0.0), True), (Scenario("faults", 0.0), True),
    (Scenario("bitflips", 0.0), True), (Scenario("variability", 0.1), False),
    (Scenario("variability", 0.0, hrs_on_off=10), False),  # the HRS leak is a device effect
    (Scenario("variability", 0.0, chip_sigma=0.1), False),
    (Scenario("variability", 0.0, layer_shared_sigma=0.1), False)])
def test_only_a_scenario_without_any_device_effect_is_ideal(scenario, ideal):
    assert scenario.is_ideal is ideal
