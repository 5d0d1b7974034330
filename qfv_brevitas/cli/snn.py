"""``qfv snn``: spiking networks with N-multiplier weights (needs the snn extra).

* ``qfv snn train``: a full-precision spiking model and its N-multiplier weight QAT, side by
  side; the checkpoints go to ``qfv faults`` / ``qfv variability`` / ``qfv report`` as they are.
* ``qfv snn neurons CHECKPOINT``: the time handling and LIF parameters of a saved model (JSON).
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

from qfv_brevitas.cli.common import (add_lambda_args, command, command_group, declare_io, integer,
                                     note, seed, show)
from qfv_brevitas.core.config import VARIANTS
from qfv_brevitas.util.errors import QfvError

__all__ = ["run_train", "run_neurons"]

_EVENT_T = 10  # frames per sample on the neuromorphic data sets (paper section 4.2)


def _optional_float(s: str) -> Optional[float]:
    return None if s.lower() == "none" else float(s)


def _optional_int(s: str) -> Optional[int]:
    return None if s.lower() == "none" else integer(s)


command_group("snn", help="spiking networks (LIF neurons) with N-multiplier weights")


@command("snn", "train",
         help="train a float spiking model and its quantized version, report both",
         description="Trains a full-precision spiking model, then QATs its weights at each "
                     "--bits with the regularizer (spikes are the activations). Writes "
                     "results.json, float.pt and {variant}_w{bits}.pt to --out.")
def train(p: argparse.ArgumentParser):
    from qfv_brevitas.core.config import NMultConfig
    from qfv_brevitas.training.train import TrainConfig
    from qfv_brevitas.snn.config import ENCODINGS, SURROGATES, SpikingConfig
    from qfv_brevitas.snn.data import SNN_DATASETS
    from qfv_brevitas.snn.models import SPIKING_MODEL_NAMES

    p.add_argument("--dataset", choices=SNN_DATASETS, default="digits",
                   help="digits/idx: static images, rate-coded inside the model; synthetic: "
                        "small moving-square event tensors; cifar10dvs/ncaltech101: "
                        "spikingjelly's classes on the folder given by --data-dir")
    p.add_argument("--data-dir", help="IDX folder (idx) or spikingjelly dataset root")
    p.add_argument("--model", dest="arch", choices=SPIKING_MODEL_NAMES, default="spiking_small_cnn",
                   help="the spiking model")
    p.add_argument("--T", type=integer, default=None,
                   help=f"time steps (default 4; {_EVENT_T} frames on the neuromorphic sets)")
    p.add_argument("--tau", type=float, default=SpikingConfig.tau,
                   help="membrane time constant (beta=1/tau)")
    p.add_argument("--v-threshold", type=float, default=SpikingConfig.v_threshold,
                   help="membrane potential at which a LIF neuron fires")
    p.add_argument("--v-reset", type=_optional_float, default=SpikingConfig.v_reset,
                   help="reset potential, or 'none' for reset by subtraction")
    p.add_argument("--surrogate", choices=SURROGATES, default=SpikingConfig.surrogate,
                   help="surrogate gradient of the spike function")
    p.add_argument("--encoding", choices=[e for e in ENCODINGS if e != "none"],
                   default=SpikingConfig.encoding,
                   help="how static images become spikes (event data brings its own)")
    p.add_argument("--frame-size", type=integer, default=48,
                   help="neuromorphic frames are resized to this square size")
    p.add_argument("--bits", type=integer, nargs="+", default=[4], help="weight bits of inner layers")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=[NMultConfig.variant],
                   help="quantizers trained, each at each --bits: fixed, step or nmult")
    p.add_argument("--per-channel", action="store_true",
                   help="levels (r, c) per output channel instead of per layer")
    p.add_argument("--first-last-bits", type=_optional_int, default=NMultConfig.first_last_bits,
                   help="weight bits of the first and last layers, or 'none' for --bits")
    p.add_argument("--float-epochs", type=integer, default=12, help="float epochs")
    p.add_argument("--qat-epochs", type=integer, default=6, help="QAT epochs per model")
    p.add_argument("--float-lr", type=float, default=0.1,
                   help="learning rate of the float training")
    p.add_argument("--qat-lr", type=float, default=0.01, help="QAT learning rate of the weights")
    p.add_argument("--quant-lr", type=float, default=TrainConfig.quant_lr,
                   help="learning rate of r, c, step")
    p.add_argument("--quant-optimizer", choices=("adam", "sgd"),
                   default=TrainConfig.quant_optimizer,
                   help="optimizer of r, c, step (the paper's SGD diverges on large layers)")
    add_lambda_args(p, rise=3)
    p.add_argument("--batch-size", type=integer, default=TrainConfig.batch_size,
                   help="training batch size")
    p.add_argument("--seed", type=seed, default=TrainConfig.seed,
                   help="the run's seed: the data split, the initial weights and the "
                        "training order")
    p.add_argument("--out", default="qfv-snn", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also -q)")
    declare_io(p, "run", inputs=("data_dir",))
    return run_train


@command("snn", "neurons", help="time steps, encoding and LIF parameters of a spiking "
                                "checkpoint, as JSON")
def neurons(p: argparse.ArgumentParser):
    p.add_argument("checkpoint", help="a spiking checkpoint written by qfv snn train")
    declare_io(p, None)
    return run_neurons


def run_train(args: argparse.Namespace) -> int:
    from qfv_brevitas.snn import SNNDependencyError, SpikingConfig
    from qfv_brevitas.snn.data import NEUROMORPHIC
    from qfv_brevitas.snn.experiment import format_snn_results, run_snn_experiment
    from qfv_brevitas.training.train import TrainConfig

    if args.dataset == "idx" and not args.data_dir:
        raise QfvError("--dataset idx needs --data-dir DIR (a folder with the IDX files)")
    if args.dataset in NEUROMORPHIC and not args.data_dir:
        raise QfvError(f"--dataset {args.dataset} needs --data-dir DIR: the folder "
                       "spikingjelly manages for it (with events_np/ or download/)")
    T = args.T if args.T is not None else (_EVENT_T if args.dataset in NEUROMORPHIC else 4)
    snn = SpikingConfig(T=T, tau=args.tau, v_threshold=args.v_threshold, v_reset=args.v_reset,
                        surrogate=args.surrogate, encoding=args.encoding)
    fp = TrainConfig(epochs=args.float_epochs, lr=args.float_lr, batch_size=args.batch_size,
                     seed=args.seed)
    q = TrainConfig(epochs=args.qat_epochs, lr=args.qat_lr, quant_lr=args.quant_lr,
                    quant_optimizer=args.quant_optimizer, batch_size=args.batch_size,
                    seed=args.seed, lambda_start=args.lambda_start, lambda_end=args.lambda_end,
                    lambda_rise_epochs=min(args.lambda_rise_epochs, args.qat_epochs))
    try:
        results = run_snn_experiment(
            args.out, dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, snn=snn,
            bits=args.bits, variant=args.variants, per_channel=args.per_channel,
            first_last_bits=args.first_last_bits, fp_train=fp, q_train=q, seed=args.seed,
            frame_size=args.frame_size, progress=not args.no_progress, overwrite=args.force)
    except SNNDependencyError as e:  # an install hint, not a traceback
        raise QfvError(str(e)) from e
    show(format_snn_results(results))
    names = ", ".join(f"{args.out}/{r['variant']}_w{r['weight_bits']}.pt"
                      for r in results["runs"])
    note(f"\nwrote {args.out}/results.json, {args.out}/float.pt, {names} "
          f"({results['seconds']:.0f} s)")
    if args.dataset in ("digits", "idx"):
        note(f"next: qfv faults eval {args.out}/{results['runs'][0]['variant']}_w"
              f"{results['runs'][0]['weight_bits']}.pt --dataset {args.dataset}"
              + (f" --data-dir {args.data_dir}" if args.data_dir else ""))
    return 0


def run_neurons(args: argparse.Namespace) -> int:
    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.snn import SNNDependencyError, snn_export_metadata

    try:
        model, info = load_checkpoint(args.checkpoint)
    except SNNDependencyError as e:
        raise QfvError(str(e)) from e
    if not info["arch"].startswith("spiking_"):
        raise QfvError(f"{args.checkpoint} holds a non-spiking model ({info['arch']}); "
                       "train a spiking one with qfv snn train")
    show(json.dumps(snn_export_metadata(model), indent=2))
    return 0
