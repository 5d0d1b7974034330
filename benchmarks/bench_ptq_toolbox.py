#!/usr/bin/env python
"""PTQ with Brevitas' toolbox (issue 21): fitted N-multiplier levels with error compensation
against Brevitas' uniform weight PTQ with the same toolbox.

Per seed, the ``qfv demo`` float SmallCNN on digits (``bench_qat_levels.py``'s recipe: 30
epochs, lr 0.05, cached in ``--out``); its inner layers' weights quantized after training at
each ``--bits`` (first/last layers 8-bit), per tensor and per channel, weight-only and with
Brevitas' activation quantizers at ``--act-bits`` (calibrated with ``calibration_mode``), by

* Brevitas ``Int8Weight{PerTensor,PerChannel}Float`` (max-abs scale) and the ``...FloatMSE``
  variants (MSE scale), plain, with Brevitas GPTQ (``gptq_mode``) and with Brevitas GPFQ;
* this library's uniform grid of least squared weight error (``variant="fixed"``,
  ``init="fit"``: 2**N levels, where Brevitas' narrow-range grid has 2**N - 1) with GPTQ, a
  uniform reference whose grid stays fixed while GPTQ moves the weights;
* fitted N-multiplier levels (``init="fit"``), plain, with GPTQ and with GPFQ over the levels
  (Brevitas' own ``gptq_mode``/``gpfq_mode`` on the N-multiplier layers, ``r``/``c`` fixed).

Calibration: the first ``--calib-samples`` images of the seed's training split; accuracy on
its 360 test images (one image = 0.28 points). Each method starts from the same float model.

    python benchmarks/bench_ptq_toolbox.py [--seeds 0 1 2 3 4] [--bits 4 3 2] [--act-bits 8]
    python benchmarks/bench_ptq_toolbox.py --print
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

from qfv_brevitas import NMultConfig, quantize_model  # noqa: E402
from _machine import machine_line  # noqa: E402

#: method -> (family, scale, compensation)
METHODS = {
    "brevitas max": ("brevitas", "max", None),
    "brevitas max + GPTQ": ("brevitas", "max", "gptq"),
    "brevitas mse": ("brevitas", "mse", None),
    "brevitas mse + GPTQ": ("brevitas", "mse", "gptq"),
    "brevitas mse + GPFQ": ("brevitas", "mse", "gpfq"),
    "uniform best-MSE grid + GPTQ": ("fixed", None, "gptq"),
    "nmult fitted": ("nmult", None, None),
    "nmult fitted + GPTQ": ("nmult", None, "gptq"),
    "nmult fitted + GPFQ": ("nmult", None, "gpfq"),
}
OURS, THEIRS = "nmult fitted + GPTQ", "brevitas mse + GPTQ"


def build(fp, method: str, bits: int, act_bits, per_channel: bool, example, batches,
          act_order: bool = False):
    from qfv_brevitas.studies.calibration import apply_toolbox
    from qfv_brevitas.studies.ptq import brevitas_uniform

    family, scale, comp = METHODS[method]
    if family == "brevitas":
        m = brevitas_uniform(fp, bits, per_channel, act_bits=act_bits, example_input=example,
                             scale=scale)
    else:
        m = quantize_model(fp, NMultConfig(weight_bits=bits, act_bits=act_bits, init="fit",
                                           variant=family, per_channel=per_channel),
                           example_input=example)
    m.eval()
    return apply_toolbox(m, batches, calibrate=act_bits is not None, compensation=comp,
                         act_order=act_order)


def run(args) -> dict:
    from bench_qat_levels import float_model
    from qfv_brevitas.studies.calibration import calibration_batches
    from qfv_brevitas.training.train import evaluate
    from qfv_brevitas.zoo.data import load_digits_split

    rows = []
    for seed in args.seeds:
        train, test = load_digits_split(seed)
        fp = float_model(Path(args.out), seed, train, test)
        batches = calibration_batches(train, args.calib_samples)
        example = batches[0]
        rows.append({"seed": seed, "method": "float", "acc": evaluate(fp, test)})
        for bits in args.bits:
            for act in (None, *args.act_bits):
                for pc in (False, True):
                    for method in METHODS:
                        torch.manual_seed(seed)
                        m = build(copy.deepcopy(fp), method, bits, act, pc, example, batches,
                                  args.act_order)
                        rows.append({"seed": seed, "bits": bits, "act_bits": act,
                                     "per_channel": pc, "method": method,
                                     "acc": evaluate(m, test)})
                    print(f"seed {seed} W{bits} A{act or 'float'} "
                          f"{'channel' if pc else 'tensor'}: "
                          + ", ".join(f"{r['method']} {100 * r['acc']:.2f}" for r in rows[
                              -len(METHODS):]), flush=True)
    return {"rows": rows, "calib_samples": args.calib_samples, "act_order": args.act_order}


def _stats(xs):
    xs = [100 * x for x in xs]
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _paired(sub, a, b):
    xa = {r["seed"]: r["acc"] for r in sub if r["method"] == a}
    xb = {r["seed"]: r["acc"] for r in sub if r["method"] == b}
    d = [100 * (xa[s] - xb[s]) for s in sorted(set(xa) & set(xb))]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return statistics.fmean(d), se, sum(x > 0 for x in d), sum(x < 0 for x in d)


def report(res: dict) -> str:
    rows = res["rows"]
    seeds = sorted({r["seed"] for r in rows})
    fl = _stats([r["acc"] for r in rows if r["method"] == "float"])
    q = [r for r in rows if r["method"] != "float"]
    lines = [f"Seeds {seeds}; float {fl[0]:.2f} +- {fl[1]:.2f}%; calibration "
             f"{res['calib_samples']} training images. Accuracy %, mean +- std over seeds; "
             f"last column: {OURS} - {THEIRS}, paired by seed, mean +- standard error "
             "(wins/losses).", "",
             "| W | A | gran | " + " | ".join(METHODS) + " | N-mult GPTQ - Brevitas MSE GPTQ |",
             "|" + "---|" * (len(METHODS) + 4)]
    checks = []
    for bits in sorted({r["bits"] for r in q}, reverse=True):
        for act in sorted({r["act_bits"] for r in q}, key=lambda a: a or 99, reverse=True):
            for pc in (False, True):
                sub = [r for r in q if r["bits"] == bits and r["act_bits"] == act
                       and r["per_channel"] == pc]
                if not sub:
                    continue
                cells = [_stats([r["acc"] for r in sub if r["method"] == m]) for m in METHODS]
                best = max(c[0] for c in cells)
                d = _paired(sub, OURS, THEIRS)
                lines.append(
                    f"| W{bits} | {act or 'float'} | {'channel' if pc else 'tensor'} | "
                    + " | ".join((f"**{m:.2f}**" if m == best else f"{m:.2f}") + f" +- {s:.2f}"
                                 for m, s in cells)
                    + f" | {d[0]:+.2f} +- {d[1]:.2f} ({d[2]}/{d[3]}) |")
                if bits in (2, 3):
                    checks.append(f"W{bits} A{act or 'float'} "
                                  f"{'per channel' if pc else 'per tensor'}: {d[0]:+.2f} -> "
                                  f"{'met' if d[0] >= 0 else 'MISSED'}")
    return "\n".join(lines + ["", f"Target ({OURS} >= {THEIRS}, mean paired difference >= 0):"]
                     + [f"- {c}" for c in checks])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--act-bits", type=int, nargs="*", default=[8],
                   help="activation widths besides float activations")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ/GPFQ in the order of the Hessian's diagonal (Brevitas' act_order)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench_fit")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the saved result again")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ptq_toolbox.json"
    if args.print_only:
        print(report(json.loads(path.read_text())["result"]))
        return 0
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    t0 = time.perf_counter()
    res = run(args)
    wall = time.perf_counter() - t0
    path.write_text(json.dumps({"machine": machine_line(), "args": vars(args), "wall_s": wall,
                                "result": res}, indent=2))
    print()
    print(report(res))
    print(f"\n{wall:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
