"""The child side of the hostile-input harness (``tests/hostile/conftest.py``).

A forkserver that has imported the ``qfv`` command once forks a child per case; the child
limits its own address space, sends its stdout/stderr to files, runs ``main(argv)`` in the
case's folder and exits with its status. A crash (an exception ``main`` lets through) shows as
a traceback and exit 1 from multiprocessing; a signal as a negative exit code.
"""
from __future__ import annotations

import os
import resource
import sys

from qfv_brevitas.cli.app import main  # noqa: F401  (preloaded by the forkserver)


def _preload() -> None:
    """Import every module a command may import lazily (the whole package, onnxruntime,
    qonnx's executor) once in the forkserver: a case's memory growth is then its work, not
    the ~64 MB of imports (and bytecode compiled on a fresh clone) one command needs."""
    import importlib
    import pkgutil

    import qfv_brevitas

    names = [m.name for m in pkgutil.walk_packages(qfv_brevitas.__path__, "qfv_brevitas.")]
    for name in names + ["onnxruntime", "qonnx.core.modelwrapper", "qonnx.core.onnx_exec"]:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional extra, or the kernels' .so (loaded by torch.ops)
            pass


_preload()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_case(argv, cwd: str, mem_bytes: int, out_path: str, err_path: str, peak_path: str,
             env: dict) -> None:
    """Run ``qfv argv`` in ``cwd`` with at most ``mem_bytes`` of address space more than the
    child starts with; writes the growth of its peak resident memory (bytes) to ``peak_path``."""
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    os.environ.update(env)
    os.chdir(cwd)
    rss0 = _status_kb("VmRSS")
    limit = _status_kb("VmSize") * 1024 + mem_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        code = main(list(argv))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        with open(peak_path, "w") as f:
            f.write(str(max(0, _status_kb("VmHWM") - rss0) * 1024))
    os._exit(int(code))
