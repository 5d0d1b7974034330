"""Tests of ``qfv_brevitas.util.budgets`` (zip layouts, .npy/.npz headers, walks of loaded
objects, JSON depth, capped reads) and of the budgets of ``util.safeio.torch_load``, the one
reader of checkpoints and maps: each check at its boundary (one byte, value or level under the
budget passes, one over is refused with the file named)."""
from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

from qfv_brevitas.util import budgets, safeio
from qfv_brevitas.util.budgets import (BudgetError, TreeBudget, ZipProblem, check_npy, check_npz,
                                       check_tree, json_depth, loads_json, read_exactly,
                                       zip_layout)
from qfv_brevitas.util.safeio import LoadError, torch_load


def _zip(path, entries, compress=zipfile.ZIP_STORED, comment=b""):
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, data in entries.items():
            z.writestr(name, data)
        z.comment = comment
    return path


def _torch_file(path, obj=None):
    torch.save({"w": torch.arange(6.0), "meta": {"a": [1, 2]}} if obj is None else obj, path)
    return path


# -- zip layouts ------------------------------------------------------------------------------

def test_a_torch_file_has_the_layout_torch_save_writes(tmp_path):
    path = _torch_file(tmp_path / "a.pt")
    infos = zip_layout(path, "a.pt", stored_only=True, max_total=path.stat().st_size)
    assert {i.filename.split("/", 1)[1] for i in infos} >= {"data.pkl", "data/0", "byteorder"}
    total = sum(i.file_size for i in infos)
    zip_layout(path, "a.pt", stored_only=True, max_total=total)  # exactly the total: fine
    with pytest.raises(ZipProblem, match=rf"a\.pt: its zip entries declare {total} bytes, "
                                         rf"more than the {total - 1}"):
        zip_layout(path, "a.pt", stored_only=True, max_total=total - 1)


def test_compressed_entries_are_refused_in_torch_files_and_bounded_elsewhere(tmp_path):
    path = _zip(tmp_path / "d.zip", {"x": bytes(100_000)}, zipfile.ZIP_DEFLATED)
    with pytest.raises(ZipProblem, match=r"d\.zip: zip entry 'x' is compressed") as e:
        zip_layout(path, "d.zip", stored_only=True, max_total=10 ** 9)
    assert not e.value.damaged
    # Deflate can hold this: read elsewhere, up to the caller's cap.
    zip_layout(path, "d.zip", stored_only=False, max_total=100_000)
    with pytest.raises(ZipProblem, match="declare 100000 bytes, more than the 99999"):
        zip_layout(path, "d.zip", stored_only=False, max_total=99_999)


def _patch_central(path, name: bytes, field: int, value: int) -> None:
    """Set a 4-byte field of ``name``'s central-directory record (24: uncompressed size)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    while raw[at + 46:at + 46 + int.from_bytes(raw[at + 28:at + 30], "little")] != name:
        at = raw.find(b"PK\x01\x02", at + 4)
    raw[at + field:at + field + 4] = value.to_bytes(4, "little")
    path.write_bytes(bytes(raw))


def test_a_deflate_entry_may_declare_at_most_what_its_bytes_can_hold(tmp_path):
    path = _zip(tmp_path / "d.zip", {"x": bytes(1000)}, zipfile.ZIP_DEFLATED)
    compressed = zipfile.ZipFile(path).getinfo("x").compress_size
    limit = budgets.deflate_limit(compressed)
    assert limit == budgets.MAX_DEFLATE_RATIO * compressed + budgets.DEFLATE_SLACK
    _patch_central(path, b"x", 24, limit)
    zip_layout(path, "d.zip", stored_only=False, max_total=10 ** 9)
    _patch_central(path, b"x", 24, limit + 1)
    with pytest.raises(ZipProblem, match=rf"declares {limit + 1} bytes, more than its "
                                         rf"{compressed} compressed bytes can hold"):
        zip_layout(path, "d.zip", stored_only=False, max_total=10 ** 9)


def test_a_stored_entry_declares_what_it_stores(tmp_path):
    path = _zip(tmp_path / "s.zip", {"x": bytes(10)})
    _patch_central(path, b"x", 24, 11)
    with pytest.raises(ZipProblem, match="is stored but declares 11 bytes for 10 stored"):
        zip_layout(path, "s.zip", stored_only=False, max_total=10 ** 9)


def _overlap(path) -> None:
    """Entry 'a' whose stored data is entry 'b' (local header and data): both directory
    records are true to their local headers, and their bytes overlap."""
    inner = bytes(1000)
    local_b = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, len(inner),
                          len(inner), 1, 0) + b"b" + inner
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a", local_b)
    raw = path.read_bytes()
    cd = raw.index(b"PK\x01\x02")
    eocd = raw.index(b"PK\x05\x06")
    rec_a = raw[cd:eocd]
    rec_b = bytearray(rec_a[:46] + b"b")
    rec_b[28:30] = (1).to_bytes(2, "little")
    rec_b[20:28] = struct.pack("<II", len(inner), len(inner))
    rec_b[16:20] = (0).to_bytes(4, "little")
    rec_b[42:46] = (30 + 1).to_bytes(4, "little")  # inside 'a': its data starts at 31
    central = rec_a + bytes(rec_b)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 2, 2, len(central), cd, 0)
    path.write_bytes(raw[:cd] + central + end)


def test_overlapping_entries_are_refused(tmp_path):
    path = tmp_path / "o.zip"
    _overlap(path)
    assert [i.filename for i in zipfile.ZipFile(path).infolist()] == ["a", "b"]
    with pytest.raises(ZipProblem, match="two zip entries overlap"):
        zip_layout(path, "o.zip", stored_only=False, max_total=10 ** 9)


def test_torch_layout_refuses_what_two_readers_could_read_differently(tmp_path):
    good = _torch_file(tmp_path / "a.pt").read_bytes()
    plain = _zip(tmp_path / "plain.pt", {"archive/data.pkl": b"x"}).read_bytes()
    commented = _zip(tmp_path / "c.pt", {"archive/data.pkl": b"x"}, comment=b"hi").read_bytes()
    cases = {
        "comment": (commented, "has a comment", False),
        "appended": (good + b"junk", "4 bytes after the end of the zip archive", False),
        "not-a-zip": (b"PK\x03\x04" + bytes(1000), "no end-of-directory record", True),
        "prepended": (b"PK\x03\x04" + bytes(60) + plain,
                      "central directory is not where its end record says", False),
        "truncated": (good[:len(good) // 2], "no end-of-directory record", True),
        "tiny": (b"PK\x03\x04", "too short", True),
    }
    zip_layout(tmp_path / "plain.pt", "plain", stored_only=True, max_total=10)
    for name, (data, words, damaged) in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        with pytest.raises(ZipProblem, match=words) as e:
            zip_layout(path, name, stored_only=True, max_total=10 ** 9)
        assert e.value.damaged is damaged, name
    # Python's zip reader alone would accept the prepended copy (it shifts the offsets).
    assert zipfile.ZipFile(tmp_path / "prepended.pt").read("archive/data.pkl") == b"x"


def test_too_many_entries_and_duplicate_names_are_refused(tmp_path, monkeypatch):
    path = _zip(tmp_path / "n.zip", {f"e{i}": b"" for i in range(5)})
    monkeypatch.setattr(budgets, "MAX_ZIP_ENTRIES", 5)
    zip_layout(path, "n.zip", stored_only=False, max_total=0)
    monkeypatch.setattr(budgets, "MAX_ZIP_ENTRIES", 4)
    with pytest.raises(ZipProblem, match="5 zip entries, more than the 4"):
        zip_layout(path, "n.zip", stored_only=False, max_total=0)
    with zipfile.ZipFile(tmp_path / "dup.zip", "w") as z:
        with pytest.warns(UserWarning, match="Duplicate"):
            z.writestr("x", b"1")
            z.writestr("x", b"2")
    with pytest.raises(ZipProblem, match="same name"):
        zip_layout(tmp_path / "dup.zip", "dup.zip", stored_only=False, max_total=10)


# -- .npy / .npz ------------------------------------------------------------------------------

def test_npz_files_numpy_writes_pass_with_their_true_size(tmp_path):
    a, b = np.arange(1000, dtype=np.int64), np.ones((3, 4), np.float32)
    np.savez(tmp_path / "s.npz", a=a, b=b)
    np.savez_compressed(tmp_path / "c.npz", a=a, b=b)
    for name in ("s.npz", "c.npz"):
        assert check_npz(tmp_path / name, name) == a.nbytes + b.nbytes
    np.save(tmp_path / "x.npy", a)
    assert check_npy(tmp_path / "x.npy", "x.npy") == a.nbytes
    assert check_npy(tmp_path / "x.npy", "x.npy", max_bytes=a.nbytes) == a.nbytes
    with pytest.raises(BudgetError, match="an array of 8000 bytes, more than the 7999"):
        check_npy(tmp_path / "x.npy", "x.npy", max_bytes=a.nbytes - 1)


def _lying_npy(shape) -> bytes:
    """A .npy whose header declares ``shape`` (float64) but holds 8 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + bytes(8)


def test_an_array_header_must_agree_with_the_bytes_behind_it(tmp_path):
    (tmp_path / "lie.npy").write_bytes(_lying_npy((10 ** 12,)))
    with pytest.raises(BudgetError, match=r"lie\.npy: its array header declares shape "
                                          r"\(1000000000000,\) of float64 \(8000000000000 "
                                          r"bytes\) but 8 bytes follow it"):
        check_npy(tmp_path / "lie.npy", "lie.npy")
    (tmp_path / "ok.npy").write_bytes(_lying_npy((1,)))
    assert check_npy(tmp_path / "ok.npy", "ok.npy") == 8
    _zip(tmp_path / "lie.npz", {"frames.npy": _lying_npy((10 ** 9, 1000))},
         zipfile.ZIP_DEFLATED)
    with pytest.raises(QfvLike, match=r"lie\.npz \('frames\.npy'\): its array header"):
        check_npz(tmp_path / "lie.npz", "lie.npz", error=QfvLike)


class QfvLike(ValueError):
    """A caller's own error class, raised instead of BudgetError."""


def test_pickled_arrays_are_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BudgetError, match="holds Python objects"):
        check_npy(tmp_path / "o.npy", "o.npy")


# -- walks of loaded objects ------------------------------------------------------------------

def _laughs(levels: int) -> list:
    x: list = [0]
    for _ in range(levels):
        x = [x, x]
    return x


def test_the_walk_budget_counts_shared_references_each_time():
    obj = _laughs(10)  # 3 * 2**10 - 1 lists and leaves once expanded, 12 objects
    check_tree(obj, "f", TreeBudget(nodes=3 * 2 ** 10 - 1, tensor_bytes=0))
    with pytest.raises(BudgetError, match=r"f: refused: it holds more than 3070 values"):
        check_tree(obj, "f", TreeBudget(nodes=3 * 2 ** 10 - 2, tensor_bytes=0))


def test_the_walk_of_a_billion_laughs_stops_at_its_budget():
    import time

    t0 = time.perf_counter()
    with pytest.raises(BudgetError, match="referenced over and over"):
        check_tree(_laughs(90), "f", TreeBudget(nodes=100_000, tensor_bytes=0))
    assert time.perf_counter() - t0 < 5  # 2**90 values: only a budget ends it


def test_depth_cycles_and_big_integers():
    deep: list = []
    for _ in range(50):
        deep = [deep]  # 51 lists, each inside the one before
    check_tree(deep, "f", TreeBudget(nodes=100, tensor_bytes=0, depth=51))
    with pytest.raises(BudgetError, match="nests deeper than 50 levels"):
        check_tree(deep, "f", TreeBudget(nodes=100, tensor_bytes=0, depth=50))
    loop = {}
    loop["me"] = loop
    with pytest.raises(BudgetError, match="holds itself"):
        check_tree(loop, "f", TreeBudget(nodes=10 ** 6, tensor_bytes=0))
    check_tree({"n": 2 ** budgets.MAX_INT_BITS - 1}, "f", TreeBudget(10, 0))
    with pytest.raises(BudgetError, match=f"integer of {budgets.MAX_INT_BITS + 1} bits"):
        check_tree({"n": -2 ** budgets.MAX_INT_BITS}, "f", TreeBudget(10, 0))


def test_tensor_bytes_are_counted_as_dense_arrays():
    view = torch.zeros(1).expand(1000)  # 4 bytes of storage standing for 4000
    check_tree({"v": view}, "f", TreeBudget(nodes=10, tensor_bytes=4000))
    with pytest.raises(BudgetError, match="tensors stand for more than 3999 bytes"):
        check_tree({"v": view}, "f", TreeBudget(nodes=10, tensor_bytes=3999))
    t = torch.ones(10, dtype=torch.float64)
    with pytest.raises(BudgetError, match="more than 159 bytes"):  # one tensor, twice
        check_tree([t, t], "f", TreeBudget(nodes=10, tensor_bytes=159))


# -- JSON ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, depth", [
    ("1", 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('["[[[[", "]"]', 1),
    (r'["\"[[[", {}]', 2), ("[" * 3000 + "]" * 3000, 3000), ("[[][[]]]", 3)])
def test_json_depth_skips_strings_and_counts_levels(text, depth):
    assert json_depth(text) == depth


def test_json_depth_across_pieces():
    text = "[" * (3 << 20) + "]" * (3 << 20)  # longer than one 1 MB piece
    assert json_depth(text) == 3 << 20


def test_json_is_refused_by_size_and_depth_before_parsing():
    text = "[" * 500_000 + "]" * 500_000
    with pytest.raises(RecursionError):  # what json.loads does with it
        json.loads(text)
    with pytest.raises(BudgetError, match=r"m\.onnx key k: JSON nested 500000 levels deep, "
                                          r"more than the 100"):
        loads_json(text, "m.onnx key k")
    assert loads_json(json.dumps([[1]] * 3), "w", max_depth=2) == [[1]] * 3
    with pytest.raises(BudgetError, match="nested 2 levels deep, more than the 1"):
        loads_json("[[1]]", "w", max_depth=1)
    with pytest.raises(BudgetError, match="11 characters of JSON, more than the 10"):
        loads_json('"123456789"', "w", max_bytes=10)
    assert loads_json('"12345678"', "w", max_bytes=10) == "12345678"
    with pytest.raises(BudgetError, match=r"w: corrupt JSON"):
        loads_json("{", "w")


# -- capped reads ----------------------------------------------------------------------------

def test_read_exactly_reads_no_more_than_one_byte_past_its_count():
    src = io.BytesIO(bytes(range(10)) * 300_000)  # 3 MB: several pieces
    buf, got, more = read_exactly(src, 2_000_000)
    assert (got, more, src.tell()) == (2_000_000, True, 2_000_001)
    assert bytes(buf[:12]) == bytes(range(10)) + bytes(range(2))
    buf, got, more = read_exactly(io.BytesIO(bytes(5)), 5)
    assert (got, more) == (5, False)
    buf, got, more = read_exactly(io.BytesIO(bytes(5)), 8)
    assert (got, more) == (5, False)


# -- torch_load ------------------------------------------------------------------------------

def test_torch_load_reads_what_torch_save_writes(tmp_path):
    obj = torch_load(_torch_file(tmp_path / "a.pt"))
    assert torch.equal(obj["w"], torch.arange(6.0)) and obj["meta"] == {"a": [1, 2]}


def test_torch_load_refuses_a_compressed_checkpoint_before_torch_reads_it(tmp_path):
    src = _torch_file(tmp_path / "a.pt", {"w": torch.zeros(1 << 20)})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "d.pt", "w",
                                                      zipfile.ZIP_DEFLATED) as zout:
        for i in zin.infolist():
            zout.writestr(i.filename, zin.read(i))
    size = (tmp_path / "d.pt").stat().st_size
    assert size * 100 < 4 << 20  # 4 MB of zeros in a few KB: torch would inflate them
    assert torch.load(tmp_path / "d.pt", weights_only=True)["w"].numel() == 1 << 20
    with pytest.raises(LoadError) as e:
        torch_load(tmp_path / "d.pt")
    assert e.value.over_budget and not e.value.refused
    assert e.value.line.startswith(f"{tmp_path / 'd.pt'}: refused before loading: zip entry")


def test_torch_load_caps_the_pickle(tmp_path, monkeypatch):
    path = _torch_file(tmp_path / "p.pt", {"junk": [{} for _ in range(2000)]})
    with zipfile.ZipFile(path) as z:
        pkl = next(i.file_size for i in z.infolist() if i.filename.endswith("data.pkl"))
    size = path.stat().st_size
    monkeypatch.setattr(safeio, "PICKLE_FREE_BYTES", pkl - size // safeio.PICKLE_FILE_SHARE)
    assert len(torch_load(path)["junk"]) == 2000
    monkeypatch.setattr(safeio, "PICKLE_FREE_BYTES", pkl - 1 - size // safeio.PICKLE_FILE_SHARE)
    with pytest.raises(LoadError, match=rf"its pickle \(data\.pkl\) has {pkl} bytes, more "
                                        rf"than the {pkl - 1}") as e:
        torch_load(path)
    assert e.value.over_budget


def test_torch_load_walk_budget_follows_the_file(tmp_path, monkeypatch):
    path = _torch_file(tmp_path / "l.pt", {"x": _laughs(12)})
    with zipfile.ZipFile(path) as z:
        pkl = next(i.file_size for i in z.infolist() if i.filename.endswith("data.pkl"))
    nodes = 2 + 3 * 2 ** 12 - 1  # the dict, its key, the expanded lists and leaves
    monkeypatch.setattr(safeio, "TREE_FREE_NODES", nodes - safeio.NODES_PER_PICKLE_BYTE * pkl)
    torch_load(path)
    monkeypatch.setattr(safeio, "TREE_FREE_NODES",
                        nodes - 1 - safeio.NODES_PER_PICKLE_BYTE * pkl)
    with pytest.raises(LoadError, match=rf"l\.pt: refused: it holds more than {nodes - 1} "):
        torch_load(path)


def test_torch_load_tensor_budget_follows_the_file(tmp_path, monkeypatch):
    path = _torch_file(tmp_path / "v.pt", {"v": torch.zeros(1).expand(10 ** 6)})
    size = path.stat().st_size
    free = 4 * 10 ** 6 - safeio.TENSOR_BYTES_PER_FILE_BYTE * size
    monkeypatch.setattr(safeio, "TENSOR_FREE_BYTES", free)
    assert torch_load(path)["v"].shape == (10 ** 6,)
    monkeypatch.setattr(safeio, "TENSOR_FREE_BYTES", free - 1)
    with pytest.raises(LoadError, match="tensors stand for more than 3999999 bytes"):
        torch_load(path)


def test_torch_load_refuses_the_legacy_format_without_reading_it(tmp_path):
    from torch.serialization import MAGIC_NUMBER

    path = tmp_path / "old.pt"
    with open(path, "wb") as f:
        pickle.dump(MAGIC_NUMBER, f, protocol=2)
        f.write(b"rest never read")
    with pytest.raises(LoadError, match=r"old\.pt: refused: a torch file in the format of "
                                        r"torch < 1\.6") as e:
        torch_load(path)
    assert e.value.over_budget


def test_torch_load_names_the_global_of_a_raw_pickle_without_running_it(tmp_path):
    marker = tmp_path / "PWNED"
    for protocol in (0, 2, 4):
        path = tmp_path / f"raw{protocol}.pt"
        path.write_bytes(pickle.dumps({"x": _Payload(str(marker))}, protocol=protocol))
        with pytest.raises(LoadError, match="GLOBAL posix.system") as e:
            torch_load(path)
        assert e.value.refused
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"x": [1, 2]}, protocol=2))
    with pytest.raises(LoadError, match="not a zip archive") as e:
        torch_load(tmp_path / "plain.pt")
    assert not e.value.refused and not e.value.over_budget
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(LoadError, match="the file is empty"):
        torch_load(tmp_path / "empty.pt")
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))
