"""Tests of ``qfv_brevitas.training.refit``: each layer's levels refitted in place to its weights
(full fit or warm start, which layers it leaves alone) and the refits ``fit`` runs every
``TrainConfig.refit_every`` steps."""
from __future__ import annotations

import pytest
import torch

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.chip.faults import FaultModel, attach_faults, sample_fault_map
from qfv_brevitas.core import fitting as F
from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.training.refit import refit_levels_
from qfv_brevitas.training.train import TrainConfig, fit


def test_refit_levels_in_place(float_cnn):
    q = quantize_model(float_cnn, NMultConfig(weight_bits=3, act_bits=None, init="lsq",
                                              first_last_bits=None))
    params = {n: (quant_of(l).r, quant_of(l).c) for n, l in nmult_layers(q)}
    rows = refit_levels_(q)
    assert [r["layer"] for r in rows] == list(params)
    for row, (name, layer) in zip(rows, nmult_layers(q)):
        tq = quant_of(layer)
        w2d = tq.to_groups(layer.weight.detach())
        assert tq.r is params[name][0] and tq.c is params[name][1]  # in place
        fitted = F.fit_multipliers(w2d, 3)
        assert row["error_after"] == pytest.approx(float(fitted.error.sum()), rel=1e-6)
        assert row["error_after"] < 0.7 * row["error_before"]  # LSQ's grid is far off
    # Warm refits from the fit never increase the error.
    for row in refit_levels_(q, warm=True):
        assert row["error_after"] <= row["error_before"] * (1 + 1e-12)
    with pytest.raises(ValueError, match="no N-multiplier layers named"):
        refit_levels_(q, layers=["nope"])


def test_refit_leaves_fixed_levels_alone_when_warm_and_device_mapped_layers(float_cnn):
    q = quantize_model(float_cnn, NMultConfig(weight_bits=3, act_bits=None, variant="fixed"))
    before = {n: quant_of(l).levels().clone() for n, l in nmult_layers(q)}
    refit_levels_(q, warm=True)
    for n, l in nmult_layers(q):
        assert torch.equal(quant_of(l).levels(), before[n])
    q = quantize_model(float_cnn, NMultConfig(weight_bits=3, act_bits=None))
    attach_faults(q, sample_fault_map(q, FaultModel(rate=0.1, seed=0,
                                                    layer_rates={"features.0": 0.0})))
    # Every layer carries a map (rate 0 on one): all are left to the device-aware regularizer.
    assert refit_levels_(q) == []
    assert len(refit_levels_(q, skip_device_maps=False)) == len(nmult_layers(q))


def test_refit_every_refits_during_training(float_cnn, digits):
    """With the r/c learning rate at 0 only the refits can move the levels; after training the
    levels are a fixed point of the refit (the last step ends with one)."""
    train, _ = digits
    q = quantize_model(float_cnn, NMultConfig(weight_bits=3, act_bits=None, init="uniform"))
    r0 = {n: quant_of(l).r.detach().clone() for n, l in nmult_layers(q)}
    steps = -(-len(train) // 64)
    fit(q, train, None, TrainConfig(epochs=1, lr=0.01, quant_lr=0.0, lambda_rise_epochs=1,
                                    refit_every=steps), progress=False)
    assert any(not torch.equal(quant_of(l).r, r0[n]) for n, l in nmult_layers(q))
    for row in refit_levels_(q, warm=True):
        assert row["error_after"] >= row["error_before"] * (1 - 1e-9), row
    with pytest.raises(ValueError, match="refit_every"):
        TrainConfig(refit_every=-1)
