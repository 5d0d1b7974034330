"""Tests of ``qfv_brevitas.chip.bitflips``: transient bit flips on every inference (their Monte
Carlo evaluation and random-bit-error training are tested with the studies).

The weights a layer computes with are compared with an independent recomputation from the
injector's flip mask: the programmed code (nearest level, or the aware code), xor the mask, the
stuck bits forced, the level read from ``level_table``. The flipped fraction is checked against a
binomial interval.
"""
from __future__ import annotations

import copy
import math

import brevitas.nn as qnn
import pytest
import torch
from torch import nn

from qfv_brevitas import (FaultModel, VariabilityModel, attach_faults, attach_variability,
                          nmult_layers, quant_of, sample_fault_map, sample_variability_map,
                          set_deploy_mapping)
from qfv_brevitas.core import device as D
from qfv_brevitas.core import levels as L
from qfv_brevitas.core import search as S
from qfv_brevitas.chip.bitflips import (BitFlipModel, attach_bitflips, bitflip_injectors,
                                        detach_bitflips, flip_masks)
from qfv_brevitas.core.quantizers import NMultWeightQuant


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def popcount(mask: torch.Tensor, bits: int) -> int:
    return sum(int(((mask.long() >> i) & 1).sum()) for i in range(bits))


def binomial_ok(k: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("maps", [None, "faults", "variability", "both"])
@pytest.mark.parametrize("mapping", ["naive", "aware"])
def test_rate_zero_changes_nothing(trained, digits, maps, mapping):
    model, _ = trained
    m = copy.deepcopy(model)
    if maps in ("faults", "both"):
        attach_faults(m, sample_fault_map(m, FaultModel(rate=0.1, seed=2)))
    if maps in ("variability", "both"):
        attach_variability(m, sample_variability_map(m, VariabilityModel(sigma=0.2, seed=2)))
    set_deploy_mapping(m, mapping)
    x = digits[1].tensors[0][:64]
    before = outputs(m, x)
    attach_bitflips(m, BitFlipModel(rate=0.0, seed=1))
    assert set(bitflip_injectors(m)) == {n for n, _ in nmult_layers(m)}
    torch.testing.assert_close(outputs(m, x), before, rtol=0, atol=0)
    inj = next(iter(bitflip_injectors(m).values()))
    assert inj.cells > 0 and inj.flipped == 0  # the injector ran, and flipped nothing


def test_flip_masks_rate_and_independence():
    n, bits, p = 20000, 4, 0.05
    m = flip_masks(n, bits, p, torch.Generator().manual_seed(0))
    assert m.dtype == torch.uint8 and int(m.max()) < 1 << bits
    for i in range(bits):  # every bit plane flips a binomially plausible fraction
        assert binomial_ok(int(((m >> i) & 1).sum()), n, p)
    both = int((((m >> 0) & 1) & ((m >> 1) & 1)).sum())  # planes independent: p^2 of cells
    assert binomial_ok(both, n, p * p)
    assert flip_masks(n, bits, 0.0, torch.Generator()).eq(0).all()
    assert flip_masks(10, 3, 1.0, torch.Generator()).eq(7).all()


@pytest.mark.parametrize("p", [0.01, 0.05])
def test_the_flipped_weights_are_the_levels_of_the_flipped_codes(trained, digits, p):
    model, _ = trained
    m = copy.deepcopy(model)
    fmap = sample_fault_map(m, FaultModel(rate=0.2, seed=4))
    attach_faults(m, fmap)
    attach_bitflips(m, BitFlipModel(rate=p, seed=7))
    x = digits[1].tensors[0][:8]
    outputs(m, x)
    cells = flipped = 0
    for name, layer in nmult_layers(m):
        tq = quant_of(layer)
        inj = bitflip_injectors(m)[name]
        # What the layer computes with (one more inference: a fresh draw), against the
        # recomputation from that draw's mask.
        w = layer.weight_quant(layer.weight)
        mask = inj.last_mask
        cells += mask.numel() * tq.bits
        flipped += popcount(mask, tq.bits)
        codes = tq.to_groups(S.nearest(tq.to_groups(layer.weight.detach()), tq.levels())[1])
        sa0, sa1 = (tq.to_groups(t) for t in fmap.layers[name])
        read = D.force_codes(codes.to(torch.uint8) ^ mask, sa0, sa1)
        want = tq.levels().detach().gather(1, read.long())
        assert torch.equal(tq.to_groups(w), want)
        # Stuck cells stay stuck whatever the flip.
        assert torch.equal(read & sa0, torch.zeros_like(read)) and torch.equal(read & sa1, sa1)
    assert binomial_ok(flipped, cells, p)


def test_same_seed_same_flips_and_new_flips_every_forward(trained, digits):
    model, _ = trained
    x = digits[1].tensors[0][:16]

    def run(seed, passes=3):
        m = copy.deepcopy(model)
        attach_bitflips(m, BitFlipModel(rate=0.05, seed=seed))
        masks, outs = [], []
        for _ in range(passes):
            outs.append(outputs(m, x))
            masks.append({n: i.last_mask.clone() for n, i in bitflip_injectors(m).items()})
        return masks, outs

    a_masks, a_outs = run(3)
    b_masks, b_outs = run(3)
    c_masks, _ = run(4)
    for k in range(3):
        assert all(torch.equal(a_masks[k][n], b_masks[k][n]) for n in a_masks[k])
        assert torch.equal(a_outs[k], b_outs[k])
        assert any(not torch.equal(a_masks[k][n], c_masks[k][n]) for n in a_masks[k])
    assert any(not torch.equal(a_masks[0][n], a_masks[1][n]) for n in a_masks[0])
    # A layer's flips do not depend on the other layers' rates (own generator per layer).
    m = copy.deepcopy(model)
    names = [n for n, _ in nmult_layers(m)]
    attach_bitflips(m, BitFlipModel(rate=0.05, seed=3, layer_rates={names[0]: 0.5}))
    outputs(m, x)
    assert torch.equal(bitflip_injectors(m)[names[1]].last_mask, a_masks[0][names[1]])


def test_detach_and_deepcopy(trained, digits):
    model, _ = trained
    x = digits[1].tensors[0][:32]
    m = copy.deepcopy(model)
    clean = outputs(m, x)
    attach_bitflips(m, BitFlipModel(rate=0.2, seed=0))
    noisy = outputs(m, x)
    assert not torch.equal(noisy, clean)
    twin = copy.deepcopy(m)  # the copy carries its own injectors, at the same stream position
    assert torch.equal(outputs(twin, x), outputs(m, x))
    detach_bitflips(m)
    assert bitflip_injectors(m) == {}
    assert torch.equal(outputs(m, x), clean)
    assert bitflip_injectors(twin)  # detaching one model leaves the other alone


def test_straight_through_gradient_in_training():
    torch.manual_seed(0)
    layer = qnn.QuantLinear(6, 3, bias=False, weight_quant=NMultWeightQuant,
                            weight_bit_width=3)
    model = nn.Sequential(layer)
    attach_bitflips(model, BitFlipModel(rate=0.2, seed=1))
    model.train()
    x = torch.randn(5, 6)
    y = model(x)
    tq = quant_of(layer)
    inj = bitflip_injectors(model)["0"]
    codes = S.nearest(tq.to_groups(layer.weight.detach()), tq.levels())[1]
    v = tq.levels().detach().gather(1, codes ^ inj.last_mask.long()).view(3, 6)
    assert torch.allclose(y, x @ v.t())  # trained through the flipped weights
    y.sum().backward()
    assert torch.allclose(layer.weight.grad, torch.ones(5, 3).t() @ x)  # straight through
    assert tq.r.grad is not None and tq.r.grad.abs().sum() > 0  # levels learn from it too


def test_bad_input():
    for bad in (-0.1, 1.5, "x", float("nan")):
        with pytest.raises(ValueError, match="BitFlipModel.rate must be a number in"):
            BitFlipModel(rate=bad)
    with pytest.raises(ValueError, match="seed"):
        BitFlipModel(rate=0.1, seed=1.5)
    m = nn.Sequential(qnn.QuantLinear(4, 2, bias=False, weight_quant=NMultWeightQuant))
    with pytest.raises(ValueError, match=r"not N-multiplier layers of the model: \['fc'\]"):
        attach_bitflips(m, BitFlipModel(rate=0.1, layer_rates={"fc": 0.0}))
    with pytest.raises(TypeError, match="BitFlipModel"):
        attach_bitflips(m, 0.1)
    with pytest.raises(ValueError, match="no N-multiplier layer"):
        attach_bitflips(nn.Sequential(nn.Linear(2, 2)), BitFlipModel(rate=0.1))
