"""Spiking models through the library's training, fault, variability, repair, checkpoint and
command paths, unchanged."""
import copy
import json

import pytest
import torch

pytest.importorskip("spikingjelly")

from qfv_brevitas import NMultConfig, quantize_model  # noqa: E402
from qfv_brevitas.zoo.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from qfv_brevitas.cli.app import main  # noqa: E402
from qfv_brevitas.studies.montecarlo import evaluate_faults, evaluate_variability  # noqa: E402
from qfv_brevitas.chip.faults import FaultModel, attach_faults, sample_fault_map  # noqa: E402
from qfv_brevitas.chip.repair import fault_aware_finetune, set_deploy_mapping  # noqa: E402
from qfv_brevitas.snn import (SpikingConfig, SpikingNet, load_snn_dataset,  # noqa: E402
                              spiking_mlp, spiking_small_cnn)
from qfv_brevitas.training.train import TrainConfig, evaluate, fit  # noqa: E402


@pytest.fixture(scope="module")
def spiking_w4(digits):
    """A spiking CNN trained on rate-coded digits (T=4), then QAT'd at W4; eval mode.
    Returns ``(float model, its accuracy, W4 model, its accuracy, QAT history)``."""
    train, test = digits
    torch.manual_seed(0)
    fp = spiking_small_cnn(config=SpikingConfig(T=4))  # default width: checkpoints rebuild it
    fit(fp, train, None, TrainConfig(epochs=4, lr=0.2), progress=False)
    fp_acc = evaluate(fp, test)
    q = quantize_model(copy.deepcopy(fp), NMultConfig(weight_bits=4, act_bits=None))
    hist = fit(q, train, None, TrainConfig(epochs=2, lr=0.01, lambda_rise_epochs=1),
               progress=False)
    q.eval()
    return fp, fp_acc, q, evaluate(q, test), hist


def test_training_on_spike_encoded_digits_learns(spiking_w4):
    fp, fp_acc, q, q_acc, hist = spiking_w4
    assert fp_acc > 0.85  # 10 classes: chance is 0.1
    assert q_acc > fp_acc - 0.05
    assert hist["reg"][-1] < hist["reg"][0]  # weights pulled onto their 4-bit levels


def test_trained_model_fires_and_its_eval_weights_are_levels(spiking_w4, digits):
    _, _, q, q_acc, _ = spiking_w4
    from qfv_brevitas.core.snapping import snap_weights_

    snapped = copy.deepcopy(q)
    with torch.no_grad():
        snap_weights_(snapped)
    # Eval already runs on the levels: snapping the stored weights changes nothing.
    assert evaluate(snapped, digits[1]) == q_acc
    rates = []
    hooks = [l.register_forward_hook(lambda m, i, o: rates.append(float(o.mean())))
             for _, l in q.lifs()]
    with torch.no_grad():
        q(digits[1].tensors[0][:64])
    for h in hooks:
        h.remove()
    assert all(0 < r < 0.5 for r in rates), rates  # sparse spikes, no dead layer


def test_fault_and_variability_monte_carlo_on_a_spiking_model(spiking_w4, digits):
    _, _, q, q_acc, _ = spiking_w4
    res = evaluate_faults(q, digits[1], [0.0, 0.3], trials=2, seed=0, progress=False)
    by = {r["level"]: [] for r in res.rows}
    for r in res.rows:
        by[r["level"]].append(r["acc"])
    assert by[0.0] == [q_acc, q_acc]
    assert max(by[0.3]) < q_acc - 0.05  # 30% stuck bits hurt
    res = evaluate_variability(q, digits[1], [0.0, 0.5], trials=2, seed=0, progress=False)
    accs = {r["level"]: r["acc"] for r in res.rows}
    assert accs[0.0] == q_acc and accs[0.5] < q_acc


def test_fault_aware_finetuning_repairs_a_spiking_model(spiking_w4, digits):
    train, test = digits
    _, _, q, q_acc, _ = spiking_w4
    chip = copy.deepcopy(q)
    attach_faults(chip, sample_fault_map(chip, FaultModel(rate=0.3, seed=3, layer_rates={
        "body.features.0": 0.0, "body.classifier.1": 0.0})))
    naive = evaluate(chip, test)
    nearest = copy.deepcopy(chip)
    set_deploy_mapping(nearest, "aware")
    nearest_acc = evaluate(nearest, test)
    fault_aware_finetune(chip, train, None, TrainConfig(epochs=2, lr=0.01, lambda_rise_epochs=1),
                         remap_every=1, progress=False)
    repaired = evaluate(chip, test)
    # 30% stuck bits in the inner layers. Measured with LSQ's grid: naive 0.23, nearest valid
    # level 0.77, fault-aware 0.86 (ideal chip 0.93); the fitted default levels lose less.
    assert naive < q_acc - 0.1, (q_acc, naive)
    assert repaired > nearest_acc + 0.03 and nearest_acc > naive, (naive, nearest_acc, repaired)


def test_checkpoint_round_trip_keeps_the_spiking_model(spiking_w4, digits, tmp_path):
    _, _, q, q_acc, _ = spiking_w4
    cfg = NMultConfig(weight_bits=4, act_bits=None)
    path = save_checkpoint(tmp_path / "s.pt", q, "spiking_small_cnn", (1, 8, 8), 10, cfg,
                           snn=q.config.to_dict(), data_seed=0)
    loaded, info = load_checkpoint(path)
    assert isinstance(loaded, SpikingNet) and loaded.config == q.config
    x = digits[1].tensors[0][:64]
    assert torch.equal(loaded(x), q(x))
    assert evaluate(loaded, digits[1]) == q_acc
    # The neuron settings travel with the checkpoint.
    path = save_checkpoint(tmp_path / "t.pt", q, "spiking_small_cnn", (1, 8, 8), 10, cfg,
                           snn=SpikingConfig(T=3, tau=2.0).to_dict())
    loaded, _ = load_checkpoint(path)
    assert loaded.T == 3 and [l.node.tau for _, l in loaded.lifs()] == [2.0, 2.0, 2.0]


def test_batch_first_event_data_trains_through_fit():
    data = load_snn_dataset("synthetic", T=4)
    torch.manual_seed(0)
    net = spiking_mlp(2 * 16 * 16, 4, hidden=(128, 64),
                      config=SpikingConfig(T=4, encoding="none", layout="batch_first"))
    hist = fit(net, data.train, data.test, TrainConfig(epochs=8, lr=0.2), progress=False)
    assert hist["test_acc"][-1] > 0.6  # 4 classes: chance is 0.25


# ---------------------------------------------------------------------------------------------
# the qfv snn command, and the device commands on its checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("snn")
    rc = main(["snn", "train", "--dataset", "digits", "--model", "spiking_mlp", "--T", "4",
               "--bits", "4", "--float-epochs", "3", "--qat-epochs", "1", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    return out


def test_qfv_snn_train_reports_both_and_writes_checkpoints(snn_run, capsys):
    res = json.loads((snn_run / "results.json").read_text())
    assert res["arch"] == "spiking_mlp" and res["snn"]["T"] == 4
    assert [r["weight_bits"] for r in res["runs"]] == [4]
    # 10 classes (chance 0.1); 3 + 1 epochs of the spiking MLP reach 0.84 and 0.84 (measured)
    assert res["fp_acc"] > 0.75 and res["runs"][0]["acc"] > 0.75
    assert res["neurons"]["lif_layers"]["body.3"]["beta"] == 0.25
    model, info = load_checkpoint(snn_run / "nmult_w4.pt")
    assert isinstance(model, SpikingNet) and info["config"].act_bits is None
    assert info["meta"]["acc"] == res["runs"][0]["acc"]


def test_device_commands_load_spiking_checkpoints(snn_run, capsys, tmp_path):
    ckpt = str(snn_run / "nmult_w4.pt")
    assert main(["faults", "eval", ckpt, "--rates", "0", "0.2", "--trials", "1",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    acc = json.loads((snn_run / "results.json").read_text())["runs"][0]["acc"]
    assert f"{100 * acc:.2f}" in out  # rate 0 is the checkpoint's own accuracy
    assert main(["variability", "finetune", ckpt, "--sigma", "0.2", "--epochs", "1",
                 "--out", str(tmp_path / "v.pt"), "--no-progress"]) == 0
    assert main(["snn", "neurons", str(tmp_path / "v.pt")]) == 0
    meta = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert meta["T"] == 4 and len(meta["lif_layers"]) == 2


@pytest.mark.parametrize("argv, msg", [
    (["--dataset", "cifar10dvs"], "needs --data-dir"),
    (["--dataset", "cifar10dvs", "--data-dir", "/nonexistent/dvs"], "no such folder"),
    (["--T", "0"], "at least one step"),
    (["--T", "1000000000"], "at most 4096"),  # refused before any data or model is made
    (["--bits", "9"], "bit width"),
])
def test_qfv_snn_train_bad_input(argv, msg, capsys, tmp_path):
    assert main(["snn", "train", "--out", str(tmp_path), "--no-progress", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_qfv_snn_neurons_refuses_a_non_spiking_checkpoint(tmp_path, capsys):
    from qfv_brevitas.zoo.models import MLP

    save_checkpoint(tmp_path / "m.pt", MLP(64, 10), "mlp", (1, 8, 8), 10, None)
    assert main(["snn", "neurons", str(tmp_path / "m.pt")]) == 2
    assert "non-spiking" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["compact", "fixed"])
def test_qfv_export_writes_a_spiking_model_with_its_neurons(snn_run, tmp_path, form, capsys):
    """The synaptic layers carry their multipliers, the LIF parameters ride in the metadata,
    and the exported file (LIF unrolled over T) computes what torch computes on the same
    spike trains."""
    from qfv_brevitas.export import read_metadata

    ckpt, out = str(snn_run / "nmult_w4.pt"), tmp_path / "snn.onnx"
    extra = ["--frac-bits", "8"] if form == "fixed" else []
    assert main(["export", ckpt, "--form", form, "--out", str(out), "--samples", "32",
                 "--batch-size", "2"] + extra) == 0
    assert "PASSED" in capsys.readouterr().out
    meta = read_metadata(out)
    assert [r["layer"] for r in meta["layers"]] == ["body.1", "body.4", "body.7"]
    snn = meta["extra"]["snn"]
    assert snn["T"] == 4 and snn["lif_layers"]["body.3"]["beta"] == 0.25
    assert snn["lif_layers"]["body.3"]["v_reset"] == 0.0
    assert main(["verify", str(out), ckpt, "--samples", "32"]) == 0


@pytest.mark.parametrize("dataset, arch, classes, hw, size", [
    ("cifar10dvs", "spiking_vgg11", ("airplane", "automobile"), (128, 128), 32),
    ("ncaltech101", "spiking_resnet19", ("accordion", "airplanes"), (180, 240), 8),
])
def test_qfv_snn_train_on_a_neuromorphic_folder(tmp_path, stub_torchvision, npz_frames, dataset,
                                                arch, classes, hw, size, capsys):
    """The paper's models on CIFAR10-DVS / N-Caltech101 folders in spikingjelly's layout (10
    samples per class, frames already integrated): the command trains both models, reports
    them and writes checkpoints that rebuild the named architecture for these frames."""
    T = 2
    root = tmp_path / dataset
    (root / "events_np").mkdir(parents=True)
    for k, c in enumerate(classes):
        for j in range(10):
            npz_frames(root / f"frames_number_{T}_split_by_number" / c / f"{c}_{j}.npz", T, *hw,
                       value=float(k))
    out = tmp_path / "out"
    assert main(["snn", "train", "--dataset", dataset, "--data-dir", str(root), "--model", arch,
                 "--T", str(T), "--frame-size", str(size), "--bits", "3", "--float-epochs", "1",
                 "--qat-epochs", "1", "--batch-size", "18", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["dataset"], res["arch"], res["snn"]["T"]) == (dataset, arch, T)
    assert (res["num_train"], res["num_test"]) == (18, 2)  # per-class 9:1 split
    model, info = load_checkpoint(out / "nmult_w3.pt")
    assert isinstance(model, SpikingNet) and info["arch"] == arch
    assert tuple(info["input_shape"]) == (2, size, size) and info["num_classes"] == 2
    assert info["config"].weight_bits == 3
    with torch.no_grad():
        assert model(torch.rand(1, T, 2, size, size)).shape == (1, 2)


@pytest.mark.parametrize("dataset, shape, classes, sizes", [
    ("synthetic", (2, 16, 16), 4, (1024, 256)),
    ("idx", (1, 12, 12), 2, (200, 60)),
])
def test_qfv_snn_train_on_synthetic_events_and_idx_files(dataset, shape, classes, sizes,
                                                        idx_folder, tmp_path):
    out = tmp_path / "out"
    extra = ["--data-dir", str(idx_folder)] if dataset == "idx" else []
    assert main(["snn", "train", "--dataset", dataset, "--model", "spiking_small_cnn", "--T", "2",
                 "--float-epochs", "1", "--qat-epochs", "1", "--batch-size", "128", "--out", str(out),
                 "--no-progress", *extra]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["dataset"], res["num_train"], res["num_test"]) == (dataset, *sizes)
    model, info = load_checkpoint(out / "nmult_w4.pt")
    assert info["arch"] == "spiking_small_cnn" and isinstance(model, SpikingNet)
    assert (tuple(info["input_shape"]), info["num_classes"]) == (shape, classes)
