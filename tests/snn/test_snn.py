"""Spiking models: neuron dynamics, multi-step forward/backward, state reset, conversion,
regularizer, reference models, export metadata."""
import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("spikingjelly")

from qfv_brevitas import NMultConfig, quantize_model  # noqa: E402
from qfv_brevitas.core.convert import ConversionError  # noqa: E402
from qfv_brevitas.core.snapping import snap_weights_  # noqa: E402
from qfv_brevitas.core.quantizers import nmult_layers, quant_of  # noqa: E402
from qfv_brevitas.training.regularizer import regularization_loss  # noqa: E402
from qfv_brevitas.snn import (LIF, ResNet19, SpikingConfig, SpikingNet, lif_layers,  # noqa: E402
                              rate_encode, snn_export_metadata, spiking_resnet19,
                              spiking_small_cnn, spiking_vgg11, to_spiking)
from qfv_brevitas.snn.neurons import spikingjelly  # noqa: E402

W4 = NMultConfig(weight_bits=4, act_bits=None)


def lif_reference(x_seq, tau, v_th, v_reset):
    """Paper eq. 8-10, one step at a time: H = V + beta (X - (V - V_reset)), beta = 1/tau."""
    beta = 1.0 / tau
    v = torch.full_like(x_seq[0], v_reset)
    out = []
    for x in x_seq:
        h = v + beta * (x - (v - v_reset))
        s = (h >= v_th).to(x.dtype)
        v = h * (1 - s) + v_reset * s
        out.append(s)
    return torch.stack(out)


def mlp(d_in=3, hidden=5, d_out=2):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def test_config_defaults_are_the_papers_neuron():
    c = SpikingConfig()
    assert (c.tau, c.beta, c.v_reset, c.surrogate) == (4.0, 0.25, 0.0, "atan")


@pytest.mark.parametrize("kw, msg", [
    (dict(T=0), "at least one step"), (dict(T=4097), "at most 4096"),
    (dict(T=2.5), "whole number"), (dict(tau=1.0), "tau"),
    (dict(v_reset=0.5, v_threshold=0.5), "below"), (dict(surrogate="relu"), "atan"),
    (dict(encoding="poisson"), "rate"), (dict(layout="TNCHW"), "time_first"),
    (dict(sample_ndim=0), "sample_ndim"), (dict(surrogate_alpha=-1), "alpha"),
])
def test_config_rejects_bad_values_with_a_fix(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SpikingConfig(**kw)


# ---------------------------------------------------------------------------------------------
# neurons
# ---------------------------------------------------------------------------------------------


def test_lif_hand_computed_sequence():
    # X = 0.8 constant, beta = 0.25, V_th = 0.5: H = 0.2, 0.35, 0.4625, 0.546875 -> spike, reset.
    lif = LIF(SpikingConfig(T=8, v_threshold=0.5))
    lif.T = 8
    s = lif(torch.full((8, 1), 0.8, dtype=torch.float64))
    assert s.flatten().tolist() == [0, 0, 0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("v_th, tau", [(0.5, 4.0), (1.0, 2.0)])
def test_lif_matches_paper_equations(v_th, tau):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 7, 11, generator=g, dtype=torch.float64) * 3 - 0.5
    lif = LIF(SpikingConfig(T=6, tau=tau, v_threshold=v_th))
    lif.T = 6
    got = lif(x.flatten(0, 1)).reshape(6, 7, 11)
    ref = lif_reference(x, tau, v_th, 0.0)
    assert torch.equal(got, ref)
    assert 0 < ref.mean() < 1  # the case has spikes and silences


def test_lif_outside_a_spiking_net_says_so():
    with pytest.raises(RuntimeError, match="SpikingNet"):
        LIF()(torch.ones(4, 2))


def test_rate_encode_statistics_and_range():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0]).repeat(1, 1)
    g = torch.Generator().manual_seed(0)
    s = rate_encode(x.expand(2000, 4), T=8, generator=g)
    assert s.shape == (8, 2000, 4) and set(s.unique().tolist()) <= {0.0, 1.0}
    rate = s.mean((0, 1))
    # 16000 Bernoulli draws per column: 5 standard deviations is < 0.02.
    assert torch.allclose(rate, torch.tensor([0.0, 0.25, 0.5, 1.0]), atol=0.02)
    assert rate[0] == 0 and rate[3] == 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rate_encode(torch.tensor([1.5]), T=2)
    with pytest.raises(ValueError, match="T >= 1"):
        rate_encode(torch.tensor([0.5]), T=0)


# ---------------------------------------------------------------------------------------------
# the network: multi-step forward and backward, layouts, bad input
# ---------------------------------------------------------------------------------------------


def test_multistep_forward_matches_a_step_by_step_reference():
    torch.manual_seed(0)
    body = mlp().double()
    net = to_spiking(body, SpikingConfig(T=5, sample_ndim=1, encoding="none"))
    x = torch.randn(5, 4, 3, dtype=torch.float64) * 2  # (T, N, features)
    lin1, lin2 = body[0], body[2]
    spikes = lif_reference(lin1(x), 4.0, 0.5, 0.0)
    expect = lin2(spikes).mean(0)
    assert torch.allclose(net(x), expect, atol=1e-12, rtol=0)
    assert spikes.sum() > 0


def test_layouts_read_the_same_sequence():
    torch.manual_seed(0)
    tf = to_spiking(mlp(), SpikingConfig(T=3, sample_ndim=1, encoding="none"))
    bf = SpikingNet(copy.deepcopy(tf.body), SpikingConfig(T=3, sample_ndim=1, encoding="none",
                                                          layout="batch_first"))
    x = torch.randn(3, 6, 3) * 2
    assert torch.equal(tf(x), bf(x.transpose(0, 1)))


def test_forward_backward_reach_every_parameter_in_multistep_mode():
    torch.manual_seed(0)
    q = quantize_model(spiking_small_cnn(width=8, config=SpikingConfig(T=3, encoding="none")), W4)
    q.train()
    x = (torch.rand(3, 5, 1, 8, 8) < 0.5).float()  # (T, N, C, H, W) spikes
    out = q(x)
    assert out.shape == (5, 10)
    # The paper's mode trains full-precision weights: r and c learn through the regularizer.
    (nn.functional.cross_entropy(out, torch.arange(5)) + regularization_loss(q)).backward()
    for name, p in q.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith("weight") and p.dim() > 1:
            assert p.grad.abs().sum() > 0, name  # the surrogate carries gradient through spikes


def test_static_input_without_encoding_is_refused_clearly():
    net = spiking_small_cnn(width=4, config=SpikingConfig(T=4, encoding="none"))
    with pytest.raises(ValueError, match=r"\(T, N, C, H, W\).*static batch of shape \(2, 1, 8, 8\)"):
        net(torch.rand(2, 1, 8, 8))


def test_zero_time_steps_and_swapped_layout_are_refused_clearly():
    net = spiking_small_cnn(width=4, config=SpikingConfig(T=4, encoding="none"))
    with pytest.raises(ValueError, match="T = 0"):
        net(torch.rand(0, 2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"transpose.*layout='batch_first'"):
        net(torch.rand(2, 4, 1, 8, 8))  # (N, T, ...) given to a time-first model
    with pytest.raises(ValueError, match="model.T = 6"):
        net(torch.rand(6, 2, 1, 8, 8))
    with pytest.raises(ValueError, match="3-D input"):
        net(torch.rand(2, 8, 8))
    net.T = 6  # then it runs
    assert net(torch.rand(6, 2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least one step"):
        net.T = 0


def test_rate_coded_input_outside_unit_range_is_refused():
    net = spiking_small_cnn(width=4)
    with pytest.raises(ValueError, match="encoding='direct'"):
        net(torch.rand(2, 1, 8, 8) * 16)  # raw digits pixels, 0..16


# ---------------------------------------------------------------------------------------------
# state reset between samples
# ---------------------------------------------------------------------------------------------


def test_forgetting_the_reset_changes_results_in_plain_spikingjelly():
    sj = spikingjelly()
    node = sj.neuron.LIFNode(tau=4.0, v_threshold=0.5, step_mode="m")
    x = torch.full((4, 3), 0.6)  # H = 0.15, 0.26, 0.35, 0.41: no spike, so V stays high
    first = node(x)
    assert not torch.equal(node(x), first)  # state carried over from the first sequence
    sj.functional.reset_net(node)
    assert torch.equal(node(x), first)


def _firing_net():
    """A spiking CNN whose every LIF layer fires in eval mode (BatchNorm statistics set by a
    few training-mode passes; with the initial ones hardly any neuron reaches threshold, and a
    silent network would pass any reset test)."""
    torch.manual_seed(0)
    net = spiking_small_cnn(width=8, config=SpikingConfig(T=4, encoding="direct",
                                                          v_threshold=0.2))
    with torch.no_grad():
        for _ in range(30):
            net(torch.rand(16, 1, 8, 8))
    net.eval()
    rates = {}
    hooks = [l.register_forward_hook(lambda m, i, o, n=n: rates.__setitem__(n, float(o.detach().mean())))
             for n, l in net.lifs()]
    net(torch.rand(6, 1, 8, 8))
    for h in hooks:
        h.remove()
    assert all(0 < r < 1 for r in rates.values()), rates
    return net


@pytest.mark.parametrize("train", [False, True])
def test_spiking_net_resets_between_batches(train):
    net = _firing_net().train(train)
    a, b = torch.rand(6, 1, 8, 8), torch.rand(6, 1, 8, 8)
    fresh = copy.deepcopy(net)(b)
    net(a)
    assert torch.equal(net(b), fresh)


def test_without_the_reset_the_library_path_would_leak_state(monkeypatch):
    from spikingjelly.activation_based import base

    net = _firing_net()
    x = torch.rand(6, 1, 8, 8)
    first = net(x)
    assert torch.equal(net(x), first)
    monkeypatch.setattr(base.MemoryModule, "reset", lambda self: None)  # "forget" every reset
    net(x)
    assert not torch.equal(net(x), first)


def test_evaluation_is_repeatable_with_rate_coding():
    from qfv_brevitas.zoo.data import load_digits_split
    from qfv_brevitas.training.train import evaluate

    _, test = load_digits_split(0)
    torch.manual_seed(0)
    net = spiking_small_cnn(width=8)
    assert evaluate(net, test) == evaluate(net, test)
    net.train()
    x = test.tensors[0][:8]
    assert not torch.equal(net.to_sequence(x), net.to_sequence(x))  # fresh spikes in training


# ---------------------------------------------------------------------------------------------
# conversion of a user's network
# ---------------------------------------------------------------------------------------------


class SharedReLU(nn.Module):
    """A user network that calls one ReLU module twice, at different shapes."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 6), nn.Linear(6, 4), nn.Linear(4, 2)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_a_relu_module_used_twice_becomes_a_correct_lif_layer():
    torch.manual_seed(0)
    shared = SharedReLU()
    separate = nn.Sequential(shared.fc1, nn.ReLU(), shared.fc2, nn.ReLU(), shared.fc3)
    cfg = SpikingConfig(T=4, sample_ndim=1, encoding="none")
    x = torch.randn(4, 5, 3) * 2
    assert torch.equal(to_spiking(shared, cfg)(x), to_spiking(separate, cfg)(x))


def test_to_spiking_replaces_relu_and_max_pooling_only():
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.MaxPool2d(2, padding=1), nn.AdaptiveMaxPool2d(2), nn.Flatten(),
                      nn.Linear(16, 3))
    s = to_spiking(m, SpikingConfig(T=2))
    kinds = [type(l).__name__ for l in s.body]
    assert kinds == ["Conv2d", "BatchNorm2d", "LIF", "AvgPool2d", "AdaptiveAvgPool2d",
                     "Flatten", "Linear"]
    assert s.body[3].padding == 1 and s.body[3].count_include_pad is False
    assert type(m[2]) is nn.ReLU  # the user's model is untouched
    assert s(torch.rand(2, 1, 6, 6)).shape == (2, 3)


def test_to_spiking_with_nmult_is_quantize_model_on_the_spiking_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3))
    cfg = SpikingConfig(T=3)
    a = to_spiking(m, cfg, W4).eval()
    b = quantize_model(to_spiking(m, cfg), W4).eval()
    assert [(n, quant_of(l).bits) for n, l in nmult_layers(a)] == \
        [("body.0", 8), ("body.4", 4), ("body.6", 8)]
    x = torch.rand(5, 1, 5, 5)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("model, kw, msg", [
    (nn.Sequential(nn.Linear(2, 2), nn.GELU()), {}, "GELU.*keep"),
    (nn.Sequential(nn.Linear(2, 2)), {}, "no nn.ReLU"),
    (nn.Sequential(nn.Linear(2, 2), nn.ReLU()), dict(nmult=NMultConfig(act_bits=4)),
     "act_bits=None"),
    (nn.Sequential(nn.Linear(2, 2), nn.ReLU()), dict(keep=["nope"]), "keep names"),
    (nn.Sequential(nn.Conv1d(1, 1, 1), nn.ReLU(), nn.MaxPool1d(2, dilation=2)), {}, "dilation"),
])
def test_to_spiking_refuses_what_it_cannot_convert(model, kw, msg):
    with pytest.raises(ConversionError, match=msg):
        to_spiking(model, SpikingConfig(), **kw)


def test_already_spiking_and_kept_activations():
    s = to_spiking(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh()),
                   SpikingConfig(sample_ndim=1), keep=["3"])
    assert isinstance(s.body[3], nn.Tanh)
    with pytest.raises(ConversionError, match="already spiking"):
        to_spiking(s)


# ---------------------------------------------------------------------------------------------
# regularizer on spiking models
# ---------------------------------------------------------------------------------------------


def test_regularizer_on_a_spiking_model():
    torch.manual_seed(0)
    q = quantize_model(spiking_small_cnn(width=8), W4)
    names = [n for n, _ in nmult_layers(q)]
    assert names == ["body.features.0", "body.features.3", "body.features.7",
                     "body.classifier.1"]
    reg = regularization_loss(q)
    assert reg > 0
    reg.backward()
    for _, layer in nmult_layers(q):
        assert layer.weight.grad.abs().sum() > 0  # it pulls every weight toward its levels
    with torch.no_grad():
        snap_weights_(q)
    # On the levels the distance vanishes (up to float rounding of the level values).
    assert float(regularization_loss(q).detach()) < 1e-10 * float(reg.detach())


# ---------------------------------------------------------------------------------------------
# reference models
# ---------------------------------------------------------------------------------------------


def test_spiking_vgg11_structure_and_event_batches():
    net = spiking_vgg11(10, in_channels=2, width=8, config=SpikingConfig(
        T=2, encoding="none", layout="batch_first"))
    mods = list(net.body.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in mods) == 8
    assert sum(isinstance(m, LIF) for m in mods) == 8
    assert not any(isinstance(m, nn.MaxPool2d) for m in mods)
    assert sum(isinstance(m, nn.AvgPool2d) for m in mods) == 5
    x = (torch.rand(3, 2, 2, 48, 48) < 0.1).float()  # (N, T, 2, 48, 48) as loaders give
    out = net(x)
    out.sum().backward()
    assert out.shape == (3, 10)


def test_spiking_resnet19_has_19_weight_layers():
    plain = ResNet19(10, 2, width=4)
    convs = [n for n, m in plain.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)) and "shortcut" not in n]
    assert len(convs) == 19
    net = spiking_resnet19(10, 2, width=4, config=SpikingConfig(T=2, encoding="none"))
    assert len(lif_layers(net)) == 1 + 8 + 1  # stem, one per block (used twice), head
    q = quantize_model(net, W4)
    out = q(torch.rand(2, 3, 2, 16, 16))
    out.sum().backward()
    assert out.shape == (3, 10) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# export metadata
# ---------------------------------------------------------------------------------------------


def test_snn_export_metadata_reads_each_layer():
    q = quantize_model(spiking_small_cnn(width=4, config=SpikingConfig(T=6)), W4)
    q.body.features[5].node.tau = 2.0  # metadata comes from the layers, not the config
    meta = json.loads(json.dumps(snn_export_metadata(q)))
    assert meta["T"] == 6 and meta["step_mode"] == "multi-step"
    assert meta["input_layout"] == "(T, N, ...)" and meta["encoding"] == "rate"
    layers = meta["lif_layers"]
    assert list(layers) == ["body.features.2", "body.features.5", "body.features.9"]
    first = layers["body.features.2"]
    assert first == {"neuron": "LIF", "tau": 4.0, "beta": 0.25, "decay_input": True,
                     "v_threshold": 0.5, "v_reset": 0.0, "surrogate": "atan",
                     "surrogate_alpha": 2.0, "detach_reset": False, "step_mode": "m"}
    assert layers["body.features.5"]["tau"] == 2.0 and layers["body.features.5"]["beta"] == 0.5
    with pytest.raises(ValueError, match="not a spiking model"):
        snn_export_metadata(mlp())
