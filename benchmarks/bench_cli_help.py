"""How long ``qfv --help`` takes, against ``import torch`` measured in the same run.

    python benchmarks/bench_cli_help.py [--repeats 7] [--json out.json]

Each figure is the median wall time of ``--repeats`` fresh interpreters (after one warm-up
each, so the files are in the page cache), run round-robin so that they see the same load:

- **import torch**: ``python -c "import torch"``, the reference;
- **qfv --help** and **qfv COMMAND --help** for the slowest-to-declare commands (``python -m
  qfv_brevitas ...``): printed from the stored parser description, no torch;
- **real parser**: building the full parser and formatting its help, what ``qfv --help`` did
  before (every command's options declared: the configs import torch and Brevitas);
- **qfv --version**.

Target: every help at most 0.25x ``import torch``. Not a test: a missed target prints FAIL.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CASES = {
    "import torch": [PY, "-c", "import torch"],
    "qfv --help": [PY, "-m", "qfv_brevitas", "--help"],
    "qfv train --help": [PY, "-m", "qfv_brevitas", "train", "--help"],
    "qfv compare --help": [PY, "-m", "qfv_brevitas", "compare", "--help"],
    "qfv faults eval --help": [PY, "-m", "qfv_brevitas", "faults", "eval", "--help"],
    "qfv export --help": [PY, "-m", "qfv_brevitas", "export", "--help"],
    "qfv --version": [PY, "-m", "qfv_brevitas", "--version"],
    "real parser (before)": [PY, "-W", "ignore", "-c", "from qfv_brevitas.cli.app import "
                             "build_parser; build_parser().format_help()"],
}
TARGET = 0.25


def _time(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    info = machine_info()
    for cmd in CASES.values():
        _time(cmd)  # warm-up: files in the page cache, bytecode compiled
    times = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, cmd in CASES.items():
            times[name].append(_time(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["import torch"]
    print(f"machine: {info['processor']}, {info['cpu_count']} CPUs, python {info['python']}, "
          f"torch {info['torch']}, load {info['loadavg_start']}")
    print(f"{'case':<26} {'median s':>9} {'x import torch':>15}")
    ok = True
    for name, t in med.items():
        ratio = t / ref
        flag = ""
        if name.startswith("qfv"):
            flag = "ok" if ratio <= TARGET else "FAIL"
            ok &= ratio <= TARGET
        print(f"{name:<26} {t:>9.3f} {ratio:>15.2f} {flag}")
    print(f"target: every qfv help and --version <= {TARGET}x import torch: "
          f"{'met' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "median_s": med,
                                               "repeats": args.repeats}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
