"""``--load K``: K busy processes of the benchmark's own, started for the run and stopped after.

Each is a separate Python interpreter spinning in a loop (no torch, no memory traffic to speak
of): it holds a core as another user's job would, so the scheduler has more runnable threads
than cores. Timings "under load" measure both the library and its reference (the floor) while
they run; the load is started before and stopped after each measured block.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from typing import Iterator, List

SPIN = "import os, signal\nsignal.signal(signal.SIGTERM, lambda *a: os._exit(0))\nwhile True:\n    pass\n"


@contextlib.contextmanager
def busy_processes(k: int) -> Iterator[List[subprocess.Popen]]:
    """Run ``k`` busy processes for the duration of the block (none for ``k = 0``)."""
    procs: List[subprocess.Popen] = []
    try:
        for _ in range(max(0, int(k))):
            procs.append(subprocess.Popen([sys.executable, "-c", SPIN],
                                          stdin=subprocess.DEVNULL))
        if procs:
            time.sleep(0.3)  # let them reach their loop
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def add_load_argument(parser) -> None:
    parser.add_argument("--load", type=int, nargs="+", default=[0], metavar="K",
                        help="measure with K busy processes of the benchmark's own on the "
                             "machine (started for the measurement, stopped after); several "
                             "values run one after the other in the same run, e.g. --load 0 2")
