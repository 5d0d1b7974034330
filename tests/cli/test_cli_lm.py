"""``qfv lm``: train, PTQ, QAT and chip on the standard library's text, and its errors."""
import json

import pytest

from qfv_brevitas.cli.app import main
from qfv_brevitas.training.lm import evaluate_bpb
from qfv_brevitas.zoo.checkpoint import load_checkpoint
from qfv_brevitas.zoo.data import load_stdlib_text

SMALL = ["--val-bytes", "512", "--no-progress"]


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "lm.pt"
    assert main(["lm", "train", "--steps", "8", "--context", "16", "--lr", "0.01",
                 "--seed", "3", "--out", str(path), *SMALL]) == 0
    return path


def test_train_writes_a_checkpoint_that_scores_what_it_printed(lm_checkpoint, capsys):
    model, info = load_checkpoint(lm_checkpoint)
    assert info["arch"] == "tiny_lm" and info["input_shape"] == [16]
    _, val, fp = load_stdlib_text(16, 1, val_bytes=512)
    assert info["meta"]["corpus"] == fp
    assert evaluate_bpb(model, val) == pytest.approx(info["meta"]["val_bpb"], rel=1e-6)


def test_ptq_table_and_json(lm_checkpoint, tmp_path, capsys):
    out = tmp_path / "ptq.json"
    assert main(["lm", "ptq", str(lm_checkpoint), "--bits", "4", "--compensation", "none",
                 "gptq", "--calib-samples", "32", "--json", str(out), *SMALL[:2]]) == 0
    text = capsys.readouterr().out
    assert "Brevitas uniform (MSE)" in text and "bits per byte" in text
    rows = json.loads(out.read_text())
    assert [(r["bits"], r["compensation"]) for r in rows] == [(4, "none"), (4, "gptq")]
    assert len({r["float"] for r in rows}) == 1
    assert rows[0]["fitted"] != rows[1]["fitted"]   # GPTQ moved the weights
    assert f"{rows[0]['fitted']:.4f}" in text
    assert main(["lm", "ptq", str(lm_checkpoint), "--bits", "2", "--compensation", "none",
                 "--per-tensor", "--json", str(out), *SMALL[:2]]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["bits"], row["compensation"]) == (2, "none") and row["fitted"] != rows[0]["fitted"]


def test_qat_and_chip(lm_checkpoint, tmp_path, capsys):
    assert main(["lm", "qat", str(lm_checkpoint), "--bits", "3", "--methods", "ste", "brevitas",
                 "--steps", "4", "--lr", "0.001", "--seed", "1", *SMALL]) == 0
    text = capsys.readouterr().out
    assert "ste" in text and "brevitas" in text and "paper" not in text
    out = tmp_path / "chip.json"
    assert main(["lm", "chip", str(lm_checkpoint), "--bits", "4", "--stuck", "0", "0.2",
                 "--sigma", "0.3", "--mapping", "naive", "--trials", "2", "--repair-rate",
                 "0.2", "--steps", "4", "--lr", "0.001", "--json", str(out), *SMALL]) == 0
    res = json.loads(out.read_text())
    assert [(r["kind"], r["level"]) for r in res["sweeps"]] == \
        [("faults", 0.0), ("faults", 0.2), ("variability", 0.3)]
    ideal = res["sweeps"][0]["mean"]
    assert res["sweeps"][0]["std"] == 0 and res["sweeps"][1]["min"] > ideal
    assert res["repair"]["ideal"] == pytest.approx(ideal)
    assert "fault-aware fine-tune" in capsys.readouterr().out


def test_errors_name_the_problem(lm_checkpoint, tmp_path, capsys):
    from qfv_brevitas.zoo.checkpoint import save_checkpoint
    from qfv_brevitas.zoo.models import build_model

    other = tmp_path / "cnn.pt"
    save_checkpoint(other, build_model("mlp", (1, 8, 8), 10), "mlp", (1, 8, 8), 10)
    assert main(["lm", "ptq", str(other), "--bits", "4"]) != 0
    assert "qfv lm takes a float language model" in capsys.readouterr().err
    assert main(["lm", "chip", str(lm_checkpoint), "--workers", "2"]) != 0
    assert "one process" in capsys.readouterr().err
