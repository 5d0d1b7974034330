"""hls4ml flow: a fixed-point QONNX file from ``qfv export --form fixed`` -> hls4ml -> C++.

hls4ml reads the file through its QONNX front end, compiles the bit-accurate C++ emulation with
g++ (no Vivado/Vitis needed for ``compile()``/``predict()``) and the predictions are compared
with the torch model the file was exported from:

    python export/hls4ml/run_hls4ml.py model.onnx model.pt --out hls_prj [--samples 64]

Exit status 0 when hls4ml agrees with torch within the tolerance, 1 otherwise.
The Python entry points are :func:`build_hls_model` and :func:`compare_with_torch`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import numpy as np

#: hls4ml's default ``fixed<16,6>`` rounds inputs, biases and activation scales; with 20
#: fractional bits the emulation matches torch's float32 to ~1e-7 on the models tried here.
DEFAULT_PRECISION = "fixed<48,20>"


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


def build_hls_model(onnx_path, output_dir, precision: str = DEFAULT_PRECISION,
                    backend: str = "Vitis", io_type: str = "io_parallel"):
    """Convert and compile ``onnx_path`` (fixed-point form) with hls4ml; returns the model.

    ``io_parallel`` (the default) is the one checked here for MLPs and CNNs; with
    ``io_stream`` the library's SmallCNN compiled but its predictions were wrong (hls4ml warned
    of leftover stream data), so do not trust that mode without comparing."""
    import hls4ml
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    from qfv_brevitas.export import read_metadata

    info = read_metadata(onnx_path)
    if info["form"] != "fixed":
        raise ValueError(f"{onnx_path} is in the {info['form']!r} form; hls4ml reads the "
                         "fixed-point form (qfv export --form fixed): its ONNX reader does not "
                         "take the NMultWeight op or bit-plane weight subgraphs")
    _channels_last_average_pool()
    model = cleanup_model(ModelWrapper(str(onnx_path)))
    model = model.transform(ConvertToChannelsLastAndClean())
    model = model.transform(GemmToMatMul())
    model = cleanup_model(model)
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
    p.add_argument("file", help="fixed-point QONNX file written by qfv export --form fixed")
    p.add_argument("checkpoint", help="the checkpoint it was exported from")
    p.add_argument("--out", default="hls4ml_prj", help="hls4ml project folder")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--precision", default=DEFAULT_PRECISION)
    p.add_argument("--dataset", choices=("digits", "idx"), default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |hls4ml - torch| relative to max(1, max|y|)")
    args = p.parse_args(argv)

    from qfv_brevitas.checkpoint import load_checkpoint
    from qfv_brevitas.data import load_dataset
    from qfv_brevitas.export import reference_model

    model, info = load_checkpoint(args.checkpoint)
    seed = int((info.get("meta") or {}).get("data_seed", 0))
    _, test, _, _ = load_dataset(args.dataset, args.data_dir, seed)
    reference = reference_model(model, args.file)
    hls_model = build_hls_model(args.file, args.out, args.precision)
    res = compare_with_torch(hls_model, reference, test.tensors[0][:args.samples])
    bound = args.tolerance * max(1.0, res["max_abs_output"])
    ok = res["max_abs_diff"] <= bound
    print(f"hls4ml vs torch on {res['samples']} test inputs: max |diff| {res['max_abs_diff']:.3g} "
          f"(bound {bound:.3g}), top-1 agreement {100 * res['top1_agreement']:.2f}%: "
          f"{'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
