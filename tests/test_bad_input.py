"""Every ``qfv`` command against bad files and bad arguments (issue 14: untrusted files,
nothing lost).

Each case runs ``main([...])`` in-process in a folder of good and bad files, and asserts:
the documented exit status; one error line on stderr that names what is wrong and where (the
file or the argument), no traceback; every file of the folder byte-identical afterwards and no
file added (no output written, no temporary file left); and that no crafted file ran its
payload (the payload would create ``PWNED``). The crafted files are shown to work: loaded the
unsafe way (``torch.load(weights_only=False)``, ``pickle.load``) they do create their marker.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import pickle
import re
import shlex
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.zoo.checkpoint import save_checkpoint
from qfv_brevitas.cli.app import main
from qfv_brevitas.zoo.data import IDX_FILES, fingerprint, load_digits_split, load_idx_split
from qfv_brevitas.chip.faults import FaultModel, sample_fault_map
from qfv_brevitas.zoo.models import MLP
from qfv_brevitas.util.safeio import content_digest
from qfv_brevitas.training.train import TrainConfig, fit
from qfv_brevitas.chip.variability import VariabilityModel, sample_variability_map

SHAPE = (1, 8, 8)
HAS_SNN = __import__("importlib").util.find_spec("spikingjelly") is not None


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _write_idx(path: Path, arr) -> None:
    arr = np.asarray(arr, dtype=np.uint8)
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(data)


def _idx_folder(root: Path, n_train=40, n_test=20, hw=(8, 8), classes=10, seed=0,
                train_labels=None, test_labels=None, test_hw=None) -> Path:
    rng = np.random.default_rng(seed)
    ytr = np.arange(n_train) % classes if train_labels is None else np.asarray(train_labels)
    yte = np.arange(n_test) % classes if test_labels is None else np.asarray(test_labels)
    files = (rng.integers(0, 256, (len(ytr), *hw)), ytr,
             rng.integers(0, 256, (len(yte), *(test_hw or hw))), yte)
    for name, arr in zip(IDX_FILES, files):
        _write_idx(root / f"{name}.gz", arr)
    return root


def _reseal(src: Path, dst: Path, edit) -> None:
    """A checkpoint with ``edit`` applied and its checksum recomputed (a deliberate edit)."""
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    ckpt["sha256"] = content_digest(ckpt)
    torch.save(ckpt, dst)


def _flip_middle(src: Path, dst: Path, n: int = 200) -> None:
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))


def _tamper_onnx(src: Path, dst: Path, edit) -> None:
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))


def _edit_init(proto, name, fn) -> None:
    for init in proto.graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init).copy()
            init.CopyFrom(numpy_helper.from_array(fn(arr), init.name))
            return
    raise KeyError(name)


def _first_activation_scale(proto) -> str:
    inits = {i.name for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Quant" and n.input[0] not in inits and n.input[1] in inits:
            return n.input[1]
    raise AssertionError("no activation Quant node")


def _edit_metadata(proto, fn, reseal: bool) -> None:
    props = {p.key: p for p in proto.metadata_props}
    info = json.loads(props["qfv_brevitas.export"].value)
    fn(info)
    text = json.dumps(info, sort_keys=True)
    props["qfv_brevitas.export"].value = text
    if reseal:
        props["qfv_brevitas.sha256"].value = hashlib.sha256(text.encode()).hexdigest()


class World:
    """The folder every case runs in: good inputs, bad inputs, and existing outputs."""

    def __init__(self, root: Path):
        self.root = root
        self.marker = root / "PWNED"

    def snapshot(self) -> dict:
        out = {}
        for p in sorted(self.root.rglob("*")):
            rel = str(p.relative_to(self.root))
            if "__pycache__" in rel:
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad input")  # a space in the path, on purpose
    w = World(root)
    train, test = load_digits_split(0)
    torch.manual_seed(0)
    fp = MLP(64, 10)
    fit(fp, train, None, TrainConfig(epochs=2, lr=0.05), progress=False)
    meta = dict(dataset="digits", data_seed=0, data_sha256=fingerprint(train, test))
    save_checkpoint(root / "float.pt", fp, "mlp", SHAPE, 10, None, **meta)
    x = train.tensors[0][:64]
    cfg = NMultConfig(weight_bits=4, act_bits=4)
    q = quantize_model(copy.deepcopy(fp), cfg, x)
    fit(q, train, None, TrainConfig(epochs=1, lr=0.01, lambda_rise_epochs=1), progress=False)
    q.eval()
    save_checkpoint(root / "q.pt", q, "mlp", SHAPE, 10, cfg, **meta)
    cfg3 = NMultConfig(weight_bits=3, act_bits=4)
    q3 = quantize_model(copy.deepcopy(fp), cfg3, x).eval()
    save_checkpoint(root / "q3.pt", q3, "mlp", SHAPE, 10, cfg3, **meta)
    # An IDX-trained checkpoint (untrained weights do: only its data is checked).
    idx_a = _idx_folder(root / "idx_ok")
    _idx_folder(root / "idx_other", seed=1)
    a_train, a_test, _ = load_idx_split(idx_a)
    save_checkpoint(root / "q_idx.pt", q, "mlp", SHAPE, 10, cfg, dataset="idx", data_seed=0,
                    data_sha256=fingerprint(a_train, a_test))
    # Maps: good ones, and one for the 3-bit model.
    sample_fault_map(q, FaultModel(rate=0.1, seed=1)).save(root / "chip.pt")
    sample_variability_map(q, VariabilityModel(sigma=0.1, seed=1)).save(root / "var.pt")
    sample_fault_map(q3, FaultModel(rate=0.1, seed=1)).save(root / "chip3.pt")
    _flip_middle(root / "chip.pt", root / "chip_flipped.pt", 64)
    # Exported files.
    for ck, out in (("q.pt", "m.onnx"), ("q3.pt", "m3.onnx")):
        assert main(["export", str(root / ck), "--out", str(root / out), "--exporter",
                     "torchscript", "--samples", "8"]) == 0
    # Bad checkpoints.
    (root / "folder.pt").mkdir()
    (root / "empty.pt").write_bytes(b"")
    (root / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    good = (root / "q.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 3])
    _flip_middle(root / "q.pt", root / "flipped.pt")
    torch.save({"format": "qfv-brevitas/2", "model": _Payload(w.marker)}, root / "evil.pt")
    with open(root / "evil_raw.pt", "wb") as f:
        pickle.dump({"format": "qfv-brevitas/1", "x": _Payload(w.marker)}, f, protocol=2)
    torch.save(q.state_dict(), root / "state_dict.pt")
    _reseal(root / "q.pt", root / "badcfg.pt", lambda c: c["config"].update(colour="red"))
    _reseal(root / "q.pt", root / "badarch.pt", lambda c: c.update(arch="transformer"))
    _reseal(root / "q.pt", root / "badshape.pt", lambda c: c.update(input_shape=[1, -8, 8]))
    _reseal(root / "q.pt", root / "nan.pt",
            lambda c: c["state_dict"]["net.3.weight"].fill_(float("nan")))
    # Bad maps.
    torch.save({"format": "qfv-brevitas/faultmap/1", "m": _Payload(w.marker)}, root / "evil_map.pt")
    # Bad ONNX files.
    m = root / "m.onnx"
    (root / "folder.onnx").mkdir()
    (root / "empty.onnx").write_bytes(b"")
    (root / "garbage.onnx").write_bytes(np.random.default_rng(1).bytes(3000))
    (root / "truncated.onnx").write_bytes(m.read_bytes()[: m.stat().st_size // 2])
    _flip_middle(m, root / "flipped.onnx")
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(plain, str(root / "plain.onnx"))
    _tamper_onnx(m, root / "r_doubled.onnx", lambda p: _edit_init(p, "net.3.weight_r",
                                                                    lambda a: a * 2))
    _tamper_onnx(m, root / "code_range.onnx", lambda p: _edit_init(
        p, "net.3.weight_codes", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0,
                                                    200, a).astype(np.uint8)))
    _tamper_onnx(m, root / "code_flip.onnx", lambda p: _edit_init(
        p, "net.3.weight_codes", lambda a: (a ^ np.eye(*a.shape, dtype=np.uint8))))
    _tamper_onnx(m, root / "scale_doubled.onnx", lambda p: _edit_init(
        p, _first_activation_scale(p), lambda a: a * 2))
    _tamper_onnx(m, root / "meta_edited.onnx", lambda p: _edit_metadata(
        p, lambda i: i["layers"][1]["r"][0].__setitem__(0, 9.0), reseal=False))
    _tamper_onnx(m, root / "meta_r_doubled.onnx", lambda p: _edit_metadata(
        p, lambda i: i["layers"][1].update(r=[[2 * v for v in i["layers"][1]["r"][0]]]),
        reseal=True))

    def evil_domain(p):
        for n in p.graph.node:
            if n.op_type == "NMultWeight":
                n.domain = "qfv_evil_domain"
        p.opset_import.add(domain="qfv_evil_domain", version=1)
    _tamper_onnx(m, root / "evil_domain.onnx", evil_domain)
    # A module that leaves the marker if anything imports it (qonnx imports op domains).
    (root / "qfv_evil_domain.py").write_text(
        f"open({str(w.marker)!r}, 'w').write('imported')\n")
    # Bad data folders.
    _idx_folder(root / "idx_empty_test", n_test=0)
    _idx_folder(root / "idx_stray", train_labels=[*range(10)] * 3 + [200])
    _idx_folder(root / "idx_1x1", hw=(1, 1))
    _idx_folder(root / "idx_shapes", test_hw=(9, 9))
    _idx_folder(root / "idx_testlabel", test_labels=[12] + [0] * 19)
    _idx_folder(root / "idx_missing")
    (root / "idx_missing" / "t10k-labels-idx1-ubyte.gz").unlink()
    _idx_folder(root / "idx_badgz")
    (root / "idx_badgz" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08junk")
    # Existing outputs, which the cases must leave untouched.
    (root / "existing.pt").write_bytes(good)
    (root / "existing.onnx").write_bytes(m.read_bytes())
    (root / "afile").write_text("I am a file, not a folder")
    (root / "res").mkdir()
    for name in ("faults_eval.json", "faults_compare.json", "variability_eval.json",
                 "variability_compare.json", "bitflips_eval.json", "compare.json"):
        (root / "res" / name).write_text("{}")
    (root / "run").mkdir()
    (root / "run" / "results.json").write_text("{}")
    (root / "mixed").mkdir()
    (root / "mixed" / "results.json").write_text("{}")
    (root / "mixed" / "my_notes.txt").write_text("not from a run")
    assert main(["crossbar", str(root / "q.pt"), "--out", str(root / "xb")]) == 0
    (root / "xb_mixed").mkdir()
    (root / "xb_mixed" / "manifest.json").write_text('{"format": "qfv-crossbar/1", "layers": []}')
    (root / "xb_mixed" / "photo.jpg").write_bytes(b"\xff\xd8")
    (root / "link.pt").symlink_to(root / "q.pt")
    # The crafted files work: loaded the unsafe way they run their payload.
    control = World(root / "control")
    control.root.mkdir()
    torch.save({"p": _Payload(control.marker)}, control.root / "evil.pt")
    torch.load(control.root / "evil.pt", weights_only=False)
    assert control.marker.exists()
    control.marker.unlink()
    with open(control.root / "evil_raw.pt", "wb") as f:
        pickle.dump(_Payload(control.marker), f, protocol=2)
    with open(control.root / "evil_raw.pt", "rb") as f:
        pickle.load(f)
    assert control.marker.exists()
    control.marker.unlink()
    sys.path.insert(0, str(root))  # so that importing the evil domain would succeed
    yield w
    sys.path.remove(str(root))


# --------------------------------------------------------------------------------------------
# The cases: (argv with {W} for the folder, exit status, patterns the error line must match)
# --------------------------------------------------------------------------------------------

CASES = []


def case(name, argv, code, *patterns):
    CASES.append(pytest.param(argv, code, patterns, id=name))


#: every command that reads a checkpoint, with the checkpoint as {ck}
CKPT_COMMANDS = {
    "report": "report {ck}",
    "faults-sample": "faults sample {ck} --rate 0.1 --out {W}/new/map.pt",
    "faults-eval": "faults eval {ck} --rates 0 --trials 1 --out {W}/new/ev --no-progress",
    "faults-finetune": "faults finetune {ck} --rate 0.1 --epochs 1 --out {W}/new/ft.pt "
                       "--no-progress",
    "faults-compare": "faults compare {ck} --rates 0 --trials 1 --methods none "
                      "--out {W}/new/cmp --no-progress",
    "variability-sample": "variability sample {ck} --sigma 0.1 --out {W}/new/map.pt",
    "variability-eval": "variability eval {ck} --sigmas 0 --trials 1 --out {W}/new/ev "
                        "--no-progress",
    "variability-finetune": "variability finetune {ck} --sigma 0.1 --epochs 1 "
                            "--out {W}/new/ft.pt --no-progress",
    "variability-compare": "variability compare {ck} --sigmas 0 --trials 1 --methods none "
                           "--out {W}/new/cmp --no-progress",
    "export": "export {ck} --out {W}/new/m.onnx --exporter torchscript --samples 4",
    "verify": "verify {W}/m.onnx {ck} --samples 4",
    "crossbar": "crossbar {ck} --out {W}/new/xb",
    "compare": "compare {ck} --methods none --stuck 0.1 --ber --sigmas --trials 1 "
               "--out {W}/new/cmp --no-progress",
    "bitflips-eval": "bitflips eval {ck} --rates 0 --trials 1 --out {W}/new/bf --no-progress",
    "bitflips-finetune": "bitflips finetune {ck} --rate 0.01 --epochs 1 --out {W}/new/rbe.pt "
                         "--no-progress",
    "selftune": "selftune {ck} --rate 0.1 --calib-size 8",
    "snn-neurons": "snn neurons {ck}",
}

BAD_CHECKPOINTS = {
    "missing": ("missing.pt", r"no such checkpoint file"),
    "folder": ("folder.pt", r"is a folder, not a checkpoint"),
    "empty": ("empty.pt", r"not a readable checkpoint"),
    "garbage": ("garbage.pt", r"not a readable checkpoint"),
    "truncated": ("truncated.pt", r"not a readable checkpoint"),
    "200-inverted-bytes": ("flipped.pt", r"do not match their checksum"),
    "crafted-pickle": ("evil.pt", r"refused.*GLOBAL posix.system.*Nothing of it was executed"),
    "crafted-raw-pickle": ("evil_raw.pt", r"refused.*Nothing of it was executed"),
    "plain-state-dict": ("state_dict.pt", r"not a qfv-brevitas checkpoint"),
    "onnx-file": ("m.onnx", r"not a readable checkpoint"),
    "fault-map": ("chip.pt", r"not a qfv-brevitas checkpoint"),
    "unknown-config-key": ("badcfg.pt", r"unknown quantization settings \['colour'\]"),
    "unknown-arch": ("badarch.pt", r"cannot rebuild its model 'transformer'"),
    "bad-input-shape": ("badshape.pt", r"'input_shape' must be a list of positive ints"),
    "nan-weights": ("nan.pt", r"parameter net\.3\.weight holds NaN"),
}

for cmd, argv in CKPT_COMMANDS.items():
    for kind, (fname, what) in BAD_CHECKPOINTS.items():
        case(f"{cmd}-{kind}", argv.replace("{ck}", "{W}/" + fname), 2, re.escape(fname), what)
    if cmd not in ("report", "snn-neurons"):
        case(f"{cmd}-float-checkpoint", argv.replace("{ck}", "{W}/float.pt"), 2,
             r"float\.pt is a float model", r"give a quantized checkpoint")
case("snn-neurons-not-spiking", "snn neurons {W}/q.pt", 2, r"q\.pt holds a non-spiking model")

#: every place a map file goes, with the map as {map}
MAP_SLOTS = {
    "faults-finetune": ("faults finetune {W}/q.pt --fault-map {map} --epochs 1 --out {W}/new/ft.pt "
                        "--no-progress", "fault map"),
    "variability-finetune": ("variability finetune {W}/q.pt --variability-map {map} --epochs 1 "
                             "--out {W}/new/ft.pt --no-progress", "variability map"),
    "selftune-fault-map": ("selftune {W}/q.pt --fault-map {map} --calib-size 8", "fault map"),
    "selftune-var-map": ("selftune {W}/q.pt --variability-map {map} --calib-size 8", "variability map"),
}
for slot, (argv, what) in MAP_SLOTS.items():
    other = "var.pt" if what == "fault map" else "chip.pt"
    for kind, fname, pattern in (
            ("missing", "nomap.pt", f"{what} file .* does not exist"),
            ("folder", "folder.pt", r"does not exist \(it is a folder\)"),
            ("garbage", "garbage.pt", f"not a readable {what}"),
            ("crafted-pickle", "evil_map.pt", r"refused.*Nothing of it was executed"),
            ("checkpoint", "q.pt", f"not a {what} file: its format tag is 'qfv-brevitas/2'"),
            ("other-kind-of-map", other, f"not a {what} file: its format tag"),
            ("truncated", "truncated.pt", f"not a readable {what}")):
        case(f"{slot}-{kind}", argv.replace("{map}", "{W}/" + fname), 2, re.escape(fname),
             pattern)
    if what == "fault map":
        case(f"{slot}-damaged", argv.replace("{map}", "{W}/chip_flipped.pt"), 2,
             r"chip_flipped\.pt", r"checksum|not a readable")
        case(f"{slot}-other-model", argv.replace("{map}", "{W}/chip3.pt"), 2,
             r"net\.\d", r"3.*4|4.*3")

#: exported files for inspect and verify: (file, inspect pattern, verify exit, verify pattern)
BAD_ONNX = {
    "missing": ("nothere.onnx", r"no such file", 2, r"no such file"),
    "folder": ("folder.onnx", r"is a folder", 2, r"is a folder"),
    "empty": ("empty.onnx", r"not (a readable ONNX file|an ONNX model)", 2, r"not (a|an) "),
    "garbage": ("garbage.onnx", r"not a readable ONNX file|not an ONNX model", 2,
                r"not a readable ONNX file|not an ONNX model"),
    "truncated": ("truncated.onnx", r"not a readable ONNX file|not an ONNX model", 2,
                  r"not a readable ONNX file|not an ONNX model"),
    "flipped-bytes": ("flipped.onnx", r"out of the 4-bit range|graph does not match the checksum", 1,
                      r"does not match .*q\.pt: graph: parameter 'net\.3\.weight_codes'"),
    "foreign-onnx": ("plain.onnx", r"not written by qfv-brevitas", 2,
                     r"not written by qfv-brevitas"),
    "metadata-edited": ("meta_edited.onnx", r"metadata does not match its checksum", 2,
                        r"metadata does not match its checksum"),
    "r-doubled-in-graph": ("r_doubled.onnx", r"layer 'net\.3': r in the graph .* differs from "
                           r"the metadata", 1, r"net\.3.*(weight_r|r in the graph)"),
    "r-doubled-in-metadata": ("meta_r_doubled.onnx", r"layer 'net\.3': r in the graph .* "
                              r"differs from the metadata", 1, r"net\.3"),
    "code-out-of-range": ("code_range.onnx", r"layer 'net\.3': code 200 at flat index 0 is out "
                          r"of the 4-bit range", 1, r"net\.3.*(weight_codes|code 200)"),
    "codes-edited": ("code_flip.onnx", r"graph does not match the checksum", 1,
                     r"net\.3\.weight_codes.* differs"),
    "activation-scale-doubled": ("scale_doubled.onnx", r"graph does not match the checksum", 1,
                                 r"parameter .*input_quant.* \(input 1 of Quant node .*differs"),
    "unknown-op-domain": ("evil_domain.onnx", r"op domain 'qfv_evil_domain'.*refusing", 2,
                          r"op domain 'qfv_evil_domain'.*refusing"),
}
for kind, (fname, ipat, vcode, vpat) in BAD_ONNX.items():
    case(f"inspect-{kind}", f"inspect {{W}}/{fname}", 2, re.escape(fname), ipat)
    case(f"inspect-json-{kind}", f"inspect {{W}}/{fname} --json", 2, re.escape(fname), ipat)
    case(f"verify-{kind}", f"verify {{W}}/{fname} {{W}}/q.pt --samples 4", vcode,
         re.escape(fname), vpat)
case("verify-3-bit-file-4-bit-checkpoint", "verify {W}/m3.onnx {W}/q.pt --samples 4", 1,
     r"m3\.onnx does not match the model: layer 'net\.3': 3-bit weights in the file but "
     r"4-bit in the model")
case("verify-4-bit-file-3-bit-checkpoint", "verify {W}/m.onnx {W}/q3.pt --samples 4", 1,
     r"m\.onnx", r"4-bit weights in the file but 3-bit in the model")

# Data: bad IDX folders where training starts, and data that is not the checkpoint's.
DATA = {
    "no-data-dir": ("--dataset idx", r"--dataset idx needs --data-dir"),
    "missing-folder": ("--dataset idx --data-dir {W}/nowhere", r"nowhere.*does not exist"),
    "missing-file": ("--dataset idx --data-dir {W}/idx_missing",
                     r"idx_missing.*missing IDX files t10k-labels-idx1-ubyte"),
    "empty-test-split": ("--dataset idx --data-dir {W}/idx_empty_test",
                         r"idx_empty_test.*t10k-labels.*the test set is empty"),
    "stray-label": ("--dataset idx --data-dir {W}/idx_stray",
                    r"idx_stray.*classes 10, 11, 12, 13, 14, \.\.\. never occur while label 200"),
    "test-label-not-a-class": ("--dataset idx --data-dir {W}/idx_testlabel",
                               r"idx_testlabel.*label 12 at index 0 is not one of the training "
                               r"classes 0\.\.9"),
    "images-train-test-differ": ("--dataset idx --data-dir {W}/idx_shapes",
                                 r"idx_shapes.*from different data sets"),
    "corrupt-gzip": ("--dataset idx --data-dir {W}/idx_badgz",
                     r"train-images.*corrupt or truncated gzip"),
}
for kind, (args, pattern) in DATA.items():
    case(f"train-{kind}", f"train {args} --float-epochs 1 --qat-epochs 1 --out {{W}}/new/run "
                          "--no-progress", 2, pattern)
    case(f"demo-{kind}", f"demo {args} --float-epochs 1 --qat-epochs 1 --out {{W}}/new/run "
                         "--no-progress", 2, pattern)
    if HAS_SNN:
        case(f"snn-train-{kind}", f"snn train {args} --float-epochs 1 --qat-epochs 1 "
                                  "--out {W}/new/run --no-progress", 2, pattern)
case("train-images-too-small", "train --dataset idx --data-dir {W}/idx_1x1 --float-epochs 1 "
     "--qat-epochs 1 --out {W}/new/run --no-progress", 2,
     r"--model small_cnn cannot take inputs of shape \(1, 1, 1\)")
if HAS_SNN:
    case("snn-train-images-too-small", "snn train --dataset idx --data-dir {W}/idx_1x1 "
         "--float-epochs 1 --qat-epochs 1 --out {W}/new/run --no-progress", 2,
         r"spiking_small_cnn does not fit samples of shape")
for cmd in ("faults eval {ck} --rates 0 --trials 1 --out {W}/new/ev --no-progress",
            "export {ck} --out {W}/new/m.onnx --exporter torchscript --samples 4",
            "bitflips eval {ck} --rates 0 --trials 1 --out {W}/new/bf --no-progress"):
    name = cmd.split(" {ck}")[0].replace(" ", "-")
    case(f"{name}-other-dataset", cmd.replace("{ck}", "{W}/q.pt") + " --dataset idx --data-dir "
         "{W}/idx_ok", 2, r"q\.pt was trained on --dataset digits, not idx")
    case(f"{name}-other-data-same-shape", cmd.replace("{ck}", "{W}/q_idx.pt")
         + " --dataset idx --data-dir {W}/idx_other", 2,
         r"--data-dir .*idx_other is not the data .*q_idx\.pt was trained")
    case(f"{name}-idx-without-data-dir", cmd.replace("{ck}", "{W}/q_idx.pt") + " --dataset idx",
         2, r"--dataset idx needs --data-dir")

# Arguments out of range (each names the argument or the value).
ARGS = [
    ("faults-sample-negative-rate", "faults sample {W}/q.pt --rate -0.1 --out {W}/new/m.pt",
     r"rate.*\[0, 1\].*-0\.1"),
    ("faults-sample-rate-above-1", "faults sample {W}/q.pt --rate 1.5 --out {W}/new/m.pt",
     r"rate.*\[0, 1\].*1\.5"),
    ("faults-sample-nan-rate", "faults sample {W}/q.pt --rate nan --out {W}/new/m.pt",
     r"rate.*nan"),
    ("faults-sample-sa1-fraction", "faults sample {W}/q.pt --rate 0.1 --sa1-fraction 2 "
     "--out {W}/new/m.pt", r"sa1_fraction.*2"),
    ("faults-eval-rate-above-1", "faults eval {W}/q.pt --rates 0 2 --out {W}/new/ev "
     "--no-progress", r"rate.*2"),
    ("faults-eval-zero-trials", "faults eval {W}/q.pt --rates 0 --trials 0 --out {W}/new/ev "
     "--no-progress", r"trials must be an integer >= 1, got 0"),
    ("faults-finetune-zero-epochs", "faults finetune {W}/q.pt --rate 0.1 --epochs 0 "
     "--out {W}/new/ft.pt --no-progress", r"epochs must be >= 1, got 0"),
    ("faults-finetune-nan-lr", "faults finetune {W}/q.pt --rate 0.1 --lr nan "
     "--out {W}/new/ft.pt --no-progress", r"TrainConfig\.lr must be a finite number > 0, got nan"),
    ("faults-finetune-negative-lr", "faults finetune {W}/q.pt --rate 0.1 --lr -1 "
     "--out {W}/new/ft.pt --no-progress", r"TrainConfig\.lr .* got -1"),
    ("faults-finetune-remap-every", "faults finetune {W}/q.pt --rate 0.1 --remap-every 0 "
     "--epochs 1 --out {W}/new/ft.pt --no-progress", r"remap_every.*0"),
    ("faults-compare-zero-trials", "faults compare {W}/q.pt --rates 0 --trials 0 "
     "--methods none --out {W}/new/cmp --no-progress", r"trials must be an integer >= 1"),
    ("faults-compare-sam-rho", "faults compare {W}/q.pt --rates 0 --trials 1 --methods none "
     "--sam-rho -1 --out {W}/new/cmp --no-progress", r"sam_rho.*-1"),
    ("variability-sample-negative-sigma", "variability sample {W}/q.pt --sigma -1 "
     "--out {W}/new/m.pt", r"sigma.*-1"),
    ("variability-sample-nan-sigma", "variability sample {W}/q.pt --sigma nan --out {W}/new/m.pt",
     r"sigma.*nan"),
    ("variability-sample-hrs-on-off", "variability sample {W}/q.pt --sigma 0.1 --hrs-on-off 0 "
     "--out {W}/new/m.pt", r"hrs_on_off.*0"),
    ("variability-sample-chip-sigma", "variability sample {W}/q.pt --sigma 0.1 "
     "--chip-sigma -1 --out {W}/new/m.pt", r"chip_sigma.*-1"),
    ("variability-eval-negative-sigma", "variability eval {W}/q.pt --sigmas -0.1 "
     "--out {W}/new/ev --no-progress", r"sigma.*-0\.1"),
    ("variability-eval-devices-per-chip", "variability eval {W}/q.pt --sigmas 0.1 --trials 2 "
     "--maps-per-chip 0 --out {W}/new/ev --no-progress", r"devices_per_chip.*0"),
    ("variability-finetune-zero-epochs", "variability finetune {W}/q.pt --sigma 0.1 --epochs 0 "
     "--out {W}/new/ft.pt --no-progress", r"epochs must be >= 1"),
    ("variability-compare-reg-width", "variability compare {W}/q.pt --sigmas 0 --trials 1 "
     "--methods none --reg-width -1 --out {W}/new/cmp --no-progress", r"width.*-1"),
    ("export-zero-samples", "export {W}/q.pt --out {W}/new/m.onnx --samples 0",
     r"--samples must be at least 1, got 0"),
    ("export-zero-batch", "export {W}/q.pt --out {W}/new/m.onnx --batch-size 0",
     r"--batch-size must be at least 1, got 0"),
    ("export-negative-frac-bits", "export {W}/q.pt --out {W}/new/m.onnx --form fixed "
     "--frac-bits -1 --exporter torchscript", r"frac_bits must be in 0\.\.20, got -1"),
    ("export-too-many-frac-bits", "export {W}/q.pt --out {W}/new/m.onnx --form fixed "
     "--frac-bits 40 --exporter torchscript", r"frac_bits must be in 0\.\.20, got 40"),
    ("export-negative-acc-drop", "export {W}/q.pt --out {W}/new/m.onnx --form fixed "
     "--max-acc-drop -1", r"--max-acc-drop must be >= 0 points, got -1"),
    ("export-frac-bits-on-compact", "export {W}/q.pt --out {W}/new/m.onnx --frac-bits 4",
     r"--frac-bits / --max-acc-drop apply to --form fixed or planes only"),
    ("export-fixed-without-frac-bits", "export {W}/q.pt --out {W}/new/m.onnx --form fixed "
     "--exporter torchscript", r"form='fixed' needs frac_bits"),
    ("verify-negative-tolerance", "verify {W}/m.onnx {W}/q.pt --tolerance -1",
     r"--tolerance must be in \[0, inf\], got -1"),
    ("verify-agreement-above-1", "verify {W}/m.onnx {W}/q.pt --min-agreement 2",
     r"--min-agreement must be in \[0, 1\], got 2"),
    ("verify-nan-tolerance", "verify {W}/m.onnx {W}/q.pt --tolerance nan",
     r"--tolerance must be in \[0, inf\], got nan"),
    ("verify-zero-samples", "verify {W}/m.onnx {W}/q.pt --samples 0",
     r"--samples must be at least 1, got 0"),
    ("compare-zero-trials", "compare {W}/q.pt --methods none --stuck 0.1 --ber --sigmas "
     "--trials 0 --out {W}/new/cmp --no-progress", r"trials.*0"),
    ("compare-stuck-above-1", "compare {W}/q.pt --methods none --stuck 2 --ber --sigmas "
     "--out {W}/new/cmp --no-progress", r"faults scenario level must be .*\[0, 1\].* got 2"),
    ("compare-zero-calib-size", "compare {W}/q.pt --methods selftune --stuck 0.1 --ber "
     "--sigmas --trials 1 --calib-size 0 --out {W}/new/cmp --no-progress", r"calib.*0"),
    ("compare-no-scenario", "compare {W}/q.pt --methods none --stuck --ber --sigmas "
     "--out {W}/new/cmp --no-progress", r"scenario"),
    ("bitflips-eval-rate-above-1", "bitflips eval {W}/q.pt --rates 2 --out {W}/new/bf "
     "--no-progress", r"rate.*2"),
    ("bitflips-finetune-negative-rate", "bitflips finetune {W}/q.pt --rate -1 "
     "--out {W}/new/rbe.pt --no-progress", r"rate.*-1"),
    ("selftune-no-chip", "selftune {W}/q.pt", r"say which chip"),
    ("selftune-map-and-rate", "selftune {W}/q.pt --fault-map {W}/chip.pt --rate 0.1",
     r"give --fault-map or --rate, not both"),
    ("selftune-zero-calib-size", "selftune {W}/q.pt --rate 0.1 --calib-size 0",
     r"calib.*0|size.*0"),
    ("selftune-ber-above-1", "selftune {W}/q.pt --ber 2", r"rate.*2|ber.*2"),
    ("train-bits-9", "train --bits 9 --out {W}/new/run --no-progress", r"1\.\.8"),
    ("train-bits-0", "train --bits 0 --out {W}/new/run --no-progress", r"1\.\.8"),
    ("train-nan-lr", "train --float-lr nan --out {W}/new/run --no-progress",
     r"TrainConfig\.lr must be a finite number > 0, got nan"),
    ("train-zero-fp-epochs", "train --float-epochs 0 --out {W}/new/run --no-progress",
     r"epochs must be >= 1, got 0"),
    ("train-zero-batch-size", "train --batch-size 0 --out {W}/new/run --no-progress",
     r"batch_size must be >= 1"),
    ("train-negative-lambda", "train --lambda-start -1 --out {W}/new/run --no-progress",
     r"lambda_start .*-1"),
    ("train-negative-quant-lr", "train --quant-lr -1 --out {W}/new/run --no-progress",
     r"quant_lr .*-1"),
    ("train-negative-sam-rho", "train --sam-rho -1 --out {W}/new/run --no-progress",
     r"sam_rho.*-1"),
    ("train-no-bits", "train --bits --out {W}/new/run --no-progress", r"bits"),
]
for name, argv, pattern in ARGS:
    case(name, argv, 2, pattern)
if HAS_SNN:
    case("snn-train-zero-T", "snn train --T 0 --out {W}/new/run --no-progress", 2, r"T.*0")
    case("snn-train-bits-9", "snn train --bits 9 --out {W}/new/run --no-progress", 2, r"1\.\.8")
    case("snn-train-negative-tau", "snn train --tau -1 --out {W}/new/run --no-progress", 2,
         r"tau.*-1")

# argparse refuses these itself (usage line + error line, exit 2).
USAGE = [
    ("faults-sample-rate-not-a-number", "faults sample {W}/q.pt --rate lots", r"--rate.*'lots'"),
    ("export-unknown-form", "export {W}/q.pt --form banana --out {W}/new/m.onnx",
     r"--form.*'banana'"),
    ("train-unknown-variant", "train --variants banana", r"--variants.*'banana'"),
    ("faults-finetune-map-and-rate", "faults finetune {W}/q.pt --fault-map {W}/chip.pt --rate 0.1",
     r"--rate.*not allowed with argument --fault-map"),
]
for name, argv, pattern in USAGE:
    case(name, argv, 2, pattern)

# Outputs: never an input, never an existing file without --force, never half written.
FILE_OUTPUTS = {
    "faults-sample": "faults sample {W}/q.pt --rate 0.1 --out {out}",
    "variability-sample": "variability sample {W}/q.pt --sigma 0.1 --out {out}",
    "faults-finetune": "faults finetune {W}/q.pt --fault-map {W}/chip.pt --epochs 1 --out {out} "
                       "--no-progress",
    "variability-finetune": "variability finetune {W}/q.pt --variability-map {W}/var.pt --epochs 1 "
                            "--out {out} --no-progress",
    "bitflips-finetune": "bitflips finetune {W}/q.pt --rate 0.01 --epochs 1 --out {out} "
                         "--no-progress",
    "export": "export {W}/q.pt --out {out} --exporter torchscript --samples 4",
}
for cmd, argv in FILE_OUTPUTS.items():
    case(f"{cmd}-out-is-the-checkpoint", argv.replace("{out}", "{W}/q.pt") + " --force", 3,
         r"output .*q\.pt is the input .*q\.pt")
    case(f"{cmd}-out-is-a-link-to-the-checkpoint",
         argv.replace("{out}", "{W}/link.pt") + " --force", 3, r"link\.pt is the input")
    case(f"{cmd}-out-exists", argv.replace("{out}", "{W}/existing.pt"), 3,
         r"existing\.pt exists; pass --force")
    case(f"{cmd}-out-is-a-folder", argv.replace("{out}", "{W}/res") + " --force", 3,
         r"res is a folder; give a file name")
    case(f"{cmd}-out-under-a-file", argv.replace("{out}", "{W}/afile/x.pt"), 3,
         r"afile/x\.pt: .*afile is not a folder")
for cmd in ("faults-finetune", "variability-finetune"):
    mp = "chip.pt" if cmd.startswith("faults") else "var.pt"
    case(f"{cmd}-out-is-the-map", FILE_OUTPUTS[cmd].replace("{out}", "{W}/" + mp) + " --force",
         3, rf"{re.escape(mp)} is the input")
case("export-out-is-the-data-file", "export {W}/q_idx.pt --dataset idx --data-dir {W}/idx_ok "
     "--out {W}/idx_ok --force", 3, r"idx_ok is the input")

RESULT_OUTPUTS = {
    "faults-eval": ("faults eval {W}/q.pt --rates 0 --trials 1 --out {out} --no-progress",
                    "faults_eval.json"),
    "faults-compare": ("faults compare {W}/q.pt --rates 0 --trials 1 --methods none --out {out} "
                       "--no-progress", "faults_compare.json"),
    "variability-eval": ("variability eval {W}/q.pt --sigmas 0 --trials 1 --out {out} "
                         "--no-progress", "variability_eval.json"),
    "variability-compare": ("variability compare {W}/q.pt --sigmas 0 --trials 1 --methods none "
                            "--out {out} --no-progress", "variability_compare.json"),
    "bitflips-eval": ("bitflips eval {W}/q.pt --rates 0 --trials 1 --out {out} --no-progress",
                      "bitflips_eval.json"),
    "compare": ("compare {W}/q.pt --methods none --stuck 0.1 --ber --sigmas --trials 1 "
                "--out {out} --no-progress", "compare.json"),
}
for cmd, (argv, existing) in RESULT_OUTPUTS.items():
    case(f"{cmd}-results-exist", argv.replace("{out}", "{W}/res"), 3,
         rf"res/{re.escape(existing)} exists; pass --force")
    case(f"{cmd}-out-is-a-file", argv.replace("{out}", "{W}/afile"), 3,
         r"afile exists and is not a folder")

RUN_OUTPUTS = {
    "train": "train --float-epochs 1 --qat-epochs 1 --bits 4 --variants nmult --out {out} "
             "--no-progress",
    "demo": "demo --float-epochs 1 --qat-epochs 1 --bits 4 --variants nmult --out {out} "
            "--no-progress",
}
if HAS_SNN:
    RUN_OUTPUTS["snn-train"] = "snn train --float-epochs 1 --qat-epochs 1 --out {out} --no-progress"
for cmd, argv in RUN_OUTPUTS.items():
    case(f"{cmd}-run-folder-exists", argv.replace("{out}", "{W}/run"), 3,
         r"folder .*run exists; pass --force")
    case(f"{cmd}-force-on-a-folder-with-other-files", argv.replace("{out}", "{W}/mixed")
         + " --force", 3, r"mixed is not replaced: .*my_notes\.txt")
    case(f"{cmd}-out-is-a-file", argv.replace("{out}", "{W}/afile"), 3,
         r"afile exists and is not a folder")
    case(f"{cmd}-out-holds-the-data", argv.replace("{out}", "{W}") + " --dataset idx "
         "--data-dir {W}/idx_ok --force", 3, r"would be replaced as a whole, but it holds the "
         r"input .*idx_ok")
case("crossbar-folder-exists", "crossbar {W}/q.pt --out {W}/xb", 3, r"xb exists; pass --force")
case("crossbar-force-on-foreign-files", "crossbar {W}/q.pt --out {W}/xb_mixed --force", 3,
     r"xb_mixed is not replaced: .*photo\.jpg")
case("crossbar-out-holds-the-checkpoint", "crossbar {W}/q.pt --out {W} --force", 3,
     r"holds the input .*q\.pt")
case("crossbar-out-is-a-file", "crossbar {W}/q.pt --out {W}/afile", 3,
     r"afile exists and is not a folder")


@pytest.mark.parametrize("argv,code,patterns", CASES)
def test_bad_input(world, argv, code, patterns, capsys):
    args = [a.replace("{W}", str(world.root)) for a in argv.split()]
    before = world.snapshot()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert "Traceback" not in err
    assert lines, "no error message"
    last = lines[-1]
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    for p in patterns:
        assert re.search(p, last), f"{p!r} not in: {last}"
    assert not world.marker.exists(), "a crafted file ran its payload"
    assert world.snapshot() == before, "a file was changed, added or removed"


def test_the_suite_is_large_enough():
    assert len(CASES) >= 120
