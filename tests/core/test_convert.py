"""Tests of ``qfv_brevitas.core.convert``: giving plain torch models and existing Brevitas models
N-multiplier weight quantizers.

Plain models: the CIFAR ResNet-18 (width 16 for speed, plus one structural check of the full
width-64 model) and the VGG of ``qfv_brevitas.zoo.models``. Brevitas models: the FINN examples
``brevitas_examples.bnn_pynq`` LFC 1w1a and CNV 1w2a, built with ``pretrained=False`` under a
guard that fails on any network access.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import brevitas.nn as qnn
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
from brevitas.quant import Int8WeightPerTensorFloat

from qfv_brevitas import (NMultConfig, nmult_layers, quant_of, quantize_model,
                          regularization_loss, swap_weight_quant)
from qfv_brevitas.core.convert import ConversionError, set_forward_mode
from qfv_brevitas.core.quantizers import NMultWeightQuantProxy
from qfv_brevitas.core.convert import unsigned_input_layers
from qfv_brevitas.zoo.models import resnet18_cifar, vgg_cifar
from qfv_brevitas.training.train import TrainConfig, param_groups

# LSQ's start: these tests check the conversion and LSQ's grid (fitted levels: test_ptq.py).
CFG = NMultConfig(weight_bits=3, act_bits=4, init="lsq")
_COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# A VGG small enough to train in a test; the default-width VGG is checked structurally.
SMALL_VGG = (8, "M", 16, "M", 16, 16, "M", 32, "M")


# -- helpers --------------------------------------------------------------------------------

def float_compute_layers(model: nn.Module):
    """``{name: module}`` of the plain (not Brevitas) Conv/Linear layers of ``model``."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, _COMPUTE) and not isinstance(m, QuantWeightBiasInputOutputLayer)}


def execution_order(model: nn.Module, x: torch.Tensor):
    """Names of the compute layers in the order a forward pass calls them, and whether each
    one's input was non-negative, measured on a copy of ``model``."""
    model = copy.deepcopy(model)
    order, nonneg = [], {}
    mods = float_compute_layers(model)

    def hook(n):
        def f(mod, inp):
            order.append(n)
            nonneg[n] = nonneg.get(n, True) and bool((inp[0] >= 0).all())
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return list(dict.fromkeys(order)), nonneg


def lsq_levels(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The symmetric uniform grid with LSQ's step ``2 mean|w| / sqrt(Q_P)`` (independent of
    the library's code), ascending."""
    qp = max(2 ** (bits - 1) - 1, 1)
    step = 2 * w.detach().abs().mean() / math.sqrt(qp)
    k = torch.arange(2 ** bits, dtype=w.dtype)
    return step * (k - (2 ** bits - 1) / 2)


def act_scale_params(model: nn.Module):
    return {n: p for n, p in model.named_parameters() if "input_quant" in n}


def quant_params(model: nn.Module):
    return {n: p for n, p in model.named_parameters() if ".weight_quant." in n}


def snapshot(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}


def check_converted(orig: nn.Module, q: nn.Module, x: torch.Tensor, cfg: NMultConfig):
    """Every contract of quantize_model(orig, cfg, example_input=x) on the result ``q``."""
    floats = float_compute_layers(orig)
    assert floats, "the reference model has compute layers"
    order, nonneg = execution_order(orig, x)
    assert sorted(order) == sorted(floats)
    qmods = dict(q.named_modules())
    assert float_compute_layers(q) == {}, "a Conv/Linear layer was left in float"
    assert sorted(n for n, _ in nmult_layers(q)) == sorted(floats)
    for name, old in floats.items():
        new = qmods[name]
        qcls = qnn.QuantLinear if isinstance(old, nn.Linear) else qnn.QuantConv2d
        assert type(new) is qcls, name
        assert isinstance(new.weight_quant, NMultWeightQuantProxy), name
        assert torch.equal(new.weight, old.weight), name
        assert (new.bias is None) == (old.bias is None), name
        if old.bias is not None:
            assert torch.equal(new.bias, old.bias), name
        if isinstance(old, nn.Conv2d):
            for attr in ("kernel_size", "stride", "padding", "dilation", "groups"):
                assert getattr(new, attr) == getattr(old, attr), (name, attr)
        edge = name in (order[0], order[-1])
        assert quant_of(new).bits == (8 if edge else cfg.weight_bits), name
        assert int(new.input_quant.bit_width()) == (8 if edge else cfg.act_bits), name
        assert new.input_quant.is_signed is (not nonneg[name]), name
    assert sorted(unsigned_input_layers(q)) == sorted(n for n, v in nonneg.items() if v)


# -- quantize_model on the reference models ----------------------------------------------------

@pytest.fixture(scope="module")
def resnet16():
    torch.manual_seed(0)
    return resnet18_cifar(width=16)


@pytest.fixture(scope="module")
def resnet16_q(resnet16):
    torch.manual_seed(1)
    x = torch.rand(4, 3, 16, 16)
    return quantize_model(resnet16, CFG, example_input=x), x


def test_full_width_resnet18_converts():
    torch.manual_seed(0)
    m = resnet18_cifar()
    floats = float_compute_layers(m)
    q = quantize_model(m, CFG)
    layers = dict(nmult_layers(q))
    assert len(layers) == 21 == len(floats)
    assert sum(p.numel() for p in m.parameters()) > 11_000_000
    shortcuts = [n for n, l in layers.items()
                 if isinstance(l, qnn.QuantConv2d) and l.kernel_size == (1, 1)]
    assert len(shortcuts) == 3 and all("shortcut" in n for n in shortcuts)
    assert isinstance(layers["fc"], qnn.QuantLinear)
    assert sum(isinstance(l, qnn.QuantConv2d) for l in layers.values()) == 20
    assert float_compute_layers(q) == {}
    for n, l in layers.items():
        assert torch.equal(l.weight, floats[n].weight), n
    # No example input: first and last in registration order.
    assert quant_of(layers["conv1"]).bits == quant_of(layers["fc"]).bits == 8
    assert {quant_of(l).bits for n, l in layers.items() if n not in ("conv1", "fc")} == {3}


def test_resnet_converted_layers(resnet16, resnet16_q):
    q, x = resnet16_q
    check_converted(resnet16, q, x, CFG)
    assert "conv1" in unsigned_input_layers(q)  # input in [0, 1]


def test_resnet_first_conv_signed_for_signed_input(resnet16):
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    q = quantize_model(resnet16, CFG, example_input=x)
    check_converted(resnet16, q, x, CFG)
    assert q.conv1.input_quant.is_signed is True
    assert q.layers[0].conv1.input_quant.is_signed is False  # after a ReLU


def test_vgg_converted_layers():
    torch.manual_seed(0)
    m = vgg_cifar()
    x = torch.rand(2, 3, 32, 32)
    q = quantize_model(m, CFG, example_input=x)
    check_converted(m, q, x, CFG)
    assert len(nmult_layers(q)) == 9
    q.eval()
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


class _OutOfOrder(nn.Module):
    """Registration order differs from execution order; ``mid`` sees signed inputs."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.mid = nn.Linear(6, 6)
        self.stem = nn.Linear(4, 6)
        self.pre = nn.Linear(6, 6)

    def forward(self, x):
        x = torch.relu(self.stem(x))  # non-negative into pre
        x = self.pre(x)  # signed into mid
        return self.head(torch.relu(self.mid(x)))


def test_edges_and_signs_follow_execution_order():
    torch.manual_seed(0)
    m = _OutOfOrder()
    x = torch.rand(5, 4)
    q = quantize_model(m, CFG, example_input=x)
    check_converted(m, q, x, CFG)
    bits = {n: quant_of(l).bits for n, l in nmult_layers(q)}
    assert bits == {"head": 8, "mid": 3, "stem": 8, "pre": 3}
    assert sorted(unsigned_input_layers(q)) == ["head", "pre", "stem"]
    # Without an example input: registration order, every input quantizer signed.
    q2 = quantize_model(m, CFG)
    assert {n: quant_of(l).bits for n, l in nmult_layers(q2)} == {
        "head": 8, "mid": 3, "stem": 3, "pre": 8}
    assert unsigned_input_layers(q2) == []
    # Signed example input: the stem becomes signed, the rest is unchanged.
    q3 = quantize_model(m, CFG, example_input=x - 0.5)
    assert sorted(unsigned_input_layers(q3)) == ["head", "pre"]


def test_example_input_leaves_batchnorm_statistics_alone(resnet16, resnet16_q):
    q, _ = resnet16_q
    assert resnet16.training
    ref = resnet16.state_dict()
    got = q.state_dict()
    changed = [k for k, v in ref.items() if not torch.equal(v, got[k])]
    assert changed == []


def test_train_forward_backward_reach_all_parameters(resnet16):
    cfg = NMultConfig(weight_bits=3, act_bits=4, act_collect_stats_steps=1)
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    y = torch.randint(0, 10, (4,))
    q = quantize_model(resnet16, cfg, example_input=x)
    q.train()
    q(x)  # the one statistics step of the activation scales; then they are learned parameters
    # Paper mode: the task loss sees full-precision weights, so r and c get no gradient from it.
    nn.functional.cross_entropy(q(x), y).backward()
    for n, l in nmult_layers(q):
        assert l.weight.grad is not None and l.weight.grad.abs().sum() > 0, n
        assert quant_of(l).r.grad is None and quant_of(l).c.grad is None, n
    scales = act_scale_params(q)
    assert len(scales) == 21
    for n, p in scales.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    # The regularizer gives r and c (and the weights) their gradient.
    q.zero_grad()
    (nn.functional.cross_entropy(q(x), y) + regularization_loss(q)).backward()
    for n, p in quant_params(q).items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    # STE mode: the task loss alone reaches r and c through the snapped weights.
    set_forward_mode(q, "ste")
    q.zero_grad()
    nn.functional.cross_entropy(q(x), y).backward()
    for n, p in quant_params(q).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_eval_snaps_weights_and_is_finite(resnet16_q):
    q, x = resnet16_q
    q = copy.deepcopy(q)
    q.train()
    with torch.no_grad():
        q(x)
        for _, l in nmult_layers(q):  # paper mode, training: full-precision weights
            assert torch.equal(l.quant_weight(), l.weight)
        q.eval()
        out = q(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all()
        for n, l in nmult_layers(q):
            w = l.quant_weight()
            levels = quant_of(l).levels().flatten()
            assert not torch.equal(w, l.weight), n
            assert torch.isin(w, levels).all(), n  # every eval weight is one of the levels
            nearest = levels[(l.weight.reshape(-1, 1) - levels).abs().argmin(1)]
            assert torch.allclose(w.flatten(), nearest), n


@pytest.mark.parametrize("arch", ["resnet", "vgg"])
def test_short_training_lowers_regularizer(arch):
    torch.manual_seed(0)
    if arch == "resnet":
        m, shape = resnet18_cifar(width=16), (8, 3, 16, 16)
    else:
        m, shape = vgg_cifar(cfg=SMALL_VGG), (8, 3, 32, 32)
    q = quantize_model(m, CFG)
    q.train()
    opt = torch.optim.SGD(param_groups(q, TrainConfig(lr=0.05, quant_lr=1e-5, weight_decay=0)),
                          lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    regs = []
    for _ in range(15):
        x, y = torch.rand(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)
        reg = regularization_loss(q)
        loss = nn.functional.cross_entropy(q(x), y) + 100.0 * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        regs.append(float(reg.detach()))
    final = float(regularization_loss(q).detach())
    assert all(math.isfinite(r) for r in regs)
    assert final < 0.7 * regs[0], regs


# -- quantize_model errors and options --------------------------------------------------------

class _MyConv(nn.Conv2d):
    """A user subclass of Conv2d (isinstance Conv2d, but not exactly Conv2d)."""


def test_conv_subclass_is_converted_like_its_base():
    """A user subclass of Conv2d is a Conv2d (isinstance): converted as one, quantizer and all,
    with its weights kept."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(conv=_MyConv(1, 4, 3), flat=nn.Flatten(),
                                  fc=nn.Linear(4 * 4 * 4, 2)))
    q = quantize_model(m, CFG)
    assert type(q.conv) is qnn.QuantConv2d
    assert isinstance(q.conv.weight_quant, NMultWeightQuantProxy)
    assert torch.equal(q.conv.weight, m.conv.weight)
    assert sorted(n for n, _ in nmult_layers(q)) == ["conv", "fc"]


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.mha(h, h, h)[0])


def test_linear_read_directly_by_parent_is_refused_not_silently_unquantized():
    """MultiheadAttention reads ``out_proj.weight`` itself (never calls the Linear), so a
    quantizer put on it would never run: refused, naming the layer and the way out (skip)."""
    torch.manual_seed(0)
    cfg = NMultConfig(weight_bits=2, act_bits=None, first_last_bits=None)
    with pytest.raises(ConversionError, match=r"'mha'.*\['mha\.out_proj'\].*skip="):
        quantize_model(_Attention(), cfg)
    q = quantize_model(_Attention(), cfg, skip=("mha.out_proj",))
    assert sorted(n for n, _ in nmult_layers(q)) == ["inp", "out"]
    assert type(q.mha.out_proj) is not qnn.QuantLinear


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(8, 16), act1=nn.ReLU(), fc2=nn.Linear(16, 16), act2=nn.ReLU(),
        fc3=nn.Linear(16, 16), act3=nn.ReLU(), fc4=nn.Linear(16, 2)))


def test_already_brevitas_model_points_to_swap():
    m = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), b=qnn.QuantLinear(4, 2, bias=False)))
    with pytest.raises(ConversionError, match=r"swap_weight_quant") as e:
        quantize_model(m, CFG)
    assert "'b'" in str(e.value)


def test_conv_transpose_is_named_and_can_be_skipped():
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 4, 3, padding=1), act=nn.ReLU(), up=nn.ConvTranspose2d(4, 2, 2, 2),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(2, 3)))
    with pytest.raises(ConversionError, match=r"'up'.*ConvTranspose2d"):
        quantize_model(m, CFG)
    q = quantize_model(m, CFG, skip=("up",))
    assert type(q.up) is nn.ConvTranspose2d
    assert torch.equal(q.up.weight, m.up.weight)
    assert sorted(n for n, _ in nmult_layers(q)) == ["conv", "fc"]
    q.eval()
    assert q(torch.rand(2, 1, 4, 4)).shape == (2, 3)


def test_skip_leaves_layer_in_float():
    m = _mlp()
    q = quantize_model(m, CFG, skip=("fc2",))
    assert type(q.fc2) is nn.Linear
    assert torch.equal(q.fc2.weight, m.fc2.weight) and torch.equal(q.fc2.bias, m.fc2.bias)
    assert sorted(n for n, _ in nmult_layers(q)) == ["fc1", "fc3", "fc4"]
    assert {n: quant_of(l).bits for n, l in nmult_layers(q)} == {"fc1": 8, "fc3": 3, "fc4": 8}
    q.eval()
    assert torch.isfinite(q(torch.rand(3, 8))).all()


def test_unknown_names_raise():
    m = _mlp()
    with pytest.raises(ConversionError, match="nope"):
        quantize_model(m, CFG, skip=("nope",))
    with pytest.raises(ConversionError, match="fc9"):
        quantize_model(m, NMultConfig(weight_bits=3, act_bits=4, layer_bits={"fc9": 2}))


def test_layer_bits_override():
    m = _mlp()
    q = quantize_model(m, NMultConfig(weight_bits=3, act_bits=4,
                                      layer_bits={"fc2": 5, "fc1": 2}))
    bits = {n: quant_of(l).bits for n, l in nmult_layers(q)}
    assert bits == {"fc1": 2, "fc2": 5, "fc3": 3, "fc4": 8}
    assert quant_of(q.fc2).levels().shape == (1, 32)
    # The override is for weights; the first layer's input activations stay at 8 bits.
    assert int(q.fc1.input_quant.bit_width()) == 8
    assert int(q.fc2.input_quant.bit_width()) == 4


def test_model_without_compute_layer_raises():
    with pytest.raises(ConversionError, match="no Conv1d/Conv2d/Conv3d/Linear"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.Flatten()), CFG)
    m = nn.Sequential(OrderedDict(fc=nn.Linear(2, 2)))
    with pytest.raises(ConversionError, match="no Conv1d"):
        quantize_model(m, CFG, skip=("fc",))


def test_original_untouched_unless_inplace():
    m = _mlp()
    before = snapshot(m)
    x = torch.rand(3, 8)
    q = quantize_model(m, CFG, example_input=x)
    assert q is not m
    assert float_compute_layers(m).keys() == {"fc1", "fc2", "fc3", "fc4"}
    assert all(type(l) is nn.Linear for l in float_compute_layers(m).values())
    after = snapshot(m)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Training the copy does not move the original's weights.
    with torch.no_grad():
        q.fc2.weight.add_(1.0)
    assert torch.equal(m.fc2.weight, before["fc2.weight"])
    q2 = quantize_model(m, CFG, inplace=True)
    assert q2 is m
    assert sorted(n for n, _ in nmult_layers(m)) == ["fc1", "fc2", "fc3", "fc4"]
    assert torch.equal(m.fc2.weight, before["fc2.weight"])


# -- swap_weight_quant on the FINN examples ---------------------------------------------------

def build_bnn(name: str, no_network):
    from brevitas_examples.bnn_pynq.models import model_with_cfg
    torch.manual_seed(0)
    model, _ = model_with_cfg(name, pretrained=False)
    assert no_network == [], f"model_with_cfg touched the network: {no_network}"
    return model


def brevitas_layers(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear))}


BNN = {"LFC_1W1A": ((1, 28, 28), 4), "CNV_1W2A": ((3, 32, 32), 9)}


@pytest.mark.parametrize("name", list(BNN))
def test_swap_bnn_pynq(name, no_network):
    shape, n_layers = BNN[name]
    m = build_bnn(name, no_network)
    layers = brevitas_layers(m)
    assert len(layers) == n_layers
    assert all(int(l.weight_quant.bit_width()) == 1 for l in layers.values())
    weights = {n: l.weight.detach().clone() for n, l in layers.items()}
    others = {k: v for k, v in snapshot(m).items() if ".weight_quant." not in k}
    assert swap_weight_quant(m, NMultConfig(init="lsq"), keep_bit_width=True) is m
    assert no_network == []
    assert sorted(n for n, _ in nmult_layers(m)) == sorted(layers)
    for n, l in brevitas_layers(m).items():
        assert l is layers[n]  # layers kept, only the weight proxy replaced
        assert isinstance(l.weight_quant, NMultWeightQuantProxy), n
        tq = quant_of(l)
        assert tq.bits == 1, n
        assert torch.equal(l.weight, weights[n]), n
        expect = lsq_levels(weights[n], 1)  # +-mean|w|
        assert torch.allclose(tq.levels().detach().flatten().sort().values, expect,
                              rtol=1e-5, atol=0), n
    # Activation quantizers and everything else untouched.
    now = {k: v for k, v in snapshot(m).items() if ".weight_quant." not in k}
    assert now.keys() == others.keys()
    assert all(torch.equal(now[k], others[k]) for k in now)

    # Forward, backward and the regularizer.
    torch.manual_seed(1)
    x = torch.rand(4, *shape)
    y = torch.randint(0, 10, (4,))
    m.train()
    reg = regularization_loss(m)
    assert torch.isfinite(reg) and reg > 0
    (nn.functional.cross_entropy(m(x), y) + reg).backward()
    for n, l in nmult_layers(m):
        assert l.weight.grad is not None and l.weight.grad.abs().sum() > 0, n
        assert quant_of(l).r.grad is not None and quant_of(l).r.grad.abs().sum() > 0, n
        assert quant_of(l).c.grad is not None, n
    m.eval()
    with torch.no_grad():
        out = m(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all()
        for n, l in nmult_layers(m):
            w = l.quant_weight()
            assert torch.isin(w, quant_of(l).levels().flatten()).all(), n
            assert w.unique().numel() == 2, n


@pytest.mark.parametrize("name", list(BNN))
def test_swap_bnn_pynq_training_lowers_regularizer(name, no_network):
    shape, _ = BNN[name]
    m = build_bnn(name, no_network)
    swap_weight_quant(m, NMultConfig(weight_bits=2))
    assert {quant_of(l).bits for _, l in nmult_layers(m)} == {2}
    m.train()
    opt = torch.optim.SGD(param_groups(m, TrainConfig(lr=0.05, quant_lr=1e-5, weight_decay=0)),
                          lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    regs = []
    for _ in range(6):
        x, y = torch.rand(4, *shape, generator=g), torch.randint(0, 10, (4,), generator=g)
        reg = regularization_loss(m)
        loss = nn.functional.cross_entropy(m(x), y) + 100.0 * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        regs.append(float(reg.detach()))
    regs.append(float(regularization_loss(m).detach()))
    assert all(b < a for a, b in zip(regs, regs[1:])), regs
    assert regs[-1] < 0.75 * regs[0], regs


def test_swap_levels_follow_config_bits(no_network):
    m = build_bnn("LFC_1W1A", no_network)
    w = {n: l.weight.detach().clone() for n, l in brevitas_layers(m).items()}
    first = next(iter(w))
    swap_weight_quant(m, NMultConfig(weight_bits=3, layer_bits={first: 4}, init="lsq"))
    for n, l in nmult_layers(m):
        bits = 4 if n == first else 3
        assert quant_of(l).bits == bits
        assert torch.allclose(quant_of(l).levels().detach().flatten().sort().values,
                              lsq_levels(w[n], bits), rtol=1e-5, atol=1e-7), n


def test_swap_plain_torch_model_raises():
    with pytest.raises(ConversionError, match="quantize_model"):
        swap_weight_quant(_mlp(), CFG)


def test_swap_float_layers_only_with_include_float():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(
            q=qnn.QuantLinear(4, 4, bias=False, weight_quant=Int8WeightPerTensorFloat),
            f=qnn.QuantLinear(4, 2, bias=False, weight_quant=None)))
    m = swap_weight_quant(model(), NMultConfig(weight_bits=3))
    assert [n for n, _ in nmult_layers(m)] == ["q"]
    assert not m.f.weight_quant.is_quant_enabled
    m = swap_weight_quant(model(), NMultConfig(weight_bits=3), include_float=True)
    assert [n for n, _ in nmult_layers(m)] == ["q", "f"]
    with pytest.raises(ConversionError, match="'f'"):
        swap_weight_quant(model(), NMultConfig(weight_bits=3), keep_bit_width=True,
                          include_float=True)
    with pytest.raises(ConversionError, match="nope"):
        swap_weight_quant(model(), NMultConfig(weight_bits=3, layer_bits={"nope": 2}))


# -- set_forward_mode --------------------------------------------------------------------------

def test_set_forward_mode():
    m = _mlp()
    q = quantize_model(m, CFG)
    q.train()
    x = torch.rand(4, 8)
    q(x)  # one statistics step so that the activation scales are in the state dict
    assert {quant_of(l).mode for _, l in nmult_layers(q)} == {"paper"}
    assert set_forward_mode(q, "ste") is q
    assert {quant_of(l).mode for _, l in nmult_layers(q)} == {"ste"}
    for n, l in nmult_layers(q):  # training forward now snaps the weights
        w = l.quant_weight()
        assert torch.equal(w, quant_of(l).snap(l.weight.detach())), n
        assert not torch.equal(w, l.weight), n
    assert float(regularization_loss(q)) == 0.0  # STE layers are left out of the regularizer
    set_forward_mode(q, "both")
    assert float(regularization_loss(q).detach()) > 0.0
    set_forward_mode(q, "ste")
    # The mode survives Brevitas re-initialising the quantizer ...
    old = quant_of(q.fc2)
    q.fc2.weight_quant.init_tensor_quant()
    assert quant_of(q.fc2) is not old and quant_of(q.fc2).mode == "ste"
    # ... and travels with the state dict into a model converted in paper mode.
    q2 = quantize_model(m, CFG)
    q2.load_state_dict(q.state_dict())
    assert {quant_of(l).mode for _, l in nmult_layers(q2)} == {"ste"}
    set_forward_mode(q, "paper")
    for _, l in nmult_layers(q):
        assert torch.equal(l.quant_weight(), l.weight)
    with pytest.raises(ValueError, match="bogus"):
        set_forward_mode(q, "bogus")
