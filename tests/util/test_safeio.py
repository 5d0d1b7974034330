"""``qfv_brevitas.util.safeio``: output checks, atomic files, groups of files and folders, held-back
Ctrl-C, the contents checksum."""
from __future__ import annotations

import os
import signal
import stat
import threading
import time

import pytest
import torch

from qfv_brevitas.util import safeio
from qfv_brevitas.util.errors import OutputError, QfvError
from qfv_brevitas.util.safeio import (atomic_dir, atomic_path, atomic_paths, atomic_write,
                                 check_output, content_digest, deferred_interrupts, torch_save)


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_errors_are_value_errors_with_exit_codes():
    assert issubclass(OutputError, QfvError) and issubclass(QfvError, ValueError)
    assert (QfvError.exit_code, OutputError.exit_code) == (2, 3)


def test_atomic_write_creates_refuses_then_replaces(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write(p, "one")
    with pytest.raises(OutputError, match=r"a\.txt exists; pass --force"):
        atomic_write(p, "two")
    assert p.read_text() == "one"
    atomic_write(p, b"two", overwrite=True)
    assert p.read_text() == "two" and listing(tmp_path) == ["a.txt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, exc):
    p = atomic_write(tmp_path / "m.bin", b"old")
    with pytest.raises(exc):
        with atomic_path(p, overwrite=True) as tmp:
            tmp.write_bytes(b"half of the new")
            raise exc()
    assert p.read_bytes() == b"old" and listing(tmp_path) == ["m.bin"]


def test_a_group_is_replaced_together_or_not_at_all(tmp_path):
    a, b = atomic_write(tmp_path / "r.csv", "old"), atomic_write(tmp_path / "r.json", "old")
    with pytest.raises(ValueError):
        with atomic_paths([a, b], overwrite=True) as (ta, tb):
            ta.write_text("new")
            raise ValueError("the plot failed")
    assert a.read_text() == b.read_text() == "old" and listing(tmp_path) == ["r.csv", "r.json"]
    with atomic_paths([a, b], overwrite=True) as (ta, tb):
        ta.write_text("new")
        tb.write_text("new")
    assert a.read_text() == b.read_text() == "new"
    with pytest.raises(OutputError, match="given twice"):
        with atomic_paths([a, tmp_path / "." / "r.csv"], overwrite=True):
            pass


def test_outputs_never_replace_an_input(tmp_path):
    src = atomic_write(tmp_path / "model.pt", b"weights")
    (tmp_path / "link.pt").symlink_to(src)
    os.link(src, tmp_path / "hard.pt")
    for out in (src, tmp_path / "link.pt", tmp_path / "hard.pt", tmp_path / "sub" / ".." /
                "model.pt"):
        with pytest.raises(OutputError, match="is the input"):
            check_output(out, overwrite=True, inputs=[src])
    with pytest.raises(OutputError, match="holds the input"):
        check_output(tmp_path, overwrite=True, inputs=[src], kind="dir")
    assert src.read_bytes() == b"weights"


def test_check_output_names_the_problem(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="folder is a folder; give a file name"):
        check_output(tmp_path / "folder", overwrite=True)
    with pytest.raises(OutputError, match="afile is not a folder"):
        check_output(tmp_path / "afile" / "out.pt")
    with pytest.raises(OutputError, match="afile exists and is not a folder"):
        check_output(tmp_path / "afile", kind="dir")
    with pytest.raises(OutputError, match="empty"):
        check_output("")
    # A folder that does not exist yet is fine (made on commit), an empty existing one too.
    assert check_output(tmp_path / "new" / "deeper" / "x.pt") == \
        (tmp_path / "new" / "deeper" / "x.pt").resolve()
    assert check_output(tmp_path / "folder", kind="dir") == (tmp_path / "folder").resolve()
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_dir_swaps_whole_folders(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(safeio, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    with atomic_dir(out) as d:
        (d / "results.json").write_text("1")
        (d / "stale.npz").write_text("from run 1")
    with pytest.raises(OutputError, match="run exists; pass --force"):
        with atomic_dir(out):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as d:
            (d / "results.json").write_text("2")
            raise KeyboardInterrupt
    assert listing(out) == ["results.json", "stale.npz"]  # the old run, whole
    with atomic_dir(out, overwrite=True) as d:
        (d / "results.json").write_text("2")
    assert listing(out) == ["results.json"] and (out / "results.json").read_text() == "2"
    assert listing(tmp_path) == ["run"]  # no temporary or old folder left
    with pytest.raises(OutputError, match="not replaced: mine"):
        with atomic_dir(out, overwrite=True, replaceable=lambda p: "mine"):
            pass


def test_os_errors_name_the_output_not_the_temporary_file(tmp_path):
    out = tmp_path / "big.pt"
    with pytest.raises(OSError) as info:
        with atomic_path(out) as tmp:
            raise OSError(27, "File too large", str(tmp))
    assert info.value.filename == str(out) and info.value.errno == 27
    with pytest.raises(OSError) as info:
        with atomic_dir(tmp_path / "xb") as d:
            raise OSError(28, "No space left on device", str(d / "layer.npz"))
    assert info.value.filename == str(tmp_path / "xb" / "layer.npz")
    assert listing(tmp_path) == []


def test_interrupts_are_held_back_during_a_commit():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the commit finished")  # runs: the signal waits for the block's end
    assert done == ["the commit finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupts_are_held_back_whichever_thread_gets_them():
    """The system may hand a process's signal to any thread (torch runs many); Python still
    runs the handler in the main thread. The hold must work for that case too."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()

    class Term(Exception):
        pass

    def on_term(signum, frame):
        raise Term
    previous = signal.signal(signal.SIGTERM, on_term)
    done = []
    try:
        with pytest.raises((KeyboardInterrupt, Term)):
            with deferred_interrupts():
                signal.pthread_kill(other.ident, signal.SIGINT)
                signal.pthread_kill(other.ident, signal.SIGTERM)
                time.sleep(0.05)  # time for the handlers to run, were they not held
                done.append("the commit finished")
    finally:
        stop.set()
        other.join()
        signal.signal(signal.SIGTERM, previous)
    assert done == ["the commit finished"]


def test_content_digest_sees_every_value(tmp_path):
    payload = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"acc": 0.5, "n": [1, 2]},
               "b": torch.tensor([True, False])}
    d = content_digest(payload)
    torch_save(payload, tmp_path / "p.pt")
    assert content_digest(torch.load(tmp_path / "p.pt", weights_only=True)) == d
    changed = dict(payload, w=payload["w"].clone())
    changed["w"].view(-1).view(torch.int32)[3] ^= 1  # one bit of one float
    assert content_digest(changed) != d
    assert content_digest(dict(payload, meta={"acc": 0.5, "n": [1, 3]})) != d
    assert content_digest(dict(payload, sha256="ignored")) == d
    with pytest.raises(TypeError, match=r"payload\['x'\]: a object cannot be stored"):
        content_digest({"x": object()})


# -- outputs that are not regular files, and races (issue 22) ------------------------------------

def _special(tmp_path, kind):
    """A FIFO, a socket or a link to one at ``tmp_path/out.pt``; returns its path and a check
    that it is still what it was."""
    import socket

    real = tmp_path / f"real-{kind}"
    if kind.startswith("fifo"):
        os.mkfifo(real)
        test = stat.S_ISFIFO
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(real))
        s.close()
        test = stat.S_ISSOCK
    out = tmp_path / "out.pt"
    if kind.endswith("link"):
        out.symlink_to(real)
    else:
        real.rename(out)
        real = out
    return out, lambda: test(os.lstat(real).st_mode)


@pytest.mark.parametrize("kind", ["fifo", "fifo-link", "socket", "socket-link"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_special_file_is_never_an_output_even_with_overwrite(tmp_path, kind, overwrite):
    out, still = _special(tmp_path, kind)
    what = "FIFO" if kind.startswith("fifo") else "socket"
    with pytest.raises(OutputError, match=rf"out\.pt is a {what}.*not a regular file"):
        check_output(out, overwrite=overwrite)
    with pytest.raises(OutputError, match="not a regular file"):
        atomic_write(out, b"data", overwrite=overwrite)  # a FIFO opened here would block
    assert still() and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(OutputError, match="exists and is not a folder .*(FIFO|socket)"):
        check_output(out, overwrite=overwrite, kind="dir")


def test_a_character_device_is_never_an_output():
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="/dev/null is a character device"):
            check_output("/dev/null", overwrite=overwrite)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_swapped_for_a_fifo_during_the_write_is_not_replaced(tmp_path, overwrite):
    out = atomic_write(tmp_path / "m.pt", b"old") if overwrite else tmp_path / "m.pt"
    with pytest.raises(OutputError, match=r"m\.pt is a FIFO .*changed while"):
        with atomic_path(out, overwrite=overwrite) as tmp:
            tmp.write_bytes(b"new")
            out.unlink(missing_ok=True)
            os.mkfifo(out)
    assert stat.S_ISFIFO(os.lstat(out).st_mode) and listing(tmp_path) == ["m.pt"]


def test_a_swap_after_the_last_look_is_swapped_back(tmp_path, monkeypatch):
    """The exchange that replaces an existing output looks at what it took out: a FIFO put
    there after the last look goes back in place, unopened."""
    out = atomic_write(tmp_path / "m.pt", b"old")
    real_exchange = safeio._exchange
    swaps = []

    def swapped_first(a, b):  # the FIFO comes in just before the exchange
        if not swaps:
            out.unlink()
            os.mkfifo(out)
        swaps.append((a, b))
        return real_exchange(a, b)
    monkeypatch.setattr(safeio, "_exchange", swapped_first)
    with pytest.raises(OutputError, match=r"m\.pt is a FIFO"):
        with atomic_path(out, overwrite=True) as tmp:
            tmp.write_bytes(b"new")
    assert len(swaps) == 2  # swapped in, looked at, swapped back
    assert stat.S_ISFIFO(os.lstat(out).st_mode) and listing(tmp_path) == ["m.pt"]


def _appears_before_the_rename(monkeypatch, target, content=b"theirs"):
    """``safeio._rename_noreplace`` with a file appearing at ``target`` just before it runs,
    after every look: the race only the no-replace rename itself can win."""
    real = safeio._rename_noreplace
    calls = []

    def late(src, dst):
        calls.append(dst)
        if dst == target.resolve():
            target.write_bytes(content)
        return real(src, dst)
    monkeypatch.setattr(safeio, "_rename_noreplace", late)
    return calls


@pytest.mark.parametrize("system", ["renameat2", "link", "look-and-rename"])
def test_a_file_that_appears_before_the_rename_is_never_replaced(tmp_path, monkeypatch, system):
    if system != "renameat2":
        monkeypatch.setattr(safeio, "_renameat2", lambda a, b, flags: False)
    if system == "look-and-rename":
        def no_links(*a, **k):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "m.pt"
    # in the block: the check before the rename sees it
    with pytest.raises(OutputError, match=r"m\.pt appeared while it was being written"):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"ours")
            out.write_bytes(b"theirs")
    assert out.read_bytes() == b"theirs" and listing(tmp_path) == ["m.pt"]
    out.unlink()
    # after the last look: only the rename itself can refuse (the look-and-rename fallback
    # looks once more, inside, just before its rename)
    calls = _appears_before_the_rename(monkeypatch, out)
    with pytest.raises(OutputError, match=r"m\.pt appeared while it was being written"):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"ours")
    assert calls == [out.resolve()]  # every look saw nothing: the rename itself refused
    assert out.read_bytes() == b"theirs" and listing(tmp_path) == ["m.pt"]


def test_a_group_that_cannot_be_placed_whole_leaves_nothing(tmp_path, monkeypatch):
    a, b = tmp_path / "r.csv", tmp_path / "r.json"
    calls = _appears_before_the_rename(monkeypatch, b)
    with pytest.raises(OutputError, match=r"r\.json appeared"):
        with atomic_paths([a, b]) as (ta, tb):
            ta.write_text("ours")
            tb.write_text("ours")
    assert calls == [a.resolve(), b.resolve()]  # r.csv was placed, then taken back
    assert listing(tmp_path) == ["r.json"] and b.read_bytes() == b"theirs"


def test_rename_errors_name_the_output_not_the_temporary_file(tmp_path, monkeypatch):
    def broken(src, dst):
        raise OSError(5, "Input/output error", str(src))
    monkeypatch.setattr(safeio, "_rename_noreplace", broken)
    out = tmp_path / "sub" / "m.pt"
    with pytest.raises(OSError) as info:
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"x")
    assert info.value.filename == str(out) and info.value.errno == 5
    assert not [p for p in (tmp_path / "sub").iterdir()]


def test_folders_refuse_what_appears_or_changes_meanwhile(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OutputError, match=r"run appeared while it was being written"):
        with atomic_dir(out) as d:
            (d / "results.json").write_text("ours")
            out.mkdir()
            (out / "notes.txt").write_text("theirs")
    assert listing(out) == ["notes.txt"]
    with pytest.raises(OutputError, match=r"run is now a FIFO .*not a folder"):
        with atomic_dir(out, overwrite=True) as d:
            (d / "results.json").write_text("ours")
            (out / "notes.txt").unlink()
            out.rmdir()
            os.mkfifo(out)
    assert stat.S_ISFIFO(os.lstat(out).st_mode) and listing(tmp_path) == ["run"]
    os.unlink(out)
    with pytest.raises(OutputError, match="not replaced: foreign"):  # looked at again
        with atomic_dir(out, overwrite=True, replaceable=lambda p: "foreign"
                        if (p / "photo.jpg").exists() else None) as d:
            out.mkdir()
            (out / "photo.jpg").write_text("theirs")
    assert listing(out) == ["photo.jpg"]


def test_check_output_names_paths_it_cannot_look_at(tmp_path):
    with pytest.raises(OutputError, match="NUL"):
        check_output(str(tmp_path / "a\0b"))
    with pytest.raises(OutputError, match="cannot write .*(too long|File name)"):
        check_output(tmp_path / ("x" * 300) / "m.pt")
