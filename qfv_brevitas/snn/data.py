"""Data for spiking models: rate-coded digits, small synthetic event tensors, and CIFAR10-DVS /
N-Caltech101 through spikingjelly's own dataset classes when the data is on disk.

Nothing here downloads anything: a neuromorphic dataset folder that spikingjelly would have to
fetch is refused with an error that says what to put where.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from qfv_brevitas.zoo.data import DataError, load_dataset, load_digits_split
from qfv_brevitas.snn.config import SpikingConfig
from qfv_brevitas.snn.neurons import rate_encode
from qfv_brevitas.util.budgets import (MAX_NPZ_BYTES, MAX_SPIKING_VALUES, MAX_TIME_STEPS,
                                       check_npy, check_npz)
from qfv_brevitas.util.errors import QfvError

__all__ = ["SNN_DATASETS", "NEUROMORPHIC", "SNNData", "rate_coded_digits", "synthetic_events",
           "ResizeFrames", "load_neuromorphic", "stratified_split", "load_snn_dataset"]

PathLike = Union[str, Path]

#: Data sets of :func:`load_snn_dataset`: static images (rate-coded inside the model) and
#: event data (frames with their own time axis).
SNN_DATASETS = ("digits", "idx", "synthetic", "cifar10dvs", "ncaltech101")
#: spikingjelly class name, files it expects in ``<root>/download``, and a few class folders
#: that identify an extracted copy, per neuromorphic data set.
NEUROMORPHIC = {
    "cifar10dvs": ("CIFAR10DVS", ("airplane.zip", "automobile.zip", "bird.zip", "cat.zip",
                                  "deer.zip", "dog.zip", "frog.zip", "horse.zip", "ship.zip",
                                  "truck.zip"), ("airplane", "automobile", "truck")),
    "ncaltech101": ("NCaltech101", ("Caltech101.zip", "Caltech101_annotations.zip"),
                    ("accordion", "airplanes", "Faces_easy")),
}


class SNNData(NamedTuple):
    """A train/test pair with what a model needs to know about it."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: Tuple[int, ...]  # one sample without time: (C, H, W)
    temporal: bool  # samples carry their own time axis (N, T, C, H, W batches)


def rate_coded_digits(seed: int = 0, T: int = SpikingConfig.T, encode_seed: int = 0
                      ) -> Tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits (split as :func:`qfv_brevitas.zoo.data.load_digits_split`) turned into
    fixed rate-coded spike trains: samples of shape ``(T, 1, 8, 8)`` with values in {0, 1}
    (batches ``(N, T, 1, 8, 8)``: ``layout="batch_first"``, ``encoding="none"``).

    A model with ``encoding="rate"`` does the same coding on the fly, with fresh spikes each
    epoch; this fixed version is for inspecting the spikes or feeding other tools.

    >>> train, test = rate_coded_digits(T=4)
    >>> x, y = train[0]
    >>> tuple(x.shape), sorted(x.unique().tolist())
    ((4, 1, 8, 8), [0.0, 1.0])
    """
    train, test = load_digits_split(seed=seed)
    g = torch.Generator().manual_seed(encode_seed)
    out = []
    for ds in (train, test):
        x, y = ds.tensors
        out.append(TensorDataset(rate_encode(x, T, generator=g).transpose(0, 1).contiguous(), y))
    return out[0], out[1]


def _square(size: int, cx: int, cy: int, half: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[max(cy - half, 0):max(cy + half + 1, 0), max(cx - half, 0):max(cx + half + 1, 0)] = True
    return m


_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


def synthetic_events(num_samples: int = 256, T: int = SpikingConfig.T, size: int = 16, num_classes: int = 4,
                     seed: int = 0, noise: float = 0.01) -> TensorDataset:
    """Small event-camera-like data: a 3x3 square moving one of ``num_classes`` directions
    (right, left, down, up, then the diagonals) at 1 or 2 pixels per step. Each frame has two
    polarity channels: ON where the square arrived, OFF where it left, plus random noise events
    at rate ``noise``. Samples ``(T, 2, size, size)`` in {0, 1}, labels the direction.

    >>> ds = synthetic_events(8, T=3, size=12, seed=1)
    >>> tuple(ds.tensors[0].shape), ds.tensors[1].tolist()[:4]
    ((8, 3, 2, 12, 12), [0, 1, 2, 3])
    """
    if not 1 <= int(num_classes) <= len(_DIRECTIONS):
        raise QfvError(f"num_classes must lie in 1..{len(_DIRECTIONS)}, got {num_classes}")
    if int(T) < 1:
        raise QfvError(f"T must be >= 1 time steps, got {T}")
    if int(num_samples) < 1:
        raise QfvError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 <= noise < 1:
        raise QfvError(f"noise must lie in [0, 1), got {noise}")
    span = 2 * (T - 1) + 3  # the square's travel at the top speed
    if size < span + 2:
        raise QfvError(f"size {size} is too small for T={T}: the square travels {span} "
                       f"pixels; use size >= {span + 2}")
    rng = np.random.default_rng(seed)
    x = np.zeros((num_samples, T, 2, size, size), dtype=np.float32)
    y = np.arange(num_samples) % num_classes  # balanced classes
    for i in range(num_samples):
        dx, dy = _DIRECTIONS[y[i]]
        speed = int(rng.integers(1, 3))
        # Start anywhere the square stays inside the frame over its whole path.
        cx, cy = (int(rng.integers(1 - min(0, d * speed * (T - 1)),
                                   size - 1 - max(0, d * speed * (T - 1))))
                  for d in (dx, dy))
        prev = np.zeros((size, size), dtype=bool)
        for t in range(T):
            cur = _square(size, cx + dx * speed * t, cy + dy * speed * t, 1)
            x[i, t, 0] = cur & ~prev
            x[i, t, 1] = prev & ~cur
            prev = cur
    if noise > 0:
        x = np.maximum(x, (rng.random(x.shape) < noise).astype(np.float32))
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))


class ResizeFrames:
    """Transform of spikingjelly frames ``(T, 2, H, W)`` (numpy) to a float tensor
    ``(T, 2, size, size)`` by bilinear resizing (the paper's 48x48).

    >>> ResizeFrames(4)(np.ones((2, 2, 8, 8), dtype=np.float32)).shape
    torch.Size([2, 2, 4, 4])
    """

    def __init__(self, size: int = 48):
        if int(size) < 1:
            raise QfvError(f"frame size must be >= 1, got {size}")
        self.size = int(size)

    def __call__(self, frames) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(frames, dtype=np.float32))
        if x.dim() != 4:
            raise DataError(f"expected frames of shape (T, 2, H, W), got {tuple(x.shape)}")
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                             align_corners=False)


def stratified_split(targets: Sequence[int], train_fraction: float = 0.9, seed: int = 0
                     ) -> Tuple[List[int], List[int]]:
    """Indices of a seeded per-class split (the paper's 9:1 train/validation split).

    >>> tr, te = stratified_split([0] * 10 + [1] * 10, 0.9, seed=0)
    >>> len(tr), len(te), sorted(set(range(20)) - set(tr)) == sorted(te)
    (18, 2, True)
    """
    if not 0 < train_fraction < 1:
        raise QfvError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction}")
    targets = np.asarray(list(targets))
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * train_fraction))
        k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else len(idx)
        train += idx[:k].tolist()
        test += idx[k:].tolist()
    return sorted(train), sorted(test)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _has_npz_classes(folder: Path) -> bool:
    return folder.is_dir() and any(
        d.is_dir() and any(d.glob("*.np[yz]")) for d in folder.iterdir())


def _check_layout(name: str, root: Path, T: int) -> Optional[Path]:
    """Refuse any folder that would make spikingjelly download or fail half-way; returns the
    ``download`` folder when the archives still have to be checked and converted."""
    _, archives, some_classes = NEUROMORPHIC[name]
    frames = f"frames_number_{T}_split_by_number"
    expected = (f"expected spikingjelly's layout under {root}: events_np/<class>/*.npz (the "
                f"converted events; {frames}/<class>/*.npz frames beside it are used as they "
                f"are), or download/ holding the original archives ({', '.join(archives)}), "
                "which are then extracted and converted once")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; {expected}")
    events = root / "events_np"
    if events.is_dir():
        if not (_has_npz_classes(events) or _has_npz_classes(root / frames)):
            raise DataError(f"{events} holds no <class>/*.npz files (an interrupted "
                            f"conversion?); delete it and convert again; {expected}")
        marker = root / "events_np.building"
        if marker.exists():
            raise DataError(f"{marker} marks an unfinished conversion: delete {events} and "
                            "the marker, then convert again")
        return None
    if root.name == "events_np" or root.name.startswith("frames_number_"):
        raise DataError(f"{root} is spikingjelly's {root.name} folder itself: pass its parent "
                        "folder")
    if _has_npz_classes(root / frames):
        raise DataError(f"{root} has {frames}/ but no events_np/: spikingjelly would try to "
                        f"download the events. Create the empty folder {events} to use the "
                        "frames as they are")
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    if set(some_classes) & subdirs:
        raise DataError(f"{root} holds class folders directly ({', '.join(sorted(subdirs)[:3])}, "
                        "...): spikingjelly reads converted events from "
                        f"{events}/<class>/*.npz, or raw recordings from {root}/extract/"
                        f"<class>/ next to {root}/download/; move them there")
    if any((root / a).is_file() for a in archives):
        raise DataError(f"{root} holds the archives directly: move {', '.join(archives)} into "
                        f"{root / 'download'}")
    download = root / "download"
    if not download.is_dir():
        raise DataError(f"{root}: no events_np/ or download/ folder; {expected}")
    missing = [a for a in archives if not (download / a).is_file()]
    if missing:
        raise DataError(f"{download} lacks {', '.join(missing)}: put every archive there "
                        "(nothing is downloaded for you)")
    return download


def _check_arrays(root: Path, T: int) -> int:
    """Check every array file spikingjelly would ``np.load`` (``events_np/<class>/*.np[yz]``
    and the frames folder for ``T``) before it does: numpy allocates an array's declared shape
    before reading it and inflates ``.npz`` members, so each file's zip layout and array
    headers must agree with its bytes and stay within
    :data:`~qfv_brevitas.util.budgets.MAX_NPZ_BYTES` (:func:`~qfv_brevitas.util.budgets.check_npz`).
    Reads headers only; returns the number of files checked."""
    n = 0
    for folder in (root / "events_np", root / f"frames_number_{T}_split_by_number"):
        if not folder.is_dir():
            continue
        for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
            for f in sorted(sub.glob("*.np[yz]")):
                check = check_npz if f.suffix == ".npz" else check_npy
                check(f, str(f), MAX_NPZ_BYTES, DataError)
                n += 1
    return n


def _check_archives(download: Path, cls) -> None:
    """spikingjelly re-downloads an archive whose MD5 is wrong: refuse it here instead."""
    bad = [a for a, _, m in cls.resource_url_md5()
           if not (download / a).is_file() or _md5(download / a) != m]
    if bad:
        raise DataError(f"{download}: {', '.join(bad)} missing or not matching their published "
                        "MD5 (truncated or corrupt); download them again")


def _dataset_class(name: str):
    from qfv_brevitas.snn.neurons import spikingjelly

    spikingjelly()
    try:
        import spikingjelly.datasets as sjd
    except (ImportError, RuntimeError) as e:  # CPU torch: torchvision's nms operator is missing
        raise DataError(
            f"spikingjelly's dataset classes need a working torchvision and torchaudio "
            f"matching your torch ({type(e).__name__}: {e}); install them, e.g. "
            "pip install torchvision torchaudio from the index your torch came from") from e
    return getattr(sjd, NEUROMORPHIC[name][0])


def load_neuromorphic(name: str, root: PathLike, T: int = 10, size: int = 48,
                      train_fraction: float = 0.9, seed: int = 0) -> SNNData:
    """CIFAR10-DVS or N-Caltech101 through spikingjelly's own dataset class, as in the paper:
    events integrated into ``T`` frames (split by event count), resized to ``size`` x ``size``,
    a seeded per-class ``train_fraction`` : rest split.

    ``root`` is the folder spikingjelly manages (``events_np/``, ``download/``, frames
    folders); see :data:`NEUROMORPHIC` for the archive names. Samples are ``(T, 2, size,
    size)`` float tensors (event counts), so batches are ``(N, T, 2, size, size)``: use a model
    with ``SpikingConfig(T=T, encoding="none", layout="batch_first")``.
    """
    if name not in NEUROMORPHIC:
        raise QfvError(f"unknown neuromorphic data set {name!r}; choose one of "
                       f"{', '.join(NEUROMORPHIC)}")
    if isinstance(T, bool) or int(T) < 1:
        raise QfvError(f"T must be >= 1 frames, got {T!r}")
    if isinstance(size, bool) or int(size) < 1:
        raise QfvError(f"frame size must be >= 1, got {size!r}")
    if int(T) > MAX_TIME_STEPS or int(T) * 2 * int(size) ** 2 > MAX_SPIKING_VALUES:
        raise QfvError(f"T={T} frames of 2 x {size} x {size} are refused: at most "
                       f"{MAX_TIME_STEPS} frames and {MAX_SPIKING_VALUES} values per sample")
    root = Path(root).expanduser()
    download = _check_layout(name, root, int(T))
    _check_arrays(root, int(T))
    cls = _dataset_class(name)
    if download is not None:
        _check_archives(download, cls)
    ds = cls(str(root), data_type="frame", frames_number=int(T), split_by="number",
             transform=ResizeFrames(size))
    if len(ds) == 0:
        raise DataError(f"{root}: spikingjelly found no samples; {name} needs <class>/*.npz "
                        "files under events_np/")
    tr, te = stratified_split(ds.targets, train_fraction, seed)
    return SNNData(Subset(ds, tr), Subset(ds, te), len(ds.classes), (2, int(size), int(size)),
                   True)


def load_snn_dataset(name: str, data_dir: Optional[PathLike] = None, seed: int = 0,
                     T: int = 10, size: int = 48) -> SNNData:
    """A data set for :func:`qfv_brevitas.snn.run_snn_experiment` by name (:data:`SNN_DATASETS`).

    ``digits`` and ``idx`` are static images (a model rate-codes them); ``synthetic`` is
    :func:`synthetic_events` (1024 train / 256 test, 4 classes, 16x16, ``T`` frames);
    ``cifar10dvs`` and ``ncaltech101`` need ``data_dir`` (see :func:`load_neuromorphic`).

    >>> d = load_snn_dataset("synthetic", T=4)
    >>> len(d.train), d.num_classes, d.input_shape, d.temporal
    (1024, 4, (2, 16, 16), True)
    """
    if name in ("digits", "idx"):
        train, test, n, shape = load_dataset(name, data_dir, seed)
        return SNNData(train, test, n, tuple(shape), False)
    if name == "synthetic":
        size = 16
        return SNNData(synthetic_events(1024, T, size, 4, seed=seed),
                       synthetic_events(256, T, size, 4, seed=seed + 10_000), 4, (2, size, size),
                       True)
    if name in NEUROMORPHIC:
        if data_dir is None:
            raise QfvError(f"data set {name!r} needs data_dir: the folder spikingjelly "
                           "manages for it (with events_np/ or download/)")
        return load_neuromorphic(name, data_dir, T=T, size=size, seed=seed)
    raise QfvError(f"unknown data set {name!r}; choose one of {', '.join(SNN_DATASETS)}")
