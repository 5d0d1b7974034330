"""The one reader of ONNX files a user gives (``qfv inspect``, ``qfv verify``,
:func:`~qfv_brevitas.export.read_metadata`, :func:`~qfv_brevitas.export.verify_qonnx`, the
FINN and hls4ml scripts): the same checks, in the same order, for every command.

1. The path names a regular file (a folder, a FIFO or a device is refused without reading
   from it: opened non-blocking, checked with ``fstat``) of at most :data:`MAX_FILE_BYTES`;
   exactly its bytes are read, once.
2. They parse as an ONNX model (protobuf's own nesting limit bounds the parse).
3. :func:`structure_problems`: what :mod:`qfv_brevitas.export.structure` allows (the forms'
   ops only, subgraphs walked and refused, bounded sizes, no external data) and then the
   shapes :mod:`qfv_brevitas.export.shapes` infers.

External data is refused, never resolved: an export of this library stores every tensor in
the ``.onnx`` file (``export_qonnx`` writes one file and reads it back), so a file that points
elsewhere was not written by it, and nothing outside the file is ever opened. Errors name the
file and what in it, never bytes of another file.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Union

import onnx
from google.protobuf.message import DecodeError

from qfv_brevitas.export.errors import ExportFileError
from qfv_brevitas.export.shapes import inferred_shape_problems
from qfv_brevitas.export.structure import static_problems
from qfv_brevitas.util.budgets import read_regular

__all__ = ["MAX_FILE_BYTES", "load_onnx", "structure_problems", "check_structure"]

#: the largest ONNX file read (protobuf's own limit is 2 GiB; the largest export of the zoo's
#: models measured is far below: see README, "Untrusted files")
MAX_FILE_BYTES = 1 << 30


def _read_regular(path: Path, where: str, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes."""
    return read_regular(path, where, limit, error=ExportFileError,
                        what="an exported .onnx file")


def structure_problems(model: onnx.ModelProto) -> List[str]:
    """Everything in ``model`` outside what the export forms write: the static checks of
    :mod:`~qfv_brevitas.export.structure`, then (if they pass) the inferred shapes of
    :mod:`~qfv_brevitas.export.shapes`. Empty if nothing."""
    return static_problems(model) or inferred_shape_problems(model)


def check_structure(model: onnx.ModelProto, where: str) -> None:
    """Raise :class:`ExportFileError` (``where``: the file) naming the first of
    :func:`structure_problems` and how many more there are."""
    problems = structure_problems(model)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportFileError(f"{where}: {problems[0]}{more}")


def load_onnx(path: Union[str, Path], limit: int = MAX_FILE_BYTES, check: bool = True
              ) -> onnx.ModelProto:
    """The ONNX model in the file ``path``, read once and checked (see the module doc) before
    anything walks or runs it. Raises :class:`ExportFileError` naming the file and what is
    wrong. ``check=False`` leaves the structure to the caller
    (:func:`~qfv_brevitas.export.metadata.read_export` reads the metadata first, so that a
    file of another tool says so, then calls :func:`check_structure`).

    >>> load_onnx("/nonexistent.onnx")
    Traceback (most recent call last):
    ...
    qfv_brevitas.export.errors.ExportFileError: /nonexistent.onnx: no such file
    """
    where = str(path)
    data = _read_regular(Path(path), where, limit)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ExportFileError(f"{where}: not a readable ONNX file ({type(e).__name__})") \
            from None
    del data
    if not model.HasField("graph") or not len(model.graph.node):
        raise ExportFileError(f"{where}: not an ONNX model (no graph)")
    if check:
        check_structure(model, where)
    return model
