"""A user's own model, data and methods through ``qfv``: an installed plugin (a real
dist-info folder on sys.path) and ``--model``/``--data module:function``, from training to
the commands that read the checkpoint back (``--allow-import``)."""
from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest
from torch import nn

from qfv_brevitas.cli.app import main
from qfv_brevitas.zoo.checkpoint import load_checkpoint

PLUGIN = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from qfv_brevitas.studies.methods import MethodSpec

CALLS = []

def three_linear(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, num_classes))

def blobs(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(141) % 3
    x = torch.randn(141, 6, generator=g) * 0.3 + y[:, None].float()
    return TensorDataset(x[:111], y[:111]), TensorDataset(x[111:], y[111:])

def _recorded(model, scenario, train, config):
    "Leaves the model as it is; records each call."
    CALLS.append((scenario.kind, scenario.level))

RECORDED = MethodSpec(_recorded, applies_to=("faults",), needs_train=False)
"""
ENTRY_POINTS = {"qfv_brevitas.models": {"three_linear": "qfv_cli_plugin:three_linear"},
                "qfv_brevitas.datasets": {"blobs": "qfv_cli_plugin:blobs"},
                "qfv_brevitas.methods": {"recorded": "qfv_cli_plugin:RECORDED"}}
FAST = ["--bits", "3", "--variants", "nmult", "--float-epochs", "2", "--qat-epochs", "1",
        "--no-progress"]


def _linear_widths(model: nn.Module):
    return [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]


def test_help_reads_no_plugin(monkeypatch, capsys):
    def refuse(**kw):
        raise AssertionError("entry points read while printing help")

    monkeypatch.setattr(importlib.metadata, "entry_points", refuse)
    for command in ([], ["compare"], ["faults", "compare"], ["train"], ["quantize"], ["report"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--allow-import MODULE:FUNCTION" in out and "--data MODULE:FUNCTION" in out


def test_a_plugins_model_data_and_method_run_through_qfv(make_plugin, tmp_path, capsys):
    make_plugin("qfv-cli-plugin", "qfv_cli_plugin", PLUGIN, ENTRY_POINTS)
    run = tmp_path / "run"
    assert main(["train", "--model", "three_linear", "--dataset", "blobs", "--out", str(run),
                 *FAST]) == 0
    assert "dataset blobs (111 train / 30 test), model three_linear" in capsys.readouterr().out
    model, info = load_checkpoint(run / "nmult_w3a3.pt")
    assert info["arch"] == "three_linear" and info["meta"]["dataset"] == "blobs"
    assert _linear_widths(model) == [16, 16, 3]  # the plugin's three layers, its 3 classes
    out = tmp_path / "cmp"
    assert main(["compare", str(run / "nmult_w3a3.pt"), "--dataset", "blobs", "--methods",
                 "none", "recorded", "--stuck", "0.1", "--ber", "--sigmas", "--trials", "2",
                 "--no-selftune-on-top", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"none", "recorded"}
    assert sys.modules["qfv_cli_plugin"].CALLS == [("faults", 0.1)] * 2  # once per map
    assert "| recorded |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", str(run / "nmult_w3a3.pt"), "--methods", "banana"])
    assert "invalid choice: 'banana' (choose from 'none'," in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "banana", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "invalid choice: 'banana'" in err and "'three_linear'" in err


USER_CODE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

def two_layer(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 9), nn.ReLU(), nn.Linear(9, num_classes))

def wrong_width(input_shape):
    return nn.Linear(input_shape[0], 7)

def too_narrow(num_classes):
    return nn.Linear(5, num_classes)

def make_data(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(90) % 3
    x = torch.randn(90, 6, generator=g) * 0.3 + y[:, None].float()
    return {"train": TensorDataset(x[:72], y[:72]), "test": TensorDataset(x[72:], y[72:])}
"""


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """``qfv_cli_nets.py`` in the current folder; forgotten afterwards."""
    (tmp_path / "qfv_cli_nets.py").write_text(USER_CODE)
    monkeypatch.chdir(tmp_path)
    yield "qfv_cli_nets"
    sys.modules.pop("qfv_cli_nets", None)


def test_your_own_model_and_data_train_and_need_consent_to_load(user_code, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "qfv_cli_nets:two_layer", "--data",
                 "qfv_cli_nets:make_data", "--out", str(run), *FAST]) == 0
    assert ("dataset qfv_cli_nets:make_data (72 train / 18 test), model "
            "qfv_cli_nets:two_layer") in capsys.readouterr().out
    ckpt = str(run / "nmult_w3a3.pt")
    sys.modules.pop("qfv_cli_nets")
    assert main(["report", ckpt]) == 2
    err = capsys.readouterr().err
    assert ("its model is the user function qfv_cli_nets:two_layer: rebuilding it imports "
            "module 'qfv_cli_nets' and runs its code; if you trust it, pass --allow-import "
            "qfv_cli_nets:two_layer") in err
    assert "qfv_cli_nets" not in sys.modules  # refused before anything was imported
    assert main(["report", ckpt, "--allow-import", "qfv_cli_nets:other"]) == 2
    assert "qfv_cli_nets" not in sys.modules
    capsys.readouterr()
    assert main(["report", ckpt, "--allow-import", "qfv_cli_nets:two_layer"]) == 0
    assert "qfv_cli_nets" in sys.modules
    model, info = load_checkpoint(ckpt, allow_import="qfv_cli_nets:two_layer")
    assert info["arch"] == "qfv_cli_nets:two_layer" and _linear_widths(model) == [9, 3]
    assert main(["bitflips", "eval", ckpt, "--allow-import", "qfv_cli_nets:two_layer",
                 "--data", "qfv_cli_nets:make_data", "--rates", "0", "--trials", "1",
                 "--out", str(tmp_path / "bf"), "--no-progress"]) == 0
    assert main(["bitflips", "eval", ckpt, "--allow-import", "qfv_cli_nets:two_layer",
                 "--rates", "0", "--trials", "1", "--out", str(tmp_path / "bf2")]) == 2
    assert ("was trained on --data qfv_cli_nets:make_data, not digits: pass --data "
            "qfv_cli_nets:make_data") in capsys.readouterr().err
    assert main(["crossbar", ckpt, "--allow-import", "qfv_cli_nets:two_layer", "--out",
                 str(tmp_path / "xbar")]) == 0


@pytest.mark.parametrize("model, message", [
    ("qfv_cli_nets:too_narrow", "cannot take inputs of shape (6,)"),
    ("qfv_cli_nets:wrong_width", "model qfv_cli_nets:wrong_width gives (1, 7) for one input "
                                 "of shape (6,), but the data set has 3 classes"),
    ("qfv_cli_nowhere:net", "--model qfv_cli_nowhere:net: no module named 'qfv_cli_nowhere' "
                            "in the current folder"),
    ("qfv_cli_nets:missing", "module 'qfv_cli_nets' has no 'missing'"),
])
def test_a_model_that_does_not_fit_the_data_is_one_line(user_code, tmp_path, capsys, model,
                                                        message):
    assert main(["train", "--model", model, "--data", "qfv_cli_nets:make_data", "--out",
                 str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_malformed_module_function_is_refused_by_the_parser(capsys):
    for option in ("--model", "--data"):
        with pytest.raises(SystemExit):
            main(["train", option, "nets:", "--out", "x"])
        assert "expected module:function" in capsys.readouterr().err


def test_quantize_takes_your_own_model_for_a_state_dict_and_a_checkpoint(user_code, tmp_path,
                                                                         capsys):
    import torch

    from qfv_brevitas.zoo.models import build_model

    torch.manual_seed(0)
    state = tmp_path / "plain.pt"
    torch.save(build_model("qfv_cli_nets:two_layer", (6,), 3).state_dict(), state)
    common = ["--bits", "3", "--data", "qfv_cli_nets:make_data", "--compensation", "none",
              "--baseline", "none", "--no-plot", "--no-lloyd"]
    out = tmp_path / "q.pt"
    assert main(["quantize", str(state), "--model", "qfv_cli_nets:two_layer", "--out", str(out),
                 *common]) == 0
    _, info = load_checkpoint(out, allow_import=["qfv_cli_nets:two_layer"])
    assert info["arch"] == "qfv_cli_nets:two_layer" and info["config"].weight_bits == 3
    assert info["meta"]["dataset"] == "qfv_cli_nets:make_data"
    # the result names the user's function: quantizing it again needs the consent
    assert main(["quantize", str(out), "--out", str(tmp_path / "q2.pt"), *common]) == 2
    assert "pass --allow-import qfv_cli_nets:two_layer" in capsys.readouterr().err
    assert main(["quantize", str(out), "--allow-import", "qfv_cli_nets:two_layer", "--out",
                 str(tmp_path / "q2.pt"), *common]) == 0


def test_a_clashing_plugin_is_one_line_when_its_group_is_asked(make_plugin, tmp_path, capsys):
    make_plugin("qfv-cli-clash", "qfv_cli_clash", "def mlp(num_classes):\n    pass\n",
                {"qfv_brevitas.models": {"mlp": "qfv_cli_clash:mlp"}})
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "mlp", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qfv train: error: plugin 'mlp' ")
    assert "of distribution qfv-cli-clash" in err and "a plugin may not replace it" in err


def test_train_offers_no_spiking_model(capsys, tmp_path):
    pytest.importorskip("qfv_brevitas.snn")
    import qfv_brevitas.snn  # noqa: F401  (registers the spiking models)

    with pytest.raises(SystemExit):
        main(["train", "--model", "spiking_mlp", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "invalid choice: 'spiking_mlp' (choose from 'small_cnn', 'mlp', 'resnet18', " \
           "'vgg')" in err
