"""Tests of ``qfv_brevitas.training.sam`` and its use in ``fit`` (``TrainConfig.sam_rho``):
FlatENN's sharpness-aware update, checked against a two-step update computed by hand with
``torch.autograd.grad`` on tiny models (plain, quantized with the regularizer, and with a fault
map attached: the fault-aware regularizer)."""
from __future__ import annotations

import copy

import brevitas.nn as qnn
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qfv_brevitas import FaultMap, attach_faults, quant_of, regularization_loss
from qfv_brevitas.core.quantizers import NMultWeightQuant
from qfv_brevitas.training.sam import SharpnessAware, sam_params
from qfv_brevitas.training.train import TrainConfig, fit

RHO, LR = 0.05, 0.1


def data(n=6, d=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g, dtype=torch.float64),
                         torch.randint(0, k, (n,), generator=g))


def hand_sam(model, ds, loss_of, params, rho=RHO, lr=LR):
    """One SAM step by hand: g at w, e = rho g / ||g||, g' at w + e, w <- w - lr g'."""
    x, y = ds.tensors
    w0 = [p.detach().clone() for p in params]
    g = torch.autograd.grad(loss_of(model, x, y), params)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(rho * gi / norm)
    g2 = torch.autograd.grad(loss_of(model, x, y), params)
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    return [w - lr * gi for w, gi in zip(w0, g2)], [w - lr * gi for w, gi in zip(w0, g)]


def cfg(**kw):
    # One full batch, one step; momentum's first step and a cosine schedule's first step are
    # plain SGD at lr; no weight decay; quant_lr 0 keeps r and c where they are.
    base = dict(epochs=1, batch_size=6, lr=LR, momentum=0.9, weight_decay=0.0, quant_lr=0.0,
                sam_rho=RHO, lambda_rise_epochs=1, lambda_start=100.0, lambda_end=100.0)
    base.update(kw)
    return TrainConfig(**base)


def test_matches_the_hand_computed_two_step_update_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ds = data()
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    want, plain_sgd = hand_sam(ref, ds, lambda m, x, y: nn.functional.cross_entropy(m(x), y),
                               params)
    fit(model, ds, None, cfg(), progress=False)
    for p, w, s in zip(model.parameters(), want, plain_sgd):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
    # ... and it is not the plain gradient step.
    assert any(not torch.allclose(w, s) for w, s in zip(want, plain_sgd))


@pytest.mark.parametrize("faults", [False, True])
def test_matches_the_hand_computed_update_with_the_regularizer(faults):
    """QAT (the paper's regularizer in the loss) and fault-aware training (the eq. 11
    regularizer with a fault map attached): the perturbation moves the weights and biases,
    never r and c."""
    torch.manual_seed(1)
    layer = qnn.QuantLinear(3, 2, bias=True, weight_quant=NMultWeightQuant,
                            weight_bit_width=3, dtype=torch.float64)
    model = nn.Sequential(layer)
    if faults:
        sa0 = torch.tensor([[1, 0, 4], [0, 2, 0]], dtype=torch.uint8)
        sa1 = torch.tensor([[0, 4, 0], [1, 0, 0]], dtype=torch.uint8)
        attach_faults(model, FaultMap({"0": (sa0, sa1)}, {"0": 3}))
    ds = data()
    ref = copy.deepcopy(model)
    rl = ref[0]

    def loss_of(m, x, y):
        return nn.functional.cross_entropy(m(x), y) + 100.0 * regularization_loss(m)

    want, _ = hand_sam(ref.train(), ds, loss_of, [rl.weight, rl.bias])
    r0 = quant_of(layer).r.detach().clone()
    fit(model, ds, None, cfg(), progress=False)
    torch.testing.assert_close(layer.weight.detach(), want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.detach(), want[1], rtol=1e-12, atol=1e-12)
    assert torch.equal(quant_of(layer).r.detach(), r0)


def test_sam_params_leave_out_quantizer_and_activation_scales():
    from qfv_brevitas import NMultConfig, quantize_model

    model = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                           NMultConfig(weight_bits=3, act_bits=4, first_last_bits=None))
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = {names[id(p)] for p in sam_params(model)}
    assert chosen == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert any("weight_quant" in n for n in names.values())
    assert any("input_quant" in n for n in names.values())


def test_batchnorm_statistics_are_updated_once_per_step():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    ds = data(n=8)
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        ref(ds.tensors[0])  # one update at the starting weights
    fit(model, ds, None, cfg(batch_size=8), progress=False)
    bn, rbn = model[1], ref[1]
    # (fit shuffles the batch: the sums differ in order only)
    torch.testing.assert_close(bn.running_mean, rbn.running_mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(bn.running_var, rbn.running_var, rtol=1e-12, atol=1e-15)
    assert int(bn.num_batches_tracked) == 1


def test_restore_is_exact_and_bad_radius_is_refused():
    lin = nn.Linear(5, 3)
    before = [p.detach().clone() for p in lin.parameters()]
    lin(torch.randn(4, 5)).pow(2).sum().backward()
    sam = SharpnessAware(lin, 0.3)
    norm = sam.ascend()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(lin.parameters(), before)])
    assert float(moved.norm()) == pytest.approx(0.3, rel=1e-5) and norm > 0
    with pytest.raises(RuntimeError, match="twice"):
        sam.ascend()
    sam.restore()
    assert all(torch.equal(p, b) for p, b in zip(lin.parameters(), before))
    for bad in (0, -0.1, float("inf"), True):
        with pytest.raises(ValueError, match="rho must be a finite number > 0"):
            SharpnessAware(lin, bad)
    with pytest.raises(ValueError, match="sam_rho must be a finite number >= 0"):
        TrainConfig(sam_rho=-0.05)
