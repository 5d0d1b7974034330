"""Tests of ``qfv_brevitas.chip.faults``: stuck-at fault maps (sample, save, load, validate, attach).

Counts are recomputed independently of the library (``numpy.unpackbits`` over the masks);
statistical checks use binomial 99.9% intervals (normal approximation with continuity
correction) and assert first that the interval is narrow enough to catch a real error.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qfv_brevitas.chip.faults import (FaultMap, FaultMapError, FaultModel, attach_faults,
                                 detach_faults, sample_fault_map)
from qfv_brevitas.core.quantizers import nmult_layers, quant_of

SMALL = [("fc1", (12, 16)), ("fc2", (16, 8)), ("fc3", (8, 3))]
BIG = [("a", (256, 256)), ("b", (256, 128))]  # (65536 + 32768) weights, 4 bits each


def bit_planes(mask: torch.Tensor, bits: int) -> np.ndarray:
    """``(numel, bits)`` 0/1 array, column i = bit i (independent of the library's popcount)."""
    u = np.unpackbits(mask.cpu().numpy().reshape(-1, 1), axis=1, bitorder="little")
    return u[:, :bits].astype(np.int64)


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(rate=-0.01), dict(rate=1.5), dict(rate=float("nan")), dict(rate=float("inf")),
    dict(rate="0.1"), dict(rate=True), dict(rate=None),
    dict(rate=0.1, sa1_fraction=-0.5), dict(rate=0.1, sa1_fraction=2.0),
    dict(rate=0.1, layer_rates={"fc1": 1.01}), dict(rate=0.1, layer_rates={"fc1": -1}),
    dict(rate=0.1, layer_rates={0: 0.1}), dict(rate=0.1, layer_rates=[("fc1", 0.1)]),
    dict(rate=0.1, seed=1.5), dict(rate=0.1, seed="0"),
])
def test_fault_model_rejects_bad_input(kw):
    with pytest.raises(ValueError, match=r"FaultModel\.\w+"):
        FaultModel(**kw)


def test_fault_model_error_says_how_to_fix():
    with pytest.raises(ValueError, match=r"\[0, 1\].*0\.01 for 1%.*got 5"):
        FaultModel(rate=5)


def test_fault_model_edges_and_numpy_numbers_accepted():
    fm = FaultModel(rate=np.float32(1.0), sa1_fraction=0, layer_rates={"x": 0}, seed=np.int64(3))
    assert (fm.rate, fm.sa1_fraction, fm.layer_rates, fm.seed) == (1.0, 0.0, {"x": 0.0}, 3)
    assert type(fm.rate) is float and type(fm.seed) is int


# -- sampling -----------------------------------------------------------------------------------

def test_zero_rate_gives_all_zero_masks_exactly(qmodel):
    model = qmodel(SMALL)
    fmap = sample_fault_map(model, FaultModel(rate=0.0, sa1_fraction=0.5, seed=7))
    assert sorted(fmap.layers) == ["fc1", "fc2", "fc3"]
    for name, layer in nmult_layers(model):
        sa0, sa1 = fmap.layers[name]
        assert sa0.dtype == sa1.dtype == torch.uint8
        assert sa0.shape == sa1.shape == layer.weight.shape
        assert int(sa0.count_nonzero()) == int(sa1.count_nonzero()) == 0
    assert fmap.stuck_fraction() == 0.0


def test_zero_layer_rate_overrides_a_nonzero_rate(qmodel):
    fmap = sample_fault_map(qmodel(SMALL), FaultModel(rate=0.5, layer_rates={"fc2": 0.0}))
    assert int(fmap.layers["fc2"][0].count_nonzero() + fmap.layers["fc2"][1].count_nonzero()) == 0
    assert int(fmap.layers["fc1"][0].count_nonzero()) > 0


@pytest.mark.parametrize("sa1_fraction,stuck_at", [(1.0, "sa1"), (0.0, "sa0")])
def test_rate_one_sticks_every_cell_below_the_bit_width(sa1_fraction, stuck_at, qmodel):
    # fc1 at 2 bits: no stuck bit may appear at bit 2 or above
    model = qmodel(SMALL, bits=4, layer_bits={"fc1": 2})
    fmap = sample_fault_map(model, FaultModel(rate=1.0, sa1_fraction=sa1_fraction))
    for name, layer in nmult_layers(model):
        bits = quant_of(layer).bits
        assert fmap.bits[name] == bits == (2 if name == "fc1" else 4)
        sa0, sa1 = fmap.layers[name]
        full, empty = (sa1, sa0) if stuck_at == "sa1" else (sa0, sa1)
        assert bool((full == (1 << bits) - 1).all()) and int(empty.count_nonzero()) == 0
    assert fmap.stuck_fraction() == 1.0


def test_same_seed_same_map_bitwise_different_seed_different(qmodel):
    model = qmodel(SMALL)
    fm = FaultModel(rate=0.2, seed=11)
    a, b = sample_fault_map(model, fm), sample_fault_map(model, FaultModel(rate=0.2, seed=11))
    c = sample_fault_map(model, FaultModel(rate=0.2, seed=12))
    for name in a.layers:
        for i in range(2):
            assert torch.equal(a.layers[name][i], b.layers[name][i])
            assert not torch.equal(a.layers[name][i], c.layers[name][i])
    # the map depends on shapes and bits, not on the weights' values
    other = sample_fault_map(qmodel(SMALL, seed=5), fm)
    assert all(torch.equal(a.layers[n][0], other.layers[n][0]) for n in a.layers)


def test_a_seed_gives_the_same_map_on_every_machine(qmodel):
    # Golden masks: a change here means saved seeds no longer reproduce their maps (a change of
    # the per-layer seeding, e.g. to Python's salted hash(), of the draw order, or of torch's
    # CPU generator).
    fmap = sample_fault_map(qmodel([("fc1", (4, 3)), ("fc2", (3, 2))]), FaultModel(rate=0.5))
    golden = {"fc1": ([[8, 0, 12, 0], [5, 8, 4, 0], [8, 4, 0, 8]],
                      [[0, 0, 0, 0], [0, 5, 1, 1], [0, 3, 10, 4]]),
              "fc2": ([[1, 0, 12], [2, 3, 0]], [[0, 0, 2], [9, 0, 4]])}
    for name, (sa0, sa1) in golden.items():
        assert fmap.layers[name][0].tolist() == sa0 and fmap.layers[name][1].tolist() == sa1


def test_layers_draw_independently_of_the_rest_of_the_model(qmodel):
    base = qmodel([("fc1", (12, 16)), ("fc2", (16, 8))])
    # layers inserted before, between and after, and a different registration order
    bigger = qmodel([("pre", (12, 12)), ("fc1", (12, 16)), ("mid", (16, 16)),
                     ("fc2", (16, 8)), ("post", (8, 4))])
    fm = FaultModel(rate=0.3, seed=4)
    m1, m2 = sample_fault_map(base, fm), sample_fault_map(bigger, fm)
    for name in ("fc1", "fc2"):
        for i in range(2):
            assert torch.equal(m1.layers[name][i], m2.layers[name][i])
    # layers of one model do not share a stream: same shape, different masks
    twins = sample_fault_map(qmodel([("x", (16, 16)), ("y", (16, 16))]), fm)
    assert not torch.equal(twins.layers["x"][0], twins.layers["y"][0])


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.3])
@pytest.mark.parametrize("sa1_fraction", [0.5, 0.2])
def test_stuck_fraction_and_sa1_share_lie_in_binomial_intervals(rate, sa1_fraction, qmodel,
                                                                assert_binomial):
    model = qmodel(BIG)
    fmap = sample_fault_map(model, FaultModel(rate=rate, sa1_fraction=sa1_fraction, seed=3))
    total_cells = total_stuck = 0
    for name, (sa0, sa1) in fmap.layers.items():
        p0, p1 = bit_planes(sa0, 4), bit_planes(sa1, 4)
        assert not (p0 & p1).any()
        stuck = p0 + p1
        for i in range(4):  # every bit position is hit at the rate, not only some of them
            assert_binomial(int(stuck[:, i].sum()), stuck.shape[0], rate, f"{name} bit {i}",
                            resolution=0.25)
        k, k1 = int(stuck.sum()), int(p1.sum())
        assert_binomial(k, stuck.size, rate, f"{name} stuck cells")
        assert_binomial(k1, k, sa1_fraction, f"{name} SA1 share of stuck cells", resolution=0.3)
        s = fmap.summary()[name]
        assert (s["cells"], s["stuck"], s["sa0"], s["sa1"]) == (stuck.size, k, k - k1, k1)
        total_cells, total_stuck = total_cells + stuck.size, total_stuck + k
    assert fmap.stuck_fraction() == total_stuck / total_cells


def test_cells_stuck_at_a_rate_stay_stuck_at_a_higher_rate(qmodel):
    model = qmodel(BIG[:1])
    lo = sample_fault_map(model, FaultModel(rate=0.05, seed=9)).layers["a"]
    hi = sample_fault_map(model, FaultModel(rate=0.2, seed=9)).layers["a"]
    stuck_lo, stuck_hi = lo[0] | lo[1], hi[0] | hi[1]
    assert int(stuck_lo.count_nonzero()) > 0
    assert torch.equal(stuck_lo & stuck_hi, stuck_lo)
    assert not torch.equal(stuck_lo, stuck_hi)


def test_layer_rates_override_by_name(qmodel, assert_binomial):
    model = qmodel(BIG)
    fmap = sample_fault_map(model, FaultModel(rate=0.01, layer_rates={"b": 0.3}, seed=1))
    for name, rate in (("a", 0.01), ("b", 0.3)):
        sa0, sa1 = fmap.layers[name]
        stuck = bit_planes(sa0, 4) + bit_planes(sa1, 4)
        assert_binomial(int(stuck.sum()), stuck.size, rate, name)
    assert fmap.meta["layer_rates"] == {"b": 0.3}


def test_layer_rates_naming_an_unknown_layer_is_an_error(qmodel):
    model = qmodel(SMALL, skip=("fc3",))
    for bad in ("fc9", "fc3", "act_fc2"):  # absent, left in float, not a compute layer
        with pytest.raises(ValueError, match=f"layer_rates.*'{bad}'.*quantized layers are"):
            sample_fault_map(model, FaultModel(rate=0.1, layer_rates={bad: 0.2}))


def test_sampling_needs_a_quantized_model(qmodel):
    with pytest.raises(ValueError, match="no N-multiplier layer.*quantize_model"):
        sample_fault_map(nn.Sequential(nn.Linear(3, 3)), FaultModel(rate=0.1))
    with pytest.raises(TypeError, match="FaultModel"):
        sample_fault_map(qmodel(SMALL), {"rate": 0.1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_follow_the_weights_device_and_match_the_cpu_draw(qmodel):
    model = qmodel(SMALL)
    fm = FaultModel(rate=0.2, seed=2)
    cpu = sample_fault_map(model, fm)
    gpu = sample_fault_map(model.cuda(), fm)
    for name in cpu.layers:
        assert gpu.layers[name][0].device.type == "cuda"
        assert torch.equal(gpu.layers[name][0].cpu(), cpu.layers[name][0])
        assert torch.equal(gpu.layers[name][1].cpu(), cpu.layers[name][1])
    attach_faults(model, cpu)  # a CPU (e.g. loaded) map goes onto a CUDA model
    assert model.fc1.weight_quant.chip.sa0.device.type == "cuda"


# -- the FaultMap object --------------------------------------------------------------------------

def _masks(shape=(2, 3)):
    sa0 = torch.zeros(shape, dtype=torch.uint8)
    sa1 = torch.zeros(shape, dtype=torch.uint8)
    return sa0, sa1


def test_fault_map_constructor_checks_the_masks():
    sa0, sa1 = _masks()
    with pytest.raises(FaultMapError, match="'fc'.*uint8.*torch.int64"):
        FaultMap({"fc": (sa0.long(), sa1)}, {"fc": 4})
    with pytest.raises(FaultMapError, match=r"'fc'.*sa0 has shape \(2, 3\) but sa1 \(3, 2\)"):
        FaultMap({"fc": (sa0, sa1.view(3, 2))}, {"fc": 4})
    with pytest.raises(FaultMapError, match="same layers.*only in bits: \\['gc'\\]"):
        FaultMap({"fc": (sa0, sa1)}, {"fc": 4, "gc": 4})
    with pytest.raises(FaultMapError, match="bit width must be an int in 1..8"):
        FaultMap({"fc": (sa0, sa1)}, {"fc": 9})
    sa0[1, 2] = 0b10000
    with pytest.raises(FaultMapError,
                       match="'fc'.*stuck bit 4 at or above the layer's bit width 4"):
        FaultMap({"fc": (sa0, sa1)}, {"fc": 4})
    sa0[1, 2], sa1[1, 2] = 0b0110, 0b0011
    with pytest.raises(FaultMapError, match="'fc'.*weight 5.*stuck at 0 and at 1"):
        FaultMap({"fc": (sa0, sa1)}, {"fc": 4})


def test_summary_and_stuck_fraction_of_a_hand_made_map():
    sa0 = torch.tensor([[0b001, 0], [0, 0b110]], dtype=torch.uint8)
    sa1 = torch.tensor([[0b110, 0], [0b001, 0]], dtype=torch.uint8)
    fmap = FaultMap({"fc": (sa0, sa1)}, {"fc": 3})
    assert fmap.summary() == {"fc": {"shape": (2, 2), "bits": 3, "cells": 12, "stuck": 6,
                                     "sa0": 3, "sa1": 3, "fraction": 0.5}}
    assert fmap.stuck_fraction() == 0.5 and fmap.meta is None
    assert FaultMap({}, {}).stuck_fraction() == 0.0


def test_save_load_round_trip_is_bitwise_and_keeps_meta(tmp_path, qmodel):
    model = qmodel(SMALL, layer_bits={"fc2": 3})
    fm = FaultModel(rate=0.25, sa1_fraction=0.3, layer_rates={"fc3": 0.5}, seed=8)
    fmap = sample_fault_map(model, fm)
    path = tmp_path / "faults.pt"
    fmap.save(path)
    back = FaultMap.load(path)
    assert back.bits == fmap.bits == {"fc1": 4, "fc2": 3, "fc3": 4}
    assert back.meta == fm.to_dict() and FaultModel.from_dict(back.meta) == fm
    for name in fmap.layers:
        for i in range(2):
            assert back.layers[name][i].dtype == torch.uint8
            assert torch.equal(back.layers[name][i], fmap.layers[name][i])
    back.validate(model)
    assert [p.name for p in tmp_path.iterdir()] == ["faults.pt"]  # no temporary left behind
    # a measured map (no meta) round-trips as well
    measured = FaultMap({"fc1": fmap.layers["fc1"]}, {"fc1": 4})
    measured.save(str(path), overwrite=True)
    assert FaultMap.load(str(path)).meta is None


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a readable fault map"),
    (_truncated, "not a readable fault map"),
    (lambda p: torch.save({"format": "qfv-brevitas/varmap/1", "layers": {}}, p),
     "not a fault map file: its format tag is 'qfv-brevitas/varmap/1'"),
    (lambda p: torch.save(torch.zeros(3), p), "not a fault map file: its format tag is None"),
    (lambda p: torch.save({"format": "qfv-brevitas/faultmap/1", "layers": {"fc": {"sa0": 1}}}, p),
     "damaged fault map"),
    (lambda p: torch.save({"format": "qfv-brevitas/faultmap/1", "layers": {"fc": {
        "sa0": torch.full((2,), 16, dtype=torch.uint8), "sa1": torch.zeros(2, dtype=torch.uint8),
        "bits": 4}}}, p), "damaged fault map.*stuck bit 4"),
])
def test_corrupt_or_foreign_file_is_an_error_naming_the_file(tmp_path, make, match):
    path = tmp_path / "map.pt"
    FaultMap({"fc": _masks()}, {"fc": 4}).save(path)
    make(path)
    with pytest.raises(FaultMapError, match=match) as info:
        FaultMap.load(path)
    assert str(path) in str(info.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        FaultMap.load(tmp_path / "nothere.pt")


# -- validation against a model ------------------------------------------------------------------

def test_validate_accepts_a_partial_map(qmodel):
    model = qmodel(SMALL)
    fmap = sample_fault_map(model, FaultModel(rate=0.1))
    FaultMap({"fc2": fmap.layers["fc2"]}, {"fc2": 4}).validate(model)
    FaultMap({}, {}).validate(model)


def test_validate_names_the_layer_and_the_mismatch(qmodel):
    model = qmodel(SMALL, skip=("fc3",))
    good = sample_fault_map(model, FaultModel(rate=0.1))

    absent = FaultMap({"fc7": good.layers["fc1"]}, {"fc7": 4})
    with pytest.raises(FaultMapError, match="'fc7'.*does not exist in the model.*'fc1', 'fc2'"):
        absent.validate(model)

    sa0, sa1 = good.layers["fc1"]
    wrong_shape = FaultMap({"fc1": (sa0.t().contiguous(), sa1.t().contiguous())}, {"fc1": 4})
    with pytest.raises(FaultMapError,
                       match=r"'fc1'.*shape \(12, 16\).*weight has shape \(16, 12\)"):
        wrong_shape.validate(model)

    wrong_bits = sample_fault_map(qmodel(SMALL, bits=3, skip=("fc3",)), FaultModel(rate=0.1))
    with pytest.raises(FaultMapError, match="'fc1'.*3-bit weights but the layer has 4-bit"):
        wrong_bits.validate(model)

    for name in ("fc3", "act_fc2"):  # a Linear left in float, a ReLU
        shape = dict(model.named_modules())["fc3"].weight.shape
        foreign = FaultMap({name: _masks(shape)}, {name: 4})
        with pytest.raises(FaultMapError,
                           match=f"stuck bits on a layer that is not quantized: '{name}'"):
            foreign.validate(model)


def test_validate_catches_a_stuck_bit_above_the_width_set_after_construction(qmodel):
    model = qmodel(SMALL)
    fmap = sample_fault_map(model, FaultModel(rate=0.0))
    sa0, sa1 = fmap.layers["fc2"]
    sa1 = sa1.clone()
    sa1[3, 4] = 0b100000
    fmap.layers["fc2"] = (sa0, sa1)  # the dict is plain: validate must not trust it
    with pytest.raises(FaultMapError,
                       match="'fc2'.*stuck bit 5 at or above the layer's bit width 4"):
        fmap.validate(model)


# -- attaching ----------------------------------------------------------------------------------

def test_attach_sets_the_proxy_buffers_and_detach_clears_them(qmodel):
    model = qmodel(SMALL)
    fmap = sample_fault_map(model, FaultModel(rate=0.3, seed=1))
    assert attach_faults(model, fmap) is model
    for name, layer in nmult_layers(model):
        proxy = layer.weight_quant
        assert proxy.chip.has_faults
        assert torch.equal(proxy.chip.sa0, fmap.layers[name][0])
        assert torch.equal(proxy.chip.sa1, fmap.layers[name][1])
    # a partial map clears the layers it does not name
    attach_faults(model, FaultMap({"fc2": fmap.layers["fc2"]}, {"fc2": 4}))
    assert [l.weight_quant.chip.has_faults for _, l in nmult_layers(model)] == [False, True, False]
    assert detach_faults(model) is model
    assert not any(l.weight_quant.chip.has_faults for _, l in nmult_layers(model))


def test_attach_validates_before_touching_the_model(qmodel):
    model = qmodel(SMALL)
    fmap = sample_fault_map(model, FaultModel(rate=0.3, seed=1))
    attach_faults(model, fmap)
    bad = FaultMap({"fc1": fmap.layers["fc1"], "nope": fmap.layers["fc1"]}, {"fc1": 4, "nope": 4})
    with pytest.raises(FaultMapError, match="'nope'"):
        attach_faults(model, bad)
    for name, layer in nmult_layers(model):  # the earlier map is still in place, untouched
        assert torch.equal(layer.weight_quant.chip.sa0, fmap.layers[name][0])


def test_faults_travel_with_the_state_dict_into_a_fresh_model(qmodel):
    model = qmodel(SMALL)
    fmap = sample_fault_map(model, FaultModel(rate=0.3, seed=1))
    attach_faults(model, FaultMap({"fc1": fmap.layers["fc1"], "fc3": fmap.layers["fc3"]},
                                  {"fc1": 4, "fc3": 4}))
    sd = model.state_dict()
    for name in ("fc1", "fc3"):
        assert torch.equal(sd[f"{name}.weight_quant.chip.sa0"], fmap.layers[name][0])
        assert torch.equal(sd[f"{name}.weight_quant.chip.sa1"], fmap.layers[name][1])
    assert "fc2.weight_quant.chip.sa0" not in sd

    fresh = qmodel(SMALL, seed=1)
    assert not any(l.weight_quant.chip.has_faults for _, l in nmult_layers(fresh))
    fresh.load_state_dict(sd)
    for name, layer in nmult_layers(fresh):
        proxy = layer.weight_quant
        assert proxy.chip.has_faults == (name != "fc2")
        if proxy.chip.has_faults:
            assert proxy.chip.sa0.dtype == torch.uint8
            assert torch.equal(proxy.chip.sa0, fmap.layers[name][0])
            assert torch.equal(proxy.chip.sa1, fmap.layers[name][1])
