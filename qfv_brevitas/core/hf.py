"""Hugging Face ``transformers`` layers the converter does not take as they are.

GPT-2 style models compute their projections with ``transformers.pytorch_utils.Conv1D``: a
linear layer whose weight is stored transposed, ``(in, out)``. :func:`conv1d_to_linear`
replaces each one by the ``nn.Linear`` it computes (weight ``(out, in)``), after which
:func:`qfv_brevitas.quantize_model` converts it like any other Linear (per channel = per
output feature, as for Llama's and GPT-NeoX's ``nn.Linear`` projections). ``transformers``
itself is never imported here: the class is recognised by its name and module, so this works
(and finds nothing) without the ``llm`` extra.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from qfv_brevitas.core.preserve import (ConversionError, adopt_hooks, check_weights,
                                        module_tree)

__all__ = ["is_hf_conv1d", "conv1d_to_linear"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' GPT-2 ``Conv1D`` (or a subclass)."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.")
               for c in type(module).__mro__)


def linear_of_conv1d(name: str, old: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what the ``Conv1D`` ``old`` computes: its weight
    transposed (a new Parameter, same ``requires_grad``), its bias Parameter itself."""
    base = next(c for c in type(old).__mro__ if c.__name__ == "Conv1D")
    if type(old).forward is not base.forward:
        raise ConversionError(f"layer {name!r} is a subclass of Conv1D with its own forward: "
                              "replacing it by nn.Linear would drop it")
    check_weights(name, old)
    w = old.weight
    new = nn.Linear(w.shape[0], w.shape[1], bias=old.bias is not None, device=w.device,
                    dtype=w.dtype)
    new.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if old.bias is not None:
        new.bias = old.bias
    adopt_hooks(old, new)
    new.train(old.training)
    return new


@torch.no_grad()
def conv1d_to_linear(model: nn.Module) -> List[str]:
    """Replace every ``transformers`` ``Conv1D`` of ``model`` (GPT-2's attention and MLP
    projections) by the equivalent ``nn.Linear``, in place, so that
    :func:`~qfv_brevitas.quantize_model` can convert it. Returns the names replaced.

    The weight becomes a new Parameter (the transpose): an optimizer built before holds the
    old one, and a Conv1D whose weight is shared with another module is refused by name.

    >>> from transformers import AutoModelForCausalLM, GPT2Config   # doctest: +SKIP
    >>> cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2)                 # doctest: +SKIP
    >>> m = AutoModelForCausalLM.from_config(cfg)                       # doctest: +SKIP
    >>> conv1d_to_linear(m)[:2]  # doctest: +SKIP
    ['transformer.h.0.attn.c_attn', 'transformer.h.0.attn.c_proj']
    """
    tree = module_tree(model)
    found = [(n, m) for n, m in model.named_modules() if is_hf_conv1d(m)]
    plan = []
    for name, old in found:
        users = tree.params.get(id(old.weight), [])
        if len(users) > 1:
            raise ConversionError(
                f"layer {name!r} (Conv1D) shares its weight with "
                f"{[f'{n}.{a}' for n, a in users if n != name]}: the transposed nn.Linear "
                "weight could not stay tied to it")
        plan.append((name, old, linear_of_conv1d(name, old)))
    for name, old, new in plan:  # all built first: no half replacement
        tree.replace(old, new)
    return [name for name, _, _ in plan]
