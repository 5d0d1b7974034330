"""``qfv demo``, ``qfv train`` and ``qfv report``: QAT runs and what a checkpoint holds."""
from __future__ import annotations

import argparse

from qfv_brevitas.cli.common import (add_dataset_args, add_lambda_args, add_reg_args, command,
                                     declare_io, frac_bits_arg, integer, note, seed, show)
from qfv_brevitas.core.config import FORWARD_MODES, INITS, VARIANTS
from qfv_brevitas.util.errors import QfvError

__all__ = ["IDX_FP_EPOCHS", "IDX_Q_EPOCHS", "IDX_BATCH"]

#: ``qfv train --dataset idx`` defaults (60,000 28x28 images): about a minute per epoch of the
#: SmallCNN on 2 CPU cores, so the six QAT models and the float model finish in well under an
#: hour (BENCHMARKS.md, "Progress and defaults"); pass --float-epochs/--qat-epochs for more.
IDX_FP_EPOCHS, IDX_Q_EPOCHS, IDX_BATCH = 3, 2, 128


def _train_args(p: argparse.ArgumentParser) -> None:
    from qfv_brevitas.cli.usercode import MODEL_HELP, LateChoices, model_arg, model_names
    from qfv_brevitas.core.config import NMultConfig
    from qfv_brevitas.training.train import TrainConfig

    add_dataset_args(p)
    p.add_argument("--model", dest="arch", type=model_arg, default="small_cnn",
                   action=LateChoices, names=model_names, specs=True,
                   metavar="NAME|MODULE:FUNCTION", help=MODEL_HELP)
    p.add_argument("--bits", type=integer, nargs="+", default=[4, 3],
                   help="weight and activation bits of the inner layers (W{b}A{b})")
    p.add_argument("--variants", nargs="+", default=list(("fixed", "step", "nmult")),
                   choices=VARIANTS, help="quantizers trained, each at each --bits: fixed "
                   "(uniform levels), step (learned step), nmult (learned N-multiplier levels)")
    p.add_argument("--forward-mode", default=NMultConfig.mode, choices=FORWARD_MODES,
                   help="paper: float weights in training, snapped in eval; ste: snapped "
                        "with a straight-through gradient; both: STE plus the regularizer")
    p.add_argument("--init", default=NMultConfig.init, choices=INITS,
                   help="initial levels: lsq (LSQ's uniform grid), uniform (best-MSE uniform "
                        "grid) or fit (levels fitted to the float weights); default: fit for "
                        "nmult, lsq for step and fixed")
    p.add_argument("--refit-every", type=integer, default=TrainConfig.refit_every,
                   help="QAT: refit the levels to the weights every this many steps (0 = off)")
    p.add_argument("--per-channel", action="store_true",
                   help="levels (r, c) per output channel instead of per layer")
    p.add_argument("--frac-bits", type=frac_bits_arg, default=None, metavar="{auto,0..20}",
                   help="train on the integer view: r and c on the grid m * 2**-f (auto: the "
                        "smallest f within 1%% of the levels' squared error), every level an "
                        "integer times 2**-f; exports to the fixed form exactly")
    p.add_argument("--float-epochs", type=integer, default=None,
                   help="float epochs (default 30 on digits, 3 on IDX data)")
    p.add_argument("--qat-epochs", type=integer, default=None,
                   help="QAT epochs per model (default 15 on digits, 2 on IDX data)")
    p.add_argument("--float-lr", type=float, default=TrainConfig.lr,
                   help="learning rate of the float training")
    p.add_argument("--qat-lr", type=float, default=0.01, help="QAT learning rate of the weights")
    p.add_argument("--quant-lr", type=float, default=TrainConfig.quant_lr,
                   help="learning rate of r, c, step")
    p.add_argument("--quant-optimizer", choices=("adam", "sgd"),
                   default=TrainConfig.quant_optimizer,
                   help="optimizer of r, c, step (the paper's SGD diverges on large layers)")
    add_lambda_args(p, rise=5)
    add_reg_args(p)
    p.add_argument("--batch-size", type=integer, default=None,
                   help="training batch (default 64 on digits, 128 on IDX data)")
    p.add_argument("--seed", type=seed, default=TrainConfig.seed,
                   help="the run's seed: the data split, the initial weights and the "
                        "training order")
    p.add_argument("--out", default="qfv-out", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also -q)")
    declare_io(p, "run", inputs=("data_dir",))


@command("demo", help="float vs fixed/learned-step/N-multiplier QAT on digits")
def demo(p: argparse.ArgumentParser):
    _train_args(p)
    return run_train


@command("train", help="the same job on any dataset (digits or IDX files)")
def train(p: argparse.ArgumentParser):
    _train_args(p)
    return run_train


@command("report", help="per-layer bits, r, c, levels and weight distances")
def report(p: argparse.ArgumentParser):
    from qfv_brevitas.cli.usercode import add_allow_import

    p.add_argument("checkpoint", help="a model saved by qfv demo/train/quantize or a fine-tune")
    add_allow_import(p)
    declare_io(p, None)
    return run_report


def run_train(args) -> int:
    """``qfv demo`` / ``qfv train``."""
    from qfv_brevitas.training.train import TrainConfig
    from qfv_brevitas.studies.experiment import format_results, run_experiment

    if args.dataset == "idx" and not args.data_dir:
        raise QfvError("--dataset idx needs --data-dir DIR (a folder with the IDX files)")
    idx = args.dataset == "idx"
    fp_epochs = args.float_epochs if args.float_epochs is not None else \
        (IDX_FP_EPOCHS if idx else 30)
    q_epochs = args.qat_epochs if args.qat_epochs is not None else (IDX_Q_EPOCHS if idx else 15)
    batch = args.batch_size if args.batch_size is not None else (IDX_BATCH if idx else 64)
    args.qat_epochs = q_epochs
    fp = TrainConfig(epochs=fp_epochs, lr=args.float_lr, batch_size=batch, seed=args.seed)
    q = TrainConfig(epochs=q_epochs, lr=args.qat_lr, quant_lr=args.quant_lr,
                    quant_optimizer=args.quant_optimizer,
                    batch_size=batch, seed=args.seed, lambda_start=args.lambda_start,
                    lambda_end=args.lambda_end,
                    lambda_rise_epochs=min(args.lambda_rise_epochs, args.qat_epochs),
                    reg_shape=args.reg_shape, reg_width=args.reg_width, sam_rho=args.sam_rho,
                    refit_every=args.refit_every)
    results = run_experiment(args.out, dataset=args.dataset, data_dir=args.data_dir,
                             arch=args.arch, bits=args.bits, variants=args.variants,
                             mode=args.forward_mode, per_channel=args.per_channel, fp_train=fp,
                             q_train=q, seed=args.seed, progress=not args.no_progress,
                             device=args.device, threads=args.threads,
                             overwrite=args.force, init=args.init, frac_bits=args.frac_bits)
    show(format_results(results))
    note(f"\nwrote {args.out}/results.json, {args.out}/levels.png, levels_fit_*.png and "
          f"checkpoints ({results['seconds']:.0f} s)")
    return 0


def run_report(args) -> int:
    """``qfv report``."""
    from qfv_brevitas.cli.usercode import import_permission
    from qfv_brevitas.core.snapping import format_report, layer_report
    from qfv_brevitas.zoo.checkpoint import load_checkpoint

    model, info = load_checkpoint(args.checkpoint, import_permission(args))
    if info["config"] is None:
        show(f"{args.checkpoint}: a float model ({info['arch']}), no quantized layers")
        return 0
    show(format_report(layer_report(model)))
    return 0
