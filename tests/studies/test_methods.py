"""Tests of ``qfv_brevitas.studies.methods``: the decorator registry of study methods (a method
registered there appears in ``qfv compare``'s choices and runs; a name registered twice and a
method applied to a scenario kind it does not support are refused) and random-bit-error
training."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Subset

from qfv_brevitas import FaultModel, attach_faults, nmult_layers, sample_fault_map
from qfv_brevitas.studies import compare_faults
from qfv_brevitas.chip.bitflips import BitFlipModel, bitflip_injectors
from qfv_brevitas.cli.app import build_parser
from qfv_brevitas.training.train import TrainConfig, evaluate, fit
from qfv_brevitas.studies.compare import compare_methods
from qfv_brevitas.studies.engine import CompareConfig, run_study
from qfv_brevitas.studies.methods import (METHODS, get_method, method_names,
                                          random_bit_error_finetune, register_method,
                                          unregister_method)
from qfv_brevitas.studies.scenario import Scenario

EXEMPT = {"features.0": 0.0, "classifier.3": 0.0}


@pytest.fixture
def halved():
    """A method registered for the test (and removed after it): per map, it halves the first
    inner layer's weights; it applies to faults only."""
    calls = []

    @register_method("halved", applies_to=("faults",), needs_train=False)
    def halved_method(model, scenario, train, config):
        calls.append((scenario.kind, scenario.level))
        with torch.no_grad():
            nmult_layers(model)[1][1].weight.mul_(0.5)

    yield calls
    unregister_method("halved")


def _choices(*path):
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[name]
    return next(a for a in parser._actions if "--methods" in a.option_strings).choices


def test_a_registered_method_is_a_choice_of_qfv_compare_and_runs(halved, trained, digits):
    model, _ = trained
    assert "halved" in method_names() and "halved" not in METHODS
    assert "halved" in _choices("compare") and "halved" in _choices("faults", "compare")
    assert "halved" not in _choices("variability", "compare")
    m = get_method("halved")
    assert m.per_map and m.applies_to == ("faults",) and not m.needs_train
    res = compare_methods(model, None, digits[1], [Scenario("faults", 0.1),
                                                    Scenario("variability", 0.2)],
                          ["none", "halved"], CompareConfig(trials=1, seed=2,
                                                            selftune_on_top=False),
                          progress=False)
    assert halved == [("faults", 0.1)]  # once per faults map; n/a under variability
    rows = {(r["scenario"], r["method"]): r["acc"] for r in res.rows}
    assert ("LRS 20%", "halved") not in rows and ("LRS 20%", "none") in rows
    chip = attach_faults(copy.deepcopy(model), sample_fault_map(model, FaultModel(
        0.1, seed=2, layer_rates=EXEMPT)))
    with torch.no_grad():
        nmult_layers(chip)[1][1].weight.mul_(0.5)
    assert rows[("stuck-at 10%", "halved")] == evaluate(chip, digits[1])
    assert "| halved |" in res.table()


def test_registering_a_name_twice_is_an_error(halved):
    with pytest.raises(ValueError, match="method 'halved' is registered already"):
        register_method("halved")(lambda model, scenario, train, config: None)
    with pytest.raises(ValueError, match="method 'paper' is registered already"):
        register_method("paper", per_map=False)(lambda model, train, config: None)
    with pytest.raises(ValueError, match="unknown scenario kind of method 'x': 'stuck'"):
        register_method("x", applies_to=("stuck",))
    with pytest.raises(ValueError, match="without '\\+'"):
        register_method("a+b")
    assert get_method("paper").applies("faults") and not get_method("paper").applies("bitflips")


def test_a_method_on_a_kind_it_does_not_support_is_refused(halved, trained, digits):
    model, _ = trained
    with pytest.raises(ValueError, match="method 'paper' does not apply to bitflips scenarios "
                                         r"\(it applies to faults, variability\)"):
        run_study(model, digits[0], digits[1], [Scenario("bitflips", 0.01)], ["paper"],
                  CompareConfig(trials=1), kind="bitflips", progress=False)
    with pytest.raises(ValueError, match="method 'halved' does not apply to variability"):
        run_study(model, None, digits[1], [Scenario("variability", 0.1)], ["halved"],
                  CompareConfig(trials=1), kind="variability", progress=False)
    with pytest.raises(ValueError, match="a faults study takes faults scenarios"):
        run_study(model, None, digits[1], [Scenario("variability", 0.1)], ["none"],
                  CompareConfig(trials=1), kind="faults", progress=False)
    res = compare_faults(model, None, digits[1], [0.1], trials=1, methods=["halved"],
                         progress=False)
    assert [r["method"] for r in res.rows] == ["halved"]


def test_a_training_method_without_training_data_is_refused(trained, digits):
    model, _ = trained
    with pytest.raises(ValueError, match="give a training set: paper"):
        compare_faults(model, None, digits[1], [0.1], trials=1, methods=["none", "paper"],
                       progress=False)


def test_random_bit_error_training_trains_through_flips(trained, digits):
    model, _ = trained
    train = Subset(digits[0], range(320))
    cfg = TrainConfig(epochs=1, lr=0.01, lambda_rise_epochs=1)
    flipped = copy.deepcopy(model)
    random_bit_error_finetune(flipped, train, None, cfg, BitFlipModel(rate=0.05, seed=0),
                              progress=False)
    assert bitflip_injectors(flipped) == {}  # removed afterwards
    plain = copy.deepcopy(model)
    fit(plain, train, None, cfg, progress=False)
    zero = copy.deepcopy(model)
    random_bit_error_finetune(zero, train, None, cfg, BitFlipModel(rate=0.0, seed=0),
                              progress=False)
    # Flips in the loop change the result; the path itself (rate 0: the STE forward through the
    # snapped weights) trains to somewhere else than the paper's full-precision forward, too.
    w = lambda m: torch.cat([l.weight.detach().flatten() for _, l in nmult_layers(m)])  # noqa
    assert not torch.equal(w(flipped), w(zero))
    assert not torch.equal(w(zero), w(plain))
