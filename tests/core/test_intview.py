"""The integer view of N-multiplier levels (``qfv_brevitas.core.intview`` and its use by the
quantizer, the proxy and ``swap_weight_quant``): multipliers on ``m * 2**-f``, weights as
Brevitas ``IntQuantTensor`` s, Brevitas' integer biases and quant tensors on top of them.

References are independent of the library: integer ranges by enumerating every code's level,
widths by the definition of a signed integer type, integer biases by Brevitas' rule
``round(b / (s_in s_w)) s_in s_w`` written out, layer outputs by ``torch.nn.functional``.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

import brevitas.nn as qnn
import pytest
import torch
import torch.nn.functional as F
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Int32Bias
from brevitas.quant_tensor import IntQuantTensor, QuantTensor
from hypothesis import given, settings, strategies as st
from torch import nn

from qfv_brevitas import NMultConfig
from qfv_brevitas.core import intview as IV
from qfv_brevitas.core.convert import set_forward_mode, swap_weight_quant
from qfv_brevitas.core.fitting import grid_error
from qfv_brevitas.core.levels import level_table
from qfv_brevitas.core.quantizers import (LearnedStepWeightPerChannelQuant, NMultWeightPerChannelQuant,
                                          NMultWeightQuant, FixedLevelWeightQuant, nmult_layers,
                                          quant_of)
from qfv_brevitas.util.errors import QfvError

EXACT = dict(atol=0, rtol=0)
INJECTORS = {"nmult": NMultWeightQuant, "nmult_pc": NMultWeightPerChannelQuant,
             "step_pc": LearnedStepWeightPerChannelQuant, "fixed": FixedLevelWeightQuant}


def enumerated_integers(r: torch.Tensor, c: torch.Tensor, f: int) -> torch.Tensor:
    """Every code's integer level ``sum_k m_k b_k + m_c`` (G, 2**N), by enumeration."""
    m = torch.round(r.double() * 2 ** f)
    mc = torch.round(c.double() * 2 ** f)
    bits = r.shape[1]
    codes = torch.tensor(list(itertools.product([0, 1], repeat=bits)), dtype=torch.float64)
    return (codes @ m.T).T + mc[:, None]  # code order is irrelevant: callers sort or use sets


def signed_width_by_definition(lo: int, hi: int) -> int:
    b = 1
    while not (-(2 ** (b - 1)) <= lo and hi <= 2 ** (b - 1) - 1):
        b += 1
    return b


# -- the grid ---------------------------------------------------------------------------------

def test_round_ste_rounds_forward_and_passes_gradient_straight():
    t = torch.tensor([0.30, -0.70, 0.125, 0.0625], requires_grad=True)
    y = IV.round_ste(t, 3)
    assert y.tolist() == [0.25, -0.75, 0.125, 0.0]  # 0.0625 * 8 = 0.5: half to even -> 0
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert t.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), groups=st.integers(1, 3), f=st.integers(0, 10),
       seed=st.integers(0, 2 ** 16))
def test_integer_range_and_width_match_enumeration(bits, groups, f, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(groups, bits, generator=g) * 0.3
    c = torch.randn(groups, generator=g) * 0.5
    ints = enumerated_integers(r, c, f)
    lo, hi = IV.integer_range(r, c, f)
    assert (int(lo), int(hi)) == (int(ints.min()), int(ints.max()))
    assert int(IV.signed_width(lo, hi)) == signed_width_by_definition(int(lo), int(hi))
    # and the rounded level table is exactly those integers times 2**-f
    table = level_table(IV.round_ste(r, f), IV.round_ste(c, f)).double() * 2 ** f
    assert torch.equal(table.sort(1).values, ints.sort(1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_signed_width_is_exact_for_wide_ranges(dtype):
    # 2**k + 1 needs k + 2 signed bits; log2 of it rounds to k in float32 for large k
    for k in range(1, 24):
        lo, hi = torch.tensor(-(2.0 ** k), dtype=dtype), torch.tensor(2.0 ** k, dtype=dtype)
        assert int(IV.signed_width(lo, hi)) == signed_width_by_definition(-(2 ** k), 2 ** k)


def test_choose_frac_bits_is_the_smallest_within_tolerance():
    torch.manual_seed(0)
    w = torch.randn(2, 500) * 0.05
    r = torch.tensor([[0.013, 0.027, 0.051]] * 2)
    c = -r.sum(1) / 2
    f = IV.choose_frac_bits(w, r, c)
    base = float(grid_error(w, level_table(r, c)).sum())

    def err(k):
        s = 2.0 ** k
        return float(grid_error(w, level_table(torch.round(r * s) / s,
                                               torch.round(c * s) / s)).sum())
    assert err(f) <= (1 + IV.AUTO_TOLERANCE) * base
    assert all(err(k) > (1 + IV.AUTO_TOLERANCE) * base for k in range(f))
    assert f > 0


def test_choose_frac_bits_on_levels_uses_the_multiplier_bound():
    r = torch.tensor([[0.25, 0.5]])
    c = torch.tensor([-0.375])
    w = level_table(r, c)  # every weight on a level: no error to compare with
    f = IV.choose_frac_bits(w, r, c)
    assert 0.5 * 2.0 ** -f <= IV.AUTO_TOLERANCE * 0.25 < 0.5 * 2.0 ** -(f - 1)


@pytest.mark.parametrize("bad", [-1, 21, 2.5, "6", True])
def test_bad_frac_bits_are_refused(bad):
    with pytest.raises(QfvError, match="frac_bits"):
        IV.check_frac_bits(bad)
    with pytest.raises(QfvError, match="frac_bits"):
        NMultConfig(frac_bits=bad)


# -- the quantizer ----------------------------------------------------------------------------

def make_linear(inj="nmult", bits=3, f=5, seed=0, **kw):
    torch.manual_seed(seed)
    return qnn.QuantLinear(12, 6, bias=False, weight_quant=INJECTORS[inj],
                           weight_bit_width=bits, weight_frac_bits=f, **kw)


@pytest.mark.parametrize("inj", list(INJECTORS))
@pytest.mark.parametrize("mode", ["eval", "ste", "both"])
def test_quant_weight_is_an_int_quant_tensor_of_the_levels(inj, mode):
    layer = make_linear(inj)
    tq = quant_of(layer)
    if mode == "eval":
        layer.eval()
    else:
        set_forward_mode(layer, mode)
        layer.train()
    qw = layer.quant_weight()
    assert isinstance(qw, IntQuantTensor)
    assert torch.equal(qw.scale.flatten().unique(), torch.tensor([2.0 ** -5]))
    assert float(qw.zero_point) == 0.0 and qw.signed
    ints = qw.int(float_datatype=True)
    assert torch.equal(ints * qw.scale, qw.value)  # int() * scale is exactly the weights
    # ... which are the rounded levels, each weight's nearest (enumerated) level
    g = tq.groups
    allowed = enumerated_integers(tq.r.detach() if tq.variant != "step" else
                                  tq.multipliers().detach(), tq.c.detach(), 5)
    w_ints = ints.reshape(g, -1) if g > 1 else ints.reshape(1, -1)
    for row, levels in zip(w_ints, allowed):
        assert set(row.unique().tolist()) <= set(levels.tolist())
    lo, hi = int(allowed.min()), int(allowed.max())
    assert float(qw.bit_width) == signed_width_by_definition(lo, hi)
    assert float(layer.weight_quant.bit_width()) == float(qw.bit_width)


def test_paper_mode_training_keeps_the_float_weights_inside_the_quant_tensor():
    layer = make_linear("nmult")
    layer.train()  # the paper trains on full-precision weights; the scale is still 2**-f
    qw = layer.quant_weight()
    assert isinstance(qw, IntQuantTensor) and torch.equal(qw.value, layer.weight)
    assert float(qw.scale) == 2.0 ** -5


def test_the_multipliers_learn_through_the_grid():
    layer = make_linear("nmult_pc")
    set_forward_mode(layer, "ste")
    layer.train()
    x = torch.randn(16, 12)
    layer(x).pow(2).sum().backward()
    tq = quant_of(layer)
    assert tq.r.grad is not None and tq.r.grad.abs().sum() > 0
    assert tq.c.grad is not None and tq.c.grad.abs().sum() > 0
    # straight through: the gradient is the one of the rounded multipliers
    twin_r = tq.multipliers().detach().clone().requires_grad_()
    twin_c = tq.offset().detach().clone().requires_grad_()
    w2d = tq.to_groups(layer.weight.detach())
    w = tq.from_groups(tq.chip.ste(w2d, twin_r, twin_c), layer.weight.shape)
    F.linear(x, w).pow(2).sum().backward()
    torch.testing.assert_close(tq.r.grad, twin_r.grad, **EXACT)
    torch.testing.assert_close(tq.c.grad, twin_c.grad, **EXACT)


def test_auto_frac_bits_costs_at_most_the_tolerance():
    torch.manual_seed(1)
    layer = qnn.QuantLinear(64, 32, bias=False, weight_quant=NMultWeightPerChannelQuant,
                            weight_bit_width=3, weight_level_init="fit")
    tq = quant_of(layer)
    w2d = tq.to_groups(layer.weight.detach())
    before = float(grid_error(w2d, tq.levels().detach()).sum())
    f = layer.weight_quant.use_integer_view("auto")
    after = float(grid_error(w2d, tq.levels().detach()).sum())
    assert tq.frac_bits == f and before < after <= (1 + IV.AUTO_TOLERANCE) * before


def test_integer_view_survives_state_dict_and_reinit():
    layer = make_linear("nmult", f=None)
    layer.weight_quant.use_integer_view(6)
    sd = layer.state_dict()
    fresh = make_linear("nmult", f=None, seed=1)
    assert quant_of(fresh).frac_bits is None
    fresh.load_state_dict(sd)
    assert quant_of(fresh).frac_bits == 6
    fresh.weight_quant.init_tensor_quant()  # Brevitas rebuilds the quantizer from its injector
    assert quant_of(fresh).frac_bits == 6
    fresh.eval(), layer.eval()
    assert torch.equal(fresh.quant_weight().value, layer.quant_weight().value)


def test_too_many_fractional_bits_are_refused():
    layer = qnn.QuantLinear(4, 2, bias=False, weight_quant=NMultWeightQuant, weight_bit_width=8)
    with torch.no_grad():
        layer.weight.mul_(1e4)
    layer.weight_quant.init_tensor_quant()  # levels from the large weights
    with pytest.raises(ValueError, match="more than 24-bit"):
        layer.weight_quant.use_integer_view(20)


# -- Brevitas' integer machinery on top -------------------------------------------------------

class FinnStyle(nn.Module):
    """Quant tensors between every layer, integer biases, a residual add of quant tensors (one
    activation quantizer shared by both branches, as FINN-style residual blocks do)."""

    def __init__(self, wq=NMultWeightQuant, **kw):
        super().__init__()
        self.inp = qnn.QuantIdentity(return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(16, 16, bias=True, weight_quant=wq, weight_bit_width=3,
                                   bias_quant=Int32Bias, return_quant_tensor=True, **kw)
        self.relu = qnn.QuantReLU(return_quant_tensor=True)
        self.fc2 = qnn.QuantLinear(16, 16, bias=False, weight_quant=wq, weight_bit_width=3,
                                   return_quant_tensor=False, **kw)
        self.out = qnn.QuantLinear(16, 4, bias=True, weight_quant=wq, weight_bit_width=3,
                                   bias_quant=Int32Bias, **kw)

    def forward(self, x):
        h = self.relu(self.fc1(self.inp(x)))
        h = self.relu(self.fc2(h)) + h  # a shared quantizer: Brevitas adds quant tensors of one scale
        return self.out(h)


@pytest.mark.parametrize("wq", [NMultWeightQuant, NMultWeightPerChannelQuant])
def test_int32_bias_layer_switches_the_integer_view_on_and_quantizes_its_bias(wq):
    torch.manual_seed(0)
    layer = qnn.QuantLinear(16, 8, bias=True, weight_quant=wq, weight_bit_width=3,
                            bias_quant=Int32Bias, input_quant=Int8ActPerTensorFloat,
                            return_quant_tensor=True)
    plain = qnn.QuantLinear(16, 8, bias=True, weight_quant=wq, weight_bit_width=3)
    assert quant_of(layer).frac_bits is None
    layer.eval(), plain.eval()
    x = torch.randn(4, 16)
    y = layer(x)
    plain(x)
    f = quant_of(layer).frac_bits
    assert f is not None and quant_of(plain).frac_bits is None  # only where it is needed
    assert not isinstance(plain.quant_weight(), QuantTensor)
    assert isinstance(y, IntQuantTensor)
    # Brevitas' rule written out: bias on the grid of input scale x weight scale
    xq = layer.input_quant(x)
    s = xq.scale * 2.0 ** -f
    bias_q = torch.round(layer.bias.detach() / s) * s
    ref = F.linear(xq.value, layer.quant_weight().value, bias_q.flatten())
    torch.testing.assert_close(y.value, ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(bias_q, layer.bias.detach())  # the bias really was quantized
    assert torch.equal(y.scale.flatten().unique(), s.flatten())


def test_finn_style_model_trains_with_quant_tensors_between_layers():
    torch.manual_seed(0)
    m = FinnStyle()
    x, target = torch.randn(64, 16), torch.randint(0, 4, (64,))
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    set_forward_mode(m, "both")
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    views = {n: quant_of(l).frac_bits for n, l in nmult_layers(m)}
    # fc2's output is a float tensor into a quantized ReLU: it needs no integer view
    assert views["fc1"] is not None and views["out"] is not None and views["fc2"] is None


def test_swap_weight_quant_converts_int32_bias_models():
    torch.manual_seed(0)
    good = qnn.QuantLinear(4, 4, bias=False, weight_quant=Int8WeightPerTensorFloat)
    biased = qnn.QuantLinear(4, 3, bias=True, bias_quant=Int32Bias,
                             weight_quant=Int8WeightPerTensorFloat)
    m = nn.Sequential(OrderedDict(inp=qnn.QuantIdentity(return_quant_tensor=True), good=good,
                                  act=qnn.QuantIdentity(return_quant_tensor=True), bad=biased))
    x = torch.rand(5, 4)
    swap_weight_quant(m, NMultConfig(weight_bits=3))
    assert [n for n, _ in nmult_layers(m)] == ["good", "bad"]
    # the integer view where the integer bias needs it, chosen at the swap, not lazily
    assert quant_of(good).frac_bits is None and quant_of(biased).frac_bits is not None
    m.eval()
    assert m(x).shape == (5, 3)
    assert isinstance(biased.quant_weight(), IntQuantTensor)
    m2 = nn.Sequential(OrderedDict(fc=qnn.QuantLinear(4, 3, bias=True,
                                                      weight_quant=Int8WeightPerTensorFloat)))
    swap_weight_quant(m2, NMultConfig(weight_bits=3, frac_bits=4))
    assert quant_of(m2.fc).frac_bits == 4  # asked for everywhere


def test_swap_bnn_pynq_resnet18_with_int32_bias(no_network):
    """brevitas_examples' FINN-style ResNet-18 (quant tensors between layers, residual adds of
    quant tensors, an Int32Bias classifier) converts, evaluates and takes a training step."""
    from brevitas_examples.bnn_pynq.models import model_with_cfg
    torch.manual_seed(0)
    m, _ = model_with_cfg("resnet18_4w4a", pretrained=False)
    assert no_network == []
    swap_weight_quant(m, NMultConfig(weight_bits=4, init="lsq"))
    assert quant_of(m.linear).frac_bits is not None
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    m.train()
    loss = F.cross_entropy(m(x), torch.tensor([1, 2]))
    loss.backward()
    assert quant_of(m.linear).r.grad is None  # paper mode: the float weights train
    assert m.linear.weight.grad.abs().sum() > 0 and m.linear.bias.grad.abs().sum() > 0
