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
import copy
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


def streamline(model):
    """``step_streamline``: move the float scales and biases past the linear ops and absorb
    them into the thresholds (rounded to integers: the MVAU inputs are integers), lower
    convolutions to Im2Col + MatMul, bipolar MatMuls to XnorPopcount."""
    import finn.transformation.streamline.absorb as absorb
    from finn.transformation.streamline import Streamline
    from finn.transformation.streamline.reorder import MakeMaxPoolNHWC
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds
    from qonnx.transformation.bipolar_to_xnor import ConvertBipolarMatMulToXnorPopcount
    from qonnx.transformation.general import RemoveUnusedTensors
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul

    model = model.transform(absorb.AbsorbScalarBiasIntoMultiThreshold())
    model = model.transform(Streamline())
    if model.get_nodes_by_op_type("Conv"):
        model = model.transform(LowerConvsToMatMul())
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
    """Take ``onnx_path`` (a file written by ``qfv export``, fixed-point or bit-plane form)
    through FINN: conversion to FINN-ONNX, streamlining, HW layers. Returns the final
    ``ModelWrapper``. ``stages`` (a dict) receives the model of every stage by name
    (:data:`STAGES`); ``workdir`` receives each as ``<n>_<stage>.onnx``."""
    from qfv_brevitas.export import read_metadata

    form = read_metadata(onnx_path)["form"]
    if form not in ("fixed", "bitplanes"):
        raise ValueError(f"{onnx_path} is in the {form!r} form: FINN reads standard QONNX ops "
                         "only; export with --form fixed (maps to MVAU layers) or --form "
                         "bitplanes (converts and runs, not mapped to HW)")
    _load_finn()
    from qonnx.core.modelwrapper import ModelWrapper

    out = {} if stages is None else stages
    out["qonnx"] = ModelWrapper(str(onnx_path))
    out["finn"] = to_finn(ModelWrapper(str(onnx_path)))
    out["streamlined"] = streamline(out["finn"])
    out["hw"] = to_hw(out["streamlined"])
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(STAGES[1:], 1):
            out[name].save(str(workdir / f"{i}_{name}.onnx"))
    return out["hw"]


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
    w = np.asarray(w, dtype=np.float64) * 2.0 ** frac_bits
    if w.ndim == 4:  # Conv (out, in, kh, kw) -> FINN's NHWC im2col matrix (kh*kw*in, out)
        return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1).T
    return w.reshape(w.shape[0], -1).T


def hw_report(hw_model, onnx_path) -> dict:
    """What the final graph holds: node types, and per weight layer of the file the HW layer
    it became (op type, FINN weight data type, max |FINN weight - expected integer weight|
    for the fixed form). Layers are matched to matrix-vector nodes in graph order."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    from qfv_brevitas.export import read_metadata

    info = read_metadata(onnx_path)
    file_model = ModelWrapper(str(onnx_path))
    types = Counter(n.op_type for n in hw_model.graph.node)
    mvaus = [n for n in hw_model.graph.node if n.op_type in MVAU_TYPES]
    layers: List[dict] = []
    for k, row in enumerate(info["layers"]):
        entry = {"layer": row["layer"], "hw": None}
        if k < len(mvaus):
            node = mvaus[k]
            w = np.asarray(hw_model.get_initializer(node.input[1]), dtype=np.float64)
            entry.update(hw=node.op_type, node=node.name,
                         weight_dtype=getCustomOp(node).get_nodeattr("weightDataType"),
                         integer_weights=bool(np.all(w == np.round(w))))
            if info["form"] == "fixed":
                fx = info["fixed_point"]
                want = _expected_mvau_weights(file_model, row, fx["frac_bits"])
                lay = fx["layers"][row["layer"]]
                entry["file_int_type"] = f"{'INT' if lay['signed'] else 'UINT'}{lay['int_bits']}"
                entry["max_weight_diff"] = (float(np.abs(w - want).max())
                                            if w.shape == want.shape else None)
        layers.append(entry)
    generic = sorted({n.op_type for n in hw_model.graph.node
                      if not n.domain.startswith("finn.custom_op.fpgadataflow")})
    return {"form": info["form"], "node_types": dict(sorted(types.items())),
            "non_hw_nodes": generic, "layers": layers}


def hw_problems(report: dict, strict: bool = False) -> List[str]:
    """What keeps a fixed-form graph from counting as mapped to HW exactly (empty: none):
    a weight layer that is not an MVAU/VVAU holding the file's integers in the file's integer
    type; with ``strict``, also any node left outside finn's HW layers."""
    if report["form"] != "fixed":
        return []
    bad = []
    if strict and report["non_hw_nodes"]:
        bad.append(f"nodes not mapped to HW layers: {report['non_hw_nodes']}")
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


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", help="QONNX file written by qfv export --form fixed (or bitplanes)")
    p.add_argument("checkpoint", help="the checkpoint it was exported from")
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
                   help="fixed form: fail if any node is left outside finn's HW layers (by "
                        "default only the weight layers must be MVAU/VVAU)")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be at least 1")
    if not 0.0 < args.min_agreement <= 1.0:
        p.error("--min-agreement must be in (0, 1], e.g. 0.98 or 1 for every input")
    try:
        return _run(args)
    except ValueError as e:  # bad input (wrong form, wrong checkpoint): say how to fix it
        print(f"run_finn.py: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from qfv_brevitas.checkpoint import load_checkpoint
    from qfv_brevitas.data import load_dataset
    from qfv_brevitas.export import reference_model

    torch.set_num_threads(1)
    model, info = load_checkpoint(args.checkpoint)
    seed = int((info.get("meta") or {}).get("data_seed", 0))
    _, test, _, _ = load_dataset(args.dataset, args.data_dir, seed)
    inputs = test.tensors[0][:args.samples]
    reference = reference_model(model, args.file)
    stages: Dict[str, object] = {}
    finn_flow(args.file, args.workdir, stages)
    report = hw_report(stages["hw"], args.file)
    results, outputs, ok = {}, {"inputs": inputs.numpy()}, True
    print(f"{len(inputs)} test inputs; a stage passes when >= {100 * args.min_agreement:g}% of "
          f"them are within {args.tolerance:g} * max(1, max|y|) and agree on top-1")
    for name in STAGES:
        res = compare_with_torch(stages[name], reference, inputs, args.tolerance)
        outputs[name] = res.pop("outputs")
        line = (f"{name:>12}: vs torch max |diff| {res['max_abs_diff']:.3g} (bound "
                f"{res['bound']:.3g}), within {100 * res['within_bound']:.2f}%, top-1 "
                f"{100 * res['top1_agreement']:.2f}%")
        res["ok"] = _agrees(res, args.min_agreement)
        if name != "qonnx":  # the same file run by qonnx: what FINN must preserve
            vs = compare_outputs(outputs["qonnx"], outputs[name], args.tolerance)
            res["vs_file"] = vs
            res["ok"] = res["ok"] and _agrees(vs, args.min_agreement)
            line += (f" | vs file max |diff| {vs['max_abs_diff']:.3g}, within "
                     f"{100 * vs['within_bound']:.2f}%")
        ok &= res["ok"]
        results[name] = res
        print(f"{line}: {'OK' if res['ok'] else 'MISMATCH'}")
    print("final graph:", ", ".join(f"{t} x{c}" for t, c in report["node_types"].items()))
    for e in report["layers"]:
        if e["hw"] is None:
            print(f"  {e['layer']}: not mapped to a HW layer")
        else:
            extra = (f", file levels {e['file_int_type']}, max |weight - file integer| "
                     f"{e['max_weight_diff']}" if "file_int_type" in e else "")
            print(f"  {e['layer']}: {e['hw']} {e['node']}, weights {e['weight_dtype']}"
                  f"{'' if e['integer_weights'] else ' (not integer)'}{extra}")
    problems = hw_problems(report, args.strict_hw)
    if report["form"] != "fixed":
        print(f"{report['form']} form: float weights, not mapped to HW (left as "
              f"{', '.join(report['non_hw_nodes'])}); export --form fixed for MVAU layers")
    elif report["non_hw_nodes"]:
        print(f"not mapped to HW layers: {', '.join(report['non_hw_nodes'])}")
    for msg in problems:
        print("HW check failed:", msg)
    ok &= not problems
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": results, "hw": report,
                                               "hw_problems": problems, "passed": bool(ok)},
                                              indent=1))
    if args.save_outputs:
        np.savez(args.save_outputs, **outputs)
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
