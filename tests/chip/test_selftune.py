"""Tests of ``qfv_brevitas.chip.selftune``: per-layer activation recalibration of a simulated chip
from an unlabeled batch. The statistics are recomputed independently with forward hooks and
``torch.mean``/``torch.std`` over the channel axis."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qfv_brevitas import (VariabilityModel, attach_variability, nmult_layers,
                          sample_variability_map)
from qfv_brevitas.chip.bitflips import BitFlipModel, attach_bitflips
from qfv_brevitas.chip.selftune import (calibration_batch, layer_statistics, reference_statistics,
                                   remove_self_tuning, self_tune)
from qfv_brevitas.training.train import evaluate


def hooked_stats(model, x):
    """Per layer, per channel mean and population std of the outputs, recomputed here."""
    out = {}

    def hook_of(name, layer):
        def hook(mod, inp, y):
            dim = y.dim() - 1 if isinstance(layer, nn.Linear) else 1
            t = y.detach().double().movedim(dim, 0).reshape(y.shape[dim], -1)
            out[name] = (t.mean(1), t.std(1, unbiased=False))
        return hook

    hs = [l.register_forward_hook(hook_of(n, l)) for n, l in nmult_layers(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return out


def chip(model, **kw):
    m = copy.deepcopy(model)
    attach_variability(m, sample_variability_map(m, VariabilityModel(**kw)))
    return m


@pytest.fixture(scope="module")
def calib(digits):
    return calibration_batch(digits[0], 64, seed=0)


def test_restores_the_clean_layer_statistics_on_a_chip(trained, digits, calib):
    model, _ = trained
    ref = hooked_stats(model, calib)
    c = chip(model, sigma=0.2, chip_sigma=0.1, layer_shared_sigma=0.1, seed=3)
    before = hooked_stats(c, calib)
    off = max(float(((before[n][0] - ref[n][0]).abs() / ref[n][1]).max()) for n in ref)
    assert off > 0.1  # the chip moved the statistics
    state = {k: v.clone() for k, v in c.state_dict().items() if isinstance(v, torch.Tensor)}
    tuning = self_tune(c, calib, reference_statistics(model, calib))
    after = hooked_stats(c, calib)
    for n, (mean, std) in ref.items():
        torch.testing.assert_close(after[n][0], mean, rtol=1e-4, atol=1e-4 * float(std.max()))
        torch.testing.assert_close(after[n][1], std, rtol=1e-4, atol=1e-6)
    assert set(tuning.layers) == set(ref)
    # No weight, buffer or map changed: the corrections live in hooks.
    for k, v in c.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state[k]), k
    # On images it was not calibrated on, the statistics move closer to the clean ones too.
    held = digits[1].tensors[0][:200]
    ref_h = hooked_stats(model, held)
    before_h = hooked_stats(chip(model, sigma=0.2, chip_sigma=0.1, layer_shared_sigma=0.1,
                                 seed=3), held)
    after_h = hooked_stats(c, held)
    for n in ref_h:
        gap_before = (before_h[n][0] - ref_h[n][0]).abs().mean()
        gap_after = (after_h[n][0] - ref_h[n][0]).abs().mean()
        assert gap_after < gap_before, n


def test_layer_statistics_agree_with_an_independent_recomputation(trained, calib):
    model, _ = trained
    st = layer_statistics(model, calib)
    ref = hooked_stats(model, calib)
    assert st.input_shape == tuple(calib.shape[1:])
    for n, (mean, std) in ref.items():
        torch.testing.assert_close(st.mean[n], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.std[n], std, rtol=1e-12, atol=1e-12)


def test_reference_statistics_are_those_of_the_ideal_device(trained, calib):
    model, _ = trained
    c = chip(model, sigma=0.3, seed=1)
    attach_bitflips(c, BitFlipModel(rate=0.05, seed=1))
    ref = reference_statistics(c, calib)
    clean = layer_statistics(model, calib)
    for n in clean.mean:
        assert torch.equal(ref.mean[n], clean.mean[n]) and torch.equal(ref.std[n], clean.std[n])
    assert c.features[3].weight_quant.chip.has_variability  # the chip itself is left as it was


def test_recovers_accuracy_and_is_removable(trained, digits, calib):
    model, clean = trained
    test = digits[1]
    c = chip(model, sigma=0.3, seed=0)
    x = test.tensors[0][:100]
    with torch.no_grad():
        out_chip = c.eval()(x)
    acc_chip = evaluate(c, test)
    tuning = self_tune(c, calib)  # reference: the same weights on the ideal device
    acc_tuned = evaluate(c, test)
    # sigma 0.3 wrecks the chip (with LSQ's grid 12.8% -> 32.2% tuned; the fitted default
    # levels lose less)
    assert acc_chip < clean - 0.3 and acc_tuned > acc_chip + 0.15, (clean, acc_chip, acc_tuned)
    assert all(float(s.min()) > 0 for s in tuning.scale.values())
    tuning.remove()
    with torch.no_grad():
        assert torch.equal(c(x), out_chip)
    # Tuning twice replaces, never stacks.
    self_tune(c, calib)
    self_tune(c, calib)
    assert evaluate(c, test) == acc_tuned
    remove_self_tuning(c)
    assert evaluate(c, test) == acc_chip


def test_shift_mode_restores_means_only(trained, calib):
    model, _ = trained
    ref = hooked_stats(model, calib)
    c = chip(model, sigma=0.3, seed=2)
    before = hooked_stats(c, calib)
    self_tune(c, calib, reference_statistics(model, calib), mode="shift")
    after = hooked_stats(c, calib)
    for n, (mean, std) in ref.items():
        torch.testing.assert_close(after[n][0], mean, rtol=1e-4, atol=1e-4 * float(std.max()))
    # The first layer's spread is untouched; later layers see shifted inputs through ReLUs.
    first = next(iter(ref))
    torch.testing.assert_close(after[first][1], before[first][1], rtol=1e-6, atol=1e-9)
    assert any(not torch.allclose(after[n][1], ref[n][1], rtol=1e-3) for n in ref)


def test_bad_calibration_batches_and_references(trained, digits, calib):
    model, _ = trained
    c = chip(model, sigma=0.2, seed=0)
    ref = reference_statistics(model, calib)
    with pytest.raises(ValueError, match=r"inputs of shape \(64,\) but the reference "
                                         r"statistics were recorded on inputs of shape "
                                         r"\(1, 8, 8\).*\(B, 1, 8, 8\)"):
        self_tune(c, calib.reshape(64, 64), ref)
    with pytest.raises(ValueError, match="at least 2 inputs"):
        self_tune(c, calib[:1], ref)
    with pytest.raises(ValueError, match="pass images only, not"):
        self_tune(c, (calib, torch.zeros(64)), ref)
    with pytest.raises(ValueError, match="floating-point"):
        self_tune(c, (calib * 255).to(torch.uint8), ref)
    with pytest.raises(ValueError, match="no N-multiplier layer"):
        self_tune(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), calib.reshape(64, 1, 8, 8))
    wrong = copy.deepcopy(ref)
    wrong.mean.pop("features.0")
    with pytest.raises(ValueError, match="reference statistics are of layers"):
        self_tune(c, calib, wrong)
    with pytest.raises(ValueError, match="unknown self-tuning mode"):
        self_tune(c, calib, ref, mode="scale")
    with pytest.raises(ValueError, match="calibration batch size"):
        calibration_batch(digits[0], 1)
    # Failed calls leave no correction behind.
    assert not any(type(h).__name__ == "_Correction"
                   for _, l in nmult_layers(c) for h in l._forward_hooks.values())


def test_several_passes_pool_the_statistics_over_flip_draws(trained, calib):
    model, _ = trained
    ref = reference_statistics(model, calib)
    c = chip(model, sigma=0.2, seed=5)
    one = self_tune(c, calib, ref)
    scale1 = {n: t.clone() for n, t in one.scale.items()}
    three = self_tune(c, calib, ref, passes=3)  # a static chip: every pass sees the same
    for n, t in three.scale.items():
        torch.testing.assert_close(t, scale1[n], rtol=1e-9, atol=1e-12)
    # With bit flips: the first layer's correction comes from its outputs pooled over 4 draws
    # (after the one plain pass that finds the execution order).
    attach_bitflips(c, BitFlipModel(rate=0.05, seed=2))
    twin = copy.deepcopy(c)
    remove_self_tuning(twin)
    first = next(n for n, _ in nmult_layers(c))
    outs = []
    h = dict(nmult_layers(twin))[first].register_forward_hook(
        lambda m, i, y: outs.append(y.detach().double()))
    with torch.no_grad():
        for _ in range(5):
            twin.eval()(calib)
    h.remove()
    y = torch.cat(outs[1:]).movedim(1, -1).reshape(-1, outs[0].shape[1])
    tuning = self_tune(c, calib, ref, passes=4)
    torch.testing.assert_close(tuning.scale[first], ref.std[first] / y.std(0, unbiased=False),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="passes must be an integer >= 1"):
        self_tune(c, calib, ref, passes=0)
