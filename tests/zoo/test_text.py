"""The byte-level text corpus: which files, the split by file, the windows."""
import os
import zlib

import pytest
import torch

from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.zoo import data as D


def _tree(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text)


def test_files_leave_out_tests_demos_links_and_other_suffixes(tmp_path):
    _tree(tmp_path, {"os.py": b"a", "json/decoder.py": b"b", "test/test_os.py": b"x",
                     "unittest/test/helper.py": b"x", "idlelib/run.py": b"x",
                     "email/test_email.py": b"x", "notes.txt": b"x",
                     "site-packages/pkg/mod.py": b"x", "ctypes/__init__.py": b"c"})
    os.symlink(tmp_path / "os.py", tmp_path / "alias.py")
    got = [rel for rel, _ in D.stdlib_text_files(tmp_path)]
    assert got == ["ctypes/__init__.py", "json/decoder.py", "os.py"]


def test_split_is_by_file_and_stable_when_files_are_added(tmp_path):
    files = {f"m{i:03d}.py": f"# module {i}\nx = {i}\n".encode() for i in range(200)}
    _tree(tmp_path, files)
    train, val, fp = D.stdlib_text(tmp_path)
    is_val = {rel: zlib.crc32(rel.encode()) % D.TEXT_VALIDATION_ONE_IN == 0 for rel in files}
    assert 0 < sum(is_val.values()) < 200
    # each part is its files in path order, each followed by one NUL byte
    assert val == b"".join(files[r] + b"\0" for r in sorted(files) if is_val[r])
    assert train == b"".join(files[r] + b"\0" for r in sorted(files) if not is_val[r])
    # a new file goes to one part only; the other keeps its bytes; the fingerprint changes
    (tmp_path / "zzz_new.py").write_bytes(b"y = 1\n")
    train2, val2, fp2 = D.stdlib_text(tmp_path)
    assert (train2 == train) != (val2 == val) and fp2 != fp
    assert D.stdlib_text(tmp_path)[2] == fp2


def test_a_corpus_with_an_empty_part_or_no_files_is_refused(tmp_path):
    with pytest.raises(QfvError, match="no Python sources"):
        D.stdlib_text_files(tmp_path)
    (tmp_path / "only.py").write_bytes(b"x = 1\n")
    with pytest.raises(QfvError, match="both parts"):
        D.stdlib_text(tmp_path)


def test_windows_predict_the_next_byte():
    text = bytes(range(200)) * 3
    ev = D.text_windows(text, 16)
    x, y = ev.tensors
    assert x.dtype == torch.int64 and x.shape == y.shape == ((len(text) - 1) // 16, 16)
    assert torch.equal(y[:, :-1], x[:, 1:])
    flat = torch.tensor(list(text))
    assert torch.equal(x.reshape(-1), flat[: x.numel()])           # non-overlapping, in order
    assert torch.equal(y.reshape(-1), flat[1: x.numel() + 1])
    tr = D.text_windows(text, 16, count=50, seed=3)
    assert torch.equal(tr.tensors[0], D.text_windows(text, 16, count=50, seed=3).tensors[0])
    assert not torch.equal(tr.tensors[0], D.text_windows(text, 16, count=50, seed=4).tensors[0])
    assert torch.equal(tr.tensors[1][:, :-1], tr.tensors[0][:, 1:])
    with pytest.raises(QfvError, match="too short"):
        D.text_windows(b"abc", 3)
    with pytest.raises(QfvError, match="at least 1"):
        D.text_windows(text, 0)


def test_the_running_pythons_library_gives_the_corpus():
    files = dict(D.stdlib_text_files())
    assert "os.py" in files and "json/decoder.py" in files
    assert not any(part in D.TEXT_EXCLUDED_DIRS for rel in files for part in rel.split("/")[:-1])
    train, val, fp = D.load_stdlib_text(context=32, train_windows=64, val_bytes=32 * 10, seed=1)
    assert train.tensors[0].shape == (64, 32) and val.tensors[0].shape == (10, 32)
    assert int(train.tensors[0].max()) < 256 and len(fp) == 64
    # the validation text is the validation files' bytes from the start
    _, val_bytes, _ = D.stdlib_text()
    assert bytes(val.tensors[0][0].tolist()) == val_bytes[:32]
