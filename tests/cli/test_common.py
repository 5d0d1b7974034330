"""Tests of ``qfv_brevitas.cli.common``: the command registry (one way to declare a command),
and argument groups whose defaults are the configs' own."""
from __future__ import annotations

import argparse

import pytest

from qfv_brevitas.cli import common
from qfv_brevitas.cli.app import build_parser
from qfv_brevitas.training.train import TrainConfig
from qfv_brevitas.studies.engine import CompareConfig, default_finetune
from qfv_brevitas.studies.scenario import Scenario


def _leaf(*path):
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def test_a_command_is_registered_once_and_needs_its_group():
    with pytest.raises(ValueError, match="qfv compare is registered already"):
        common.command("compare", help="again")(lambda p: None)
    with pytest.raises(ValueError, match="register the group qfv nowhere first"):
        common.command("nowhere", "eval")(lambda p: None)
    with pytest.raises(ValueError, match="register the group qfv compare first"):
        common.command("compare", "sub")(lambda p: None)


def test_every_leaf_runs_a_registered_function_with_the_run_options():
    for path in (("demo",), ("faults", "eval"), ("variability", "compare"), ("compare",),
                 ("bitflips", "finetune"), ("selftune",), ("quantize",), ("export",),
                 ("snn", "neurons")):
        p = _leaf(*path)
        assert callable(p.get_default("_run")), path
        assert p.get_default("threads") == "auto" and p.get_default("device") is None
        opts = {o for a in p._actions for o in a.option_strings}
        assert {"--threads", "--device"} <= opts, path
        assert ("--workers" in opts) == ("--trials" in opts), path


def test_study_and_finetune_defaults_come_from_the_configs():
    ft = default_finetune()
    for path in (("faults", "finetune"), ("variability", "compare"), ("compare",),
                 ("bitflips", "finetune")):
        p = _leaf(*path)
        assert (p.get_default("epochs"), p.get_default("lr"),
                p.get_default("lambda_rise_epochs")) == (ft.epochs, ft.lr, ft.lambda_rise_epochs)
        assert p.get_default("reg_width") == TrainConfig.reg_width
    cmp = _leaf("compare")
    for name in ("trials", "calib_size", "selftune_passes", "rbe_rate", "sam_rho",
                 "remap_every"):
        assert cmp.get_default(name) == getattr(CompareConfig, name), name
    var = _leaf("variability", "eval")
    for name, field in (("hrs_on_off",) * 2, ("distribution",) * 2, ("chip_sigma",) * 2,
                        ("layer_shared_sigma",) * 2, ("maps_per_chip", "devices_per_chip")):
        assert var.get_default(name) == getattr(Scenario, field), name
    assert _leaf("faults", "sample").get_default("sa1_fraction") == Scenario.sa1_fraction
    assert _leaf("faults", "finetune").get_default("sam_rho") == TrainConfig.sam_rho
