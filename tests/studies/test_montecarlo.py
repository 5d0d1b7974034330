"""Tests of ``qfv_brevitas.studies.montecarlo``: Monte Carlo accuracy under random fault and
variability maps and bit flips, method comparisons on common maps, and the result object (summary, table,
CSV/JSON/PNG).

Rows are checked against an independent recomputation: for a row's ``(level, seed)`` the map
is sampled again with :func:`sample_fault_map` / :func:`sample_variability_map`, attached to a
copy of the model, the row's method applied, and the accuracy evaluated; summaries against
the ``statistics`` module.
"""
from __future__ import annotations

import copy
import csv
import json
import statistics

import pytest
import torch
from PIL import Image

from qfv_brevitas import (FaultModel, VariabilityModel, attach_faults, attach_variability,
                          nmult_layers, sample_fault_map, sample_variability_map,
                          set_deploy_mapping)
from qfv_brevitas.studies import (StudyResult, compare_faults, compare_variability,
                                  evaluate_faults, evaluate_variability)
from qfv_brevitas.chip.bitflips import BitFlipModel, attach_bitflips
from qfv_brevitas.studies.montecarlo import evaluate_bitflips
from qfv_brevitas.studies.scenario import edge_layers
from qfv_brevitas.zoo.models import SmallCNN
from qfv_brevitas.chip.repair import (chip_in_loop_finetune, fault_aware_finetune,
                                 variability_aware_finetune)
from qfv_brevitas.training.train import TrainConfig, evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fingerprint(model, test):
    """Everything an evaluation must leave alone: state dict, maps, mapping, mode, outputs."""
    x = test.tensors[0][:64]
    with torch.no_grad():
        out = model(x)
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
          for k, v in model.state_dict().items()}
    layers = [(n, l.weight_quant.chip.has_faults, l.weight_quant.chip.has_variability,
               l.weight_quant.chip.mapping, l.weight_quant.tensor_quant.mode)
              for n, l in nmult_layers(model)]
    return out, sd, layers, model.training


def assert_unchanged(before, after):
    out0, sd0, layers0, training0 = before
    out1, sd1, layers1, training1 = after
    assert torch.equal(out0, out1)
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        if isinstance(sd0[k], torch.Tensor):
            assert torch.equal(sd0[k], sd1[k]), k
        else:
            assert sd0[k] == sd1[k], k
    assert layers0 == layers1 and training0 == training1
    assert not any(has_f or has_v for _, has_f, has_v, _, _ in layers1)  # no map left behind


EDGES = ("features.0", "classifier.3")  # first and last N-multiplier layers of SmallCNN


def fault_row_acc(model, test, row, layers="inner", sa1_fraction=0.5):
    """A row of a fault evaluation, recomputed: its map (rate, seed) on a copy, its method.
    ``layers="inner"`` keeps the first and last layers fault-free."""
    m = copy.deepcopy(model)
    exempt = {n: 0.0 for n in EDGES} if layers == "inner" else {}
    attach_faults(m, sample_fault_map(m, FaultModel(rate=row["level"],
                                                    sa1_fraction=sa1_fraction,
                                                    seed=row["seed"], layer_rates=exempt)))
    set_deploy_mapping(m, {"none": "naive", "nearest_valid": "aware"}[row["method"]])
    return evaluate(m, test)


# -- evaluate_faults -----------------------------------------------------------------------------

RATES = [0.0, 0.02, 0.2]
TRIALS = 3


@pytest.fixture(scope="module")
def fault_eval(trained, digits):
    q, _ = trained
    before = fingerprint(q, digits[1])
    res = evaluate_faults(q, digits[1], rates=RATES, trials=TRIALS, seed=10, progress=False)
    return res, before


def test_rows_cover_every_rate_and_trial_with_consecutive_seeds(fault_eval):
    res, _ = fault_eval
    assert isinstance(res, StudyResult) and res.kind == "faults"
    assert res.level_name == "bit-fault rate"
    assert [(r["method"], r["level"], r["trial"], r["seed"]) for r in res.rows] == [
        ("none", lv, k, 10 + k) for lv in RATES for k in range(TRIALS)]
    assert res.meta["levels"] == RATES and res.meta["trials"] == TRIALS
    assert res.meta["seed"] == 10 and res.meta["methods"] == ["none"]
    assert res.meta["layers"] == "inner"  # the default: 8-bit edges stay fault-free


def test_rate_zero_rows_equal_the_clean_accuracy_exactly(fault_eval, trained):
    res, _ = fault_eval
    _, clean = trained
    zero = [r["acc"] for r in res.rows if r["level"] == 0.0]
    assert zero == [clean] * TRIALS


def test_each_row_is_the_accuracy_on_its_own_seeded_map(fault_eval, trained, digits):
    res, _ = fault_eval
    q, _ = trained
    for row in res.rows:
        if row["level"] > 0:
            assert row["acc"] == fault_row_acc(q, digits[1], row), row


def test_accuracy_drops_at_a_high_rate(fault_eval, trained):
    res, _ = fault_eval
    _, clean = trained
    high = [r["acc"] for r in res.rows if r["level"] == 0.2]
    assert max(high) < clean - 0.2


def test_edge_layers_and_all_layers_on_the_device(trained, digits):
    q, _ = trained
    assert edge_layers(q) == list(EDGES)
    res = evaluate_faults(q, digits[1], rates=[0.05], trials=2, seed=10, layers="all",
                          progress=False)
    assert res.meta["layers"] == "all"
    inner = evaluate_faults(q, digits[1], rates=[0.05], trials=2, seed=10, progress=False)
    for row, row_inner in zip(res.rows, inner.rows):
        assert row["acc"] == fault_row_acc(q, digits[1], row, layers="all"), row
        assert row_inner["acc"] == fault_row_acc(q, digits[1], row_inner), row_inner
    assert [r["acc"] for r in res.rows] != [r["acc"] for r in inner.rows]


def test_the_model_passed_in_is_not_modified(fault_eval, trained, digits):
    res, before = fault_eval
    q, _ = trained
    assert_unchanged(before, fingerprint(q, digits[1]))


def test_same_seed_same_rows_other_seed_other_maps(fault_eval, trained, digits):
    res, _ = fault_eval
    q, _ = trained
    again = evaluate_faults(q, digits[1], rates=RATES, trials=TRIALS, seed=10, progress=False)
    assert again.rows == res.rows
    other = evaluate_faults(q, digits[1], rates=RATES, trials=TRIALS, seed=11, progress=False)
    assert [r["seed"] for r in other.rows] == [11 + r["trial"] for r in other.rows]
    assert [r["acc"] for r in other.rows if r["level"] == 0] == \
        [r["acc"] for r in res.rows if r["level"] == 0]
    assert any(a["acc"] != b["acc"] for a, b in zip(res.rows, other.rows) if a["level"] > 0)


def test_aware_mapping_is_the_nearest_valid_method(trained, digits):
    q, clean = trained
    res = evaluate_faults(q, digits[1], rates=[0.05], trials=2, seed=3, mapping="aware",
                          progress=False)
    assert {r["method"] for r in res.rows} == {"nearest_valid"}
    for row in res.rows:
        assert row["acc"] == fault_row_acc(q, digits[1], row)


def test_summary_matches_the_statistics_module(fault_eval):
    res, _ = fault_eval
    summ = res.summary()
    assert [(s["method"], s["level"]) for s in summ] == [("none", lv) for lv in RATES]
    for s in summ:
        accs = [r["acc"] for r in res.rows if r["level"] == s["level"]]
        assert s["trials"] == len(accs) == TRIALS
        assert s["mean"] == pytest.approx(statistics.mean(accs), rel=1e-12, abs=1e-15)
        assert s["std"] == pytest.approx(statistics.stdev(accs), rel=1e-9, abs=1e-15)
        assert (s["min"], s["max"]) == (min(accs), max(accs))
    assert any(s["std"] > 0 for s in summ)  # a check on std that could fail


def test_summary_of_a_single_trial_has_zero_std():
    res = StudyResult("variability", rows=[
        {"method": "a", "level": 0.1, "trial": 0, "seed": 0, "acc": 0.5}])
    assert res.summary() == [{"method": "a", "level": 0.1, "mean": 0.5, "std": 0.0,
                              "min": 0.5, "max": 0.5, "trials": 1}]
    assert res.level_name == "sigma/mu"


def test_save_writes_csv_json_and_png(fault_eval, tmp_path):
    res, _ = fault_eval
    paths = res.save(tmp_path / "out", "faults")
    assert {k: p.name for k, p in paths.items()} == {"csv": "faults.csv", "json": "faults.json",
                                                      "png": "faults.png"}
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    parsed = [{"method": r["method"], "level": float(r["level"]), "trial": int(r["trial"]),
               "seed": int(r["seed"]), "acc": float(r["acc"])} for r in rows]
    assert parsed == res.rows
    data = json.loads(paths["json"].read_text())
    assert data["kind"] == "faults" and data["level_name"] == "bit-fault rate"
    assert data["rows"] == res.rows and data["summary"] == res.summary()
    assert data["meta"]["levels"] == RATES and data["meta"]["sa1_fraction"] == 0.5
    raw = paths["png"].read_bytes()
    assert raw[:8] == PNG_MAGIC
    with Image.open(paths["png"]) as im:
        im.verify()
    with Image.open(paths["png"]) as im:
        assert im.size[0] > 100 and im.size[1] > 100


# -- compare_faults ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fault_cmp(trained, digits):
    q, _ = trained
    before = fingerprint(q, digits[1])
    res = compare_faults(q, None, digits[1], rates=[0.05, 0.1], trials=2,
                         methods=("none", "nearest_valid"), seed=4, progress=False)
    return res, before


def test_compare_faults_puts_every_method_on_the_same_maps(fault_cmp, trained, digits):
    res, before = fault_cmp
    q, _ = trained
    assert len(res.rows) == 2 * 2 * 2
    by = {}
    for row in res.rows:
        by.setdefault((row["level"], row["trial"]), {})[row["method"]] = row["seed"]
        # the row's accuracy is its method on the map of its (rate, seed)
        assert row["acc"] == fault_row_acc(q, digits[1], row), row
    assert all(s == {"none": 4 + t, "nearest_valid": 4 + t} for (_, t), s in by.items())
    assert_unchanged(before, fingerprint(q, digits[1]))


def test_nearest_valid_beats_naive_deployment_on_average(fault_cmp):
    res, _ = fault_cmp
    mean = {m: statistics.mean(r["acc"] for r in res.rows if r["method"] == m)
            for m in ("none", "nearest_valid")}
    assert mean["nearest_valid"] >= mean["none"]
    assert mean["nearest_valid"] > mean["none"] + 0.1  # by a clear margin on this model


def test_table_mentions_each_method_and_level(fault_cmp):
    res, _ = fault_cmp
    table = res.table()
    head = table.splitlines()[0]
    assert "bit-fault rate" in head and "none" in head and "nearest_valid" in head
    body = table.splitlines()[2:]
    assert len(body) == 2 and body[0].split("|")[0].strip() == "0.05"
    for s in res.summary():
        assert f"{100 * s['mean']:6.2f}" in table


@pytest.mark.parametrize("call,match", [
    (lambda q, tr, te: compare_faults(q, tr, te, rates=[0.1], methods=("none", "magic"),
                                      progress=False),
     r"unknown fault method 'magic'; choose one of none, nearest_valid, paper, gauss, sin, "
     r"chip_in_loop"),
    (lambda q, tr, te: compare_variability(q, tr, te, sigmas=[0.1], methods=("fault_aware",),
                                           progress=False),
     r"unknown variability method 'fault_aware'; choose one of none, nearest_valid, paper, "),
    (lambda q, tr, te: evaluate_faults(q, te, rates=[0.1, 1.5], progress=False),
     r"fault rates must be in \[0, 1(\.0)?\], got 1\.5"),
    (lambda q, tr, te: compare_faults(q, tr, te, rates=[-0.1], progress=False),
     r"fault rates must be in \[0, 1(\.0)?\], got -0\.1"),
    (lambda q, tr, te: evaluate_faults(q, te, rates=[float("nan")], progress=False),
     r"fault rates must be in"),
    (lambda q, tr, te: evaluate_faults(q, te, rates=[], progress=False),
     r"give at least one fault rate"),
    (lambda q, tr, te: evaluate_faults(q, te, rates=[0.1], trials=0, progress=False),
     r"trials must be an integer >= 1, got 0"),
    (lambda q, tr, te: compare_faults(q, tr, te, rates=[0.1], trials=0, progress=False),
     r"trials must be an integer >= 1, got 0"),
    (lambda q, tr, te: evaluate_variability(q, te, sigmas=[0.1, -0.2], progress=False),
     r"sigmas must be in >= 0, got -0\.2"),
    (lambda q, tr, te: compare_variability(q, tr, te, sigmas=[-0.1], progress=False),
     r"sigmas must be in >= 0, got -0\.1"),
    (lambda q, tr, te: evaluate_faults(q, te, rates=[0.1], mapping="smart", progress=False),
     r"unknown deploy mapping 'smart'"),
    (lambda q, tr, te: evaluate_faults(q, te, rates=[0.1], layers="outer", progress=False),
     r"unknown layer set 'outer'; choose one of inner, all"),
    (lambda q, tr, te: compare_variability(q, tr, te, sigmas=[0.1], layers="edges",
                                           progress=False),
     r"unknown layer set 'edges'"),
])
def test_bad_arguments_are_refused_with_a_clear_message(trained, digits, call, match):
    q, _ = trained
    with pytest.raises(ValueError, match=match):
        call(q, digits[0], digits[1])


def test_an_unknown_layer_set_is_refused_even_when_every_rate_is_zero(trained, digits):
    q, _ = trained
    with pytest.raises(ValueError, match=r"unknown layer set 'outer'"):
        evaluate_faults(q, digits[1], rates=[0.0], trials=1, layers="outer", progress=False)


@pytest.mark.parametrize("trials", [2.5, True])
def test_a_non_integer_number_of_trials_is_refused(trained, digits, trials):
    q, _ = trained
    with pytest.raises(ValueError, match=r"trials"):
        evaluate_faults(q, digits[1], rates=[0.1], trials=trials, progress=False)


def test_a_model_without_quantized_layers_is_refused(digits):
    plain = SmallCNN(1, 10, width=8)
    with pytest.raises(ValueError, match="no N-multiplier layer"):
        evaluate_faults(plain, digits[1], rates=[0.1], trials=1, progress=False)


def test_compare_faults_fine_tunes_a_copy_per_map(trained, digits):
    """paper (the fault-aware fine-tune) and chip_in_loop train a copy of the model per map: each row is the same
    fine-tune redone independently, and the model passed in is left as it was."""
    q, _ = trained
    train, test = digits
    before = fingerprint(q, test)
    ft = TrainConfig(epochs=1, lr=0.01, lambda_rise_epochs=1)
    res = compare_faults(q, train, test, rates=[0.1], trials=1,
                         methods=("paper", "chip_in_loop"), finetune=ft, remap_every=1,
                         seed=6, progress=False)
    assert [(r["method"], r["seed"]) for r in res.rows] == [("paper", 6),
                                                             ("chip_in_loop", 6)]
    assert res.meta["finetune_epochs"] == 1 and res.meta["remap_every"] == 1
    fm = FaultModel(rate=0.1, seed=6, layer_rates=dict.fromkeys(EDGES, 0.0))
    fa = attach_faults(copy.deepcopy(q), sample_fault_map(q, fm))
    fault_aware_finetune(fa, train, None, ft, remap_every=1, progress=False)
    assert res.rows[0]["acc"] == evaluate(fa, test)
    cil = attach_faults(copy.deepcopy(q), sample_fault_map(q, fm))
    chip_in_loop_finetune(cil, train, None, ft, progress=False)
    assert res.rows[1]["acc"] == evaluate(cil, test)
    assert_unchanged(before, fingerprint(q, test))


# -- variability ---------------------------------------------------------------------------------

def test_evaluate_variability_rows_are_their_seeded_maps(trained, digits):
    q, clean = trained
    test = digits[1]
    res = evaluate_variability(q, test, sigmas=[0.0, 0.2], trials=2, seed=5, progress=False)
    assert res.kind == "variability"
    assert [r["acc"] for r in res.rows if r["level"] == 0] == [clean, clean]
    for row in res.rows:
        assert row["method"] == "none" and row["seed"] == 5 + row["trial"]
        if row["level"] > 0:
            m = copy.deepcopy(q)
            attach_variability(m, sample_variability_map(m, VariabilityModel(
                sigma=row["level"], seed=row["seed"], layer_sigmas=dict.fromkeys(EDGES, 0.0))))
            assert row["acc"] == evaluate(m, test)
    assert max(r["acc"] for r in res.rows if r["level"] > 0) < clean


def test_compare_variability_runs_on_common_maps(trained, digits):
    q, _ = trained
    train, test = digits
    before = fingerprint(q, test)
    ft = TrainConfig(epochs=1, lr=0.005, lambda_rise_epochs=1)
    res = compare_variability(q, train, test, sigmas=[0.1], trials=1,
                              methods=("none", "paper"), finetune=ft, seed=2,
                              progress=False)
    assert [(r["method"], r["level"], r["seed"]) for r in res.rows] == [
        ("none", 0.1, 2), ("paper", 0.1, 2)]
    assert res.meta["finetune_epochs"] == 1 and res.meta["methods"] == ["none", "paper"]
    # recomputed independently on the map of seed 2
    vm = VariabilityModel(sigma=0.1, seed=2, layer_sigmas=dict.fromkeys(EDGES, 0.0))
    naive = attach_variability(copy.deepcopy(q), sample_variability_map(q, vm))
    assert res.rows[0]["acc"] == evaluate(naive, test)
    tuned = attach_variability(copy.deepcopy(q), sample_variability_map(q, vm))
    variability_aware_finetune(tuned, train, None, ft, progress=False)
    assert res.rows[1]["acc"] == evaluate(tuned, test)
    assert "paper" in res.table() and "sigma/mu" in res.table()
    assert_unchanged(before, fingerprint(q, test))


# -- evaluate_bitflips ---------------------------------------------------------------------------

def test_evaluate_bitflips_rows_are_reproducible(trained, digits):
    model, clean = trained
    test = digits[1]
    res = evaluate_bitflips(model, test, [0.0, 0.05], trials=2, seed=5, progress=False)
    assert res.kind == "bitflips" and res.level_name == "bit-error rate"
    assert [(r["level"], r["seed"]) for r in res.rows] == [(0.0, 5), (0.0, 6), (0.05, 5),
                                                          (0.05, 6)]
    assert res.rows[0]["acc"] == clean
    for row in res.rows[2:]:
        m = copy.deepcopy(model)
        attach_bitflips(m, BitFlipModel(rate=0.05, seed=row["seed"],
                                        layer_rates={"features.0": 0.0, "classifier.3": 0.0}))
        assert evaluate(m, test) == row["acc"]
    assert max(r["acc"] for r in res.rows[2:]) < clean  # 5% of the bits flipped hurts
    bad = evaluate_bitflips(model, test, [0.05], trials=1, layers="all", progress=False)
    assert bad.meta["layers"] == "all"
    with pytest.raises(ValueError, match="bit-error rates must be in"):
        evaluate_bitflips(model, test, [1.5], progress=False)
