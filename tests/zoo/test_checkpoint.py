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


# -- budgets before work (issue 22): settings that size the model, checked before it is built ---

def _float_mlp(tmp_path):
    torch.manual_seed(0)
    m = build_model("mlp", SHAPE, CLASSES)
    return save_checkpoint(tmp_path / "m.pt", m, "mlp", SHAPE, CLASSES, data_seed=3)


def test_a_model_larger_than_its_weights_is_never_built(tmp_path, monkeypatch):
    """num_classes 10**5: the last layer would hold 6.4M weights where the file has 650; the
    meta-device model says so before the real one is built."""
    import qfv_brevitas.zoo.checkpoint as ck

    path = _float_mlp(tmp_path)
    _edit(path, num_classes=10 ** 5)
    built = []
    real = ck.build_model
    monkeypatch.setattr(ck, "build_model", lambda *a, **k: built.append(
        torch.empty(0).device.type) or real(*a, **k))
    with pytest.raises(CheckpointError, match=r"m\.pt: does not fit its model: 'net\.5\.weight' "
                                              r"has shape \(10, 64\) in the file but "
                                              r"\(100000, 64\) in the model 'mlp' for inputs "
                                              r"\(1, 8, 8\) and 100000 classes"):
        load_checkpoint(path)
    assert built == ["meta"]  # built once, on the meta device only


def test_a_model_with_more_values_than_the_file_is_refused(tmp_path):
    path = _float_mlp(tmp_path)
    _edit(path, arch="resnet18")  # none of its 11M values are in the file
    with pytest.raises(CheckpointError, match=r"m\.pt: does not fit its model: the model "
                                              r"'resnet18' .* holds 11\d{6} values, the "
                                              r"file's weights 8970;"):
        load_checkpoint(path)


def test_missing_tensors_are_allowed_up_to_a_few_values(tmp_path, monkeypatch):
    """An older file may lack a few small tensors (Brevitas' activation scales): the model may
    hold MISSING_VALUES more values than the file, not one more."""
    import qfv_brevitas.zoo.checkpoint as ck

    path = _float_mlp(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ref = build_model("mlp", SHAPE, CLASSES).state_dict()
    dropped = {k: v for k, v in ref.items() if k != "net.5.bias"}
    ckpt["state_dict"] = dropped
    ckpt["sha256"] = content_digest(ckpt)
    torch.save(ckpt, path)
    monkeypatch.setattr(ck, "MISSING_VALUES", CLASSES)  # exactly the missing bias
    with pytest.raises(CheckpointError, match="Missing key"):  # load_state_dict's own words
        load_checkpoint(path)
    monkeypatch.setattr(ck, "MISSING_VALUES", CLASSES - 1)
    with pytest.raises(CheckpointError, match=r"holds \d+ values, the file's weights"):
        load_checkpoint(path)


def test_settings_that_size_the_work_are_capped(tmp_path):
    from qfv_brevitas.util.budgets import MAX_INPUT_VALUES

    path = _float_mlp(tmp_path)
    for shape, ok in (([1, 2048, 2048], True), ([1, 2048, 2049], False), ([1] * 8, True),
                      ([1] * 9, False)):
        _edit(path, input_shape=shape)
        if ok:  # within the caps: refused later, by the model's shapes
            with pytest.raises(CheckpointError, match="does not fit its model"):
                load_checkpoint(path)
        else:
            with pytest.raises(CheckpointError, match=rf"'input_shape' .* is refused: at most "
                                                      rf"{MAX_INPUT_VALUES} values"):
                load_checkpoint(path)
    assert 2048 * 2048 == MAX_INPUT_VALUES


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 1.5, "0", True, 10 ** 40])
def test_a_data_seed_that_is_no_seed_is_refused(tmp_path, seed):
    path = _float_mlp(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["meta"]["data_seed"] = seed
    ckpt["sha256"] = content_digest(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"meta 'data_seed' must be an int in 0\.\.2\*\*32-1"):
        load_checkpoint(path)


def test_spiking_time_steps_are_capped(tmp_path):
    pytest.importorskip("spikingjelly")
    import qfv_brevitas.snn  # noqa: F401  (registers the spiking models)
    from qfv_brevitas.util.budgets import MAX_SPIKING_VALUES, MAX_TIME_STEPS

    m = build_model("spiking_mlp", SHAPE, CLASSES, snn={"T": 2})
    path = save_checkpoint(tmp_path / "s.pt", m, "spiking_mlp", SHAPE, CLASSES,
                           snn={"T": MAX_TIME_STEPS})
    assert load_checkpoint(path)[0].config.T == MAX_TIME_STEPS
    for steps in (MAX_TIME_STEPS + 1, float("inf")):
        ckpt = torch.load(path, weights_only=True)
        ckpt["meta"]["snn"]["T"] = steps
        ckpt["sha256"] = content_digest(ckpt)
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError, match=r"s\.pt: the checkpoint's spiking setting T="):
            load_checkpoint(path)
    ckpt["meta"]["snn"]["T"] = MAX_TIME_STEPS
    ckpt["input_shape"] = [1, 64, 65]  # T x 4160 values > MAX_SPIKING_VALUES
    ckpt["sha256"] = content_digest(ckpt)
    torch.save(ckpt, path)
    assert MAX_TIME_STEPS * 64 * 65 > MAX_SPIKING_VALUES >= MAX_TIME_STEPS * 64
    with pytest.raises(CheckpointError, match="steps x values per sample at most"):
        load_checkpoint(path)


def test_the_meta_check_falls_back_to_the_float_model(tmp_path, monkeypatch):
    """A quantizer without meta kernels: the float model on the meta device still bounds the
    weights, and a good file still loads."""
    import qfv_brevitas.zoo.checkpoint as ck

    cfg = NMultConfig(weight_bits=3, act_bits=4, act_collect_stats_steps=2)
    q = quantized_small_cnn(cfg, steps=1)
    path = save_checkpoint(tmp_path / "q.pt", q, "small_cnn", SHAPE, CLASSES, cfg)
    real = ck.quantize_model

    def no_meta(model, *a, **k):
        if next(model.parameters()).is_meta:
            raise NotImplementedError("no meta kernel")
        return real(model, *a, **k)

    monkeypatch.setattr(ck, "quantize_model", no_meta)
    assert torch.equal(eval_out(load_checkpoint(path)[0]), eval_out(q))
    _edit(path, num_classes=10 ** 5)
    with pytest.raises(CheckpointError, match=r"'classifier\.3\.weight' has shape \(10, 64\) in "
                                              r"the file but \(100000, 64\)"):
        load_checkpoint(path)
