"""Builders of the hostile files of ``test_budgets.py``: small files whose headers or metadata
imply far more work than their bytes (zip and gzip bombs, size lies, pickle "billion laughs",
settings that size a model or a tensor). Each builder writes one file and returns what the
file claims (declared bytes, values, nodes...), so a test can show the bomb is real without
setting it off.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Union

import onnx
import torch
from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION


# -- torch archives written by hand ---------------------------------------------------------------

class Storage:
    """A storage record of a hand-written torch archive: ``numel`` items of ``dtype``."""

    def __init__(self, key: str, numel: int, dtype=torch.ByteStorage):
        self.key, self.numel, self.dtype = key, numel, dtype


class TensorRef:
    """A tensor over a :class:`Storage`, pickled the way torch.save pickles one."""

    def __init__(self, storage: Storage, size: Sequence[int], stride: Sequence[int],
                 offset: int = 0):
        self.args = (storage, offset, tuple(size), tuple(stride), False,
                     collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def __init__(self, f, legacy: bool):
        super().__init__(f, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            pid = ("storage", obj.dtype, obj.key, "cpu", obj.numel)
            return pid + (None,) if self.legacy else pid
        return None


def pickled(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, legacy).dump(obj)
    return buf.getvalue()


def write_zip(path: Path, entries: Dict[str, Union[bytes, int]],
              compress: int = zipfile.ZIP_STORED) -> int:
    """A zip archive of ``entries`` (bytes, or a count of zero bytes written in pieces);
    returns the bytes its entries declare."""
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, data in entries.items():
            if isinstance(data, int):
                with z.open(name, "w", force_zip64=data > (1 << 30)) as f:
                    for i in range(0, data, 1 << 20):
                        f.write(bytes(min(1 << 20, data - i)))
            else:
                z.writestr(name, data)
    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist())


def torch_zip(path: Path, obj: Any, records: Dict[str, Union[bytes, int]],
              compress: int = zipfile.ZIP_STORED) -> int:
    """A torch archive holding ``obj`` (which may hold :class:`TensorRef`) and ``records``
    (storage key -> bytes or a count of zeros); returns the bytes it declares."""
    entries: Dict[str, Union[bytes, int]] = {"archive/data.pkl": pickled(obj),
                                             "archive/byteorder": b"little"}
    entries.update({f"archive/data/{k}": v for k, v in records.items()})
    entries["archive/version"] = b"3\n"
    return write_zip(path, entries, compress)


def rezip(src: Path, dst: Path, compress: int = zipfile.ZIP_DEFLATED) -> None:
    """``src`` (a torch file) with every entry written again, compressed."""
    with zipfile.ZipFile(src) as zin:
        write_zip(dst, {i.filename: zin.read(i) for i in zin.infolist()}, compress)


def deflate_bomb(path: Path, payload: dict, zeros: int) -> int:
    """A checkpoint-like archive whose ``payload["meta"]["w"]`` is a tensor of ``zeros`` bytes
    stored deflated: a few hundred KB that torch would inflate into ``zeros`` bytes."""
    payload = dict(payload, meta=dict(payload.get("meta") or {},
                                      w=TensorRef(Storage("z", zeros), [zeros], [1])))
    return torch_zip(path, payload, {"z": zeros}, zipfile.ZIP_DEFLATED)


def _local(name: bytes, data: bytes) -> bytes:
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data),
                       len(data), len(data), len(name), 0) + name + data


def _central(name: bytes, data: bytes, offset: int) -> bytes:
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0,
                       zlib.crc32(data), len(data), len(data), len(name), 0, 0, 0, 0, 0,
                       offset) + name


def overlapping_zip(path: Path, base: int, k: int) -> int:
    """A torch archive whose ``k`` stored records nest: each record's data is the next
    record's local header and data, so ``k`` records share ~``base`` bytes (the overlap zip
    bomb of stored entries); the pickle references every record. Returns the bytes the
    records declare (what torch allocates for them)."""
    names = [f"archive/data/{i}".encode() for i in range(k)]
    tail = bytes(base)
    datas: List[bytes] = [b""] * k
    for i in reversed(range(k)):
        datas[i] = tail
        tail = _local(names[i], tail)
    nested = tail  # record 0's local header and everything inside it
    pkl = pickled([TensorRef(Storage(str(i), len(datas[i])), [len(datas[i])], [1])
                   for i in range(k)])
    head = [(b"archive/data.pkl", pkl), (b"archive/byteorder", b"little"),
            (b"archive/version", b"3\n")]
    blob, central, offsets = b"", b"", {}
    for name, data in head:
        offsets[name] = len(blob)
        blob += _local(name, data)
    start = len(blob)
    blob += nested
    for name, data in head:
        central += _central(name, data, offsets[name])
    at = start
    for i in range(k):
        central += _central(names[i], datas[i], at)
        at += 30 + len(names[i])
    n = len(head) + k
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(central), len(blob), 0)
    path.write_bytes(blob + central + eocd)
    return sum(len(d) for d in datas)


def legacy_file(path: Path, numel: int) -> None:
    """torch's legacy (pre-1.6, non-zip) format: a header of pickles, then a storage that
    declares ``numel`` float32 items (torch allocates them before reading) holding 4."""
    with open(path, "wb") as f:
        for o in (MAGIC_NUMBER, PROTOCOL_VERSION,
                  dict(protocol_version=PROTOCOL_VERSION, little_endian=True,
                       type_sizes=dict(short=2, int=4, long=4))):
            pickle.dump(o, f, protocol=2)
        f.write(pickled({"format": "qfv-brevitas/2",
                         "w": TensorRef(Storage("k", numel, torch.FloatStorage), [4], [1])},
                        legacy=True))
        pickle.dump(["k"], f, protocol=2)
        f.write(struct.pack("<q", 4) + bytes(16))


def patch_pickle(src: Path, dst: Path, placeholder: str, ops: bytes) -> None:
    """``src`` (a torch file) with the pickled string ``placeholder`` in its data.pkl replaced
    by raw pickle ``ops`` (what pickling cannot produce, e.g. 100 000 nested lists)."""
    raw = placeholder.encode()
    old = b"X" + struct.pack("<I", len(raw)) + raw
    with zipfile.ZipFile(src) as zin:
        entries = {i.filename: zin.read(i) for i in zin.infolist()}
    key = next(n for n in entries if n.endswith("/data.pkl"))
    assert entries[key].count(old) == 1
    entries[key] = entries[key].replace(old, ops)
    write_zip(dst, entries)


def nested_lists(depth: int) -> bytes:
    """Pickle opcodes building ``depth`` lists, each inside the one before."""
    return b"]" * depth + b"a" * (depth - 1)


def laughs(levels: int) -> list:
    """``[x, x]`` nested ``levels`` times: 2**levels leaves, ``levels`` objects."""
    x: list = [0]
    for _ in range(levels):
        x = [x, x]
    return x


def tree_size(obj: Any, memo: Dict[int, int] = None) -> int:
    """Values a walk of ``obj`` visits (shared references counted each time), computed
    with a memo: the cost of the walk, measured without walking."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        n = 1 + sum(tree_size(k, memo) + tree_size(v, memo) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        n = 1 + sum(tree_size(v, memo) for v in obj)
    else:
        n = 1
    memo[id(obj)] = n
    return n


def reseal(src: Path, dst: Path, edit: Callable[[dict], None]) -> None:
    """A checkpoint with ``edit`` applied and its checksum recomputed (a deliberate edit)."""
    from qfv_brevitas.util.safeio import content_digest

    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    ckpt["sha256"] = content_digest(ckpt)
    torch.save(ckpt, dst)


# -- IDX -------------------------------------------------------------------------------------

def idx_header(dims: Sequence[int], code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def gz_with_zeros(path: Path, head: bytes, zeros: int) -> int:
    """``head`` then ``zeros`` zero bytes, gzipped in pieces; returns the inflated size."""
    with gzip.open(path, "wb") as f:
        f.write(head)
        for i in range(0, zeros, 1 << 20):
            f.write(bytes(min(1 << 20, zeros - i)))
    return len(head) + zeros


def inflated_size(path: Path) -> int:
    """Bytes a gzip file inflates to, counted in pieces (never held at once)."""
    d, n = zlib.decompressobj(16 + zlib.MAX_WBITS), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            n += len(d.decompress(chunk, 1 << 20))
            while d.unconsumed_tail:
                n += len(d.decompress(d.unconsumed_tail, 1 << 20))
    return n


# -- ONNX metadata ---------------------------------------------------------------------------

def edit_metadata(src: Path, dst: Path, text: Union[str, Callable[[dict], None]]) -> str:
    """``src`` (an exported file) with its qfv-brevitas metadata replaced by ``text`` (or
    edited by a function of the parsed metadata), its checksum recomputed; returns the text."""
    proto = onnx.load(str(src))
    props = {p.key: p for p in proto.metadata_props}
    if callable(text):
        info = json.loads(props["qfv_brevitas.export"].value)
        text(info)
        text = json.dumps(info, sort_keys=True)
    props["qfv_brevitas.export"].value = text
    props["qfv_brevitas.sha256"].value = hashlib.sha256(text.encode()).hexdigest()
    onnx.save(proto, str(dst))
    return text


def declared_tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` as dense arrays (what a walk that copies them costs)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(declared_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(declared_tensor_bytes(v) for v in obj)
    return 0
