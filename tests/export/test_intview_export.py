"""Exporting models trained on the integer view (``qfv_brevitas.core.intview``): the fixed form
takes each layer's training grid as it is (no search over ``f``, no accuracy change by
construction), at the width training's ``IntQuantTensor`` had; Brevitas' integer biases export
on input scale x ``2**-f``; ``qfv export`` / ``qfv verify`` work on such a checkpoint."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.cli.app import main
from qfv_brevitas.core.quantizers import NMultWeightQuant, nmult_layers, quant_of
from qfv_brevitas.export import export_qonnx, read_metadata
from qfv_brevitas.training.train import TrainConfig, evaluate, fit
from qfv_brevitas.zoo.checkpoint import save_checkpoint
from qfv_brevitas.zoo.models import MLP
from tests.core.test_intview import FinnStyle


@pytest.fixture(scope="module")
def finn_style():
    torch.manual_seed(0)
    m = FinnStyle(NMultWeightQuant, weight_frac_bits="auto")
    m.train()
    with torch.no_grad():
        for _ in range(3):  # let the activation quantizers collect statistics
            m(torch.randn(32, 16))
    return m.eval(), torch.randn(6, 16)


def _consts(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


@pytest.mark.parametrize("form", ["fixed", "planes", "compact", "bitplanes"])
def test_int32_bias_model_exports_and_verifies(finn_style, form, tmp_path):
    m, x = finn_style
    res = export_qonnx(m, x, tmp_path / f"{form}.onnx", form)  # no frac_bits needed
    assert res.verification.passed
    # the torch reference of the export is the model itself, to the bit
    with torch.no_grad():
        assert torch.equal(res.reference(x), m(x))


def test_fixed_form_keeps_the_training_grid_and_width(finn_style, tmp_path):
    m, x = finn_style
    path = tmp_path / "fixed.onnx"
    res = export_qonnx(m, x, path, "fixed", frac_bits=3)  # applies to no layer here
    proto = onnx.load(str(path))
    consts = _consts(proto)
    rows = {r["layer"]: r for r in read_metadata(path)["layers"]}
    assert res.fixed_point["frac_bits"] is None and "every layer on the grid" in res.summary()
    for name, layer in nmult_layers(m):
        qw = layer.quant_weight()
        f = quant_of(layer).frac_bits
        assert rows[name]["integer_view"] == {"frac_bits": f}
        fx = rows[name]["fixed_point"]
        assert (fx["frac_bits"], fx["int_bits"], fx["signed"]) == (f, int(qw.bit_width), True)
        assert fx["max_weight_error"] == 0.0
        # the file's Quant node: training's integers, scale and width
        quant = next(n for n in proto.graph.node if n.op_type == "Quant"
                     and n.input[0] == f"{name}.weight_fixed")
        w, scale, zero, width = (consts[t] for t in quant.input[:4])
        assert float(scale) == 2.0 ** -f and float(zero) == 0 and float(width) == float(qw.bit_width)
        assert np.array_equal(w / scale, qw.int().numpy().astype(np.float32))


def test_integer_bias_exports_on_input_scale_times_the_grid(finn_style, tmp_path):
    m, x = finn_style
    path = tmp_path / "fixed.onnx"
    export_qonnx(m, x, path, "fixed")
    proto = onnx.load(str(path))
    consts = _consts(proto)
    f = quant_of(m.out).frac_bits
    in_scale = float(m.relu.act_quant.scale())
    bias_quants = [n for n in proto.graph.node if n.op_type == "Quant"
                   and n.input[0] in consts and consts[n.input[0]].shape == (4,)]
    assert len(bias_quants) == 1  # out's bias (fc1's has 16 entries)
    b = bias_quants[0]
    assert float(consts[b.input[3]]) == 32.0
    assert np.allclose(consts[b.input[1]], in_scale * 2.0 ** -f, rtol=1e-6, atol=0)


def test_mixed_model_frac_bits_applies_to_the_other_layers(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    q = quantize_model(net, NMultConfig(weight_bits=3, act_bits=None, first_last_bits=None))
    first = nmult_layers(q)[0][1]
    first.weight_quant.use_integer_view(9)
    res = export_qonnx(q.eval(), torch.rand(2, 6), tmp_path / "mixed.onnx", "fixed", frac_bits=5)
    grids = [r["fixed_point"]["frac_bits"] for r in res.metadata["layers"]]
    assert grids == [9, 5] and res.fixed_point["frac_bits"] == 5
    assert res.verification.passed


def test_cli_exports_an_integer_view_checkpoint_without_frac_bits(tmp_path, digits, capsys):
    """``qfv export --form fixed`` needs no --frac-bits or --max-acc-drop for a checkpoint
    trained on the integer view, reports no accuracy change, and ``qfv verify`` passes."""
    train, test = digits
    torch.manual_seed(0)
    m = MLP(64, 10)
    fit(m, train, None, TrainConfig(epochs=3, lr=0.05), progress=False)
    cfg = NMultConfig(weight_bits=3, act_bits=4, frac_bits="auto", mode="both")
    q = quantize_model(m, cfg, train.tensors[0][:64])
    fit(q, train, None, TrainConfig(epochs=1, lr=0.01, lambda_rise_epochs=1), progress=False)
    ckpt = tmp_path / "mlp.pt"
    save_checkpoint(ckpt, q.eval(), "mlp", (1, 8, 8), 10, cfg, data_seed=0, dataset="digits")
    out = tmp_path / "fixed.onnx"
    assert main(["export", str(ckpt), "--form", "fixed", "--out", str(out),
                 "--samples", "32"]) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and "every layer on the grid it trained on" in text
    assert main(["verify", str(out), str(ckpt), "--samples", "32"]) == 0
    assert "PASSED" in capsys.readouterr().out
    rows = read_metadata(out)["layers"]
    for (name, layer), row in zip(nmult_layers(q), rows):
        assert row["fixed_point"]["frac_bits"] == quant_of(layer).frac_bits
        assert row["fixed_point"]["int_bits"] == int(layer.quant_weight().bit_width)
    # the checkpoint reloads with its grids
    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    again, _ = load_checkpoint(ckpt)
    assert [quant_of(l).frac_bits for _, l in nmult_layers(again)] == \
        [quant_of(l).frac_bits for _, l in nmult_layers(q)]
    assert evaluate(again, test) == evaluate(q, test)


def test_bnn_pynq_resnet18_exports_in_the_fixed_form_and_verifies(tmp_path, no_network):
    """brevitas_examples' FINN-style ResNet-18 (quant tensors between layers, residual adds,
    Int32Bias classifier, Brevitas' truncating average pool) on the integer view: the fixed
    form verifies, torch = qonnx = onnxruntime (QONNX's Trunc lowered to standard ops)."""
    import onnx as _onnx
    from brevitas_examples.bnn_pynq.models import model_with_cfg

    from qfv_brevitas import swap_weight_quant

    torch.manual_seed(0)
    m, _ = model_with_cfg("resnet18_4w4a", pretrained=False)
    assert no_network == []
    swap_weight_quant(m, NMultConfig(weight_bits=4, init="lsq", frac_bits=6))
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, 32, 32))  # activation statistics
    m.eval()
    path = tmp_path / "resnet.onnx"
    res = export_qonnx(m, torch.randn(1, 3, 32, 32), path, "fixed", exporter="torchscript",
                       verify_inputs=torch.randn(6, 3, 32, 32))
    rep = res.verification
    assert rep.passed and "onnxruntime" in rep.summary()
    ops = {n.op_type for n in _onnx.load(str(path)).graph.node}
    assert "Trunc" in ops and ops >= {"Quant", "Conv", "Gemm"}
    assert len(res.metadata["layers"]) == 21
    assert all(r["fixed_point"]["frac_bits"] == 6 for r in res.metadata["layers"])
