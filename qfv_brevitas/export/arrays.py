"""Numpy views of N-multiplier weights, shared by the op's reference, the forms' checks and
their decoders: one group layout and one level table, as torch's ``core.groups`` and
``core.levels`` define them, so a file is read the way the model wrote it.

>>> import numpy as np
>>> level_table(np.array([[0.5, 1.0]], np.float32), np.array([-0.75], np.float32)).tolist()
[[-0.75, -0.25, 0.25, 0.75]]
>>> groups(np.arange(6).reshape(2, 3), axis=1).tolist()
[[0, 3], [1, 4], [2, 5]]
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

__all__ = ["groups", "ungroup", "cells", "bit_matrix", "level_table", "same", "fmt",
           "differing_channels", "channels_note"]


def groups(t: np.ndarray, axis: int) -> np.ndarray:
    """``(G, M)`` view: one row per index of ``axis`` (a channel), or one row (``axis < 0``)."""
    if axis < 0:
        return t.reshape(1, -1)
    return np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)


def ungroup(t2d: np.ndarray, shape: Sequence[int], axis: int) -> np.ndarray:
    """Inverse of :func:`groups`: a ``(G, M)`` array back to ``shape``."""
    if axis < 0:
        return t2d.reshape(shape)
    moved = list(shape)
    moved.insert(0, moved.pop(axis))
    return np.moveaxis(t2d.reshape(moved), 0, axis)


def cells(t: np.ndarray, axis: int, G: int, N: int) -> np.ndarray:
    """Per-cell values (the weight's shape + ``(N,)``) as ``(G, M, N)``, float32."""
    t = np.asarray(t, dtype=np.float32)
    if axis < 0:
        return t.reshape(1, -1, N)
    return np.moveaxis(t, axis, 0).reshape(G, -1, N)


def bit_matrix(n: int) -> np.ndarray:
    """``(2**n, n)`` int matrix whose row ``k`` is the binary code of ``k``, LSB first."""
    k = np.arange(1 << n)
    return (k[:, None] >> np.arange(n)) & 1


def level_table(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Levels ``(G, 2**N)`` of multipliers ``r (G, N)`` and offset ``c (G,)``, in their dtype,
    summed bit by bit in the order of ``core.levels.level_table`` (``c + r_0 b_0 + r_1 b_1 +
    ...``), so float32 levels equal the torch model's bit for bit."""
    b = bit_matrix(r.shape[1]).astype(r.dtype)
    table = c[:, None] + r[:, :1] * b[:, 0]
    for i in range(1, r.shape[1]):
        table = table + r[:, i:i + 1] * b[:, i]
    return table


def same(a, b) -> bool:
    """Equal values as float32, whatever the shapes (a per-channel constant is stored
    broadcastable to the layer's output)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.size == b.size and np.array_equal(a.reshape(-1).astype(np.float32),
                                               b.reshape(-1).astype(np.float32))


def fmt(a) -> str:
    """The first values of ``a``, for a message."""
    a = np.asarray(a).reshape(-1)
    s = ", ".join(f"{v:.6g}" for v in a[:4])
    return f"[{s}{', ...' if a.size > 4 else ''}]"


def differing_channels(got, want) -> List[int]:
    """The output channels (rows of ``want``, ``(G, ...)``) where ``got`` (the same values in
    any shape, e.g. a per-channel constant stored ``(1, G, 1, 1)``) differs (float64); empty
    when the sizes differ or ``got`` is missing: the caller says that."""
    if got is None:
        return []
    got, want = np.asarray(got), np.asarray(want)
    if got.size != want.size or want.ndim == 0 or want.shape[0] == 0:
        return []
    rows = want.shape[0]
    a = got.reshape(rows, -1).astype(np.float64)
    b = want.reshape(rows, -1).astype(np.float64)
    return [int(g) for g in np.flatnonzero(~np.all(a == b, axis=1))]


def channels_note(got, want) -> str:
    """`` (channel 2)`` / `` (channels 1, 3)``: where a per-channel tensor differs from the
    metadata's, for a message; empty for a per-tensor one (one row) or no difference found."""
    bad = differing_channels(got, want)
    if not bad or np.asarray(want).shape[0] == 1:
        return ""
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    return f" (channel{'s' if len(bad) > 1 else ''} {shown})"
