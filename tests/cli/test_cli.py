"""The qfv command: demo/train on digits and IDX files, report, and its errors."""
import json

import pytest

from qfv_brevitas.zoo.checkpoint import load_checkpoint
from qfv_brevitas.cli.app import main

FAST = ["--float-epochs", "3", "--qat-epochs", "2", "--lambda-rise-epochs", "1", "--no-progress"]


def test_demo_writes_table_json_png_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--bits", "3", "--variants", "fixed", "nmult",
                 *FAST]) == 0
    printed = capsys.readouterr().out
    for row in ("float", "fixed W3A3", "nmult W3A3"):
        assert row in printed
    res = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["weight_bits"]) for r in res["runs"]] == [("fixed", 3), ("nmult", 3)]
    assert res["fp_acc"] > 0.5  # 3 float epochs on digits already learn (chance is 0.1)
    for r in res["runs"]:
        assert r["delta_vs_fp"] == pytest.approx(r["acc"] - res["fp_acc"])
        assert len(r["history"]["lambda"]) == 2
    png = (out / "levels.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    model, info = load_checkpoint(out / "nmult_w3a3.pt")
    assert info["config"].weight_bits == 3
    # The saved accuracy is what the rebuilt model gives.
    from qfv_brevitas.zoo.data import load_digits_split
    from qfv_brevitas.training.train import evaluate
    assert evaluate(model, load_digits_split(0)[1]) == pytest.approx(res["runs"][1]["acc"])
    assert main(["report", str(out / "nmult_w3a3.pt")]) == 0
    rep = capsys.readouterr().out
    assert "features.3" in rep and "nmult" in rep


def test_train_on_idx_folder(idx_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--dataset", "idx", "--data-dir", str(idx_folder), "--out", str(out),
                 "--bits", "4", "--variants", "nmult", *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "idx" and res["num_train"] == 200 and res["num_test"] == 60
    assert res["runs"][0]["acc"] > 0.9


def test_train_on_the_integer_view(tmp_path, capsys):
    """``qfv train --frac-bits``: every N-multiplier layer trains on its grid 2**-f and the
    checkpoint's layers hand out IntQuantTensors; a bad f is an argument error."""
    from brevitas.quant_tensor import IntQuantTensor

    from qfv_brevitas import nmult_layers, quant_of
    from qfv_brevitas.zoo.checkpoint import load_checkpoint

    out = tmp_path / "out"
    assert main(["train", "--model", "mlp", "--out", str(out), "--bits", "3", "--variants",
                 "nmult", "--frac-bits", "auto", *FAST]) == 0
    model, info = load_checkpoint(out / "nmult_w3a3.pt")
    assert info["config"].frac_bits == "auto"
    layers = nmult_layers(model.eval())
    assert layers and all(quant_of(l).frac_bits is not None for _, l in layers)
    assert all(isinstance(l.quant_weight(), IntQuantTensor) for _, l in layers)
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "o"), "--frac-bits", "21", *FAST])
    assert "0..20" in capsys.readouterr().err


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    assert main(["train", "--dataset", "idx", "--out", str(tmp_path / "o")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["train", "--dataset", "idx", "--data-dir", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err
    with pytest.raises(SystemExit):
        main(["demo", "--bits", "9", "--out", str(tmp_path), *FAST, "--variants", "banana"])
    assert main(["demo", "--bits", "9", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "1..8" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["report", str(bad)]) == 2
    assert "bad.pt" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--bits", "4", "--variants", "nmult",
                 "--float-epochs", "6", "--qat-epochs", "3", "--lambda-rise-epochs", "1",
                 "--no-progress"]) == 0
    return out / "nmult_w4a4.pt"


def test_faults_sample_finetune_eval_compare(trained_ckpt, tmp_path, capsys):
    fmap = tmp_path / "chip.pt"
    assert main(["faults", "sample", str(trained_ckpt), "--rate", "0.1", "--seed", "3",
                 "--out", str(fmap)]) == 0
    from qfv_brevitas.chip.faults import FaultMap
    m = FaultMap.load(fmap)
    # --layers inner (default): the 8-bit first and last layers stay fault-free.
    assert m.summary()["features.0"]["stuck"] == 0
    assert m.summary()["features.3"]["stuck"] > 0
    out = tmp_path / "ft.pt"
    assert main(["faults", "finetune", str(trained_ckpt), "--fault-map", str(fmap), "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert "after fault_aware" in capsys.readouterr().out
    model, info = load_checkpoint(out)
    proxy = model.features[3].weight_quant
    assert proxy.chip.has_faults and proxy.chip.mapping == "aware"
    import torch
    assert torch.equal(proxy.chip.sa0.cpu(), m.layers["features.3"][0])
    res_dir = tmp_path / "cmp"
    assert main(["faults", "compare", str(trained_ckpt), "--rates", "0", "0.2", "--trials", "2",
                 "--methods", "none", "nearest_valid", "--out", str(res_dir),
                 "--no-progress"]) == 0
    summary = json.loads((res_dir / "faults_compare.json").read_text())["summary"]
    assert {(s["method"], s["level"]) for s in summary} == {
        ("none", 0.0), ("none", 0.2), ("nearest_valid", 0.0), ("nearest_valid", 0.2)}
    assert (res_dir / "faults_compare.png").read_bytes()[:4] == b"\x89PNG"


def test_variability_eval_and_bad_input(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "var"
    assert main(["variability", "eval", str(trained_ckpt), "--sigmas", "0", "0.3",
                 "--trials", "2", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "variability_eval.json").read_text())["rows"]
    assert len(rows) == 4 and {r["level"] for r in rows} == {0.0, 0.3}
    capsys.readouterr()
    assert main(["variability", "eval", str(trained_ckpt), "--sigmas", "-0.1",
                 "--out", str(tmp_path / "var2"), "--no-progress"]) == 2
    assert "sigma" in capsys.readouterr().err
    assert main(["faults", "eval", str(trained_ckpt), "--rates", "1.5",
                 "--out", str(tmp_path / "var2"), "--no-progress"]) == 2
    bad = tmp_path / "bad_map.pt"
    bad.write_bytes(b"garbage")
    assert main(["faults", "finetune", str(trained_ckpt), "--fault-map", str(bad),
                 "--out", str(tmp_path / "x.pt"), "--no-progress"]) == 2
    assert "bad_map.pt" in capsys.readouterr().err


def test_device_commands_use_the_checkpoints_data_split(tmp_path):
    """A model trained on split seed 1 is evaluated on split seed 1's test set, not seed 0's
    (which would contain some of its training images)."""
    out = tmp_path / "s1"
    assert main(["demo", "--out", str(out), "--bits", "4", "--variants", "nmult", "--seed", "1",
                 "--float-epochs", "2", "--qat-epochs", "1", "--lambda-rise-epochs", "1",
                 "--no-progress"]) == 0
    ckpt = out / "nmult_w4a4.pt"
    _, info = load_checkpoint(ckpt)
    assert info["meta"]["data_seed"] == 1 and info["meta"]["dataset"] == "digits"
    ev = tmp_path / "ev"
    assert main(["faults", "eval", str(ckpt), "--rates", "0", "--trials", "1", "--out", str(ev),
                 "--no-progress"]) == 0
    rows = json.loads((ev / "faults_eval.json").read_text())["rows"]
    res = json.loads((out / "results.json").read_text())
    # Rate 0 is the clean model: exactly the accuracy measured at training time on its split.
    assert rows[0]["acc"] == res["runs"][0]["acc"]
    ft = tmp_path / "ft.pt"
    assert main(["faults", "finetune", str(ckpt), "--rate", "0.1", "--epochs", "1",
                 "--out", str(ft), "--no-progress"]) == 0
    assert load_checkpoint(ft)[1]["meta"]["data_seed"] == 1
