"""Hugging Face ``transformers`` decoder models (built from a config, no download) in
``quantize_model``, the Brevitas uniform baseline and Brevitas' GPTQ: which layer gets which
bits, ties, GPT-2's ``Conv1D``, outputs of an 8-bit conversion against the float model."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import brevitas.nn as qnn  # noqa: E402

from qfv_brevitas import NMultConfig, nmult_layers, quant_of, quantize_model  # noqa: E402
from qfv_brevitas.core.convert import ConversionError  # noqa: E402
from qfv_brevitas.core.hf import conv1d_to_linear, is_hf_conv1d  # noqa: E402
from qfv_brevitas.studies.calibration import apply_toolbox  # noqa: E402
from qfv_brevitas.studies.ptq import brevitas_uniform  # noqa: E402

VOCAB = 64
W3 = NMultConfig(weight_bits=3, act_bits=None, per_channel=True, init="fit")


def tiny(kind: str, tied: bool = False) -> nn.Module:
    """A two-layer decoder of ``kind`` (``llama``, ``neox``, ``gpt2``), random init, eval."""
    logging.getLogger("transformers").setLevel(logging.ERROR)  # GPT-2's token-id notices
    t = transformers
    if kind == "llama":
        cfg = t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, tie_word_embeddings=tied)
    elif kind == "neox":
        cfg = t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64, tie_word_embeddings=tied)
    else:
        cfg = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return t.AutoModelForCausalLM.from_config(cfg).eval()


def ids(seed: int = 0, batch: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 12), generator=torch.Generator().manual_seed(seed))


def bits_of(q: nn.Module) -> dict:
    return {n: quant_of(l).bits for n, l in nmult_layers(q)}


def logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x).logits


@pytest.mark.parametrize("kind,emb", [("llama", "model.embed_tokens"),
                                      ("neox", "gpt_neox.embed_in")])
def test_projections_get_n_bits_and_embedding_and_head_the_edge_width(kind, emb):
    m = tiny(kind)
    q = quantize_model(m, W3, example_input=ids())
    bits = bits_of(q)
    linears = [n for n, l in m.named_modules() if isinstance(l, nn.Linear)]
    assert set(bits) == set(linears) | {emb}
    assert {n for n, b in bits.items() if b == 8} == {emb, "lm_head"}
    assert all(b == 3 for n, b in bits.items() if n not in (emb, "lm_head"))
    assert all(quant_of(l).per_channel for _, l in nmult_layers(q))
    assert type(q.get_submodule(emb)) is qnn.QuantEmbedding
    assert not any(type(l) is nn.Linear for l in q.modules())


@pytest.mark.parametrize("kind", ["llama", "neox"])
def test_an_8_bit_conversion_computes_close_to_float(kind):
    m, x = tiny(kind), ids(1)
    ref = logits(m, x)
    # the best uniform grid: an 8-bit fit of every layer costs a minute here, and is not checked
    err = {b: (logits(quantize_model(m, NMultConfig(weight_bits=b, first_last_bits=b,
                                                        act_bits=None, per_channel=True,
                                                        init="uniform"),
                                     example_input=x), x) - ref).abs().max()
           for b in (8, 2)}
    assert err[8] < 0.01 * ref.abs().max()
    assert err[8] < err[2] / 20  # the comparison sees quantization


def test_tied_embeddings_stay_tied_through_conversion_and_training():
    m = tiny("llama", tied=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    before = m.lm_head.weight.detach().clone()
    q = quantize_model(m, W3, example_input=ids())
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert type(m.model.embed_tokens) is nn.Embedding and type(m.lm_head) is nn.Linear
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.equal(m.lm_head.weight, before)
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    q.train()(ids(), labels=ids()).loss.backward()
    opt.step()
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert not torch.equal(q.lm_head.weight, before)


def test_gpt2_conv1d_is_refused_by_name_and_the_helper_replaces_it():
    m, x = tiny("gpt2"), ids()
    with pytest.raises(ConversionError, match=r"'transformer\.h\.0\.attn\.c_attn' is a "
                                              r"transformers Conv1D.*conv1d_to_linear"):
        quantize_model(m, W3, example_input=x)
    ref = logits(m, x)
    w = m.transformer.h[0].mlp.c_fc.weight.detach().clone()
    replaced = conv1d_to_linear(m)
    assert len(replaced) == 8 and replaced[0] == "transformer.h.0.attn.c_attn"
    assert not any(is_hf_conv1d(l) for l in m.modules())
    fc = m.transformer.h[0].mlp.c_fc
    assert type(fc) is nn.Linear and torch.equal(fc.weight, w.t())
    torch.testing.assert_close(logits(m, x), ref, rtol=1e-5, atol=1e-5)
    bits = bits_of(quantize_model(m, W3, example_input=x))
    assert {n for n, b in bits.items() if b == 8} == {"transformer.wte", "transformer.wpe",
                                                      "lm_head"}
    assert bits["transformer.h.1.mlp.c_proj"] == 3 and len(bits) == 11


def test_conv1d_with_a_shared_weight_is_refused():
    m = tiny("gpt2")
    m.transformer.h[1].attn.c_proj.weight = m.transformer.h[0].attn.c_proj.weight
    with pytest.raises(ConversionError, match=r"'transformer\.h\.0\.attn\.c_proj' \(Conv1D\) "
                                              r"shares its weight"):
        conv1d_to_linear(m)
    assert is_hf_conv1d(m.transformer.h[0].attn.c_attn)  # nothing replaced


@pytest.mark.parametrize("scale", ["max", "mse"])
def test_the_brevitas_uniform_baseline_takes_a_decoder(scale):
    m, x = tiny("llama", tied=True), ids()
    b = brevitas_uniform(m, 3, per_channel=True, example_input=x, scale=scale)
    assert type(b.model.embed_tokens) is qnn.QuantEmbedding
    assert b.lm_head.weight is b.model.embed_tokens.weight
    assert int(b.model.layers[0].self_attn.q_proj.weight_quant.bit_width()) == 3
    assert int(b.lm_head.weight_quant.bit_width()) == 8
    err = (logits(b, x) - logits(m, x)).abs().max()
    assert 0 < err < logits(m, x).abs().max()


@pytest.mark.parametrize("which", ["nmult", "uniform"])
def test_gptq_runs_on_a_decoder_and_leaves_an_untied_embedding_alone(which):
    m, x = tiny("neox"), ids()
    q = quantize_model(m, W3, example_input=x) if which == "nmult" else \
        brevitas_uniform(m, 3, per_channel=True, example_input=x, scale="mse")
    w0 = {n: p.detach().clone() for n, p in q.named_parameters() if n.endswith(".weight")}
    before = logits(q, ids(5))
    apply_toolbox(q, [ids(2), ids(3)], compensation="gptq")
    moved = {n for n, p in q.named_parameters() if n in w0 and not torch.equal(p, w0[n])}
    # Brevitas' GPTQ compensates Linear/Conv layers; the embedding is left as it is
    assert "gpt_neox.embed_in.weight" not in moved
    assert {"gpt_neox.layers.0.attention.query_key_value.weight", "lm_head.weight"} <= moved
    assert not torch.equal(logits(q, ids(5)), before)
    if which == "nmult":  # every compensated weight still deploys to a level
        layer = q.gpt_neox.layers[1].mlp.dense_4h_to_h
        tq = quant_of(layer)
        snapped = tq.snap(layer.weight)
        lv = tq.levels()
        assert all(bool(torch.isin(snapped[i], lv[i]).all()) for i in range(lv.shape[0]))
