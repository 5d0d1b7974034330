"""User story: a small language model on real text, quantized and put on an imperfect chip.

The project's small transformer (or, with --hf llama / gpt_neox and the `llm` extra, a Hugging
Face decoder built from a config) learns next-byte prediction on the running Python's own
standard-library sources. Then, scored in validation bits per byte (lower is better):
  1. post-training quantization at --ptq-bits: fitted N-multiplier levels against Brevitas'
     uniform MSE-scale quantizer, each alone and with Brevitas' GPTQ (per output channel;
     embedding and LM head at 8 bits);
  2. a short quantization-aware fine-tune at --qat-bits: the regularizer in its paper
     (paper) and STE (both) modes against stock Brevitas QAT, same steps and data order;
  3. the fitted W4 model on a chip with stuck bits (Monte Carlo over maps), and the
     fault-aware repair of one chip's map.

    python examples/transformer_lm.py --steps 2000
"""
import argparse

import torch

from qfv_brevitas.studies.lm import (LMRecipe, chip_sweep_lm, fault_repair_lm, ptq_lm, qat_lm,
                                     train_lm)
from qfv_brevitas.training.lm import evaluate_bpb
from qfv_brevitas.zoo.data import load_stdlib_text
from qfv_brevitas.zoo.lm import TinyLM, hf_byte_lm


def build(args):
    if args.hf:
        return hf_byte_lm(args.hf, dim=args.dim, layers=args.layers, heads=args.heads,
                          context=args.context, seed=args.seed)
    torch.manual_seed(args.seed)
    return TinyLM(dim=args.dim, layers=args.layers, heads=args.heads, context=args.context)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="float training steps (batch 32)")
    p.add_argument("--lr", type=float, default=4e-3, help="float training learning rate")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--context", type=int, default=64, help="bytes per window")
    p.add_argument("--hf", choices=("llama", "gpt_neox"), help="a Hugging Face model instead")
    p.add_argument("--val-bytes", type=int, default=1 << 17, help="validation bytes scored")
    p.add_argument("--ptq-bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--qat-bits", type=int, default=3)
    p.add_argument("--qat-steps", type=int, default=300)
    p.add_argument("--fault-rates", type=float, nargs="+", default=[0.0, 0.01, 0.05])
    p.add_argument("--trials", type=int, default=3, help="fault maps per rate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    train, val, fp = load_stdlib_text(args.context, 32 * args.steps,
                                      val_bytes=args.val_bytes, seed=args.seed)
    print(f"corpus: {len(train)} training windows, {len(val)} validation windows "
          f"(fingerprint {fp[:12]})")
    model = build(args)
    train_lm(model, train, val, LMRecipe(epochs=1, lr=args.lr, seed=args.seed))
    out = {"float": evaluate_bpb(model, val), "ptq": {}, "qat": {}}
    print(f"float model: {out['float']:.3f} bits/byte")

    for bits in args.ptq_bits:
        for comp in (None, "gptq"):
            r = ptq_lm(model, train, val, bits, compensation=comp)
            out["ptq"][(bits, comp)] = (r.acc, r.baseline_acc)
            print(f"PTQ W{bits}{' + GPTQ' if comp else ''}: fitted {r.acc:.3f} | "
                  f"Brevitas uniform (MSE scale) {r.baseline_acc:.3f} bits/byte")

    qat_train, _, _ = load_stdlib_text(args.context, 32 * args.qat_steps // 2,
                                       val_bytes=args.val_bytes, seed=args.seed + 1)
    for method in ("paper", "both", "brevitas"):
        q, _ = qat_lm(model, qat_train, val, args.qat_bits, method,
                      LMRecipe(epochs=2, lr=1e-3, seed=args.seed))
        out["qat"][method] = evaluate_bpb(q, val)
        print(f"QAT W{args.qat_bits} {method}: {out['qat'][method]:.3f} bits/byte")

    w4 = ptq_lm(model, train, val, 4, baseline=None).model
    out["faults"] = chip_sweep_lm(w4, val, "faults", args.fault_rates, args.trials,
                                  seed=args.seed)
    for row in out["faults"]:
        print(f"W4 with {100 * row['level']:g}% stuck bits: {row['mean']:.3f} "
              f"+- {row['std']:.3f} bits/byte over {row['trials']} maps")
    rate = max(args.fault_rates)
    out["repair"] = fault_repair_lm(w4, qat_train, val, rate, seed=args.seed,
                                    recipe=LMRecipe(epochs=1, lr=3e-4, seed=args.seed))
    r = out["repair"]
    print(f"one chip at {100 * rate:g}% stuck bits: naive {r['naive']:.3f}, nearest valid "
          f"level {r['aware']:.3f}, fault-aware fine-tune {r['repaired']:.3f} "
          f"(ideal {r['ideal']:.3f}) bits/byte")
    return out


if __name__ == "__main__":
    main()
