#!/usr/bin/env python
"""Language model on real text (issue 24): PTQ, QAT and the chip, in validation bits per byte.

The model: the project's ``TinyLM`` (4 blocks, width 128, 4 heads, 0.84M parameters, context
64 bytes), trained per seed on the running Python's standard-library sources
(``load_stdlib_text``: train/validation split by file) for ``--steps`` AdamW steps (lr 4e-3,
cosine) of 32 fresh random windows each (cached in ``--cache``). Scores: bits per byte on the first ``--val-bytes`` validation
bytes (lower is better). Every method of a seed starts from that seed's float model.

* ``--part train``: train (or load) the float models.
* ``--part ptq``: per ``--bits``, per channel, embedding and LM head at 8 bits: Brevitas'
  uniform MSE-scale weight PTQ (``Int8WeightPerChannelFloatMSE``), fitted N-multiplier
  levels, and both with Brevitas' GPTQ (128 training windows); paired differences.
* ``--part qat``: ``--qat-steps`` steps of AdamW (lr 1e-3, cosine; 2 epochs over 16 x steps
  training windows of another seed) from the float model: the regularizer in paper mode (float weights, levels at
  evaluation), in STE mode (``both``: levels in the forward plus the regularizer), and stock
  Brevitas QAT (``Int8WeightPerChannelFloat`` at N bits, plain STE), same data order.
* ``--part chip``: the fitted W``--chip-bits`` PTQ model of the first seed with stuck bits
  and variability (Monte Carlo over ``--trials`` maps, inner layers), naive and
  nearest-valid-level deployment, and the fault-aware repair of one map.

    python benchmarks/bench_lm.py --part train --seeds 0 1 2
    python benchmarks/bench_lm.py --part ptq --seeds 0 1 2
    python benchmarks/bench_lm.py --part qat --seeds 0 1 2 --bits 4 3 2 --qat-steps 200
    python benchmarks/bench_lm.py --part chip
"""
from __future__ import annotations

import argparse
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

from _machine import machine_line  # noqa: E402
from qfv_brevitas.studies.lm import (LMRecipe, chip_sweep_lm, fault_repair_lm, ptq_lm,  # noqa: E402
                                     qat_lm, train_lm)
from qfv_brevitas.training.lm import evaluate_bpb  # noqa: E402
from qfv_brevitas.zoo.data import load_stdlib_text  # noqa: E402
from qfv_brevitas.zoo.lm import TinyLM  # noqa: E402

SIZE = dict(dim=128, layers=4, heads=4)


def data(args, seed: int, windows: int):
    return load_stdlib_text(args.context, windows, val_bytes=args.val_bytes, seed=seed)


def float_model(args, seed: int):
    """The seed's trained float model (trained once, then read from ``--cache``)."""
    path = Path(args.cache) / f"tiny_lm_s{seed}_{args.steps}x{args.context}.pt"
    torch.manual_seed(seed)
    model = TinyLM(context=args.context, **SIZE)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train, val, fp = data(args, seed, 32 * args.steps)
    t0 = time.perf_counter()
    hist = train_lm(model, train, val, LMRecipe(epochs=1, lr=4e-3, seed=seed), progress=False)
    print(f"seed {seed}: trained {args.steps} steps in {time.perf_counter() - t0:.0f} s, "
          f"validation {hist['test_bpb'][-1]:.4f} bits/byte (corpus {fp[:12]})", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def paired(a, b) -> str:
    d = [x - y for x, y in zip(a, b)]
    sem = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{statistics.fmean(d):+.4f} +- {sem:.4f}"


def mean(v) -> str:
    return f"{statistics.fmean(v):.4f}"


def part_ptq(args) -> dict:
    res = {}
    for seed in args.seeds:
        fp = float_model(args, seed)
        calib, val, _ = data(args, seed, 512)
        for bits in args.bits:
            for comp in (None, "gptq"):
                r = ptq_lm(fp, calib, val, bits, compensation=comp)
                res.setdefault((bits, comp), []).append((r.float_acc, r.baseline_acc, r.acc))
                print(f"seed {seed} W{bits} {comp or 'plain'}: float {r.float_acc:.4f} "
                      f"uniform {r.baseline_acc:.4f} fitted {r.acc:.4f}", flush=True)
    print("\n| W | float | Brevitas MSE uniform | fitted N-mult | fitted - uniform | "
          "Brevitas GPTQ (MSE uniform) | fitted + GPTQ | fitted+GPTQ - GPTQ |")
    print("|---|---|---|---|---|---|---|---|")
    for bits in args.bits:
        f, u, n = zip(*res[(bits, None)])
        _, gu, gn = zip(*res[(bits, "gptq")])
        print(f"| {bits} | {mean(f)} | {mean(u)} | {mean(n)} | {paired(n, u)} | {mean(gu)} | "
              f"{mean(gn)} | {paired(gn, gu)} |")
    return {f"W{b}_{c or 'plain'}": v for (b, c), v in res.items()}


def part_qat(args) -> dict:
    res = {}
    for seed in args.seeds:
        fp = float_model(args, seed)
        train, val, _ = data(args, seed + 1000, 32 * args.qat_steps // 2)
        for bits in args.bits:
            for method in args.methods:
                t0 = time.perf_counter()
                q, _ = qat_lm(fp, train, val, bits, method,
                              LMRecipe(epochs=2, lr=1e-3, seed=seed), progress=False)
                v = evaluate_bpb(q, val)
                res.setdefault((bits, method), []).append(v)
                print(f"seed {seed} W{bits} {method}: {v:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    ours = [m for m in args.methods if m != "brevitas"]
    print("\n| W | stock Brevitas QAT | " + " | ".join(ours) + " | "
          + " | ".join(f"{m} - Brevitas" for m in ours) + " |")
    print("|---" * (2 + 2 * len(ours)) + "|")
    for bits in args.bits:
        b = res[(bits, "brevitas")]
        print(f"| {bits} | {mean(b)} | " + " | ".join(mean(res[(bits, m)]) for m in ours)
              + " | " + " | ".join(paired(res[(bits, m)], b) for m in ours) + " |")
    return {f"W{b}_{m}": v for (b, m), v in res.items()}


def part_chip(args) -> dict:
    seed = args.seeds[0]
    fp = float_model(args, seed)
    train, val, _ = data(args, seed + 2000, 32 * 100)
    q = ptq_lm(fp, train, val, args.chip_bits, baseline=None).model
    out = {"ideal": evaluate_bpb(q, val), "float": evaluate_bpb(fp, val)}
    print(f"float {out['float']:.4f}, W{args.chip_bits} fitted {out['ideal']:.4f} bits/byte")
    for kind, levels in (("faults", args.rates), ("variability", args.sigmas)):
        for mapping in ("naive", "aware"):
            rows = chip_sweep_lm(q, val, kind, levels, args.trials, seed=seed,
                                 mapping=mapping, progress=False)
            out[f"{kind}_{mapping}"] = rows
            print(f"\n{kind}, {mapping} mapping, {args.trials} maps per level:")
            for r in rows:
                print(f"  {r['level']:g}: {r['mean']:.4f} +- {r['std']:.4f} "
                      f"(min {r['min']:.4f}, max {r['max']:.4f})", flush=True)
    rep = fault_repair_lm(q, train, val, args.repair_rate, seed=seed,
                          recipe=LMRecipe(epochs=1, lr=3e-4, seed=seed), progress=False)
    rep.pop("model")
    out["repair"] = rep
    print(f"\nrepair at {args.repair_rate:g}: {rep}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("train", "ptq", "qat", "chip"), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--steps", type=int, default=2000, help="float training steps")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--val-bytes", type=int, default=1 << 17)
    p.add_argument("--qat-steps", type=int, default=200)
    p.add_argument("--methods", nargs="+", default=["brevitas", "paper", "both"],
                   help="QAT methods (brevitas first: the reference of the differences)")
    p.add_argument("--chip-bits", type=int, default=4)
    p.add_argument("--rates", type=float, nargs="+", default=[0, 0.001, 0.005, 0.01, 0.02])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--repair-rate", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(_REPO, "runs", "bench_lm"))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    t0 = time.perf_counter()
    if args.part == "train":
        out = {s: evaluate_bpb(float_model(args, s), data(args, s, 1)[1]) for s in args.seeds}
        print({s: round(v, 4) for s, v in out.items()})
    else:
        out = {"ptq": part_ptq, "qat": part_qat, "chip": part_chip}[args.part](args)
    print(f"\n{args.part}: {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
