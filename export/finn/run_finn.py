"""FINN flow: a QONNX file from ``qfv export`` -> FINN-ONNX -> streamlined -> HW layers -> run.

Runs in the environment made by ``export/finn/setup_finn.sh`` (finn-plus 1.6.1 beside this
project's brevitas/onnx/qonnx; default ``.venv-finn``). The steps are finn-plus's own
transformations, in the order of its builder's steps ``step_qonnx_to_finn``, ``step_tidy_up``,
``step_streamline`` and ``step_convert_to_hw`` (the builder itself needs Vivado); each stage is
run with ``finn.core.onnx_exec.execute_onnx`` (Python execution) and compared with the torch
model the file was exported from:

    .venv-finn/bin/python export/finn/run_finn.py model.onnx model.pt [--samples 64]

The fixed-point form (``qfv export --form fixed``) must map every weight layer to an MVAU with
integer weights equal to the file's ``int * 2**-f`` levels times ``2**f``; the bit-plane form
converts and runs but its float weights stay as plain MatMul nodes (not mapped to HW).
Each stage is compared with torch and with the file itself (run by qonnx); exit status 0 when
every stage agrees with both (see :data:`DEFAULT_TOLERANCE`, :data:`DEFAULT_MIN_AGREEMENT`) and,
for the fixed form, the HW checks hold; 1 otherwise; 2 for bad input. Python entry points:
:func:`finn_flow`, :func:`run_model`, :func:`compare_with_torch`, :func:`hw_report`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

#: Output tolerance, relative to ``max(1, max|y|)`` (as ``qfv verify`` and the hls4ml flow).
#: FINN computes the matrix products exactly in integers, but folds the activation scales, the
#: weight scale ``2**-f`` and the biases into float32 thresholds and a final float Mul/Add: the
#: same numbers combined in another order than torch's or qonnx's float32 (measured <= 2e-6 on
#: the digits MLP, outputs up to ~11).
DEFAULT_TOLERANCE = 1e-4

#: Share of the inputs that must be within the tolerance and agree on the top-1 class. With
#: quantized activations a pre-activation within float rounding of a quantizer threshold lands
#: on the other side in one runtime (one quantization step: measured on 1 of 360 digits images,
#: where the exported file run by qonnx differs so from torch too, and FINN follows the file);
#: as ``qfv verify`` does, such inputs are counted and reported, and up to 2% are accepted.
DEFAULT_MIN_AGREEMENT = 0.98

#: Stages of :func:`finn_flow`, in order (``qonnx``: the file itself, run by qonnx).
STAGES = ("qonnx", "finn", "streamlined", "hw")

#: finn-plus's matrix-vector HW layers (generic, and its HLS/RTL specializations).
MVAU_TYPES = ("MVAU", "MVAU_hls", "MVAU_rtl", "VVAU", "VVAU_hls", "VVAU_rtl")


def _load_finn():
    """Import finn's HW op modules so that their ops register (qonnx's registry swallows the
    ImportError of a domain module, which would hide a missing dependency until execution)."""
    import importlib

    try:
        for mod in ("", ".hls", ".rtl"):
            importlib.import_module("finn.custom_op.fpgadataflow" + mod)
    except ImportError as e:
        raise ImportError(f"finn-plus is not usable in this interpreter ({e}); install it with "
                          "`bash export/finn/setup_finn.sh` and run this script with "
                          ".venv-finn/bin/python") from e


def _unfork_constant_quant(model):
    """Give each consumer of a constant ``Quant`` node (a weight quantizer) its own copy.

    FINN's ``FoldQuantWeights`` rejects a weight ``Quant`` whose output feeds several nodes;
    torch's dynamo exporter merges identical subexpressions, so two equal bit planes of a layer
    can share one ``Quant`` node in the bit-plane form. Duplicating it changes nothing computed.
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    for node in list(g.node):
        if node.op_type not in ("Quant", "BipolarQuant") or \
                not all(t in inits for t in node.input if t):
            continue
        for k, consumer in enumerate(model.find_consumers(node.output[0])[1:], 1):
            dup = copy.deepcopy(node)
            dup.name = f"{node.name}_copy{k}"
            dup.output[0] = f"{node.output[0]}_copy{k}"
            for i, t in enumerate(consumer.input):
                if t == node.output[0]:
                    consumer.input[i] = dup.output[0]
            g.node.insert(list(g.node).index(node) + 1, dup)
    return model


def _flatten_to_reshape(model):
    """Replace each ``Flatten`` of a statically shaped tensor by the equal ``Reshape`` (the
    TorchScript exporter writes ``nn.Flatten`` as ``Flatten``, dynamo as ``Reshape``; finn-plus
    has a HW layer for ``Reshape`` only)."""
    from onnx import helper

    for node in list(model.graph.node):
        shape = model.get_tensor_shape(node.input[0]) if node.op_type == "Flatten" else None
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        axis = axis + len(shape) if axis < 0 else axis
        target = [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]
        const = model.make_new_valueinfo_name()
        model.set_initializer(const, np.asarray(target, dtype=np.int64))
        new = helper.make_node("Reshape", [node.input[0], const], list(node.output),
                               name=node.name)
        pos = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(pos, new)
    return model


def _tidy(model):
    """finn-plus's ``step_tidy_up``."""
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import (GiveReadableTensorNames, GiveUniqueNodeNames,
                                              RemoveStaticGraphInputs)
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    for t in (InferShapes(), FoldConstants(), GiveUniqueNodeNames(), GiveReadableTensorNames(),
              InferDataTypes(), RemoveStaticGraphInputs()):
        model = model.transform(t)
    return model


def _merge_duplicate_nodes(model):
    """Common-subexpression elimination for layout nodes: two ``Transpose``/``Im2Col``/``Pad``
    nodes with the same input and attributes compute the same tensor, so the second one's
    consumers read the first one's output. In the plane-parallel form every plane of a conv
    layer lowers to its own ``Transpose`` + ``Im2Col`` of the same input; merged, one sliding
    window generator feeds all the planes (a ``DuplicateStreams`` fork) instead of N + 1."""
    seen = {}
    changed = True
    while changed:
        changed = False
        for node in list(model.graph.node):
            if node.op_type not in ("Transpose", "Im2Col", "Pad") or len(node.output) != 1:
                continue
            key = (node.op_type, node.domain, tuple(node.input),
                   tuple(a.SerializeToString() for a in node.attribute))
            first = seen.get(key)
            if first is None or first is node:
                seen[key] = node
                continue
            for user in model.find_consumers(node.output[0]):
                for i, t in enumerate(user.input):
                    if t == node.output[0]:
                        user.input[i] = first.output[0]
            model.graph.node.remove(node)
            changed = True
            break
    return model


def _move_scalar_mul_past_const_mul():
    """A transformation: ``(x * s) * V -> (x * V) * s`` for a scalar constant ``s`` and a
    constant ``V`` that is not a scalar (both elementwise products, so the order is free).

    In the plane-parallel form each plane's output is multiplied by its integer multipliers
    ``V``; streamlining moves the input's float scale ``s`` past the plane's MatMul, right
    before ``V``, where finn's ``CollapseRepeatedMul`` would fold both into one float vector.
    Swapped, ``V`` stays an integer multiplier (an ``ElementwiseMul`` HW layer) and every
    plane ends with the same ``* s``, which ``MoveLinearPastEltwiseAdd`` moves past the sum
    and the usual passes absorb into the next thresholds."""
    from qonnx.transformation.base import Transformation
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    class MoveScalarMulPastConstMul(Transformation):
        def apply(self, model):
            for n in model.graph.node:
                s = model.get_initializer(n.input[1]) if n.op_type == "Mul" else None
                if s is None or s.size != 1 or model.is_fork_node(n):
                    continue
                users = model.find_consumers(n.output[0])
                if len(users) != 1 or users[0].op_type != "Mul":
                    continue
                m = users[0]
                v = model.get_initializer(m.input[1])
                if v is None or v.size == 1:
                    continue
                n.input[1], m.input[1] = m.input[1], n.input[1]
                model.set_tensor_shape(n.output[0], None)
                model = model.transform(InferShapes()).transform(InferDataTypes())
                return model, True
            return model, False

    return MoveScalarMulPastConstMul()


def prepare_planes(model):
    """Plane-parallel form, before streamlining: the input's float scale (the activation
    quantizer's ``Mul`` after its ``MultiThreshold``) feeds all the planes of a layer (a fork);
    move it into each plane (``MoveMulPastFork``), past the plane's MatMul/Conv, past the
    plane's integer multipliers (:func:`_move_scalar_mul_past_const_mul`) and then, equal on
    every plane, past the sum (``MoveLinearPastEltwiseAdd``). Then the planes see integers
    (MVAUs with 1-bit weights), the multipliers are integer ``Mul`` nodes and the scale meets
    ``2**-f``, the bias and the next quantizer, where ``step_streamline`` absorbs them into
    thresholds as usual."""
    from finn.transformation.streamline.reorder import (MoveLinearPastEltwiseAdd,
                                                        MoveMulPastFork, MoveScalarMulPastConv,
                                                        MoveScalarMulPastMatMul)

    for t in (MoveMulPastFork(), MoveScalarMulPastMatMul(), MoveScalarMulPastConv(),
              _move_scalar_mul_past_const_mul(), MoveLinearPastEltwiseAdd()):
        model = model.transform(t)
    return model


def to_finn(model):
    """QONNX -> FINN-ONNX (``step_qonnx_to_finn`` + ``step_tidy_up``): weight ``Quant`` nodes
    folded into integer initializers and a scale, activation ``Quant`` nodes (<= 8 bits) into
    ``MultiThreshold``, Gemm into MatMul + Add."""
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
    from finn.transformation.qonnx.quant_act_to_multithreshold import \
        default_filter_function_generator
    from qonnx.util.cleanup import cleanup_model

    model = _unfork_constant_quant(cleanup_model(model))
    model = model.transform(ConvertQONNXtoFINN(
        filter_function=default_filter_function_generator(max_multithreshold_bit_width=8)))
    return _tidy(model)


def streamline(model, planes: bool = False):
    """``step_streamline``: move the float scales and biases past the linear ops and absorb
    them into the thresholds (rounded to integers: the MVAU inputs are integers), lower
    convolutions to Im2Col + MatMul, bipolar MatMuls to XnorPopcount. ``planes``: the
    plane-parallel form (:func:`prepare_planes` first; after lowering the convolutions, the
    planes of a layer share one Transpose + Im2Col and their output Transposes move past the
    multipliers and the sum)."""
    import finn.transformation.streamline.absorb as absorb
    from finn.transformation.streamline import Streamline
    from finn.transformation.streamline.reorder import MakeMaxPoolNHWC
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds
    from qonnx.transformation.bipolar_to_xnor import ConvertBipolarMatMulToXnorPopcount
    from qonnx.transformation.general import RemoveUnusedTensors
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul

    if planes:
        model = prepare_planes(model)
    model = model.transform(absorb.AbsorbScalarBiasIntoMultiThreshold())
    model = model.transform(Streamline())
    if model.get_nodes_by_op_type("Conv"):
        model = model.transform(LowerConvsToMatMul())
        if planes:
            from finn.transformation.streamline.reorder import (MoveTransposePastEltwise,
                                                                MoveTransposePastJoinAdd)

            model = _merge_duplicate_nodes(model)
            model = model.transform(MoveTransposePastEltwise())
            model = model.transform(MoveTransposePastJoinAdd())
            model = model.transform(absorb.AbsorbConsecutiveTransposes())
        model = model.transform(MakeMaxPoolNHWC())
        model = model.transform(absorb.AbsorbTransposeIntoMultiThreshold())
        model = model.transform(MakeMaxPoolNHWC())
        model = model.transform(absorb.AbsorbConsecutiveTransposes())
    model = model.transform(ConvertBipolarMatMulToXnorPopcount())
    model = model.transform(Streamline())
    model = model.transform(InferDataLayouts())
    model = model.transform(RemoveUnusedTensors())
    # thresholds on integer inputs: ceil them (and clip to the input range); exact there
    model = model.transform(RoundAndClipThresholds())
    return model.transform(InferDataTypes())


def to_hw(model):
    """``step_convert_to_hw`` (the inference passes an MLP or a small CNN can use, in the
    builder's order, each only where its op type is present): integer MatMul + MultiThreshold
    -> MVAU, remaining MultiThreshold -> Thresholding, float Mul/Add -> elementwise layers."""
    from finn.transformation.fpgadataflow.convert_to_hw import (
        binary_matrix_vector_activation as bmva, conv_inp_gen, duplicate_streams,
        elementwise_binary_operation as elt, global_acc_pool, label_select, pool,
        quantized_matrix_vector_activation as qmva, relu_as_elementwise_max as relu,
        requant, reshape, thresholding, vector_vector_activation as vva)
    from finn.transformation.move_reshape import RemoveCNVtoFCFlatten
    from finn.transformation.qonnx.give_unique_node_names_recursive import \
        GiveUniqueNodeNamesRecursive
    import finn.transformation.streamline.absorb as absorb
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    passes = [
        (["XnorPopcountMatMul"], bmva.InferBinaryMatrixVectorActivation()),
        (["MatMul"], qmva.InferQuantizedMatrixVectorActivation()),
        (["MatMul"], vva.InferVectorVectorActivation()),
        (["TopK"], label_select.InferLabelSelectLayer()),
        # builder default: MultiThreshold of >= 9 output bits (and Quant) as Requant
        (["MultiThreshold", "Quant"], requant.InferRequantLayer(bitwidth_threshold=9)),
        (["MultiThreshold"], thresholding.InferThresholdingLayer()),
        (["MaxPool", "MaxPoolNHWC"], pool.InferPool()),
        (["Im2Col"], conv_inp_gen.InferConvInpGen()),
        (["ConvolutionInputGenerator"], RemoveCNVtoFCFlatten()),
        (["Mul", "Add", "Sub", "Div"], elt.InferElementwiseBinaryOperation()),
        (["Relu"], relu.InferReLUAsElementwiseMax()),
        (["GlobalAveragePool"], global_acc_pool.InferGlobalAccPoolLayer()),
    ]
    model = _flatten_to_reshape(ModelWrapper(copy.deepcopy(model.model)))  # not in place
    for op_types, t in passes:
        if any(model.get_nodes_by_op_type(o) for o in op_types):
            model = model.transform(t)
    model = model.transform(duplicate_streams.InferDuplicateStreamsLayer())
    for t in (absorb.AbsorbConsecutiveTransposes(), RemoveCNVtoFCFlatten(),
              GiveUniqueNodeNamesRecursive(), InferDataLayouts(), InferDataTypes(),
              InferShapes(), reshape.InferReshape()):
        model = model.transform(t)
    return model


def finn_flow(onnx_path, workdir=None, stages: Optional[Dict[str, object]] = None):
    """Take ``onnx_path`` (a file written by ``qfv export`` in the plane-parallel, fixed-point
    or bit-plane form, or a QONNX file with standard ``Quant`` weights from elsewhere, e.g. a
    stock Brevitas export) through FINN: conversion to FINN-ONNX, streamlining, HW layers.
    Returns the final ``ModelWrapper``. ``stages`` (a dict) receives the model of every stage
    by name (:data:`STAGES`); ``workdir`` receives each as ``<n>_<stage>.onnx``."""
    graph, info = _read(onnx_path)
    form = info["form"]
    if form not in ("fixed", "planes", "bitplanes", "external"):
        raise ValueError(f"{onnx_path} is in the {form!r} form: FINN reads standard QONNX ops "
                         "only; export with --form planes (N bits per weight: MVAUs with 1-bit "
                         "weights), --form fixed (one MVAU per layer, wider integers) or --form "
                         "bitplanes (converts and runs, not mapped to HW)")
    _check_conv_batch(graph, onnx_path)
    _load_finn()
    from qonnx.core.modelwrapper import ModelWrapper

    out = {} if stages is None else stages
    out["qonnx"] = ModelWrapper(copy.deepcopy(graph))
    out["finn"] = to_finn(ModelWrapper(copy.deepcopy(graph)))
    out["streamlined"] = streamline(out["finn"], planes=form == "planes")
    out["hw"] = to_hw(out["streamlined"])
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(STAGES[1:], 1):
            out[name].save(str(workdir / f"{i}_{name}.onnx"))
    return out["hw"]


def _check_conv_batch(m, onnx_path) -> None:
    """FINN lowers each Conv to Im2Col + MatMul at batch 1 (qonnx's LowerConvsToMatMul writes
    the shapes with batch 1), so a conv graph with a larger static batch fails later in
    execution with an onnxruntime shape error. Refuse it here, saying what to do: FINN runs one
    image per execution, and :func:`run_model` feeds a batch-1 graph image by image."""
    if not any(n.op_type == "Conv" for n in m.graph.node):
        return
    dims = m.graph.input[0].type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    if batch is not None and batch != 1:
        raise ValueError(f"{onnx_path} has convolutions and a static batch of {batch}: FINN "
                         "lowers convolutions at batch 1; export the file with batch 1 (qfv "
                         "export --batch-size 1) -- it is still run on every input, one at a time")


def run_model(model, inputs) -> np.ndarray:
    """Outputs of ``model`` (a ``ModelWrapper``) on ``inputs`` (N, ...) with FINN's Python
    execution, in chunks of the graph's static batch (the last one padded)."""
    _load_finn()
    from finn.core.onnx_exec import execute_onnx

    x = np.asarray(inputs, dtype=np.float32)
    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    batch = model.get_tensor_shape(iname)[0]
    batch = batch if isinstance(batch, int) and batch > 0 else x.shape[0]
    outs = []
    for a in range(0, x.shape[0], batch):
        part = x[a:a + batch]
        n = part.shape[0]
        if n < batch:
            part = np.concatenate([part, np.zeros((batch - n,) + part.shape[1:], part.dtype)])
        y = execute_onnx(model, {iname: part})[oname]
        outs.append(np.asarray(y).reshape(batch, -1)[:n])
    return np.concatenate(outs)


def compare_outputs(expected, got, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """``got`` (N, ...) against ``expected``: max |diff|, the bound ``tolerance * max(1,
    max|expected|)``, the share of inputs whose outputs are all within it, top-1 agreement.

    >>> r = compare_outputs([[0.0, 2.0], [1.0, 0.0]], [[0.0, 2.0], [1.0, 1.5]])
    >>> r["max_abs_diff"], r["within_bound"], r["top1_agreement"]
    (1.5, 0.5, 0.5)
    """
    e = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
    g = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    if e.shape != g.shape:
        raise ValueError(f"output shapes differ: {e.shape} vs {g.shape}")
    err = np.abs(g - e).max(1)
    bound = tolerance * max(1.0, float(np.abs(e).max()))
    return {"samples": int(e.shape[0]), "max_abs_diff": float(err.max()),
            "max_abs_output": float(np.abs(e).max()), "bound": bound,
            "within_bound": float((err <= bound).mean()),
            "top1_agreement": float((g.argmax(1) == e.argmax(1)).mean())}


def compare_with_torch(finn_model, reference, inputs,
                       tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """FINN's Python execution of ``finn_model`` against ``reference`` (the torch model the
    file was exported from, :func:`qfv_brevitas.export.reference_model`) on ``inputs``:
    :func:`compare_outputs`, plus the FINN outputs under ``"outputs"``."""
    import torch

    x = torch.as_tensor(inputs).float()
    with torch.no_grad():
        y_t = reference.eval()(x).numpy().reshape(x.shape[0], -1)
    y_f = run_model(finn_model, x.numpy())
    return dict(compare_outputs(y_t, y_f, tolerance), outputs=y_f)


def _agrees(res: dict, min_agreement: float) -> bool:
    return res["within_bound"] >= min_agreement and res["top1_agreement"] >= min_agreement


def _expected_mvau_weights(file_model, row: dict, frac_bits: int) -> np.ndarray:
    """The integer matrix an MVAU should hold for a layer of the fixed form: the file's
    ``<layer>.weight_fixed`` (``int * 2**-f``) times ``2**f``, in MatMul layout (in, out)."""
    w = file_model.get_initializer(f"{row['layer']}.weight_fixed")
    if w is None:
        raise ValueError(f"no initializer {row['layer']}.weight_fixed in the file: not the "
                         "fixed form written by qfv export")
    return _matmul_layout(np.asarray(w, dtype=np.float64) * 2.0 ** frac_bits)


def _matmul_layout(w: np.ndarray, matmul: bool = False) -> np.ndarray:
    """A weight tensor as finn's matrix-vector layers hold it, ``(fan_in, out)``: a Conv
    kernel ``(out, in, kh, kw)`` as finn's NHWC im2col matrix ``(kh*kw*in, out)``, a Linear
    weight ``(out, in)`` transposed; ``matmul``: already ``(in, out)``."""
    w = np.asarray(w, dtype=np.float64)
    if matmul:
        return w
    if w.ndim == 4:
        return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1).T
    return w.reshape(w.shape[0], -1).T


def _hw_weights(hw_model, node) -> np.ndarray:
    """The weights of a matrix-vector HW node in ``(fan_in, out)`` layout (a VVAU's kernel
    ``(channels, 1, kh, kw)`` as ``(kh*kw, channels)``)."""
    w = np.asarray(hw_model.get_initializer(node.input[1]), dtype=np.float64)
    if node.op_type.startswith("VVAU"):
        return w.reshape(w.shape[0], -1).T
    return w


def _weight_dtype(node) -> str:
    from qonnx.custom_op.registry import getCustomOp

    return getCustomOp(node).get_nodeattr("weightDataType")


def _is_one_bit(dtype: str) -> bool:
    return dtype in ("BINARY", "UINT1")


def planes_hw_layers(hw_model, file_model, info: dict) -> List[dict]:
    """Plane-parallel form: for each layer of the file, the HW nodes that hold its parts,
    matched by content: every bit plane an MVAU/VVAU whose weights equal the plane exactly,
    the all-ones offset layer and the ``1 -> C`` layer of integer offsets likewise, and each
    plane's integer multipliers an ``ElementwiseMul`` whose constant equals them."""
    weight_nodes = [n for n in hw_model.graph.node if n.op_type in MVAU_TYPES]
    muls = [n for n in hw_model.graph.node if n.op_type.startswith("ElementwiseMul")
            and hw_model.get_initializer(n.input[1]) is not None]
    used = set()

    def find(expected: np.ndarray, pool, value):
        for n in pool:
            if n.output[0] in used:
                continue
            got = value(n)
            if got.shape == expected.shape and np.array_equal(got, expected):
                used.add(n.output[0])
                return n
        return None

    def entry(node, **extra):
        if node is None:
            return None
        out = {"node": node.name, "op": node.op_type, "output": node.output[0]}
        if node.op_type in MVAU_TYPES:
            out["weight_dtype"] = _weight_dtype(node)
        else:
            out["dtype"] = str(hw_model.get_tensor_datatype(node.input[1]))
        out.update(extra)
        return out

    layers = []
    for row in info["layers"]:
        pl = row["planes"]
        t = pl["tensors"]
        mm = t.get("layout") == "matmul"
        out_ch = row["weight_shape"][0]
        mult = np.asarray(pl["multipliers"], dtype=np.float64)
        if mult.shape[0] == 1:
            mult = np.repeat(mult, out_ch, 0)
        e = {"layer": row["layer"], "bits": row["bits"], "planes": [], "multipliers": []}
        for k, name in enumerate(t["planes"]):
            want = _matmul_layout(file_model.get_initializer(name), mm)
            e["planes"].append(entry(find(want, weight_nodes, lambda n: _hw_weights(hw_model, n)),
                                     plane=k))
        for k in range(row["bits"]):
            if np.all(mult[:, k] == 1):  # x 1: streamlining drops the Mul, nothing to map
                e["multipliers"].append({"plane": k, "op": None, "dtype": "identity"})
                continue
            node = find(mult[:, k], muls, lambda n: np.asarray(
                hw_model.get_initializer(n.input[1]), dtype=np.float64).reshape(-1))
            e["multipliers"].append(entry(node, plane=k))
        if "ones" in t:
            want = _matmul_layout(file_model.get_initializer(t["ones"]), mm)
            e["ones"] = entry(find(want, weight_nodes, lambda n: _hw_weights(hw_model, n)))
            off = file_model.get_initializer(t["offset"])
            if t["offset_output"] != t["offset"]:  # a 1 -> C layer of integer weights
                want = _matmul_layout(off, mm)
                e["offset"] = entry(find(want, weight_nodes,
                                         lambda n: _hw_weights(hw_model, n)))
            else:                                  # grouped conv: a per-channel Mul
                e["offset"] = entry(find(np.asarray(off, np.float64).reshape(-1), muls,
                                         lambda n: np.asarray(hw_model.get_initializer(
                                             n.input[1]), dtype=np.float64).reshape(-1)))
        layers.append(e)
    return layers


def hw_report(hw_model, onnx_path) -> dict:
    """What the final graph holds: node types, and per weight layer of the file the HW layer(s)
    it became. Fixed form: the layer's MVAU (matched in graph order; FINN weight data type,
    max |FINN weight - the file's integer weight|). Plane-parallel form: see
    :func:`planes_hw_layers`. A QONNX file not written by qfv (e.g. a stock Brevitas export,
    form ``"external"``): its matrix-vector nodes in graph order."""
    from qonnx.core.modelwrapper import ModelWrapper

    graph, info = _read(onnx_path)
    file_model = ModelWrapper(graph)
    types = Counter(n.op_type for n in hw_model.graph.node)
    mvaus = [n for n in hw_model.graph.node if n.op_type in MVAU_TYPES]
    generic = sorted({n.op_type for n in hw_model.graph.node
                      if not n.domain.startswith("finn.custom_op.fpgadataflow")})
    out = {"form": info["form"], "node_types": dict(sorted(types.items())),
           "non_hw_nodes": generic}
    if info["form"] == "planes":
        out["layers"] = planes_hw_layers(hw_model, file_model, info)
        return out
    layers: List[dict] = []
    for k, row in enumerate(info["layers"]):
        entry = {"layer": row["layer"], "hw": None}
        if k < len(mvaus):
            node = mvaus[k]
            w = np.asarray(hw_model.get_initializer(node.input[1]), dtype=np.float64)
            entry.update(hw=node.op_type, node=node.name, output=node.output[0],
                         weight_dtype=_weight_dtype(node),
                         integer_weights=bool(np.all(w == np.round(w))))
            if info["form"] == "fixed":
                fx = info["fixed_point"]
                # each layer's own f (a layer trained on the integer view keeps its grid)
                want = _expected_mvau_weights(file_model, row, row["fixed_point"]["frac_bits"])
                lay = fx["layers"][row["layer"]]
                entry["file_int_type"] = f"{'INT' if lay['signed'] else 'UINT'}{lay['int_bits']}"
                entry["max_weight_diff"] = (float(np.abs(w - want).max())
                                            if w.shape == want.shape else None)
        layers.append(entry)
    out["layers"] = layers
    return out


def _read(onnx_path):
    """The file's graph and qfv metadata, read once by qfv's loader of files a user gives
    (regular file, size bound, no external data, only the ops the export forms write:
    :mod:`qfv_brevitas.export.untrusted`). For a QONNX file from elsewhere (no qfv metadata) a
    stand-in: form ``"external"``, one layer per weight ``Quant`` node feeding a
    MatMul/Conv/Gemm."""
    from qfv_brevitas.export import ExportFileError
    from qfv_brevitas.export.metadata import read_export
    from qfv_brevitas.export.untrusted import load_onnx

    try:
        return read_export(onnx_path)
    except ExportFileError as e:
        if "not written by qfv-brevitas" not in str(e):
            raise
    m = load_onnx(onnx_path)
    inits = {i.name for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    layers = []
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Conv", "Gemm") and len(n.input) > 1:
            q = prod.get(n.input[1])
            if q is not None and q.op_type in ("Quant", "BipolarQuant") and q.input[0] in inits:
                layers.append({"layer": f"{n.op_type.lower()}{len(layers)}"})
    return m, {"form": "external", "layers": layers}


def hw_problems(report: dict, strict: bool = False) -> List[str]:
    """What keeps a graph from counting as mapped to HW exactly (empty: none).

    Fixed form: a weight layer that is not an MVAU/VVAU holding the file's integers in the
    file's integer type. Plane-parallel form: a bit plane (or the all-ones offset layer) that
    is not an MVAU/VVAU with 1-bit weights holding exactly the plane, a plane's multipliers
    that are not an integer ``ElementwiseMul``, the integer offsets not an MVAU with integer
    weights. With ``strict``, also any node left outside finn's HW layers."""
    if report["form"] not in ("fixed", "planes"):
        return []
    bad = []
    if strict and report["non_hw_nodes"]:
        bad.append(f"nodes not mapped to HW layers: {report['non_hw_nodes']}")
    if report["form"] == "planes":
        for e in report["layers"]:
            L = e["layer"]
            for p in e["planes"]:
                if p is None:
                    bad.append(f"layer {L}: a bit plane is not an MVAU/VVAU holding it exactly")
                elif not _is_one_bit(p["weight_dtype"]):
                    bad.append(f"layer {L}: plane {p['plane']} has {p['weight_dtype']} weights, "
                               "not 1-bit")
            for k, m in enumerate(e["multipliers"]):
                if m is None:
                    bad.append(f"layer {L}: the multipliers of plane {k} are not an "
                               "ElementwiseMul holding them")
                elif not m["dtype"].startswith(("INT", "UINT", "BINARY", "identity")):
                    bad.append(f"layer {L}: the multipliers of plane {k} are {m['dtype']}, not "
                               "integers")
            if "ones" in e:
                if e["ones"] is None or not _is_one_bit(e["ones"]["weight_dtype"]):
                    bad.append(f"layer {L}: the all-ones offset layer is not a 1-bit MVAU/VVAU")
                off = e.get("offset")
                kind = (off or {}).get("weight_dtype", (off or {}).get("dtype", ""))
                if off is None or not kind.startswith(("INT", "UINT")):
                    bad.append(f"layer {L}: the integer offsets are not an integer HW layer")
        return bad
    for e in report["layers"]:
        if e["hw"] is None:
            bad.append(f"layer {e['layer']}: no MVAU/VVAU for it")
        elif not e["integer_weights"] or e.get("max_weight_diff") != 0.0:
            bad.append(f"layer {e['layer']}: MVAU weights differ from the file's integers "
                       f"(max diff {e.get('max_weight_diff')})")
        elif e["weight_dtype"] != e["file_int_type"]:
            bad.append(f"layer {e['layer']}: weight type {e['weight_dtype']} but the file's "
                       f"levels need {e['file_int_type']}")
    return bad


# -- resource estimates ---------------------------------------------------------------------------
#: FPGA part of the resource estimates: the Zynq-7020 of the PYNQ-Z1/Z2 boards, FINN's usual
#: small target. The estimates are finn's analytical models (no Vivado).
DEFAULT_FPGA_PART = "xc7z020clg400-1"
#: Cycles per frame that :func:`estimate_resources` folds every layer to (finn's SetFolding).
DEFAULT_TARGET_CYCLES = 512
#: HW ops that feed a weight layer (attributed to the layer they feed, not the one before).
_INPUT_SIDE = ("ConvolutionInputGenerator", "FMPadding", "DuplicateStreams",
               "StreamingDataWidthConverter")


def weight_layer_outputs(report: dict) -> Dict[str, str]:
    """Output tensor of each weight HW node -> the file layer it belongs to (from
    :func:`hw_report`); these names survive finn's specialization and renaming."""
    out = {}
    for e in report["layers"]:
        if report["form"] == "planes":
            for part in list(e["planes"]) + [e.get("ones"), e.get("offset")]:
                if part is not None and "weight_dtype" in part:
                    out[part["output"]] = e["layer"]
        elif e.get("output"):
            out[e["output"]] = e["layer"]
    return out


def _attribute_layers(model, anchors: Dict[str, str]) -> Dict[str, Optional[str]]:
    """Each node's layer: weight nodes by ``anchors``; input-side nodes (sliding windows,
    padding, stream forks) the nearest weight layer downstream; every other node (multipliers,
    sums, thresholds) the nearest upstream, else downstream."""
    by_out = {n.output[0]: n for n in model.graph.node}

    def walk(node, up: bool):
        seen, frontier = set(), [node]
        while frontier:
            nxt = []
            for n in frontier:
                tensors = n.input if up else n.output
                for t in tensors:
                    neigh = [model.find_producer(t)] if up else model.find_consumers(t) or []
                    for m in neigh:
                        if m is None or m.output[0] in seen:
                            continue
                        seen.add(m.output[0])
                        if m.output[0] in anchors:
                            return anchors[m.output[0]]
                        nxt.append(m)
            frontier = nxt
        return None

    out = {}
    for out_name, n in by_out.items():
        if out_name in anchors:
            out[out_name] = anchors[out_name]
        elif n.op_type.startswith(_INPUT_SIDE):
            out[out_name] = walk(n, up=False) or walk(n, up=True)
        else:
            out[out_name] = walk(n, up=True) or walk(n, up=False)
    return out


def _param_bits(model, node) -> int:
    """Bits of the parameters a HW node stores: a matrix-vector layer's weights, a
    thresholding layer's thresholds, an elementwise layer's constant operand."""
    from qonnx.custom_op.registry import getCustomOp

    inst = getCustomOp(node)
    op = node.op_type

    def size(t):
        a = model.get_initializer(t)
        return 0 if a is None else int(np.prod(a.shape)) * model.get_tensor_datatype(t).bitwidth()

    if op.startswith(("MVAU", "VVAU", "Thresholding")):
        return sum(size(t) for t in node.input[1:])  # weights and/or thresholds
    if op.startswith("Elementwise"):
        c = model.get_initializer(node.input[1])
        if c is None:
            return 0
        return int(np.prod(c.shape)) * DataTypeOf(inst.get_nodeattr("rhs_dtype")).bitwidth()
    return 0


def DataTypeOf(name: str):  # noqa: N802  (a qonnx DataType by name)
    from qonnx.core.datatype import DataType

    return DataType[name]


def _elementwise_arith_luts(node) -> Optional[int]:
    """LUTs of an integer elementwise add/multiply, which finn-plus 1.6.1's estimate of its
    ``Elementwise*`` layers leaves out (it counts their parameter memory only): an adder is one
    LUT per output bit per PE; a multiplier the FINN-R formula finn uses for an MVAU's
    multipliers, ``(2 ceil((A+W)/6) - 1)(A+W)`` per PE. None for float operations."""
    from qonnx.custom_op.registry import getCustomOp

    inst = getCustomOp(node)
    lhs, rhs = (DataTypeOf(inst.get_nodeattr(a)) for a in ("lhs_dtype", "rhs_dtype"))
    out = DataTypeOf(inst.get_nodeattr("out_dtype"))
    if not (lhs.is_integer() and rhs.is_integer() and out.is_integer()):
        return None
    pe = inst.get_nodeattr("PE")
    if node.op_type.startswith("ElementwiseAdd") or node.op_type.startswith("ElementwiseSub"):
        return pe * out.bitwidth()
    if node.op_type.startswith("ElementwiseMul"):
        w = lhs.bitwidth() + rhs.bitwidth()
        return pe * (2 * int(np.ceil(w / 6)) - 1) * w
    return None


def estimate_resources(hw_model, anchors: Dict[str, str], fpgapart: str = DEFAULT_FPGA_PART,
                       target_cycles: int = DEFAULT_TARGET_CYCLES) -> dict:
    """finn's analytical resource estimates (no Vivado) for the HW graph, per node and per
    layer of the file (``anchors``: :func:`weight_layer_outputs`).

    The folding is the one finn's builder derives from a throughput target: bit widths
    minimized as ``step_minimize_bit_width`` does, every layer specialized to its HLS variant
    with LUT multipliers (``resType="lut"``; so the weight widths show in LUTs, not in DSPs,
    and the forms compare on one resource), elementwise constants in distributed RAM,
    ``SetFolding(target_cycles)`` with the weight-stream width limit lifted (a 1-bit plane
    and a 10-bit fixed-form layer of the same shape then get the same PE and SIMD), then
    ``res_estimation``. Adds the LUTs of integer elementwise arithmetic that finn's estimate of
    those layers leaves out (:func:`_elementwise_arith_luts`) as a separate column."""
    import copy as _copy

    from finn.analysis.fpgadataflow.exp_cycles_per_layer import exp_cycles_per_layer
    from finn.analysis.fpgadataflow.res_estimation import res_estimation
    from finn.transformation.fpgadataflow.minimize_accumulator_width import \
        MinimizeAccumulatorWidth
    from finn.transformation.fpgadataflow.minimize_weight_bit_width import \
        MinimizeWeightBitWidth
    from finn.transformation.fpgadataflow.set_folding import SetFolding
    from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp
    from qonnx.transformation.infer_datatypes import InferDataTypes

    batch = hw_model.get_tensor_shape(hw_model.graph.input[0].name)[0]
    if batch != 1:
        raise ValueError(f"the graph's batch is {batch}: finn folds for one execution of the "
                         "graph, so the estimates would be for a frame of that many images; "
                         "export the file with batch 1 (qfv export --batch-size 1) for estimates")

    def minimize(m):
        with contextlib.redirect_stdout(io.StringIO()):  # finn prints every width it changes
            m = m.transform(MinimizeWeightBitWidth()).transform(MinimizeAccumulatorWidth())
            m = m.transform(InferDataTypes()).transform(RoundAndClipThresholds())
            return m.transform(InferDataTypes())

    m = minimize(ModelWrapper(_copy.deepcopy(hw_model.model)))
    for n in m.graph.node:
        if n.domain == "finn.custom_op.fpgadataflow":
            inst = getCustomOp(n)
            if "preferred_impl_style" in inst.get_nodeattr_types():
                inst.set_nodeattr("preferred_impl_style", "hls")
    with contextlib.redirect_stdout(io.StringIO()):
        m = m.transform(SpecializeLayers(fpgapart))
    for n in m.graph.node:
        if not n.domain.startswith("finn.custom_op.fpgadataflow"):
            continue
        inst = getCustomOp(n)
        attrs = inst.get_nodeattr_types()
        if n.op_type.startswith(("MVAU", "VVAU")) and "resType" in attrs:
            inst.set_nodeattr("resType", "lut")
        if n.op_type.startswith("Elementwise") and "ram_style" in attrs:
            inst.set_nodeattr("ram_style", "distributed")
    m = m.transform(SetFolding(target_cycles, mvau_wwidth_max=4096, two_pass_relaxation=False))
    m = minimize(m)
    res = res_estimation(m, fpgapart)
    cycles = exp_cycles_per_layer(m)
    layer_of = _attribute_layers(m, anchors)
    nodes = []
    for n in m.graph.node:
        if n.name not in res:
            continue
        inst = getCustomOp(n)
        attrs = inst.get_nodeattr_types()
        r = res[n.name]
        row = {"node": n.name, "op": n.op_type, "layer": layer_of.get(n.output[0]),
               "LUT": int(r["LUT"]), "BRAM_18K": int(r["BRAM_18K"]), "URAM": int(r["URAM"]),
               "DSP": int(r["DSP"]), "cycles": int(cycles.get(n.name, 0)),
               "param_bits": _param_bits(m, n),
               "PE": inst.get_nodeattr("PE") if "PE" in attrs else None,
               "SIMD": inst.get_nodeattr("SIMD") if "SIMD" in attrs else None}
        if n.op_type.startswith(("MVAU", "VVAU")):
            w = m.get_initializer(n.input[1])
            row["weight_bits"] = int(np.prod(w.shape)) * inst.get_input_datatype(1).bitwidth()
            row["weight_dtype"] = inst.get_nodeattr("weightDataType")
        if n.op_type.startswith("Elementwise"):
            row["arith_LUT"] = _elementwise_arith_luts(n)
        nodes.append(row)
    layers: Dict[str, dict] = {}
    for row in nodes:
        key = row["layer"] or "(none)"
        agg = layers.setdefault(key, {"layer": key, "LUT": 0, "BRAM_18K": 0, "URAM": 0,
                                      "DSP": 0, "weight_bits": 0, "param_bits": 0,
                                      "arith_LUT": 0, "nodes": 0, "weight_nodes": 0})
        for k in ("LUT", "BRAM_18K", "URAM", "DSP", "param_bits"):
            agg[k] += row[k]
        agg["weight_bits"] += row.get("weight_bits", 0)
        agg["arith_LUT"] += row.get("arith_LUT") or 0
        agg["nodes"] += 1
        agg["weight_nodes"] += "weight_bits" in row
    order = list(dict.fromkeys(anchors.values()))
    per_layer = [layers[k] for k in order if k in layers] + [
        v for k, v in layers.items() if k not in order]
    total = {k: sum(l[k] for l in per_layer) for k in
             ("LUT", "BRAM_18K", "URAM", "DSP", "weight_bits", "param_bits", "arith_LUT", "nodes")}
    return {"fpga_part": fpgapart, "target_cycles": int(target_cycles),
            "max_cycles": int(max(cycles.values())) if cycles else 0,
            "nodes": nodes, "layers": per_layer, "total": total}


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", help="QONNX file written by qfv export --form planes or fixed (or "
                                "bitplanes); or a QONNX file with standard Quant weights from "
                                "elsewhere (e.g. stock Brevitas), compared with itself only")
    p.add_argument("checkpoint", nargs="?",
                   help="the checkpoint it was exported from (without one, each stage is "
                        "compared with the file run by qonnx only)")
    p.add_argument("--samples", type=int, default=64, help="test inputs to compare on")
    p.add_argument("--workdir", help="save each stage's .onnx here")
    p.add_argument("--dataset", choices=("digits", "idx"), default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="max |FINN - torch| relative to max(1, max|y|)")
    p.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                   help="share of inputs that must be within the tolerance and agree on the "
                        "top-1 class, against torch and against the file (1.0: every input)")
    p.add_argument("--json", help="write the results (per stage, HW report) to this file")
    p.add_argument("--save-outputs", help="write inputs and each stage's outputs (.npz)")
    p.add_argument("--strict-hw", action="store_true",
                   help="planes and fixed forms: fail if any node is left outside finn's HW "
                        "layers (by default only the weight layers must be mapped)")
    p.add_argument("--estimate", action="store_true",
                   help="also print finn's analytical resource estimates (LUT, BRAM, weight "
                        "bits) per layer for a folding to --target-cycles (no Vivado)")
    p.add_argument("--target-cycles", type=int, default=DEFAULT_TARGET_CYCLES,
                   help="cycles per frame every layer is folded to for --estimate")
    p.add_argument("--fpga-part", default=DEFAULT_FPGA_PART)
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be at least 1")
    if not 0.0 < args.min_agreement <= 1.0:
        p.error("--min-agreement must be in (0, 1], e.g. 0.98 or 1 for every input")
    if args.target_cycles < 1:
        p.error("--target-cycles must be at least 1")
    try:
        return _run(args)
    except ValueError as e:  # bad input (wrong form, wrong checkpoint): say how to fix it
        print(f"run_finn.py: error: {e}", file=sys.stderr)
        return 2


def _print_layers(report: dict) -> None:
    for e in report["layers"]:
        if report["form"] == "planes":
            planes = [p for p in e["planes"] if p is not None]
            kinds = Counter(f"{p['op']} {p['weight_dtype']}" for p in planes)
            mults = [m["dtype"] for m in e["multipliers"] if m is not None]
            line = (f"  {e['layer']}: {len(planes)}/{e['bits']} planes as "
                    f"{', '.join(f'{c} x {k}' for k, c in kinds.items()) or 'nothing'}; "
                    f"multipliers ElementwiseMul ({', '.join(mults)})")
            if "ones" in e:
                ones, off = e["ones"], e["offset"]
                line += (f"; offset: all-ones {ones['op'] + ' ' + ones['weight_dtype'] if ones else '?'}"
                         f" then {off['op'] + ' ' + off.get('weight_dtype', off.get('dtype', '')) if off else '?'}")
            print(line)
        elif e["hw"] is None:
            print(f"  {e['layer']}: not mapped to a HW layer")
        else:
            extra = (f", file levels {e['file_int_type']}, max |weight - file integer| "
                     f"{e['max_weight_diff']}" if "file_int_type" in e else "")
            print(f"  {e['layer']}: {e['hw']} {e['node']}, weights {e['weight_dtype']}"
                  f"{'' if e['integer_weights'] else ' (not integer)'}{extra}")


def format_estimates(est: dict) -> str:
    """:func:`estimate_resources` as a table, one row per layer and the total."""
    head = (f"{'layer':<14} {'nodes':>5} {'LUT':>7} {'+arith':>7} {'BRAM18':>6} {'DSP':>4} "
            f"{'weight bits':>11} {'all param bits':>14}")
    lines = [f"finn estimates, {est['fpga_part']}, folded to {est['target_cycles']} cycles/frame "
             f"(slowest layer {est['max_cycles']}); +arith: LUTs of integer elementwise "
             "arithmetic finn's estimate leaves out", head, "-" * len(head)]
    for r in est["layers"] + [dict(est["total"], layer="total")]:
        lines.append(f"{r['layer']:<14} {r['nodes']:>5} {r['LUT']:>7} {r['arith_LUT']:>7} "
                     f"{r['BRAM_18K']:>6} {r['DSP']:>4} {r['weight_bits']:>11} "
                     f"{r['param_bits']:>14}")
    return "\n".join(lines)


def _run(args) -> int:
    import torch

    from qfv_brevitas.zoo.data import load_dataset

    torch.set_num_threads(1)
    graph, info = _read(args.file)
    reference, seed = None, 0
    if args.checkpoint is not None:
        from qfv_brevitas.zoo.checkpoint import load_checkpoint
        from qfv_brevitas.export import reference_model

        if info["form"] == "external":
            raise ValueError(f"{args.file} was not written by qfv export: it has no torch "
                             "reference to compare with; leave out the checkpoint")
        model, ck = load_checkpoint(args.checkpoint)
        seed = int((ck.get("meta") or {}).get("data_seed", 0))
        reference = reference_model(model, graph, where=str(args.file))
    _, test, _, _ = load_dataset(args.dataset, args.data_dir, seed)
    inputs = test.tensors[0][:args.samples]
    stages: Dict[str, object] = {}
    finn_flow(args.file, args.workdir, stages)
    report = hw_report(stages["hw"], args.file)
    results, outputs, ok = {}, {"inputs": inputs.numpy()}, True
    against = "torch and the file" if reference is not None else "the file (qonnx)"
    print(f"{len(inputs)} test inputs; a stage passes when >= {100 * args.min_agreement:g}% of "
          f"them are within {args.tolerance:g} * max(1, max|y|) of {against} and agree on top-1")
    for name in STAGES:
        if reference is not None:
            res = compare_with_torch(stages[name], reference, inputs, args.tolerance)
            outputs[name] = res.pop("outputs")
            line = (f"{name:>12}: vs torch max |diff| {res['max_abs_diff']:.3g} (bound "
                    f"{res['bound']:.3g}), within {100 * res['within_bound']:.2f}%, top-1 "
                    f"{100 * res['top1_agreement']:.2f}%")
            res["ok"] = _agrees(res, args.min_agreement)
        else:
            outputs[name] = run_model(stages[name], inputs.numpy())
            res, line = {"ok": True}, f"{name:>12}:"
        if name != "qonnx":  # the same file run by qonnx: what FINN must preserve
            vs = compare_outputs(outputs["qonnx"], outputs[name], args.tolerance)
            res["vs_file"] = vs
            res["ok"] = res["ok"] and _agrees(vs, args.min_agreement)
            line += (f"{' |' if reference is not None else ''} vs file max |diff| "
                     f"{vs['max_abs_diff']:.3g}, within {100 * vs['within_bound']:.2f}%")
        ok &= res["ok"]
        results[name] = res
        print(f"{line}: {'OK' if res['ok'] else 'MISMATCH'}")
    print("final graph:", ", ".join(f"{t} x{c}" for t, c in report["node_types"].items()))
    _print_layers(report)
    problems = hw_problems(report, args.strict_hw)
    if report["form"] == "bitplanes":
        print(f"bitplanes form: float weights, not mapped to HW (left as "
              f"{', '.join(report['non_hw_nodes'])}); export --form planes for N-bit MVAU "
              "layers")
    elif report["non_hw_nodes"]:
        print(f"not mapped to HW layers: {', '.join(report['non_hw_nodes'])}")
    for msg in problems:
        print("HW check failed:", msg)
    ok &= not problems
    est = None
    if args.estimate:
        est = estimate_resources(stages["hw"], weight_layer_outputs(report), args.fpga_part,
                                 args.target_cycles)
        print(format_estimates(est))
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": results, "hw": report,
                                               "hw_problems": problems, "estimates": est,
                                               "passed": bool(ok)}, indent=1))
    if args.save_outputs:
        np.savez(args.save_outputs, **outputs)
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
