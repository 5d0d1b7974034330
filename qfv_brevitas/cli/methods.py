"""``qfv compare``, ``qfv bitflips`` and ``qfv selftune``: the related methods from the command
line (registered through :data:`qfv_brevitas.cli.app._COMMAND_MODULES`).

* ``qfv compare CKPT``: every chosen method on the same maps over stuck-at, bit-flip and
  variability scenarios; one table (printed, ``compare.md``), CSV/JSON and one plot.
* ``qfv bitflips eval CKPT``: Monte Carlo accuracy under transient bit flips;
  ``qfv bitflips finetune CKPT``: random-bit-error training, saved as a checkpoint.
* ``qfv selftune CKPT``: one simulated chip (a map file, or drawn), accuracy before and after
  self-tuning on an unlabeled calibration batch.
"""
from __future__ import annotations

import argparse
from typing import Optional

from qfv_brevitas.studies.compare import METHODS

__all__ = ["register"]


def _common(p: argparse.ArgumentParser, out_default: Optional[str], out: Optional[str] = None,
            names=()) -> None:
    from qfv_brevitas.cli.app import declare_io

    declare_io(p, out, names, inputs=("checkpoint", "data_dir", "fault_map", "var_map"))
    p.add_argument("checkpoint", help="a model saved by qfv demo/train (or a fine-tune)")
    p.add_argument("--dataset", choices=("digits", "idx"), default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int, default=0, help="seed of the maps / flip streams")
    p.add_argument("--layers", choices=("inner", "all"), default="inner",
                   help="inner: first and last (8-bit) layers stay ideal (paper setup)")
    if out_default is not None:
        p.add_argument("--out", default=out_default)
    p.add_argument("--no-progress", action="store_true")


def _finetune(p: argparse.ArgumentParser, epochs: int, rise: int) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help="epochs of every fine-tune")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--lambda-rise-epochs", type=int, default=rise)


def register(sub) -> None:
    p = sub.add_parser(
        "compare", help="the related methods side by side on the same maps: one table, one plot",
        description="Runs each --methods on --trials seeded maps per scenario (stuck-at rates, "
                    "bit-error rates, LRS sigmas with and without a between-chip component) "
                    "and writes compare.{md,csv,json,png} to --out. Per-map methods do not "
                    "apply to transient bit flips (n/a).")
    _common(p, "qfv-compare", "results", [f"compare.{k}" for k in ("csv", "json", "md", "png")])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--stuck", type=float, nargs="*", default=[0.1, 0.2],
                   help="stuck-at bit-fault rates")
    p.add_argument("--ber", type=float, nargs="*", default=[0.01, 0.05], help="bit-error rates")
    p.add_argument("--sigmas", type=float, nargs="*", default=[0.2, 0.4],
                   help="LRS sigma/mu of the per-cell variability")
    p.add_argument("--chip-sigma", type=float, default=0.1,
                   help="between-chip sigma: each --sigmas scenario again with this shared "
                        "component (0: not)")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--no-selftune-on-top", action="store_true",
                   help="do not report every method after self-tuning too")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--selftune-passes", type=int, default=8,
                   help="bit-flip scenarios: calibration passes (flip draws) pooled")
    p.add_argument("--rbe-rate", type=float, default=0.02,
                   help="bit-error rate of random-bit-error training")
    p.add_argument("--sam-rho", type=float, default=0.05, help="SAM radius of saq, saq_aware")
    p.add_argument("--remap-every", type=int, default=4)
    _finetune(p, 2, 1)
    p.set_defaults(_run=_run_compare)

    b = sub.add_parser("bitflips", help="transient bit flips: Monte Carlo evaluation, "
                                        "random-bit-error training")
    bsub = b.add_subparsers(dest="action", required=True)
    p = bsub.add_parser("eval", help="accuracy under random bit flips, seeded runs per rate")
    _common(p, "qfv-bitflips", "results", [f"bitflips_eval.{k}" for k in ("csv", "json", "png")])
    p.add_argument("--rates", type=float, nargs="+", default=[0, 0.01, 0.02, 0.05])
    p.add_argument("--trials", type=int, default=10)
    p.set_defaults(_run=_run_bitflips)
    p = bsub.add_parser("finetune", help="random-bit-error training; saves the model")
    _common(p, "rbe.pt", "file")
    p.add_argument("--rate", type=float, required=True, help="training bit-error rate")
    _finetune(p, 4, 2)
    p.set_defaults(_run=_run_bitflips)

    p = sub.add_parser("selftune", help="self-tuning of one simulated chip (no labels)",
                       description="Puts the model on one chip (map files and/or maps drawn "
                                   "with --seed) and reports accuracy on the ideal device, on "
                                   "the chip, and on the chip after self-tuning on "
                                   "--calib-size unlabeled training images.")
    _common(p, None)
    p.add_argument("--fault-map", help="a fault map file")
    p.add_argument("--var-map", help="a variability map file")
    p.add_argument("--rate", type=float, help="draw stuck-at faults at this rate")
    p.add_argument("--sigma", type=float, help="draw LRS variability at this sigma/mu")
    p.add_argument("--chip-sigma", type=float, default=0.0,
                   help="between-chip component of the drawn variability")
    p.add_argument("--ber", type=float, help="transient bit flips at this bit-error rate")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--mode", choices=("affine", "shift"), default="affine")
    p.add_argument("--passes", type=int, default=None,
                   help="calibration passes pooled (default 8 with --ber, else 1)")
    p.set_defaults(_run=_run_selftune)


def _run_compare(args) -> int:
    from qfv_brevitas.cli.app import _load_for_device
    from qfv_brevitas.studies.compare import CompareConfig, compare_methods, scenarios
    from qfv_brevitas.core.train import TrainConfig

    model, info, train, test = _load_for_device(args)
    ft = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed,
                     lambda_rise_epochs=min(args.lambda_rise_epochs, args.epochs))
    cfg = CompareConfig(trials=args.trials, seed=args.seed, finetune=ft,
                        selftune_on_top=not args.no_selftune_on_top, calib_size=args.calib_size,
                        selftune_passes=args.selftune_passes,
                        rbe_rate=args.rbe_rate, sam_rho=args.sam_rho,
                        remap_every=args.remap_every, layers=args.layers)
    scs = scenarios(args.stuck, args.ber, args.sigmas, args.chip_sigma)
    res = compare_methods(model, train, test, scs, args.methods, cfg,
                          progress=not args.no_progress, workers=args.workers,
                          distributed=args.distributed)
    res.meta["title"] = f"{info['arch']} {args.checkpoint}, {args.trials} maps per scenario"
    from qfv_brevitas.cli.app import _is_output_rank

    if not _is_output_rank(args):
        return 0
    paths = res.save(args.out, "compare", overwrite=args.force)
    print(res.table())
    print()
    for sc, best in res.winners().items():
        plain = res.winners(with_selftune=False).get(sc, [])
        print(f"{sc}: best {', '.join(best)}; without self-tuning {', '.join(plain)}")
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _run_bitflips(args) -> int:
    from qfv_brevitas.chip import bitflips as B
    from qfv_brevitas.zoo.checkpoint import save_checkpoint
    from qfv_brevitas.cli.app import _finetune_cfg, _load_for_device, meta_of
    from qfv_brevitas.studies.montecarlo import _exempt
    from qfv_brevitas.core.train import evaluate

    model, info, train, test = _load_for_device(args)
    if args.action == "eval":
        res = B.evaluate_bitflips(model, test, args.rates, trials=args.trials, seed=args.seed,
                                  layers=args.layers, progress=not args.no_progress,
                                  workers=args.workers, distributed=args.distributed)
        res.meta["title"] = f"{info['arch']} {args.checkpoint}"
        from qfv_brevitas.cli.app import _is_output_rank

        if not _is_output_rank(args):
            return 0
        paths = res.save(args.out, "bitflips_eval", overwrite=args.force)
        print(res.table())
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    flips = B.BitFlipModel(args.rate, args.seed, _exempt(model, args.layers))
    before = evaluate(model, test)
    B.random_bit_error_finetune(model, train, None, _finetune_cfg(args), flips,
                                progress=not args.no_progress)
    after = evaluate(model, test)
    save_checkpoint(args.out, model, info["arch"], info["input_shape"], info["num_classes"],
                    info["config"], overwrite=args.force, **{**meta_of(info), "acc": after,
                                       "method": "random_bit_error", "rbe_rate": args.rate,
                                       "source": str(args.checkpoint)})
    print(f"ideal device {100 * before:.2f}% -> after random-bit-error training at BER "
          f"{args.rate:g}: {100 * after:.2f}% (ideal device)")
    print(f"wrote {args.out}")
    return 0


def _run_selftune(args) -> int:
    from qfv_brevitas.studies import montecarlo as E
    from qfv_brevitas.chip.bitflips import BitFlipModel, attach_bitflips
    from qfv_brevitas.cli.app import _load_for_device
    from qfv_brevitas.chip.faults import FaultMap, FaultModel, attach_faults, sample_fault_map
    from qfv_brevitas.chip.selftune import calibration_batch, reference_statistics, self_tune
    from qfv_brevitas.core.train import evaluate
    from qfv_brevitas.chip.variability import (VariabilityMap, VariabilityModel, attach_variability,
                              sample_variability_map)

    if not any(v is not None for v in (args.fault_map, args.var_map, args.rate, args.sigma,
                                       args.ber)):
        raise ValueError("say which chip: --fault-map/--var-map FILE, or draw one with --rate, "
                         "--sigma [--chip-sigma] and/or --ber (with --seed)")
    if args.fault_map and args.rate is not None:
        raise ValueError("give --fault-map or --rate, not both")
    if args.var_map and args.sigma is not None:
        raise ValueError("give --var-map or --sigma, not both")
    model, info, train, test = _load_for_device(args)
    calib = calibration_batch(train, args.calib_size, args.seed)
    ref = reference_statistics(model, calib)
    ideal = evaluate(model, test)
    exempt = E._exempt(model, args.layers)
    if args.fault_map:
        attach_faults(model, FaultMap.load(args.fault_map))
    elif args.rate is not None:
        attach_faults(model, sample_fault_map(model, FaultModel(rate=args.rate, seed=args.seed,
                                                                layer_rates=exempt)))
    if args.var_map:
        attach_variability(model, VariabilityMap.load(args.var_map))
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
    tuning = self_tune(model, calib, ref, mode=args.mode, passes=passes)
    if flips is not None:
        attach_bitflips(model, flips)  # the same flips as the evaluation before
    tuned = evaluate(model, test)
    print(f"ideal device {100 * ideal:.2f}% | on this chip {100 * chip:.2f}% | after "
          f"self-tuning ({args.mode}, {args.calib_size} unlabeled images, "
          f"{len(tuning.layers)} layers) {100 * tuned:.2f}%")
    return 0
