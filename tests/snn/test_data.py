"""Data for spiking models: rate-coded digits, synthetic events, neuromorphic folders."""
import sys

import numpy as np
import pytest
import torch

from qfv_brevitas.zoo.data import DataError
from qfv_brevitas.snn.data import (load_neuromorphic, load_snn_dataset, rate_coded_digits,
                                   stratified_split, synthetic_events)


def test_rate_coded_digits_are_spike_trains_of_the_images():
    train, test = rate_coded_digits(seed=0, T=6)
    x, y = train.tensors
    assert x.shape[1:] == (6, 1, 8, 8) and set(x.unique().tolist()) == {0.0, 1.0}
    from qfv_brevitas.zoo.data import load_digits_split

    images = load_digits_split(seed=0)[0].tensors[0]
    assert torch.equal(y, load_digits_split(seed=0)[0].tensors[1])
    # Firing rate follows intensity: pixels at 0 never fire, at 1 always; mean rate ~ mean x.
    rate = x.mean(1)
    assert rate[images == 0].max() == 0 and rate[images == 1].min() == 1
    assert abs(float(rate.mean()) - float(images.mean())) < 0.01
    again, _ = rate_coded_digits(seed=0, T=6)
    assert torch.equal(again.tensors[0], x)
    other, _ = rate_coded_digits(seed=0, T=6, encode_seed=1)
    assert not torch.equal(other.tensors[0], x)


def test_synthetic_events_move_in_their_class_direction():
    ds = synthetic_events(40, T=4, size=16, num_classes=4, seed=3, noise=0.0)
    x, y = ds.tensors
    assert x.shape == (40, 4, 2, 16, 16)
    assert torch.bincount(y).tolist() == [10, 10, 10, 10]
    assert x[:, 0, 0].sum((1, 2)).eq(9).all()  # frame 0: the whole 3x3 square switches on
    assert x[:, 0, 1].sum() == 0  # nothing has left yet
    cols = torch.arange(16.0)
    for i in range(40):
        on = x[i, :, 0]
        # centre of the ON events per frame, along x (dim -1) and y (dim -2)
        cx = [(on[t].sum(0) * cols).sum() / on[t].sum() for t in range(4)]
        cy = [(on[t].sum(1) * cols).sum() / on[t].sum() for t in range(4)]
        dx, dy = float(cx[-1] - cx[1]), float(cy[-1] - cy[1])
        expect = {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}[int(y[i])]
        assert (np.sign(dx), np.sign(dy)) == expect
    noisy = synthetic_events(40, T=4, size=16, seed=3, noise=0.05).tensors[0]
    assert noisy.sum() > x.sum()
    assert torch.equal(synthetic_events(40, T=4, size=16, seed=3, noise=0.0).tensors[0], x)


@pytest.mark.parametrize("kw, msg", [(dict(num_classes=9), "num_classes"), (dict(T=0), "T"),
                                     (dict(size=8, T=4), "too small"), (dict(noise=1.0), "noise")])
def test_synthetic_events_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        synthetic_events(**kw)


def test_stratified_split_is_per_class_and_seeded():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    tr, te = stratified_split(targets, 0.9, seed=1)
    assert sorted(tr + te) == list(range(100)) and not set(tr) & set(te)
    counts = np.bincount(np.asarray(targets)[te])
    assert counts.tolist() == [5, 3, 2]
    assert stratified_split(targets, 0.9, seed=1) == (tr, te)
    assert stratified_split(targets, 0.9, seed=2) != (tr, te)
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_split(targets, 1.0)


def test_load_snn_dataset_names():
    d = load_snn_dataset("digits")
    assert (d.num_classes, d.input_shape, d.temporal) == (10, (1, 8, 8), False)
    with pytest.raises(ValueError, match="needs data_dir"):
        load_snn_dataset("cifar10dvs")
    with pytest.raises(ValueError, match="choose one of"):
        load_snn_dataset("mnist-dvs")


# ---------------------------------------------------------------------------------------------
# CIFAR10-DVS / N-Caltech101 folders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, msg", [
    (lambda r, npz: None, "no such folder"),
    (lambda r, npz: r.mkdir(), "no events_np/ or download/"),
    (lambda r, npz: (r / "airplane").mkdir(parents=True), "class folders directly"),
    (lambda r, npz: (r.mkdir(), (r / "airplane.zip").write_bytes(b"x")), "into"),
    (lambda r, npz: (r / "download").mkdir(parents=True), "lacks airplane.zip"),
    (lambda r, npz: (r / "events_np").mkdir(parents=True), "holds no <class>/\\*.npz"),
    (lambda r, npz: npz(r / "frames_number_4_split_by_number" / "cat" / "a.npz", 4, 2, 2, 1),
     "Create the empty folder"),
])
def test_cifar10dvs_wrong_folders_say_what_to_do(tmp_path, make, msg, npz_frames):
    root = tmp_path / "cifar"
    make(root, npz_frames)
    with pytest.raises(DataError, match=msg):
        load_neuromorphic("cifar10dvs", root, T=4)


def test_spikingjellys_own_folder_passed_is_refused(tmp_path, npz_frames):
    npz_frames(tmp_path / "events_np" / "cat" / "a.npz", 1, 1, 1, 0)
    with pytest.raises(DataError, match="pass its parent"):
        load_neuromorphic("ncaltech101", tmp_path / "events_np", T=4)


@pytest.mark.parametrize("name, classes, hw", [
    ("cifar10dvs", ("airplane", "automobile"), (128, 128)),
    ("ncaltech101", ("accordion", "airplanes", "anchor"), (180, 240)),
])
def test_neuromorphic_through_spikingjellys_class(tmp_path, stub_torchvision, name, classes,
                                                   hw, npz_frames):
    T = 4
    (tmp_path / "events_np").mkdir()
    frames = tmp_path / f"frames_number_{T}_split_by_number"
    for k, c in enumerate(classes):
        for j in range(10):
            npz_frames(frames / c / f"{c}_{j}.npz", T, *hw, value=k + 1)
    data = load_neuromorphic(name, tmp_path, T=T, size=12, seed=0)
    assert data.num_classes == len(classes) and data.temporal
    assert data.input_shape == (2, 12, 12)
    assert (len(data.train), len(data.test)) == (9 * len(classes), len(classes))  # 9:1
    x, y = data.test[0]
    assert x.shape == (T, 2, 12, 12)
    assert torch.allclose(x, torch.full_like(x, y + 1.0))  # resized, values and labels kept
    batch = torch.utils.data.default_collate([data.train[i] for i in range(3)])[0]
    assert batch.shape == (3, T, 2, 12, 12)  # (N, T, ...): layout="batch_first"


def test_corrupt_archives_are_refused_before_spikingjelly_sees_them(tmp_path, stub_torchvision):
    d = tmp_path / "download"
    d.mkdir()
    for a in ("Caltech101.zip", "Caltech101_annotations.zip"):
        (d / a).write_bytes(b"not the archive")
    with pytest.raises(DataError, match="MD5"):
        load_neuromorphic("ncaltech101", tmp_path, T=4)


def test_missing_torchvision_is_a_clear_error(tmp_path, monkeypatch, npz_frames):
    pytest.importorskip("spikingjelly")
    for name in [n for n in sys.modules if n.startswith("spikingjelly.datasets")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ImportError
    npz_frames(tmp_path / "events_np" / "cat" / "a.npz", 1, 1, 1, 0)
    before = set(sys.modules)
    try:
        with pytest.raises(DataError, match="torchvision"):
            load_neuromorphic("cifar10dvs", tmp_path, T=4)
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("spikingjelly.datasets"):
                del sys.modules[name]


# -- budgets before work (issue 22) ----------------------------------------------------------

def _lying_npz(path, shape):
    """An .npz whose ``frames`` header declares ``shape`` (float32) over 16 bytes of data."""
    import io
    import zipfile

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False,
                                                "shape": shape})
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("frames.npy", head.getvalue() + bytes(16))


@pytest.mark.parametrize("where", ["events_np", "frames_number_4_split_by_number"])
def test_array_files_are_checked_before_spikingjelly_loads_them(tmp_path, where, npz_frames,
                                                                monkeypatch):
    """numpy allocates an array's declared shape before reading it: a 16-byte frame file that
    declares 4 TB is refused (naming it) before spikingjelly is even imported."""
    import qfv_brevitas.snn.data as data

    monkeypatch.setattr(data, "_dataset_class", lambda name: pytest.fail("reached spikingjelly"))
    (tmp_path / "events_np").mkdir()
    npz_frames(tmp_path / where / "cat" / "a.npz", 4, 2, 2, 1.0)
    _lying_npz(tmp_path / where / "cat" / "b.npz", (10 ** 12,))
    with pytest.raises(DataError, match=r"b\.npz \('frames\.npy'\): its array header declares "
                                        r"shape \(1000000000000,\)"):
        load_neuromorphic("cifar10dvs", tmp_path, T=4)
    (tmp_path / where / "cat" / "b.npz").unlink()
    assert data._check_arrays(tmp_path, 4) == 1


def test_frames_that_size_the_work_are_capped(tmp_path):
    from qfv_brevitas.util.budgets import MAX_SPIKING_VALUES, MAX_TIME_STEPS

    with pytest.raises(ValueError, match=rf"at most {MAX_TIME_STEPS} frames"):
        load_neuromorphic("cifar10dvs", tmp_path, T=MAX_TIME_STEPS + 1, size=1)
    with pytest.raises(ValueError, match=rf"{MAX_SPIKING_VALUES} values per sample"):
        load_neuromorphic("cifar10dvs", tmp_path, T=10, size=1000)
