"""User story: fine-tune a quantized model for one chip's stuck-at fault map.

A W4A4 N-multiplier model is trained on the bundled digits (or loaded with --checkpoint, e.g.
from `qfv demo`). The chip's fault map comes from a file (--map, e.g. measured by a test of the
chip) or is drawn at --rate with --seed. The model is then deployed three ways on that chip:
as is, with nearest-valid-level mapping, and after fault-aware fine-tuning (eq. 11 + remapping).

    python examples/finetune_for_chip.py --rate 0.1 --seed 7
"""
import argparse
import copy

import torch

from qfv_brevitas import (FaultMap, FaultModel, NMultConfig, attach_faults, fault_aware_finetune,
                          quantize_model, sample_fault_map, set_deploy_mapping)
from qfv_brevitas.zoo.checkpoint import load_checkpoint
from qfv_brevitas.zoo.data import load_digits_split
from qfv_brevitas.studies.scenario import edge_layers
from qfv_brevitas.zoo.models import SmallCNN
from qfv_brevitas.training.train import TrainConfig, evaluate, fit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", help="a quantized model saved by qfv demo/train")
    p.add_argument("--map", help="the chip's fault map file")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--epochs", type=int, default=20, help="float and QAT epochs")
    p.add_argument("--finetune-epochs", type=int, default=4)
    args = p.parse_args(argv)
    if args.checkpoint:
        model, info = load_checkpoint(args.checkpoint)
        # The test split the model was trained against (qfv demo records its seed).
        train, test = load_digits_split(int((info["meta"] or {}).get("data_seed", 0)))
    else:
        train, test = load_digits_split(0)
        torch.manual_seed(0)
        fp = SmallCNN(1, 10)
        fit(fp, train, test, TrainConfig(epochs=args.epochs, lr=0.05), desc="float")
        model = quantize_model(fp, NMultConfig(weight_bits=4, act_bits=4),
                               example_input=train.tensors[0][:256])
        fit(model, train, test, TrainConfig(epochs=max(args.epochs // 2, 1), lr=0.01,
                                            lambda_rise_epochs=min(5, args.epochs // 2 or 1)),
            desc="QAT W4A4")
    ideal = evaluate(model, test)
    if args.map:
        chip = FaultMap.load(args.map)
    else:  # first/last (8-bit) layers fault-free, as in the paper's setup
        chip = sample_fault_map(model, FaultModel(rate=args.rate, seed=args.seed,
                                                  layer_rates={n: 0.0 for n in edge_layers(model)}))
    attach_faults(model, chip)
    as_is = evaluate(model, test)
    mapped = copy.deepcopy(model)
    set_deploy_mapping(mapped, "aware")
    nearest_valid = evaluate(mapped, test)
    fault_aware_finetune(model, train, test, TrainConfig(epochs=args.finetune_epochs, lr=0.005,
                                                         lambda_rise_epochs=2))
    repaired = evaluate(model, test)
    print(f"ideal chip {100 * ideal:.2f}% | this chip ({100 * chip.stuck_fraction():.1f}% stuck "
          f"cells): as is {100 * as_is:.2f}%, nearest-valid mapping {100 * nearest_valid:.2f}%, "
          f"fault-aware fine-tune {100 * repaired:.2f}%")
    return ideal, as_is, nearest_valid, repaired


if __name__ == "__main__":
    main()
