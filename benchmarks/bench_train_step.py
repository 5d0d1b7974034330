#!/usr/bin/env python
"""Cost of the eq. 6/7 regularizer in a full training step of a quantized CIFAR ResNet-18.

On ONE converted model -- ``resnet18_cifar(width=64)`` (11.2M parameters) seeded, given
N-multiplier weights and learned-scale activations by
``quantize_model(model, NMultConfig(weight_bits=4, act_bits=4), example_input=x)`` (first and
last layers at 8 bits, the library default) -- it times one full training step on a seeded
random batch ``x`` of shape ``(batch, 3, 32, 32)`` with random labels:

* without: ``zero_grad``, forward, cross-entropy, backward, optimizer step;
* with:    the same with ``loss = ce + lam * regularization_loss(model)``.

The optimizers are those of :func:`qfv_brevitas.fit`: SGD with momentum (lr 0.01, weight
decay 5e-4 on conv/linear weights) over ``param_groups(model, TrainConfig())`` and Adam over
the quantizer parameters (``r``, ``c``). Before timing, the model is taken past Brevitas'
activation statistics phase (``act_collect_stats_steps`` = 30 train-mode forward passes, no
grad, on 8 samples), so every step timed is a steady-state training step. Then one warm-up
step of each kind, then ``--repeats`` pairs, interleaved and alternating the order (without,
with / with, without / ...) to cancel drift; the median of each kind is reported.

Context: the same step on the unconverted float ResNet-18 (own copy, same seed, same batch),
timed in the same interleaved loop, and the regularizer's forward+backward alone.

Target (printed PASS/FAIL, never a non-zero exit): with/without <= 1.15.

    python benchmarks/bench_train_step.py [--batch 32] [--repeats 5] [--width 64] [--bits 4]
        [--lam 100] [--threads T] [--json out.json]

The default run takes about 20-30 s on an idle 2-core machine (a quantized step at batch 32 is
about 0.8 s there); with other jobs on the cores it can take minutes and the ratio scatters.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qfv_brevitas import NMultConfig, quantize_model  # noqa: E402
from qfv_brevitas.zoo.models import resnet18_cifar  # noqa: E402
from qfv_brevitas.core.quantizers import nmult_layers, quant_of  # noqa: E402
from qfv_brevitas.training.regularizer import regularization_loss  # noqa: E402
from qfv_brevitas.training.train import TrainConfig, param_groups  # noqa: E402
from _machine import _loadavg, machine_info  # noqa: E402

TARGET_RATIO = 1.15


def make_optimizers(model: nn.Module, cfg: TrainConfig) -> List[torch.optim.Optimizer]:
    """The optimizers of :func:`qfv_brevitas.fit` (without the LR schedulers)."""
    groups = param_groups(model, cfg)
    quant = [g for g in groups if g.get("quant")]
    rest = [g for g in groups if not g.get("quant")]
    opts = [torch.optim.SGD(rest, lr=cfg.lr, momentum=cfg.momentum)]
    if quant:
        opts.append(torch.optim.Adam(quant, lr=cfg.quant_lr))
    return opts


def make_step(model: nn.Module, opts, x, y, lam: float, use_reg: bool) -> Callable[[], float]:
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        t0 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if use_reg:
            loss = loss + lam * regularization_loss(model)
        loss.backward()
        for o in opts:
            o.step()
        return time.perf_counter() - t0

    return step


def time_reg_only(model: nn.Module, repeats: int) -> float:
    """Median seconds of ``regularization_loss(model)`` forward+backward alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for i in range(repeats + 1):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        regularization_loss(model).backward()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    for p in params:
        p.grad = None
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed pairs (median reported)")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = 11.2M)")
    p.add_argument("--bits", type=int, default=4, help="weight and activation bits (inner layers)")
    p.add_argument("--lam", type=float, default=100.0,
                   help="regularizer strength (does not change the cost; 100 = lambda_start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-float", action="store_true", help="skip the float context timing")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    m = machine_info()
    print(f"Machine: {m['platform']}, {m['processor']}, cpu_count={m['cpu_count']}, "
          f"python {m['python']}, torch {m['torch']}, "
          f"torch.get_num_threads()={m['torch_num_threads']}, "
          f"interop threads={m['torch_num_interop_threads']}")
    print(f"Load average (1/5/15 min) at start: {m['loadavg_start']}")
    la, ncpu = m["loadavg_start"], m["cpu_count"] or 1
    if la and la[0] > 0.5 * ncpu:
        print(f"WARNING: 1-min load average {la[0]} with {ncpu} CPUs: the CPU may be shared; "
              "timings may be noisy (thread oversubscription can slow steps several-fold)")
    note = "" if args.batch == 32 else f"  [batch {args.batch}, not the default 32]"
    print(f"Setup: resnet18_cifar(width={args.width}), input ({args.batch}, 3, 32, 32) random "
          f"(seed {args.seed}), W{args.bits}A{args.bits} (first/last layers 8-bit), "
          f"lam={args.lam:g}, {args.repeats} timed pairs after warm-up{note}")

    torch.manual_seed(args.seed)
    float_model = resnet18_cifar(width=args.width)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    n_params = sum(p.numel() for p in float_model.parameters())

    t0 = time.perf_counter()
    q = quantize_model(float_model, NMultConfig(weight_bits=args.bits, act_bits=args.bits),
                       example_input=x)
    t_convert = time.perf_counter() - t0
    layers = nmult_layers(q)
    reg_layers = [(n, l) for n, l in layers if quant_of(l).uses_regularizer]
    reg_weights = sum(l.weight.numel() for _, l in reg_layers)
    print(f"Model: {n_params / 1e6:.2f}M parameters (float); converted in {t_convert:.1f} s; "
          f"{len(reg_layers)} regularized N-multiplier layers holding {reg_weights / 1e6:.2f}M "
          f"weights (bits {sorted({quant_of(l).bits for _, l in reg_layers})})")

    cfg = TrainConfig(lr=0.01)
    q.train()
    # Past Brevitas' activation-statistics phase: steady-state training steps only.
    stats_steps = NMultConfig().act_collect_stats_steps
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(stats_steps + 1):
            q(x[:8])
    print(f"Activation statistics phase: {stats_steps + 1} train-mode forward passes on 8 "
          f"samples, {time.perf_counter() - t0:.1f} s")

    q_opts = make_optimizers(q, cfg)
    steps: Dict[str, Callable[[], float]] = {
        "without": make_step(q, q_opts, x, y, args.lam, use_reg=False),
        "with": make_step(q, q_opts, x, y, args.lam, use_reg=True),
    }
    if not args.no_float:
        fm = float_model  # quantize_model worked on a deep copy; this is still plain torch
        fm.train()
        steps["float"] = make_step(fm, make_optimizers(fm, cfg), x, y, args.lam, use_reg=False)

    warm = {k: fn() for k, fn in steps.items()}  # warm-up (allocator, Adam state, etc.)
    print("Warm-up step (s): " + ", ".join(f"{k} {v:.3f}" for k, v in warm.items()), flush=True)
    times: Dict[str, List[float]] = {k: [] for k in steps}
    pair = ["without", "with"]
    for i in range(args.repeats):
        order = pair if i % 2 == 0 else pair[::-1]
        if "float" in steps:
            times["float"].append(steps["float"]())
        for k in order:
            times[k].append(steps[k]())
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [w / wo for w, wo in zip(times["with"], times["without"])]
    ratio = med["with"] / med["without"]
    t_reg = time_reg_only(q, args.repeats)

    print("\nTraining step, seconds (median of "
          f"{args.repeats}; all runs in order: float interleaved with the without/with pairs)")
    print(f"{'step':<34} {'median s':>9} {'vs without':>11}   runs")
    print("-" * 78)
    rows = [("quantized, without regularizer", "without"),
            ("quantized, with regularizer", "with")]
    if "float" in med:
        rows.append(("float ResNet-18 (context)", "float"))
    for label, k in rows:
        print(f"{label:<34} {med[k]:>9.3f} {med[k] / med['without']:>10.3f}x   "
              + " ".join(f"{t:.3f}" for t in times[k]))
    print(f"{'regularizer fwd+bwd alone':<34} {t_reg:>9.3f} {t_reg / med['without']:>10.3f}x")
    print(f"\nwith/without (ratio of medians): {ratio:.3f}x; per-pair ratios: "
          + " ".join(f"{r:.3f}" for r in ratios)
          + f" (median {statistics.median(ratios):.3f}x)")
    if "float" in med:
        print(f"quantized (without) / float: {med['without'] / med['float']:.2f}x")
    ok = ratio <= TARGET_RATIO
    print(f"Target: with/without <= {TARGET_RATIO:.2f}x ... {'PASS' if ok else 'FAIL'} "
          f"({ratio:.3f}x)")
    wall = time.perf_counter() - t_start
    print(f"Load average at end: {_loadavg()}; total {wall:.0f} s")

    if args.json:
        doc = {"machine": m, "args": vars(args), "params": n_params,
               "regularized_layers": len(reg_layers), "regularized_weights": reg_weights,
               "times": times, "median": med, "reg_only_s": t_reg, "ratio": ratio,
               "pair_ratios": ratios, "target": TARGET_RATIO, "pass": ok, "wall_s": wall,
               "loadavg_end": _loadavg()}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
