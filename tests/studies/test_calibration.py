"""Brevitas' PTQ toolbox on N-multiplier models (``qfv_brevitas.studies.calibration``): GPTQ
over the N-multiplier levels against a direct implementation of the GPTQ update, GPFQ, activation
calibration (the activations really are quantized), bias correction, and the toolbox through
``quantize_post_training`` (both the fitted model and its Brevitas baseline)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.studies.calibration import (activation_quantizers, apply_toolbox,
                                              calibrate_activations, calibration_batches,
                                              compensate_errors, correct_biases)
from qfv_brevitas.studies.ptq import PTQError, quantize_post_training
from qfv_brevitas.training.train import evaluate


def _inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs (a random mixing of Gaussian sources): GPTQ's updates matter only
    where the Hessian has off-diagonal terms."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / math.sqrt(d)


def _one_layer(per_channel: bool, bits: int = 3, d: int = 24, out: int = 6, bias=False):
    torch.manual_seed(1)
    lin = nn.Linear(d, out, bias=bias)
    cfg = NMultConfig(weight_bits=bits, act_bits=None, first_last_bits=None,
                      per_channel=per_channel)
    return quantize_model(nn.Sequential(lin), cfg).eval(), lin


def _nearest(w2d: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each row's values replaced by the row's nearest level (``levels``: (G, 2**N))."""
    idx = (w2d[:, :, None] - levels[:, None, :]).abs().argmin(-1)
    return torch.gather(levels, 1, idx)


def gptq_reference(w: torch.Tensor, x: torch.Tensor, levels: torch.Tensor,
                   per_channel: bool, percdamp: float = 0.01):
    """GPTQ (Frantar et al. 2022, Algorithm 1 without lazy blocks), written out here in
    float64: ``H = 2/n X^T X`` damped by 1% of its mean diagonal, ``U`` the upper Cholesky
    factor of ``H^-1``; column by column, ``q = nearest level``, ``e = (w - q) / U_jj`` and
    the columns to the right move by ``-e U_j,j:``. Returns (float weights after the
    updates, their levels)."""
    w = w.double().clone()
    x = x.double()
    h = 2 * x.t() @ x / x.shape[0]
    h += percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    lv = levels.double()
    q = torch.empty_like(w)
    for j in range(w.shape[1]):
        col = w[:, j:j + 1]
        qj = (_nearest(col, lv) if per_channel else _nearest(col.t(), lv).t())
        q[:, j] = qj[:, 0]
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
    return w, q


@pytest.mark.parametrize("per_channel", [False, True])
def test_brevitas_gptq_on_nmult_levels_is_the_gptq_update(per_channel):
    """Brevitas' gptq_mode on an N-multiplier layer computes exactly the GPTQ update over the
    layer's levels (r, c unchanged), as a direct implementation does."""
    q, lin = _one_layer(per_channel)
    layer = q[0]
    tq = quant_of(layer)
    r0, c0 = tq.r.detach().clone(), tq.c.detach().clone()
    x = _inputs(256, 24)
    w_ref, q_ref = gptq_reference(lin.weight.detach(), x, tq.levels().detach(), per_channel)
    compensate_errors(q, [x[:128], x[128:]])
    assert torch.equal(tq.r, r0) and torch.equal(tq.c, c0)
    deployed = layer.quant_weight().value if hasattr(layer.quant_weight(), "value") \
        else layer.quant_weight()
    assert torch.equal(deployed.double(), q_ref.to(deployed.dtype).double())
    torch.testing.assert_close(layer.weight.detach().double(), w_ref, atol=2e-5, rtol=1e-4)
    # It really compensated: not plain nearest-level snapping of the original weights.
    plain = tq.snap(lin.weight.detach())
    assert (deployed != plain).float().mean() > 0.05


def _output_error(layer_w: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (layer_w - w).t()) ** 2).mean())


@pytest.mark.parametrize("method", ["gptq", "gpfq"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_compensated_weights_are_levels_with_less_output_error(method, per_channel):
    """Every compensated weight is one of its layer's levels, and the layer's output error on
    the calibration data is below plain nearest-level snapping's (conv and linear)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 10))
    # Smooth images: neighbouring pixels correlate, as in real inputs (GPTQ needs that).
    x = nn.functional.interpolate(torch.randn(128, 3, 3, 3), size=(6, 6), mode="bilinear",
                                  align_corners=True) + 0.1 * torch.randn(128, 3, 6, 6)
    cfg = NMultConfig(weight_bits=2, act_bits=None, first_last_bits=None,
                      per_channel=per_channel)
    q = quantize_model(net, cfg).eval()
    plain = {n: quant_of(l).snap(l.weight.detach()) for n, l in nmult_layers(q)}
    compensate_errors(q, [x], method)
    conv, lin = q[0], q[3]
    with torch.no_grad():
        feats = net[2](net[1](net[0](x)))
    cols = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    for name, layer, inp in (("0", conv, cols), ("3", lin, feats)):
        tq = quant_of(layer)
        w = net.get_submodule(name).weight.detach()
        dep = tq.snap(layer.weight.detach())
        lv = tq.levels().detach()
        rows = tq.to_groups(dep)
        for g in range(rows.shape[0]):
            assert torch.isin(rows[g], lv[min(g, lv.shape[0] - 1)]).all(), name
        e_comp = _output_error(dep.flatten(1), w.flatten(1), inp)
        e_plain = _output_error(plain[name].flatten(1), w.flatten(1), inp)
        assert e_comp < 0.9 * e_plain, (name, e_comp, e_plain)
    assert not any("weight_orig" in k for k in q.state_dict())


def test_compensation_refuses_a_layer_on_a_non_ideal_chip():
    """A fault map is bound to the whole weight tensor; GPTQ quantizes one column at a time
    over the ideal levels: refused with a clear message, before any weight moves."""
    q, _ = _one_layer(per_channel=False)
    tq = quant_of(q[0])
    sa0 = torch.zeros(6, 24, dtype=torch.uint8)
    sa0[0, 0] = 1  # bit 0 of one weight stuck at 0
    tq.chip.set_faults(sa0, torch.zeros_like(sa0))
    w0 = q[0].weight.detach().clone()
    with pytest.raises(ValueError, match="compensate first, then attach the maps"):
        compensate_errors(q, [_inputs(32, 24)])
    assert torch.equal(q[0].weight, w0)


def test_bias_correction_moves_biases_by_the_mean_output_error():
    """Brevitas' bias correction on an N-multiplier layer: the bias moves by exactly the mean
    (float - quantized) output per channel on the calibration data, which removes the mean
    error there; a layer without a bias is left without one."""
    q, lin = _one_layer(per_channel=False, bits=2, bias=True)
    x = _inputs(200, 24, seed=3) + 0.5  # a mean input, so the weight error shifts the mean
    layer = q[0]
    with torch.no_grad():
        err_before = (lin(x) - q(x)).mean(0)
        b0 = layer.bias.detach().clone()
    assert err_before.abs().max() > 1e-3
    correct_biases(q, calibration_batches(x, 200, 50))
    with torch.no_grad():
        torch.testing.assert_close(layer.bias - b0, err_before, atol=1e-5, rtol=1e-4)
        err_after = (lin(x) - q(x)).mean(0)
    assert err_after.abs().max() < 1e-4 * err_before.abs().max() + 1e-6
    nobias, _ = _one_layer(per_channel=False, bits=2, bias=False)
    keys = set(nobias.state_dict())
    correct_biases(nobias, [x])
    assert nobias[0].bias is None and set(nobias.state_dict()) == keys


def _captured(model, x, modules, inputs: bool = False):
    """Run ``model`` once on ``x``; per module of ``modules``, the list of its first inputs
    (``inputs``) or of its outputs (a quant tensor's value), one per call."""
    seen = {}

    def keep(mod, inp, out=None):
        t = inp[0] if inputs else (out.value if hasattr(out, "value") else out)
        seen.setdefault(mod, []).append(t)

    hooks = [m.register_forward_pre_hook(keep) if inputs else m.register_forward_hook(keep)
             for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _quantized_inputs(model, x):
    """Each activation quantizer proxy's output on ``x``, by proxy."""
    return {p: torch.cat(v) for p, v in _captured(model, x, activation_quantizers(model)).items()}


@pytest.mark.parametrize("act_bits", [2, 4])
def test_act_bits_quantizes_activations_of_both_models(float_cnn, digits, act_bits):
    """``act_bits``: each compute layer's input goes through a Brevitas activation quantizer,
    calibrated on the calibration data (almost no input clipped), whose outputs take at most
    2**A values (8 bits at the first and last layers); the Brevitas baseline gets the same."""
    train, test = digits
    res = quantize_post_training(float_cnn, 3, data=test, calib_data=train, lloyd=False,
                                 act_bits=act_bits, calib_samples=128)
    assert res.config.act_bits == act_bits and res.meta["act_bits"] == act_bits
    assert res.meta["calib_samples"] == 128
    x = calibration_batches(train, 128)[0]
    for model in (res.model, res.baseline_model):
        layers = [m for _, m in model.named_modules() if hasattr(m, "input_quant")
                  and hasattr(m, "weight_quant")]
        assert len(layers) == 5
        outs = _quantized_inputs(model, x)
        assert set(outs) == {m.input_quant for m in layers}
        for i, m in enumerate(layers):
            bits = 8 if i in (0, 4) else act_bits
            vals = torch.unique(outs[m.input_quant])
            assert 2 <= len(vals) <= 2 ** bits, (i, len(vals))
            scale = float(m.input_quant.scale())
            torch.testing.assert_close(vals / scale, torch.round(vals / scale))
        assert max(_clipped(model, x)) < 0.01  # calibrated, the baseline as well
    assert evaluate(res.model, test) == pytest.approx(res.acc)
    assert evaluate(res.baseline_model, test) == pytest.approx(res.baseline_acc)
    assert "A%d" % act_bits in res.table() and "mse scale" in res.baseline


def _clipped(model, x):
    """Per compute layer (execution order): the fraction of its raw inputs on ``x`` above its
    activation quantizer's largest level (what calibration keeps near zero)."""
    layers = [m for m in model.modules() if hasattr(m, "input_quant")
              and hasattr(m, "weight_quant")]
    raw = _captured(model, x, [m.input_quant for m in layers], inputs=True)
    out = []
    for m in layers:
        top = float(m.input_quant.scale()) * (2 ** int(m.input_quant.bit_width()) - 1)
        out.append(float((raw[m.input_quant][0] > top * 1.01).float().mean()))
    return out


def test_calibration_sets_the_scales_from_the_data(float_cnn, digits):
    """calibrate_activations moves the activation quantizers' scales from their start to the
    data's range: (almost) no calibration input is clipped, where many were before."""
    train, _ = digits
    x = calibration_batches(train, 256)[0]
    q = quantize_model(float_cnn, NMultConfig(weight_bits=3, act_bits=4), example_input=x).eval()
    before = [float(p.scale()) for p in activation_quantizers(q)]
    clipped_before = _clipped(q, x)
    calibrate_activations(q, [x])
    after = [float(p.scale()) for p in activation_quantizers(q)]
    # The first layer's inputs are pixels in [0, 1]: 8-bit unsigned at 1/255 from the start.
    assert after[0] == pytest.approx(1 / 255)
    assert all(abs(a - b) > 1e-3 * b for a, b in zip(after[1:], before[1:]))
    assert max(_clipped(q, x)) < 0.01 < max(clipped_before)


def test_toolbox_through_quantize_post_training(float_cnn, digits):
    """GPTQ and bias correction reach both models; the defaults compare against Brevitas' MSE
    scale; the options are checked before any work."""
    train, test = digits
    plain = quantize_post_training(float_cnn, 2, data=test, lloyd=False)
    assert plain.baseline == "uniform (mse scale)"  # the default baseline is Brevitas' MSE
    assert plain.meta["compensation"] is None
    res = quantize_post_training(float_cnn, 2, data=test, calib_data=train, lloyd=False,
                                 compensation="gptq", bias_correction=True, calib_samples=200)
    assert res.baseline == "uniform (mse scale, GPTQ, bias corrected)"
    assert "fitted N-multiplier (GPTQ, bias corrected)" in res.table()
    # The fitted levels are kept (r, c as fitted), the weights moved by GPTQ.
    for (n, a), (_, b) in zip(nmult_layers(plain.model), nmult_layers(res.model)):
        assert torch.equal(quant_of(a).r, quant_of(b).r), n
    moved = [float((a.weight - b.weight).abs().max())
             for (_, a), (_, b) in zip(nmult_layers(plain.model), nmult_layers(res.model))]
    assert max(moved) > 1e-3
    assert not any("weight_orig" in k for k in res.model.state_dict())
    # Only bias correction changes a bias, in both models.
    b_float = float_cnn.classifier[1].bias
    assert torch.equal(plain.model.classifier[1].bias, b_float)
    assert not torch.equal(res.model.classifier[1].bias, b_float)
    assert not torch.equal(res.baseline_model.classifier[1].bias, b_float)
    assert res.acc >= plain.acc - 0.01
    with pytest.raises(PTQError, match="need calibration data"):
        quantize_post_training(float_cnn, 3, compensation="gptq")
    with pytest.raises(ValueError, match="unknown error compensation"):
        quantize_post_training(float_cnn, 3, compensation="awq", calib_data=train)
    for bad in (0, 9, 2.5, "4"):
        with pytest.raises(ValueError, match="act_bits: bit width must"):
            quantize_post_training(float_cnn, 3, act_bits=bad, calib_data=train)
    with pytest.raises(ValueError, match="calibration samples"):
        quantize_post_training(float_cnn, 3, act_bits=4, calib_data=train, calib_samples=0)
    with pytest.raises(ValueError, match="no activation quantizer"):
        apply_toolbox(quantize_model(float_cnn, NMultConfig(act_bits=None)), [train[0][0][None]],
                      calibrate=True)
