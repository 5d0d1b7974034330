"""Language-model loss and metric for :func:`~qfv_brevitas.training.train.fit` and the
studies: next-token cross-entropy over every position, and bits per byte.

A model's output may be the logits ``(batch, time, vocab)`` or a Hugging Face ``ModelOutput``
with a ``logits`` field; targets are ``(batch, time)`` token ids. With byte-level tokens,
bits per byte is the cross-entropy in bits per token (log2 e times the loss in nats): the
size, in bits per byte, an arithmetic coder driven by the model would compress the text to.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from qfv_brevitas.util.errors import QfvError

__all__ = ["logits_of", "lm_loss", "bits_per_byte", "evaluate_bpb", "LM_METRICS"]


def logits_of(outputs) -> Tensor:
    """The logits of a model's output: a tensor, or an object or dict with ``logits``."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else \
        getattr(outputs, "logits", None)
    if logits is None:
        raise QfvError(f"a language model's output must be logits or carry .logits, got "
                       f"{type(outputs).__name__}")
    return logits


def lm_loss(outputs, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats) over every position of every sequence."""
    logits = logits_of(outputs)
    if logits.dim() != targets.dim() + 1 or logits.shape[:-1] != targets.shape:
        raise QfvError(f"language-model logits {tuple(logits.shape)} do not match targets "
                       f"{tuple(targets.shape)} (expected (..., vocab) over (...))")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def bits_per_byte(outputs, targets: Tensor) -> Tensor:
    """:func:`lm_loss` in bits (for byte-level tokens: bits per byte; lower is better).

    >>> round(float(bits_per_byte(torch.zeros(1, 3, 256), torch.tensor([[1, 2, 3]]))), 6)
    8.0
    """
    return lm_loss(outputs, targets).detach() / math.log(2.0)


#: the metrics argument of :func:`~qfv_brevitas.training.train.fit` for a language model
LM_METRICS = {"bpb": bits_per_byte}


@torch.no_grad()
def evaluate_bpb(model: nn.Module, dataset: Dataset, batch_size: int = 64,
                 device: Optional[torch.device] = None) -> float:
    """Bits per byte of ``model`` over ``dataset`` (windows of equal length, so the mean over
    windows is the mean over bytes), in eval mode: N-multiplier weights on their levels."""
    from qfv_brevitas.training.train import evaluate_metrics

    return evaluate_metrics(model, dataset, LM_METRICS, batch_size, device)["bpb"]
