"""Property tests of the pure-torch level math in ``qfv_brevitas.core.levels``.

Every search result is checked against a brute force over the full ``(G, M, 2**N)`` distance
tensor (small sizes only) and against the documented contract of the search
(``sorted index == #{thresholds <= w}``, ties go to the upper level). Both search paths (the
lookup table and the ``torch.searchsorted`` fallback) and the blocked tiling (``BLOCK``
monkeypatched small) are exercised for per-tensor (G = 1) and per-channel (G > 1) groups.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qfv_brevitas.core import kernels as K
from qfv_brevitas.core import levels as L
from qfv_brevitas.core import search as S
from qfv_brevitas.core.distance import ideal_distance
from qfv_brevitas.core.levels import (
    MAX_BITS,
    bit_matrix,
    bits_to_codes,
    check_bits,
    check_finite,
    codes_to_bits,
    level_table,
    lsq_step_init,
    qp,
    sort_levels,
    uniform_multipliers,
)
from qfv_brevitas.core.search import nearest, nearest_sorted_index, snap_ste

DTYPES = [torch.float32, torch.float64]
BITS = list(range(1, MAX_BITS + 1))
# None: the module's own block size; small values force the tiling over rows (M < block) and
# over columns (M >= block), with ragged last tiles.
BLOCKS = [None, 7, 64]
# "auto": whatever the search picks (usually the lookup table); "searchsorted": the lookup table
# is disabled (``_MAX_TABLE = 0``) so the fallback decides every weight.
PATHS = ["auto", "searchsorted"]

pytestmark = pytest.mark.usefixtures("kernel_backend")

FAST = settings(max_examples=40, deadline=None)
SLOW = settings(max_examples=25, deadline=None)


# --------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def patched(block=None, path="auto"):
    with pytest.MonkeyPatch.context() as mp:
        if block is not None:
            mp.setattr(S, "BLOCK", block)
        if path == "searchsorted":
            mp.setattr(S, "MAX_TABLE", 0)
        yield


def uses_lut(levels: torch.Tensor, dtype=None) -> bool:
    """Whether the torch path would search with its lookup table."""
    with K.torch_fallback():
        return S.LevelIndex(levels, dtype or levels.dtype).lut is not None


def brute_min_dist(w: torch.Tensor, levels: torch.Tensor):
    """(min |w - level|, argmin code) by materialising the full distance tensor."""
    d = (w[:, :, None] - levels[:, None, :]).abs()
    return d.min(-1).values, d.argmin(-1)


def contract_index(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Documented contract of the search: sorted index = #{thresholds <= w} (ties go up)."""
    thr = sort_levels(levels).thresholds.to(w.dtype)
    return (thr[:, None, :] <= w[:, :, None]).sum(-1)


def near_tol(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """A few ulps: the float midpoint may differ from the exact one by rounding."""
    eps = torch.finfo(w.dtype).eps
    return 4 * eps * (w.abs() + levels.abs().amax(1, keepdim=True))


def make_weights(levels: torch.Tensor, M: int, seed: int) -> torch.Tensor:
    """Random weights around the levels, half of them replaced by hard cases: the levels
    themselves, the thresholds, their float neighbours and far outliers."""
    gen = torch.Generator().manual_seed(seed)
    dtype = levels.dtype
    G = levels.shape[0]
    lo = levels.amin(1, keepdim=True)
    hi = levels.amax(1, keepdim=True)
    span = (hi - lo).clamp_min(1.0)
    w = lo - 0.25 * span + torch.rand(G, M, generator=gen, dtype=dtype) * 1.5 * span
    parts = [levels, lo - 100 * span, hi + 100 * span]
    if levels.shape[1] > 1:
        thr = sort_levels(levels).thresholds
        parts += [thr, torch.nextafter(thr, torch.full_like(thr, -math.inf)),
                  torch.nextafter(thr, torch.full_like(thr, math.inf))]
    specials = torch.cat(parts, 1)
    pick = torch.randint(0, specials.shape[1], (G, M), generator=gen)
    mask = torch.rand(G, M, generator=gen) < 0.5
    return torch.where(mask, specials.gather(1, pick), w).contiguous()


# Multipliers: negative and positive, exact zeros, and powers of two (duplicate-sum levels
# such as r = [0.5, 0.5]). Magnitudes stay >= 1e-3 so that the ratio span / smallest gap stays
# finite in float32 (see test_subnormal_gap_does_not_overflow for what happens otherwise).
_mult = st.one_of(
    st.just(0.0),
    st.sampled_from([0.25, 0.5, -0.5, 1.0, 2.0]),
    st.floats(1e-3, 4.0),
    st.floats(-4.0, -1e-3),
)


@st.composite
def quantizers(draw, max_groups=4, mult=_mult):
    dtype = draw(st.sampled_from(DTYPES))
    bits = draw(st.sampled_from(BITS))
    G = draw(st.sampled_from([1, 1, 2, max_groups]))
    r = torch.tensor(draw(st.lists(mult, min_size=G * bits, max_size=G * bits)),
                     dtype=dtype).view(G, bits)
    c = torch.tensor(draw(st.lists(st.floats(-2.0, 2.0), min_size=G, max_size=G)), dtype=dtype)
    return r, c


# Dyadic multipliers/offsets: every level sum is exact, so distinct levels are at least 1/16
# apart and equal sums are exactly equal. Used where atol=0 properties are asserted.
@st.composite
def dyadic_quantizers(draw, max_groups=4):
    dtype = draw(st.sampled_from(DTYPES))
    bits = draw(st.sampled_from(BITS))
    G = draw(st.sampled_from([1, 1, 2, max_groups]))
    k = draw(st.lists(st.integers(-32, 32), min_size=G * bits, max_size=G * bits))
    j = draw(st.lists(st.integers(-32, 32), min_size=G, max_size=G))
    r = torch.tensor(k, dtype=dtype).view(G, bits) / 16
    c = torch.tensor(j, dtype=dtype) / 16
    return r, c


def distinct_levels(bits, G, dtype, seed, step_range=(0.05, 1.0)):
    """Multipliers with random signs, order and jitter whose levels are pairwise >= step/2
    apart: r_i = +-(step * 2**i + delta_i), |delta_i| <= step / (4 N)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = step_range
    step = lo + (hi - lo) * torch.rand(G, 1, generator=gen, dtype=dtype)
    delta = (torch.rand(G, bits, generator=gen, dtype=dtype) * 2 - 1) * step / (4 * bits)
    r = step * 2.0 ** torch.arange(bits, dtype=dtype) + delta
    sign = torch.where(torch.rand(G, bits, generator=gen) < 0.3, -1.0, 1.0).to(dtype)
    r = (r * sign)[:, torch.randperm(bits, generator=gen)]
    c = torch.randn(G, generator=gen, dtype=dtype)
    return r, c, step


def weights_away_from_thresholds(levels, M, seed, margin=1e-3):
    gen = torch.Generator().manual_seed(seed + 1)
    G = levels.shape[0]
    lo = levels.amin(1, keepdim=True)
    hi = levels.amax(1, keepdim=True)
    span = (hi - lo).clamp_min(1.0)

    def sample(shape):
        return lo - 0.1 * span + torch.rand(shape, generator=gen, dtype=levels.dtype) * 1.2 * span

    w = sample((G, M))
    thr = sort_levels(levels).thresholds
    for _ in range(200):
        if thr.shape[1] == 0:
            break
        bad = (w[:, :, None] - thr[:, None, :]).abs().amin(-1) < margin
        if not bool(bad.any()):
            break
        w = torch.where(bad, sample((G, M)), w)
    else:
        raise AssertionError("could not sample weights away from the thresholds")
    if thr.shape[1]:
        assert float((w[:, :, None] - thr[:, None, :]).abs().min()) >= margin
    return w


# ------------------------------------------------------------------------ level table & co


@given(q=quantizers())
@FAST
def test_level_table_matches_definition(q):
    r, c = q
    G, N = r.shape
    lv = level_table(r, c)
    assert lv.shape == (G, 1 << N) and lv.dtype == r.dtype
    for k in range(1 << N):
        expect = c.clone()
        for i in range(N):
            if (k >> i) & 1:
                expect = expect + r[:, i]
        torch.testing.assert_close(lv[:, k], expect, rtol=0, atol=1e-12 if r.dtype == torch.float64 else 1e-5)


def test_level_table_rejects_bad_shapes():
    with pytest.raises(ValueError):
        level_table(torch.ones(3), torch.zeros(1))
    with pytest.raises(ValueError):
        level_table(torch.ones(2, 3), torch.zeros(3))
    with pytest.raises(ValueError):
        level_table(torch.ones(2, 3), torch.zeros(2, 1))


@pytest.mark.parametrize("bits", BITS)
def test_bit_matrix(bits):
    b = bit_matrix(bits, torch.float64)
    assert b.shape == (1 << bits, bits)
    for k in (0, 1, (1 << bits) - 1, (1 << bits) // 3):
        assert b[k].tolist() == [float((k >> i) & 1) for i in range(bits)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_uniform_multipliers_grid(bits, dtype):
    step = torch.tensor([0.5, 0.125, 3.0], dtype=dtype)
    r, c = uniform_multipliers(step, bits)
    assert r.shape == (3, bits) and c.shape == (3,)
    lv = level_table(r, c)
    k = torch.arange(1 << bits, dtype=dtype)
    expect = step[:, None] * (k - ((1 << bits) - 1) / 2)
    torch.testing.assert_close(lv, expect, rtol=0, atol=0)
    torch.testing.assert_close(lv, -lv.flip(1), rtol=0, atol=0)  # symmetric about 0
    assert not bool((lv == 0).any())  # no zero level


def test_qp_and_lsq_step_init():
    assert [qp(b) for b in BITS] == [1, 1, 3, 7, 15, 31, 63, 127]
    w = torch.tensor([[1.0, -3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.5, 0.5, 0.5, -0.5]])
    for bits in BITS:
        step = lsq_step_init(w, bits)
        expect = 2 * w.abs().mean(1) / math.sqrt(qp(bits))
        torch.testing.assert_close(step[[0, 2]], expect[[0, 2]])
        assert float(step[1]) == pytest.approx(1e-8)  # all-zero group: tiny positive step


# --------------------------------------------------------------------------- nearest search


@given(q=quantizers(), M=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       block=st.sampled_from(BLOCKS), path=st.sampled_from(PATHS))
@settings(max_examples=100, deadline=None)
def test_nearest_is_a_level_and_truly_nearest(q, M, seed, block, path):
    r, c = q
    lv = level_table(r, c)
    w = make_weights(lv, M, seed)
    with patched(block, path):
        values, codes = nearest(w, lv)
        sidx = nearest_sorted_index(w, lv)
    G = lv.shape[0]
    assert values.shape == (G, M) and codes.shape == (G, M) and sidx.shape == (G, M)
    assert values.dtype == w.dtype and codes.dtype == torch.int64 and sidx.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < lv.shape[1]
    # The code indexes the returned value exactly, so every value is one of the group's levels.
    assert torch.equal(lv.gather(1, codes), values)
    assert bool((values[:, :, None] == lv[:, None, :]).any(-1).all())
    # Truly nearest (compare distances: ties and duplicate levels may pick other codes).
    bmin, _ = brute_min_dist(w, lv)
    excess = (w - values).abs() - bmin
    assert bool((excess <= near_tol(w, lv)).all()), float(excess.max())
    # Documented contract: sorted index = #{thresholds <= w}, exactly.
    assert torch.equal(sidx, contract_index(w, lv))
    s = sort_levels(lv)
    assert torch.equal(values, s.values.gather(1, sidx))
    assert torch.equal(codes, s.perm.gather(1, sidx))


@given(q=dyadic_quantizers(), M=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       block=st.sampled_from(BLOCKS), path=st.sampled_from(PATHS))
@FAST
def test_nearest_is_idempotent(q, M, seed, block, path):
    r, c = q
    lv = level_table(r, c)
    w = make_weights(lv, M, seed)
    with patched(block, path):
        values, codes = nearest(w, lv)
        again, codes2 = nearest(values, lv)
        ste = snap_ste(values, lv)
    torch.testing.assert_close(again, values, rtol=0, atol=0)
    torch.testing.assert_close(ste, values, rtol=0, atol=0)
    assert torch.equal(lv.gather(1, codes2), values)


@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from(BITS), G=st.sampled_from([1, 3]),
       dtype=st.sampled_from(DTYPES), M=st.integers(1, 200))
@FAST
def test_idempotent_on_random_well_separated_levels(seed, bits, G, dtype, M):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(G, bits, generator=gen, dtype=dtype)
    c = torch.randn(G, generator=gen, dtype=dtype)
    lv = level_table(r, c)
    sv = lv.sort(1).values
    gaps = sv[:, 1:] - sv[:, :-1]
    eps = torch.finfo(dtype).eps
    # Non-dyadic levels: keep only tables whose distinct levels are many ulps apart (levels one
    # ulp apart are a known corner, see test_level_one_ulp_from_neighbour_snaps_to_itself).
    assume(bool(((gaps == 0) | (gaps > 64 * eps * sv.abs().amax())).all()))
    w = make_weights(lv, M, seed)
    values, _ = nearest(w, lv)
    torch.testing.assert_close(nearest(values, lv)[0], values, rtol=0, atol=0)
    torch.testing.assert_close(nearest(lv, lv)[0], lv, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_threshold_ties_go_up_hand_made(dtype, path):
    # 2 bits, step 1: levels -1.5, -0.5, 0.5, 1.5 (codes 0..3); thresholds -1, 0, 1.
    r, c = uniform_multipliers(torch.tensor([1.0], dtype=dtype), 2)
    lv = level_table(r, c)
    w = torch.tensor([[-1.0, 0.0, 1.0, -2.0, 2.0]], dtype=dtype)
    with patched(None, path):
        values, codes = nearest(w, lv)
    assert values.tolist() == [[-0.5, 0.5, 1.5, -1.5, 1.5]]
    assert codes.tolist() == [[1, 2, 3, 0, 3]]
    # One ulp below a threshold goes down, one ulp above goes up.
    below = torch.nextafter(w[:, :3], torch.full_like(w[:, :3], -math.inf))
    above = torch.nextafter(w[:, :3], torch.full_like(w[:, :3], math.inf))
    with patched(None, path):
        assert nearest(below, lv)[0].tolist() == [[-1.5, -0.5, 0.5]]
        assert nearest(above, lv)[0].tolist() == [[-0.5, 0.5, 1.5]]

    # Per channel, non-uniform, negative multiplier: group 0 levels {0, 0.25, -1, -0.75} ->
    # sorted -1, -0.75, 0, 0.25 with thresholds -0.875, -0.375, 0.125; group 1 levels
    # {1, 3, 1.5, 3.5} -> thresholds 1.25, 2.25, 3.25.
    r = torch.tensor([[0.25, -1.0], [2.0, 0.5]], dtype=dtype)
    c = torch.tensor([0.0, 1.0], dtype=dtype)
    lv = level_table(r, c)
    w = torch.tensor([[-0.875, -0.375, 0.125], [1.25, 2.25, 3.25]], dtype=dtype)
    with patched(7, path):
        values, codes = nearest(w, lv)
    assert values.tolist() == [[-0.75, 0.0, 0.25], [1.5, 3.0, 3.5]]
    assert codes.tolist() == [[3, 0, 1], [2, 1, 3]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("r_row, expect_lut", [
    ([0.5, 0.5], None),  # duplicate-sum levels {0, .5, .5, 1}
    ([0.5, -0.5, 1.0], None),  # negative multiplier, duplicates
    ([1.0, 0.0], None),  # zero multiplier: every level twice
    ([0.0, 0.0, 1.0], False),  # a level 4 times: coincident thresholds -> searchsorted
    ([1e-6, 1e-6, 1.0, 8.0], False),  # tiny threshold gaps: table too large -> searchsorted
    ([1e-3, 1e-3, 1.0, 8.0], True),  # small gaps that the (larger) table still resolves
    ([1e-3, 0.25, -2.0, 1e-3 + 2**-20], None),  # near-duplicate levels
])
@pytest.mark.parametrize("block", [None, 7])
def test_special_multipliers_agree_with_brute_force(dtype, G, r_row, expect_lut, block):
    r = torch.tensor(r_row, dtype=dtype).repeat(G, 1) * torch.arange(1, G + 1, dtype=dtype)[:, None]
    c = torch.linspace(-0.3, 0.3, G, dtype=dtype)
    lv = level_table(r, c)
    if expect_lut is not None:
        # Make sure the intended search path is the one exercised.
        assert uses_lut(lv) == expect_lut
    w = make_weights(lv, 257, seed=len(r_row) * 7 + G)
    with patched(block):
        values, codes = nearest(w, lv)
        sidx = nearest_sorted_index(w, lv)
        total = ideal_distance(w, lv)
    assert torch.equal(lv.gather(1, codes), values)
    bmin, _ = brute_min_dist(w, lv)
    assert bool(((w - values).abs() - bmin <= near_tol(w, lv)).all())
    assert torch.equal(sidx, contract_index(w, lv))
    torch.testing.assert_close(total, (bmin ** 2).sum())


@given(q=quantizers(), M=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       block=st.sampled_from(BLOCKS))
@SLOW
def test_lookup_table_and_searchsorted_agree(q, M, seed, block):
    r, c = q
    lv = level_table(r, c)
    w = make_weights(lv, M, seed)
    with patched(block, "auto"):
        a = nearest(w, lv)
    with patched(block, "searchsorted"):
        b = nearest(w, lv)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_uniform_grids_use_the_lookup_table():
    # Guards the two-path tests above: the common case must actually take the table path.
    for bits in BITS:
        for dtype in DTYPES:
            r, c = uniform_multipliers(torch.tensor([0.1, 2.0, 0.01], dtype=dtype), bits)
            assert uses_lut(level_table(r, c)), (bits, dtype)


@given(G=st.integers(1, 9), M=st.integers(1, 60), block=st.integers(1, 70))
@FAST
def test_blocks_tile_the_array_exactly_once(G, M, block):
    with patched(block):
        seen = torch.zeros(G, M, dtype=torch.int64)
        for r0, r1, c0, c1 in S.blocks(G, M):
            assert 0 <= r0 < r1 <= G and 0 <= c0 < c1 <= M
            seen[r0:r1, c0:c1] += 1
    assert bool((seen == 1).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [7, 64])
@pytest.mark.parametrize("G, M", [(1, 5), (1, 7), (1, 150), (5, 3), (5, 13), (4, 64), (3, 200)])
@pytest.mark.parametrize("path", PATHS)
def test_tiling_matches_unblocked(dtype, block, G, M, path):
    gen = torch.Generator().manual_seed(G * 1000 + M)
    bits = 5
    r = torch.randn(G, bits, generator=gen, dtype=dtype)
    c = torch.randn(G, generator=gen, dtype=dtype)
    lv = level_table(r, c)
    w = make_weights(lv, M, seed=M)
    g = torch.randn(G, M, generator=gen, dtype=dtype)
    ref_v, ref_c = nearest(w, lv)
    with patched(block, path):
        v, codes = nearest(w, lv)
        sidx = nearest_sorted_index(w, lv)
        wl, lvl = w.clone().requires_grad_(), lv.clone().requires_grad_()
        total = ideal_distance(wl, lvl)
        total.backward()
        ws, lvs = w.clone().requires_grad_(), lv.clone().requires_grad_()
        out = snap_ste(ws, lvs)
        out.backward(g)
    assert torch.equal(v, ref_v) and torch.equal(codes, ref_c)
    assert torch.equal(sidx, contract_index(w, lv))
    assert torch.equal(out, ref_v)
    d = w - ref_v
    torch.testing.assert_close(total, (d * d).sum())
    torch.testing.assert_close(wl.grad, 2 * d)
    torch.testing.assert_close(lvl.grad, torch.zeros_like(lv).scatter_add_(1, ref_c, -2 * d))
    torch.testing.assert_close(ws.grad, g, rtol=0, atol=0)
    torch.testing.assert_close(lvs.grad, torch.zeros_like(lv).scatter_add_(1, ref_c, g))


# ----------------------------------------------------------------- squared distance (eq. 6/7)


@given(q=quantizers(), M=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       block=st.sampled_from(BLOCKS), path=st.sampled_from(PATHS))
@FAST
def test_sq_distance_matches_brute_force(q, M, seed, block, path):
    r, c = q
    lv = level_table(r, c)
    w = make_weights(lv, M, seed)
    with patched(block, path):
        total = ideal_distance(w, lv)
    bmin, _ = brute_min_dist(w, lv)
    assert total.shape == () and total.dtype == w.dtype
    ref = (bmin.double() ** 2).sum().to(w.dtype)
    # Tolerance: the nearest choice may differ by ulps at a threshold (see near_tol).
    slack = float(((bmin.double() + near_tol(w, lv).double()) ** 2 - bmin.double() ** 2).sum())
    assert abs(float(total) - float(ref)) <= 1e-5 * float(ref) + slack + 1e-30


@given(q=dyadic_quantizers(), M=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       block=st.sampled_from(BLOCKS), path=st.sampled_from(PATHS))
@FAST
def test_sq_distance_zero_on_levels_positive_off(q, M, seed, block, path):
    r, c = q
    lv = level_table(r, c)
    G, Lc = lv.shape
    gen = torch.Generator().manual_seed(seed)
    on = lv.gather(1, torch.randint(0, Lc, (G, M), generator=gen))
    with patched(block, path):
        assert float(ideal_distance(on, lv)) == 0.0
        # Off the levels: midpoints of distinct adjacent levels (exact with dyadic levels), and
        # beyond the extreme levels.
        sv = lv.sort(1).values
        mids = (sv[:, 1:] + sv[:, :-1]) / 2
        distinct = sv[:, 1:] > sv[:, :-1]
        for g in range(G):
            off = torch.cat([mids[g][distinct[g]], sv[g, :1] - 0.5, sv[g, -1:] + 0.5])
            expect = float((brute_min_dist(off[None], lv[g:g + 1])[0] ** 2).sum())
            got = float(ideal_distance(off[None], lv[g:g + 1]))
            assert got > 0.0
            assert got == pytest.approx(expect, rel=1e-6)
        # One weight off the levels makes the total positive.
        w = on.clone()
        w[G - 1, M - 1] = sv[G - 1, -1] + 1.0
        assert float(ideal_distance(w, lv)) == pytest.approx(1.0)


@given(bits=st.sampled_from(BITS), G=st.sampled_from([1, 3]), M=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1), block=st.sampled_from([None, 4]),
       path=st.sampled_from(PATHS))
@settings(max_examples=10, deadline=None)
def test_sq_distance_gradcheck(bits, G, M, seed, block, path):
    # gradcheck perturbs every entry of w, r and c: keep the sizes small.
    dtype = torch.float64
    r, c, _ = distinct_levels(bits, G, dtype, seed)
    lv = level_table(r, c)
    w = weights_away_from_thresholds(lv, M, seed)
    w.requires_grad_()
    r.requires_grad_()
    c.requires_grad_()
    with patched(block, path):
        assert torch.autograd.gradcheck(
            lambda w_, r_, c_: ideal_distance(w_, level_table(r_, c_)),
            (w, r, c), eps=1e-6, atol=1e-6, rtol=1e-4)


@given(q=quantizers(), M=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       block=st.sampled_from(BLOCKS), path=st.sampled_from(PATHS),
       upstream=st.sampled_from([1.0, -2.5]))
@FAST
def test_sq_distance_gradients_are_eq7(q, M, seed, block, path, upstream):
    r, c = q
    N = r.shape[1]
    w = make_weights(level_table(r, c), M, seed)
    r = r.clone().requires_grad_()
    c = c.clone().requires_grad_()
    w = w.clone().requires_grad_()
    with patched(block, path):
        total = ideal_distance(w, level_table(r, c))
        (upstream * total).backward()
        q_vals, codes = nearest(w.detach(), level_table(r, c).detach())
    d = w.detach() - q_vals
    bits = codes_to_bits(codes, N).to(d.dtype)  # (G, M, N)
    torch.testing.assert_close(w.grad, upstream * 2 * d)
    # Sums of M terms: allow for the summation order (float32 cancellation).
    atol = 8 * M * torch.finfo(d.dtype).eps * float(d.abs().sum(1).max())
    torch.testing.assert_close(r.grad, upstream * -2 * (d[:, :, None] * bits).sum(1),
                               rtol=1e-5, atol=atol)
    torch.testing.assert_close(c.grad, upstream * -2 * d.sum(1), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sq_distance_grad_to_one_input_only(dtype):
    r, c = uniform_multipliers(torch.tensor([0.3, 0.7], dtype=dtype), 3)
    lv = level_table(r, c)
    w = make_weights(lv, 50, seed=3)
    q, codes = nearest(w, lv)
    wl = w.clone().requires_grad_()
    ideal_distance(wl, lv).backward()
    torch.testing.assert_close(wl.grad, 2 * (w - q))
    lvl = lv.clone().requires_grad_()
    ideal_distance(w, lvl).backward()
    torch.testing.assert_close(lvl.grad, torch.zeros_like(lv).scatter_add_(1, codes, -2 * (w - q)))


# ------------------------------------------------------------------------------- snap_ste


@given(q=quantizers(), M=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       block=st.sampled_from(BLOCKS), path=st.sampled_from(PATHS))
@FAST
def test_snap_ste_forward_and_gradients(q, M, seed, block, path):
    r, c = q
    N = r.shape[1]
    lv0 = level_table(r, c)
    w0 = make_weights(lv0, M, seed)
    g = torch.randn(w0.shape, generator=torch.Generator().manual_seed(seed), dtype=w0.dtype)
    w = w0.clone().requires_grad_()
    r = r.clone().requires_grad_()
    c = c.clone().requires_grad_()
    lv = level_table(r, c)
    lv.retain_grad()
    with patched(block, path):
        out = snap_ste(w, lv)
        values, codes = nearest(w0, lv0)
        out.backward(g)
    assert torch.equal(out.detach(), values)
    torch.testing.assert_close(w.grad, g, rtol=0, atol=0)  # straight through
    glv = torch.zeros_like(lv0).scatter_add_(1, codes, g)  # upstream grads summed per code
    torch.testing.assert_close(lv.grad, glv)
    torch.testing.assert_close(r.grad, glv @ bit_matrix(N, g.dtype))
    torch.testing.assert_close(c.grad, glv.sum(1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_snap_ste_grad_to_one_input_only(dtype):
    r, c = uniform_multipliers(torch.tensor([0.3], dtype=dtype), 4)
    lv = level_table(r, c)
    w = make_weights(lv, 40, seed=5)
    g = torch.linspace(-1, 1, 40, dtype=dtype)[None]
    _, codes = nearest(w, lv)
    wl = w.clone().requires_grad_()
    snap_ste(wl, lv).backward(g)
    torch.testing.assert_close(wl.grad, g, rtol=0, atol=0)
    lvl = lv.clone().requires_grad_()
    snap_ste(w, lvl).backward(g)
    torch.testing.assert_close(lvl.grad, torch.zeros_like(lv).scatter_add_(1, codes, g))


# ----------------------------------------------------------------------- bits and checks


@given(bits=st.sampled_from(BITS), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       seed=st.integers(0, 2**31 - 1))
@FAST
def test_codes_bits_round_trip(bits, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, tuple(shape), generator=gen)
    b = codes_to_bits(codes, bits)
    assert b.shape == (*shape, bits) and b.dtype == torch.uint8
    assert set(b.unique().tolist()) <= {0, 1}
    for i in range(bits):
        assert torch.equal(b[..., i].long(), (codes >> i) & 1)
    assert torch.equal(bits_to_codes(b), codes)
    planes = torch.randint(0, 2, (*shape, bits), generator=gen, dtype=torch.uint8)
    assert torch.equal(codes_to_bits(bits_to_codes(planes), bits), planes)


@pytest.mark.parametrize("bits", [*BITS, 3.0, torch.tensor(4)])
def test_check_bits_accepts(bits):
    out = check_bits(bits)
    assert type(out) is int and out == int(bits) and 1 <= out <= MAX_BITS


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True, False, float("nan"), torch.tensor(True)])
def test_check_bits_rejects(bits):
    with pytest.raises(ValueError, match="my_layer"):
        check_bits(bits, where="my_layer")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_check_finite(bad, dtype):
    w = torch.zeros(3, 4, dtype=dtype)
    assert check_finite(w, "fine") is None
    w[1, 2] = bad
    with pytest.raises(ValueError, match=r"conv1\.weight: 1 of 12 weights"):
        check_finite(w, "conv1.weight")


# ---------------------------------------------------------------------- scale / O(n) memory


@contextlib.contextmanager
def single_thread():
    # Only for the brute-force references: thousands of small ops, where intra-op threading
    # costs more than it saves on a busy machine. The code under test keeps the default.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _chunked_brute(w_row: torch.Tensor, lv_row: torch.Tensor, chunk: int = 4096):
    """Signed residual ``w - q`` to the nearest level, 4096 weights at a time (a 4096 x 2**N
    distance block per step, never n x 2**N)."""
    resid = torch.empty_like(w_row)
    with single_thread():
        for s in range(0, w_row.numel(), chunk):
            d = w_row[s:s + chunk, None] - lv_row[None, :]
            idx = d.abs().min(1, keepdim=True).indices
            resid[s:s + chunk] = d.gather(1, idx)[:, 0]
    return resid


def test_eight_bits_a_million_weights():
    # N = 8, G = 1, 1e6 weights: forward + backward go through without materialising
    # n x 256 (1 GB in float32), and agree with a chunked brute force.
    n, bits = 1_000_000, 8
    gen = torch.Generator().manual_seed(0)
    r, c = uniform_multipliers(torch.tensor([0.01]), bits)
    r = r * (1 + 0.1 * torch.rand(1, bits, generator=gen))  # non-uniform
    r[0, 3] = -r[0, 3]
    w = (torch.randn(1, n, generator=gen) * 0.6).requires_grad_()
    rr, cc = r.clone().requires_grad_(), c.clone().requires_grad_()
    lv = level_table(rr, cc)
    total = ideal_distance(w, lv)
    total.backward()
    lvd = lv.detach()
    q, codes = nearest(w.detach(), lvd)
    d = w.detach() - q

    resid = _chunked_brute(w.detach()[0], lvd[0])
    # Distances agree (codes may differ only at exact ties).
    torch.testing.assert_close(d[0].abs(), resid.abs(), rtol=0, atol=1e-6)
    assert float(total.detach()) == pytest.approx(float((resid.double() ** 2).sum()), rel=1e-4)
    torch.testing.assert_close(w.grad, 2 * d, rtol=0, atol=0)
    # eq. 7 for r and c, from per-code sums of the residual.
    per_code = torch.zeros(1 << bits, dtype=torch.float64).index_add_(0, codes[0], d[0].double())
    torch.testing.assert_close(rr.grad.double(), -2 * per_code[None] @ bit_matrix(bits, torch.float64),
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(cc.grad.double(), -2 * per_code.sum()[None], rtol=1e-4, atol=1e-3)


# Run in a fresh interpreter: its peak resident set (``ru_maxrss``) then belongs to this job
# alone (tracemalloc does not see torch's allocator). The address space is capped at its size
# after the setup plus n * 2**N bytes, so that an implementation which materialises the
# (G, M, 2**N) distances fails to allocate instead of taking the machine's memory.
_PEAK_CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from qfv_brevitas.core.distance import ideal_distance
from qfv_brevitas.core.levels import level_table, uniform_multipliers
from qfv_brevitas.core.search import nearest

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

n, N = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
out = {}
setups = {}
for G in (1, 256):
    r, c = uniform_multipliers(torch.full((G,), 0.4 / 2 ** N), N)
    r = r * (1 + 0.1 * torch.rand(r.shape, generator=g))  # non-uniform levels
    w = torch.randn(G, n // G, generator=g) * 0.05
    setups[G] = (w, level_table(r, c), w.clone().requires_grad_(),
                 level_table(r, c).requires_grad_())
# warm up (kernels, thread pools, allocator arenas) on a few weights, then take the baseline
for w, lv, _, _ in setups.values():
    nearest(w[:, :64], lv)
    few = w[:, :64].clone().requires_grad_()
    ideal_distance(few, lv.clone().requires_grad_()).backward()
base = peak()
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + n * 2 ** N, resource.RLIM_INFINITY))
# ru_maxrss only grows: measure in increasing order of need, each as (peak so far - base),
# an upper bound of the job's own extra memory.
for G in (1, 256):
    _, _, w, lv = setups[G]
    ideal_distance(w, lv).backward()
    w.grad = lv.grad = None
    out[f"regularizer G={G}"] = peak() - base
for G in (256, 1):
    res = nearest(*setups[G][:2])
    del res
    out[f"nearest G={G}"] = peak() - base
print(json.dumps(out))
"""


def test_nearest_and_regularizer_peak_memory_is_o_n_at_8_bits():
    """O(n) memory at N = 8 on 4M weights (16 MiB of float32), per tensor and per channel:
    the nearest-level search (values + int64 codes out) and the regularizer's forward and
    backward each stay below n * 2**N / 4 bytes (256 MiB; the full distance array is n * 2**N
    elements). Measured: search 20-24 bytes per weight (its outputs alone take 12), regularizer
    6-8 bytes per weight."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    n, N = 1 << 22, 8
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(n), str(N)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, \
        f"the memory probe failed (over n * 2**N bytes?):\n{proc.stderr[-3000:]}"
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(peaks) == {"regularizer G=1", "regularizer G=256", "nearest G=1",
                          "nearest G=256"}
    bound = n * 2 ** N // 4
    for what, extra in peaks.items():
        assert extra < bound, f"{what}: {extra / 2 ** 20:.0f} MiB >= {bound / 2 ** 20:.0f} MiB"


def test_per_channel_rows_longer_than_the_block():
    # Default BLOCK with M > BLOCK (ragged last tile): the per-row column tiling of the real
    # configuration, per channel.
    G, M, bits = 2, S.BLOCK + 1234, 8
    gen = torch.Generator().manual_seed(1)
    r, c = uniform_multipliers(torch.tensor([0.02, 0.005]), bits)
    lv = level_table(r, c)
    w = torch.randn(G, M, generator=gen) * torch.tensor([[2.0], [0.5]])
    q, codes = nearest(w, lv)
    assert torch.equal(lv.gather(1, codes), q)
    for g in range(G):
        resid = _chunked_brute(w[g], lv[g])
        torch.testing.assert_close((w[g] - q[g]).abs(), resid.abs(), rtol=0, atol=1e-6)


# ------------------------------------------------ regressions (overflow, 1-ulp levels)


@pytest.mark.parametrize("dtype, tiny", [(torch.float32, 1e-39), (torch.float64, 1e-320)])
def test_subnormal_gap_does_not_overflow(dtype, tiny):
    lv = torch.tensor([[0.0, tiny, 2 * tiny, 1.0]], dtype=dtype)
    w = torch.tensor([[0.3, 0.9, -1.0]], dtype=dtype)
    values, _ = nearest(w, lv)
    assert values.tolist() == [[lv[0, 2].item(), 1.0, 0.0]]  # 2*tiny as stored in dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_level_one_ulp_from_neighbour_snaps_to_itself(dtype):
    a = torch.tensor(1.0, dtype=dtype)
    lv = torch.stack([a, torch.nextafter(a, torch.tensor(2.0, dtype=dtype))])[None]
    w = torch.tensor([[1.0]], dtype=dtype)
    assert nearest(w, lv)[0].item() == 1.0
    assert float(ideal_distance(w, lv)) == 0.0
