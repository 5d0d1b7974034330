"""Crossbar mapping: per layer, the bit-plane matrices and multipliers an accelerator loads.

A layer's weights become a matrix ``W (out, fan_in)`` (PyTorch order: ``weight.reshape(out,
-1)``, a conv kernel flattened as ``(in, kh, kw)``). Bit ``k`` of every weight's code forms the
0/1 plane ``planes[k] (out, fan_in)``: the cells of crossbar ``k`` (paper section 5.4, Fig. 7).
The layer computes ``y = c * sum_i x_i + sum_k r_k * (planes[k] @ x)`` per output row, i.e.
``W = c + sum_k r_k planes[k]`` with ``r``/``c`` per layer (one row) or per output channel.

Files (format ``qfv-crossbar/1``), in one folder:

- ``manifest.json``: ``{"format", "layers": [{"layer", "file", "bits", "weight_shape",
  "matrix_shape", "granularity", "sha256", "faults", "variability"}]}``
- ``<layer>.npz`` per layer: ``planes`` uint8 ``(N, out, fan_in)``, ``r`` float32 ``(G, N)``,
  ``c`` float32 ``(G,)``, and with a variability map ``lrs``/``hrs`` float32
  ``(N, out, fan_in)`` (each cell's factor; ideal 1 and 0).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
from torch import nn

from qfv_brevitas.util.budgets import MAX_NPZ_BYTES, check_npz, quoted, read_json_file
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.core.quantizers import nmult_layers
from qfv_brevitas.util.safeio import atomic_dir
from qfv_brevitas.export.layers import collect_layers, without_maps
from qfv_brevitas.export.ops import nmult_weight

__all__ = ["CROSSBAR_FORMAT", "write_crossbar", "load_crossbar", "not_a_crossbar_folder"]

CROSSBAR_FORMAT = "qfv-crossbar/1"


def _sha(path: Path) -> str:
    with open(path, "rb") as fh:  # streamed: memory does not grow with the file
        return hashlib.file_digest(fh, "sha256").hexdigest()


def not_a_crossbar_folder(folder: Path) -> Optional[str]:
    """Why ``folder`` is not a crossbar folder that may be replaced (None if it is one)."""
    try:
        manifest = read_json_file(folder / "manifest.json", error=QfvError,
                                  what="a crossbar manifest", follow_links=False)
        own = {row["file"] for row in manifest["layers"]} | {"manifest.json"}
        if manifest.get("format") != CROSSBAR_FORMAT:
            own = set()
    except (QfvError, KeyError, TypeError, AttributeError):
        own = set()
    other = sorted(p.name for p in folder.iterdir()  # a crossbar holds regular files only
                   if p.name not in own or not stat.S_ISREG(p.lstat().st_mode))
    if other:
        return (f"it holds files that are not from a crossbar mapping ({', '.join(other[:5])}"
                f"{', ...' if len(other) > 5 else ''}); choose another folder")
    return None  # (an unreadable manifest counts every file as foreign: an empty folder only)


def write_crossbar(model: nn.Module, folder: Union[str, Path], with_maps: bool = True,
                   overwrite: bool = False, inputs=()) -> Path:
    """Write every N-multiplier layer of ``model`` as crossbar planes; returns the manifest.

    ``with_maps=True`` writes the codes the chip holds (stuck bits forced) and the per-cell
    factors of an attached variability map; ``with_maps=False`` the ideal codes. Per-channel
    layers must have their channels on axis 0 (``r``/``c`` rows are the matrix rows).
    The folder is written whole (:func:`qfv_brevitas.util.safeio.atomic_dir`): an existing crossbar
    folder is replaced only with ``overwrite=True``, and never mixed with the new files; a
    folder holding anything else is refused. ``inputs``: paths the folder must not hold.
    """
    if not nmult_layers(model):
        raise QfvError("the model has no N-multiplier layers: nothing to map onto crossbars")
    from qfv_brevitas.export.api import on_cpu

    model = on_cpu(model)[0]
    with atomic_dir(folder, overwrite=overwrite, inputs=inputs,
                    replaceable=not_a_crossbar_folder) as tmp:
        _write_layers(model, tmp, with_maps)
    return Path(folder) / "manifest.json"


def _write_layers(model: nn.Module, folder: Path, with_maps: bool) -> None:
    if not with_maps:
        model = without_maps(model)
    rows = []
    for info in collect_layers(model.eval()):
        if info.axis > 0:
            raise QfvError(f"layer {info.name!r}: per-channel multipliers on axis {info.axis}; "
                             "the crossbar format expects output channels on axis 0")
        out = info.weight_shape[0]
        planes = np.stack([p.numpy().reshape(out, -1) for p in info.bit_planes()]).astype(np.uint8)
        arrays = {"planes": planes, "r": info.r.numpy().astype(np.float32),
                  "c": info.c.numpy().astype(np.float32)}
        for key in ("lrs", "hrs"):
            t = getattr(info, key)
            if t is not None:
                arrays[key] = np.moveaxis(t.numpy().reshape(out, -1, info.bits), -1, 0)
        fname = f"{info.name.replace('/', '_')}.npz"
        np.savez_compressed(folder / fname, **arrays)
        rows.append({"layer": info.name, "file": fname, "bits": info.bits,
                     "weight_shape": list(info.weight_shape),
                     "matrix_shape": list(planes.shape[1:]), "granularity": info.granularity,
                     "sha256": _sha(folder / fname), "faults": info.faults,
                     "variability": info.variability})
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"format": CROSSBAR_FORMAT, "layers": rows}, indent=1))


def load_crossbar(folder: Union[str, Path]) -> Dict[str, dict]:
    """Read a crossbar folder back: per layer its arrays plus ``weight`` rebuilt in the layer's
    shape (``c + sum_k r_k planes[k]``, with the cells' factors if present). Checks the
    format and each file's checksum; the manifest is parsed within the JSON budgets and every
    array file's headers are checked before numpy allocates from them
    (:mod:`qfv_brevitas.util.budgets`); a layer file must lie in the folder itself."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not os.path.lexists(mpath):
        raise QfvError(f"{folder}: no manifest.json (not a crossbar folder written by "
                       "qfv-brevitas)")
    manifest = read_json_file(mpath, error=QfvError, what="a crossbar manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != CROSSBAR_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise QfvError(f"{mpath}: format {quoted(found)}, expected {CROSSBAR_FORMAT!r}")
    out = {}
    for row in manifest["layers"]:
        if Path(row["file"]).name != row["file"] or row["file"] in ("", ".", ".."):
            raise QfvError(f"{mpath}: layer file {quoted(row['file'])} is not a file of the "
                           "folder itself")
        f = folder / row["file"]
        if not f.is_file():
            raise QfvError(f"{f}: missing (or not a regular file)")
        size = f.stat().st_size
        if size > MAX_NPZ_BYTES:  # before the checksum reads it all (streamed)
            raise QfvError(f"{f}: {size} bytes, more than the {MAX_NPZ_BYTES} of a crossbar "
                           "layer file read")
        if _sha(f) != row["sha256"]:
            raise QfvError(f"{f}: does not match its checksum in the manifest")
        check_npz(f, str(f), error=QfvError)
        with np.load(f, allow_pickle=False) as z:  # never pickled objects from a file
            arrays = {k: z[k] for k in z.files}
        planes = arrays["planes"]
        codes = sum(planes[k].astype(np.int64) << k for k in range(planes.shape[0]))
        cells = {k: np.moveaxis(arrays[k], 0, -1) for k in ("lrs", "hrs") if k in arrays}
        axis = -1 if row["granularity"] == "tensor" else 0
        w = nmult_weight(codes.astype(np.uint8), arrays["r"], arrays["c"], axis,
                         cells.get("lrs"), cells.get("hrs"))
        out[row["layer"]] = dict(row, **arrays, weight=w.reshape(row["weight_shape"]))
    return out
