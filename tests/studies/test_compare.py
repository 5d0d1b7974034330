"""Tests of ``qfv_brevitas.studies.compare`` (the related methods side by side) and of the commands
``qfv compare``, ``qfv bitflips``, ``qfv selftune`` and the ``--reg-shape``/``--sam-rho``/
``--chip-sigma`` options of the existing commands.

Rows of a comparison are checked against an independent recomputation: the row's map drawn
again from its seed, the method applied to a fresh copy of the model with the library's own
building blocks, and the accuracy evaluated.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from qfv_brevitas import (FaultModel, NMultConfig, VariabilityModel, attach_faults,
                          attach_variability, quantize_model, sample_fault_map,
                          sample_variability_map, set_deploy_mapping)
from qfv_brevitas.chip.bitflips import BitFlipModel, attach_bitflips
from qfv_brevitas.zoo.checkpoint import load_checkpoint, save_checkpoint
from qfv_brevitas.cli.app import main
from qfv_brevitas.studies.compare import compare_methods
from qfv_brevitas.studies.engine import CompareConfig
from qfv_brevitas.studies.methods import METHODS, get_method, random_bit_error_finetune
from qfv_brevitas.studies.results import StudyResult
from qfv_brevitas.studies.scenario import Scenario, scenarios
from qfv_brevitas.zoo.models import build_model
from qfv_brevitas.chip.repair import fault_aware_finetune, variability_aware_finetune
from qfv_brevitas.chip.selftune import calibration_batch, reference_statistics, self_tune
from qfv_brevitas.training.train import TrainConfig, evaluate, fit

EXEMPT = {"features.0": 0.0, "classifier.3": 0.0}
FT = TrainConfig(epochs=1, lr=0.005, lambda_rise_epochs=1)


@pytest.fixture(scope="module")
def run(trained, digits):
    model, _ = trained
    train = Subset(digits[0], range(320))
    cfg = CompareConfig(trials=1, seed=3, finetune=FT, calib_size=32)
    scs = [Scenario("faults", 0.1), Scenario("bitflips", 0.05),
           Scenario("variability", 0.3, chip_sigma=0.1)]
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    res = compare_methods(model, train, digits[1], scs, METHODS, cfg, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # model left alone
    return res, model, train, cfg


def acc_of(res, scenario, method):
    rows = [r for r in res.rows if r["scenario"] == scenario and r["method"] == method]
    assert len(rows) == 1
    return rows[0]["acc"]


def on_chip(model, sc: Scenario, seed: int):
    m = copy.deepcopy(model)
    if sc.kind == "faults":
        attach_faults(m, sample_fault_map(m, FaultModel(sc.level, seed=seed, layer_rates=EXEMPT)))
    elif sc.kind == "variability":
        attach_variability(m, sample_variability_map(m, VariabilityModel(
            sc.level, seed=seed, chip_sigma=sc.chip_sigma, layer_sigmas=EXEMPT)))
    else:
        attach_bitflips(m, BitFlipModel(sc.level, seed=seed, layer_rates=EXEMPT))
    return m


def test_which_methods_apply_where(run):
    res, *_ = run
    got = {(r["scenario"], r["method"]) for r in res.rows}
    labels = ["stuck-at 10%", "BER 5%", "LRS 30% + chip 10%"]
    assert res.scenario_labels == ["ideal device"] + labels
    for m in METHODS:
        for sc, kind in zip(labels, ("faults", "bitflips", "variability")):
            assert ((sc, m) in got) == get_method(m).applies(kind)
            if m not in ("selftune", "none"):  # none + self-tuning is the selftune row
                assert ((sc, f"{m}+selftune") in got) == get_method(m).applies(kind)
            assert (sc, "none+selftune") not in got
    assert ("ideal device", "selftune") not in got
    assert {m for sc, m in got if sc == "ideal device"} == set(METHODS) - {"selftune"}
    assert ("BER 5%", "paper") not in got and ("BER 5%", "random_bit_error") in got


def test_rows_equal_an_independent_recomputation(run, digits):
    res, model, train, cfg = run
    test = digits[1]
    faults, flips, var = Scenario("faults", 0.1), Scenario("bitflips", 0.05), \
        Scenario("variability", 0.3, chip_sigma=0.1)
    assert acc_of(res, "stuck-at 10%", "none") == evaluate(on_chip(model, faults, 3), test)
    m = on_chip(model, var, 3)
    set_deploy_mapping(m, "aware")
    assert acc_of(res, var.label, "nearest_valid") == evaluate(m, test)
    m = on_chip(model, faults, 3)
    fault_aware_finetune(m, train, None, FT, remap_every=4, progress=False)
    assert acc_of(res, "stuck-at 10%", "paper") == evaluate(m, test)
    m = on_chip(model, var, 3)
    variability_aware_finetune(m, train, None, replace(FT, reg_shape="gauss"), progress=False)
    assert acc_of(res, var.label, "gauss") == evaluate(m, test)
    # Self-tuning alone under bit flips: calibrated on the chip (statistics pooled over 8 flip
    # draws), evaluated on the same flips as the row without it; reference statistics from the
    # model on the ideal device.
    calib = calibration_batch(train, 32, 3)
    m = on_chip(model, flips, 3)
    assert acc_of(res, "BER 5%", "none") == evaluate(m, test)
    self_tune(m, calib, reference_statistics(model, calib), passes=cfg.selftune_passes)
    attach_bitflips(m, BitFlipModel(0.05, seed=3, layer_rates=EXEMPT))
    assert acc_of(res, "BER 5%", "selftune") == evaluate(m, test)
    # The methods trained once: from the given model, before any map, then deployed as is.
    saq = copy.deepcopy(model)
    fit(saq, train, None, replace(FT, sam_rho=0.05), progress=False)
    assert acc_of(res, "ideal device", "saq") == evaluate(saq, test)
    assert acc_of(res, "stuck-at 10%", "saq") == evaluate(on_chip(saq, faults, 3), test)
    rbe = copy.deepcopy(model)
    random_bit_error_finetune(rbe, train, None, FT, BitFlipModel(0.02, 3, EXEMPT),
                              progress=False)
    assert acc_of(res, "ideal device", "random_bit_error") == evaluate(rbe, test)


def test_table_summary_winners_and_files(run, tmp_path):
    res, *_ = run
    table = res.table()
    lines = table.splitlines()
    assert lines[0] == "| method | ideal device | stuck-at 10% | BER 5% | LRS 30% + chip 10% |"
    assert len(lines) == 2 + len(res.methods) and "n/a" in table
    summ = {(s["scenario"], s["method"]): s for s in res.summary()}
    best = res.winners()
    for sc, methods in best.items():
        top = max(s["mean"] for (c, _), s in summ.items() if c == sc)
        assert all(summ[(sc, m)]["mean"] == top for m in methods)
        row = next(l for l in lines if l.startswith(f"| {methods[0]} |"))
        assert "**" in row
    assert all("selftune" not in m for ms in res.winners(False).values() for m in ms)
    paths = res.save(tmp_path, "cmp")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["winners"] == best and len(data["rows"]) == len(res.rows)
    assert paths["md"].read_text().strip() == table
    assert paths["csv"].read_text().count("\n") == len(res.rows) + 1


def test_bad_input_is_refused_with_a_clear_message(trained, digits):
    model, _ = trained
    scs = [Scenario("faults", 0.1)]
    with pytest.raises(ValueError, match="unknown method 'sam'; choose one of none, "
                                         "nearest_valid, paper"):
        compare_methods(model, digits[0], digits[1], scs, ["none", "sam"], progress=False)
    with pytest.raises(ValueError, match="at least one method"):
        compare_methods(model, digits[0], digits[1], scs, [], progress=False)
    with pytest.raises(ValueError, match="at least one Scenario"):
        compare_methods(model, digits[0], digits[1], [], ["none"], progress=False)
    with pytest.raises(ValueError, match="no N-multiplier layer"):
        compare_methods(nn.Sequential(nn.Linear(2, 2)), digits[0], digits[1], scs, ["none"],
                        progress=False)
    with pytest.raises(ValueError, match="unknown scenario kind 'stuck'"):
        Scenario("stuck", 0.1)
    with pytest.raises(ValueError, match="chip_sigma applies to variability scenarios only"):
        Scenario("faults", 0.1, chip_sigma=0.1)
    with pytest.raises(ValueError, match="bitflips scenario level must be a number in"):
        Scenario("bitflips", 1.5)
    for kw, match in ((dict(trials=0), "trials"), (dict(calib_size=1), "calib_size"),
                      (dict(rbe_rate=2.0), "rbe_rate"), (dict(sam_rho=0), "sam_rho"),
                      (dict(layers="some"), "layer set"), (dict(finetune=3), "TrainConfig"),
                      (dict(remap_every=0), "remap_every"),
                      (dict(selftune_passes=0), "selftune_passes")):
        with pytest.raises(ValueError, match=match):
            CompareConfig(**kw)
    assert [s.label for s in scenarios([0.2], [], [0.4], 0.05)] == [
        "stuck-at 20%", "LRS 40%", "LRS 40% + chip 5%"]
    assert isinstance(StudyResult().table(), str)


# -- the commands --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, digits):
    """A small_cnn checkpoint as qfv demo writes it (short training: the commands' plumbing is
    under test here, not accuracy)."""
    train, _ = digits
    torch.manual_seed(0)
    fp = build_model("small_cnn", (1, 8, 8), 10)
    fit(fp, train, None, TrainConfig(epochs=2, lr=0.05), progress=False)
    cfg = NMultConfig(weight_bits=4, act_bits=None)
    q = quantize_model(fp, cfg)
    fit(q, train, None, TrainConfig(epochs=1, lr=0.01, lambda_rise_epochs=1), progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "nmult_w4.pt"
    save_checkpoint(path, q.eval(), "small_cnn", (1, 8, 8), 10, cfg, dataset="digits",
                    data_seed=0)
    return path


def test_compare_command(ckpt, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(ckpt), "--methods", "none", "nearest_valid", "selftune",
                 "--stuck", "0.1", "--ber", "0.05", "--sigmas", "0.3", "--chip-sigma", "0.1",
                 "--trials", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| method | ideal device | stuck-at 10% | BER 5% | LRS 30% | LRS 30% + chip 10% |" \
        in printed
    assert "stuck-at 10%: best" in printed
    data = json.loads((out / "compare.json").read_text())
    assert {r["method"] for r in data["rows"]} == {
        "none", "nearest_valid", "selftune", "nearest_valid+selftune"}
    assert data["meta"]["config"]["trials"] == 2
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["compare", str(ckpt), "--methods", "banana", "--out", str(out)])
    assert "invalid choice: 'banana'" in capsys.readouterr().err
    assert main(["compare", str(ckpt), "--methods", "none", "--stuck", "--ber", "--sigmas",
                 "--out", str(tmp_path / "cmp2"), "--no-progress"]) == 2
    assert "at least one Scenario" in capsys.readouterr().err


def test_bitflips_commands(ckpt, tmp_path, capsys):
    out = tmp_path / "bf"
    assert main(["bitflips", "eval", str(ckpt), "--rates", "0", "0.05", "--trials", "2",
                 "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "bitflips_eval.json").read_text())
    assert data["level_name"] == "bit-error rate" and len(data["rows"]) == 4
    ft = tmp_path / "rbe.pt"
    assert main(["bitflips", "finetune", str(ckpt), "--rate", "0.02", "--epochs", "1",
                 "--out", str(ft), "--no-progress"]) == 0
    assert "random-bit-error training at BER 0.02" in capsys.readouterr().out
    model, info = load_checkpoint(ft)
    assert info["meta"]["method"] == "random_bit_error" and info["meta"]["rbe_rate"] == 0.02
    assert main(["bitflips", "eval", str(ckpt), "--rates", "2", "--out", str(tmp_path / "bf2"),
                 "--no-progress"]) == 2


def test_selftune_command(ckpt, tmp_path, capsys):
    assert main(["selftune", str(ckpt), "--sigma", "0.3", "--chip-sigma", "0.1",
                 "--calib-size", "32"]) == 0
    line = capsys.readouterr().out
    assert "ideal device" in line and "after self-tuning (affine, 32 unlabeled images, 5 " \
                                      "layers)" in line
    fmap = tmp_path / "f.pt"
    assert main(["faults", "sample", str(ckpt), "--rate", "0.1", "--out", str(fmap)]) == 0
    assert main(["selftune", str(ckpt), "--fault-map", str(fmap), "--ber", "0.01",
                 "--correction", "shift"]) == 0
    capsys.readouterr()
    assert main(["selftune", str(ckpt)]) == 2
    assert "say which chip" in capsys.readouterr().err
    assert main(["selftune", str(ckpt), "--fault-map", str(fmap), "--rate", "0.1"]) == 2


def test_shape_sam_and_chip_options_of_the_existing_commands(ckpt, tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["train", "--out", str(out), "--bits", "3", "--variants", "nmult",
                 "--float-epochs", "1", "--qat-epochs", "1", "--lambda-rise-epochs", "1",
                 "--reg-shape", "gauss", "--reg-width", "0.5", "--sam-rho", "0.05",
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["q_train"]["reg_shape"] == "gauss" and res["q_train"]["reg_width"] == 0.5
    assert res["q_train"]["sam_rho"] == 0.05
    with pytest.raises(SystemExit):
        main(["train", "--reg-shape", "cosine", "--out", str(out)])
    assert main(["faults", "finetune", str(ckpt), "--rate", "0.1", "--epochs", "1",
                 "--reg-shape", "sin", "--out", str(tmp_path / "ft.pt"), "--no-progress"]) == 0
    ev = tmp_path / "var"
    assert main(["variability", "eval", str(ckpt), "--sigmas", "0.2", "--chip-sigma", "0.1",
                 "--maps-per-chip", "2", "--trials", "2", "--out", str(ev),
                 "--no-progress"]) == 0
    meta = json.loads((ev / "variability_eval.json").read_text())["meta"]
    assert meta["chip_sigma"] == 0.1 and meta["devices_per_chip"] == 2
    capsys.readouterr()
    assert main(["faults", "finetune", str(ckpt), "--rate", "0.1", "--epochs", "1",
                 "--reg-shape", "gauss", "--reg-width", "-1", "--out", str(tmp_path / "x.pt"),
                 "--no-progress"]) == 2
    assert "width must be a finite number > 0" in capsys.readouterr().err


def test_compare_adds_no_chip_scenario_unless_asked(ckpt, tmp_path):
    # Issue 23: --chip-sigma defaulted to 0.1, adding "LRS x% + chip 10%" columns nobody asked for.
    out = tmp_path / "cmp"
    assert main(["compare", str(ckpt), "--methods", "none", "--stuck", "--ber", "--sigmas",
                 "0.3", "--trials", "1", "--no-selftune-on-top", "--out", str(out),
                 "--no-progress"]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert [s["label"] for s in data["meta"]["scenarios"]] == ["LRS 30%"]
    assert {r["chip_sigma"] for r in data["rows"]} == {0.0}
