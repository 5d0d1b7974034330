"""Tests of ``qfv_brevitas.export.metadata``'s budgets (issue 22): the metadata JSON is
bounded in size and nesting before it is parsed, and the shapes it declares (the example input
verification allocates, each layer's weights) are bounded by the file before anything is
allocated from them. Every refusal names the file and the key."""
from __future__ import annotations

import hashlib
import json

import onnx
import pytest
import torch
from torch import nn

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.export import ExportFileError, export_qonnx, read_metadata
from qfv_brevitas.util.budgets import MAX_JSON_DEPTH, MAX_SPIKING_VALUES


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    q = quantize_model(net, NMultConfig(weight_bits=3, act_bits=None), torch.rand(4, 1, 4, 4))
    path = tmp_path_factory.mktemp("m") / "m.onnx"
    export_qonnx(q.eval(), torch.rand(1, 1, 4, 4), path, verify=False, exporter="torchscript")
    return path


def _resealed(src, dst, text):
    proto = onnx.load(str(src))
    props = {p.key: p for p in proto.metadata_props}
    if callable(text):
        info = json.loads(props["qfv_brevitas.export"].value)
        text(info)
        text = json.dumps(info)
    props["qfv_brevitas.export"].value = text
    props["qfv_brevitas.sha256"].value = hashlib.sha256(text.encode()).hexdigest()
    onnx.save(proto, str(dst))
    return dst


def test_deep_metadata_is_refused_before_json_loads_recurses(exported, tmp_path):
    text = "[" * 500_000 + "]" * 500_000
    with pytest.raises(RecursionError):
        json.loads(text)  # what parsing it would do
    path = _resealed(exported, tmp_path / "deep.onnx", text)
    with pytest.raises(ExportFileError, match=r"deep\.onnx: the qfv-brevitas metadata "
                                              r"\(qfv_brevitas\.export\): JSON nested 500000 "
                                              r"levels deep"):
        read_metadata(path)


def test_the_depth_limit_is_exact(exported, tmp_path):
    def nest(levels):
        def edit(info):
            x: list = []
            for _ in range(levels - 3):
                x = [x]
            info["extra"] = {"x": x}  # the metadata, extra and its dict: 3 levels
        return edit
    ok = _resealed(exported, tmp_path / "ok.onnx", nest(MAX_JSON_DEPTH))
    assert read_metadata(ok, check_graph=False)["extra"]["x"]
    bad = _resealed(exported, tmp_path / "bad.onnx", nest(MAX_JSON_DEPTH + 1))
    with pytest.raises(ExportFileError, match=f"nested {MAX_JSON_DEPTH + 1} levels deep, more "
                                              f"than the {MAX_JSON_DEPTH}"):
        read_metadata(bad, check_graph=False)


def test_metadata_over_the_size_cap_is_refused(exported, tmp_path, monkeypatch):
    import qfv_brevitas.util.budgets as budgets

    text = onnx.load(str(exported)).metadata_props
    n = len({p.key: p.value for p in text}["qfv_brevitas.export"])
    monkeypatch.setattr(budgets, "MAX_JSON_BYTES", n)
    read_metadata(exported)
    monkeypatch.setattr(budgets, "MAX_JSON_BYTES", n - 1)
    with pytest.raises(ExportFileError, match=rf"m\.onnx: the qfv-brevitas metadata "
                                              rf"\(qfv_brevitas\.export\): {n} characters of "
                                              rf"JSON, more than the {n - 1}"):
        read_metadata(exported)


def test_the_example_input_shape_is_bounded(exported, tmp_path):
    info = read_metadata(exported)
    assert info["input_shape"] == [1, 1, 4, 4]
    ok = _resealed(exported, tmp_path / "ok.onnx",
                   lambda i: i.update(input_shape=[MAX_SPIKING_VALUES, 1]))
    read_metadata(ok, check_graph=False)
    for shape in ([MAX_SPIKING_VALUES + 1, 1], [10 ** 6, 10 ** 6], [1] * 11, [1, -1], "1x1",
                  [1.5]):
        bad = _resealed(exported, tmp_path / "bad.onnx", lambda i: i.update(input_shape=shape))
        with pytest.raises(ExportFileError, match=r"bad\.onnx: the qfv-brevitas metadata's "
                                                  r"input_shape .* is refused"):
            read_metadata(bad, check_graph=False)


def test_a_layer_may_declare_at_most_a_weight_per_byte_of_the_file(exported, tmp_path):
    size = exported.stat().st_size
    info = read_metadata(exported)
    assert info["layers"][0]["weight_shape"] == [8, 16]

    def shape(ws):
        return lambda i: i["layers"][0].update(weight_shape=ws)
    ok = _resealed(exported, tmp_path / "ok.onnx", shape([size // 2, 1]))
    read_metadata(ok, check_graph=False)  # within the file's bytes (the graph check is later)
    bad = _resealed(exported, tmp_path / "bad.onnx", shape([10 ** 6, 10 ** 6]))
    with pytest.raises(ExportFileError, match=r"bad\.onnx: layer '.*' of the metadata "
                                              r"declares weight_shape "
                                              r"\[1000000, 1000000\], more weights than the "
                                              r"file's \d+ bytes can hold"):
        read_metadata(bad, check_graph=False)
    assert (tmp_path / "bad.onnx").stat().st_size < 10 ** 12
