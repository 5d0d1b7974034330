"""Hostile ONNX graphs against ``qfv inspect`` and ``qfv verify`` (issue 22).

Each case starts from a file ``qfv export`` wrote (a 4-bit MLP on digits, in each form), makes
one hostile edit, writes it into ``w/model/evil.onnx`` and runs the command from ``w`` in a
child with a memory cap and a deadline (``conftest.py``). Beside the model's folder lie files
the edits point at: ``w/secret.txt`` and ``secret.txt`` one folder up (a marker that must never
reach the terminal) and ``w/fifo`` (a FIFO: anything that opens it to read blocks forever, so a
run that finishes never read it). Every case asserts the exit code, one error line naming the
file and what in it, no file changed, added or removed, and the child's memory growth below
200 MB + 20x the file.

Families: external data (outside, inside, a FIFO, a device, a huge offset, a symlink), control
flow and subgraphs (Loop/If/Scan, a Loop in an If, foreign domains in nested graphs, nesting
past protobuf's limit), ops and versions the forms never write, sizes (node count, lying
initializers, huge declared and inferred tensors, long attributes), the graph against its
metadata (a quantized layer the metadata omits, in every form; a layer it names that the graph
lacks), the file itself (a FIFO, a device, a folder, a sparse 2 GiB file), and a structurally
allowed graph that runs long: stopped by SIGTERM/SIGINT (exit 130) or by ``--time-limit``
(exit 4).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Callable, List, NamedTuple, Tuple

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.cli.app import main
from qfv_brevitas.export.structure import MAX_NODES
from qfv_brevitas.zoo.checkpoint import save_checkpoint
from qfv_brevitas.zoo.data import fingerprint, load_digits_split
from qfv_brevitas.zoo.models import MLP

MARK = "SECRET-b7e1-do-not-print"
FORMS = ("compact", "bitplanes", "fixed", "planes")
QONNX = "qonnx.custom_op.general"
REL = "model/evil.onnx"


class World(NamedTuple):
    ck: Path
    files: dict  # form -> exported file


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """A 4-bit MLP checkpoint (digits) and its export in every form (torchscript: quick)."""
    root = tmp_path_factory.mktemp("graphs world")
    train, test = load_digits_split(0)
    torch.manual_seed(0)
    cfg = NMultConfig(weight_bits=4, act_bits=4)
    q = quantize_model(MLP(64, 10), cfg, train.tensors[0][:32]).eval()
    save_checkpoint(root / "q.pt", q, "mlp", (1, 8, 8), 10, cfg, dataset="digits", data_seed=0,
                    data_sha256=fingerprint(train, test))
    files = {}
    for form in FORMS:
        files[form] = root / f"{form}.onnx"
        extra = ["--frac-bits", "8"] if form in ("fixed", "planes") else []
        assert main(["export", str(root / "q.pt"), "--form", form, "--out", str(files[form]),
                     "--exporter", "torchscript", "--samples", "8", *extra]) == 0
    return World(root / "q.pt", files)


# -- building a hostile file ------------------------------------------------------------------
def _load(world: World, form: str = "compact") -> onnx.ModelProto:
    return onnx.load(str(world.files[form]))


def _codes(m) -> TensorProto:
    return next(t for t in m.graph.initializer if t.name.endswith(".weight_codes"))


def _external(t: TensorProto, location: str, offset=None, length=None) -> None:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    if offset is not None:
        t.external_data.add(key="offset", value=str(offset))
    if length is not None:
        t.external_data.add(key="length", value=str(length))


def _declare(m, shapes: dict) -> None:
    """Declare float tensors' shapes (the old output becomes an inner tensor: declared too)."""
    old = m.graph.output[0]
    for name, shape in shapes.items():
        vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        if name == old.name:
            old.CopyFrom(vi)
        else:
            m.graph.value_info.append(vi)


def _out(m) -> str:
    return m.graph.output[0].name


def _append(m, nodes, inits=(), new_output=None) -> None:
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    if new_output is not None:
        old = m.graph.output[0]
        m.graph.value_info.append(copy.deepcopy(old))  # the old output stays declared
        old.CopyFrom(helper.make_tensor_value_info(new_output, TensorProto.FLOAT, None))


def _sub(nodes, name="sub") -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
        nodes[-1].output[0] if nodes else "y", TensorProto.FLOAT, [1, 10])])


def _ident(i, o):
    return helper.make_node("Identity", [i], [o], name=f"id_{o}")


def _if(name, inner, x="cond"):
    return helper.make_node("If", [x], [f"{name}_y"], name=name,
                            then_branch=_sub(inner, f"{name}_then"),
                            else_branch=_sub([_ident("v", f"{name}_e")], f"{name}_else"))


def _loop(name="spin"):
    return helper.make_node("Loop", ["trip", "", "v"], [f"{name}_y"], name=name,
                            body=_sub([_ident("v", f"{name}_b")], f"{name}_body"))


def _trip(m) -> None:
    m.graph.initializer.append(numpy_helper.from_array(np.array(1 << 62, np.int64), "trip"))


def _nested_ifs(depth: int, innermost) -> onnx.NodeProto:
    node = innermost
    for k in range(depth):
        node = _if(f"lvl{k}", [node])
    return node


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _deep_ifs(depth: int) -> bytes:
    """Protobuf bytes that append to a model's graph a node nested ``depth`` Ifs deep (built
    by hand: the protobuf library itself refuses to build them), past protobuf's parse limit."""
    node = _field(4, b"Identity")
    for _ in range(depth):
        graph = _field(1, node)                                   # GraphProto.node
        attr = _field(1, b"then_branch") + _varint(20 << 3) + _varint(5) + _field(6, graph)
        node = _field(4, b"If") + _field(5, attr)                 # NodeProto.op_type, attribute
    return _field(7, _field(1, node))                             # ModelProto.graph.node


def _reseal(m, edit) -> None:
    """Edit the metadata and recompute its checksum (the checksum is not a signature)."""
    props = {p.key: p for p in m.metadata_props}
    info = json.loads(props["qfv_brevitas.export"].value)
    edit(info)
    text = json.dumps(info, sort_keys=True)
    props["qfv_brevitas.export"].value = text
    props["qfv_brevitas.sha256"].value = hashlib.sha256(text.encode()).hexdigest()


def _extra_quantized_layer(m) -> None:
    z = [numpy_helper.from_array(np.ones((10, 10), np.float32), "extra_w"),
         numpy_helper.from_array(np.array(1.0, np.float32), "extra_s"),
         numpy_helper.from_array(np.array(0.0, np.float32), "extra_z"),
         numpy_helper.from_array(np.array(4.0, np.float32), "extra_b")]
    _append(m, [helper.make_node("Quant", ["extra_w", "extra_s", "extra_z", "extra_b"],
                                 ["extra_q"], name="extra_quant", domain=QONNX, signed=1,
                                 narrow=0, rounding_mode="ROUND"),
                helper.make_node("Gemm", [_out(m), "extra_q"], ["extra_y"], name="extra_gemm")],
            z, "extra_y")
    _declare(m, {"extra_q": [10, 10], "extra_y": [1, 10]})


def _bypass_first_layer(m) -> None:
    """The first quantized layer's Gemm takes a plain float constant instead."""
    info = json.loads({p.key: p.value for p in m.metadata_props}["qfv_brevitas.export"])
    w = info["layers"][0]["weight_tensor"]
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm" and n.input[1] == w)
    shape = info["layers"][0]["weight_shape"]
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), "plain_w"))
    gemm.input[1] = "plain_w"


def _slow_chain(m, nodes: int = 2000) -> None:
    """A structurally allowed tail that takes minutes: MatMuls by the identity after the
    output (converting it for onnxruntime alone takes qonnx minutes; then each node runs as
    its own onnxruntime session)."""
    out = _out(m)
    names = [out] + [f"slow{i}" for i in range(nodes)]
    _append(m, [helper.make_node("MatMul", [names[i], "eye"], [names[i + 1]], name=f"mm{i}")
                for i in range(nodes)],
            [numpy_helper.from_array(np.eye(10, dtype=np.float32), "eye")], names[-1])
    _declare(m, {t: [1, 10] for t in names[1:]})


def _place(tmp_path: Path, payload, name: str = "evil.onnx") -> Path:
    """``w/model/<name>`` holding ``payload`` (a model or bytes), the secrets and the FIFO
    around it; returns ``w``."""
    w = tmp_path / "w"
    (w / "model").mkdir(parents=True, exist_ok=True)
    (w / "secret.txt").write_text(MARK * 64)
    (tmp_path / "secret.txt").write_text(MARK * 64)
    if not (w / "fifo").exists():
        os.mkfifo(w / "fifo")
    if payload is not None:
        data = payload if isinstance(payload, bytes) else payload.SerializeToString()
        (w / "model" / name).write_bytes(data)
    return w


class Case(NamedTuple):
    id: str
    build: Callable  # (world, model folder) -> model proto (or None: the folder is prepared)
    mentions: Tuple[str, ...]


def _ext(location, offset=None, length=None, prepare=None):
    def build(world, folder):
        if prepare is not None:
            prepare(folder)
        m = _load(world)
        _external(_codes(m), location, offset, length)
        return m
    return build


def _inside_bin(folder: Path) -> None:
    (folder / "inside.bin").write_bytes(b"\x01" * 4096)


def _link(folder: Path) -> None:
    (folder / "link.bin").symlink_to(folder.parent / "secret.txt")


def _edit(*edits, form: str = "compact"):
    def build(world, folder):
        m = _load(world, form)
        for e in edits:
            e(m)
        return m
    return build


def _relu_attr(attr):
    def edit(m):
        next(n for n in m.graph.node if n.op_type == "Relu").attribute.append(attr)
    return edit


def _ext_attr(m) -> None:
    t = numpy_helper.from_array(np.zeros(1024, np.float32), "hidden")
    _external(t, "../secret.txt", 0, 4096)
    _relu_attr(helper.make_attribute("value", t))(m)


def _sub_external(m) -> None:
    t = numpy_helper.from_array(np.zeros(16, np.float32), "sub_w")
    _external(t, "../secret.txt")
    branch = helper.make_graph([_ident("sub_w", "if_then")], "then", [],
                               [helper.make_tensor_value_info("if_then", 1, [16])], [t])
    m.graph.node.append(helper.make_node("If", ["cond"], ["if_y"], name="cond_if",
                                         then_branch=branch, else_branch=branch))


def _set_codes(fn):
    def edit(m):
        fn(_codes(m))
    return edit


def _outer_product(m) -> None:
    _append(m, [helper.make_node("Reshape", [_out(m), "col"], ["col_y"], name="to_col"),
                helper.make_node("Mul", ["col_y", "row"], ["outer"], name="outer_mul")],
            [numpy_helper.from_array(np.array([10, 1], np.int64), "col"),
             numpy_helper.from_array(np.ones((1, 1 << 21), np.float32), "row")], "outer")


def _many_declared(m) -> None:
    m.graph.value_info.extend(helper.make_tensor_value_info(f"ghost{i}", 1, [1 << 23])
                              for i in range(12))


EXTERNAL = [
    Case("ext-outside-relative", _ext("../secret.txt"), ("weight_codes", "external data")),
    Case("ext-outside-two-up", _ext("../../secret.txt"), ("weight_codes", "external data")),
    Case("ext-absolute", lambda w, f: _ext(str(f.parent / "secret.txt"))(w, f),
         ("weight_codes", "external data")),
    Case("ext-fifo-outside", _ext("../fifo"), ("weight_codes", "external data")),
    Case("ext-dev-zero-huge", _ext("/dev/zero", 0, 1 << 40), ("weight_codes", "external data")),
    Case("ext-inside-folder", _ext("inside.bin", 0, 64, _inside_bin),
         ("weight_codes", "external data")),
    Case("ext-inside-huge-offset", _ext("inside.bin", 1 << 62, 64, _inside_bin),
         ("weight_codes", "external data")),
    Case("ext-symlink-inside-to-outside", _ext("link.bin", None, None, _link),
         ("weight_codes", "external data")),
    Case("ext-on-a-tensor-attribute", _edit(_ext_attr), ("'value'", "external data")),
    Case("ext-in-a-subgraph", _edit(_sub_external), ("'If' node 'cond_if'",)),
]
CONTROL = [
    Case("loop-huge-trip-count", _edit(_trip, lambda m: m.graph.node.append(_loop())),
         ("control flow", "'Loop' node 'spin'")),
    Case("loop-hidden-in-if", _edit(lambda m: m.graph.node.append(_if("outer", [_loop()]))),
         ("control flow", "'If' node 'outer'", "and 3 more")),
    Case("loop-three-ifs-down", _edit(lambda m: m.graph.node.append(_nested_ifs(3, _loop()))),
         ("control flow", "'If' node 'lvl2'")),
    Case("scan", _edit(lambda m: m.graph.node.append(helper.make_node(
        "Scan", ["v"], ["s"], name="scanner", num_scan_inputs=1,
        body=_sub([_ident("v", "sb")])))), ("'Scan' node 'scanner'",)),
    Case("quant-carrying-a-graph", _edit(lambda m: next(
        n for n in m.graph.node if n.op_type == "Quant").attribute.append(
            helper.make_attribute("body", _sub([_ident("v", "qb")])))),
        ("attribute 'body'", "carries a subgraph")),
    Case("relu-carrying-graphs", _edit(_relu_attr(helper.make_attribute(
        "bodies", [_sub([_ident("v", "g1")]), _sub([_ident("v", "g2")])]))),
        ("attribute 'bodies'", "carries a subgraph")),
    Case("foreign-domain-top", _edit(lambda m: m.graph.node.append(helper.make_node(
        "system", ["v"], ["y2"], name="evil", domain="os"))), ("op domain 'os'", "refusing")),
    Case("foreign-domain-in-if", _edit(lambda m: m.graph.node.append(_if("wrap", [
        helper.make_node("system", ["v"], ["y2"], name="evil", domain="subprocess")]))),
        ("op domain 'subprocess'", "inside 'If' node 'wrap'")),
    Case("foreign-domain-four-down", _edit(lambda m: m.graph.node.append(_nested_ifs(
        4, helper.make_node("run", ["v"], ["y2"], name="evil", domain="shutil")))),
        ("op domain 'shutil'", "inside 'If' node 'lvl0'")),
    Case("nesting-25-ifs", _edit(lambda m: m.graph.node.append(_nested_ifs(
        25, _ident("v", "deep")))), ("control flow", "'If' node 'lvl24'")),
    Case("nesting-past-protobuf-limit", lambda w, f: _load(w).SerializeToString()
         + _deep_ifs(150), ("not a readable ONNX file",)),
    Case("local-function", _edit(lambda m: m.functions.add(name="Evil", domain="qfv_local"),
                                 lambda m: m.opset_import.add(domain="qfv_local", version=1)),
         ("'qfv_local'",)),
]
OPS = [
    Case("expand-huge", _edit(lambda m: _append(m, [helper.make_node(
        "Expand", [_out(m), "big_shape"], ["ex"], name="grow")], [numpy_helper.from_array(
            np.array([1 << 20, 1 << 20], np.int64), "big_shape")], "ex")),
        ("'Expand' node 'grow'", "not one the export forms write")),
    Case("constant-of-shape", _edit(lambda m: m.graph.node.append(helper.make_node(
        "ConstantOfShape", ["big_shape"], ["cs"], name="fill"))), ("'ConstantOfShape'",)),
    Case("resize", _edit(lambda m: m.graph.node.append(helper.make_node(
        "Resize", [_out(m), "", "scales"], ["rs"], name="upsample"))), ("'Resize'",)),
    Case("multithreshold", _edit(lambda m: m.graph.node.append(helper.make_node(
        "MultiThreshold", [_out(m), "t"], ["mt"], name="thr", domain=QONNX))),
        ("'MultiThreshold'",)),
    Case("escape-in-op-type", _edit(lambda m: m.graph.node.append(helper.make_node(
        "Evil\x1b[2J\x1b]0;owned\x07", [_out(m)], ["ev"], name="esc\x1b[31m"))),
        ("Evil\\x1b[2J",)),
    Case("ir-version-99", _edit(lambda m: setattr(m, "ir_version", 99)), ("IR version 99",)),
    Case("opset-999", _edit(lambda m: setattr(m.opset_import[0], "version", 999)),
         ("opset 999",)),
    Case("opset-twice", _edit(lambda m: m.opset_import.add(domain="", version=17)),
         ("imported twice",)),
    Case("foreign-opset-import", _edit(lambda m: m.opset_import.add(domain="os", version=1)),
         ("op domain 'os'", "refusing")),
]
SIZES = [
    Case("too-many-nodes", _edit(lambda m: _append(m, [
        helper.make_node("Relu", [_out(m) if i == 0 else f"r{i}"], [f"r{i + 1}"],
                         name=f"relu{i}") for i in range(MAX_NODES)], (), f"r{MAX_NODES}")),
        (f"more than {MAX_NODES} nodes",)),
    Case("initializer-dims-lie", _edit(_set_codes(lambda t: t.dims.__setitem__(0, 4096))),
         ("weight_codes", "bytes of data")),
    Case("initializer-bytes-short", _edit(_set_codes(
        lambda t: setattr(t, "raw_data", t.raw_data[:7]))), ("weight_codes", "bytes of data")),
    Case("initializer-typed-count-lies", _edit(_set_codes(lambda t: (
        t.ClearField("raw_data"), t.int32_data.extend([1, 2, 3])))),
        ("weight_codes", "3 stored values")),
    Case("initializer-two-fields", _edit(_set_codes(lambda t: t.int32_data.extend([1]))),
         ("weight_codes", "stores its values in")),
    Case("initializer-negative-dim", _edit(_set_codes(lambda t: t.dims.__setitem__(0, -1))),
         ("weight_codes", "dimension -1")),
    Case("initializer-zero-times-huge", _edit(_set_codes(lambda t: (
        t.ClearField("dims"), t.dims.extend([0, 1 << 40]), t.ClearField("raw_data")))),
        ("weight_codes", "dimension 1099511627776")),
    Case("initializer-rank-9", _edit(_set_codes(lambda t: t.dims.extend([1] * 7))),
         ("weight_codes", "rank 9")),
    Case("initializer-string", _edit(_set_codes(lambda t: setattr(t, "data_type", 8))),
         ("weight_codes", "element type STRING")),
    Case("declared-huge", _edit(lambda m: m.graph.value_info.append(
        helper.make_tensor_value_info("ghost", 1, [1 << 24, 1 << 24]))),
        ("'ghost'", "elements")),
    Case("declared-over-budget", _edit(_many_declared), ("declared tensors hold",)),
    Case("declared-sequence", _edit(lambda m: m.graph.value_info.append(
        helper.make_tensor_sequence_value_info("seq", 1, [1]))), ("'seq'", "sequence_type")),
    Case("inferred-outer-product", _edit(_outer_product), ("'outer'", "would hold")),
    Case("declared-shape-lies", _edit(lambda m: setattr(
        m.graph.output[0].type.tensor_type.shape.dim[1], "dim_value", 11)),
        ("shapes do not add up",)),
    Case("attribute-100k-ints", _edit(_relu_attr(helper.make_attribute(
        "pads", list(range(100_000))))), ("attribute 'pads'", "more than 64 items")),
    Case("attribute-1mb-string", _edit(_relu_attr(helper.make_attribute("note", "x" * (1 << 20)))),
         ("attribute 'note'", "over 4096 characters")),
    Case("concat-1000-inputs", _edit(lambda m: m.graph.node.append(helper.make_node(
        "Concat", [_out(m)] * 1000, ["cat"], name="wide", axis=0))),
        ("'Concat' node 'wide'", "over 64 inputs")),
    Case("sparse-initializer", _edit(lambda m: m.graph.sparse_initializer.add()),
         ("sparse initializers",)),
]
FILES = [
    Case("file-is-a-fifo", lambda w, f: os.mkfifo(f / "evil.onnx"), ("not a regular file",)),
    Case("file-is-a-folder", lambda w, f: (f / "evil.onnx").mkdir(), ("is a folder",)),
    Case("file-links-to-a-fifo", lambda w, f: (f / "evil.onnx").symlink_to(f.parent / "fifo"),
         ("not a regular file",)),
    Case("file-links-to-dev-zero", lambda w, f: (f / "evil.onnx").symlink_to("/dev/zero"),
         ("not a regular file",)),
    Case("file-sparse-2gib", lambda w, f: os.truncate(_touch(f / "evil.onnx"), 2 << 30),
         ("over the limit",)),
]


def _touch(p: Path) -> Path:
    p.write_bytes(b"")
    return p


MALFORMED = [
    Case("metadata-tensor-name-a-list", _edit(lambda m: _reseal(
        m, lambda i: i["layers"][0].update(weight_tensor=[1]))),
        ("weight tensor [1] is not in the graph",)),
]
ALL = EXTERNAL + CONTROL + OPS + SIZES + FILES + MALFORMED


def _argv(cmd: str, world: World, *extra) -> List[str]:
    if cmd == "inspect":
        return ["inspect", REL, *extra]
    return ["verify", REL, str(world.ck), "--samples", "4", *extra]


def _bounded(run, w: Path, baseline: int = 0) -> None:
    """Peak memory growth below 200 MB + 20x the file, or (``baseline``: the same command's
    growth on the untampered file, whose own work, exporting the checkpoint to compare,
    costs 130-220 MB depending on the machine) below that + 64 MB + 20x the file."""
    size = sum(p.stat().st_size for p in (w / "model").iterdir() if p.is_file()
               and not p.is_symlink() and p.stat().st_size < 1 << 30)
    bound = max(200 << 20, baseline + (64 << 20)) + 20 * size
    assert run.peak_bytes < bound, (run.peak_bytes, baseline)
    assert MARK not in run.out + run.err


@pytest.mark.parametrize("cmd", ["inspect", "verify"])
@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_a_hostile_graph_is_refused(world, tmp_path, run_qfv, refused, snapshot, case, cmd):
    w = _place(tmp_path, None)
    payload = case.build(world, w / "model")
    if payload is not None:
        _place(tmp_path, payload)
    before = snapshot(tmp_path)
    run = run_qfv(_argv(cmd, world), w, timeout=40)
    refused(run, 2, REL, *case.mentions, command=cmd)
    assert snapshot(tmp_path) == before
    _bounded(run, w)


METADATA = [
    Case(f"extra-quantized-layer-{form}", _edit(_extra_quantized_layer, form=form),
         ("'Gemm' node 'extra_gemm' takes quantized weights", "'Quant' node 'extra_quant'"))
    for form in FORMS
] + [
    Case("metadata-drops-a-layer", _edit(lambda m: _reseal(m, lambda i: i["layers"].pop(1))),
         ("takes quantized weights", "does not describe as a layer")),
    Case("metadata-names-a-layer-the-graph-lacks", _edit(_bypass_first_layer),
         ("of the metadata is not in the graph: no Conv/Gemm/MatMul/ConvTranspose node takes "
          "its weights",)),
    Case("metadata-ghost-layer", _edit(lambda m: _reseal(m, lambda i: i["layers"].append(
        dict(copy.deepcopy(i["layers"][0]), layer="ghost")))), ("'ghost'",)),
]


#: cases whose metadata was edited (and resealed): verify's comparison of the file's layers
#: with the checkpoint's refuses them before any graph check
RESEALED = ("metadata-drops-a-layer", "metadata-ghost-layer")


@pytest.mark.parametrize("case", METADATA, ids=[c.id for c in METADATA])
def test_inspect_names_a_graph_that_disagrees_with_its_metadata(world, tmp_path, run_qfv,
                                                                 refused, snapshot, case):
    w = _place(tmp_path, case.build(world, None))
    before = snapshot(tmp_path)
    run = run_qfv(["inspect", REL], w, timeout=40)
    refused(run, 2, REL, "the graph does not match its metadata", *case.mentions,
            command="inspect")
    assert snapshot(tmp_path) == before
    _bounded(run, w)


@pytest.fixture(scope="module")
def verify_peak(world, tmp_path_factory, run_qfv) -> int:
    """``qfv verify``'s peak memory growth on the untampered compact file (it passes)."""
    w = _place(tmp_path_factory.mktemp("verify-baseline"), _load(world))
    run = run_qfv(_argv("verify", world), w, timeout=120)
    assert run.code == 0, run.err[-2000:]
    return run.peak_bytes


@pytest.mark.parametrize("case", METADATA, ids=[c.id for c in METADATA])
def test_verify_finds_the_same_disagreement(world, tmp_path, run_qfv, snapshot, case,
                                            verify_peak):
    """verify says the file does not match (exit 1: a difference; the graph is not run when
    it disagrees with its metadata)."""
    w = _place(tmp_path, case.build(world, None))
    before = snapshot(tmp_path)
    run = run_qfv(_argv("verify", world), w, timeout=60)
    assert run.code == 1, (run.code, run.err[-2000:])
    assert "Traceback" not in run.err
    lines = [ln for ln in run.lines if ln.startswith("qfv verify")]
    assert len(lines) == 1 and REL in lines[0] and "does not match" in lines[0], run.err
    if case.id not in RESEALED:  # intact metadata: the report names the disagreement itself
        assert case.mentions[0] in run.out, run.out[-3000:]
    assert snapshot(tmp_path) == before
    _bounded(run, w, verify_peak)


# -- a structurally allowed graph that runs long -----------------------------------------------
@pytest.fixture(scope="module")
def slow_file(world, tmp_path_factory) -> bytes:
    m = _load(world)
    _slow_chain(m)
    return m.SerializeToString()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_graph_runs_stops_it(world, slow_file, tmp_path, run_qfv, refused,
                                               snapshot, sig):
    w = _place(tmp_path, slow_file)
    before = snapshot(tmp_path)
    after = 12.0  # past loading, the checkpoint's own export and the checks: in the graph run
    run = run_qfv(_argv("verify", world, "--samples", "16"), w, timeout=after + 20,
                  signal_after=after, sig=sig)
    refused(run, 130, "interrupted", command="verify")
    assert run.seconds < after + 6  # the graph alone runs for minutes
    assert snapshot(tmp_path) == before


def test_the_time_limit_stops_a_long_graph(world, slow_file, tmp_path, run_qfv, refused,
                                           snapshot):
    w = _place(tmp_path, slow_file)
    before = snapshot(tmp_path)
    run = run_qfv(_argv("verify", world, "--samples", "16", "--time-limit", "3"), w,
                  timeout=60)
    refused(run, 4, REL, "still running after the time limit of 3 s", command="verify")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
@pytest.mark.parametrize("cmd", ["verify", "export"])
def test_a_bad_time_limit_is_refused_naming_the_option(world, tmp_path, run_qfv, refused,
                                                       cmd, value):
    w = _place(tmp_path, _load(world))
    argv = (_argv("verify", world) if cmd == "verify" else
            ["export", str(world.ck), "--out", "new.onnx"]) + ["--time-limit", value]
    run = run_qfv(argv, w, timeout=40)
    refused(run, 2, "--time-limit", command=cmd)
    assert not (w / "new.onnx").exists()
