"""QONNX export: every form on an MLP, a small CNN, a plain-torch ResNet converted by the
library and bnn_pynq LFC/CNV with swapped quantizers; graph structure, numerical equality,
metadata, devices, fixed point, errors."""
import json
import math

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import numpy_helper
from torch import nn

from qfv_brevitas import (FaultModel, NMultConfig, VariabilityModel, attach_faults,
                          attach_variability, quantize_model, sample_fault_map,
                          sample_variability_map, swap_weight_quant)
from qfv_brevitas.core.device import force_codes
from qfv_brevitas.export import (ExportError, ExportFileError, export_qonnx, load_crossbar,
                                 read_metadata, reference_model, round_to_grid, write_crossbar)
from qfv_brevitas.export.fixedpoint import fixed_point_layer
from qfv_brevitas.export.layers import collect_layers
from qfv_brevitas.export.ops import DOMAIN
from qfv_brevitas.zoo.models import SmallCNN
from qfv_brevitas.core.quantizers import nmult_layers, quant_of

COMPUTE = ("Conv", "Gemm", "MatMul")


# -- models ---------------------------------------------------------------------------------
def digits_inputs(n, shape=(1, 8, 8)):
    from qfv_brevitas.zoo.data import load_digits_split

    _, test = load_digits_split(seed=0)
    return test.tensors[0][:n].reshape((n,) + shape)


def mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                        nn.Linear(16, 10))
    x = digits_inputs(2)
    return quantize_model(net, NMultConfig(weight_bits=4, act_bits=4), x).eval(), x


def cnn():
    torch.manual_seed(0)
    x = digits_inputs(2)
    net = SmallCNN(1, 10, width=8)
    return quantize_model(net, NMultConfig(weight_bits=3, act_bits=4, per_channel=True),
                          x).eval(), x


class TinyResNet(nn.Module):
    """Plain torch: conv-bn-relu stem, two residual blocks (identity and 1x1 projection)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                                nn.BatchNorm2d(16))
        self.proj = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(self.proj(x) + self.b2(x))
        return self.head(x.mean((2, 3)))


def resnet():
    torch.manual_seed(0)
    x = digits_inputs(2)
    return quantize_model(TinyResNet(), NMultConfig(weight_bits=4, act_bits=None), x).eval(), x


def dyadic_(model, frac_bits=6):
    """Multipliers on a power-of-two grid: every product and sum below is exact in float32, so
    torch, qonnx and onnxruntime must agree to the bit even through binary activations."""
    for _, layer in nmult_layers(model):
        tq = quant_of(layer)
        with torch.no_grad():
            tq.r.copy_(round_to_grid(tq.r, frac_bits))
            tq.c.copy_(round_to_grid(tq.c, frac_bits))
    return model


def bnn(name):
    from brevitas_examples.bnn_pynq.models import model_with_cfg

    torch.manual_seed(0)
    model, _ = model_with_cfg(name, pretrained=False)
    swap_weight_quant(model, NMultConfig(weight_bits=3))
    shape = (1, 1, 28, 28) if name.startswith("LFC") else (1, 3, 32, 32)
    # +-1 inputs (binary input quantizer ready) on a 1/8 grid: exact sums
    x = torch.randint(-8, 9, (2,) + shape[1:]).float() / 8
    return dyadic_(model.eval()), x


MODELS = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "lfc": lambda: bnn("LFC_1W1A"),
          "cnv": lambda: bnn("CNV_1W2A")}


# -- structure helpers ----------------------------------------------------------------------
def producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def cone(model, tensor):
    """Nodes that ``tensor`` depends on."""
    prod, seen, out, stack = producers(model), set(), [], [tensor]
    while stack:
        t = stack.pop()
        if t in seen or t not in prod:
            continue
        seen.add(t)
        out.append(prod[t])
        stack.extend(prod[t].input)
    return out


def attr(node, name):
    v = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)
    return v.decode() if isinstance(v, bytes) else v


def check_structure(model, meta, form):
    rows = meta["layers"]
    weights = {r["weight_tensor"] for r in rows}
    const = inits(model)
    # every compute node takes one of the layers' weight subgraphs: no stray float weights
    computes = [n for n in model.graph.node if n.op_type in COMPUTE]
    assert len(computes) == len(rows)
    assert {n.input[1] for n in computes} == weights
    assert not any(n.input[1] in const for n in computes)
    n_custom = sum(n.op_type == "NMultWeight" for n in model.graph.node)
    assert n_custom == (len(rows) if form == "compact" else 0)
    for r in rows:
        prod = producers(model)[r["weight_tensor"]]
        if form == "compact":
            assert prod.op_type == "NMultWeight" and prod.domain == DOMAIN
            codes = const[prod.input[0]]
            assert codes.dtype == np.uint8 and list(codes.shape) == r["weight_shape"]
            assert int(codes.max()) < 2 ** r["bits"]
            assert const[prod.input[1]].tolist() == r["r"]
            assert const[prod.input[2]].tolist() == r["c"]
            assert attr(prod, "bit_width") == r["bits"] and attr(prod, "layer") == r["layer"]
        elif form == "bitplanes":
            ops = [n.op_type for n in cone(model, r["weight_tensor"])]
            assert set(ops) <= {"Quant", "Mul", "Add", "Sub"}
            assert ops.count("Mul") == r["bits"] and ops.count("Add") == r["bits"]
            assert ops.count("Quant") == r["bits"]  # one node per plane, none shared
            for q in (n for n in cone(model, r["weight_tensor"]) if n.op_type == "Quant"):
                plane = const[q.input[0]]
                assert set(np.unique(plane)) <= {0.0, 1.0}
                assert float(const[q.input[3]]) == 1.0 and attr(q, "signed") == 0
        else:
            assert prod.op_type == "Quant"
            fx = r["fixed_point"]
            w = const[prod.input[0]]
            assert float(const[prod.input[1]]) == 2.0 ** -fx["frac_bits"]
            assert float(const[prod.input[3]]) == fx["int_bits"]
            ints = w * 2.0 ** fx["frac_bits"]
            assert np.array_equal(ints, np.round(ints))
            assert fx["int_min"] <= ints.min() and ints.max() <= fx["int_max"]


def export(tmp_path, name, form, exporter="dynamo", **kw):
    model, x = MODELS[name]()
    if form == "fixed":
        kw.setdefault("frac_bits", 8)
    inputs = kw.pop("inputs", None)
    res = export_qonnx(model, x[:1], tmp_path / f"{name}_{form}.onnx", form, exporter=exporter,
                       verify_inputs=x if inputs is None else inputs, **kw)
    return model, x, res


# -- every form on every model ----------------------------------------------------------------
@pytest.mark.parametrize("form", ["compact", "bitplanes", "fixed"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_form_every_model(tmp_path, name, form):
    model, x, res = export(tmp_path, name, form)
    rep = res.verification
    assert rep.passed, rep.summary()
    assert set(rep.weight_diff) == {n for n, _ in nmult_layers(model)}
    assert max(rep.weight_diff.values()) == 0.0  # weight-only part is bit exact
    proto = onnx.load(str(res.path))
    check_structure(proto, res.metadata, form)
    assert read_metadata(res.path) == json.loads(json.dumps(res.metadata))
    if name in ("lfc", "cnv"):  # exact arithmetic: all three runtimes agree to the bit
        assert rep.torch_vs_qonnx == rep.torch_vs_ort == rep.qonnx_vs_ort == 0.0
    if name == "resnet":
        assert [n.op_type for n in proto.graph.node].count("Add") >= 2  # residual adds kept
    assert rep.quantized_activations == (name != "resnet")


@pytest.mark.parametrize("form", ["compact", "bitplanes", "fixed"])
@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_torchscript_exporter_too(tmp_path, name, form):
    model, x, res = export(tmp_path, name, form, exporter="torchscript")
    assert res.verification.passed, res.verification.summary()
    assert max(res.verification.weight_diff.values()) == 0.0
    check_structure(onnx.load(str(res.path)), res.metadata, form)


def test_export_restores_training_mode_and_leaves_model_unchanged(tmp_path):
    model, x = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    model.train()
    export_qonnx(model, x[:1], tmp_path / "m.onnx")
    assert model.training
    export_qonnx(model, x[:1], tmp_path / "ideal.onnx", with_maps=False)  # exports a twin
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# -- devices ----------------------------------------------------------------------------------
def test_faulty_device_export_holds_the_forced_codes(tmp_path):
    model, x = mlp()
    fmap = sample_fault_map(model, FaultModel(rate=0.2, sa1_fraction=0.5, seed=3))
    attach_faults(model, fmap)
    res = export_qonnx(model, x[:1], tmp_path / "f.onnx", "compact", verify_inputs=x)
    assert res.verification.passed and max(res.verification.weight_diff.values()) == 0.0
    const = inits(onnx.load(str(res.path)))
    for name, layer in nmult_layers(model):
        proxy = layer.weight_quant
        held = force_codes(quant_of(layer).codes(layer.weight), proxy.chip.sa0,
                           proxy.chip.sa1)
        assert np.array_equal(const[f"{name}.weight_codes"], held.numpy().astype(np.uint8))
    row = res.metadata["layers"][1]
    assert 0.1 < row["faults"]["rate"] < 0.3
    # the faulty file differs from the ideal one where stuck bits changed a code
    ideal = export_qonnx(model, x[:1], tmp_path / "i.onnx", "compact", with_maps=False)
    assert ideal.metadata["layers"][1]["faults"] is None
    ci = inits(onnx.load(str(ideal.path)))
    assert not np.array_equal(ci["3.weight_codes"], const["3.weight_codes"])
    for form in ("bitplanes", "fixed"):
        kw = {"frac_bits": 10} if form == "fixed" else {}
        r = export_qonnx(model, x[:1], tmp_path / f"f_{form}.onnx", form, verify_inputs=x, **kw)
        assert r.verification.passed and max(r.verification.weight_diff.values()) == 0.0


def test_variable_device_export_within_tolerance_and_fixed_refused(tmp_path):
    model, x = mlp()
    attach_variability(model, sample_variability_map(
        model, VariabilityModel(sigma=0.2, hrs_on_off=20.0, seed=1)))
    for form in ("compact", "bitplanes"):
        res = export_qonnx(model, x[:1], tmp_path / f"v_{form}.onnx", form, verify_inputs=x)
        rep = res.verification
        assert rep.passed, rep.summary()
        assert 0.0 < rep.weight_tolerance and max(rep.weight_diff.values()) <= rep.weight_tolerance
        assert res.metadata["layers"][1]["variability"]["lrs_std"] > 0.1
    proto = onnx.load(str(tmp_path / "v_compact.onnx"))
    ops = [n for n in proto.graph.node if n.op_type == "NMultWeight"]
    assert all(len(n.input) == 5 for n in ops)  # codes, r, c, lrs, hrs
    with pytest.raises(ExportError, match="variability"):
        export_qonnx(model, x[:1], tmp_path / "v_fixed.onnx", "fixed", frac_bits=8)
    ok = export_qonnx(model, x[:1], tmp_path / "v_ideal.onnx", "fixed", frac_bits=8,
                      with_maps=False, verify_inputs=x)
    assert ok.verification.passed


# -- fixed point ------------------------------------------------------------------------------
def test_round_to_grid_rounds_to_the_nearest_multiple_half_to_even():
    # 0.2 and -0.2 tell rounding from floor and truncation, 0.125 (0.5 steps) tells half to
    # even from half up, 0.375 (1.5 steps) from half down.
    t = torch.tensor([0.3, -0.7, 0.2, -0.2, 0.125, 0.375, 0.6, -0.9])
    got = round_to_grid(t, 2)
    assert got.dtype == torch.float32
    assert got.tolist() == [0.25, -0.75, 0.25, -0.25, 0.0, 0.5, 0.5, -1.0]
    assert round_to_grid(torch.tensor([1.03125], dtype=torch.float64), 4).item() == 1.0
    assert round_to_grid(torch.tensor([-3.3]), 0).item() == -3.0


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), f=st.integers(0, 12), seed=st.integers(0, 2 ** 16))
def test_fixed_point_rounding_error_bounded(bits, f, seed):
    from qfv_brevitas.export.layers import LayerExport

    g = torch.Generator().manual_seed(seed)
    r = torch.rand(1, bits, generator=g) * 2.0 ** torch.arange(bits) * 0.05
    c = -torch.rand(1, generator=g)
    codes = torch.randint(0, 1 << bits, (4, 6), generator=g).to(torch.uint8)
    info = LayerExport("l", bits, "nmult", -1, (4, 6), codes, r, c)
    from qfv_brevitas.export.layers import decode

    info.weight = decode(info)
    row = fixed_point_layer(info, f)
    bound = 2.0 ** -(f + 1)
    assert row["max_multiplier_error"] <= bound
    err_r = (torch.tensor(row["r_fixed"], dtype=torch.float64) - r.double()).abs()
    assert bool((err_r <= bound).all())
    assert row["max_weight_error"] <= (bits + 1) * bound + 1e-6
    w = info.fixed_point.weight.double() * 2 ** f
    assert torch.equal(w, w.round())
    lo, hi = row["int_min"], row["int_max"]
    n, signed = row["int_bits"], row["signed"]
    assert (lo >= -(2 ** (n - 1)) and hi <= 2 ** (n - 1) - 1) if signed else (lo >= 0 and
                                                                          hi <= 2 ** n - 1)


@pytest.mark.parametrize("r, c, f, want", [
    ([0.25, 0.5], -0.375, 3, (3, True, -3, 3)),  # integers -3, -1, 1, 3
    ([0.125, 0.25], 0.0, 3, (2, False, 0, 3)),  # 0..3
    ([0.5, 1.0], -2.0, 1, (3, True, -4, -1)),  # -4..-1: 2 signed bits hold only -2..1
    ([1.0, 2.0, 4.0], 0.0, 0, (3, False, 0, 7)),
    ([0.0], 0.0, 4, (1, False, 0, 0)),
])
def test_fixed_point_integer_width_is_the_smallest_that_holds_the_levels(r, c, f, want):
    from qfv_brevitas.export.layers import LayerExport, decode

    bits = len(r)
    codes = torch.arange(1 << bits, dtype=torch.uint8).reshape(1, -1)
    info = LayerExport("l", bits, "nmult", -1, (1, 1 << bits), codes, torch.tensor([r]),
                       torch.tensor([c]))
    info.weight = decode(info)
    row = fixed_point_layer(info, f)
    assert (row["int_bits"], row["signed"], row["int_min"], row["int_max"]) == want


def test_fixed_point_picks_smallest_f_within_the_accuracy_bound(tmp_path, trained, digits):
    model, clean = trained
    _, test = digits
    res = export_qonnx(model, test.tensors[0][:1], tmp_path / "fx.onnx", "fixed",
                       max_accuracy_drop=0.5, data=test, verify_inputs=test.tensors[0][:32])
    fx = res.fixed_point
    f = fx["frac_bits"]
    assert fx["reference_accuracy"] == pytest.approx(100 * clean)
    assert fx["reference_accuracy"] - fx["accuracy"] <= 0.5
    assert all(fx["reference_accuracy"] - fx["tried"][g] > 0.5 for g in range(f))
    assert fx["max_multiplier_error"] <= 2.0 ** -(f + 1)
    assert res.verification.passed
    meta = read_metadata(res.path)
    assert meta["fixed_point"]["frac_bits"] == f
    assert all(r["fixed_point"]["frac_bits"] == f for r in meta["layers"])


# -- metadata, reference, crossbar --------------------------------------------------------------
def test_reference_model_detects_a_changed_model(tmp_path):
    model, x = mlp()
    res = export_qonnx(model, x[:1], tmp_path / "m.onnx")
    assert reference_model(model, res.path) is not None
    with torch.no_grad():
        quant_of(dict(nmult_layers(model))["3"]).r.mul_(1.01)
    with pytest.raises(ExportError, match="multipliers differ"):
        reference_model(model, res.path)


def test_read_metadata_refuses_foreign_and_corrupt_files(tmp_path):
    model, x = mlp()
    res = export_qonnx(model, x[:1], tmp_path / "m.onnx", verify=False)
    with pytest.raises(ExportFileError, match="no such file"):
        read_metadata(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx file" * 10)
    with pytest.raises(ExportFileError, match="not a readable ONNX file|not an ONNX model"):
        read_metadata(junk)
    proto = onnx.load(str(res.path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(ExportFileError, match="not written by qfv-brevitas"):
        read_metadata(tmp_path / "plain.onnx")
    proto = onnx.load(str(res.path))
    for p in proto.metadata_props:
        if p.key == "qfv_brevitas.export":
            p.value = p.value.replace('"bits": 4', '"bits": 5')
    onnx.save(proto, str(tmp_path / "edited.onnx"))
    with pytest.raises(ExportFileError, match="checksum"):
        read_metadata(tmp_path / "edited.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(res.path.read_bytes()[: res.path.stat().st_size // 2])
    with pytest.raises(ExportFileError):
        read_metadata(truncated)


@pytest.mark.parametrize("faults", [False, True])
def test_crossbar_files_rebuild_the_weights_exactly(tmp_path, faults):
    model, _ = cnn()
    if faults:
        attach_faults(model, sample_fault_map(model, FaultModel(rate=0.1, seed=0)))
    manifest = write_crossbar(model, tmp_path / "xbar")
    loaded = load_crossbar(tmp_path / "xbar")
    infos = {i.name: i for i in collect_layers(model)}
    assert set(loaded) == set(infos)
    for name, row in loaded.items():
        info = infos[name]
        assert row["planes"].shape == (info.bits, info.weight_shape[0],
                                       math.prod(info.weight_shape[1:]))
        assert row["planes"].dtype == np.uint8 and set(np.unique(row["planes"])) <= {0, 1}
        assert np.array_equal(row["weight"], info.weight.numpy())  # what torch computes with
    data = json.loads(manifest.read_text())
    first = tmp_path / "xbar" / data["layers"][0]["file"]
    first.write_bytes(first.read_bytes()[:-3])
    with pytest.raises(ValueError, match="checksum"):
        load_crossbar(tmp_path / "xbar")


# -- plane-parallel form ------------------------------------------------------------------------
def cnn_per_tensor():
    torch.manual_seed(0)
    x = digits_inputs(2)
    net = SmallCNN(1, 10, width=8)
    return quantize_model(net, NMultConfig(weight_bits=4, act_bits=4), x).eval(), x


def check_planes_structure(model, proto, meta):
    """N 1-bit {0, 1} planes per layer, each behind a 1-bit unsigned Quant feeding its own
    Conv/MatMul, that decode to the codes the model holds; the offset layers; nothing else."""
    rows, const, prod = meta["layers"], inits(proto), producers(proto)
    computes = [n for n in proto.graph.node if n.op_type in COMPUTE]
    offsets = sum(r["planes"]["offset_layer"] for r in rows)
    assert len(computes) == sum(r["bits"] for r in rows) + 2 * offsets
    assert not any(n.op_type == "Gemm" for n in computes)  # Linear planes are MatMuls
    one_bit = [n for n in proto.graph.node if n.op_type == "Quant" and n.input[0] in const
               and float(const[n.input[3]]) == 1.0]
    assert len(one_bit) == sum(r["bits"] for r in rows) + offsets
    assert all(set(np.unique(const[q.input[0]])) <= {0.0, 1.0} and attr(q, "signed") == 0
               and float(const[q.input[1]]) == 1.0 for q in one_bit)
    wide = [n for n in computes if float(const[prod[n.input[1]].input[3]]) != 1.0]
    assert len(wide) == offsets  # only the 1 -> C offset layers hold wider integers
    assert meta["planes"]["weight_bits"] == sum(
        r["bits"] * math.prod(r["weight_shape"]) for r in rows)
    codes = {i.name: i.codes.long().numpy() for i in collect_layers(model)}
    for r in rows:
        t = r["planes"]["tensors"]
        planes = [const[name] for name in t["planes"]]
        if t["layout"] == "matmul":  # Linear planes are stored (in, out)
            planes = [p.T for p in planes]
        decoded = sum(p.astype(np.int64) << k for k, p in enumerate(planes))
        assert np.array_equal(decoded, codes[r["layer"]])
        for k, name in enumerate(t["multipliers"]):
            m = np.asarray(r["planes"]["multipliers"], np.float64)[:, k]
            assert np.array_equal(const[name].reshape(-1) if m.size > 1 else
                                  np.unique(const[name]), m)
            assert np.array_equal(m, np.round(np.asarray(r["r"])[:, k] * 2.0 ** 8))
        assert float(const[t["scale"]]) == 2.0 ** -8


PLANE_MODELS = {"mlp": mlp, "cnn_per_channel": cnn, "cnn_per_tensor": cnn_per_tensor,
                "resnet": resnet, "cnv": lambda: bnn("CNV_1W2A")}


@pytest.mark.parametrize("name", list(PLANE_MODELS))
def test_planes_form_every_model(tmp_path, name):
    model, x = PLANE_MODELS[name]()
    res = export_qonnx(model, x[:1], tmp_path / f"{name}.onnx", "planes", frac_bits=8,
                       verify_inputs=x)
    rep = res.verification
    assert rep.passed, rep.summary()
    assert max(rep.weight_diff.values()) == 0.0  # the planes decode to the fixed-point weights
    assert rep.qonnx_vs_ort == 0.0 and rep.torch_vs_qonnx < 1e-5
    proto = onnx.load(str(res.path))
    check_planes_structure(model, proto, res.metadata)
    assert read_metadata(res.path) == json.loads(json.dumps(res.metadata))
    if name == "resnet":
        # residual adds kept besides the planes' sums
        sums = sum(r["bits"] - 1 + r["planes"]["offset_layer"] for r in res.metadata["layers"])
        assert [n.op_type for n in proto.graph.node].count("Add") >= sums + 2
    # the same weights as the fixed form at the same f, in fewer bits
    fx = export_qonnx(model, x[:1], tmp_path / f"{name}_fx.onnx", "fixed", frac_bits=8,
                      verify_inputs=x)
    fconst = inits(onnx.load(str(fx.path)))
    from qfv_brevitas.export.forms.planes import file_weights

    for row in res.metadata["layers"]:
        t, ctx = row["planes"]["tensors"], inits(proto)
        # the Quant nodes (scale 1, zero point 0, checked above) pass their integers through
        for a, b in list(zip(t["planes"], t["plane_outputs"])) + [
                (t[k], t[f"{k}_output"]) for k in ("ones", "offset") if k in t]:
            ctx[b] = ctx[a]
        w = file_weights(ctx, row["planes"], row["weight_shape"])
        assert np.array_equal(w, fconst[f"{row['layer']}.weight_fixed"].astype(np.float64))
    # N bits per weight exactly; on the layers below 8 bits never more than the fixed form's
    # integers and fewer in all (at f = 8 an 8-bit first or last layer of small weights can
    # round to 7-bit integers in the fixed form; tiny layers' multipliers can outweigh a saving)
    mem = {r["layer"]: (r["bits"], r["planes"]["memory"]) for r in res.metadata["layers"]}
    for bits, m in mem.values():
        assert m["plane_bits"] == bits * m["weights"]
    inner = [m for bits, m in mem.values() if bits < 8]
    assert all(m["plane_bits"] <= m["fixed_form_bits"] for m in inner), mem
    assert inner and sum(m["plane_bits"] for m in inner) < sum(m["fixed_form_bits"]
                                                                for m in inner), mem
    pl = res.metadata["planes"]
    assert pl["total_bits"] == sum(r["planes"]["memory"]["total_bits"]
                                   for r in res.metadata["layers"])


def test_planes_form_checks_catch_a_changed_file(tmp_path):
    from qfv_brevitas.export.checks import graph_problems

    model, x = mlp()
    res = export_qonnx(model, x[:1], tmp_path / "p.onnx", "planes", frac_bits=8)
    t = res.metadata["layers"][1]["planes"]["tensors"]
    proto = onnx.load(str(res.path))
    assert graph_problems(proto, res.metadata) == []
    for name, change, msg in ((t["planes"][2], lambda a: a * 2, "not a 0/1 constant"),
                              (t["multipliers"][0], lambda a: a + 1, "multipliers in the graph"),
                              (t["scale"], lambda a: a * 2, "scale")):
        bad = onnx.load(str(res.path))
        init = next(i for i in bad.graph.initializer if i.name == name)
        init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init)), name))
        problems = graph_problems(bad, res.metadata)
        assert len(problems) == 1 and "layer '3'" in problems[0] and msg in problems[0]
        onnx.save(bad, str(tmp_path / "bad.onnx"))
        with pytest.raises(ExportFileError, match=msg):
            read_metadata(tmp_path / "bad.onnx")


def test_planes_form_with_fault_map_holds_the_forced_codes(tmp_path):
    model, x = mlp()
    attach_faults(model, sample_fault_map(model, FaultModel(rate=0.2, sa1_fraction=0.5, seed=3)))
    res = export_qonnx(model, x[:1], tmp_path / "f.onnx", "planes", frac_bits=8, verify_inputs=x)
    assert res.verification.passed and max(res.verification.weight_diff.values()) == 0.0
    check_planes_structure(model, onnx.load(str(res.path)), res.metadata)  # forced codes
    ideal = export_qonnx(model, x[:1], tmp_path / "i.onnx", "planes", frac_bits=8, with_maps=False)
    a = inits(onnx.load(str(res.path)))["3.weight_plane0"]
    assert not np.array_equal(a, inits(onnx.load(str(ideal.path)))["3.weight_plane0"])


def test_planes_form_bad_input_names_the_layer(tmp_path):
    model, x = mlp()
    attach_variability(model, sample_variability_map(model, VariabilityModel(sigma=0.1,
                                                                             seed=1)))
    with pytest.raises(ExportError, match="layer '1' has a variability map"):
        export_qonnx(model, x[:1], tmp_path / "v.onnx", "planes", frac_bits=8)
    with pytest.raises(ExportError, match="needs frac_bits"):
        export_qonnx(model, x[:1], tmp_path / "v.onnx", "planes", with_maps=False)
    with pytest.raises(ExportError, match="no N-multiplier layers"):
        export_qonnx(nn.Linear(3, 2), torch.rand(1, 3), tmp_path / "n.onnx", "planes",
                     frac_bits=8)
    torch.manual_seed(0)  # a Linear over a sequence: ONNX MatMul of a transposed weight
    seq = quantize_model(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(32, 3)),
                         NMultConfig(weight_bits=3, act_bits=None)).eval()
    with pytest.raises(ExportError, match=r"layer '0': its weights feed .*Conv and Gemm layers"):
        export_qonnx(seq, torch.rand(1, 8, 8), tmp_path / "s.onnx", "planes", frac_bits=8)
    assert not any(tmp_path.glob("*.onnx"))


# -- bad input ---------------------------------------------------------------------------------
def test_bad_calls_get_clear_errors(tmp_path):
    model, x = mlp()
    with pytest.raises(ExportError, match="unknown form"):
        export_qonnx(model, x, tmp_path / "a.onnx", "tiles")
    with pytest.raises(ExportError, match="unknown exporter"):
        export_qonnx(model, x, tmp_path / "a.onnx", exporter="jit")
    with pytest.raises(ExportError, match="fixed' or 'planes' only"):
        export_qonnx(model, x, tmp_path / "a.onnx", "compact", frac_bits=4)
    with pytest.raises(ExportError, match="needs frac_bits"):
        export_qonnx(model, x, tmp_path / "a.onnx", "fixed")
    with pytest.raises(ExportError, match="frac_bits must be"):
        export_qonnx(model, x, tmp_path / "a.onnx", "fixed", frac_bits=-1)
    with pytest.raises(ExportError, match="must be a tensor"):
        export_qonnx(model, [x], tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="finite"):
        export_qonnx(model, x * float("nan"), tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="no N-multiplier layers"):
        export_qonnx(nn.Linear(3, 2), torch.rand(1, 3), tmp_path / "a.onnx")
    with torch.no_grad():
        dict(nmult_layers(model))["3"].weight[0, 0] = float("nan")
    with pytest.raises(ExportError, match="not finite"):
        export_qonnx(model, x, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_spiking_model_export_rules(tmp_path):
    pytest.importorskip("spikingjelly")
    from qfv_brevitas.snn import SpikingConfig, rate_encode, to_spiking

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                        nn.Linear(32, 10))
    q = quantize_model(to_spiking(net, SpikingConfig(T=4)),
                       NMultConfig(weight_bits=4, act_bits=None)).eval()
    x = digits_inputs(6)
    with pytest.raises(ExportError, match="spike trains"):
        export_qonnx(q, x[:1], tmp_path / "s.onnx")
    spikes = rate_encode(x, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ExportError, match="exporter='dynamo'"):
        export_qonnx(q, spikes[:, :1], tmp_path / "s.onnx", exporter="torchscript")
    res = export_qonnx(q, spikes[:, :2], tmp_path / "s.onnx", "bitplanes", verify_inputs=spikes)
    assert res.verification.passed and res.verification.samples == 6
    assert res.verification.quantized_activations  # spikes: binary activations
    check_structure(onnx.load(str(res.path)), res.metadata, "bitplanes")
    assert res.metadata["extra"]["snn"]["lif_layers"]["body.3"]["beta"] == 0.25
