"""Budgets before work: the sizes a file's headers and metadata imply, checked against its
bytes and against documented caps before anything is allocated, inflated or parsed.

A small file must never cost much more than its size: every reader of the library looks here
first. What is checked, and the caps (each a module constant, the figures of README's
"Untrusted files"):

- zip archives (:func:`zip_layout`): the central directory read without inflating anything;
  every entry's declared size against what its compressed bytes can hold (stored: equal;
  deflate: at most :data:`MAX_DEFLATE_RATIO` times), entries that lie inside the file, in
  order, without overlap, each behind a local header that agrees with the directory, at most
  :data:`MAX_ZIP_ENTRIES` of them, and their declared total under the caller's cap. The torch
  form (``stored_only``) also refuses any compressed entry (``torch.save`` never compresses)
  and any central directory that two zip readers could place differently;
- ``.npy`` / ``.npz`` arrays (:func:`check_npy`, :func:`check_npz`): the array header of
  every member against the member's declared size (numpy allocates the header's shape before
  it reads), no pickled objects, and a cap;
- loaded objects (:func:`check_tree`): a walk with a node budget, a depth limit and a budget
  of tensor bytes, so that shared references (a pickle "billion laughs": linear to unpickle,
  exponential to walk), cycles, deep nesting and tensor views larger than their storage are
  refused before any other walker meets them;
- JSON text (:func:`loads_json`): a size cap and a nesting-depth limit checked on the text
  before ``json.loads`` (whose recursion a deep text would exhaust);
- streams (:func:`read_exactly`): a known number of bytes read into one buffer, and the next
  byte tried, so a payload never grows past what its header announced (an inflating gzip
  stream included).

Each check raises one error whose one line names the file (``where``) and what is wrong: the
caller's error class (default :class:`BudgetError`), or for :func:`zip_layout` a
:class:`ZipProblem` that also says whether the file is damaged or refused.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
import zipfile
from typing import Any, BinaryIO, List, NamedTuple, Optional, Tuple, Type

import numpy as np
import torch

from qfv_brevitas.util.errors import QfvError

__all__ = ["read_regular", "read_json_file", "BudgetError", "ZipProblem", "MAX_DEFLATE_RATIO", "MAX_ZIP_ENTRIES", "MAX_TREE_DEPTH",
           "MAX_INT_BITS", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_NPZ_BYTES", "MAX_INPUT_VALUES",
           "MAX_INPUT_DIMS", "MAX_TIME_STEPS", "MAX_SPIKING_VALUES", "TreeBudget",
           "zip_layout", "check_npy", "check_npz", "check_tree", "loads_json", "json_depth",
           "read_exactly", "deflate_limit", "quoted"]

#: The most a deflate stream can expand: 258 bytes per (at least) 2 bits, ~1032:1.
MAX_DEFLATE_RATIO = 1032
#: Bytes a tiny deflate stream may decode to beyond the ratio (its header and first block).
DEFLATE_SLACK = 4096
#: Entries of one zip archive (a checkpoint holds one per tensor: a ResNet-18 has 191).
MAX_ZIP_ENTRIES = 100_000
#: Nesting depth of a loaded object or JSON text (the library's files nest fewer than 10).
MAX_TREE_DEPTH = 100
#: Bits of one integer in a loaded object (str() of a larger one fails past 4300 digits).
MAX_INT_BITS = 1024
#: JSON text a reader parses (the library's own metadata: a few KB per layer).
MAX_JSON_BYTES = 16 << 20
#: Nesting depth of JSON text (json.loads recurses once per level).
MAX_JSON_DEPTH = MAX_TREE_DEPTH
#: Declared bytes of one .npy / .npz file's arrays once read (an event recording: a few MB).
MAX_NPZ_BYTES = 256 << 20
#: Values of one input sample a file may declare (3 x 1024 x 1024 fits; MNIST has 784).
MAX_INPUT_VALUES = 1 << 22
#: Dimensions of one input sample.
MAX_INPUT_DIMS = 8
#: Time steps of a spiking model (the paper uses 4 to 10).
MAX_TIME_STEPS = 4096
#: Time steps x values of one spiking sample (CIFAR10-DVS at 128x128, T = 100: 3.3M).
MAX_SPIKING_VALUES = 1 << 24

_EOCD = struct.Struct("<4sHHHHIIH")          # end of central directory, 22 bytes
_LOCATOR = struct.Struct("<4sIQI")           # zip64 end-of-directory locator, 20 bytes
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")      # zip64 end of central directory, 56 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")      # local file header, 30 bytes
_SATURATED = (0xFFFF, 0xFFFFFFFF)


class BudgetError(QfvError):
    """A file whose declared sizes exceed what its bytes can hold, or a documented cap."""


class ZipProblem(BudgetError):
    """What :func:`zip_layout` found wrong: ``problem`` (the words, without the file) and
    ``damaged`` (the file is no readable zip archive at all: truncated, not a zip) as against
    a readable archive that is refused."""

    def __init__(self, where: str, problem: str, damaged: bool = False):
        super().__init__(f"{where}: {problem}")
        self.problem, self.damaged = problem, damaged


def quoted(value: Any, limit: int = 80) -> str:
    """A value from a file (a name, a list), as its repr with escapes, cut to ``limit``
    characters: safe for a terminal and for one line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def deflate_limit(compressed: int) -> int:
    """The most ``compressed`` bytes of deflate data can decode to."""
    return MAX_DEFLATE_RATIO * int(compressed) + DEFLATE_SLACK


# -- zip archives --------------------------------------------------------------------------

def _no_record_at_the_end(fh: BinaryIO, size: int, where: str) -> None:
    """Why the file does not end with an end-of-directory record: a comment or data after
    the archive (refused: torch.save writes neither), or no record at all (damaged)."""
    start = max(0, size - (1 << 16) - _EOCD.size)
    fh.seek(start)
    tail = fh.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0:
        raise ZipProblem(where, "no end-of-directory record at the end of the zip archive "
                         "(truncated, or not a zip archive)", damaged=True)
    comment = int.from_bytes(tail[at + 20:at + 22], "little")
    if start + at + _EOCD.size + comment == size:
        raise ZipProblem(where, "the zip archive has a comment (torch.save writes none)")
    raise ZipProblem(where, f"{size - start - at - _EOCD.size} bytes after the end of the zip "
                     "archive")


def _directory_end(fh: BinaryIO, size: int, where: str) -> Tuple[int, int]:
    """``(offset, size)`` of the central directory from the end records, which must end the
    file with no comment: the one layout ``torch.save`` writes and every reader agrees on."""
    if size < _EOCD.size:
        raise ZipProblem(where, f"too short ({size} bytes) for a zip archive", damaged=True)
    fh.seek(size - _EOCD.size)
    sig, disk, disk_cd, n_here, n_all, cd_size, cd_offset, comment = \
        _EOCD.unpack(fh.read(_EOCD.size))
    if sig != b"PK\x05\x06":
        _no_record_at_the_end(fh, size, where)
    if comment or disk or disk_cd or n_here != n_all:
        raise ZipProblem(where, "the zip archive spans several disks (torch.save writes one)")
    end = size - _EOCD.size
    locator = end - _LOCATOR.size
    if locator >= 0:
        fh.seek(locator)
        lsig, _, at, _ = _LOCATOR.unpack(fh.read(_LOCATOR.size))
        if lsig == b"PK\x06\x07":
            fh.seek(min(at, size))
            rec = fh.read(_EOCD64.size)
            if at + _EOCD64.size > locator or rec[:4] != b"PK\x06\x06":
                raise ZipProblem(where, "its zip64 locator points at no zip64 end record",
                                 damaged=True)
            _, _, _, _, _, _, _, n64, cd_size64, cd_offset64 = _EOCD64.unpack(rec)
            for small, big in ((n_all, n64), (cd_size, cd_size64), (cd_offset, cd_offset64)):
                if small not in _SATURATED and small != big:
                    raise ZipProblem(where, "its two end-of-directory records disagree")
            cd_offset, cd_size, end = cd_offset64, cd_size64, at
    if cd_offset + cd_size != end:
        raise ZipProblem(where, "its central directory is not where its end record says "
                         "(data before or inside the archive)")
    return cd_offset, cd_size


def _check_member(fh: BinaryIO, info: zipfile.ZipInfo, where: str, stored_only: bool
                  ) -> Tuple[int, int]:
    """``(start, end)`` of one member (local header to the end of its data), checked."""
    name = quoted(info.filename)
    if info.flag_bits & 0x1:
        raise ZipProblem(where, f"zip entry {name} is encrypted")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise ZipProblem(where, f"zip entry {name} is stored but declares "
                             f"{info.file_size} bytes for {info.compress_size} stored")
    elif stored_only:
        raise ZipProblem(where, f"zip entry {name} is compressed (method "
                         f"{info.compress_type}); torch.save stores every entry as it is, "
                         "and a compressed entry can inflate to any size")
    elif info.compress_type != zipfile.ZIP_DEFLATED:
        raise ZipProblem(where, f"zip entry {name} uses compression method "
                         f"{info.compress_type} (only stored and deflate are read)")
    elif info.file_size > deflate_limit(info.compress_size):
        raise ZipProblem(where, f"zip entry {name} declares {info.file_size} bytes, more "
                         f"than its {info.compress_size} compressed bytes can hold (deflate "
                         f"expands at most {MAX_DEFLATE_RATIO}x)")
    fh.seek(info.header_offset)
    head = fh.read(_LOCAL.size)
    if len(head) < _LOCAL.size or head[:4] != b"PK\x03\x04":
        raise ZipProblem(where, f"zip entry {name} has no local header where the directory "
                         "says", damaged=True)
    _, _, flags, method, _, _, _, _, _, nlen, xlen = _LOCAL.unpack(head)
    local = fh.read(nlen).decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
    if method != info.compress_type or local != info.orig_filename:
        raise ZipProblem(where, f"zip entry {name}'s local header disagrees with the "
                         "directory (name or compression)")
    return info.header_offset, \
        info.header_offset + _LOCAL.size + nlen + xlen + info.compress_size


def _entries(fh: BinaryIO, where: str) -> Tuple[List[zipfile.ZipInfo], int]:
    """The central directory's entries (nothing inflated) and where it starts."""
    try:
        with zipfile.ZipFile(fh) as zf:
            infos, start_dir = zf.infolist(), zf.start_dir
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError,
            NotImplementedError) as e:
        raise ZipProblem(where, f"not a readable zip archive ({e})", damaged=True) from None
    if len(infos) > MAX_ZIP_ENTRIES:
        raise ZipProblem(where, f"{len(infos)} zip entries, more than the {MAX_ZIP_ENTRIES} "
                         "a file of this library may hold")
    if len({i.filename for i in infos}) != len(infos):
        raise ZipProblem(where, "two zip entries have the same name")
    return infos, start_dir


def zip_layout(path: os.PathLike, where: str, *, stored_only: bool, max_total: int
               ) -> List[zipfile.ZipInfo]:
    """The entries of the zip archive at ``path``, each checked (see the module docstring)
    before anything of it is inflated; their declared sizes add up to at most ``max_total``.
    A :class:`ZipProblem` otherwise.

    ``stored_only`` (the torch form): every entry stored, the first at the start of the file
    and the central directory right before the end records, so that torch's zip reader and
    Python's see the same entries."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        cd_offset = _directory_end(fh, size, where)[0] if stored_only else None
        infos, start_dir = _entries(fh, where)
        if stored_only and start_dir != cd_offset:
            raise ZipProblem(where, "its central directory is not where its end record says")
        spans = sorted(_check_member(fh, i, where, stored_only) for i in infos)
    if stored_only and spans and spans[0][0] != 0:
        raise ZipProblem(where, "data before the first zip entry")
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise ZipProblem(where, "two zip entries overlap (the same bytes read twice)")
    if spans and spans[-1][1] > start_dir:
        raise ZipProblem(where, "a zip entry runs into the central directory")
    total = sum(i.file_size for i in infos)
    if total > max_total:
        raise ZipProblem(where, f"its zip entries declare {total} bytes, more than the "
                         f"{max_total} allowed for a {size}-byte file")
    return infos


# -- numpy arrays --------------------------------------------------------------------------

def _npy_header(fh: BinaryIO, declared: int, where: str, error: Type[QfvError]) -> int:
    """Check the .npy header at ``fh``'s position against the ``declared`` size of the whole
    .npy (header and data); returns the data's size."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh, max_header_size=1 << 16)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(fh, max_header_size=1 << 16)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise error(f"{where}: not a readable .npy array header ({e})") from None
    if dtype.hasobject:
        raise error(f"{where}: holds Python objects (dtype {dtype}); only plain arrays are read")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes != declared - fh.tell():
        raise error(f"{where}: its array header declares shape {tuple(shape)} of {dtype} "
                    f"({nbytes} bytes) but {declared - fh.tell()} bytes follow it")
    return nbytes


def check_npy(path: os.PathLike, where: str, max_bytes: int = MAX_NPZ_BYTES,
              error: Type[QfvError] = BudgetError) -> int:
    """Check a ``.npy`` file before ``np.load`` (which allocates its header's shape first):
    plain dtype, exactly the bytes the header announces, at most ``max_bytes`` of them.
    Returns that size."""
    with open(path, "rb") as fh:
        nbytes = _npy_header(fh, os.path.getsize(path), where, error)
    if nbytes > max_bytes:
        raise error(f"{where}: an array of {nbytes} bytes, more than the {max_bytes} an array "
                    "file may hold")
    return nbytes


def check_npz(path: os.PathLike, where: str, max_bytes: int = MAX_NPZ_BYTES,
              error: Type[QfvError] = BudgetError) -> int:
    """Check a ``.npz`` archive before ``np.load``: its zip layout (:func:`zip_layout`, stored
    or deflate within its ratio), every member a plain ``.npy`` whose header agrees with the
    member's declared size, and all arrays together at most ``max_bytes``. Returns that total.
    Reads the members' headers only (a few bytes each)."""
    try:
        infos = zip_layout(path, where, stored_only=False, max_total=max_bytes)
    except ZipProblem as e:
        raise error(str(e)) from None
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            with zf.open(info) as member:
                total += _npy_header(member, info.file_size,
                                     f"{where} ({quoted(info.filename)})", error)
    return total


# -- loaded objects ------------------------------------------------------------------------

class TreeBudget(NamedTuple):
    """What walking a loaded object may cost: values visited (a shared one counts each time
    it is reached), nesting depth, and bytes of the tensors it holds (as dense arrays)."""

    nodes: int
    tensor_bytes: int
    depth: int = MAX_TREE_DEPTH


_CONTAINERS = (dict, list, tuple, set, frozenset)


def _tree_problem(obj: Any, budget: TreeBudget) -> Optional[str]:
    """Why walking ``obj`` would exceed ``budget`` (None if it would not); iterative, and it
    stops as soon as the budget is spent, so it costs at most the budget itself."""
    stack: List[Tuple[Any, int]] = [(obj, 0)]
    nodes, tensor_bytes = 1, 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, torch.Tensor):
            tensor_bytes += item.numel() * item.element_size()
            if tensor_bytes > budget.tensor_bytes:
                return (f"its tensors stand for more than {budget.tensor_bytes} bytes, more "
                        "than the file can hold (views that repeat their storage, or one "
                        "tensor referenced over and over)")
        elif isinstance(item, int) and item.bit_length() > MAX_INT_BITS:
            return f"it holds an integer of {item.bit_length()} bits (at most {MAX_INT_BITS})"
        elif isinstance(item, _CONTAINERS):
            if depth >= budget.depth:
                return f"it nests deeper than {budget.depth} levels (or holds itself)"
            children = (v for kv in item.items() for v in kv) if isinstance(item, dict) \
                else iter(item)
            for child in children:
                nodes += 1
                if nodes > budget.nodes:
                    return (f"it holds more than {budget.nodes} values once its shared "
                            "references are followed (the same objects referenced over and "
                            "over, or a cycle): walking it would not end in time")
                stack.append((child, depth + 1))
    return None


def check_tree(obj: Any, where: str, budget: TreeBudget,
               error: Type[QfvError] = BudgetError) -> None:
    """Refuse ``obj`` (something loaded from ``where``) if walking it would exceed ``budget``;
    after this check any recursive walk of ``obj`` is bounded by the budget."""
    problem = _tree_problem(obj, budget)
    if problem is not None:
        raise error(f"{where}: refused: {problem}")


# -- JSON ----------------------------------------------------------------------------------

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """The deepest nesting of ``text``'s arrays and objects, strings skipped (linear time,
    no recursion; a malformed text gets an upper bound)."""
    raw = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", text.encode("utf-8", "surrogatepass")))
    deepest = level = 0
    for i in range(0, len(raw), 1 << 20):  # in pieces: a few MB of working memory at most
        b = np.frombuffer(raw, dtype=np.uint8, count=min(1 << 20, len(raw) - i), offset=i)
        steps = np.where((b == ord("[")) | (b == ord("{")), 1, -1).astype(np.int32)
        levels = np.cumsum(steps, dtype=np.int64) + level
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def loads_json(text: str, where: str, *, max_bytes: Optional[int] = None,
               max_depth: Optional[int] = None, error: Type[QfvError] = BudgetError) -> Any:
    """``json.loads(text)`` once the text is at most ``max_bytes`` (default
    :data:`MAX_JSON_BYTES`) and nests at most ``max_depth`` levels (default
    :data:`MAX_JSON_DEPTH`); a malformed text is ``error`` too (``where``: the file and key)."""
    max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
    max_depth = MAX_JSON_DEPTH if max_depth is None else max_depth
    if len(text) > max_bytes:
        raise error(f"{where}: {len(text)} characters of JSON, more than the {max_bytes} "
                    "read")
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{where}: JSON nested {depth} levels deep, more than the {max_depth} read")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise error(f"{where}: corrupt JSON ({str(e)[:120]})") from None


def read_regular(path: os.PathLike, where: str, limit: int, *,
                 error: Type[QfvError] = BudgetError, what: str = "file",
                 follow_links: bool = True) -> bytes:
    """The bytes of ``path`` if it names a regular file of at most ``limit`` bytes: opened
    non-blocking (a FIFO without a writer or a device is refused without a read: it could
    block or never end), checked with ``fstat``, then exactly its size read (one byte past
    it tried: a file that grows while read is refused). ``what`` names the expected file in
    the message for a folder; ``follow_links=False`` refuses a symbolic link (``O_NOFOLLOW``:
    a file that must lie in its folder is never read elsewhere)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{where}: no such file") from None
    except IsADirectoryError:
        raise error(f"{where}: is a folder, not {what}") from None
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENODEV):  # a FIFO without writer, a socket
            raise error(f"{where}: not a regular file") from None
        if e.errno == errno.ELOOP and not follow_links:
            raise error(f"{where}: a symbolic link, not a file of its folder") from None
        raise error(f"{where}: cannot be read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{where}: is a folder, not {what}")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{where}: not a regular file (a FIFO, device or socket); give {what}")
        if st.st_size > limit:
            raise error(f"{where}: {st.st_size} bytes, over the limit of {limit} bytes for "
                        f"{what}")
        os.set_blocking(fd, True)
        chunks: List[bytes] = []
        got = 0
        while got <= st.st_size:  # one byte past the size: a file that grows is noticed
            chunk = os.read(fd, min(1 << 20, st.st_size + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got != st.st_size:
            raise error(f"{where}: changed size while being read")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{where}: cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)


def read_json_file(path: os.PathLike, *, error: Type[QfvError] = BudgetError,
                   what: str = "a JSON file", follow_links: bool = True) -> Any:
    """The JSON value in the regular file ``path`` (:func:`read_regular`, then
    :func:`loads_json`: at most :data:`MAX_JSON_BYTES`, nested at most
    :data:`MAX_JSON_DEPTH`)."""
    where = str(path)
    data = read_regular(path, where, MAX_JSON_BYTES, error=error, what=what,
                        follow_links=follow_links)
    return loads_json(data.decode("utf-8", errors="replace"), where, error=error)


# -- streams -------------------------------------------------------------------------------

def read_exactly(fh: BinaryIO, n: int) -> Tuple[bytearray, int, bool]:
    """``(buffer, bytes read, more follow)``: up to ``n`` bytes of ``fh`` read in pieces into
    one buffer allocated once, then one more byte tried (when all ``n`` came), so a stream is
    never read past what its header announced. Fewer than ``n`` bytes: the stream ended."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = fh.readinto(view[got:got + (1 << 20)])
        if not k:
            return buf, got, False
        got += k
    return buf, got, bool(fh.read(1))
