#!/usr/bin/env python
"""QONNX export: time on a ResNet-18-sized model, accuracy of each form, fixed point vs f.

(a) Time. ``resnet18_cifar()`` (11.2M weights) converted with ``quantize_model(model,
NMultConfig(weight_bits=4, act_bits=4), x)`` (first/last layers 8 bits). For each form
(compact, bitplanes, fixed with f = 8) it times ``export_qonnx(..., verify=False)`` and then
``verify_qonnx`` on one 32x32 input (torch, qonnx ``execute_onnx``, onnxruntime). Reference,
measured in the same run: Brevitas' own ``export_qonnx`` of the same network with Brevitas'
stock 4-bit weight quantizer (``Int8WeightPerTensorFloat`` with ``weight_bit_width=4``), i.e.
what exporting a uniform-int model costs; and qonnx ``execute_onnx`` of that stock file on the
same input (the reference for verification). Ratios: ours / reference. One warm-up export,
then medians of ``--repeats``. Exporter: ``--exporter`` (default dynamo).

(b) Accuracy on digits. A SmallCNN (width 16) trained in float (``--float-epochs``) then W4A4
N-multiplier QAT (``--qat-epochs``), seed ``--seed`` (digits split seed 0). Each form is exported
with the whole test set (360 images) as its static batch and run in onnxruntime (via
``to_onnxruntime``): top-1 accuracy of each file against the torch model's own (compact and
bit planes must be identical to torch).

(c) Fixed point vs f: for f = 0..``--max-f``, accuracy change against the torch model, max
multiplier error (bound 2^-(f+1)) and max weight error.

    python benchmarks/bench_export.py [--repeats 3] [--exporter dynamo] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info, machine_line  # noqa: E402


def _median_time(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_time(args, tmp: Path) -> dict:
    import brevitas.nn as qnn
    from brevitas.export import export_qonnx as brevitas_export
    from brevitas.graph.quantize import preprocess_for_quantize, quantize
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    from qfv_brevitas import NMultConfig, quantize_model
    from qfv_brevitas.export import export_qonnx, verify_qonnx
    from qfv_brevitas.zoo.models import resnet18_cifar

    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    ours = quantize_model(resnet18_cifar(10), NMultConfig(weight_bits=4, act_bits=4), x).eval()
    n_weights = sum(l.weight.numel() for n, l in ours.named_modules() if hasattr(l, "weight_quant"))

    torch.manual_seed(0)
    stock = quantize(preprocess_for_quantize(resnet18_cifar(10)), compute_layer_map={
        torch.nn.Conv2d: (qnn.QuantConv2d, {"weight_quant": Int8WeightPerTensorFloat,
                                            "weight_bit_width": 4,
                                            "input_quant": Int8ActPerTensorFloat,
                                            "input_bit_width": 4}),
        torch.nn.Linear: (qnn.QuantLinear, {"weight_quant": Int8WeightPerTensorFloat,
                                            "weight_bit_width": 4,
                                            "input_quant": Int8ActPerTensorFloat,
                                            "input_bit_width": 4})}).eval()
    with torch.no_grad():
        stock(x)
    dyn = args.exporter == "dynamo"
    ref_path = tmp / "stock.onnx"

    def ref_export():
        kw = dict(dynamo=True, optimize=True) if dyn else dict(dynamo=False)
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            brevitas_export(stock, args=x, export_path=str(ref_path), **kw)

    t_ref = _median_time(ref_export, args.repeats)
    mw = ModelWrapper(str(ref_path))
    iname = mw.graph.input[0].name
    t_ref_exec = _median_time(lambda: execute_onnx(mw, {iname: x.numpy()}), args.repeats)
    out = {"weights": n_weights, "reference_export_s": t_ref, "reference_exec_s": t_ref_exec,
           "forms": {}}
    for form in ("compact", "bitplanes", "fixed"):
        path = tmp / f"{form}.onnx"
        kw = {"frac_bits": 8} if form == "fixed" else {}
        t_exp = _median_time(lambda: export_qonnx(ours, x, path, form, exporter=args.exporter,
                                                  verify=False, overwrite=True, **kw),
                             args.repeats)
        res = export_qonnx(ours, x, path, form, exporter=args.exporter, verify=False,
                           overwrite=True, **kw)
        rep = {}

        def run_verify():
            rep["r"] = verify_qonnx(res.reference, path, x)

        t_ver = _median_time(run_verify, max(1, args.repeats // 2))
        out["forms"][form] = {"export_s": t_exp, "verify_s": t_ver,
                              "export_ratio": t_exp / t_ref, "verify_ratio": t_ver / t_ref_exec,
                              "passed": rep["r"].passed, "file_mb": path.stat().st_size / 2**20}
    out["reference_file_mb"] = ref_path.stat().st_size / 2 ** 20
    return out


def bench_accuracy(args, tmp: Path) -> dict:
    import onnxruntime as ort

    from qfv_brevitas import NMultConfig, quantize_model
    from qfv_brevitas.zoo.data import load_digits_split
    from qfv_brevitas.export import export_qonnx, to_onnxruntime
    from qfv_brevitas.export import fixedpoint as FX
    from qfv_brevitas.export.layers import collect_layers
    from qfv_brevitas.zoo.models import SmallCNN
    from qfv_brevitas.training.train import TrainConfig, evaluate, fit

    train, test = load_digits_split(seed=0)
    torch.manual_seed(args.seed)
    m = SmallCNN(1, 10, width=16)
    fit(m, train, None, TrainConfig(epochs=args.fp_epochs, lr=0.05, seed=args.seed),
        progress=False)
    q = quantize_model(m, NMultConfig(weight_bits=4, act_bits=4), train.tensors[0][:256])
    fit(q, train, None, TrainConfig(epochs=args.q_epochs, lr=0.01, lambda_rise_epochs=3,
                                    seed=args.seed), progress=False)
    q.eval()
    xs, ys = test.tensors
    acc_torch = 100 * evaluate(q, test)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out = {"torch": acc_torch, "forms": {}, "fixed_vs_f": {}}
    for form in ("compact", "bitplanes", "fixed"):
        kw = {"frac_bits": args.fixed_f} if form == "fixed" else {}
        res = export_qonnx(q, xs, tmp / f"acc_{form}.onnx", form, verify=False, overwrite=True,
                           **kw)
        sess = ort.InferenceSession(to_onnxruntime(__import__("onnx").load(str(res.path)))
                                    .SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        y = sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0]
        acc = 100 * float((y.argmax(1) == ys.numpy()).mean())
        ref = 100 * evaluate(res.reference, test)
        out["forms"][form] = {"onnxruntime": acc, "torch_reference": ref}
    layers = collect_layers(q)
    for f in range(0, args.max_f + 1):
        rows = [FX.fixed_point_layer(i, f) for i in layers]
        acc = 100 * evaluate(FX.fixed_point_model(q, layers), test)
        out["fixed_vs_f"][f] = {"accuracy": acc, "delta": acc - acc_torch,
                                "max_multiplier_error": max(r["max_multiplier_error"] for r in rows),
                                "max_weight_error": max(r["max_weight_error"] for r in rows),
                                "int_bits": max(r["int_bits"] for r in rows)}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float-epochs", type=int, default=15)
    p.add_argument("--qat-epochs", type=int, default=8)
    p.add_argument("--fixed-f", type=int, default=8)
    p.add_argument("--max-f", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    res = {"machine": machine_info(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_time:
            t = bench_time(args, tmp)
            res["time"] = t
            print(f"\n(a) ResNet-18-sized model ({t['weights'] / 1e6:.2f}M weights), "
                  f"{args.exporter} exporter, median of {args.repeats}")
            print(f"  reference: Brevitas stock 4-bit export {t['reference_export_s']:.2f} s "
                  f"({t['reference_file_mb']:.1f} MB); qonnx execute of it "
                  f"{t['reference_exec_s']:.2f} s")
            for form, r in t["forms"].items():
                print(f"  {form:<9} export {r['export_s']:6.2f} s ({r['export_ratio']:.2f}x) "
                      f"verify {r['verify_s']:6.2f} s ({r['verify_ratio']:.2f}x of one qonnx "
                      f"execution of the stock file)  file {r['file_mb']:.1f} MB  "
                      f"passed={r['passed']}")
        a = bench_accuracy(args, tmp)
        res["accuracy"] = a
    print(f"\n(b) digits SmallCNN W4A4, seed {args.seed}: torch {a['torch']:.2f}%")
    for form, r in a["forms"].items():
        same = "identical" if r["onnxruntime"] == r["torch_reference"] else "DIFFERENT"
        print(f"  {form:<9} onnxruntime {r['onnxruntime']:.2f}%  its torch reference "
              f"{r['torch_reference']:.2f}%  ({same})")
    ok = all(a["forms"][f]["onnxruntime"] == a["torch"] for f in ("compact", "bitplanes"))
    print(f"  target: compact and bitplanes identical to torch: {'PASS' if ok else 'FAIL'}")
    print("\n(c) fixed point vs f (accuracy change against torch)")
    print("   f  int bits  accuracy   delta  max |dr| (bound)      max |dw|")
    for f, r in a["fixed_vs_f"].items():
        print(f"  {f:2d}  {r['int_bits']:8d}  {r['accuracy']:7.2f}  {r['delta']:+6.2f}  "
              f"{r['max_multiplier_error']:.3g} ({2.0 ** -(f + 1):.3g})  "
              f"{r['max_weight_error']:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
