"""User story: take an N-multiplier model to an FPGA flow through QONNX and hls4ml.

A digits MLP is trained in float, given 4-bit N-multiplier weights and 4-bit activations and
fine-tuned. It is then exported three ways: the compact QONNX form (the library's op, for
inspection and qonnx execution), the bit planes a crossbar stores, and the fixed-point form
with the smallest number of fractional bits that keeps the test accuracy within --max-drop
points. The fixed-point file goes through hls4ml (QONNX reader, g++ C++ emulation) when the
`fpga` extra is installed, and hls4ml's predictions are compared with torch.

    python examples/export_to_hls4ml.py --out export_out
"""
import argparse
import importlib.util
import shutil
from pathlib import Path

import torch

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.zoo.data import load_digits_split
from qfv_brevitas.export import export_qonnx, format_layers, read_metadata
from qfv_brevitas.zoo.models import MLP
from qfv_brevitas.training.train import TrainConfig, evaluate, fit

FLOW = Path(__file__).resolve().parents[1] / "export" / "hls4ml" / "run_hls4ml.py"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="export_out")
    p.add_argument("--epochs", type=int, default=15, help="float and QAT epochs")
    p.add_argument("--max-drop", type=float, default=0.5, help="fixed point: accuracy points")
    p.add_argument("--hidden", type=int, default=64, help="width of the two hidden layers")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train, test = load_digits_split(seed=0)
    torch.manual_seed(args.seed)
    model = MLP(64, 10, hidden=(args.hidden, args.hidden))
    fit(model, train, None, TrainConfig(epochs=args.epochs, lr=0.05, seed=args.seed),
        progress=False)
    model = quantize_model(model, NMultConfig(weight_bits=4, act_bits=4), train.tensors[0][:256])
    fit(model, train, None, TrainConfig(epochs=max(1, args.epochs // 2), lr=0.01,
                                        lambda_rise_epochs=max(1, args.epochs // 4),
                                        seed=args.seed), progress=False)
    model.eval()
    acc = evaluate(model, test)
    print(f"torch W4A4 N-multiplier MLP: {100 * acc:.2f}% on the digits test set")

    x1, xs = test.tensors[0][:1], test.tensors[0][:128]
    results = {}
    for form in ("compact", "bitplanes"):
        results[form] = export_qonnx(model, x1, out / f"mlp_{form}.onnx", form, verify_inputs=xs,
                                     overwrite=True)
        print(results[form].verification.summary())
    fx = export_qonnx(model, x1, out / "mlp_fixed.onnx", "fixed", data=test,
                      max_accuracy_drop=args.max_drop, verify_inputs=xs, overwrite=True)
    results["fixed"] = fx
    print(fx.summary())
    print(format_layers(read_metadata(fx.path)))

    hls = None
    if importlib.util.find_spec("hls4ml") is not None and shutil.which("g++"):
        spec = importlib.util.spec_from_file_location("run_hls4ml", FLOW)
        flow = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(flow)
        hm = flow.build_hls_model(fx.path, out / "hls4ml_prj")
        hls = flow.compare_with_torch(hm, fx.reference, test.tensors[0])
        print(f"hls4ml vs torch on {hls['samples']} test images: max |diff| "
              f"{hls['max_abs_diff']:.3g}, top-1 agreement {100 * hls['top1_agreement']:.2f}%")
    else:
        print("hls4ml (pip install -e '.[fpga]') or g++ missing: skipped the hls4ml step")
    return acc, results, hls


if __name__ == "__main__":
    main()
