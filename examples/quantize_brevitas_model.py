"""User story: give an existing Brevitas model N-multiplier weights.

The model is a Brevitas CNN as a user would have it: QuantConv2d/QuantLinear with Brevitas'
8-bit weight quantizer and 4-bit QuantReLU activations, trained as is on the bundled digits.
Then only the weight quantizer of each layer is swapped in place (layers, activation
quantizers and weights stay), the levels start from the current weights, and the model is
fine-tuned with the regularizer. The same call works on FINN's bnn_pynq models
(``model_with_cfg("CNV_1W2A", pretrained=False)``); see the README.

``--finn-style`` builds the model the way FINN wants it: quant tensors between the layers
(``return_quant_tensor=True``) and integer biases (``Int32Bias``, scale = input scale x weight
scale). The swap then gives every layer the integer view (levels on ``m * 2**-f``, weights as
Brevitas ``IntQuantTensor`` s), and with ``--export DIR`` the fine-tuned model is written in the
fixed QONNX form on its training grids and verified against torch (no accuracy change).

    python examples/quantize_brevitas_model.py --epochs 10
    python examples/quantize_brevitas_model.py --epochs 10 --finn-style --export out/
"""
import argparse
from pathlib import Path

import brevitas.nn as qnn
import torch
from brevitas.quant import Int32Bias
from torch import nn

from qfv_brevitas import NMultConfig, format_report, layer_report, swap_weight_quant
from qfv_brevitas.zoo.data import load_digits_split
from qfv_brevitas.training.train import TrainConfig, evaluate, fit


def brevitas_cnn(act_bits: int = 4, finn_style: bool = False) -> nn.Module:
    """``finn_style``: quant tensors between the layers and Int32Bias on the biased layers."""
    qt = dict(return_quant_tensor=finn_style)
    bias = dict(bias_quant=Int32Bias) if finn_style else {}
    return nn.Sequential(
        qnn.QuantIdentity(bit_width=8, **qt),
        qnn.QuantConv2d(1, 16, 3, padding=1, bias=False, weight_bit_width=8),
        nn.BatchNorm2d(16), qnn.QuantReLU(bit_width=act_bits, **qt),
        qnn.QuantConv2d(16, 32, 3, padding=1, bias=False, weight_bit_width=8),
        nn.BatchNorm2d(32), qnn.QuantReLU(bit_width=act_bits, **qt), nn.MaxPool2d(2),
        nn.Flatten(), qnn.QuantLinear(32 * 16, 64, bias=True, weight_bit_width=8, **bias),
        qnn.QuantReLU(bit_width=act_bits, **qt),
        qnn.QuantLinear(64, 10, bias=True, weight_bit_width=8, **bias))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--bits", type=int, default=3, help="weight bits after the swap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finn-style", action="store_true",
                   help="quant tensors between layers and Int32Bias (FINN's way)")
    p.add_argument("--export", metavar="DIR", help="write the fixed QONNX form to DIR")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    train, test = load_digits_split(args.seed)
    model = brevitas_cnn(finn_style=args.finn_style)
    fit(model, train, test, TrainConfig(epochs=args.epochs, lr=0.05, seed=args.seed),
        desc="Brevitas model as is")
    before = evaluate(model, test)
    # FINN wants integer weights everywhere: every layer on the integer view (without it, only
    # the layers whose Int32Bias needs the weight's scale would get one).
    frac_bits = "auto" if args.finn_style else None
    swap_weight_quant(model, NMultConfig(weight_bits=args.bits, variant="nmult",
                                         frac_bits=frac_bits))
    hist = fit(model, train, test,
               TrainConfig(epochs=args.epochs, lr=0.01, lambda_rise_epochs=min(3, args.epochs),
                           seed=args.seed), desc=f"{args.bits}-bit N-multipliers")
    acc = evaluate(model, test)
    print(format_report(layer_report(model)))
    print(f"8-bit Brevitas weights: {100 * before:.2f}%; {args.bits}-bit N-multiplier weights: "
          f"{100 * acc:.2f}% (regularizer {hist['reg'][0]:.3g} -> {hist['reg'][-1]:.3g})")
    if args.export:
        from qfv_brevitas.export import export_qonnx

        model.eval()
        res = export_qonnx(model, test.tensors[0][:64], Path(args.export) / "fixed.onnx",
                           "fixed", data=test, overwrite=True)
        print(res.summary())
        return before, acc, hist, res
    return before, acc, hist


if __name__ == "__main__":
    main()
