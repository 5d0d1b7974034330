#!/usr/bin/env python
"""Benchmark of the eq. 6/7 regularizer (squared distance to the nearest level) for one layer.

In ONE run, on the same seeded weights (float32, ``randn * 0.05``, default 11M = ResNet-18 size):

* floor:   forward+backward of ``(w ** 2).sum()``, the cheapest possible pass over the weights;
* library: forward+backward of ``ideal_distance(w2d, level_table(r, c))`` with ``r`` and
  ``c`` requiring grad and ``r`` perturbed (``r * (1 + 0.1 * rand)``) so the levels are truly
  non-uniform;
* naive:   a re-implementation of the reference algorithm -- a Python loop over all ``2**N``
  levels, each a full pass ``(w - level) ** 2`` kept in the autograd graph, then
  ``torch.stack(...).min(0)`` and a sum. It needs about ``n * 2**N * 4 * 3`` bytes, so it is
  skipped when that exceeds ``--naive-max-bytes``; it is then run on the largest prefix of the
  weights that fits (a "subset" row, with the library timed on the same subset for the ratio).

Each time is the median over ``--repeats`` forward+backward passes after one warm-up; the methods
of one bit width are interleaved (round-robin) so that they all see the same machine load, and
the floor is re-timed with each bit width for the ratio. The extra
peak memory of each method is measured in a fresh subprocess (this script with a hidden flag):
peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) after one forward+backward minus the peak RSS
after allocating ``w`` and its grad.

With ``--load K [K ...]`` all timings are repeated with K busy processes of the script's own
on the machine (``benchmarks/_load.py``), the floor re-timed under the same load; peak memory
is measured once (at the first load).

Targets (printed PASS/FAIL, never a non-zero exit): library <= 3x floor at N=4 (at every load);
naive/library >= 15x at N=4; library extra peak at N=8 <= 2048 MiB.

    python benchmarks/bench_regularizer.py [--weights 11000000] [--bits 4 8] [--repeats 5]
        [--load 0 2] [--per-channel G] [--skip-naive] [--naive-max-bytes 4e9]
        [--no-naive-subset] [--skip-mem] [--threads T] [--json out.json]
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
from typing import Callable, Dict, List, Optional, Tuple

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from qfv_brevitas.core.distance import ideal_distance  # noqa: E402
from qfv_brevitas.core.levels import level_table, lsq_step_init, uniform_multipliers  # noqa: E402
from _load import add_load_argument, busy_processes  # noqa: E402
from _machine import _loadavg, machine_info  # noqa: E402

TARGET_LIB_OVER_FLOOR_N4 = 3.0
TARGET_NAIVE_OVER_LIB_N4 = 15.0
TARGET_PEAK_MIB_N8 = 2048.0
NAIVE_BYTES_PER_ELEM = 4 * 3  # float32; distances + autograd-saved differences + stacked copy


# --------------------------------------------------------------------------------------------
# Problem set-up (shared by the timing run and the memory subprocesses: same seed, same data)
# --------------------------------------------------------------------------------------------

def make_weights(n: int, groups: int, seed: int) -> torch.Tensor:
    """Leaf ``(G, n // G)`` float32 weights ``randn * 0.05`` (generated in place, no temporary)."""
    m = n // groups
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(groups * m, generator=g, dtype=torch.float32).mul_(0.05)
    return w.view(groups, m).requires_grad_(True)


def make_quantizer(w2d: torch.Tensor, bits: int, seed: int):
    """LSQ-initialised uniform multipliers, perturbed by up to +10 % so the levels are non-uniform."""
    step = lsq_step_init(w2d, bits)
    r, c = uniform_multipliers(step, bits)
    g = torch.Generator().manual_seed(seed + 1000 + bits)
    r = r * (1.0 + 0.1 * torch.rand(r.shape, generator=g, dtype=r.dtype))
    return r.detach().requires_grad_(True), c.detach().requires_grad_(True)


def floor_loss(w2d, r, c):
    return (w2d ** 2).sum()


def library_loss(w2d, r, c):
    return ideal_distance(w2d, level_table(r, c))


def naive_loss(w2d, r, c):
    """Reference algorithm: one full pass per level, all kept in the graph, then a min."""
    levels = level_table(r, c)  # (G, L)
    dists = []
    for k in range(levels.shape[1]):
        dists.append((w2d - levels[:, k:k + 1]) ** 2)
    return torch.stack(dists).min(0).values.sum()


METHODS: Dict[str, Callable] = {"floor": floor_loss, "library": library_loss, "naive": naive_loss}


def naive_bytes(n: int, bits: int) -> int:
    return n * (1 << bits) * NAIVE_BYTES_PER_ELEM


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def time_interleaved(fns: Dict[str, Callable], w2d, r, c, repeats: int,
                     capture: Tuple[str, ...] = ()) -> Dict[str, dict]:
    """Forward+backward times of several methods on the same tensors, interleaved.

    One warm-up of each method, then ``repeats`` rounds that run every method once, so that
    all methods see the same machine conditions (load from other processes shifts all of them,
    not just one). Returns per method the median, the times, the last loss and, for the methods
    in ``capture``, clones of the gradients of the last run.
    """
    params = (w2d, r, c)

    def once(fn):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        loss = fn(w2d, r, c)
        loss.backward()
        return time.perf_counter() - t0, float(loss.detach())

    out = {k: {"times_s": []} for k in fns}
    for fn in fns.values():
        once(fn)
    for i in range(repeats):
        for k, fn in fns.items():
            t, loss = once(fn)
            out[k]["times_s"].append(t)
            out[k]["loss"] = loss
            if i == repeats - 1 and k in capture:
                out[k]["grads"] = {"w": w2d.grad.clone(), "r": r.grad.clone(),
                                   "c": c.grad.clone()}
    for k in fns:
        out[k]["median_s"] = statistics.median(out[k]["times_s"])
    for p in params:
        p.grad = None
    return out


# --------------------------------------------------------------------------------------------
# Peak memory (fresh process per measurement)
# --------------------------------------------------------------------------------------------

def _rss_now_kib() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return None


def mem_child(method: str, n: int, groups: int, bits: int, seed: int) -> dict:
    """Runs inside the subprocess: one forward+backward, peak RSS before/after (KiB on Linux)."""
    w2d = make_weights(n, groups, seed)
    r, c = make_quantizer(w2d, bits, seed)  # its |w| temporary is freed before the baseline
    w2d.grad = torch.zeros_like(w2d)  # baseline includes w and its grad
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base_rss = _rss_now_kib()
    loss = METHODS[method](w2d, r, c)
    loss.backward()
    after_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method, "n": w2d.numel(), "bits": bits,
        "baseline_peak_kib": base_peak, "baseline_rss_kib": base_rss,
        "after_peak_kib": after_peak,
        "extra_peak_mib": (after_peak - base_peak) / 1024.0,
        # Peak above current RSS at the baseline: an extra peak smaller than this is under-read.
        "baseline_slack_mib": None if base_rss is None else max(base_peak - base_rss, 0) / 1024.0,
    }


def measure_peak(method: str, n: int, groups: int, bits: int, seed: int, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem-child", method, "--weights", str(n),
           "--per-channel", str(groups), "--bits", str(bits), "--seed", str(seed),
           "--threads", str(threads)]
    if os.path.exists("/bin/sh"):
        # On Linux a process's ru_maxrss starts at the peak RSS of the process that exec'd it
        # (vfork+exec passes the parent's high-water mark on). Going through a shell that forks
        # (the command is not its last, so it cannot exec it) gives the child a clean counter.
        cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh"] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": f"child exited {p.returncode}: {p.stderr.strip()[-300:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------



def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _agreement(lib: dict, nv: dict) -> dict:
    """Library vs naive on the same data: loss and gradients (sanity check, not timed)."""
    gl, gn = lib["grads"], nv["grads"]
    # A weight within rounding of a decision threshold may be snapped to either neighbour by
    # the two algorithms; its d/dw then differs (same loss). Count such weights.
    tol = 1e-5 * float(gl["w"].abs().max()) + 1e-12
    mism = int(((gn["w"] - gl["w"]).abs() > tol).sum())

    def rel(a, b):
        return float((a - b).abs().max() / (b.abs().max() + 1e-30))

    return {
        "loss_rel_diff": abs(nv["loss"] - lib["loss"]) / (abs(lib["loss"]) + 1e-30),
        "grad_w_mismatches": mism,
        "grad_r_rel_diff": rel(gn["r"], gl["r"]),
        "grad_c_rel_diff": rel(gn["c"], gl["c"]),
    }


def _rows_from(timed: Dict[str, dict], bits: int, n: int, prefix: str = "",
               key_suffix: str = "", load: int = 0) -> List[dict]:
    names = {"floor": "floor (w**2).sum()", "library": "library ideal_distance",
             "naive": "naive 2^N-pass loop"}
    t_floor = timed["floor"]["median_s"]
    rows = []
    for k, t in timed.items():
        row = {"method": prefix + names[k], "key": k + key_suffix, "bits": bits, "n": n,
               "load": load, "median_s": t["median_s"], "times_s": t["times_s"]}
        if k != "floor":
            row["x_floor"] = t["median_s"] / t_floor
        if k == "naive":
            row["naive_over_lib"] = t["median_s"] / timed["library"]["median_s"]
        rows.append(row)
    return rows


def run(args) -> dict:
    n_req, G = args.weights, args.per_channel
    if G < 1 or n_req < G:
        raise SystemExit("--per-channel G must be >= 1 and <= --weights")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    w2d = make_weights(n_req, G, args.seed)
    n = w2d.numel()
    rows: List[dict] = []
    checks: List[dict] = []
    t_start = time.perf_counter()

    for load in args.load:
        _log(f"load {load}: {load} busy processes during the timed rounds")
        with busy_processes(load):
            new_rows, new_checks = _run_load(args, w2d, n_req, G, n, load)
        rows.extend(new_rows)
        checks.extend(new_checks)

    return {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "_mem_child"},
            "n": n, "groups": G, "rows": rows, "checks": checks,
            "wall_s": time.perf_counter() - t_start, "loadavg_end": _loadavg()}


def _run_load(args, w2d, n_req: int, G: int, n: int, load: int):
    """Every N of ``--bits`` at one load; peak memory (load-independent) at the first load."""
    rows: List[dict] = []
    checks: List[dict] = []
    for bits in args.bits:
        r, c = make_quantizer(w2d, bits, args.seed)
        need = naive_bytes(n, bits)
        run_naive = not args.skip_naive and need <= args.naive_max_bytes
        fns = {"floor": floor_loss, "library": library_loss}
        if run_naive:
            fns["naive"] = naive_loss
        _log(f"N={bits}, n={n}: {', '.join(fns)}"
             + (f" (naive ~{need / 1e9:.1f} GB)" if run_naive else ""))
        timed = time_interleaved(fns, w2d, r, c, args.repeats, capture=("library", "naive"))
        new_rows = _rows_from(timed, bits, n, load=load)
        if run_naive:
            checks.append({"bits": bits, "n": n, "load": load,
                           **_agreement(timed["library"], timed["naive"])})
        del timed
        if not args.skip_mem and load == args.load[0]:
            for row in new_rows:
                if row["key"] == "floor" and bits != args.bits[0]:
                    continue  # the floor does not depend on N
                _log(f"N={bits}: peak memory of {row['key']} (fresh process)")
                row["mem"] = measure_peak(row["key"], n_req, G, bits, args.seed, args.threads)
        rows.extend(new_rows)
        if args.skip_naive or run_naive:
            continue

        skipped = (f"skipped (would need {need / 1e9:.1f} GB > "
                   f"--naive-max-bytes {args.naive_max_bytes / 1e9:.1f} GB)")
        rows.append({"method": "naive 2^N-pass loop", "key": "naive", "bits": bits, "n": n,
                     "load": load, "skipped": skipped})
        _log(f"naive N={bits}: {skipped}")
        # Largest prefix of every group's row that fits the budget, same levels as above.
        m_sub = int(args.naive_max_bytes // ((1 << bits) * NAIVE_BYTES_PER_ELEM * G))
        if args.no_naive_subset or m_sub < 1:
            continue
        ws = w2d.detach()[:, :m_sub].contiguous().requires_grad_(True)
        rs, cs = r.detach().clone().requires_grad_(True), c.detach().clone().requires_grad_(True)
        ns = ws.numel()
        _log(f"N={bits}, subset n={ns}: floor, library, naive")
        timed = time_interleaved({"floor": floor_loss, "library": library_loss,
                                  "naive": naive_loss}, ws, rs, cs, args.repeats,
                                 capture=("library", "naive"))
        checks.append({"bits": bits, "n": ns, "load": load,
                       **_agreement(timed["library"], timed["naive"])})
        rows.extend(_rows_from(timed, bits, ns, prefix="subset: ", key_suffix="_subset",
                               load=load))
        del ws, rs, cs, timed
    return rows, checks


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def targets(res: dict) -> List[str]:
    def find(key, bits, load):
        return next((r for r in res["rows"] if r["key"] == key and r["bits"] == bits
                     and r.get("load", 0) == load), None)

    out = []
    loads = res["args"].get("load", [0])
    for load in loads:
        at = f" (load {load})" if len(loads) > 1 or load else ""
        lib4, nv4 = find("library", 4, load), find("naive", 4, load)
        if lib4 is not None:
            v = lib4["x_floor"]
            out.append(f"library <= {TARGET_LIB_OVER_FLOOR_N4:g}x floor at N=4{at}: {v:.2f}x  "
                       f"{'PASS' if v <= TARGET_LIB_OVER_FLOOR_N4 else 'FAIL'}")
        else:
            out.append(f"library <= 3x floor at N=4{at}: n/a (N=4 not run)")
        if nv4 is not None and "naive_over_lib" in nv4:
            v = nv4["naive_over_lib"]
            out.append(f"naive/library >= {TARGET_NAIVE_OVER_LIB_N4:g}x at N=4{at}: {v:.1f}x  "
                       f"{'PASS' if v >= TARGET_NAIVE_OVER_LIB_N4 else 'FAIL'}")
        else:
            out.append(f"naive/library >= 15x at N=4{at}: n/a (naive not run at N=4)")
    lib8 = find("library", 8, loads[0])
    mem8 = (lib8 or {}).get("mem") or {}
    if "extra_peak_mib" in mem8:
        v = mem8["extra_peak_mib"]
        out.append(f"library extra peak at N=8 <= {TARGET_PEAK_MIB_N8:g} MiB "
                   f"(n={lib8['n']}): {v:.0f} MiB  {'PASS' if v <= TARGET_PEAK_MIB_N8 else 'FAIL'}")
    else:
        why = mem8.get("error", "N=8 not run or --skip-mem")
        out.append(f"library extra peak at N=8 <= 2048 MiB: n/a ({why})")
    return out


def report(res: dict) -> str:
    m = res["machine"]
    lines = [
        "## Regularizer forward+backward (eq. 6/7, one layer)",
        "",
        f"Machine: {m['platform']}, {m['processor']}, cpu_count={m['cpu_count']} "
        f"(affinity {m['cpu_affinity']}), RAM {m['mem_total_gib']} GiB, Python {m['python']}, "
        f"torch {m['torch']}, torch.get_num_threads()={m['torch_num_threads']}",
        f"Load average (1/5/15 min) at start {m['loadavg_start']}, at end {res['loadavg_end']} "
        "(other processes competing for the cores inflate and scatter the times).",
        f"Weights: n={res['n']} float32 randn*0.05 (seed {res['args']['seed']}), G={res['groups']} "
        f"({'per-tensor' if res['groups'] == 1 else 'per-channel'}); r perturbed by "
        f"(1 + 0.1*rand), r and c require grad. Median of {res['args']['repeats']} runs after "
        "1 warm-up, methods of one N interleaved; the floor is re-timed with each N and load. "
        "Load K: K busy processes of the script's own while that load's rounds run.",
        "",
        "| load | method | bits | n | median s | min-max s | x floor | naive/library | "
        "extra peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        mem = r.get("mem") or {}
        peak = mem.get("extra_peak_mib")
        peak_s = "error" if "error" in mem else _fmt(peak, ".0f")
        ts = r.get("times_s")
        spread = f"{min(ts):.4f}-{max(ts):.4f}" if ts else "-"
        load = r.get("load", 0)
        if "skipped" in r:
            lines.append(f"| {load} | {r['method']} | {r['bits']} | {r['n']} | {r['skipped']} | - "
                         "| - | - | - |")
            continue
        lines.append(
            f"| {load} | {r['method']} | {_fmt(r['bits'], 'd')} | {r['n']} | {r['median_s']:.4f} | "
            f"{spread} | {_fmt(r.get('x_floor'), '.2f')} | {_fmt(r.get('naive_over_lib'), '.1f')} | {peak_s} |")
    lines.append("")
    lines.append("Extra peak = ru_maxrss after one forward+backward minus ru_maxrss after allocating "
                 "w and w.grad, each in a fresh process.")
    slack = [(r["key"], r["bits"], r["mem"]["baseline_slack_mib"]) for r in res["rows"]
             if (r.get("mem") or {}).get("baseline_slack_mib")]
    if slack:
        lines.append("Baseline peak above baseline RSS (extra peak may be under-read by up to): "
                     + ", ".join(f"{k} N={b}: {s:.0f} MiB" for k, b, s in slack))
    errs = [f"{r['key']} N={r['bits']}: {r['mem']['error']}" for r in res["rows"]
            if "error" in (r.get("mem") or {})]
    if errs:
        lines.append("Memory child errors: " + "; ".join(errs))
    if res["checks"]:
        lines.append("")
        lines.append("Library vs naive on the same data (sanity, not timed):")
        for ck in res["checks"]:
            lines.append(
                f"- N={ck['bits']}, n={ck['n']}, load {ck.get('load', 0)}: "
                f"loss rel diff {ck['loss_rel_diff']:.1e}, "
                f"grad_w elements differing {ck['grad_w_mismatches']}, grad_r rel diff "
                f"{ck['grad_r_rel_diff']:.1e}, grad_c rel diff {ck['grad_c_rel_diff']:.1e}")
    lines.append("")
    lines.append("Targets (informational; a miss does not change the exit status):")
    lines.extend(f"- {t}" for t in targets(res))
    lines.append("")
    lines.append(f"Total benchmark wall time: {res['wall_s']:.1f} s")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=int, default=11_000_000, help="number of weights (11M = ResNet-18)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8], help="bit widths N (1..8)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (after 1 warm-up)")
    add_load_argument(p)
    p.add_argument("--per-channel", type=int, default=1, metavar="G",
                   help="number of groups G (1 = per-tensor); weights are reshaped to (G, n // G)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-naive", action="store_true", help="do not run the naive reference")
    p.add_argument("--naive-max-bytes", type=float, default=4e9,
                   help="skip the naive loop when n * 2**N * 4 * 3 bytes exceeds this")
    p.add_argument("--no-naive-subset", action="store_true",
                   help="when the naive loop is skipped, do not run it on a subset that fits")
    p.add_argument("--skip-mem", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads(T) before timing (0 = torch's default)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_mem-child", dest="_mem_child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for b in args.bits:
        if not 1 <= b <= 8:
            p.error(f"--bits must be in 1..8, got {b}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._mem_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(mem_child(args._mem_child, args.weights, args.per_channel,
                                   args.bits[0], args.seed)))
        return 0
    res = run(args)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
