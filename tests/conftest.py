import math
import os
import socket
import sys
import urllib.request
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.zoo.data import load_digits_split
from qfv_brevitas.zoo.models import SmallCNN, build_model
from qfv_brevitas.training.train import TrainConfig, evaluate, fit

# Property tests draw the same examples on every run (CI must not fail on one run and pass on the
# next); QFV_HYPOTHESIS=explore draws new ones each run, to look for failures on purpose.
from hypothesis import settings as _hsettings  # noqa: E402

_hsettings.register_profile("ci", derandomize=True, deadline=None)
_hsettings.register_profile("explore", deadline=None)
_hsettings.load_profile(os.environ.get("QFV_HYPOTHESIS", "ci"))

# CI runs the suite in 2 xdist workers on 2 cores: one intra-op thread per worker avoids
# oversubscription (measured: 2 threads per worker made a forward+backward ~20x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Back to one thread after every test: a `qfv ... --threads N` run in-process (or a test
    that sets threads itself) must not leave the next tests of its worker oversubscribed."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN trained in float, quantized at W4 (float activations), QAT'd; eval mode.
    Returns ``(model, clean test accuracy)``; built once per test module."""
    train, test = digits
    torch.manual_seed(0)
    m = SmallCNN(1, 10, width=16)
    fit(m, train, None, TrainConfig(epochs=8, lr=0.05), progress=False)
    q = quantize_model(m, NMultConfig(weight_bits=4, act_bits=None, first_last_bits=None))
    fit(q, train, None, TrainConfig(epochs=4, lr=0.01, lambda_rise_epochs=2), progress=False)
    q.eval()
    clean = evaluate(q, test)
    assert clean > 0.95
    return q, clean


@pytest.fixture(scope="module")
def float_cnn(digits):
    """The ``qfv demo`` architecture trained briefly in float (eval mode); built once per test
    module."""
    train, _ = digits
    torch.manual_seed(0)
    m = build_model("small_cnn", (1, 8, 8), 10)
    fit(m, train, None, TrainConfig(epochs=5, lr=0.05), progress=False)
    return m.eval()


@pytest.fixture(scope="module", params=["kernels", "torch"])
def kernel_backend(request):
    """Runs a test module twice: on the compiled CPU kernels (skipped where they were not
    built) and on the pure-torch paths (``qfv_brevitas.core.kernels.torch_fallback``). Opt in with
    ``pytestmark = pytest.mark.usefixtures("kernel_backend")``."""
    from qfv_brevitas.core import kernels as K

    if request.param == "kernels":
        if not K.available():
            pytest.skip(f"compiled kernels not built: {K.load_error()}")
        yield request.param
    else:
        with K.torch_fallback():
            yield request.param
# -- small quantized MLPs and binomial checks (faults, variability) ------------------------------

def _qmodel(layers, bits: int = 4, layer_bits=None, skip=(), seed: int = 0) -> nn.Module:
    """A quantized Sequential of named Linear layers (ReLU between them), per-tensor N-bit
    weights, float activations; ``layers`` is ``[(name, (in, out)), ...]``."""
    torch.manual_seed(seed)
    mods = []
    for i, (name, (fin, fout)) in enumerate(layers):
        if i:
            mods.append((f"act_{name}", nn.ReLU()))
        mods.append((name, nn.Linear(fin, fout)))
    cfg = NMultConfig(weight_bits=bits, act_bits=None, first_last_bits=None,
                      layer_bits=dict(layer_bits or {}))
    return quantize_model(nn.Sequential(OrderedDict(mods)), cfg, skip=skip)


@pytest.fixture(scope="session")
def qmodel():
    """Factory ``qmodel(layers, bits=4, layer_bits=None, skip=(), seed=0)`` (see ``_qmodel``)."""
    return _qmodel


#: two-sided 99.9% standard normal quantile
Z999 = 3.2905


def _assert_binomial(k: int, n: int, p: float, what: str, resolution: float = 0.15) -> None:
    """``k`` successes of ``n`` lie in the 99.9% interval of Binomial(n, p); the interval's half
    width must be below ``resolution * n * p`` so that a wrong rate would be caught."""
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    half = Z999 * sd + 0.5
    assert half < resolution * mean, f"{what}: sample too small to test p={p} (n={n})"
    assert abs(k - mean) <= half, f"{what}: {k} of {n}, expected {mean:.1f} +- {half:.1f}"


@pytest.fixture(scope="session")
def assert_binomial():
    """``assert_binomial(k, n, p, what, resolution=0.15)``: normal approximation with continuity
    correction, 99.9% two-sided (see ``_assert_binomial``)."""
    return _assert_binomial


# -- neuromorphic data folders (spikingjelly's layout) ---------------------------------------------

def _npz_frames(path, T: int, h: int, w: int, value: float) -> None:
    """One sample as spikingjelly stores integrated frames: ``frames`` ``(T, 2, h, w)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, frames=np.full((T, 2, h, w), value, dtype=np.float32))


@pytest.fixture(scope="session")
def npz_frames():
    """``npz_frames(path, T, h, w, value)``: one constant sample (see ``_npz_frames``)."""
    return _npz_frames


@pytest.fixture
def stub_torchvision(monkeypatch):
    """spikingjelly's dataset modules import torchvision and torchaudio, which do not import
    on a CPU-only torch (no matching wheel). These stubs give them exactly what they use:
    torchvision's ``DatasetFolder`` (scan class folders, load, transform) and download helpers
    that fail the test if called."""
    pytest.importorskip("spikingjelly")
    before = set(sys.modules)

    class DatasetFolder(torch.utils.data.Dataset):
        def __init__(self, root, loader, extensions=None, transform=None,
                     target_transform=None, **_):
            self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            self.samples = [(os.path.join(root, c, f), i) for c, i in self.class_to_idx.items()
                            for f in sorted(os.listdir(os.path.join(root, c)))
                            if f.lower().endswith(tuple(extensions))]
            self.targets = [t for _, t in self.samples]
            self.loader, self.transform = loader, transform

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
            path, target = self.samples[i]
            return self.transform(self.loader(path)), target

    def no_download(*a, **k):
        raise AssertionError("spikingjelly tried to download")

    tv, ds, utils = (types.ModuleType(n) for n in
                     ("torchvision", "torchvision.datasets", "torchvision.datasets.utils"))
    ds.DatasetFolder, ds.utils, tv.datasets = DatasetFolder, utils, ds
    tv.transforms = types.ModuleType("torchvision.transforms")
    utils.download_url = no_download
    utils.check_integrity = lambda *a, **k: False
    utils.extract_archive = no_download
    utils.verify_str_arg = lambda v, *a, **k: v
    for name, mod in (("torchvision", tv), ("torchvision.datasets", ds),
                      ("torchvision.datasets.utils", utils),
                      ("torchvision.transforms", tv.transforms),
                      ("torchaudio", types.ModuleType("torchaudio"))):
        monkeypatch.setitem(sys.modules, name, mod)
    yield
    # spikingjelly.datasets was imported against the stubs: drop it with them.
    for name in set(sys.modules) - before:
        if name.startswith("spikingjelly.datasets"):
            del sys.modules[name]


# -- a small MNIST-family IDX folder --------------------------------------------------------------

def write_idx(path, arr) -> None:
    """``arr`` as a gzipped IDX file (uint8, the header MNIST's files have)."""
    import gzip
    import struct

    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def _make_idx_folder(root, n_train: int = 200, n_test: int = 60, seed: int = 0):
    """torchvision's ``FashionMNIST/raw`` layout under ``root``: two easy classes of 12x12
    images (bright top half vs bright bottom half); returns ``root`` (the ``--data-dir``)."""
    rng = np.random.default_rng(seed)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)

    def make(n):
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 40, (n, 12, 12))
        for i, c in enumerate(y):
            x[i, :6] += 200 * (c == 0)
            x[i, 6:] += 200 * (c == 1)
        return x, y

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = make(n)
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture
def idx_folder(tmp_path):
    """A small IDX folder (200 train, 60 test; see ``_make_idx_folder``) under ``tmp_path``."""
    return _make_idx_folder(tmp_path)


@pytest.fixture(scope="session")
def make_idx_folder():
    """``make_idx_folder(root, n_train=200, n_test=60, seed=0)`` (see ``_make_idx_folder``)."""
    return _make_idx_folder


# -- torch.distributed ranks in spawned processes ---------------------------------------------------

def _run_ranks(fn, args, nprocs: int = 2, timeout_s: float = 180) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes; fails the test (terminating what is
    left) if they do not all finish within ``timeout_s``; a rank's error fails it too."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"ranks did not finish within {timeout_s} s")


@pytest.fixture(scope="session")
def run_ranks():
    """``run_ranks(fn, args, nprocs=2, timeout_s=180)`` (see ``_run_ranks``)."""
    return _run_ranks


@pytest.fixture
def no_network(monkeypatch):
    """Fail (and record) any attempt to reach the network while the fixture is active."""
    calls = []

    def deny(what):
        def f(*a, **k):
            calls.append((what, a[:2]))
            raise AssertionError(f"network access attempted: {what} {a[:2]!r}")
        return f

    monkeypatch.setattr(socket.socket, "connect", deny("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", deny("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", deny("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", deny("socket.getaddrinfo"))
    monkeypatch.setattr(urllib.request, "urlopen", deny("urllib.request.urlopen"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", deny("torch.hub.load_state_dict_from_url"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", deny("torch.hub.download_url_to_file"))
    return calls


def _install_plugin(root, dist: str, package: str, source: str, entry_points: dict):
    """A real installed distribution without pip: ``root/<package>/__init__.py`` holding
    ``source`` and ``root/<dist>-0.1.dist-info`` with its METADATA and ``entry_points.txt``
    (``{group: {name: "module:attr"}}``), which importlib.metadata finds once ``root`` is on
    sys.path."""
    import textwrap

    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = []
    for group, eps in entry_points.items():
        lines += [f"[{group}]"] + [f"{k} = {v}" for k, v in eps.items()] + [""]
    (info / "entry_points.txt").write_text("\n".join(lines))


@pytest.fixture
def make_plugin(tmp_path, monkeypatch):
    """``make_plugin(dist, package, source, entry_points)``: install a plugin distribution
    into a folder put first on sys.path (see ``_install_plugin``); the registries read the
    entry points afresh, and forget them and the package's modules afterwards."""
    from qfv_brevitas.util.plugins import forget_plugins

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    packages = []

    def make(dist: str, package: str, source: str, entry_points: dict):
        _install_plugin(site, dist, package, source, entry_points)
        packages.append(package)
        forget_plugins()
        return site

    yield make
    forget_plugins()
    for name in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[name]
