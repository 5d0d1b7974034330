"""Tests of the Brevitas seam in ``qfv_brevitas.core.quantizers``: the N-multiplier ``tensor_quant``
module, its proxy and the ready injectors, on real ``brevitas.nn`` layers.

Reference values are computed independently of the library's search: nearest levels by a
brute-force argmin over the full ``(G, M, 2**N)`` distance tensor, layer outputs by
``torch.nn.functional`` on the snapped weights, the initial grid from the paper's formula.
Where the library and the reference run the same float operations the comparison is exact
(``atol=0, rtol=0``); where only the summation order differs a stated tolerance is used.
"""
from __future__ import annotations

import math

import brevitas.nn as qnn
import pytest
import torch
import torch.nn.functional as F
from brevitas import config as brevitas_config
from brevitas.quant_tensor import QuantTensor
from torch import nn

from qfv_brevitas.core.convert import set_forward_mode
from qfv_brevitas.core.quantizers import (
    FixedLevelWeightPerChannelQuant,
    FixedLevelWeightQuant,
    LearnedStepWeightPerChannelQuant,
    LearnedStepWeightQuant,
    NMultTensorQuant,
    NMultWeightPerChannelQuant,
    NMultWeightQuant,
    NMultWeightQuantProxy,
    is_nmult_layer,
    nmult_layers,
    quant_of,
)

BITS = list(range(1, 9))
EXACT = dict(atol=0, rtol=0)


# injector -> (variant, per_channel)
INJECTORS = {
    "nmult": (NMultWeightQuant, "nmult", False),
    "nmult_pc": (NMultWeightPerChannelQuant, "nmult", True),
    "step": (LearnedStepWeightQuant, "step", False),
    "step_pc": (LearnedStepWeightPerChannelQuant, "step", True),
    "fixed": (FixedLevelWeightQuant, "fixed", False),
    "fixed_pc": (FixedLevelWeightPerChannelQuant, "fixed", True),
}

# layer kind -> (constructor, input shape, functional reference)
LAYERS = {
    "conv1d": (lambda **kw: qnn.QuantConv1d(3, 4, 3, **kw), (2, 3, 9), F.conv1d),
    "conv2d": (lambda **kw: qnn.QuantConv2d(3, 5, 3, **kw), (2, 3, 6, 6), F.conv2d),
    "linear": (lambda **kw: qnn.QuantLinear(7, 4, **kw), (3, 7), F.linear),
}


def make(kind="conv2d", inj="nmult", bits=3, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    ctor, in_shape, ref = LAYERS[kind]
    layer = ctor(bias=bias, weight_quant=INJECTORS[inj][0], weight_bit_width=bits, **kw)
    x = torch.randn(in_shape, dtype=layer.weight.dtype)
    return layer, x, ref


def groups(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """(G, M) view, output channels on axis 0 (all layers tested here)."""
    return w.reshape(w.shape[0] if per_channel else 1, -1)


def brute_nearest(w2d: torch.Tensor, levels: torch.Tensor):
    """Nearest level and its code by exhaustive search (ties are measure-zero for random w)."""
    d = (w2d[:, :, None] - levels[:, None, :]).abs()
    code = d.argmin(dim=2)
    return levels.gather(1, code), code


def brute_snap(layer) -> torch.Tensor:
    tq = quant_of(layer)
    w = layer.weight.detach()
    q, _ = brute_nearest(groups(w, tq.per_channel), tq.levels().detach())
    return q.reshape(w.shape)


def lsq_step(w2d: torch.Tensor, bits: int) -> torch.Tensor:
    return 2 * w2d.abs().mean(dim=1) / math.sqrt(max(2 ** (bits - 1) - 1, 1))


def bit_rows(bits: int, dtype=torch.float32) -> torch.Tensor:
    k = torch.arange(2 ** bits)
    return ((k[:, None] >> torch.arange(bits)) & 1).to(dtype)


# ------------------------------------------------------------------ every injector, every layer


@pytest.mark.parametrize("inj", ["nmult_pc", "step_pc", "fixed_pc"])
@pytest.mark.parametrize("ctor,in_shape,ref", [
    (qnn.QuantConvTranspose1d, (2, 3, 5), F.conv_transpose1d),
    (qnn.QuantConvTranspose2d, (2, 3, 4, 4), F.conv_transpose2d),
])
def test_per_channel_on_the_output_axis_of_a_transposed_conv(inj, ctor, in_shape, ref):
    """A transposed conv's weight is ``(in, out, k...)``: its output channels are axis 1. Each
    of them gets its own LSQ step and levels, and each weight its own channel's nearest level
    (brute force over the channel's levels)."""
    torch.manual_seed(0)
    layer = ctor(3, 5, 3, weight_quant=INJECTORS[inj][0], weight_bit_width=3).eval()
    tq = quant_of(layer)
    assert (tq.channel_dim, tq.groups) == (1, 5)
    w = layer.weight.detach()
    w2d = w.transpose(0, 1).reshape(5, -1)  # channel j = w[:, j]
    torch.testing.assert_close(tq.multipliers()[:, 0].detach(), lsq_step(w2d, 3))
    torch.testing.assert_close(tq.to_groups(w), w2d, **EXACT)
    assert torch.equal(tq.from_groups(tq.to_groups(w), w.shape), w)
    snapped, _ = brute_nearest(w2d, tq.levels().detach())
    expected = snapped.reshape(5, 3, *w.shape[2:]).transpose(0, 1)
    torch.testing.assert_close(layer.quant_weight().detach(), expected, **EXACT)
    x = torch.randn(in_shape)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x, expected, layer.bias), **EXACT)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("inj", list(INJECTORS))
def test_eval_snaps_to_levels_and_output_is_functional_op(inj, kind, bits):
    layer, x, ref = make(kind, inj, bits, seed=bits)
    layer.eval()
    tq = quant_of(layer)
    assert (tq.bits, tq.variant, tq.per_channel) == (bits, *INJECTORS[inj][1:])
    levels = tq.levels().detach()
    G = layer.weight.shape[0] if tq.per_channel else 1
    assert levels.shape == (G, 2 ** bits)

    qw = layer.quant_weight()
    assert type(qw) is torch.Tensor
    q2d = groups(qw.detach(), tq.per_channel)
    for g in range(G):  # each channel's values among its own levels
        assert bool(torch.isin(q2d[g], levels[g]).all()), f"group {g} has a non-level value"
    expected_w = brute_snap(layer)
    torch.testing.assert_close(qw.detach(), expected_w, **EXACT)
    # Quantization is not a no-op: the float weights are not all on levels.
    assert not torch.equal(expected_w, layer.weight.detach())

    with torch.no_grad():
        y = layer(x)
        y_ref = ref(x, expected_w, layer.bias)
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, y_ref, **EXACT)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("inj", list(INJECTORS))
def test_levels_start_on_symmetric_lsq_grid(inj, kind, bits):
    layer, _, _ = make(kind, inj, bits, seed=100 + bits)
    tq = quant_of(layer)
    w2d = groups(layer.weight.detach(), tq.per_channel)
    s_ref = lsq_step(w2d, bits)
    r = tq.multipliers().detach()
    c = tq.offset().detach()
    s = r[:, 0]
    # s itself: same formula, but sqrt/pow may round differently -> 2 ulp in float32.
    torch.testing.assert_close(s, s_ref, atol=0, rtol=2.5e-7)
    # Structure of the grid, exactly: r_i = s * 2**i, c = -s (2**N - 1) / 2.
    torch.testing.assert_close(r, s[:, None] * 2.0 ** torch.arange(bits), **EXACT)
    torch.testing.assert_close(c, -s * (2 ** bits - 1) / 2.0, **EXACT)
    # Levels by code: s * (k - (2**N - 1) / 2). c + sum_i r_i bit_i(k) rounds differently near
    # 0 (cancellation), so allow a few float32 ulps of the grid's extent.
    k = torch.arange(2 ** bits, dtype=torch.float64)
    expected = s.double()[:, None] * (k - (2 ** bits - 1) / 2)
    tol = 4 * torch.finfo(torch.float32).eps * 2 ** bits * s.double()[:, None]
    assert bool(((tq.levels().detach().double() - expected).abs() <= tol).all())
    # Ascending in the code, symmetric about 0, no zero level, consecutive gaps equal to s.
    lv = tq.levels().detach().double()
    assert bool((lv[:, 1:] > lv[:, :-1]).all())
    assert bool(((lv + lv.flip(1)).abs() <= tol).all())
    assert bool((lv.abs() >= s.double()[:, None] / 2 - tol).all())
    if bits > 1:
        assert bool(((lv.diff(dim=1) - s.double()[:, None]).abs() <= tol).all())


def test_per_channel_steps_differ_per_channel():
    layer, _, _ = make("conv2d", "nmult_pc", 4)
    with torch.no_grad():
        layer.weight[0].mul_(10.0)  # channel 0 ten times larger
    layer.weight_quant.init_tensor_quant()
    s = quant_of(layer).multipliers().detach()[:, 0]
    w2d = groups(layer.weight.detach(), True)
    torch.testing.assert_close(s, lsq_step(w2d, 4), atol=0, rtol=2.5e-7)
    assert s[0] > 5 * s[1:].max()


@pytest.mark.parametrize("inj", list(INJECTORS))
def test_parameter_names_and_learnability(inj):
    layer, _, _ = make("conv2d", inj, 3)
    variant = INJECTORS[inj][1]
    params = dict(layer.named_parameters())
    sd = layer.state_dict()
    pre = "weight_quant.tensor_quant."
    quant_params = {n[len(pre):] for n in params if n.startswith(pre)}
    expected = {"nmult": {"r", "c"}, "step": {"step", "c"}, "fixed": set()}[variant]
    assert quant_params == expected
    assert set(params) - {pre + p for p in quant_params} == {"weight", "bias"}
    for p in quant_params:
        assert params[pre + p].requires_grad
    tq = quant_of(layer)
    G = 5 if INJECTORS[inj][2] else 1
    if variant == "nmult":
        assert tq.r.shape == (G, 3) and tq.c.shape == (G,)
    if variant == "step":
        assert tq.step.shape == (G,) and tq.c.shape == (G,)
        assert pre + "r" not in sd  # r is derived from the step
    if variant == "fixed":
        assert {n for n, _ in tq.named_buffers()} == {"r", "c"}
        assert not tq.r.requires_grad and not tq.c.requires_grad
        assert pre + "r" in sd and pre + "c" in sd
    for key in (pre + p for p in quant_params):
        assert key in sd
    assert sd[pre + "_extra_state"]["variant"] == variant
    assert is_nmult_layer(layer)
    assert nmult_layers(nn.Sequential(layer, nn.ReLU())) == [("0", layer)]
    with pytest.raises(TypeError, match="no N-multiplier weight quantizer"):
        quant_of(nn.Linear(2, 2))


def test_layers_follow_the_weight_dtype():
    torch.manual_seed(0)
    layer = qnn.QuantLinear(5, 3, bias=False, weight_quant=NMultWeightPerChannelQuant,
                            weight_bit_width=3, dtype=torch.float64)
    tq = quant_of(layer)
    assert tq.r.dtype == tq.c.dtype == torch.float64
    layer.eval()
    qw = layer.quant_weight()
    assert qw.dtype == torch.float64
    torch.testing.assert_close(qw, brute_snap(layer), **EXACT)


# ------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("inj", ["nmult", "step_pc", "fixed"])
def test_paper_mode_trains_on_float_weights_and_evaluates_snapped(inj, kind):
    layer, x, ref = make(kind, inj, 3)
    assert quant_of(layer).mode == "paper"
    layer.train()
    y = layer(x)
    torch.testing.assert_close(y, ref(x, layer.weight, layer.bias), **EXACT)
    torch.testing.assert_close(layer.quant_weight(), layer.weight.detach(), **EXACT)
    y.sum().backward()
    for name, p in layer.named_parameters():
        if name.startswith("weight_quant"):
            assert p.grad is None, f"{name} got a task gradient in paper mode"
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    wq = brute_snap(layer)
    torch.testing.assert_close(y_eval, ref(x, wq, layer.bias), **EXACT)
    assert not torch.equal(y_eval, y.detach())


@pytest.mark.parametrize("mode", ["ste", "both"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("inj", list(INJECTORS))
def test_ste_forward_snaps_and_gradients_are_straight_through(inj, kind, mode):
    layer, x, ref = make(kind, inj, 3, seed=7, weight_forward_mode=mode)
    tq = quant_of(layer)
    assert tq.mode == mode  # the weight_ kwarg reached the quantizer
    if tq.variant == "nmult":  # a negative multiplier: code order != sorted order
        with torch.no_grad():
            tq.c += tq.r[:, 1]
            tq.r[:, 1] *= -1
    layer.train()
    wq = brute_snap(layer)
    y = layer(x)
    torch.testing.assert_close(y.detach(), ref(x, wq, layer.bias.detach()), **EXACT)
    g = torch.randn_like(y)
    y.backward(g)

    # Reference: the float layer evaluated at the snapped weights.
    w_leaf = wq.clone().requires_grad_()
    b_leaf = layer.bias.detach().clone().requires_grad_()
    ref(x, w_leaf, b_leaf).backward(g)
    torch.testing.assert_close(layer.weight.grad, w_leaf.grad, **EXACT)
    torch.testing.assert_close(layer.bias.grad, b_leaf.grad, **EXACT)

    # Levels get the sum of the upstream gradient of the weights snapped to them.
    w2d = groups(layer.weight.detach(), tq.per_channel)
    _, code = brute_nearest(w2d, tq.levels().detach())
    gw = groups(w_leaf.grad, tq.per_channel)
    g_levels = torch.zeros(w2d.shape[0], 8).scatter_add_(1, code, gw)
    g_r = g_levels @ bit_rows(3)
    g_c = g_levels.sum(1)
    variant = INJECTORS[inj][1]
    if variant == "nmult":
        torch.testing.assert_close(tq.r.grad, g_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tq.c.grad, g_c, rtol=1e-5, atol=1e-5)
        assert bool((tq.r.grad != 0).any())
    elif variant == "step":
        torch.testing.assert_close(tq.step.grad, g_r @ 2.0 ** torch.arange(3),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tq.c.grad, g_c, rtol=1e-5, atol=1e-5)
        assert bool((tq.step.grad != 0).all())
    else:
        assert not any(n.startswith("weight_quant") for n, _ in layer.named_parameters())


def test_default_mode_and_kwarg_override():
    assert quant_of(make("linear", "nmult")[0]).mode == "paper"
    for mode in ("paper", "ste", "both"):
        layer, _, _ = make("linear", "step_pc", weight_forward_mode=mode)
        assert quant_of(layer).mode == mode
        assert quant_of(layer).uses_regularizer == (mode != "ste")
    with pytest.raises(ValueError, match="forward mode"):
        make("linear", "nmult", weight_forward_mode="sometimes")


def _two_layer_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        qnn.QuantConv2d(2, 3, 3, bias=True, weight_quant=NMultWeightPerChannelQuant,
                        weight_bit_width=2),
        nn.Flatten(),
        qnn.QuantLinear(3 * 4 * 4, 4, bias=True, weight_quant=LearnedStepWeightQuant,
                        weight_bit_width=3))


def _float_forward(model, x, snapped: bool):
    conv, lin = model[0], model[2]
    w0 = brute_snap(conv) if snapped else conv.weight
    w2 = brute_snap(lin) if snapped else lin.weight
    return F.linear(F.conv2d(x, w0, conv.bias).flatten(1), w2, lin.bias)


def test_set_forward_mode_switches_training_forward():
    model = _two_layer_model()
    x = torch.randn(2, 2, 6, 6)
    model.train()
    with torch.no_grad():
        y_float = _float_forward(model, x, snapped=False)
        y_snap = _float_forward(model, x, snapped=True)
        assert not torch.equal(y_float, y_snap)
        torch.testing.assert_close(model(x), y_float, **EXACT)
        assert set_forward_mode(model, "ste") is model
        assert [quant_of(l).mode for _, l in nmult_layers(model)] == ["ste", "ste"]
        torch.testing.assert_close(model(x), y_snap, **EXACT)
        set_forward_mode(model, "both")
        torch.testing.assert_close(model(x), y_snap, **EXACT)
        set_forward_mode(model, "paper")
        torch.testing.assert_close(model(x), y_float, **EXACT)
    with pytest.raises(ValueError, match="forward mode"):
        set_forward_mode(model, "STE")


def test_set_forward_mode_survives_load_state_dict_and_reinit():
    model = _two_layer_model()
    set_forward_mode(model, "ste")
    sd = model.state_dict()
    model.load_state_dict(sd)  # Brevitas rebuilds the quant modules here
    assert [quant_of(l).mode for _, l in nmult_layers(model)] == ["ste", "ste"]
    fresh = _two_layer_model(seed=1)  # built in paper mode
    fresh.load_state_dict(sd)
    assert [quant_of(l).mode for _, l in nmult_layers(fresh)] == ["ste", "ste"]
    x = torch.randn(2, 2, 6, 6)
    fresh.train()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), _float_forward(fresh, x, snapped=True), **EXACT)
    # An explicit re-initialisation (as Brevitas does on a float checkpoint) keeps the mode.
    for _, layer in nmult_layers(model):
        layer.weight_quant.init_tensor_quant()
    assert [quant_of(l).mode for _, l in nmult_layers(model)] == ["ste", "ste"]


def test_mode_restored_from_checkpoint_survives_reinit():
    src = _two_layer_model()
    set_forward_mode(src, "ste")
    dst = _two_layer_model(seed=1)  # built in paper mode
    dst.load_state_dict(src.state_dict())
    assert quant_of(dst[0]).mode == "ste"
    dst[0].weight_quant.init_tensor_quant()
    assert quant_of(dst[0]).mode == "ste"


# ---------------------------------------------------------------------------- proxy output


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("inj", ["nmult", "step_pc"])
def test_proxy_returns_plain_tensor(inj, training):
    layer, x, ref = make("conv2d", inj, 3)
    layer.train(training)
    proxy = layer.weight_quant
    assert type(proxy) is NMultWeightQuantProxy
    out = proxy(layer.weight)
    # Not an IntQuantTensor carrying the nominal scale (in paper-mode training the float
    # weight Parameter itself passes through).
    assert not isinstance(out, QuantTensor) and isinstance(out, torch.Tensor)
    assert type(out) is (nn.Parameter if training else torch.Tensor)
    assert not isinstance(layer.quant_weight(), QuantTensor)
    # Nominal attributes exist (for tools that ask) but are not consumed by the layer.
    tq = quant_of(layer)
    assert float(proxy.bit_width()) == 3.0
    torch.testing.assert_close(proxy.scale(), tq.multipliers().detach().abs().min(dim=1).values,
                               **EXACT)
    assert float(proxy.zero_point()) == 0.0
    # Bias stays float: the output is exactly the functional op with the layer's float bias.
    with torch.no_grad():
        y = layer(x)
        w = layer.weight if training else brute_snap(layer)
        torch.testing.assert_close(y, ref(x, w, layer.bias), **EXACT)


def test_tensor_quant_returns_brevitas_tuple():
    layer, _, _ = make("conv2d", "nmult_pc", 3)
    layer.eval()
    tq = quant_of(layer)
    assert isinstance(tq, NMultTensorQuant)
    value, scale, zero, bit_width = tq(layer.weight.detach())
    torch.testing.assert_close(value, brute_snap(layer), **EXACT)
    assert scale.shape == (5, 1, 1, 1)
    assert float(zero) == 0.0 and float(bit_width) == 3.0


# -------------------------------------------------------------------------------- state dict


def _perturb(tq, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tq.parameters():
            p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
        for name in ("r", "c"):
            if name in tq._buffers:
                tq._buffers[name].mul_(1 + 0.3 * torch.rand(tq._buffers[name].shape, generator=g))


@pytest.mark.parametrize("mode", ["paper", "ste", "both"])
@pytest.mark.parametrize("inj", list(INJECTORS))
def test_state_dict_round_trip(inj, mode):
    src, x, _ = make("conv2d", inj, 3, seed=0, weight_forward_mode=mode)
    _perturb(quant_of(src))
    dst, _, _ = make("conv2d", inj, 3, seed=1)  # other weights, paper mode
    assert not torch.equal(dst.weight, src.weight)
    res = dst.load_state_dict(src.state_dict())
    assert not res.missing_keys and not res.unexpected_keys
    ts, td = quant_of(src), quant_of(dst)
    for name in ("r", "c", "step"):
        if hasattr(ts, name):
            torch.testing.assert_close(getattr(td, name), getattr(ts, name), **EXACT)
    torch.testing.assert_close(td.levels(), ts.levels(), **EXACT)
    assert td.mode == mode
    for training in (True, False):
        src.train(training)
        dst.train(training)
        with torch.no_grad():
            torch.testing.assert_close(dst(x), src(x), **EXACT)


@pytest.mark.parametrize("inj", ["nmult", "step_pc"])
def test_training_resumes_after_loading(inj):
    src, x, _ = make("linear", inj, 3, seed=0, weight_forward_mode="both")
    dst, _, _ = make("linear", inj, 3, seed=1)
    dst.load_state_dict(src.state_dict())
    tq = quant_of(dst)
    name = "r" if INJECTORS[inj][1] == "nmult" else "step"
    before = getattr(tq, name).detach().clone()
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)  # built after loading
    dst.train()
    dst(x).square().sum().backward()
    opt.step()
    after = getattr(quant_of(dst), name)
    assert after is getattr(tq, name)
    assert not torch.equal(after.detach(), before)


@pytest.mark.parametrize("other, field", [
    (dict(inj="nmult", bits=4), "bits"),
    (dict(inj="step", bits=3), "variant"),
    (dict(inj="fixed", bits=3), "variant"),
    (dict(inj="nmult_pc", bits=3), "per_channel"),
])
@pytest.mark.parametrize("strict", [True, False])
def test_loading_a_mismatched_checkpoint_raises(other, field, strict):
    src, _, _ = make("conv2d", "nmult", 3)
    dst, _, _ = make("conv2d", seed=1, **other)
    with pytest.raises(ValueError, match=f"{field} is .* in the checkpoint"):
        dst.load_state_dict(src.state_dict(), strict=strict)


@pytest.mark.parametrize("inj", ["nmult", "step_pc", "fixed"])
def test_float_state_dict_loads_under_ignore_missing_keys(inj):
    layer, x, ref = make("conv2d", inj, 3, seed=0, weight_forward_mode="both")
    torch.manual_seed(5)
    float_layer = nn.Conv2d(3, 5, 3)
    with torch.no_grad():
        float_layer.weight.mul_(3.0)  # a clearly different scale than the layer's own init
    fsd = float_layer.state_dict()
    assert set(fsd) == {"weight", "bias"}
    old_levels = quant_of(layer).levels().detach().clone()
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict(fsd)  # the flag is what makes it legal
    saved = brevitas_config.IGNORE_MISSING_KEYS
    try:
        brevitas_config.IGNORE_MISSING_KEYS = True
        res = layer.load_state_dict(fsd)
    finally:
        brevitas_config.IGNORE_MISSING_KEYS = saved
    assert not res.missing_keys and not res.unexpected_keys
    torch.testing.assert_close(layer.weight, float_layer.weight, **EXACT)
    tq = quant_of(layer)
    assert tq.mode == "both"
    per_channel = INJECTORS[inj][2]
    s = tq.multipliers().detach()[:, 0]
    torch.testing.assert_close(s, lsq_step(groups(float_layer.weight.detach(), per_channel), 3),
                               atol=0, rtol=2.5e-7)
    assert not torch.equal(tq.levels().detach(), old_levels)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x, brute_snap(layer), layer.bias), **EXACT)


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits, msg", [(0, "must be in 1..8, got 0"), (9, "must be in 1..8, got 9"),
                                       (2.5, "must be an integer in 1..8, got 2.5"),
                                       (-1, "must be in 1..8")])
@pytest.mark.parametrize("inj", ["nmult", "step_pc", "fixed"])
def test_bad_bit_width_raises_at_construction(inj, bits, msg):
    with pytest.raises(ValueError, match=msg):
        make("conv2d", inj, bits)


def test_bad_variant_raises():
    with pytest.raises(ValueError, match="quantizer variant"):
        qnn.QuantLinear(3, 2, bias=False, weight_quant=NMultWeightQuant.let(quant_variant="lut"))


def _with_bad_weight(value, mode="paper", inj="nmult_pc", name="blk.fc"):
    torch.manual_seed(0)
    layer = qnn.QuantLinear(6, 4, bias=False, weight_quant=INJECTORS[inj][0].let(layer_name=name),
                            weight_bit_width=3, weight_forward_mode=mode)
    with torch.no_grad():
        layer.weight[1, 2] = value
    return layer


@pytest.mark.parametrize("inj", ["nmult", "nmult_pc"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise_in_eval_forward(value, inj):
    layer = _with_bad_weight(value, inj=inj)
    layer.eval()
    with pytest.raises(ValueError, match=r"blk\.fc.*1 of 24 weights are NaN or infinite"):
        layer(torch.randn(2, 6))


def test_non_finite_weights_raise_at_construction():
    torch.manual_seed(0)
    proto = qnn.QuantLinear(6, 4, bias=False)
    with torch.no_grad():
        proto.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        NMultTensorQuant(3, [proto.weight])


@pytest.mark.parametrize("inj", ["nmult", "nmult_pc"])
@pytest.mark.parametrize("value", [
    float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise_in_regularization(value, inj):
    from qfv_brevitas import regularization_loss
    layer = _with_bad_weight(value, inj=inj)
    with pytest.raises(ValueError, match=r"blk\.fc.*NaN or infinite"):
        regularization_loss(nn.Sequential(layer))


@pytest.mark.parametrize("value", [
    float("nan"),
    float("inf"),
])
def test_non_finite_weights_raise_in_ste_training_forward(value):
    layer = _with_bad_weight(value, mode="ste")
    layer.train()
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(torch.randn(2, 6))


def test_per_channel_quantizer_rejects_other_channel_count():
    layer, _, _ = make("conv2d", "nmult_pc", 3)  # 5 output channels
    tq = quant_of(layer)
    for bad in (torch.randn(4, 3, 3, 3), torch.randn(6, 3, 3, 3), torch.randn(5)[0]):
        with pytest.raises(ValueError, match="has 5 channels on axis 0"):
            tq(bad)
        with pytest.raises(ValueError, match="has 5 channels on axis 0"):
            tq.snap(bad)
        with pytest.raises(ValueError, match="has 5 channels on axis 0"):
            tq.distance(bad)
    with pytest.raises(ValueError, match="has 5 channels on axis 0"):
        layer.weight_quant(torch.randn(4, 3, 3, 3))


# ------------------------------------------------- the three variants on the same weights


def _fit_levels(inj, w, steps=200, lr=0.01):
    """A 2-bit layer holding ``w``, its quantizer initialised from ``w`` and then trained on
    the regularizer alone (weights frozen). Returns the layer's sorted levels before and
    after, and the mean squared weight-to-level distance after."""
    from qfv_brevitas import regularization_loss

    layer = qnn.QuantLinear(w.shape[1], w.shape[0], bias=False, weight_quant=inj,
                            weight_bit_width=2)
    with torch.no_grad():
        layer.weight.copy_(w)
    layer.weight_quant.init_tensor_quant()
    layer.weight.requires_grad_(False)
    tq = quant_of(layer)
    before = tq.levels().detach()[0].sort().values
    params = [p for p in layer.parameters() if p.requires_grad]
    if params:
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            regularization_loss(nn.Sequential(layer)).backward()
            opt.step()
    after = tq.levels().detach()[0].sort().values
    return before, after, float(tq.distance(layer.weight).detach()) / w.numel()


def test_nmult_learns_non_uniform_levels_that_step_and_fixed_cannot():
    """Weights in four clusters at -1, -0.2, 0.2, 1 (15%, 35%, 35%, 15%): levels
    ``c + r0 b0 + r1 b1`` can sit on all four (c = -1, r = (0.8, 1.2)); a uniform grid cannot.
    From the same LSQ start the N-multiplier levels go to the clusters, the learned step finds
    the best uniform grid and stays uniform, the fixed levels do not move. (With equal masses
    the LSQ start would be a stationary point: each inner level the mean of its two clusters.)"""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, -0.2, 0.2, 1.0])
    which = torch.tensor([0] * 3 + [1] * 7 + [2] * 7 + [3] * 3).repeat(100)
    w = (centres[which] + 0.02 * torch.randn(2000, generator=g)).reshape(40, 50)
    res = {name: _fit_levels(inj, w) for name, inj in (("nmult", NMultWeightQuant),
                                                        ("step", LearnedStepWeightQuant),
                                                        ("fixed", FixedLevelWeightQuant))}
    # the same start: the symmetric LSQ grid of these weights (step 2 mean|w| / sqrt(1))
    s0 = 2 * float(w.abs().mean())
    for before, _, _ in res.values():
        torch.testing.assert_close(before, s0 * torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    # fixed: nothing learned
    assert torch.equal(res["fixed"][0], res["fixed"][1])
    # step: uniform after training, and as good as the best uniform grid (brute force over
    # step and offset), no better
    lv = res["step"][1]
    gaps = lv[1:] - lv[:-1]
    torch.testing.assert_close(gaps, gaps.mean().expand(3), rtol=1e-5, atol=0)
    grid_s = torch.linspace(0.3, 1.2, 181)[:, None, None]
    grid_c = torch.linspace(-0.2, 0.2, 81)[None, :, None]
    uni = grid_c + grid_s * torch.tensor([-1.5, -0.5, 0.5, 1.5])  # (181, 81, 4)
    d = (w.reshape(1, 1, -1, 1) - uni[:, :, None, :]).abs().min(-1).values
    best_uniform = float((d ** 2).mean(-1).min())
    assert best_uniform * (1 - 1e-3) <= res["step"][2] <= 1.05 * best_uniform
    # nmult: on the clusters, at the noise floor (0.02**2), far below any uniform grid
    torch.testing.assert_close(res["nmult"][1], centres, rtol=0, atol=0.01)
    assert res["nmult"][2] < 1.5 * 0.02 ** 2 < 0.1 * best_uniform
    assert res["fixed"][2] > res["step"][2]
