"""What the map modules (:mod:`faults`, :mod:`variability`, :mod:`bitflips`) share: the base
of the two map classes (:class:`LayerMaps`: checks, files, validation against a model,
attaching), per-layer seeded generators, the model's quantized layers, map checks and tagged
file I/O. (The argument validators they use are :mod:`qfv_brevitas.util.validate`'s.)"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from qfv_brevitas.core.levels import MAX_BITS
from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.util.configbase import QfvConfig
from qfv_brevitas.util.errors import QfvError, QfvTypeError
from qfv_brevitas.util.safeio import LoadError, content_digest, torch_load, torch_save

__all__ = ["LayerMaps", "attach_layer_maps", "detach_layer_maps", "layer_generator",
           "quantized_layers", "check_names_in_model", "save_tagged", "load_tagged",
           "check_map_bits"]


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
        if e.over_budget:  # its sizes do not fit its bytes: the message names the file
            raise error(e.line) from None
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


class LayerMaps:
    """Base of :class:`~qfv_brevitas.chip.faults.FaultMap` and
    :class:`~qfv_brevitas.chip.variability.VariabilityMap`: per layer a pair of tensors
    (``layers[name]``) and the bit width (``bits[name]``), and ``meta``, the settings that
    sampled the map (``None`` for a map measured on hardware).

    The base checks the dicts and each layer's name, bit width and pair, saves and loads the
    map as a tagged file (:func:`save_tagged` / :func:`load_tagged`), validates it against a
    model and attaches it (:func:`attach_layer_maps`). A map class names its parts in the class
    attributes below and checks what is its own: :meth:`check_pair` (the tensors themselves),
    :meth:`check_fit` (against one layer), :meth:`set_on` / :meth:`clear_on` (a chip).
    """

    #: The file's format tag.
    FORMAT: str = ""
    #: The error every check raises.
    ERROR: Type[QfvError] = QfvError
    #: The map in messages (``"fault map"``).
    WHAT: str = "map"
    #: Names of the pair's two tensors (in the file, and in messages).
    PARTS: Tuple[str, str] = ("", "")
    #: The pair a layer takes, in messages (``"(sa0, sa1) of uint8 tensors"``).
    PAIR: str = ""
    #: What the map puts on a layer, in messages (``"stuck bits"``).
    PAYLOAD: str = ""
    #: The configuration class that samples the map (``meta`` is its ``to_dict()``).
    MODEL: Type[QfvConfig] = QfvConfig

    def __init__(self, layers: Dict[str, Tuple[Any, Any]], bits: Dict[str, int],
                 meta: Optional[dict] = None):
        cls = type(self).__name__
        if not isinstance(layers, dict) or not isinstance(bits, dict):
            raise self.ERROR(f"{cls}(layers, bits) takes two dicts keyed by layer name")
        if set(layers) != set(bits):
            raise self.ERROR(
                f"{cls}: layers and bits must name the same layers; only in layers: "
                f"{sorted(set(layers) - set(bits))}, only in bits: "
                f"{sorted(set(bits) - set(layers))}")
        self.layers: Dict[str, Tuple[Any, Any]] = {}
        self.bits: Dict[str, int] = {}
        for name, pair in layers.items():
            if not isinstance(name, str):
                raise self.ERROR(f"{self.WHAT} layer names must be str, got {name!r}")
            where = f"{self.WHAT} layer {name!r}"
            self.bits[name] = check_map_bits(bits[name], where, self.ERROR)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise self.ERROR(f"{where}: expected a pair {self.PAIR}")
            self.layers[name] = self.check_pair(pair[0], pair[1], self.bits[name], where)
        self.meta = meta

    @classmethod
    def check_pair(cls, a: Any, b: Any, bits: int, where: str) -> Tuple[Any, Any]:
        """The layer's pair ``(a, b)`` once checked for ``bits``-bit weights (``where`` names the
        layer in the error)."""
        raise NotImplementedError

    def check_fit(self, name: str, shape: Tuple[int, ...], bits: int) -> None:
        """Check layer ``name``'s entry against its weight's ``shape`` and bit width."""
        raise NotImplementedError

    @staticmethod
    def set_on(chip: Any, pair: Tuple[Any, Any], weight: Tensor) -> None:
        """Put one layer's pair on its chip (``weight``: the layer's weight, for the device)."""
        raise NotImplementedError

    @staticmethod
    def clear_on(chip: Any) -> None:
        """Take this kind of map off a chip."""
        raise NotImplementedError

    def describe(self) -> str:
        """The map in a few words, for ``repr``."""
        return ""

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} layers, {self.describe()}, "
                f"{'sampled' if self.meta is not None else 'measured'})")

    def to(self, device) -> "LayerMaps":
        """A copy with every tensor on ``device``."""
        return type(self)({n: tuple(None if t is None else t.to(device) for t in pair)
                           for n, pair in self.layers.items()}, dict(self.bits), self.meta)

    def save(self, path: os.PathLike, overwrite: bool = False) -> None:
        """Write the map to ``path`` (plain tensors and a checksum, atomically; an existing
        file only with ``overwrite=True``; read back with :meth:`load`)."""
        a, b = self.PARTS
        save_tagged(path, {
            "format": self.FORMAT, "meta": self.meta,
            "layers": {n: {a: x.detach().cpu(), b: None if y is None else y.detach().cpu(),
                           "bits": self.bits[n]} for n, (x, y) in self.layers.items()}},
            overwrite)

    @classmethod
    def load(cls, path: os.PathLike) -> "LayerMaps":
        """Read a map written by :meth:`save` (tensors on the CPU); the map's error naming the
        file if it is corrupt or not a map of this kind."""
        data = load_tagged(path, cls.FORMAT, cls.ERROR, cls.WHAT)
        a, b = cls.PARTS
        try:
            entries = data["layers"]
            layers = {n: (e[a], e[b]) for n, e in entries.items()}
            bits = {n: e["bits"] for n, e in entries.items()}
            return cls(layers, bits, cls.read_meta(data.get("meta")))
        except (LookupError, TypeError, AttributeError, ValueError) as e:
            raise cls.ERROR(f"{os.fspath(path)!r} is a damaged {cls.WHAT}: {e}") from e

    @classmethod
    def read_meta(cls, meta: Any) -> Optional[dict]:
        """The stored ``meta`` (of any version) read through :attr:`MODEL`'s ``from_dict``."""
        return None if meta is None else cls.MODEL.from_dict(meta).to_dict()

    def validate(self, model: nn.Module) -> None:
        """Check that the map fits ``model``: each entry names an N-multiplier layer whose
        weight fits the entry (:meth:`check_fit`). Layers without an entry stay ideal."""
        layers = check_names_in_model(model, self.layers, self.ERROR, self.PAYLOAD)
        for name, layer in layers.items():
            self.check_fit(name, tuple(layer.weight.shape), quant_of(layer).bits)


def attach_layer_maps(model: nn.Module, maps: Any, kind: Type[LayerMaps], what: str
                      ) -> nn.Module:
    """Put a map on the chips of ``model``'s N-multiplier layers: ``maps`` (a ``kind``, checked
    against the model with its ``validate`` before any chip changes) puts each layer's entry on
    its chip (``kind.set_on``); layers without one are cleared (``kind.clear_on``). ``what``
    names the caller in the error for another type. Returns ``model``."""
    if not isinstance(maps, kind):
        raise QfvTypeError(f"{what} takes a {kind.__name__}, got {type(maps).__name__}")
    maps.validate(model)
    for name, layer in nmult_layers(model):
        chip = layer.weight_quant.chip
        if name in maps.layers:
            kind.set_on(chip, maps.layers[name], layer.weight)
        else:
            kind.clear_on(chip)
    return model


def detach_layer_maps(model: nn.Module, kind: Type[LayerMaps]) -> nn.Module:
    """Take ``kind``'s maps off every N-multiplier layer's chip (others stay). Returns
    ``model``."""
    for _, layer in nmult_layers(model):
        kind.clear_on(layer.weight_quant.chip)
    return model
