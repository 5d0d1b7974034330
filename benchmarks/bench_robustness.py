#!/usr/bin/env python
"""Robustness to stuck-at faults and to weight-bit variability (paper sections 5.2, 5.3).

For each bit width ``b`` in ``--bits`` it takes the library's N-multiplier QAT model
W{b}A{b} (SmallCNN on scikit-learn's digits by default), trained once with

    run_experiment(out/w{b}a{b}, dataset, bits=(b,), variants=("nmult",), seed=seed,
                   progress=False)

(or, when ``out/w{b}a{b}/nmult_w{b}a{b}.pt`` already exists, loaded with
``qfv_brevitas.zoo.checkpoint.load_checkpoint``; ``--retrain`` forces training), and runs on it:

* faults: ``compare_faults(model, train, test, rates=[0, .05, .10, .20, .30], trials,
  methods=("none", "nearest_valid", "paper"), finetune=TrainConfig(epochs=E,
  lr=0.005, lambda_rise_epochs=2), seed=seed)``;
* variability: ``compare_variability(model, train, test, sigmas=[0, .10, .20, .40], trials,
  methods=("none", "chip_in_loop", "paper"), finetune=..., seed=seed)``.

Both with the library defaults otherwise: ``layers="inner"`` (the 8-bit first and last layers
stay ideal), SA1 share 0.5, LRS-only normal variability, remap every 4 epochs. Every method
sees the same maps (trial k uses seed + k: common random numbers), so the per-trial wins
printed next to the targets are paired comparisons. Each result is saved with
``result.save(out/w{b}a{b}, name)`` (CSV of every trial, JSON with the summary, PNG).

Targets (printed PASS/FAIL, never a non-zero exit), per bit width, on the means over trials:

* fault-aware at 10% bit-fault rate within 2 points of the fault-free model (rate 0);
* fault-aware ahead of (strictly above) nearest-valid at every rate >= 10%;
* variability-aware at sigma/mu 0.40 within 3 points of the variability-free model (sigma 0);
* variability-aware ahead of chip-in-loop at sigma/mu 0.20 and 0.40.

One digits test image is 0.28 points (360 test images).

    python benchmarks/bench_robustness.py [--bits 4 3] [--trials 10] [--seed 0]
        [--out runs/bench_robustness] [--finetune-epochs 4] [--finetune-lr 0.005]
        [--lambda-rise-epochs 2] [--dataset digits|idx] [--data-dir DIR]
        [--only faults|variability] [--retrain]

Heavy: each (level > 0, trial) runs one fine-tune per fine-tuning method, i.e. with the
defaults 40 fault-aware and 60 variability fine-tunes per bit width. Run it in the background.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from qfv_brevitas.zoo.checkpoint import load_checkpoint  # noqa: E402
from qfv_brevitas.zoo.data import DataError, load_dataset  # noqa: E402
from qfv_brevitas.studies.compare import compare_faults, compare_variability  # noqa: E402
from qfv_brevitas.studies.results import StudyResult  # noqa: E402
from qfv_brevitas.studies.experiment import run_experiment  # noqa: E402
from qfv_brevitas.training.train import TrainConfig, evaluate  # noqa: E402
from _machine import machine_line  # noqa: E402

RATES = [0.0, 0.05, 0.10, 0.20, 0.30]
SIGMAS = [0.0, 0.10, 0.20, 0.40]
FAULT_METHODS = ("none", "nearest_valid", "paper")
VAR_METHODS = ("none", "chip_in_loop", "paper")
#: Largest allowed drop, in accuracy points, of the aware method below the ideal-device model.
FAULT_MAX_DROP_AT_10 = 2.0
VAR_MAX_DROP_AT_40 = 3.0
EPS = 1e-9


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

def _by(result: StudyResult) -> Dict[tuple, dict]:
    return {(s["method"], s["level"]): s for s in result.summary()}


def _trial_accs(result: StudyResult, method: str, level: float) -> Dict[int, float]:
    return {r["trial"]: r["acc"] for r in result.rows
            if r["method"] == method and r["level"] == level}


def _wins(result: StudyResult, a: str, b: str, level: float) -> str:
    """Paired comparison over the trials (same maps): wins/ties/losses of ``a`` against ``b``."""
    xa, xb = _trial_accs(result, a, level), _trial_accs(result, b, level)
    w = sum(xa[k] > xb[k] + EPS for k in xa)
    lo = sum(xa[k] < xb[k] - EPS for k in xa)
    return f"per trial {w} wins / {len(xa) - w - lo} ties / {lo} losses"


def _mean_pts(by: Dict[tuple, dict], method: str, level: float) -> Optional[float]:
    s = by.get((method, level))
    return None if s is None else 100 * s["mean"]


def fault_targets(result: StudyResult) -> List[dict]:
    by = _by(result)
    out = []
    clean = _mean_pts(by, "none", 0.0)
    fa10 = _mean_pts(by, "paper", 0.10)
    if clean is not None and fa10 is not None:
        d = fa10 - clean
        out.append({"name": f"fault_aware at 10% within {FAULT_MAX_DROP_AT_10:g} points of the "
                            f"fault-free model ({clean:.2f}%)",
                    "value": f"{fa10:.2f}% ({d:+.2f} points)",
                    "ok": d >= -FAULT_MAX_DROP_AT_10 - EPS})
    for rate in [r for r in RATES if r >= 0.10 - EPS]:
        fa, nv = _mean_pts(by, "paper", rate), _mean_pts(by, "nearest_valid", rate)
        if fa is None or nv is None:
            continue
        out.append({"name": f"fault_aware ahead of nearest_valid at {100 * rate:g}%",
                    "value": f"{fa:.2f}% vs {nv:.2f}% ({fa - nv:+.2f} points; "
                             f"{_wins(result, 'paper', 'nearest_valid', rate)})",
                    "ok": fa > nv + EPS})
    return out


def variability_targets(result: StudyResult) -> List[dict]:
    by = _by(result)
    out = []
    clean = _mean_pts(by, "none", 0.0)
    va40 = _mean_pts(by, "paper", 0.40)
    if clean is not None and va40 is not None:
        d = va40 - clean
        out.append({"name": f"variability_aware at sigma/mu 0.40 within {VAR_MAX_DROP_AT_40:g} "
                            f"points of the variability-free model ({clean:.2f}%)",
                    "value": f"{va40:.2f}% ({d:+.2f} points)",
                    "ok": d >= -VAR_MAX_DROP_AT_40 - EPS})
    for sigma in (0.20, 0.40):
        va, cil = _mean_pts(by, "paper", sigma), _mean_pts(by, "chip_in_loop", sigma)
        if va is None or cil is None:
            continue
        out.append({"name": f"variability_aware ahead of chip_in_loop at sigma/mu {sigma:.2f}",
                    "value": f"{va:.2f}% vs {cil:.2f}% ({va - cil:+.2f} points; "
                             f"{_wins(result, 'paper', 'chip_in_loop', sigma)})",
                    "ok": va > cil + EPS})
    return out


def _print_targets(title: str, checks: List[dict]) -> None:
    print(f"Targets ({title}):")
    for c in checks:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['value']}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def base_model(out: Path, dataset: str, data_dir: Optional[str], bits: int, seed: int,
               retrain: bool):
    """The N-multiplier W{b}A{b} model: trained by run_experiment, read back from its
    checkpoint (so that a fresh run and a re-run start from the same bytes)."""
    ckpt = out / f"nmult_w{bits}a{bits}.pt"
    if retrain or not ckpt.is_file():
        t0 = time.perf_counter()
        _log(f"W{bits}A{bits}: training the base model: run_experiment({str(out)!r}, "
             f"dataset={dataset!r}, bits=({bits},), variants=('nmult',), seed={seed})")
        res = run_experiment(out, dataset=dataset, data_dir=data_dir, bits=(bits,),
                             variants=("nmult",), seed=seed, progress=False,
                             overwrite=True)
        _log(f"W{bits}A{bits}: float {100 * res['fp_acc']:.2f}%, nmult "
             f"{100 * res['runs'][0]['acc']:.2f}% ({time.perf_counter() - t0:.0f} s)")
    else:
        _log(f"W{bits}A{bits}: reusing {ckpt} (pass --retrain to train again)")
    model, info = load_checkpoint(ckpt)
    return model, info, ckpt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, the base training and the maps (trial k: seed+k)")
    p.add_argument("--out", default="runs/bench_robustness")
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--finetune-lr", type=float, default=0.005)
    p.add_argument("--lambda-rise-epochs", type=int, default=2)
    p.add_argument("--dataset", choices=("digits", "idx"), default="digits")
    p.add_argument("--data-dir", help="folder of the IDX files (--dataset idx)")
    p.add_argument("--only", choices=("faults", "variability"),
                   help="run one of the two studies only")
    p.add_argument("--retrain", action="store_true",
                   help="train the base model even if its checkpoint exists")
    args = p.parse_args(argv)
    if args.trials < 1 or args.finetune_epochs < 1:
        p.error("--trials and --finetune-epochs must be >= 1")

    t_all = time.perf_counter()
    print("bench_robustness: " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    print(machine_line(), flush=True)
    if args.dataset == "idx":
        if not args.data_dir or not Path(args.data_dir).exists():
            print(f"IDX data set requested but --data-dir {args.data_dir!r} is missing or does "
                  "not exist: skipping (nothing run)")
            return 0
    try:
        train, test, _, _ = load_dataset(args.dataset, args.data_dir, args.seed)
    except (DataError, ValueError) as e:
        print(f"data set {args.dataset!r} not available ({e}): skipping (nothing run)")
        return 0

    ft = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr,
                     lambda_rise_epochs=min(args.lambda_rise_epochs, args.finetune_epochs),
                     seed=args.seed)
    default_ft = (args.finetune_epochs, args.finetune_lr, args.lambda_rise_epochs) == (4, 0.005, 2)
    tag = "" if default_ft else (f"_ft{args.finetune_epochs}ep_lr{args.finetune_lr:g}"
                                 f"_rise{ft.lambda_rise_epochs}")
    print(f"data set {args.dataset} ({len(train)} train / {len(test)} test, one test image = "
          f"{100 / len(test):.2f} points); trials {args.trials}, seed {args.seed}; fine-tune "
          f"{ft}", flush=True)
    root = Path(args.out)
    summary = {"command": sys.argv, "machine": machine_line(), "args": vars(args),
               "finetune": asdict(ft), "bits": {}}
    all_checks = []
    for b in args.bits:
        out = root / f"w{b}a{b}"
        model, info, ckpt = base_model(out, args.dataset, args.data_dir, b, args.seed,
                                       args.retrain)
        acc = evaluate(model, test)
        saved = info["meta"].get("acc")
        note = "" if saved is None or abs(saved - acc) < EPS else \
            f"  <-- differs from the accuracy saved with the checkpoint ({100 * saved:.2f}%)"
        print(f"\n=== W{b}A{b}: {ckpt} test accuracy {100 * acc:.2f}%{note}", flush=True)
        entry = summary["bits"][str(b)] = {"checkpoint": str(ckpt), "acc": acc}

        if args.only in (None, "faults"):
            t0 = time.perf_counter()
            _log(f"W{b}A{b}: compare_faults rates={RATES} trials={args.trials} "
                 f"methods={FAULT_METHODS}")
            res = compare_faults(model, train, test, RATES, trials=args.trials,
                                 methods=FAULT_METHODS, finetune=ft, seed=args.seed,
                                 progress=False)
            dt = time.perf_counter() - t0
            res.meta["title"] = f"faults, nmult W{b}A{b}, {args.dataset}, {args.trials} trials"
            paths = res.save(out, f"faults{tag}", overwrite=True)
            print(f"\nFaults, W{b}A{b} (test accuracy %, mean +- std (min) over {args.trials} "
                  f"maps; {dt:.0f} s)")
            print(res.table())
            checks = fault_targets(res)
            _print_targets(f"faults W{b}A{b}", checks)
            print("wrote " + ", ".join(str(x) for x in paths.values()), flush=True)
            entry["faults"] = {"seconds": dt, "summary": res.summary(), "targets": checks}
            all_checks += [dict(c, bits=b) for c in checks]

        if args.only in (None, "variability"):
            t0 = time.perf_counter()
            _log(f"W{b}A{b}: compare_variability sigmas={SIGMAS} trials={args.trials} "
                 f"methods={VAR_METHODS}")
            res = compare_variability(model, train, test, SIGMAS, trials=args.trials,
                                      methods=VAR_METHODS, finetune=ft, seed=args.seed,
                                      progress=False)
            dt = time.perf_counter() - t0
            res.meta["title"] = (f"variability, nmult W{b}A{b}, {args.dataset}, "
                                 f"{args.trials} trials")
            paths = res.save(out, f"variability{tag}", overwrite=True)
            print(f"\nVariability, W{b}A{b} (test accuracy %, mean +- std (min) over "
                  f"{args.trials} maps; {dt:.0f} s)")
            print(res.table())
            checks = variability_targets(res)
            _print_targets(f"variability W{b}A{b}", checks)
            print("wrote " + ", ".join(str(x) for x in paths.values()), flush=True)
            entry["variability"] = {"seconds": dt, "summary": res.summary(), "targets": checks}
            all_checks += [dict(c, bits=b) for c in checks]

    wall = time.perf_counter() - t_all
    print("\nAll targets:")
    for c in all_checks:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  W{c['bits']}A{c['bits']}: {c['name']}: "
              f"{c['value']}")
    n_fail = sum(not c["ok"] for c in all_checks)
    print(f"{len(all_checks) - n_fail}/{len(all_checks)} targets met")
    print(f"\nTotal {wall:.0f} s ({wall / 60:.1f} min)")
    print(machine_line())
    summary.update(wall_s=wall, targets=all_checks)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"summary{tag}.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {root / f'summary{tag}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
