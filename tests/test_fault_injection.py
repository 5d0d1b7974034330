"""Fault injection (issue 14): a full disk, Ctrl-C at random points, read-only folders.

Each test runs ``qfv`` in one child process (signals and resource limits are per process),
calling ``main()`` several times there to keep the number of interpreter starts low, and checks
from here that every output is the previous file/folder or a complete new one, with no
temporary file left behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.zoo.checkpoint import load_checkpoint, save_checkpoint
from qfv_brevitas.cli.app import main
from qfv_brevitas.zoo.data import fingerprint, load_digits_split
from qfv_brevitas.export import read_metadata
from qfv_brevitas.chip.faults import FaultModel, sample_fault_map
from qfv_brevitas.zoo.models import MLP

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, rlimits, mounts")

# The child: runs main() once per entry of the spec, each after a "go" line on stdin, and
# reports {"i", "rc", "err", "seconds"} per run on stdout.
CHILD = r"""
import contextlib, io, json, resource, signal, sys, time
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C counts only while main() runs
spec = json.loads(sys.argv[1])
from qfv_brevitas.cli.app import main
import matplotlib.pyplot, onnx, onnxruntime, qonnx.core.onnx_exec  # imported before any limit
if spec.get("fsize"):
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize"], resource.RLIM_INFINITY))
for i, argv in enumerate(spec["runs"]):
    if spec.get("wait"):
        sys.stdin.readline()
    err = io.StringIO()
    print(json.dumps({"start": i}), flush=True)
    t0 = time.perf_counter()
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except KeyboardInterrupt:  # only if the signal came after main() returned
        rc = "late"
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(json.dumps({"i": i, "rc": rc, "err": err.getvalue(),
                      "seconds": time.perf_counter() - t0}), flush=True)
"""

RUN = ["--float-epochs", "1", "--qat-epochs", "1", "--bits", "4", "--variants", "nmult",
       "--model", "mlp", "--no-progress"]


def _child(spec, prefix=()):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return [*prefix, sys.executable, "-c", CHILD, json.dumps(spec)], env


def _run(spec, prefix=()):
    cmd, env = _child(spec, prefix)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in proc.stdout.splitlines() if '"rc"' in line]
    assert len(results) == len(spec["runs"]), proc.stdout + proc.stderr
    return results


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest()
                                             if p.is_file() else "<dir>")
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """q.pt (a W4A4 MLP), its fault map, and existing outputs: a checkpoint, an export, a run
    folder, results and a crossbar folder."""
    root = tmp_path_factory.mktemp("faults")
    train, test = load_digits_split(0)
    torch.manual_seed(0)
    cfg = NMultConfig(weight_bits=4, act_bits=4)
    q = quantize_model(MLP(64, 10), cfg, train.tensors[0][:64]).eval()
    save_checkpoint(root / "q.pt", q, "mlp", (1, 8, 8), 10, cfg, dataset="digits", data_seed=0,
                    data_sha256=fingerprint(train, test))
    sample_fault_map(q, FaultModel(rate=0.1, seed=1)).save(root / "chip.pt")
    shutil.copy(root / "q.pt", root / "existing.pt")
    shutil.copy(root / "chip.pt", root / "existing_map.pt")
    q_ = str(root / "q.pt")
    assert main(["export", q_, "--out", str(root / "existing.onnx"), "--exporter",
                 "torchscript", "--samples", "4"]) == 0
    assert main(["faults", "eval", q_, "--rates", "0", "--trials", "1", "--out",
                 str(root / "res"), "--no-progress"]) == 0
    assert main(["crossbar", q_, "--out", str(root / "xb")]) == 0
    assert main(["train", "--out", str(root / "run"), *RUN]) == 0
    return root


def test_full_disk_leaves_every_output_as_it_was(world):
    """RLIMIT_FSIZE = 1000 bytes: every write of these outputs fails mid-file (a disk that
    fills up). Before: an existing checkpoint or ONNX file was replaced by a truncated one."""
    q, w = str(world / "q.pt"), str(world)
    runs = [
        ["faults", "finetune", q, "--fault-map", f"{w}/chip.pt", "--method", "nearest_valid",
         "--out", f"{w}/existing.pt", "--force", "--no-progress"],
        ["faults", "sample", q, "--rate", "0.1", "--out", f"{w}/existing_map.pt", "--force"],
        ["export", q, "--out", f"{w}/existing.onnx", "--force", "--exporter", "torchscript",
         "--samples", "4"],
        ["faults", "eval", q, "--rates", "0", "--trials", "1", "--out", f"{w}/res", "--force",
         "--no-progress"],
        ["crossbar", q, "--out", f"{w}/xb", "--force"],
        ["train", "--out", f"{w}/run", "--force", *RUN],
    ]
    names = ["existing.pt", "existing_map.pt", "existing.onnx", "res/faults_eval.", "xb",
             "run/float.pt"]
    before = _snapshot(world)
    results = _run({"runs": runs, "fsize": 1000})
    for r, name in zip(results, names):
        assert r["rc"] == 4, r
        line = r["err"].strip()
        assert "\n" not in line and "File too large" in line and "outputs are unchanged" in line
        assert name in line and ".tmp" not in line, line  # names the output, not a temp file
    assert _snapshot(world) == before


def _read_only_prefix(folder: Path):
    """A shell prefix that runs the command with ``folder`` mounted read-only (a private mount
    namespace: nothing changes outside the child), or a reason why that is impossible here.
    chmod does not stop root; a read-only mount does."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None, "unshare/mount not available"
    f = str(folder)
    script = (f'mount --bind "{f}" "{f}" && mount -o remount,bind,ro "{f}" && '
              f'if touch "{f}/.probe" 2>/dev/null; then exit 99; fi && exec "$@"')
    prefix = ["unshare", "-m", "sh", "-c", script, "sh"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, (f"cannot mount {f} read-only here (rc {probe.returncode}: "
                      f"{probe.stderr.strip()[:200]})")
    return prefix, None


def test_read_only_folder_is_refused_before_any_work(world):
    prefix, why = _read_only_prefix(world)
    if prefix is None:
        pytest.skip(why)
    q, w = str(world / "q.pt"), str(world)
    runs = [
        ["faults", "sample", q, "--rate", "0.1", "--out", f"{w}/new_map.pt"],
        ["faults", "finetune", q, "--rate", "0.1", "--out", f"{w}/sub/ft.pt", "--no-progress"],
        ["export", q, "--out", f"{w}/new.onnx", "--exporter", "torchscript"],
        ["faults", "eval", q, "--rates", "0", "--out", f"{w}/res", "--force", "--no-progress"],
        ["crossbar", q, "--out", f"{w}/xb", "--force"],
        ["train", "--out", f"{w}/run", "--force", *RUN],
    ]
    before = _snapshot(world)
    for r in _run({"runs": runs}, prefix):
        line = r["err"].strip()
        # exit 3 with the pre-check's words: without the pre-check the first write (after
        # the work) would fail with an OSError, exit 4.
        assert r["rc"] == 3 and "\n" not in line, r
        assert f"folder {w}" in line and "is not writable (Read-only file system)" in line, line
    assert _snapshot(world) == before


def _valid_run(folder: Path) -> bool:
    """A complete run: results.json lists exactly the files there, each checkpoint loads."""
    listed = set(json.loads((folder / "results.json").read_text())["files"])
    assert listed == {p.name for p in folder.iterdir()}, listed
    for name in listed:
        if name.endswith(".pt"):
            load_checkpoint(folder / name)
    return True


def test_ctrl_c_at_random_points_of_train_and_export(world):
    """SIGINT at seeded random times during `qfv train --force` and `qfv export --force` over
    an existing run folder / file: after each, the output is the old one (byte for byte) or a
    complete new one, and nothing else is left in the folder. Before: a new float.pt beside
    the old run's checkpoints, or an unverified ONNX file at the final path."""
    w = str(world)
    trains, exports = 3, 3
    runs = ([["train", "--out", f"{w}/run", "--force", *RUN]] * (1 + trains)
            + [["export", f"{w}/q.pt", "--out", f"{w}/existing.onnx", "--force", "--exporter",
                "torchscript", "--samples", "16"]] * (1 + exports))
    cmd, env = _child({"runs": runs, "wait": True})
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rng = random.Random(14)
    names = set(os.listdir(world))
    old_run, old_onnx = _snapshot(world / "run"), (world / "existing.onnx").read_bytes()
    duration = {}
    outcomes = []
    try:
        for i in range(len(runs)):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            assert json.loads(line) == {"start": i}
            kind = runs[i][0]
            first = i in (0, 1 + trains)  # uninterrupted: measures how long a run takes
            if not first:
                time.sleep(rng.uniform(0.0, 0.9 * duration[kind]))
                if not select.select([proc.stdout], [], [], 0)[0]:  # still running
                    proc.send_signal(signal.SIGINT)
            r = json.loads(proc.stdout.readline())
            assert r["rc"] in (0, 130, "late"), r
            if first:
                assert r["rc"] == 0, r
                duration[kind] = r["seconds"]
            outcomes.append((kind, r["rc"]))
            assert set(os.listdir(world)) == names  # no temporary file or folder left
            if kind == "train":
                now = _snapshot(world / "run")
                assert now == old_run or _valid_run(world / "run")
                if r["rc"] == 130:
                    assert now == old_run and "interrupted" in r["err"]
                old_run = now
            else:
                data = (world / "existing.onnx").read_bytes()
                assert data == old_onnx or read_metadata(world / "existing.onnx")["form"]
                if r["rc"] == 130:
                    assert data == old_onnx and "interrupted" in r["err"]
                old_onnx = data
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    print("ctrl-c outcomes:", outcomes, "run seconds:", duration)
    # The random points fell inside the work often enough for the test to mean something.
    assert sum(rc == 130 for _, rc in outcomes) >= 2, outcomes
