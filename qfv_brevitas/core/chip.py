"""The chip one layer's weights are programmed into: the one place that knows it.

A :class:`Chip` is owned by a weight proxy (it is the proxy's ``chip`` submodule, so its maps
travel with the model's state dict and device) and handed to the proxy's tensor quantizer,
which asks it every question whose answer depends on the device:

- :meth:`Chip.codes`: which N-bit code is programmed for each weight (the nearest ideal level,
  or with ``mapping="aware"`` the code whose deployed value is nearest);
- :meth:`Chip.values`: what the cells hold for given codes (stuck bits forced, per-cell
  variability applied; differentiable in ``r`` and ``c``);
- :meth:`Chip.snap` / :meth:`Chip.ste`: each weight's deployed value (with transient bit flips
  when a reader is attached), without / with a straight-through gradient;
- :meth:`Chip.distance`: the regularizer's distance over the levels each weight can reach
  (paper eq. 6/7 on an ideal chip, eq. 11/12 with maps), for every regularizer shape.

An ideal chip (no maps, no bit flips) answers with the ideal level grid. Whether a layer is on
an ideal chip is decided here and nowhere else.

What a chip holds (the weight's layout; bit ``i`` of a mask is cell ``i`` of the weight):
``sa0``/``sa1`` (uint8 stuck-at-0/1 masks), ``lrs``/``hrs`` (per-cell factors, shape
``weight.shape + (N,)``), ``mapping`` (``"naive"`` or ``"aware"``) and ``flips`` (a transient
bit-flip reader, :class:`qfv_brevitas.chip.bitflips.BitFlipInjector`; not saved).
All tensors the methods take and return are in group layout ``(G, M)``
(:mod:`qfv_brevitas.core.groups`), ``r (G, N)``, ``c (G,)``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from qfv_brevitas.core import device as D
from qfv_brevitas.core import distance as DI
from qfv_brevitas.core import levels as L
from qfv_brevitas.core import search as S
from qfv_brevitas.core.groups import GroupLayout
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.validate import check_choice

__all__ = ["Chip", "MAPPINGS", "check_stuck_masks", "stuck_counts"]

#: How codes are chosen for a chip with maps (see :meth:`Chip.codes`).
MAPPINGS = ("naive", "aware")

_MAPS = ("sa0", "sa1", "lrs", "hrs")


def check_stuck_masks(sa0: Tensor, sa1: Tensor, bits: int, where: str,
                      error: Type[QfvError] = QfvError) -> None:
    """Stuck-at masks fit ``bits``-bit weights: no stuck bit at or above the width, no cell
    stuck both ways. The one check of a fault map's bits (the chip runs it when masks are set,
    a fault map before it attaches anything); raises ``error`` naming ``where``."""
    if sa0.numel() == 0:
        return
    top = int(torch.maximum(sa0.max(), sa1.max()))
    if top >= 1 << bits:
        raise error(f"{where}: stuck bit {top.bit_length() - 1} at or above the layer's bit "
                    f"width {bits} (mask value {top}); bits are numbered 0..{bits - 1}")
    both = sa0 & sa1
    if bool(both.any()):
        j = int(both.flatten().nonzero()[0])
        raise error(f"{where}: weight {j} (flat index) has bits stuck at 0 and at 1 at once "
                    f"(sa0 & sa1 = {int(both.flatten()[j])}); a cell is stuck one way only")


def stuck_counts(sa0: Tensor, sa1: Tensor, bits: int) -> Dict[str, Any]:
    """The stuck cells of one layer's masks: ``cells`` (bit cells), ``sa0`` / ``sa1`` (cells
    stuck at 0 / at 1), ``stuck``, ``fraction`` (stuck over cells; 0.0 without cells) and
    ``weights`` (weights with a stuck cell). The one count behind a fault map's summary and
    an exported file's fault entry.

    >>> stuck_counts(torch.tensor([1, 0], dtype=torch.uint8), torch.tensor([2, 0],
    ...              dtype=torch.uint8), 2)["stuck"]
    2
    """
    cells = sa0.numel() * bits
    n0, n1 = int(L.popcount(sa0, bits)), int(L.popcount(sa1, bits))
    return {"cells": cells, "sa0": n0, "sa1": n1, "stuck": n0 + n1,
            "fraction": (n0 + n1) / cells if cells else 0.0,
            "weights": int(((sa0 | sa1) != 0).sum())}


class Chip(nn.Module):
    """The device behind one layer's weights (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        for name in _MAPS:
            self.register_buffer(name, None)
        self.mapping = "naive"
        self.flips = None
        self.layout = GroupLayout()
        self.bits = 1
        self.weight_shape: Tuple[int, ...] = ()
        self.layer_name: Optional[str] = None

    def bind(self, layout: GroupLayout, bits: int, weight_shape, layer_name: Optional[str]
             ) -> "Chip":
        """Tell the chip the layout of the weights it holds (done by the tensor quantizer it
        is handed to)."""
        self.layout, self.bits = layout, int(bits)
        self.weight_shape = tuple(weight_shape)
        self.layer_name = layer_name
        return self

    @property
    def where(self) -> str:
        """``layer 'name'`` for messages."""
        return f"layer {self.layer_name!r}" if self.layer_name else "layer"

    @property
    def where_weights(self) -> str:
        """``weights of name`` for messages about non-finite weights."""
        return f"weights of {self.layer_name or 'layer'}"

    # -- what it holds ---------------------------------------------------------------------
    @property
    def has_faults(self) -> bool:
        return self.sa0 is not None

    @property
    def has_variability(self) -> bool:
        return self.lrs is not None

    @property
    def has_maps(self) -> bool:
        return self.sa0 is not None or self.lrs is not None

    @property
    def is_ideal(self) -> bool:
        """No stuck bits, no variability, no bit flips."""
        return not self.has_maps and self.flips is None

    def set_faults(self, sa0: Tensor, sa1: Tensor, like: Optional[Tensor] = None) -> None:
        """Stuck-at masks: bit i of ``sa0[j]`` (``sa1[j]``) set = bit i of weight j stuck at 0
        (1). uint8, the weight's shape; kept on the device of ``like`` (the weight) if given."""
        bits = self.bits
        for name, m in (("sa0", sa0), ("sa1", sa1)):
            if tuple(m.shape) != self.weight_shape:
                raise QfvError(f"{self.where}: {name} mask has shape {tuple(m.shape)}, the "
                                 f"weight {self.weight_shape}")
            if m.dtype != torch.uint8:
                raise QfvError(f"{self.where}: {name} mask must be uint8, got {m.dtype}")
        check_stuck_masks(sa0, sa1, bits, self.where)
        if like is not None:
            sa0, sa1 = sa0.to(like.device), sa1.to(like.device)
        self.sa0, self.sa1 = sa0, sa1

    def clear_faults(self) -> None:
        self.sa0 = self.sa1 = None

    def set_variability(self, lrs: Tensor, hrs: Optional[Tensor] = None,
                        like: Optional[Tensor] = None) -> None:
        """Per-cell factors, shape ``weight.shape + (bits,)``: ``lrs`` scales a "1" cell's
        ``r_i`` (ideal 1), ``hrs`` is the fraction of ``r_i`` a "0" cell adds (ideal 0);
        kept with the device and dtype of ``like`` (the weight) if given."""
        want = self.weight_shape + (self.bits,)
        for name, t in (("lrs", lrs), ("hrs", hrs)):
            if t is None:
                continue
            if tuple(t.shape) != want:
                raise QfvError(f"{self.where}: {name} factors have shape {tuple(t.shape)}, "
                                 f"expected weight shape + bits = {want}")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()) or bool(
                    (t < 0).any()):
                raise QfvError(f"{self.where}: {name} factors must be finite, non-negative "
                                 "floats (a cell's conductance cannot be negative)")
        if like is not None:
            lrs = lrs.to(device=like.device, dtype=like.dtype)
            hrs = None if hrs is None else hrs.to(device=like.device, dtype=like.dtype)
        self.lrs, self.hrs = lrs, hrs

    def clear_variability(self) -> None:
        self.lrs = self.hrs = None

    def set_mapping(self, mapping: str) -> None:
        """``"naive"`` (program the nearest ideal level) or ``"aware"`` (the code whose
        deployed value on this chip is nearest)."""
        self.mapping = check_choice(mapping, MAPPINGS, "deploy mapping")

    def set_flips(self, reader) -> None:
        """Read the weights with transient bit flips from now on (``reader.read(codes)``
        returns the codes as read), or ``None`` for none."""
        self.flips = reader

    def maps(self) -> Tuple[Optional[Tensor], ...]:
        """``(sa0, sa1, lrs, hrs)`` in group layout ``(G, M)`` / ``(G, M, N)``."""
        g = self.layout.to_groups
        sa0 = None if self.sa0 is None else g(self.sa0)
        sa1 = None if self.sa1 is None else g(self.sa1)
        lrs = None if self.lrs is None else g(self.lrs, tail=1)
        hrs = None if self.hrs is None else g(self.hrs, tail=1)
        return sa0, sa1, lrs, hrs

    # -- what it answers -------------------------------------------------------------------
    @torch.no_grad()
    def codes(self, w2d: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """The programmed code of each weight (int64): its nearest ideal level's, or with
        maps and ``mapping="aware"`` the code whose deployed value is nearest."""
        if not self.has_maps:
            return S.nearest(w2d, L.level_table(r, c))[1]
        if self.mapping == "aware":
            return D.aware_codes(w2d, r, c, *self.maps())
        return D.naive_codes(w2d, r.detach(), c.detach())

    @torch.no_grad()
    def nearest_values(self, w2d: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """The nearest value each weight can reach on this chip (its nearest valid level),
        whatever the mapping."""
        maps = self.maps()
        return self.values(D.aware_codes(w2d, r, c, *maps), r, c)

    def values(self, codes: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """What the cells hold for ``codes`` (differentiable in ``r`` and ``c``)."""
        return D.deployed_values(codes, r, c, *self.maps())

    @torch.no_grad()
    def held_codes(self, w2d: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """The codes the cells hold: the programmed ones with the stuck bits forced."""
        codes = self.codes(w2d, r, c)
        return codes if self.sa0 is None else D.force_codes(codes, *self.maps()[:2])

    def _read_values(self, w2d: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """Values read for the programmed codes: bit flips (if a reader is attached), then the
        maps."""
        codes = self.codes(w2d, r, c)
        if self.flips is not None:
            codes = self.flips.read(codes)
        return self.values(codes, r, c).to(w2d.dtype)

    @torch.no_grad()
    def snap(self, w2d: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """Each weight's deployed value, as programmed and held (no gradient, no bit flips)."""
        if not self.has_maps:
            return S.nearest(w2d, L.level_table(r, c))[0]
        return self.values(self.codes(w2d, r, c), r, c)

    @torch.no_grad()
    def read(self, w2d: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """What one inference reads: :meth:`snap` with this pass's bit flips, if any."""
        if self.flips is None:
            return self.snap(w2d, r, c)
        return self._read_values(w2d, r, c)

    def ste(self, w2d: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """Training through the chip (bit flips included): the values read carry the exact
        gradient to ``r`` and ``c`` and a straight-through one to the weights."""
        if self.is_ideal:
            return S.snap_ste(w2d, L.level_table(r, c))
        return self._read_values(w2d.detach(), r, c) + (w2d - w2d.detach())

    def distance(self, w2d: Tensor, r: Tensor, c: Tensor, shape: str = "sq",
                 width: float = DI.DEFAULT_WIDTH) -> Tensor:
        """``sum_i rho(w_i, q_i)`` over the layer, ``q_i`` the nearest value weight ``i`` can
        reach on this chip and ``rho`` the regularizer shape (``"sq"``: paper eq. 6/7 and, with
        maps, eq. 11/12). Not checked for finiteness (the caller checks the sum once)."""
        where = self.where_weights
        if shape != "sq":
            L.check_finite(w2d, where)
        if not self.has_maps:
            try:
                # No separate finiteness pass on this hot path: a NaN/inf weight makes the sum
                # non-finite (or the search reject it), and is reported by the caller.
                return DI.ideal_distance(w2d, L.level_table(r, c), shape, width, self.where)
            except ValueError:
                L.check_finite(w2d, where)
                raise
        return DI.chip_distance(w2d, r, c, *self.maps(), shape=shape, width=width,
                                where=where if shape == "sq" else self.where)

    # -- state -----------------------------------------------------------------------------
    def get_extra_state(self):
        return {"deploy_mapping": self.mapping}

    def set_extra_state(self, state) -> None:
        mapping = state.get("deploy_mapping", "naive")
        if mapping not in MAPPINGS:
            raise QfvError(f"{self.where}: unknown deploy mapping {mapping!r} in checkpoint")
        self.mapping = mapping

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Maps saved with a model come back with it, also into a freshly built model.
        for name in _MAPS:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "_extra_state" in missing_keys:
            # Saved without a deploy mapping (float checkpoint, or before maps existed): naive.
            missing_keys.remove(prefix + "_extra_state")
            self.mapping = "naive"

    def extra_repr(self) -> str:
        held = [n for n in _MAPS if getattr(self, n) is not None]
        return (f"maps={','.join(held) or 'none'}, mapping={self.mapping}, "
                f"flips={self.flips is not None}")
