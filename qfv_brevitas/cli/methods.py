"""``qfv compare``, ``qfv bitflips`` and ``qfv selftune``: the related methods from the command
line.

* ``qfv compare CKPT``: every chosen method on the same maps over stuck-at, bit-flip and
  variability scenarios; one table (printed, ``compare.md``), CSV/JSON and one plot.
* ``qfv bitflips eval CKPT``: Monte Carlo accuracy under transient bit flips;
  ``qfv bitflips finetune CKPT``: random-bit-error training, saved as a checkpoint.
* ``qfv selftune CKPT``: one simulated chip (a map file, or drawn), accuracy before and after
  self-tuning on an unlabeled calibration batch.
"""
from __future__ import annotations

import argparse

from qfv_brevitas.cli.common import (add_checkpoint_args, add_finetune_args, add_study_args,
                                     command, command_group, finetune_config, integer,
                                     is_output_rank, load_for_device, meta_of, note, result_names,
                                     show, study_config)
from qfv_brevitas.util.errors import QfvError

__all__ = ["run_compare", "run_bitflips_eval", "run_bitflips_finetune", "run_selftune"]

_INPUTS = ("checkpoint", "data_dir", "fault_map", "variability_map")


@command("compare", help="the related methods side by side on the same maps: one table, one plot",
         description="Runs each --methods on --trials seeded maps per scenario (stuck-at rates, "
                     "bit-error rates, LRS sigmas, and with --chip-sigma each sigma again with "
                     "a between-chip component) "
                     "and writes compare.{md,csv,json,png} to --out. Per-map methods do not "
                     "apply to transient bit flips (n/a).")
def compare(p: argparse.ArgumentParser):
    from qfv_brevitas.cli.usercode import LateChoices, method_names
    from qfv_brevitas.studies.methods import METHODS
    from qfv_brevitas.studies.scenario import Scenario

    add_checkpoint_args(p, "qfv-compare", "results", result_names("compare", ("csv", "json",
                                                                              "md", "png")),
                        inputs=_INPUTS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                   action=LateChoices, names=method_names,
                   help=f"methods to compare: {', '.join(METHODS)}, or an installed plugin's "
                        "(checked when the command runs)")
    p.add_argument("--stuck", type=float, nargs="*", default=[0.1, 0.2],
                   help="stuck-at bit-fault rates")
    p.add_argument("--ber", type=float, nargs="*", default=[0.01, 0.05], help="bit-error rates")
    p.add_argument("--sigmas", type=float, nargs="*", default=[0.2, 0.4],
                   help="LRS sigma/mu of the per-cell variability")
    p.add_argument("--chip-sigma", type=float, default=0.0,
                   help="between-chip sigma: each --sigmas scenario again with this shared "
                        "component, e.g. 0.1 (default 0: no such scenario)")
    p.add_argument("--hrs-on-off", type=float, default=Scenario.hrs_on_off,
                   help="variability scenarios: model HRS too, LRS/HRS on/off ratio")
    p.add_argument("--distribution", choices=("normal", "lognormal"),
                   default=Scenario.distribution,
                   help="variability scenarios: distribution of the cell factors")
    add_study_args(p, selftune=True)
    return run_compare


def run_compare(args) -> int:
    """``qfv compare``."""
    from qfv_brevitas.studies.compare import compare_methods
    from qfv_brevitas.studies.scenario import scenarios

    model, info, train, test = load_for_device(args)
    cfg = study_config(args)
    scs = scenarios(args.stuck, args.ber, args.sigmas, args.chip_sigma,
                    hrs_on_off=args.hrs_on_off, distribution=args.distribution)
    res = compare_methods(model, train, test, scs, args.methods, cfg,
                          progress=not args.no_progress, workers=args.workers,
                          distributed=args.distributed)
    res.meta.update(model=f"{info['arch']} on {args.dataset}",
                    checkpoint=str(args.checkpoint))
    if not is_output_rank(args):
        return 0
    paths = res.save(args.out, "compare", overwrite=args.force)
    show(res.table())
    show()
    for sc, best in res.winners().items():
        plain = res.winners(with_selftune=False).get(sc, [])
        show(f"{sc}: best {', '.join(best)}; without self-tuning {', '.join(plain)}")
    note("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


command_group("bitflips", help="transient bit flips: Monte Carlo evaluation, random-bit-error "
                                "training")


@command("bitflips", "eval", help="accuracy under random bit flips, seeded runs per rate")
def bitflips_eval(p: argparse.ArgumentParser):
    from qfv_brevitas.studies.engine import CompareConfig

    add_checkpoint_args(p, "qfv-bitflips", "results", result_names("bitflips_eval"),
                        inputs=_INPUTS)
    p.add_argument("--rates", type=float, nargs="+", default=[0, 0.01, 0.02, 0.05],
                   help="bit-error rates: the probability that a bit cell reads flipped")
    p.add_argument("--trials", type=integer, default=CompareConfig.trials,
                   help="seeded flip streams per rate")
    return run_bitflips_eval


@command("bitflips", "finetune", help="random-bit-error training; saves the model")
def bitflips_finetune(p: argparse.ArgumentParser):
    add_checkpoint_args(p, "rbe.pt", "file", inputs=_INPUTS)
    p.add_argument("--rate", type=float, required=True, help="training bit-error rate")
    add_finetune_args(p)
    return run_bitflips_finetune


def run_bitflips_eval(args) -> int:
    """``qfv bitflips eval``."""
    from qfv_brevitas.studies.montecarlo import evaluate_bitflips

    model, info, train, test = load_for_device(args)
    res = evaluate_bitflips(model, test, args.rates, trials=args.trials, seed=args.seed,
                            layers=args.layers, progress=not args.no_progress,
                            workers=args.workers, distributed=args.distributed)
    res.meta.update(model=f"{info['arch']} on {args.dataset}",
                    checkpoint=str(args.checkpoint))
    if not is_output_rank(args):
        return 0
    paths = res.save(args.out, "bitflips_eval", overwrite=args.force)
    show(res.table())
    note("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run_bitflips_finetune(args) -> int:
    """``qfv bitflips finetune``."""
    from qfv_brevitas.chip.bitflips import BitFlipModel
    from qfv_brevitas.training.train import evaluate
    from qfv_brevitas.studies.methods import random_bit_error_finetune
    from qfv_brevitas.studies.scenario import exempt_layers
    from qfv_brevitas.zoo.checkpoint import save_checkpoint

    model, info, train, test = load_for_device(args)
    flips = BitFlipModel(args.rate, args.seed, exempt_layers(model, args.layers))
    before = evaluate(model, test)
    random_bit_error_finetune(model, train, None, finetune_config(args), flips,
                              progress=not args.no_progress)
    after = evaluate(model, test)
    save_checkpoint(args.out, model, info["arch"], info["input_shape"], info["num_classes"],
                    info["config"], overwrite=args.force, **{**meta_of(info), "acc": after,
                                       "method": "random_bit_error", "rbe_rate": args.rate,
                                       "source": str(args.checkpoint)})
    show(f"ideal device {100 * before:.2f}% -> after random-bit-error training at BER "
          f"{args.rate:g}: {100 * after:.2f}% (ideal device)")
    note(f"wrote {args.out}")
    return 0


@command("selftune", help="self-tuning of one simulated chip (no labels)",
         description="Puts the model on one chip (map files and/or maps drawn with --seed) and "
                     "reports accuracy on the ideal device, on the chip, and on the chip after "
                     "self-tuning on --calib-size unlabeled training images.")
def selftune(p: argparse.ArgumentParser):
    from qfv_brevitas.chip.variability import VariabilityModel
    from qfv_brevitas.chip.selftune import SELFTUNE_MODES
    from qfv_brevitas.studies.engine import CompareConfig

    add_checkpoint_args(p, None, None, inputs=_INPUTS)
    p.add_argument("--fault-map", help="a fault map file")
    p.add_argument("--variability-map", help="a variability map file")
    p.add_argument("--rate", type=float, help="draw stuck-at faults at this rate")
    p.add_argument("--sigma", type=float, help="draw LRS variability at this sigma/mu")
    p.add_argument("--chip-sigma", type=float, default=VariabilityModel.chip_sigma,
                   help="between-chip component of the drawn variability")
    p.add_argument("--ber", type=float, help="transient bit flips at this bit-error rate")
    p.add_argument("--calib-size", type=integer, default=CompareConfig.calib_size,
                   help="unlabeled training images to calibrate on")
    p.add_argument("--correction", choices=SELFTUNE_MODES, default="affine",
                   help="affine: a scale and shift per channel; shift: a shift only")
    p.add_argument("--passes", type=integer, default=None,
                   help="calibration passes pooled (default 8 with --ber, else 1)")
    return run_selftune


def run_selftune(args) -> int:
    """``qfv selftune``."""
    from qfv_brevitas.chip.bitflips import BitFlipModel, attach_bitflips
    from qfv_brevitas.chip.faults import FaultMap, FaultModel, attach_faults, sample_fault_map
    from qfv_brevitas.chip.selftune import calibration_batch, reference_statistics, self_tune
    from qfv_brevitas.chip.variability import (VariabilityMap, VariabilityModel,
                                               attach_variability, sample_variability_map)
    from qfv_brevitas.training.train import evaluate
    from qfv_brevitas.studies.scenario import exempt_layers

    if not any(v is not None for v in (args.fault_map, args.variability_map, args.rate, args.sigma,
                                       args.ber)):
        raise QfvError("say which chip: --fault-map/--var-map FILE, or draw one with --rate, "
                       "--sigma [--chip-sigma] and/or --ber (with --seed)")
    if args.fault_map and args.rate is not None:
        raise QfvError("give --fault-map or --rate, not both")
    if args.variability_map and args.sigma is not None:
        raise QfvError("give --var-map or --sigma, not both")
    model, info, train, test = load_for_device(args)
    calib = calibration_batch(train, args.calib_size, args.seed)
    ref = reference_statistics(model, calib)
    ideal = evaluate(model, test)
    exempt = exempt_layers(model, args.layers)
    if args.fault_map:
        attach_faults(model, FaultMap.load(args.fault_map))
    elif args.rate is not None:
        attach_faults(model, sample_fault_map(model, FaultModel(rate=args.rate, seed=args.seed,
                                                                layer_rates=exempt)))
    if args.variability_map:
        attach_variability(model, VariabilityMap.load(args.variability_map))
    elif args.sigma is not None:
        attach_variability(model, sample_variability_map(model, VariabilityModel(
            sigma=args.sigma, chip_sigma=args.chip_sigma, seed=args.seed,
            layer_sigmas=exempt)))
    flips = None
    if args.ber is not None:
        flips = BitFlipModel(args.ber, args.seed, exempt)
        attach_bitflips(model, flips)
    chip = evaluate(model, test)
    passes = args.passes if args.passes is not None else (8 if flips is not None else 1)
    tuning = self_tune(model, calib, ref, mode=args.correction, passes=passes)
    if flips is not None:
        attach_bitflips(model, flips)  # the same flips as the evaluation before
    tuned = evaluate(model, test)
    show(f"ideal device {100 * ideal:.2f}% | on this chip {100 * chip:.2f}% | after "
          f"self-tuning ({args.correction}, {args.calib_size} unlabeled images, "
          f"{len(tuning.layers)} layers) {100 * tuned:.2f}%")
    return 0
