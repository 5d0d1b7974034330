"""Embedding tables in ``quantize_model`` (plain torch, no ``transformers``): an
``nn.Embedding`` becomes a Brevitas ``QuantEmbedding`` with an N-multiplier weight quantizer
at the edge width, without input quantizer; ties to an LM head stay one Parameter; the
level fitting, the chip maps and the Brevitas uniform baseline take it; export refuses it by
name."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import brevitas.nn as qnn
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase

from qfv_brevitas import NMultConfig, nmult_layers, quant_of, quantize_model, swap_weight_quant
from qfv_brevitas.chip.faults import FaultModel, attach_faults, sample_fault_map
from qfv_brevitas.chip.variability import (VariabilityModel, attach_variability,
                                           sample_variability_map)
from qfv_brevitas.core.convert import ConversionError, edge_layers
from qfv_brevitas.export.api import ExportError, export_qonnx
from qfv_brevitas.studies.ptq import brevitas_uniform, level_errors
from qfv_brevitas.training.regularizer import regularization_loss

VOCAB, DIM, SEQ = 13, 8, 6
CFG = NMultConfig(weight_bits=3, act_bits=4, per_channel=True, init="fit")


class TinyLM(nn.Module):
    """Token and position embeddings, two Linear layers, an LM head (tied or not)."""

    def __init__(self, tied: bool = False, padding_idx=None):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
        self.pos = nn.Embedding(SEQ, DIM)
        self.fc1 = nn.Linear(DIM, 16)
        self.fc2 = nn.Linear(16, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


def ids(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def model(**kw) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(**kw).eval()


def bits_of(q: nn.Module) -> dict:
    return {n: quant_of(l).bits for n, l in nmult_layers(q)}


def snapped_rows(layer: nn.Module) -> torch.Tensor:
    """Each table entry's nearest level of its own row's levels, by brute force."""
    w, lv = layer.weight.detach(), quant_of(layer).levels().detach()
    idx = (w[:, :, None] - lv[:, None, :]).abs().argmin(-1)
    return lv.gather(1, idx)


@pytest.mark.parametrize("example", [True, False])
def test_embeddings_are_edge_layers_without_input_quantizers(example):
    q = quantize_model(model(), CFG, example_input=ids() if example else None)
    assert bits_of(q) == {"tok": 8, "pos": 8, "fc1": 3, "fc2": 3, "head": 8}
    for name in ("tok", "pos"):
        emb = getattr(q, name)
        assert type(emb) is qnn.QuantEmbedding and quant_of(emb).per_channel
        assert not any(isinstance(m, ActQuantProxyFromInjectorBase) for m in emb.modules())
    assert q.fc1.input_quant.is_quant_enabled and q.head.input_quant.is_quant_enabled


def test_edge_layers_are_first_last_and_every_embedding():
    m = model()
    assert edge_layers(m, ["fc1", "tok", "fc2", "pos", "head"]) == {"fc1", "tok", "pos", "head"}
    assert edge_layers(m, ["fc1", "fc2"]) == {"fc1", "fc2"} and edge_layers(m, []) == set()


def test_an_embedding_looks_up_rows_snapped_to_their_own_levels():
    m, x = model(padding_idx=0), ids()
    q = quantize_model(m, CFG, example_input=x)
    assert q.tok.padding_idx == 0 and quant_of(q.tok).levels().shape[0] == VOCAB
    with torch.no_grad():
        torch.testing.assert_close(q.tok(x), snapped_rows(q.tok)[x], rtol=0, atol=0)
        assert not torch.equal(q.tok(x), m.tok(x))  # the check compares quantized values
    rows = {r["layer"]: r for r in level_errors(q, lloyd=False)}
    assert rows["tok"]["num_weights"] == VOCAB * DIM and rows["tok"]["per_channel"]
    assert rows["tok"]["mse"] <= rows["tok"]["uniform_mse"] * (1 + 1e-6)


def test_a_tied_lm_head_stays_one_parameter_and_the_source_is_untouched():
    m = model(tied=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both ends converted: no "reads the float values"
        q = quantize_model(m, CFG, example_input=ids())
    assert q.head.weight is q.tok.weight and bits_of(q)["head"] == bits_of(q)["tok"] == 8
    assert type(m.tok) is nn.Embedding and m.head.weight is m.tok.weight
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    loss = q.train()(ids()).pow(2).mean() + regularization_loss(q)
    loss.backward()
    opt.step()
    assert q.head.weight is q.tok.weight
    assert not torch.equal(q.tok.weight, before["tok.weight"])
    with pytest.raises(ConversionError, match=r"share one weight Parameter.*'tok': 8.*'head': 4"):
        quantize_model(m, NMultConfig(weight_bits=3, layer_bits={"head": 4}), example_input=ids())


@pytest.mark.parametrize("kw,what", [({"max_norm": 1.0}, "max_norm"), ({"sparse": True}, "sparse")])
def test_embeddings_that_cannot_be_kept_are_refused_by_name(kw, what):
    m = model()
    m.pos = nn.Embedding(SEQ, DIM, **kw)
    with pytest.raises(ConversionError, match=rf"layer 'pos' \(Embedding\) has {what}"):
        quantize_model(m, CFG)
    q = quantize_model(m, CFG, skip=("pos",))
    assert type(q.pos) is nn.Embedding and bits_of(q)["tok"] == 8


def test_an_existing_quant_embedding_is_refused_and_swap_takes_it():
    m = model()
    m.tok = qnn.QuantEmbedding(VOCAB, DIM)
    with pytest.raises(ConversionError, match=r"layer 'tok' is already a Brevitas layer"):
        quantize_model(m, CFG)
    swap_weight_quant(m, NMultConfig(weight_bits=5))
    assert bits_of(m) == {"tok": 5}


@pytest.mark.parametrize("how", ["convert", "swap"])
def test_the_integer_view_leaves_the_lookup_plain(how):
    x = ids()
    if how == "convert":
        q = quantize_model(model(), NMultConfig(weight_bits=3, per_channel=True,
                                                frac_bits=8), example_input=x)
    else:
        q = model()
        q.tok = qnn.QuantEmbedding(VOCAB, DIM).eval()
        swap_weight_quant(q, NMultConfig(weight_bits=4, per_channel=True, frac_bits=6))
    assert quant_of(q.tok).integer_view
    with torch.no_grad():
        out = q.tok(x)
        assert type(out) is torch.Tensor
        torch.testing.assert_close(out, snapped_rows(q.tok)[x], rtol=0, atol=0)


def test_fault_and_variability_maps_reach_the_embedding():
    q, x = quantize_model(model(), CFG, example_input=ids()), ids()
    with torch.no_grad():
        ref = q(x)
        fmap = sample_fault_map(q, FaultModel(rate=0.0, seed=0))
        assert fmap.shapes["tok"] == (VOCAB, DIM) and fmap.bits["tok"] == 8
        attach_faults(q, fmap)
        torch.testing.assert_close(q(x), ref, rtol=0, atol=0)
        attach_faults(q, sample_fault_map(q, FaultModel(rate=0.2, layer_rates={
            n: 0.0 for n in ("pos", "fc1", "fc2", "head")}, seed=1)))
        assert quant_of(q.tok).chip.has_faults
        assert not torch.equal(q.tok(x), snapped_rows(q.tok)[x])
        q2 = quantize_model(model(), CFG, example_input=x)
        attach_variability(q2, sample_variability_map(q2, VariabilityModel(sigma=0.3, seed=0)))
        assert quant_of(q2.tok).chip.has_variability
        assert not torch.equal(q2.tok(x), snapped_rows(q2.tok)[x])


def test_export_refuses_an_embedding_by_name(tmp_path):
    q = quantize_model(model(), CFG, example_input=ids())
    with pytest.raises(ExportError, match=r"layer 'tok' is a QuantEmbedding"):
        export_qonnx(q, ids(), tmp_path / "lm.onnx")
    assert not (tmp_path / "lm.onnx").exists()


@pytest.mark.parametrize("scale", ["max", "mse"])
def test_the_brevitas_baseline_quantizes_embeddings_per_row_and_keeps_ties(scale):
    m, x = model(tied=True), ids()
    b = brevitas_uniform(m, 3, per_channel=True, act_bits=4, example_input=x, scale=scale)
    assert type(b.tok) is qnn.QuantEmbedding and b.head.weight is b.tok.weight
    proxy = b.tok.weight_quant  # hands the layer plain tensors: ask for a quant tensor
    assert proxy.skip_create_quant_tensor and int(b.fc1.weight_quant.bit_width()) == 3
    with torch.no_grad():
        w = proxy(b.tok.weight)
        assert torch.equal(b.tok(x), w[x]) and not torch.equal(w, b.tok.weight)
        proxy.skip_create_quant_tensor = False
        qt = proxy(b.tok.weight)
    assert int(qt.bit_width) == 8 and qt.scale.shape == (VOCAB, 1)  # one scale per row
