"""Per-channel paths of the quantizers, the level fitting, the PTQ reports and the chip's fault
and variability maps, each checked against a reference written here from the math (issue 27).

The references never call the library's helpers (``level_table``, ``nearest``, ``grid_error``,
``deployed_values``, ...): they are plain numpy loops over the channels of a weight, taken
along its own output axis (``w.take(g, axis)``):

- levels of channel ``g``: ``c_g + r_g0 b_0 + r_g1 b_1 + ...`` over the ``2**N`` codes
  (``b_i = (k >> i) & 1``), summed in float32 in that order (the order the library documents),
  so that a weight's level compares exactly;
- the nearest level: ``argmin_k |w - level_k|`` in float64, a tie going to the upper level
  (the library's documented rule: a weight on a threshold goes up);
- the regularizer: ``sum_j min_k (w_j - level_k)**2`` and its eq. 7 gradients;
- a stuck cell: ``S' = (S & ~sa0) | sa1`` and ``v = c_g + sum_i r_gi S'_i`` (the levels);
  variability: ``v = c_g + sum_i r_gi (S'_i lrs_i + (1 - S'_i) hrs_i)``;
- PTQ reports: errors, ratios, LSQ grids and Brevitas' max-scale uniform quantizer from their
  formulas.

The channels differ on purpose: multipliers and offsets of mixed signs, scales 1e-3 and 10,
an all-zero channel, a channel with a single nonzero weight, and group sizes from 1 (a 1x1
conv with one input channel) to 64, on output axis 0 and on axis 1 (a transposed conv).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Tuple

import brevitas.nn as qnn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qfv_brevitas.chip.faults import FaultMap, attach_faults
from qfv_brevitas.chip.variability import VariabilityMap, attach_variability
from qfv_brevitas.core import kernels as K
from qfv_brevitas.core.fitting import fit_multipliers
from qfv_brevitas.core.quantizers import NMultTensorQuant, NMultWeightPerChannelQuant, quant_of
from qfv_brevitas.studies.ptq import (brevitas_uniform, format_level_errors, level_errors,
                                      quantize_post_training)
from qfv_brevitas.training.regularizer import regularization_loss

EXACT = dict(atol=0, rtol=0)
F32 = np.float32


# -- references ------------------------------------------------------------------------------

def ref_levels(r_g: np.ndarray, c_g: float) -> np.ndarray:
    """The ``2**N`` levels of one channel, indexed by code, summed in float32 bit by bit."""
    n = len(r_g)
    out = np.empty(1 << n, dtype=F32)
    for k in range(1 << n):
        v = F32(c_g)
        for i in range(n):
            v = F32(v + F32(r_g[i]) * F32((k >> i) & 1))
        out[k] = v
    return out


def ref_nearest(w: np.ndarray, lv: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each weight's nearest level and its code; a tie goes to the upper level."""
    vals, codes = np.empty_like(w), np.empty(w.shape, dtype=np.int64)
    lv64 = lv.astype(np.float64)
    for j, x in enumerate(w.astype(np.float64)):
        d = np.abs(x - lv64)
        best = np.flatnonzero(d == d.min())
        k = best[np.argmax(lv64[best])]
        vals[j], codes[j] = lv[k], k
    return vals, codes


def sq_error(w: np.ndarray, lv: np.ndarray) -> float:
    """``sum_j min_k (w_j - level_k)**2`` in float64."""
    d = w.astype(np.float64)[:, None] - lv.astype(np.float64)[None, :]
    return float((d * d).min(1).sum())


def per_channel(w: np.ndarray, axis: int, fn: Callable[[int, np.ndarray], np.ndarray]
                ) -> np.ndarray:
    """Apply ``fn(g, flat weights of channel g)`` to every output channel of ``w`` along
    ``axis`` and put the results back in ``w``'s shape."""
    out = np.empty_like(w)
    for g in range(w.shape[axis]):
        idx = [slice(None)] * w.ndim
        idx[axis] = g
        chan = w[tuple(idx)]
        out[tuple(idx)] = np.asarray(fn(g, chan.ravel())).reshape(chan.shape)
    return out


def channel(w: np.ndarray, axis: int, g: int) -> np.ndarray:
    return np.take(w, g, axis=axis).ravel()


def bits_of(k: int, n: int) -> np.ndarray:
    return np.array([(k >> i) & 1 for i in range(n)], dtype=np.float64)


# -- data: channels that differ ----------------------------------------------------------------

#: ``name: (constructor, output-channel axis)``; group sizes 37, 45, 24 and 1.
LAYERS: Dict[str, Tuple[Callable[[], nn.Module], int]] = {
    "linear": (lambda **kw: qnn.QuantLinear(37, 5, bias=False, **kw), 0),
    "conv2d": (lambda **kw: qnn.QuantConv2d(3, 4, (5, 3), bias=False, **kw), 0),
    "convT": (lambda **kw: qnn.QuantConvTranspose2d(6, 3, 2, bias=False, **kw), 1),
    "conv1x1": (lambda **kw: qnn.QuantConv1d(1, 6, 1, bias=False, **kw), 0),
}


def channel_weights(shape, axis: int, rng: np.random.Generator) -> np.ndarray:
    """Weights whose channels differ: channel 0 at scale 1e-3, 1 at scale 10, 2 all zero, 3 a
    single nonzero weight, the others heavy-tailed at random scales, with offsets of either
    sign (as many of these as the layer has channels)."""
    w = np.empty(shape, dtype=F32)

    def draw(g: int, flat: np.ndarray) -> np.ndarray:
        m = flat.size
        if g == 2:
            return np.zeros(m, F32)
        if g == 3:
            out = np.zeros(m, F32)
            out[rng.integers(m)] = -7.25
            return out
        scale = {0: 1e-3, 1: 10.0}.get(g, 10.0 ** rng.uniform(-2, 1))
        x = rng.standard_t(3, m) + rng.choice([-1.0, 1.0]) * rng.uniform(0, 1.5)
        return (scale * x).astype(F32)

    return per_channel(w, axis, draw)


def channel_levels(w: np.ndarray, axis: int, bits: int, rng: np.random.Generator,
                   signs=None) -> Tuple[np.ndarray, np.ndarray]:
    """``r (G, N)``, ``c (G,)`` at each channel's own scale, entries of mixed signs (``signs``:
    one bool per multiplier, else random), offsets of either sign, no two levels equal."""
    G = w.shape[axis]
    r = np.empty((G, bits), F32)
    c = np.empty(G, F32)
    for g in range(G):
        x = channel(w, axis, g)
        span = float(np.abs(x).max()) or 0.5
        step = span / (1 << (bits - 1))
        mags = step * 2.0 ** np.arange(bits) * rng.uniform(0.7, 1.3, bits)
        sg = rng.choice([-1.0, 1.0], bits) if signs is None else \
            np.array([-1.0 if signs[(g * bits + i) % len(signs)] else 1.0 for i in range(bits)])
        r[g] = (mags * sg).astype(F32)
        c[g] = F32(-(r[g].astype(np.float64) * 0.5).sum() + rng.uniform(-0.3, 0.3) * step)
    return r, c


def set_levels(tq: NMultTensorQuant, r: np.ndarray, c: np.ndarray) -> None:
    with torch.no_grad():
        tq.r.copy_(torch.from_numpy(r))
        tq.c.copy_(torch.from_numpy(c))


def make_layer(kind: str, bits: int, seed: int, signs=None):
    """A per-channel N-multiplier layer of ``kind`` with differing channels and hand-set
    levels: ``(layer, axis, w, r, c)`` (numpy)."""
    ctor, axis = LAYERS[kind]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    layer = ctor(weight_quant=NMultWeightPerChannelQuant, weight_bit_width=bits)
    w = channel_weights(tuple(layer.weight.shape), axis, rng)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
    r, c = channel_levels(w, axis, bits, rng, signs)
    tq = quant_of(layer)
    assert (tq.per_channel, tq.channel_dim, tq.groups) == (True, axis, w.shape[axis])
    set_levels(tq, r, c)
    return layer.eval(), axis, w, r, c


def ideal_snap(w, axis, r, c) -> Tuple[np.ndarray, np.ndarray]:
    """Each weight's nearest level of its own channel, and its code."""
    vals = per_channel(w, axis, lambda g, x: ref_nearest(x, ref_levels(r[g], c[g]))[0])
    codes = per_channel(w.astype(np.float64), axis,
                        lambda g, x: ref_nearest(x.astype(F32), ref_levels(r[g], c[g]))[1])
    return vals, codes.astype(np.int64)


@pytest.fixture(params=["kernels", "torch"])
def paths(request):
    """Run a test with the compiled kernels (where built) and with the pure-torch paths."""
    if request.param == "torch":
        with K.torch_fallback():
            yield request.param
    else:
        yield request.param


# -- quantizers --------------------------------------------------------------------------------

@settings(max_examples=24, deadline=None)
@given(kind=st.sampled_from(sorted(LAYERS)), bits=st.integers(1, 5),
       seed=st.integers(0, 2 ** 31 - 1), signs=st.lists(st.booleans(), min_size=1, max_size=7))
def test_forward_is_each_channels_nearest_own_level(kind, bits, seed, signs):
    """Eval forward: each weight becomes the nearest level of its own channel's level set
    (multipliers and offsets of mixed signs, scales 1e-3 to 10, a zero channel, a channel with
    one nonzero weight), its code indexes that level, and the nominal scale is the channel's
    smallest |r| on the output axis."""
    layer, axis, w, r, c = make_layer(kind, bits, seed, signs)
    tq = quant_of(layer)
    want, codes = ideal_snap(w, axis, r, c)
    wt = layer.weight.detach()
    out, scale, _, _ = tq(wt)
    np.testing.assert_array_equal(out.numpy(), want)
    np.testing.assert_array_equal(tq.codes(wt).numpy(), codes)
    shape = [1] * w.ndim
    shape[axis] = w.shape[axis]
    np.testing.assert_array_equal(scale.numpy(), np.abs(r).min(1).reshape(shape))


@pytest.mark.parametrize("kind", ["conv2d", "convT"])
def test_weight_on_a_threshold_goes_to_its_channels_upper_level(kind):
    """Channels with different dyadic levels (exact midpoints): a weight exactly between two
    levels of its own channel takes the upper one; a weight on a level stays."""
    ctor, axis = LAYERS[kind]
    layer = ctor(weight_quant=NMultWeightPerChannelQuant, weight_bit_width=2).eval()
    G = layer.weight.shape[axis]
    r = np.array([[0.25 * (g + 1), -0.5 * (g + 1)] for g in range(G)], F32) * \
        F32(8.0) ** np.arange(G, dtype=F32)[:, None] / F32(8.0)
    c = np.array([(-1) ** g * 0.125 * (g + 1) for g in range(G)], F32)
    set_levels(quant_of(layer), r, c)
    rng = np.random.default_rng(1)

    def on_mids(g: int, x: np.ndarray) -> np.ndarray:
        lv = np.sort(ref_levels(r[g], c[g]))
        mids = (lv[1:] + lv[:-1]) / F32(2)
        pool = np.concatenate([mids, lv])
        return pool[rng.integers(len(pool), size=x.size)]

    w = per_channel(layer.weight.detach().numpy(), axis, on_mids)
    want = per_channel(w, axis, lambda g, x: [np.sort(ref_levels(r[g], c[g]))[
        np.searchsorted(np.sort(ref_levels(r[g], c[g])), v, "left")] for v in x])
    got = quant_of(layer)(torch.from_numpy(w))[0].numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_lsq_initial_grid_is_each_channels_own(kind):
    """The LSQ start per channel: ``step_g = 2 mean|w_g| / sqrt(Q_P)`` (1e-8 for the zero
    channel), ``r_gi = step_g 2**i``, ``c_g = -step_g (2**N - 1) / 2``."""
    ctor, axis = LAYERS[kind]
    shape = tuple(ctor(weight_quant=NMultWeightPerChannelQuant).weight.shape)
    w = channel_weights(shape, axis, np.random.default_rng(3))
    bits = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tq = NMultTensorQuant(bits, [torch.from_numpy(w)], scaling_per_output_channel=True,
                              output_channel_dim=axis)
    zero = [g for g in range(w.shape[axis]) if not channel(w, axis, g).any()]
    assert any(f"{len(zero)} of {w.shape[axis]} channels" in str(x.message) for x in caught)
    qp = max(2 ** (bits - 1) - 1, 1)
    for g in range(w.shape[axis]):
        x = channel(w, axis, g).astype(np.float64)
        step = 2 * np.abs(x).mean() / math.sqrt(qp) or 1e-8
        np.testing.assert_allclose(tq.r[g].detach().numpy(), step * 2.0 ** np.arange(bits),
                                   rtol=1e-6)
        np.testing.assert_allclose(float(tq.c[g].detach()), -step * (2 ** bits - 1) / 2, rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_regularizer_and_its_gradients_per_channel(kind):
    """``R = sum_g sum_j min_k (w_gj - level_gk)**2`` and eq. 7 per channel:
    ``dR/dw = 2 (w - q)``, ``dR/dc_g = -2 sum_j (w_gj - q_gj)``,
    ``dR/dr_gi = -2 sum_j (w_gj - q_gj) b_i(code_gj)``; the model's loss is
    ``R / sqrt(n Q_P)``."""
    bits = 3
    layer, axis, w, r, c = make_layer(kind, bits, seed=11)
    tq = quant_of(layer)
    wt = torch.from_numpy(w).requires_grad_(True)
    R = tq.distance(wt)
    gw, gr, gc = torch.autograd.grad(R, (wt, tq.r, tq.c))
    q, codes = ideal_snap(w, axis, r, c)
    G = w.shape[axis]
    want_R = sum(sq_error(channel(w, axis, g), ref_levels(r[g], c[g])) for g in range(G))
    want_gr = np.zeros((G, bits))
    want_gc = np.zeros(G)
    for g in range(G):
        d = channel(w, axis, g).astype(np.float64) - channel(q, axis, g)
        want_gc[g] = -2 * d.sum()
        for j, k in enumerate(channel(codes, axis, g)):
            want_gr[g] += -2 * d[j] * bits_of(int(k), bits)
    scale = max(1.0, float(np.abs(w).max()) ** 2)
    assert float(R.detach()) == pytest.approx(want_R, rel=1e-5, abs=1e-9 * scale)
    np.testing.assert_allclose(gw.numpy(), 2 * (w.astype(np.float64) - q), rtol=1e-5,
                               atol=1e-6 * scale ** 0.5)
    np.testing.assert_allclose(gc.numpy(), want_gc, rtol=1e-4, atol=1e-5 * scale ** 0.5)
    np.testing.assert_allclose(gr.numpy(), want_gr, rtol=1e-4, atol=1e-5 * scale ** 0.5)
    loss = regularization_loss(nn.Sequential(layer))
    qp = max(2 ** (bits - 1) - 1, 1)
    assert float(loss) == pytest.approx(want_R / math.sqrt(w.size * qp), rel=1e-5,
                                        abs=1e-9 * scale)


# -- fitting -------------------------------------------------------------------------------------

def additive_rows(bits: int, M: int, rng: np.random.Generator):
    """Rows on their own additive grids (every code used): ``(w2d, r, c)`` with r of mixed
    signs and scales 1e-3, 10 and 0.3; then an all-zero row and a row with one nonzero
    weight."""
    rows, rs, cs = [], [], []
    for scale, signs in ((1e-3, (1, -1, 1, -1)), (10.0, (-1, 1, -1, 1)), (0.3, (-1, -1, 1, 1))):
        r = (scale * 2.0 ** np.arange(bits) * rng.uniform(0.75, 1.25, bits)
             * np.array(signs[:bits])).astype(F32)
        c = F32(scale * rng.uniform(-2, 2))
        lv = ref_levels(r, c)
        codes = np.concatenate([np.arange(1 << bits), rng.integers(1 << bits,
                                                                   size=M - (1 << bits))])
        rows.append(lv[rng.permutation(codes)])
        rs.append(r)
        cs.append(c)
    one = np.zeros(M, F32)
    one[rng.integers(M)] = F32(-3.5)
    rows += [np.zeros(M, F32), one]
    return np.stack(rows), rs, cs


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_fit_recovers_each_channels_own_additive_grid(bits):
    """Weights on an additive grid of their own channel (mixed signs, scales 1e-3 to 10) are
    fitted exactly: each channel's fitted level set is its own; the zero channel and the one
    with a single nonzero weight are exact too. Errors from a numpy loop."""
    w2d, rs, cs = additive_rows(bits, 40, np.random.default_rng(bits))
    fit = fit_multipliers(torch.from_numpy(w2d), bits)
    r, c = fit.r.numpy(), fit.c.numpy()
    for g in range(w2d.shape[0]):
        lv = ref_levels(r[g], c[g])
        scale = max(float(np.abs(w2d[g]).max()), 1e-30)
        err = sq_error(w2d[g], lv)
        assert err <= 1e-10 * scale ** 2 * w2d.shape[1], (g, err)
        assert float(fit.error[g]) == pytest.approx(err, rel=1e-6, abs=1e-12 * scale ** 2)
        if g < len(rs):
            np.testing.assert_allclose(np.sort(lv), np.sort(ref_levels(rs[g], cs[g])),
                                       rtol=1e-5, atol=1e-6 * scale)


def test_warm_fit_per_channel_never_worse_than_its_own_start_and_permutes_with_channels():
    """A warm refit from each channel's own start (mixed signs, scales 1e-3 and 10, a zero and
    a one-weight channel): every channel's error (numpy) is at most its start's, the reported
    error is that channel's, and permuting the channels permutes the fit."""
    rng = np.random.default_rng(5)
    bits, G, M = 3, 6, 45
    w = channel_weights((G, M), 0, rng)
    r0, c0 = channel_levels(w, 0, bits, rng)
    fit = fit_multipliers(torch.from_numpy(w), bits, init=(torch.from_numpy(r0),
                                                           torch.from_numpy(c0)), search=False)
    for g in range(G):
        start = sq_error(w[g], ref_levels(r0[g], c0[g]))
        after = sq_error(w[g], ref_levels(fit.r[g].numpy(), fit.c[g].numpy()))
        scale = float(np.abs(w[g]).max()) ** 2 + 1e-30
        assert after <= start * (1 + 1e-9) + 1e-12 * scale, (g, after, start)
        assert float(fit.error[g]) == pytest.approx(after, rel=1e-6, abs=1e-12 * scale)
    perm = np.array([4, 2, 0, 5, 1, 3])
    fp = fit_multipliers(torch.from_numpy(w[perm]), bits,
                         init=(torch.from_numpy(r0[perm]), torch.from_numpy(c0[perm])),
                         search=False)
    for t in ("r", "c", "error"):
        torch.testing.assert_close(getattr(fp, t), getattr(fit, t)[perm], rtol=1e-6, atol=0)
    full = fit_multipliers(torch.from_numpy(w), bits)
    fullp = fit_multipliers(torch.from_numpy(w[perm]), bits)
    torch.testing.assert_close(fullp.error, full.error[perm], rtol=1e-6, atol=0)
    for g in range(G):
        np.testing.assert_allclose(np.sort(ref_levels(fullp.r[g].numpy(), fullp.c[g].numpy())),
                                   np.sort(ref_levels(full.r[perm[g]].numpy(),
                                                      full.c[perm[g]].numpy())),
                                   rtol=1e-5, atol=1e-6 * float(np.abs(w[perm[g]]).max()))


@pytest.mark.parametrize("kind", ["conv2d", "convT", "linear"])
def test_refit_per_channel_on_the_layers_own_axis(kind):
    """``refit_`` on a layer: ``before`` is each channel's error with its hand-set levels and
    ``after`` its error with the new ones (numpy, channels along the layer's output axis);
    no channel gets worse."""
    layer, axis, w, r, c = make_layer(kind, 3, seed=21)
    tq = quant_of(layer)
    before, after = tq.refit_(layer.weight)
    G = w.shape[axis]
    rn, cn = tq.r.detach().numpy(), tq.c.detach().numpy()
    for g in range(G):
        x = channel(w, axis, g)
        scale = float(np.abs(x).max()) ** 2 + 1e-30
        b = sq_error(x, ref_levels(r[g], c[g]))
        a = sq_error(x, ref_levels(rn[g], cn[g]))
        assert float(before[g]) == pytest.approx(b, rel=1e-6, abs=1e-12 * scale)
        assert float(after[g]) == pytest.approx(a, rel=1e-6, abs=1e-12 * scale)
        assert a <= b * (1 + 1e-9) + 1e-12 * scale


# -- PTQ reports ------------------------------------------------------------------------------

class TwoLayers(nn.Module):
    """A conv (4 channels of 18 weights) and a linear layer (3 channels of 64)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def two_layers(fill: Callable[[Tuple[int, ...], np.random.Generator], np.ndarray],
               seed: int) -> TwoLayers:
    torch.manual_seed(seed)
    m = TwoLayers().eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for layer in (m.conv, m.fc):
            layer.weight.copy_(torch.from_numpy(fill(tuple(layer.weight.shape), rng)))
    return m


def uniform_channels(shape, rng) -> np.ndarray:
    """Every channel on its own uniform grid of 8 levels (steps and offsets of either sign,
    scales 1e-3 to 10; all 8 used), channel 2 all zero."""
    def grid(g: int, x: np.ndarray) -> np.ndarray:
        if g == 2:
            return np.zeros(x.size, F32)
        step = F32(rng.choice([-1, 1]) * [1e-3, 10.0, 0.0, 0.25][g % 4] * rng.uniform(0.5, 2))
        off = F32(rng.uniform(-5, 1) * abs(step))
        k = np.concatenate([np.arange(8), rng.integers(8, size=x.size - 8)])
        return (off + step * rng.permutation(k).astype(F32)).astype(F32)
    return per_channel(np.empty(shape, F32), 0, grid)


def random_channels(shape, rng) -> np.ndarray:
    return channel_weights(shape, 0, rng)


def ptq(model: nn.Module, bits: int = 3, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-zero channel's warning
        return quantize_post_training(model, bits, per_channel=True, first_last_bits=None,
                                      example_input=torch.randn(2, 2, 6, 6), **kw)


def test_ptq_report_rows_recomputed_by_hand_per_channel():
    """Every number of a per-channel PTQ report row from the layer's weights and its fitted
    ``(r, c)`` by a numpy loop over channels: MSE, LSQ grid MSE, mean square, non-uniformity
    and the ratios (also as the table prints them); the best uniform grid lies between
    Lloyd-Max and each channel's LSQ grid."""
    bits = 3
    res = ptq(two_layers(random_channels, 0), bits)
    rows = {row["layer"]: row for row in res.layers}
    assert sorted(rows) == ["conv", "fc"]
    qp = max(2 ** (bits - 1) - 1, 1)
    for name in rows:
        row = rows[name]
        layer = dict(res.model.named_modules())[name]
        tq = quant_of(layer)
        w = layer.weight.detach().numpy()
        r, c = tq.r.detach().numpy(), tq.c.detach().numpy()
        G, n = w.shape[0], w.size
        err = sum(sq_error(w[g].ravel(), ref_levels(r[g], c[g])) for g in range(G))
        lsq = 0.0
        for g in range(G):
            x = w[g].ravel()
            step = F32(2 * np.abs(x.astype(np.float64)).mean() / math.sqrt(qp)) or F32(1e-8)
            lsq += sq_error(x, ref_levels(step * F32(2) ** np.arange(bits, dtype=F32),
                                          -step * F32((2 ** bits - 1) / 2)))
        nonuni = max(abs(r[g, i] / (r[g, 0] * 2.0 ** i) - 1) for g in range(G)
                     for i in range(bits))
        assert (row["bits"], row["per_channel"], row["num_weights"]) == (bits, True, n)
        assert row["mse"] == pytest.approx(err / n, rel=1e-6)
        assert row["lsq_mse"] == pytest.approx(lsq / n, rel=1e-5)
        assert row["mean_square"] == pytest.approx(float((w.astype(np.float64) ** 2).mean()),
                                                   rel=1e-12)
        assert row["nonuniformity"] == pytest.approx(nonuni, rel=1e-5)
        assert row["vs_uniform"] == pytest.approx(err / n / row["uniform_mse"], rel=1e-6)
        assert row["vs_lloyd"] == pytest.approx(err / n / row["lloyd_mse"], rel=1e-6)
        assert row["lloyd_mse"] <= row["uniform_mse"] * (1 + 1e-9)
        assert row["uniform_mse"] <= lsq / n * (1 + 1e-9)
        assert row["mse"] <= row["uniform_mse"] * (1 + 1e-9)
    table = format_level_errors(res.layers)
    for name, row in rows.items():
        line = next(s for s in table.splitlines() if s.startswith(name + " "))
        assert f" {row['mse'] / row['uniform_mse']:.3f} " in line
        assert f" {row['mse'] / row['lsq_mse']:.3f} " in line


def test_ptq_report_is_exact_where_each_channel_is_on_its_own_uniform_grid():
    """Channels each on their own uniform grid (steps of either sign, scales 1e-3 to 10, a
    zero channel): the per-channel best uniform grid and the fitted levels are exact."""
    res = ptq(two_layers(uniform_channels, 1), 3)
    for row in res.layers:
        assert row["uniform_mse"] <= 1e-12 * row["mean_square"], row
        assert row["mse"] <= 1e-12 * row["mean_square"], row
    direct = level_errors(res.model, lloyd=False)
    assert [d["uniform_mse"] for d in direct] == [r["uniform_mse"] for r in res.layers]


def brevitas_max_reference(w: np.ndarray, bits: int) -> np.ndarray:
    """Brevitas' per-channel max-abs uniform quantizer: ``s_g = max|w_g| / (2**(b-1) - 1)``,
    ``q = clip(round(w / s_g), -(2**(b-1) - 1), 2**(b-1) - 1) * s_g``."""
    top = F32(2 ** (bits - 1) - 1)

    def quant(g: int, x: np.ndarray) -> np.ndarray:
        s = F32(np.abs(x).max()) / top
        if s == 0:
            return np.zeros_like(x)
        return np.clip(np.round(x / s), -top, top).astype(F32) * s
    return per_channel(w, 0, quant)


def hand_accuracy(model: TwoLayers, wconv: np.ndarray, wfc: np.ndarray, data) -> float:
    x, y = data.tensors
    with torch.no_grad():
        h = torch.relu(F.conv2d(x, torch.from_numpy(wconv), model.conv.bias)).flatten(1)
        out = F.linear(h, torch.from_numpy(wfc), model.fc.bias)
    return float((out.argmax(1) == y).double().mean())


def test_ptq_accuracies_and_brevitas_per_channel_baseline_by_hand():
    """End to end, per channel: the fitted model's and Brevitas' max-scale uniform baseline's
    weights and accuracies, each recomputed by hand (nearest level of each channel's own
    fitted levels; ``round(w / s_g) s_g`` with each channel's own scale)."""
    bits = 3
    model = two_layers(random_channels, 2)
    torch.manual_seed(0)
    x = torch.randn(256, 2, 6, 6)
    with torch.no_grad():
        y = (model(x) + 0.3 * torch.randn(256, 3)).argmax(1)
    data = torch.utils.data.TensorDataset(x, y)
    res = ptq(model, bits, data=data, baseline="max", lloyd=False)
    fitted = {}
    for name in ("conv", "fc"):
        tq = quant_of(getattr(res.model, name))
        w = getattr(model, name).weight.detach().numpy()
        r, c = tq.r.detach().numpy(), tq.c.detach().numpy()
        fitted[name] = per_channel(w, 0, lambda g, v: ref_nearest(v, ref_levels(r[g], c[g]))[0])
        base = getattr(res.baseline_model, name).quant_weight().value.detach().numpy()
        np.testing.assert_array_equal(base, brevitas_max_reference(w, bits))
    assert res.acc == hand_accuracy(model, fitted["conv"], fitted["fc"], data)
    want = hand_accuracy(model, *(brevitas_max_reference(getattr(model, n).weight.detach()
                                                         .numpy(), bits)
                                  for n in ("conv", "fc")), data)
    assert res.baseline_acc == want
    assert res.float_acc == hand_accuracy(model, model.conv.weight.detach().numpy(),
                                          model.fc.weight.detach().numpy(), data)


def test_brevitas_uniform_per_channel_differs_from_per_tensor_by_hand():
    """``brevitas_uniform(per_channel=True)`` quantizes each channel with its own max-abs
    scale (channels 1e-3 and 10 apart), not the tensor's."""
    model = two_layers(random_channels, 4)
    base = brevitas_uniform(model, 4, per_channel=True, first_last_bits=None,
                            example_input=torch.randn(2, 2, 6, 6))
    w = model.conv.weight.detach().numpy()
    got = base.conv.quant_weight().value.detach().numpy()
    np.testing.assert_array_equal(got, brevitas_max_reference(w, 4))
    assert np.abs(got[0]).max() > 0  # the 1e-3 channel is not flushed to zero


# -- the chip: stuck bits and variability on one channel ------------------------------------------

def one_channel_masks(shape, axis: int, g: int, bits: int, rng: np.random.Generator):
    """uint8 ``(sa0, sa1)`` of the weight's shape: about 40% of channel ``g``'s cells stuck
    (half at 1), no other channel's."""
    sa0, sa1 = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)

    m0 = np.moveaxis(sa0, axis, 0)
    m1 = np.moveaxis(sa1, axis, 0)
    for i in range(bits):
        u = rng.random(m0[g].shape)
        m1[g] |= ((u < 0.2).astype(np.uint8) << i)
        m0[g] |= (((u >= 0.2) & (u < 0.4)).astype(np.uint8) << i)
    return sa0, sa1


def deployed_ref(w, axis, r, c, codes, sa0=None, sa1=None, lrs=None, hrs=None):
    """Values the cells hold for programmed ``codes``: stuck bits forced,
    ``v = c_g + sum_i r_gi (S'_i lrs_i + (1 - S'_i) hrs_i)`` (float64)."""
    N = r.shape[1]
    out = np.empty(w.shape, np.float64)
    for idx in np.ndindex(*w.shape):
        g = idx[axis]
        k = int(codes[idx])
        if sa0 is not None:
            k = (k & ~int(sa0[idx])) | int(sa1[idx])
        b = bits_of(k, N)
        a = np.ones(N) if lrs is None else lrs[idx].astype(np.float64)
        h = np.zeros(N) if hrs is None else hrs[idx].astype(np.float64)
        out[idx] = float(c[g]) + float((r[g].astype(np.float64) * (b * a + (1 - b) * h)).sum())
    return out


def aware_ref(w, axis, r, c, sa0=None, sa1=None, lrs=None, hrs=None):
    """Per weight, over the codes its stuck bits allow, the deployed value nearest to it, and
    that code: ``(values, codes)`` (float64)."""
    N = r.shape[1]
    vals = np.empty(w.shape, np.float64)
    codes = np.empty(w.shape, np.int64)
    for idx in np.ndindex(*w.shape):
        best = None
        for k in range(1 << N):
            if sa0 is not None and ((k & int(sa0[idx])) or (k & int(sa1[idx])) != int(sa1[idx])):
                continue
            v = deployed_ref(w[idx][None], 0, r[idx[axis]][None], c[idx[axis]][None],
                             np.array([k]), None, None,
                             None if lrs is None else lrs[idx][None],
                             None if hrs is None else hrs[idx][None])[0]
            d = abs(float(w[idx]) - v)
            if best is None or d < best[0]:
                best = (d, v, k)
        vals[idx], codes[idx] = best[1], best[2]
    return vals, codes


def on_chip(kind: str, bits: int, seed: int):
    layer, axis, w, r, c = make_layer(kind, bits, seed)
    return nn.Sequential(layer), layer, axis, w, r, c


@pytest.mark.parametrize("kind", ["conv2d", "convT", "conv1x1"])
def test_stuck_bits_on_one_channel_change_that_channel_only(kind, paths):
    """A fault map on channel ``g`` alone (naive mapping): every other channel keeps its ideal
    nearest level exactly; each weight of channel ``g`` holds ``c_g + sum_i r_gi S'_i`` with
    ``S' = (S & ~sa0) | sa1`` of its nearest code ``S``."""
    bits = 3
    model, layer, axis, w, r, c = on_chip(kind, bits, seed=7)
    ideal, codes = ideal_snap(w, axis, r, c)
    changed = 0
    for g in (1, w.shape[axis] - 1):
        sa0, sa1 = one_channel_masks(w.shape, axis, g, bits, np.random.default_rng(g))
        attach_faults(model, FaultMap({"0": (torch.from_numpy(sa0), torch.from_numpy(sa1))},
                                      bits={"0": bits}))
        got = quant_of(layer)(layer.weight.detach())[0].numpy()
        want = deployed_ref(w, axis, r, c, codes, sa0, sa1)
        others = np.ones(w.shape[axis], bool)
        others[g] = False
        np.testing.assert_array_equal(np.compress(others, got, axis),
                                      np.compress(others, ideal, axis))
        np.testing.assert_allclose(np.take(got, g, axis), np.take(want, g, axis), rtol=1e-6,
                                   atol=1e-6 * float(np.abs(r[g]).max()))
        changed += int((np.take(got, g, axis) != np.take(ideal, g, axis)).sum())
    assert changed > 0  # the stuck bits did change held values


@pytest.mark.parametrize("kind", ["conv2d", "convT"])
def test_aware_mapping_and_chip_distance_per_channel(kind, paths):
    """With ``mapping="aware"`` each weight of the faulty channel holds the nearest value its
    stuck bits allow, over its own channel's levels; the regularizer over the chip (eq. 11) is
    ``sum min (w - v)**2`` over those values, with eq. 7's gradients to ``r_g`` and ``c_g``
    through the held bits."""
    bits = 3
    model, layer, axis, w, r, c = on_chip(kind, bits, seed=8)
    g = 1
    sa0, sa1 = one_channel_masks(w.shape, axis, g, bits, np.random.default_rng(3))
    attach_faults(model, FaultMap({"0": (torch.from_numpy(sa0), torch.from_numpy(sa1))},
                                  bits={"0": bits}))
    tq = quant_of(layer)
    tq.chip.set_mapping("aware")
    vals, codes = aware_ref(w, axis, r, c, sa0, sa1)
    got = tq(layer.weight.detach())[0].numpy()
    np.testing.assert_allclose(got, vals, rtol=1e-6, atol=1e-7 * float(np.abs(r).max()))
    wt = torch.from_numpy(w).requires_grad_(True)
    R = tq.distance(wt)
    gr, gc = torch.autograd.grad(R, (tq.r, tq.c))
    d = w.astype(np.float64) - vals
    scale = float(np.abs(w).max()) ** 2
    assert float(R.detach()) == pytest.approx(float((d * d).sum()), rel=1e-5, abs=1e-9 * scale)
    want_gr, want_gc = np.zeros_like(r, np.float64), np.zeros_like(c, np.float64)
    for idx in np.ndindex(*w.shape):
        h = idx[axis]
        k = (int(codes[idx]) & ~int(sa0[idx])) | int(sa1[idx])
        want_gc[h] += -2 * d[idx]
        want_gr[h] += -2 * d[idx] * bits_of(k, bits)
    np.testing.assert_allclose(gc.numpy(), want_gc, rtol=1e-4, atol=1e-5 * scale ** 0.5)
    np.testing.assert_allclose(gr.numpy(), want_gr, rtol=1e-4, atol=1e-5 * scale ** 0.5)


@pytest.mark.parametrize("kind", ["conv2d", "convT", "linear"])
def test_variability_scales_the_right_channels_multipliers(kind, paths):
    """Per-cell factors off ideal on channel ``g`` only (LRS and HRS): the other channels keep
    their ideal levels exactly, channel ``g``'s weights hold
    ``c_g + sum_i r_gi (S_i lrs_i + (1 - S_i) hrs_i)`` for their nearest ideal code (naive), and
    with the aware mapping the nearest such value over all codes, with the distance over it."""
    bits = 3
    model, layer, axis, w, r, c = on_chip(kind, bits, seed=9)
    g = w.shape[axis] - 1 if kind != "linear" else 0
    rng = np.random.default_rng(4)
    lrs = np.ones(w.shape + (bits,), F32)
    hrs = np.zeros(w.shape + (bits,), F32)
    lm, hm = np.moveaxis(lrs, axis, 0), np.moveaxis(hrs, axis, 0)
    lm[g] = rng.uniform(0.5, 1.6, lm[g].shape)
    hm[g] = rng.uniform(0.0, 0.3, hm[g].shape)
    attach_variability(model, VariabilityMap({"0": (torch.from_numpy(lrs),
                                                    torch.from_numpy(hrs))}, bits={"0": bits}))
    tq = quant_of(layer)
    ideal, codes = ideal_snap(w, axis, r, c)
    got = tq(layer.weight.detach())[0].numpy()
    want = deployed_ref(w, axis, r, c, codes, lrs=lrs, hrs=hrs)
    others = np.ones(w.shape[axis], bool)
    others[g] = False
    np.testing.assert_array_equal(np.compress(others, got, axis),
                                  np.compress(others, ideal, axis))
    tol = 1e-6 * float(np.abs(r[g]).max() + abs(c[g]))
    np.testing.assert_allclose(np.take(got, g, axis), np.take(want, g, axis), rtol=1e-6,
                               atol=tol)
    tq.chip.set_mapping("aware")
    vals, _ = aware_ref(w, axis, r, c, lrs=lrs, hrs=hrs)
    got = tq(layer.weight.detach())[0].numpy()
    np.testing.assert_allclose(got, vals, rtol=1e-6, atol=1e-6 * float(np.abs(r).max()))
    d = w.astype(np.float64) - vals
    assert float(tq.distance(layer.weight.detach())) == pytest.approx(
        float((d * d).sum()), rel=1e-5, abs=1e-9 * float(np.abs(w).max()) ** 2)


def test_remap_to_valid_moves_only_the_faulty_weights_of_the_faulty_channel():
    """``remap_to_valid_`` on a transposed conv (output axis 1) with stuck bits on channel 1:
    each weight with a stuck bit moves to the nearest value its stuck bits allow over its own
    channel's levels; every other weight stays exactly where it was."""
    from qfv_brevitas.chip.repair import remap_to_valid_

    bits = 3
    model, layer, axis, w, r, c = on_chip("convT", bits, seed=12)
    g = 1
    sa0, sa1 = one_channel_masks(w.shape, axis, g, bits, np.random.default_rng(6))
    attach_faults(model, FaultMap({"0": (torch.from_numpy(sa0), torch.from_numpy(sa1))},
                                  bits={"0": bits}))
    moved = remap_to_valid_(model)
    faulty = (sa0 | sa1) != 0
    assert moved == {"0": int(faulty.sum())}
    vals, _ = aware_ref(w, axis, r, c, sa0, sa1)
    got = layer.weight.detach().numpy()
    np.testing.assert_array_equal(got[~faulty], w[~faulty])
    np.testing.assert_allclose(got[faulty], vals[faulty], rtol=1e-6,
                               atol=1e-7 * float(np.abs(r).max()))


# -- self-tuning (chip/selftune.py) ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_self_tuning_statistics_and_correction_per_channel(kind):
    """``layer_statistics`` against numpy's per-channel mean and population std of the layer's
    output (channels on axis 1 of a convolution, last for a Linear on (B, T, F) inputs), and
    ``self_tune`` towards hand-set targets that differ per channel: each channel's correction
    is ``scale_g = target_std_g / std_g``, ``shift_g = target_mean_g - scale_g * mean_g``, the
    all-zero channel (constant output) shifted only; the corrected outputs have each channel's
    target mean and std."""
    from qfv_brevitas.chip.selftune import ReferenceStats, layer_statistics, self_tune

    layer, _, w, r, c = make_layer(kind, 3, seed=5)
    c[2] = 0.0  # code 0 is level 0: the all-zero channel deploys zeros, a constant output
    set_levels(quant_of(layer), r, c)
    model = nn.Sequential(layer).eval()
    torch.manual_seed(1)
    x = torch.randn(6, 3, 9, 7) if kind == "conv2d" else torch.randn(6, 2, 37)
    dim = 1 if kind == "conv2d" else -1
    with torch.no_grad():
        out = model(x).double().numpy()
    G = out.shape[dim]
    ref_mean = np.array([np.take(out, g, axis=dim).mean() for g in range(G)])
    ref_std = np.array([np.take(out, g, axis=dim).std() for g in range(G)])  # population
    assert ref_std[2] == 0 and ref_std[1] > 1e3 * ref_std[0] > 0  # the channels differ
    stats = layer_statistics(model, x)
    np.testing.assert_allclose(stats.mean["0"].numpy(), ref_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.std["0"].numpy(), ref_std, rtol=1e-9, atol=1e-12)

    t_mean = np.array([3.0 * g - 2.0 for g in range(G)])
    t_std = np.array([10.0 ** (g - 2) for g in range(G)])
    target = ReferenceStats({"0": torch.from_numpy(t_mean)}, {"0": torch.from_numpy(t_std)},
                            tuple(x.shape[1:]))
    tuning = self_tune(model, x, target)
    ok = ref_std > 1e-8
    scale = np.where(ok, t_std / np.where(ok, ref_std, 1.0), 1.0)
    np.testing.assert_allclose(tuning.scale["0"].double().numpy(), scale, rtol=1e-6)
    np.testing.assert_allclose(tuning.shift["0"].double().numpy(), t_mean - scale * ref_mean,
                               rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        tuned = model(x).double().numpy()
    for g in range(G):
        y = np.take(tuned, g, axis=dim)
        assert y.mean() == pytest.approx(t_mean[g], rel=1e-5, abs=1e-6 * t_std[g] + 1e-9)
        assert y.std() == pytest.approx(t_std[g] if ok[g] else 0.0, rel=1e-4, abs=1e-9)
