"""``qfv export | inspect | verify | crossbar`` on a real checkpoint, and the hls4ml flow end to
end (export/hls4ml/run_hls4ml.py: QONNX reader, g++ compile, predict, compared with torch)."""
import importlib.util
import json
import re
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.zoo.checkpoint import save_checkpoint
from qfv_brevitas.cli.app import main
from qfv_brevitas.export import read_metadata
from qfv_brevitas.zoo.models import MLP
from qfv_brevitas.training.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits):
    train, _ = digits
    torch.manual_seed(0)
    m = MLP(64, 10)  # the architecture build_model("mlp") rebuilds
    fit(m, train, None, TrainConfig(epochs=4, lr=0.05), progress=False)
    cfg = NMultConfig(weight_bits=4, act_bits=4)
    q = quantize_model(m, cfg, train.tensors[0][:64])
    fit(q, train, None, TrainConfig(epochs=2, lr=0.01, lambda_rise_epochs=1), progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "mlp.pt"
    save_checkpoint(path, q.eval(), "mlp", (1, 8, 8), 10, cfg, data_seed=0, dataset="digits")
    return path


@pytest.mark.parametrize("form", ["compact", "bitplanes", "fixed", "planes"])
def test_export_inspect_verify(tmp_path, checkpoint, form, capsys):
    out = tmp_path / f"m_{form}.onnx"
    extra = ["--frac-bits", "7"] if form in ("fixed", "planes") else []
    assert main(["export", str(checkpoint), "--form", form, "--out", str(out),
                 "--samples", "48", "--exporter", "torchscript"] + extra) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and f"{form} form" in text
    meta = read_metadata(out)
    assert [r["layer"] for r in meta["layers"]] == ["net.1", "net.3", "net.5"]
    assert meta["extra"]["arch"] == "mlp"
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    for r in meta["layers"]:
        assert r["layer"] in table
    assert f"{meta['layers'][1]['r'][0][0]:+.4g}" in table
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["form"] == form
    assert main(["verify", str(out), str(checkpoint), "--samples", "32",
                 "--time-limit", "120"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_fixed_export_with_accuracy_bound_reports_the_change(tmp_path, checkpoint, capsys):
    out = tmp_path / "fx.onnx"
    assert main(["export", str(checkpoint), "--form", "fixed", "--max-acc-drop", "1.0",
                 "--out", str(out), "--samples", "16"]) == 0
    text = capsys.readouterr().out
    fx = read_metadata(out)["fixed_point"]
    assert fx["reference_accuracy"] - fx["accuracy"] <= 1.0
    assert f"{fx['accuracy'] - fx['reference_accuracy']:+.2f} points" in text


def test_verify_detects_a_file_that_does_not_match(tmp_path, checkpoint, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--samples", "8",
                 "--exporter", "torchscript"]) == 0
    proto = onnx.load(str(out))
    for init in proto.graph.initializer:  # one flipped code in the file
        if init.name == "net.3.weight_codes":
            arr = onnx.numpy_helper.to_array(init).copy()
            arr.flat[0] ^= 1
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(out))
    capsys.readouterr()
    assert main(["verify", str(out), str(checkpoint), "--samples", "8"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_inspect_refuses_other_files(tmp_path, capsys):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"garbage")
    assert main(["inspect", str(bad)]) == 2
    assert "qfv inspect: error" in capsys.readouterr().err


def test_crossbar_command(tmp_path, checkpoint, capsys):
    assert main(["crossbar", str(checkpoint), "--out", str(tmp_path / "xb")]) == 0
    manifest = json.loads((tmp_path / "xb" / "manifest.json").read_text())
    assert [r["layer"] for r in manifest["layers"]] == ["net.1", "net.3", "net.5"]
    assert manifest["layers"][1]["matrix_shape"] == [64, 64]


def _load_flow():
    spec = importlib.util.spec_from_file_location("run_hls4ml", ROOT / "export/hls4ml/run_hls4ml.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_hls4ml_flow_end_to_end(tmp_path, checkpoint, capsys):
    pytest.importorskip("hls4ml")
    if shutil.which("g++") is None:
        pytest.skip("hls4ml compiles its C++ emulation with g++, which is not installed")
    out = tmp_path / "fx.onnx"
    assert main(["export", str(checkpoint), "--form", "fixed", "--frac-bits", "8",
                 "--out", str(out), "--samples", "8"]) == 0
    flow = _load_flow()
    capsys.readouterr()
    assert flow.main([str(out), str(checkpoint), "--out", str(tmp_path / "prj"),
                      "--samples", "64"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("hls4ml vs torch on 64 test inputs") and line.endswith("OK")
    assert "top-1 agreement 100.00%" in line
    diff, bound = (float(v) for v in re.search(r"max \|diff\| (\S+) \(bound (\S+)\)", line).groups())
    assert diff <= bound
    with pytest.raises(ValueError, match="fixed-point form"):
        compact = tmp_path / "c.onnx"
        main(["export", str(checkpoint), "--out", str(compact), "--no-verify"])
        flow.build_hls_model(compact, tmp_path / "prj3")


@pytest.mark.slow
def test_hls4ml_flow_planes_form(tmp_path, checkpoint, capsys):
    """The plane-parallel form through hls4ml: parallel Dense layers with 1-bit weights (one
    per plane, the offset's all-ones layer too), per-channel scales and sums; compile() +
    predict() agree with torch on 64 test images."""
    pytest.importorskip("hls4ml")
    if shutil.which("g++") is None:
        pytest.skip("hls4ml compiles its C++ emulation with g++, which is not installed")
    out = tmp_path / "planes.onnx"
    assert main(["export", str(checkpoint), "--form", "planes", "--frac-bits", "8",
                 "--out", str(out), "--samples", "8"]) == 0
    meta = read_metadata(out)
    flow = _load_flow()
    capsys.readouterr()
    assert flow.main([str(out), str(checkpoint), "--out", str(tmp_path / "prj"),
                      "--samples", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    line = lines[-1]
    assert line.startswith("hls4ml vs torch on 64 test inputs") and line.endswith("OK")
    assert "top-1 agreement 100.00%" in line
    diff, bound = (float(v) for v in re.search(r"max \|diff\| (\S+) \(bound (\S+)\)", line).groups())
    assert diff <= bound
    # every plane (and every offset all-ones layer) a Dense layer with 1-bit weights
    one_bit = sum(r["bits"] + r["planes"]["offset_layer"] for r in meta["layers"])
    widths = re.search(r"weight layers by weight bits: (.*)", "\n".join(lines)).group(1)
    assert f"1-bit x{one_bit}" in widths and widths.count("-bit") == 1


def test_crossbar_flow_script_matches_torch_layers(tmp_path, checkpoint, capsys):
    spec = importlib.util.spec_from_file_location("run_crossbar",
                                                  ROOT / "export/crossbar/run_crossbar.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    assert flow.main([str(checkpoint), "--out", str(tmp_path / "xb"), "--samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "crossbar products match" in out
    # the check can fail: a crossbar with one plane cell flipped no longer matches its layer
    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.data import load_digits_split
    from qfv_brevitas.export import load_crossbar

    model, _ = load_checkpoint(checkpoint)
    loaded = load_crossbar(tmp_path / "xb")
    _, test = load_digits_split(seed=0)
    inputs = flow.layer_inputs(model, test.tensors[0][:8], loaded)
    layer = dict(model.named_modules())["net.3"]
    row = dict(loaded["net.3"])
    assert flow.check_layer(layer, row, inputs["net.3"]) <= 1e-5
    row["planes"] = row["planes"].copy()
    row["planes"][3, 0, :] ^= 1
    assert flow.check_layer(layer, row, inputs["net.3"]) > 1e-3


@pytest.mark.slow
def test_hls4ml_flow_on_a_cnn(tmp_path, digits, capsys):
    """Conv, BatchNorm, max and average pooling through hls4ml (channels-last)."""
    pytest.importorskip("hls4ml")
    if shutil.which("g++") is None:
        pytest.skip("hls4ml compiles its C++ emulation with g++, which is not installed")
    from qfv_brevitas.zoo.models import SmallCNN

    train, _ = digits
    torch.manual_seed(0)
    m = SmallCNN(1, 10)  # the architecture build_model("small_cnn") rebuilds
    fit(m, train, None, TrainConfig(epochs=2, lr=0.05), progress=False)
    cfg = NMultConfig(weight_bits=4, act_bits=4)
    q = quantize_model(m, cfg, train.tensors[0][:64])
    fit(q, train, None, TrainConfig(epochs=1, lr=0.01, lambda_rise_epochs=1), progress=False)
    ckpt = save_checkpoint(tmp_path / "cnn.pt", q.eval(), "small_cnn", (1, 8, 8), 10, cfg,
                           data_seed=0, dataset="digits")
    out = tmp_path / "cnn_fx.onnx"
    assert main(["export", str(ckpt), "--form", "fixed", "--frac-bits", "8", "--out", str(out),
                 "--samples", "8"]) == 0
    capsys.readouterr()
    assert _load_flow().main([str(out), str(ckpt), "--out", str(tmp_path / "prj"),
                              "--samples", "64"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("OK") and "top-1 agreement 100.00%" in line
