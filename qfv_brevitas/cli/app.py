"""The ``qfv`` command: the parser, built from the command registry
(:func:`qfv_brevitas.cli.common.command`), and :func:`main`."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import List, Optional

# Each command module registers its commands when imported, in this order (``qfv --help``).
from qfv_brevitas.cli import train  # noqa: F401  (demo, train, report)
from qfv_brevitas.cli import device  # noqa: F401  (faults, variability)
from qfv_brevitas.cli import export  # noqa: F401  (export, inspect, verify, crossbar)
from qfv_brevitas.cli import snn  # noqa: F401
from qfv_brevitas.cli import methods  # noqa: F401  (compare, bitflips, selftune)
from qfv_brevitas.cli import quantize  # noqa: F401
from qfv_brevitas.cli.common import add_commands, apply_run_args, check_io

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``qfv`` parser: every registered command."""
    parser = argparse.ArgumentParser(
        prog="qfv", description="Quantization-, fault- and variability-aware training for Brevitas",
        epilog="Exit status: 0 done; 1 a check found a difference (qfv verify, or an export "
               "that did not verify: nothing written); 2 bad input (argument, file, data); "
               "3 output refused (exists without --force, is an input, not writable); "
               "4 system error while working (disk full, I/O): outputs unchanged; "
               "130 interrupted (Ctrl-C, SIGTERM): outputs unchanged.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: QFV_DEBUG=1)")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


#: exit status of each kind of failure (documented in README, "Errors and exit codes")
EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_OUTPUT, EXIT_SYSTEM, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _describe(e: BaseException):
    """``(exit status, one-line message)`` of an expected error, or None for a bug."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, ("interrupted; no output was left half-written (each is the "
                                  "previous one or complete)")
    if isinstance(e, ValueError):  # QfvError and the validation errors of configs
        return getattr(e, "exit_code", EXIT_BAD_INPUT), _one_line(e)
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return EXIT_BAD_INPUT, _one_line(e)  # an input path (outputs' folders are made)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return EXIT_SYSTEM, (f"{where}{e.strerror or e} (the work stopped; outputs are "
                             "unchanged)")
    if isinstance(e, MemoryError):
        return EXIT_SYSTEM, "out of memory (the work stopped; outputs are unchanged)"
    if isinstance(e, ImportError):  # an optional extra is missing: its message says which
        return EXIT_BAD_INPUT, _one_line(e)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``qfv``; returns the exit status. Every expected error (bad input, an output that
    may not be written, a system error such as a full disk, Ctrl-C) is one line on stderr and
    its exit status (see ``qfv --help``); ``--debug`` (or QFV_DEBUG=1) shows the traceback."""
    # Brevitas warns at import that an optional kernel package is missing: not ours to say.
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("QFV_DEBUG", "") not in ("", "0")
    name = " ".join(x for x in (args.command, getattr(args, "action", None)) if x)
    # A file-size limit (ulimit -f) kills the process by default in the middle of a write;
    # ignored, the write fails with an OSError and the temporary file is cleaned up.
    xfsz = term = None
    if hasattr(signal, "SIGXFSZ") and _main_thread():
        xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if hasattr(signal, "SIGTERM") and _main_thread() and signal.getsignal(signal.SIGTERM) \
            is not None:  # a kill: the same clean stop as Ctrl-C (temporary files removed)
        term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        check_io(args)
        apply_run_args(args)
        return args._run(args)
    except (Exception, KeyboardInterrupt) as e:
        described = None if debug else _describe(e)
        if described is None:
            raise
        code, message = described
        print(f"qfv {name}: error: {message}", file=sys.stderr)
        return code
    finally:
        if xfsz is not None:
            signal.signal(signal.SIGXFSZ, xfsz)
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
