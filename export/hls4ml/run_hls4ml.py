"""hls4ml flow: a QONNX file from ``qfv export --form planes`` (or ``fixed``) -> hls4ml -> C++.

hls4ml reads the file through its QONNX front end, compiles the bit-accurate C++ emulation with
g++ (no Vivado/Vitis needed for ``compile()``/``predict()``) and the predictions are compared
with the torch model the file was exported from:

    python export/hls4ml/run_hls4ml.py model.onnx model.pt --out hls_prj [--samples 64]

The plane-parallel form becomes N parallel Dense/Conv layers with 1-bit weights per layer,
per-channel scales and sums; the fixed form one Dense/Conv per layer with wider integer weights.
hls4ml reports resources and latency only from a Vivado/Vitis HLS synthesis (``hls4ml.report``
reads csynth results), which this flow does not run.
Exit status 0 when hls4ml agrees with torch within the tolerance, 1 otherwise.
The Python entry points are :func:`build_hls_model`, :func:`compare_with_torch` and
:func:`hls_layer_summary`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import numpy as np

#: hls4ml's default ``fixed<16,6>`` rounds inputs, biases and activation scales; with 20
#: fractional bits the emulation matches torch's float32 to ~1e-7 on the models tried here.
DEFAULT_PRECISION = "fixed<48,20>"

#: The plane-parallel form scales every plane by ``s * m_k`` (the input quantizer's scale
#: times the plane's integer multiplier, which hls4ml merges into one constant of this
#: precision) and sums N + 1 branches, so 20 fractional bits are not enough there: on the
#: digits MLP one image of 360 moved by a quantization step at ``fixed<48,20>``, none at
#: ``fixed<64,24>`` (max |diff| 3.5e-5 against the file run by qonnx).
PLANES_PRECISION = "fixed<64,24>"

#: the forms whose files hls4ml reads: standard ``Quant`` weights on the grid ``m * 2**-f``
FORMS = ("fixed", "planes")


def default_precision(form: str) -> str:
    """hls4ml's default precision for a file of ``form`` (see :data:`PLANES_PRECISION`)."""
    return PLANES_PRECISION if form == "planes" else DEFAULT_PRECISION


def hls_layer_summary(hls_model) -> dict:
    """What hls4ml built: layers by class, and the weight layers (Dense/Conv) by the bit
    width of their weights, e.g. ``{"Dense": 12, ...}`` and ``{"1": 10, "11": 2}``."""
    from collections import Counter

    classes = Counter(layer.class_name for layer in hls_model.get_layers())
    widths = Counter()
    for layer in hls_model.get_layers():
        if layer.class_name.startswith(("Dense", "Conv", "PointwiseConv")) and "weight" in \
                layer.weights:
            widths[str(layer.weights["weight"].type.precision.width)] += 1
    return {"layers": dict(sorted(classes.items())), "weight_widths": dict(sorted(widths.items()))}


def _channels_last_average_pool() -> None:
    """qonnx's channels-last pass wraps Conv, MaxPool and BatchNormalization but not
    AveragePool (what ``nn.AdaptiveAvgPool2d`` / ``nn.AvgPool2d`` export as), and hls4ml's
    reader refuses a pool that is not channels-last. AveragePool has MaxPool's attributes and
    shape rule, so the same wrapper serves; registered once, in qonnx's own domain."""
    import qonnx.transformation.channels_last as cl
    from qonnx.custom_op.channels_last.max_pool import MaxPool_v1
    from qonnx.custom_op.registry import add_op_to_domain

    if "AveragePool" in cl._channelsLast_node_types:
        return
    add_op_to_domain("qonnx.custom_op.channels_last", type("AveragePool_v1", (MaxPool_v1,), {}))
    cl._channelsLast_node_types.append("AveragePool")


def _scale_down_add_fresh_attributes() -> None:
    """hls4ml 1.3's ``ScaleDownAdd`` (two equal ``ApplyAlpha`` scales moved below an Add)
    builds the new node from ALL of the first node's attributes, including its already typed
    ``bias_precision``, which the new node's constructor refuses ("Unexpected new precision
    type: NamedType"). Seen in the plane-parallel form when two planes of a layer end with the
    same scale (8-bit first layer of the digits MLP at f = 5). Build it as hls4ml's own
    ``ScaleDownMatMul`` does: without the data, trace and bias precision attributes (the
    summed bias gets the default precision)."""
    from hls4ml.model.optimizer.passes import move_scales as ms

    if getattr(ms.ScaleDownAdd, "_qfv_fresh_attributes", False):
        return

    def transform(self, model, node):
        in0 = node.get_input_node(node.inputs[0])
        in1 = node.get_input_node(node.inputs[1])
        scale = in0.weights["scale"].data_unquantized
        try:
            bias = in0.weights["bias"].data_unquantized + in1.weights["bias"].data_unquantized
        except ValueError:
            return False
        skip = ms._attrs_not_to_copy + list(in0.outputs) + ["bias_precision", "bias_quantizer"]
        new_attrs = {k: v for k, v in in0.attributes.items() if k not in skip}
        model.remove_node(in0)
        model.remove_node(in1)
        new_attrs["scale_data"] = scale
        new_attrs["bias_data"] = bias
        new_node = model.make_node("ApplyAlpha", in0.name, new_attrs, list(node.outputs))
        model.insert_node(new_node)
        return True

    ms.ScaleDownAdd.transform = transform
    ms.ScaleDownAdd._qfv_fresh_attributes = True


def _one_quantizer_per_consumer(model):
    """Give every consumer of a shared activation ``Quant`` node its own copy, each behind its
    own no-op ``Reshape`` (same shape) and with its own scale, zero point and bit width.

    In the plane-parallel form one activation quantizer feeds all the planes of a layer. hls4ml
    1.3 splits a ``Quant`` into scale -> quantize -> rescale nodes and moves the rescale below
    the next layer, but its graph edits rewire only the first consumer of a forking tensor
    (``ModelGraph.insert_node``), so every other plane would compute on unscaled integers
    (measured: outputs off by 1e3 on the digits MLP). With a quantizer of its own per plane
    there is no fork where hls4ml edits; the computation is the same."""
    import copy

    from onnx import helper
    from qonnx.transformation.infer_shapes import InferShapes

    g = model.graph
    for node in list(g.node):
        if node.op_type != "Quant" or model.get_initializer(node.input[0]) is not None:
            continue
        users = model.find_consumers(node.output[0])
        if len(users) < 2:
            continue
        shape = model.get_tensor_shape(node.input[0])
        pos = list(g.node).index(node)
        g.node.remove(node)
        for k, user in enumerate(users):
            p = f"{node.name}_branch{k}"
            model.set_initializer(f"{p}_shape", np.asarray(shape, dtype=np.int64))
            q = copy.deepcopy(node)
            q.name, q.input[0], q.output[0] = f"{p}_quant", f"{p}_in", f"{p}_out"
            model.set_tensor_shape(q.input[0], shape)
            model.set_tensor_shape(q.output[0], shape)
            for j in range(1, len(q.input)):
                model.set_initializer(f"{p}_param{j}", model.get_initializer(node.input[j]))
                q.input[j] = f"{p}_param{j}"
            for i, t in enumerate(user.input):
                if t == node.output[0]:
                    user.input[i] = q.output[0]
            g.node.insert(pos, helper.make_node("Reshape", [node.input[0], f"{p}_shape"],
                                                [f"{p}_in"], name=f"{p}_reshape"))
            g.node.insert(pos + 1, q)
            pos += 2
    return model.transform(InferShapes())


def _expand_offset_layers(model, info: dict):
    """Plane-parallel form: rewrite each layer's offset term ``m_c * layer(x, 1)`` from the
    file's two layers (an all-ones layer with one output channel, then a ``1 -> C`` layer with
    the integer offsets ``m_c``) into an all-ones layer with all ``C`` output channels and a
    per-channel ``Mul`` by ``m_c``: the same shape as every plane (layer, per-channel scale).

    hls4ml 1.3 moves the input quantizer's scale down through the ``1 -> C`` 1x1 convolution
    wrongly (the conv SmallCNN's outputs were off by ~10); the expanded form is what it handles
    for every plane. Its all-ones weights are constants: in hls4ml's ``io_parallel`` designs
    they are part of the logic, not of a weight memory."""
    from onnx import helper

    g = model.graph
    for row in info["layers"]:
        t = (row.get("planes") or {}).get("tensors") or {}
        if "ones" not in t or t["offset_output"] == t["offset"]:  # none, or already so (grouped)
            continue
        ones = model.get_initializer(t["ones"])
        first = model.find_consumer(t["ones_output"])
        second = model.find_consumer(first.output[0])
        mc = model.get_initializer(t["offset"])
        out_ch = row["weight_shape"][0]
        if t.get("layout") == "matmul":      # ones (K, 1) -> (K, C); m_c (1, C)
            full, mult = np.ones((ones.shape[0], out_ch), np.float32), mc.reshape(1, out_ch)
        else:                                # ones (1, Cin, k...) -> (C, Cin, k...)
            full = np.ones((out_ch,) + ones.shape[1:], np.float32)
            mult = mc.reshape((1, out_ch) + (1,) * (ones.ndim - 2))
        model.set_initializer(t["ones"], full)
        model.set_tensor_shape(t["ones_output"], list(full.shape))
        out_shape = list(model.get_tensor_shape(second.output[0]))
        model.set_tensor_shape(first.output[0], out_shape)
        model.set_initializer(f"{t['offset']}_per_channel", mult.astype(np.float32))
        mul = helper.make_node("Mul", [first.output[0], f"{t['offset']}_per_channel"],
                               list(second.output), name=f"{second.name}_as_mul")
        g.node.insert(list(g.node).index(second), mul)
        g.node.remove(second)
        g.node.remove(model.find_producer(t["offset_output"]))
    return model


def _constants_without_batch_axis(model):
    """Drop the leading batch axis (size 1) of the constant operand of each ``Mul``/``Add``
    whose other operand is data: ``(1, 1, 1, C)`` -> ``(1, 1, C)`` broadcasts the same way.
    hls4ml drops the batch axis of the data and then fails to broadcast a constant that still
    has it (the plane-parallel form's per-channel multipliers of a conv layer)."""
    for node in model.graph.node:
        if node.op_type not in ("Mul", "Add"):
            continue
        for t in node.input:
            c = model.get_initializer(t)
            if c is not None and c.ndim >= 2 and c.shape[0] == 1:
                model.set_initializer(t, c.reshape(c.shape[1:]))
    return model


def build_hls_model(onnx_path, output_dir, precision: Optional[str] = None,
                    backend: str = "Vitis", io_type: str = "io_parallel"):
    """Convert and compile ``onnx_path`` (plane-parallel or fixed-point form) with hls4ml;
    returns the model. ``precision``: hls4ml's default precision (None: by the file's form,
    :func:`default_precision`).

    A plane-parallel file becomes parallel Dense/Conv layers with 1-bit weights, per-channel
    scales (``ApplyAlpha``) and sums (``Merge``), after two rewrites of the same computation
    around hls4ml 1.3 limitations (:func:`_expand_offset_layers`,
    :func:`_one_quantizer_per_consumer`).

    ``io_parallel`` (the default) is the one checked here for MLPs and CNNs; with
    ``io_stream`` the library's SmallCNN compiled but its predictions were wrong (hls4ml warned
    of leftover stream data), so do not trust that mode without comparing."""
    import hls4ml
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    from qfv_brevitas.export.metadata import read_export

    graph, info = read_export(onnx_path)  # qfv's loader of files a user gives: checked once
    if info["form"] not in FORMS:
        raise ValueError(f"{onnx_path} is in the {info['form']!r} form; hls4ml reads the "
                         "fixed-point forms (qfv export --form planes: N bits per weight in "
                         "parallel 1-bit layers, or --form fixed: one wider integer layer): its "
                         "ONNX reader does not take the NMultWeight op or bit-plane weight "
                         "subgraphs")
    precision = precision or default_precision(info["form"])
    _channels_last_average_pool()
    if info["form"] == "planes":
        _scale_down_add_fresh_attributes()
    model = ModelWrapper(graph)
    if info["form"] == "planes":
        model = _expand_offset_layers(model, info)
    model = cleanup_model(model)
    model = model.transform(ConvertToChannelsLastAndClean())
    model = model.transform(GemmToMatMul())
    model = cleanup_model(model)
    model = _one_quantizer_per_consumer(_constants_without_batch_axis(model))
    config = hls4ml.utils.config.config_from_onnx_model(
        model, granularity="name", backend=backend, default_precision=precision)
    hls_model = hls4ml.converters.convert_from_onnx_model(
        model, output_dir=str(output_dir), io_type=io_type, backend=backend, hls_config=config)
    hls_model.compile()
    return hls_model


def compare_with_torch(hls_model, reference, inputs) -> dict:
    """hls4ml's predictions against ``reference`` (the torch model) on ``inputs`` (N, ...)."""
    import torch

    x = inputs.float()
    with torch.no_grad():
        y_t = reference.eval()(x).numpy()
    xh = x.numpy()
    if xh.ndim == 4:  # hls4ml's conv layers are channels-last
        xh = xh.transpose(0, 2, 3, 1)
    y_h = np.asarray(hls_model.predict(np.ascontiguousarray(xh.astype(np.float32))))
    y_h = y_h.reshape(y_t.shape)
    diff = float(np.abs(y_h - y_t).max())
    return {"samples": int(x.shape[0]), "max_abs_diff": diff,
            "max_abs_output": float(np.abs(y_t).max()),
            "top1_agreement": float((y_h.argmax(1) == y_t.argmax(1)).mean())}


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", help="QONNX file written by qfv export --form planes or fixed")
    p.add_argument("checkpoint", help="the checkpoint it was exported from")
    p.add_argument("--out", default="hls4ml_prj", help="hls4ml project folder")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--precision", help=f"hls4ml's default precision (default: "
                                       f"{PLANES_PRECISION} for the planes form, "
                                       f"{DEFAULT_PRECISION} for the fixed form)")
    p.add_argument("--dataset", choices=("digits", "idx"), default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |hls4ml - torch| relative to max(1, max|y|)")
    args = p.parse_args(argv)

    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.data import load_dataset
    from qfv_brevitas.export import reference_model

    model, info = load_checkpoint(args.checkpoint)
    seed = int((info.get("meta") or {}).get("data_seed", 0))
    _, test, _, _ = load_dataset(args.dataset, args.data_dir, seed)
    reference = reference_model(model, args.file)
    hls_model = build_hls_model(args.file, args.out, args.precision)
    res = compare_with_torch(hls_model, reference, test.tensors[0][:args.samples])
    summary = hls_layer_summary(hls_model)
    print("hls4ml layers: " + ", ".join(f"{k} x{v}" for k, v in summary["layers"].items())
          + "; weight layers by weight bits: "
          + ", ".join(f"{k}-bit x{v}" for k, v in summary["weight_widths"].items()))
    bound = args.tolerance * max(1.0, res["max_abs_output"])
    ok = res["max_abs_diff"] <= bound
    print(f"hls4ml vs torch on {res['samples']} test inputs: max |diff| {res['max_abs_diff']:.3g} "
          f"(bound {bound:.3g}), top-1 agreement {100 * res['top1_agreement']:.2f}%: "
          f"{'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
