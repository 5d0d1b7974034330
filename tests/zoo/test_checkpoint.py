"""Tests of ``qfv_brevitas.zoo.checkpoint``: save a reference model (quantized or float) with what
is needed to rebuild it, load it back, and refuse files that are damaged, foreign or that do
not fit the configuration they carry."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from qfv_brevitas import NMultConfig, nmult_layers, quant_of, quantize_model, regularization_loss
from qfv_brevitas.zoo.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from qfv_brevitas.core.convert import unsigned_input_layers
from qfv_brevitas.util.safeio import content_digest
from qfv_brevitas.zoo.models import build_model

SHAPE = (1, 8, 8)
CLASSES = 10


def train_a_little(model: nn.Module, steps: int, seed: int = 0) -> None:
    """A few SGD steps (CE + regularizer) so that weights, r, c, activation scales and
    BatchNorm statistics all differ from their initial values."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, *SHAPE, generator=g)
        y = torch.randint(0, CLASSES, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        if nmult_layers(model):
            loss = loss + 10.0 * regularization_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def quantized_small_cnn(cfg: NMultConfig, steps: int = 4) -> nn.Module:
    torch.manual_seed(0)
    m = build_model("small_cnn", SHAPE, CLASSES)
    # Signed example input: the first conv gets a signed input quantizer, the rest (after
    # ReLUs) unsigned ones.
    x = torch.rand(8, *SHAPE) * 2 - 1
    q = quantize_model(m, cfg, example_input=x)
    train_a_little(q, steps)
    return q


def eval_out(model: nn.Module, seed: int = 7) -> torch.Tensor:
    x = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(x)


# act_collect_stats_steps=2 < 4 steps: activation scales are learned parameters by now;
# 30 > 4 steps: saved while Brevitas is still collecting statistics.
@pytest.mark.parametrize("stats_steps", [2, 30])
def test_quantized_round_trip(tmp_path, stats_steps):
    cfg = NMultConfig(weight_bits=4, act_bits=4, act_collect_stats_steps=stats_steps)
    q = quantized_small_cnn(cfg)
    unsigned = unsigned_input_layers(q)
    assert unsigned and "features.0" not in unsigned  # some, not all, layers unsigned
    assert q.features[0].input_quant.is_signed is True
    ref = eval_out(q)
    path = save_checkpoint(tmp_path / "sub" / "q.pt", q, "small_cnn", SHAPE, CLASSES, cfg,
                           epoch=3, note="hi")
    assert path.is_file()
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    assert torch.equal(eval_out(loaded), ref)
    assert info["config"] == cfg and info["config"] is not cfg
    assert info["arch"] == "small_cnn" and tuple(info["input_shape"]) == SHAPE
    assert info["num_classes"] == CLASSES and info["meta"] == {"epoch": 3, "note": "hi"}
    assert unsigned_input_layers(loaded) == unsigned
    assert loaded.features[0].input_quant.is_signed is True
    ql = dict(nmult_layers(loaded))
    assert sorted(ql) == sorted(n for n, _ in nmult_layers(q))
    for n, l in nmult_layers(q):
        a, b = quant_of(l), quant_of(ql[n])
        assert a.config_dict() == b.config_dict(), n
        assert torch.equal(a.r, b.r) and torch.equal(a.c, b.c), n
        assert torch.equal(l.weight, ql[n].weight), n
    assert {n: quant_of(l).bits for n, l in ql.items()} == {
        "features.0": 8, "features.3": 4, "features.7": 4, "classifier.1": 4, "classifier.3": 8}
    sd0, sd1 = q.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k, v in sd0.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sd1[k]), k


@pytest.mark.parametrize("variant,per_channel,act_bits,mode", [
    ("step", True, None, "paper"), ("fixed", False, 4, "paper"), ("nmult", True, 3, "ste")])
def test_round_trip_variants(tmp_path, variant, per_channel, act_bits, mode):
    cfg = NMultConfig(weight_bits=3, act_bits=act_bits, variant=variant, mode=mode,
                      per_channel=per_channel, layer_bits={"features.7": 2},
                      act_collect_stats_steps=2)
    q = quantized_small_cnn(cfg, steps=3)
    ref = eval_out(q)
    loaded, info = load_checkpoint(save_checkpoint(tmp_path / "q.pt", q, "small_cnn", SHAPE,
                                                   CLASSES, cfg))
    assert info["config"] == cfg
    assert torch.equal(eval_out(loaded), ref)
    for n, l in nmult_layers(loaded):
        assert quant_of(l).config_dict() == quant_of(q.get_submodule(n)).config_dict(), n
    assert quant_of(loaded.features[7]).bits == 2
    assert unsigned_input_layers(loaded) == unsigned_input_layers(q)


def test_round_trip_restores_trained_quantizer_state(tmp_path):
    """The loaded r/c are the trained ones, not a fresh LSQ initialisation from the weights."""
    cfg = NMultConfig(weight_bits=3, act_bits=4, act_collect_stats_steps=2)
    q = quantized_small_cnn(cfg)
    with torch.no_grad():  # make r/c clearly differ from anything an init would give
        for _, l in nmult_layers(q):
            quant_of(l).r.mul_(1.5)
            quant_of(l).c.add_(0.01)
    ref = eval_out(q)
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "q.pt", q, "small_cnn", SHAPE,
                                                CLASSES, cfg))
    for n, l in nmult_layers(loaded):
        assert torch.equal(quant_of(l).r, quant_of(q.get_submodule(n)).r), n
    assert torch.equal(eval_out(loaded), ref)


def test_round_trip_of_untrained_quantized_model(tmp_path):
    cfg = NMultConfig(weight_bits=4, act_bits=4)
    torch.manual_seed(0)
    q = quantize_model(build_model("small_cnn", SHAPE, CLASSES), cfg,
                       example_input=torch.rand(4, *SHAPE))
    ref = eval_out(q)
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "q.pt", q, "small_cnn", SHAPE,
                                                CLASSES, cfg))
    assert torch.equal(eval_out(loaded), ref)


def test_float_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_model("small_cnn", SHAPE, CLASSES)
    train_a_little(m, 3)
    ref = eval_out(m)
    loaded, info = load_checkpoint(save_checkpoint(tmp_path / "f.pt", m, "small_cnn", SHAPE,
                                                   CLASSES))
    assert info["config"] is None
    assert nmult_layers(loaded) == []
    assert type(loaded.features[0]) is nn.Conv2d
    assert torch.equal(eval_out(loaded), ref)
    # BatchNorm statistics came back too (they differ from a fresh model's).
    assert torch.equal(loaded.features[1].running_mean, m.features[1].running_mean)
    assert not torch.equal(loaded.features[1].running_mean,
                           torch.zeros_like(loaded.features[1].running_mean))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="corrupt.pt") as e:
        load_checkpoint(path)
    assert "not a readable checkpoint" in str(e.value)
    # A truncated real checkpoint too.
    torch.manual_seed(0)
    good = save_checkpoint(tmp_path / "good.pt", build_model("mlp", SHAPE, CLASSES), "mlp",
                           SHAPE, CLASSES)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(cut)


def test_foreign_torch_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "plain.pt"
    torch.save(build_model("small_cnn", SHAPE, CLASSES).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"plain\.pt.*not a qfv-brevitas checkpoint"):
        load_checkpoint(path)
    path2 = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path2)
    with pytest.raises(CheckpointError, match=r"tensor\.pt"):
        load_checkpoint(path2)
    path3 = tmp_path / "other_format.pt"
    torch.save({"format": "something/9", "state_dict": {}}, path3)
    with pytest.raises(CheckpointError, match=FORMAT):
        load_checkpoint(path3)


def _edit(path, **changes):
    """Change entries of a checkpoint and re-seal its checksum (a deliberate edit, so that the
    check under test is the one that fires, not the checksum)."""
    ckpt = torch.load(path, weights_only=True)
    for k, v in changes.items():
        if k == "config":
            ckpt["config"].update(v)
        else:
            ckpt[k] = v
    ckpt["sha256"] = content_digest(ckpt)
    torch.save(ckpt, path)


def test_config_mismatch(tmp_path):
    cfg = NMultConfig(weight_bits=4, act_bits=4, act_collect_stats_steps=2)
    q = quantized_small_cnn(cfg, steps=3)
    path = save_checkpoint(tmp_path / "q.pt", q, "small_cnn", SHAPE, CLASSES, cfg)
    assert load_checkpoint(path)[1]["config"] == cfg  # the unedited file loads
    _edit(path, config={"weight_bits": 3})
    with pytest.raises((CheckpointError, ValueError), match=r"q\.pt") as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "does not fit" in msg
    # Names the layer and the mismatch.
    assert "bits is 4 in the checkpoint but 3 in the model" in msg
    assert "features.3" in msg


def test_per_channel_mismatch(tmp_path):
    cfg = NMultConfig(weight_bits=3, act_bits=4, act_collect_stats_steps=2)
    q = quantized_small_cnn(cfg, steps=3)
    path = save_checkpoint(tmp_path / "q.pt", q, "small_cnn", SHAPE, CLASSES, cfg)
    _edit(path, config={"per_channel": True})
    with pytest.raises((CheckpointError, ValueError), match=r"q\.pt.*does not fit"):
        load_checkpoint(path)


def test_variant_mismatch_is_refused(tmp_path):
    """Same tensor shapes, different meaning: caught by the quantizer's extra state."""
    cfg = NMultConfig(weight_bits=3, act_bits=4, variant="fixed", act_collect_stats_steps=2)
    q = quantized_small_cnn(cfg, steps=3)
    path = save_checkpoint(tmp_path / "q.pt", q, "small_cnn", SHAPE, CLASSES, cfg)
    # "fixed" keeps r/c as buffers and "nmult" as parameters: the same state-dict keys.
    _edit(path, config={"variant": "nmult"})
    with pytest.raises((CheckpointError, ValueError), match="variant") as e:
        load_checkpoint(path)
    assert "q.pt" in str(e.value)


def test_arch_mismatch(tmp_path):
    torch.manual_seed(0)
    m = build_model("mlp", SHAPE, CLASSES)
    path = save_checkpoint(tmp_path / "m.pt", m, "mlp", SHAPE, CLASSES)
    _edit(path, arch="small_cnn")
    with pytest.raises(CheckpointError, match=r"m\.pt.*does not fit"):
        load_checkpoint(path)
