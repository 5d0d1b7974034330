"""The ``qfv_brevitas.export.ops`` QONNX op domain: ``NMultWeight``.

QONNX finds a custom op by importing the node's domain as a Python module and reading its
``__all__``; this module is that domain. The op spec with its truth table is
``docs/ops/NMultWeight.md``; :func:`nmult_weight` below is the numpy reference that
``qonnx.core.onnx_exec.execute_onnx`` runs.

>>> import numpy as np
>>> codes = np.array([[0, 1], [2, 3]], dtype=np.uint8)
>>> r, c = np.array([[0.5, 1.0]], np.float32), np.array([-0.75], np.float32)
>>> nmult_weight(codes, r, c, axis=-1).tolist()
[[-0.75, -0.25], [0.25, 0.75]]
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from onnx import TensorProto, helper

from qonnx.core.datatype import DataType
from qonnx.custom_op.base import CustomOp

from qfv_brevitas.export.arrays import cells, groups, level_table, ungroup
from qfv_brevitas.util.errors import QfvError

__all__ = ["NMultWeight", "nmult_weight", "DOMAIN", "OP_TYPE", "OP_VERSION"]

DOMAIN = "qfv_brevitas.export.ops"
OP_TYPE = "NMultWeight"
OP_VERSION = 1


def nmult_weight(codes: np.ndarray, r: np.ndarray, c: np.ndarray, axis: int = -1,
                 lrs: Optional[np.ndarray] = None, hrs: Optional[np.ndarray] = None) -> np.ndarray:
    """Decode N-bit ``codes`` into weights ``c + r_0 b_0 + r_1 b_1 + ...`` (float32).

    ``r`` is ``(G, N)`` and ``c`` ``(G,)``: ``G = 1`` per tensor (``axis = -1``) or one row per
    index of ``axis``. The sum runs bit by bit in this order, as the library's level table does,
    so the result equals the torch model's weights bit for bit. ``lrs``/``hrs`` (the codes'
    shape + ``(N,)``) add a device's per-cell deviation ``sum_k r_k (b_k (lrs_k - 1) +
    (1 - b_k) hrs_k)``.
    """
    codes = np.asarray(codes)
    r = np.asarray(r, dtype=np.float32)
    c = np.asarray(c, dtype=np.float32)
    if r.ndim != 2 or c.ndim != 1 or r.shape[0] != c.shape[0]:
        raise QfvError(f"NMultWeight: r must be (G, N) and c (G,), got {r.shape} and {c.shape}")
    G, N = r.shape
    if axis < 0 and G != 1:
        raise QfvError(f"NMultWeight: {G} rows of r need a channel axis (axis = -1 means one)")
    if axis >= 0 and (axis >= codes.ndim or codes.shape[axis] != G):
        raise QfvError(f"NMultWeight: r has {G} rows but the codes {codes.shape} have no axis "
                       f"{axis} of that length")
    if codes.size and int(codes.max()) >= (1 << N):
        raise QfvError(f"NMultWeight: a code exceeds the {N}-bit range")
    table = level_table(r, c)
    c2d = groups(codes.astype(np.int64), axis)
    w2d = np.take_along_axis(table, c2d, axis=1).astype(np.float32)
    if lrs is not None or hrs is not None:
        bits = ((c2d[..., None] >> np.arange(N)) & 1).astype(np.float32)  # (G, M, N)
        dev = np.zeros_like(bits)
        if lrs is not None:
            dev = bits * (cells(lrs, axis, G, N) - np.float32(1))
        if hrs is not None:
            dev = dev + (np.float32(1) - bits) * cells(hrs, axis, G, N)
        terms = dev * r[:, None, :]
        acc = terms[..., 0]
        for i in range(1, N):
            acc = acc + terms[..., i]
        w2d = w2d + acc
    return ungroup(w2d, codes.shape, axis).astype(np.float32)


class NMultWeight(CustomOp):
    """Weights from N-bit codes, bit multipliers ``r`` and offset ``c`` (see the module doc).

    Inputs: ``codes`` (uint8, the weight's shape), ``r`` (float32 ``(G, N)``), ``c`` (float32
    ``(G,)``), optionally ``lrs`` and ``hrs`` (float32, weight shape + ``(N,)``).
    Attributes: ``bit_width`` (N), ``axis`` (channel axis of ``r``'s rows, -1 per tensor),
    ``layer`` and ``variant`` (informational).
    """

    def get_nodeattr_types(self):
        return {
            "bit_width": ("i", True, 0),
            "axis": ("i", False, -1),
            "layer": ("s", False, ""),
            "variant": ("s", False, ""),
        }

    def make_shape_compatible_op(self, model):
        # Same shape as the codes, float output.
        return helper.make_node("Cast", [self.onnx_node.input[0]], [self.onnx_node.output[0]],
                                to=int(TensorProto.FLOAT))

    def infer_node_datatype(self, model):
        model.set_tensor_datatype(self.onnx_node.output[0], DataType["FLOAT32"])

    def execute_node(self, context, graph):
        node = self.onnx_node
        ins = [context[i] if i else None for i in node.input]
        ins += [None] * (5 - len(ins))
        codes, r, c, lrs, hrs = ins
        bits = self.get_nodeattr("bit_width")
        if r.shape[-1] != bits:
            raise QfvError(f"NMultWeight {node.name}: bit_width {bits} but r has "
                           f"{r.shape[-1]} columns")
        context[node.output[0]] = nmult_weight(codes, r, c, self.get_nodeattr("axis"), lrs, hrs)

    def verify_node(self):
        info = []
        node = self.onnx_node
        if node.domain != DOMAIN:
            info.append(f"domain is {node.domain!r}, expected {DOMAIN!r}")
        if not 3 <= len(node.input) <= 5:
            info.append(f"expected 3 to 5 inputs, got {len(node.input)}")
        bits = self.get_nodeattr("bit_width")
        if not 1 <= bits <= 8:
            info.append(f"bit_width {bits} outside 1..8")
        return info
