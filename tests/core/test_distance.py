"""Tests of ``qfv_brevitas.core.distance``: the Gaussian-well and SinReQ regularizer shapes beside the
paper's squared distance, on the ideal grid and on a device (stuck bits, variability).

Every value is checked against a brute force written from the definitions, one weight at a
time in Python floats: the candidate levels are enumerated from ``r`` and ``c`` (and, on a
device, from the stuck bits and per-cell factors, code by code), the nearest level and the
nearest distinct level beside it found by sorting, and the shape evaluated from its formula.
Gradients are checked by ``torch.autograd.gradcheck`` in float64.
"""
from __future__ import annotations

import math

import brevitas.nn as qnn
import pytest
import torch
from torch import nn

from qfv_brevitas import FaultMap, NMultConfig, attach_faults, quantize_model, regularization_loss
from qfv_brevitas.training.regularizer import layer_factor
from qfv_brevitas.core import device as D
from qfv_brevitas.core import levels as L
from qfv_brevitas.core.quantizers import (LearnedStepWeightQuant, NMultWeightPerChannelQuant,
                                     NMultWeightQuant, nmult_layers, quant_of)
from qfv_brevitas.training.regularizer import QuantRegularizer
from qfv_brevitas.core.distance import (DEFAULT_WIDTH, SHAPES, chip_distance, ideal_distance,
                                        shape_terms)


def deployed_shaped_distance(w, r, c, codes, sa0=None, sa1=None, lrs=None, hrs=None,
                             shape="sq", width=DEFAULT_WIDTH, where="layer"):
    """The device distance with a shape for given programmed codes."""
    return chip_distance(w, r, c, sa0, sa1, lrs, hrs, shape, width, where, codes=codes)
from qfv_brevitas.core.config import LambdaSchedule
from qfv_brevitas.training.train import TrainConfig, fit

SHAPED = ("gauss", "sin")


# -- the brute force ----------------------------------------------------------------------------

def formula(d: float, h, shape: str, k: float = DEFAULT_WIDTH) -> float:
    """The shape's definition: inside half a spacing the well, beyond it the well's value and
    slope at half a spacing plus (|d| - h/2)^2; no spacing (h None): d^2."""
    if shape == "sq" or h is None:
        return d * d
    if shape == "gauss":
        s = k * h
        g = lambda a: s * s * (1 - math.exp(-a * a / (s * s)))  # noqa: E731
        dg = lambda a: 2 * a * math.exp(-a * a / (s * s))  # noqa: E731
    else:
        g = lambda a: (h / math.pi) ** 2 * math.sin(math.pi * a / h) ** 2  # noqa: E731
        dg = lambda a: (h / math.pi) * math.sin(2 * math.pi * a / h)  # noqa: E731
    a = abs(d)
    if a <= h / 2:
        return g(a)
    u = a - h / 2
    return g(h / 2) + dg(h / 2) * u + u * u


def brute_term(w: float, candidates, shape: str, k: float = DEFAULT_WIDTH) -> float:
    """One weight's term over the values it can take."""
    vals = sorted(set(candidates))
    q = min(vals, key=lambda v: (abs(w - v), -v))
    above, below = [v for v in vals if v > q], [v for v in vals if v < q]
    if above and (w >= q or not below):
        nb = min(above)
    elif below:
        nb = max(below)
    else:
        nb = None
    return formula(w - q, None if nb is None else abs(nb - q), shape, k)


def grid(G, N, dtype=torch.float64, seed=0, uniform=False):
    g = torch.Generator().manual_seed(seed)
    step = 0.5 + torch.rand(G, generator=g, dtype=dtype)
    r, c = L.uniform_multipliers(step, N)
    if not uniform:
        r = r * (1 + 0.3 * torch.rand(r.shape, generator=g, dtype=dtype))
        c = c + 0.2 * torch.randn(G, generator=g, dtype=dtype)
    return r, c


def weights(G, M, r, c, seed=1):
    g = torch.Generator().manual_seed(seed)
    lv = L.level_table(r, c)
    lo, hi = lv.min(1, keepdim=True).values, lv.max(1, keepdim=True).values
    span = hi - lo
    # Some weights beyond the outer levels too.
    return lo - 0.3 * span + 1.6 * span * torch.rand(G, M, generator=g, dtype=r.dtype)


# -- the ideal grid -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("G,N", [(1, 1), (1, 4), (3, 2), (2, 8)])
def test_value_equals_brute_force(shape, G, N):
    r, c = grid(G, N)
    w = weights(G, 40, r, c)
    lv = L.level_table(r, c)
    want = sum(brute_term(float(w[g, j]), lv[g].tolist(), shape)
               for g in range(G) for j in range(w.shape[1]))
    got = float(ideal_distance(w, lv, shape))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_on_levels_positive_off_them(shape, dtype):
    r, c = grid(2, 3, dtype)
    lv = L.level_table(r, c)
    assert float(ideal_distance(lv.clone(), lv, shape)) == 0.0
    w = weights(2, 30, r, c)
    on = (w[:, :, None] == lv[:, None, :]).any(-1)
    assert not bool(on.any())
    for g in range(2):
        for j in range(30):
            one = ideal_distance(w[g:g + 1, j:j + 1], lv[g:g + 1], shape)
            assert float(one) > 0, (g, j)


@pytest.mark.parametrize("shape", SHAPED)
@pytest.mark.parametrize("G,N", [(1, 3), (3, 2), (2, 4)])
def test_gradcheck_float64(shape, G, N):
    r, c = grid(G, N)
    w = weights(G, 30, r, c).requires_grad_()
    r, c = r.clone().requires_grad_(), c.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w, r, c: ideal_distance(w, L.level_table(r, c), shape), (w, r, c))


def test_sin_on_a_uniform_grid_is_sinreq():
    """Inside the grid's range, ``sin`` is SinReQ's (step/pi)^2 sin^2(pi (w - c) / step)."""
    r, c = grid(1, 3, uniform=True)
    step = float(r[0, 0])
    lv = L.level_table(r, c)
    w = torch.linspace(float(lv.min()), float(lv.max()), 101, dtype=torch.float64)[None]
    per = [float(ideal_distance(w[:, j:j + 1], lv, "sin")) for j in range(101)]
    sinreq = [(step / math.pi) ** 2 * math.sin(math.pi * (float(x) - float(c[0])) / step) ** 2
              for x in w[0]]
    assert per == pytest.approx(sinreq, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("shape", SHAPED)
def test_curvature_at_a_level_is_that_of_the_squared_distance(shape):
    """The shapes are scaled so that near a level they equal d^2 to second order: the paper's
    lambda schedule carries over."""
    r, c = grid(1, 3)
    lv = L.level_table(r, c)
    q = float(lv[0, 3])
    for d in (1e-3, -1e-3):
        f = float(ideal_distance(torch.tensor([[q + d]], dtype=torch.float64), lv,
                                            shape))
        assert f / d ** 2 == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("shape", SHAPED)
def test_outside_the_range_the_pull_keeps_growing(shape):
    """No phantom level beyond the outer levels: the term rises monotonically, and its slope
    points back into the grid."""
    r, c = grid(1, 3)
    lv = L.level_table(r, c)
    top = float(lv.max())
    xs = top + torch.linspace(0, 5, 60, dtype=torch.float64)
    vals = [float(ideal_distance(torch.tensor([[x]]), lv, shape)) for x in xs]
    assert all(b > a for a, b in zip(vals, vals[1:]))
    _, fd, _ = shape_terms(torch.tensor([3.0]), torch.tensor([1.0]), shape)
    assert float(fd) > 0


def test_sin_is_smooth_across_levels_of_unequal_spacing():
    """C1 at a level between gaps of different widths: both one-sided slopes are 0."""
    r = torch.tensor([[1.0, 3.0]], dtype=torch.float64)  # levels 0, 1, 3, 4: gaps 1, 2, 1
    c = torch.zeros(1, dtype=torch.float64)
    lv = L.level_table(r, c)
    for x in (1.0, 3.0):
        for eps in (1e-7, -1e-7):
            w = torch.tensor([[x + eps]], dtype=torch.float64, requires_grad=True)
            ideal_distance(w, lv, "sin").backward()
            assert abs(float(w.grad)) < 1e-6


def test_gauss_width_sets_sigma():
    """sigma = width * h: at half a spacing the Gaussian term is s^2 (1 - exp(-1/(4 k^2)))."""
    for h in (1.0, 2.5):
        r = torch.tensor([[h]], dtype=torch.float64)  # levels 0 and h
        lv = L.level_table(r, torch.zeros(1, dtype=torch.float64))
        for k in (0.25, 0.5, 1.0):
            f = float(ideal_distance(torch.tensor([[h / 2]], dtype=torch.float64),
                                                lv, "gauss", k))
            s = k * h
            assert f == pytest.approx(s * s * (1 - math.exp(-1 / (4 * k * k))), rel=1e-12)


def test_coincident_levels_are_skipped_for_the_spacing():
    """r_0 = 0 doubles every level: the spacing is to the next *distinct* level."""
    r = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    c = torch.zeros(1, dtype=torch.float64)
    lv = L.level_table(r, c)
    w = torch.tensor([[-0.4, 0.3, 1.2, 2.6, 3.5]], dtype=torch.float64)
    for shape in SHAPED:
        want = sum(brute_term(float(x), lv[0].tolist(), shape) for x in w[0])
        assert float(ideal_distance(w, lv, shape)) == pytest.approx(want, rel=1e-12)


def test_a_grid_without_spacing_is_a_clear_error():
    r = torch.zeros(1, 3, dtype=torch.float64)
    lv = L.level_table(r, torch.ones(1, dtype=torch.float64))
    w = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    assert float(ideal_distance(w, lv, "sq")) == pytest.approx(0.25 + 1.0)
    sa0 = torch.tensor([[1, 0]], dtype=torch.uint8)
    for shape in SHAPED:
        with pytest.raises(ValueError, match="coincide.*no level spacing.*'sq'"):
            ideal_distance(w, lv, shape)
        with pytest.raises(ValueError, match="coincide.*no level spacing"):
            deployed_shaped_distance(w, r, torch.ones(1, dtype=torch.float64),
                                     torch.zeros(1, 2, dtype=torch.long), sa0,
                                     torch.zeros_like(sa0), shape=shape)


def test_unknown_shape_and_bad_width_are_errors():
    lv = L.level_table(*grid(1, 2))
    w = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown regularizer shape 'cos'; choose one of sq, "
                                         "gauss, sin"):
        ideal_distance(w, lv, "cos")
    for bad in (0, -1, float("nan"), "wide", True):
        with pytest.raises(ValueError, match="width must be a finite number > 0"):
            ideal_distance(w, lv, "gauss", bad)
    with pytest.raises(ValueError, match="unknown regularizer shape"):
        TrainConfig(reg_shape="triangle")
    with pytest.raises(ValueError, match="width"):
        TrainConfig(reg_shape="gauss", reg_width=0)
    m = nn.Sequential(qnn.QuantLinear(4, 2, bias=False, weight_quant=NMultWeightQuant))
    with pytest.raises(ValueError, match="unknown regularizer shape"):
        regularization_loss(m, shape="Sq")
    with pytest.raises(ValueError, match="unknown regularizer shape"):
        QuantRegularizer(m, LambdaSchedule(3, rise_epochs=1), shape="l1")


# -- on a device --------------------------------------------------------------------------------

def device_maps(G, M, N, faults, var, hrs, seed=3):
    g = torch.Generator().manual_seed(seed)
    sa0 = sa1 = lrs = hr = None
    if faults:
        stuck = (torch.rand(G, M, N, generator=g) < 0.35)
        one = torch.rand(G, M, N, generator=g) < 0.5
        pw = 1 << torch.arange(N)
        sa0 = ((stuck & ~one).long() * pw).sum(-1).to(torch.uint8)
        sa1 = ((stuck & one).long() * pw).sum(-1).to(torch.uint8)
    if var:
        lrs = (1 + 0.25 * torch.randn(G, M, N, generator=g, dtype=torch.float64)).clamp(min=0)
    if hrs:
        hr = 0.08 * torch.rand(G, M, N, generator=g, dtype=torch.float64)
    return sa0, sa1, lrs, hr


def deployable(r, c, g, j, N, sa0, sa1, lrs, hrs):
    """Every value weight (g, j) can hold on this device: codes that respect its stuck bits,
    each at its deployed value (computed code by code)."""
    out = []
    for code in range(1 << N):
        if sa0 is not None and (code & int(sa0[g, j])) != 0:
            continue
        if sa1 is not None and (code & int(sa1[g, j])) != int(sa1[g, j]):
            continue
        v = float(c[g])
        for i in range(N):
            bit = (code >> i) & 1
            cell = (float(lrs[g, j, i]) if lrs is not None else 1.0) if bit else \
                (float(hrs[g, j, i]) if hrs is not None else 0.0)
            v += float(r[g, i]) * cell
        out.append(v)
    return out


CASES = [(True, False, False), (False, True, False), (True, True, True)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("faults,var,hrs", CASES)
@pytest.mark.parametrize("G,N", [(1, 3), (2, 4)])
def test_device_value_equals_brute_force(shape, faults, var, hrs, G, N):
    r, c = grid(G, N)
    M = 25
    w = weights(G, M, r, c)
    sa0, sa1, lrs, hr = device_maps(G, M, N, faults, var, hrs)
    codes = D.aware_codes(w, r, c, sa0, sa1, lrs, hr)
    got = float(deployed_shaped_distance(w, r, c, codes, sa0, sa1, lrs, hr, shape))
    want = sum(brute_term(float(w[g, j]), deployable(r, c, g, j, N, sa0, sa1, lrs, hr), shape)
               for g in range(G) for j in range(M))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_a_weight_with_every_bit_stuck_is_charged_the_squared_distance():
    r, c = grid(1, 3)
    w = torch.tensor([[0.3, 0.3]], dtype=torch.float64)
    sa0 = torch.tensor([[0b101, 0]], dtype=torch.uint8)
    sa1 = torch.tensor([[0b010, 0]], dtype=torch.uint8)  # weight 0: only code 0b010
    codes = D.aware_codes(w, r, c, sa0, sa1)
    v0 = float(L.level_table(r, c)[0, 2])
    for shape in SHAPED:
        full = float(deployed_shaped_distance(w, r, c, codes, sa0, sa1, shape=shape))
        healthy = float(ideal_distance(w[:, 1:], L.level_table(r, c), shape))
        assert full - healthy == pytest.approx((0.3 - v0) ** 2, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("faults,var,hrs", CASES)
def test_device_zero_on_deployable_values(shape, faults, var, hrs):
    G, M, N = 2, 20, 3
    r, c = grid(G, N)
    sa0, sa1, lrs, hr = device_maps(G, M, N, faults, var, hrs)
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 1 << N, (G, M), generator=g)
    codes = D.force_codes(codes, sa0, sa1)
    w = D.deployed_values(codes, r, c, sa0, sa1, lrs, hr)
    aware = D.aware_codes(w, r, c, sa0, sa1, lrs, hr)
    assert float(deployed_shaped_distance(w, r, c, aware, sa0, sa1, lrs, hr, shape)) == 0.0
    off = w + 0.01
    aware = D.aware_codes(off, r, c, sa0, sa1, lrs, hr)
    assert float(deployed_shaped_distance(off, r, c, aware, sa0, sa1, lrs, hr, shape)) > 0


@pytest.mark.parametrize("shape", SHAPED)
@pytest.mark.parametrize("faults,var,hrs", CASES)
@pytest.mark.parametrize("G,N", [(1, 3), (3, 2)])
def test_device_gradcheck_float64(shape, faults, var, hrs, G, N):
    r, c = grid(G, N)
    M = 20
    w = weights(G, M, r, c).requires_grad_()
    sa0, sa1, lrs, hr = device_maps(G, M, N, faults, var, hrs)
    codes = D.aware_codes(w.detach(), r, c, sa0, sa1, lrs, hr)
    r, c = r.clone().requires_grad_(), c.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w, r, c: deployed_shaped_distance(w, r, c, codes, sa0, sa1, lrs, hr, shape),
        (w, r, c))


# -- through the model --------------------------------------------------------------------------

def small_model(dtype=torch.float64):
    torch.manual_seed(0)
    m = nn.Module()
    m.a = qnn.QuantLinear(6, 5, bias=False, weight_quant=NMultWeightPerChannelQuant,
                          weight_bit_width=3, dtype=dtype)
    m.b = qnn.QuantLinear(5, 4, bias=False, weight_quant=LearnedStepWeightQuant,
                          weight_bit_width=2, dtype=dtype)
    return m


@pytest.mark.parametrize("shape", SHAPES)
def test_regularization_loss_with_a_shape_equals_the_brute_force(shape):
    m = small_model()
    want = 0.0
    for _, layer in nmult_layers(m):
        tq = quant_of(layer)
        w2d = tq.to_groups(layer.weight.detach())
        lv = tq.levels().detach()
        want += layer_factor(w2d.numel(), tq.bits) * sum(
            brute_term(float(w2d[g, j]), lv[g].tolist(), shape)
            for g in range(w2d.shape[0]) for j in range(w2d.shape[1]))
    total, parts = regularization_loss(m, breakdown=True, shape=shape)
    total = total.detach()
    assert float(total) == pytest.approx(want, rel=1e-10)
    assert set(parts) == {"a", "b"}
    sched = LambdaSchedule(4, rise_epochs=2)
    reg = QuantRegularizer(m, sched, shape=shape)(0).detach()
    assert float(reg) == pytest.approx(100 * want, rel=1e-10)
    if shape == "sq":  # the default is the paper's
        assert float(total) == float(regularization_loss(m).detach())


def test_layer_distance_uses_the_fault_map_when_one_is_attached():
    m = small_model()
    layer = m.a
    tq = quant_of(layer)
    sa0 = torch.zeros(layer.weight.shape, dtype=torch.uint8)
    sa1 = torch.zeros_like(sa0)
    sa0[0, :3] = 0b100
    sa1[1, 1] = 0b011
    attach_faults(m, FaultMap({"a": (sa0, sa1)}, {"a": 3}))
    w2d = tq.to_groups(layer.weight.detach())
    r, c = tq.multipliers().detach(), tq.offset().detach()
    g0, g1 = tq.to_groups(sa0), tq.to_groups(sa1)
    for shape in SHAPED:
        want = sum(brute_term(float(w2d[g, j]), deployable(r, c, g, j, 3, g0, g1, None, None),
                              shape) for g in range(w2d.shape[0]) for j in range(w2d.shape[1]))
        got = tq.distance(layer.weight, shape).detach()
        assert float(got) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("shape", SHAPED)
def test_training_on_a_shape_lowers_it(digits, shape):
    """fit with ``reg_shape`` drives the shaped regularizer down (the shape reaches fit)."""
    train, _ = digits
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                         nn.Linear(32, 10)),
                           NMultConfig(weight_bits=3, act_bits=None, first_last_bits=None))
    sub = torch.utils.data.Subset(train, range(256))
    before = float(regularization_loss(model, shape=shape).detach())
    hist = fit(model, sub, None, TrainConfig(epochs=3, lr=0.01, lambda_rise_epochs=1,
                                             reg_shape=shape), progress=False)
    after = float(regularization_loss(model, shape=shape).detach())
    assert after < 0.7 * before
    assert hist["reg"][-1] < hist["reg"][0]  # fit logs the shaped term
