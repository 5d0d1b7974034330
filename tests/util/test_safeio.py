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
