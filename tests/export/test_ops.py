"""The NMultWeight op: its spec's truth table, the numpy reference, qonnx integration, the
Quant lowering for onnxruntime."""
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.util.cleanup import cleanup_model

from qfv_brevitas.export import cleanup_qonnx, nmult_weight
from qfv_brevitas.export.graph import LowerQuantToStandard
from qfv_brevitas.export.ops import DOMAIN, NMultWeight
from qfv_brevitas.core.levels import level_table

SPEC = Path(__file__).resolve().parents[2] / "docs" / "ops" / "NMultWeight.md"


def _floats(cell):
    return [float(v) for v in cell.split(",")] if cell.strip() != "-" else None


def spec_rows():
    rows = []
    for line in SPEC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"\d+", cells[4]):
            rows.append({"r": _floats(cells[0]), "c": float(cells[1]), "lrs": _floats(cells[2]),
                         "hrs": _floats(cells[3]), "code": int(cells[4]),
                         "bits": [int(b) for b in cells[5].split()], "weight": float(cells[6])})
    return rows


def one_node_model(codes, r, c, lrs=None, hrs=None, axis=-1, const=True):
    ins = {"codes": codes.astype(np.uint8), "r": np.asarray(r, np.float32),
           "c": np.asarray(c, np.float32)}
    if lrs is not None:
        ins["lrs"] = np.asarray(lrs, np.float32)
    if hrs is not None:
        ins["hrs"] = np.asarray(hrs, np.float32)
    node = helper.make_node("NMultWeight", list(ins), ["w"], domain=DOMAIN,
                            bit_width=int(np.asarray(r).shape[1]), axis=axis, layer="t")
    out = helper.make_tensor_value_info("w", TensorProto.FLOAT, list(codes.shape))
    graph = helper.make_graph([node], "g", [], [out],
                              initializer=[numpy_helper.from_array(v, k) for k, v in ins.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid(DOMAIN, 1)])
    return ModelWrapper(model)


def test_spec_has_the_truth_table():
    rows = spec_rows()
    assert len(rows) == 12
    assert {r["code"] for r in rows} == {0, 1, 2, 3}


@pytest.mark.parametrize("row", spec_rows(), ids=lambda r: f"code{r['code']}-{r['r']}-{r['lrs']}")
def test_truth_table_through_qonnx_execute(row):
    assert row["bits"] == [(row["code"] >> k) & 1 for k in range(2)]
    lrs = None if row["lrs"] is None else np.array([[row["lrs"]]], np.float32)
    hrs = None if row["hrs"] is None else np.array([[row["hrs"]]], np.float32)
    mw = one_node_model(np.array([row["code"]]), [row["r"]], [row["c"]], lrs, hrs)
    w = execute_onnx(mw, {})["w"]
    if row["lrs"] is None:
        assert w[0] == np.float32(row["weight"])  # exact: dyadic values
    else:
        assert w[0] == pytest.approx(row["weight"], abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), groups=st.integers(1, 4), per_channel=st.booleans(),
       axis=st.integers(0, 1), seed=st.integers(0, 2 ** 16))
def test_numpy_reference_equals_the_torch_level_table_bitwise(bits, groups, per_channel, axis,
                                                              seed):
    g = torch.Generator().manual_seed(seed)
    shape = [3, 5]
    G = groups if per_channel else 1
    if per_channel:
        shape[axis] = G
    r = torch.randn(G, bits, generator=g)
    c = torch.randn(G, generator=g)
    codes = torch.randint(0, 1 << bits, shape, generator=g)
    ax = axis if per_channel else -1
    w = nmult_weight(codes.numpy().astype(np.uint8), r.numpy(), c.numpy(), ax)
    table = level_table(r, c)
    c2d = codes.reshape(1, -1) if ax < 0 else codes.movedim(ax, 0).reshape(G, -1)
    expect = table.gather(1, c2d)
    expect = expect.reshape(shape) if ax < 0 else expect.reshape(
        [shape[ax]] + [s for i, s in enumerate(shape) if i != ax]).movedim(0, ax)
    assert np.array_equal(w, expect.numpy())  # bit for bit, not approximately


def test_reference_rejects_bad_inputs():
    with pytest.raises(ValueError, match="exceeds"):
        nmult_weight(np.array([4], np.uint8), np.ones((1, 2)), np.zeros(1))
    with pytest.raises(ValueError, match=r"\(G, N\)"):
        nmult_weight(np.array([1], np.uint8), np.ones(2), np.zeros(1))
    with pytest.raises(ValueError, match="channel axis"):
        nmult_weight(np.zeros((2, 3), np.uint8), np.ones((2, 2)), np.zeros(2), axis=-1)
    with pytest.raises(ValueError, match="no axis"):
        nmult_weight(np.zeros((2, 3), np.uint8), np.ones((4, 2)), np.zeros(4), axis=0)


def test_verify_node_and_bit_width_check():
    mw = one_node_model(np.array([1, 2]), [[0.5, 1.0]], [-0.75])
    op = NMultWeight(mw.graph.node[0])
    assert op.verify_node() == []
    bad = helper.make_node("NMultWeight", ["codes", "r", "c"], ["w"], domain=DOMAIN,
                           bit_width=3)
    mw.graph.node[0].CopyFrom(bad)
    with pytest.raises(ValueError, match="bit_width 3 but r has 2"):
        execute_onnx(mw, {})


def test_qonnx_cleanup_folds_the_op_ours_keeps_it():
    """The trap DESIGN.md names: qonnx's cleanup constant-folds a custom weight op."""
    mw = one_node_model(np.array([[0, 1], [2, 3]]), [[0.5, 1.0]], [-0.75])
    ours = cleanup_qonnx(onnx.ModelProto.FromString(mw.model.SerializeToString()))
    assert [n.op_type for n in ours.graph.node] == ["NMultWeight"]
    theirs = cleanup_model(ModelWrapper(onnx.ModelProto.FromString(mw.model.SerializeToString())))
    assert [n.op_type for n in theirs.graph.node] == []  # folded to a float initializer


def _lowered_and_qonnx(node, inits, x, qonnx_version: int = 1):
    """A one-node graph on a 64-vector ``x``: (onnxruntime on its LowerQuantToStandard form,
    qonnx's execution of it); the node's op must be gone from the lowered graph."""
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [64])],
                              [helper.make_tensor_value_info("y", 1, [64])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("qonnx.custom_op.general", qonnx_version)])
    ref = execute_onnx(ModelWrapper(model), {"x": x})["y"]
    lowered = ModelWrapper(onnx.ModelProto.FromString(model.SerializeToString()))
    lowered = lowered.transform(LowerQuantToStandard())
    assert node.op_type not in [n.op_type for n in lowered.graph.node]
    got = ort.InferenceSession(lowered.model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return got, ref


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), narrow=st.booleans(),
       mode=st.sampled_from(["ROUND", "FLOOR", "CEIL"]), seed=st.integers(0, 2 ** 16))
def test_lowered_quant_in_onnxruntime_equals_qonnx(bits, signed, narrow, mode, seed):
    rng = np.random.default_rng(seed)
    scale = np.float32(rng.uniform(0.01, 1.0))
    x = (rng.integers(-300, 300, size=64) / 2.0).astype(np.float32) * scale  # many .5 ties
    x[:8] = np.array([-1e6, 1e6, 0, -0.0, 0.5, -0.5, 1.5, -2.5], np.float32) * scale
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.float32(0), "z"),
             numpy_helper.from_array(np.float32(bits), "b")]
    node = helper.make_node("Quant", ["x", "s", "z", "b"], ["y"],
                            domain="qonnx.custom_op.general", signed=int(signed),
                            narrow=int(narrow), rounding_mode=mode)
    got, ref = _lowered_and_qonnx(node, inits, x)
    assert np.array_equal(got, ref)


@settings(max_examples=30, deadline=None)
@given(in_bits=st.integers(4, 12), shift=st.integers(0, 4), signed=st.booleans(),
       mode=st.sampled_from(["ROUND", "FLOOR", "CEIL"]), seed=st.integers(0, 2 ** 16))
def test_lowered_trunc_in_onnxruntime_equals_qonnx(in_bits, shift, signed, mode, seed):
    """QONNX's Trunc (Brevitas' truncating average pool), trunc_v2 form: the lowering runs in
    onnxruntime exactly as qonnx executes it, ties and clipping included."""
    rng = np.random.default_rng(seed)
    shift = min(shift, in_bits - 3)  # keep at least 3 integer bits after the shift
    scale = np.float32(2.0 ** -rng.integers(2, 8))
    out_scale = np.float32(scale * 2.0 ** shift)
    lo, hi = (-(2 ** (in_bits - 1)), 2 ** (in_bits - 1) - 1) if signed else (0, 2 ** in_bits - 1)
    x = (rng.integers(lo, hi + 1, size=64) + rng.choice([0.0, 0.5], size=64)).astype(np.float32)
    x = x * scale
    out_bits = max(2, in_bits - shift - int(rng.integers(0, 2)))  # sometimes clips
    inits = [numpy_helper.from_array(v, n) for v, n in (
        (scale, "s"), (np.float32(0), "z"), (np.float32(in_bits), "bi"), (out_scale, "so"),
        (np.float32(out_bits), "bo"))]
    node = helper.make_node("Trunc", ["x", "s", "z", "bi", "so", "bo"], ["y"],
                            domain="qonnx.custom_op.general", signed=int(signed), narrow=0,
                            rounding_mode=mode)
    # trunc_v2 (6 inputs, as Brevitas exports it) is version 2 of the qonnx domain
    got, ref = _lowered_and_qonnx(node, inits, x, qonnx_version=2)
    assert np.array_equal(got, ref)
    assert len(np.unique(ref)) >= 3  # a live check: distinct outputs, not one clipped value
