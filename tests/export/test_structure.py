"""Files a user gives: the one loader (``export.untrusted``), the structural check
(``export.structure``, ``export.shapes``), the graph-vs-metadata coverage (``export.checks``)
and running a graph with a deadline (``export.deadline``).

Every form's export passes the check and stays within the allow-list; each kind of tampering
(a Loop hidden in an If, a foreign domain two subgraphs down, a lying initializer, external
data, a huge declared or inferred tensor, an op the forms never write, a quantized layer the
metadata omits) is found and named.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.export import ExportFileError, export_qonnx, read_metadata, verify_qonnx
from qfv_brevitas.export.checks import coverage_problems, graph_problems
from qfv_brevitas.export.deadline import call_with_deadline
from qfv_brevitas.export.errors import ExecutionTimeout
from qfv_brevitas.export.forms import FORMS, form_named
from qfv_brevitas.export.metadata import read_export
from qfv_brevitas.export.structure import (ALLOWED_DTYPES, ALLOWED_OPS, MAX_NODES,
                                           MAX_TENSOR_ELEMENTS, walk_nodes)
from qfv_brevitas.export.untrusted import load_onnx, structure_problems
from qfv_brevitas.zoo.models import build_model


def _zoo(name, act_bits=4):
    torch.manual_seed(0)
    net = build_model(name, (1, 8, 8), 10)
    x = torch.rand(4, 1, 8, 8)
    return quantize_model(net, NMultConfig(weight_bits=3, act_bits=act_bits), x[:2]).eval(), x


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every form of the zoo's small CNN and MLP (4-bit activations), both exporters."""
    root = tmp_path_factory.mktemp("forms")
    out = {}
    for arch in ("small_cnn", "mlp"):
        model, x = _zoo(arch)
        for form in FORMS:
            for exporter in ("dynamo", "torchscript"):
                kw = {"frac_bits": 8} if form_named(form).needs_fixed_point else {}
                path = root / f"{arch}_{form}_{exporter}.onnx"
                export_qonnx(model, x[:1], path, form, exporter=exporter, verify_inputs=x,
                             **kw)
                out[arch, form, exporter] = path
    return out


def _ops(model):
    return {(("" if n.domain == "ai.onnx" else n.domain), n.op_type)
            for n in model.graph.node}


def test_every_form_export_passes_the_structural_check_within_the_allow_list(exports):
    seen = set()
    for key, path in exports.items():
        model, info = read_export(path)  # the whole check, and graph vs metadata
        assert structure_problems(model) == [], key
        assert coverage_problems(model, info, form_named(info["form"])) == [], key
        ops = _ops(model)
        outside = {o for o in ops if o[1] not in ALLOWED_OPS.get(o[0], ())}
        assert not outside, (key, outside)
        dtypes = {t.data_type for t in model.graph.initializer}
        assert dtypes <= ALLOWED_DTYPES, key
        seen |= ops
    # the quantizers of every form are there: the check ran over what matters
    assert {("qfv_brevitas.export.ops", "NMultWeight"), ("qonnx.custom_op.general", "Quant"),
            ("", "Conv"), ("", "Gemm"), ("", "MaxPool")} <= seen


def test_the_spiking_models_export_within_the_allow_list(tmp_path):
    pytest.importorskip("spikingjelly")
    from qfv_brevitas.snn import rate_encode
    from qfv_brevitas.snn.network import spiking_net

    net = build_model("spiking_mlp", (1, 8, 8), 10, snn={"T": 3})
    q = quantize_model(net, NMultConfig(weight_bits=3, act_bits=None),
                       torch.rand(2, 1, 8, 8)).eval()
    cfg = spiking_net(q).config
    x = rate_encode(torch.rand(4, 1, 8, 8), cfg.T, generator=torch.Generator().manual_seed(0))
    x = x if cfg.layout == "time_first" else x.transpose(0, 1)
    first = x[:, :1] if cfg.layout == "time_first" else x[:1]
    export_qonnx(q, first, tmp_path / "snn.onnx", "compact", verify_inputs=x)
    model, _ = read_export(tmp_path / "snn.onnx")
    assert ("", "GreaterOrEqual") in _ops(model)  # the neurons' comparisons
    assert structure_problems(model) == []


# -- tampering ------------------------------------------------------------------------------
@pytest.fixture
def mlp_file(exports):
    return exports["mlp", "compact", "torchscript"]


def _graph(nodes, name="sub", outputs=("y",)):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
        o, TensorProto.FLOAT, [1]) for o in outputs])


def _loop(name="inner"):
    body = _graph([helper.make_node("Identity", ["v"], ["y"])], "body")
    return helper.make_node("Loop", ["trip", "", "v"], ["out"], name=name, body=body)


def _if(name, branch_nodes):
    return helper.make_node("If", ["cond"], ["y"], name=name,
                            then_branch=_graph(branch_nodes, "then"),
                            else_branch=_graph([helper.make_node("Identity", ["v"], ["y"])],
                                               "else"))


def _with(path, edit):
    m = onnx.load(str(path))
    edit(m)
    return m


def test_a_loop_hidden_in_an_if_subgraph_is_found_and_placed(mlp_file):
    m = _with(mlp_file, lambda m: m.graph.node.append(_if("outer", [_loop("inner")])))
    problems = structure_problems(m)
    assert any(p.startswith("control flow: 'If' node 'outer'") for p in problems), problems
    loop = [p for p in problems if "'Loop' node 'inner'" in p]
    assert loop and "inside 'If' node 'outer' (attribute 'then_branch')" in loop[0], problems
    nodes = [(at.node.op_type, at.where) for at in walk_nodes(m.graph)]
    assert ("Loop", "'If' node 'outer' (attribute 'then_branch')") in nodes


def test_a_foreign_domain_two_subgraphs_down_is_refused(mlp_file):
    evil = helper.make_node("system", ["v"], ["y"], name="evil", domain="os")
    m = _with(mlp_file, lambda m: m.graph.node.append(
        _if("a", [_if("b", [evil])])))
    problems = structure_problems(m)
    hit = [p for p in problems if "op domain 'os'" in p]
    assert hit and "inside 'If' node 'b'" in hit[0], problems
    with pytest.raises(ExportFileError, match="op domain 'os'.*refusing"):
        read_metadata(m)  # a given model: the domain check walks subgraphs too


def test_any_node_carrying_a_subgraph_is_refused(mlp_file):
    def edit(m):
        relu = next(n for n in m.graph.node if n.op_type == "Relu")
        relu.attribute.append(helper.make_attribute("hidden", _graph(
            [helper.make_node("Identity", ["v"], ["y"])])))
    problems = structure_problems(_with(mlp_file, edit))
    assert any("attribute 'hidden'" in p and "carries a subgraph" in p for p in problems)


@pytest.mark.parametrize("node, what", [
    (helper.make_node("Expand", ["x", "s"], ["z"], name="grow"), "'Expand'"),
    (helper.make_node("ConstantOfShape", ["s"], ["z"], name="fill"), "'ConstantOfShape'"),
    (helper.make_node("MultiThreshold", ["x", "t"], ["z"], name="mt",
                      domain="qonnx.custom_op.general"), "'MultiThreshold'"),
])
def test_an_op_the_forms_never_write_is_refused(mlp_file, node, what):
    problems = structure_problems(_with(mlp_file, lambda m: m.graph.node.append(node)))
    assert any(what in p and "not one the export forms write" in p for p in problems), problems


def _edit_init(m, fn):
    t = next(t for t in m.graph.initializer if t.name.endswith("weight_codes"))
    fn(t)
    return t.name


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.dims.__setitem__(0, 10 ** 3), "bytes of data"),         # dims lie
    (lambda t: setattr(t, "raw_data", t.raw_data[:-1]), "bytes of data"),  # bytes lie
    (lambda t: t.dims.extend([1] * 8), "rank"),
    (lambda t: t.dims.__setitem__(0, -3), "dimension -3"),
    (lambda t: setattr(t, "data_type", TensorProto.DOUBLE), "element type DOUBLE"),
    (lambda t: t.int32_data.extend([1, 2]), "stores its values in"),
    (lambda t: (t.external_data.add(key="location", value="../secret.txt"),
                setattr(t, "data_location", TensorProto.EXTERNAL)), "external data is refused"),
])
def test_a_lying_or_foreign_initializer_is_refused(mlp_file, edit, message):
    m = onnx.load(str(mlp_file))
    name = _edit_init(m, edit)
    problems = structure_problems(m)
    assert any(name in p and message in p for p in problems), problems


def test_the_untampered_file_has_no_problems_and_the_tampering_is_what_is_found(mlp_file):
    m = onnx.load(str(mlp_file))
    assert structure_problems(m) == []
    _edit_init(m, lambda t: t.dims.__setitem__(0, 10 ** 3))
    assert len(structure_problems(m)) == 1


def test_huge_declared_and_inferred_tensors_are_refused(mlp_file):
    def declared(m):
        m.graph.value_info.append(helper.make_tensor_value_info(
            "ghost", TensorProto.FLOAT, [1 << 13, 1 << 12]))

    assert any("'ghost'" in p and "elements" in p
               for p in structure_problems(_with(mlp_file, declared)))

    def inferred(m):  # an outer product of the output (1, 10) and a small constant
        out = m.graph.output[0].name
        m.graph.initializer.extend([
            numpy_helper.from_array(np.array([10, 1], np.int64), "col"),
            numpy_helper.from_array(np.ones((1, 1 << 21), np.float32), "row")])
        m.graph.node.extend([helper.make_node("Reshape", [out, "col"], ["c"], name="col_r"),
                             helper.make_node("Mul", ["c", "row"], ["big"], name="outer")])
        m.graph.output[0].CopyFrom(helper.make_tensor_value_info("big", TensorProto.FLOAT,
                                                                 None))

    problems = structure_problems(_with(mlp_file, inferred))
    assert any("'big'" in p and f"{10 << 21} elements" in p for p in problems), problems
    assert 10 << 21 > MAX_TENSOR_ELEMENTS


def test_a_declared_shape_that_the_graph_does_not_compute_is_refused(mlp_file):
    def lie(m):
        vi = m.graph.output[0]
        vi.type.tensor_type.shape.dim[1].dim_value = 11
    assert any("shapes do not add up" in p for p in structure_problems(_with(mlp_file, lie)))


def test_versions_functions_and_node_count_are_bounded(mlp_file):
    m = _with(mlp_file, lambda m: setattr(m, "ir_version", 99))
    assert any("IR version 99" in p for p in structure_problems(m))
    m = _with(mlp_file, lambda m: m.opset_import.add(domain="", version=1))
    assert any("imported twice" in p for p in structure_problems(m))
    m = _with(mlp_file, lambda m: m.functions.add(name="f", domain="x"))
    assert any("model-local function" in p for p in structure_problems(m))
    m = onnx.load(str(mlp_file))
    m.graph.node.extend(helper.make_node("Relu", ["a"], ["a"]) for _ in range(MAX_NODES))
    assert any(f"more than {MAX_NODES} nodes" in p for p in structure_problems(m))


# -- the loader -----------------------------------------------------------------------------
def test_load_refuses_fifos_devices_folders_and_big_files_without_reading(mlp_file, tmp_path):
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)  # a reader would block forever: the check must not read it
    with pytest.raises(ExportFileError, match="not a regular file"):
        load_onnx(fifo)
    with pytest.raises(ExportFileError, match="not a regular file"):
        load_onnx("/dev/zero")
    with pytest.raises(ExportFileError, match="is a folder"):
        load_onnx(tmp_path)
    with pytest.raises(ExportFileError, match="over the limit of 1000 bytes"):
        load_onnx(mlp_file, limit=1000)
    assert len(load_onnx(mlp_file).graph.node) > 0


def test_read_export_says_foreign_before_judging_the_structure(tmp_path):
    g = helper.make_graph([helper.make_node("Expand", ["x", "s"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), str(tmp_path / "plain.onnx"))
    with pytest.raises(ExportFileError, match="not written by qfv-brevitas"):
        read_export(tmp_path / "plain.onnx")
    with pytest.raises(ExportFileError, match="'Expand'"):
        load_onnx(tmp_path / "plain.onnx")


# -- the graph against its metadata -----------------------------------------------------------
def _extra_quantized_layer(m):
    """A Gemm after the output whose weights come through a Quant node: a quantized layer no
    metadata row describes."""
    out = m.graph.output[0].name
    m.graph.initializer.extend([
        numpy_helper.from_array(np.ones((10, 10), np.float32), "extra_w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "extra_s"),
        numpy_helper.from_array(np.array(0.0, np.float32), "extra_z"),
        numpy_helper.from_array(np.array(4.0, np.float32), "extra_b")])
    m.graph.node.extend([
        helper.make_node("Quant", ["extra_w", "extra_s", "extra_z", "extra_b"], ["extra_q"],
                         name="extra_quant", domain="qonnx.custom_op.general", signed=1,
                         narrow=0, rounding_mode="ROUND"),
        helper.make_node("Gemm", [out, "extra_q"], ["extra_y"], name="extra_gemm")])
    m.graph.value_info.extend([helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 10]),
                               helper.make_tensor_value_info("extra_q", TensorProto.FLOAT,
                                                             [10, 10])])
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("extra_y", TensorProto.FLOAT,
                                                             [1, 10]))


@pytest.mark.parametrize("form", FORMS)
def test_a_quantized_layer_the_metadata_omits_is_named(exports, form):
    m = _with(exports["mlp", form, "torchscript"], _extra_quantized_layer)
    info = read_metadata(m, check_graph=False)
    problems = graph_problems(m, info)
    assert any("'Gemm' node 'extra_gemm' takes quantized weights (from 'Quant' node "
               "'extra_quant')" in p for p in problems), problems
    assert structure_problems(m) == []  # the structure is fine: only the metadata check sees it


@pytest.mark.parametrize("form", FORMS)
def test_a_metadata_layer_the_graph_lacks_is_named(exports, form):
    m = onnx.load(str(exports["mlp", form, "torchscript"]))
    info = read_metadata(m, check_graph=False)
    first = info["layers"][0]["layer"]
    tensors = set(form_named(form).layer_tensors(info["layers"][0]))
    for n in m.graph.node:  # the layer's compute node(s) take their weights from elsewhere
        if n.op_type in ("Gemm", "MatMul", "Conv") and n.input[1] in tensors:
            n.input[1] = "elsewhere"
    problems = coverage_problems(m, info, form_named(form))
    assert problems == [f"layer {first!r} of the metadata is not in the graph: no "
                        "Conv/Gemm/MatMul/ConvTranspose node takes its weights"], problems


# -- deadline and interrupt --------------------------------------------------------------------
ROWS, COLS = 4096, 256


def _slow_graph(nodes=2000):
    """A long chain of MatMuls: each node takes a few milliseconds, one run about 5 s."""
    w = numpy_helper.from_array(np.eye(COLS, dtype=np.float32), "w")
    chain = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}"])
             for i in range(nodes)]
    g = helper.make_graph(chain, "slow", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [ROWS, COLS])], [helper.make_tensor_value_info(
            f"h{nodes}", TensorProto.FLOAT, [ROWS, COLS])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


class _OrtRuns:
    """Runs the slow graph in onnxruntime again and again, with the stopper's options."""

    def __init__(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.sess = ort.InferenceSession(_slow_graph().SerializeToString(), opts,
                                         providers=["CPUExecutionProvider"])
        self.runs = 0

    def __call__(self, stopper):
        x = np.ones((ROWS, COLS), np.float32)
        while True:
            self.sess.run(None, {"x": x}, stopper.options())
            self.runs += 1


def _graph_workers():
    return [t for t in threading.enumerate() if t.name == "qfv-graph" and t.is_alive()]


@pytest.fixture
def workers_joined():
    """After the test, wait for any graph worker still running (a test that failed because
    one was not stopped must not leave it inside onnxruntime while the process exits)."""
    yield
    for t in _graph_workers():
        t.join(60)


def test_call_with_deadline_returns_raises_and_stops_onnxruntime_between_nodes(workers_joined):
    assert call_with_deadline(lambda s: 42, 5.0, "x") == 42
    with pytest.raises(ZeroDivisionError):
        call_with_deadline(lambda s: 1 / 0, 5.0, "x")
    work = _OrtRuns()
    t0 = time.monotonic()
    with pytest.raises(ExecutionTimeout, match="the slow graph: still running after the time "
                                               "limit of 0.5 s"):
        call_with_deadline(work, 0.5, "the slow graph")
    assert time.monotonic() - t0 < 0.5 + 2.0
    # onnxruntime's run (seconds long) was terminated between two nodes, not finished
    assert work.runs == 0 and _graph_workers() == []


class _PythonSpin:
    """Pure Python work, as qonnx's loop over nodes: only the asynchronous stop ends it."""

    def __init__(self):
        self.steps = 0

    def __call__(self, stopper):
        while True:
            self.steps += 1


def test_call_with_deadline_stops_a_python_loop(workers_joined):
    work = _PythonSpin()
    with pytest.raises(ExecutionTimeout):
        call_with_deadline(work, 0.3, "spin")
    steps = work.steps
    time.sleep(0.2)
    assert work.steps == steps and _graph_workers() == []


def test_an_interrupt_while_a_graph_runs_stops_it_within_two_seconds(workers_joined):
    work = _OrtRuns()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        call_with_deadline(work, 60.0, "the slow graph")
    assert time.monotonic() - t0 < 0.5 + 2.0
    assert work.runs == 0 and _graph_workers() == []


def test_verify_runs_with_a_checked_time_limit(mlp_file):
    model, x = _zoo("mlp")
    ref = model  # the file was exported from this very model (same seed)
    with pytest.raises(ValueError, match="time_limit must be a positive number"):
        verify_qonnx(ref, mlp_file, x, time_limit=0)
    with pytest.raises(ExecutionTimeout, match="running the graph: still running"):
        verify_qonnx(ref, mlp_file, x.repeat(2000, 1, 1, 1), time_limit=0.2)
