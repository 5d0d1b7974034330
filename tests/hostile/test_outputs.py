"""Hostile outputs and names (issue 22): ``--out`` that is a FIFO, a socket, a device or a link
to one, with and without ``--force``; outputs that appear or change while ``qfv`` works; and
names with escape sequences, C1 controls and bidi overrides in the files ``qfv`` reads or
writes.

Every case runs ``qfv`` in a child with a memory cap and a deadline (``conftest.py``). A FIFO
opened for writing would block the child until a reader came: a case that finishes shows it
was never opened. Each refusal is one line naming the output, the folder is unchanged (types
and SHA-256), and special files are still what they were.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import threading
import time
from pathlib import Path

import onnx
import pytest
import torch

from qfv_brevitas.util.safeio import content_digest
from qfv_brevitas.util.text import printable

#: a case that used to hang on a FIFO ends well before this
DEADLINE = 30

#: commands writing one file to --out (``{out}``)
FILE_COMMANDS = {
    "faults-sample": "faults sample q.pt --rate 0.1 --out {out}",
    "variability-sample": "variability sample q.pt --sigma 0.1 --out {out}",
    "faults-finetune": "faults finetune q.pt --rate 0.1 --epochs 1 --out {out} --no-progress",
    "export": "export q.pt --out {out} --exporter torchscript --samples 4",
    "quantize": "quantize float.pt --bits 3 --no-eval --no-plot --out {out}",
}
#: commands writing a folder to --out: a results folder, a crossbar folder, a run folder
FOLDER_COMMANDS = {
    "faults-eval": "faults eval q.pt --rates 0 --trials 1 --out {out} --no-progress",
    "crossbar": "crossbar q.pt --out {out}",
    "train": "train --model mlp --float-epochs 1 --qat-epochs 1 --variants nmult --bits 4 "
             "--out {out} --no-progress",
}
#: names a file may carry, each with something a terminal acts on
NAMES = {
    "csi": "\x1b[2J\x1b[31m",
    "osc-hyperlink": "\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07",
    "c1": "\x9b1;31m\x85",
    "bidi": "\u202egnp.\u2066exe",
    "bel-cr-bs": "\x07\r\x08",
}
_TERMINAL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _argv(template: str, **kw):
    return template.format(**kw).split()


def _special(folder: Path, name: str, kind: str, monkeypatch):
    """A FIFO, a socket or a symlink to one at ``folder/name``; returns a check that the
    special file is still there and still of its kind."""
    monkeypatch.chdir(folder)  # a socket's path must be short: bind it by a relative one
    real = Path("elsewhere") / f"real-{kind}" if kind.endswith("link") else Path(name)
    real.parent.mkdir(exist_ok=True)
    if kind.startswith("fifo"):
        os.mkfifo(real)
        test = stat.S_ISFIFO
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(real))
        s.close()
        test = stat.S_ISSOCK
    if kind.endswith("link"):
        Path(name).symlink_to(real.resolve())
    real = real.resolve()
    return lambda: test(os.lstat(real).st_mode)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("kind", ["fifo", "fifo-link", "socket", "socket-link"])
@pytest.mark.parametrize("cmd", list(FILE_COMMANDS))
def test_a_file_output_that_is_not_a_regular_file_is_refused(
        run_qfv, refused, snapshot, qfv_files, tmp_path, monkeypatch, cmd, kind, force):
    qfv_files(tmp_path, "q.pt", "float.pt")
    still = _special(tmp_path, "out.pt", kind, monkeypatch)
    before = snapshot(tmp_path)
    run = run_qfv(_argv(FILE_COMMANDS[cmd], out="out.pt") + ["--force"] * force, tmp_path,
                  timeout=DEADLINE)
    what = "FIFO" if kind.startswith("fifo") else "socket"
    refused(run, 3, "out.pt", f"is a {what}", "not a regular file")
    assert snapshot(tmp_path) == before and still()


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("kind", ["fifo", "socket-link"])
@pytest.mark.parametrize("cmd", list(FOLDER_COMMANDS))
def test_a_folder_output_that_is_a_special_file_is_refused(
        run_qfv, refused, snapshot, qfv_files, tmp_path, monkeypatch, cmd, kind, force):
    qfv_files(tmp_path, "q.pt")
    still = _special(tmp_path, "out", kind, monkeypatch)
    before = snapshot(tmp_path)
    run = run_qfv(_argv(FOLDER_COMMANDS[cmd], out="out") + ["--force"] * force, tmp_path,
                  timeout=DEADLINE)
    refused(run, 3, "out exists and is not a folder")
    assert snapshot(tmp_path) == before and still()


@pytest.mark.parametrize("cmd,force", [("faults-sample", False), ("faults-sample", True),
                                       ("export", True), ("quantize", True)])
def test_dev_null_is_never_replaced(run_qfv, refused, snapshot, qfv_files, tmp_path, cmd,
                                    force):
    """As root, ``--out /dev/null --force`` once replaced the device node with a file."""
    qfv_files(tmp_path, "q.pt", "float.pt")
    before, dev = snapshot(tmp_path), os.stat("/dev/null")
    run = run_qfv(_argv(FILE_COMMANDS[cmd], out="/dev/null") + ["--force"] * force, tmp_path,
                  timeout=DEADLINE)
    refused(run, 3, "/dev/null is a character device", "not a regular file")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (dev.st_ino,
                                                                              dev.st_rdev)
    assert snapshot(tmp_path) == before


def test_a_device_node_of_ours_is_never_replaced(run_qfv, refused, snapshot, qfv_files,
                                                 tmp_path):
    qfv_files(tmp_path, "q.pt")
    try:  # a null device of our own, where this system lets us make one
        os.mknod(tmp_path / "dev.pt", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device node here: {e}")
    before = snapshot(tmp_path)
    run = run_qfv(_argv(FILE_COMMANDS["faults-sample"], out="dev.pt") + ["--force"],
                  tmp_path, timeout=DEADLINE)
    refused(run, 3, "dev.pt is a character device")
    assert snapshot(tmp_path) == before and stat.S_ISCHR(os.lstat(tmp_path / "dev.pt").st_mode)


@pytest.mark.parametrize("sibling", ["out.json", "out_levels.png"])
def test_a_fifo_beside_the_quantize_output_is_refused(run_qfv, refused, snapshot, qfv_files,
                                                      tmp_path, monkeypatch, sibling):
    """``qfv quantize --out out.pt`` also writes out.json and out_levels.png."""
    qfv_files(tmp_path, "float.pt")
    still = _special(tmp_path, sibling, "fifo", monkeypatch)
    before = snapshot(tmp_path)
    run = run_qfv(["quantize", "float.pt", "--bits", "3", "--no-eval", "--out", "out.pt",
                   "--force"], tmp_path, timeout=DEADLINE)
    refused(run, 3, sibling, "is a FIFO")
    assert snapshot(tmp_path) == before and still()


# -- outputs that appear or change while qfv works ------------------------------------------

def _when(folder: Path, pattern: str, action, stop: threading.Event, done: list) -> None:
    """Wait until ``pattern`` (a temporary output) shows up under ``folder``, then ``action``."""
    while not stop.is_set():
        if list(folder.glob(pattern)):
            action()
            done.append(time.monotonic())
            return
        time.sleep(0.002)


def _race(run_qfv, argv, folder: Path, pattern: str, action):
    """Run ``qfv argv`` in ``folder`` and do ``action`` as soon as its temporary output
    exists (it is being written); returns the run."""
    stop, done = threading.Event(), []
    t = threading.Thread(target=_when, args=(folder, pattern, action, stop, done))
    t.start()
    try:
        run = run_qfv(argv, folder, timeout=120)
    finally:
        stop.set()
        t.join()
    assert done, "the temporary output never showed up: the race did not happen"
    return run


def _plant_file(path: Path):
    return lambda: path.write_bytes(b"theirs")


def _plant_fifo(path: Path):
    def act():
        path.unlink(missing_ok=True)
        os.mkfifo(path)
    return act


EVAL = "faults eval q.pt --rates 0 --trials 2 --out res --no-progress"


@pytest.mark.parametrize("what,force", [("file", False), ("fifo", False), ("fifo", True)])
def test_a_result_that_appears_while_it_is_written_is_not_replaced(
        run_qfv, refused, qfv_files, tmp_path, what, force):
    qfv_files(tmp_path, "q.pt")
    target = tmp_path / "res" / "faults_eval.json"
    if force:  # an old result --force may replace, turned into a FIFO meanwhile
        target.parent.mkdir()
        target.write_text("{}")
    plant = _plant_file(target) if what == "file" else _plant_fifo(target)
    run = _race(run_qfv, EVAL.split() + ["--force"] * force, tmp_path,
                "res/.faults_eval.json.*.tmp", plant)
    if what == "file":
        refused(run, 3, "res/faults_eval.json appeared while it was being written")
        assert target.read_bytes() == b"theirs"
    else:
        refused(run, 3, "res/faults_eval.json is a FIFO", "not a regular file")
        assert stat.S_ISFIFO(os.lstat(target).st_mode)
    assert sorted(p.name for p in target.parent.iterdir()) == ["faults_eval.json"]  # whole


@pytest.mark.parametrize("what", ["folder", "fifo"])
def test_a_run_folder_that_appears_while_it_is_written_is_not_replaced(
        run_qfv, refused, tmp_path, what):
    out = tmp_path / "run"

    def plant():
        if what == "folder":
            out.mkdir()
            (out / "notes.txt").write_text("theirs")
        else:
            os.mkfifo(out)
    run = _race(run_qfv, _argv(FOLDER_COMMANDS["train"], out="run"), tmp_path, ".run.*.tmp",
                plant)
    if what == "folder":
        refused(run, 3, "run appeared while it was being written")
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        refused(run, 3, "run is now a FIFO", "not a folder")
        assert stat.S_ISFIFO(os.lstat(out).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left


# -- names from files and for files, on the terminal ------------------------------------------

def _clean(run) -> None:
    text = run.out + run.err
    assert not _TERMINAL.search(text), f"a control character reached the terminal: {text!r}"
    assert "Traceback" not in text


@pytest.mark.parametrize("name", list(NAMES))
def test_an_output_named_with_controls_is_written_and_shown_escaped(run_qfv, qfv_files,
                                                                    tmp_path, name):
    qfv_files(tmp_path, "q.pt")
    out = f"m{NAMES[name]}.pt"
    run = run_qfv(["faults", "sample", "q.pt", "--rate", "0.1", "--out", out], tmp_path,
                  timeout=DEADLINE)
    assert run.code == 0, run.err
    _clean(run)
    assert f"wrote {printable(out)}" in run.out and (tmp_path / out).is_file()


def test_an_undecodable_output_name_is_written_and_shown_escaped(run_qfv, qfv_files,
                                                                  tmp_path):
    """A name from ``ls`` in a folder of files named in another encoding: printing it raw
    was an encoding error (a ``ValueError``, shown as bad input)."""
    qfv_files(tmp_path, "q.pt")
    out = os.fsdecode(b"m\xff\xfe.pt")
    run = run_qfv(["faults", "sample", "q.pt", "--rate", "0.1", "--out", out], tmp_path,
                  timeout=DEADLINE)
    assert run.code == 0, run.err
    _clean(run)
    assert "wrote m\\udcff\\udcfe.pt" in run.out
    assert b"m\xff\xfe.pt" in os.listdir(os.fsencode(tmp_path))


@pytest.mark.parametrize("cmd", ["report {f}.pt", "inspect {f}.onnx",
                                 "faults sample {f}.pt --rate 0.1 --out m.pt"])
@pytest.mark.parametrize("name", ["csi", "c1", "bidi"])
def test_a_missing_input_named_with_controls_is_named_escaped(run_qfv, refused, snapshot,
                                                              tmp_path, cmd, name):
    f = f"in{NAMES[name]}"
    argv = [a.format(f=f) for a in cmd.split()]
    before = snapshot(tmp_path)
    run = run_qfv(argv, tmp_path, timeout=DEADLINE)
    refused(run, 2, printable(f))
    assert snapshot(tmp_path) == before


def _resealed(src: Path, dst: Path, edit) -> None:
    """A checkpoint edited and given a matching checksum (a deliberate, well-formed file)."""
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    ckpt["sha256"] = content_digest(ckpt)
    torch.save(ckpt, dst)


@pytest.mark.parametrize("name", list(NAMES))
def test_a_checkpoint_s_metadata_with_controls_is_shown_escaped(run_qfv, refused, snapshot,
                                                                 qfv_files, tmp_path, name):
    qfv_files(tmp_path, "q.pt")
    _resealed(tmp_path / "q.pt", tmp_path / "bad.pt",
              lambda c: c["meta"].update(dataset=f"digits{NAMES[name]}"))
    before = snapshot(tmp_path)
    run = run_qfv(["faults", "sample", "bad.pt", "--rate", "0.1", "--out", "m.pt"], tmp_path,
                  timeout=DEADLINE)
    line = refused(run, 2, "bad.pt")
    assert printable(f"digits{NAMES[name]}") in line or "dataset" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["csi", "c1", "bidi"])
def test_a_state_dict_key_with_controls_is_shown_escaped(run_qfv, refused, snapshot, qfv_files,
                                                         tmp_path, name):
    qfv_files(tmp_path, "q.pt")

    def rename(c):
        sd = c["state_dict"]
        sd[f"net.3{NAMES[name]}.weight"] = sd.pop("net.3.weight")
    _resealed(tmp_path / "q.pt", tmp_path / "bad.pt", rename)
    before = snapshot(tmp_path)
    run = run_qfv(["report", "bad.pt"], tmp_path, timeout=DEADLINE)
    refused(run, 2, "bad.pt")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["csi", "osc-hyperlink", "bidi"])
def test_a_fault_map_s_layer_names_with_controls_are_shown_escaped(
        run_qfv, refused, snapshot, qfv_files, tmp_path, name):
    from qfv_brevitas.chip.faults import FaultMap

    qfv_files(tmp_path, "q.pt", "chip.pt")
    m = FaultMap.load(tmp_path / "chip.pt")
    layers = {f"{k}{NAMES[name]}": v for k, v in m.layers.items()}
    FaultMap(layers, {f"{k}{NAMES[name]}": b for k, b in m.bits.items()}, m.meta).save(
        tmp_path / "evil.pt")
    before = snapshot(tmp_path)
    run = run_qfv(["selftune", "q.pt", "--fault-map", "evil.pt", "--calib-size", "8"],
                  tmp_path, timeout=DEADLINE)
    refused(run, 2)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", list(NAMES))
def test_an_export_s_metadata_with_controls_is_shown_escaped(run_qfv, qfv_files, tmp_path,
                                                             name):
    """``qfv inspect`` prints what the file says: its exporter's name here, resealed so that
    the file's checksum holds."""
    qfv_files(tmp_path, "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    props = {p.key: p for p in proto.metadata_props}
    info = json.loads(props["qfv_brevitas.export"].value)
    info["exporter"] = f"torchscript{NAMES[name]}"
    text = json.dumps(info, sort_keys=True)
    props["qfv_brevitas.export"].value = text
    props["qfv_brevitas.sha256"].value = hashlib.sha256(text.encode()).hexdigest()
    onnx.save(proto, str(tmp_path / "evil.onnx"))
    run = run_qfv(["inspect", "evil.onnx"], tmp_path, timeout=DEADLINE)
    _clean(run)
    assert run.code in (0, 2), run.err  # shown, or refused as not what qfv writes
    if run.code == 0:
        assert printable(f"exporter torchscript{NAMES[name]}") in run.out
    else:
        assert len(run.lines) == 1 and "evil.onnx" in run.lines[0]


# -- what --force replaces: a folder's own files are read only as regular files, bounded -------

#: the file whose listing says a folder is a command's own (``--force`` may replace it then)
OWN_LISTING = {"crossbar": "manifest.json", "train": "results.json"}


def _hostile_listing(folder: Path, name: str, kind: str) -> None:
    """``folder/name`` as something that must not be opened, read whole or followed."""
    folder.mkdir()
    p = folder / name
    if kind == "fifo":  # opening it to read blocks forever
        os.mkfifo(p)
    elif kind == "dev-zero":  # endless
        p.symlink_to("/dev/zero")
    elif kind == "outside":  # a listing outside the folder naming the folder's files as own
        (folder.parent / "theirs.json").write_text(json.dumps(
            {"format": "qfv-crossbar/1", "layers": [{"file": "notes.txt"}],
             "files": ["notes.txt"]}))
        p.symlink_to(folder.parent / "theirs.json")
        (folder / "notes.txt").write_text("theirs")
    elif kind == "huge":  # a sparse 64 MiB file: over the JSON budget, never read whole
        with open(p, "wb") as fh:
            fh.truncate(64 << 20)
    else:  # deep: nested past the JSON depth budget
        p.write_text("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "outside", "huge", "deep"])
@pytest.mark.parametrize("cmd", list(OWN_LISTING))
def test_force_never_reads_a_hostile_listing_of_the_folder_it_would_replace(
        run_qfv, refused, snapshot, qfv_files, tmp_path, cmd, kind):
    qfv_files(tmp_path, "q.pt")
    _hostile_listing(tmp_path / "out", OWN_LISTING[cmd], kind)
    before = snapshot(tmp_path)
    run = run_qfv(_argv(FOLDER_COMMANDS[cmd], out="out") + ["--force"], tmp_path,
                  timeout=DEADLINE if cmd == "crossbar" else 120)
    if kind in ("huge", "deep") and cmd == "train":
        # a regular results.json under a name runs write: the folder is a run's and replaced,
        # its listing ignored (too large or too deep to read) at no cost
        assert run.code == 0, run.err
        assert (tmp_path / "out" / "results.json").stat().st_size < 1 << 20
    else:
        what = "notes.txt" if kind == "outside" else OWN_LISTING[cmd]
        refused(run, 3, "out is not replaced", what)
        assert snapshot(tmp_path) == before
    assert run.peak_bytes < 400 << 20, run.peak_bytes
