"""device.py: forced codes, deployed values, aware (nearest deployable) codes, and the
device-aware distance against brute force over all 2**N codes."""
import itertools

import pytest
import torch

from qfv_brevitas.core import kernels as K
from qfv_brevitas.core import levels as L
from qfv_brevitas.core import search as S
from qfv_brevitas.core.device import aware_codes, deployed_values, force_codes, naive_codes
from qfv_brevitas.core.distance import chip_distance, ideal_distance


def deployed_sq_distance(w, r, c, codes, sa0=None, sa1=None, lrs=None, hrs=None):
    """The squared device distance for given programmed codes."""
    return chip_distance(w, r, c, sa0, sa1, lrs, hrs, codes=codes)

pytestmark = pytest.mark.usefixtures("kernel_backend")


def _setup(G, N, faults, var, hrs, seed=0, M=50):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(G, M, generator=g, dtype=torch.float64) * 0.1
    r, c = L.uniform_multipliers(L.lsq_step_init(w, N), N)
    r = r * (1 + 0.2 * torch.rand(r.shape, generator=g, dtype=torch.float64))
    sa0 = sa1 = lrs = hr = None
    if faults:
        stuck = torch.rand(G, M, N, generator=g) < 0.3
        one = torch.rand(G, M, N, generator=g) < 0.5
        sa0 = L.bits_to_codes((stuck & ~one).to(torch.uint8)).to(torch.uint8)
        sa1 = L.bits_to_codes((stuck & one).to(torch.uint8)).to(torch.uint8)
    if var:
        lrs = 1 + 0.2 * torch.randn(G, M, N, generator=g, dtype=torch.float64)
        if hrs:
            hr = 0.05 * (1 + 0.2 * torch.randn(G, M, N, generator=g, dtype=torch.float64))
    return w, r, c, sa0, sa1, lrs, hr


def _brute_values(G, M, N, r, c, sa0, sa1, lrs, hr):
    """(G, M, 2**N) deployed value of every code, computed bit by bit from the definition."""
    out = torch.empty(G, M, 1 << N, dtype=torch.float64)
    for k in range(1 << N):
        code = torch.full((G, M), k)
        if sa0 is not None:
            code = (code & ~sa0.long()) | sa1.long()
        v = c[:, None].expand(G, M).clone()
        for i in range(N):
            b = ((code >> i) & 1).double()
            on = b * (lrs[..., i] if lrs is not None else 1.0)
            off = (1 - b) * (hr[..., i] if hr is not None else 0.0)
            v = v + r[:, i, None] * (on + off)
        out[..., k] = v
    return out


CASES = [(G, N, f, v, h) for G, N, f, v, h in itertools.product((1, 3), (1, 3, 4, 8),
                                                               (False, True), (False, True),
                                                               (False, True)) if v or not h]


def test_force_codes_hand_made():
    codes = torch.tensor([0b0000, 0b1111, 0b1010, 0b0101])
    sa0 = torch.tensor([0b0001, 0b0011, 0b0000, 0b0100], dtype=torch.uint8)
    sa1 = torch.tensor([0b1000, 0b0000, 0b0001, 0b0000], dtype=torch.uint8)
    assert force_codes(codes, sa0, sa1).tolist() == [0b1000, 0b1100, 0b1011, 0b0001]
    assert force_codes(codes, None, None) is codes


@pytest.mark.parametrize("G,N,faults,var,hrs", CASES)
def test_deployed_values_and_aware_codes_match_brute_force(G, N, faults, var, hrs):
    w, r, c, sa0, sa1, lrs, hr = _setup(G, N, faults, var, hrs)
    M = w.shape[1]
    table = _brute_values(G, M, N, r, c, sa0, sa1, lrs, hr)
    codes = torch.randint(0, 1 << N, (G, M))
    got = deployed_values(codes, r, c, sa0, sa1, lrs, hr)
    assert torch.allclose(got, table.gather(2, codes[..., None])[..., 0], atol=1e-12, rtol=0)
    aware = aware_codes(w, r, c, sa0, sa1, lrs, hr)
    best = (w[..., None] - table).abs().min(-1).values
    dist = (w - deployed_values(aware, r, c, sa0, sa1, lrs, hr)).abs()
    assert torch.allclose(dist, best, atol=1e-12, rtol=0)
    if faults:
        # Aware codes are reachable: the device stores exactly what was programmed.
        assert torch.equal(force_codes(aware, sa0, sa1), aware)


@pytest.mark.parametrize("G,N,faults,var,hrs", [c for c in CASES if c[1] <= 4])
def test_deployed_distance_gradients(G, N, faults, var, hrs):
    w, r, c, sa0, sa1, lrs, hr = _setup(G, N, faults, var, hrs, seed=1, M=20)
    codes = aware_codes(w, r, c, sa0, sa1, lrs, hr)
    args = [t.clone().requires_grad_() for t in (w, r, c)]
    f = lambda w_, r_, c_: deployed_sq_distance(w_, r_, c_, codes, sa0, sa1, lrs, hr)
    assert torch.autograd.gradcheck(f, args)
    ref = ((args[0] - deployed_values(codes, args[1], args[2], sa0, sa1, lrs, hr)) ** 2).sum()
    assert torch.allclose(f(*args), ref, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(f(*args), args), torch.autograd.grad(ref, args)):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_ideal_device_changes_nothing():
    w, r, c, *_ = _setup(2, 4, False, False, False)
    G, M = w.shape
    zero = torch.zeros(G, M, dtype=torch.uint8)
    ones = torch.ones(G, M, 4, dtype=torch.float64)
    zeros = torch.zeros(G, M, 4, dtype=torch.float64)
    ideal = naive_codes(w, r, c)
    for args in [(zero, zero, None, None), (None, None, ones, None), (zero, zero, ones, zeros)]:
        assert torch.equal(aware_codes(w, r, c, *args), ideal)
        assert torch.equal(deployed_values(ideal, r, c, *args),
                           L.level_table(r, c).gather(1, ideal))
        assert deployed_sq_distance(w, r, c, ideal, *args) == ideal_distance(
            w, L.level_table(r, c))


def test_deepcopy_keeps_maps_with_their_copy():
    """A copied model deploys with its own maps, the original stays fault-free."""
    import copy

    from torch import nn

    from qfv_brevitas import NMultConfig, quant_of, quantize_model

    torch.manual_seed(0)
    m = quantize_model(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
                       NMultConfig(weight_bits=4, act_bits=None, first_last_bits=None)).eval()
    x = torch.randn(5, 8)
    clean = m(x)
    c = copy.deepcopy(m)
    layer = c[0]
    sa1 = torch.full_like(layer.weight, 0b1000, dtype=torch.uint8)
    layer.weight_quant.chip.set_faults(torch.zeros_like(sa1), sa1)
    assert torch.equal(m(x), clean)
    assert not torch.equal(c(x), clean)
    top = quant_of(layer).levels()[0, 8:].detach()
    assert bool(torch.isin(layer.quant_weight(), top).all())  # MSB forced to 1 everywhere


# -- the regularizer's one-pass form: aware_sq_distance ------------------------------------------

def _grads(fn, w, r, c):
    args = [t.clone().requires_grad_() for t in (w, r, c)]
    out = fn(*args)
    return (out.detach(), *torch.autograd.grad(out, args))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("G,N,faults,var,hrs", CASES)
def test_aware_sq_distance_is_the_distance_of_the_aware_codes(G, N, faults, var, hrs, dtype):
    """Search and distance in one call = the distance of ``aware_codes`` (value, and gradients
    to w, r, c with the codes held fixed), on this backend and against the pure-torch one."""
    w, r, c, sa0, sa1, lrs, hr = _setup(G, N, faults, var, hrs, seed=2, M=70)
    w, r, c = w.to(dtype), r.to(dtype), c.to(dtype)
    lrs = None if lrs is None else lrs.to(dtype)
    hr = None if hr is None else hr.to(dtype)
    codes = aware_codes(w, r, c, sa0, sa1, lrs, hr)
    got = _grads(lambda *a: chip_distance(*a, sa0, sa1, lrs, hr), w, r, c)
    ref = _grads(lambda *a: deployed_sq_distance(*a, codes, sa0, sa1, lrs, hr), w, r, c)
    with K.torch_fallback():
        torch_ref = _grads(lambda *a: chip_distance(*a, sa0, sa1, lrs, hr), w, r, c)
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-7)
    for a, b, t in zip(got, ref, torch_ref):
        assert a.dtype == dtype
        assert torch.allclose(a, b, **tol)
        assert torch.allclose(a, t, **tol)
    # d/dw = 2 (w - v) exactly: the deployed values are computed by the same formula.
    assert torch.equal(got[1], ref[1])
    # The device really matters here (else this test would not see a wrong search).
    if faults or var:
        assert float(got[0]) > 1.01 * float(ideal_distance(w, L.level_table(r, c)))


def test_aware_sq_distance_across_chunks_and_short_rows():
    """Rows longer than a kernel chunk (and not a multiple of its sub-blocks), float32: the
    same sum and gradients as the pure-torch path."""
    w, r, c, sa0, sa1, lrs, hr = _setup(2, 4, True, True, True, seed=5, M=2 * 16384 + 37)
    w, r, c, lrs, hr = (t.float() for t in (w, r, c, lrs, hr))
    got = _grads(lambda *a: chip_distance(*a, sa0, sa1, lrs, hr), w, r, c)
    with K.torch_fallback():
        ref = _grads(lambda *a: chip_distance(*a, sa0, sa1, lrs, hr), w, r, c)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # Codes agree but for float near-ties (the two paths round candidate values differently).
    with K.torch_fallback():
        ref_codes = aware_codes(w, r, c, sa0, sa1, lrs, hr)
    assert (aware_codes(w, r, c, sa0, sa1, lrs, hr) != ref_codes).float().mean() < 1e-3


@pytest.mark.parametrize("faults,var", [(True, False), (False, True)])
def test_aware_sq_distance_rejects_non_finite_weights_and_allows_a_second_backward(faults, var):
    w, r, c, sa0, sa1, lrs, hr = _setup(2, 3, faults, var, False, seed=3)
    bad = w.clone()
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"weights of fc: 1 of 100 weights are NaN"):
        chip_distance(bad, r, c, sa0, sa1, lrs, hr, where="weights of fc")
    wg = w.clone().requires_grad_()
    out = chip_distance(wg, r, c, sa0, sa1, lrs, hr)
    g1 = torch.autograd.grad(out, wg, retain_graph=True)[0]
    g2 = torch.autograd.grad(out, wg)[0]
    assert torch.equal(g1, g2) and bool(g1.abs().sum() > 0)


def test_aware_codes_ties_go_to_the_lowest_code():
    """Levels -0.75, -0.25, 0.25, 0.75 (codes 0..3), all sums exact in binary. Among equally
    near deployable values the lowest code wins (torch's argmin over codes) for a weight with
    a stuck bit and under variability (here ideal-valued cell factors); a weight without stuck
    bits on a faulty chip keeps its nearest ideal level, whose ties go up (thresholds)."""
    r, c = torch.tensor([[0.5, 1.0]], dtype=torch.float64), torch.tensor([-0.75],
                                                                          dtype=torch.float64)
    w = torch.tensor([[0.0, -0.25, 0.5, 0.25]], dtype=torch.float64)
    sa0 = torch.tensor([[0, 1, 0, 0]], dtype=torch.uint8)  # -0.25: -0.75 or 0.25, both 0.5 off
    sa1 = torch.tensor([[0, 0, 2, 0]], dtype=torch.uint8)  # 0.5: 0.25 or 0.75, both 0.25 off
    assert aware_codes(w, r, c, sa0, sa1).tolist() == [[2, 0, 2, 2]]
    ones = torch.ones(1, 4, 2, dtype=torch.float64)
    assert aware_codes(w, r, c, None, None, ones).tolist() == [[1, 1, 2, 2]]
    assert aware_codes(w, r, c, sa0, sa1, ones).tolist() == [[1, 0, 2, 2]]
    # 0.0 ties -0.25 / 0.25, 0.5 ties 0.25 / 0.75: 2 * 0.25^2, plus the stuck weights' 0.5^2
    assert float(chip_distance(w, r, c, sa0, sa1, ones)) == 0.0625 + 0.25 + 0.0625
