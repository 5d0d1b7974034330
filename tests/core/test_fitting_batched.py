"""The batched per-group search of ``fit_multipliers`` (many groups, e.g. per output channel
of a language model): close to the exhaustive search, never worse than the best uniform grid,
and a group's result independent of the chunking and of the other groups in the call.

The exhaustive search (``batched=False``, the search of every smaller call) is the reference;
the ratios asserted are those measured (``BENCHMARKS.md``, ``bench_fit.py --part batched``)
with some room, and far from what a broken search gives (a search from the worst screened
starts or without its least-squares steps ends several percent to several times worse).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qfv_brevitas.core import fitting as F
from qfv_brevitas.core.levels import level_table
from qfv_brevitas.util.errors import QfvError


def heavy(G: int, M: int, seed: int, dist: str = "t") -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, size=(G, M)) if dist == "t" else rng.laplace(size=(G, M))
    return torch.from_numpy(0.02 * w).float()


def fields(f: F.FitResult):
    return (f.r, f.c, f.error) + (() if f.uniform is None else tuple(f.uniform))


def assert_same(a: F.FitResult, b: F.FitResult) -> None:
    for x, y in zip(fields(a), fields(b)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("dist", ["t", "laplace"])
def test_batched_search_is_close_to_the_exhaustive_one(bits, dist):
    w = heavy(64, 300, seed=bits, dist=dist)
    ref = F.fit_multipliers(w, bits, batched=False)
    new = F.fit_multipliers(w, bits, batched=True)
    ratio = new.error / ref.error
    assert float(ratio.mean()) < 1.02
    assert float(ratio.max()) < 1.25
    # never worse than its own best uniform grid, and that grid near the exhaustive one's
    # (measured up to 2.5% worse in mean on these small samples)
    assert bool((new.error <= new.uniform.error).all())
    assert float((new.uniform.error / ref.uniform.error).mean()) < 1.05


def test_batched_levels_beat_uniform_on_heavy_tailed_channels():
    # measured: 0.72 of the best uniform grid's error per channel at N = 3 (Student-t)
    w = heavy(160, 768, seed=0)
    f = F.fit_multipliers(w, 3)
    assert float((f.error / f.uniform.error).mean()) < 0.78
    assert float((f.error < f.uniform.error).double().mean()) > 0.95


@pytest.mark.parametrize("chunk", [1, 5, 16, 4096])
def test_chunking_gives_identical_results(chunk):
    w = heavy(16, 120, seed=3)
    whole = F.fit_multipliers(w, 3, batched=True, chunk=4096)
    assert_same(F.fit_multipliers(w, 3, batched=True, chunk=chunk), whole)


@pytest.mark.parametrize("G, M, bits, chunk", [(16, 20, 2, 1), (48, 300, 3, 4)])
def test_chunking_gives_identical_results_few_weights_and_many_groups(G, M, bits, chunk):
    # few weights: the dense look at uniform grids is denser than its floor, so its size
    # must not follow the chunk's; many groups: a finished start must stay finished while
    # other groups of its chunk go on
    w = heavy(G, M, seed=G)
    assert_same(F.fit_multipliers(w, bits, batched=True, chunk=chunk),
                F.fit_multipliers(w, bits, batched=True, chunk=G))


def test_a_groups_result_does_not_depend_on_the_other_groups():
    w = heavy(24, 200, seed=4)
    whole = F.fit_multipliers(w, 2, batched=True)
    part = F.fit_multipliers(w[5:9], 2, batched=True)
    for x, y in zip(fields(part), fields(whole)):
        assert torch.equal(x, y[5:9])


def test_batched_is_deterministic_and_the_default_from_128_groups():
    w = heavy(128, 40, seed=5)
    a = F.fit_multipliers(w, 3)
    assert_same(a, F.fit_multipliers(w, 3, batched=True))
    assert_same(a, F.fit_multipliers(w, 3, batched=True))
    small = w[:127]
    assert_same(F.fit_multipliers(small, 3), F.fit_multipliers(small, 3, batched=False))


def test_chunked_warm_refit_keeps_each_groups_own_start():
    w = heavy(12, 100, seed=6)
    start = F.fit_multipliers(w, 3, batched=False)
    # a start a bit off the fitted levels, different per group
    r0 = start.r * (1.0 + 0.1 * torch.arange(12.0)[:, None] / 12)
    ref = F.fit_multipliers(w, 3, init=(r0, start.c), search=False)
    got = F.fit_multipliers(w, 3, init=(r0, start.c), search=False, batched=True, chunk=5)
    assert got.uniform is None
    init_err = F.grid_error(w, level_table(r0, start.c))
    assert bool((got.error <= init_err).all())
    assert torch.allclose(got.error, ref.error, rtol=1e-3)


@pytest.mark.parametrize("chunk", [0, -1, True, 2.0])
def test_bad_chunk_is_refused(chunk):
    with pytest.raises(QfvError, match="chunk"):
        F.fit_multipliers(torch.randn(4, 10), 2, batched=True, chunk=chunk)
