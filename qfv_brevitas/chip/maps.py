"""Helpers shared by the map modules (:mod:`faults`, :mod:`variability`, :mod:`bitflips`):
per-layer seeded generators, the model's quantized layers, map checks and tagged file I/O.
(The argument validators they use are :mod:`qfv_brevitas.util.validate`'s.)"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Dict, Type

import torch
from torch import nn

from qfv_brevitas.core.levels import MAX_BITS
from qfv_brevitas.core.quantizers import nmult_layers
from qfv_brevitas.util.errors import QfvError, QfvTypeError
from qfv_brevitas.util.safeio import LoadError, content_digest, torch_load, torch_save

__all__ = ["attach_layer_maps", "layer_generator", "quantized_layers", "check_names_in_model", "save_tagged",
           "load_tagged", "check_map_bits"]


def layer_generator(domain: str, seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``(domain, seed, layer name)``.

    Stable across processes and machines (Python's ``hash`` is salted per process), and
    independent of the other layers, so a layer's draw does not depend on the model around it.
    ``domain`` keeps fault and variability draws of the same seed unrelated.
    """
    digest = hashlib.blake2b(f"{domain}\0{seed}\0{name}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


def quantized_layers(model: nn.Module, what: str, overrides: Any = None,
                     field: str = "") -> Dict[str, nn.Module]:
    """``{name: layer}`` of the model's N-multiplier layers; an error if there is none, or if
    ``overrides`` (a per-layer dict, the config field ``field``) names any other layer."""
    layers = dict(nmult_layers(model))
    if not layers:
        raise QfvError(f"{what}: the model has no N-multiplier layer. Quantize it first with "
                         "qfv_brevitas.quantize_model() or swap_weight_quant().")
    unknown = set(overrides or ()) - set(layers)
    if unknown:
        raise QfvError(f"{field} names layers that are not N-multiplier layers of the model: "
                         f"{sorted(unknown)}; the quantized layers are {sorted(layers)}")
    return layers


def check_names_in_model(model: nn.Module, names, error: Type[QfvError], payload: str
                         ) -> Dict[str, nn.Module]:
    """``{name: layer}`` for ``names``; an error naming a layer that is absent or unquantized."""
    quantized = dict(nmult_layers(model))
    modules = None
    for name in names:
        if name in quantized:
            continue
        modules = modules if modules is not None else dict(model.named_modules())
        if name in modules:
            raise error(
                f"{payload} on a layer that is not quantized: {name!r} "
                f"({type(modules[name]).__name__}) has no N-multiplier weight quantizer. Quantize "
                f"it, or drop its entry from the map.")
        raise error(f"layer {name!r} of the map does not exist in the model; its quantized "
                    f"layers are {sorted(quantized)}. Was the map made for another model?")
    return {n: quantized[n] for n in names}


def save_tagged(path: os.PathLike, payload: dict, overwrite: bool = False) -> None:
    """``torch.save`` of plain tensors/containers with a checksum of its contents, written
    atomically (:mod:`qfv_brevitas.util.safeio`): an interrupted save never leaves a truncated map,
    and an existing file is replaced only with ``overwrite=True``."""
    torch_save(dict(payload, sha256=content_digest(payload)), path, overwrite=overwrite)


def load_tagged(path: os.PathLike, tag: str, error: Type[QfvError], what: str) -> dict:
    """The dict saved by :func:`save_tagged` under format ``tag``; ``FileNotFoundError`` if it
    is missing, ``error`` naming the file if it is unreadable, unsafe (loaded with
    ``weights_only=True``: nothing in it runs),
    damaged (checksum), not a dict, or of another format."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist"
                                + (" (it is a folder)" if os.path.isdir(path) else ""))
    try:
        data = torch_load(path)
    except LoadError as e:
        if e.refused:
            raise error(f"{path!r}: refused: the file holds Python objects that loading would "
                        f"have to run; a {what} holds only tensors and plain values. Nothing of "
                        "it was executed.") from None
        raise error(f"{path!r} is not a readable {what} file ({e.kind}: {e.line})") \
            from e.__cause__
    found = data.get("format") if isinstance(data, dict) else None
    if found != tag:
        raise error(f"{path!r} is not a {what} file: its format tag is {found!r}, expected "
                    f"{tag!r}")
    if "sha256" in data:  # maps written before checksums were added have none
        try:
            ok = content_digest(data) == data["sha256"]
        except TypeError:
            ok = False
        if not ok:
            raise error(f"{path!r}: the {what}'s contents do not match their checksum: the "
                        "file is damaged or was edited")
    return data


def check_map_bits(bits: Any, where: str, error: Type[QfvError]) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise error(f"{where}: bit width must be an int in 1..{MAX_BITS}, got {bits!r}")
    return bits


def attach_layer_maps(model: nn.Module, maps: Any, kind: type, what: str,
                      set_map: Callable, clear_map: Callable) -> nn.Module:
    """Put a map on the chips of ``model``'s N-multiplier layers: ``maps`` (a ``kind``, checked
    against the model with its ``validate`` before any chip changes) gives
    ``set_map(chip, entry, weight)`` each layer's entry; layers without one get
    ``clear_map(chip)``. Returns ``model``."""
    if not isinstance(maps, kind):
        raise QfvTypeError(f"{what} takes a {kind.__name__}, got {type(maps).__name__}")
    maps.validate(model)
    for name, layer in nmult_layers(model):
        chip = layer.weight_quant.chip
        if name in maps.layers:
            set_map(chip, maps.layers[name], layer.weight)
        else:
            clear_map(chip)
    return model
