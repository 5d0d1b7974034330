"""Budgets before work (issue 22): every reader of a file checks the sizes its headers and
metadata imply against its bytes and against caps before it allocates, inflates or walks.

Each hostile case runs ``qfv`` in a child with an address-space cap and a deadline (the
harness of ``conftest.py``) on one bomb in a folder of its own, and asserts: exit 2, one error
line naming the file and what is wrong, no file of the folder changed, added or removed, a
peak memory growth under 200 MB + 20x the bomb's size, and an end within a short deadline.
The bombs (``_bombs.py``) are zip bombs (deflated entries, overlapping stored entries), size
lies (zip directories, pickled storages and views, IDX headers, gzip streams, ONNX metadata),
pickle "billion laughs", cycles and deep nesting, torch's legacy format, and checkpoint
settings that size a model (classes, input shape, architecture, bits, time steps). The
``test_*_is_real`` tests show, without setting one off, what each bomb would cost the plain
way (torch.load, gzip, json.loads, building the model): declared sizes, counted.
"""
from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import math
import pickle
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.chip.faults import FaultModel, sample_fault_map
from qfv_brevitas.chip.variability import VariabilityModel, sample_variability_map
from qfv_brevitas.cli.app import main
from qfv_brevitas.util.budgets import MAX_DEFLATE_RATIO, MAX_JSON_BYTES
from qfv_brevitas.util.safeio import content_digest
from qfv_brevitas.zoo.checkpoint import save_checkpoint
from qfv_brevitas.zoo.data import IDX_FILES
from qfv_brevitas.zoo.models import MLP, build_model
from tests.hostile import _bombs as B

HAS_SNN = importlib.util.find_spec("spikingjelly") is not None
SHAPE = (1, 8, 8)
#: the deadline of one case, seconds (a bomb that went off would hang or be killed)
TIMEOUT = 45


def _bound(*files: Path) -> int:
    """The memory a case may grow by: 200 MB + 20x its hostile inputs."""
    return 200_000_000 + 20 * sum(f.stat().st_size for f in files)


# -- the good files every bomb is made from ---------------------------------------------------

def _idx_files(folder: Path, n_train: int = 40, n_test: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name, n in zip(IDX_FILES, (n_train, n_train, n_test, n_test)):
        if "images" in name:
            data = B.idx_header((n, 8, 8)) + torch.randint(0, 256, (n * 64,), generator=g,
                                                           dtype=torch.uint8).numpy().tobytes()
        else:
            data = B.idx_header((n,)) + bytes(i % 10 for i in range(n))
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    cfg = NMultConfig(weight_bits=4, act_bits=4)
    fp = MLP(64, 10)
    q = quantize_model(copy.deepcopy(fp), cfg, torch.rand(16, *SHAPE)).eval()
    save_checkpoint(root / "q.pt", q, "mlp", SHAPE, 10, cfg, dataset="digits", data_seed=0)
    save_checkpoint(root / "q_idx.pt", q, "mlp", SHAPE, 10, cfg, dataset="idx", data_seed=0)
    sample_fault_map(q, FaultModel(rate=0.1, seed=1)).save(root / "chip.pt")
    sample_variability_map(q, VariabilityModel(sigma=0.1, seed=1)).save(root / "var.pt")
    assert main(["export", str(root / "q.pt"), "--out", str(root / "m.onnx"), "--exporter",
                 "torchscript", "--samples", "4"]) == 0
    if HAS_SNN:
        import qfv_brevitas.snn  # noqa: F401  (registers the spiking models)

        snn = build_model("spiking_mlp", SHAPE, 10, snn={"T": 4})
        save_checkpoint(root / "snn.pt", snn, "spiking_mlp", SHAPE, 10, None,
                        snn={"T": 4, "encoding": "rate"})
    _idx_files(root / "idx")
    return SimpleNamespace(root=root, payload=torch.load(root / "q.pt", weights_only=True))


def _folder(tmp_path: Path, good, *companions: str) -> Path:
    """A folder of the case's own with copies of the good files it needs beside the bomb."""
    folder = tmp_path / "case"
    folder.mkdir()
    for name in companions:
        src = good.root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, folder / name)
    return folder


def _run_case(run_qfv, refused, snapshot, folder: Path, argv: str, bombs, *mentions: str):
    before = snapshot(folder)
    run = run_qfv(argv.format(W=folder).split(), folder, timeout=TIMEOUT)
    line = refused(run, 2, *mentions)
    assert snapshot(folder) == before, "a file of the folder changed"
    assert run.peak_bytes < _bound(*bombs), f"{run.peak_bytes} bytes: {line}"
    return run


# -- bombs in torch files (checkpoints and maps) ---------------------------------------------------

def _save(payload: dict, path: Path) -> Path:
    torch.save(payload, path)
    return path


def _with_meta(good, path: Path, **meta) -> Path:
    payload = copy.copy(good.payload)
    payload["meta"] = dict(payload["meta"], **meta)
    return _save(payload, path)


def _stored_copy(src: Path, dst: Path) -> None:
    B.rezip(src, dst, zipfile.ZIP_STORED)


def _size_lie(src: Path, dst: Path) -> None:
    """A stored zip whose directory declares 1 GB more for data.pkl than it stores."""
    _stored_copy(src, dst)
    raw = bytearray(dst.read_bytes())
    at = raw.find(b"PK\x01\x02")
    while not raw[at + 46:at + 46 + int.from_bytes(raw[at + 28:at + 30], "little")
                  ].endswith(b"data.pkl"):
        at = raw.find(b"PK\x01\x02", at + 4)
    size = int.from_bytes(raw[at + 24:at + 28], "little")
    raw[at + 24:at + 28] = (size + 10 ** 9).to_bytes(4, "little")
    dst.write_bytes(bytes(raw))


def _prepended(src: Path, dst: Path) -> None:
    tmp = dst.with_suffix(".tmp")
    _stored_copy(src, tmp)
    dst.write_bytes(b"PK\x03\x04" + bytes(96) + tmp.read_bytes())
    tmp.unlink()


def _commented(src: Path, dst: Path) -> None:
    _stored_copy(src, dst)
    with zipfile.ZipFile(dst, "a") as z:
        z.comment = b"a comment torch.save never writes"


def _big_pickle(good, dst: Path) -> None:
    _with_meta(good, dst, junk=[{} for _ in range(600_000)])


def _deep(good, dst: Path) -> None:
    tmp = _with_meta(good, dst.with_suffix(".tmp"), deep="DEEP_PLACEHOLDER")
    B.patch_pickle(tmp, dst, "DEEP_PLACEHOLDER", B.nested_lists(200_000))
    tmp.unlink()


def _cycle(good, dst: Path) -> None:
    loop: list = []
    loop.append(loop)
    _with_meta(good, dst, loop=loop)


def _stride0(good, dst: Path) -> None:
    payload = copy.copy(good.payload)
    payload["state_dict"] = dict(payload["state_dict"],
                                 huge=torch.zeros(1).expand(10 ** 11))
    _save(payload, dst)


def _numel_lie(good, dst: Path) -> None:
    B.torch_zip(dst, {"format": "qfv-brevitas/2",
                      "w": B.TensorRef(B.Storage("0", 10 ** 9), [16], [1])}, {"0": bytes(16)})


#: name -> (build(good, path, source), words the error line must hold)
TORCH_BOMBS = {
    "deflated": (lambda g, p, s: B.rezip(s, p), ("is compressed",)),
    "deflate-200MB": (lambda g, p, s: B.deflate_bomb(p, g.payload, 200 << 20),
                      ("is compressed",)),
    "overlapping-entries": (lambda g, p, s: B.overlapping_zip(p, 64 << 10, 300),
                            ("overlap",)),
    "size-lie": (lambda g, p, s: _size_lie(s, p), ("declares",)),
    "data-before-archive": (lambda g, p, s: _prepended(s, p), ("central directory",)),
    "data-after-archive": (lambda g, p, s: p.write_bytes(s.read_bytes() + bytes(1 << 20)),
                           ("not a readable",)),
    "zip-comment": (lambda g, p, s: _commented(s, p), ("comment",)),
    "big-pickle": (lambda g, p, s: _big_pickle(g, p), ("data.pkl",)),
    "billion-laughs": (lambda g, p, s: _with_meta(g, p, laughs=B.laughs(64)),
                       ("referenced over and over",)),
    "cycle": (lambda g, p, s: _cycle(g, p), ("holds itself",)),
    "200000-nested-lists": (lambda g, p, s: _deep(g, p), ("nests deeper",)),
    "stride-0-view": (lambda g, p, s: _stride0(g, p), ("tensors stand for",)),
    "2000-bit-integer": (lambda g, p, s: _with_meta(g, p, n=2 ** 2000), ("integer of 2001",)),
    "legacy-format": (lambda g, p, s: B.legacy_file(p, 2 ** 50), ("torch < 1.6",)),
    "storage-numel-lie": (lambda g, p, s: _numel_lie(g, p), ("not a readable",)),
}

#: every command that reads a checkpoint, the checkpoint as {f}
CKPT_COMMANDS = [
    "report {f}",
    "quantize {f} --bits 3 --no-eval --no-plot --out {W}/new/q.pt",
    "faults sample {f} --rate 0.1 --out {W}/new/map.pt",
    "faults eval {f} --rates 0 --trials 1 --out {W}/new/ev --no-progress",
    "faults finetune {f} --rate 0.1 --epochs 1 --out {W}/new/ft.pt --no-progress",
    "variability eval {f} --sigmas 0 --trials 1 --out {W}/new/ev --no-progress",
    "export {f} --out {W}/new/m.onnx --exporter torchscript --samples 4",
    "crossbar {f} --out {W}/new/xb",
    "verify {W}/m.onnx {f} --samples 4",
    "bitflips eval {f} --rates 0 --trials 1 --out {W}/new/bf --no-progress",
    "selftune {f} --rate 0.1 --calib-size 8",
    "compare {f} --methods none --stuck 0.1 --ber --sigmas --trials 1 --out {W}/new/cmp "
    "--no-progress",
] + (["snn neurons {f}"] if HAS_SNN else [])

def _ckpt_cases():
    """Each bomb through three commands, the commands taken in turn: every command meets
    several bombs."""
    cases = []
    for i, bomb in enumerate(TORCH_BOMBS):
        for j in range(3):
            command = CKPT_COMMANDS[(3 * i + j) % len(CKPT_COMMANDS)]
            cases.append(pytest.param(bomb, command, id=f"{bomb}-{command.split(' {')[0]}"))
    return cases


CKPT_CASES = _ckpt_cases()


@pytest.mark.parametrize("bomb, command", CKPT_CASES)
def test_checkpoint_bombs_are_refused_before_work(bomb, command, good, tmp_path, run_qfv,
                                                   refused, snapshot):
    folder = _folder(tmp_path, good, "m.onnx")
    path = folder / "bomb.pt"
    build, words = TORCH_BOMBS[bomb]
    build(good, path, good.root / "q.pt")
    _run_case(run_qfv, refused, snapshot, folder, command.replace("{f}", str(path)), [path],
              "bomb.pt", *words)


#: where a map file goes: (argv with the map as {f}, the map it takes)
MAP_SLOTS = {
    "faults-finetune": ("faults finetune {W}/q.pt --fault-map {f} --epochs 1 --out {W}/new/ft.pt "
                        "--no-progress", "chip.pt"),
    "selftune-fault-map": ("selftune {W}/q.pt --fault-map {f} --calib-size 8", "chip.pt"),
    "selftune-var-map": ("selftune {W}/q.pt --variability-map {f} --calib-size 8", "var.pt"),
}
MAP_BOMBS = ["deflated", "deflate-200MB", "billion-laughs", "stride-0-view", "legacy-format"]


def _map_bomb(good, bomb: str, path: Path, source: Path) -> None:
    """The map ``source`` made into ``bomb`` (the map's own payload where the bomb edits one)."""
    payload = torch.load(source, weights_only=True)
    if bomb == "deflate-200MB":
        B.deflate_bomb(path, payload, 200 << 20)
    elif bomb == "billion-laughs":
        _save(dict(payload, laughs=B.laughs(64)), path)
    elif bomb == "stride-0-view":
        _save(dict(payload, huge=torch.zeros(1).expand(10 ** 11)), path)
    else:
        TORCH_BOMBS[bomb][0](good, path, source)


@pytest.mark.parametrize("slot", MAP_SLOTS)
@pytest.mark.parametrize("bomb", MAP_BOMBS)
def test_map_bombs_are_refused_before_work(slot, bomb, good, tmp_path, run_qfv, refused,
                                           snapshot):
    argv, source = MAP_SLOTS[slot]
    folder = _folder(tmp_path, good, "q.pt")
    path = folder / "bomb.pt"
    _map_bomb(good, bomb, path, good.root / source)
    _run_case(run_qfv, refused, snapshot, folder, argv.replace("{f}", str(path)), [path],
              "bomb.pt", *TORCH_BOMBS[bomb][1])


# -- checkpoint settings that size the work ----------------------------------------------------

def _setting(edit):
    return lambda good, path: B.reseal(good.root / "q.pt", path, edit)


SETTINGS = {
    "1e8-classes": (_setting(lambda c: c.update(num_classes=10 ** 8)), ("does not fit",
                                                                           "100000000 classes")),
    "mlp-on-2000x2000-inputs": (_setting(lambda c: c.update(input_shape=[1, 2000, 2000])),
                                ("does not fit", "net.1.weight")),
    "input-100000x100000": (_setting(lambda c: c.update(input_shape=[1, 10 ** 5, 10 ** 5])),
                            ("input_shape",)),
    "input-9-dimensions": (_setting(lambda c: c.update(input_shape=[1] * 9)), ("input_shape",)),
    "arch-resnet18": (_setting(lambda c: c.update(arch="resnet18", unsigned_inputs=[])),
                      ("does not fit", "holds")),
    "arch-resnet18-unsigned-mlp-layers": (_setting(lambda c: c.update(arch="resnet18")),
                                          ("does not fit", "unsigned_inputs")),
    "per-channel-8-bits": (_setting(lambda c: c["config"].update(weight_bits=8,
                                                                   per_channel=True)),
                           ("does not fit", "weight_quant")),
    "data-seed-1e40": (_setting(lambda c: c["meta"].update(data_seed=10 ** 40)),
                       ("data_seed",)),
}
if HAS_SNN:
    SETTINGS["snn-1e9-time-steps"] = (
        lambda good, path: B.reseal(good.root / "snn.pt", path,
                                    lambda c: c["meta"]["snn"].update(T=10 ** 9)),
        ("T=1000000000",))
SETTING_COMMANDS = ["report {f}", "faults eval {f} --rates 0 --trials 1 --out {W}/new/ev "
                    "--no-progress", "export {f} --out {W}/new/m.onnx --samples 4",
                    "snn neurons {f}"]


@pytest.mark.parametrize("command", [0, 1], ids=["first", "second"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_settings_that_size_the_work_are_checked_first(setting, command, good, tmp_path,
                                                       run_qfv, refused, snapshot):
    folder = _folder(tmp_path, good)
    path = folder / "bomb.pt"
    build, words = SETTINGS[setting]
    build(good, path)
    commands = SETTING_COMMANDS[2:] if setting.startswith("snn") else SETTING_COMMANDS[:2]
    _run_case(run_qfv, refused, snapshot, folder, commands[command].replace("{f}", str(path)),
              [path], "bomb.pt", *words)


# -- IDX files -----------------------------------------------------------------------------

def _idx_bomb(folder: Path, which: str, bomb: str) -> Path:
    """The data folder's file ``which`` (0..3: train images, labels, test images, labels)
    replaced by ``bomb``."""
    path = folder / "idx" / f"{IDX_FILES[which]}.gz"
    if bomb == "gz-header-lies":
        dims = (60000, 28, 28) if which % 2 == 0 else (10 ** 9,)
        path.write_bytes(gzip.compress(B.idx_header(dims) + bytes(10)))
    elif bomb == "gz-over-the-cap":
        path.write_bytes(gzip.compress(B.idx_header((2 ** 16, 2 ** 16, 2 ** 8))))
    elif bomb == "gz-64MB-of-trailing-zeros":
        n = 40 if which < 2 else 20
        head = B.idx_header((n, 8, 8)) + bytes(n * 64) if which % 2 == 0 else \
            B.idx_header((n,)) + bytes(n)
        B.gz_with_zeros(path, head, 64 << 20)
    elif bomb == "plain-header-lies":
        path.unlink()
        path = path.with_suffix("")
        path.write_bytes(B.idx_header((10 ** 4, 10 ** 4, 10)) + bytes(100))
    return path


IDX_BOMBS = {"gz-header-lies": "compressed bytes can hold", "gz-over-the-cap": "too large",
             "gz-64MB-of-trailing-zeros": "payload is more than",
             "plain-header-lies": "payload is 100 bytes but"}
IDX_COMMANDS = [
    "train --dataset idx --data-dir {W}/idx --float-epochs 1 --qat-epochs 1 --out {W}/new/run "
    "--no-progress",
    "demo --dataset idx --data-dir {W}/idx --float-epochs 1 --qat-epochs 1 --out {W}/new/run "
    "--no-progress",
    "faults eval {W}/q_idx.pt --dataset idx --data-dir {W}/idx --rates 0 --trials 1 "
    "--out {W}/new/ev --no-progress",
] + (["snn train --dataset idx --data-dir {W}/idx --float-epochs 1 --qat-epochs 1 "
      "--out {W}/new/run --no-progress"] if HAS_SNN else [])


@pytest.mark.parametrize("command", range(len(IDX_COMMANDS)),
                         ids=[c.split(" --")[0].split(" {")[0] for c in IDX_COMMANDS])
@pytest.mark.parametrize("bomb", IDX_BOMBS)
def test_idx_headers_are_checked_before_the_payload(bomb, command, good, tmp_path, run_qfv,
                                                    refused, snapshot):
    folder = _folder(tmp_path, good, "idx", "q_idx.pt")
    which = [0, 1, 2, 3][(command + len(bomb)) % 4]  # images and labels, train and test
    if bomb == "plain-header-lies":
        which = 0 if command % 2 == 0 else 2
    path = _idx_bomb(folder, which, bomb)
    _run_case(run_qfv, refused, snapshot, folder, IDX_COMMANDS[command], [path], path.name,
              IDX_BOMBS[bomb])


# -- ONNX metadata -------------------------------------------------------------------------

def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


META_BOMBS = {
    "1MB-of-brackets": (lambda info: None, "[" * 500_000 + "]" * 500_000, "nested 500000"),
    "deep-extra": (lambda info: info.update(extra={"x": json.loads(_nested(120))}), None,
                   "nested 122 levels"),
    "17MB-of-metadata": (lambda info: info.update(extra={"x": "x" * (17 << 20)}), None,
                         "characters of JSON"),
    "input-shape-1e6x1e6": (lambda info: info.update(input_shape=[10 ** 6, 10 ** 6]), None,
                            "input_shape"),
    "weight-shape-1e6x1e6": (lambda info: info["layers"][0].update(weight_shape=[10 ** 6] * 2),
                             None, "weight_shape"),
}
META_COMMANDS = ["inspect {f}", "inspect {f} --json", "verify {f} {W}/q.pt --samples 4"]


@pytest.mark.parametrize("command", META_COMMANDS, ids=["inspect", "inspect-json", "verify"])
@pytest.mark.parametrize("bomb", META_BOMBS)
def test_onnx_metadata_is_bounded_before_it_is_parsed(bomb, command, good, tmp_path, run_qfv,
                                                      refused, snapshot):
    folder = _folder(tmp_path, good, "q.pt")
    path = folder / "bomb.onnx"
    edit, text, words = META_BOMBS[bomb]
    B.edit_metadata(good.root / "m.onnx", path, text if text is not None else edit)
    _run_case(run_qfv, refused, snapshot, folder, command.replace("{f}", str(path)), [path],
              "bomb.onnx", words)


# -- the bombs are real: what the plain way would cost, counted without paying it ----------------

def test_zip_bombs_are_real(good, tmp_path):
    """Deflated and overlapping entries declare far more than their files: torch would
    allocate every record it reads (shown on a small overlap: torch.load really returns
    k times the file's bytes)."""
    deflated = tmp_path / "d.pt"
    declared = B.deflate_bomb(deflated, good.payload, 200 << 20)
    assert declared > 800 * deflated.stat().st_size  # zlib's ~1000x, deflate's limit 1032x
    big = tmp_path / "o.pt"
    assert B.overlapping_zip(big, 64 << 10, 300) > 100 * big.stat().st_size
    small = tmp_path / "small.pt"
    declared = B.overlapping_zip(small, 8 << 10, 20)
    loaded = torch.load(small, weights_only=True)  # the plain way: no check of the layout
    assert sum(t.numel() for t in loaded) == declared > 10 * small.stat().st_size


def test_pickle_and_tensor_bombs_are_real(good, tmp_path):
    """Loaded the plain way, each is cheap to unpickle and ruinous to walk: 2**64 values,
    a recursion deeper than Python's limit, a 400 GB view of one float, a header that makes
    torch allocate 4 PB."""
    laughs = _with_meta(good, tmp_path / "l.pt", laughs=B.laughs(64))
    meta = torch.load(laughs, weights_only=True)["meta"]
    assert laughs.stat().st_size < 100_000 and B.tree_size(meta) > 2 ** 64
    deep = tmp_path / "deep.pt"
    _deep(good, deep)
    with pytest.raises(RecursionError):
        content_digest(torch.load(deep, weights_only=True))
    view = tmp_path / "v.pt"
    _stride0(good, view)
    assert B.declared_tensor_bytes(torch.load(view, weights_only=True)) >= 4 * 10 ** 11
    legacy = tmp_path / "legacy.pt"
    B.legacy_file(legacy, 2 ** 50)
    with pytest.raises(RuntimeError, match=f"allocate {4 * 2 ** 50} bytes"):
        torch.load(legacy, weights_only=True)


def test_a_big_pickle_costs_many_times_its_bytes():
    """Unpickling empty dicts written one opcode byte each costs ~70 bytes of memory per byte
    of pickle (~14 as torch.save memoizes them), so the pickle is capped before it is
    unpickled."""
    import tracemalloc

    n = 50_000
    for pkl, ratio in ((b"\x80\x02](" + b"}" * n + b"e.", 50),
                       (pickle.dumps([{} for _ in range(n)], protocol=2), 10)):
        tracemalloc.start()
        assert len(pickle.loads(pkl)) == n
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak > ratio * len(pkl)


def test_settings_bombs_are_real(good):
    """The models the edited settings describe, counted on the meta device: gigabytes from a
    checkpoint of tens of kilobytes."""
    size = (good.root / "q.pt").stat().st_size
    with torch.device("meta"):
        huge = build_model("mlp", SHAPE, 10 ** 8)
        wide = build_model("mlp", (1, 2000, 2000), 10)
    for model in (huge, wide):
        assert 4 * sum(p.numel() for p in model.parameters()) > 10_000 * size


def test_idx_and_json_bombs_are_real(good, tmp_path):
    """A gzip header that claims more than deflate can hold, 64 MB behind an honest header
    (what the old reader inflated before it looked), and JSON that json.loads cannot nest."""
    lie = tmp_path / "lie.gz"
    lie.write_bytes(gzip.compress(B.idx_header((60000, 28, 28)) + bytes(10)))
    assert 60000 * 28 * 28 > MAX_DEFLATE_RATIO * lie.stat().st_size
    zeros = tmp_path / "zeros.gz"
    B.gz_with_zeros(zeros, B.idx_header((40, 8, 8)) + bytes(2560), 64 << 20)
    assert B.inflated_size(zeros) > 64 << 20 > 500 * zeros.stat().st_size
    with pytest.raises(RecursionError):
        json.loads("[" * 500_000 + "]" * 500_000)
    assert 17 << 20 > MAX_JSON_BYTES
    assert 4 * math.prod([10 ** 6, 10 ** 6]) > 10 ** 12  # the input verify would allocate
