"""Per-channel export paths against references computed here (issue 27).

A conv layer (fan-in 4) and a linear layer (fan-in 36), both with per-output-channel bit
multipliers ``r`` and offsets ``c`` set by hand so that the channels differ: mixed signs of
``c`` and of ``r``'s entries, scales of 10 and of 1e-3 (with fixed-point ties), a channel all
zero, a channel with a single nonzero weight, and one whose levels collapse to 0 (``r = 0``).
Each weight is put exactly on the level of a code chosen here, so the codes are known.

The references never call the library: the levels of channel ``g`` are
``c_g + sum_k r_{g,k} bit_k(code)`` summed in a plain loop over channels, the fixed-point
multipliers ``round(r * 2**f)`` (half to even) per entry, the integer widths the smallest
two's-complement (or unsigned) width of each channel's level range, the forward pass a numpy
loop. Each form's file is then read back by qonnx, onnxruntime and straight from its
initializers, its metadata compared, and one channel of it tampered with.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.core.quantizers import quant_of
from qfv_brevitas.export import ExportFileError, export_qonnx, read_metadata
from qfv_brevitas.export.checks import graph_problems
from qfv_brevitas.export.metadata import write_metadata

BITS = 3
F = 12  # fractional bits of the fixed and planes forms
SCALE = 2.0 ** F
FORMS = ("compact", "bitplanes", "fixed", "planes")
TAMPERED = 2  # the channel every tamper changes

#: per layer: r (G, N) and c (G,), set by hand. conv "0": channel 0 at scale 10, channel 1 at
#: 1e-3 (2.5 / 4096 and 3.5 / 4096 tie on the 2**-12 grid), channel 3 all zero. linear "3":
#: channel 0 at 1e-3, channel 1 at scale 10 (the widest levels: not channel 0), channel 3 a
#: single nonzero weight, channel 4 collapsed (r = 0, c = 0) and all zero.
R = {"0": [[10.0, -5.0, 20.0], [-1e-3, 2.5 / 4096, 4e-3], [0.5, 0.25, -1.5], [0.3, 0.7, -1.1]],
     "3": [[-2e-3, -2.5 / 4096, 3.5e-3], [12.0, -8.0, 3.0], [0.5, -0.25, 1.25],
           [0.375, 0.2, -0.9], [0.0, 0.0, 0.0]]}
C = {"0": [-7.5, 3.5 / 4096, 0.75, 0.0], "3": [-1.5e-3, 6.0, -0.625, 0.0, 0.0]}
ZERO = {"0": [3], "3": [4]}      # channels whose weights are all 0 (code 0)
SINGLE = {"0": [], "3": [3]}     # channels with one nonzero weight
COLLAPSED = {"0": [], "3": [4]}  # r = 0: every code is the same level, the code is free


# -- the references (plain loops over channels) ------------------------------------------------
def levels(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``(G, 2**N)`` levels, float32 summed bit by bit: ``c_g + r_g0 b_0 + r_g1 b_1 + ...``."""
    G, N = r.shape
    out = np.zeros((G, 1 << N), np.float32)
    for g in range(G):
        for code in range(1 << N):
            v = np.float32(c[g])
            for k in range(N):
                v = np.float32(v + np.float32(r[g, k]) * np.float32((code >> k) & 1))
            out[g, code] = v
    return out


def weights_of(codes: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Each weight the level of its code in its own output channel (axis 0)."""
    table = levels(r, c)
    w = np.zeros(codes.shape, np.float32)
    for g in range(codes.shape[0]):
        w[g] = table[g][codes[g]]
    return w


def rounded(a) -> np.ndarray:
    """Integers ``round(a * 2**F)``, half to even, entry by entry (float64)."""
    a = np.asarray(a, np.float64)
    out = np.zeros(a.shape, np.float64)
    for i in np.ndindex(a.shape):
        out[i] = round(float(a[i]) * SCALE)  # Python's round: half to even
    return out


def width(lo: int, hi: int):
    """Smallest integer type holding lo..hi: (bits, signed); signed at least 2 bits."""
    if lo >= 0:
        return max(1, int(hi).bit_length()), False
    b = 2
    while lo < -(2 ** (b - 1)) or hi > 2 ** (b - 1) - 1:
        b += 1
    return b, True


def integer_range(m: np.ndarray, mc: np.ndarray):
    """Per channel: the smallest and largest integer level ``mc_g + sum_k m_gk b_k``."""
    lo, hi = [], []
    for g in range(m.shape[0]):
        vals = [mc[g] + sum(m[g, k] * ((code >> k) & 1) for k in range(m.shape[1]))
                for code in range(1 << m.shape[1])]
        lo.append(int(min(vals)))
        hi.append(int(max(vals)))
    return lo, hi


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Valid, stride-1 convolution as a loop (float64)."""
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    y = np.zeros((n, o, h - kh + 1, wd - kw + 1))
    for i in range(h - kh + 1):
        for j in range(wd - kw + 1):
            patch = x[:, :, i:i + kh, j:j + kw].reshape(n, -1)
            y[:, :, i, j] = patch @ w.reshape(o, -1).T.astype(np.float64) + b
    return y


def forward(x: np.ndarray, ws: dict, model: nn.Module):
    """The model's forward with the weights ``ws``: the conv output and the logits."""
    b0 = model[0].bias.detach().double().numpy()
    b3 = model[3].bias.detach().double().numpy()
    h = conv2d(x.astype(np.float64), ws["0"], b0)
    z = np.maximum(h, 0).reshape(len(x), -1)
    return h, z @ ws["3"].astype(np.float64).T + b3


def bound(x: np.ndarray, ws: dict, model: nn.Module):
    """Float32 rounding bounds of both outputs: 1e-5 of the sum of the terms' magnitudes."""
    h, y = forward(np.abs(x), {k: np.abs(v) for k, v in ws.items()}, _abs_bias(model))
    return 1e-5 * h + 1e-30, 1e-5 * y + 1e-30


def _abs_bias(model):
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for i in (0, 3):
            twin[i].bias.abs_()
    return twin


# -- the model --------------------------------------------------------------------------------
def _codes(name: str, shape, rng) -> np.ndarray:
    codes = rng.integers(0, 1 << BITS, size=shape).astype(np.uint8)
    for g in ZERO[name]:
        codes[g] = 0
    for g in SINGLE[name]:
        codes[g] = 0
        codes[g].reshape(-1)[7] = 5
    return codes


def build():
    """The model with hand-set r, c and weights on the levels of chosen codes; the codes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5))
    x = torch.rand(6, 1, 4, 4)
    cfg = NMultConfig(weight_bits=BITS, act_bits=None, per_channel=True, first_last_bits=None)
    model = quantize_model(net, cfg, x[:2]).eval()
    rng = np.random.default_rng(27)
    codes = {}
    for name in ("0", "3"):
        layer, tq = model[int(name)], quant_of(model[int(name)])
        r, c = np.asarray(R[name], np.float32), np.asarray(C[name], np.float32)
        codes[name] = _codes(name, tuple(layer.weight.shape), rng)
        with torch.no_grad():
            tq.r.copy_(torch.from_numpy(r))
            tq.c.copy_(torch.from_numpy(c))
            layer.weight.copy_(torch.from_numpy(weights_of(codes[name], r, c)))
            layer.bias.copy_(torch.linspace(-0.5, 0.5, layer.bias.numel()))
    return model, x, codes


def fixed_rc(name: str):
    """Hand-rounded r, c of a layer (float64) and their integers."""
    m, mc = rounded(np.float32(R[name])), rounded(np.float32(C[name]))
    return m / SCALE, mc / SCALE, m, mc


def reference_weights(form: str, codes: dict) -> dict:
    """What each layer of the file must compute: the ideal levels (compact, bitplanes) or the
    levels of the hand-rounded r, c (fixed, planes)."""
    out = {}
    for name in ("0", "3"):
        if form in ("fixed", "planes"):
            r, c, m, mc = fixed_rc(name)
            w = np.zeros(codes[name].shape, np.float64)  # integers * 2**-F, exact in float64
            for g in range(w.shape[0]):
                for k in range(BITS):
                    w[g] += m[g, k] * ((codes[name][g].astype(int) >> k) & 1)
                w[g] += mc[g]
            out[name] = (w / SCALE).astype(np.float32)
        else:
            out[name] = weights_of(codes[name], np.float32(R[name]), np.float32(C[name]))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every form's file of the model (exported once per module), with the model, inputs and
    codes."""
    model, x, codes = build()
    tmp = tmp_path_factory.mktemp("per_channel")
    res = {}
    for form in FORMS:
        kw = {"frac_bits": F} if form in ("fixed", "planes") else {}
        res[form] = export_qonnx(model, x[:1], tmp / f"{form}.onnx", form, verify_inputs=x, **kw)
    return model, x, codes, res


def _inits(proto) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _bits(codes: np.ndarray, k: int) -> np.ndarray:
    return ((codes.astype(np.int64) >> k) & 1).astype(np.float32)


def _live(name: str, shape) -> np.ndarray:
    """Mask of the channels whose code is determined by the weight (not collapsed)."""
    keep = np.ones(shape, bool)
    for g in COLLAPSED[name]:
        keep[g] = False
    return keep


def planes_weights(inits: dict, name: str, shape) -> np.ndarray:
    """A planes-form layer's weights decoded by hand from the initializers the form names
    after the layer: ``scale * (sum_k mult_k[o] plane_k[o] + offset[o] * ones)``; a Linear
    layer's planes are stored (in, out)."""
    def lay(a):
        return a.T if len(shape) == 2 else a

    w = np.zeros(shape, np.float64)
    for o in range(shape[0]):
        for k in range(BITS):
            mult = inits[f"{name}.mult{k}"].reshape(-1)[o]
            w[o] += mult * lay(inits[f"{name}.weight_plane{k}"])[o]
        if f"{name}.offset_mult" in inits:
            ones = lay(inits[f"{name}.weight_ones"])[0]
            w[o] += inits[f"{name}.offset_mult"].reshape(-1)[o] * ones
    return w * float(inits[f"{name}.planes_scale"])


# -- (a) the weights the file holds -----------------------------------------------------------
def test_the_model_holds_the_hand_set_channels():
    """The fixture itself: r, c as set, every channel's levels distinct (but the collapsed
    one), the codes the quantizer finds are the chosen ones."""
    model, _, codes = build()
    for name in ("0", "3"):
        tq = quant_of(model[int(name)])
        assert tq.multipliers().tolist() == np.float32(R[name]).tolist()
        table = levels(np.float32(R[name]), np.float32(C[name]))
        for g in range(table.shape[0]):
            assert len(set(table[g])) == (1 if g in COLLAPSED[name] else 1 << BITS), (name, g)
        got = tq.codes(model[int(name)].weight).numpy()
        keep = _live(name, got.shape)
        assert np.array_equal(got[keep], codes[name][keep])
        w = model[int(name)].weight.detach().numpy()
        for g in ZERO[name]:
            assert not w[g].any()
        for g in SINGLE[name]:
            assert np.count_nonzero(w[g]) == 1


@pytest.mark.parametrize("form", FORMS)
def test_file_weights_equal_the_per_channel_reference(files, form):
    """qonnx's execution of each layer's weight subgraph, and the initializers the form
    names, against the levels computed here channel by channel (exact)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    model, x, codes, res = files
    proto = onnx.load(str(res[form].path))
    want = reference_weights(form, codes)
    inits = _inits(proto)
    mw = ModelWrapper(proto)
    ctx = execute_onnx(mw, {mw.graph.input[0].name: x[:1].numpy()},
                       return_full_exec_context=True)
    for name in ("0", "3"):
        shape = codes[name].shape
        keep = _live(name, shape)
        if form == "planes":
            got = planes_weights(inits, name, shape)
            assert np.array_equal(got, want[name].astype(np.float64)), name
            for k in range(BITS):
                plane = inits[f"{name}.weight_plane{k}"]
                plane = plane.T if len(shape) == 2 else plane
                assert np.array_equal(plane[keep], _bits(codes[name], k)[keep]), (name, k)
            continue
        got = np.asarray(ctx[f"{name}.weight"])
        assert got.dtype == np.float32 and np.array_equal(got, want[name]), name
        if form == "compact":
            assert np.array_equal(inits[f"{name}.weight_codes"][keep], codes[name][keep])
            assert np.array_equal(inits[f"{name}.weight_r"], np.float32(R[name]))
            assert np.array_equal(inits[f"{name}.weight_c"], np.float32(C[name]))
        elif form == "fixed":
            ints = inits[f"{name}.weight_fixed"].astype(np.float64) * SCALE
            assert np.array_equal(ints, want[name].astype(np.float64) * SCALE), name


# -- (b) the model's outputs from onnxruntime -------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_onnxruntime_outputs_equal_a_numpy_forward_with_the_reference_weights(files, form):
    """onnxruntime on the file (weights folded as verification folds them), with the conv
    layer's output exposed too, against a numpy loop with the reference weights, element by
    element within float32 rounding of that element's own terms (so a wrong 1e-3 channel
    is not hidden by a scale-10 one)."""
    import onnxruntime as ort

    from qfv_brevitas.export.graph import to_onnxruntime

    model, x, codes, res = files
    proto = onnx.load(str(res[form].path))
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    known = [v for v in proto.graph.value_info if v.name == relu.input[0]]
    for v in known:
        proto.graph.value_info.remove(v)
    proto.graph.output.append(helper.make_tensor_value_info(relu.input[0],
                                                            onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(to_onnxruntime(proto).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    ws = reference_weights(form, codes)
    xn = x.numpy()
    iname = proto.graph.input[0].name
    got_y, got_h = zip(*(sess.run(None, {iname: xn[i:i + 1]}) for i in range(len(xn))))
    got_h, got_y = np.concatenate(got_h), np.concatenate(got_y)
    h, y = forward(xn, ws, model)
    tol_h, tol_y = bound(xn, ws, model)
    assert np.all(np.abs(got_h - h) <= tol_h), np.abs(got_h - h).max(axis=(0, 2, 3))
    assert np.all(np.abs(got_y - y) <= tol_y), np.abs(got_y - y).max(axis=0)
    # the channels differ in scale by orders of magnitude: the test sees both ends
    bias = model[0].bias.detach().double().numpy()[None, :, None, None]
    per_ch = np.abs(h - bias).max(axis=(0, 2, 3))
    assert per_ch[0] > 1 and 0 < per_ch[1] < 1e-2


# -- (c) the metadata -------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_metadata_holds_each_channels_r_and_c(files, form):
    model, _, _, res = files
    info = read_metadata(res[form].path)
    rows = {row["layer"]: row for row in info["layers"]}
    assert set(rows) == {"0", "3"}
    for name, row in rows.items():
        assert row["granularity"] == "channel" and row["axis"] == 0
        assert row["r"] == np.float32(R[name]).tolist()
        assert row["c"] == np.float32(C[name]).tolist()
        assert row["weight_shape"] == list(model[int(name)].weight.shape)
        if form in ("fixed", "planes"):
            r, c, m, mc = fixed_rc(name)
            assert row["fixed_point"]["r_fixed"] == r.tolist()
            assert row["fixed_point"]["c_fixed"] == c.tolist()
        if form == "planes":
            assert row["planes"]["multipliers"] == m.astype(int).tolist()
            assert row["planes"]["offset"] == mc.astype(int).tolist()


# -- (e) fixed point: widths and rounding per channel -----------------------------------------
@pytest.mark.parametrize("form", ["fixed", "planes"])
def test_fixed_point_widths_and_rounding_match_a_hand_computation(files, form):
    """r, c rounded to 2**-12 entry by entry (the 1e-3 channels' ties half to even), the
    integer range the union of every channel's own range, the width the smallest that holds
    it; the planes form's multiplier and offset widths likewise."""
    _, _, _, res = files
    rows = {row["layer"]: row for row in res[form].metadata["layers"]}
    # the ties: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2
    assert fixed_rc("0")[2][1, 1] == 2 and fixed_rc("0")[3][1] == 4
    assert fixed_rc("3")[2][0, 1] == -2
    for name, row in rows.items():
        r, c, m, mc = fixed_rc(name)
        fx = row["fixed_point"]
        lo, hi = integer_range(m, mc)
        bits, signed = width(min(lo), max(hi))
        assert (fx["int_min"], fx["int_max"]) == (min(lo), max(hi)), name
        assert (fx["int_bits"], fx["signed"], fx["frac_bits"]) == (bits, signed, F), name
        err = max(np.abs(r - np.float32(R[name])).max(), np.abs(c - np.float32(C[name])).max())
        assert fx["max_multiplier_error"] == pytest.approx(err, rel=1e-12, abs=0)
        if form == "planes":
            pl = row["planes"]
            mb = width(int(m.min()), int(m.max()))
            ob = width(int(mc.min()), int(mc.max()))
            assert pl["multiplier_bits"] == (max(mb[0], 2) if mb[1] else mb[0]), name
            assert pl["offset_bits"] == (max(ob[0], 2) if ob[1] else ob[0]), name
            assert pl["offset_layer"] == bool(np.any(mc != 0))
    # the widest channel of the linear layer is channel 1, not channel 0
    lo, hi = integer_range(*fixed_rc("3")[2:])
    assert int(np.argmax(hi)) == 1 and int(np.argmin(lo)) == 1


# -- (d) the forms' checks find a tamper of one channel ---------------------------------------
def _edit(proto, name: str, change) -> None:
    """Replace initializer ``name`` by ``change(copy of its value)``."""
    init = next(i for i in proto.graph.initializer if i.name == name)
    value = numpy_helper.to_array(init).copy()
    change(value)
    init.CopyFrom(numpy_helper.from_array(value, name))


def _holding(proto, want: np.ndarray) -> str:
    """The one initializer whose values are ``want`` (a per-channel constant, any shape)."""
    hits = [i.name for i in proto.graph.initializer
            if numpy_helper.to_array(i).size == want.size
            and np.array_equal(numpy_helper.to_array(i).reshape(-1), want.reshape(-1))]
    assert len(hits) == 1, hits
    return hits[0]


def _stray_level(name: str) -> float:
    """A fixed-point weight that is a level of channel 0 but not of the tampered channel."""
    m, mc = fixed_rc(name)[2:]
    table = [{mc[g] + sum(m[g, k] * ((code >> k) & 1) for k in range(BITS))
              for code in range(1 << BITS)} for g in range(m.shape[0])]
    return sorted(table[0] - table[TAMPERED])[0] / SCALE


def _at(a: np.ndarray, index, delta: float) -> None:
    a.reshape(-1)[index] += delta


def graph_tampers(form: str, name: str):
    """``(what, change)`` pairs: each changes channel TAMPERED of layer ``name``'s tensors in
    a loaded file, nothing else."""
    g, r, c = TAMPERED, np.float32(R[name]), np.float32(C[name])
    if form == "compact":
        return [("r", lambda p: _edit(p, f"{name}.weight_r", lambda a: a.__setitem__(
                    (g, 1), -a[g, 1]))),
                ("c", lambda p: _edit(p, f"{name}.weight_c", lambda a: _at(a, g, 0.5)))]
    if form == "bitplanes":
        return [("r_1", lambda p: _edit(p, _holding(p, r[:, 1]), lambda a: _at(a, g, 0.5))),
                ("c", lambda p: _edit(p, _holding(p, c), lambda a: _at(a, g, 0.5)))]
    if form == "fixed":
        def stray(a):
            a[g].reshape(-1)[0] = _stray_level(name)
        return [("a weight", lambda p: _edit(p, f"{name}.weight_fixed", stray))]
    return [("mult1", lambda p: _edit(p, f"{name}.mult1", lambda a: _at(a, g, 1.0))),
            ("offset", lambda p: _edit(p, f"{name}.offset_mult", lambda a: _at(a, g, 1.0)))]


def metadata_tampers(form: str):
    """``(what, change)`` pairs changing channel TAMPERED of a layer's metadata row."""
    g = TAMPERED
    out = [("r", lambda row: row["r"][g].__setitem__(0, row["r"][g][0] + 0.5)),
           ("c", lambda row: row["c"].__setitem__(g, row["c"][g] - 0.25))]
    if form in ("fixed", "planes"):
        out.append(("r_fixed", lambda row: row["fixed_point"]["r_fixed"][g].__setitem__(
            0, row["fixed_point"]["r_fixed"][g][0] + 0.5)))
    if form == "planes":
        out.append(("multipliers", lambda row: row["planes"]["multipliers"][g].__setitem__(
            1, row["planes"]["multipliers"][g][1] + 1)))
    return out


def _names_the_channel(problems, name: str):
    assert problems, "the tamper went unnoticed"
    for p in problems:
        assert p.startswith(f"layer {name!r}"), problems
    assert any(f"channel {TAMPERED}" in p or f"channels {TAMPERED}" in p
               for p in problems), problems


@pytest.mark.parametrize("form", FORMS)
def test_checks_find_a_graph_tamper_of_one_channel_and_name_it(files, form, tmp_path):
    _, _, _, res = files
    base = onnx.load(str(res[form].path))
    info = json.loads(json.dumps(res[form].metadata))
    assert graph_problems(base, info) == []
    for name in ("0", "3"):
        for what, change in graph_tampers(form, name):
            proto = copy.deepcopy(base)
            change(proto)
            problems = graph_problems(proto, info)
            _names_the_channel(problems, name)
            # a file whose checksums were recomputed after the change: read_metadata refuses
            # it by the same check
            write_metadata(proto, info)
            path = tmp_path / f"{form}_{name}_{what}.onnx"
            onnx.save(proto, str(path))
            with pytest.raises(ExportFileError, match=f"layer '{name}'.*channel"):
                read_metadata(path)


@pytest.mark.parametrize("form", FORMS)
def test_checks_find_a_metadata_tamper_of_one_channel_and_name_it(files, form):
    _, _, _, res = files
    base = onnx.load(str(res[form].path))
    for name in ("0", "3"):
        for what, change in metadata_tampers(form):
            info = json.loads(json.dumps(res[form].metadata))
            change(next(row for row in info["layers"] if row["layer"] == name))
            _names_the_channel(graph_problems(base, info), name)
