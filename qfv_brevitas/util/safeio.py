"""Writing files so that nothing is lost: output checks and atomic writes.

Every file the library writes goes through this module:

- :func:`check_output`: before any work, refuse an output that is one of the inputs, that
  exists (unless ``overwrite=True``, ``--force`` on the command line), that is anything but a
  regular file (a device, a FIFO, a socket, or a link to one: refused even with ``overwrite``),
  or whose folder cannot be written;
- :func:`atomic_paths` / :func:`atomic_path` / :func:`atomic_write`: the writer writes to a
  temporary file in the same folder; on success the file is flushed to disk (fsync) and renamed
  over the target, so the target is the old file or the complete new one, never a part. On any
  failure (an exception, a full disk, Ctrl-C) the temporary file is removed and the target is
  untouched. Several files given together are renamed together at the end. Right before the
  rename each target is looked at again: one that became anything but a regular file is
  refused, and where no overwrite was asked the rename itself refuses to replace (Linux
  ``renameat2(RENAME_NOREPLACE)``, else a hard link), so a file that appeared meanwhile is
  never replaced. An existing output is never opened: only renamed over;
- :func:`atomic_dir`: the same for a whole folder (a run folder, a crossbar folder): written
  as a temporary folder beside it, then swapped in (an atomic exchange where the system has one).

Errors name the output as the caller gave it, never the hidden temporary file.

Reading back what :func:`torch_save` wrote goes through :func:`torch_load` (weights only: a
crafted file is refused before any of it runs), the one reader of checkpoints and maps.

Ctrl-C (and SIGTERM) is held back while files are renamed into place (:func:`deferred_interrupts`),
so an interrupt never falls between "old file gone" and "new file there".

>>> import os, tempfile
>>> d = tempfile.mkdtemp()
>>> p = atomic_write(os.path.join(d, "a.txt"), "hello")
>>> with atomic_path(p, overwrite=True) as tmp:   # a writer that wants a file name
...     _ = open(tmp, "w").write("new")
>>> open(p).read(), sorted(os.listdir(d))
('new', ['a.txt'])
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import os
import pickle
import pickletools
import secrets
import shutil
import signal
import stat
import struct
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from qfv_brevitas.util.budgets import (BudgetError, TreeBudget, ZipProblem, check_tree,
                                       zip_layout)
from qfv_brevitas.util.errors import OutputError, QfvError, QfvTypeError

__all__ = ["check_output", "atomic_path", "atomic_paths", "atomic_write", "atomic_dir",
           "torch_save", "torch_load", "LoadError", "same_path", "content_digest",
           "deferred_interrupts"]

PathLike = Union[str, os.PathLike]
_HINT = "pass --force (overwrite=True in Python) to replace it"


def same_path(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file (after symlinks; hard links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _inside(inner: Path, outer: Path) -> bool:
    try:
        inner.resolve().relative_to(outer.resolve())
        return True
    except ValueError:
        return False


_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    """What a file of this mode is, in words ("a FIFO (named pipe)", "a socket", ...)."""
    return next((words for test, words in _KINDS if test(mode)), "a special file")


def _lstat(path: Path, given: PathLike) -> Optional[os.stat_result]:
    """``os.lstat(path)``, or None where nothing is there; an :class:`OutputError` naming
    ``given`` where it cannot be looked at (a name too long, a folder we may not search)."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise OutputError(f"cannot write {given}: {e.strerror or e}") from None


def _not_regular(given: PathLike, st: os.stat_result, when: str = "") -> OutputError:
    return OutputError(f"output {given} is {_kind(st.st_mode)}{when}, not a regular file: "
                       "qfv writes only regular files and never replaces anything else, even "
                       "with --force; choose another output path")


def check_output(path: PathLike, *, overwrite: bool = False, inputs: Iterable = (),
                 kind: str = "file", replaceable: Optional[Callable[[Path], Optional[str]]] = None
                 ) -> Path:
    """Check, before any work, that ``path`` may be written; returns it resolved.

    ``kind="file"``: a regular file (refused if it is a folder, a device, a FIFO, a socket or a
    link to one, whatever ``overwrite`` says). ``kind="dir"``: a folder replaced as a whole
    (refused if it holds an input; a non-empty existing one needs ``overwrite`` and, with
    ``replaceable``, that ``replaceable(path)`` returns None rather than a reason).
    Raises :class:`~qfv_brevitas.util.errors.OutputError` naming the path and the problem.
    """
    if path is None or str(path) == "":
        raise OutputError("the output path is empty")
    if "\0" in str(path):
        raise OutputError(f"output {str(path)!r}: a path cannot hold a NUL character")
    given = Path(path)
    try:
        target = given.resolve()
    except (OSError, RuntimeError) as e:  # a loop of links, a name too long
        raise OutputError(f"cannot write {given}: {getattr(e, 'strerror', None) or e}") from None
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        if same_path(target, inp):
            raise OutputError(f"output {given} is the input {inp}: writing it would destroy the "
                              "input; choose another output path")
        if kind == "dir" and _inside(Path(inp), target):
            raise OutputError(f"output folder {given} would be replaced as a whole, but it holds "
                              f"the input {inp}; choose another output folder")
    st = _lstat(target, given)  # resolved: a link is looked at where it points
    if st is not None:
        if kind == "file" and stat.S_ISDIR(st.st_mode):
            raise OutputError(f"output {given} is a folder; give a file name")
        if kind == "file" and not stat.S_ISREG(st.st_mode):
            raise _not_regular(given, st)
        if kind == "dir" and not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"output folder {given} exists and is not a folder (it is "
                              f"{_kind(st.st_mode)})")
        if kind == "file" and not overwrite:
            raise OutputError(f"output {given} exists; {_HINT}")
        if kind == "dir" and any(target.iterdir()):
            if not overwrite:
                raise OutputError(f"output folder {given} exists; {_HINT}")
            reason = replaceable(target) if replaceable is not None else None
            if reason:
                raise OutputError(f"output folder {given} is not replaced: {reason}")
    _check_writable(target.parent, given)
    return target


def _check_writable(folder: Path, given: Path) -> None:
    """The nearest existing folder above the output must be a folder we can create files in."""
    anc = folder
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot write {given}: {anc} is not a folder")
    try:  # a real probe: permission bits do not stop root, a read-only mount does
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as e:
        raise OutputError(f"cannot write {given}: folder {anc} is not writable "
                          f"({e.strerror or e})") from None


# -- atomic files -------------------------------------------------------------------------

@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM back until the block ends, then deliver them, so that
    a commit is never cut in half. Python runs signal handlers in the main thread whichever
    thread the system hands the signal to (torch has many), so replacing the handlers for the
    block is enough; outside the main thread the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []

    def hold(signum, frame):
        caught.append(signum)

    old = {}
    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if sig is not None and signal.getsignal(sig) is not None:  # None: not set from Python
            old[sig] = signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):  # delivered now, as they would have been
            handler = old[sig]
            if callable(handler):
                handler(sig, None)  # the default SIGINT handler raises KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some systems cannot open or sync a folder; the data is synced already
        pass


def _temp_file(target: Path) -> Path:
    """A new empty file beside ``target`` (same folder: the rename is atomic), created with the
    usual permissions (umask applies, unlike ``mkstemp``'s 0600)."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_paths(paths: Sequence[PathLike], *, overwrite: bool = False,
                 inputs: Iterable = ()) -> Iterator[List[Path]]:
    """Temporary paths for ``paths``, renamed over them together when the block succeeds.

    Each is checked first (:func:`check_output`). Whatever fails inside the block, or while
    syncing, leaves every target as it was and removes the temporary files.
    """
    inputs = list(inputs)
    targets = [check_output(p, overwrite=overwrite, inputs=inputs) for p in paths]
    if len(set(targets)) != len(targets):
        raise OutputError(f"the same output is given twice: {[str(p) for p in paths]}")
    tmps: List[Path] = []
    try:
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(_temp_file(t))
        try:
            yield list(tmps)
            for tmp in tmps:
                _fsync(tmp)
        except OSError as e:  # name the output, not its hidden temporary file
            raise _named(e, {str(t): str(p) for t, p in zip(tmps, paths)}, str(paths[0])) from e
        with deferred_interrupts():
            _commit(tmps, targets, paths, overwrite)
    finally:
        with deferred_interrupts():
            for tmp in tmps:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


def _commit(tmps: Sequence[Path], targets: Sequence[Path], paths: Sequence[PathLike],
            overwrite: bool) -> None:
    """Rename each temporary file onto its target. Every target is looked at again first
    (something may have appeared or changed meanwhile); without ``overwrite`` the renames
    refuse to replace, and a failure removes the files this commit already placed (nothing
    was there before them)."""
    for t, p in zip(targets, paths):
        st = _lstat(t, p)
        if st is not None:
            _check_replaceable_file(st, p, overwrite)
    done: List[Path] = []
    try:
        for tmp, t, p in zip(tmps, targets, paths):
            try:
                _place_file(tmp, t, p, overwrite)
            except OSError as e:
                raise _named(e, {str(tmp): str(p), str(t): str(p)}, str(p)) from e
            done.append(t)
        for folder in {t.parent for t in targets}:
            _fsync_dir(folder)
    except BaseException:
        if not overwrite:
            for t in done:
                with contextlib.suppress(OSError):
                    t.unlink()
        raise


def _check_replaceable_file(st: os.stat_result, given: PathLike, overwrite: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(given, st, " (it changed while the output was being written)")
    if not overwrite:
        raise OutputError(f"output {given} appeared while it was being written; {_HINT}")


def _place_file(tmp: Path, target: Path, given: PathLike, overwrite: bool) -> None:
    """``tmp`` renamed to ``target``: where nothing is there, by a rename that refuses to
    replace what appears in between; over a regular file only with ``overwrite``, by an
    atomic exchange whose outcome is looked at (anything but a regular file swapped out is
    swapped back, never opened), so ``tmp`` then holds the old file."""
    st = _lstat(target, given)
    if st is None:
        try:
            _rename_noreplace(tmp, target)
            return
        except FileExistsError:
            st = _lstat(target, given)
            if st is None:  # it came and went: the next attempt is the caller's
                raise OutputError(f"output {given} changed while it was being written; "
                                  "run again") from None
    _check_replaceable_file(st, given, overwrite)
    if _exchange(tmp, target):
        old = os.lstat(tmp)
        if not stat.S_ISREG(old.st_mode):
            _exchange(tmp, target)  # back as it was
            raise _not_regular(given, old, " (it changed while the output was being written)")
        return
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, overwrite: bool = False, inputs: Iterable = ()
                ) -> Iterator[Path]:
    """One temporary path, renamed over ``path`` when the block succeeds (see
    :func:`atomic_paths`). For writers that take a file name: ``onnx.save(proto, tmp)``."""
    with atomic_paths([path], overwrite=overwrite, inputs=inputs) as (tmp,):
        yield tmp


def atomic_write(path: PathLike, data: Union[str, bytes, memoryview], *,
                 overwrite: bool = False, inputs: Iterable = ()) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns the path."""
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def torch_save(obj: Any, path: PathLike, *, overwrite: bool = False,
               inputs: Iterable = ()) -> Path:
    """``torch.save`` through :func:`atomic_write`. Serialised in memory first: a write that
    fails (a full disk) is then the ``OSError`` it is, not torch's opaque ``RuntimeError``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, buf.getbuffer(), overwrite=overwrite, inputs=inputs)


class LoadError(QfvError):
    """A file :func:`torch_load` refused or could not read. ``refused``: it holds Python
    objects that loading would run, and ``line`` is torch's line naming the first one;
    ``over_budget``: its sizes do not fit its bytes or the caps of
    :mod:`qfv_brevitas.util.budgets` (or it is in torch's legacy format, whose sizes cannot be
    checked), and ``line`` is the whole message, naming the file; else it is no file torch
    reads (``kind``: the error's type, ``line``: its first line). Readers turn it into their
    own error, worded for what they read; the original error is its ``__cause__``. ``line``
    quotes the file: cut it before it goes to a terminal."""

    def __init__(self, refused: bool, kind: str, line: str, over_budget: bool = False):
        super().__init__(f"{kind}: {line}")
        self.refused, self.kind, self.line = refused, kind, line
        self.over_budget = over_budget


#: ``data.pkl`` (what is unpickled: Python objects cost up to ~80 times its bytes) may hold
#: this many bytes plus 1/PICKLE_FILE_SHARE of the file (a ResNet-18 checkpoint: 0.12 MB of
#: 45 MB).
PICKLE_FREE_BYTES = 1 << 20
PICKLE_FILE_SHARE = 4
#: Values a loaded object may hold, shared references counted each time they are reached:
#: this many plus NODES_PER_PICKLE_BYTE per byte of its pickle (each value costs an opcode).
TREE_FREE_NODES = 100_000
NODES_PER_PICKLE_BYTE = 4
#: Bytes its tensors may stand for as dense arrays: this many plus TENSOR_BYTES_PER_FILE_BYTE
#: per byte of the file (tied weights share one storage; views never exceed theirs).
TENSOR_FREE_BYTES = 16 << 20
TENSOR_BYTES_PER_FILE_BYTE = 4
#: What is scanned of a file that is no zip archive, to name the global it would import.
_RAW_SCAN_BYTES = 1 << 20


def _raw_pickle(path: PathLike, head: bytes) -> LoadError:
    """Why a file that is no zip archive is not read, found without unpickling it: torch's
    legacy format (its first pickle is torch's magic number; it allocates the storages its
    header declares before reading them, so it is refused), a pickle that imports a global
    (refused, naming it), or no torch file at all."""
    with open(path, "rb") as f:
        data = f.read(_RAW_SCAN_BYTES)
    ops, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            ops.append((op.name, arg))
            if isinstance(arg, str):
                strings = (strings + [arg])[-2:]
            if op.name in ("GLOBAL", "INST"):
                return LoadError(True, "UnpicklingError",
                                 f"Unsupported global: GLOBAL {arg.replace(' ', '.')}")
            if op.name == "STACK_GLOBAL":
                return LoadError(True, "UnpicklingError",
                                 f"Unsupported global: GLOBAL {'.'.join(strings)}")
            if op.name == "STOP":
                break
    except (ValueError, EOFError, UnicodeDecodeError, struct.error):
        pass
    names = [name for name, _ in ops if name not in ("PROTO", "FRAME")]
    if names[:1] in (["LONG1"], ["LONG"]) and \
            next(a for n, a in ops if n.startswith("LONG")) == torch.serialization.MAGIC_NUMBER:
        return LoadError(False, "legacy torch file",
                         f"{path}: refused: a torch file in the format of torch < 1.6 (not a "
                         "zip archive): it allocates the sizes its header declares before "
                         "reading them, so it is not read; load it in a session you trust "
                         "and save it again with torch.save", over_budget=True)
    what = "the file is empty" if not head else "it is not a zip archive, as torch.save writes"
    return LoadError(False, "not a torch file", what)


def _check_archive(path: PathLike) -> Tuple[int, int]:
    """``(file bytes, pickle bytes)`` of a torch zip archive once its layout is checked
    (:func:`qfv_brevitas.util.budgets.zip_layout`, stored entries only) and its pickle is
    within its budget; a :class:`LoadError` otherwise."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise _raw_pickle(path, head)
    where = f"{path}: refused before loading"
    try:
        infos = zip_layout(path, where, stored_only=True, max_total=size)
    except ZipProblem as e:
        if e.damaged:  # no readable archive at all: truncated, not a zip
            raise LoadError(False, "BadZipFile", e.problem) from None
        raise LoadError(False, "unsafe archive", str(e), over_budget=True) from None
    pickles = [i.file_size for i in infos if i.filename.count("/") == 1
               and i.filename.endswith("/data.pkl")]
    pickle_bytes = max(pickles, default=0)
    cap = PICKLE_FREE_BYTES + size // PICKLE_FILE_SHARE
    if pickle_bytes > cap:
        raise LoadError(False, "unsafe archive",
                        f"{where}: its pickle (data.pkl) has {pickle_bytes} bytes, more than "
                        f"the {cap} allowed for a {size}-byte file (unpickling costs up to ~80 "
                        "times that in memory)", over_budget=True)
    return size, pickle_bytes


def torch_load(path: PathLike, safe_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only
    (and the classes in ``safe_globals``), so a crafted pickle is refused before any of it runs.

    Budgets before work (:mod:`qfv_brevitas.util.budgets`): the zip layout is checked first
    (stored entries that lie inside the file: nothing inflates, so torch allocates at most the
    file's size), the pickle within its cap, and legacy (non-zip) files are refused; what is
    loaded is walked once within a budget proportional to the file (no shared-reference
    "billion laughs", cycle, deep nesting or tensor view larger than its storage), so any later
    walk (:func:`content_digest`, a reader's own) is bounded. Every failure is one
    :class:`LoadError`."""
    try:
        size, pickle_bytes = _check_archive(path)
    except OSError as e:
        raise LoadError(False, type(e).__name__, e.strerror or str(e)) from e
    try:
        with torch.serialization.safe_globals(list(safe_globals)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickle protocols
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # A weights-only refusal names the global it would have had to load; any other
        # error (random bytes, a truncation, not a torch file) does not.
        found = next((ln for ln in lines if "global" in ln.lower()), None) \
            if isinstance(e, pickle.UnpicklingError) else None
        raise LoadError(found is not None, type(e).__name__,
                        found if found is not None else (lines[0] if lines else "")) from e
    budget = TreeBudget(nodes=TREE_FREE_NODES + NODES_PER_PICKLE_BYTE * pickle_bytes,
                        tensor_bytes=TENSOR_FREE_BYTES + TENSOR_BYTES_PER_FILE_BYTE * size)
    try:
        check_tree(obj, str(path), budget)
    except BudgetError as e:
        raise LoadError(False, "over budget", str(e), over_budget=True) from None
    return obj


def _named(e: OSError, names: dict, default: str) -> OSError:
    """``e`` again, naming the output it was writing rather than a temporary path."""
    fn = str(e.filename) if e.filename is not None else None
    name = default
    if fn is not None:
        for tmp, real in names.items():
            if fn == tmp or fn.startswith(tmp + os.sep):
                name = real + fn[len(tmp):]
                break
        else:
            name = fn
    err = OSError(e.errno, e.strerror or str(e), name) if e.errno is not None else \
        OSError(f"{name}: {e}")
    return err


# -- contents checksum --------------------------------------------------------------------

def _feed(h, obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k, where)
            _feed(h, obj[k], f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}|".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    elif obj is None or isinstance(obj, bool):
        h.update(f"{obj}|".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj}|".encode())
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()}|".encode())
    elif isinstance(obj, str):
        h.update(f"S{len(obj)}|{obj}".encode())
    else:
        raise QfvTypeError(f"{where}: a {type(obj).__name__} cannot be stored (tensors, numbers, "
                           "strings, lists and dicts only)")


def content_digest(payload: dict) -> str:
    """SHA-256 of a saved dict's contents (every tensor's dtype, shape and bytes, every value),
    independent of how ``torch.save`` laid them out; its own ``sha256`` entry excluded.
    ``TypeError`` for values other than tensors, numbers, strings, lists and dicts."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"}, "payload")
    return h.hexdigest()


# -- atomic folders -----------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
#: errors of renameat2 that mean "not here" (no such call, or the file system cannot)
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2(a, b, flags)``; False where the system or the file system has no
    such call (the caller falls back), True when done, else the ``OSError`` (naming ``b``)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if the system
    or file system cannot, so the caller falls back to two renames."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless something is at ``dst`` (then ``FileExistsError``), in
    one step: ``renameat2(RENAME_NOREPLACE)``; where the system has none, a hard link (which
    never replaces either) and an unlink; where the file system has no hard links (a folder,
    FAT), a look and a rename, the one case with a window in between."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # no hard links here
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _umask() -> int:
    try:  # Linux: read it, as setting it to read it back is not thread-safe
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _sync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync_dir(Path(dirpath))


def _swap_in_dir(tmp: Path, target: Path, given: Path, overwrite: bool,
                 replaceable: Optional[Callable[[Path], Optional[str]]]) -> None:
    """The finished folder ``tmp`` put in place of ``target``, looked at again first: what is
    there now must still be a folder that may be replaced; where nothing is, the rename
    refuses to replace what appears in between. Afterwards ``tmp`` holds the old content."""
    st = _lstat(target, given)
    if st is None:
        try:
            _rename_noreplace(tmp, target)
        except FileExistsError:
            raise OutputError(f"output folder {given} appeared while it was being written; "
                              f"{_HINT}") from None
        _fsync_dir(target.parent)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output folder {given} is now {_kind(st.st_mode)}, not a folder "
                          "(it changed while the output was being written): not replaced")
    if any(target.iterdir()):
        if not overwrite:
            raise OutputError(f"output folder {given} appeared while it was being written; "
                              f"{_HINT}")
        reason = replaceable(target) if replaceable is not None else None
        if reason:
            raise OutputError(f"output folder {given} is not replaced: {reason}")
    if not _exchange(tmp, target):
        old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        os.rename(old, tmp)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, overwrite: bool = False, inputs: Iterable = (),
               replaceable: Optional[Callable[[Path], Optional[str]]] = None) -> Iterator[Path]:
    """A temporary folder beside ``path``; when the block succeeds it replaces ``path`` as a
    whole (the old folder, if any, is removed), so ``path`` holds the old or the new content,
    never a mix. On failure the temporary folder is removed and ``path`` is untouched."""
    given = Path(path)
    target = check_output(path, overwrite=overwrite, inputs=inputs, kind="dir",
                          replaceable=replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        try:
            yield tmp
            _sync_tree(tmp)
        except OSError as e:  # name the output folder, not its hidden temporary one
            raise _named(e, {str(tmp): str(given)}, str(given)) from e
        with deferred_interrupts():
            try:
                _swap_in_dir(tmp, target, given, overwrite, replaceable)
            except OSError as e:
                raise _named(e, {str(tmp): str(given), str(target): str(given)},
                             str(given)) from e
            shutil.rmtree(tmp, ignore_errors=True)  # the old content, before any interrupt
    finally:
        with deferred_interrupts():
            shutil.rmtree(tmp, ignore_errors=True)
