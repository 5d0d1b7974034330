"""Save and load quantized reference models with what is needed to rebuild them.

A checkpoint is a ``torch.save`` of plain containers and tensors only, read back with
``torch.load(weights_only=True)``: a file that holds anything else (a crafted pickle that would
run code) is refused before any of it runs. It carries a SHA-256 of its contents, checked on
load, so a damaged file is a clear error rather than a model with different weights. (The
checksum detects damage; it is no signature: whoever edits a file can recompute it.)
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from brevitas import config as brevitas_config
from torch import nn

from qfv_brevitas.core.config import NMultConfig
from qfv_brevitas.core.convert import quantize_model, unsigned_input_layers
from qfv_brevitas.util.configbase import VERSION_KEY, QfvConfig
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.plugins import import_allowed, is_user_spec
from qfv_brevitas.zoo.models import build_model
from qfv_brevitas.util.budgets import (MAX_INPUT_DIMS, MAX_INPUT_VALUES, MAX_SPIKING_VALUES,
                                       MAX_TIME_STEPS)
from qfv_brevitas.util.safeio import LoadError, content_digest, torch_load, torch_save

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "content_digest"]

FORMAT = "qfv-brevitas/2"
#: Earlier formats still read (without a checksum to check).
LEGACY_FORMATS = ("qfv-brevitas/1",)

#: Classes a checkpoint may hold beyond tensors and plain containers, allowed for
#: ``torch.load(weights_only=True)`` (none today: configs and metadata are stored as dicts).
SAFE_GLOBALS: list = []
#: Values the model may hold beyond the file's tensors before it is built: tensors an older
#: file may lack (Brevitas' activation scales left out while they collected statistics).
MISSING_VALUES = 1 << 16


class CheckpointError(QfvError):
    """A checkpoint file that cannot be read, is damaged, or does not fit."""


def _plain(value: Any, where: str) -> Any:
    """``value`` with numpy scalars and dataclasses made plain (what weights_only loads); a
    configuration (:class:`~qfv_brevitas.util.configbase.QfvConfig`) as its ``to_dict()``."""
    if isinstance(value, QfvConfig):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):  # numpy scalar
        return value.item()
    return value


def _check_finite(params: Iterable[Tuple[str, torch.Tensor]], what: str) -> None:
    for name, p in params:
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{what}: parameter {name} holds NaN or inf values (the "
                                  "training diverged? try a lower learning rate)")


def save_checkpoint(path: Union[str, Path], model: nn.Module, arch: str,
                    input_shape: Tuple[int, ...], num_classes: int,
                    config: Optional[NMultConfig] = None, *, overwrite: bool = False,
                    **meta) -> Path:
    """Write ``model`` (a :func:`qfv_brevitas.zoo.models.build_model` architecture, quantized with
    ``config`` or float when ``config`` is None) with everything :func:`load_checkpoint` needs.

    Written atomically (an existing file is replaced only with ``overwrite=True``, and stays
    intact if anything fails); a model with NaN/inf parameters is refused.
    """
    path = Path(path)
    _check_finite(model.named_parameters(), f"not saving {path}")
    state = _full_state_dict(model)
    payload = {
        "format": FORMAT, "arch": arch, "input_shape": [int(d) for d in input_shape],
        "num_classes": int(num_classes), "config": None if config is None else config.to_dict(),
        "unsigned_inputs": unsigned_input_layers(model) if config is not None else [],
        "state_dict": state, "meta": _plain(meta, "meta"),
    }
    try:
        payload["sha256"] = content_digest(payload)
    except TypeError as e:
        raise CheckpointError(f"not saving {path}: {e}") from None
    torch_save(payload, path, overwrite=overwrite)
    return path


def weights_only_load(path: Path, error: type = None, what: str = "checkpoint",
                      holds: str = "a qfv-brevitas checkpoint"):
    """:func:`qfv_brevitas.util.safeio.torch_load` (weights only, on the CPU) with every
    failure turned into one ``error`` (default :class:`CheckpointError`) naming the file: a
    crafted pickle is refused before any of it runs, a damaged file is "not a readable
    {what}"; ``holds`` says what a good file holds."""
    error = error or CheckpointError
    try:
        return torch_load(path, SAFE_GLOBALS)
    except LoadError as e:
        if e.over_budget:  # its sizes do not fit its bytes: the message names the file
            raise error(e.line) from None
        if e.refused:
            raise error(
                f"{path}: refused: the file holds Python objects that loading would have to "
                f"run ({e.line[:200]}); {holds} holds only tensors and plain values. "
                "Nothing of it was executed.") from None
        raise error(f"{path}: not a readable {what} ({e.kind}: {e.line[:200]})") from None


def _load_raw(path: Path) -> dict:
    ckpt = weights_only_load(path)
    if not isinstance(ckpt, dict) or (ckpt.get("format") != FORMAT
                                      and ckpt.get("format") not in LEGACY_FORMATS):
        raise CheckpointError(f"{path}: not a qfv-brevitas checkpoint (expected format {FORMAT})")
    if ckpt["format"] == FORMAT:
        if "sha256" not in ckpt:
            raise CheckpointError(f"{path}: has no checksum (damaged, or edited by hand)")
        try:
            digest = content_digest(ckpt)
        except TypeError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if digest != ckpt["sha256"]:
            raise CheckpointError(f"{path}: its contents do not match their checksum: the file "
                                  "is damaged or was edited; use an intact copy")
    else:
        warnings.warn(f"{path}: an older checkpoint ({ckpt['format']}) without a checksum: "
                      "damage cannot be detected; re-save it with save_checkpoint",
                      stacklevel=3)
    return ckpt


def _field(ckpt: dict, key: str, ok, what: str, path: Path):
    if key not in ckpt:
        raise CheckpointError(f"{path}: the checkpoint has no {key!r} entry")
    value = ckpt[key]
    if not ok(value):
        raise CheckpointError(f"{path}: the checkpoint's {key!r} must be {what}, got {value!r:.80}")
    return value


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_work(path: Path, shape: list, meta: dict) -> None:
    """Refuse settings that would size the work beyond the caps of
    :mod:`qfv_brevitas.util.budgets` (checked before anything is built): the input sample
    (``MAX_INPUT_VALUES``), a spiking model's time steps (``MAX_TIME_STEPS``, and time steps x
    sample at most ``MAX_SPIKING_VALUES``), and a data seed that is no seed."""
    if len(shape) > MAX_INPUT_DIMS or math.prod(shape) > MAX_INPUT_VALUES:
        raise CheckpointError(f"{path}: the checkpoint's 'input_shape' {_short(shape)} is "
                              f"refused: at most {MAX_INPUT_VALUES} values per sample in at "
                              f"most {MAX_INPUT_DIMS} dimensions are read")
    seed = meta.get("data_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise CheckpointError(f"{path}: the checkpoint's meta 'data_seed' must be an int in "
                              f"0..2**32-1, got {seed!r:.40}")
    snn = meta.get("snn")
    if snn is None:
        return
    if not isinstance(snn, dict):
        raise CheckpointError(f"{path}: the checkpoint's meta 'snn' (spiking settings) must be "
                              f"a dict, got {type(snn).__name__}")
    steps = snn.get("T", 1)
    if isinstance(steps, (int, float)) and not isinstance(steps, bool) and (
            not math.isfinite(steps) or steps > MAX_TIME_STEPS
            or steps * math.prod(shape) > MAX_SPIKING_VALUES):
        raise CheckpointError(f"{path}: the checkpoint's spiking setting T={steps!r:.40} time "
                              f"steps is refused: at most {MAX_TIME_STEPS} steps, and steps x "
                              f"values per sample at most {MAX_SPIKING_VALUES}")


def _short(values: list) -> str:
    text = repr(values)
    return text if len(text) <= 60 else text[:57] + "...]"


def _build(arch: str, shape: Tuple[int, ...], num_classes: int, meta: dict,
           config: Optional[NMultConfig], unsigned: list, path: Path) -> nn.Module:
    """The checkpoint's model (quantized with ``config``), on the current default device (the
    meta device for :func:`_check_fits`); every failure a :class:`CheckpointError`."""
    try:
        model = build_model(arch, shape, num_classes, snn=meta.get("snn"))
    except ImportError as e:  # the snn extra is missing: its message says what to install
        raise CheckpointError(f"{path}: {e}") from None
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild its model {arch!r} for inputs "
                              f"{shape}: {e}") from None
    if config is None:
        return model
    try:
        # r and c come from the state dict: build with LSQ's cheap start instead of fitting
        # levels to the random init weights only to overwrite them.
        return quantize_model(model, dataclasses.replace(config, init="lsq"),
                              unsigned_inputs=unsigned, inplace=True)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its quantization config does not fit: {e}") from None


def _full_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with Brevitas' full state dict on: Brevitas leaves learned
    activation scales out while they are still collecting statistics; the full state dict
    makes any checkpoint loadable."""
    full = brevitas_config._FULL_STATE_DICT
    brevitas_config._FULL_STATE_DICT = True
    try:
        return model.state_dict()
    finally:
        brevitas_config._FULL_STATE_DICT = full


def _tensor_sizes(model: nn.Module) -> Dict[str, torch.Size]:
    """Shape of every tensor of ``model``'s full state dict (what save_checkpoint writes)."""
    return {k: v.shape for k, v in _full_state_dict(model).items()
            if isinstance(v, torch.Tensor)}


def _check_fits(path: Path, arch: str, shape: Tuple[int, ...], num_classes: int, meta: dict,
                config: Optional[NMultConfig], unsigned: list, state: dict) -> None:
    """Build the model on the meta device (shapes, no memory) and refuse it before the real
    one is built if it is larger than the weights the file holds: a tensor larger than the
    file's, or more values in all than the file's tensors plus ``MISSING_VALUES`` (tensors an
    older file may lack). Smaller mismatches are left to ``load_state_dict``'s own words."""
    cfg = None if config is None else dataclasses.replace(config, frac_bits=None)
    try:
        with torch.device("meta"):
            expected = _tensor_sizes(_build(arch, shape, num_classes, meta, cfg, unsigned,
                                            path))
    except (RuntimeError, NotImplementedError):  # an op without a meta kernel: the float
        with torch.device("meta"):               # model still bounds the weights
            expected = _tensor_sizes(_build(arch, shape, num_classes, meta, None, [], path))
    saved = {k: v.shape for k, v in state.items() if isinstance(v, torch.Tensor)}
    where = f"the model {arch!r} for inputs {shape} and {num_classes} classes"
    for key, size in expected.items():
        if key in saved and size.numel() > saved[key].numel():
            raise CheckpointError(f"{path}: does not fit its model: {key!r} has shape "
                                  f"{tuple(saved[key])} in the file but {tuple(size)} in {where}")
    need = sum(s.numel() for s in expected.values())
    have = sum(s.numel() for s in saved.values())
    if need > have + MISSING_VALUES:
        raise CheckpointError(f"{path}: does not fit its model: {where} holds {need} values, "
                              f"the file's weights {have}; its settings do not match its weights")


def load_checkpoint(path: Union[str, Path], allow_import: Union[bool, str, Sequence[str]] = False
                    ) -> Tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint written by :func:`save_checkpoint`.

    A checkpoint of a user's model stores only its name, ``module:function``; rebuilding it
    imports that module, i.e. runs its code, so it is refused unless ``allow_import`` allows
    it: ``True`` (any), or that exact ``module:function`` (a str or a collection of them;
    ``qfv ... --allow-import module:function``).

    Returns ``(model, info)`` with the model in eval mode; ``info`` holds arch, input shape,
    number of classes, the quantization config and the saved metadata. Raises
    :class:`CheckpointError` naming the file for a missing, unreadable, damaged, unsafe or
    foreign file, or one whose contents do not fit together. Budgets before work: the file
    is read within the budgets of :func:`qfv_brevitas.util.safeio.torch_load`, the settings
    that size the work are capped (:func:`_check_work`) and the model is built on the meta
    device and compared with the weights (:func:`_check_fits`) before it is built for real.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    ckpt = _load_raw(path)
    arch = _field(ckpt, "arch", lambda v: isinstance(v, str), "a model name", path)
    shape = _field(ckpt, "input_shape", lambda v: isinstance(v, list) and v and
                   all(_positive_int(d) for d in v), "a list of positive ints", path)
    num_classes = _field(ckpt, "num_classes", _positive_int, "a positive int", path)
    cfg = _field(ckpt, "config", lambda v: v is None or isinstance(v, dict), "a dict or None",
                 path)
    unsigned = ckpt.get("unsigned_inputs", [])
    state = _field(ckpt, "state_dict", lambda v: isinstance(v, dict), "a dict", path)
    meta = ckpt.get("meta") or {}
    if not isinstance(meta, dict) or not isinstance(unsigned, list):
        raise CheckpointError(f"{path}: the checkpoint's 'meta' / 'unsigned_inputs' entries "
                              "are not a dict / list")
    _check_finite(((k, v) for k, v in state.items() if isinstance(v, torch.Tensor)), str(path))
    _check_work(path, shape, meta)
    if is_user_spec(arch) and not import_allowed(arch, allow_import):
        raise CheckpointError(
            f"{path}: its model is the user function {arch}: rebuilding it imports module "
            f"{arch.partition(':')[0]!r} and runs its code; if you trust it, pass "
            f"--allow-import {arch} (load_checkpoint(..., allow_import={arch!r}))")
    config = _config_of(cfg, path)
    # Spiking models keep their neuron/time settings in meta["snn"] (qfv_brevitas.snn).
    _check_fits(path, arch, tuple(shape), num_classes, meta, config, unsigned, state)
    model = _build(arch, tuple(shape), num_classes, meta, config, unsigned, path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: does not fit its model: {e}") from e
    _check_finite(model.named_parameters(), str(path))
    model.eval()
    info = {"arch": arch, "input_shape": shape, "num_classes": num_classes, "meta": meta,
            "config": config}
    return model, info


def _config_of(cfg: Optional[dict], path: Path) -> Optional[NMultConfig]:
    """The checkpoint's quantization config (None for a float model), checked."""
    if cfg is None:
        return None
    known = {f.name for f in dataclasses.fields(NMultConfig)} | {VERSION_KEY}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown quantization settings {unknown} in the "
                              "checkpoint's config (written by another version?)")
    try:
        return NMultConfig.from_dict(cfg)  # also a legacy dict without a version
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its quantization config does not fit: {e}") from None
