"""The ``qfv`` command."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import INITS, MODES, VARIANTS

__all__ = ["main", "build_parser"]


def _add_train_args(p: argparse.ArgumentParser, quick_default: bool = False) -> None:
    from .train import TrainConfig

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
    _add_reg_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="qfv-out", help="output folder")
    p.add_argument("--no-progress", action="store_true")


def _add_reg_args(p: argparse.ArgumentParser) -> None:
    from .shapes import DEFAULT_WIDTH, SHAPES

    p.add_argument("--reg-shape", choices=SHAPES, default="sq",
                   help="regularizer shape: sq (paper), gauss (Gaussian well), sin (SinReQ)")
    p.add_argument("--reg-width", type=float, default=DEFAULT_WIDTH,
                   help="gauss: sigma as a fraction of the local level spacing")
    p.add_argument("--sam-rho", type=float, default=0.0,
                   help="SAM radius (FlatENN's sharpness-aware quantization); 0 = off")


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
    _add_device_commands(sub)
    # Command groups that live beside their own module: each ``register(sub)`` adds its
    # subcommands and sets ``_run`` (a function of the parsed args returning the exit status).
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


#: modules (relative to the package) that add ``qfv`` subcommands through ``register(sub)``
_COMMAND_MODULES: List[str] = ["cli_export", "cli_snn", "cli_methods", "cli_quantize"]


def _add_device_commands(sub) -> None:
    from .evaluate import FAULT_METHODS, VARIABILITY_METHODS

    def common(p, out_default):
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
    common(p, "faultmap.pt")
    p.add_argument("--rate", type=float, required=True, help="fraction of stuck bit cells")
    p.add_argument("--sa1-fraction", type=float, default=0.5)
    p = fsub.add_parser("eval", help="Monte Carlo accuracy over random fault maps")
    common(p, "qfv-faults")
    p.add_argument("--rates", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--mapping", choices=("naive", "aware"), default="naive",
                   help="aware = nearest-valid-level mapping")
    p.add_argument("--sa1-fraction", type=float, default=0.5)
    p = fsub.add_parser("finetune", help="fit a model to one chip's fault map")
    common(p, "finetuned.pt")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--map", help="a fault map file (e.g. measured on the chip)")
    g.add_argument("--rate", type=float, help="draw a map at this rate (with --seed)")
    p.add_argument("--sa1-fraction", type=float, default=0.5)
    p.add_argument("--method", choices=("fault_aware", "nearest_valid", "chip_in_loop"),
                   default="fault_aware")
    p.add_argument("--remap-every", type=int, default=4)
    finetune_args(p)
    p = fsub.add_parser("compare", help="methods side by side on the same random maps")
    common(p, "qfv-faults")
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
    common(p, "varmap.pt")
    p.add_argument("--sigma", type=float, required=True, help="sigma/mu of the LRS cells")
    var_args(p)
    p = vsub.add_parser("eval", help="Monte Carlo accuracy over random variability maps")
    common(p, "qfv-variability")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.1, 0.2, 0.4])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--mapping", choices=("naive", "aware"), default="naive")
    var_args(p)
    p = vsub.add_parser("finetune", help="fit a model to one chip's variability map")
    common(p, "finetuned.pt")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--map", help="a variability map file (a characterised chip)")
    g.add_argument("--sigma", type=float, help="draw a map at this sigma/mu (with --seed)")
    var_args(p)
    p.add_argument("--method", choices=("variability_aware", "chip_in_loop"),
                   default="variability_aware")
    finetune_args(p)
    p = vsub.add_parser("compare", help="methods side by side on the same random maps")
    common(p, "qfv-variability")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.1, 0.2, 0.4])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--methods", nargs="+", choices=VARIABILITY_METHODS,
                   default=list(VARIABILITY_METHODS))
    var_args(p)
    finetune_args(p)


def _load_for_device(args):
    from .checkpoint import load_checkpoint
    from .data import load_dataset

    model, info = load_checkpoint(args.checkpoint)
    if info["config"] is None:
        raise ValueError(f"{args.checkpoint} is a float model: faults and variability apply "
                         "to N-multiplier layers (use a quantized checkpoint)")
    if args.dataset == "idx" and not args.data_dir:
        raise ValueError("--dataset idx needs --data-dir DIR")
    # Evaluate on the test split the model was trained against (digits' split depends on the
    # seed it was made with): anything else would leak training images into the test set.
    meta = info["meta"] or {}
    train, test, num_classes, shape = load_dataset(args.dataset, args.data_dir,
                                                   int(meta.get("data_seed", 0)))
    if tuple(shape) != tuple(info["input_shape"]) or num_classes != info["num_classes"]:
        raise ValueError(
            f"{args.checkpoint} was trained on inputs {tuple(info['input_shape'])} with "
            f"{info['num_classes']} classes, but --dataset {args.dataset} has {tuple(shape)} "
            f"and {num_classes}")
    return model, info, train, test


def meta_of(info) -> dict:
    return dict(info.get("meta") or {})


def _finetune_cfg(args):
    from .train import TrainConfig

    return TrainConfig(epochs=args.epochs, lr=args.lr,
                       lambda_rise_epochs=min(args.lambda_rise_epochs, args.epochs),
                       seed=args.seed, reg_shape=getattr(args, "reg_shape", "sq"),
                       reg_width=getattr(args, "reg_width", 0.25),
                       sam_rho=getattr(args, "sam_rho", 0.0))


def _run_device(args) -> int:
    from . import evaluate as E
    from . import repair as R
    from .checkpoint import save_checkpoint
    from .train import evaluate as accuracy

    model, info, train, test = _load_for_device(args)
    progress = not args.no_progress
    faults = args.command == "faults"
    if faults:
        from .faults import FaultMap as Map, FaultModel, attach_faults as attach
        from .faults import sample_fault_map as sample
    else:
        from .variability import VariabilityMap as Map, VariabilityModel
        from .variability import attach_variability as attach
        from .variability import sample_variability_map as sample

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
        m.save(args.out)
        print(f"wrote {args.out}")
        for name, row in m.summary().items():
            print(f"  {name}: {row}")
        return 0
    if args.action in ("eval", "compare"):
        kw = dict(trials=args.trials, seed=args.seed, progress=progress, layers=args.layers)
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
        paths = res.save(args.out, f"{args.command}_{args.action}")
        print(res.table())
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    # finetune
    before = accuracy(model, test)
    dmap = Map.load(args.map) if args.map else draw(args.rate if faults else args.sigma)
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
                    info["config"], **{**meta_of(info), "acc": after, "method": args.method,
                                       "source": str(args.checkpoint)})
    print(f"ideal device {100 * before:.2f}% | on this chip as is {100 * naive:.2f}% | "
          f"after {args.method} {100 * after:.2f}%")
    print(f"wrote {args.out} (the map travels with the model)")
    return 0


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
                    lambda_rise_epochs=min(args.lambda_rise_epochs, args.q_epochs),
                    reg_shape=args.reg_shape, reg_width=args.reg_width, sam_rho=args.sam_rho,
                    refit_every=args.refit_every)
    results = run_experiment(args.out, dataset=args.dataset, data_dir=args.data_dir,
                             arch=args.arch, bits=args.bits, variants=args.variants,
                             mode=args.mode, per_channel=args.per_channel, fp_train=fp,
                             q_train=q, seed=args.seed, progress=not args.no_progress,
                             init=args.init)
    print(format_results(results))
    print(f"\nwrote {args.out}/results.json, {args.out}/levels.png, levels_fit_*.png and "
          f"checkpoints ({results['seconds']:.0f} s)")
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
        if getattr(args, "_run", None) is not None:
            return args._run(args)
        if args.command in ("demo", "train"):
            return _run_train(args)
        if args.command == "report":
            return _run_report(args)
        if args.command in ("faults", "variability"):
            return _run_device(args)
    except ValueError as e:  # our validation errors: say what is wrong, no traceback
        print(f"qfv {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
