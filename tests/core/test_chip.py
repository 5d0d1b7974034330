"""Tests of ``qfv_brevitas.core.chip``: the one component that knows a layer's device.

Each answer of a chip is checked against a brute-force enumeration of the 2**N codes written
here from the definitions (levels ``<r, S> + c``; stuck bits forced; a "1" cell adds
``r_i * lrs_i``, a "0" cell ``r_i * hrs_i``), not against the library's own search.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from qfv_brevitas.chip.bitflips import BitFlipModel, attach_bitflips, detach_bitflips
from qfv_brevitas.chip.faults import FaultMap, attach_faults
from qfv_brevitas.core.chip import Chip
from qfv_brevitas.core.groups import GroupLayout
from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.util.errors import QfvError

BITS = 3


def value(code: int, r, c, g: int, sa0=0, sa1=0, lrs=None, hrs=None) -> float:
    held = (code & ~sa0) | sa1
    v = float(c[g])
    for i in range(BITS):
        bit = (held >> i) & 1
        f = (float(lrs[i]) if lrs is not None else 1.0) if bit else \
            (float(hrs[i]) if hrs is not None else 0.0)
        v += float(r[g, i]) * f
    return v


def chip_for(shape=(4, 6), axis=-1) -> Chip:
    return Chip().bind(GroupLayout(axis), BITS, shape, "fc")


def grid(groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = (torch.tensor([0.1, 0.2, 0.4]) * (1 + 0.3 * torch.rand(groups, BITS, generator=g)))
    c = -0.35 + 0.05 * torch.rand(groups, generator=g)
    return r.double(), c.double()


def test_an_ideal_chip_answers_with_the_nearest_ideal_level():
    chip = chip_for()
    r, c = grid()
    w = torch.linspace(-0.6, 0.6, 24, dtype=torch.float64).reshape(1, 24)
    codes = chip.codes(w, r, c)
    best = [min(range(8), key=lambda s: abs(float(w[0, j]) - value(s, r, c, 0)))
            for j in range(24)]
    assert codes[0].tolist() == best
    want = torch.tensor([[value(s, r, c, 0) for s in best]], dtype=torch.float64)
    assert torch.allclose(chip.snap(w, r, c), want, rtol=0, atol=1e-12)
    assert float(chip.distance(w, r, c)) == pytest.approx(float(((w - want) ** 2).sum()),
                                                          rel=1e-12)
    assert chip.is_ideal and not chip.has_maps


@pytest.mark.parametrize("mapping", ["naive", "aware"])
def test_stuck_bits_mapping_and_held_codes_match_brute_force(mapping):
    shape = (2, 12)
    chip = chip_for(shape, axis=0)
    r, c = grid(groups=2, seed=1)
    g = torch.Generator().manual_seed(3)
    sa0 = torch.randint(0, 8, shape, generator=g, dtype=torch.uint8)
    sa1 = torch.randint(0, 8, shape, generator=g, dtype=torch.uint8) & ~sa0
    chip.set_faults(sa0, sa1)
    chip.set_mapping(mapping)
    w = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5)
    codes, held, vals = chip.codes(w, r, c), chip.held_codes(w, r, c), chip.snap(w, r, c)
    for gi, j in itertools.product(range(2), range(12)):
        m0, m1 = int(sa0[gi, j]), int(sa1[gi, j])
        wj = float(w[gi, j])
        if mapping == "naive":
            want = min(range(8), key=lambda s: abs(wj - value(s, r, c, gi)))
        else:
            want = min(range(8), key=lambda s: abs(wj - value(s, r, c, gi, m0, m1)))
            assert abs(wj - value(int(codes[gi, j]), r, c, gi, m0, m1)) == pytest.approx(
                abs(wj - value(want, r, c, gi, m0, m1)), abs=1e-12)
            want = int(codes[gi, j])  # ties: any code with the nearest deployed value
        assert int(codes[gi, j]) == want
        assert int(held[gi, j]) == (want & ~m0) | m1
        assert float(vals[gi, j]) == pytest.approx(value(want, r, c, gi, m0, m1), abs=1e-12)
    # the aware distance is over the reachable values, whatever the mapping
    reach = sum(min((float(w[gi, j]) - value(s, r, c, gi, int(sa0[gi, j]), int(sa1[gi, j])))
                    ** 2 for s in range(8)) for gi in range(2) for j in range(12))
    assert float(chip.distance(w, r, c)) == pytest.approx(reach, rel=1e-10)


def test_variability_changes_the_values_held():
    shape = (1, 5)
    chip = chip_for(shape)
    r, c = grid()
    g = torch.Generator().manual_seed(5)
    lrs = 1 + 0.2 * torch.randn(shape + (BITS,), generator=g, dtype=torch.float64)
    hrs = 0.05 * torch.rand(shape + (BITS,), generator=g, dtype=torch.float64)
    chip.set_variability(lrs.abs(), hrs)
    codes = torch.tensor([[0, 1, 5, 6, 7]])
    got = chip.values(codes, r, c)
    for j in range(5):
        assert float(got[0, j]) == pytest.approx(
            value(int(codes[0, j]), r, c, 0, lrs=lrs.abs()[0, j], hrs=hrs[0, j]), abs=1e-12)


@pytest.mark.parametrize("bad, match", [
    (dict(sa0=torch.zeros(3, 6, dtype=torch.uint8)), "sa0 mask has shape"),
    (dict(sa0=torch.zeros(4, 6, dtype=torch.int64)), "must be uint8"),
    (dict(sa0=torch.full((4, 6), 8, dtype=torch.uint8)), "at or above the layer's bit width 3"),
    (dict(sa1=torch.ones(4, 6, dtype=torch.uint8), sa0=torch.ones(4, 6, dtype=torch.uint8)),
     "stuck at 0 and at 1"),
])
def test_bad_stuck_masks_are_refused_naming_the_layer(bad, match):
    chip = chip_for()
    masks = dict(sa0=torch.zeros(4, 6, dtype=torch.uint8), sa1=torch.zeros(4, 6, dtype=torch.uint8))
    masks.update(bad)
    with pytest.raises(QfvError, match=rf"layer 'fc'.*{match}"):
        chip.set_faults(masks["sa0"], masks["sa1"])
    assert not chip.has_faults


@pytest.mark.parametrize("lrs, match", [
    (torch.ones(4, 6), "expected weight shape"),
    (-torch.ones(4, 6, BITS), "non-negative"),
    (torch.full((4, 6, BITS), float("nan")), "finite"),
    (torch.ones(4, 6, BITS, dtype=torch.int64), "floats"),
])
def test_bad_variability_factors_are_refused(lrs, match):
    chip = chip_for()
    with pytest.raises(QfvError, match=match):
        chip.set_variability(lrs)
    assert not chip.has_variability


def test_unknown_mapping_is_refused():
    with pytest.raises(QfvError, match="unknown deploy mapping 'nearest'"):
        chip_for().set_mapping("nearest")


def test_the_proxy_owns_the_chip_and_hands_it_to_its_quantizer(qmodel):
    model = qmodel([("fc1", (6, 8)), ("fc2", (8, 3))])
    for _, layer in nmult_layers(model):
        proxy = layer.weight_quant
        assert isinstance(proxy.chip, Chip) and quant_of(layer).chip is proxy.chip
        assert "chip" in dict(proxy.named_children())
        proxy.init_tensor_quant()  # Brevitas re-creates the quantizer: same chip handed over
        assert quant_of(layer).chip is proxy.chip
        assert not quant_of(layer)._forward_hooks
    twin = copy.deepcopy(model)
    for (_, a), (_, b) in zip(nmult_layers(model), nmult_layers(twin)):
        assert quant_of(b).chip is b.weight_quant.chip and b.weight_quant.chip is not a.weight_quant.chip


def test_bit_flips_attach_through_the_chip_not_hooks(qmodel):
    model = qmodel([("fc1", (6, 8)), ("fc2", (8, 3))])
    attach_bitflips(model, BitFlipModel(rate=0.5, seed=0))
    for _, layer in nmult_layers(model):
        assert layer.weight_quant.chip.flips is not None and not layer.weight_quant.chip.is_ideal
        assert not quant_of(layer)._forward_hooks
    detach_bitflips(model)
    assert all(l.weight_quant.chip.is_ideal for _, l in nmult_layers(model))


def test_state_dicts_of_the_proxy_era_still_load(qmodel):
    """Before the chip, maps and the mapping were saved on the proxy (``weight_quant.fault_sa0``,
    ``weight_quant._extra_state = {"deploy_mapping": ...}``)."""
    model = qmodel([("fc1", (6, 8)), ("fc2", (8, 3))])
    sa0 = torch.zeros(8, 6, dtype=torch.uint8)
    sa0[0, 0] = 0b101
    attach_faults(model, FaultMap({"fc1": (sa0, torch.zeros_like(sa0))}, {"fc1": 4}))
    model.fc1.weight_quant.chip.set_mapping("aware")
    sd = model.state_dict()
    legacy = {}
    for k, v in sd.items():
        k = k.replace("weight_quant.chip.sa0", "weight_quant.fault_sa0")
        k = k.replace("weight_quant.chip.sa1", "weight_quant.fault_sa1")
        k = k.replace("weight_quant.chip._extra_state", "weight_quant._extra_state")
        legacy[k] = v
    assert "fc1.weight_quant.fault_sa0" in legacy and "fc1.weight_quant._extra_state" in legacy
    fresh = qmodel([("fc1", (6, 8)), ("fc2", (8, 3))], seed=1)
    fresh.load_state_dict(legacy)
    chip = fresh.fc1.weight_quant.chip
    assert torch.equal(chip.sa0, sa0) and chip.mapping == "aware"
    assert not fresh.fc2.weight_quant.chip.has_maps and fresh.fc2.weight_quant.chip.mapping == "naive"
