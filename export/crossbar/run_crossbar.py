"""Crossbar mapping: write a checkpoint's layers as bit-plane matrices and check them the way
an accelerator computes with them.

    python export/crossbar/run_crossbar.py model.pt --out xbar [--ideal] [--samples 16]

For every layer it writes ``<layer>.npz`` (planes, r, c, device factors) and
``manifest.json`` (format in README.md / :mod:`qfv_brevitas.export.crossbar`), reads them back
and runs a crossbar matrix-vector product on the layer's real inputs (captured from test
images): ``y = c * sum(x) + sum_k r_k * (planes_k @ x)`` (conv layers unfolded into patches),
compared with the torch layer. Exit status 0 when every layer agrees within 1e-5 relative.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def crossbar_mvm(row: dict, x: np.ndarray) -> np.ndarray:
    """``x (fan_in, n)`` through one layer's crossbars: per output row ``c`` times the input sum
    plus ``r_k`` times plane ``k``'s dot products (with a device's cell factors if present)."""
    planes = row["planes"].astype(np.float64)  # (N, out, fan_in)
    r = row["r"].astype(np.float64)
    c = row["c"].astype(np.float64)
    G, N = r.shape
    rr = np.broadcast_to(r, (planes.shape[1], N)) if G == 1 else r
    cc = np.broadcast_to(c, (planes.shape[1],)) if G == 1 else c
    y = cc[:, None] * x.sum(0, keepdims=True)
    for k in range(N):
        cells = planes[k]
        if "lrs" in row:  # a "1" cell conducts lrs, a "0" cell hrs (fractions of r_k)
            cells = planes[k] * row["lrs"][k] + (1 - planes[k]) * row.get(
                "hrs", np.zeros_like(row["lrs"]))[k]
        y = y + rr[:, k:k + 1] * (cells @ x)
    return y


def layer_inputs(model: nn.Module, images: torch.Tensor, names) -> Dict[str, torch.Tensor]:
    """The inputs each named layer sees on ``images`` (after its input quantizer)."""
    seen, hooks = {}, []
    mods = dict(model.named_modules())
    for n in names:
        def hook(mod, args, out, n=n):
            x = args[0]
            if getattr(mod, "input_quant", None) is not None and mod.input_quant.is_quant_enabled:
                x = mod.input_quant(x)
                x = x.value if hasattr(x, "value") else x
            seen[n] = x.detach()
        hooks.append(mods[n].register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()
    return seen


def check_layer(layer: nn.Module, row: dict, x: torch.Tensor) -> float:
    """Max relative difference between the crossbar product and the torch layer (no bias)."""
    with torch.no_grad():
        w = layer.weight_quant.tensor_quant(layer.weight)[0]
        if isinstance(layer, nn.Linear):
            cols = x.reshape(x.shape[0], -1).T.double()
            ref = (w.double() @ cols)
        else:
            cols = F.unfold(x.double(), layer.kernel_size, layer.dilation, layer.padding,
                            layer.stride)  # (n, fan_in, L)
            cols = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)
            ref = w.double().reshape(w.shape[0], -1) @ cols
    y = crossbar_mvm(row, cols.numpy())
    return float(np.abs(y - ref.numpy()).max() / max(1.0, float(ref.abs().max())))


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--out", default="xbar")
    p.add_argument("--ideal", action="store_true", help="ideal codes, ignoring attached maps")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--dataset", choices=("digits", "idx"), default="digits")
    p.add_argument("--data-dir")
    args = p.parse_args(argv)

    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.data import load_dataset
    from qfv_brevitas.export import load_crossbar, write_crossbar
    from qfv_brevitas.export.layers import without_maps

    model, info = load_checkpoint(args.checkpoint)
    if args.ideal:
        model = without_maps(model)
    write_crossbar(model, args.out, overwrite=True)  # a crossbar folder only
    rows = load_crossbar(args.out)
    _, test, _, _ = load_dataset(args.dataset, args.data_dir,
                                 int((info.get("meta") or {}).get("data_seed", 0)))
    inputs = layer_inputs(model, test.tensors[0][:args.samples], rows)
    mods = dict(model.named_modules())
    worst = 0.0
    for name, row in rows.items():
        d = check_layer(mods[name], row, inputs[name])
        worst = max(worst, d)
        print(f"  {name}: {row['bits']} crossbars {row['matrix_shape'][0]}x"
              f"{row['matrix_shape'][1]}, max relative |crossbar - torch| {d:.2g}")
    ok = worst <= 1e-5
    print(f"wrote {args.out}/manifest.json; crossbar products {'match' if ok else 'DO NOT match'} "
          f"the torch layers (worst {worst:.2g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
