"""The per-layer bit multipliers inside the exported file: model metadata and its reader."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import List, Optional, Tuple, Union

import onnx

from qfv_brevitas.export.checks import check_domains, graph_digest, graph_problems
from qfv_brevitas.export.errors import ExportError, ExportFileError
from qfv_brevitas.export.forms import form_named
from qfv_brevitas.export.untrusted import check_structure, load_onnx
from qfv_brevitas.util.budgets import (MAX_INPUT_DIMS, MAX_SPIKING_VALUES, loads_json,
                                       quoted)

__all__ = ["FORMAT", "ExportFileError", "write_metadata", "read_metadata", "read_export",
           "graph_intact", "format_layers"]

FORMAT = "qfv-qonnx/1"
_KEY = "qfv_brevitas"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_metadata(model: onnx.ModelProto, info: dict) -> None:
    """Store ``info`` (form, layers, ...) as ``metadata_props``, with a checksum of it and one
    of the graph (call it last: any later change of the graph reads as damage)."""
    text = json.dumps(info, sort_keys=True)
    props = {p.key: p.value for p in model.metadata_props if not p.key.startswith(_KEY)}
    props.update({f"{_KEY}.format": FORMAT, f"{_KEY}.export": text,
                  f"{_KEY}.sha256": _digest(text),
                  f"{_KEY}.graph_sha256": graph_digest(model)})
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


def read_export(path: Union[str, Path], check_graph: bool = True
                ) -> Tuple[onnx.ModelProto, dict]:
    """The model in the file ``path`` and its export description, the file read once by
    :func:`~qfv_brevitas.export.untrusted.load_onnx`: its metadata first (a file from another
    tool says so), then its structure (:mod:`~qfv_brevitas.export.structure`: nothing that
    the export forms do not write, before anything walks the graph deeply or runs it), then,
    with ``check_graph``, the graph against the metadata as :func:`read_metadata` does."""
    where = str(path)
    model = load_onnx(path, check=False)
    info = read_metadata(model, check_graph=False, where=where)
    check_structure(model, where)
    if check_graph:
        _check_graph(model, info, where)
    return model, info


def read_metadata(source: Union[str, Path, onnx.ModelProto], check_graph: bool = True, *,
                  where: Optional[str] = None) -> dict:
    """The export description of a file written by :func:`~qfv_brevitas.export.export_qonnx`.

    Raises :class:`ExportFileError` for a missing, unreadable or corrupt file, a file from
    another tool, metadata that no longer matches its checksum, or (``check_graph``) a graph
    that no longer matches the metadata: its own checksum, each layer's bit width, ``r``,
    ``c``, and codes in range (:func:`~qfv_brevitas.export.checks.graph_problems`). A path is
    read by :func:`read_export` (the file's structure checked too); ``where`` names a given
    model in messages.
    """
    if not isinstance(source, onnx.ModelProto):
        return read_export(source, check_graph)[1]
    model, where = source, where or "model"
    props = {p.key: p.value for p in model.metadata_props}
    fmt = props.get(f"{_KEY}.format")
    if fmt is None:
        raise ExportFileError(f"{where}: not written by qfv-brevitas (no {_KEY} metadata); "
                              "export it with `qfv export` or qfv_brevitas.export.export_qonnx")
    if fmt != FORMAT:
        raise ExportFileError(f"{where}: format {fmt!r}, this version reads {FORMAT!r}")
    text = props.get(f"{_KEY}.export", "")
    if _digest(text) != props.get(f"{_KEY}.sha256"):
        raise ExportFileError(f"{where}: the qfv-brevitas metadata does not match its checksum "
                              "(the file was edited or is corrupt)")
    info = loads_json(text, f"{where}: the qfv-brevitas metadata ({_KEY}.export)",
                      error=ExportFileError)
    names = {o for n in model.graph.node for o in n.output}
    names |= {i.name for i in model.graph.initializer}
    if not isinstance(info, dict) or not isinstance(info.get("layers"), list):
        raise ExportFileError(f"{where}: the qfv-brevitas metadata has no list of layers")
    _check_sizes(info, where, model.ByteSize())
    try:
        form = form_named(info.get("form"))
    except ExportError as e:
        raise ExportFileError(f"{where}: the qfv-brevitas metadata's form: {e}") from None
    for row in info["layers"]:
        if not isinstance(row, dict):
            raise ExportFileError(f"{where}: a layer entry of the metadata is not a mapping")
        for tensor in form.layer_tensors(row):
            if not isinstance(tensor, str) or tensor not in names:
                raise ExportFileError(f"{where}: layer {row.get('layer')!r}'s weight tensor "
                                      f"{tensor!r} is not in the graph")
    check_domains(model, where, ExportFileError)
    if check_graph:
        _check_graph(model, info, where)
    return info


def _shape_ok(shape, max_dims: int) -> bool:
    return isinstance(shape, list) and 1 <= len(shape) <= max_dims and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)


def _check_sizes(info: dict, where: str, file_bytes: int) -> None:
    """Refuse metadata whose shapes would size the work beyond what the file can hold
    (checked before anything is allocated from them): the example input (``input_shape``,
    what verification feeds the model: at most ``MAX_SPIKING_VALUES`` values, a batch of
    spike trains) and each layer's ``weight_shape`` (at most one weight per byte of the
    model, ``file_bytes``: every form stores at least a byte per weight in the file)."""
    shape = info.get("input_shape")
    if shape is not None and (not _shape_ok(shape, MAX_INPUT_DIMS + 2)
                              or math.prod(shape) > MAX_SPIKING_VALUES):
        raise ExportFileError(f"{where}: the qfv-brevitas metadata's input_shape "
                              f"{quoted(shape, 60)} is refused: a list of at most "
                              f"{MAX_INPUT_DIMS + 2} sizes and {MAX_SPIKING_VALUES} values is read")
    for row in info["layers"]:
        ws = row.get("weight_shape") if isinstance(row, dict) else None
        if ws is None:
            continue
        if not _shape_ok(ws, MAX_INPUT_DIMS) or math.prod(ws) > file_bytes:
            raise ExportFileError(f"{where}: layer {quoted(row.get('layer'), 60)} of the "
                                  f"metadata declares weight_shape {quoted(ws, 60)}, more "
                                  f"weights than the file's {file_bytes} bytes can hold")


def _check_graph(model: onnx.ModelProto, info: dict, where: str) -> None:
    """The graph against its metadata and the checksum stored at export."""
    problems = graph_problems(model, info)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportFileError(f"{where}: the graph does not match its metadata: "
                              f"{problems[0]}{more}")
    if not graph_intact(model):
        raise ExportFileError(f"{where}: the graph does not match the checksum stored at "
                              "export (the file was edited or is damaged)")


def graph_intact(model: onnx.ModelProto) -> bool:
    """Whether the graph is the one exported (its checksum; files without one: True)."""
    stored = {p.key: p.value for p in model.metadata_props}.get(f"{_KEY}.graph_sha256")
    return stored is None or stored == graph_digest(model)


def _short(values, limit=4) -> str:
    flat = values[0] if len(values) == 1 else values
    if flat and isinstance(flat[0], list):
        return f"[{len(flat)} channels x {len(flat[0])}]"
    s = ", ".join(f"{v:+.4g}" for v in flat[:limit])
    return f"[{s}{', ...' if len(flat) > limit else ''}]"


def format_layers(info: dict) -> str:
    """The layers of an export as a fixed-width table (``qfv inspect``)."""
    rows: List[dict] = info.get("layers", [])
    lw = max([5] + [len(r["layer"]) for r in rows])
    head = (f"{'layer':<{lw}} {'bits':>4} {'gran':<7} {'shape':<16} {'r':<40} {'c':<12} "
            f"{'device':<22}")
    lines = [f"form {info.get('form')}, exporter {info.get('exporter')}, "
             f"qfv-brevitas {info.get('version')}", head, "-" * len(head)]
    for r in rows:
        c = f"{r['c'][0]:+.4g}" if len(r["c"]) == 1 else f"[{len(r['c'])} ch]"
        dev = []
        if r.get("faults"):
            f = r["faults"]
            dev.append(f"stuck {100 * f['rate']:.1f}% ({f['stuck_at_0']}/{f['stuck_at_1']})")
        if r.get("variability"):
            v = r["variability"]
            dev.append(f"lrs sd {v['lrs_std']:.3f}")
        fx = r.get("fixed_point")
        tail = f"  int{fx['int_bits']} f={fx['frac_bits']}" if fx else ""
        lines.append(f"{r['layer']:<{lw}} {r['bits']:>4} {r['granularity']:<7} "
                     f"{'x'.join(map(str, r['weight_shape'])):<16} {_short(r['r']):<40} {c:<12} "
                     f"{', '.join(dev) or 'ideal':<22}{tail}")
    if info.get("extra"):
        lines.append("extra: " + json.dumps(info["extra"], sort_keys=True))
    return "\n".join(lines)
