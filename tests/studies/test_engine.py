"""Tests of ``qfv_brevitas.studies.engine``: one runner behind every entry point (a sweep and a
comparison give the same accuracy on the same map), compare_methods with HRS and lognormal
variability, level 0 as the ideal device (but not with an HRS leak), the engine's checks."""
from __future__ import annotations

import copy

import pytest
import torch

from qfv_brevitas import (VariabilityModel, attach_variability, nmult_layers,
                          sample_variability_map, set_deploy_mapping)
from qfv_brevitas.core.quantizers import quant_of
from qfv_brevitas.studies import evaluate_faults, evaluate_variability
from qfv_brevitas.training.train import evaluate
from qfv_brevitas.studies.compare import compare_methods
from qfv_brevitas.studies.engine import CompareConfig, check_trials, default_finetune, run_study
from qfv_brevitas.studies.results import StudyResult
from qfv_brevitas.studies.scenario import Scenario

EXEMPT = {"features.0": 0.0, "classifier.3": 0.0}
NO_TUNE = dict(selftune_on_top=False)


def test_sweeps_and_comparisons_run_on_the_same_engine(trained, digits):
    model, clean = trained
    test = digits[1]
    sweep = evaluate_faults(model, test, [0.0, 0.1], trials=2, seed=4, mapping="aware",
                            progress=False)
    direct = run_study(model, None, test, [Scenario("faults", 0.0), Scenario("faults", 0.1)],
                       ["nearest_valid"], CompareConfig(trials=2, seed=4, **NO_TUNE),
                       kind="faults", meta={"sa1_fraction": 0.5, "layers": "inner"},
                       progress=False)
    assert isinstance(direct, StudyResult) and direct.rows == sweep.rows
    assert direct.meta == sweep.meta
    cmp = compare_methods(model, None, test, [Scenario("faults", 0.1)], ["nearest_valid"],
                          CompareConfig(trials=2, seed=4, **NO_TUNE), progress=False)
    assert [r["acc"] for r in cmp.rows if r["scenario"] == "stuck-at 10%"] == \
        [r["acc"] for r in sweep.rows if r["level"] == 0.1]
    assert [r["acc"] for r in sweep.rows if r["level"] == 0.0] == [clean, clean]
    assert cmp.rows[0] == {"scenario": "ideal device", "kind": "ideal", "level": 0.0,
                           "chip_sigma": 0.0, "method": "nearest_valid", "trial": 0,
                           "seed": 4, "acc": clean}


def test_compare_methods_with_hrs_and_lognormal_variability(trained, digits):
    model, _ = trained
    test = digits[1]
    sc = Scenario("variability", 0.3, hrs_on_off=10, distribution="lognormal", chip_sigma=0.1)
    res = compare_methods(model, None, test, [sc], ["none", "nearest_valid"],
                          CompareConfig(trials=2, seed=6, **NO_TUNE), progress=False)
    assert res.scenario_labels == ["ideal device", "LRS 30% lognormal HRS 1/10 + chip 10%"]
    assert res.meta["scenarios"][0]["hrs_on_off"] == 10 and \
        res.meta["scenarios"][0]["distribution"] == "lognormal"
    for row in res.rows[2:]:
        m = copy.deepcopy(model)
        attach_variability(m, sample_variability_map(m, VariabilityModel(
            0.3, hrs_on_off=10, distribution="lognormal", chip_sigma=0.1, seed=row["seed"],
            chip_seed=row["seed"], layer_sigmas=EXEMPT)))
        set_deploy_mapping(m, "aware" if row["method"] == "nearest_valid" else "naive")
        assert row["acc"] == evaluate(m, test), row
    # the same maps as the sweep with the same settings
    sweep = evaluate_variability(model, test, [0.3], trials=2, seed=6, hrs_on_off=10,
                                 distribution="lognormal", chip_sigma=0.1, progress=False)
    assert [r["acc"] for r in sweep.rows] == [r["acc"] for r in res.rows[2:]
                                              if r["method"] == "none"]


def test_the_default_finetune_is_defined_once():
    ft = default_finetune()
    assert (ft.epochs, ft.lr, ft.lambda_rise_epochs) == (4, 0.005, 2)
    assert CompareConfig().finetune == ft


@pytest.mark.parametrize("bad", [0, 2.5, True, -1])
def test_trials_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="trials must be an integer >= 1"):
        check_trials(bad)


@pytest.mark.parametrize("bad", ["3", None, float("nan")])
def test_trials_refuse_strings_none_and_nan_with_the_same_message(bad):
    # one count validator (util.validate.check_count): a string used to pass as float("3")
    with pytest.raises(ValueError, match="trials must be an integer >= 1"):
        check_trials(bad)


def test_bad_studies_are_refused(trained, digits):
    model, _ = trained
    with pytest.raises(ValueError, match="unknown study kind 'maps'"):
        run_study(model, None, digits[1], [Scenario("faults", 0.1)], ["none"], kind="maps")
    with pytest.raises(TypeError, match="config must be a CompareConfig"):
        run_study(model, None, digits[1], [Scenario("faults", 0.1)], ["none"], config={})
    with pytest.raises(ValueError, match="unknown deploy mapping 'smart'"):
        run_study(model, None, digits[1], [Scenario("faults", 0.1)], ["none"],
                  mapping="smart")


def leaked_weights(layer, on_off: float) -> torch.Tensor:
    """Closed form of the HRS leak at sigma 0: a weight ``w = c + sum_i r_i S_i`` on cells whose
    "0" state adds ``r_i / on_off`` becomes ``w + (sum_i r_i - (w - c)) / on_off``."""
    tq = quant_of(layer)
    chip = tq.chip
    lrs, hrs = chip.lrs, chip.hrs
    chip.clear_variability()
    try:
        with torch.no_grad():
            w = tq.to_groups(layer.quant_weight().detach())
            r, c = tq.multipliers().detach(), tq.offset().detach()
    finally:
        chip.set_variability(lrs, hrs)
    leak = (r.sum(1, keepdim=True) - (w - c[:, None])) / on_off
    return tq.from_groups(w + leak, layer.weight.shape)


def test_sigma_zero_keeps_the_hrs_leak(trained, digits):
    # Issue 23: sigma 0 with --hrs-on-off 10 was run as the ideal device, so the step to any
    # sigma > 0 looked like a cliff caused by sigma. The leak is there at every sigma.
    model, clean = trained
    test = digits[1]
    assert not Scenario("variability", 0.0, hrs_on_off=10).is_ideal
    on_chip = Scenario("variability", 0.0, hrs_on_off=10).attach(copy.deepcopy(model), 3,
                                                                  layers="all")
    for name, layer in nmult_layers(on_chip):
        torch.testing.assert_close(layer.quant_weight().detach(), leaked_weights(layer, 10),
                                   rtol=0, atol=1e-6, msg=name)
        ideal = dict(nmult_layers(model))[name].quant_weight().detach()
        moved = layer.quant_weight().detach() != ideal  # all but the all-ones codes
        assert moved.sum() > moved.numel() // 2, name
    res = evaluate_variability(model, test, [0.0, 1e-7], trials=2, seed=3, hrs_on_off=10,
                               layers="all", progress=False)
    at = {(r["level"], r["trial"]): r["acc"] for r in res.rows}
    assert at[0.0, 0] == at[0.0, 1] == evaluate(on_chip, test) != clean
    assert at[1e-7, 0] == at[1e-7, 1] == at[0.0, 0]  # the sigma -> 0 limit, no cliff
    # without HRS, sigma 0 is still the ideal device
    plain = evaluate_variability(model, test, [0.0], trials=2, seed=3, progress=False)
    assert [r["acc"] for r in plain.rows] == [clean, clean]
