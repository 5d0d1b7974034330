"""User story: make my own small network spiking, quantize its weights to 4 bits, and see how
it holds up on a faulty chip.

A plain torch CNN (ReLU, max-pooling, BatchNorm) becomes a spiking network with `to_spiking`
(ReLU -> LIF neurons with beta = 0.25, max-pooling -> average pooling), trained on the bundled
digits rate-coded into T spike frames. The usual `quantize_model` call then gives its synaptic
layers 4-bit N-multiplier weights (spikes are the activations, so `act_bits=None`), trained
with the regularizer. Last, a Monte Carlo over stuck-at fault maps, as for any model.

    python examples/snn_digits.py --T 4 --epochs 12 --qat-epochs 6
"""
import argparse
import copy
import json

import torch
from torch import nn

from qfv_brevitas import NMultConfig, SpikingConfig, quantize_model, to_spiking
from qfv_brevitas.snn import snn_export_metadata
from qfv_brevitas.studies import evaluate_faults
from qfv_brevitas.zoo.data import load_digits_split
from qfv_brevitas.training.train import TrainConfig, evaluate, fit


class MyNet(nn.Module):
    """Any plain network with nn.ReLU modules; BatchNorm before each ReLU keeps the neurons
    firing from the start."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()  # used twice: each call is a full time sequence, so that is fine
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--T", type=int, default=4, help="time steps per image")
    p.add_argument("--epochs", type=int, default=12, help="full-precision epochs")
    p.add_argument("--qat-epochs", type=int, default=6, help="4-bit QAT epochs")
    p.add_argument("--rate", type=float, default=0.1, help="bit-fault rate to evaluate")
    p.add_argument("--trials", type=int, default=5)
    args = p.parse_args(argv)
    train, test = load_digits_split(0)
    torch.manual_seed(0)

    snn = to_spiking(MyNet(), SpikingConfig(T=args.T))  # takes (N, 1, 8, 8) images in [0, 1]
    fit(snn, train, test, TrainConfig(epochs=args.epochs, lr=0.1), desc="float spiking")
    fp_acc = evaluate(snn, test)

    q = quantize_model(copy.deepcopy(snn), NMultConfig(weight_bits=4, act_bits=None))
    fit(q, train, test, TrainConfig(epochs=args.qat_epochs, lr=0.01,
                                    lambda_rise_epochs=max(1, args.qat_epochs // 2)), desc="W4")
    w4_acc = evaluate(q, test)

    faults = evaluate_faults(q, test, [args.rate], trials=args.trials, seed=0, progress=False)
    faulty = sum(r["acc"] for r in faults.rows) / len(faults.rows)
    print(f"spiking, T={args.T}: float {100 * fp_acc:.2f}% | W4 {100 * w4_acc:.2f}% | W4 on "
          f"chips with {100 * args.rate:g}% stuck bits (inner layers): {100 * faulty:.2f}% "
          f"(mean of {args.trials})")
    print("neurons:", json.dumps(snn_export_metadata(q)["lif_layers"]["body.relu"]))
    return fp_acc, w4_acc, faulty


if __name__ == "__main__":
    main()
