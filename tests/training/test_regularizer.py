"""Tests of ``qfv_brevitas.training.regularizer``: the model-level regularizer of paper eq. 6/7
and its lambda schedule.

The regularizer is checked against a brute force written from the paper's formula
``sum_l 1/sqrt(n_l * Q_P(b_l)) * sum_i min_q (w_i - q)^2`` with levels enumerated from ``r`` and
``c`` by a loop over codes (no library search), its gradient against the closed form of eq. 7
and against finite differences (``torch.autograd.gradcheck`` in float64).
"""
from __future__ import annotations

import math

import brevitas.nn as qnn
import pytest
import torch
from torch import nn
from torch.func import functional_call

from qfv_brevitas import LambdaSchedule, QuantRegularizer, regularization_loss, snap_weights_
from qfv_brevitas.core.convert import set_forward_mode
from qfv_brevitas.training.regularizer import layer_factor
from qfv_brevitas.core.quantizers import (FixedLevelWeightPerChannelQuant, LearnedStepWeightQuant,
                                     LearnedStepWeightPerChannelQuant, NMultWeightPerChannelQuant,
                                     NMultWeightQuant, nmult_layers, quant_of)

pytestmark = pytest.mark.usefixtures("kernel_backend")



# ------------------------------------------------------------------------------ the model


def mixed_model(dtype=torch.float64, seed=0) -> nn.Module:
    """Mixed bits, variants, granularity and modes; r/c moved off the uniform grid."""
    torch.manual_seed(seed)
    kw = dict(dtype=dtype)
    m = nn.Module()
    m.conv = qnn.QuantConv2d(2, 3, 3, bias=True, weight_quant=NMultWeightPerChannelQuant,
                             weight_bit_width=3, **kw)
    m.seq = nn.Sequential(
        qnn.QuantConv1d(3, 4, 2, bias=False, weight_quant=LearnedStepWeightQuant,
                        weight_bit_width=1, **kw),
        qnn.QuantLinear(6, 5, bias=True, weight_quant=FixedLevelWeightPerChannelQuant,
                        weight_bit_width=8, **kw))
    m.fc = qnn.QuantLinear(5, 4, bias=False, weight_quant=NMultWeightQuant,
                           weight_bit_width=5, **kw)
    m.both_fc = qnn.QuantLinear(4, 3, bias=False, weight_quant=LearnedStepWeightPerChannelQuant,
                                weight_bit_width=2, weight_forward_mode="both", **kw)
    m.ste_fc = qnn.QuantLinear(4, 3, bias=False, weight_quant=NMultWeightQuant,
                               weight_bit_width=4, weight_forward_mode="ste", **kw)
    m.plain = nn.Linear(3, 3, **kw)  # float layer: not regularized
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in nmult_layers(m):
            for p in quant_of(layer).parameters():  # non-uniform, still sensible levels
                p.mul_(1 + 0.4 * (torch.rand(p.shape, generator=g, dtype=dtype) - 0.5))
        # A negative multiplier: code order is no longer the levels' sorted order.
        r = quant_of(m.fc).r
        m.fc.weight_quant.tensor_quant.c.add_(r[0, 2])
        r[0, 2].neg_()
    return m


def _val(t: torch.Tensor) -> float:
    return t.detach().item()


REGULARIZED = ["conv", "seq.0", "seq.1", "fc", "both_fc"]


def ref_levels(layer) -> torch.Tensor:
    """(G, 2**N) levels, code k -> c + sum_i r_i * bit_i(k), by an explicit loop over codes."""
    tq = quant_of(layer)
    if tq.variant == "step":
        r = tq.step.detach()[:, None] * 2.0 ** torch.arange(tq.bits, dtype=tq.step.dtype)
    else:
        r = tq.r.detach()
    c = tq.c.detach()
    cols = []
    for k in range(2 ** tq.bits):
        level = c.clone()
        for i in range(tq.bits):
            if (k >> i) & 1:
                level = level + r[:, i]
        cols.append(level)
    return torch.stack(cols, dim=1)


def ref_groups(layer) -> torch.Tensor:
    w = layer.weight.detach()
    return w.reshape(w.shape[0] if quant_of(layer).per_channel else 1, -1)


def ref_terms(model) -> dict:
    out = {}
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        if tq.mode == "ste":
            continue
        w2d = ref_groups(layer).double()
        lv = ref_levels(layer).double()
        dist = ((w2d[:, :, None] - lv[:, None, :]) ** 2).min(dim=2).values.sum()
        n = layer.weight.numel()
        qp = max(2 ** (tq.bits - 1) - 1, 1)
        out[name] = float(dist) / math.sqrt(n * qp)
    return out


# ----------------------------------------------------------------------- value, breakdown


def test_layer_factor_is_lsq_gradient_scale():
    assert layer_factor(100, 1) == 1 / math.sqrt(100 * 1)
    assert layer_factor(100, 2) == 1 / math.sqrt(100 * 1)
    assert layer_factor(50, 4) == 1 / math.sqrt(50 * 7)
    assert layer_factor(9, 8) == 1 / math.sqrt(9 * 127)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_loss_equals_brute_force(dtype, rtol):
    model = mixed_model(dtype)
    terms = ref_terms(model)
    assert list(terms) == REGULARIZED
    loss, parts = regularization_loss(model, breakdown=True)
    assert loss.dtype == dtype and loss.dim() == 0
    assert list(parts) == REGULARIZED  # layer names, ste layer left out
    for name in REGULARIZED:
        assert parts[name] == pytest.approx(terms[name], rel=rtol, abs=0)
        assert parts[name] > 0
    assert _val(loss) == pytest.approx(sum(terms.values()), rel=rtol, abs=0)
    assert _val(regularization_loss(model)) == _val(loss)


def test_breakdown_sums_to_total_exactly():
    model = mixed_model(torch.float64)
    loss, parts = regularization_loss(model, breakdown=True)
    # Float64 terms added in layer order: the Python sum repeats the same additions.
    assert sum(parts.values()) == _val(loss)


def test_ste_layers_are_excluded():
    model = mixed_model(torch.float64)
    base, parts = regularization_loss(model, breakdown=True)
    assert "ste_fc" not in parts
    with torch.no_grad():
        model.ste_fc.weight.add_(0.123)
    assert _val(regularization_loss(model)) == _val(base)
    # ... while moving a regularized layer's weights off the levels does change it.
    with torch.no_grad():
        model.both_fc.weight.add_(0.0123)
    assert _val(regularization_loss(model)) != _val(base)
    set_forward_mode(model, "ste")
    loss, parts = regularization_loss(model, breakdown=True)
    assert parts == {}
    assert _val(loss) == 0.0 and loss.dim() == 0
    set_forward_mode(model, "both")
    assert list(regularization_loss(model, breakdown=True)[1]) == REGULARIZED + ["ste_fc"]


def test_model_without_quant_layers_is_an_error():
    """A float model by mistake would silently train without any regularizer: refused."""
    with pytest.raises(ValueError, match="no N-multiplier layers.*quantize it first"):
        regularization_loss(nn.Sequential(nn.Linear(2, 2)))


# ----------------------------------------------------------------------------- gradients


def closed_form_grads(model) -> dict:
    """Eq. 7: dR/dw = 2a(w - q), dR/dlevel_k = -2a sum_{code(w)=k}(w - q), chained to r, c, s."""
    grads = {}
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        if tq.mode == "ste":
            continue
        w2d = ref_groups(layer)
        lv = ref_levels(layer)
        code = (w2d[:, :, None] - lv[:, None, :]).abs().argmin(dim=2)
        d = w2d - lv.gather(1, code)
        a = layer_factor(layer.weight.numel(), tq.bits)
        grads[f"{name}.weight"] = (2 * a * d).reshape(layer.weight.shape)
        g_lv = torch.zeros_like(lv).scatter_add_(1, code, -2 * a * d)
        k = torch.arange(2 ** tq.bits)
        bits = ((k[:, None] >> torch.arange(tq.bits)) & 1).to(lv.dtype)
        g_r = g_lv @ bits
        pre = f"{name}.weight_quant.tensor_quant."
        if tq.variant == "nmult":
            grads[pre + "r"] = g_r
        if tq.variant == "step":
            grads[pre + "step"] = g_r @ 2.0 ** torch.arange(tq.bits, dtype=lv.dtype)
        if tq.variant != "fixed":
            grads[pre + "c"] = g_lv.sum(dim=1)
    return grads


def test_gradients_match_closed_form_of_eq7():
    model = mixed_model(torch.float64)
    regularization_loss(model).backward()
    expected = closed_form_grads(model)
    params = dict(model.named_parameters())
    assert set(expected) <= set(params)
    for name, g in expected.items():
        torch.testing.assert_close(params[name].grad, g, rtol=1e-10, atol=1e-14, msg=name)
        assert bool((g != 0).any()), name
    # No regularizer gradient anywhere else (ste layer, biases, float layer).
    for name, p in params.items():
        if name not in expected:
            assert p.grad is None, name


class _RegOf(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self):
        return regularization_loss(self.model)


def test_gradcheck_float64():
    """Finite differences of the whole-model regularizer in every weight, r, c and step."""
    wrapper = _RegOf(mixed_model(torch.float64))
    names = [n for n, p in wrapper.named_parameters()
             if not n.startswith(("model.plain", "model.ste_fc")) and not n.endswith("bias")]
    base = dict(wrapper.named_parameters())
    inputs = tuple(base[n].detach().clone().requires_grad_() for n in names)

    def f(*tensors):
        return functional_call(wrapper, dict(zip(names, tensors)), ())

    assert _val(f(*inputs)) == _val(regularization_loss(wrapper.model))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-7, rtol=1e-5)


def test_finite_difference_single_coordinates_float64():
    model = mixed_model(torch.float64, seed=3)
    regularization_loss(model).backward()
    eps = 1e-6
    tq = quant_of(model.conv)
    for tensor, idx in [(model.conv.weight, (1, 0, 2, 1)), (model.fc.weight, (3, 2)),
                        (tq.r, (2, 1)), (tq.c, (0,)), (quant_of(model.both_fc).step, (1,))]:
        with torch.no_grad():
            old = tensor[idx].item()
            tensor[idx] = old + eps
            up = _val(regularization_loss(model))
            tensor[idx] = old - eps
            down = _val(regularization_loss(model))
            tensor[idx] = old
        assert tensor.grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6,
                                                         abs=1e-9)


# --------------------------------------------------------------------------- zero, descent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_exactly_after_snapping(dtype):
    model = mixed_model(dtype)
    assert _val(regularization_loss(model)) > 0
    snap_weights_(model)
    loss, parts = regularization_loss(model, breakdown=True)
    assert _val(loss) == 0.0
    assert all(v == 0.0 for v in parts.values()) and list(parts) == REGULARIZED
    loss.backward()
    for name, layer in nmult_layers(model):
        if quant_of(layer).mode != "ste":
            assert bool((layer.weight.grad == 0).all()), name


def test_sgd_on_the_regularizer_alone_lowers_it():
    model = mixed_model(torch.float32, seed=4)
    weights, quant = [], []
    for name, layer in nmult_layers(model):
        weights.append(layer.weight)
        quant += list(quant_of(layer).parameters())
    a_max = max(layer_factor(l.weight.numel(), quant_of(l).bits) for _, l in nmult_layers(model))
    # Weight step: (w - q) shrinks by (1 - 2 lr a) per step, in [0.5, 1) for every layer.
    opt = torch.optim.SGD([{"params": weights, "lr": 0.25 / a_max},
                           {"params": quant, "lr": 1e-4}])
    history = []
    for _ in range(15):
        opt.zero_grad()
        loss = regularization_loss(model)
        history.append(_val(loss))
        loss.backward()
        opt.step()
    history.append(_val(regularization_loss(model)))
    assert history[-1] < history[0] / 2
    rises = sum(b > a * (1 + 1e-6) for a, b in zip(history, history[1:]))
    assert rises <= 1, history


# ----------------------------------------------------------------------------- schedule


def test_schedule_holds_then_rises_geometrically_to_end():
    s = LambdaSchedule(total_epochs=30, start=100.0, end=2000.0, rise_epochs=20)
    values = [s(e) for e in range(30)]
    assert values[:10] == [100.0] * 10  # held, exactly
    assert values[-1] == 2000.0  # reaches end exactly at the last epoch
    assert values[10] > 100.0  # the first rise epoch already steps up
    ratios = [b / a for a, b in zip(values[9:], values[10:])]
    assert len(ratios) == 20
    for r in ratios:
        assert r == pytest.approx(20.0 ** (1 / 20), rel=1e-12)
    assert all(b > a for a, b in zip(values[9:], values[10:]))


@pytest.mark.parametrize("total, rise", [(5, 5), (5, 1), (1, 1), (7, 3)])
def test_schedule_edges(total, rise):
    s = LambdaSchedule(total_epochs=total, start=10.0, end=640.0, rise_epochs=rise)
    assert s(total - 1) == 640.0
    held = [s(e) for e in range(total - rise)]
    assert held == [10.0] * (total - rise)
    rising = [s(e) for e in range(total - rise, total)]
    for k, v in enumerate(rising, start=1):
        assert v == pytest.approx(10.0 * 64.0 ** (k / rise), rel=1e-12)


def test_schedule_without_rise_is_constant():
    s = LambdaSchedule(total_epochs=4, start=3.0, end=9.0, rise_epochs=0)
    assert [s(e) for e in range(4)] == [3.0] * 4


def test_schedule_can_decay():
    s = LambdaSchedule(total_epochs=4, start=8.0, end=1.0, rise_epochs=3)
    assert [s(e) for e in range(4)] == pytest.approx([8.0, 4.0, 2.0, 1.0], rel=1e-12)
    assert s(3) == 1.0


def test_schedule_reaches_end_exactly_for_any_start_end():
    s = LambdaSchedule(total_epochs=3, start=0.3, end=0.9, rise_epochs=2)
    assert s(2) == 0.9


def test_schedule_all_zero_is_usable():
    s = LambdaSchedule(total_epochs=5, start=0.0, end=0.0, rise_epochs=2)
    assert [s(e) for e in range(5)] == [0.0] * 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_epochs=5, rise_epochs=6), r"rise_epochs \(6\) must lie in 0..total_epochs \(5\)"),
    (dict(total_epochs=5, rise_epochs=-1), r"rise_epochs \(-1\) must lie"),
    (dict(total_epochs=0, rise_epochs=0), "total_epochs must be >= 1"),
    (dict(total_epochs=-3, rise_epochs=0), "total_epochs must be >= 1"),
    (dict(total_epochs=5, rise_epochs=2, start=-1.0), "start and .end must be finite and >= 0"),
    (dict(total_epochs=5, rise_epochs=2, end=-1.0), "start and .end must be finite and >= 0"),
    (dict(total_epochs=5, rise_epochs=2, start=0.0, end=5.0), "needs start > 0"),
    (dict(total_epochs=10), r"rise_epochs \(20\) must lie"),  # default rise of 20
])
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LambdaSchedule(**kwargs)


def test_schedule_rejects_nan():
    with pytest.raises(ValueError):
        LambdaSchedule(total_epochs=30, start=float("nan"))


@pytest.mark.parametrize("epoch", [-1, 5, 100])
def test_schedule_epoch_out_of_range(epoch):
    s = LambdaSchedule(total_epochs=5, rise_epochs=2)
    with pytest.raises(ValueError, match=rf"epoch {epoch} outside 0..4"):
        s(epoch)


def test_quant_regularizer_is_lambda_times_loss():
    model = mixed_model(torch.float64)
    schedule = LambdaSchedule(total_epochs=6, start=100.0, end=2000.0, rise_epochs=3)
    reg = QuantRegularizer(model, schedule)
    loss, parts = regularization_loss(model, breakdown=True)
    for epoch in range(6):
        assert reg.lam(epoch) == schedule(epoch)
        out = reg(epoch)
        assert out.dim() == 0 and out.requires_grad
        assert _val(out) == schedule(epoch) * _val(loss)
        assert reg.last_breakdown == parts
    assert reg.lam(0) == 100.0 and reg.lam(5) == 2000.0
    reg(5).backward()
    expected = closed_form_grads(model)["fc.weight"] * 2000.0
    torch.testing.assert_close(model.fc.weight.grad, expected, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="outside"):
        reg(6)
