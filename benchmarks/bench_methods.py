#!/usr/bin/env python
"""The seed papers' methods side by side on the same model, data and maps (issue 6).

Base model: the library's N-multiplier W4A4 QAT model (SmallCNN on scikit-learn's digits by
default), trained once with

    run_experiment(out/w4a4, dataset, bits=(4,), variants=("nmult",), seed=seed, progress=False)

(the ``qfv demo`` defaults) and read back with ``load_checkpoint``; a later run reuses
``out/w4a4/nmult_w4a4.pt`` unless ``--retrain``, and ``--checkpoint PATH`` takes any
``qfv demo/train`` checkpoint instead. On it:

    compare_methods(model, train, test, scenarios(stuck=[.1, .2], ber=[.01, .05],
                    sigmas=[.2, .4], chip_sigma=C), METHODS,
                    CompareConfig(trials=T, seed=seed, finetune=TrainConfig(epochs=E, lr=0.005,
                    lambda_rise_epochs=1, seed=seed), calib_size=64, rbe_rate=0.02,
                    sam_rho=0.05))

i.e. every method of :mod:`qfv_brevitas.studies.methods` (none, nearest_valid, the paper's regularizer,
the Gaussian and SinReQ shapes, chip-in-loop, SAQ on the fault/variability-aware fine-tune,
random-bit-error training, SAQ, self-tuning alone) and each of them again after self-tuning, at
stuck-at rates 10/20%, bit-error rates 1/5% and LRS sigma/mu 20/40% without and with a
between-chip component of sigma C (default 0.1); ``T`` maps per scenario (trial k = seed + k
for every method: paired comparisons). The 8-bit first and last layers stay ideal
(``layers="inner"``).

It prints the table (mean +- std (min) over the maps, best per scenario in bold), the winner of
each scenario with and without self-tuning, every method's mean against the paper's method
(the reference measured in the same run; difference in points with per-map wins/ties/losses),
and the recovery self-tuning gives on top of each method. It saves the comparison with
``result.save(out, "methods")`` (CSV of every map, JSON, Markdown table, PNG) and
``out/summary.json``. One digits test image is 0.28 points.

    python benchmarks/bench_methods.py [--trials 10] [--seed 0] [--out runs/bench_methods]
        [--epochs 2] [--lr 0.005] [--lambda-rise-epochs 1] [--chip-sigma 0.1]
        [--rbe-rate 0.02] [--sam-rho 0.05] [--calib-size 64] [--only faults bitflips
        variability] [--methods ...] [--checkpoint PATH] [--dataset digits|idx]
        [--data-dir DIR] [--retrain]

``--shape-cost`` runs only a cost check of the regularizer shapes instead: forward+backward
of ``ideal_distance`` (ideal grid) and of ``aware_codes`` +
``chip_distance`` (sigma/mu 0.2 variability map: what the regularizer computes per
step) on ``--shape-weights`` seeded weights (default 1M) at N = 4 and 8, each shape in a fresh
process: median time of 3 runs after a warm-up and the extra peak RSS of one pass
(``ru_maxrss`` after minus before), beside the paper's ``"sq"`` measured the same way (ratio),
and beside the ``n * 2**N * 4`` bytes a single materialised float32 candidate tensor would take.

Heavy: each (scenario with a map, trial) runs five fine-tunes (paper, gauss, sin, chip_in_loop,
saq_aware: the last at twice the cost); with the defaults that is 300 fine-tunes of 2 epochs.
Run it in the background.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from qfv_brevitas.zoo.checkpoint import load_checkpoint  # noqa: E402
from qfv_brevitas.studies.compare import compare_methods  # noqa: E402
from qfv_brevitas.studies.engine import CompareConfig  # noqa: E402
from qfv_brevitas.studies.methods import METHODS  # noqa: E402
from qfv_brevitas.studies.results import StudyResult  # noqa: E402
from qfv_brevitas.studies.scenario import scenarios  # noqa: E402
from qfv_brevitas.zoo.data import DataError, load_dataset  # noqa: E402
from qfv_brevitas.studies.experiment import run_experiment  # noqa: E402
from qfv_brevitas.training.train import TrainConfig, evaluate  # noqa: E402
from _machine import machine_info, machine_line  # noqa: E402

STUCK = [0.10, 0.20]
BER = [0.01, 0.05]
SIGMAS = [0.20, 0.40]
EPS = 1e-9


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_model(out: Path, dataset: str, data_dir: Optional[str], seed: int, retrain: bool):
    ckpt = out / "nmult_w4a4.pt"
    if retrain or not ckpt.is_file():
        t0 = time.perf_counter()
        _log(f"training the base model: run_experiment({str(out)!r}, dataset={dataset!r}, "
             f"bits=(4,), variants=('nmult',), seed={seed})")
        res = run_experiment(out, dataset=dataset, data_dir=data_dir, bits=(4,),
                             variants=("nmult",), seed=seed, progress=False, overwrite=True)
        _log(f"float {100 * res['fp_acc']:.2f}%, nmult W4A4 {100 * res['runs'][0]['acc']:.2f}% "
             f"({time.perf_counter() - t0:.0f} s)")
    else:
        _log(f"reusing {ckpt} (pass --retrain to train again)")
    return ckpt


def _accs(res: StudyResult, sc: str, method: str) -> Dict[int, float]:
    return {r["trial"]: r["acc"] for r in res.rows
            if r["scenario"] == sc and r["method"] == method}


def _paired(res: StudyResult, sc: str, a: str, b: str) -> str:
    xa, xb = _accs(res, sc, a), _accs(res, sc, b)
    keys = sorted(set(xa) & set(xb))
    w = sum(xa[k] > xb[k] + EPS for k in keys)
    lo = sum(xa[k] < xb[k] - EPS for k in keys)
    return f"{w}/{len(keys) - w - lo}/{lo}"


def against_reference(res: StudyResult, ref: str = "paper") -> List[str]:
    """Each method's mean minus the reference method's, per scenario (points), with per-map
    wins/ties/losses."""
    summ = {(s["scenario"], s["method"]): s for s in res.summary()}
    scs = [s for s in res.scenario_labels if s != "ideal device"]
    lines = [f"| method vs {ref} | " + " | ".join(scs) + " |", "|---" * (len(scs) + 1) + "|"]
    for m in res.methods:
        if m == ref:
            continue
        cells = []
        for sc in scs:
            a, b = summ.get((sc, m)), summ.get((sc, ref))
            if a is None or b is None:
                cells.append("n/a")
                continue
            cells.append(f"{100 * (a['mean'] - b['mean']):+.2f} ({_paired(res, sc, m, ref)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def selftune_recovery(res: StudyResult) -> List[str]:
    """Per method and scenario: mean with self-tuning minus mean without (points), with
    per-map wins/ties/losses of the self-tuned model."""
    summ = {(s["scenario"], s["method"]): s for s in res.summary()}
    scs = [s for s in res.scenario_labels if s != "ideal device"]
    lines = ["| self-tuning on top of | " + " | ".join(scs) + " |",
             "|---" * (len(scs) + 1) + "|"]
    for m in [m for m in res.methods if "selftune" not in m]:
        tuned = "selftune" if m == "none" else f"{m}+selftune"
        cells = []
        for sc in scs:
            a, b = summ.get((sc, tuned)), summ.get((sc, m))
            if a is None or b is None:
                cells.append("n/a")
                continue
            cells.append(f"{100 * (a['mean'] - b['mean']):+.2f} ({_paired(res, sc, tuned, m)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _shape_cost_child(shape: str, where: str, n: int, bits: int) -> None:
    """One measurement, in its own process: prints a JSON line."""
    from qfv_brevitas.core import device as D
    from qfv_brevitas.core import levels as L
    from qfv_brevitas.core.distance import chip_distance, ideal_distance

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1, n, generator=g) * 0.05).requires_grad_()
    r, c = L.uniform_multipliers(L.lsq_step_init(w.detach(), bits), bits)
    r = (r * (1 + 0.1 * torch.rand(r.shape, generator=g))).requires_grad_()
    c = c.clone().requires_grad_()
    lrs = None
    if where == "variability":
        lrs = (1 + 0.2 * torch.randn(1, n, bits, generator=g)).clamp(min=0)

    def once():
        w.grad = r.grad = c.grad = None
        if where == "ideal":
            out = ideal_distance(w, L.level_table(r, c), shape)
        else:  # as the regularizer does it every step: aware codes, then the distance
            codes = D.aware_codes(w.detach(), r, c, lrs=lrs)
            out = chip_distance(w, r, c, lrs=lrs, shape=shape, codes=codes)
        out.backward()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    once()  # warm-up, and the peak of one pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"shape": shape, "where": where, "n": n, "bits": bits,
                      "median_s": statistics.median(times),
                      "extra_peak_mib": (peak - base) / 1024}))


def shape_cost(n: int) -> int:
    print(f"Regularizer shapes: forward+backward on {n} weights, per tensor, one process per "
          "measurement (median of 3 after a warm-up; extra peak RSS of one pass)\n")
    print("| grid | N | shape | median s | x sq | extra peak MiB | x sq | n*2^N float32 MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for where in ("ideal", "variability"):
        for bits in (4, 8):
            rows = {}
            for shape in ("sq", "gauss", "sin"):
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child",
                                      shape, where, str(n), str(bits)],
                                     capture_output=True, text=True, check=True)
                rows[shape] = json.loads(out.stdout.strip().splitlines()[-1])
            sq = rows["sq"]
            for shape, m in rows.items():
                # (below 1 MiB the peak is within ru_maxrss's slack: no ratio)
                mem = (f"{m['extra_peak_mib'] / sq['extra_peak_mib']:.2f}"
                       if sq["extra_peak_mib"] >= 1 else "-")
                print(f"| {where} | {bits} | {shape} | {m['median_s']:.3f} | "
                      f"{m['median_s'] / sq['median_s']:.2f} | {m['extra_peak_mib']:.0f} | "
                      f"{mem} | {n * 2 ** bits * 4 / 2 ** 20:.0f} |", flush=True)
    print("\n" + machine_line())
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        _shape_cost_child(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, the base training and the maps (trial k: "
                        "seed + k)")
    p.add_argument("--out", default="runs/bench_methods")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every fine-tune")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--lambda-rise-epochs", type=int, default=1)
    p.add_argument("--chip-sigma", type=float, default=0.1)
    p.add_argument("--rbe-rate", type=float, default=0.02)
    p.add_argument("--sam-rho", type=float, default=0.05)
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--only", nargs="+", choices=("faults", "bitflips", "variability"),
                   help="run these scenario kinds only")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--checkpoint", help="a qfv demo/train checkpoint to use as the base model")
    p.add_argument("--dataset", choices=("digits", "idx"), default="digits")
    p.add_argument("--data-dir", help="folder of the IDX files (--dataset idx)")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--shape-cost", action="store_true",
                   help="only measure time and memory of the regularizer shapes")
    p.add_argument("--shape-weights", type=int, default=1_000_000)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.shape_cost:
        print("bench_methods: " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
        return shape_cost(args.shape_weights)

    t_all = time.perf_counter()
    print("bench_methods: " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    print(machine_line(), flush=True)
    if args.dataset == "idx" and (not args.data_dir or not Path(args.data_dir).exists()):
        print(f"IDX data set requested but --data-dir {args.data_dir!r} is missing or does not "
              "exist: skipping (nothing run)")
        return 0
    try:
        train, test, _, _ = load_dataset(args.dataset, args.data_dir, args.seed)
    except (DataError, ValueError) as e:
        print(f"data set {args.dataset!r} not available ({e}): skipping (nothing run)")
        return 0
    root = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else base_model(
        root / "w4a4", args.dataset, args.data_dir, args.seed, args.retrain)
    model, info = load_checkpoint(ckpt)
    clean = evaluate(model, test)
    print(f"base model {ckpt}: {info['arch']}, test accuracy {100 * clean:.2f}% "
          f"({len(test)} test images, one image = {100 / len(test):.2f} points)", flush=True)

    kinds = set(args.only or ("faults", "bitflips", "variability"))
    scs = scenarios(STUCK if "faults" in kinds else [], BER if "bitflips" in kinds else [],
                    SIGMAS if "variability" in kinds else [], args.chip_sigma)
    ft = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed,
                     lambda_rise_epochs=min(args.lambda_rise_epochs, args.epochs))
    cfg = CompareConfig(trials=args.trials, seed=args.seed, finetune=ft,
                        calib_size=args.calib_size, rbe_rate=args.rbe_rate,
                        sam_rho=args.sam_rho)
    _log(f"compare_methods: {len(scs)} scenarios ({', '.join(s.label for s in scs)}), "
         f"{args.trials} maps each, methods {args.methods}, {cfg}")
    t0 = time.perf_counter()
    res = compare_methods(model, train, test, scs, args.methods, cfg, progress=False)
    dt = time.perf_counter() - t0
    res.meta["title"] = (f"{info['arch']} W4A4 on {args.dataset}, {args.trials} maps per "
                         f"scenario, fine-tunes {args.epochs} epochs")
    tag = "" if args.only is None else "_" + "_".join(sorted(kinds))
    paths = res.save(root, f"methods{tag}", overwrite=True)

    print(f"\nTest accuracy %, mean +- std (min) over {args.trials} maps ({dt:.0f} s); best "
          "mean per scenario in bold:\n")
    print(res.table())
    print("\nWinner per scenario (highest mean):")
    best, plain = res.winners(), res.winners(with_selftune=False)
    for sc in best:
        print(f"  {sc}: {', '.join(best[sc])}; without self-tuning: {', '.join(plain[sc])}")
    if "paper" in res.methods:
        print("\nAgainst the paper's regularizer (reference, same run): mean difference in "
              "points (per-map wins/ties/losses):\n")
        print("\n".join(against_reference(res)))
    if any("selftune" in m for m in res.methods):
        print("\nRecovery by self-tuning: mean with minus mean without, points "
              "(per-map wins/ties/losses):\n")
        print("\n".join(selftune_recovery(res)))
    wall = time.perf_counter() - t_all
    print(f"\nTotal {wall:.0f} s ({wall / 60:.1f} min)")
    print(machine_line())
    print("wrote " + ", ".join(str(x) for x in paths.values()))
    summary = {"command": sys.argv, "machine": machine_info(), "args": vars(args),
               "checkpoint": str(ckpt), "clean_acc": clean, "seconds": dt, "wall_s": wall,
               "summary": res.summary(), "winners": best, "winners_without_selftune": plain}
    (root / f"summary{tag}.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {root / f'summary{tag}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
