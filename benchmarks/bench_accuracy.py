#!/usr/bin/env python
"""Accuracy of N-multiplier QAT against full precision and the fixed/learned-step baselines.

For each seed in ``--seeds`` this runs the library's main job exactly as ``qfv demo`` does
(library defaults: SmallCNN on scikit-learn's bundled 8x8 digits, float model trained 30
epochs at lr 0.05, then QAT of a copy for 15 epochs at lr 0.01 with the regularizer's lambda
rising 100 -> 2000 over the last 5 epochs, batch 64):

    run_experiment(out/seed{s}, dataset="digits", bits=(4, 3),
                   variants=("fixed", "step", "nmult"), seed=s,
                   progress=False, save_models=False)

and prints, per (variant, W{b}A{b}), the mean and standard deviation over seeds of the test
accuracy and of its difference to the same seed's full-precision model, plus the
full-precision mean/std. Standard deviations are sample standard deviations (n - 1); with a
single seed they are 0.

Targets (printed PASS/FAIL, never a non-zero exit):

* W4A4 nmult within 1.0 point of full precision (mean delta >= -1.0);
* W3A3 nmult within 2.0 points of full precision (mean delta >= -2.0);
* nmult mean accuracy >= fixed mean accuracy at each bit width.

Writes a JSON summary to ``--out``/summary.json (each seed's own ``results.json`` and
``levels.png`` go to ``--out``/seed{s}). Three seeds take about 5-10 minutes on 2 cores.

    python benchmarks/bench_accuracy.py [--seeds 0 1 2] [--out runs/bench_accuracy]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


from qfv_brevitas.studies.experiment import format_results, run_experiment  # noqa: E402
from _machine import _loadavg, machine_info  # noqa: E402

BITS = (4, 3)
VARIANTS = ("fixed", "step", "nmult")
#: Largest allowed drop of nmult below full precision, in accuracy points, per bit width.
TARGET_MAX_DROP = {4: 1.0, 3: 2.0}
#: Tolerance of the comparisons, in points: means of equal correct counts may differ in the
#: last float bit (the test set has 360 images, so one image is 0.28 points).
EPS = 1e-9


def mean_std(xs: List[float]) -> Tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(per_seed: List[dict]) -> dict:
    """Mean/std over seeds, in accuracy points (percent)."""
    fp = [100 * r["fp_acc"] for r in per_seed]
    m, s = mean_std(fp)
    out: Dict[str, dict] = {"float": {"acc_mean": m, "acc_std": s, "acc": fp}}
    keys = []
    for r in per_seed[0]["runs"]:
        keys.append((r["variant"], r["weight_bits"]))
    for variant, b in keys:
        accs, deltas = [], []
        for res in per_seed:
            run = next(x for x in res["runs"]
                       if x["variant"] == variant and x["weight_bits"] == b)
            accs.append(100 * run["acc"])
            deltas.append(100 * run["delta_vs_fp"])
        am, as_ = mean_std(accs)
        dm, ds = mean_std(deltas)
        out[f"{variant} W{b}A{b}"] = {"variant": variant, "bits": b, "acc_mean": am,
                                      "acc_std": as_, "delta_mean": dm, "delta_std": ds,
                                      "acc": accs, "delta": deltas}
    return out


def check_targets(summary: dict) -> List[dict]:
    checks = []
    for b, drop in TARGET_MAX_DROP.items():
        row = summary.get(f"nmult W{b}A{b}")
        if row is None:
            continue
        checks.append({"name": f"nmult W{b}A{b} mean delta vs float >= -{drop:.1f} points",
                       "value": row["delta_mean"], "ok": row["delta_mean"] >= -drop - EPS})
    for b in BITS:
        n, f = summary.get(f"nmult W{b}A{b}"), summary.get(f"fixed W{b}A{b}")
        if n is None or f is None:
            continue
        checks.append({"name": f"nmult W{b}A{b} mean acc >= fixed W{b}A{b} mean acc",
                       "value": n["acc_mean"] - f["acc_mean"],
                       "ok": n["acc_mean"] >= f["acc_mean"] - EPS})
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench_accuracy",
                   help="output folder (summary.json, seed{s}/results.json)")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")

    m = machine_info()
    print("bench_accuracy: run_experiment(dataset='digits', arch='small_cnn', bits=(4, 3), "
          "variants=('fixed', 'step', 'nmult')) with the library (qfv demo) defaults, "
          f"seeds {args.seeds}")
    print(f"Machine: {m['platform']}, {m['processor']}, cpu_count={m['cpu_count']}, "
          f"python {m['python']}, torch {m['torch']}, "
          f"torch.get_num_threads()={m['torch_num_threads']}, "
          f"load average at start {m['loadavg_start']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed, t_all = [], time.perf_counter()
    for s in args.seeds:
        t0 = time.perf_counter()
        res = run_experiment(out / f"seed{s}", dataset="digits", bits=BITS, variants=VARIANTS,
                             seed=s, progress=False, save_models=False, overwrite=True)
        per_seed.append(res)
        print(f"\n{format_results(res)}\n(seed {s}: {time.perf_counter() - t0:.0f} s)",
              flush=True)
    wall = time.perf_counter() - t_all

    summary = summarize(per_seed)
    n = len(per_seed)
    print(f"\nSummary over {n} seed(s) {args.seeds} (test accuracy in %, delta = accuracy minus "
          "the same seed's float model, in points; std is the sample std, n-1)")
    print(f"{'model':<14} {'acc mean':>9} {'acc std':>8} {'delta mean':>11} {'delta std':>10}")
    print("-" * 56)
    f = summary["float"]
    print(f"{'float':<14} {f['acc_mean']:>9.2f} {f['acc_std']:>8.2f} {'':>11} {'':>10}")
    for b in BITS:
        for v in VARIANTS:
            row = summary.get(f"{v} W{b}A{b}")
            if row is None:
                continue
            print(f"{v + f' W{b}A{b}':<14} {row['acc_mean']:>9.2f} {row['acc_std']:>8.2f} "
                  f"{row['delta_mean']:>+11.2f} {row['delta_std']:>10.2f}")

    checks = check_targets(summary)
    print("\nTargets:")
    for c in checks:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['name']}  (measured {c['value']:+.2f})")
    print(f"\nTotal {wall:.0f} s; load average at end {_loadavg()}")
    if n > 1:
        print("(differences below about one std are within seed-to-seed noise)")

    doc = {"seeds": args.seeds, "machine": m, "loadavg_end": _loadavg(), "wall_s": wall,
           "dataset": per_seed[0]["dataset"], "arch": per_seed[0]["arch"],
           "num_train": per_seed[0]["num_train"], "num_test": per_seed[0]["num_test"],
           # Training hyper-parameters (the same for every seed but for their "seed" field).
           "fp_train": {k: v for k, v in per_seed[0]["fp_train"].items() if k != "seed"},
           "q_train": {k: v for k, v in per_seed[0]["q_train"].items() if k != "seed"},
           "summary": summary, "targets": checks,
           "per_seed": [{"seed": r["seed"], "fp_acc": r["fp_acc"], "seconds": r["seconds"],
                         "runs": [{k: x[k] for k in ("variant", "weight_bits", "act_bits",
                                                      "acc", "delta_vs_fp")}
                                  for x in r["runs"]]} for r in per_seed]}
    (out / "summary.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
