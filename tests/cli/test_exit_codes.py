"""Exit codes that mean one thing each (issue 22), run through ``qfv`` in this process: a bug is
exit 70 with one line, never 1 ("a check found a difference") or 2 ("bad input"); every run
option is checked before any work with one line naming it; every line is escaped."""
from __future__ import annotations

import argparse
import errno
import sys
import warnings

import pytest
import torch

from qfv_brevitas.cli import common
from qfv_brevitas.cli import train as cli_train
from qfv_brevitas.cli.app import EXIT_CRASH, main
from qfv_brevitas.core import kernels
from qfv_brevitas.util import threads
from qfv_brevitas.util.errors import OutputError, QfvError, VerificationError


def _run(monkeypatch, capsys, exc, argv=("report", "any.pt")):
    """``main(argv)`` with ``qfv report`` raising ``exc``: (exit status, stderr lines)."""
    def raising(args):
        raise exc
    monkeypatch.setattr(cli_train, "run_report", raising)
    code = main(list(argv))
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize("exc", [ValueError("operands could not be broadcast together"),
                                 RuntimeError("shape '[3]' is invalid"), KeyError("net.3"),
                                 IndexError("index 0 is out of bounds"), AssertionError(),
                                 TypeError("unsupported operand"), ZeroDivisionError("division")],
                         ids=lambda e: type(e).__name__)
def test_a_crash_is_exit_70_and_one_line(monkeypatch, capsys, exc):
    code, lines = _run(monkeypatch, capsys, exc)
    assert code == EXIT_CRASH == 70
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"qfv report: internal error: {type(exc).__name__}: ")
    assert lines[0].endswith("(a bug; rerun with --debug for the traceback)")


def test_a_foreign_value_error_is_not_bad_input_but_the_librarys_own_is(monkeypatch, capsys):
    assert _run(monkeypatch, capsys, ValueError("x"))[0] == 70
    for exc, code in ((QfvError("CHECKPOINT: bad"), 2), (OutputError("out exists"), 3),
                      (VerificationError("differs"), 1)):
        got, lines = _run(monkeypatch, capsys, exc)
        assert (got, lines) == (code, [f"qfv report: error: {exc}"])


@pytest.mark.parametrize("exc,code,words", [
    (MemoryError(), 4, "out of memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 4,
     "out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "m.pt"), 4, "m.pt: No space left"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.pt"), 2, "x.pt"),
    (KeyboardInterrupt(), 130, "interrupted"),
], ids=["MemoryError", "torch-OOM", "disk-full", "missing-file", "ctrl-c"])
def test_expected_failures_keep_their_codes(monkeypatch, capsys, exc, code, words):
    got, lines = _run(monkeypatch, capsys, exc)
    assert got == code and len(lines) == 1 and words in lines[0]
    assert "internal error" not in lines[0]


def test_a_crash_message_is_cut_to_one_escaped_line(monkeypatch, capsys):
    exc = RuntimeError("first line \x1b[2J\n" + "x" * 5000 + "\nthird line")
    code, lines = _run(monkeypatch, capsys, exc)
    assert code == 70 and len(lines) == 1
    assert "first line \\x1b[2J; xxx" in lines[0] and "third line" not in lines[0]
    assert len(lines[0]) < 600 and "\x1b" not in lines[0]


def test_debug_raises_the_crash_itself(monkeypatch, capsys):
    monkeypatch.setattr(cli_train, "run_report", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "report", "any.pt"])


def test_warnings_and_printed_text_are_escaped(monkeypatch, capsys):
    def noisy(args):
        warnings.warn("layer 'net.3\x1b[31m' has all-zero weights \u202e", UserWarning)
        common.show("net.3\x9b2J\tbits\nnext line")
        return 0
    monkeypatch.setattr(cli_train, "run_report", noisy)
    before = warnings.formatwarning  # Python's, or what an imported library put there
    with warnings.catch_warnings():  # printed as Python does, not recorded by pytest
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, \
            line=None: sys.stderr.write(warnings.formatwarning(message, category, filename,
                                                               lineno, line))
        assert main(["report", "any.pt"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "net.3\\x9b2J\\x09bits\nnext line\n"
    assert "net.3\\x1b[31m" in cap.err and "\\u202e" in cap.err
    assert not any(c in cap.err + cap.out for c in "\x1b\x9b\u202e\t")
    assert warnings.formatwarning is before  # put back after the run


def test_an_argparse_refusal_is_one_line_naming_the_argument(capsys):
    with pytest.raises(SystemExit) as info:
        main(["faults", "sample", "q.pt", "--rate", "lots\x1b[2J"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "usage" not in err
    assert err.startswith("qfv faults sample: error: argument --rate: invalid float value: ")
    assert "\x1b" not in err and err.rstrip().endswith("(see qfv faults sample --help)")


# -- run options -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "  ", "xyz", "meta", "cpu:1", "cuda:-1", "gpu", "mps:1",
                                  "cpu,cuda"])
def test_a_device_is_checked_before_any_work(capsys, text):
    with pytest.raises(QfvError, match="--device"):
        common.check_device(text)
    assert main(["report", "missing.pt", "--device", text]) == 2  # before the file is read
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device" in err and "missing.pt" not in err


def test_the_devices_there_pass_and_those_not_there_are_named():
    assert common.check_device(None) is None
    assert common.check_device("cpu") == common.check_device(" cpu:0 ") == "cpu"
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert common.check_device(f"cuda:{n - 1}") == f"cuda:{n - 1}"
        with pytest.raises(QfvError, match=rf"--device cuda:{n}: this machine has {n} CUDA"):
            common.check_device(f"cuda:{n}")
    else:
        for text in ("cuda", "cuda:0", "cuda:7"):
            with pytest.raises(QfvError, match=f"--device {text}: CUDA is not available"):
                common.check_device(text)


def test_threads_and_workers_are_capped_at_four_per_core(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 2)
    assert threads.max_threads() == 8
    assert threads.parse_threads("8") == 8 and threads.parse_threads("auto") is None
    for text in ("9", "1000000", str(10 ** 30)):
        with pytest.raises(QfvError, match=rf"--threads {text} is more than .*at most 8"):
            threads.parse_threads(text)
    for text in ("0", "-1", "", "2.5", "1e3", "x"):
        with pytest.raises(QfvError, match="--threads must be 'auto' or an integer >= 1"):
            threads.parse_threads(text)
    assert common.check_workers(8) == 8 and common.check_workers(None) is None
    for n in (0, -3, 9, 10 ** 6):
        with pytest.raises(QfvError, match=rf"--workers must be 1\.\.8 .*got {n}"):
            common.check_workers(n)
    monkeypatch.setattr(threads, "cores", lambda: 100_000)
    assert threads.max_threads() == threads.MAX_THREADS == 1024


def test_integer_and_seed_options_are_bounded():
    assert common.integer(" 42 ") == 42 and common.integer(str(common.INT_LIMIT)) == 2 ** 31 - 1
    assert common.seed("0") == 0 and common.seed(str(2 ** 32 - 1)) == common.SEED_LIMIT
    for bad in (str(2 ** 31), str(-2 ** 31 - 5), "9" * 5000, "1e3", "nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            common.integer(bad)
    for bad in ("-1", str(2 ** 32), "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"0\.\.4294967295"):
            common.seed(bad)


@pytest.mark.parametrize("value,on", [("", True), ("1", True), ("ON", True), (" yes ", True),
                                      ("0", False), ("torch", False), ("Off", False)])
def test_qfv_kernels_settings(value, on):
    assert kernels._setting(value) == (on, None)


@pytest.mark.parametrize("value", ["banana", "2", "torch please", "\x1b[2J", "x" * 500])
def test_an_unknown_qfv_kernels_is_refused_by_qfv_and_means_torch_in_the_library(
        monkeypatch, capsys, value):
    on, problem = kernels._setting(value)
    assert on is False and problem.startswith("QFV_KERNELS=") and len(problem) < 300
    monkeypatch.setenv("QFV_KERNELS", value)
    assert kernels.setting_error() == problem
    assert main(["report", "missing.pt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "QFV_KERNELS=" in err and "\x1b" not in err
    monkeypatch.setattr(kernels, "_SETTING_ERROR", problem)
    monkeypatch.setattr(kernels, "_WARNED", False)
    monkeypatch.setattr(kernels, "_ENABLED", on)
    with pytest.warns(RuntimeWarning, match="QFV_KERNELS=.*pure-torch"):
        assert kernels.enabled() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.enabled()  # once only


@pytest.mark.parametrize("argv,option", [
    (["report", ""], "CHECKPOINT"), (["inspect", " "], "FILE"),
    (["faults", "sample", "q.pt", "--rate", "0.1", "--out", ""], "--out"),
    (["faults", "eval", "q.pt", "--data-dir", ""], "--data-dir"),
    (["faults", "finetune", "q.pt", "--fault-map", ""], "--fault-map"),
    (["selftune", "q.pt", "--variability-map", "", "--rate", "0.1"], "--variability-map"),
    (["report", "a\0b.pt"], "CHECKPOINT"),
])
def test_empty_paths_are_refused_naming_the_argument(capsys, argv, option):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {option}: the path" in err


def test_only_a_newline_ends_a_line_of_a_message(monkeypatch, capsys):
    """A name may hold other line breaks (NEL, U+2028, a lone CR): escaped, never split."""
    assert common.one_line(" a \r\n\n b\x85c\u2028d\re \n") == "a; b\x85c\u2028d\re"
    code, lines = _run(monkeypatch, capsys, QfvError("layer 'x\x85y\u2028z' is bad\nsecond"))
    assert (code, lines) == (2, ["qfv report: error: layer 'x\\x85y\\u2028z' is bad; second"])
