"""The ``qfv`` command: the parser, built from the command registry
(:func:`qfv_brevitas.cli.common.command`), and :func:`main`."""
from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

# Each command module registers its commands when imported, in this order (``qfv --help``).
from qfv_brevitas.cli import train  # noqa: F401  (demo, train, report)
from qfv_brevitas.cli import device  # noqa: F401  (faults, variability)
from qfv_brevitas.cli import export  # noqa: F401  (export, inspect, verify, crossbar)
from qfv_brevitas.cli import snn  # noqa: F401
from qfv_brevitas.cli import lm  # noqa: F401
from qfv_brevitas.cli import methods  # noqa: F401  (compare, bitflips, selftune)
from qfv_brevitas.cli import quantize  # noqa: F401
from qfv_brevitas.cli.common import (HelpFormatter, OneLineParser, add_commands,
                                     add_verbosity_args, apply_run_args, check_io, command_path,
                                     configure_logging, one_line)
from qfv_brevitas.cli.helpspec import help_parser, load_description, wants_help
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.text import printable, printable_lines
from qfv_brevitas.util.version import __version__

__all__ = ["main", "build_parser", "parse", "version_text", "EXIT_CRASH"]


def build_parser(only: Optional[Tuple[str, ...]] = None) -> argparse.ArgumentParser:
    """The ``qfv`` parser: every registered command (with ``only``, a command's path: that
    command alone, see :func:`~qfv_brevitas.cli.common.add_commands`). A bad argument is one
    line naming it (``qfv <command>: error: argument --x: ...``), exit 2."""
    parser = OneLineParser(
        prog="qfv", formatter_class=HelpFormatter,
        description="Quantization-, fault- and variability-aware training for Brevitas",
        epilog="Exit status: 0 done; 1 a check found a difference (qfv verify, or an export "
               "that did not verify: nothing written); 2 bad input (argument, file, data); "
               "3 output refused (exists without --force, is an input, is not a regular "
               "file, not writable); 4 system error while working (disk full, I/O, out of "
               "memory, a graph's run past --time-limit): outputs unchanged; 70 internal error (a bug in qfv: please report "
               "it; --debug shows the traceback): outputs unchanged; 130 interrupted (Ctrl-C, "
               "SIGTERM): outputs unchanged.")
    parser.add_argument("--version", action="store_true",
                        help="print the versions of qfv-brevitas, torch, Brevitas and Python "
                             "and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: QFV_DEBUG=1)")
    add_verbosity_args(parser)
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       title="commands (qfv COMMAND --help for each)"),
                 only=only)
    return parser


def version_text() -> str:
    """``qfv --version``: this package's version and those of the libraries it runs on (read
    from the installed distributions: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"qfv-brevitas {__version__} (torch {of('torch')}, brevitas {of('brevitas')}, "
            f"python {platform.python_version()})")


def _asks_version(argv: Sequence[str]) -> bool:
    """``--version`` given before the command word (``qfv --version``)."""
    for token in argv:
        if token == "--version":
            return True
        if token == "--" or not token.startswith("-"):
            return False
    return False


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed. Help (``-h``/``--help``, a bare ``qfv``) in a process without torch
    is answered from the stored description of the parser (:mod:`~qfv_brevitas.cli.helpspec`);
    a command is parsed by the parser of that command alone."""
    # The stored description stands for the parser in a fresh process. Once torch is loaded
    # (a Python session, a notebook), building the real parser costs little and shows what
    # that session registered (an export form, a method).
    if wants_help(argv) and "torch" not in sys.modules:
        description = load_description()
        if description is not None:
            help_parser(description, OneLineParser, HelpFormatter).parse_args(argv)
    path = command_path(argv)
    parser = build_parser(only=path)
    if path is not None:
        from qfv_brevitas.cli.configfile import expand_config

        argv = expand_config(argv, len(path), _leaf(parser, path))
    return parser.parse_args(argv)


def _parse_flushed(argv: Sequence[str]) -> argparse.Namespace:
    """:func:`parse`; when it exits (help printed, a usage error), stdout is flushed first, so
    that a reader that went away is a :class:`BrokenPipeError` here and not at exit."""
    try:
        return parse(argv)
    except SystemExit:
        sys.stdout.flush()
        raise


def _leaf(parser: argparse.ArgumentParser, path: Tuple[str, ...]) -> argparse.ArgumentParser:
    """The parser of the command ``path`` inside the ``qfv`` parser."""
    for word in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


#: exit status of each kind of failure (documented in README, "Errors and exit codes");
#: 70 is EX_SOFTWARE of sysexits.h: an exception no check expected, i.e. a bug
EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_OUTPUT, EXIT_SYSTEM, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
EXIT_CRASH = 70
#: a reader that went away (``qfv inspect m.onnx | head``): 128 + SIGPIPE, as a shell reports a
#: program that SIGPIPE stopped; nothing is printed
EXIT_BROKEN_PIPE = 141
#: the longest message of an internal error (a foreign library's can be pages long)
_CRASH_CHARS = 400


def _out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, or torch's (Cuda)OutOfMemoryError (a RuntimeError)."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"


def _describe(e: BaseException):
    """``(exit status, one-line message)`` of an expected error, or None for a bug. Only the
    library's own :class:`QfvError` is bad input: a ``ValueError`` from numpy, torch or
    scikit-learn names neither the file nor the field, so it is a bug (a check is missing)."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, ("interrupted; no output was left half-written (each is the "
                                  "previous one or complete)")
    if isinstance(e, QfvError):  # bad input, an output refused, a check that failed
        return e.exit_code, one_line(e)
    if _out_of_memory(e):
        return EXIT_SYSTEM, "out of memory (the work stopped; outputs are unchanged)"
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return EXIT_BAD_INPUT, one_line(e)  # an input path (outputs' folders are made)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return EXIT_SYSTEM, (f"{where}{e.strerror or e} (the work stopped; outputs are "
                             "unchanged)")
    if isinstance(e, ImportError):  # an optional extra is missing: its message says which
        return EXIT_BAD_INPUT, one_line(e)
    return None


def crash_line(name: str, e: BaseException) -> str:
    """The one line of an internal error: its type and first words, and what to do."""
    message = one_line(e)
    if len(message) > _CRASH_CHARS:
        message = message[:_CRASH_CHARS] + "..."
    return (f"qfv {name}: internal error: {type(e).__name__}: {message} (a bug; rerun with "
            "--debug for the traceback)")


_PLAIN_WARNING = warnings.formatwarning


def _escaped_warning(message, category, filename, lineno, line=None) -> str:
    """Python's text of a warning with every line escaped: a warning may quote a file."""
    text = _PLAIN_WARNING(message, category, filename, lineno, line)
    return printable_lines(text.rstrip("\n")) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``qfv``; returns the exit status. Every expected error (bad input, an output that
    may not be written, a system error such as a full disk, Ctrl-C) is one line on stderr and
    its exit status (see ``qfv --help``); any other exception is a bug: one line, exit 70.
    ``--debug`` (or QFV_DEBUG=1) raises instead, with the traceback. Every line is escaped
    (:func:`~qfv_brevitas.util.text.printable`): text from a file never drives the terminal."""
    # Brevitas warns at import that an optional kernel package is missing: not ours to say.
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    argv = list(sys.argv[1:] if argv is None else argv)
    if _asks_version(argv):
        print(version_text())
        return 0
    try:
        args = _parse_flushed(argv)
    except QfvError as e:  # a --config file that cannot be used
        print(printable(f"qfv: error: {one_line(e)}"), file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # qfv --help | head -1
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    configure_logging(args)
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
    plain_warning, warnings.formatwarning = warnings.formatwarning, _escaped_warning
    try:
        check_io(args)
        apply_run_args(args)
        return args._run(args)
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except (Exception, KeyboardInterrupt) as e:
        if debug:
            raise
        described = _describe(e)
        if described is None:
            print(printable(crash_line(name, e)), file=sys.stderr)
            return EXIT_CRASH
        code, message = described
        print(printable(f"qfv {name}: error: {message}"), file=sys.stderr)
        return code
    finally:
        warnings.formatwarning = plain_warning
        if xfsz is not None:
            signal.signal(signal.SIGXFSZ, xfsz)
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _quiet_stdout() -> None:
    """stdout's reader has gone: point stdout at /dev/null so that the interpreter's last flush
    at exit does not fail again (Python's documented recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (a test's capture)
        pass


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
