"""Plugins through entry points (a real dist-info folder on sys.path, found by
importlib.metadata) and ``module:function`` names: what reaches the registries, when the
plugins' code is imported, and the errors a broken one gives."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qfv_brevitas.studies.methods import (METHODS, MethodSpec, check_methods, get_method,
                                          method_names)
from qfv_brevitas.util import plugins
from qfv_brevitas.util.plugins import (PluginError, call_accepting, check_user_spec,
                                       import_allowed, import_user_object)
from qfv_brevitas.zoo.data import DATASETS, dataset_names, load_dataset
from qfv_brevitas.zoo.models import MODEL_NAMES, build_model, model_names

ROOT = Path(__file__).resolve().parents[2]
GOOD = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from qfv_brevitas.studies.methods import MethodSpec

IMPORTED = True

def wide_mlp(input_shape, num_classes):
    n = 1
    for d in input_shape:
        n *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(n, 12), nn.ReLU(), nn.Linear(12, 12),
                         nn.ReLU(), nn.Linear(12, num_classes))

def blobs(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(129) % 3
    x = torch.randn(129, 6, generator=g) * 0.3 + y[:, None].float()
    return {"train": TensorDataset(x[:96], y[:96]), "test": TensorDataset(x[96:], y[96:])}

CALLS = []

def _halve(model, scenario, train, config):
    "Halve every weight."
    CALLS.append((scenario.kind, scenario.level))

HALVE = MethodSpec(_halve, applies_to=("faults",), needs_train=False)
"""
ENTRY_POINTS = {"qfv_brevitas.models": {"wide_mlp": "qfv_plugin_good:wide_mlp"},
                "qfv_brevitas.datasets": {"blobs": "qfv_plugin_good:blobs"},
                "qfv_brevitas.methods": {"halve": "qfv_plugin_good:HALVE"}}


@pytest.fixture
def good(make_plugin):
    return make_plugin("qfv-plugin-good", "qfv_plugin_good", GOOD, ENTRY_POINTS)


def test_plugins_reach_each_registry_by_their_entry_point_name(good):
    assert "wide_mlp" in model_names() and "wide_mlp" not in MODEL_NAMES
    assert "qfv_plugin_good" not in sys.modules  # names are read without importing the code
    model = build_model("wide_mlp", (1, 2, 3), 5)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [12, 12, 5]
    assert model[1].in_features == 6 and sys.modules["qfv_plugin_good"].IMPORTED
    assert dataset_names() == DATASETS + ("blobs",)
    train, test, k, shape = load_dataset("blobs", seed=3)
    assert (len(train), len(test), k, shape) == (96, 33, 3, (6,))
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    assert torch.equal(load_dataset("blobs", seed=3)[0].tensors[0], train.tensors[0])
    assert method_names()[-1] == "halve" and "halve" not in METHODS
    m = get_method("halve")
    assert (m.name, m.applies_to, m.per_map, m.needs_train, m.doc) == (
        "halve", ("faults",), True, False, "Halve every weight.")
    assert get_method("halve") is m  # loaded once
    assert check_methods(["none", "halve"], "faults") == ["none", "halve"]
    with pytest.raises(ValueError, match="method 'halve' does not apply to variability"):
        check_methods(["halve"], "variability")
    assert "halve" in method_names("faults") and "halve" not in method_names("variability")


def test_an_unknown_name_lists_the_plugins_too(good):
    with pytest.raises(ValueError, match="choose one of small_cnn, .*wide_mlp, or give "
                                         "module:function"):
        build_model("banana", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="choose one of digits, idx, blobs$"):
        load_dataset("banana")
    with pytest.raises(ValueError, match="unknown method 'banana'; choose one of none, .*halve"):
        get_method("banana")


BROKEN = """
raise ImportError("needs the package 'nonexistent_dependency'")
"""


def test_a_plugin_that_does_not_import_is_an_error_naming_it_and_spares_the_others(
        make_plugin):
    make_plugin("qfv-plugin-broken", "qfv_plugin_broken", BROKEN,
                {"qfv_brevitas.models": {"broken": "qfv_plugin_broken:net"}})
    assert "broken" in model_names()
    assert isinstance(build_model("mlp", (1, 8, 8), 10), nn.Module)  # unrelated: fine
    with pytest.raises(PluginError, match=r"plugin 'broken' \(entry point broken = "
                       r"qfv_plugin_broken:net of distribution qfv-plugin-broken, group "
                       r"qfv_brevitas.models\) does not load: ImportError: needs the package "
                       r"'nonexistent_dependency'"):
        build_model("broken", (1, 8, 8), 10)


WRONG = """
NOT_A_FUNCTION = 42

def not_a_model(input_shape, num_classes):
    return {"layers": 3}

def no_data():
    return [1, 2, 3]
"""


def test_a_plugin_of_the_wrong_type_is_an_error_naming_it(make_plugin):
    make_plugin("qfv-plugin-wrong", "qfv_plugin_wrong", WRONG, {
        "qfv_brevitas.models": {"forty_two": "qfv_plugin_wrong:NOT_A_FUNCTION",
                                "dicty": "qfv_plugin_wrong:not_a_model"},
        "qfv_brevitas.methods": {"number": "qfv_plugin_wrong:NOT_A_FUNCTION"},
        "qfv_brevitas.datasets": {"listy": "qfv_plugin_wrong:no_data"}})
    with pytest.raises(PluginError, match="plugin 'forty_two' .*distribution "
                       "qfv-plugin-wrong.*names a builder function, got a int"):
        build_model("forty_two", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="model 'dicty': its builder returned a dict, not a "
                                         "torch.nn.Module"):
        build_model("dicty", (1, 8, 8), 10)
    with pytest.raises(PluginError, match="plugin 'number' .*names a MethodSpec or a "
                                          "function, got a int"):
        check_methods(["none", "number"])
    with pytest.raises(ValueError, match="data set 'listy': its builder returned a list; "
                                         r"expected \(train, test\)"):
        load_dataset("listy")


CLASH = """
def mlp(input_shape, num_classes):
    raise AssertionError("never called")
"""


def test_a_plugin_claiming_a_built_in_name_is_refused(make_plugin):
    make_plugin("qfv-plugin-clash", "qfv_plugin_clash", CLASH,
                {"qfv_brevitas.models": {"mlp": "qfv_plugin_clash:mlp"},
                 "qfv_brevitas.methods": {"paper": "qfv_plugin_clash:mlp"}})
    with pytest.raises(PluginError, match="plugin 'mlp' .*qfv-plugin-clash.*'mlp' is a "
                                          "built-in name of qfv_brevitas.models"):
        model_names()
    with pytest.raises(PluginError, match="plugin 'paper' .*a plugin may not replace it"):
        method_names()
    assert isinstance(build_model("mlp", (1, 8, 8), 10), nn.Module)  # the built-in, unasked


def test_two_distributions_claiming_one_name_are_refused(make_plugin):
    make_plugin("qfv-plugin-one", "qfv_plugin_one", GOOD,
                {"qfv_brevitas.models": {"same": "qfv_plugin_one:wide_mlp"}})
    make_plugin("qfv-plugin-two", "qfv_plugin_two", GOOD,
                {"qfv_brevitas.models": {"same": "qfv_plugin_two:wide_mlp"}})
    with pytest.raises(PluginError, match="claim the same name; uninstall one of them"):
        model_names()


def test_plugins_are_not_looked_for_at_import(make_plugin):
    """With a clashing plugin installed, importing the package (and listing its built-ins)
    still works: nothing reads the entry points until a registry is asked for a plugin."""
    site = make_plugin("qfv-plugin-clash", "qfv_plugin_clash", CLASH,
                       {"qfv_brevitas.models": {"mlp": "qfv_plugin_clash:mlp"}})
    code = ("import qfv_brevitas, qfv_brevitas.zoo.models as m, qfv_brevitas.studies.methods "
            "as s\nprint(m.MODEL_NAMES, len(s.METHODS))\ntry:\n    m.model_names()\n"
            "except ValueError as e:\n    print(type(e).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
                              "PATH": ""}, cwd=str(site.parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["('small_cnn',", "'mlp',", "'resnet18',", "'vgg')", "10",
                                  "PluginError"]


def test_entry_points_are_read_once(good, monkeypatch):
    calls = []
    real = importlib.metadata.entry_points

    def counting(**kw):
        calls.append(kw["group"])
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", counting)
    plugins.forget_plugins()
    for _ in range(3):
        model_names()
        build_model("wide_mlp", (4,), 2)
    assert calls == ["qfv_brevitas.models"]


# -- module:function ---------------------------------------------------------------------------

def test_a_user_function_is_imported_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "qfv_user_nets_a.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
        "class Maker:\n"
        "    @staticmethod\n"
        "    def wide(input_shape, num_classes, width=7):\n"
        "        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], width),\n"
        "                             nn.Linear(width, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "qfv_user_nets_a", raising=False)
    try:
        assert str(tmp_path) not in sys.path
        model = build_model("qfv_user_nets_a:tiny", (1, 8, 8), 4)
        assert model[1].out_features == 4
        model = build_model("qfv_user_nets_a:Maker.wide", (1, 1, 5), 3)
        assert (model[1].in_features, model[1].out_features, model[2].out_features) == (5, 7, 3)
        assert str(tmp_path) not in sys.path  # the current folder was on it for the import only
    finally:
        sys.modules.pop("qfv_user_nets_a", None)


def test_user_function_errors_say_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "qfv_user_nets_b.py").write_text(
        "import torch\n"
        "WIDTH = 3\n"
        "def not_a_model():\n"
        "    return 'a string'\n"
        "def raises(num_classes):\n"
        "    raise KeyError('width')\n")
    (tmp_path / "qfv_user_nets_c.py").write_text("import qfv_no_such_dependency\n")
    (tmp_path / "qfv_user_nets_d.py").write_text("def broken(:\n")
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(PluginError, match="--model qfv_nowhere:f: no module named "
                                              "'qfv_nowhere' in the current folder"):
            build_model("qfv_nowhere:f", (4,), 2)
        with pytest.raises(PluginError, match="importing module 'qfv_user_nets_c' failed: "
                                              "No module named 'qfv_no_such_dependency'"):
            build_model("qfv_user_nets_c:f", (4,), 2)
        with pytest.raises(PluginError, match="importing module 'qfv_user_nets_d' failed: "
                                              "SyntaxError"):
            build_model("qfv_user_nets_d:broken", (4,), 2)
        with pytest.raises(PluginError, match="module 'qfv_user_nets_b' has no 'missing'"):
            build_model("qfv_user_nets_b:missing", (4,), 2)
        with pytest.raises(PluginError, match="qfv_user_nets_b.WIDTH is a int, not a function"):
            build_model("qfv_user_nets_b:WIDTH", (4,), 2)
        with pytest.raises(ValueError, match="returned a str, not a torch.nn.Module"):
            build_model("qfv_user_nets_b:not_a_model", (4,), 2)
        with pytest.raises(ValueError, match="its builder raised KeyError: 'width'"):
            build_model("qfv_user_nets_b:raises", (4,), 2)
        with pytest.raises(ValueError, match="expected module:function"):
            build_model("qfv_user_nets_b:", (4,), 2)
    finally:
        for m in ("qfv_user_nets_b", "qfv_user_nets_c", "qfv_user_nets_d"):
            sys.modules.pop(m, None)


def test_user_data_is_checked(tmp_path, monkeypatch):
    (tmp_path / "qfv_user_data_a.py").write_text(
        "import torch\n"
        "from torch.utils.data import Dataset, TensorDataset\n"
        "class Pairs(Dataset):\n"
        "    def __init__(self, n, labels):\n"
        "        self.n, self.labels = n, labels\n"
        "    def __len__(self):\n"
        "        return self.n\n"
        "    def __getitem__(self, i):\n"
        "        return torch.full((2, 3), float(i)), self.labels[i]\n"
        "def pairs(data_dir, seed):\n"
        "    assert data_dir == 'somewhere' and seed == 5\n"
        "    return Pairs(4, [0, 1, 1, 0]), Pairs(2, [1, 0])\n"
        "def stray():\n"
        "    return Pairs(3, [0, 2, 2]), Pairs(1, [0])\n"
        "def ragged():\n"
        "    return TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0])), \\\n"
        "           TensorDataset(torch.zeros(3, 4), torch.tensor([0, 1, 0]))\n"
        "def float_labels():\n"
        "    return TensorDataset(torch.zeros(3, 2), torch.zeros(3)), \\\n"
        "           TensorDataset(torch.zeros(3, 2), torch.zeros(3))\n")
    monkeypatch.chdir(tmp_path)
    try:
        train, test, k, shape = load_dataset("qfv_user_data_a:pairs", "somewhere", 5)
        assert (len(train), len(test), k, shape) == (4, 2, 2, (2, 3))
        assert train.tensors[0][3].eq(3.0).all() and train.tensors[1].tolist() == [0, 1, 1, 0]
        with pytest.raises(ValueError, match="classes 1 never occur while label 2 does"):
            load_dataset("qfv_user_data_a:stray")
        with pytest.raises(ValueError, match=r"training inputs of shape \(2,\) but test "
                                             r"inputs of shape \(4,\)"):
            load_dataset("qfv_user_data_a:ragged")
        with pytest.raises(ValueError, match="expected numeric inputs and integer labels"):
            load_dataset("qfv_user_data_a:float_labels")
        with pytest.raises(PluginError, match="--data qfv_user_data_a:nothing: module "
                                              "'qfv_user_data_a' has no 'nothing'"):
            load_dataset("qfv_user_data_a:nothing")
    finally:
        sys.modules.pop("qfv_user_data_a", None)


def test_the_small_helpers():
    assert check_user_spec("a.b:c.d") == ("a.b", "c.d")
    for bad in ("a:", ":f", "a b:f", "a:f:g", "a-b:f"):
        with pytest.raises(ValueError, match="expected module:function"):
            check_user_spec(bad)
    assert call_accepting(lambda num_classes: num_classes, num_classes=3, input_shape=(1,)) == 3
    assert call_accepting(lambda **kw: sorted(kw), a=1, b=2) == ["a", "b"]
    assert call_accepting(lambda: 7, a=1) == 7
    assert import_allowed("m:f", True) and import_allowed("m:f", "m:f")
    assert import_allowed("m:f", ["x:y", "m:f"])
    assert not import_allowed("m:f", False) and not import_allowed("m:f", None)
    assert not import_allowed("m:f", "m:g") and not import_allowed("m:f", ["m"])
    with pytest.raises(PluginError):
        import_user_object("qfv_nowhere_at_all:f")
