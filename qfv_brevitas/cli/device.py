"""``qfv faults`` and ``qfv variability``: draw a chip's map, Monte Carlo over maps, fine-tune a
model to one chip, and methods side by side on the same maps (the study engine,
:mod:`qfv_brevitas.studies.engine`)."""
from __future__ import annotations

import argparse

from qfv_brevitas.cli.common import (add_checkpoint_args, add_finetune_args, add_study_args,
                                     add_variability_args, command, command_group,
                                     finetune_config, is_output_rank, load_for_device, meta_of,
                                     result_names, variability_settings)

__all__ = ["run_sample", "run_eval", "run_finetune", "run_compare"]


def _sa1(p: argparse.ArgumentParser) -> None:
    from qfv_brevitas.studies.scenario import Scenario

    p.add_argument("--sa1-fraction", type=float, default=Scenario.sa1_fraction)


def _methods(p: argparse.ArgumentParser, kind: str, default) -> None:
    from qfv_brevitas.studies.methods import method_names

    p.add_argument("--methods", nargs="+", choices=method_names(kind), default=list(default))


# -- qfv faults ------------------------------------------------------------------------------------

command_group("faults", help="stuck-at bit faults: sample, evaluate, fine-tune, compare")


@command("faults", "sample", help="draw a fault map for a model and save it")
def faults_sample(p: argparse.ArgumentParser):
    add_checkpoint_args(p, "faultmap.pt", "file")
    p.add_argument("--rate", type=float, required=True, help="fraction of stuck bit cells")
    _sa1(p)
    return run_sample


@command("faults", "eval", help="Monte Carlo accuracy over random fault maps")
def faults_eval(p: argparse.ArgumentParser):
    add_checkpoint_args(p, "qfv-faults", "results", result_names("faults_eval"))
    p.add_argument("--rates", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--mapping", choices=("naive", "aware"), default="naive",
                   help="aware = nearest-valid-level mapping")
    _sa1(p)
    return run_eval


@command("faults", "finetune", help="fit a model to one chip's fault map")
def faults_finetune(p: argparse.ArgumentParser):
    add_checkpoint_args(p, "finetuned.pt", "file", inputs=("checkpoint", "data_dir", "map"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--map", help="a fault map file (e.g. measured on the chip)")
    g.add_argument("--rate", type=float, help="draw a map at this rate (with --seed)")
    _sa1(p)
    p.add_argument("--method", choices=("fault_aware", "nearest_valid", "chip_in_loop"),
                   default="fault_aware")
    p.add_argument("--remap-every", type=int, default=4)
    add_finetune_args(p)
    return run_finetune


@command("faults", "compare", help="methods side by side on the same random maps")
def faults_compare(p: argparse.ArgumentParser):
    from qfv_brevitas.studies.montecarlo import FAULT_METHODS

    add_checkpoint_args(p, "qfv-faults", "results", result_names("faults_compare"))
    p.add_argument("--rates", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.3])
    _methods(p, "faults", FAULT_METHODS)
    _sa1(p)
    add_study_args(p)
    return run_compare


# -- qfv variability -------------------------------------------------------------------------------

command_group("variability", help="per-bit device variability: sample, evaluate, fine-tune, "
                                  "compare")


@command("variability", "sample", help="draw a variability map for a model and save it")
def variability_sample(p: argparse.ArgumentParser):
    add_checkpoint_args(p, "varmap.pt", "file")
    p.add_argument("--sigma", type=float, required=True, help="sigma/mu of the LRS cells")
    add_variability_args(p)
    return run_sample


@command("variability", "eval", help="Monte Carlo accuracy over random variability maps")
def variability_eval(p: argparse.ArgumentParser):
    add_checkpoint_args(p, "qfv-variability", "results", result_names("variability_eval"))
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.1, 0.2, 0.4])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--mapping", choices=("naive", "aware"), default="naive")
    add_variability_args(p)
    return run_eval


@command("variability", "finetune", help="fit a model to one chip's variability map")
def variability_finetune(p: argparse.ArgumentParser):
    add_checkpoint_args(p, "finetuned.pt", "file", inputs=("checkpoint", "data_dir", "map"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--map", help="a variability map file (a characterised chip)")
    g.add_argument("--sigma", type=float, help="draw a map at this sigma/mu (with --seed)")
    add_variability_args(p)
    p.add_argument("--method", choices=("variability_aware", "chip_in_loop"),
                   default="variability_aware")
    add_finetune_args(p)
    return run_finetune


@command("variability", "compare", help="methods side by side on the same random maps")
def variability_compare(p: argparse.ArgumentParser):
    from qfv_brevitas.studies.montecarlo import VARIABILITY_METHODS

    add_checkpoint_args(p, "qfv-variability", "results", result_names("variability_compare"))
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.1, 0.2, 0.4])
    _methods(p, "variability", VARIABILITY_METHODS)
    add_variability_args(p)
    add_study_args(p, remap=False)
    return run_compare


# -- running them ----------------------------------------------------------------------------------

def _draw(args, model, level: float):
    """The map of one chip: ``args.seed``, the settings of ``args``, edge layers kept ideal
    with ``--layers inner``."""
    from qfv_brevitas.studies.scenario import exempt_layers

    exempt = exempt_layers(model, args.layers)
    if args.command == "faults":
        from qfv_brevitas.chip.faults import FaultModel, sample_fault_map

        return sample_fault_map(model, FaultModel(rate=level, sa1_fraction=args.sa1_fraction,
                                                  seed=args.seed, layer_rates=exempt))
    from qfv_brevitas.chip.variability import VariabilityModel, sample_variability_map

    return sample_variability_map(model, VariabilityModel(
        sigma=level, hrs_on_off=args.hrs_on_off, distribution=args.distribution, seed=args.seed,
        layer_sigmas=exempt, chip_sigma=args.chip_sigma,
        layer_shared_sigma=args.layer_shared_sigma))


def _level(args) -> float:
    return args.rate if args.command == "faults" else args.sigma


def run_sample(args) -> int:
    """``qfv faults|variability sample``."""
    model, info, train, test = load_for_device(args)
    m = _draw(args, model, _level(args))
    m.save(args.out, overwrite=args.force)
    print(f"wrote {args.out}")
    for name, row in m.summary().items():
        print(f"  {name}: {row}")
    return 0


def _study_kw(args) -> dict:
    kw = dict(trials=args.trials, seed=args.seed, progress=not args.no_progress,
              layers=args.layers, workers=args.workers, distributed=args.distributed)
    if args.command == "faults":
        kw["sa1_fraction"] = args.sa1_fraction
    else:
        kw.update(variability_settings(args))
    return kw


def _write(args, info, res) -> int:
    res.meta["title"] = f"{info['arch']} {args.checkpoint}"
    if not is_output_rank(args):
        return 0
    paths = res.save(args.out, f"{args.command}_{args.action}", overwrite=args.force)
    print(res.table())
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run_eval(args) -> int:
    """``qfv faults|variability eval``."""
    from qfv_brevitas.studies import montecarlo as M

    model, info, train, test = load_for_device(args)
    fn = M.evaluate_faults if args.command == "faults" else M.evaluate_variability
    levels = args.rates if args.command == "faults" else args.sigmas
    return _write(args, info, fn(model, test, levels, mapping=args.mapping, **_study_kw(args)))


def run_compare(args) -> int:
    """``qfv faults|variability compare``."""
    from qfv_brevitas.studies import montecarlo as M

    model, info, train, test = load_for_device(args)
    kw = dict(_study_kw(args), methods=args.methods, finetune=finetune_config(args, sam=False),
              sam_rho=args.sam_rho, rbe_rate=args.rbe_rate)
    if args.command == "faults":
        res = M.compare_faults(model, train, test, args.rates, remap_every=args.remap_every,
                               **kw)
    else:
        res = M.compare_variability(model, train, test, args.sigmas, **kw)
    return _write(args, info, res)


def run_finetune(args) -> int:
    """``qfv faults|variability finetune``: one chip's map (a file, or drawn), then a fine-tune
    to it; the map travels with the saved model."""
    from qfv_brevitas.chip import repair as R
    from qfv_brevitas.core.train import evaluate as accuracy
    from qfv_brevitas.zoo.checkpoint import save_checkpoint

    model, info, train, test = load_for_device(args)
    progress = not args.no_progress
    if args.command == "faults":
        from qfv_brevitas.chip.faults import FaultMap as Map, attach_faults as attach
    else:
        from qfv_brevitas.chip.variability import VariabilityMap as Map
        from qfv_brevitas.chip.variability import attach_variability as attach
    # the map first (a bad map file is an error before any work)
    dmap = Map.load(args.map) if args.map else _draw(args, model, _level(args))
    before = accuracy(model, test)
    attach(model, dmap)
    naive = accuracy(model, test)
    cfg = finetune_config(args)
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
