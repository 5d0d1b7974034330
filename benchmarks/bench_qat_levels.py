#!/usr/bin/env python
"""QAT with levels that keep learning (issue 10): which initialisation and level updates win,
and against stock Brevitas uniform QAT, paired over seeds.

Per seed: the ``qfv demo`` float SmallCNN on scikit-learn's digits (30 epochs, lr 0.05; cached
in ``--out``/float_seed{s}.pt so chunks share it). From that same float model, for each bit
width b (W{b}A{b}: first/last layers 8-bit, inner activations b-bit learned scale) and each
length E in ``--epochs``, every method below is trained with the same ``TrainConfig(epochs=E,
lr=0.01, lambda_rise_epochs=min(5, E), seed=s)`` (same data order) and evaluated on the 360
test images:

* ``fixed``, ``step``: the uniform variants with LSQ's grid (the library's baselines);
* ``fixed-fit``, ``step-fit``: the same from the best-MSE uniform grid (``init="fit"``);
* ``nmult-lsq``: N-multipliers, LSQ start, paper mode (the defaults before issue 10);
* ``nmult-fit``: N-multipliers fitted to the float weights, paper mode;
* ``nmult-fit-refit``: ... plus a closed-form refit of ``(r, c)`` every ``--refit-every`` steps;
* ``nmult-both-fit``, ``nmult-both-fit-refit``: the same with ``mode="both"`` (STE forward:
  ``r``/``c`` get the task loss's gradient, plus the regularizer);
* ``nmult-ste-fit``: STE forward only, no regularizer;
* ``brevitas``: stock Brevitas QAT on the same layers: ``Int8WeightPerTensorFloat`` at b bits
  and ``Uint8ActPerTensorFloat`` (``Int8ActPerTensorFloat`` where inputs can be negative) at b
  bits, first/last at 8 (:func:`qfv_brevitas.studies.ptq.brevitas_uniform`), plain STE training.

Per (b, E) it prints each method's mean accuracy over the seeds and, paired by seed, the mean
difference to a reference method (``--ref``) with its standard error (sample std / sqrt(n)).
Results go to ``--out``/qat_*.json (one per chunk); ``--summarize`` merges every chunk in
``--out`` and prints the tables. One test image is 0.28 points.

    python benchmarks/bench_qat_levels.py --bits 3 --seeds 0 1 2 3 4 --epochs 4 15
    python benchmarks/bench_qat_levels.py --summarize
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from qfv_brevitas import NMultConfig, quantize_model  # noqa: E402
from qfv_brevitas.zoo.data import load_digits_split  # noqa: E402
from qfv_brevitas.core.fitting import nonuniformity  # noqa: E402
from qfv_brevitas.zoo.models import build_model  # noqa: E402
from qfv_brevitas.studies.ptq import brevitas_uniform  # noqa: E402
from qfv_brevitas.core.quantizers import nmult_layers, quant_of  # noqa: E402
from qfv_brevitas.training.train import TrainConfig, evaluate, fit  # noqa: E402
from _machine import machine_line  # noqa: E402

#: name -> (variant, mode, init, refit) ; "brevitas" is built separately
METHODS = {
    "fixed": ("fixed", "paper", "lsq", False),
    "fixed-fit": ("fixed", "paper", "fit", False),
    "step": ("step", "paper", "lsq", False),
    "step-fit": ("step", "paper", "fit", False),
    "nmult-lsq": ("nmult", "paper", "lsq", False),
    "nmult-fit": ("nmult", "paper", "fit", False),
    "nmult-fit-refit": ("nmult", "paper", "fit", True),
    "nmult-both-fit": ("nmult", "both", "fit", False),
    "nmult-both-fit-refit": ("nmult", "both", "fit", True),
    "nmult-ste-fit": ("nmult", "ste", "fit", False),
    "brevitas": None,
}


def float_model(out: Path, seed: int, train, test):
    path = out / f"float_seed{seed}.pt"
    torch.manual_seed(seed)
    fp = build_model("small_cnn", (1, 8, 8), 10)
    if path.is_file():
        fp.load_state_dict(torch.load(path, weights_only=True))
    else:
        fit(fp, train, test, TrainConfig(epochs=30, lr=0.05, seed=seed), progress=False)
        torch.save(fp.state_dict(), path)
    fp.eval()
    return fp


def run_method(name, fp, bits, epochs, seed, train, test, example, refit_every):
    cfg = TrainConfig(epochs=epochs, lr=0.01, lambda_rise_epochs=min(5, epochs), seed=seed,
                      refit_every=0)
    if name == "brevitas":
        q = brevitas_uniform(fp, bits, act_bits=bits, example_input=example)
    else:
        variant, mode, init, refit = METHODS[name]
        q = quantize_model(copy.deepcopy(fp), NMultConfig(weight_bits=bits, act_bits=bits,
                                                          variant=variant, mode=mode, init=init),
                           example_input=example)
        # Only the "-refit" methods refit: the others (and "brevitas") train with refits off,
        # whatever TrainConfig's default is.
        cfg = TrainConfig(**{**cfg.__dict__, "refit_every": refit_every if refit else 0})
    t0 = time.perf_counter()
    fit(q, train, None, cfg, progress=False)
    secs = time.perf_counter() - t0
    acc = evaluate(q, test)
    nonuni = None
    if name != "brevitas":
        inner = [quant_of(m) for _, m in nmult_layers(q) if quant_of(m).bits == bits]
        nonuni = max(float(nonuniformity(tq.multipliers().detach()).max()) for tq in inner)
    return {"method": name, "bits": bits, "epochs": epochs, "seed": seed, "acc": acc,
            "seconds": secs, "nonuniformity": nonuni}


def paired(rows, a, b):
    """Mean and standard error of acc(a) - acc(b) over the seeds both have, in points."""
    xa = {r["seed"]: r["acc"] for r in rows if r["method"] == a}
    xb = {r["seed"]: r["acc"] for r in rows if r["method"] == b}
    d = [100 * (xa[s] - xb[s]) for s in sorted(set(xa) & set(xb))]
    if not d:
        return None
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return statistics.fmean(d), se, len(d), sum(x > 0 for x in d), sum(x < 0 for x in d)


def overall(rows, refs, methods) -> str:
    """Per method, the paired difference to each reference pooled over every (bits, epochs)
    cell and seed: mean +- standard error over all pairs, and the worst cell's mean."""
    lines = ["\nPooled over all cells (bits x epochs) and seeds: mean paired difference in "
             "points +- standard error (worst cell mean)",
             f"{'method':<22} " + " ".join(f"{'vs ' + r:>26}" for r in refs)]
    cells = sorted({(r["bits"], r["epochs"]) for r in rows})
    for m in methods:
        parts = []
        for ref in refs:
            if m == ref:
                parts.append(f"{'':>26}")
                continue
            d, worst = [], math.inf
            for b, e in cells:
                sub = [r for r in rows if r["bits"] == b and r["epochs"] == e]
                xa = {r["seed"]: r["acc"] for r in sub if r["method"] == m}
                xb = {r["seed"]: r["acc"] for r in sub if r["method"] == ref}
                dd = [100 * (xa[s] - xb[s]) for s in set(xa) & set(xb)]
                if dd:
                    d += dd
                    worst = min(worst, statistics.fmean(dd))
            if len(d) > 1:
                se = statistics.stdev(d) / math.sqrt(len(d))
                parts.append(f"{statistics.fmean(d):>+8.2f} +- {se:.2f} ({worst:+.2f})".rjust(26))
            else:
                parts.append(f"{'':>26}")
        lines.append(f"{m:<22} " + " ".join(parts))
    return "\n".join(lines)


def summarize(rows, ref: str) -> str:
    lines = []
    keys = sorted({(r["bits"], r["epochs"]) for r in rows}, key=lambda k: (-k[0], k[1]))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for bits, epochs in keys:
        sub = [r for r in rows if r["bits"] == bits and r["epochs"] == epochs]
        seeds = sorted({r["seed"] for r in sub})
        lines.append(f"\nW{bits}A{bits}, {epochs} QAT epochs, seeds {seeds} (accuracy %, mean; "
                     f"paired difference to {ref} in points: mean +- standard error, "
                     "wins/losses over seeds)")
        lines.append(f"{'method':<22} {'acc':>7} {'vs ' + ref:>22} {'w/l':>5} {'s/run':>6} "
                     f"{'non-unif':>8}")
        for m in methods:
            mr = [r for r in sub if r["method"] == m]
            if not mr:
                continue
            acc = statistics.fmean(100 * r["acc"] for r in mr)
            p = paired(sub, m, ref) if m != ref else None
            ps = f"{p[0]:+.2f} +- {p[1]:.2f} (n={p[2]})" if p else ""
            wl = f"{p[3]}/{p[4]}" if p else ""
            nu = [r["nonuniformity"] for r in mr if r["nonuniformity"] is not None]
            nus = f"{statistics.fmean(nu):.3f}" if nu else ""
            lines.append(f"{m:<22} {acc:>7.2f} {ps:>22} {wl:>5} "
                         f"{statistics.fmean(r['seconds'] for r in mr):>6.1f} {nus:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, nargs="+", default=[4, 15])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--refit-every", type=int, default=10, help="steps between refits")
    p.add_argument("--ref", default="brevitas", help="reference of the paired differences")
    p.add_argument("--out", default="runs/bench_qat_levels")
    p.add_argument("--tag", default="", help="suffix of this chunk's JSON file")
    p.add_argument("--summarize", action="store_true", help="merge the chunks in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        rows, meta = [], []
        for f in sorted(out.glob("qat_*.json")):
            doc = json.loads(f.read_text())
            rows += doc["rows"]
            meta.append(f"{f.name}: {doc['machine']}; {doc['wall_s']:.0f} s")
        print("\n".join(meta))
        print(summarize(rows, args.ref))
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        print(overall(rows, ["brevitas", "fixed", "step", "nmult-lsq"], methods))
        return 0
    print(machine_line(), flush=True)
    t_all = time.perf_counter()
    rows = []
    for seed in args.seeds:
        train, test = load_digits_split(seed)
        fp = float_model(out, seed, train, test)
        example = next(iter(DataLoader(train, batch_size=256)))[0]
        for bits in args.bits:
            for epochs in args.epochs:
                for m in args.methods:
                    r = run_method(m, fp, bits, epochs, seed, train, test, example,
                                   args.refit_every)
                    rows.append(r)
                    print(f"seed {seed} W{bits}A{bits} {epochs:>2} ep {m:<22} "
                          f"{100 * r['acc']:6.2f}%  ({r['seconds']:.1f} s)", flush=True)
    wall = time.perf_counter() - t_all
    tag = args.tag or f"b{'-'.join(map(str, args.bits))}_s{'-'.join(map(str, args.seeds))}"
    doc = {"machine": machine_line(), "args": vars(args), "wall_s": wall, "rows": rows}
    (out / f"qat_{tag}.json").write_text(json.dumps(doc, indent=2))
    print(summarize(rows, args.ref))
    print(f"\n{wall:.0f} s; wrote {out / f'qat_{tag}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
