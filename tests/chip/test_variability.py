"""Tests of ``qfv_brevitas.chip.variability``: per-cell LRS/HRS factor maps (sample, save, load,
validate, attach), and a model carrying faults and variability together.

Statistical checks use 99.9% bounds on the sample mean and standard deviation (the latter
with the distribution's kurtosis), and assert first that the bound is tight enough to catch
a wrong parameterisation. The deployed weights are recomputed from the contract's formula
with a brute-force nearest level, not with the library's device code.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from qfv_brevitas.chip.faults import FaultMap, FaultModel, attach_faults, detach_faults, \
    sample_fault_map
from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.chip.variability import (VariabilityMap, VariabilityMapError, VariabilityModel,
                                      attach_variability, detach_variability,
                                      sample_variability_map)

SMALL = [("fc1", (12, 16)), ("fc2", (16, 8)), ("fc3", (8, 3))]
BIG = [("a", (256, 256)), ("b", (256, 128))]
Z999 = 3.2905  # two-sided 99.9% standard normal quantile


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def lognormal_kurtosis(sigma: float) -> float:
    s2 = math.log1p(sigma * sigma)
    return math.exp(4 * s2) + 2 * math.exp(3 * s2) + 3 * math.exp(2 * s2) - 3


def assert_mean_std(x: torch.Tensor, mean: float, std: float, kurtosis: float, what: str,
                    resolution: float = 0.02) -> None:
    """Sample mean and std of ``x`` within 99.9% bounds of ``mean`` and ``std``; the std bound
    must be tighter than ``resolution * std``."""
    x = x.double().flatten()
    n = x.numel()
    mean_tol = Z999 * std / math.sqrt(n)
    std_tol = Z999 * std * math.sqrt((kurtosis - 1) / (4 * n))
    assert std_tol < resolution * std, f"{what}: sample too small (n={n})"
    assert abs(float(x.mean()) - mean) <= mean_tol, f"{what}: mean {float(x.mean())} vs {mean}"
    assert abs(float(x.std()) - std) <= std_tol, f"{what}: std {float(x.std())} vs {std}"


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(sigma=-0.1), "sigma must be a finite number >= 0"),
    (dict(sigma=float("nan")), "sigma must"), (dict(sigma=float("inf")), "sigma must"),
    (dict(sigma="0.1"), "sigma must"), (dict(sigma=None), "sigma must"),
    (dict(sigma=0.1, hrs_on_off=1.0), "hrs_on_off must be a finite number > 1"),
    (dict(sigma=0.1, hrs_on_off=0.5), "hrs_on_off"),
    (dict(sigma=0.1, hrs_on_off=-10), "hrs_on_off"),
    (dict(sigma=0.1, hrs_on_off=float("inf")), "hrs_on_off"),
    (dict(sigma=0.1, hrs_on_off="10"), "hrs_on_off"),
    (dict(sigma=0.1, hrs_on_off=10, hrs_sigma=-1), "hrs_sigma must"),
    (dict(sigma=0.1, hrs_sigma=0.1), "hrs_sigma is set but hrs_on_off is None"),
    (dict(sigma=0.1, distribution="gaussian"), "unknown .*distribution 'gaussian'.*lognormal"),
    (dict(sigma=0.1, layer_sigmas={"fc1": -0.2}), r"layer_sigmas\['fc1'\] must"),
    (dict(sigma=0.1, layer_sigmas={1: 0.2}), "layer names"),
    (dict(sigma=0.1, seed=0.5), "seed must be an integer"),
])
def test_variability_model_rejects_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        VariabilityModel(**kw)


# -- sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("distribution", ["normal", "lognormal"])
def test_zero_sigma_gives_factors_of_exactly_one(distribution, qmodel):
    model = qmodel(SMALL, layer_bits={"fc2": 3})
    vmap = sample_variability_map(model, VariabilityModel(sigma=0.0, distribution=distribution))
    for name, layer in nmult_layers(model):
        lrs, hrs = vmap.layers[name]
        bits = quant_of(layer).bits
        assert lrs.shape == layer.weight.shape + (bits,) and vmap.bits[name] == bits
        assert torch.equal(lrs, torch.ones_like(lrs)) and hrs is None
    with_hrs = sample_variability_map(model, VariabilityModel(
        sigma=0.0, hrs_on_off=10, distribution=distribution))
    for lrs, hrs in with_hrs.layers.values():
        assert torch.equal(lrs, torch.ones_like(lrs))
        assert torch.equal(hrs, torch.full_like(hrs, 1 / 10))


def test_same_seed_same_map_bitwise_different_seed_different(qmodel):
    model = qmodel(SMALL)
    vm = VariabilityModel(sigma=0.2, hrs_on_off=20, seed=5)
    a = sample_variability_map(model, vm)
    b = sample_variability_map(model, VariabilityModel(sigma=0.2, hrs_on_off=20, seed=5))
    c = sample_variability_map(model, VariabilityModel(sigma=0.2, hrs_on_off=20, seed=6))
    for name in a.layers:
        for i in range(2):
            assert torch.equal(a.layers[name][i], b.layers[name][i])
            assert not torch.equal(a.layers[name][i], c.layers[name][i])


def test_layers_draw_independently_of_the_rest_of_the_model(qmodel):
    base = qmodel([("fc1", (12, 16)), ("fc2", (16, 8))])
    bigger = qmodel([("pre", (12, 12)), ("fc1", (12, 16)), ("mid", (16, 16)), ("fc2", (16, 8))])
    vm = VariabilityModel(sigma=0.3, hrs_on_off=10, distribution="lognormal", seed=2)
    m1, m2 = sample_variability_map(base, vm), sample_variability_map(bigger, vm)
    for name in ("fc1", "fc2"):
        for i in range(2):
            assert torch.equal(m1.layers[name][i], m2.layers[name][i])


def test_a_seed_gives_the_same_factors_on_every_machine(qmodel):
    # Golden values: a change here means saved seeds no longer reproduce their maps (a change
    # of the per-layer seeding, of the draw order, or of torch's CPU generator). The tolerance
    # covers the last-ulp differences of torch's vectorised and scalar normal samplers.
    model = qmodel([("fc1", (4, 3)), ("fc2", (3, 2))])
    vmap = sample_variability_map(model, VariabilityModel(sigma=0.1, hrs_on_off=10, seed=0))
    golden = {
        "fc1": ([0.88221198, 0.82179749, 1.01018238, 0.95875895, 0.89926565, 1.11041474],
                [0.11180177, 0.10706894, 0.10388380, 0.10726094, 0.09213590, 0.12020491]),
        "fc2": ([1.05877352, 1.07624185, 0.92040151, 1.15517235, 0.95981038, 1.02543128],
                [0.08491187, 0.11107757, 0.09257410, 0.07854427, 0.08723690, 0.08781035]),
    }
    for name, (lrs, hrs) in golden.items():
        got_lrs, got_hrs = vmap.layers[name]
        torch.testing.assert_close(got_lrs.flatten()[:6], torch.tensor(lrs), rtol=1e-6, atol=0)
        torch.testing.assert_close(got_hrs.flatten()[:6], torch.tensor(hrs), rtol=1e-6, atol=0)


def test_lrs_factors_do_not_depend_on_the_hrs_settings(qmodel):
    model = qmodel(SMALL)
    plain = sample_variability_map(model, VariabilityModel(sigma=0.2, seed=3))
    hrs = sample_variability_map(model, VariabilityModel(sigma=0.2, hrs_on_off=10,
                                                         hrs_sigma=0.5, seed=3))
    for name in plain.layers:
        assert torch.equal(plain.layers[name][0], hrs.layers[name][0])


@pytest.mark.parametrize("sigma", [0.05, 0.2, 0.3])
def test_normal_factors_have_mean_one_and_std_sigma(sigma, qmodel):
    vmap = sample_variability_map(qmodel(BIG[:1]), VariabilityModel(sigma=sigma, seed=1))
    lrs, _ = vmap.layers["a"]
    assert lrs.dtype == torch.float32
    # the clip at 0 shifts the moments by < 1e-4 at sigma 0.3: far inside the bounds
    assert_mean_std(lrs, 1.0, sigma, 3.0, f"normal sigma={sigma}")
    s = vmap.summary()["a"]
    assert s["lrs_mean"] == pytest.approx(float(lrs.double().mean()), abs=1e-12)
    assert s["hrs_mean"] is None and s["cells"] == lrs.numel()


def test_normal_factors_are_clipped_at_zero(qmodel, assert_binomial):
    lrs, _ = sample_variability_map(qmodel(BIG[:1]), VariabilityModel(sigma=0.5, seed=1)
                                    ).layers["a"]
    assert float(lrs.min()) == 0.0
    # exactly the cells whose unclipped factor 1 + 0.5 z is negative: P(z < -2)
    assert_binomial(int((lrs == 0).sum()), lrs.numel(), normal_cdf(-2.0), "clipped cells")


@pytest.mark.parametrize("sigma", [0.1, 0.4])
def test_lognormal_factors_have_mean_one_and_std_sigma(sigma, qmodel, assert_binomial):
    model = qmodel(BIG[:1])
    lrs, _ = sample_variability_map(model, VariabilityModel(
        sigma=sigma, distribution="lognormal", seed=1)).layers["a"]
    assert float(lrs.min()) > 0
    assert_mean_std(lrs, 1.0, sigma, lognormal_kurtosis(sigma), f"lognormal sigma={sigma}")
    # the median is exp(mu) = (1 + sigma^2)^(-1/2) < 1: skewed, unlike the normal model
    median = math.exp(-math.log1p(sigma * sigma) / 2)
    below = int((lrs < median).sum())
    assert_binomial(below, lrs.numel(), 0.5, "cells below the lognormal median", resolution=0.02)


@pytest.mark.parametrize("distribution", ["normal", "lognormal"])
def test_hrs_factors_have_mean_one_over_on_off(distribution, qmodel):
    model = qmodel(BIG[:1])
    vm = VariabilityModel(sigma=0.1, hrs_on_off=20, hrs_sigma=0.25, distribution=distribution,
                          seed=4)
    lrs, hrs = sample_variability_map(model, vm).layers["a"]
    kurt = 3.0 if distribution == "normal" else lognormal_kurtosis(0.25)
    assert_mean_std(hrs, 1 / 20, 0.25 / 20, kurt, "hrs")
    assert_mean_std(lrs, 1.0, 0.1, 3.0 if distribution == "normal" else lognormal_kurtosis(0.1),
                    "lrs beside hrs")
    # without hrs_sigma the HRS spread is the layer's LRS sigma
    _, hrs_default = sample_variability_map(model, VariabilityModel(
        sigma=0.1, hrs_on_off=20, layer_sigmas={"a": 0.3}, seed=4)).layers["a"]
    assert_mean_std(hrs_default, 1 / 20, 0.3 / 20, 3.0, "hrs with the layer's sigma")


def test_layer_sigmas_override_by_name_and_unknown_names_are_errors(qmodel):
    model = qmodel(BIG)
    vmap = sample_variability_map(model, VariabilityModel(sigma=0.05, layer_sigmas={"b": 0.2}))
    assert_mean_std(vmap.layers["a"][0], 1.0, 0.05, 3.0, "a")
    assert_mean_std(vmap.layers["b"][0], 1.0, 0.2, 3.0, "b")
    zero = sample_variability_map(model, VariabilityModel(sigma=0.3, layer_sigmas={"a": 0.0}))
    assert torch.equal(zero.layers["a"][0], torch.ones_like(zero.layers["a"][0]))
    with pytest.raises(ValueError, match="layer_sigmas.*'c'.*quantized layers are"):
        sample_variability_map(model, VariabilityModel(sigma=0.1, layer_sigmas={"c": 0.1}))
    with pytest.raises(ValueError, match="no N-multiplier layer"):
        sample_variability_map(nn.Linear(2, 2), VariabilityModel(sigma=0.1))


# -- the VariabilityMap object --------------------------------------------------------------------

def test_variability_map_constructor_checks_the_factors():
    ok = torch.ones(2, 3, 4)
    with pytest.raises(VariabilityMapError, match="'fc'.*lrs must be a floating-point.*int64"):
        VariabilityMap({"fc": (ok.long(), None)}, {"fc": 4})
    with pytest.raises(VariabilityMapError, match=r"'fc'.*lrs has shape \(2, 3, 4\).*\(3,\)"):
        VariabilityMap({"fc": (ok, None)}, {"fc": 3})
    for bad in (-0.5, float("nan"), float("inf")):
        t = ok.clone()
        t[1, 2, 0] = bad
        with pytest.raises(VariabilityMapError, match="'fc'.*hrs factors must be finite and >= 0"):
            VariabilityMap({"fc": (ok, t)}, {"fc": 4})
    with pytest.raises(VariabilityMapError, match="lrs has shape.*but hrs"):
        VariabilityMap({"fc": (ok, torch.ones(3, 2, 4))}, {"fc": 4})
    with pytest.raises(VariabilityMapError, match="same layers"):
        VariabilityMap({"fc": (ok, None)}, {})


def test_save_load_round_trip_is_bitwise_and_keeps_meta(tmp_path, qmodel):
    model = qmodel(SMALL, layer_bits={"fc1": 2})
    vm = VariabilityModel(sigma=0.15, hrs_on_off=30.0, hrs_sigma=0.05, distribution="lognormal",
                          seed=12, layer_sigmas={"fc2": 0.3})
    vmap = sample_variability_map(model, vm)
    path = tmp_path / "var.pt"
    vmap.save(path)
    back = VariabilityMap.load(path)
    assert back.meta == vm.to_dict() and VariabilityModel.from_dict(back.meta) == vm
    assert back.bits == vmap.bits == {"fc1": 2, "fc2": 4, "fc3": 4}
    for name in vmap.layers:
        for i in range(2):
            assert torch.equal(back.layers[name][i], vmap.layers[name][i])
    back.validate(model)
    # LRS-only, measured (no meta)
    lrs_only = VariabilityMap({"fc1": (vmap.layers["fc1"][0], None)}, {"fc1": 2})
    lrs_only.save(path, overwrite=True)
    again = VariabilityMap.load(path)
    assert again.meta is None and again.layers["fc1"][1] is None
    assert torch.equal(again.layers["fc1"][0], vmap.layers["fc1"][0])


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(np.random.default_rng(1).bytes(1000)), "not a readable variability"),
    (lambda p: p.write_bytes(p.read_bytes()[:-200]), "not a readable variability"),
    (lambda p: FaultMap({}, {}).save(p, overwrite=True),
     "not a variability map file: its format tag is 'qfv-brevitas/faultmap/1'"),
    (lambda p: torch.save({"format": "qfv-brevitas/varmap/1", "layers": {"fc": {
        "lrs": -torch.ones(1, 4), "hrs": None, "bits": 4}}}, p), "damaged.*finite and >= 0"),
])
def test_corrupt_or_foreign_file_is_an_error_naming_the_file(tmp_path, make, match):
    path = tmp_path / "vmap.pt"
    VariabilityMap({"fc": (torch.ones(5, 4), torch.zeros(5, 4))}, {"fc": 4}).save(path)
    make(path)
    with pytest.raises(VariabilityMapError, match=match) as info:
        VariabilityMap.load(path)
    assert str(path) in str(info.value)


def test_validate_names_the_layer_and_the_mismatch(qmodel):
    model = qmodel(SMALL, skip=("fc3",))
    good = sample_variability_map(model, VariabilityModel(sigma=0.1))
    good.validate(model)
    VariabilityMap({"fc2": good.layers["fc2"]}, {"fc2": 4}).validate(model)  # partial is fine

    with pytest.raises(VariabilityMapError, match="'fc9'.*does not exist in the model"):
        VariabilityMap({"fc9": good.layers["fc1"]}, {"fc9": 4}).validate(model)
    with pytest.raises(VariabilityMapError,
                       match="variability factors on a layer that is not quantized: 'fc3'"):
        VariabilityMap({"fc3": (torch.ones(3, 8, 4), None)}, {"fc3": 4}).validate(model)
    lrs = good.layers["fc1"][0]
    with pytest.raises(VariabilityMapError, match=r"'fc1'.*\(12, 16, 4\).*\(16, 12, 4\)"):
        VariabilityMap({"fc1": (lrs.transpose(0, 1), None)}, {"fc1": 4}).validate(model)
    three = sample_variability_map(qmodel(SMALL, bits=3, skip=("fc3",)),
                                   VariabilityModel(sigma=0.1))
    with pytest.raises(VariabilityMapError, match="'fc1'.*3-bit weights but the layer has 4-bit"):
        three.validate(model)


# -- attaching ----------------------------------------------------------------------------------

def test_attach_detach_and_the_state_dict_round_trip(qmodel):
    model = qmodel(SMALL)
    vmap = sample_variability_map(model, VariabilityModel(sigma=0.2, hrs_on_off=10, seed=1))
    partial = VariabilityMap({"fc1": vmap.layers["fc1"], "fc2": (vmap.layers["fc2"][0], None)},
                             {"fc1": 4, "fc2": 4})
    assert attach_variability(model, partial) is model
    assert [l.weight_quant.chip.has_variability for _, l in nmult_layers(model)] == [True, True, False]
    sd = model.state_dict()
    assert torch.equal(sd["fc1.weight_quant.chip.lrs"], vmap.layers["fc1"][0])
    assert torch.equal(sd["fc1.weight_quant.chip.hrs"], vmap.layers["fc1"][1])
    assert "fc2.weight_quant.chip.hrs" not in sd and "fc3.weight_quant.chip.lrs" not in sd

    fresh = qmodel(SMALL, seed=3)
    fresh.load_state_dict(sd)
    p1, p2, p3 = (l.weight_quant for _, l in nmult_layers(fresh))
    assert p1.chip.has_variability and p2.chip.has_variability and not p3.chip.has_variability
    assert torch.equal(p1.chip.lrs, vmap.layers["fc1"][0])
    assert torch.equal(p1.chip.hrs, vmap.layers["fc1"][1])
    assert torch.equal(p2.chip.lrs, vmap.layers["fc2"][0]) and p2.chip.hrs is None

    assert detach_variability(model) is model
    assert not any(l.weight_quant.chip.has_variability for _, l in nmult_layers(model))


def test_faults_and_variability_coexist_and_detach_separately(qmodel):
    model = qmodel(SMALL)
    fmap = sample_fault_map(model, FaultModel(rate=0.2, seed=1))
    vmap = sample_variability_map(model, VariabilityModel(sigma=0.2, hrs_on_off=10, seed=1))
    attach_faults(model, fmap)
    attach_variability(model, vmap)
    sd = model.state_dict()
    fresh = qmodel(SMALL, seed=4)
    fresh.load_state_dict(sd)
    for m in (model, fresh):
        for name, layer in nmult_layers(m):
            proxy = layer.weight_quant
            assert proxy.chip.has_faults and proxy.chip.has_variability
            assert torch.equal(proxy.chip.sa1, fmap.layers[name][1])
            assert torch.equal(proxy.chip.hrs, vmap.layers[name][1])
    detach_faults(model)
    assert all(l.weight_quant.chip.has_variability and not l.weight_quant.chip.has_faults
               for _, l in nmult_layers(model))
    attach_faults(model, fmap)
    detach_variability(model)
    assert all(l.weight_quant.chip.has_faults and not l.weight_quant.chip.has_variability
               for _, l in nmult_layers(model))


def _expected_deployed(layer, sa0, sa1, lrs, hrs) -> torch.Tensor:
    """Contract formula: code = nearest ideal level (brute force), bits forced by the faults,
    value = c + sum_i r_i * (S_i * lrs_i + (1 - S_i) * hrs_i)."""
    tq = quant_of(layer)
    r, c = tq.multipliers().detach()[0].double(), tq.offset().detach()[0].double()
    bits = tq.bits
    codes = torch.arange(1 << bits)
    table = c + (((codes[:, None] >> torch.arange(bits)) & 1).double() * r).sum(-1)
    w = layer.weight.detach().double()
    code = (w[..., None] - table).abs().argmin(-1)
    forced = (code & ~sa0.long()) | sa1.long()
    s = ((forced[..., None] >> torch.arange(bits)) & 1).double()
    return c + (r * (s * lrs.double() + (1 - s) * hrs.double())).sum(-1)


def test_the_attached_maps_reach_the_deployed_weights(qmodel):
    model = qmodel(SMALL).eval()
    fmap = sample_fault_map(model, FaultModel(rate=0.2, seed=1))
    vmap = sample_variability_map(model, VariabilityModel(sigma=0.2, hrs_on_off=10, seed=1))
    ideal = {n: l.quant_weight().detach().clone() for n, l in nmult_layers(model)}
    attach_faults(model, fmap)
    attach_variability(model, vmap)
    for name, layer in nmult_layers(model):
        got = layer.quant_weight().detach().double()
        want = _expected_deployed(layer, *fmap.layers[name], *vmap.layers[name])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got.float(), ideal[name])
    detach_faults(model)
    detach_variability(model)
    for name, layer in nmult_layers(model):
        assert torch.equal(layer.quant_weight(), ideal[name])


# -- within- and between-chip components ---------------------------------------------------------

def test_shared_components_multiply_the_device_factors_as_specified(qmodel):
    """lrs = device factor x chip factor x layer factor: the chip factor is one number for every
    cell of every layer, the layer factor one number per layer; the device draw is the map
    without shared components, bit for bit; HRS cells share the same factors."""
    model = qmodel(SMALL)
    kw = dict(sigma=0.1, hrs_on_off=10, seed=4)
    plain = sample_variability_map(model, VariabilityModel(**kw))
    both = sample_variability_map(model, VariabilityModel(**kw, chip_sigma=0.2,
                                                          layer_shared_sigma=0.15))
    shared = both.meta["shared_factors"]
    assert "shared_factors" not in plain.meta
    assert set(shared["layers"]) == {"fc1", "fc2", "fc3"}
    assert len({round(v, 12) for v in shared["layers"].values()}) == 3  # one draw per layer
    assert shared["chip"] != 1.0
    for name, (lrs, hrs) in both.layers.items():
        f = shared["chip"] * shared["layers"][name]
        assert torch.equal(lrs, plain.layers[name][0] * f)
        assert torch.equal(hrs, plain.layers[name][1] * f)


def test_chip_only_variability_is_one_factor_for_the_whole_chip(qmodel):
    model = qmodel(SMALL)
    vmap = sample_variability_map(model, VariabilityModel(sigma=0.0, chip_sigma=0.3, seed=1))
    f = vmap.meta["shared_factors"]["chip"]
    values = torch.cat([lrs.flatten() for lrs, _ in vmap.layers.values()])
    assert torch.equal(values, torch.full_like(values, f)) and f != 1.0
    per_layer = sample_variability_map(model, VariabilityModel(sigma=0.0,
                                                               layer_shared_sigma=0.3, seed=1))
    for name, (lrs, _) in per_layer.layers.items():
        assert torch.equal(lrs, torch.full_like(lrs, per_layer.meta["shared_factors"]["layers"]
                                                [name]))


def test_monte_carlo_over_chips_and_over_the_devices_of_a_chip(qmodel):
    """Same chip_seed, different seed: same chip factors, new devices; a new chip_seed: a new
    chip. Without shared components the map does not depend on chip_seed at all."""
    model = qmodel(SMALL)
    a = sample_variability_map(model, VariabilityModel(sigma=0.1, chip_sigma=0.2,
                                                       layer_shared_sigma=0.1, seed=1,
                                                       chip_seed=7))
    b = sample_variability_map(model, VariabilityModel(sigma=0.1, chip_sigma=0.2,
                                                       layer_shared_sigma=0.1, seed=2,
                                                       chip_seed=7))
    c = sample_variability_map(model, VariabilityModel(sigma=0.1, chip_sigma=0.2,
                                                       layer_shared_sigma=0.1, seed=1,
                                                       chip_seed=8))
    assert a.meta["shared_factors"] == b.meta["shared_factors"]
    assert a.meta["shared_factors"]["chip"] != c.meta["shared_factors"]["chip"]
    assert not torch.equal(a.layers["fc1"][0], b.layers["fc1"][0])
    # chip_seed defaults to seed: seed 7 alone is chip 7.
    default = sample_variability_map(model, VariabilityModel(sigma=0.1, chip_sigma=0.2, seed=7))
    assert default.meta["shared_factors"]["chip"] == a.meta["shared_factors"]["chip"]
    p1 = sample_variability_map(model, VariabilityModel(sigma=0.1, seed=1, chip_seed=3))
    p2 = sample_variability_map(model, VariabilityModel(sigma=0.1, seed=1, chip_seed=9))
    assert all(torch.equal(p1.layers[n][0], p2.layers[n][0]) for n in p1.layers)


def test_chip_factors_have_mean_one_and_std_chip_sigma(qmodel):
    model = qmodel([("fc", (2, 2))])
    f = torch.tensor([sample_variability_map(model, VariabilityModel(
        sigma=0.0, chip_sigma=0.1, seed=0, chip_seed=k)).meta["shared_factors"]["chip"]
        for k in range(4000)])
    assert_mean_std(f, 1.0, 0.1, 3.0, "chip factor", resolution=0.06)


def test_a_layer_exempted_with_sigma_zero_gets_no_shared_component(qmodel):
    model = qmodel(SMALL)
    vmap = sample_variability_map(model, VariabilityModel(
        sigma=0.1, chip_sigma=0.3, seed=2, layer_sigmas={"fc1": 0.0}))
    assert torch.equal(vmap.layers["fc1"][0], torch.ones_like(vmap.layers["fc1"][0]))
    assert not torch.equal(vmap.layers["fc2"][0], torch.ones_like(vmap.layers["fc2"][0]))


def test_shared_component_settings_are_validated():
    for kw, match in ((dict(chip_sigma=-0.1), "chip_sigma must be a finite number >= 0"),
                      (dict(layer_shared_sigma=float("nan")), "layer_shared_sigma must"),
                      (dict(chip_seed=1.5), "chip_seed must be an integer")):
        with pytest.raises(ValueError, match=match):
            VariabilityModel(sigma=0.1, **kw)


def test_evaluate_variability_groups_trials_by_chip(digits, trained):
    from qfv_brevitas.studies.montecarlo import evaluate_variability
    from qfv_brevitas.training.train import evaluate
    import copy

    model, _ = trained
    test = digits[1]
    res = evaluate_variability(model, test, [0.2], trials=4, seed=3, chip_sigma=0.1,
                               devices_per_chip=2, progress=False)
    assert res.meta["devices_per_chip"] == 2 and res.meta["chip_sigma"] == 0.1
    for row in res.rows:  # trials 0, 1 on chip 3; trials 2, 3 on chip 4
        m = copy.deepcopy(model)
        exempt = {"features.0": 0.0, "classifier.3": 0.0}
        attach_variability(m, sample_variability_map(m, VariabilityModel(
            sigma=0.2, seed=row["seed"], chip_sigma=0.1, chip_seed=3 + row["trial"] // 2,
            layer_sigmas=exempt)))
        assert evaluate(m, test) == row["acc"]
    with pytest.raises(ValueError, match="devices_per_chip must be an integer >= 1"):
        evaluate_variability(model, test, [0.2], trials=1, devices_per_chip=0, progress=False)
