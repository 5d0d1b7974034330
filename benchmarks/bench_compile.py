#!/usr/bin/env python
"""A torch.compile'd training step against the eager one, on a small quantized CNN (CPU).

Two copies of one model -- the library's ``small_cnn`` (three conv blocks with BatchNorm, two
linear layers; width 32) for 28x28 single-channel inputs, seeded, given N-multiplier
weights and learned-scale activations by
``quantize_model(model, NMultConfig(weight_bits=4, act_bits=4, mode=...))`` -- train on the
same seeded random batch with random labels. One training step is ``zero_grad``, forward,
``loss = cross_entropy + lam * regularization_loss(model)``, backward, optimizer step (SGD
with momentum over the weights, Adam over ``r``/``c``, as ``qfv_brevitas.fit``):

* eager:    as written;
* compiled: the loss (forward, cross-entropy and the regularizer) through
            ``torch.compile(loss_fn)`` (inductor by default, ``--backend``); backward runs the
            compiled backward graph; the optimizer steps stay eager.

Both models are first taken past Brevitas' activation-statistics phase (30 train-mode passes,
no grad). The compiled one is then warmed up (the compile time is printed), then ``--repeats``
pairs run interleaved, alternating the order; medians and their ratio are printed, with the
first step's losses of both (equal up to float reordering) as a check that they compute the
same thing.

    python benchmarks/bench_compile.py [--batch 64] [--repeats 20] [--mode paper]
        [--backend inductor] [--threads T] [--json out.json]
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
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from qfv_brevitas import NMultConfig, TrainConfig, quantize_model  # noqa: E402
from qfv_brevitas.core import kernels as K  # noqa: E402
from qfv_brevitas.training.regularizer import regularization_loss  # noqa: E402
from qfv_brevitas.training.train import param_groups  # noqa: E402
from qfv_brevitas.zoo.models import build_model  # noqa: E402
from _machine import _loadavg, machine_info  # noqa: E402


def optimizers(model: nn.Module) -> List[torch.optim.Optimizer]:
    """The optimizers of :func:`qfv_brevitas.fit` (without the LR schedulers)."""
    cfg = TrainConfig(lr=0.01)
    groups = param_groups(model, cfg)
    opts = [torch.optim.SGD([g for g in groups if not g.get("quant")], lr=cfg.lr,
                            momentum=cfg.momentum)]
    quant = [g for g in groups if g.get("quant")]
    if quant:
        opts.append(torch.optim.Adam(quant, lr=cfg.quant_lr))
    return opts


def make_step(model: nn.Module, x, y, lam: float, backend: str = "") -> Callable[[], tuple]:
    """One training step; returns ``(seconds, loss)``. ``backend``: compile the loss."""
    opts = optimizers(model)

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y) + lam * regularization_loss(model)

    fn = torch.compile(loss_fn, backend=backend) if backend else loss_fn

    def step():
        t0 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = fn(x, y)
        loss.backward()
        for o in opts:
            o.step()
        return time.perf_counter() - t0, float(loss.detach())

    return step


def build(args, x) -> nn.Module:
    torch.manual_seed(args.seed)
    q = quantize_model(build_model("small_cnn", (1, 28, 28), 10),
                       NMultConfig(weight_bits=4, act_bits=4, mode=args.mode),
                       example_input=x).train()
    with torch.no_grad():  # past Brevitas' activation-statistics phase
        for _ in range(NMultConfig().act_collect_stats_steps + 1):
            q(x[:8])
    return q


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20, help="timed pairs (median reported)")
    p.add_argument("--mode", default="paper", choices=("paper", "ste", "both"))
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--lam", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    m = machine_info()
    print(f"Machine: {m['platform']}, {m['processor']}, cpu_count={m['cpu_count']}, python "
          f"{m['python']}, torch {m['torch']}, threads={m['torch_num_threads']}; kernels "
          f"{'on' if K.enabled() else 'off'}; load average at start {m['loadavg_start']}")
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    eager_m, comp_m = build(args, x), build(args, x)
    comp_m.load_state_dict(eager_m.state_dict())
    steps: Dict[str, Callable[[], tuple]] = {
        "eager": make_step(eager_m, x, y, args.lam),
        "compiled": make_step(comp_m, x, y, args.lam, args.backend)}
    t0 = time.perf_counter()
    first = {"compiled": steps["compiled"]()[1]}
    t_compile = time.perf_counter() - t0
    first["eager"] = steps["eager"]()[1]
    print(f"Setup: small_cnn 28x28, W4A4 mode={args.mode}, batch {args.batch}, lam {args.lam:g}, "
          f"backend {args.backend}; first step (with compilation) {t_compile:.1f} s; first "
          f"losses eager {first['eager']:.6f} compiled {first['compiled']:.6f}", flush=True)
    for k in steps:  # one more warm-up each (recompiles, allocator)
        steps[k]()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for i in range(args.repeats):
        for k in (("eager", "compiled") if i % 2 == 0 else ("compiled", "eager")):
            times[k].append(steps[k]()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["compiled"] / med["eager"]
    print(f"\nTraining step, median of {args.repeats} interleaved pairs (ms): eager "
          f"{1e3 * med['eager']:.2f}, compiled {1e3 * med['compiled']:.2f}; "
          f"compiled / eager = {ratio:.3f} (eager / compiled = {1 / ratio:.2f}x)")
    print(f"Load average at end: {_loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": m, "args": vars(args), "median_s": med, "ratio": ratio,
                       "compile_s": t_compile, "first_loss": first, "times": times}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
