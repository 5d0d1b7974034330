"""User story: give an existing Brevitas model N-multiplier weights.

The model is a Brevitas CNN as a user would have it: QuantConv2d/QuantLinear with Brevitas'
8-bit weight quantizer and 4-bit QuantReLU activations, trained as is on the bundled digits.
Then only the weight quantizer of each layer is swapped in place (layers, activation
quantizers and weights stay), the levels start from the current weights, and the model is
fine-tuned with the regularizer. The same call works on FINN's bnn_pynq models
(``model_with_cfg("CNV_1W2A", pretrained=False)``); see the README.

    python examples/quantize_brevitas_model.py --epochs 10
"""
import argparse

import brevitas.nn as qnn
import torch
from torch import nn

from qfv_brevitas import NMultConfig, format_report, layer_report, swap_weight_quant
from qfv_brevitas.zoo.data import load_digits_split
from qfv_brevitas.training.train import TrainConfig, evaluate, fit


def brevitas_cnn(act_bits: int = 4) -> nn.Module:
    return nn.Sequential(
        qnn.QuantIdentity(bit_width=8),
        qnn.QuantConv2d(1, 16, 3, padding=1, bias=False, weight_bit_width=8),
        nn.BatchNorm2d(16), qnn.QuantReLU(bit_width=act_bits),
        qnn.QuantConv2d(16, 32, 3, padding=1, bias=False, weight_bit_width=8),
        nn.BatchNorm2d(32), qnn.QuantReLU(bit_width=act_bits), nn.MaxPool2d(2),
        nn.Flatten(), qnn.QuantLinear(32 * 16, 64, bias=True, weight_bit_width=8),
        qnn.QuantReLU(bit_width=act_bits), qnn.QuantLinear(64, 10, bias=True, weight_bit_width=8))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--bits", type=int, default=3, help="weight bits after the swap")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    train, test = load_digits_split(args.seed)
    model = brevitas_cnn()
    fit(model, train, test, TrainConfig(epochs=args.epochs, lr=0.05, seed=args.seed),
        desc="Brevitas model as is")
    before = evaluate(model, test)
    swap_weight_quant(model, NMultConfig(weight_bits=args.bits, variant="nmult"))
    hist = fit(model, train, test,
               TrainConfig(epochs=args.epochs, lr=0.01, lambda_rise_epochs=min(3, args.epochs),
                           seed=args.seed), desc=f"{args.bits}-bit N-multipliers")
    acc = evaluate(model, test)
    print(format_report(layer_report(model)))
    print(f"8-bit Brevitas weights: {100 * before:.2f}%; {args.bits}-bit N-multiplier weights: "
          f"{100 * acc:.2f}% (regularizer {hist['reg'][0]:.3g} -> {hist['reg'][-1]:.3g})")
    return before, acc, hist


if __name__ == "__main__":
    main()
