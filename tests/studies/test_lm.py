"""Language-model studies on a tiny transformer and a few hundred bytes of real text."""
import pytest
import torch

from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.studies.lm import (LMRecipe, chip_sweep_lm, fault_repair_lm, lm_nmult_config,
                                     ptq_lm, qat_lm, train_lm)
from qfv_brevitas.training.lm import evaluate_bpb
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.zoo.data import load_stdlib_text
from qfv_brevitas.zoo.lm import TinyLM


@pytest.fixture(scope="module")
def lm():
    """A tiny model trained briefly on the standard library's sources."""
    train, val, _ = load_stdlib_text(context=16, train_windows=4096, val_bytes=16 * 128, seed=0)
    torch.manual_seed(0)
    model = TinyLM(dim=32, layers=1, heads=2, context=16)
    before = evaluate_bpb(model, val)
    hist = train_lm(model, train, val, LMRecipe(epochs=2, lr=2e-2, batch_size=32),
                    progress=False)
    return model.eval(), train, val, before, hist


def _unigram_bpb(train, val) -> float:
    """Bits per byte of the training text's byte frequencies on the validation text."""
    counts = torch.bincount(train.tensors[1].reshape(-1), minlength=256).double() + 0.5
    logp = torch.log2(counts / counts.sum())
    return float(-logp[val.tensors[1].reshape(-1)].mean())


def test_training_learns_the_text(lm):
    model, train, val, before, hist = lm
    # random init predicts about uniformly (8 bits); after 256 steps the model beats the
    # training text's byte frequencies (about 5 bits per byte) on validation text: it uses
    # the context. The history records validation bits per byte per epoch.
    assert 7.5 < before < 8.5
    assert len(hist["test_bpb"]) == 2 and hist["test_bpb"][1] < hist["test_bpb"][0]
    assert hist["test_bpb"][-1] == pytest.approx(evaluate_bpb(model, val), rel=1e-5)
    assert hist["test_bpb"][-1] < _unigram_bpb(train, val) - 0.3


def test_ptq_scores_in_bits_per_byte_with_the_edges_at_8_bits(lm):
    model, train, val, _, _ = lm
    r = ptq_lm(model, train, val, 3)
    assert r.metric == "bpb" and "bits/byte" in r.table()
    assert r.float_acc == pytest.approx(evaluate_bpb(model, val), rel=1e-6)
    assert r.acc == pytest.approx(evaluate_bpb(r.model, val), rel=1e-6)
    assert r.baseline_acc == pytest.approx(evaluate_bpb(r.baseline_model, val), rel=1e-6)
    bits = {n: quant_of(l).bits for n, l in nmult_layers(r.model)}
    assert bits.pop("embed") == 8 and bits.pop("lm_head") == 8
    assert set(bits.values()) == {3} and len(bits) == 6
    assert all(quant_of(l).per_channel for _, l in nmult_layers(r.model))
    # quantization costs bits per byte, more at 2 bits than at 3
    r2 = ptq_lm(model, train, val, 2, baseline=None)
    assert r.float_acc < r.acc < r2.acc and r2.baseline_acc is None
    # GPTQ moves the weights (the scores change) and is scored the same way
    g = ptq_lm(model, train, val, 3, compensation="gptq", calib_samples=64)
    assert g.meta["compensation"] == "gptq" and g.acc != r.acc
    assert g.acc == pytest.approx(evaluate_bpb(g.model, val), rel=1e-6)


def test_qat_methods_start_from_the_same_float_model(lm):
    model, train, val, _, _ = lm
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small = torch.utils.data.Subset(train, range(64))
    scores = {}
    for method in ("paper", "both", "brevitas"):
        q, hist = qat_lm(model, small, val, 3, method, LMRecipe(epochs=1, lr=1e-3),
                         progress=False)
        scores[method] = hist["test_bpb"][-1]
        assert scores[method] == pytest.approx(evaluate_bpb(q, val), rel=1e-5)
        assert (hist["lambda"][0] > 0) == (method != "brevitas")      # the regularizer
        assert (len(nmult_layers(q)) == 8) == (method != "brevitas")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert len(set(scores.values())) == 3
    with pytest.raises(QfvError, match="QAT method"):
        qat_lm(model, small, val, 3, "lsq")


def test_chip_sweep_on_the_lm(lm):
    model, train, val, _, _ = lm
    q = ptq_lm(model, train, val, 4, baseline=None).model
    ideal = evaluate_bpb(q, val)
    rows = chip_sweep_lm(q, val, "faults", [0.0, 0.2], trials=2, seed=5, progress=False)
    assert [r["level"] for r in rows] == [0.0, 0.2] and rows[0]["bpb"] == [ideal, ideal]
    assert rows[1]["min"] > ideal + 0.05 and rows[1]["bpb"][0] != rows[1]["bpb"][1]
    again = chip_sweep_lm(q, val, "faults", [0.2], trials=2, seed=5, progress=False)
    assert again[0]["bpb"] == rows[1]["bpb"]                        # seeded maps
    var = chip_sweep_lm(q, val, "variability", [0.3], trials=1, seed=0, progress=False)
    assert var[0]["mean"] > ideal
    assert evaluate_bpb(q, val) == ideal                            # the model kept no map


def test_fault_repair_on_one_map(lm):
    model, train, val, _, _ = lm
    q = ptq_lm(model, train, val, 4, baseline=None).model
    r = fault_repair_lm(q, torch.utils.data.Subset(train, range(128)), val, 0.1, seed=1,
                        recipe=LMRecipe(epochs=1, lr=1e-3), progress=False)
    assert r["ideal"] == pytest.approx(evaluate_bpb(q, val))
    assert r["naive"] > r["ideal"] and r["aware"] < r["naive"]
    assert r["repaired"] < r["naive"]


def test_lm_config():
    c = lm_nmult_config(3)
    assert (c.weight_bits, c.per_channel, c.first_last_bits, c.act_bits, c.init) == \
        (3, True, 8, None, "fit")
    with pytest.raises(QfvError):
        lm_nmult_config(0)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_hugging_face_decoders_from_a_config(family):
    """A byte-level Llama / GPT-NeoX built from a config (no download): PTQ and the chip run on
    it as on the project's model, the embedding and the LM head at 8 bits."""
    pytest.importorskip("transformers")
    from qfv_brevitas.zoo.lm import hf_byte_lm

    train, val, _ = load_stdlib_text(context=16, train_windows=256, val_bytes=16 * 16, seed=0)
    model = hf_byte_lm(family, dim=32, layers=1, heads=2, context=16, seed=0)
    train_lm(model, train, None, LMRecipe(epochs=1, lr=1e-2), progress=False)
    r = ptq_lm(model, train, val, 3)
    bits = {n: quant_of(l).bits for n, l in nmult_layers(r.model)}
    edges = {n for n, b in bits.items() if b == 8}
    assert len(edges) == 2 and any("embed" in n for n in edges) and \
        any(n.endswith(("lm_head", "embed_out")) for n in edges)
    assert set(bits.values()) == {3, 8} and len(bits) > 2
    assert r.float_acc < 7.0 and r.acc == pytest.approx(evaluate_bpb(r.model, val), rel=1e-6)
    rows = chip_sweep_lm(r.model, val, "faults", [0.1], trials=1, progress=False)
    assert rows[0]["mean"] > r.acc
