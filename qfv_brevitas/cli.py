"""The ``qfv`` command."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import MODES, VARIANTS

__all__ = ["main", "build_parser"]


def _add_train_args(p: argparse.ArgumentParser, quick_default: bool = False) -> None:
    p.add_argument("--dataset", choices=("digits", "idx"), default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits; idx: MNIST-family IDX files")
    p.add_argument("--data-dir", help="folder with the IDX files (for --dataset idx)")
    p.add_argument("--arch", default="small_cnn", choices=("small_cnn", "mlp", "resnet18", "vgg"))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3],
                   help="weight and activation bits of the inner layers (W{b}A{b})")
    p.add_argument("--variants", nargs="+", default=list(("fixed", "step", "nmult")),
                   choices=VARIANTS)
    p.add_argument("--mode", default="paper", choices=MODES)
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--fp-epochs", type=int, default=30)
    p.add_argument("--q-epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05, help="float training learning rate")
    p.add_argument("--q-lr", type=float, default=0.01, help="QAT learning rate of the weights")
    p.add_argument("--quant-lr", type=float, default=1e-4, help="learning rate of r, c, step")
    p.add_argument("--quant-optimizer", choices=("adam", "sgd"), default="adam",
                   help="optimizer of r, c, step (the paper's SGD diverges on large layers)")
    p.add_argument("--lambda-start", type=float, default=100.0)
    p.add_argument("--lambda-end", type=float, default=2000.0)
    p.add_argument("--lambda-rise-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="qfv-out", help="output folder")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qfv", description="Quantization-, fault- and variability-aware training for Brevitas")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="float vs fixed/learned-step/N-multiplier QAT on digits")
    _add_train_args(demo)
    train = sub.add_parser("train", help="the same job on any dataset (digits or IDX files)")
    _add_train_args(train)
    rep = sub.add_parser("report", help="per-layer bits, r, c, levels and weight distances")
    rep.add_argument("checkpoint")
    return parser


def _run_train(args) -> int:
    from .experiment import format_results, run_experiment
    from .train import TrainConfig

    if args.dataset == "idx" and not args.data_dir:
        raise SystemExit("qfv: --dataset idx needs --data-dir DIR (a folder with the IDX files)")
    fp = TrainConfig(epochs=args.fp_epochs, lr=args.lr, batch_size=args.batch_size,
                     seed=args.seed)
    q = TrainConfig(epochs=args.q_epochs, lr=args.q_lr, quant_lr=args.quant_lr,
                    quant_optimizer=args.quant_optimizer,
                    batch_size=args.batch_size, seed=args.seed, lambda_start=args.lambda_start,
                    lambda_end=args.lambda_end,
                    lambda_rise_epochs=min(args.lambda_rise_epochs, args.q_epochs))
    results = run_experiment(args.out, dataset=args.dataset, data_dir=args.data_dir,
                             arch=args.arch, bits=args.bits, variants=args.variants,
                             mode=args.mode, per_channel=args.per_channel, fp_train=fp,
                             q_train=q, seed=args.seed, progress=not args.no_progress)
    print(format_results(results))
    print(f"\nwrote {args.out}/results.json, {args.out}/levels.png and checkpoints "
          f"({results['seconds']:.0f} s)")
    return 0


def _run_report(args) -> int:
    from .checkpoint import load_checkpoint
    from .deploy import format_report, layer_report

    model, info = load_checkpoint(args.checkpoint)
    if info["config"] is None:
        print(f"{args.checkpoint}: a float model ({info['arch']}), no quantized layers")
        return 0
    print(format_report(layer_report(model)))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("demo", "train"):
            return _run_train(args)
        if args.command == "report":
            return _run_report(args)
    except ValueError as e:  # our validation errors: say what is wrong, no traceback
        print(f"qfv {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
