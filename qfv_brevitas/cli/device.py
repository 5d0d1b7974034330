"""``qfv faults`` and ``qfv variability``: draw a chip's map, Monte Carlo over maps, fine-tune a
model to one chip, and methods side by side on the same maps (the study engine,
:mod:`qfv_brevitas.studies.engine`)."""
from __future__ import annotations

import argparse

from qfv_brevitas.cli.common import (add_checkpoint_args, add_finetune_args, add_study_args,
                                     add_variability_args, command, command_group, finetune_config,
                                     integer, is_output_rank, load_for_device, meta_of, note,
                                     result_names, show, variability_settings)
from qfv_brevitas.util.text import text_table

__all__ = ["run_sample", "run_eval", "run_finetune", "run_compare"]


def _sa1(p: argparse.ArgumentParser) -> None:
    from qfv_brevitas.studies.scenario import Scenario

    p.add_argument("--sa1-fraction", type=float, default=Scenario.sa1_fraction,
                   help="fraction of the stuck cells stuck at 1 (the rest at 0)")


def _faults_finetune(p: argparse.ArgumentParser) -> None:
    from qfv_brevitas.studies.engine import CompareConfig

    p.add_argument("--method", choices=("fault_aware", "nearest_valid", "chip_in_loop"),
                   default="fault_aware",
                   help="fault_aware: the regularizer towards the levels this chip can hold; "
                        "nearest_valid: no training, each weight to its nearest valid level; "
                        "chip_in_loop: plain fine-tuning through the faulty chip")
    p.add_argument("--remap-every", type=integer, default=CompareConfig.remap_every,
                   help="epochs between the nearest-valid remaps of fault_aware")


def _variability_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("variability_aware", "chip_in_loop"),
                   default="variability_aware",
                   help="variability_aware: the regularizer towards this chip's levels; "
                        "chip_in_loop: plain fine-tuning through the chip")


#: What differs between ``qfv faults ...`` and ``qfv variability ...``: the group's help, the
#: level (one: ``sample``/``finetune``; many: ``eval``/``compare``), the sample file, the help
#: of the map file, the kind's settings, the fine-tune methods and whether compare remaps.
_KINDS = {
    "faults": dict(
        help="stuck-at bit faults: sample, evaluate, fine-tune, compare",
        one=("--rate", "fraction of stuck bit cells", "draw a map at this rate (with --seed)"),
        many=("--rates", [0, 0.05, 0.1, 0.2, 0.3], "fractions of stuck bit cells"),
        map_option="--fault-map", sample_out="faultmap.pt",
        map_help="a fault map file (e.g. measured on the chip)", settings=_sa1,
        finetune=_faults_finetune, remap=True, mapping_help="naive: each weight keeps its code; aware: the code of the "
                     "nearest level the faulty chip can still hold"),
    "variability": dict(
        help="per-bit device variability: sample, evaluate, fine-tune, compare",
        one=("--sigma", "sigma/mu of the LRS cells",
             "draw a map at this sigma/mu (with --seed)"),
        many=("--sigmas", [0, 0.1, 0.2, 0.4], "sigma/mu of the LRS cells"),
        map_option="--variability-map", sample_out="varmap.pt",
        map_help="a variability map file (a characterised chip)", settings=add_variability_args,
        finetune=_variability_finetune, remap=False,
        mapping_help="naive: each weight keeps its code; aware: the code of the nearest level "
                     "the chip holds"),
}


def _register(kind: str, spec: dict) -> None:
    """``qfv <kind> sample|eval|finetune|compare`` (their options are declared only when
    the parser of that command is built: the studies import torch)."""
    what = "fault" if kind == "faults" else "variability"
    one, sample_help, draw_help = spec["one"]
    many, many_default, many_help = spec["many"]
    command_group(kind, help=spec["help"])

    @command(kind, "sample", help=f"draw a {what} map for a model and save it")
    def sample(p: argparse.ArgumentParser):
        add_checkpoint_args(p, spec["sample_out"], "file")
        p.add_argument(one, type=float, required=True, help=sample_help)
        spec["settings"](p)
        return run_sample

    @command(kind, "eval", help=f"Monte Carlo accuracy over random {what} maps")
    def evaluate(p: argparse.ArgumentParser):
        from qfv_brevitas.studies.engine import CompareConfig

        add_checkpoint_args(p, f"qfv-{kind}", "results", result_names(f"{kind}_eval"))
        p.add_argument(many, type=float, nargs="+", default=many_default, help=many_help)
        p.add_argument("--trials", type=integer, default=CompareConfig.trials,
                       help="random maps (chips) per level")
        p.add_argument("--mapping", choices=("naive", "aware"), default="naive",
                       help=spec["mapping_help"])
        spec["settings"](p)
        return run_eval

    @command(kind, "finetune", help=f"fit a model to one chip's {what} map")
    def finetune(p: argparse.ArgumentParser):
        map_dest = spec["map_option"][2:].replace("-", "_")
        add_checkpoint_args(p, "finetuned.pt", "file",
                            inputs=("checkpoint", "data_dir", map_dest))
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument(spec["map_option"], help=spec["map_help"])
        g.add_argument(one, type=float, help=draw_help)
        spec["settings"](p)
        spec["finetune"](p)
        add_finetune_args(p)
        return run_finetune

    @command(kind, "compare", help="methods side by side on the same random maps")
    def compare(p: argparse.ArgumentParser):
        from qfv_brevitas.studies import compare as C
        from qfv_brevitas.cli.usercode import LateChoices, MethodsOf
        from qfv_brevitas.studies.methods import METHODS, get_method

        defaults = C.FAULT_METHODS if kind == "faults" else C.VARIABILITY_METHODS
        add_checkpoint_args(p, f"qfv-{kind}", "results", result_names(f"{kind}_compare"))
        p.add_argument(many, type=float, nargs="+", default=many_default, help=many_help)
        builtin = [m for m in METHODS if get_method(m).applies(kind)]
        p.add_argument("--methods", nargs="+", default=list(defaults), metavar="METHOD",
                       action=LateChoices, names=MethodsOf(kind),
                       member=MethodsOf(kind).applies,
                       help=f"methods to compare: {', '.join(builtin)}, or an installed "
                            "plugin's (checked when the command runs)")
        spec["settings"](p)
        add_study_args(p, remap=spec["remap"])
        return run_compare


for _kind, _spec in _KINDS.items():
    _register(_kind, _spec)


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
    show(text_table(m.summary()))
    note(f"wrote {args.out}")
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
    res.meta.update(model=f"{info['arch']} on {args.dataset}",
                    checkpoint=str(args.checkpoint))
    if not is_output_rank(args):
        return 0
    paths = res.save(args.out, f"{args.command}_{args.action}", overwrite=args.force)
    show(res.table())
    note("\nwrote " + ", ".join(str(p) for p in paths.values()))
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
    from qfv_brevitas.studies import compare as C

    model, info, train, test = load_for_device(args)
    kw = dict(_study_kw(args), methods=args.methods, finetune=finetune_config(args, sam=False),
              sam_rho=args.sam_rho, rbe_rate=args.rbe_rate)
    if args.command == "faults":
        res = C.compare_faults(model, train, test, args.rates, remap_every=args.remap_every,
                               **kw)
    else:
        res = C.compare_variability(model, train, test, args.sigmas, **kw)
    return _write(args, info, res)


def run_finetune(args) -> int:
    """``qfv faults|variability finetune``: one chip's map (a file, or drawn), then a fine-tune
    to it; the map travels with the saved model."""
    from qfv_brevitas.chip import repair as R
    from qfv_brevitas.training.train import evaluate as accuracy
    from qfv_brevitas.zoo.checkpoint import save_checkpoint

    model, info, train, test = load_for_device(args)
    progress = not args.no_progress
    if args.command == "faults":
        from qfv_brevitas.chip.faults import FaultMap as Map, attach_faults as attach
    else:
        from qfv_brevitas.chip.variability import VariabilityMap as Map
        from qfv_brevitas.chip.variability import attach_variability as attach
    # the map first (a bad map file is an error before any work)
    path = args.fault_map if args.command == "faults" else args.variability_map
    dmap = Map.load(path) if path else _draw(args, model, _level(args))
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
    show(f"ideal device {100 * before:.2f}% | on this chip as is {100 * naive:.2f}% | "
          f"after {args.method} {100 * after:.2f}%")
    note(f"wrote {args.out} (the map travels with the model)")
    return 0
