"""The ``qfv`` options README.md names, each run and checked for its effect: training options
reach the training, methods and mappings do what they say, device options shape the maps, and
--ideal leaves the maps out. (tests/cli/test_cli_readme.py checks that nothing README names is
left unrun.)"""
import json
import re

import numpy as np
import pytest
import torch

from qfv_brevitas.zoo.checkpoint import load_checkpoint
from qfv_brevitas.cli.app import main
from qfv_brevitas.export import load_crossbar, read_metadata
from qfv_brevitas.core.quantizers import nmult_layers, quant_of

QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """``qfv demo`` with the paper's mode named: a W4A4 small CNN on digits."""
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--model", "small_cnn", "--bits", "4", "--variants",
                 "nmult", "--forward-mode", "paper", "--float-epochs", "5", "--qat-epochs", "2",
                 "--lambda-rise-epochs", "1", *QUIET]) == 0
    res = json.loads((out / "results.json").read_text())
    # paper mode: the regularizer ran at the scheduled lambdas
    assert res["runs"][0]["history"]["lambda"] == [100.0, 2000.0]
    assert res["runs"][0]["acc"] > 0.85  # measured 0.94
    return out / "nmult_w4a4.pt"


def _layers(model):
    return {n: quant_of(l) for n, l in nmult_layers(model)}


# -- training --------------------------------------------------------------------------------------

def test_training_options_reach_the_training(tmp_path):
    out = tmp_path / "t"
    assert main(["train", "--model", "mlp", "--bits", "2", "--variants", "step", "--forward-mode", "both",
                 "--per-channel", "--float-epochs", "1", "--qat-epochs", "2", "--float-lr", "0.1",
                 "--qat-lr", "0.02", "--quant-lr", "0.001", "--quant-optimizer", "sgd",
                 "--lambda-start", "50", "--lambda-end", "500", "--lambda-rise-epochs", "1",
                 "--reg-shape", "sq", "--seed", "3", "--out", str(out), *QUIET]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["arch"], res["seed"], res["fp_train"]["lr"], res["fp_train"]["epochs"]) == \
        ("mlp", 3, 0.1, 1)
    q = res["q_train"]
    assert (q["lr"], q["quant_lr"], q["quant_optimizer"], q["lambda_start"], q["lambda_end"],
            q["reg_shape"], q["epochs"]) == (0.02, 0.001, "sgd", 50.0, 500.0, "sq", 2)
    run = res["runs"][0]
    assert (run["variant"], run["mode"], run["per_channel"], run["weight_bits"]) == \
        ("step", "both", True, 2)
    # mode "both" trains with the regularizer: the schedule applied is the one given
    assert run["history"]["lambda"] == [50.0, 500.0] and run["history"]["reg"][0] > 0
    model, info = load_checkpoint(out / "step_w2a2.pt")
    layers = dict(nmult_layers(model))
    assert {n: quant_of(l).bits for n, l in layers.items()} == {"net.1": 8, "net.3": 2,
                                                                "net.5": 8}
    for layer in layers.values():
        tq = quant_of(layer)
        assert (tq.variant, tq.mode, tq.per_channel) == ("step", "both", True)
        assert tq.groups == layer.weight.shape[0] > 1


def test_ste_mode_trains_through_the_quantizer_without_the_regularizer(tmp_path):
    out = tmp_path / "s"
    assert main(["train", "--model", "mlp", "--bits", "3", "--variants", "fixed", "--forward-mode", "ste",
                 "--float-epochs", "1", "--qat-epochs", "2", "--out", str(out), *QUIET]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["mode"] == "ste"
    assert run["history"]["lambda"] == [0.0, 0.0] and run["history"]["reg"] == [0.0, 0.0]
    model, _ = load_checkpoint(out / "fixed_w3a3.pt")
    assert {(tq.mode, tq.variant) for tq in _layers(model).values()} == {("ste", "fixed")}


@pytest.mark.parametrize("arch", ["resnet18", "vgg"])
def test_resnet18_and_vgg_train_on_small_images(arch, make_idx_folder, tmp_path):
    """The CIFAR architectures (full width) on 12x12 IDX images, one step per epoch (VGG
    leaves out the poolings the size does not allow); checkpoints rebuild them."""
    from qfv_brevitas.zoo.models import ResNetCIFAR

    data, out = make_idx_folder(tmp_path / "data", n_train=32, n_test=16), tmp_path / arch
    assert main(["train", "--dataset", "idx", "--data-dir", str(data), "--model", arch,
                 "--bits", "4", "--variants", "nmult", "--float-epochs", "1", "--qat-epochs", "1",
                 "--batch-size", "32", "--out", str(out), *QUIET]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["arch"], res["num_train"], res["num_test"]) == (arch, 32, 16)
    assert len(res["runs"][0]["history"]["task_loss"]) == 1
    model, info = load_checkpoint(out / "nmult_w4a4.pt")
    assert info["arch"] == arch and tuple(info["input_shape"]) == (1, 12, 12)
    if arch == "resnet18":
        assert isinstance(model, ResNetCIFAR) and len(_layers(model)) == 21
    else:
        assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 3
        assert len(_layers(model)) == 9  # 8 convolutions and the classifier
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 1, 12, 12)).shape == (2, 2)


# -- faults ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fault_aware", "nearest_valid", "chip_in_loop"])
def test_faults_finetune_methods(method, ckpt, tmp_path, capsys):
    out = tmp_path / f"{method}.pt"
    assert main(["faults", "finetune", str(ckpt), "--rate", "0.1", "--seed", "1", "--method",
                 method, "--epochs", "1", "--lr", "0.005", "--reg-shape", "sq", "--out", str(out),
                 *QUIET]) == 0
    assert f"after {method}" in capsys.readouterr().out
    before, _ = load_checkpoint(ckpt)
    model, info = load_checkpoint(out)
    assert info["meta"]["method"] == method
    inner = [n for n, l in nmult_layers(model) if l.weight_quant.chip.has_faults]
    assert inner  # the map travels with the model
    for name, layer in nmult_layers(model):
        mode, mapping = quant_of(layer).mode, layer.weight_quant.chip.mapping
        assert (mode, mapping) == {"fault_aware": ("paper", "aware"),
                                   "nearest_valid": ("paper", "aware"),
                                   "chip_in_loop": ("ste", "naive")}[method]
    w0 = dict(nmult_layers(before))[inner[0]].weight
    w1 = dict(nmult_layers(model))[inner[0]].weight
    # nearest-valid mapping only changes how codes are chosen; the others train
    assert torch.equal(w0, w1) == (method == "nearest_valid")


def test_faults_eval_aware_mapping_beats_naive_on_the_same_maps(ckpt, tmp_path):
    accs = {}
    for mapping in ("naive", "aware"):
        out = tmp_path / mapping
        assert main(["faults", "eval", str(ckpt), "--rates", "0.2", "--trials", "3",
                     "--mapping", mapping, "--out", str(out), *QUIET]) == 0
        rows = json.loads((out / "faults_eval.json").read_text())["rows"]
        accs[mapping] = [r["acc"] for r in rows]
    # trial by trial on the same maps (measured: naive ~0.35, aware ~0.80)
    assert all(a > n + 0.1 for a, n in zip(accs["aware"], accs["naive"])), accs


def test_faults_compare_names_each_method(ckpt, tmp_path):
    out = tmp_path / "cmp"
    assert main(["faults", "compare", str(ckpt), "--rates", "0.2", "--trials", "1", "--methods",
                 "none", "nearest_valid", "paper", "--epochs", "1", "--remap-every", "1",
                 "--reg-shape", "sq", "--out", str(out), *QUIET]) == 0
    summary = json.loads((out / "faults_compare.json").read_text())["summary"]
    acc = {s["method"]: s["mean"] for s in summary}
    assert set(acc) == {"none", "nearest_valid", "paper"}
    assert acc["nearest_valid"] > acc["none"]


# -- variability -----------------------------------------------------------------------------------

def test_variability_sample_options_shape_the_map(ckpt, tmp_path):
    from qfv_brevitas.chip.variability import VariabilityMap

    out = tmp_path / "vm.pt"
    assert main(["variability", "sample", str(ckpt), "--sigma", "0.2", "--hrs-on-off", "10",
                 "--distribution", "lognormal", "--chip-sigma", "0.1",
                 "--layer-shared-sigma", "0.05", "--seed", "2", "--out", str(out)]) == 0
    vmap = VariabilityMap.load(out)
    meta = vmap.meta
    assert (meta["sigma"], meta["hrs_on_off"], meta["distribution"], meta["chip_sigma"],
            meta["layer_shared_sigma"], meta["seed"]) == (0.2, 10.0, "lognormal", 0.1, 0.05, 2)
    shared = meta["shared_factors"]
    for name, row in vmap.summary().items():
        if row["lrs_std"] == 0:
            continue  # an 8-bit edge layer, kept ideal (--layers inner)
        f = shared["chip"] * shared["layers"][name]
        # lognormal cells: mean 1, never clipped at 0; HRS leaks ~1/10 of LRS
        assert row["lrs_min"] > 0
        assert row["lrs_mean"] == pytest.approx(f, rel=0.03)
        assert row["hrs_mean"] == pytest.approx(f / 10, rel=0.03)


def test_variability_compare_with_device_options(ckpt, tmp_path):
    out = tmp_path / "vc"
    assert main(["variability", "compare", str(ckpt), "--sigmas", "0", "0.5", "--trials", "2",
                 "--methods", "none", "paper", "--distribution", "lognormal",
                 "--hrs-on-off", "10", "--maps-per-chip", "2", "--chip-sigma", "0.1",
                 "--epochs", "1", "--out", str(out), *QUIET]) == 0
    data = json.loads((out / "variability_compare.json").read_text())
    acc = {(s["method"], s["level"]): s["mean"] for s in data["summary"]}
    assert set(acc) == {(m, s) for m in ("none", "paper") for s in (0.0, 0.5)}
    assert acc[("paper", 0.5)] > acc[("none", 0.5)]


def test_selftune_on_a_drawn_fault_map_and_a_variability_map_file(ckpt, tmp_path, capsys):
    vm = tmp_path / "vm.pt"
    assert main(["variability", "sample", str(ckpt), "--sigma", "0.4", "--out", str(vm)]) == 0
    capsys.readouterr()
    numbers = {}
    for chip in (["--rate", "0.2", "--seed", "4"], ["--variability-map", str(vm)]):
        assert main(["selftune", str(ckpt), *chip]) == 0
        out = capsys.readouterr().out
        numbers[chip[0]] = [float(v) for v in re.findall(r"([0-9.]+)%", out)]
    ideal = load_checkpoint(ckpt)[1]["meta"]["acc"]
    for ideal_acc, chip_acc, tuned in numbers.values():
        assert ideal_acc == pytest.approx(100 * ideal, abs=0.01)
        assert chip_acc < ideal_acc  # the chip hurts


# -- export and crossbar with --ideal ------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty_ckpt(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("faulty") / "nv.pt"
    assert main(["faults", "finetune", str(ckpt), "--rate", "0.2", "--seed", "5", "--method",
                 "nearest_valid", "--out", str(out), *QUIET]) == 0
    return out


def test_export_ideal_leaves_the_fault_map_out(faulty_ckpt, tmp_path):
    out = tmp_path / "ideal.onnx"
    assert main(["export", str(faulty_ckpt), "--form", "compact", "--exporter", "dynamo",
                 "--ideal", "--out", str(out), "--samples", "16"]) == 0
    meta = read_metadata(out)
    assert all(r["faults"] is None for r in meta["layers"])


def test_crossbar_ideal_holds_the_ideal_codes(faulty_ckpt, tmp_path):
    assert main(["crossbar", str(faulty_ckpt), "--out", str(tmp_path / "dev")]) == 0
    assert main(["crossbar", str(faulty_ckpt), "--out", str(tmp_path / "ideal"), "--ideal"]) == 0
    dev, ideal = load_crossbar(tmp_path / "dev"), load_crossbar(tmp_path / "ideal")
    model, _ = load_checkpoint(faulty_ckpt)
    changed = 0
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        w = layer.weight.detach()
        levels = tq.levels().detach()
        codes = ((tq.to_groups(w)[..., None] - levels[:, None, :]).abs().argmin(-1))
        bits = ((codes[..., None] >> torch.arange(tq.bits)) & 1).permute(2, 0, 1)
        planes = ideal[name]["planes"].reshape(bits.shape)
        assert np.array_equal(planes, bits.numpy().astype(np.uint8)), name  # nearest levels
        changed += int((dev[name]["planes"] != ideal[name]["planes"]).sum())
    assert changed > 0  # the device file holds the stuck bits, the ideal one does not


def test_compare_with_hrs_and_lognormal_variability(ckpt, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(ckpt), "--methods", "none", "nearest_valid", "--stuck", "--ber",
                 "--sigmas", "0.3", "--chip-sigma", "0", "--hrs-on-off", "10",
                 "--distribution", "lognormal", "--trials", "1", "--no-selftune-on-top",
                 "--out", str(out), *QUIET]) == 0
    data = json.loads((out / "compare.json").read_text())
    (sc,) = data["meta"]["scenarios"]
    assert (sc["hrs_on_off"], sc["distribution"], sc["label"]) == (
        10.0, "lognormal", "LRS 30% lognormal HRS 1/10")
    assert {(r["scenario"], r["method"]) for r in data["rows"]} == {
        (s, m) for s in ("ideal device", sc["label"]) for m in ("none", "nearest_valid")}
