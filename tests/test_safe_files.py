"""Untrusted files, nothing lost (issue 14): what the library does right with the files it
reads and writes, beside the refusals of ``test_bad_input.py``.

- checkpoints and maps: crafted pickles refused without running, a checksum that notices a
  changed byte, older checkpoints still read, NaN models never saved;
- export: nothing written unless verified; ``qfv verify`` compares every parameter of the
  graph with the checkpoint's export (a doubled activation scale fails, which output
  agreement alone let through); ``qfv inspect`` checks the graph against the metadata;
- run and crossbar folders replaced whole (no stale file survives), or left as they were
  when the run fails or is interrupted;
- the smaller items: bit widths as strings, all-zero weights, a diverging run.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shlex
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.zoo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from qfv_brevitas.cli.app import main
from qfv_brevitas.zoo.data import fingerprint, load_digits_split
from qfv_brevitas.util.errors import OutputError
from qfv_brevitas.export import ExportFileError, export_qonnx, read_metadata, verify_qonnx
from qfv_brevitas.export.api import ExportVerificationError, reference_model
from qfv_brevitas.chip.faults import FaultMap, FaultMapError, FaultModel, sample_fault_map
from qfv_brevitas.zoo.models import MLP
from qfv_brevitas.training.train import TrainConfig, fit

SHAPE = (1, 8, 8)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A W4A4 MLP checkpoint on digits and its fault map (module scope, built once)."""
    root = tmp_path_factory.mktemp("safe")
    train, test = load_digits_split(0)
    torch.manual_seed(0)
    fp = MLP(64, 10)
    fit(fp, train, None, TrainConfig(epochs=2, lr=0.05), progress=False)
    cfg = NMultConfig(weight_bits=4, act_bits=4)
    q = quantize_model(copy.deepcopy(fp), cfg, train.tensors[0][:64])
    fit(q, train, None, TrainConfig(epochs=1, lr=0.01, lambda_rise_epochs=1), progress=False)
    path = save_checkpoint(root / "q.pt", q.eval(), "mlp", SHAPE, 10, cfg, dataset="digits",
                           data_seed=0, data_sha256=fingerprint(train, test))
    sample_fault_map(q, FaultModel(rate=0.1, seed=2)).save(root / "chip.pt")
    return root, path


# ------------------------------------------------------------------ checkpoints and maps

def test_crafted_pickles_never_run(tmp_path, ckpt):
    marker = tmp_path / "PWNED"
    zipped, raw, bad_map = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "m.pt"
    torch.save({"format": "qfv-brevitas/2", "x": _Payload(marker)}, zipped)
    with open(raw, "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f, protocol=2)
    torch.save({"format": "qfv-brevitas/faultmap/1", "x": _Payload(marker)}, bad_map)
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match="refused.*GLOBAL posix.system"):
            load_checkpoint(path)
    with pytest.raises(FaultMapError, match="refused"):
        FaultMap.load(bad_map)
    assert not marker.exists()
    torch.load(zipped, weights_only=False)  # the payload is real: loaded unsafely, it runs
    assert marker.exists()


def test_checksum_notices_one_changed_weight(tmp_path, ckpt):
    _, path = ckpt
    data = torch.load(path, weights_only=True)
    data["state_dict"]["net.3.weight"].view(-1)[17] += 331.0  # the weight, 331 off
    torch.save(data, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"edited\.pt: its contents do not match their "
                                              r"checksum"):
        load_checkpoint(tmp_path / "edited.pt")
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 200):  # 200 inverted bytes mid-file
        raw[i] ^= 0xFF
    (tmp_path / "inverted.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum|not a readable"):
        load_checkpoint(tmp_path / "inverted.pt")


def test_older_checkpoints_without_checksum_still_load(tmp_path, ckpt):
    _, path = ckpt
    data = torch.load(path, weights_only=True)
    data["format"] = "qfv-brevitas/1"
    del data["sha256"]
    torch.save(data, tmp_path / "v1.pt")
    with pytest.warns(UserWarning, match="without a checksum"):
        model, info = load_checkpoint(tmp_path / "v1.pt")
    assert info["config"].weight_bits == 4


def test_checkpoints_are_written_atomically_and_never_with_nan(tmp_path, ckpt):
    model, info = load_checkpoint(ckpt[1])
    out = save_checkpoint(tmp_path / "c.pt", model, "mlp", SHAPE, 10, info["config"])
    good = out.read_bytes()
    with pytest.raises(OutputError, match="exists"):
        save_checkpoint(out, model, "mlp", SHAPE, 10, info["config"])
    with torch.no_grad():
        model.net[3].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"not saving .*c\.pt: parameter net\.3\.weight "
                                              r"holds NaN"):
        save_checkpoint(out, model, "mlp", SHAPE, 10, info["config"], overwrite=True)
    assert out.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["c.pt"]


# ---------------------------------------------------------------------------- export

def _tamper(src, dst, edit):
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))


def _scale(proto, factor):
    inits = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Quant" and n.input[0] not in inits and n.input[1] in inits:
            t = inits[n.input[1]]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, t.name))
            return n.input[1]
    raise AssertionError


def _drop_graph_checksum(proto):
    keep = [p for p in proto.metadata_props if p.key != "qfv_brevitas.graph_sha256"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)


def test_verify_catches_a_doubled_activation_scale(tmp_path, ckpt, capsys):
    """The issue's case: outputs still agree on top-1 (quantized activations), so only the
    parameter comparison with the checkpoint's own export catches it; and it does so even
    when the tamperer also removed the graph checksum."""
    root, path = ckpt
    good = tmp_path / "m.onnx"
    assert main(["export", str(path), "--out", str(good), "--exporter", "torchscript",
                 "--samples", "8"]) == 0
    bad = tmp_path / "scaled.onnx"
    name = None

    def edit(p):
        nonlocal name
        name = _scale(p, 2.0)
        _drop_graph_checksum(p)
    _tamper(good, bad, edit)
    model, _ = load_checkpoint(path)
    x = load_digits_split(0)[1].tensors[0][:64]
    outputs_only = verify_qonnx(reference_model(model, bad), bad, x)
    assert outputs_only.passed, outputs_only.summary()  # what the old check saw: nothing wrong
    capsys.readouterr()
    assert main(["verify", str(bad), str(path), "--samples", "64"]) == 1
    text = capsys.readouterr()
    assert f"parameter {name!r}" in text.err and "differs" in text.err
    assert "FAILED" in text.out
    assert main(["verify", str(good), str(path), "--samples", "64"]) == 0
    # inspect: the graph checksum, when the tamperer left it
    _tamper(good, tmp_path / "scaled2.onnx", lambda p: _scale(p, 2.0))
    with pytest.raises(ExportFileError, match="graph does not match the checksum"):
        read_metadata(tmp_path / "scaled2.onnx")


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_verify_passes_every_files_own_checkpoint(tmp_path, ckpt, capsys, exporter):
    """No false alarm: the re-export equals the file for the default exporter, with a fault
    map attached (the device's codes) and with --ideal."""
    root, path = ckpt
    ft = tmp_path / "ft.pt"
    assert main(["faults", "finetune", str(path), "--fault-map", str(root / "chip.pt"), "--method",
                 "nearest_valid", "--out", str(ft), "--no-progress"]) == 0
    for extra in ([], ["--ideal"]):
        out = tmp_path / f"m{len(extra)}.onnx"
        assert main(["export", str(ft), "--out", str(out), "--exporter", exporter,
                     "--samples", "8", *extra]) == 0
        assert main(["inspect", str(out)]) == 0
        assert main(["verify", str(out), str(ft), "--samples", "16"]) == 0, capsys.readouterr()


def test_inspect_checks_the_graph_against_the_metadata(tmp_path, ckpt):
    root, path = ckpt
    model, _ = load_checkpoint(path)
    x = load_digits_split(0)[1].tensors[0][:1]
    good = export_qonnx(model, x, tmp_path / "m.onnx", exporter="torchscript").path

    def init(name, fn):
        def edit(p):
            for t in p.graph.initializer:
                if t.name == name:
                    t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t)), name))
            _drop_graph_checksum(p)  # so that the structural check is what fires
        return edit
    cases = {
        "r": (init("net.3.weight_r", lambda a: a * 2), r"layer 'net\.3': r in the graph"),
        "c": (init("net.3.weight_c", lambda a: a + 1), r"layer 'net\.3': c in the graph"),
        "code": (init("net.3.weight_codes", lambda a: np.full_like(a, 16)),
                 r"code 16 at flat index 0 is out of the 4-bit range 0\.\.15"),
    }
    for key, (edit, pattern) in cases.items():
        _tamper(good, tmp_path / f"{key}.onnx", edit)
        with pytest.raises(ExportFileError, match=pattern):
            read_metadata(tmp_path / f"{key}.onnx")


def test_a_file_that_does_not_verify_is_not_written(tmp_path, ckpt, monkeypatch):
    from qfv_brevitas.export import api

    model, _ = load_checkpoint(ckpt[1])
    x = load_digits_split(0)[1].tensors[0][:4]
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    real = api.verify_qonnx

    def failing(*a, **k):
        rep = real(*a, **k)
        rep.passed, rep.weight_diff = False, {"net.3": 1.0}
        return rep
    monkeypatch.setattr(api, "verify_qonnx", failing)
    with pytest.raises(ExportVerificationError, match=r"m\.onnx: not written: .*net\.3"):
        export_qonnx(model, x, out, exporter="torchscript", overwrite=True)
    assert out.read_bytes() == b"the previous export" and os.listdir(tmp_path) == ["m.onnx"]


# ------------------------------------------------------------------ run and crossbar folders

def test_crossbar_folder_is_replaced_whole(tmp_path, ckpt):
    xb = tmp_path / "xb"
    assert main(["crossbar", str(ckpt[1]), "--out", str(xb)]) == 0
    files = sorted(os.listdir(xb))
    manifest = json.loads((xb / "manifest.json").read_text())
    manifest["layers"].append(dict(manifest["layers"][0], layer="old", file="old.npz"))
    (xb / "manifest.json").write_text(json.dumps(manifest))
    (xb / "old.npz").write_bytes(b"a layer of an earlier model")  # listed: replaceable
    assert main(["crossbar", str(ckpt[1]), "--out", str(xb), "--force"]) == 0
    assert sorted(os.listdir(xb)) == files  # the stale layer file is gone


FAST = ["--float-epochs", "1", "--qat-epochs", "1", "--bits", "4", "--variants", "nmult",
        "--model", "mlp", "--no-progress"]


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_run_folder_is_old_or_new_never_a_mix(tmp_path, monkeypatch, capsys):
    from qfv_brevitas.studies import experiment

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *FAST]) == 0
    old = _tree(out)
    assert set(old) == {"results.json", "float.pt", "nmult_w4a4.pt", "levels_fit_w4a4.png",
                        "levels.png"}
    assert json.loads(old["results.json"])["files"] == ["results.json", "float.pt",
                                                        "nmult_w4a4.pt", "levels_fit_w4a4.png",
                                                        "levels.png"]
    real_fit = experiment.fit
    calls = []

    def interrupted_fit(*a, **k):  # Ctrl-C in the QAT, after float.pt is written
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*a, **k)
    monkeypatch.setattr(experiment, "fit", interrupted_fit)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--force", *FAST]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _tree(out) == old and os.listdir(tmp_path) == ["run"]
    monkeypatch.setattr(experiment, "fit", real_fit)
    # A diverging run (the issue's --lr nan saved an all-NaN float.pt): refused up front, and
    # a run that diverges on the way is stopped without writing anything.
    assert main(["train", "--out", str(out), "--force", "--float-lr", "nan", *FAST]) == 2
    assert main(["train", "--out", str(out), "--force", "--float-lr", "1e30", *FAST]) == 2
    assert re.search(r"float: the loss became (nan|inf) in epoch 1: training diverged",
                     capsys.readouterr().err)
    assert _tree(out) == old and os.listdir(tmp_path) == ["run"]
    # Another configuration with --force: the new run only (no file of the old one left).
    assert main(["train", "--out", str(out), "--force", *FAST[:-5], "--variants", "fixed",
                 "--model", "mlp", "--no-progress"]) == 0
    assert set(_tree(out)) == {"results.json", "float.pt", "fixed_w4a4.pt", "levels.png"}


# -------------------------------------------------------------------------- smaller items

def test_bit_widths_are_numbers():
    with pytest.raises(ValueError, match="bit width must be an integer"):
        NMultConfig(weight_bits="4")
    assert NMultConfig(weight_bits=4.0).weight_bits == 4


def test_all_zero_weights_are_reported():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.nn.init.zeros_(net[0].weight)
    with pytest.warns(UserWarning, match=r"of 0: the layer has all-zero weights.*collapsed"):
        quantize_model(net, NMultConfig(weight_bits=3, act_bits=None, first_last_bits=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing for ordinary weights
        quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 3)),
                       NMultConfig(weight_bits=3, act_bits=None, first_last_bits=None))


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "missing.pt")
    assert main(["report", missing]) == 2
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="missing.pt"):
        main(["--debug", "report", missing])
    monkeypatch.setenv("QFV_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(["report", missing])


def test_sigterm_stops_as_cleanly_as_ctrl_c(monkeypatch, capsys):
    import signal
    import time

    from qfv_brevitas.cli import train as cli

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted here
        return 0
    monkeypatch.setattr(cli, "run_report", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["report", "any.pt"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # restored
