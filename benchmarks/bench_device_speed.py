#!/usr/bin/env python
"""Cost of the fault-aware and variability-aware regularizers, and of drawing device maps.

(a) On a seeded ``resnet18_cifar()`` (11.2M weights) converted with
``quantize_model(model, NMultConfig(weight_bits=4, act_bits=None))`` (per tensor, so one
``r``/``c`` per layer; first and last layers at 8 bits, as the library does), it times
forward+backward of ``regularization_loss(model)`` on three copies of the same model:

* ideal:        no map (the plain eq. 6/7 regularizer);
* faults:       a 10% bit-fault map attached to every N-multiplier layer
                (``sample_fault_map(model, FaultModel(rate=0.1, seed))`` + ``attach_faults``):
                the eq. 11 regularizer;
* variability:  a sigma/mu = 0.2 LRS map attached to every N-multiplier layer
                (``sample_variability_map(model, VariabilityModel(sigma=0.2, seed))`` +
                ``attach_variability``): the eq. 12 regularizer.

One warm-up each, then ``--repeats`` rounds that run all three (interleaved, the starting one
rotating each round); medians; ratios to the ideal median. With ``--load K [K ...]`` the rounds
are repeated with K busy processes of the script's own on the machine (``benchmarks/_load.py``),
each load's ratios against the ideal regularizer measured under the same load. As context, the
floor ``sum((w ** 2).sum())`` over the same weights is timed in the same rounds.

Then, each in a fresh process at N=8 (``--mem-bits``), the extra peak memory of one
forward+backward of the regularizer with no map, with the fault map and with the variability
map: the peak RSS after it minus the RSS just before it, with the model, its gradients and the
map already allocated (the peak is reset with ``/proc/self/clear_refs`` where Linux allows it;
elsewhere the ``ru_maxrss`` difference of ``bench_regularizer.py`` is used). An
``n x 2**N`` tensor would take n * 256 bytes even as uint8/bool (2.9 GB at 11.2M weights;
11.5 GB as float32), so an extra peak below n * 2**N bytes rules one out.

(b) Drawing and attaching maps on the same ResNet-18-sized model (N=4): the time of
``sample_fault_map`` + ``attach_faults`` (10%) and of ``sample_variability_map`` +
``attach_variability`` (0.2), medians of ``--repeats``, against one evaluation pass
(``qfv_brevitas.training.train.evaluate``) over the digits test set (360 images) of a SmallCNN converted
at W4A4 (the model the Monte Carlo benchmarks evaluate). As context it also prints the draw on
that SmallCNN itself, and one evaluation pass of the ResNet-18-sized model over 360 random
32x32 images.

Targets (printed PASS/FAIL, never a non-zero exit): faults/ideal <= 3x and variability/ideal
<= 3x at N=4; no n x 2**N tensor at N=8 (extra peak < n * 2**N bytes) with either map;
(sample + attach) / (one evaluation pass) < 5% for faults and for variability.

    python benchmarks/bench_device_speed.py [--repeats 5] [--load 0 2] [--width 64]
        [--mem-bits 8] [--seed 0] [--threads T] [--skip-mem] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qfv_brevitas import NMultConfig, quantize_model  # noqa: E402
from qfv_brevitas.zoo.data import load_digits_split  # noqa: E402
from qfv_brevitas.chip.faults import (FaultModel, attach_faults, detach_faults,  # noqa: E402
                                 sample_fault_map)
from qfv_brevitas.zoo.models import build_model, resnet18_cifar  # noqa: E402
from qfv_brevitas.core.quantizers import nmult_layers  # noqa: E402
from qfv_brevitas.training.regularizer import regularization_loss  # noqa: E402
from qfv_brevitas.training.train import evaluate  # noqa: E402
from qfv_brevitas.chip.variability import (VariabilityModel, attach_variability,  # noqa: E402
                                      detach_variability, sample_variability_map)
from _load import add_load_argument, busy_processes  # noqa: E402
from _machine import _loadavg, machine_line  # noqa: E402

FAULT_RATE = 0.10
SIGMA = 0.20
TARGET_RATIO = 3.0
TARGET_DRAW_FRACTION = 0.05
KINDS = ("ideal", "faults", "variability")


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Models and maps
# --------------------------------------------------------------------------------------------

def resnet_model(bits: int, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return quantize_model(resnet18_cifar(width=width), NMultConfig(weight_bits=bits, act_bits=None),
                          inplace=True)


def attach_map(model: nn.Module, kind: str, seed: int) -> None:
    if kind == "faults":
        attach_faults(model, sample_fault_map(model, FaultModel(rate=FAULT_RATE, seed=seed)))
    elif kind == "variability":
        attach_variability(model, sample_variability_map(
            model, VariabilityModel(sigma=SIGMA, seed=seed)))
    elif kind != "ideal":
        raise ValueError(kind)


def quantized_weights(model: nn.Module) -> List[torch.Tensor]:
    return [layer.weight for _, layer in nmult_layers(model)]


def n_weights(model: nn.Module) -> int:
    return sum(w.numel() for w in quantized_weights(model))


# --------------------------------------------------------------------------------------------
# (a) regularizer timing
# --------------------------------------------------------------------------------------------

def _floor(model: nn.Module) -> torch.Tensor:
    return sum((w ** 2).sum() for w in quantized_weights(model))


def time_regularizers(models: Dict[str, nn.Module], repeats: int) -> Dict[str, dict]:
    """Forward+backward of ``regularization_loss`` per model (plus the floor on the ideal
    model), interleaved; the first method of a round rotates so that none always goes first."""
    fns: Dict[str, Callable[[], torch.Tensor]] = {
        k: (lambda m=m: regularization_loss(m)) for k, m in models.items()}
    fns["floor"] = lambda: _floor(models["ideal"])
    owner = dict(models, floor=models["ideal"])

    def once(k):
        owner[k].zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = fns[k]()
        loss.backward()
        return time.perf_counter() - t0, float(loss.detach())

    out = {k: {"times_s": []} for k in fns}
    for k in fns:
        once(k)
    keys = list(fns)
    for i in range(repeats):
        for j in range(len(keys)):
            k = keys[(i + j) % len(keys)]
            t, loss = once(k)
            out[k]["times_s"].append(t)
            out[k]["loss"] = loss
    for k in keys:
        out[k]["median_s"] = statistics.median(out[k]["times_s"])
        owner[k].zero_grad(set_to_none=True)
    return out


# --------------------------------------------------------------------------------------------
# (a) peak memory, fresh process per measurement
# --------------------------------------------------------------------------------------------

def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give the heap's free memory back to the OS (glibc ``malloc_trim``): otherwise what the
    map draw freed stays resident and the measured pass reuses it unseen (an under-read)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mem_child(kind: str, bits: int, width: int, seed: int) -> dict:
    """Runs inside the subprocess: model + map + gradients allocated, then one
    forward+backward of the regularizer; its extra peak RSS.

    Where ``/proc/self/clear_refs`` accepts "5", the peak (VmHWM) is reset to the current RSS
    just before the measured pass: extra peak = VmHWM after - RSS before. That reset also
    lowers what ``getrusage`` reports, so ``ru_maxrss`` is used only where the reset fails
    (then, as in bench_regularizer.py, ru_maxrss after - ru_maxrss before, which under-reads
    by up to the slack between the set-up's peak and the RSS before the pass)."""
    model = resnet_model(bits, width, seed)
    attach_map(model, kind, seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    gc.collect()
    _trim_heap()
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_hwm()
    base_rss = _status_kib("VmRSS")
    base_hwm = _status_kib("VmHWM")
    loss = regularization_loss(model)
    loss.backward()
    after_hwm = _status_kib("VmHWM")
    after_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = n_weights(model)
    out = {"kind": kind, "bits": bits, "n": n, "loss": float(loss.detach()),
           "baseline_rss_mib": None if base_rss is None else base_rss / 1024}
    if reset and after_hwm is not None and base_hwm is not None:
        out.update(method="VmHWM reset", extra_peak_mib=(after_hwm - base_hwm) / 1024,
                   slack_mib=0.0)
    else:
        out.update(method="ru_maxrss", extra_peak_mib=(after_maxrss - base_maxrss) / 1024,
                   slack_mib=None if base_rss is None else max(base_maxrss - base_rss, 0) / 1024)
    return out


def measure_peak(kind: str, bits: int, width: int, seed: int, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem-child", kind, "--mem-bits",
           str(bits), "--width", str(width), "--seed", str(seed), "--threads", str(threads)]
    if os.path.exists("/bin/sh"):
        # As in bench_regularizer.py: a shell that forks (the command is not its last) gives
        # the child a ru_maxrss counter that does not start at this process's high-water mark.
        cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh"] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"kind": kind, "error": f"child exited {p.returncode}: {p.stderr.strip()[-400:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# (b) drawing maps against an evaluation pass
# --------------------------------------------------------------------------------------------

def _median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "times_s": ts}


def time_draws(model: nn.Module, repeats: int, seed: int) -> Dict[str, dict]:
    out = {}
    for kind in ("faults", "variability"):
        k = iter(range(seed, seed + 10 ** 6))  # a new map every call, as in the Monte Carlo
        out[kind] = _median_time(lambda: attach_map(model, kind, next(k)), repeats)
        detach_faults(model)
        detach_variability(model)
    return out


def small_cnn_setup(seed: int):
    train, test = load_digits_split(seed)
    torch.manual_seed(seed)
    x = next(iter(torch.utils.data.DataLoader(train, batch_size=256)))[0]
    cfg = NMultConfig(weight_bits=4, act_bits=4)
    model = quantize_model(build_model("small_cnn", (1, 8, 8), 10), cfg, example_input=x)
    # Past Brevitas' activation-statistics phase, as a trained model is (no weight update).
    model.train()
    with torch.no_grad():
        for _ in range(cfg.act_collect_stats_steps + 1):
            model(x[:64])
    model.eval()
    return model, test


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def _pf(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    res: dict = {"machine": machine_line(), "args": {k: v for k, v in vars(args).items()
                                                     if k != "_mem_child"}}
    t_start = time.perf_counter()

    # (a) timing at N=4
    _log(f"building resnet18_cifar(width={args.width}) at W4 (act_bits=None) and its maps")
    ideal = resnet_model(4, args.width, args.seed)
    models = {"ideal": ideal}
    for kind in ("faults", "variability"):
        m = copy.deepcopy(ideal)
        attach_map(m, kind, args.seed)
        models[kind] = m
    n = n_weights(ideal)
    res["n"] = n
    res["layers"] = [(name, layer.weight_quant.tensor_quant.bits, layer.weight.numel())
                     for name, layer in nmult_layers(ideal)]
    res["timing"] = {}
    for k in args.load:
        _log(f"timing regularization_loss forward+backward, n={n}, {args.repeats} rounds, "
             f"{k} busy processes")
        with busy_processes(k):
            res["timing"][k] = time_regularizers(models, args.repeats)
    del models

    # (a) memory at N=8
    res["mem"] = []
    if not args.skip_mem:
        for kind in KINDS:
            _log(f"N={args.mem_bits}: peak memory of the regularizer, {kind} (fresh process)")
            res["mem"].append(measure_peak(kind, args.mem_bits, args.width, args.seed,
                                           args.threads))

    # (b) draws vs one evaluation pass
    _log("timing map draws on the ResNet-18-sized model")
    res["draw_resnet"] = time_draws(ideal, args.repeats, args.seed + 1)
    small, test = small_cnn_setup(args.seed)
    _log("timing one evaluation pass of SmallCNN W4A4 over the digits test set")
    res["eval_small"] = _median_time(lambda: evaluate(small, test), max(args.repeats, 10))
    res["eval_small"]["images"] = len(test)
    res["small_n"] = n_weights(small)
    res["draw_small"] = time_draws(small, max(args.repeats, 10), args.seed + 1)
    if not args.skip_resnet_eval:
        _log("context: one evaluation pass of the ResNet-18-sized model over 360 random images")
        g = torch.Generator().manual_seed(args.seed)
        x = torch.rand(len(test), 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (len(test),), generator=g)
        ds = torch.utils.data.TensorDataset(x, y)
        ideal.eval()
        res["eval_resnet"] = _median_time(lambda: evaluate(ideal, ds, batch_size=120), 1,
                                          warmup=0)
    res["wall_s"] = time.perf_counter() - t_start
    res["loadavg_end"] = _loadavg()
    return res


def targets(res: dict) -> List[str]:
    out = []
    for load, tm in res["timing"].items():
        for kind in ("faults", "variability"):
            r = tm[kind]["median_s"] / tm["ideal"]["median_s"]
            out.append(f"{_pf(r <= TARGET_RATIO)}  {kind}/ideal regularizer forward+backward at "
                       f"N=4 <= {TARGET_RATIO:g}x, load {load}: {r:.2f}x")
    for m in res["mem"]:
        if m["kind"] == "ideal":
            continue
        if "error" in m:
            out.append(f"n/a   no n*2^N tensor ({m['kind']}): {m['error']}")
            continue
        limit = m["n"] * (1 << m["bits"]) / 2 ** 20
        peak = m["extra_peak_mib"]
        out.append(f"{_pf(peak < limit)}  no n*2^N tensor at N={m['bits']} ({m['kind']}): extra "
                   f"peak {peak:.0f} MiB < n*2^N bytes = {limit:.0f} MiB (float32: "
                   f"{4 * limit:.0f} MiB)")
    ev = res["eval_small"]["median_s"]
    for kind in ("faults", "variability"):
        d = res["draw_resnet"][kind]["median_s"]
        out.append(f"{_pf(d / ev < TARGET_DRAW_FRACTION)}  {kind} sample+attach on the "
                   f"ResNet-18-sized model < {100 * TARGET_DRAW_FRACTION:g}% of one SmallCNN "
                   f"evaluation pass over digits: {100 * d / ev:.1f}% ({d:.4f} s vs {ev:.4f} s)")
    return out


def report(res: dict) -> str:
    n = res["n"]
    lines = ["## Fault-/variability-aware regularizer and map draws", "", res["machine"],
             f"Load average at end {res['loadavg_end']}", "",
             f"(a) regularization_loss(model) forward+backward, resnet18_cifar(width="
             f"{res['args']['width']}) quantized with NMultConfig(weight_bits=4, act_bits=None): "
             f"{len(res['layers'])} N-multiplier layers, n={n} weights (first/last at 8 bits: "
             f"{', '.join(f'{nm} {b}b {k}' for nm, b, k in res['layers'] if b != 4)}); maps on "
             f"every layer; median of {res['args']['repeats']} interleaved rounds after 1 warm-up; "
             "load K = K busy processes of the script's own during the rounds",
             "",
             "| load | state | median s | min-max s | x ideal |",
             "|---|---|---|---|---|"]
    names = {"ideal": "ideal (no map, eq. 6/7)", "faults": f"faults {FAULT_RATE:.0%} (eq. 11)",
             "variability": f"variability sigma/mu {SIGMA} (eq. 12)",
             "floor": "context: floor sum((w**2).sum())"}
    for load, tm in res["timing"].items():
        ideal = tm["ideal"]["median_s"]
        for k in ("ideal", "faults", "variability", "floor"):
            t = tm[k]
            lines.append(f"| {load} | {names[k]} | {t['median_s']:.4f} | "
                         f"{min(t['times_s']):.4f}-{max(t['times_s']):.4f} | "
                         f"{t['median_s'] / ideal:.2f} |")
    if res["mem"]:
        lines += ["", f"Extra peak memory of one forward+backward at N={res['args']['mem_bits']} "
                      "(fresh process each; model, gradients and map allocated beforehand):", "",
                  "| state | n | baseline RSS MiB | extra peak MiB | measured by | "
                  "n*2^N bytes MiB |",
                  "|---|---|---|---|---|---|"]
        for m in res["mem"]:
            if "error" in m:
                lines.append(f"| {m['kind']} | error: {m['error']} | | | | |")
                continue
            how = m["method"]
            if m["slack_mib"]:
                how += f" (may under-read by up to {m['slack_mib']:.0f} MiB)"
            base = m["baseline_rss_mib"]
            lines.append(f"| {m['kind']} | {m['n']} | {'-' if base is None else f'{base:.0f}'} | "
                         f"{m['extra_peak_mib']:.0f} | {how} | "
                         f"{m['n'] * (1 << m['bits']) / 2 ** 20:.0f} |")
    ev = res["eval_small"]
    lines += ["", "(b) map draw (sample + attach, a new seed per call) against one evaluation "
                  "pass, medians:", "",
              "| what | median s | vs one SmallCNN eval pass |", "|---|---|---|",
              f"| one evaluation pass, SmallCNN W4A4 ({res['small_n']} weights), digits test set "
              f"({ev['images']} images) | {ev['median_s']:.4f} | 1 |"]
    for kind in ("faults", "variability"):
        d = res["draw_resnet"][kind]["median_s"]
        lines.append(f"| {kind} draw on the ResNet-18-sized model ({n} weights) | {d:.4f} | "
                     f"{100 * d / ev['median_s']:.1f}% |")
    for kind in ("faults", "variability"):
        d = res["draw_small"][kind]["median_s"]
        lines.append(f"| context: {kind} draw on the SmallCNN itself | {d:.4f} | "
                     f"{100 * d / ev['median_s']:.1f}% |")
    if "eval_resnet" in res:
        e = res["eval_resnet"]["median_s"]
        lines.append(f"| context: one evaluation pass of the ResNet-18-sized model over "
                     f"{ev['images']} random 32x32 images (1 run) | {e:.4f} | "
                     f"{e / ev['median_s']:.0f}x |")
        for kind in ("faults", "variability"):
            d = res["draw_resnet"][kind]["median_s"]
            lines.append(f"| context: {kind} draw on ResNet / ResNet eval pass | | "
                         f"{100 * d / e:.1f}% |")
    lines += ["", "Targets (informational; a miss does not change the exit status):"]
    lines += [f"- {t}" for t in targets(res)]
    lines += ["", f"Total benchmark wall time: {res['wall_s']:.1f} s"]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    add_load_argument(p)
    p.add_argument("--width", type=int, default=64,
                   help="ResNet-18 width (64 = 11.2M weights; smaller for a quick check)")
    p.add_argument("--mem-bits", type=int, default=8, help="N of the peak-memory measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads(T) (0 = torch's default)")
    p.add_argument("--skip-mem", action="store_true")
    p.add_argument("--skip-resnet-eval", action="store_true",
                   help="skip the context evaluation pass of the ResNet-18-sized model")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--_mem-child", dest="_mem_child", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not 1 <= args.mem_bits <= 8:
        p.error("--mem-bits must be in 1..8")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._mem_child:
        print(json.dumps(mem_child(args._mem_child, args.mem_bits, args.width, args.seed)))
        return 0
    print("bench_device_speed: " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    res = run(args)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
