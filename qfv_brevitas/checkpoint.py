"""Save and load quantized reference models with what is needed to rebuild them."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from brevitas import config as brevitas_config
from torch import nn

from .config import NMultConfig
from .convert import quantize_model, unsigned_input_layers
from .models import build_model

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

FORMAT = "qfv-brevitas/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit."""


def save_checkpoint(path: Union[str, Path], model: nn.Module, arch: str,
                    input_shape: Tuple[int, ...], num_classes: int,
                    config: Optional[NMultConfig] = None, **meta) -> Path:
    """Write ``model`` (a :func:`qfv_brevitas.models.build_model` architecture, quantized with
    ``config`` or float when ``config`` is None) with everything :func:`load_checkpoint` needs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Brevitas leaves learned activation scales out of the state dict while they are still
    # collecting statistics; the full state dict makes any checkpoint loadable.
    full = brevitas_config._FULL_STATE_DICT
    brevitas_config._FULL_STATE_DICT = True
    try:
        state = model.state_dict()
    finally:
        brevitas_config._FULL_STATE_DICT = full
    torch.save({
        "format": FORMAT, "arch": arch, "input_shape": list(input_shape),
        "num_classes": int(num_classes), "config": None if config is None else config.to_dict(),
        "unsigned_inputs": unsigned_input_layers(model) if config is not None else [],
        "state_dict": state, "meta": meta,
    }, path)
    return path


def load_checkpoint(path: Union[str, Path]) -> Tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint written by :func:`save_checkpoint`.

    Returns ``(model, info)`` with the model in eval mode; ``info`` holds arch, input shape,
    number of classes, the quantization config and the saved metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a qfv-brevitas checkpoint (expected format {FORMAT})")
    # Spiking models keep their neuron/time settings in meta["snn"] (qfv_brevitas.snn).
    model = build_model(ckpt["arch"], tuple(ckpt["input_shape"]), ckpt["num_classes"],
                        snn=(ckpt.get("meta") or {}).get("snn"))
    config = NMultConfig(**ckpt["config"]) if ckpt["config"] is not None else None
    if config is not None:
        # r and c come from the state dict: build with LSQ's cheap start instead of fitting
        # levels to the random init weights (and again on load) only to overwrite them.
        model = quantize_model(model, replace(config, init="lsq"),
                               unsigned_inputs=ckpt["unsigned_inputs"], inplace=True)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit its model: {e}") from e
    model.eval()
    info = {k: ckpt[k] for k in ("arch", "input_shape", "num_classes", "meta")}
    info["config"] = config
    return model, info
