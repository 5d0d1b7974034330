"""The converter keeps what the model was (issue 22): shared layers stay one quantized layer,
tied Parameters stay one object, frozen stays frozen, hooks move, modes and state-dict keys
stay; what it cannot keep (parametrizations, weight-rewriting hooks, non-Parameter or
non-finite weights, subclasses with their own forward, float layers outside the module tree)
is refused with a ``ConversionError`` naming the layer.

Forward references are computed by hand: each layer's weights snapped to their nearest level
(an argmin over the quantizer's level table, not the library's search) in a float copy of the
model, compared in eval mode without activation quantizers.
"""
from __future__ import annotations

import copy
import functools
import itertools
import re
import warnings
from typing import Dict, List, Sequence

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P, parametrize

import brevitas.nn as qnn
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

from qfv_brevitas import NMultConfig, nmult_layers, quant_of, quantize_model, swap_weight_quant
from qfv_brevitas.core.convert import ConversionError
from qfv_brevitas.training.regularizer import regularization_loss

WEIGHTS_ONLY = NMultConfig(weight_bits=3, act_bits=None, init="lsq")
WITH_ACTS = NMultConfig(weight_bits=3, act_bits=4, init="lsq")
COMPUTE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# -- helpers --------------------------------------------------------------------------------

def float_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Every name (aliases included) of a plain, non-Brevitas compute layer."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, COMPUTE) and not isinstance(m, QuantWeightBiasInputOutputLayer)}


def nearest(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each weight's nearest level of a per-tensor table ``(1, L)``, by brute force."""
    flat = w.detach().reshape(-1, 1)
    idx = (flat - levels.detach().reshape(1, -1)).abs().argmin(dim=1)
    return levels.detach().reshape(-1)[idx].reshape(w.shape)


def snapped_reference(float_model: nn.Module, q: nn.Module) -> nn.Module:
    """A float copy of ``float_model`` whose compute layers hold the weights their quantized
    counterparts in ``q`` (same canonical names) deploy: the manual reference."""
    ref = copy.deepcopy(float_model)
    qmods = dict(q.named_modules())
    with torch.no_grad():
        for name, layer in ref.named_modules():
            if isinstance(layer, COMPUTE) and name in qmods and \
                    isinstance(qmods[name], QuantWeightBiasInputOutputLayer):
                layer.weight.copy_(nearest(layer.weight, quant_of(qmods[name]).levels()))
    return ref.eval()


def assert_same_forward(float_model, q, x):
    ref = snapped_reference(float_model, q)
    with torch.no_grad():
        torch.testing.assert_close(q.eval()(x), ref(x), rtol=0, atol=1e-6)


class Chain(nn.Module):
    """Compute layers held in a ModuleList and called in ``order`` (indices may repeat),
    a ReLU after each call, plus attribute aliases ``alias<k>`` of some of them."""

    def __init__(self, layers: Sequence[nn.Module], order: Sequence[int],
                 aliases: Sequence[int] = (), flatten_after: int = -1):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.order = list(order)
        self.flatten_after = flatten_after
        for k, i in enumerate(aliases):
            setattr(self, f"alias{k}", self.layers[i])

    def forward(self, x):
        for step, i in enumerate(self.order):
            x = torch.relu(self.layers[i](x)) if step < len(self.order) - 1 else self.layers[i](x)
            if step == self.flatten_after:
                x = x.flatten(1)
        return x


def linear_chain(width: int, depth: int, order=None, aliases=(), seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(width, width) for _ in range(depth - 1)] + [nn.Linear(width, 3)]
    return Chain(layers, order if order is not None else range(depth), aliases)


def conv_chain(channels: int, depth: int, order=None, aliases=(), seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(depth)]
    return Chain(layers, order if order is not None else range(depth), aliases)


def example(model: Chain, batch=4, seed=1):
    torch.manual_seed(seed)
    first = model.layers[model.order[0]]
    if isinstance(first, nn.Linear):
        return torch.randn(batch, first.in_features)
    return torch.randn(batch, first.in_channels, 5, 5)


# -- shared layers: several names, several calls ------------------------------------------------------

SHARED = [(kind, depth, alias_of, n_alias)
          for kind in ("linear", "conv") for depth in (2, 3) for alias_of in (0, depth - 1)
          for n_alias in (1, 3)]


@pytest.mark.parametrize("kind,depth,alias_of,n_alias", SHARED)
def test_a_layer_under_several_names_is_one_quantized_layer(kind, depth, alias_of, n_alias):
    build = linear_chain if kind == "linear" else conv_chain
    m = build(6, depth, aliases=[alias_of] * n_alias)
    x = example(m)
    q = quantize_model(m, WEIGHTS_ONLY, example_input=x)
    names = [f"layers.{alias_of}"] + [f"alias{k}" for k in range(n_alias)]
    objs = {id(q.get_submodule(n)) for n in names}
    assert len(objs) == 1, "the names of one layer now hold different modules"
    assert isinstance(q.get_submodule(names[0]), QuantWeightBiasInputOutputLayer)
    assert float_layers(q) == {}, "a name of a shared layer still holds the float layer"
    assert len(nmult_layers(q)) == depth
    assert_same_forward(m, q, x)


CALLS = [(kind, calls, pos) for kind in ("linear", "conv") for calls in (2, 3)
         for pos in ("first", "middle")]


@pytest.mark.parametrize("kind,calls,pos", CALLS)
def test_a_layer_called_several_times_runs_quantized_every_time(kind, calls, pos):
    build = linear_chain if kind == "linear" else conv_chain
    order = [0] * calls + [1, 2] if pos == "first" else [0] + [1] * calls + [2]
    m = build(5, 3, order=order)
    x = example(m)
    q = quantize_model(m, WEIGHTS_ONLY, example_input=x)
    assert float_layers(q) == {}
    shared = q.layers[order[1]]  # the repeated layer
    count = []
    h = shared.register_forward_pre_hook(lambda mod, inp: count.append(1))
    assert_same_forward(m, q, x)
    h.remove()
    assert len(count) == calls


@pytest.mark.parametrize("second_input_negative", [False, True])
def test_a_layer_called_twice_gets_its_sign_from_all_its_calls(second_input_negative):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.mid, self.c = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):  # x >= 0 at mid's first call
            h = self.mid(torch.relu(self.a(x)))
            h = h if second_input_negative else torch.relu(h)
            return self.c(self.mid(h) + self.b(x))

    torch.manual_seed(0)
    m = Twice()
    x = torch.randn(16, 4)
    q = quantize_model(m, WITH_ACTS, example_input=x)
    assert q.mid.input_quant.is_signed is second_input_negative


def test_skip_and_layer_bits_by_any_name_of_a_shared_layer():
    m = linear_chain(4, 3, aliases=[1, 1])
    q = quantize_model(m, WEIGHTS_ONLY, skip=("alias1",))
    assert type(q.layers[1]) is nn.Linear and q.alias0 is q.layers[1] is q.alias1
    q = quantize_model(m, NMultConfig(weight_bits=3, act_bits=None, init="lsq",
                                      layer_bits={"alias0": 5}))
    assert quant_of(q.layers[1]).bits == 5 and q.alias0 is q.layers[1]
    with pytest.raises(ConversionError, match=r"'alias0' 5 bits and 'layers\.1' 6.*'layers\.1'"):
        quantize_model(m, NMultConfig(weight_bits=3, act_bits=None,
                                      layer_bits={"alias0": 5, "layers.1": 6}))


# -- tied parameters ------------------------------------------------------------------------------

class Tied(nn.Module):
    """Three Linear layers; ``tie`` = (i, j, what): layer j's ``what`` is layer i's."""

    def __init__(self, tie, width=5):
        super().__init__()
        self.l0, self.l1, self.l2 = (nn.Linear(width, width) for _ in range(3))
        i, j, what = tie
        setattr(getattr(self, f"l{j}"), what, getattr(getattr(self, f"l{i}"), what))

    def forward(self, x):
        return self.l2(torch.relu(self.l1(torch.relu(self.l0(x)))))


TIES = [(i, j, what, freeze) for (i, j) in ((0, 2), (1, 2), (0, 1)) for what in ("weight", "bias")
        for freeze in (False, True)]


@pytest.mark.parametrize("i,j,what,freeze", TIES)
def test_tied_parameters_stay_one_object(i, j, what, freeze):
    torch.manual_seed(0)
    m = Tied((i, j, what))
    if freeze:
        getattr(getattr(m, f"l{i}"), what).requires_grad_(False)
    x = torch.randn(8, 5)
    # The edges get 8 bits, the middle 3: a weight tied across them cannot have one set of levels.
    conflict = what == "weight" and (i, j) != (0, 2)
    if conflict:
        with pytest.raises(ConversionError, match=rf"\['l{i}', 'l{j}'\].*tied.*'l{i}': \d.*'l{j}': \d"):
            quantize_model(m, WEIGHTS_ONLY, example_input=x)
        return
    q = quantize_model(m, WEIGHTS_ONLY, example_input=x)
    a, b = getattr(q, f"l{i}"), getattr(q, f"l{j}")
    assert getattr(a, what) is getattr(b, what)
    assert getattr(a, what).requires_grad is not freeze
    assert_same_forward(m, q, x)


def test_tied_weights_train_identically():
    """One weight, two layers, each its own quantizer started from it: a step with the
    regularizer moves the weight once and both quantizers the same way."""
    torch.manual_seed(0)
    m = Tied((0, 2, "weight"))
    q = quantize_model(m, NMultConfig(weight_bits=4, act_bits=None, init="lsq",
                                      layer_bits={"l1": 4}))
    qa, qb = quant_of(q.l0), quant_of(q.l2)
    assert torch.equal(qa.r, qb.r) and qa.r is not qb.r
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    before, r0 = q.l0.weight.detach().clone(), qa.r.detach().clone()
    loss = q.train()(torch.randn(8, 5)).pow(2).mean() + regularization_loss(q)
    loss.backward()
    opt.step()
    assert q.l0.weight is q.l2.weight and not torch.equal(q.l0.weight, before)
    assert torch.equal(qa.r, qb.r) and torch.equal(qa.c, qb.c)
    assert not torch.equal(qa.r, r0), "the step did not move the levels: nothing was compared"


@pytest.mark.parametrize("head_first", [False, True])
def test_a_weight_tied_to_an_embedding_stays_tied_with_a_warning(head_first):
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            if head_first:
                self.head = nn.Linear(6, 11, bias=False)
                self.emb = nn.Embedding(11, 6)
            else:
                self.emb = nn.Embedding(11, 6)
                self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(self.emb(t))

    torch.manual_seed(0)
    m = LM()
    with pytest.warns(UserWarning, match=r"head\.weight is the same Parameter as \['emb\.weight'\]"):
        # an embedding converts too (tests/core/test_convert_embedding.py): skipped, it stays float
        q = quantize_model(m, WEIGHTS_ONLY, example_input=torch.arange(11)[None], skip=("emb",))
    assert q.emb.weight is q.head.weight and isinstance(q.head, qnn.QuantLinear)
    t = torch.arange(11)[None]
    with torch.no_grad():
        ref = nn.functional.linear(m.emb(t), nearest(m.head.weight, quant_of(q.head).levels()))
        torch.testing.assert_close(q.eval()(t), ref, rtol=0, atol=1e-6)


# -- frozen parameters -----------------------------------------------------------------------------

#: what is frozen before converting: (layer index, parameter) pairs, or the whole model
FROZEN = {"none": [], "all": "all", "w0": [(0, "weight")], "b1": [(2, "bias")],
          "w1b1": [(2, "weight"), (2, "bias")]}
FREEZE = [(variant, frozen, acts) for variant in ("nmult", "step", "fixed")
          for frozen in FROZEN for acts in (None, 4)]


@pytest.mark.parametrize("variant,frozen,acts", FREEZE)
def test_requires_grad_is_kept_and_quantizers_of_frozen_weights_are_frozen(variant, frozen, acts):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    if FROZEN[frozen] == "all":
        m.requires_grad_(False)
    else:
        for i, attr in FROZEN[frozen]:
            getattr(m[i], attr).requires_grad_(False)
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    q = quantize_model(m, NMultConfig(weight_bits=3, act_bits=acts, variant=variant, init="lsq"),
                       example_input=torch.randn(4, 4))
    after = dict(q.named_parameters())
    assert {n: after[n].requires_grad for n in before} == before
    for name in ("0", "2", "4"):
        weight_frozen = not before[f"{name}.weight"]
        new = {n: p.requires_grad for n, p in after.items()
               if n.startswith(f"{name}.") and n not in before}
        assert all(v is not weight_frozen for v in new.values()), (name, new)
    if frozen == "all":
        assert not any(p.requires_grad for p in q.parameters())
    # Brevitas re-creates the quantizers' parameters on a state-dict load: still frozen.
    # (strict=False: an input quantizer that has not collected statistics saves no scale.)
    old_r = quant_of(q[0]).multipliers()
    q.load_state_dict(q.state_dict(), strict=False)
    assert quant_of(q[0]).multipliers() is not old_r or variant == "step"
    again = {n: p.requires_grad for n, p in q.named_parameters()}
    assert again == {n: p.requires_grad for n, p in after.items()}


def test_a_weight_unfrozen_after_conversion_gets_trainable_quantizers_back_on_load():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).requires_grad_(False)
    q = quantize_model(m, NMultConfig(weight_bits=3, act_bits=4, init="lsq"))
    q[0].requires_grad_(True)
    q.load_state_dict(q.state_dict(), strict=False)
    assert all(p.requires_grad for p in q[0].parameters())
    assert not any(p.requires_grad for p in q[1].parameters())


# -- parametrizations and weight-rewriting hooks ----------------------------------------------------

class Scale(nn.Module):
    def forward(self, w):
        return 2 * w


def weight_norm(l):
    return P.weight_norm(l)


def spectral(l):
    return P.spectral_norm(l)


def orthogonal(l):
    return P.orthogonal(l)


def custom(l):
    parametrize.register_parametrization(l, "weight", Scale())
    return l


def custom_bias(l):
    parametrize.register_parametrization(l, "bias", Scale())
    return l


PARAMETRIZED = [(f, where, kind) for f, where in
                ((weight_norm, "_WeightNorm"), (spectral, "_SpectralNorm"),
                 (orthogonal, "_Orthogonal"), (custom, "Scale"), (custom_bias, "Scale"))
                for kind in ("linear", "conv")]


@pytest.mark.parametrize("wrap,cls,kind", PARAMETRIZED)
@pytest.mark.parametrize("inplace", [False, True])
def test_parametrized_layers_are_refused_by_name(wrap, cls, kind, inplace):
    torch.manual_seed(0)
    first = nn.Linear(4, 4) if kind == "linear" else nn.Conv2d(4, 4, 1)
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), wrap(first), nn.ReLU(),
                      nn.Linear(4, 2) if kind == "linear" else nn.Conv2d(4, 2, 1))
    with pytest.raises(ConversionError, match=rf"layer '2' has parametrizations .*'{cls}'.*skip"):
        quantize_model(m, WEIGHTS_ONLY, inplace=inplace)
    assert type(m[0]) is nn.Linear, "a refused conversion changed the model"
    q = quantize_model(m, WEIGHTS_ONLY, skip=("2",))
    assert parametrize.is_parametrized(q[2]) and isinstance(q[0], qnn.QuantLinear)


def old_weight_norm(l):
    return torch.nn.utils.weight_norm(l)


def old_spectral(l):
    return torch.nn.utils.spectral_norm(l)


def pruned(l):
    torch.nn.utils.prune.l1_unstructured(l, "weight", amount=0.5)
    return l


@pytest.mark.parametrize("wrap,what", [(old_weight_norm, "weight_norm"),
                                       (old_spectral, "spectral_norm"), (pruned, "prune")])
def test_weight_rewriting_hooks_are_refused_by_name(wrap, what):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), wrap(nn.Linear(4, 2)))
    with pytest.raises(ConversionError, match=rf"layer '2' uses torch\.nn\.utils\.{what}"):
        quantize_model(m, WEIGHTS_ONLY, inplace=True)
    assert type(m[0]) is nn.Linear
    if what != "weight_norm":  # weight_norm's hooks cannot be deep-copied at all
        with pytest.raises(ConversionError, match=rf"layer '2' uses torch\.nn\.utils\.{what}"):
            quantize_model(m, WEIGHTS_ONLY)
    else:
        with pytest.raises(ConversionError, match=r"cannot be deep-copied \(layer '2' uses "
                                                  r"torch\.nn\.utils\.weight_norm.*inplace=True"):
            quantize_model(m, WEIGHTS_ONLY)


# -- dtypes, sizes, odd weights ---------------------------------------------------------------------

HALF = [(dtype, variant, per_channel, init) for dtype in (torch.bfloat16, torch.float16)
        for variant in ("nmult", "step") for per_channel in (False, True)
        for init in ("lsq", "fit")]


@pytest.mark.parametrize("dtype,variant,per_channel,init", HALF)
def test_half_precision_layers_convert_in_their_dtype(dtype, variant, per_channel, init):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2)).to(dtype)
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    q = quantize_model(m, NMultConfig(weight_bits=3, act_bits=4, variant=variant, init=init,
                                      per_channel=per_channel), example_input=x)
    for _, layer in nmult_layers(q):
        tq = quant_of(layer)
        assert layer.weight.dtype == tq.c.dtype == dtype
        snapped = tq.snap(layer.weight)
        levels = tq.levels().detach()
        rows = tq.to_groups(snapped)
        for g in range(rows.shape[0]):  # every deployed weight is one of its group's levels
            assert torch.isin(rows[g], levels[g if per_channel else 0]).all()
    y = q.eval()(x)
    assert y.dtype == dtype and torch.isfinite(y).all()


EMPTY = [("linear-in", lambda: nn.Linear(0, 4), (4, 0)),
         ("linear-out", lambda: nn.Linear(4, 0), (0, 4)),
         ("conv-out", lambda: nn.Conv2d(3, 0, 3), (0, 3, 3, 3)),
         ("conv-in", lambda: nn.Conv1d(0, 3, 1), (3, 0, 1))]


@pytest.mark.parametrize("label,make,shape", EMPTY)
def test_empty_layers_stay_float_with_a_warning(label, make, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        empty = make()
    m = nn.ModuleDict({"empty": empty, "real": nn.Linear(4, 2)})
    with pytest.warns(UserWarning, match=re.escape(f"layer 'empty' has an empty weight "
                                                   f"{tuple(shape)}: nothing to quantize")):
        q = quantize_model(m, WEIGHTS_ONLY)
    assert type(q["empty"]) is type(empty) and isinstance(q["real"], qnn.QuantLinear)
    with pytest.warns(UserWarning), pytest.raises(ConversionError, match="only empty ones"):
        quantize_model(nn.Sequential(make()), WEIGHTS_ONLY)


@pytest.mark.parametrize("what,value", [("weight", float("nan")), ("weight", float("inf")),
                                        ("bias", float("-inf")), ("bias", float("nan"))])
def test_non_finite_weights_are_refused_by_name(what, value):
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        getattr(m[2], what).view(-1)[[0, 2]] = value
    with pytest.raises(ConversionError, match=rf"layer '2': 2 of \d+ values of its {what} are NaN"):
        quantize_model(m, WEIGHTS_ONLY)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn, torch.complex64])
def test_non_float_weights_are_refused_by_name(dtype):
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    m[1].weight = nn.Parameter(torch.zeros(2, 4).to(dtype), requires_grad=False)
    with pytest.raises(ConversionError, match=rf"layer '1': its weight is "
                                              rf"{str(dtype).replace('torch.', '')}"):
        quantize_model(m, WEIGHTS_ONLY)


@pytest.mark.parametrize("held", ["buffer", "plain"])
def test_a_weight_that_is_not_a_parameter_is_refused(held):
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    w = m[0].weight.detach().clone()
    del m[0].weight
    if held == "buffer":
        m[0].register_buffer("weight", w)
    else:
        m[0].weight = w
    with pytest.raises(ConversionError, match=rf"layer '0': its weight is "
                                              rf"{'a buffer' if held == 'buffer' else 'a plain Tensor'}"):
        quantize_model(m, WEIGHTS_ONLY)


@pytest.mark.parametrize("layout", ["strided", "channels_last", "transposed"])
def test_odd_memory_layouts_keep_their_parameter_and_forward(layout):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 9, 2))
    if layout == "strided":
        m[2].weight = nn.Parameter(torch.randn(4, 8, 1, 1)[:, ::2])
    elif layout == "channels_last":
        m = m.to(memory_format=torch.channels_last)
    else:
        m[5].weight = nn.Parameter(torch.randn(36, 2).t())
    x = torch.randn(2, 3, 5, 5)
    params = {n: p for n, p in m.named_parameters()}
    q = quantize_model(m, WEIGHTS_ONLY, example_input=x, inplace=True)
    assert all(dict(q.named_parameters())[n] is p for n, p in params.items())
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 9, 2))
    with torch.no_grad():
        for i in (0, 2, 5):
            ref[i].weight.copy_(nearest(q[i].weight, quant_of(q[i]).levels()))
            ref[i].bias.copy_(q[i].bias)
        torch.testing.assert_close(q.eval()(x), ref(x), rtol=0, atol=1e-5)


def test_a_meta_model_converts_to_a_skeleton_that_loads_a_checkpoint():
    torch.manual_seed(0)
    cfg = NMultConfig(weight_bits=3, act_bits=4, init="fit")
    ref = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), cfg,
                         example_input=torch.randn(8, 4))
    ref(torch.randn(8, 4))
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    q = quantize_model(skeleton, cfg, unsigned_inputs=["2"])
    assert q[0].weight.is_meta
    q.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(5, 4)
    torch.testing.assert_close(q.eval()(x), ref.eval()(x), rtol=0, atol=0)


def test_a_model_without_compute_layers_is_refused():
    with pytest.raises(ConversionError, match="no Conv1d/Conv2d/Conv3d/Linear layer"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), WEIGHTS_ONLY)


# -- hooks, subclasses, module names, modes, state dicts --------------------------------------------

HOOKS = ["forward", "forward_kwargs", "pre", "pre_kwargs", "backward", "always"]


@pytest.mark.parametrize("kind", HOOKS)
def test_hooks_move_to_the_quantized_layer_and_their_handles_still_work(kind):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls: List[str] = []
    layer = m[2]
    if kind == "forward":
        h = layer.register_forward_hook(lambda mod, i, o: calls.append(type(mod).__name__))
    elif kind == "forward_kwargs":
        h = layer.register_forward_hook(lambda mod, a, k, o: calls.append(type(mod).__name__),
                                        with_kwargs=True)
    elif kind == "pre":
        h = layer.register_forward_pre_hook(lambda mod, i: calls.append(type(mod).__name__))
    elif kind == "pre_kwargs":
        h = layer.register_forward_pre_hook(lambda mod, a, k: calls.append(type(mod).__name__),
                                            with_kwargs=True)
    elif kind == "always":
        h = layer.register_forward_hook(lambda mod, i, o: calls.append(type(mod).__name__),
                                        always_call=True)
    else:
        h = layer.register_full_backward_hook(lambda mod, gi, go: calls.append(type(mod).__name__))
    q = quantize_model(m, WITH_ACTS, inplace=True)
    x = torch.randn(3, 4, requires_grad=True)
    q(x).sum().backward()
    assert calls == ["QuantLinear"]
    h.remove()
    q(x).sum().backward()
    assert calls == ["QuantLinear"], "the caller's handle no longer removes the hook"


@pytest.mark.parametrize("hook", ["state_dict", "load_post"])
def test_state_dict_hooks_are_refused(hook):
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    if hook == "state_dict":
        m[1]._register_state_dict_hook(lambda mod, sd, prefix, local: None)
    else:
        m[1].register_load_state_dict_post_hook(lambda mod, keys: None)
    with pytest.raises(ConversionError, match=r"layer '1' has state-dict hooks"):
        quantize_model(m, WEIGHTS_ONLY)


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class ExtraParam(nn.Linear):
    def __init__(self, *a):
        super().__init__(*a)
        self.gain = nn.Parameter(torch.ones(1))


class PlainSubclass(nn.Linear):
    pass


@pytest.mark.parametrize("cls,ok,match", [
    (OwnForward, False, r"layer '1' is a OwnForward, a subclass of Linear with its own forward"),
    (ExtraParam, False, r"layer '1' \(ExtraParam\) holds \['gain'\]"),
    (PlainSubclass, True, None),
    (nn.modules.linear.NonDynamicallyQuantizableLinear, True, None)])
def test_subclasses_that_would_lose_something_are_refused(cls, ok, match):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), cls(4, 2))
    if ok:
        x = torch.randn(3, 4)
        q = quantize_model(m, WEIGHTS_ONLY, example_input=x)
        assert isinstance(q[1], qnn.QuantLinear)
        assert_same_forward(m, q, x)
    else:
        with pytest.raises(ConversionError, match=match):
            quantize_model(m, WEIGHTS_ONLY)
        q = quantize_model(m, WEIGHTS_ONLY, skip=("1",))
        assert type(q[1]) is cls


@pytest.mark.parametrize("key", ["a.b", "", 3])
def test_child_names_torch_refuses_are_refused(key):
    m = nn.Sequential(nn.Linear(4, 4))
    m._modules[key] = nn.Linear(4, 2)
    with pytest.raises(ConversionError, match=r"under the name .*add_module refuses"):
        quantize_model(m, WEIGHTS_ONLY)


def test_a_module_tree_with_a_cycle_is_refused():
    m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2)))
    m[1]._modules["back"] = m
    with pytest.raises(ConversionError, match=r"module '1\.back' is the model or one of its own ancestors.*cycle"):
        quantize_model(m, WEIGHTS_ONLY, inplace=True)


class Outside(nn.Module):
    """A compute layer the forward reaches other than through the module tree."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.listed = [self.a]          # a plain list: not a registration
        self.partial = functools.partial(self.a)  # a callable holding the float layer
        self.hidden = {"h": nn.Linear(4, 4)}

    def forward(self, x):
        if self.how == "list":
            x = self.listed[0](x)
        elif self.how == "partial":
            x = self.partial(x)
        elif self.how == "dict":
            x = self.hidden["h"](x)
        elif self.how == "created":
            torch.manual_seed(0)
            x = nn.Linear(4, 4)(x)
        return self.b(self.a(x))


@pytest.mark.parametrize("how,match", [
    ("list", r"layer 'a' still runs in float"), ("partial", r"layer 'a' still runs in float"),
    ("dict", r"a Linear\(in_features=4, out_features=4, bias=True\) that is not a submodule"),
    ("created", r"a Linear\(in_features=4, out_features=4, bias=True\) that is not a submodule")])
@pytest.mark.parametrize("inplace", [False, True])
def test_float_layers_reached_outside_the_module_tree_are_refused(how, match, inplace):
    m = Outside(how)
    x = torch.randn(3, 4)
    with pytest.raises(ConversionError, match=match):
        quantize_model(m, WEIGHTS_ONLY, example_input=x, inplace=inplace)
    assert type(m.a) is nn.Linear and type(m.b) is nn.Linear, "the refusal left a half conversion"
    if how in ("list", "partial"):
        quantize_model(Outside(how), WEIGHTS_ONLY, example_input=x, skip=("a",))
    quantize_model(Outside("none"), WEIGHTS_ONLY, example_input=x)


MODES = list(itertools.product([True, False], repeat=3))


@pytest.mark.parametrize("modes", MODES)
def test_train_and_eval_modes_are_kept_per_module(modes):
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    for layer, mode in zip(m, modes):
        layer.train(mode)
    q = quantize_model(m, WITH_ACTS, example_input=torch.randn(8, 4))
    assert tuple(layer.training for layer in q) == modes
    for i in (0, 2):  # (Brevitas shares stateless leaves such as TensorClamp between layers)
        assert q[i].weight_quant.training == q[i].input_quant.training == modes[i]
        assert quant_of(q[i]).training == modes[i]
    assert q.training == m.training


def test_state_dict_of_the_unconverted_parts_is_unchanged():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 9, 2))
    m[1].running_mean.uniform_()
    before = m.state_dict()
    q = quantize_model(m, WITH_ACTS, example_input=torch.rand(2, 3, 5, 5))
    after = q.state_dict()
    for k, v in before.items():
        assert k in after and torch.equal(after[k], v), k
    assert all(k.startswith(("0.", "4.")) for k in set(after) - set(before))


def test_a_copy_leaves_the_original_alone_and_inplace_keeps_its_parameters():
    torch.manual_seed(0)
    m = linear_chain(4, 3, aliases=[0])
    m.layers[1].requires_grad_(False)
    calls = []
    m.layers[2].register_forward_hook(lambda mod, i, o: calls.append(1))
    params = dict(m.named_parameters())
    state = copy.deepcopy(m.state_dict())
    q = quantize_model(m, WEIGHTS_ONLY)
    assert q is not m and float_layers(q) == {}
    assert all(type(l) is nn.Linear for l in m.layers) and m.alias0 is m.layers[0]
    assert dict(m.named_parameters()) == params
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert [p.requires_grad for p in m.parameters()] == [True, True, False, False, True, True]
    m(torch.randn(2, 4))
    assert calls == [1], "the original's hook moved away"
    opt = torch.optim.SGD(m.parameters(), lr=1.0)  # an optimizer built before converting
    q = quantize_model(m, WEIGHTS_ONLY, inplace=True)
    assert q is m and q.layers[0] is q.alias0 and float_layers(q) == {}
    assert all(dict(q.named_parameters())[n] is p for n, p in params.items())
    w0 = q.layers[0].weight.detach().clone()
    q.train()(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert not torch.equal(q.layers[0].weight, w0), "the old optimizer no longer moves the weights"


# -- swap_weight_quant ----------------------------------------------------------------------------

def brevitas_mlp(width=5, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(qnn.QuantLinear(4, width, bias=bias), nn.ReLU(),
                         qnn.QuantLinear(width, width, bias=bias), nn.ReLU(),
                         qnn.QuantLinear(width, 2, bias=bias))


@pytest.mark.parametrize("frozen", ["all", "w2"])
def test_swap_freezes_the_levels_of_frozen_weights(frozen):
    m = brevitas_mlp()
    if frozen == "all":
        m.requires_grad_(False)
    else:
        m[2].weight.requires_grad_(False)
    swap_weight_quant(m, WEIGHTS_ONLY)
    for i in (0, 2, 4):
        trainable = m[i].weight.requires_grad
        assert all(p.requires_grad is trainable for p in m[i].weight_quant.parameters()), i
    m.load_state_dict(m.state_dict())
    assert all(p.requires_grad is m[2].weight.requires_grad
               for p in m[2].weight_quant.parameters())


def test_swap_keeps_tied_weights_and_refuses_different_bits():
    torch.manual_seed(0)
    m = nn.Sequential(qnn.QuantLinear(5, 5, bias=True), nn.ReLU(),
                      qnn.QuantLinear(5, 5, bias=True), nn.ReLU(), qnn.QuantLinear(5, 2, bias=True))
    m[2].weight = m[0].weight
    swap_weight_quant(m, WEIGHTS_ONLY)
    assert m[0].weight is m[2].weight and m[0].weight_quant is not m[2].weight_quant
    assert torch.equal(quant_of(m[0]).r, quant_of(m[2]).r)
    with pytest.raises(ConversionError, match=r"\['0', '2'\] share one weight.*'0': 4, '2': 3"):
        swap_weight_quant(m, NMultConfig(weight_bits=3, act_bits=None, layer_bits={"0": 4}))


def test_swap_refuses_what_a_quantizer_cannot_take():
    m = brevitas_mlp()
    with torch.no_grad():
        m[2].weight[0, 0] = float("nan")
    with pytest.raises(ConversionError, match=r"layer '2': 1 of 25 values of its weight are NaN"):
        swap_weight_quant(m, WEIGHTS_ONLY)
    m = brevitas_mlp()
    P.weight_norm(m[2])
    with pytest.raises(ConversionError, match=r"layer '2' has parametrizations .*_WeightNorm"):
        swap_weight_quant(m, WEIGHTS_ONLY)
    m = brevitas_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m[2] = qnn.QuantLinear(5, 0, bias=True)
        m[4] = qnn.QuantLinear(0, 2, bias=True)
    with pytest.warns(UserWarning) as caught:
        swap_weight_quant(m, WEIGHTS_ONLY)
    assert [str(w.message)[:35] for w in caught] == ["layer '2' has an empty weight (0, 5",
                                                     "layer '4' has an empty weight (2, 0"]
    assert len(nmult_layers(m)) == 1


def test_swap_warns_when_one_quantizer_served_layers_with_different_weights():
    torch.manual_seed(0)
    a = qnn.QuantLinear(4, 4, bias=False)
    b = qnn.QuantLinear(4, 4, bias=False, weight_quant=a.weight_quant)
    m = nn.Sequential(a, b)
    with pytest.warns(UserWarning) as caught:
        swap_weight_quant(m, WEIGHTS_ONLY)
    assert [str(w.message)[:56] for w in caught] == [
        "layers ['0', '1'] share one Brevitas weight quantizer bu"]
    assert m[0].weight_quant is not m[1].weight_quant


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swap_converts_half_precision_layers(dtype):
    m = brevitas_mlp().to(dtype)
    swap_weight_quant(m, NMultConfig(weight_bits=3, act_bits=None, init="fit"))
    y = m.eval()(torch.randn(3, 4, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
