"""torch.compile and torch.export of N-multiplier models (issue 21, part 5).

The compiled kernels are torch custom ops (``qfv::nearest``, ``qfv::aware_fused``, ...) with
fake implementations and registered autograd, and a quantized model's forward and training
step hold no host sync and no data-dependent Python branch: dynamo traces them whole (0 graph
breaks), ``torch.export`` runs and matches eager exactly, and compiled steps compute what eager
ones do. The ops are checked on both their implementations (compiled kernel and torch path).
"""
from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qfv_brevitas import (FaultModel, NMultConfig, attach_faults, quant_of, quantize_model,
                          regularization_loss, sample_fault_map, set_deploy_mapping)
from qfv_brevitas.core import device as D
from qfv_brevitas.core import kernels as K
from qfv_brevitas.core import levels as L
from qfv_brevitas.core import search as S
from qfv_brevitas.core.quantizers import NMultWeightPerChannelQuant, NMultWeightQuant

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 2, 3, 4])


def brevitas_cnn(per_channel: bool = False, mode: str = "paper") -> nn.Module:
    """A small CNN of Brevitas layers with N-multiplier weights, as a user writes it."""
    torch.manual_seed(0)
    wq = NMultWeightPerChannelQuant if per_channel else NMultWeightQuant
    kw = dict(weight_quant=wq, weight_bit_width=3, weight_forward_mode=mode)
    return nn.Sequential(qnn.QuantConv2d(1, 4, 3, **kw), nn.ReLU(), nn.Flatten(),
                         qnn.QuantLinear(4 * 6 * 6, 10, **kw))


def converted_cnn(act_bits=None, faults: bool = False, mode: str = "paper") -> nn.Module:
    """A plain CNN through ``quantize_model`` (per channel); optionally on a chip with stuck
    bits and the aware mapping."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    q = quantize_model(base, NMultConfig(weight_bits=3, act_bits=act_bits, per_channel=True,
                                         mode=mode), example_input=X)
    if faults:
        attach_faults(q, sample_fault_map(q, FaultModel(rate=0.2, seed=1)))
        set_deploy_mapping(q, "aware")
    return q


def graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    out = torch._dynamo.explain(fn)(*args)
    assert out.graph_count >= 1
    return out.graph_break_count


def train_step(model: nn.Module, lam: float = 100.0):
    """One training step's gradient: task loss + lambda * regularizer, backward."""
    def step(x, y):
        loss = F.cross_entropy(model(x), y) + lam * regularization_loss(model)
        loss.backward()
        return loss.detach()
    return step


def grads(model: nn.Module):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- 0 graph breaks ---------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel,mode,train", [
    (False, "paper", False), (True, "paper", False), (False, "paper", True),
    (False, "ste", True), (True, "both", True)])
def test_forward_has_no_graph_break(per_channel, mode, train):
    m = brevitas_cnn(per_channel, mode).train(train)
    assert graph_breaks(m, X) == 0


@pytest.mark.parametrize("train", [False, True])
def test_forward_on_a_chip_with_stuck_bits_and_activation_quant_has_no_graph_break(train):
    m = converted_cnn(act_bits=4, faults=True, mode="both").train(train)
    assert graph_breaks(m, X) == 0


@pytest.mark.parametrize("make", [lambda: brevitas_cnn(False, "paper"),
                                  lambda: brevitas_cnn(True, "both"),
                                  lambda: converted_cnn(faults=True)],
                         ids=["per-tensor-paper", "per-channel-both", "stuck-bits"])
def test_training_step_with_the_regularizer_has_no_graph_break(make):
    """Forward, loss + lambda * regularization_loss and backward in one graph (dynamo traces
    ``backward()`` with ``trace_autograd_ops``); also the loss alone, without that option."""
    m = make().train()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        assert graph_breaks(train_step(m), X, Y) == 0
    assert graph_breaks(lambda x, y: F.cross_entropy(m(x), y) + regularization_loss(m), X, Y) == 0


# -- torch.export and torch.compile match eager --------------------------------------------

@pytest.mark.parametrize("make", [lambda: brevitas_cnn(False), lambda: brevitas_cnn(True),
                                  lambda: converted_cnn(faults=True)],
                         ids=["per-tensor", "per-channel", "stuck-bits-aware"])
def test_export_matches_eager_exactly(make, kernel_backend):
    m = make().eval()
    ep = torch.export.export(m, (X,))
    # The search is one node of the exported program (not baked into constants).
    targets = {str(n.target) for g in ep.graph_module.modules()
               if isinstance(g, torch.fx.GraphModule) for n in g.graph.nodes}
    assert any(t.startswith("qfv.") for t in targets), sorted(targets)
    with torch.no_grad():
        assert torch.equal(ep.module()(X), m(X))


def test_compiled_forward_matches_eager():
    """Inductor: the quantized weights bit for bit; the outputs up to inductor's own float
    reordering in the float layers."""
    m = converted_cnn(faults=True).eval()
    tq = quant_of(m[0])
    torch._dynamo.reset()
    with torch.no_grad():
        w = m[0].weight
        assert torch.equal(torch.compile(tq)(w)[0], tq(w)[0])
        assert torch.allclose(torch.compile(m)(X), m(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: brevitas_cnn(True, "both"),
                                  lambda: converted_cnn(faults=True)],
                         ids=["per-channel-both", "stuck-bits"])
def test_compiled_training_step_matches_eager(make):
    """The ops' registered autograd inside a compiled backward: every gradient (weights,
    multipliers, offsets) as in eager."""
    eager, comp = make().train(), make().train()
    comp.load_state_dict(eager.state_dict())
    want = train_step(eager)(X, Y)
    torch._dynamo.reset()
    got = torch.compile(train_step(comp), backend="aot_eager")(X, Y)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    ge, gc = grads(eager), grads(comp)
    assert ge.keys() == gc.keys() and any(".r" in n for n in ge)
    for n in ge:
        assert torch.allclose(gc[n], ge[n], rtol=1e-5, atol=1e-7), n


# -- the ops themselves -------------------------------------------------------------------

def _op_cases():
    g = torch.Generator().manual_seed(3)
    G, M, N = 3, 50, 3
    w = torch.randn(G, M, generator=g, dtype=torch.float64)
    r, c = L.uniform_multipliers(torch.full((G,), 0.4, dtype=torch.float64), N)
    values, thr, _ = S.sorted_for_search(L.level_table(r, c), w.dtype)
    sa0 = (torch.rand(G, M, generator=g) < 0.3).to(torch.uint8)
    sa1 = ((torch.rand(G, M, generator=g) < 0.3).to(torch.uint8) << 1) & ~sa0
    lrs = 1 + 0.1 * torch.randn(G, M, N, generator=g, dtype=torch.float64)
    idx = S.nearest_op(w, thr, values, False)[1]
    forced = D.force_codes(D.aware_codes_raw(w, r, c, sa0, sa1), sa0, sa1)
    gr = torch.tensor(0.7, dtype=w.dtype)
    req = lambda t: t.clone().requires_grad_()  # noqa: E731
    return [
        (S.nearest_op, (req(w), thr, req(values), True)),
        (S.nearest_op, (w, thr, values, False)),
        (S.nearest_backward_op, (gr, w, idx, values, True, True)),
        (D.aware_fused_op, (req(w), req(r), req(c), sa0, sa1, None, None, True, True, True,
                            "w")),
        (D.aware_fused_op, (w, r, c, None, None, lrs, None, True, False, False, "")),
        (D.deployed_op, (req(w), req(r), req(c), forced, lrs, None)),
        (D.deployed_backward_op, (gr, w, r, c, forced, None, None, True, True, False)),
        (D.scale_op, (w, gr)),
    ]


def test_ops_pass_opcheck(kernel_backend):
    """Schemas (no mutation, no aliasing), fake implementations, registered autograd and
    AOT dispatch with dynamic shapes of every op, on the kernel and on the torch path."""
    for op, args in _op_cases():
        torch.library.opcheck(op, args)


def test_an_op_runs_the_kernel_or_its_torch_fallback(kernel_backend):
    """One op, two implementations: the compiled kernel where it is enabled, else (CUDA,
    not built, QFV_KERNELS=torch, torch_fallback) the torch path inside the same op; the
    same search either way."""
    w = torch.randn(2, 300, generator=torch.Generator().manual_seed(1))
    values, thr, _ = S.sorted_for_search(L.level_table(*L.uniform_multipliers(
        torch.tensor([0.3, 0.5]), 4)), w.dtype)
    calls = []
    real = K.nearest
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "nearest", lambda *a: calls.append(1) or real(*a))
        tot, idx = S.nearest_op(w, thr, values, True)
        assert calls == ([1] if kernel_backend == "kernels" else [])
        with K.torch_fallback():
            tot_t, idx_t = S.nearest_op(w, thr, values, True)
        assert len(calls) == (kernel_backend == "kernels")
    assert torch.equal(idx, idx_t) and torch.allclose(tot, tot_t, rtol=1e-6)
    assert torch.equal(idx.long(), S.nearest_sorted_index(w, L.level_table(
        *L.uniform_multipliers(torch.tensor([0.3, 0.5]), 4))))


# -- finiteness: clear errors in eager ----------------------------------------------------------

def test_nan_weights_still_raise_a_clear_error_in_eager(kernel_backend):
    m = brevitas_cnn(False, "paper")
    with torch.no_grad():
        m[3].weight[0, 5] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 1440 weights are NaN or infinite"):
        m.eval()(X)
    with pytest.raises(ValueError, match=r"1 of 1440 weights are NaN or infinite"):
        regularization_loss(m.train())
    f = converted_cnn(faults=True)
    with torch.no_grad():
        f[5].weight[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"weights of .*1 of 640 weights are NaN"):
        regularization_loss(f)


# -- the integer view (weights as Brevitas IntQuantTensors) ------------------------------------

def _int_view_cnn(weight_quant: dict, quant_tensors: bool) -> nn.Module:
    """A small CNN; ``quant_tensors``: FINN-style quant tensors between layers and Int32Bias."""
    from brevitas.quant import Int32Bias

    torch.manual_seed(0)
    qt = dict(return_quant_tensor=quant_tensors)
    b = dict(bias=quant_tensors, **(dict(bias_quant=Int32Bias) if quant_tensors else {}))
    m = nn.Sequential(qnn.QuantIdentity(**qt), qnn.QuantConv2d(1, 4, 3, **qt, **b, **weight_quant),
                      qnn.QuantReLU(**qt), nn.Flatten(),
                      qnn.QuantLinear(4 * 6 * 6, 10, **b, **weight_quant)).eval()
    m(X)  # activation statistics, and the integer view of layers that need it
    return m


INT_VIEW = dict(weight_quant=NMultWeightQuant, weight_bit_width=3, weight_frac_bits=5)


def test_integer_view_compiles_and_exports_exactly():
    m = _int_view_cnn(INT_VIEW, quant_tensors=False)
    assert all(quant_of(l).frac_bits == 5 for l in (m[1], m[4]))
    assert graph_breaks(m, X) == 0
    ep = torch.export.export(m, (X,))
    assert torch.equal(ep.module()(X), m(X))


def test_quant_tensors_between_layers_break_the_graph_as_in_stock_brevitas():
    """Brevitas' own IntQuantTensor propagation reads tensor values in Python (its ``signed``
    and scale checks), so dynamo breaks the graph there and torch.export refuses it: with the
    integer view exactly as often as with Brevitas' stock uniform quantizer (a documented
    limitation of Brevitas, not of these quantizers)."""
    from brevitas.quant import Int8WeightPerTensorFloat

    stock = _int_view_cnn(dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=3), True)
    ours = _int_view_cnn(INT_VIEW, True)
    n_stock = graph_breaks(stock, X)
    assert n_stock > 0 and graph_breaks(ours, X) == n_stock
    for m in (stock, ours):
        with pytest.raises(Exception):
            torch.export.export(m, (X,))
