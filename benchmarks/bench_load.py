#!/usr/bin/env python
"""Speed that holds on a busy machine (issue 15): every figure as a ratio to a reference
measured in the same run, under the same load.

For each K in ``--load`` (K busy processes of the script's own, started before and stopped
after each measurement, ``benchmarks/_load.py``):

(a) ``regularization_loss`` forward+backward against the floor ``sum((w ** 2).sum())`` over
    the same weight tensors, N=4: the three-layer model of 2048-wide QuantLinear layers
    (2048x2048, 2048x2048, 2048x1280: 11.0M weights) and ResNet-18 CIFAR (11.2M weights in 21
    layers); on the compiled kernels and on the pure-torch fallback. Median of ``--repeats``
    after a warm-up, methods interleaved.
(b) The device-aware regularizers on ResNet-18 (10% stuck bits; LRS sigma/mu 0.2) against the
    map-free one, interleaved the same way.
(c) ``qfv demo`` wall time (a subprocess, ``--no-progress``), with ``--threads auto`` (one
    thread for this small model) and ``--threads 2``; at each load.
(d) Monte Carlo of ``--maps`` fault maps (rate 0.1) on the demo's N-multiplier W4A4 model with
    1 and 2 worker processes: the rows must be identical; the speed-up is printed.

    python benchmarks/bench_load.py [--load 0 2] [--repeats 7] [--skip-demo] [--skip-mc]
        [--maps 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (_REPO, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]

import brevitas.nn as qnn  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from qfv_brevitas import NMultConfig, NMultWeightQuant, quantize_model, regularization_loss  # noqa: E402
from qfv_brevitas.core import kernels as K  # noqa: E402
from qfv_brevitas.chip.faults import FaultModel, attach_faults, sample_fault_map  # noqa: E402
from qfv_brevitas.zoo.models import resnet18_cifar  # noqa: E402
from qfv_brevitas.core.quantizers import nmult_layers  # noqa: E402
from qfv_brevitas.chip.variability import (VariabilityModel, attach_variability,  # noqa: E402
                                      sample_variability_map)
from _load import add_load_argument, busy_processes  # noqa: E402
from _machine import _loadavg, machine_line  # noqa: E402


def three_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[qnn.QuantLinear(i, o, bias=False, weight_quant=NMultWeightQuant,
                                           weight_bit_width=4)
                           for i, o in ((2048, 2048), (2048, 2048), (2048, 1280))])


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return quantize_model(resnet18_cifar(), NMultConfig(weight_bits=4, act_bits=None),
                          inplace=True)


def timed(fns: dict, zero, repeats: int) -> dict:
    def once(fn):
        zero()
        t0 = time.perf_counter()
        fn().backward()
        return time.perf_counter() - t0

    times = {k: [] for k in fns}
    for fn in fns.values():
        once(fn)
    for i in range(repeats):
        keys = list(fns)
        keys = keys[i % len(keys):] + keys[:i % len(keys)]
        for k in keys:
            times[k].append(once(fns[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def floor(model):
    ws = [l.weight for _, l in nmult_layers(model)]
    return lambda: sum((w ** 2).sum() for w in ws)


def torch_path(model):
    def run():
        with K.torch_fallback():
            return regularization_loss(model)
    return run


def bench_regularizer(repeats: int) -> dict:
    out = {}
    for name, build in (("three-layer 2048", three_layer), ("ResNet-18 CIFAR", resnet)):
        m = build()
        fns = {"floor": floor(m), "kernels": lambda m=m: regularization_loss(m),
               "torch": torch_path(m)}
        out[name] = timed(fns, lambda m=m: m.zero_grad(set_to_none=True), repeats)
    return out


def bench_device(repeats: int) -> dict:
    ideal, flt, var = resnet(), resnet(), resnet()
    attach_faults(flt, sample_fault_map(flt, FaultModel(rate=0.1, seed=0)))
    attach_variability(var, sample_variability_map(var, VariabilityModel(sigma=0.2, seed=0)))
    models = {"map-free": ideal, "faults 10%": flt, "variability 0.2": var}
    fns = {k: (lambda m=m: regularization_loss(m)) for k, m in models.items()}

    def zero():
        for m in models.values():
            m.zero_grad(set_to_none=True)
    return timed(fns, zero, repeats)


def run_demo(out: str, threads: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qfv_brevitas.cli.app", "demo", "--no-progress", "--out",
                    out, "--threads", threads], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_mc(ckpt: str, maps: int) -> dict:
    from qfv_brevitas.studies import evaluate_faults
    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.data import load_dataset

    model, info = load_checkpoint(ckpt)
    _, test, _, _ = load_dataset("digits", None, int(info["meta"].get("data_seed", 0)))
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # what auto gives this model, and what each worker uses
    try:
        res = {}
        for w in (1, 2):
            t0 = time.perf_counter()
            r = evaluate_faults(model, test, [0.1], trials=maps, progress=False, workers=w)
            res[w] = (time.perf_counter() - t0, r.rows)
    finally:
        torch.set_num_threads(old)
    return {"s_1": res[1][0], "s_2": res[2][0], "speedup": res[1][0] / res[2][0],
            "identical": res[1][1] == res[2][1],
            "mean_acc": sum(r["acc"] for r in res[1][1]) / maps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_argument(p)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--maps", type=int, default=20)
    p.add_argument("--skip-regularizer", action="store_true")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-mc", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    print(machine_line())
    print(f"compiled kernels: {K.available()} ({K.load_error() or 'loaded'}); "
          f"torch threads {torch.get_num_threads()}")
    doc = {"loads": {}, "args": vars(args)}
    tmp = tempfile.mkdtemp(prefix="qfv-bench-load-")
    for k in args.load:
        row = doc["loads"].setdefault(k, {})
        print(f"\n### load {k} (busy processes of this script's own)")
        if not args.skip_regularizer:
            with busy_processes(k):
                reg = bench_regularizer(args.repeats)
                dev = bench_device(args.repeats)
            row["regularizer"], row["device"] = reg, dev
            print("| model | floor ms | kernels ms | x floor | torch fallback ms | x floor |")
            print("|---|---|---|---|---|---|")
            for name, t in reg.items():
                print(f"| {name} | {1e3 * t['floor']:.1f} | {1e3 * t['kernels']:.1f} | "
                      f"**{t['kernels'] / t['floor']:.2f}** | {1e3 * t['torch']:.1f} | "
                      f"{t['torch'] / t['floor']:.2f} |")
            print("\n| ResNet-18 regularizer | ms | x map-free |\n|---|---|---|")
            for name, t in dev.items():
                print(f"| {name} | {1e3 * t:.1f} | **{t / dev['map-free']:.2f}** |")
        if not args.skip_demo:
            with busy_processes(k):
                d = {th: run_demo(os.path.join(tmp, f"demo_{k}_{th}"), th) for th in ("auto", "2")}
            row["demo"] = d
            print(f"\nqfv demo wall time: --threads auto {d['auto']:.1f} s, --threads 2 "
                  f"{d['2']:.1f} s")
    loads = doc["loads"]
    if not args.skip_demo and 0 in loads and len(loads) > 1:
        for k in args.load:
            if k:
                for th in ("auto", "2"):
                    print(f"demo at load {k} / idle, --threads {th}: "
                          f"**{loads[k]['demo'][th] / loads[0]['demo'][th]:.2f}x**")
    if not args.skip_mc:
        ckpt = os.path.join(tmp, f"demo_{args.load[0]}_auto", "nmult_w4a4.pt")
        if not os.path.exists(ckpt):
            run_demo(os.path.join(tmp, f"demo_{args.load[0]}_auto"), "auto")
        mc = bench_mc(ckpt, args.maps)
        doc["mc"] = mc
        print(f"\nMonte Carlo, {args.maps} fault maps (10%), nmult W4A4 digits model: 1 process "
              f"{mc['s_1']:.1f} s, 2 workers {mc['s_2']:.1f} s, speed-up "
              f"**{mc['speedup']:.2f}x**, rows identical: {mc['identical']} (mean acc "
              f"{100 * mc['mean_acc']:.2f}%)")
    print(f"\nload average at end {_loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
