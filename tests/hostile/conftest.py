"""The harness of the hostile-input tests (issue 22): ``qfv`` in a child process with a memory
cap and a deadline, and the checks every case makes.

``run_qfv(argv, cwd)`` forks a child from a forkserver that imported the command once (so a
case costs milliseconds, not a torch import), caps the child's address space at what it starts
with plus ``mem_mb``, kills it at ``timeout`` seconds, and returns a :class:`Run`: exit code,
stdout, stderr, seconds, and the growth of its peak resident memory. ``refused(run, code,
*mentions)`` asserts what every refusal must be: the exit code; exactly one line on stderr,
``qfv <command>: error: ...``, naming each of ``mentions``; no traceback; no control characters
from a file on the terminal. ``snapshot(folder)`` records every entry (its type and, for files,
its SHA-256) so a case asserts that nothing was changed, added or removed.

With ``QFV_HOSTILE_REPORT=report.tsv`` every run appends a line (test id, exit code, peak
memory growth in bytes, seconds): the figures README's "Untrusted files" quotes.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import pytest

#: the child's memory cap beyond what it starts with, unless a case says otherwise
MEM_MB = 1024
#: the deadline of one case, seconds
TIMEOUT_S = 60.0

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["tests.hostile._runner"])
    return _CTX


@dataclass
class Run:
    code: Optional[int]   # None: killed at the deadline
    out: str
    err: str
    seconds: float
    peak_bytes: int

    @property
    def lines(self):
        return [ln for ln in self.err.splitlines() if ln.strip()]


def _run(argv: Sequence[str], cwd, *, mem_mb: int = MEM_MB, timeout: float = TIMEOUT_S,
         env: Optional[Dict[str, str]] = None, signal_after: Optional[float] = None,
         sig: int = signal.SIGTERM) -> Run:
    from tests.hostile import _runner

    cwd = Path(cwd)
    logs = cwd.parent / f".logs-{cwd.name}-{os.getpid()}-{time.monotonic_ns()}"
    logs.mkdir()
    out, err, peak = logs / "out", logs / "err", logs / "peak"
    env = {"QFV_DEBUG": "0", **(env or {})}
    p = _context().Process(target=_runner.run_case,
                           args=([str(a) for a in argv], str(cwd), mem_mb << 20, str(out),
                                 str(err), str(peak), env))
    t0 = time.monotonic()
    p.start()
    if signal_after is not None:
        p.join(signal_after)
        if p.is_alive():
            os.kill(p.pid, sig)
    p.join(timeout - (time.monotonic() - t0))
    seconds = time.monotonic() - t0
    code = p.exitcode
    if p.is_alive():
        p.kill()
        p.join()
        code = None
    read = lambda f: f.read_text(errors="replace") if f.exists() else ""  # noqa: E731
    run = Run(code, read(out), read(err), seconds,
              int(read(peak) or 0))
    for f in (out, err, peak):
        f.unlink(missing_ok=True)
    logs.rmdir()
    if os.environ.get("QFV_HOSTILE_REPORT"):  # the figures of README's "Untrusted files"
        with open(os.environ["QFV_HOSTILE_REPORT"], "a") as fh:
            fh.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{code}\t"
                     f"{run.peak_bytes}\t{seconds:.2f}\n")
    return run


@pytest.fixture(scope="session")
def run_qfv():
    """``run_qfv(argv, cwd, mem_mb=1024, timeout=60, env=None, signal_after=None)``: see
    the module docstring."""
    return _run


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _refused(run: Run, code: int, *mentions: str, command: Optional[str] = None) -> str:
    assert run.code is not None, f"killed at the deadline after {run.seconds:.0f} s"
    assert "Traceback" not in run.err, run.err[-3000:]
    lines = [ln for ln in run.lines if not ln.startswith(("  warnings.warn", "  "))
             and "Warning:" not in ln]
    assert len(lines) == 1, f"expected one error line, got {run.err[-3000:]!r}"
    line = lines[0]
    assert re.match(r"qfv [a-z-]+( [a-z-]+)?: error: ", line), line
    if command is not None:
        assert line.startswith(f"qfv {command}: error: "), line
    assert run.code == code, f"exit {run.code}, expected {code}: {line}"
    for m in mentions:
        assert m in line, f"{m!r} not in {line!r}"
    assert not _CONTROL.search(run.err + run.out), "control characters reached the terminal"
    return line


@pytest.fixture(scope="session")
def refused():
    """``refused(run, code, *mentions, command=None)`` -> the error line; see the module
    docstring."""
    return _refused


def _snapshot(folder) -> Dict[str, str]:
    """Every entry under ``folder``: its type, and for a regular file its SHA-256."""
    folder = Path(folder)
    seen = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            rel = str(p.relative_to(folder))
            if name.startswith(".logs-"):
                continue
            if stat.S_ISREG(st.st_mode):
                seen[rel] = "file:" + hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                seen[rel] = f"mode:{stat.S_IFMT(st.st_mode):o}"
                if stat.S_ISLNK(st.st_mode):
                    seen[rel] += ":" + os.readlink(p)
    return seen


@pytest.fixture(scope="session")
def snapshot():
    """``snapshot(folder)`` -> {relative path: type and SHA-256}: compare before and after."""
    return _snapshot


# -- files the cases start from (issue 22, outputs and options) -----------------------------------

def _files(root: Path) -> Path:
    """A quantized MLP checkpoint for digits (``q.pt``, untrained: only its shape and data
    matter), the float one (``float.pt``), a fault map of ``q.pt`` (``chip.pt``) and ``q.pt``
    exported (``m.onnx``)."""
    import copy

    import torch

    from qfv_brevitas import NMultConfig, quantize_model
    from qfv_brevitas.chip.faults import FaultModel, sample_fault_map
    from qfv_brevitas.cli.app import main
    from qfv_brevitas.zoo.checkpoint import save_checkpoint
    from qfv_brevitas.zoo.data import fingerprint, load_digits_split
    from qfv_brevitas.zoo.models import MLP

    train, test = load_digits_split(0)
    meta = dict(dataset="digits", data_seed=0, data_sha256=fingerprint(train, test))
    torch.manual_seed(0)
    fp = MLP(64, 10)
    save_checkpoint(root / "float.pt", fp, "mlp", (1, 8, 8), 10, None, **meta)
    cfg = NMultConfig(weight_bits=4, act_bits=4)
    q = quantize_model(copy.deepcopy(fp), cfg, train.tensors[0][:64]).eval()
    save_checkpoint(root / "q.pt", q, "mlp", (1, 8, 8), 10, cfg, **meta)
    sample_fault_map(q, FaultModel(rate=0.1, seed=1)).save(root / "chip.pt")
    assert main(["export", str(root / "q.pt"), "--out", str(root / "m.onnx"), "--exporter",
                 "torchscript", "--samples", "4"]) == 0
    return root


@pytest.fixture(scope="session")
def qfv_files(tmp_path_factory):
    """``qfv_files(folder, *names)``: copies of the shared files (``q.pt``, ``float.pt``,
    ``chip.pt``, ``m.onnx``) in ``folder``, made once per session; returns ``folder``."""
    import shutil

    root = _files(tmp_path_factory.mktemp("qfv-files"))

    def copy(folder, *names):
        for name in names or ("q.pt", "float.pt", "chip.pt", "m.onnx"):
            shutil.copy2(root / name, Path(folder) / name)
        return Path(folder)
    return copy
