#!/usr/bin/env python
"""Spiking models: full precision vs 4-bit N-multiplier weights on rate-coded digits, and the
cost of a 4-bit spiking training step against the same full-precision spiking step.

Accuracy (per seed, default seeds 0 1 2): ``run_snn_experiment`` on scikit-learn's digits
(split seeded by the seed), ``spiking_small_cnn`` (DigitsCNN, width 16: conv-BN-LIF x3, average
pooling, linear readout), LIF tau=4 (beta 0.25), V_th 0.5, V_reset 0, arctan surrogate, T=4,
rate coding (Bernoulli spikes, P = pixel intensity). Full precision: 12 epochs SGD lr 0.1;
then W4 (first/last layers 8 bits, activations are spikes) with the regularizer: 6 epochs lr 0.01,
lambda 100 -> 2000 over the last 3 epochs -- the ``qfv snn train`` defaults. As W4 has had 6
more epochs than the float model, a control trains the saved float model for the same 6 epochs
(same schedule, no quantizer). Reports each seed's accuracies and the means. Target: mean float
- mean W4 <= 1.5 points, against both float references.

Step cost: on one seeded model and one batch of rate-coded digits (``--batch`` images, T=4), a
full training step as ``fit`` runs it (zero_grad, forward over the T steps, cross-entropy,
backward, optimizer steps) for

* ``float``: the full-precision spiking model (SGD);
* ``w4``: its W4 copy in the paper's mode (full-precision forward in training) with
  ``loss = ce + lam * regularization_loss`` (SGD + Adam over r, c);
* ``w4-ste`` (context): the W4 copy with the snapped straight-through forward, no regularizer.

The same encoded batch feeds every step (the encoding is not timed). After a warm-up of each,
``--repeats`` rounds interleaved in rotating order; medians reported, ratio w4/float.

    python benchmarks/bench_snn.py [--seeds 0 1 2] [--T 4] [--batch 64] [--repeats 20]
        [--skip-accuracy] [--skip-step] [--threads 1] [--json out.json]

The default run takes about 1.5 minutes on an idle 2-core machine (one thread).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from typing import Callable, Dict, List

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qfv_brevitas import NMultConfig, quantize_model  # noqa: E402
from qfv_brevitas.zoo.checkpoint import load_checkpoint  # noqa: E402
from qfv_brevitas.core.convert import set_forward_mode  # noqa: E402
from qfv_brevitas.zoo.data import load_digits_split  # noqa: E402
from qfv_brevitas.snn import (SpikingConfig, run_snn_experiment, spiking_small_cnn)  # noqa: E402
from qfv_brevitas.training.train import TrainConfig, evaluate, fit, param_groups  # noqa: E402
from _machine import _loadavg, machine_line  # noqa: E402
from bench_train_step import make_step as train_step  # noqa: E402

TARGET_POINTS = 1.5


def accuracy_runs(seeds: List[int], T: int) -> List[dict]:
    rows = []
    q_train = TrainConfig(epochs=6, lr=0.01, lambda_rise_epochs=3)
    for seed in seeds:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            r = run_snn_experiment(
                out, dataset="digits", arch="spiking_small_cnn", snn=SpikingConfig(T=T),
                bits=(4,), fp_train=TrainConfig(epochs=12, lr=0.1), q_train=q_train,
                seed=seed, progress=False)
            # Control: the float model trained as long as the W4 one (same 6 extra epochs, no
            # quantizer), so that the comparison is not float vs float-plus-fine-tuning.
            fp, _ = load_checkpoint(os.path.join(out, "float.pt"))
        _, test = load_digits_split(seed)
        fit(fp, load_digits_split(seed)[0], None, replace(q_train, seed=seed), progress=False)
        rows.append({"seed": seed, "fp": r["fp_acc"], "w4": r["runs"][0]["acc"],
                     "fp_same_epochs": evaluate(fp, test),
                     "seconds": time.perf_counter() - t0})
        print(f"  seed {seed}: float {100 * r['fp_acc']:.2f}%  W4 {100 * r['runs'][0]['acc']:.2f}%"
              f"  float +6 epochs {100 * rows[-1]['fp_same_epochs']:.2f}%"
              f"  ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def make_step(model: nn.Module, x, y, lam: float, use_reg: bool) -> Callable[[], float]:
    cfg = TrainConfig(lr=0.01)
    groups = param_groups(model, cfg)
    quant = [g for g in groups if g.get("quant")]
    opts = [torch.optim.SGD([g for g in groups if not g.get("quant")], lr=cfg.lr,
                            momentum=cfg.momentum)]
    if quant:
        opts.append(torch.optim.Adam(quant, lr=cfg.quant_lr))
    model.train()
    # The same timed step as the ResNet-18 training-step benchmark.
    return train_step(model, opts, x, y, lam, use_reg)


def step_costs(T: int, batch: int, repeats: int, seed: int) -> dict:
    torch.manual_seed(seed)
    cfg = SpikingConfig(T=T)
    fp = spiking_small_cnn(config=cfg)
    train, _ = load_digits_split(seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[:batch]
    images, y = train.tensors[0][idx], train.tensors[1][idx]
    # One fixed spike train for every step (eval mode: the seeded encoding); the model reads a
    # (T, N, C, H, W) input as it is.
    fp.eval()
    x = fp.to_sequence(images)
    w4 = quantize_model(copy.deepcopy(fp), NMultConfig(weight_bits=4, act_bits=None))
    ste = set_forward_mode(copy.deepcopy(w4), "ste")
    steps: Dict[str, Callable[[], float]] = {
        "float": make_step(fp, x, y, 100.0, use_reg=False),
        "w4": make_step(w4, x, y, 100.0, use_reg=True),
        "w4-ste": make_step(ste, x, y, 100.0, use_reg=False),
    }
    warm = {k: fn() for k, fn in steps.items()}
    times: Dict[str, List[float]] = {k: [] for k in steps}
    keys = list(steps)
    for i in range(repeats):
        for k in keys[i % 3:] + keys[:i % 3]:  # rotate the order to cancel drift
            times[k].append(steps[k]())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"warmup": warm, "times": times, "median": med, "x_shape": list(x.shape)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print(machine_line())
    doc: dict = {"args": vars(args)}

    if not args.skip_accuracy:
        print(f"\nAccuracy on rate-coded digits (T={args.T}), spiking_small_cnn, seeds "
              f"{args.seeds}:", flush=True)
        rows = accuracy_runs(args.seeds, args.T)
        fp = statistics.mean(r["fp"] for r in rows)
        w4 = statistics.mean(r["w4"] for r in rows)
        fp2 = statistics.mean(r["fp_same_epochs"] for r in rows)
        drop, drop2 = 100 * (fp - w4), 100 * (fp2 - w4)
        print(f"{'':<10} {'float':>8} {'W4':>8} {'W4-float':>9} {'float+6ep':>10} {'W4-it':>7}")
        for r in rows:
            print(f"seed {r['seed']:<5} {100 * r['fp']:>7.2f}% {100 * r['w4']:>7.2f}% "
                  f"{100 * (r['w4'] - r['fp']):>+8.2f} {100 * r['fp_same_epochs']:>9.2f}% "
                  f"{100 * (r['w4'] - r['fp_same_epochs']):>+7.2f}")
        print(f"{'mean':<10} {100 * fp:>7.2f}% {100 * w4:>7.2f}% {-drop:>+8.2f} "
              f"{100 * fp2:>9.2f}% {-drop2:>+7.2f}")
        ok = max(drop, drop2) <= TARGET_POINTS
        print(f"Target: mean float - mean W4 <= {TARGET_POINTS} points (against both float "
              f"references) ... {'PASS' if ok else 'FAIL'} ({drop:+.2f}, {drop2:+.2f})")
        doc["accuracy"] = {"rows": rows, "mean_fp": fp, "mean_w4": w4, "drop_points": drop,
                           "mean_fp_same_epochs": fp2, "drop_points_same_epochs": drop2,
                           "pass": ok}

    if not args.skip_step:
        s = step_costs(args.T, args.batch, args.repeats, args.seeds[0])
        med = s["median"]
        print(f"\nTraining step on input {tuple(s['x_shape'])} (T, N, C, H, W), median of "
              f"{args.repeats} interleaved runs:")
        print(f"{'step':<44} {'median ms':>10} {'vs float':>9}")
        labels = {"float": "full-precision spiking (reference)",
                  "w4": "W4 spiking, paper mode + regularizer",
                  "w4-ste": "W4 spiking, STE forward (context)"}
        for k, label in labels.items():
            print(f"{label:<44} {1e3 * med[k]:>10.2f} {med[k] / med['float']:>8.2f}x")
        ratio = med["w4"] / med["float"]
        print(f"W4 step / full-precision step: {ratio:.2f}x")
        doc["step"] = {**s, "ratio_w4_float": ratio}

    wall = time.perf_counter() - t_start
    print(f"\nLoad average at end: {_loadavg()}; total {wall:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
