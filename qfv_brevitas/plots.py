"""Figures: quantization levels over the weight histogram of a few layers."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .quantizers import nmult_layers, quant_of  # noqa: E402
from .safeio import atomic_path, check_output  # noqa: E402

__all__ = ["plot_levels", "save_figure"]


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
    at 110 dpi and close it. Written atomically (:mod:`qfv_brevitas.safeio`); an existing
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
