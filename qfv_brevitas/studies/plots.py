"""Figures: quantization levels over the weight histogram of a few layers, and the accuracy
plots of a study (:class:`qfv_brevitas.studies.results.StudyResult`).

Each figure is built by a ``*_figure`` function that returns a :class:`matplotlib.figure.Figure`
(to inspect or show in a notebook) and written by the matching ``plot_*`` function. Figures are
drawn with matplotlib's object API on their own Agg canvas: importing this module or drawing
leaves the user's backend (``matplotlib.get_backend()``) and pyplot's figures alone. Titles say
what is shown in words, axes carry units, legends name methods in words
(:func:`~qfv_brevitas.studies.figstyle.method_label`) with one colour per method in every figure
(:func:`~qfv_brevitas.studies.figstyle.method_colour`) and sit outside the data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from torch import nn

from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.studies.figstyle import (LEVEL_UNITS, VARIANT_LABELS, base_method,
                                           is_selftuned, method_colour, method_label)
from qfv_brevitas.util.safeio import atomic_path, check_output

__all__ = ["plot_levels", "save_figure", "plot_fitted_levels", "plot_accuracy_by_level",
           "plot_accuracy_by_scenario", "new_figure", "levels_figure", "fitted_levels_figure",
           "accuracy_by_level_figure", "accuracy_by_scenario_figure", "plot_order", "DPI"]

#: Resolution of written figures (a 12-inch-wide figure is 1200 pixels).
DPI = 100
_HIST = "#9db4d4"
_LEVELS = "#c44e52"
#: Panels per row of the by-scenario figure.
_SCENARIO_COLUMNS = 4


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas, with constrained
    layout (legends placed outside the axes keep their room). No pyplot, no backend switch."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _headline(fig: Figure, title: str, caption: str) -> None:
    fig.suptitle(f"{title}\n{caption}" if caption else title, fontsize=10)


def _legend_below(fig: Figure, handles: list, labels: List[str], width: float) -> None:
    """One legend under every panel, wrapped in as many columns as ``width`` inches hold."""
    longest = max((len(t) for t in labels), default=10)
    most = max(1, min(len(labels), int(width // (0.062 * longest + 0.6))))
    ncol = -(-len(labels) // -(-len(labels) // most))  # as many columns, rows evenly filled
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8,
               frameon=False)


def _layers_of(model: nn.Module, inner_only: bool, max_layers: int) -> list:
    layers = nmult_layers(model)
    if inner_only and len(layers) > 2:
        layers = layers[1:-1]
    return layers[:max_layers]


def levels_figure(models: Dict[str, nn.Module], max_layers: int = 3,
                  inner_only: bool = True) -> Figure:
    """One row per model, one column per layer: the weights' histogram with the layer's
    quantization levels as vertical lines (first output channel's levels if per channel)."""
    rows = [(label, _layers_of(model, inner_only, max_layers)) for label, model in models.items()]
    ncols = max(1, max((len(l) for _, l in rows), default=1))
    fig = new_figure(3.4 * ncols, 2.3 * len(rows) + 1.1)
    axes = fig.subplots(max(1, len(rows)), ncols, squeeze=False)
    for i, (label, layers) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(layers):
                ax.axis("off")
                continue
            name, layer = layers[j]
            tq = quant_of(layer)
            with torch.no_grad():
                w = layer.weight.detach().flatten().cpu().numpy()
                lv = tq.levels()[0].detach().cpu().numpy()
            ax.hist(w, bins=80, color=_HIST, zorder=2)  # over the lines: weights sit on them
            for v in lv:
                ax.axvline(v, color=_LEVELS, lw=0.7, zorder=1)
            ax.xaxis.set_major_locator(MaxNLocator(5))
            where = ", output channel 0" if tq.per_channel else ""
            ax.set_title(f"{label}\nlayer {name}: {tq.bits}-bit "
                         f"{VARIANT_LABELS.get(tq.variant, tq.variant)}{where}", fontsize=8)
            ax.set_xlabel("weight value", fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("number of weights", fontsize=8)
    _headline(fig, "Trained weights and the quantization levels they are rounded to",
              "per layer: histogram of the weights, one red line per level")
    _legend_below(fig, [Patch(color=_HIST), Line2D([], [], color=_LEVELS)],
                  ["weights (histogram)", "quantization levels"], 3.4 * ncols)
    return fig


def plot_levels(models: Dict[str, nn.Module], path: Union[str, Path], max_layers: int = 3,
                inner_only: bool = True, overwrite: bool = False) -> Path:
    """Write :func:`levels_figure` to ``path``, atomically; an existing file only with
    ``overwrite=True``."""
    check_output(path, overwrite=overwrite)
    return save_figure(levels_figure(models, max_layers, inner_only), path,
                       overwrite=overwrite)


def save_figure(fig: Figure, path: Union[str, Path], ax=None, title: str = "",
                title_size: int = 9, overwrite: bool = False,
                format: Optional[str] = None) -> Path:
    """Give ``ax`` its ``title`` (if any) and write ``fig`` to ``path`` (folders made) at
    :data:`DPI`. Written atomically (:mod:`qfv_brevitas.util.safeio`); an existing file is
    replaced only with ``overwrite=True``. ``format``: default from the suffix."""
    path = Path(path)
    if ax is not None and title:
        ax.set_title(title, fontsize=title_size)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    if not isinstance(fig.canvas, FigureCanvasAgg):  # a pyplot figure: keep its canvas
        FigureCanvasAgg(fig)
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=DPI, format=format or (path.suffix[1:] or "png"))
    return path


def fitted_levels_figure(model: nn.Module, max_bits: int = 6, max_layers: int = 12,
                         bins: int = 80) -> Figure:
    """One panel per N-multiplier layer (up to ``max_layers`` with at most ``max_bits`` bits):
    the weights' histogram with the layer's levels (solid), the best uniform grid of the same
    bits (dashed) and Lloyd-Max's free levels (dotted); each panel's title gives the squared
    error of the layer's levels and of Lloyd-Max's relative to the uniform grid. Per-channel
    layers show their first output channel. One legend below the panels."""
    layers = [(n, l) for n, l in nmult_layers(model) if quant_of(l).bits <= max_bits]
    layers = layers[:max_layers]
    ncols = min(3, max(1, len(layers)))
    nrows = max(1, -(-len(layers) // ncols))
    fig = new_figure(3.8 * ncols, 2.5 * nrows + 1.3)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    if not layers:
        axes[0][0].text(0.5, 0.5, f"no N-multiplier layer with <= {max_bits} bits",
                        ha="center", va="center")
    for k, (ax, (name, layer)) in enumerate(zip(axes.flat, layers)):
        _fitted_panel(ax, name, layer, bins, first_column=k % ncols == 0)
    _headline(fig, "Learned quantization levels against the best uniform grid and Lloyd-Max",
              "panel title: squared quantization error relative to the best uniform grid "
              "(below 1 = closer to the weights)")
    styles = [("-", _LEVELS, "the layer's learned levels"),
              ("--", "#4c72b0", "best uniform grid with the same bits"),
              (":", "#55a868", "Lloyd-Max levels (lowest error, not N-multiplier)")]
    _legend_below(fig, [Patch(color=_HIST)] + [Line2D([], [], ls=s, color=c)
                                              for s, c, _ in styles],
                  ["weights (histogram)"] + [t for _, _, t in styles], 3.8 * ncols)
    return fig


def _fitted_panel(ax, name: str, layer: nn.Module, bins: int, first_column: bool) -> None:
    """One layer of :func:`fitted_levels_figure`."""
    from qfv_brevitas.core.fitting import best_uniform_grid, grid_error, lloyd_max

    tq = quant_of(layer)
    with torch.no_grad():
        w = tq.to_groups(layer.weight.detach())[:1]
        lv = tq.levels().detach()[:1]
        uni = best_uniform_grid(w, tq.bits)
        ulv = uni.offset[:, None] + uni.step[:, None] * torch.arange(
            1 << tq.bits, dtype=w.dtype, device=w.device)
        lm = lloyd_max(w, tq.bits, init=lv)
        err = float(grid_error(w, lv)[0])
    ue, le = float(uni.error[0]), float(lm.error[0])
    ax.hist(w.flatten().cpu().numpy(), bins=bins, color=_HIST, zorder=2)
    for vals, style, color in ((lv[0], "-", _LEVELS), (ulv[0], "--", "#4c72b0"),
                               (lm.levels[0], ":", "#55a868")):
        for v in vals.tolist():
            ax.axvline(v, ls=style, color=color, lw=1.0, zorder=1)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    where = f"channel 0 of {tq.groups}" if tq.per_channel else "per tensor"
    ax.set_title(f"layer {name}: {tq.bits}-bit, {where}\nerror: learned {_rel(err, ue)}, "
                 f"Lloyd-Max {_rel(le, ue)}", fontsize=8)
    ax.set_xlabel("weight value", fontsize=8)
    ax.tick_params(labelsize=7)
    if first_column:
        ax.set_ylabel("number of weights", fontsize=8)


def plot_fitted_levels(model: nn.Module, path: Union[str, Path], max_bits: int = 6,
                       max_layers: int = 12, bins: int = 80, overwrite: bool = False) -> Path:
    """Write :func:`fitted_levels_figure` to ``path``, atomically; an existing file only with
    ``overwrite=True``."""
    check_output(path, overwrite=overwrite)
    return save_figure(fitted_levels_figure(model, max_bits, max_layers, bins), path,
                       overwrite=overwrite)


def _rel(a: float, b: float) -> str:
    return "0" if b == 0 and a == 0 else (f"{a / b:.2f}" if b > 0 else "inf")


def _caption(summary: List[dict], what: str) -> str:
    """What each point or bar and its error bar are, over how many maps."""
    k = max((int(s.get("trials", 1)) for s in summary), default=1)
    if k <= 1:
        return f"one map per {what} (no error bars)"
    return f"mean of {k} maps per {what}; error bars: \u00b11 standard deviation over the maps"


def plot_order(methods: Sequence[str]) -> List[str]:
    """``methods`` with each self-tuned row right after its method (first-seen order)."""
    bases = list(dict.fromkeys(base_method(m) for m in methods))
    return sorted(methods, key=lambda m: (bases.index(base_method(m)), is_selftuned(m)))


def accuracy_by_level_figure(summary: List[dict], level_name: str, title: str = "") -> Figure:
    """Accuracy (%) against the level (as a fraction, like the tables and CSV), one line per
    method with ±1 std error bars (``summary`` rows with ``method``, ``level``, ``mean``,
    ``std``, ``trials``). ``title``: the headline (default: what is plotted)."""
    methods = plot_order(list(dict.fromkeys(s["method"] for s in summary)))
    fig = new_figure(6.4, 4.2 + 0.22 * -(-len(methods) // 2))
    ax = fig.subplots()
    for m in methods:
        pts = sorted((s["level"], s["mean"], s["std"]) for s in summary if s["method"] == m)
        ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts],
                    yerr=[100 * p[2] for p in pts], marker="o", ms=4, capsize=3,
                    color=method_colour(m), ls="--" if is_selftuned(m) else "-",
                    label=method_label(m))
    ax.set_xlabel(f"{level_name} ({LEVEL_UNITS.get(level_name, 'as in the table')})")
    ax.set_ylabel("test accuracy (%)")
    low, high = ax.get_ylim()
    if high - low < 10:  # a flat line is not magnified into a slope
        mid = (low + high) / 2
        ax.set_ylim(max(0.0, mid - 5), max(0.0, mid - 5) + 10)
    ax.grid(alpha=0.3)
    _headline(fig, title or f"Test accuracy against the {level_name}",
              _caption(summary, "point"))
    handles, labels = ax.get_legend_handles_labels()
    _legend_below(fig, handles, labels, 6.4)
    return fig


def plot_accuracy_by_level(summary: List[dict], level_name: str, path: Union[str, Path],
                           title: str = "", overwrite: bool = False,
                           format: Optional[str] = None) -> Path:
    """Write :func:`accuracy_by_level_figure` to ``path`` (atomically; an existing file only
    with ``overwrite``)."""
    return save_figure(accuracy_by_level_figure(summary, level_name, title), path,
                       overwrite=overwrite, format=format)


def accuracy_by_scenario_figure(summary: List[dict], scenarios: List[str],
                                methods: List[str], title: str = "") -> Figure:
    """One panel per scenario (:data:`_SCENARIO_COLUMNS` to a row), one bar per method: mean
    accuracy (%), ±1 std error bar, a black tick at the worst map; a method that does not
    apply to a scenario has no bar there. One legend below the panels, in words and in each
    method's colour (``summary`` rows with ``scenario``, ``method``, ``mean``, ``std``,
    ``min``, ``trials``). Stays about 1200 pixels wide whatever the number of methods."""
    summ = {(s["scenario"], s["method"]): s for s in summary}
    methods = plot_order(methods)
    nrows = max(1, -(-len(scenarios) // _SCENARIO_COLUMNS))
    ncols = max(1, -(-len(scenarios) // nrows))  # rows evenly filled
    width = max(6.4, 3.0 * ncols)
    fig = new_figure(width, 2.3 * nrows + 1.2 + 0.2 * -(-len(methods) // 3))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for ax in axes.flat[len(scenarios):]:
        ax.axis("off")
    for ax, sc in zip(axes.flat, scenarios):
        for j, m in enumerate(methods):
            s = summ.get((sc, m))
            if s is None:
                continue
            ax.bar(j, 100 * s["mean"], 0.85, yerr=100 * s["std"], capsize=1.5,
                   color=method_colour(m), hatch="///" if is_selftuned(m) else None,
                   edgecolor="white", linewidth=0, error_kw={"elinewidth": 0.8})
            ax.plot(j, 100 * s["min"], "k_", markersize=5)
        ax.set_title(sc, fontsize=9)
        ax.set_xticks([])
        ax.set_xlim(-0.7, len(methods) - 0.3)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=7)
    for row in axes:
        row[0].set_ylabel("test accuracy (%)", fontsize=8)
    _headline(fig, title or "Test accuracy of each method in each chip scenario",
              _caption(summary, "bar") + "; black tick: worst map; no bar: does not apply")
    handles = [Patch(facecolor=method_colour(m), hatch="///" if is_selftuned(m) else None,
                     edgecolor="white") for m in methods]
    _legend_below(fig, handles, [method_label(m) for m in methods], width)
    return fig


def plot_accuracy_by_scenario(summary: List[dict], scenarios: List[str], methods: List[str],
                              path: Union[str, Path], title: str = "", overwrite: bool = False,
                              format: Optional[str] = None) -> Path:
    """Write :func:`accuracy_by_scenario_figure` to ``path`` (atomically; an existing file
    only with ``overwrite``)."""
    return save_figure(accuracy_by_scenario_figure(summary, scenarios, methods, title), path,
                       overwrite=overwrite, format=format)
