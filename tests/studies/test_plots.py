"""Tests of ``qfv_brevitas.studies.plots`` and ``figstyle``: figures a reader understands without
the code (issue 23). The figure objects are inspected: titles in words (no file path), axis
labels with units, legends in words equal to the methods' labels and outside the data, what the
error bars are, the level axis in the unit of the tables, one colour per method across figures,
a width that stays under 1600 pixels with ten methods, and no backend switch at import."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_hex
from PIL import Image
from torch import nn

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.studies import figstyle, plots
from qfv_brevitas.studies.figstyle import (EXTRA_PALETTE, METHOD_LABELS, method_colour,
                                           method_label)
from qfv_brevitas.studies.methods import METHODS
from qfv_brevitas.studies.results import StudyResult

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["stuck-at 10%", "stuck-at 20%", "BER 1%", "BER 5%", "LRS 20%", "LRS 40%",
             "LRS 20% + chip 10%", "LRS 40% + chip 10%"]
TEN = list(METHODS) + [f"{m}+selftune" for m in METHODS if m != "selftune"]


def sweep(methods=("none", "paper"), levels=(0.0, 0.05, 0.1), trials=4) -> StudyResult:
    rows = [{"method": m, "level": lv, "trial": t, "seed": t, "acc": 0.9 - lv - 0.01 * t - 0.02 * i}
            for i, m in enumerate(methods) for lv in levels for t in range(trials)]
    return StudyResult("faults", rows, {"model": "small_cnn on digits"})


def comparison(methods=tuple(TEN), scenarios=tuple(SCENARIOS), trials=3) -> StudyResult:
    rows = [{"scenario": "ideal device", "kind": "ideal", "level": 0.0, "chip_sigma": 0.0,
             "method": m, "trial": 0, "seed": 0, "acc": 0.95} for m in methods
            if "+" not in m]
    rows += [{"scenario": sc, "kind": "faults", "level": 0.1, "chip_sigma": 0.0, "method": m,
              "trial": t, "seed": t, "acc": 0.5 + 0.04 * j - 0.01 * t}
             for sc in scenarios for j, m in enumerate(methods) for t in range(trials)]
    return StudyResult("compare", rows, {"model": "small_cnn on digits",
                                         "checkpoint": "/tmp/run/q.pt"})


def tiny_model(per_channel: bool = False) -> nn.Module:
    net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                        nn.Linear(10, 2))
    return quantize_model(net, NMultConfig(weight_bits=3, act_bits=None, first_last_bits=None,
                                           per_channel=per_channel))


def texts(fig) -> list:
    """Every title of the figure: its headline and each panel's."""
    return [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes if ax.get_title()]


def assert_titles_in_words(fig):
    for t in texts(fig):
        assert t.strip() and "/" not in t.replace("sigma/mu", "") and ".pt" not in t, t


def legend_texts(fig) -> list:
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def assert_legend_outside_the_data(fig):
    fig.canvas.draw()
    box = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        if ax.axison:
            assert not box.overlaps(ax.get_window_extent()), ax.get_title()


def test_sweep_figure_says_what_it_shows():
    res = sweep()
    fig = res.figure()
    assert_titles_in_words(fig)
    head = fig.get_suptitle()
    assert head.startswith("Test accuracy against the bit-fault rate: small_cnn on digits")
    assert "mean of 4 maps per point; error bars: \u00b11 standard deviation" in head
    (ax,) = fig.axes
    assert ax.get_xlabel() == "bit-fault rate (fraction of bit cells stuck)"
    assert ax.get_ylabel() == "test accuracy (%)"
    assert legend_texts(fig) == ["no correction (nearest ideal level)",
                                 "device-aware fine-tune (paper)"]
    assert_legend_outside_the_data(fig)
    # the level axis is in the unit of the table and the CSV (0.1, not 10)
    lines = [c.lines[0] for c in ax.containers]  # each method's data line
    assert lines[0].get_xdata().tolist() == [0.0, 0.05, 0.1]
    assert " 0.1 |" in res.table() and "0.05 |" in res.table()
    means = {s["level"]: 100 * s["mean"] for s in res.summary() if s["method"] == "none"}
    assert lines[0].get_ydata().tolist() == pytest.approx([means[lv] for lv in (0, .05, .1)])


def test_one_map_has_no_error_bars_to_explain():
    assert "one map per point (no error bars)" in sweep(trials=1).figure().get_suptitle()


def test_comparison_with_ten_methods_stays_readable(tmp_path):
    res = comparison()
    fig = res.figure()
    assert_titles_in_words(fig)
    assert "/tmp/run" not in fig.get_suptitle() and "small_cnn on digits" in fig.get_suptitle()
    assert "error bars: \u00b11 standard deviation over the maps; black tick: worst map" in \
        fig.get_suptitle()
    assert [ax.get_title() for ax in fig.axes if ax.axison] == ["ideal device"] + SCENARIOS
    assert [ax.get_ylabel() for ax in fig.axes[::3]] == ["test accuracy (%)"] * 3  # 3 x 3
    assert legend_texts(fig) == [method_label(m) for m in plots.plot_order(res.methods)]
    assert "nearest_valid" not in " ".join(legend_texts(fig))  # words, not registry names
    assert_legend_outside_the_data(fig)
    assert fig.get_size_inches()[0] * plots.DPI <= 1600
    png = res.plot(tmp_path / "compare.png")
    assert Image.open(png).size[0] <= 1600  # was 2557 px before issue 23


def test_a_method_keeps_its_colour_across_figures():
    line_fig = sweep(methods=("paper", "none", "saq")).figure()
    bar_fig = comparison(methods=("none", "nearest_valid", "saq", "paper",
                                  "paper+selftune")).figure()
    in_lines = {t.get_text(): to_hex(line.get_color())
                for t, line in zip(line_fig.legends[0].get_texts(),
                                   (c.lines[0] for c in line_fig.axes[0].containers))}
    in_bars = {t.get_text(): to_hex(h.get_facecolor())
               for t, h in zip(bar_fig.legends[0].get_texts(), bar_fig.legends[0].legend_handles)}
    for m in ("paper", "none", "saq"):
        assert in_lines[method_label(m)] == in_bars[method_label(m)] == method_colour(m)
    # a self-tuned row has its method's colour (hatched), the ten methods ten colours
    assert in_bars[method_label("paper+selftune")] == method_colour("paper")
    assert len({method_colour(m) for m in METHODS}) == len(METHODS) == 10
    bars = [p for p in bar_fig.axes[1].patches]
    assert to_hex(bars[3].get_facecolor()) == method_colour("paper")  # in plot order


def test_every_library_method_has_words_and_other_methods_a_stable_colour():
    assert set(METHODS) <= set(METHOD_LABELS)
    assert method_label("my_method") == "my_method"
    assert method_label("my_method+selftune") == "my_method + self-tuning"
    # the module alone (plain Python, no torch): fast in a fresh interpreter
    code = ("import importlib.util as u; s = u.spec_from_file_location('fs', "
            f"{figstyle.__file__!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.method_colour('my_method'), m.method_colour('other'))")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env=dict(os.environ, PYTHONHASHSEED=seed)).stdout
            for seed in ("1", "2", "3")}
    assert seen == {f"{method_colour('my_method')} {method_colour('other')}\n"}
    assert method_colour("my_method") in EXTRA_PALETTE


@pytest.mark.parametrize("per_channel", [False, True])
def test_levels_figure(per_channel):
    fig = plots.levels_figure({"N-multiplier W3A3": tiny_model(per_channel)})
    assert_titles_in_words(fig)
    assert fig.get_suptitle().startswith("Trained weights and the quantization levels")
    (ax,) = [a for a in fig.axes if a.axison]  # inner layers only: the middle one
    assert ax.get_title() == ("N-multiplier W3A3\nlayer 2: 3-bit N-multiplier"
                              + (", output channel 0" if per_channel else ""))
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("weight value", "number of weights")
    assert len(ax.lines) == 8  # one line per level of 3 bits
    assert legend_texts(fig) == ["weights (histogram)", "quantization levels"]
    assert_legend_outside_the_data(fig)


def test_fitted_levels_figure():
    fig = plots.fitted_levels_figure(tiny_model())
    assert_titles_in_words(fig)
    panels = [a for a in fig.axes if a.axison]
    assert len(panels) == 3 and panels[0].get_ylabel() == "number of weights"
    assert panels[0].get_title().startswith("layer 0: 3-bit, per tensor\nerror: learned ")
    assert "Lloyd-Max" in panels[0].get_title()
    assert legend_texts(fig) == ["weights (histogram)", "the layer's learned levels",
                                 "best uniform grid with the same bits",
                                 "Lloyd-Max levels (lowest error, not N-multiplier)"]
    assert_legend_outside_the_data(fig)


def test_importing_and_drawing_keep_the_users_backend(tmp_path):
    code = ("import sys, matplotlib; before = matplotlib.get_backend(); "
            "from qfv_brevitas.studies import plots; "
            "from tests.studies.test_plots import sweep; "
            f"sweep().plot({str(tmp_path / 'f.png')!r}); "
            "print(before, matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    env = dict(os.environ, MPLBACKEND="svg")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env, cwd=ROOT).stdout.split()
    assert out == ["svg", "svg", "False"]
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
