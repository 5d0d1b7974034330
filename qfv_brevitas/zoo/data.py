"""Datasets: scikit-learn's bundled 8x8 digits, MNIST-family IDX files on disk, and a
byte-level text corpus made of the running Python's own standard library sources.

Nothing here downloads anything. ``digits`` ships with scikit-learn; ``idx`` reads the four
IDX files of MNIST, Fashion-MNIST, KMNIST (or any dataset in the same format) from a folder,
including torchvision's ``<root>/<Name>/raw`` layout; :func:`load_stdlib_text` reads the
``.py`` files every CPython installation has (:func:`stdlib_text_files`). Installed plugins (entry point group
``qfv_brevitas.datasets``) and a user's ``module:function`` add data sets
(:func:`user_dataset`).
"""
from __future__ import annotations

import gzip
import hashlib
import math
import struct
import sysconfig
import zlib
from pathlib import Path
from typing import BinaryIO, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from qfv_brevitas.util.budgets import MAX_DEFLATE_RATIO, deflate_limit, read_exactly
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.plugins import (DATASETS_GROUP, call_accepting, import_user_object,
                                       is_user_spec, load_plugin, plugin_names)

__all__ = [
    "DataError",
    "DATASETS",
    "MAX_IDX_BYTES",
    "IDX_FILES",
    "load_digits_split",
    "read_idx",
    "load_idx_split",
    "load_dataset",
    "check_labels",
    "fingerprint",
    "dataset_names",
    "user_dataset",
    "stdlib_text_files",
    "stdlib_text",
    "load_stdlib_text",
    "text_windows",
    "TEXT_EXCLUDED_DIRS",
]

PathLike = Union[str, Path]

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits", "idx")

#: The four files of an MNIST-family dataset, each optionally followed by ``.gz``.
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(QfvError):
    """A dataset file is missing, unreadable or does not hold what it should."""


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> Tuple[TensorDataset, TensorDataset]:
    """Stratified train/test split of scikit-learn's bundled 8x8 digits (1797 images, 10 classes).

    Images are float32 tensors of shape ``(N, 1, 8, 8)`` in ``[0, 1]`` (pixel values / 16),
    labels int64. The split is ``train_test_split(random_state=seed, stratify=labels)``, so the
    same ``seed`` always gives the same split.

    Args:
        seed: random state of the split.
        test_fraction: share of the samples put in the test set, strictly between 0 and 1.
    """
    if not isinstance(test_fraction, (int, float)) or not 0.0 < float(test_fraction) < 1.0:
        raise QfvError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(digits.target, dtype=np.int64)
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=float(test_fraction), random_state=seed, stratify=y
        )
    except ValueError as exc:  # e.g. a test set smaller than the number of classes
        raise QfvError(
            f"cannot split the digits data set with test_fraction={test_fraction!r}: {exc}; "
            "choose a test_fraction that leaves at least one sample per class on each side"
        ) from exc
    return (
        TensorDataset(torch.from_numpy(np.ascontiguousarray(x_tr)), torch.from_numpy(y_tr)),
        TensorDataset(torch.from_numpy(np.ascontiguousarray(x_te)), torch.from_numpy(y_te)),
    )


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------


#: The most an IDX file's payload may declare (its header's dimensions times the item size):
#: 1 GiB holds EMNIST ByClass' training images (0.55 GB), the largest of the MNIST family.
#: A gzipped file must also be able to hold it: at most MAX_DEFLATE_RATIO times its bytes.
MAX_IDX_BYTES = 1 << 30


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (plain, or gzipped when its name ends in ``.gz``) into a numpy array.

    The header is two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), the number of dimensions, then one big-endian uint32 per
    dimension; the payload follows in big-endian, row-major order. The result is a writable
    array in native byte order.

    Budgets before work: the header is read first (from the gzip stream for ``.gz``), the
    payload size it implies is checked against :data:`MAX_IDX_BYTES`, against the file's size
    (plain) or what its compressed bytes can hold (gzip, at most
    :data:`~qfv_brevitas.util.budgets.MAX_DEFLATE_RATIO` times), and then exactly that many
    bytes are read into one buffer (and one more tried, to notice trailing data): nothing is
    inflated beyond what the header announced.

    Raises:
        DataError: the file is missing, too short, has a bad magic number or type code, is
            corrupt gzip, declares a payload over the cap or larger than the file can hold,
            or its payload size does not match its dimensions.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            return _read_idx_stream(fh, path, size, path.suffix == ".gz")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found; check the path or download the data set") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{path}: is a directory, expected an IDX file") from exc
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path}: corrupt or truncated gzip data ({exc}); delete the file and download it again"
        ) from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc})") from exc


def _idx_header(fh: BinaryIO, path: Path) -> Tuple[np.dtype, Tuple[int, ...], int]:
    """``(dtype, dims, header bytes)`` read from the start of the (inflated) stream."""
    raw = fh.read(4)
    if len(raw) < 4:
        raise DataError(
            f"{path}: file too short ({len(raw)} bytes) to hold an IDX header (at least 4 bytes); "
            "the file is truncated, download it again"
        )
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        hint = (
            "; it looks gzipped, give it a .gz suffix"
            if raw[:2] == b"\x1f\x8b"
            else "; this is not an IDX file"
        )
        raise DataError(
            f"{path}: bad magic number {raw[:4].hex()} (an IDX file starts with two zero bytes){hint}"
        )
    if code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_TYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X}; expected one of {known}")
    header = 4 + 4 * ndim
    raw += fh.read(4 * ndim)
    if len(raw) < header:
        raise DataError(
            f"{path}: file too short ({len(raw)} bytes) for an IDX header with {ndim} dimensions "
            f"({header} bytes); the file is truncated, download it again"
        )
    return _IDX_TYPES[code], struct.unpack(f">{ndim}I", raw[4:header]), header


def _read_idx_stream(fh: BinaryIO, path: Path, size: int, gzipped: bool) -> np.ndarray:
    """The array of an open IDX stream (:func:`read_idx`), its payload checked before it is
    read; ``size``: the file's bytes (compressed, for gzip)."""
    dtype, dims, header = _idx_header(fh, path)
    expected = math.prod(dims) * dtype.itemsize
    need = (f"dimensions {tuple(dims)} of {dtype.itemsize}-byte items need {expected} bytes")
    if expected > MAX_IDX_BYTES:
        raise DataError(f"{path}: its header declares a payload too large to read: {need}, "
                        f"more than the {MAX_IDX_BYTES} an IDX file may hold")
    if gzipped and header + expected > deflate_limit(size):
        raise DataError(f"{path}: its header declares more than its {size} compressed bytes "
                        f"can hold ({need}; deflate expands at most {MAX_DEFLATE_RATIO}x); "
                        "the file is corrupt, download it again")
    if not gzipped and size - header != expected:
        raise DataError(
            f"{path}: payload is {size - header} bytes but {need}; the file is truncated or "
            "corrupt, download it again"
        )
    buf, got, more = read_exactly(fh, expected)
    if got < expected:
        raise DataError(f"{path}: payload is {got} bytes but {need}; the file is truncated or "
                        "corrupt, download it again")
    if more:
        raise DataError(f"{path}: payload is more than {expected} bytes: {need}; the file is "
                        "corrupt, download it again")
    data = np.frombuffer(buf, dtype=dtype).reshape(dims)
    native = dtype.newbyteorder("=")
    if native != dtype:  # big-endian to native in place: no second copy
        data = data.byteswap(inplace=True)
    return data.view(native)


def _candidate_dirs(data_dir: Path) -> List[Path]:
    """``data_dir``, ``data_dir/raw`` and every ``data_dir/<Name>/raw``, in that order."""
    dirs = [data_dir, data_dir / "raw"]
    try:
        subdirs = sorted(p for p in data_dir.iterdir() if p.is_dir() and p.name != "raw")
    except OSError:
        subdirs = []
    dirs += [p / "raw" for p in subdirs if (p / "raw").is_dir()]
    return [d for d in dirs if d.is_dir()]


def _find_file(directory: Path, name: str) -> Optional[Path]:
    """``directory/name``, else ``directory/name.gz``, else ``None``."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate_idx_files(data_dir: Path) -> List[Path]:
    """Paths of the four :data:`IDX_FILES`, all from the same folder."""
    if not data_dir.is_dir():
        raise DataError(
            f"{data_dir}: data directory does not exist or is not a directory; pass the folder "
            f"holding {', '.join(IDX_FILES)} (optionally .gz), or its torchvision root"
        )
    dirs = _candidate_dirs(data_dir)
    found = {d: [_find_file(d, n) for n in IDX_FILES] for d in dirs}
    complete = [d for d in dirs if all(found[d])]
    top = [d for d in complete if d in (data_dir, data_dir / "raw")]
    if top:
        return list(found[top[0]])  # type: ignore[arg-type]
    if len(complete) == 1:
        return list(found[complete[0]])  # type: ignore[arg-type]
    if len(complete) > 1:
        raise DataError(
            f"{data_dir}: several data sets found ({', '.join(str(d) for d in complete)}); "
            "pass the one you want as data_dir"
        )
    best = max(dirs, key=lambda d: sum(p is not None for p in found[d]))
    missing = [n for n, p in zip(IDX_FILES, found[best]) if p is None]
    raise DataError(
        f"{data_dir}: missing IDX files {', '.join(missing)} (with or without .gz) in {best}; "
        f"looked in {', '.join(str(d) for d in dirs)}; put the four files "
        f"{', '.join(IDX_FILES)} in one of these folders"
    )


def _images_to_tensor(images: np.ndarray, path: Path) -> torch.Tensor:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{path}: expected 3-D uint8 images (N, H, W), got {images.ndim}-D {images.dtype} "
            f"with shape {images.shape}; is this an images file?"
        )
    return torch.from_numpy(images.astype(np.float32)[:, None, :, :] / np.float32(255.0))


def _labels_to_tensor(labels: np.ndarray, path: Path) -> torch.Tensor:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: expected 1-D integer labels, got {labels.ndim}-D {labels.dtype} "
            f"with shape {labels.shape}; is this a labels file?"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 255):
        raise DataError(
            f"{path}: labels must lie in 0..255, found {int(labels.min())}..{int(labels.max())}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def load_idx_split(
    data_dir: PathLike, seed: int = 0
) -> Tuple[TensorDataset, TensorDataset, int]:
    """Train and test sets of an MNIST-family data set stored as IDX files.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) in ``data_dir``, ``data_dir/raw``
    and ``data_dir/<Name>/raw`` (torchvision's layout). Images become float32 tensors of shape
    ``(N, 1, H, W)`` in ``[0, 1]`` (pixel / 255), labels int64.

    Args:
        data_dir: folder holding the files, or a torchvision root above it.
        seed: unused, since the files fix the train/test split; kept so every loader takes
            the same arguments as :func:`load_digits_split`.

    Returns:
        ``(train, test, num_classes)`` with ``num_classes = max label + 1``.
    """
    del seed  # the split is fixed by the files
    tr_img_p, tr_lab_p, te_img_p, te_lab_p = _locate_idx_files(Path(data_dir))
    sets = []
    for img_p, lab_p in ((tr_img_p, tr_lab_p), (te_img_p, te_lab_p)):
        images = _images_to_tensor(read_idx(img_p), img_p)
        labels = _labels_to_tensor(read_idx(lab_p), lab_p)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{img_p} holds {images.shape[0]} images but {lab_p} holds {labels.shape[0]} "
                "labels; the files do not belong together or one is damaged"
            )
        sets.append((img_p, images, labels))
    (tr_p, tr_x, tr_y), (te_p, te_x, te_y) = sets
    if tr_x.shape[1:] != te_x.shape[1:]:
        raise DataError(
            f"{tr_p} holds {tuple(tr_x.shape[2:])} images but {te_p} holds "
            f"{tuple(te_x.shape[2:])} images; the files come from different data sets"
        )
    if tr_y.numel() == 0:
        raise DataError(f"{tr_lab_p}: holds no labels; the training set is empty")
    if te_y.numel() == 0:
        raise DataError(f"{te_lab_p}: holds no labels; the test set is empty, so no accuracy "
                        "could be measured")
    num_classes = check_labels(tr_y, te_y, str(tr_lab_p), str(te_lab_p))
    return TensorDataset(tr_x, tr_y), TensorDataset(te_x, te_y), num_classes


def check_labels(train_labels: torch.Tensor, test_labels: torch.Tensor, train_where: str,
                 test_where: str) -> int:
    """The number of classes K of integer labels ``0..K-1``; a :class:`DataError` naming the
    file and the label if a class in ``0..K-1`` never occurs in the training labels (a stray
    label, e.g. 200 among digits 0..9, would otherwise make a 201-class model) or a test label
    is not one of the training classes."""
    k = int(train_labels.max()) + 1
    counts = torch.bincount(train_labels, minlength=k)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        top = int(train_labels.max())
        at = int((train_labels == top).nonzero()[0])
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{train_where}: labels must be 0..K-1 with every class in the training set, but "
            f"classes {shown} never occur while label {top} does (first at index {at}); fix or "
            "remove the stray labels"
        )
    bad = ((test_labels < 0) | (test_labels >= k)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise DataError(
            f"{test_where}: label {int(test_labels[i])} at index {i} is not one of the "
            f"training classes 0..{k - 1}"
        )
    return k


def fingerprint(train: TensorDataset, test: TensorDataset) -> str:
    """SHA-256 of a split's images and labels: stored in a checkpoint, it tells later commands
    whether they were given the data the model was trained on."""
    h = hashlib.sha256()
    for ds in (train, test):
        for t in ds.tensors:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str, data_dir: Optional[PathLike] = None, seed: int = 0
) -> Tuple[TensorDataset, TensorDataset, int, Tuple[int, int, int]]:
    """Load a data set by name.

    Args:
        name: ``"digits"`` (scikit-learn's 8x8 digits, stratified split by ``seed``) or
            ``"idx"`` (MNIST-family IDX files in ``data_dir``, see :func:`load_idx_split`).
        data_dir: folder of the IDX files; required for ``"idx"``, ignored for ``"digits"``.
        seed: split seed (``"digits"`` only).

    Returns:
        ``(train, test, num_classes, input_shape)`` with ``input_shape = (C, H, W)``.
    """
    if name == "digits":
        train, test = load_digits_split(seed=seed)
        num_classes = 10
    elif name == "idx":
        if data_dir is None:
            raise QfvError(
                "data set 'idx' needs data_dir: the folder holding the MNIST-family IDX files "
                f"({', '.join(IDX_FILES)}, optionally .gz) or its torchvision root"
            )
        train, test, num_classes = load_idx_split(data_dir, seed=seed)
    elif is_user_spec(name):
        return user_dataset(import_user_object(name, "--data"), name, data_dir, seed)
    elif name in dataset_names():
        return user_dataset(load_plugin(DATASETS_GROUP, name, _callable_builder), name,
                            data_dir, seed)
    else:
        raise QfvError(f"unknown data set {name!r}; choose one of "
                       f"{', '.join(dataset_names())}")
    c, h, w = train.tensors[0].shape[1:]
    return train, test, num_classes, (int(c), int(h), int(w))


# --------------------------------------------------------------------------------------------
# A user's data sets: plugins and module:function
# --------------------------------------------------------------------------------------------


#: the most classes a user's data set may have (its labels size the model's last layer)
MAX_USER_CLASSES = 1 << 16


def dataset_names() -> Tuple[str, ...]:
    """The built-in data sets, then the installed plugins' (their code is not imported)."""
    return DATASETS + plugin_names(DATASETS_GROUP, DATASETS)


def _callable_builder(name: str, obj):
    """A plugin's data set builder, checked to be callable (:func:`load_plugin`)."""
    if not callable(obj):
        raise QfvError(f"a data set plugin names a builder function, got a "
                       f"{type(obj).__name__}")
    return obj


def _as_tensors(ds, name: str, part: str) -> TensorDataset:
    """``ds`` (a Dataset of ``(input, label)`` pairs) as one in-memory TensorDataset: float32
    inputs of one shape, int64 labels."""
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        xs, ys = ds.tensors
    elif isinstance(ds, Dataset) and hasattr(ds, "__len__"):
        try:
            pairs = [ds[i] for i in range(len(ds))]
            xs = torch.stack([torch.as_tensor(p[0]) for p in pairs])
            ys = torch.as_tensor([int(p[1]) for p in pairs])
        except Exception as e:  # the user's data: say where it failed
            raise DataError(f"data set {name!r}: its {part} set is not (input, integer label) "
                            f"pairs of one input shape: {type(e).__name__}: "
                            f"{str(e).strip()[:200]}") from e
    else:
        raise DataError(f"data set {name!r}: its {part} set is a {type(ds).__name__}, not a "
                        "torch Dataset with a length")
    if xs.ndim < 2 or len(xs) == 0 or len(xs) != len(ys) or ys.ndim != 1:
        raise DataError(f"data set {name!r}: its {part} set holds {tuple(xs.shape)} inputs and "
                        f"{tuple(ys.shape)} labels; expected N >= 1 samples with one integer "
                        "label each")
    if ys.is_floating_point() or ys.dtype == torch.bool or not xs.is_floating_point() \
            and xs.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32):
        raise DataError(f"data set {name!r}: its {part} set has {xs.dtype} inputs and "
                        f"{ys.dtype} labels; expected numeric inputs and integer labels")
    if int(ys.min()) < 0 or int(ys.max()) >= MAX_USER_CLASSES:
        raise DataError(f"data set {name!r}: its {part} labels lie in {int(ys.min())}.."
                        f"{int(ys.max())}; expected class numbers 0..K-1 (K at most "
                        f"{MAX_USER_CLASSES})")
    return TensorDataset(xs.to(torch.float32), ys.to(torch.int64))


def user_dataset(builder, name: str, data_dir: Optional[PathLike] = None, seed: int = 0
                 ) -> Tuple[TensorDataset, TensorDataset, int, Tuple[int, ...]]:
    """The data set a user's ``builder`` makes, as :func:`load_dataset` returns it. The
    builder is called with ``data_dir=`` and ``seed=`` (those of the two it names) and
    returns ``(train, test)`` torch Datasets of ``(input, integer label)`` pairs, or a dict
    with those two keys. Both are read into memory once (TensorDatasets: float32 inputs,
    int64 labels); the labels must be ``0..K-1`` with every class in the training set.

    >>> x, y = torch.rand(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> user_dataset(lambda: (TensorDataset(x, y), TensorDataset(x, y)), "mine")[2:]
    (3, (2,))
    """
    try:
        made = call_accepting(builder, data_dir=None if data_dir is None else str(data_dir),
                              seed=int(seed))
    except QfvError:
        raise
    except Exception as e:  # the user's code failed: say whose, not "a bug in qfv"
        raise DataError(f"data set {name!r}: its builder raised {type(e).__name__}: "
                        f"{str(e).strip()[:300]}") from e
    if isinstance(made, dict) and {"train", "test"} <= set(made):
        made = (made["train"], made["test"])
    if not isinstance(made, (tuple, list)) or len(made) != 2:
        raise DataError(f"data set {name!r}: its builder returned a {type(made).__name__}; "
                        "expected (train, test) torch Datasets or a dict with 'train' and "
                        "'test'")
    train, test = (_as_tensors(d, name, part) for d, part in zip(made, ("training", "test")))
    if train.tensors[0].shape[1:] != test.tensors[0].shape[1:]:
        raise DataError(f"data set {name!r}: training inputs of shape "
                        f"{tuple(train.tensors[0].shape[1:])} but test inputs of shape "
                        f"{tuple(test.tensors[0].shape[1:])}")
    k = check_labels(train.tensors[1], test.tensors[1], f"data set {name!r} (training labels)",
                     f"data set {name!r} (test labels)")
    return train, test, k, tuple(int(d) for d in train.tensors[0].shape[1:])


# --------------------------------------------------------------------------------------------
# Real text on every machine: the standard library's own Python sources, as bytes
# --------------------------------------------------------------------------------------------


#: folders of the standard library left out of the text corpus: test suites (generated and
#: repetitive), the IDLE editor and demos, vendored/third-party or deprecated packages
TEXT_EXCLUDED_DIRS = ("test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3",
                      "ensurepip", "distutils", "site-packages", "dist-packages", "__pycache__")
#: one in this many files (by a CRC-32 of its path) is validation text
TEXT_VALIDATION_ONE_IN = 20
#: a standard-library source larger than this is refused (the largest is about 0.2 MB)
MAX_TEXT_FILE_BYTES = 8 << 20


def stdlib_text_files(root: Optional[PathLike] = None) -> List[Tuple[str, Path]]:
    """The corpus' files: every ``*.py`` under the running interpreter's standard library
    folder (``sysconfig.get_paths()["stdlib"]``, or ``root``), except the folders of
    :data:`TEXT_EXCLUDED_DIRS` and ``test_*.py`` files, as ``(relative POSIX path, path)``
    sorted by relative path. Symbolic links are skipped. The set depends on the Python
    version (3.11.7 here: 528 files, 10.4 MB); :func:`stdlib_text` returns a fingerprint."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise DataError(f"{base}: the standard library folder is not a folder")
    out = []
    for p in base.rglob("*.py"):
        rel = p.relative_to(base)
        if p.is_symlink() or p.name.startswith("test_") or \
                set(rel.parts[:-1]) & set(TEXT_EXCLUDED_DIRS):
            continue
        out.append((rel.as_posix(), p))
    if not out:
        raise DataError(f"{base}: no Python sources found for the text corpus")
    return sorted(out)


def stdlib_text(root: Optional[PathLike] = None) -> Tuple[bytes, bytes, str]:
    """``(train bytes, validation bytes, fingerprint)``: the files of
    :func:`stdlib_text_files` split by file (a file is validation text when the CRC-32 of its
    relative path is divisible by :data:`TEXT_VALIDATION_ONE_IN`, so the split never depends
    on which other files exist), each part the concatenation of its files in path order, each
    file followed by a NUL byte. The fingerprint is a SHA-256 of both parts."""
    from qfv_brevitas.util.budgets import read_regular

    parts: Tuple[list, list] = ([], [])
    for rel, path in stdlib_text_files(root):
        data = read_regular(path, str(path), MAX_TEXT_FILE_BYTES, error=DataError,
                            what="a Python source", follow_links=False)
        parts[zlib.crc32(rel.encode()) % TEXT_VALIDATION_ONE_IN == 0].append(data + b"\0")
    train, val = b"".join(parts[0]), b"".join(parts[1])
    if not train or not val:
        raise DataError("the standard library text corpus needs files in both parts; found "
                        f"{len(parts[0])} training and {len(parts[1])} validation files")
    h = hashlib.sha256()
    for part in (train, val):
        h.update(len(part).to_bytes(8, "little") + part)
    return train, val, h.hexdigest()


def text_windows(text: bytes, context: int, count: Optional[int] = None,
                 seed: int = 0) -> TensorDataset:
    """Next-byte prediction windows of ``text``: ``(x, y)`` with ``x`` the byte values of a
    window of ``context`` bytes and ``y`` the same window shifted by one byte (int64,
    ``(n, context)`` each). ``count=None``: every non-overlapping window from the start
    (evaluation); else ``count`` windows at random starts drawn with ``seed`` (training)."""
    context = int(context)
    if context < 1:
        raise DataError(f"text windows need a context of at least 1 byte, got {context}")
    if len(text) < context + 1:
        raise DataError(f"text of {len(text)} bytes is too short for windows of {context}+1")
    buf = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    if count is None:
        starts = torch.arange(0, len(text) - context, context)
    else:
        gen = torch.Generator().manual_seed(int(seed))
        starts = torch.randint(0, len(text) - context, (int(count),), generator=gen)
    idx = starts[:, None] + torch.arange(context + 1)
    win = buf[idx].long()
    return TensorDataset(win[:, :-1].contiguous(), win[:, 1:].contiguous())


def load_stdlib_text(context: int = 128, train_windows: int = 4096, val_bytes: int = 1 << 18,
                     seed: int = 0, root: Optional[PathLike] = None
                     ) -> Tuple[TensorDataset, TensorDataset, str]:
    """The byte-level language-modelling split of :func:`stdlib_text`:
    ``(train, validation, fingerprint)``. ``train``: ``train_windows`` windows of ``context``
    bytes at random starts in the training files (``seed``); ``validation``: the
    non-overlapping windows of the first ``val_bytes`` bytes of the validation files
    (``None``: all of them). Targets are the next bytes (:func:`text_windows`)."""
    train, val, fp = stdlib_text(root)
    if val_bytes is not None:
        val = val[: int(val_bytes) + 1]
    return text_windows(train, context, train_windows, seed), text_windows(val, context), fp
