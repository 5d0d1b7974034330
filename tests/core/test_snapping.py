"""Tests of ``qfv_brevitas.core.snapping``: snapping weights onto their levels for good, reading
their N-bit codes, and the per-layer report.

Nearest levels are recomputed by a brute-force argmin over every level (no library search);
codes are checked through the code -> level definition ``c + sum_i r_i * bit_i(code)``.
"""
from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch
from torch import nn

from qfv_brevitas import (format_report, layer_report, regularization_loss, snap_weights_,
                          weight_codes)
from qfv_brevitas.core.quantizers import (FixedLevelWeightQuant, LearnedStepWeightPerChannelQuant,
                                     NMultWeightPerChannelQuant, NMultWeightQuant, nmult_layers,
                                     quant_of)

EXACT = dict(atol=0, rtol=0)



class Net(nn.Module):
    """conv (per channel, nmult) -> conv (per tensor, fixed) -> linear (per channel, step, ste)
    -> linear (per tensor, nmult, both) -> float linear."""

    def __init__(self, bits: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            qnn.QuantConv2d(2, 4, 3, bias=True, weight_quant=NMultWeightPerChannelQuant,
                            weight_bit_width=bits),
            nn.ReLU(),
            qnn.QuantConv2d(4, 3, 3, bias=False, weight_quant=FixedLevelWeightQuant,
                            weight_bit_width=bits))
        self.head = nn.ModuleDict({
            "proj": qnn.QuantLinear(12, 6, bias=True, weight_quant=LearnedStepWeightPerChannelQuant,
                                    weight_bit_width=bits, weight_forward_mode="ste"),
            "out": qnn.QuantLinear(6, 5, bias=False, weight_quant=NMultWeightQuant,
                                   weight_bit_width=bits, weight_forward_mode="both"),
        })
        self.plain = nn.Linear(5, 2)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # move the learnable levels off the uniform grid
            for _, layer in nmult_layers(self):
                for p in quant_of(layer).parameters():
                    p.mul_(1 + 0.4 * (torch.rand(p.shape, generator=g) - 0.5))
            # Negative multipliers: code order is no longer the levels' sorted order.
            for layer, row in ((self.features[0], 1), (self.head["out"], 0)):
                tq = quant_of(layer)
                if tq.bits > 1:
                    tq.c[row] += tq.r[row, 1]
                    tq.r[row, 1] *= -1

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.plain(self.head["out"](torch.relu(self.head["proj"](x))))


NAMES = ["features.0", "features.2", "head.proj", "head.out"]


def brute(layer):
    """(nearest level, code, |w - level|) of each weight, in the weight's shape."""
    tq = quant_of(layer)
    w = layer.weight.detach()
    w2d = w.reshape(w.shape[0] if tq.per_channel else 1, -1)
    lv = tq.levels().detach()
    d = (w2d[:, :, None] - lv[:, None, :]).abs()
    dist, code = d.min(dim=2)
    return lv.gather(1, code).reshape(w.shape), code.reshape(w.shape), dist.reshape(w.shape)


def level_of_codes(layer, codes):
    """Level of each code by the definition c + sum_i r_i bit_i(code)."""
    tq = quant_of(layer)
    G = tq.levels().shape[0]
    lv = tq.levels().detach()
    return lv.gather(1, codes.long().reshape(G, -1)).reshape(codes.shape)


@pytest.mark.parametrize("bits", range(1, 9))
def test_snap_weights_codes_and_levels(bits):
    model = Net(bits, seed=bits)
    assert [n for n, _ in nmult_layers(model)] == NAMES
    plain_before = model.plain.weight.detach().clone()
    quant_before = {n: p.detach().clone() for n, p in model.named_parameters()
                    if "tensor_quant" in n}
    expected = {n: brute(l) for n, l in nmult_layers(model)}
    codes_before = weight_codes(model)

    codes = snap_weights_(model)
    assert list(codes) == NAMES
    for name, layer in nmult_layers(model):
        c = codes[name]
        assert c.dtype == torch.uint8 and c.shape == layer.weight.shape
        assert int(c.max()) < 2 ** bits
        q, code_ref, _ = expected[name]
        torch.testing.assert_close(layer.weight.detach(), q, **EXACT)  # nearest level
        torch.testing.assert_close(level_of_codes(layer, c), layer.weight.detach(), **EXACT)
        torch.testing.assert_close(c.long(), code_ref, **EXACT)
        # Codes read before the snap are the codes the snap used.
        torch.testing.assert_close(codes_before[name], c, **EXACT)
    # Levels and float layers untouched.
    torch.testing.assert_close(model.plain.weight.detach(), plain_before, **EXACT)
    for n, p in model.named_parameters():
        if "tensor_quant" in n:
            torch.testing.assert_close(p.detach(), quant_before[n], **EXACT)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_snap_weights_is_idempotent_and_weight_codes_agree(bits):
    model = Net(bits)
    codes = snap_weights_(model)
    weights = {n: l.weight.detach().clone() for n, l in nmult_layers(model)}
    again = snap_weights_(model)
    read = weight_codes(model)
    assert list(again) == list(read) == NAMES
    for name, layer in nmult_layers(model):
        torch.testing.assert_close(layer.weight.detach(), weights[name], **EXACT)
        torch.testing.assert_close(again[name], codes[name], **EXACT)
        torch.testing.assert_close(read[name], codes[name], **EXACT)
        assert read[name].dtype == torch.uint8
    assert regularization_loss(model).item() == 0.0


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_after_snapping_train_and_eval_outputs_agree(bits):
    model = Net(bits)
    x = torch.randn(3, 2, 6, 6)
    with torch.no_grad():
        model.train()
        y_train = model(x)
        model.eval()
        y_eval = model(x)
        assert not torch.equal(y_train, y_eval)  # paper-mode layers train on float weights
        snap_weights_(model)
        model.train()
        y_train = model(x)
        model.eval()
        y_eval2 = model(x)
    torch.testing.assert_close(y_train, y_eval2, **EXACT)
    # Snapping for good does not change what the evaluated model computes.
    torch.testing.assert_close(y_eval2, y_eval, **EXACT)


def test_layer_report_rows():
    model = Net(3)
    rows = layer_report(model)
    assert [r["layer"] for r in rows] == NAMES
    spec = {"features.0": ("nmult", "paper", True), "features.2": ("fixed", "paper", False),
            "head.proj": ("step", "ste", True), "head.out": ("nmult", "both", False)}
    for row, (name, layer) in zip(rows, nmult_layers(model)):
        tq = quant_of(layer)
        assert (row["variant"], row["mode"], row["per_channel"]) == spec[name]
        assert row["bits"] == 3 and row["num_weights"] == layer.weight.numel()
        G = layer.weight.shape[0] if row["per_channel"] else 1
        if tq.variant == "step":
            r = (tq.step.detach()[:, None] * 2.0 ** torch.arange(3)).tolist()
        else:
            r = tq.r.detach().tolist()
        assert row["r"] == r and len(row["r"]) == G and len(row["r"][0]) == 3
        assert row["c"] == tq.c.detach().tolist() and len(row["c"]) == G
        assert row["levels"] == tq.levels().detach().tolist()
        if name in ("features.0", "head.out"):  # indexed by code, not sorted
            assert any(lv != sorted(lv) for lv in row["levels"])
        # Levels by their definition, independently of level_table.
        for g in range(G):
            for k in range(8):
                ref = row["c"][g] + sum(row["r"][g][i] for i in range(3) if (k >> i) & 1)
                assert row["levels"][g][k] == pytest.approx(ref, rel=1e-6, abs=1e-7)
        _, _, dist = brute(layer)
        assert row["mean_distance"] == float(dist.mean())
        assert row["max_distance"] == float(dist.max())
        assert row["max_distance"] > 0
        assert all(isinstance(row[k], (int, float, str, bool, list)) for k in row)
    snap_weights_(model)
    for row in layer_report(model):
        assert row["mean_distance"] == 0.0 and row["max_distance"] == 0.0


def test_format_report_names_every_layer():
    model = Net(4)
    rows = layer_report(model)
    text = format_report(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "layer" in lines[0] and set(lines[1]) == {"-"}
    for name, line in zip(NAMES, lines[2:]):
        assert line.startswith(name + " ")
        assert " 4 " in line
    assert lines[2].split()[3] == "channel" and lines[3].split()[3] == "tensor"
    assert format_report([]).split()[:2] == ["layer", "bits"]  # header only, no rows


def test_format_report_keeps_long_layer_names():
    m = nn.Module()
    m.features = nn.Module()
    m.features.denseblock4 = nn.ModuleDict({
        f"denselayer{i}": nn.ModuleDict({"conv2": qnn.QuantLinear(
            3, 2, bias=False, weight_quant=NMultWeightQuant, weight_bit_width=2)})
        for i in (15, 16)})
    text = format_report(layer_report(m))
    for name in ("features.denseblock4.denselayer15.conv2",
                 "features.denseblock4.denselayer16.conv2"):
        assert name in text
