"""The qfv command: demo/train on digits and IDX files, report, and its errors."""
import gzip
import json
import struct

import numpy as np
import pytest

from qfv_brevitas.checkpoint import load_checkpoint
from qfv_brevitas.cli import main

FAST = ["--fp-epochs", "3", "--q-epochs", "2", "--lambda-rise-epochs", "1", "--no-progress"]


def test_demo_writes_table_json_png_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--bits", "3", "--variants", "fixed", "nmult",
                 *FAST]) == 0
    printed = capsys.readouterr().out
    for row in ("float", "fixed W3A3", "nmult W3A3"):
        assert row in printed
    res = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["weight_bits"]) for r in res["runs"]] == [("fixed", 3), ("nmult", 3)]
    assert res["fp_acc"] > 0.5  # 3 float epochs on digits already learn (chance is 0.1)
    for r in res["runs"]:
        assert r["delta_vs_fp"] == pytest.approx(r["acc"] - res["fp_acc"])
        assert len(r["history"]["lambda"]) == 2
    png = (out / "levels.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    model, info = load_checkpoint(out / "nmult_w3a3.pt")
    assert info["config"].weight_bits == 3
    # The saved accuracy is what the rebuilt model gives.
    from qfv_brevitas.data import load_digits_split
    from qfv_brevitas.train import evaluate
    assert evaluate(model, load_digits_split(0)[1]) == pytest.approx(res["runs"][1]["acc"])
    assert main(["report", str(out / "nmult_w3a3.pt")]) == 0
    rep = capsys.readouterr().out
    assert "features.3" in rep and "nmult" in rep


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_train_on_idx_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    # Two easy classes: bright top half vs bright bottom half, 12x12 images.
    def make(n):
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 40, (n, 12, 12))
        for i, c in enumerate(y):
            x[i, :6] += 200 * (c == 0)
            x[i, 6:] += 200 * (c == 1)
        return x, y
    xtr, ytr = make(200)
    xte, yte = make(60)
    _write_idx(raw / "train-images-idx3-ubyte.gz", xtr)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", ytr)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", xte)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", yte)
    out = tmp_path / "out"
    assert main(["train", "--dataset", "idx", "--data-dir", str(tmp_path), "--out", str(out),
                 "--bits", "4", "--variants", "nmult", *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "idx" and res["num_train"] == 200 and res["num_test"] == 60
    assert res["runs"][0]["acc"] > 0.9


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "idx", "--out", str(tmp_path)])
    assert main(["train", "--dataset", "idx", "--data-dir", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err
    with pytest.raises(SystemExit):
        main(["demo", "--bits", "9", "--out", str(tmp_path), *FAST, "--variants", "banana"])
    assert main(["demo", "--bits", "9", "--out", str(tmp_path), *FAST]) == 2
    assert "1..8" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["report", str(bad)]) == 2
    assert "bad.pt" in capsys.readouterr().err
