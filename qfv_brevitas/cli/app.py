"""The ``qfv`` command."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import List, Optional, Sequence

from qfv_brevitas.core.config import INITS, MODES, VARIANTS

__all__ = ["main", "build_parser"]


def _add_train_args(p: argparse.ArgumentParser, quick_default: bool = False) -> None:
    from qfv_brevitas.core.train import TrainConfig

    p.add_argument("--dataset", choices=("digits", "idx"), default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits; idx: MNIST-family IDX files")
    p.add_argument("--data-dir", help="folder with the IDX files (for --dataset idx)")
    p.add_argument("--arch", default="small_cnn", choices=("small_cnn", "mlp", "resnet18", "vgg"))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3],
                   help="weight and activation bits of the inner layers (W{b}A{b})")
    p.add_argument("--variants", nargs="+", default=list(("fixed", "step", "nmult")),
                   choices=VARIANTS)
    p.add_argument("--mode", default="paper", choices=MODES)
    p.add_argument("--init", default=None, choices=INITS,
                   help="initial levels: lsq (LSQ's uniform grid), uniform (best-MSE uniform "
                        "grid) or fit (levels fitted to the float weights); default: fit for "
                        "nmult, lsq for step and fixed")
    p.add_argument("--refit-every", type=int, default=TrainConfig.refit_every,
                   help="QAT: refit the levels to the weights every this many steps (0 = off)")
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--fp-epochs", type=int, default=None,
                   help="float epochs (default 30 on digits, 3 on IDX data)")
    p.add_argument("--q-epochs", type=int, default=None,
                   help="QAT epochs per model (default 15 on digits, 2 on IDX data)")
    p.add_argument("--lr", type=float, default=0.05, help="float training learning rate")
    p.add_argument("--q-lr", type=float, default=0.01, help="QAT learning rate of the weights")
    p.add_argument("--quant-lr", type=float, default=1e-4, help="learning rate of r, c, step")
    p.add_argument("--quant-optimizer", choices=("adam", "sgd"), default="adam",
                   help="optimizer of r, c, step (the paper's SGD diverges on large layers)")
    p.add_argument("--lambda-start", type=float, default=100.0)
    p.add_argument("--lambda-end", type=float, default=2000.0)
    p.add_argument("--lambda-rise-epochs", type=int, default=5)
    _add_reg_args(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch (default 64 on digits, 128 on IDX data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="qfv-out", help="output folder")
    p.add_argument("--no-progress", action="store_true")
    declare_io(p, "run", inputs=("data_dir",))


def declare_io(p: argparse.ArgumentParser, out: Optional[str],
               names: Sequence[str] = (), inputs: Sequence[str] = ("checkpoint",)) -> None:
    """Declare what a subcommand reads and writes, for the checks :func:`main` runs before
    any work (a command module calls this beside its own ``add_argument`` calls).

    ``inputs``: argument names (dests) holding input paths. ``out``: what ``--out`` is:
    ``"file"`` (one file), ``"run"`` (a run folder replaced whole), ``"crossbar"`` (a crossbar
    folder replaced whole), ``"results"`` (a folder receiving the files ``names``), or None
    (the command writes nothing). With an output, ``--force`` is added: an existing output is
    replaced only with it; an output that is one of the inputs is always refused. A command
    whose ``--out`` is optional names its default with ``set_defaults(_io_default_out=f)``,
    ``f(args) -> path``, so that the default is checked the same way.
    """
    if out is not None:
        p.add_argument("--force", action="store_true",
                       help="replace an existing output (it is never one of the inputs)")
    p.set_defaults(_io_out=out, _io_names=tuple(names), _io_inputs=tuple(inputs))


def _check_io(args) -> None:
    """The declared output of ``args`` (see :func:`declare_io`) may be written: not an input,
    not existing unless --force, its folder writable. Raises OutputError naming it."""
    from qfv_brevitas.util.safeio import check_output

    kind = getattr(args, "_io_out", None)
    if kind is None:
        return
    if getattr(args, "out", None) is None and getattr(args, "_io_default_out", None):
        args.out = args._io_default_out(args)  # an output named after the input
    inputs = [getattr(args, d) for d in getattr(args, "_io_inputs", ())
              if getattr(args, d, None)]
    force = bool(getattr(args, "force", False))
    if kind == "file":
        check_output(args.out, overwrite=force, inputs=inputs)
    elif kind == "run":
        from qfv_brevitas.studies.experiment import not_a_run_folder

        check_output(args.out, overwrite=force, inputs=inputs, kind="dir",
                     replaceable=not_a_run_folder)
    elif kind == "crossbar":
        from qfv_brevitas.export.crossbar import not_a_crossbar_folder

        check_output(args.out, overwrite=force, inputs=inputs, kind="dir",
                     replaceable=not_a_crossbar_folder)
    elif kind == "results":
        from pathlib import Path

        from qfv_brevitas.util.errors import OutputError

        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise OutputError(f"output folder {args.out} exists and is not a folder")
        for name in args._io_names:
            check_output(Path(args.out) / name, overwrite=force, inputs=inputs)


def _add_reg_args(p: argparse.ArgumentParser) -> None:
    from qfv_brevitas.core.distance import DEFAULT_WIDTH, SHAPES

    p.add_argument("--reg-shape", choices=SHAPES, default="sq",
                   help="regularizer shape: sq (paper), gauss (Gaussian well), sin (SinReQ)")
    p.add_argument("--reg-width", type=float, default=DEFAULT_WIDTH,
                   help="gauss: sigma as a fraction of the local level spacing")
    p.add_argument("--sam-rho", type=float, default=0.0,
                   help="SAM radius (FlatENN's sharpness-aware quantization); 0 = off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qfv", description="Quantization-, fault- and variability-aware training for Brevitas",
        epilog="Exit status: 0 done; 1 a check found a difference (qfv verify, or an export "
               "that did not verify: nothing written); 2 bad input (argument, file, data); "
               "3 output refused (exists without --force, is an input, not writable); "
               "4 system error while working (disk full, I/O): outputs unchanged; "
               "130 interrupted (Ctrl-C, SIGTERM): outputs unchanged.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: QFV_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="float vs fixed/learned-step/N-multiplier QAT on digits")
    _add_train_args(demo)
    train = sub.add_parser("train", help="the same job on any dataset (digits or IDX files)")
    _add_train_args(train)
    rep = sub.add_parser("report", help="per-layer bits, r, c, levels and weight distances")
    rep.add_argument("checkpoint")
    declare_io(rep, None)
    _add_device_commands(sub)
    # Command groups that live beside their own module: each ``register(sub)`` adds its
    # subcommands and sets ``_run`` (a function of the parsed args returning the exit status).
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    _add_run_args(parser)
    return parser


#: modules (relative to the package) that add ``qfv`` subcommands through ``register(sub)``
_COMMAND_MODULES: List[str] = ["export", "snn", "methods", "quantize"]


def _result_names(name: str, kinds: Sequence[str] = ("csv", "json", "png")) -> List[str]:
    return [f"{name}.{k}" for k in kinds]


def _add_device_commands(sub) -> None:
    from qfv_brevitas.studies.montecarlo import FAULT_METHODS, VARIABILITY_METHODS

    def common(p, out_default, kind, names=(), inputs=("checkpoint", "data_dir")):
        declare_io(p, kind, names, inputs)
        p.add_argument("checkpoint", help="a model saved by qfv demo/train (or a fine-tune)")
        p.add_argument("--dataset", choices=("digits", "idx"), default="digits")
        p.add_argument("--data-dir")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the maps (the data split is the checkpoint's own)")
        p.add_argument("--out", default=out_default)
        p.add_argument("--layers", choices=("inner", "all"), default="inner",
                       help="inner: first and last (8-bit) layers stay ideal (paper setup); "
                            "all: every quantized layer is on the imperfect device")
        p.add_argument("--no-progress", action="store_true")

    def finetune_args(p):
        p.add_argument("--epochs", type=int, default=4)
        p.add_argument("--lr", type=float, default=0.005)
        p.add_argument("--lambda-rise-epochs", type=int, default=2)
        _add_reg_args(p)

    f = sub.add_parser("faults", help="stuck-at bit faults: sample, evaluate, fine-tune, compare")
    fsub = f.add_subparsers(dest="action", required=True)
    p = fsub.add_parser("sample", help="draw a fault map for a model and save it")
    common(p, "faultmap.pt", "file")
    p.add_argument("--rate", type=float, required=True, help="fraction of stuck bit cells")
    p.add_argument("--sa1-fraction", type=float, default=0.5)
    p = fsub.add_parser("eval", help="Monte Carlo accuracy over random fault maps")
    common(p, "qfv-faults", "results", _result_names("faults_eval"))
    p.add_argument("--rates", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--mapping", choices=("naive", "aware"), default="naive",
                   help="aware = nearest-valid-level mapping")
    p.add_argument("--sa1-fraction", type=float, default=0.5)
    p = fsub.add_parser("finetune", help="fit a model to one chip's fault map")
    common(p, "finetuned.pt", "file", inputs=("checkpoint", "data_dir", "map"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--map", help="a fault map file (e.g. measured on the chip)")
    g.add_argument("--rate", type=float, help="draw a map at this rate (with --seed)")
    p.add_argument("--sa1-fraction", type=float, default=0.5)
    p.add_argument("--method", choices=("fault_aware", "nearest_valid", "chip_in_loop"),
                   default="fault_aware")
    p.add_argument("--remap-every", type=int, default=4)
    finetune_args(p)
    p = fsub.add_parser("compare", help="methods side by side on the same random maps")
    common(p, "qfv-faults", "results", _result_names("faults_compare"))
    p.add_argument("--rates", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--methods", nargs="+", choices=FAULT_METHODS,
                   default=["none", "nearest_valid", "fault_aware"])
    p.add_argument("--sa1-fraction", type=float, default=0.5)
    p.add_argument("--remap-every", type=int, default=4)
    finetune_args(p)

    v = sub.add_parser("variability", help="per-bit device variability: sample, evaluate, "
                                           "fine-tune, compare")
    vsub = v.add_subparsers(dest="action", required=True)

    def var_args(p):
        p.add_argument("--hrs-on-off", type=float, help="model HRS too: LRS/HRS on/off ratio")
        p.add_argument("--distribution", choices=("normal", "lognormal"), default="normal")
        p.add_argument("--chip-sigma", type=float, default=0.0,
                       help="between-chip component shared by every cell of a chip")
        p.add_argument("--layer-shared-sigma", type=float, default=0.0,
                       help="component shared by every cell of a layer")
        p.add_argument("--devices-per-chip", type=int, default=1,
                       help="eval/compare: trials in groups of this many device maps per chip")

    p = vsub.add_parser("sample", help="draw a variability map for a model and save it")
    common(p, "varmap.pt", "file")
    p.add_argument("--sigma", type=float, required=True, help="sigma/mu of the LRS cells")
    var_args(p)
    p = vsub.add_parser("eval", help="Monte Carlo accuracy over random variability maps")
    common(p, "qfv-variability", "results", _result_names("variability_eval"))
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.1, 0.2, 0.4])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--mapping", choices=("naive", "aware"), default="naive")
    var_args(p)
    p = vsub.add_parser("finetune", help="fit a model to one chip's variability map")
    common(p, "finetuned.pt", "file", inputs=("checkpoint", "data_dir", "map"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--map", help="a variability map file (a characterised chip)")
    g.add_argument("--sigma", type=float, help="draw a map at this sigma/mu (with --seed)")
    var_args(p)
    p.add_argument("--method", choices=("variability_aware", "chip_in_loop"),
                   default="variability_aware")
    finetune_args(p)
    p = vsub.add_parser("compare", help="methods side by side on the same random maps")
    common(p, "qfv-variability", "results", _result_names("variability_compare"))
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.1, 0.2, 0.4])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--methods", nargs="+", choices=VARIABILITY_METHODS,
                   default=list(VARIABILITY_METHODS))
    var_args(p)
    finetune_args(p)


#: what each command does with a checkpoint, for the error on a float (unquantized) one
_NEEDS_QUANTIZED = {
    "export": "qfv export writes N-multiplier layers to QONNX",
    "verify": "qfv verify checks an export of N-multiplier layers",
    "crossbar": "qfv crossbar maps N-multiplier layers onto crossbars",
    "compare": "the methods compared act on N-multiplier layers",
    "bitflips": "bit flips act on the bit cells of N-multiplier layers",
    "selftune": "self-tuning corrects a chip of N-multiplier layers",
}


def _require_quantized(args, info) -> None:
    if info["config"] is None:
        what = _NEEDS_QUANTIZED.get(args.command, "faults and variability apply to "
                                                  "N-multiplier layers")
        raise ValueError(f"{args.checkpoint} is a float model ({info['arch']}, no quantized "
                         f"layers): {what}; give a quantized checkpoint such as "
                         "nmult_w4a4.pt from qfv train/demo")


def _load_for_device(args):
    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.data import fingerprint, load_dataset

    if args.dataset == "idx" and not args.data_dir:
        raise ValueError("--dataset idx needs --data-dir DIR (a folder with the IDX files)")
    model, info = load_checkpoint(args.checkpoint)
    _require_quantized(args, info)
    model = model.to(getattr(args, "device", None) or "cpu")
    # Evaluate on the test split the model was trained against (digits' split depends on the
    # seed it was made with): anything else would leak training images into the test set.
    meta = info["meta"] or {}
    trained_on = meta.get("dataset")
    if trained_on is not None and trained_on != args.dataset:
        raise ValueError(f"{args.checkpoint} was trained on --dataset {trained_on}, not "
                         f"{args.dataset}: pass --dataset {trained_on}"
                         + (" --data-dir DIR" if trained_on == "idx" else ""))
    train, test, num_classes, shape = load_dataset(args.dataset, args.data_dir,
                                                   int(meta.get("data_seed", 0)))
    if tuple(shape) != tuple(info["input_shape"]) or num_classes != info["num_classes"]:
        raise ValueError(
            f"{args.checkpoint} was trained on inputs {tuple(info['input_shape'])} with "
            f"{info['num_classes']} classes, but --dataset {args.dataset}"
            + (f" --data-dir {args.data_dir}" if args.data_dir else "")
            + f" has {tuple(shape)} and {num_classes}")
    if meta.get("data_sha256") and meta["data_sha256"] != fingerprint(train, test):
        where = f"--data-dir {args.data_dir}" if args.data_dir else f"--dataset {args.dataset}"
        raise ValueError(f"{where} is not the data {args.checkpoint} was trained and tested on "
                         "(its images or labels differ): evaluating on other data would "
                         "report a wrong accuracy; pass the same data")
    if getattr(args, "threads", None) == "auto":
        from qfv_brevitas.util.threads import auto_threads, set_threads

        set_threads(auto_threads(model, test[0][0][None].to(next(model.parameters()).device),
                                 64))
    return model, info, train, test


def meta_of(info) -> dict:
    return dict(info.get("meta") or {})


def _finetune_cfg(args):
    from qfv_brevitas.core.train import TrainConfig

    return TrainConfig(epochs=args.epochs, lr=args.lr,
                       lambda_rise_epochs=min(args.lambda_rise_epochs, args.epochs),
                       seed=args.seed, reg_shape=getattr(args, "reg_shape", "sq"),
                       reg_width=getattr(args, "reg_width", 0.25),
                       sam_rho=getattr(args, "sam_rho", 0.0))


def _run_device(args) -> int:
    from qfv_brevitas.studies import montecarlo as E
    from qfv_brevitas.chip import repair as R
    from qfv_brevitas.zoo.checkpoint import save_checkpoint
    from qfv_brevitas.core.train import evaluate as accuracy

    model, info, train, test = _load_for_device(args)
    progress = not args.no_progress
    faults = args.command == "faults"
    if faults:
        from qfv_brevitas.chip.faults import FaultMap as Map, FaultModel, attach_faults as attach
        from qfv_brevitas.chip.faults import sample_fault_map as sample
    else:
        from qfv_brevitas.chip.variability import VariabilityMap as Map, VariabilityModel
        from qfv_brevitas.chip.variability import attach_variability as attach
        from qfv_brevitas.chip.variability import sample_variability_map as sample

    exempt = {n: 0.0 for n in E.edge_layers(model)} if args.layers == "inner" else {}

    def draw(level):
        if faults:
            return sample(model, FaultModel(rate=level, sa1_fraction=args.sa1_fraction,
                                            seed=args.seed, layer_rates=exempt))
        return sample(model, VariabilityModel(sigma=level, hrs_on_off=args.hrs_on_off,
                                              distribution=args.distribution, seed=args.seed,
                                              layer_sigmas=exempt, chip_sigma=args.chip_sigma,
                                              layer_shared_sigma=args.layer_shared_sigma))

    if args.action == "sample":
        m = draw(args.rate if faults else args.sigma)
        m.save(args.out, overwrite=args.force)
        print(f"wrote {args.out}")
        for name, row in m.summary().items():
            print(f"  {name}: {row}")
        return 0
    if args.action in ("eval", "compare"):
        kw = dict(trials=args.trials, seed=args.seed, progress=progress, layers=args.layers,
                  workers=args.workers, distributed=args.distributed)
        if faults:
            kw["sa1_fraction"] = args.sa1_fraction
        else:
            kw.update(hrs_on_off=args.hrs_on_off, distribution=args.distribution,
                      chip_sigma=args.chip_sigma, layer_shared_sigma=args.layer_shared_sigma,
                      devices_per_chip=args.devices_per_chip)
        levels = args.rates if faults else args.sigmas
        if args.action == "eval":
            fn = E.evaluate_faults if faults else E.evaluate_variability
            res = fn(model, test, levels, mapping=args.mapping, **kw)
        else:
            fn = E.compare_faults if faults else E.compare_variability
            if faults:
                kw["remap_every"] = args.remap_every
            res = fn(model, train, test, levels, methods=args.methods,
                     finetune=_finetune_cfg(args), **kw)
        res.meta["title"] = f"{info['arch']} {args.checkpoint}"
        if not _is_output_rank(args):
            return 0
        paths = res.save(args.out, f"{args.command}_{args.action}", overwrite=args.force)
        print(res.table())
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    # finetune: the map first (a bad map file is an error before any work)
    dmap = Map.load(args.map) if args.map else draw(args.rate if faults else args.sigma)
    before = accuracy(model, test)
    attach(model, dmap)
    naive = accuracy(model, test)
    cfg = _finetune_cfg(args)
    if args.method == "nearest_valid":
        R.set_deploy_mapping(model, "aware")
    elif args.method == "fault_aware":
        R.fault_aware_finetune(model, train, test, cfg, args.remap_every, progress)
    elif args.method == "variability_aware":
        R.variability_aware_finetune(model, train, test, cfg, progress)
    else:
        R.chip_in_loop_finetune(model, train, test, cfg, progress)
    after = accuracy(model, test)
    save_checkpoint(args.out, model, info["arch"], info["input_shape"], info["num_classes"],
                    info["config"], overwrite=args.force,
                    **{**meta_of(info), "acc": after, "method": args.method,
                       "source": str(args.checkpoint)})
    print(f"ideal device {100 * before:.2f}% | on this chip as is {100 * naive:.2f}% | "
          f"after {args.method} {100 * after:.2f}%")
    print(f"wrote {args.out} (the map travels with the model)")
    return 0


def _run_train(args) -> int:
    from qfv_brevitas.studies.experiment import format_results, run_experiment
    from qfv_brevitas.core.train import TrainConfig

    if args.dataset == "idx" and not args.data_dir:
        raise ValueError("--dataset idx needs --data-dir DIR (a folder with the IDX files)")
    idx = args.dataset == "idx"
    fp_epochs = args.fp_epochs if args.fp_epochs is not None else (IDX_FP_EPOCHS if idx else 30)
    q_epochs = args.q_epochs if args.q_epochs is not None else (IDX_Q_EPOCHS if idx else 15)
    batch = args.batch_size if args.batch_size is not None else (IDX_BATCH if idx else 64)
    args.q_epochs = q_epochs
    fp = TrainConfig(epochs=fp_epochs, lr=args.lr, batch_size=batch, seed=args.seed)
    q = TrainConfig(epochs=q_epochs, lr=args.q_lr, quant_lr=args.quant_lr,
                    quant_optimizer=args.quant_optimizer,
                    batch_size=batch, seed=args.seed, lambda_start=args.lambda_start,
                    lambda_end=args.lambda_end,
                    lambda_rise_epochs=min(args.lambda_rise_epochs, args.q_epochs),
                    reg_shape=args.reg_shape, reg_width=args.reg_width, sam_rho=args.sam_rho,
                    refit_every=args.refit_every)
    results = run_experiment(args.out, dataset=args.dataset, data_dir=args.data_dir,
                             arch=args.arch, bits=args.bits, variants=args.variants,
                             mode=args.mode, per_channel=args.per_channel, fp_train=fp,
                             q_train=q, seed=args.seed, progress=not args.no_progress,
                             device=args.device, threads=args.threads,
                             overwrite=args.force, init=args.init)
    print(format_results(results))
    print(f"\nwrote {args.out}/results.json, {args.out}/levels.png, levels_fit_*.png and "
          f"checkpoints ({results['seconds']:.0f} s)")
    return 0


def _run_report(args) -> int:
    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.core.deploy import format_report, layer_report

    model, info = load_checkpoint(args.checkpoint)
    if info["config"] is None:
        print(f"{args.checkpoint}: a float model ({info['arch']}), no quantized layers")
        return 0
    print(format_report(layer_report(model)))
    return 0


#: ``qfv train --dataset idx`` defaults (60,000 28x28 images): about a minute per epoch of the
#: SmallCNN on 2 CPU cores, so the six QAT models and the float model finish in well under an
#: hour (BENCHMARKS.md, "Progress and defaults"); pass --fp-epochs/--q-epochs for more.
IDX_FP_EPOCHS, IDX_Q_EPOCHS, IDX_BATCH = 3, 2, 128


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """``--threads``, ``--device`` (and ``--workers``/``--distributed`` on Monte Carlo
    commands) on every leaf command that does not define them itself."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_run_args(sub)
            return
    opts = parser._option_string_actions
    if "--threads" not in opts:
        parser.add_argument("--threads", default="auto",
                            help="intra-op threads: an integer, or auto (1 for small models "
                                 "such as the digits ones, else one per core)")
    if "--device" not in opts:
        parser.add_argument("--device", default=None,
                            help="cpu (default) or cuda[:N]: where the model runs")
    if "--trials" in opts and "--workers" not in opts:
        parser.add_argument("--workers", type=int, default=1,
                            help="processes on this machine that share the Monte Carlo maps "
                                 "(same results as 1)")
        parser.add_argument("--distributed", action="store_true",
                            help="share the maps over the ranks of torchrun (gloo on CPUs, nccl "
                                 "on GPUs); rank 0 writes the outputs")


def _apply_run_args(args) -> None:
    from qfv_brevitas.util.threads import parse_threads

    n = parse_threads(getattr(args, "threads", "auto"))
    if n is not None:
        torch_threads(n)
        args.threads = n
    if getattr(args, "distributed", False):
        from qfv_brevitas.util.parallel import init_distributed

        init_distributed()


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _is_output_rank(args) -> bool:
    if not getattr(args, "distributed", False):
        return True
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
#: exit status of each kind of failure (documented in README, "Errors and exit codes")
EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_OUTPUT, EXIT_SYSTEM, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _describe(e: BaseException):
    """``(exit status, one-line message)`` of an expected error, or None for a bug."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, ("interrupted; no output was left half-written (each is the "
                                  "previous one or complete)")
    if isinstance(e, ValueError):  # QfvError and the validation errors of configs
        return getattr(e, "exit_code", EXIT_BAD_INPUT), _one_line(e)
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return EXIT_BAD_INPUT, _one_line(e)  # an input path (outputs' folders are made)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return EXIT_SYSTEM, (f"{where}{e.strerror or e} (the work stopped; outputs are "
                             "unchanged)")
    if isinstance(e, MemoryError):
        return EXIT_SYSTEM, "out of memory (the work stopped; outputs are unchanged)"
    if isinstance(e, ImportError):  # an optional extra is missing: its message says which
        return EXIT_BAD_INPUT, _one_line(e)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``qfv``; returns the exit status. Every expected error (bad input, an output that
    may not be written, a system error such as a full disk, Ctrl-C) is one line on stderr and
    its exit status (see ``qfv --help``); ``--debug`` (or QFV_DEBUG=1) shows the traceback."""
    # Brevitas warns at import that an optional kernel package is missing: not ours to say.
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("QFV_DEBUG", "") not in ("", "0")
    name = " ".join(x for x in (args.command, getattr(args, "action", None)) if x)
    # A file-size limit (ulimit -f) kills the process by default in the middle of a write;
    # ignored, the write fails with an OSError and the temporary file is cleaned up.
    xfsz = term = None
    if hasattr(signal, "SIGXFSZ") and _main_thread():
        xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if hasattr(signal, "SIGTERM") and _main_thread() and signal.getsignal(signal.SIGTERM) \
            is not None:  # a kill: the same clean stop as Ctrl-C (temporary files removed)
        term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _check_io(args)
        _apply_run_args(args)
        if getattr(args, "_run", None) is not None:
            return args._run(args)
        if args.command in ("demo", "train"):
            return _run_train(args)
        if args.command == "report":
            return _run_report(args)
        if args.command in ("faults", "variability"):
            return _run_device(args)
    except (Exception, KeyboardInterrupt) as e:
        described = None if debug else _describe(e)
        if described is None:
            raise
        code, message = described
        print(f"qfv {name}: error: {message}", file=sys.stderr)
        return code
    finally:
        if xfsz is not None:
            signal.signal(signal.SIGXFSZ, xfsz)
        if term is not None:
            signal.signal(signal.SIGTERM, term)
    return 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
