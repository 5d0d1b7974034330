"""What converting a model must keep, and the refusals, by name, where it cannot.

:mod:`qfv_brevitas.core.convert` replaces Conv/Linear layers by Brevitas layers. A torch model
can hold one layer under several names or call it several times, share one Parameter between
layers (tied weights), freeze parameters, hook layers, parametrize a weight, keep weights in
half precision or with no elements. This module finds those (one walk of the module tree) and
carries them over to the quantized layer, or refuses with the layer's name and the fix: a
conversion never changes a model without a word. The rules (README, "Brevitas and PyTorch
integration"):

- one module object is one quantized module: every name and every call reaches it;
- a converted layer keeps its weight and bias Parameter *objects* (ties, ``requires_grad``,
  Parameter subclasses and optimizers holding them survive);
- a layer whose weight is frozen gets frozen quantizer parameters, also after a state dict load;
- forward and backward hooks move to the quantized layer (their handles keep working);
- what cannot be carried over (parametrizations, old-style ``weight_norm``/``spectral_norm``
  and pruning hooks, state-dict hooks, a weight that is not a Parameter, a subclass with its
  own forward, integer or float8 weights, NaN/inf weights) is refused by name.
"""
from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from qfv_brevitas.util.errors import QfvError

__all__ = ["ConversionError", "ModuleTree", "module_tree", "check_tree", "copy_model", "find_module", "resolve_names",
           "check_weights", "check_replaceable", "is_empty", "adopt_hooks", "keep_frozen", "KeepFrozen",
           "FloatCallRecorder", "float_calls", "tie_conflicts", "warn_outside_ties",
           "FLOAT_DTYPES"]

#: weight dtypes a quantizer works in (it computes in the layer's dtype)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: hook dictionaries of a module that move to its quantized replacement with it
FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_backward_pre_hooks", "_backward_hooks")
#: hook dictionaries that would see a different state dict after the conversion: refused
STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                    "_load_state_dict_post_hooks")


class ConversionError(QfvError):
    """A layer of the model cannot be given an N-multiplier quantizer."""


@dataclass
class ModuleTree:
    """One walk of a model's modules: each module object's canonical name (the one
    ``named_modules()`` gives), the ``(parent, key)`` slots that hold it, and the
    ``(module name, attribute)`` slots of each Parameter."""

    name: Dict[int, str]
    slots: Dict[int, List[Tuple[nn.Module, str]]]
    params: Dict[int, List[Tuple[str, str]]]

    def names_of(self, module: nn.Module) -> List[str]:
        """The names ``module`` is reachable under, one per slot, the canonical one first."""
        first = self.name[id(module)]
        others = [_join(self.name[id(p)], k) for p, k in self.slots.get(id(module), [])]
        return [first] + [n for n in dict.fromkeys(others) if n != first]

    def replace(self, old: nn.Module, new: nn.Module) -> None:
        """Put ``new`` in every slot that held ``old``: one object stays one object."""
        for parent, key in self.slots[id(old)]:
            setattr(parent, key, new)

    def restore(self, old: nn.Module) -> None:
        """Put ``old`` back in every slot that held it (undo :meth:`replace`)."""
        self.replace(old, old)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def module_tree(model: nn.Module) -> ModuleTree:
    """Walk ``model`` once (:func:`check_tree` first)."""
    check_tree(model)
    name: Dict[int, str] = {}
    for n, m in model.named_modules():
        name.setdefault(id(m), n)
    slots: Dict[int, List[Tuple[nn.Module, str]]] = {}
    params: Dict[int, List[Tuple[str, str]]] = {}
    for mid, mname in name.items():
        module = model.get_submodule(mname) if mname else model
        for key, child in module._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((module, key))
        for key, p in module._parameters.items():
            if p is not None:
                params.setdefault(id(p), []).append((mname, key))
    return ModuleTree(name, slots, params)


def check_tree(model: nn.Module) -> None:
    """Refuse child names torch's ``add_module`` refuses (empty, with a dot, not a string:
    qualified names and state-dict keys would be ambiguous or fail) and a module that contains
    itself (torch's ``state_dict`` and ``.to()`` would recurse forever). Depth-first over
    distinct modules, without recursion; a child on the current path is a cycle."""
    state: Dict[int, int] = {id(model): 1}
    path: List[str] = []
    stack: List[Tuple[nn.Module, Iterable]] = [(model, iter(model._modules.items()))]
    while stack:
        module, children = stack[-1]
        for key, child in children:
            where = ".".join(path + [str(key)])
            if not isinstance(key, str) or not key or "." in key:
                raise ConversionError(
                    f"module {'.'.join(path) or '<model>'!r} holds a submodule under the name "
                    f"{key!r}, which torch's add_module refuses (qualified names and state-dict "
                    "keys would be ambiguous); register it under a plain name")
            if child is None:
                continue
            if state.get(id(child)) == 1:
                raise ConversionError(
                    f"module {where!r} is the model or one of its own ancestors: the module "
                    "tree has a cycle")
            if id(child) not in state:
                state[id(child)] = 1
                path.append(key)
                stack.append((child, iter(child._modules.items())))
                break
        else:
            state[id(module)] = 2
            stack.pop()
            if path:
                path.pop()


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, or a :class:`ConversionError` saying why not and what to do."""
    try:
        return copy.deepcopy(model)
    except Exception as e:  # deepcopy runs arbitrary __deepcopy__/__reduce__ code
        hooked = [n for n, m in model.named_modules() if _legacy_hook(m) is not None]
        where = f" (layer {hooked[0]!r} uses {_legacy_hook(model.get_submodule(hooked[0]))})" \
            if hooked else ""
        raise ConversionError(
            f"the model cannot be deep-copied{where}: {type(e).__name__}: {e}. Convert it in "
            "place (inplace=True) or make it copyable first") from e


def find_module(model: nn.Module, name) -> Optional[nn.Module]:
    """The submodule at the qualified name ``name`` (any of a shared module's names), or
    ``None``."""
    try:
        return model.get_submodule(name)
    except (AttributeError, TypeError):
        return None


def resolve_names(model: nn.Module, names: Sequence, what: str) -> Dict[str, nn.Module]:
    """``{name: submodule}`` for qualified names given by the caller (``skip``, ``layer_bits``):
    any of a shared module's names resolves to the one object."""
    out, unknown = {}, []
    for n in names:
        m = find_module(model, n)
        if m is None:
            unknown.append(n)
        else:
            out[n] = m
    if unknown:
        raise ConversionError(f"{what} names not in the model: {sorted(map(str, unknown))}")
    return out


# -- one layer: can it be converted as it is? -----------------------------------------------------

def _legacy_hook(module: nn.Module) -> Optional[str]:
    """The name of an old-style weight-rewriting hook on ``module`` (``None``: none)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    kinds = ((WeightNorm, "torch.nn.utils.weight_norm (weight_g/weight_v hooks)"),
             (SpectralNorm, "torch.nn.utils.spectral_norm (weight_orig/weight_u hooks)"),
             (BasePruningMethod, "torch.nn.utils.prune (weight_orig/weight_mask hooks)"))
    for hook in module._forward_pre_hooks.values():
        for cls, label in kinds:
            if isinstance(hook, cls):
                return label
    return None


def _legacy_fix(label: str) -> str:
    if "prune" in label:
        return "make the pruning permanent with torch.nn.utils.prune.remove(layer, 'weight')"
    if "weight_norm" in label:
        return ("bake it with torch.nn.utils.remove_weight_norm(layer) (or use the "
                "parametrization torch.nn.utils.parametrizations.weight_norm and bake that)")
    return "bake it with torch.nn.utils.remove_spectral_norm(layer)"


def check_weights(name: str, layer: nn.Module) -> None:
    """Refuse, naming ``name``, weights a quantizer could not take as they are: weight and bias
    must be plain Parameters (no parametrization, no weight-rewriting hook) of a floating
    dtype, and finite."""
    legacy = _legacy_hook(layer)
    if legacy is not None:
        raise ConversionError(
            f"layer {name!r} uses {legacy}: its weight is recomputed by a hook, so a quantizer "
            f"could not see or keep it; {_legacy_fix(legacy)}, or pass {name!r} in skip=()")
    if parametrize.is_parametrized(layer):
        kinds = {t: [type(p).__name__ for p in layer.parametrizations[t]]
                 for t in layer.parametrizations}
        raise ConversionError(
            f"layer {name!r} has parametrizations {kinds} (torch.nn.utils.parametrize): a "
            "quantized layer's weight must be a plain Parameter (snapping, repairs and "
            "exports write into it). Bake them with torch.nn.utils.parametrize."
            f"remove_parametrizations(layer, name) or pass {name!r} in skip=()")
    for attr in ("weight", "bias"):
        _check_tensor(name, layer, attr)


def check_replaceable(name: str, layer: nn.Module, base: type) -> None:
    """Refuse, naming ``name``, a ``layer`` (an instance of the torch class ``base``) whose
    Brevitas replacement would lose something: its weights (:func:`check_weights`), a forward
    of its own, parameters, buffers or submodules ``base`` lacks, or state-dict hooks."""
    check_weights(name, layer)
    _check_structure(name, layer, base)
    bad = [a for a in STATE_DICT_HOOKS if getattr(layer, a, None)]
    if bad:
        raise ConversionError(
            f"layer {name!r} has state-dict hooks ({', '.join(bad)}): the quantized layer's "
            "state dict has other keys, so they cannot move with it; remove them or pass "
            f"{name!r} in skip=()")


def _check_structure(name: str, layer: nn.Module, base: type) -> None:
    for attr in ("forward", "_conv_forward"):
        if getattr(type(layer), attr, None) is not getattr(base, attr, None):
            raise ConversionError(
                f"layer {name!r} is a {type(layer).__name__}, a subclass of {base.__name__} with "
                f"its own {attr}: the quantized layer would drop it. Pass {name!r} in skip=()")
    extra = sorted(set(layer._parameters) - {"weight", "bias"}) + sorted(layer._buffers) \
        + sorted(layer._modules)
    extra = [e for e in extra if e not in ("weight", "bias")]
    if extra:
        raise ConversionError(
            f"layer {name!r} ({type(layer).__name__}) holds {extra} besides its weight and "
            f"bias: the quantized layer would drop them. Pass {name!r} in skip=()")


def _check_tensor(name: str, layer: nn.Module, attr: str) -> None:
    t = getattr(layer, attr, None)
    if t is None and attr == "bias":
        return
    if not isinstance(layer._parameters.get(attr), nn.Parameter):
        held = "a buffer" if attr in layer._buffers else f"a plain {type(t).__name__}"
        raise ConversionError(
            f"layer {name!r}: its {attr} is {held}, not a Parameter; the quantized layer's "
            f"{attr} is a Parameter, so converting it would make it trainable. Register it as "
            f"nn.Parameter(..., requires_grad=False) to convert a frozen layer, or pass "
            f"{name!r} in skip=()")
    if t.dtype not in FLOAT_DTYPES:
        raise ConversionError(
            f"layer {name!r}: its {attr} is {str(t.dtype).replace('torch.', '')}; the quantizer "
            "works in float16, bfloat16, float32 or float64. Cast the layer (layer.float()) "
            f"or pass {name!r} in skip=()")
    if not t.is_meta and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ConversionError(
            f"layer {name!r}: {bad} of {t.numel()} values of its {attr} are NaN or infinite "
            "(a quantizer cannot start from them, the layer would compute NaN/inf). Check the "
            "checkpoint or the training that produced it")


def is_empty(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight has no elements (``Linear(0, 4)``, a Conv with no output
    channels): there is nothing to quantize, the converter leaves it float with a warning."""
    return layer.weight.numel() == 0


# -- carrying a layer's state over ----------------------------------------------------------------

def adopt_hooks(old: nn.Module, new: nn.Module) -> None:
    """Move ``old``'s forward and backward hooks to ``new``: ``new`` takes the very hook
    dictionaries, so handles the caller holds (``handle.remove()``) keep working."""
    for attr in FORWARD_HOOKS:
        if getattr(old, attr, None) and not getattr(new, attr):
            setattr(new, attr, getattr(old, attr))
    if old._backward_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook


def freeze_parts(layer: nn.Module, parts: Sequence[str]) -> None:
    """``requires_grad=False`` for every parameter of the named submodules of ``layer``."""
    for part in parts:
        sub = getattr(layer, part, None)
        if isinstance(sub, nn.Module):
            sub.requires_grad_(False)


class KeepFrozen:
    """Load-state-dict post hook of a converted layer whose weight was frozen: Brevitas
    re-creates a quantizer's parameters when a state dict is loaded; while the weight is still
    frozen, this freezes them again."""

    def __init__(self, parts: Sequence[str]) -> None:
        self.parts = tuple(parts)

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        weight = getattr(module, "weight", None)
        if weight is not None and not weight.requires_grad:  # unfrozen since: leave it
            freeze_parts(module, self.parts)


def keep_frozen(layer: nn.Module, parts: Sequence[str]) -> None:
    """Freeze the parameters of ``layer``'s submodules ``parts`` now and after every
    ``load_state_dict`` (one hook per layer, however often it is called)."""
    freeze_parts(layer, parts)
    if not any(isinstance(h, KeepFrozen) for h in layer._load_state_dict_post_hooks.values()):
        layer.register_load_state_dict_post_hook(KeepFrozen(parts))


# -- ties -----------------------------------------------------------------------------------------

def tie_conflicts(tree: ModuleTree, bits: Dict[str, int]) -> None:
    """Refuse converted layers (``bits``: canonical name -> weight bits) that share one weight
    Parameter but would get different bit widths: one weight, one set of levels."""
    for users in tree.params.values():
        named = [(n, a) for n, a in users if a == "weight" and n in bits]
        widths = {bits[n] for n, _ in named}
        if len(widths) > 1:
            desc = ", ".join(f"{n!r}: {bits[n]}" for n, _ in named)
            raise ConversionError(
                f"layers {[n for n, _ in named]} share one weight Parameter (tied) but would "
                f"get different weight bits ({desc}); give them the same bits with layer_bits")


def warn_outside_ties(tree: ModuleTree, converted: Set[str]) -> None:
    """Warn where a converted layer's weight or bias is also held by a module that is not
    converted (e.g. an Embedding tied to a Linear head): the tie is kept, but that module
    keeps reading the float values while the layer computes with quantized weights."""
    # Slots inside a converted layer (a Brevitas quantizer's references to the weight it
    # tracks, swapped away with it) are not users.
    within = tuple(f"{n}." for n in converted if n)
    for users in tree.params.values():
        inside = [f"{n}.{a}" for n, a in users if n in converted]
        outside = [f"{n}.{a}" if n else a for n, a in users
                   if n not in converted and not n.startswith(within)]
        if inside and outside:
            warnings.warn(
                f"{inside[0]} is the same Parameter as {outside} (not converted): the tie is "
                "kept, and that module reads the float values while the converted layer "
                "computes with quantized weights", UserWarning, stacklevel=3)


# -- float layers that still run ------------------------------------------------------------------

class FloatCallRecorder:
    """Global forward pre-hook: records float compute modules called on this thread."""

    def __init__(self, compute: tuple, quantized: tuple, allowed: Set[int]) -> None:
        self.compute, self.quantized, self.allowed = compute, quantized, allowed
        self.thread = threading.get_ident()
        self.seen: List[nn.Module] = []

    def __call__(self, module: nn.Module, args) -> None:
        if threading.get_ident() == self.thread and isinstance(module, self.compute) and \
                not isinstance(module, self.quantized) and id(module) not in self.allowed:
            self.seen.append(module)


def float_calls(model: nn.Module, example_input, recorder: FloatCallRecorder
                ) -> List[nn.Module]:
    """The float compute modules ``recorder`` sees while ``model`` runs ``example_input``
    (eval mode, no gradient; every module's mode restored after)."""
    modes = {m: m.training for m in model.modules()}
    handle = nn.modules.module.register_module_forward_pre_hook(recorder)
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        handle.remove()
        for m, t in modes.items():
            m.training = t
    return list({id(m): m for m in recorder.seen}.values())
