"""Figures: quantization levels over the weight histogram of a few layers, and the accuracy
plots of a study (:class:`qfv_brevitas.studies.results.StudyResult`)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from qfv_brevitas.core.quantizers import nmult_layers, quant_of  # noqa: E402
from qfv_brevitas.util.safeio import atomic_path, check_output  # noqa: E402

__all__ = ["plot_levels", "save_figure", "plot_fitted_levels", "plot_accuracy_by_level",
           "plot_accuracy_by_scenario"]


def plot_levels(models: Dict[str, nn.Module], path: Union[str, Path], max_layers: int = 3,
                inner_only: bool = True, overwrite: bool = False) -> Path:
    """One row per model, one column per layer: the float weights' histogram with the
    layer's quantization levels as vertical lines (first channel's levels if per channel).
    Written atomically; an existing file only with ``overwrite=True``."""
    check_output(path, overwrite=overwrite)
    rows = []
    for label, model in models.items():
        layers = nmult_layers(model)
        if inner_only and len(layers) > 2:
            layers = layers[1:-1]
        rows.append((label, layers[:max_layers]))
    ncols = max(1, max(len(l) for _, l in rows))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(4 * ncols, 2.8 * len(rows)),
                             squeeze=False)
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
            ax.hist(w, bins=80, color="#4c72b0", alpha=0.8)
            for v in lv:
                ax.axvline(v, color="#c44e52", lw=0.8)
            ax.set_title(f"{label}: {name} ({tq.bits}-bit {tq.variant})", fontsize=9)
            ax.set_xlabel("weight")
    return save_figure(fig, path, overwrite=overwrite)


def save_figure(fig, path: Union[str, Path], ax=None, title: str = "",
                title_size: int = 9, overwrite: bool = False,
                format: Optional[str] = None) -> Path:
    """Give ``ax`` its ``title`` (if any), lay out, write ``fig`` to ``path`` (folders made)
    at 110 dpi and close it. Written atomically (:mod:`qfv_brevitas.util.safeio`); an existing
    file is replaced only with ``overwrite=True``. ``format``: default from the suffix."""
    path = Path(path)
    try:
        if ax is not None and title:
            ax.set_title(title, fontsize=title_size)
        fig.tight_layout()
        with atomic_path(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, dpi=110, format=format or (path.suffix[1:] or "png"))
    finally:
        plt.close(fig)
    return path


def plot_fitted_levels(model: nn.Module, path: Union[str, Path], max_bits: int = 6,
                       max_layers: int = 12, bins: int = 80, overwrite: bool = False) -> Path:
    """One panel per N-multiplier layer (up to ``max_layers`` with at most ``max_bits`` bits):
    the weights' histogram with the layer's levels (solid), the best uniform grid of the same
    bits (dashed) and Lloyd-Max's free levels (dotted), and each one's squared error relative
    to the uniform grid in the legend. Per-channel layers show their first output channel.
    Written atomically; an existing file only with ``overwrite=True``."""
    from qfv_brevitas.core.fitting import best_uniform_grid, grid_error, lloyd_max

    check_output(path, overwrite=overwrite)

    layers = [(n, l) for n, l in nmult_layers(model) if quant_of(l).bits <= max_bits]
    layers = layers[:max_layers]
    ncols = min(3, max(1, len(layers)))
    nrows = max(1, -(-len(layers) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.1 * nrows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    if not layers:
        axes[0][0].text(0.5, 0.5, f"no N-multiplier layer with <= {max_bits} bits",
                        ha="center", va="center")
    for ax, (name, layer) in zip(axes.flat, layers):
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
        ax.hist(w.flatten().cpu().numpy(), bins=bins, color="#9db4d4")
        for j, (vals, style, color, label) in enumerate((
                (lv[0], "-", "#c44e52", f"{tq.variant} levels ({_rel(err, ue)})"),
                (ulv[0], "--", "#4c72b0", "best uniform grid (1)"),
                (lm.levels[0], ":", "#55a868", f"Lloyd-Max ({_rel(le, ue)})"))):
            for k, v in enumerate(vals.tolist()):
                ax.axvline(v, ls=style, color=color, lw=1.0, label=label if k == 0 else None)
        where = f"channel 0 of {tq.groups}" if tq.per_channel else "per tensor"
        ax.set_title(f"{name}: {tq.bits}-bit, {where}", fontsize=9)
        ax.set_xlabel("weight")
        ax.legend(fontsize=7, loc="upper right", title="squared error x uniform",
                  title_fontsize=7)
    return save_figure(fig, path, overwrite=overwrite)


def _rel(a: float, b: float) -> str:
    return "0" if b == 0 and a == 0 else (f"{a / b:.2f}" if b > 0 else "inf")


def plot_accuracy_by_level(summary: List[dict], level_name: str, path: Union[str, Path],
                           title: str = "", overwrite: bool = False,
                           format: Optional[str] = None) -> Path:
    """Accuracy against level (``summary`` rows with ``method``, ``level``, ``mean``,
    ``std``), one line per method with std error bars, written to ``path`` (atomically; an
    existing file only with ``overwrite``)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(s["method"] for s in summary):
        pts = sorted((s["level"], s["mean"], s["std"]) for s in summary if s["method"] == m)
        xs = [100 * p[0] for p in pts]
        ax.errorbar(xs, [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                    marker="o", capsize=3, label=m)
    ax.set_xlabel(f"{level_name} (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, ax, title, title_size=10, overwrite=overwrite, format=format)


def plot_accuracy_by_scenario(summary: List[dict], scenarios: List[str], methods: List[str],
                              path: Union[str, Path], title: str = "", overwrite: bool = False,
                              format: Optional[str] = None) -> Path:
    """Grouped bars: one group per scenario, one bar per method (``summary`` rows with
    ``scenario``, ``method``, ``mean``, ``std``, ``min``), error bar = std, a black tick at the
    worst map (atomically; an existing file only with ``overwrite``)."""
    summ = {(s["scenario"], s["method"]): s for s in summary}
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(scenarios) * max(len(methods), 4) / 4
                                        + 3), 4.8))
    cmap = plt.get_cmap("tab20")
    for j, m in enumerate(methods):
        xs, ys, es, mins = [], [], [], []
        for i, sc in enumerate(scenarios):
            s = summ.get((sc, m))
            if s is None:
                continue
            xs.append(i - 0.4 + (j + 0.5) * width)
            ys.append(100 * s["mean"])
            es.append(100 * s["std"])
            mins.append(100 * s["min"])
        ax.bar(xs, ys, width, yerr=es, capsize=1.5, label=m, color=cmap(j % 20))
        ax.plot(xs, mins, "k_", markersize=4)
    ax.set_xticks(range(len(scenarios)))
    ax.set_xticklabels(scenarios, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%): mean, std, worst map")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left", bbox_to_anchor=(1.0, 0.0))
    return save_figure(fig, path, ax, title, title_size=9, overwrite=overwrite, format=format)
