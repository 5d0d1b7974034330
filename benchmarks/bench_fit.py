#!/usr/bin/env python
"""Levels fitted to the weights (issue 10): weight error, fit time and memory, and post-training
quantization accuracy against Brevitas' own uniform weight quantizers.

``--part mse``: squared weight error at N = 2, 3, 4, per tensor and per channel, of

* the best uniform grid, found by this script independently of the library (numpy: a dense
  search over 400 steps x 160 grid positions per group, the 20 best refined by alternating
  least squares) -- the reference of every ratio;
* LSQ's grid (``2 mean|w| / sqrt(Q_P)``, the quantizers' classic start);
* plain alternating minimisation from LSQ's grid (one start, the issue's prototype);
* the library's fit (``fit_multipliers``) and its own best uniform grid;
* Lloyd-Max (``lloyd_max``, 2**N free levels; started also from the fitted levels);
* for per-tensor N = 3, 4: the best of 1000 random starts of the same alternation, to show
  what the additive structure itself allows,

on seeded Gaussian, Laplace and Student-t (3 dof) weights (per tensor: 20,000; per channel:
64 x 320) and on the trained inner layers of the ``qfv demo`` float SmallCNN on digits (seed 0).

``--part speed``: time to fit all 21 weight tensors of a seeded CIFAR ResNet-18
(``resnet18_cifar()``, 11.16M weights) at N = 4 (per tensor and per channel), median of
``--repeats``, with references measured in the same run: sorting all the weights
(``torch.sort``, the floor of the method) and one forward+backward of the paper's regularizer
over the same weights (``ideal_distance``). Memory: the extra peak RSS of fitting all
layers, in a fresh process, against the weights' own size and against ``n * 2**N * 4`` bytes.

``--part ptq``: accuracy on the 360 digits test images of the ``qfv demo`` float SmallCNN
(30 epochs, seeds ``--seeds``), weights quantized after training (inner layers W2/W3/W4,
first/last 8-bit, float activations), per tensor and per channel: Brevitas
``Int8Weight{PerTensor,PerChannel}Float`` (max-abs scale, its default) and the ``...FloatMSE``
variants, the library's LSQ grid and best uniform grid (``variant="fixed"``), the fitted
N-multiplier levels (``init="fit"``) and, as a reference, Lloyd-Max levels (weights replaced
by their nearest Lloyd-Max level). Paired by seed: mean difference to Brevitas with its
standard error.

``--part llm`` (issue 24): the Linear weights of a GPT-2-small-shaped stack (12 blocks of
768x2304, 768x768, 768x3072, 3072x768 plus the 50257x768 head; plain ``nn.Linear``, normal
std 0.02, seed 0; 123.5M weights, 133,201 output channels) fitted at N = 3 per tensor and
per channel, each in a fresh process: the fit's time against one ``torch.sort`` of every
weight in the same process, and its extra peak RSS (as ``--part speed``) against the weights'
float32 bytes. ``--blocks``, ``--no-head`` for a smaller stack.

``--part batched`` (issue 24): per-channel squared error of the batched search (the default
from 128 groups) against the exhaustive one (``batched=False``, the search before issue 24) on
ResNet-18's layers with at least 128 channels and on heavy-tailed LM-shaped matrices, and
both against the best uniform grid per channel.

Each part writes ``--out``/<part>.json; ``--print PART`` prints a saved part again.

    python benchmarks/bench_fit.py --part mse
    python benchmarks/bench_fit.py --part speed [--repeats 3] [--threads 2]
    python benchmarks/bench_fit.py --part ptq [--seeds 0 1 2 3 4]
    python benchmarks/bench_fit.py --part llm [--bits 3] [--blocks 12] [--no-head]
    python benchmarks/bench_fit.py --part batched [--bits 3 4]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qfv_brevitas import NMultConfig, quantize_model  # noqa: E402
from qfv_brevitas.core import fitting as F  # noqa: E402
from qfv_brevitas.core.distance import ideal_distance  # noqa: E402
from qfv_brevitas.core.levels import level_table, lsq_step_init, uniform_multipliers  # noqa: E402
from _machine import machine_line  # noqa: E402

DISTS = ("gaussian", "laplace", "student_t3")


# ------------------------------------------------------------------------------------ data

def synthetic(dist: str, G: int, M: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if dist == "gaussian":
        w = rng.standard_normal((G, M))
    elif dist == "laplace":
        w = rng.laplace(size=(G, M))
    else:
        w = rng.standard_t(3, size=(G, M))
    return torch.from_numpy(0.05 * w).float()


def digits_layers(seed: int = 0):
    """Inner layers of the ``qfv demo`` float SmallCNN trained on digits (30 epochs)."""
    from qfv_brevitas.zoo.data import load_digits_split
    from qfv_brevitas.zoo.models import build_model
    from qfv_brevitas.training.train import TrainConfig, fit

    train, test = load_digits_split(seed)
    torch.manual_seed(seed)
    m = build_model("small_cnn", (1, 8, 8), 10)
    fit(m, train, test, TrainConfig(epochs=30, lr=0.05, seed=seed), progress=False)
    return {n: mod.weight.detach().clone() for n, mod in m.named_modules()
            if n in ("features.3", "features.7", "classifier.1")}


# ----------------------------------------------------------------- independent references

def np_errors(ws: np.ndarray, p1: np.ndarray, p2: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Squared error of sorted weights ``ws`` (prefix sums p1, p2) for each row of sorted
    ``levels`` (K, L)."""
    thr = (levels[:, 1:] + levels[:, :-1]) / 2
    b = np.searchsorted(ws, thr, side="left")
    M = ws.shape[0]
    edges = np.concatenate([np.zeros((len(levels), 1), int), b, np.full((len(levels), 1), M)], 1)
    n = np.diff(edges, axis=1)
    s1 = np.diff(p1[edges], axis=1)
    s2 = np.diff(p2[edges], axis=1)
    return np.maximum((s2 - 2 * levels * s1 + n * levels ** 2).sum(1), 0)


def np_best_uniform(row: np.ndarray, bits: int) -> float:
    """The best uniform grid's squared error, by dense search and refinement (numpy only)."""
    nl = 1 << bits
    ws = np.sort(row.astype(np.float64))
    p1 = np.concatenate([[0.0], np.cumsum(ws)])
    p2 = np.concatenate([[0.0], np.cumsum(ws * ws)])
    span = max(ws[-1] - ws[0], 1e-30)
    k = np.arange(nl)
    steps = span / (nl - 1) * np.geomspace(1e-3, 1.05, 400)
    cands = []
    for s in steps:
        a = np.linspace(ws[0] - s * (nl - 1) * 0.5, ws[-1] - s * (nl - 1) * 0.5, 160)
        lv = a[:, None] + s * k
        e = np_errors(ws, p1, p2, lv)
        j = int(np.argmin(e))
        cands.append((e[j], s, a[j]))
    cands.sort()
    best = cands[0][0]
    for _, s, a in cands[:20]:
        for _ in range(300):  # alternating least squares of (step, offset)
            lv = a + s * k
            e = float(np_errors(ws, p1, p2, lv[None])[0])
            best = min(best, e)
            thr = (lv[1:] + lv[:-1]) / 2
            edges = np.concatenate([[0], np.searchsorted(ws, thr, side="left"), [len(ws)]])
            n = np.diff(edges).astype(float)
            s1 = np.diff(p1[edges])
            A = np.array([[(n * k * k).sum(), (n * k).sum()], [(n * k).sum(), n.sum()]])
            rhs = np.array([(s1 * k).sum(), s1.sum()])
            try:
                s_new, a_new = np.linalg.solve(A, rhs)
            except np.linalg.LinAlgError:
                break
            if abs(s_new - s) <= 1e-12 * abs(s) and abs(a_new - a) <= 1e-12 * span:
                break
            s, a = s_new, a_new
    return best


def random_restarts(w2d: torch.Tensor, bits: int, starts: int = 1000, seed: int = 0) -> float:
    """Best error of the library's alternation from ``starts`` random multipliers."""
    sw = F._Sorted(w2d, "random_restarts")
    g = torch.Generator().manual_seed(seed)
    std = float(sw.ws.std())
    r = std * torch.exp(torch.rand(1, starts, bits, generator=g, dtype=torch.float64) * 4.5 - 3)
    x0 = torch.cat([r, -r.sum(-1, keepdim=True) / 2], -1)
    _, err = F._alternate(sw, F._nmult_basis(bits, None), x0, 300)
    return float(err.min())


def plain_alternation_from_lsq(w2d: torch.Tensor, bits: int) -> float:
    step = lsq_step_init(w2d, bits)
    r, c = uniform_multipliers(step, bits)
    return float(F.fit_multipliers(w2d, bits, init=(r, c), search=False).error.sum())


# ------------------------------------------------------------------------------ part: mse

def mse_cell(name: str, w2d: torch.Tensor, bits: int, with_random: bool) -> dict:
    n = w2d.numel()
    ref = sum(np_best_uniform(row, bits) for row in w2d.double().numpy())
    t0 = time.perf_counter()
    fit = F.fit_multipliers(w2d, bits)
    t_fit = time.perf_counter() - t0
    lm = F.lloyd_max(w2d, bits, init=level_table(fit.r, fit.c).sort(1).values)
    lsq = F.grid_error(w2d, level_table(*uniform_multipliers(lsq_step_init(w2d, bits), bits)))
    cell = {"name": name, "bits": bits, "groups": w2d.shape[0], "weights": n,
            "uniform_ref_mse": ref / n,
            "fit": float(fit.error.sum()) / ref, "lib_uniform": float(fit.uniform.error.sum()) / ref,
            "lsq": float(lsq.sum()) / ref,
            "plain_from_lsq": plain_alternation_from_lsq(w2d, bits) / ref,
            "lloyd": float(lm.error.sum()) / ref,
            "fit_vs_lloyd": float(fit.error.sum() / lm.error.sum()), "fit_seconds": t_fit}
    if with_random:
        cell["random1000_vs_lloyd"] = random_restarts(w2d, bits) / float(lm.error.sum())
    return cell


def part_mse(args) -> dict:
    cells = []
    sets = []
    for d in DISTS:
        sets.append((f"{d} per tensor", synthetic(d, 1, 20000, args.seed), True))
        sets.append((f"{d} per channel", synthetic(d, 64, 320, args.seed), False))
    for lname, w in digits_layers(args.seed).items():
        sets.append((f"digits {lname} per tensor", w.reshape(1, -1), True))
        sets.append((f"digits {lname} per channel", w.reshape(w.shape[0], -1), False))
    for name, w2d, rnd in sets:
        for bits in (2, 3, 4):
            c = mse_cell(name, w2d, bits, rnd and bits >= 3)
            cells.append(c)
            print(f"{name:<34} N={bits}  fit {c['fit']:.3f}  vs Lloyd {c['fit_vs_lloyd']:.3f}  "
                  f"({c['fit_seconds']:.2f} s)", flush=True)
    return {"cells": cells}


def report_mse(res: dict) -> str:
    head = ("| weights | N | fitted | fitted / Lloyd-Max | library uniform | LSQ grid | "
            "plain alt. from LSQ | Lloyd-Max | 1000 random starts / Lloyd-Max |")
    lines = ["All ratios are squared error / best uniform grid (the script's own search), "
             "except the two marked / Lloyd-Max.", "", head, "|" + "---|" * 9]
    for c in res["cells"]:
        rnd = f"{c['random1000_vs_lloyd']:.3f}" if "random1000_vs_lloyd" in c else ""
        lines.append(f"| {c['name']} | {c['bits']} | **{c['fit']:.3f}** | {c['fit_vs_lloyd']:.3f} | "
                     f"{c['lib_uniform']:.4f} | {c['lsq']:.2f} | {c['plain_from_lsq']:.3f} | "
                     f"{c['lloyd']:.3f} | {rnd} |")
    fits = [c["fit"] for c in res["cells"]]
    lap = [c["fit"] for c in res["cells"] if c["name"].startswith("laplace") and c["bits"] >= 3]
    n3 = [(c["name"], c["fit_vs_lloyd"]) for c in res["cells"] if c["bits"] == 3]
    lines += ["", "Targets:",
              f"- fitted <= 1.0x best uniform in every cell: max {max(fits):.4f} -> "
              f"{'PASS' if max(fits) <= 1.0 + 1e-9 else 'FAIL'}",
              f"- fitted <= 0.92x on Laplace at N = 3, 4: max {max(lap):.3f} -> "
              f"{'PASS' if max(lap) <= 0.92 else 'FAIL'}",
              f"- fitted within 1.2x of Lloyd-Max at N = 3: "
              + ", ".join(f"{n} {v:.3f}{'' if v <= 1.2 else ' (FAIL)'}" for n, v in n3)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- part: speed

def resnet_weights():
    from qfv_brevitas.zoo.models import resnet18_cifar

    torch.manual_seed(0)
    return [p.detach().clone() for p in resnet18_cifar().parameters() if p.dim() > 1]


def fit_all(ws, bits: int, per_channel: bool):
    for w in ws:
        F.fit_multipliers(w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1), bits)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def mem_child(bits: int, per_channel: bool) -> None:
    """Extra peak RSS of fitting all layers: the heap trimmed and the peak (VmHWM) reset to the
    current RSS just before the fit (so the model build's own peak does not hide it), then
    VmHWM after minus VmRSS before. Falls back to the ``ru_maxrss`` difference (an under-read)
    where Linux refuses the reset."""
    ws = [w.clone() for w in resnet_weights()]
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        fit_all(ws, bits, per_channel)
        extra, how = _status_kib("VmHWM") - before, "VmHWM reset"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fit_all(ws, bits, per_channel)
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        how = "ru_maxrss difference (under-reads)"
    print(json.dumps({"extra_kib": extra, "how": how}))


def part_speed(args) -> dict:
    torch.set_num_threads(args.threads)
    ws = resnet_weights()
    n = sum(w.numel() for w in ws)
    flat = torch.cat([w.reshape(-1) for w in ws])

    def t_sort():
        for w in ws:
            torch.sort(w.reshape(1, -1), dim=1)

    r, c = uniform_multipliers(torch.tensor([0.01]), 4)
    r = r.requires_grad_()

    def t_reg():
        w = flat.view(1, -1).requires_grad_()
        ideal_distance(w, level_table(r, c)).backward()

    fns = {"fit per tensor": lambda: fit_all(ws, 4, False),
           "fit per channel": lambda: fit_all(ws, 4, True),
           "sort all weights (floor)": t_sort,
           "regularizer fwd+bwd": t_reg}
    for f in fns.values():
        f()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {}
    for pc in (False, True):
        out = subprocess.run([sys.executable, __file__, "--_mem-child", "4",
                              *(["--_per-channel"] if pc else []), "--threads",
                              str(args.threads)], capture_output=True, text=True, check=True)
        mem["per channel" if pc else "per tensor"] = json.loads(
            out.stdout.strip().splitlines()[-1])["extra_kib"] / 1024
    return {"weights": n, "layers": len(ws), "threads": args.threads, "median_s": med,
            "all_s": times, "extra_peak_mib": mem, "weights_mib": n * 4 / 2 ** 20,
            "dense_mib": n * 16 * 4 / 2 ** 20}


def report_speed(res: dict) -> str:
    m = res["median_s"]
    lines = [f"{res['weights']:,} weights in {res['layers']} tensors, N = 4, "
             f"torch threads {res['threads']}; medians:", "",
             "| what | s | x sort | x regularizer fwd+bwd |", "|---|---|---|---|"]
    for k, v in m.items():
        lines.append(f"| {k} | {v:.3f} | {v / m['sort all weights (floor)']:.2f} | "
                     f"{v / m['regularizer fwd+bwd']:.2f} |")
    mem = res["extra_peak_mib"]
    lines += ["", f"Extra peak RSS of fitting all layers: per tensor {mem['per tensor']:.0f} MiB, "
              f"per channel {mem['per channel']:.0f} MiB; the weights themselves "
              f"{res['weights_mib']:.0f} MiB; an n x 2**N float32 tensor would be "
              f"{res['dense_mib']:.0f} MiB.", "",
              f"Target: all layers per tensor < 5 s: {m['fit per tensor']:.2f} s -> "
              f"{'PASS' if m['fit per tensor'] < 5 else 'FAIL'}; peak memory O(n) (extra "
              f"< 4x the weights): {'PASS' if mem['per tensor'] < 4 * res['weights_mib'] else 'FAIL'}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ part: ptq

def ptq_methods(fp, bits: int, per_channel: bool, example):
    from qfv_brevitas.studies.ptq import brevitas_uniform

    out = {}
    out["brevitas max"] = brevitas_uniform(fp, bits, per_channel, example_input=example)
    out["brevitas mse"] = brevitas_uniform(fp, bits, per_channel, example_input=example,
                                           scale="mse")
    for name, variant, init in (("lsq grid", "fixed", "lsq"), ("best uniform", "fixed", "fit"),
                                ("fitted nmult", "nmult", "fit")):
        out[name] = quantize_model(fp, NMultConfig(weight_bits=bits, act_bits=None,
                                                   variant=variant, init=init,
                                                   per_channel=per_channel),
                                   example_input=example)
    # Reference: weights replaced by their nearest Lloyd-Max level (not an N-bit additive grid).
    from qfv_brevitas.core.search import nearest
    from qfv_brevitas.core.quantizers import nmult_layers, quant_of

    lm = copy.deepcopy(fp)
    for name, layer in nmult_layers(out["fitted nmult"]):
        tq = quant_of(layer)
        mod = lm.get_submodule(name)
        w2d = tq.to_groups(mod.weight.detach())
        q = nearest(w2d, F.lloyd_max(w2d, tq.bits).levels)[0]
        with torch.no_grad():
            mod.weight.copy_(tq.from_groups(q, mod.weight.shape))
    out["lloyd-max (ref)"] = lm
    for m in out.values():
        m.eval()
    return out


def part_ptq(args) -> dict:
    from torch.utils.data import DataLoader

    from bench_qat_levels import float_model
    from qfv_brevitas.zoo.data import load_digits_split
    from qfv_brevitas.training.train import evaluate

    rows = []
    cache = Path(args.out)
    for seed in args.seeds:
        train, test = load_digits_split(seed)
        fp = float_model(cache, seed, train, test)  # trained once per seed, cached in --out
        example = next(iter(DataLoader(train, batch_size=256)))[0]
        rows.append({"seed": seed, "bits": 32, "per_channel": False, "method": "float",
                     "acc": evaluate(fp, test)})
        for bits in args.bits:
            for pc in (False, True):
                for name, m in ptq_methods(fp, bits, pc, example).items():
                    rows.append({"seed": seed, "bits": bits, "per_channel": pc, "method": name,
                                 "acc": evaluate(m, test)})
                print(f"seed {seed} W{bits} {'per channel' if pc else 'per tensor'}: "
                      + ", ".join(f"{r['method']} {100 * r['acc']:.2f}"
                                  for r in rows if r["seed"] == seed and r["bits"] == bits
                                  and r["per_channel"] == pc), flush=True)
    return {"rows": rows}


def _paired(rows, a, b):
    xa = {r["seed"]: r["acc"] for r in rows if r["method"] == a}
    xb = {r["seed"]: r["acc"] for r in rows if r["method"] == b}
    d = [100 * (xa[s] - xb[s]) for s in sorted(set(xa) & set(xb))]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return statistics.fmean(d), se, sum(x > 0 for x in d), sum(x < 0 for x in d), len(d)


def report_ptq(res: dict) -> str:
    rows = res["rows"]
    fl = [r["acc"] for r in rows if r["method"] == "float"]
    seeds = sorted({r["seed"] for r in rows})
    methods = ["brevitas max", "brevitas mse", "lsq grid", "best uniform", "fitted nmult",
               "lloyd-max (ref)"]
    lines = [f"Seeds {seeds}; float {100 * statistics.fmean(fl):.2f}% (mean). Accuracy %, mean "
             "over seeds; fitted - Brevitas paired by seed: mean +- standard error "
             "(wins/losses).", "",
             "| W | granularity | " + " | ".join(methods) + " | fitted - Brevitas max | "
             "fitted - Brevitas MSE |", "|" + "---|" * (len(methods) + 4)]
    checks = []
    for bits in sorted({r["bits"] for r in rows if r["method"] != "float"}, reverse=True):
        for pc in (False, True):
            sub = [r for r in rows if r["bits"] == bits and r["per_channel"] == pc]
            accs = [statistics.fmean(100 * r["acc"] for r in sub if r["method"] == m)
                    for m in methods]
            pm = _paired(sub, "fitted nmult", "brevitas max")
            ps = _paired(sub, "fitted nmult", "brevitas mse")
            lines.append(f"| W{bits} | {'channel' if pc else 'tensor'} | "
                         + " | ".join(f"{a:.2f}" for a in accs)
                         + f" | {pm[0]:+.2f} +- {pm[1]:.2f} ({pm[2]}/{pm[3]}) | "
                         f"{ps[0]:+.2f} +- {ps[1]:.2f} ({ps[2]}/{ps[3]}) |")
            if bits in (2, 3):
                checks.append(f"W{bits} {'per channel' if pc else 'per tensor'}: fitted - "
                              f"Brevitas max {pm[0]:+.2f}, - Brevitas MSE {ps[0]:+.2f} -> "
                              f"{'PASS' if min(pm[0], ps[0]) >= 0 else 'FAIL'}")
    return "\n".join(lines + ["", "Targets (fitted >= Brevitas' uniform weight PTQ, mean paired "
                                  "difference >= 0):"] + [f"- {c}" for c in checks])


# ------------------------------------------------------------------------------ part: llm

#: GPT-2 small: per block the (out, in) shapes of its Linear weights (attention qkv and
#: projection, MLP up and down); the LM head (tied to the token embedding) is 50257 x 768.
GPT2_BLOCK = ((2304, 768), (768, 768), (3072, 768), (768, 3072))
GPT2_HEAD = (50257, 768)


def gpt2_weights(blocks: int = 12, head: bool = True, seed: int = 0):
    """The Linear weights of a GPT-2-small-shaped stack (plain ``nn.Linear``, GPT-2's own
    init: normal, std 0.02; seeded). 12 blocks + head: 123.5M weights."""
    torch.manual_seed(seed)
    shapes = [s for _ in range(blocks) for s in GPT2_BLOCK] + ([GPT2_HEAD] if head else [])
    out = []
    for o, i in shapes:
        lin = torch.nn.Linear(i, o)
        torch.nn.init.normal_(lin.weight, std=0.02)
        out.append(lin.weight.detach())
    return out


def llm_child(args) -> None:
    """In a fresh process: the weights built, one ``torch.sort`` of every weight (the
    reference), then the fit of all of them at ``--bits`` (per tensor or per channel) with
    its extra peak RSS (as ``mem_child``)."""
    import gc
    import ctypes

    ws = gpt2_weights(args.blocks, not args.no_head)
    t0 = time.perf_counter()
    for w in ws:
        torch.sort(w.reshape(1, -1), dim=1)
    sort_s = time.perf_counter() - t0
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    for w in ws:
        F.fit_multipliers(w if args.mem_pc else w.reshape(1, -1), args.bits)
    fit_s = time.perf_counter() - t0
    print(json.dumps({"fit_s": fit_s, "sort_s": sort_s,
                      "extra_kib": _status_kib("VmHWM") - before}))


def part_llm(args) -> dict:
    ws = gpt2_weights(args.blocks, not args.no_head)
    n, groups = sum(w.numel() for w in ws), sum(w.shape[0] for w in ws)
    res = {"weights": n, "tensors": len(ws), "groups": groups, "bits": args.bits[0],
           "threads": args.threads, "weights_mib": n * 4 / 2 ** 20}
    del ws
    for pc in (False, True):
        cmd = [sys.executable, __file__, "--_llm-child", "--bits", str(args.bits[0]),
               "--blocks", str(args.blocks), "--threads", str(args.threads),
               *(["--_per-channel"] if pc else []), *(["--no-head"] if args.no_head else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res["per channel" if pc else "per tensor"] = json.loads(
            out.stdout.strip().splitlines()[-1])
    return res


def report_llm(res: dict) -> str:
    pt, pc = res["per tensor"], res["per channel"]
    wm = res["weights_mib"]
    lines = [f"{res['weights']:,} weights in {res['tensors']} Linear tensors ({res['groups']:,} "
             f"output channels), N = {res['bits']}, torch threads {res['threads']}; each "
             "granularity in a fresh process:", "",
             "| what | s | x torch.sort of every weight (same process) | extra peak MiB | "
             "x the weights' float32 bytes |", "|---|---|---|---|---|"]
    for name, r in (("fit, per tensor", pt), ("fit, per channel", pc)):
        mib = r["extra_kib"] / 1024
        lines.append(f"| {name} | {r['fit_s']:.1f} | {r['fit_s'] / r['sort_s']:.2f} | "
                     f"{mib:.0f} | {mib / wm:.2f} |")
    ratio = pc["fit_s"] / pt["fit_s"]
    mem = pc["extra_kib"] / 1024 / wm
    lines += ["", f"per channel / per tensor time: {ratio:.2f}x (target <= 2: "
              f"{'PASS' if ratio <= 2 else 'FAIL'}); per channel extra peak / weights: "
              f"{mem:.2f}x (target < 4: {'PASS' if mem < 4 else 'FAIL'}); weights "
              f"{wm:.0f} MiB"]
    return "\n".join(lines)


# ------------------------------------------------------------------------- part: batched

def batched_cells(bits: int):
    """(name, (G, M) weights) of the quality comparison: ResNet-18's layers with at least
    128 output channels (where the batched search applies) and heavy-tailed LM-shaped
    matrices (Student-t 3 dof and Laplace; 768 channels of 768 and of 3072 weights)."""
    cells = [(f"resnet18 {tuple(w.shape)}", w.reshape(w.shape[0], -1))
             for w in resnet_weights() if w.shape[0] >= F_BATCHED_GROUPS]
    for dist in ("student_t3", "laplace"):
        for M in (768, 3072):
            cells.append((f"{dist} 768 x {M}", synthetic(dist, 768, M, 1)))
    return cells


def part_batched(args) -> dict:
    """Per-channel squared error of the batched search against the exhaustive one (today's
    per-channel fit, ``batched=False``), both against the best uniform grid, and times."""
    torch.set_num_threads(args.threads)
    rows = []
    for bits in args.bits:
        for name, w in batched_cells(bits):
            t0 = time.perf_counter()
            ref = F.fit_multipliers(w, bits, batched=False)
            t1 = time.perf_counter()
            new = F.fit_multipliers(w, bits, batched=True)
            t2 = time.perf_counter()
            ratio = new.error / ref.error.clamp_min(1e-300)
            rows.append({"name": name, "bits": bits, "groups": w.shape[0],
                         "mean": float(ratio.mean()), "max": float(ratio.max()),
                         "total": float(new.error.sum() / ref.error.sum()),
                         "ref_uni": float((ref.error / ref.uniform.error).mean()),
                         "new_uni": float((new.error / new.uniform.error).mean()),
                         "new_beats": float((new.error < ref.uniform.error).double().mean()),
                         "ref_beats": float((ref.error < ref.uniform.error).double().mean()),
                         "ref_s": t1 - t0, "new_s": t2 - t1})
    return {"rows": rows, "threads": args.threads}


def report_batched(res: dict) -> str:
    lines = ["| weights | N | channels | batched / exhaustive: mean | max | total | fitted / "
             "best uniform: exhaustive | batched | channels below uniform: exhaustive | "
             "batched | time exhaustive s | batched s |", "|" + "---|" * 12]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['bits']} | {r['groups']} | {r['mean']:.4f} | "
                     f"{r['max']:.3f} | {r['total']:.4f} | {r['ref_uni']:.4f} | "
                     f"{r['new_uni']:.4f} | {r['ref_beats']:.1%} | {r['new_beats']:.1%} | "
                     f"{r['ref_s']:.2f} | {r['new_s']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main

PARTS = {"mse": (part_mse, report_mse), "speed": (part_speed, report_speed),
         "ptq": (part_ptq, report_ptq), "llm": (part_llm, report_llm),
         "batched": (part_batched, report_batched)}
#: Groups from which ``fit_multipliers`` searches batched by default (its docstring).
F_BATCHED_GROUPS = 128


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=list(PARTS))
    p.add_argument("--print", dest="print_part", choices=list(PARTS),
                   help="print a saved part's report again")
    p.add_argument("--out", default="runs/bench_fit")
    p.add_argument("--seed", type=int, default=0, help="mse: seed of the synthetic weights")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="ptq seeds")
    p.add_argument("--bits", type=int, nargs="+", default=None,
                   help="ptq bit widths (default 4 3 2); llm: N (default 3); batched: N "
                        "(default 3 4)")
    p.add_argument("--blocks", type=int, default=12, help="llm: GPT-2 blocks (12: GPT-2 small)")
    p.add_argument("--no-head", action="store_true", help="llm: without the 50257 x 768 head")
    p.add_argument("--_llm-child", dest="llm_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--_mem-child", dest="mem_child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_per-channel", dest="mem_pc", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bits is None:
        args.bits = {"llm": [3], "batched": [3, 4]}.get(args.part, [4, 3, 2])
    if args.llm_child:
        torch.set_num_threads(args.threads)
        args.bits = args.bits[0]
        llm_child(args)
        return 0
    if args.mem_child is not None:
        torch.set_num_threads(args.threads)
        mem_child(args.mem_child, args.mem_pc)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.print_part:
        print(PARTS[args.print_part][1](json.loads((out / f"{args.print_part}.json")
                                                   .read_text())["result"]))
        return 0
    if not args.part:
        p.error("--part or --print is required")
    print(machine_line(), flush=True)
    t0 = time.perf_counter()
    res = PARTS[args.part][0](args)
    wall = time.perf_counter() - t0
    name = args.part if args.part != "ptq" or args.seeds == [0, 1, 2, 3, 4] else \
        f"ptq_s{'-'.join(map(str, args.seeds))}"
    (out / f"{name}.json").write_text(json.dumps(
        {"machine": machine_line(), "args": {k: v for k, v in vars(args).items()},
         "wall_s": wall, "result": res}, indent=2))
    print()
    print(PARTS[args.part][1](res))
    print(f"\n{wall:.0f} s; wrote {out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
