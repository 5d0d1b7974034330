"""The one configuration base (:class:`qfv_brevitas.util.configbase.QfvConfig`): every
configuration round-trips through ``to_dict`` / ``from_dict`` with a format version, a legacy
dict (written before the version key existed) still reads, a dict from a newer version and
unknown keys are refused by name; the readers of stored configurations (checkpoints, fault
and variability map files, spiking settings) go through it."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from qfv_brevitas.chip.bitflips import BitFlipModel
from qfv_brevitas.chip.faults import FaultMap, FaultMapError, FaultModel, sample_fault_map
from qfv_brevitas.chip.variability import (VariabilityMap, VariabilityMapError, VariabilityModel,
                                           sample_variability_map)
from qfv_brevitas.core.config import LambdaSchedule, NMultConfig
from qfv_brevitas.core.convert import quantize_model
from qfv_brevitas.training.train import TrainConfig
from qfv_brevitas.snn.config import SpikingConfig
from qfv_brevitas.util.configbase import VERSION_KEY, QfvConfig
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.safeio import content_digest
from qfv_brevitas.zoo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from qfv_brevitas.zoo.models import build_model

#: One non-default instance of every configuration dataclass of the library.
CONFIGS = [
    NMultConfig(weight_bits=3, act_bits=None, variant="step", per_channel=True,
                layer_bits={"fc": 2}, act_collect_stats_steps=5),
    LambdaSchedule(total_epochs=10, start=50.0, end=500.0, rise_epochs=5),
    TrainConfig(epochs=3, lr=0.01, quant_optimizer="sgd", reg_shape="gauss", reg_width=0.5,
                sam_rho=0.05, refit_every=0),
    FaultModel(rate=0.1, sa1_fraction=0.2, layer_rates={"fc": 0.0}, seed=3),
    VariabilityModel(sigma=0.1, hrs_on_off=10, hrs_sigma=0.05, distribution="lognormal",
                     seed=1, layer_sigmas={"fc": 0.2}, chip_sigma=0.1, chip_seed=4),
    BitFlipModel(rate=0.01, seed=2, layer_rates={"fc": 0.5}),
    SpikingConfig(T=3, tau=2.0, v_reset=None, surrogate="sigmoid", encoding="direct",
                  sample_ndim=1, eval_seed=7),
]
IDS = [type(c).__name__ for c in CONFIGS]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_round_trip_through_json(cfg):
    d = cfg.to_dict()
    assert isinstance(cfg, QfvConfig) and d[VERSION_KEY] == type(cfg).VERSION
    back = type(cfg).from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back is not cfg
    assert back.to_dict() == d


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_a_legacy_dict_without_version_reads(cfg):
    legacy = dataclasses.asdict(cfg)  # what to_dict wrote before the version key
    assert VERSION_KEY not in legacy
    assert type(cfg).from_dict(legacy) == cfg


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_a_dict_of_a_newer_version_is_refused(cfg):
    d = dict(cfg.to_dict(), **{VERSION_KEY: type(cfg).VERSION + 1})
    name = type(cfg).__name__
    with pytest.raises(QfvError, match=rf"^{name}: settings of format version "
                                       rf"{type(cfg).VERSION + 1}.*upgrade qfv-brevitas"):
        type(cfg).from_dict(d)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_unknown_keys_are_refused_by_name(cfg):
    d = dict(cfg.to_dict(), colour="red", zeta=1)
    with pytest.raises(QfvError, match=r"unknown setting\(s\) 'colour', 'zeta'; known: "):
        type(cfg).from_dict(d)


@pytest.mark.parametrize("bad, match", [
    ([("rate", 0.1)], "FaultModel: expected a dict of settings, got list"),
    ({"rate": 0.1, VERSION_KEY: "1"}, "config_version must be a positive integer, got '1'"),
    ({"rate": 0.1, VERSION_KEY: 0}, "config_version must be a positive integer, got 0"),
    ({"rate": 2}, r"FaultModel.rate must be a number in \[0, 1\]"),  # validated as when built
])
def test_from_dict_refuses_bad_input(bad, match):
    with pytest.raises(QfvError, match=match):
        FaultModel.from_dict(bad)


def test_validate_runs_on_every_construction_and_replace():
    cfg = TrainConfig()
    with pytest.raises(QfvError, match=r"TrainConfig\.lr must be a finite number > 0, got 0"):
        dataclasses.replace(cfg, lr=0)
    with pytest.raises(QfvError, match="sam_rho must be a finite number >= 0"):
        TrainConfig(sam_rho=-1)


def test_defaults_live_in_the_dataclass_fields():
    # TrainConfig's lambda schedule is LambdaSchedule's defaults, not a copy of them.
    t, s = TrainConfig(epochs=30), LambdaSchedule(total_epochs=30)
    assert t.schedule() == s


# -- readers of stored configurations -----------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                                        nn.Linear(16, 10)),
                          NMultConfig(weight_bits=4, act_bits=None, first_last_bits=None))


def _reseal(path, edit):
    """Edit a saved dict (checkpoint or map) and re-seal its checksum, as an older version
    of the library would have written it."""
    data = torch.load(path, weights_only=True)
    edit(data)
    data["sha256"] = content_digest(data)
    torch.save(data, path)


def test_checkpoint_with_a_legacy_config_loads(tmp_path):
    cfg = NMultConfig(weight_bits=4, act_bits=None, first_last_bits=None)
    q = quantize_model(build_model("mlp", (1, 8, 8), 10), cfg)
    path = save_checkpoint(tmp_path / "q.pt", q, "mlp", (1, 8, 8), 10, cfg)
    assert torch.load(path, weights_only=True)["config"][VERSION_KEY] == 1
    _reseal(path, lambda d: d["config"].pop(VERSION_KEY))
    assert load_checkpoint(path)[1]["config"] == cfg
    _reseal(path, lambda d: d["config"].update({VERSION_KEY: 99}))
    with pytest.raises(CheckpointError, match=r"q\.pt: its quantization config does not fit: "
                                              r"NMultConfig: settings of format version 99"):
        load_checkpoint(path)


def test_fault_map_file_with_legacy_meta_loads(tmp_path):
    fm = FaultModel(rate=0.2, layer_rates={"3": 0.5}, seed=4)
    path = tmp_path / "f.pt"
    sample_fault_map(_model(), fm).save(path)
    _reseal(path, lambda d: d["meta"].pop(VERSION_KEY))
    back = FaultMap.load(path)
    assert back.meta == fm.to_dict() and FaultModel.from_dict(back.meta) == fm
    _reseal(path, lambda d: d["meta"].update(colour=1))
    with pytest.raises(FaultMapError, match=r"damaged fault map: .*unknown setting\(s\) 'colour'"):
        FaultMap.load(path)


def test_variability_map_file_with_legacy_meta_loads(tmp_path):
    vm = VariabilityModel(sigma=0.1, chip_sigma=0.2, seed=2)
    vmap = sample_variability_map(_model(), vm)
    path = tmp_path / "v.pt"
    vmap.save(path)
    _reseal(path, lambda d: d["meta"].pop(VERSION_KEY))
    back = VariabilityMap.load(path)
    assert back.meta == vmap.meta and back.meta["shared_factors"] == vmap.meta["shared_factors"]
    _reseal(path, lambda d: d["meta"].update({VERSION_KEY: 2}))
    with pytest.raises(VariabilityMapError, match="damaged variability map: .*format version 2"):
        VariabilityMap.load(path)


def test_spiking_settings_of_a_checkpoint_read_legacy_and_refuse_unknown():
    pytest.importorskip("spikingjelly")
    legacy = dataclasses.asdict(SpikingConfig(T=2))
    assert build_model("spiking_mlp", (1, 8, 8), 10, snn=legacy).config == SpikingConfig(T=2)
    with pytest.raises(QfvError, match=r"SpikingConfig: unknown setting\(s\) 'colour'"):
        build_model("spiking_mlp", (1, 8, 8), 10, snn=dict(legacy, colour=1))
