"""Tests of qfv_brevitas.zoo.data: digits split, IDX reader and loader, dispatch."""
from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qfv_brevitas.zoo.data import (
    IDX_FILES,
    DataError,
    load_dataset,
    load_digits_split,
    load_idx_split,
    read_idx,
)

_CODES = {
    np.dtype("uint8"): 0x08,
    np.dtype("int8"): 0x09,
    np.dtype("int16"): 0x0B,
    np.dtype("int32"): 0x0C,
    np.dtype("float32"): 0x0D,
    np.dtype("float64"): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Real IDX bytes of ``array``: magic, big-endian uint32 dims, big-endian payload."""
    array = np.asarray(array)
    code = _CODES[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def make_dataset(raw: Path, gz=(True, False, True, False), n_train=12, n_test=5, hw=(4, 3)):
    """Write the four IDX files into ``raw``; ``gz[i]`` picks ``.gz`` for ``IDX_FILES[i]``."""
    rng = np.random.default_rng(1)
    tr_x = rng.integers(0, 256, size=(n_train, *hw), dtype=np.uint8)
    tr_y = rng.integers(0, 7, size=n_train, dtype=np.uint8)
    te_x = rng.integers(0, 256, size=(n_test, *hw), dtype=np.uint8)
    te_y = rng.integers(0, 7, size=n_test, dtype=np.uint8)
    tr_y[:7] = np.arange(7)[::-1]  # every class 0..6 occurs, the first label is 6: 7 classes
    te_y[0] = 0
    arrays = (tr_x, tr_y, te_x, te_y)
    paths = [
        write_idx(raw / (name + (".gz" if z else "")), arr)
        for name, arr, z in zip(IDX_FILES, arrays, gz)
    ]
    return arrays, paths


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_shapes_range_dtypes():
    train, test = load_digits_split(seed=0, test_fraction=0.2)
    x_tr, y_tr = train.tensors
    x_te, y_te = test.tensors
    assert len(train) + len(test) == 1797
    assert len(test) == 360  # ceil(0.2 * 1797)
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    # values are k/16 exactly
    assert torch.equal(x_tr * 16, torch.round(x_tr * 16))
    assert set(y_tr.tolist()) == set(range(10)) == set(y_te.tolist())


def test_digits_matches_sklearn_images():
    from sklearn.datasets import load_digits

    train, test = load_digits_split(seed=0)
    digits = load_digits()
    ref = {tuple(img.ravel()) for img in (digits.images / 16.0).astype(np.float32)}
    for x in torch.cat([train.tensors[0], test.tensors[0]])[:50]:
        assert tuple(x.numpy().ravel()) in ref


def test_digits_stratified():
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    train, test = load_digits_split(seed=3, test_fraction=0.25)
    tr = np.bincount(train.tensors[1].numpy(), minlength=10)
    te = np.bincount(test.tensors[1].numpy(), minlength=10)
    assert np.array_equal(tr + te, full)
    # stratified: each class's test share is within one sample of 25 %
    assert np.all(np.abs(te - 0.25 * full) <= 1.0)


def test_digits_deterministic_by_seed():
    a_tr, a_te = load_digits_split(seed=5)
    b_tr, b_te = load_digits_split(seed=5)
    c_tr, _ = load_digits_split(seed=6)
    assert torch.equal(a_tr.tensors[0], b_tr.tensors[0])
    assert torch.equal(a_tr.tensors[1], b_tr.tensors[1])
    assert torch.equal(a_te.tensors[0], b_te.tensors[0])
    assert not torch.equal(a_tr.tensors[1], c_tr.tensors[1])


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_digits_bad_test_fraction(bad):
    with pytest.raises(ValueError, match=r"test_fraction must be strictly between 0 and 1"):
        load_digits_split(test_fraction=bad)


# --------------------------------------------------------------------------------------------
# read_idx
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(_CODES))
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip_all_types(tmp_path, dtype, suffix):
    arr = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype) if dtype != np.uint8 else (
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    )
    if dtype.kind == "f":
        arr = arr * np.asarray(0.5, dtype=dtype)
    path = write_idx(tmp_path / f"a-idx3{suffix}", arr)
    out = read_idx(path)
    assert out.dtype == dtype and out.dtype.isnative
    assert out.shape == (2, 3, 4)
    assert np.array_equal(out, arr)
    out[0, 0, 0] = 1  # writable


def test_read_idx_big_endian_layout(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE]))
    assert read_idx(path).tolist() == [0x0102, -2]


def test_read_idx_zero_dims(tmp_path):
    path = tmp_path / "scalar"
    path.write_bytes(bytes([0, 0, 0x08, 0, 42]))
    out = read_idx(path)
    assert out.shape == () and int(out) == 42


def _msg(path: Path, text: str) -> str:
    return re.escape(str(path)) + ".*" + text


def test_read_idx_missing(tmp_path):
    path = tmp_path / "nope-idx1-ubyte"
    with pytest.raises(DataError, match=_msg(path, "file not found")):
        read_idx(path)


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x08"])
def test_read_idx_too_short(tmp_path, content):
    path = tmp_path / "short"
    path.write_bytes(content)
    with pytest.raises(DataError, match=_msg(path, rf"file too short \({len(content)} bytes\)")):
        read_idx(path)


def test_read_idx_header_truncated(tmp_path):
    path = tmp_path / "hdr"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0, 2]))
    with pytest.raises(DataError, match=_msg(path, r"file too short \(8 bytes\).*3 dimensions \(16 bytes\)")):
        read_idx(path)


def test_read_idx_truncated_payload(tmp_path):
    path = write_idx(tmp_path / "t-idx3-ubyte", np.zeros((3, 2, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(
        DataError, match=_msg(path, r"payload is 11 bytes but dimensions \(3, 2, 2\).*need 12 bytes")
    ):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    path = write_idx(tmp_path / "t-idx1-ubyte", np.zeros(4, dtype=np.int32))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match=_msg(path, r"payload is 17 bytes.*need 16 bytes")):
        read_idx(path)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match=_msg(path, r"bad magic number 01000801.*not an IDX file")):
        read_idx(path)


def test_read_idx_gzip_without_suffix_hint(tmp_path):
    path = tmp_path / "plain-name"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(2, dtype=np.uint8))))
    with pytest.raises(DataError, match=_msg(path, r"bad magic number 1f8b.*give it a \.gz suffix")):
        read_idx(path)


def test_read_idx_unknown_type(tmp_path):
    path = tmp_path / "type"
    path.write_bytes(bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(DataError, match=_msg(path, r"unknown IDX type code 0x0A")):
        read_idx(path)


def test_read_idx_corrupt_gzip_not_gzip(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))  # plain bytes under a .gz name
    with pytest.raises(DataError, match=_msg(path, r"corrupt or truncated gzip data")):
        read_idx(path)


def test_read_idx_corrupt_gzip_truncated(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=_msg(path, r"corrupt or truncated gzip data")):
        read_idx(path)


def test_read_idx_corrupt_gzip_bad_deflate(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    blob = bytearray(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8))))
    for i in range(10, len(blob) - 8):  # garble the deflate stream, keep header and trailer
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=_msg(path, r"corrupt or truncated gzip data")):
        read_idx(path)


# --------------------------------------------------------------------------------------------
# load_idx_split
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "raw", "named"])
def test_load_idx_split_round_trip(tmp_path, layout):
    raw = {"flat": tmp_path, "raw": tmp_path / "raw", "named": tmp_path / "FashionMNIST" / "raw"}[layout]
    (tr_x, tr_y, te_x, te_y), _ = make_dataset(raw)
    train, test, num_classes = load_idx_split(tmp_path, seed=123)
    assert num_classes == 7
    x, y = train.tensors
    assert x.shape == (12, 1, 4, 3) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(tr_x.astype(np.float32) / 255.0)[:, None])
    assert torch.equal((x * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(tr_x))
    assert y.tolist() == tr_y.tolist()
    xt, yt = test.tensors
    assert xt.shape == (5, 1, 4, 3)
    assert torch.equal((xt * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(te_x))
    assert yt.tolist() == te_y.tolist()
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_load_idx_split_prefers_plain_over_gz(tmp_path):
    (tr_x, *_), _ = make_dataset(tmp_path, gz=(False,) * 4)
    write_idx(tmp_path / (IDX_FILES[0] + ".gz"), np.zeros_like(tr_x))
    train, _, _ = load_idx_split(tmp_path)
    assert torch.equal((train.tensors[0] * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(tr_x))


def test_load_dataset_idx(tmp_path):
    make_dataset(tmp_path / "MNIST" / "raw", hw=(5, 6))
    train, test, num_classes, shape = load_dataset("idx", data_dir=tmp_path)
    assert (len(train), len(test), num_classes, shape) == (12, 5, 7, (1, 5, 6))


def test_load_idx_missing_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _, paths = make_dataset(raw)
    paths[1].unlink()
    paths[3].unlink()
    with pytest.raises(DataError) as err:
        load_idx_split(tmp_path)
    msg = str(err.value)
    assert f"missing IDX files {IDX_FILES[1]}, {IDX_FILES[3]} (with or without .gz) in {raw}" in msg
    assert msg.startswith(f"{tmp_path}: missing IDX files {IDX_FILES[1]}, {IDX_FILES[3]} (with")
    assert f"looked in {tmp_path}, {raw}" in msg


def test_load_idx_missing_dir(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(DataError, match=_msg(missing, "data directory does not exist")):
        load_idx_split(missing)


def test_load_idx_empty_dir(tmp_path):
    with pytest.raises(DataError) as err:
        load_idx_split(tmp_path)
    assert f"missing IDX files {', '.join(IDX_FILES)} (with or without .gz) in {tmp_path}" in str(err.value)


def test_load_idx_ambiguous(tmp_path):
    make_dataset(tmp_path / "MNIST" / "raw")
    make_dataset(tmp_path / "KMNIST" / "raw")
    with pytest.raises(DataError, match=r"several data sets found.*KMNIST.*MNIST.*pass the one you want"):
        load_idx_split(tmp_path)
    train, _, _ = load_idx_split(tmp_path / "KMNIST")
    assert len(train) == 12


def test_load_idx_truncated_file(tmp_path):
    _, paths = make_dataset(tmp_path, gz=(False,) * 4)
    paths[2].write_bytes(paths[2].read_bytes()[:-5])
    with pytest.raises(DataError, match=_msg(paths[2], r"payload is 55 bytes.*need 60 bytes")):
        load_idx_split(tmp_path)


def test_load_idx_bad_magic(tmp_path):
    _, paths = make_dataset(tmp_path, gz=(False,) * 4)
    paths[1].write_bytes(b"\xff" + paths[1].read_bytes()[1:])
    with pytest.raises(DataError, match=_msg(paths[1], r"bad magic number ff000801")):
        load_idx_split(tmp_path)


def test_load_idx_corrupt_gzip(tmp_path):
    _, paths = make_dataset(tmp_path)
    blob = paths[0].read_bytes()
    paths[0].write_bytes(blob[: len(blob) - 20])
    with pytest.raises(DataError, match=_msg(paths[0], r"corrupt or truncated gzip data")):
        load_idx_split(tmp_path)


def test_load_idx_count_mismatch(tmp_path):
    _, paths = make_dataset(tmp_path, gz=(False,) * 4)
    write_idx(paths[3], np.zeros(4, dtype=np.uint8))  # 5 test images, 4 labels
    with pytest.raises(DataError) as err:
        load_idx_split(tmp_path)
    assert str(err.value).startswith(f"{paths[2]} holds 5 images but {paths[3]} holds 4 labels")


def test_load_idx_images_not_3d(tmp_path):
    _, paths = make_dataset(tmp_path, gz=(False,) * 4)
    write_idx(paths[0], np.zeros((12, 12), dtype=np.uint8))
    with pytest.raises(DataError, match=_msg(paths[0], r"expected 3-D uint8 images.*got 2-D uint8")):
        load_idx_split(tmp_path)


def test_load_idx_images_not_uint8(tmp_path):
    _, paths = make_dataset(tmp_path, gz=(False,) * 4)
    write_idx(paths[0], np.zeros((12, 4, 3), dtype=np.float32))
    with pytest.raises(DataError, match=_msg(paths[0], r"expected 3-D uint8 images.*got 3-D float32")):
        load_idx_split(tmp_path)


def test_load_idx_labels_not_1d(tmp_path):
    _, paths = make_dataset(tmp_path, gz=(False,) * 4)
    write_idx(paths[1], np.zeros((12, 1), dtype=np.uint8))
    with pytest.raises(DataError, match=_msg(paths[1], r"expected 1-D integer labels, got 2-D")):
        load_idx_split(tmp_path)


def test_load_idx_labels_out_of_range(tmp_path):
    _, paths = make_dataset(tmp_path, gz=(False,) * 4)
    labels = np.zeros(12, dtype=np.int32)
    labels[3] = 300
    write_idx(paths[1], labels)
    with pytest.raises(DataError, match=_msg(paths[1], r"labels must lie in 0\.\.255, found 0\.\.300")):
        load_idx_split(tmp_path)


def test_load_idx_image_size_mismatch(tmp_path):
    _, paths = make_dataset(tmp_path, gz=(False,) * 4)
    write_idx(paths[2], np.zeros((5, 2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match=r"holds \(4, 3\) images but .* holds \(2, 2\) images"):
        load_idx_split(tmp_path)


# --------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------


def test_load_dataset_digits():
    train, test, num_classes, shape = load_dataset("digits", seed=2)
    ref_tr, _ = load_digits_split(seed=2)
    assert (num_classes, shape, len(train), len(test)) == (10, (1, 8, 8), 1437, 360)
    assert torch.equal(train.tensors[1], ref_tr.tensors[1])


def test_load_dataset_idx_needs_dir():
    with pytest.raises(ValueError, match=r"data set 'idx' needs data_dir"):
        load_dataset("idx")


def test_load_dataset_unknown():
    with pytest.raises(ValueError, match=r"unknown data set 'cifar'; choose one of digits, idx$"):
        load_dataset("cifar")


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------------------------
# budgets before work (issue 22): the header first, then exactly the payload it announces
# --------------------------------------------------------------------------------------------

def _gz(path: Path, head: bytes, zeros: int) -> Path:
    with gzip.open(path, "wb") as fh:
        fh.write(head)
        for i in range(0, zeros, 1 << 20):
            fh.write(bytes(min(1 << 20, zeros - i)))
    return path


def test_idx_payload_over_the_cap_is_refused_from_the_header(tmp_path, monkeypatch):
    import qfv_brevitas.zoo.data as data

    path = write_idx(tmp_path / "x-idx1-ubyte", np.zeros(1000, dtype=np.int32))
    monkeypatch.setattr(data, "MAX_IDX_BYTES", 4000)
    assert read_idx(path).shape == (1000,)
    monkeypatch.setattr(data, "MAX_IDX_BYTES", 3999)
    with pytest.raises(DataError, match=_msg(path, r"header declares a payload too large to "
                                                   r"read: dimensions \(1000,\) of 4-byte items "
                                                   r"need 4000 bytes, more than the 3999")):
        read_idx(path)


def test_a_gzip_header_may_declare_only_what_deflate_can_hold(tmp_path):
    from qfv_brevitas.util.budgets import deflate_limit

    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 10 ** 8)))
    limit = deflate_limit(path.stat().st_size)
    assert 10 ** 8 + 8 > limit  # a few dozen bytes cannot inflate into 100 MB
    with pytest.raises(DataError, match=_msg(path, r"more than its \d+ compressed bytes can "
                                                   r"hold \(dimensions \(100000000,\)")):
        read_idx(path)


def test_a_gzip_stream_is_inflated_only_as_far_as_its_header_says(tmp_path):
    """50 MB of zeros behind an honest 16-byte payload: read 17 bytes of it, then refused."""
    import tracemalloc

    path = _gz(tmp_path / "x-idx1-ubyte.gz", idx_bytes(np.arange(16, dtype=np.uint8)), 50 << 20)
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    with pytest.raises(DataError, match=_msg(path, r"payload is more than 16 bytes")):
        read_idx(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 << 20  # the old reader held all 50 MB


def test_a_plain_header_is_checked_against_the_file_size_before_reading(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10 ** 4, 10 ** 4, 10) + bytes(7))
    with pytest.raises(DataError, match=_msg(path, r"payload is 7 bytes but dimensions "
                                                   r"\(10000, 10000, 10\) of 1-byte items need "
                                                   r"1000000000 bytes")):
        read_idx(path)


def test_a_short_gzip_payload_says_how_short(tmp_path):
    path = write_idx(tmp_path / "x-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:4] + struct.pack(">I", 9) + raw[8:]))
    with pytest.raises(DataError, match=_msg(path, r"payload is 7 bytes but dimensions \(9,\)")):
        read_idx(path)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float64])
def test_multibyte_idx_is_native_and_writable_without_a_copy(tmp_path, dtype):
    a = (np.arange(24) - 7).astype(dtype).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / "m-idx3-ubyte", a))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.flags.writeable
    assert np.array_equal(out, a) and out.base is not None  # a view of the one buffer
