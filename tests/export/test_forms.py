"""The export-form registry: one class per form, and a new form is one module.

The worked example of docs/architecture.md ("Adding an export form") is executed here as it
stands in the document, registered, exported with, verified against torch, and tampered with.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.export import ExportError, ExportFileError, export_qonnx, read_metadata
from qfv_brevitas.export.checks import graph_problems
from qfv_brevitas.export.forms import (FORMS, ExportForm, form_named, form_names, register_form,
                                       unregister_form)

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_the_built_in_forms_in_order_each_declaring_its_handler():
    assert FORMS == ("compact", "bitplanes", "fixed", "planes") == form_names()
    assert [form_named(f).needs_fixed_point for f in FORMS] == [False, False, True, True]
    handlers = {f: form_named(f).handler.__name__ for f in FORMS}
    assert handlers == {"compact": "CompactHandler", "bitplanes": "BitPlanesHandler",
                        "fixed": "FixedPointHandler", "planes": "FixedPointHandler"}
    assert all(isinstance(form_named(f), ExportForm) and form_named(f).name == f for f in FORMS)


@pytest.mark.parametrize("name", ["nope", None, 3, "Compact"])
def test_an_unknown_form_is_refused_naming_the_forms(name):
    with pytest.raises(ExportError, match="unknown form .*compact, bitplanes, fixed, planes"):
        form_named(name)


def test_a_form_name_cannot_be_registered_twice():
    class Again(ExportForm):
        name = "planes"

    with pytest.raises(ValueError, match="needs a new name"):
        register_form(Again)
    assert form_named("planes").__class__.__name__ == "PlanesForm"


def _doc_example() -> str:
    text = DOC.read_text()
    section = text[text.index("## Adding an export form"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def dense_form():
    namespace: dict = {}
    exec(compile(_doc_example(), str(DOC), "exec"), namespace)
    try:
        yield namespace["DenseForm"]
    finally:
        unregister_form("dense")
    assert "dense" not in form_names()


def _model(per_channel: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    cfg = NMultConfig(weight_bits=3, act_bits=None, per_channel=per_channel)
    x = torch.rand(16, 6)
    return quantize_model(net, cfg, x[:2]).eval(), x


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_documented_form_exports_verifies_and_catches_tampering(dense_form, tmp_path,
                                                                     per_channel):
    model, x = _model(per_channel)
    assert "dense" in form_names() and not form_named("dense").needs_fixed_point
    res = export_qonnx(model, x[:1], tmp_path / "d.onnx", "dense", verify_inputs=x)
    assert res.verification.passed and max(res.verification.weight_diff.values()) == 0.0
    proto = onnx.load(str(res.path))
    ops = [n.op_type for n in proto.graph.node]
    assert "Quant" not in ops and "NMultWeight" not in ops  # plain constants, as declared
    info = read_metadata(res.path)
    assert info["form"] == "dense" and [r["weight_tensor"] for r in info["layers"]] == [
        "0.weight", "2.weight"]
    # every weight of the file is a level of its layer; move one off its level
    init = next(i for i in proto.graph.initializer if i.name == "2.weight")
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 1e-3
    init.CopyFrom(numpy_helper.from_array(w, "2.weight"))
    assert graph_problems(proto, info) == ["layer '2': a weight is not one of its levels"]


def test_the_documented_form_refuses_a_varying_chip_before_any_work(dense_form, tmp_path):
    from qfv_brevitas import VariabilityModel, attach_variability, sample_variability_map

    model, x = _model(False)
    attach_variability(model, sample_variability_map(model, VariabilityModel(sigma=0.1)))
    with pytest.raises(ExportError, match="dense form takes no variability map"):
        export_qonnx(model, x[:1], tmp_path / "v.onnx", "dense")
    assert not (tmp_path / "v.onnx").exists()


def test_a_file_naming_an_unregistered_form_is_refused(dense_form, tmp_path):
    model, x = _model(False)
    export_qonnx(model, x[:1], tmp_path / "d.onnx", "dense", verify=False)
    unregister_form("dense")
    try:
        with pytest.raises(ExportFileError, match="unknown form 'dense'"):
            read_metadata(tmp_path / "d.onnx")
    finally:
        register_form(dense_form)


def test_the_command_line_offers_every_registered_form(dense_form, capsys):
    from qfv_brevitas.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "{compact,bitplanes,fixed,planes,dense}" in out
    assert "dense: the deployed weights as plain float constants" in out


def _consts_by_role(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def test_each_form_checks_its_own_structure_against_the_metadata(tmp_path):
    """One tampered constant per form, found by that form's check and named."""
    model, x = _model(True)
    edits = {
        "compact": ("2.weight_r", lambda a: a * 2, "layer '2': r in the graph"),
        "fixed": (None, lambda a: a * 2, "layer '2': the Quant scale is"),
        "bitplanes": (None, lambda a: a * 2, "layer '2': bit plane"),
    }
    for form, (name, change, msg) in edits.items():
        res = export_qonnx(model, x[:1], tmp_path / f"{form}.onnx", form,
                           **({"frac_bits": 8} if form_named(form).needs_fixed_point else {}))
        proto = onnx.load(str(res.path))
        assert graph_problems(proto, res.metadata) == []
        if name is None:  # the weight Quant node's scale (fixed) or first plane (bitplanes)
            producers = {o: n for n in proto.graph.node for o in n.output}
            from qfv_brevitas.export.graph import upstream

            q = next(n for n in upstream("2.weight", producers) if n.op_type == "Quant")
            name = q.input[1] if form == "fixed" else q.input[0]
        init = next(i for i in proto.graph.initializer if i.name == name)
        init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init)), name))
        problems = graph_problems(proto, res.metadata)
        assert problems and all(p.startswith("layer '2'") for p in problems), (form, problems)
        assert any(msg in p for p in problems), (form, problems)


def test_bitplanes_give_every_plane_its_own_quant_node(tmp_path):
    """The dynamo exporter merges equal planes into one Quant node; the form's rewrite gives
    each plane its own (FINN refuses a fork there): with codes 0 and 2**N - 1 only, all N
    planes of a layer are equal."""
    from qfv_brevitas.core.quantizers import quant_of

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = quantize_model(net, NMultConfig(weight_bits=2, act_bits=None), torch.rand(2, 6))
    tq = quant_of(model[2])
    r, c = tq.multipliers().detach()[0], tq.offset().detach()[0]
    with torch.no_grad():
        pick = torch.rand(model[2].weight.shape) < 0.5
        model[2].weight.copy_(torch.where(pick, c, c + r.sum()))
    res = export_qonnx(model.eval(), torch.rand(1, 6), tmp_path / "b.onnx", "bitplanes",
                       verify_inputs=torch.rand(8, 6))
    proto = onnx.load(str(res.path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    from qfv_brevitas.export.graph import upstream

    quants = [n for n in upstream("2.weight", producers) if n.op_type == "Quant"]
    planes = [numpy_helper.to_array(next(i for i in proto.graph.initializer
                                         if i.name == q.input[0])) for q in quants]
    assert len(quants) == tq.bits == 8  # an edge layer: first_last_bits
    assert all(np.array_equal(p, planes[0]) for p in planes) and 0 < planes[0].sum() < 15
    users = {q.output[0]: [n for n in proto.graph.node if q.output[0] in n.input] for q in quants}
    assert all(len(u) == 1 for u in users.values()), users


@pytest.mark.parametrize("frac_bits", [0, 2])
@pytest.mark.parametrize("form", ["fixed", "planes"])
def test_few_fractional_bits_export_each_layer_and_verify(tmp_path, form, frac_bits):
    """At 0-2 fractional bits two same-shaped layers' integer weights come out equal (all
    rounded to the same few integers), and TorchScript stores equal constants once: each
    layer is still found by its own compute node, not by the shared constant's name. Their
    range -1..0 is written with a signed width of at least 2: QONNX executes a 1-bit signed
    Quant as bipolar (-1/+1), Brevitas' integers are -1/0."""
    from qfv_brevitas.zoo.models import MLP

    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    model = quantize_model(MLP(64, 10), NMultConfig(weight_bits=4, act_bits=4), x).eval()
    res = export_qonnx(model, x[:1], tmp_path / "m.onnx", form, frac_bits=frac_bits,
                       exporter="torchscript", verify_inputs=x)
    assert res.verification.passed
    layers = {r["layer"]: r for r in res.metadata["layers"]}
    assert set(layers) == {"net.1", "net.3", "net.5"}
    widths = [r["fixed_point"]["int_bits"] for r in layers.values()
              if r["fixed_point"]["signed"]]
    assert all(w >= 2 for w in widths), widths
    if frac_bits == 2:  # the case: a layer whose integers are -1..0
        assert any(r["fixed_point"]["int_min"] == -1 and r["fixed_point"]["int_max"] <= 0
                   for r in layers.values()), layers
    proto = onnx.load(str(res.path))
    assert read_metadata(proto) == res.metadata  # graph checks pass per layer
