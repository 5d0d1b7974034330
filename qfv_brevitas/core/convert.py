"""Give a model N-multiplier weight quantizers.

- :func:`quantize_model`: a plain torch model (Conv1d/2d/3d and Linear, with BatchNorm,
  residual adds, anything around them) gets Brevitas layers with these weight quantizers and
  Brevitas' learned-scale input-activation quantizers; first and last compute layers at 8 bits.
  An ``nn.Embedding`` becomes a ``QuantEmbedding`` (weights only: its input is integer ids) at
  the edge width, so a language model's token embedding and LM head are its 8-bit edges.
- :func:`swap_weight_quant`: an existing Brevitas model keeps its layers and activation
  quantizers; each quantized layer's weight quantizer is replaced, initialised from its weights.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

import brevitas.nn as qnn
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat

from qfv_brevitas.core.config import FORWARD_MODES, NMultConfig
from qfv_brevitas.core.hf import is_hf_conv1d
from qfv_brevitas.core.preserve import (ConversionError, FloatCallRecorder, ModuleTree,
                                        adopt_hooks, check_tree, check_replaceable, check_weights,
                                        copy_model, find_module, float_calls, is_empty, keep_frozen,
                                        module_tree, resolve_names, tie_conflicts,
                                        warn_outside_ties)
from qfv_brevitas.util.validate import check_choice
from qfv_brevitas.core.levels import check_bits
from qfv_brevitas.core.quantizers import (FixedLevelWeightQuant, LearnedStepWeightQuant, NMultWeightQuant,
                         NMultWeightQuantProxy, nmult_layers, quant_of)

__all__ = ["quantize_model", "swap_weight_quant", "set_forward_mode", "ConversionError",
           "weight_quant_for", "unsigned_input_layers", "probe_layers", "set_submodule",
           "build_quant_layer", "edge_layers", "COMPUTE", "CONVERTIBLE", "QUANTIZED"]


_VARIANT_QUANT = {"nmult": NMultWeightQuant, "step": LearnedStepWeightQuant,
                  "fixed": FixedLevelWeightQuant}

_CONV = {nn.Conv1d: qnn.QuantConv1d, nn.Conv2d: qnn.QuantConv2d, nn.Conv3d: qnn.QuantConv3d}
#: the torch compute layers quantize_model converts (input quantizers where asked)
COMPUTE = (nn.Linear, *_CONV)
#: every torch layer quantize_model converts: the compute layers and embedding tables
CONVERTIBLE = (*COMPUTE, nn.Embedding)
#: the Brevitas layers a conversion makes (a float layer of CONVERTIBLE that is not one of
#: these still runs in float)
QUANTIZED = (QuantWeightBiasInputOutputLayer, qnn.QuantEmbedding)
_UNSUPPORTED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
                nn.modules.lazy.LazyModuleMixin)


def weight_quant_for(config: NMultConfig, bits: int, name: Optional[str] = None):
    """The weight-quant injector for ``config`` at ``bits`` (per-layer attributes bound)."""
    return _VARIANT_QUANT[config.variant].let(
        bit_width=check_bits(bits, f"layer {name}"), forward_mode=config.mode,
        scaling_per_output_channel=config.per_channel, layer_name=name, level_init=config.init,
        frac_bits=config.frac_bits)


def probe_layers(model: nn.Module, example_input) -> Tuple[List[str], Dict[str, bool]]:
    """Conv/Linear/Embedding layer names of ``model`` in execution order (registration order
    without an input), and for each layer run on ``example_input`` whether its inputs were all
    non-negative.

    The pass runs in eval mode so that BatchNorm running statistics are left untouched; the
    model's output is not read (a Hugging Face ``ModelOutput`` is fine), and a layer called
    with its input as a keyword argument is seen too."""
    names = [n for n, m in model.named_modules() if isinstance(m, CONVERTIBLE)]
    if example_input is None:
        return names, {}
    order: List[str] = []
    mins: Dict[str, float] = {}

    def hook(n, x):
        order.append(n)
        if x is not None and x.numel():
            mins[n] = min(mins.get(n, float("inf")), float(x.detach().min()))

    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(
        lambda mod, args, kwargs, n=n: hook(n, first_tensor(args, kwargs)), with_kwargs=True)
        for n in names]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        for m, t in modes.items():
            m.training = t
    seen = list(dict.fromkeys(order))
    return seen + [n for n in names if n not in seen], {n: v >= 0 for n, v in mins.items()}


def first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The first tensor a layer is called with, positional or keyword (``None``: none)."""
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


def edge_layers(model: nn.Module, names: Sequence[str]) -> Set[str]:
    """The layers at the edge width among ``names`` (converted layers in execution order):
    the first and the last, and every embedding table (a language model's token and position
    embeddings and its LM head; paper section 4's first/last layers of a CNN)."""
    if not names:
        return set()
    mods = dict(model.named_modules())
    return {names[0], names[-1]} | {n for n in names if isinstance(mods[n], nn.Embedding)}


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified name ``name`` (``"features.0"``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_quant_layer(name: str, old: nn.Module, wq, act_quant, act_bits: Optional[int],
                      stats_steps: int = NMultConfig.act_collect_stats_steps,
                      level_init: Optional[str] = None, adopt: bool = False) -> nn.Module:
    """The Brevitas counterpart of the Conv/Linear/Embedding layer ``old`` (named ``name``):
    weight quantizer ``wq`` (any Brevitas weight-quant injector), input quantizer
    ``act_quant`` at ``act_bits`` (``None``: float inputs; never on an embedding, whose input
    is integer ids) collecting statistics for ``stats_steps`` steps, and ``old``'s weights and
    bias: copies, or with ``adopt`` the very Parameter objects (ties, ``requires_grad`` and
    optimizers holding them survive). ``level_init``: the level init of an N-multiplier
    ``wq``."""
    # With ``level_init`` (N-multiplier quantizers) the layer is built with LSQ's cheap start:
    # its random init weights are replaced below, and only then are the levels initialised
    # the configured way (a fit to the random weights would be wasted).
    kw = dict(weight_quant=wq if level_init is None else wq.let(level_init="lsq"),
              device=old.weight.device, dtype=old.weight.dtype, return_quant_tensor=False)
    if isinstance(old, nn.Embedding):
        new = quant_embedding(name, old, kw)
    else:
        kw["bias"] = old.bias is not None
        if act_quant is not None:
            kw.update(input_quant=act_quant, input_bit_width=act_bits,
                      input_collect_stats_steps=stats_steps)
        new = quant_compute_layer(name, old, kw)
    if adopt:
        new.weight = old.weight
        if getattr(old, "bias", None) is not None:
            new.bias = old.bias
    else:
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if getattr(old, "bias", None) is not None:
                new.bias.copy_(old.bias)
    new.train(old.training)
    # The quantizer was initialised from the layer's random init: start it from the real weights.
    proxy = new.weight_quant
    if level_init is not None:
        proxy.quant_injector = proxy.quant_injector.let(level_init=level_init)
    proxy.init_tensor_quant()
    new.weight_quant.train(old.training)
    return new


def quant_compute_layer(name: str, old: nn.Module, kw: dict) -> nn.Module:
    """A Brevitas QuantLinear/QuantConv shaped like ``old``, built with the keywords ``kw``
    (its weights are still its random init)."""
    if isinstance(old, nn.Linear):
        return qnn.QuantLinear(old.in_features, old.out_features, **kw)
    cls = next(q for base, q in _CONV.items() if isinstance(old, base))
    if isinstance(old.padding, str) and old.padding == "same" and any(
            s != 1 for s in old.stride):
        raise ConversionError(f"layer {name!r}: padding='same' with stride > 1 is not supported")
    return cls(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
               padding=old.padding, dilation=old.dilation, groups=old.groups,
               padding_mode=old.padding_mode, **kw)


def quant_embedding(name: str, old: nn.Embedding, kw: dict) -> nn.Module:
    """A Brevitas QuantEmbedding shaped like ``old`` (same ``padding_idx`` and
    ``scale_grad_by_freq``), built with the keywords ``kw``. Per channel means per row of the
    table (one token's vector). ``max_norm`` (it rescales the rows it looks up in place, which
    would rewrite the quantized table) and ``sparse`` gradients are refused by name."""
    if old.max_norm is not None:
        raise ConversionError(
            f"layer {name!r} (Embedding) has max_norm={old.max_norm}: it renormalises the rows "
            "it looks up in place, which a quantized table cannot keep. Renormalise the weights "
            f"once and set max_norm=None, or pass {name!r} in skip=()")
    if old.sparse:
        raise ConversionError(
            f"layer {name!r} (Embedding) has sparse=True: the weight quantizer's gradient is "
            f"dense. Build it with sparse=False or pass {name!r} in skip=()")
    new = qnn.QuantEmbedding(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx,
                             scale_grad_by_freq=old.scale_grad_by_freq, **kw)
    # The layer returns plain tensors: so should its weight quantizer. Brevitas' embedding
    # handler for a quant tensor takes per-tensor scales only, a plain table any scale.
    new.weight_quant.skip_create_quant_tensor = True
    return new


def quantize_model(model: nn.Module, config: Optional[NMultConfig] = None,
                   example_input: Optional[torch.Tensor] = None, inplace: bool = False,
                   skip: tuple = (), unsigned_inputs: Optional[Sequence[str]] = None
                   ) -> nn.Module:
    """Replace the Conv/Linear layers of a plain torch model by Brevitas layers with
    N-multiplier weight quantizers and learned-scale input-activation quantizers.

    Args:
        model: a plain torch model (BatchNorm, residual adds etc. are left as they are), or a
            Hugging Face ``transformers`` model (its ``nn.Linear`` projections and embeddings
            convert; GPT-2's ``Conv1D`` first needs
            :func:`qfv_brevitas.core.hf.conv1d_to_linear`).
        config: bits, variant, mode, granularity; the edge layers (:func:`edge_layers`: first
            and last in execution order and every ``nn.Embedding``) get
            ``config.first_last_bits`` for weights and input activations (paper section 4).
            An embedding becomes a ``QuantEmbedding`` with a weight quantizer only.
        example_input: optional batch; with it, first/last layers are found in execution order,
            layers whose inputs are never negative get unsigned activation quantizers, and the
            converted model is run once to check that no float Conv/Linear still runs.
        inplace: modify ``model`` instead of a deep copy.
        skip: names of compute layers to leave in float (any name of a shared layer).
        unsigned_inputs: names of layers whose input quantizer is unsigned; overrides the
            detection from ``example_input`` (used to rebuild a saved model exactly).

    Returns the quantized model. What it keeps (:mod:`qfv_brevitas.core.preserve`): a layer
    held under several names or called several times is one quantized layer; each converted
    layer keeps its weight and bias Parameter objects (ties, ``requires_grad``), its forward
    and backward hooks and its train/eval mode; a frozen weight gets frozen quantizer
    parameters. Empty layers stay float with a warning; what cannot be kept is refused with a
    :class:`ConversionError` naming the layer.

    >>> m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> q = quantize_model(m, NMultConfig(weight_bits=3, act_bits=4))
    >>> [quant_of(l).bits for _, l in nmult_layers(q)]
    [8, 3, 8]
    """
    config = config or NMultConfig()
    check_tree(model)
    skipped = {id(m) for m in resolve_names(model, skip, "skip").values()}
    refuse_unconvertible(model, skipped)
    resolve_names(model, config.layer_bits, "layer_bits")
    if not inplace:
        model = copy_model(model)
    tree = module_tree(model)
    skipped = {id(m) for m in resolve_names(model, skip, "skip").values()}
    order, observed = probe_layers(model, example_input)
    layers, left_float = convertible_layers(model, order, skipped)
    names = [n for n, _ in layers]
    if not names:
        raise ConversionError("the model has no Conv1d/Conv2d/Conv3d/Linear layer or Embedding "
                              "to quantize" + (" (only empty ones)" if left_float else ""))
    nonneg = observed if unsigned_inputs is None else \
        unsigned_by_name(model, tree, unsigned_inputs, names)
    edge = edge_layers(model, names) if config.first_last_bits is not None else set()
    wbits = layer_bits_by_name(model, tree, config, edge, names)
    tie_conflicts(tree, wbits)
    warn_outside_ties(tree, set(names))
    built = []
    for name, old in layers:
        abits = config.first_last_bits if name in edge else config.act_bits
        act_quant = None
        if config.act_bits is not None:  # (an embedding takes none: build_quant_layer)
            act_quant = Uint8ActPerTensorFloat if nonneg.get(name, False) else Int8ActPerTensorFloat
        built.append((old, convert_layer(name, old, config, wbits[name], act_quant, abits)))
    for old, new in built:  # every layer built before the model changes: no half conversion
        tree.replace(old, new)
    if example_input is not None:
        try:
            refuse_float_calls(model, example_input, tree, skipped | left_float)
        except ConversionError:
            for old, _ in built:
                tree.restore(old)
            raise
    return model


def refuse_unconvertible(model: nn.Module, skipped: Set[int]) -> None:
    """Refuse Brevitas layers, compute layers without a Brevitas counterpart (GPT-2's
    ``Conv1D`` names the helper that replaces it) and MultiheadAttention (it reads its
    projections' weights directly) unless skipped."""
    for name, mod in model.named_modules():
        if is_hf_conv1d(mod) and id(mod) not in skipped:
            raise ConversionError(
                f"layer {name!r} is a transformers Conv1D (GPT-2 style, weight stored as (in, "
                "out)): call qfv_brevitas.core.hf.conv1d_to_linear(model) first to replace "
                "every Conv1D by the nn.Linear it computes, or pass its name in skip=()")
        if isinstance(mod, QUANTIZED):
            raise ConversionError(
                f"layer {name!r} is already a Brevitas layer ({type(mod).__name__}); use "
                "swap_weight_quant(model, config) to give an existing Brevitas model N-multiplier "
                "weights")
        if isinstance(mod, _UNSUPPORTED) and id(mod) not in skipped:
            raise ConversionError(
                f"layer {name!r} ({type(mod).__name__}) cannot be converted: supported compute "
                "layers are Conv1d, Conv2d, Conv3d and Linear. Pass its name in skip=() to leave "
                "it in float.")
        if isinstance(mod, nn.MultiheadAttention):
            inner = {f"{name}.{c}": m for c, m in mod.named_children()}
            if any(id(m) not in skipped for m in inner.values()):
                raise ConversionError(
                    f"layer {name!r} (MultiheadAttention) reads the weights of {list(inner)} "
                    "directly, so a quantizer on them would never run. Pass them in skip=() to "
                    "leave them in float.")


def convertible_layers(model: nn.Module, order: Sequence[str], skipped: Set[int]
                       ) -> Tuple[List[Tuple[str, nn.Module]], Set[int]]:
    """``(name, layer)`` of the layers to convert, in ``order``, each checked
    (:func:`~qfv_brevitas.core.preserve.check_replaceable`), and the ids of empty layers left
    float with a warning."""
    mods = dict(model.named_modules())
    out, empty = [], set()
    for name in order:
        layer = mods[name]
        if id(layer) in skipped:
            continue
        check_replaceable(name, layer, next(b for b in CONVERTIBLE if isinstance(layer, b)))
        if is_empty(layer):
            warnings.warn(f"layer {name!r} has an empty weight {tuple(layer.weight.shape)}: "
                          "nothing to quantize, it stays float", UserWarning, stacklevel=3)
            empty.add(id(layer))
            continue
        out.append((name, layer))
    return out, empty


def unsigned_by_name(model: nn.Module, tree: ModuleTree, unsigned_inputs: Sequence[str],
                     names: Sequence[str]) -> Dict[str, bool]:
    """``{canonical name: True}`` for ``unsigned_inputs`` (any name of a converted layer)."""
    try:
        found = resolve_names(model, unsigned_inputs, "unsigned_inputs")
    except ConversionError:
        found = {}
    canon = {n: tree.name[id(m)] for n, m in found.items()}
    unknown = [n for n in unsigned_inputs if canon.get(n) not in names]
    if unknown:
        raise ConversionError(f"unsigned_inputs names are not converted layers: {sorted(unknown)}")
    return {c: True for c in canon.values()}


def bits_given(model: nn.Module, tree: ModuleTree, layer_bits: Dict[str, int]
               ) -> Dict[str, Tuple[str, int]]:
    """``{canonical name: (name given, bits)}`` of ``layer_bits``, whose names may be any name
    of a shared layer; two names of one layer with different bits are refused."""
    given: Dict[str, Tuple[str, int]] = {}
    for n, m in resolve_names(model, layer_bits, "layer_bits").items():
        canon, bits = tree.name[id(m)], layer_bits[n]
        if canon in given and given[canon][1] != bits:
            raise ConversionError(
                f"layer_bits gives {given[canon][0]!r} {given[canon][1]} bits and {n!r} {bits}, "
                f"but both name the one layer {canon!r}")
        given[canon] = (n, bits)
    return given


def layer_bits_by_name(model: nn.Module, tree: ModuleTree, config: NMultConfig,
                       edge: Set[str], names: Sequence[str]) -> Dict[str, int]:
    """Weight bits of each converted layer by canonical name: ``config.layer_bits``
    (:func:`bits_given`), else the first/last width at the edges, else ``config.weight_bits``."""
    given = bits_given(model, tree, config.layer_bits)
    return {n: given[n][1] if n in given else
            config.first_last_bits if n in edge else config.weight_bits for n in names}


def convert_layer(name: str, old: nn.Module, config: NMultConfig, wbits: int, act_quant,
                  abits: Optional[int]) -> nn.Module:
    """The quantized counterpart of ``old``: its Parameter objects, hooks and mode; frozen
    quantizers (weight levels and input scale) if its weight is frozen."""
    new = build_quant_layer(name, old, weight_quant_for(config, wbits, name), act_quant, abits,
                            config.act_collect_stats_steps, config.init, adopt=True)
    adopt_hooks(old, new)
    if not old.weight.requires_grad:
        keep_frozen(new, ("weight_quant", "input_quant"))
    return new


def refuse_float_calls(model: nn.Module, example_input, tree: ModuleTree,
                       allowed: Set[int]) -> None:
    """Run the converted ``model`` once and refuse a float Conv/Linear/Embedding that still
    runs: one
    reached other than through the model's modules (a plain list, a bound method) or created
    in the forward pass would silently stay float."""
    seen = float_calls(model, example_input,
                       FloatCallRecorder(CONVERTIBLE, QUANTIZED, allowed))
    if not seen:
        return
    layer = seen[0]
    fix = ("; register it as a submodule (an attribute, nn.ModuleList or nn.ModuleDict) and "
           "call it through the model, or pass it in skip=()")
    if id(layer) in tree.name:
        raise ConversionError(
            f"layer {tree.name[id(layer)]!r} still runs in float after the conversion: the "
            "forward pass also reaches it other than through the model's modules (a plain "
            "list or dict, a bound method, a closure)" + fix)
    raise ConversionError(
        f"a {type(layer).__name__}({layer.extra_repr()}) that is not a submodule of the model "
        "runs in the forward pass (held in a plain list, dict or other object, or created in "
        "forward), so it would stay float" + fix)


def swap_weight_quant(model: nn.Module, config: Optional[NMultConfig] = None,
                      keep_bit_width: bool = False, include_float: bool = False) -> nn.Module:
    """Give every quantized layer of an existing Brevitas model an N-multiplier weight
    quantizer, in place, initialised from its current weights. Activations, bias quantizers
    and quant tensors between layers are untouched: a layer whose integer bias or quant-tensor
    output needs the weight's scale gets the integer view (``frac_bits="auto"`` unless
    ``config.frac_bits`` says otherwise), so FINN-style models (``Int32Bias``,
    ``return_quant_tensor=True``) convert as they are.

    Args:
        config: bits/variant/mode/granularity (``layer_bits`` overrides per layer).
        keep_bit_width: keep each layer's current weight bit width instead of
            ``config.weight_bits`` (e.g. 1-bit for ``bnn_pynq`` LFC 1w1a).
        include_float: also swap layers whose weight quantization is disabled.

    Returns ``model``.
    """
    config = config or NMultConfig()
    check_tree(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED)]
    if not layers:
        raise ConversionError("the model has no Brevitas QuantConv/QuantLinear/QuantEmbedding "
                              "layer; use "
                              "quantize_model() for a plain torch model")
    tree = module_tree(model)
    quantized = {id(m) for _, m in layers}
    unknown = [n for n in config.layer_bits if id(find_module(model, n)) not in quantized]
    if unknown:
        raise ConversionError(f"layer_bits names are not quantized layers: {sorted(unknown)}")
    given = bits_given(model, tree, config.layer_bits)
    plan = []
    for name, layer in layers:
        proxy = layer.weight_quant
        if not proxy.is_quant_enabled and not include_float:
            continue
        if name in given:
            bits = given[name][1]
        elif keep_bit_width:
            if not proxy.is_quant_enabled:
                raise ConversionError(f"layer {name!r} has no weight bit width to keep")
            bits = int(proxy.bit_width())
        else:
            bits = config.weight_bits
        if layer.weight.dim() < 2 and config.per_channel:
            raise ConversionError(f"layer {name!r}: per-channel needs a weight with channels")
        check_weights(name, layer)
        if is_empty(layer):
            warnings.warn(f"layer {name!r} has an empty weight {tuple(layer.weight.shape)}: "
                          "nothing to quantize, its weight quantizer is left as it is",
                          UserWarning, stacklevel=2)
            continue
        plan.append((name, layer, check_bits(bits, f"layer {name}")))
    tie_conflicts(tree, {name: bits for name, _, bits in plan})
    warn_outside_ties(tree, {name for name, _, _ in plan})
    warn_shared_quantizers(plan)
    for name, layer, bits in plan:
        proxy = NMultWeightQuantProxy(layer, weight_quant_for(config, bits, name))
        layer.weight_quant = proxy
        if isinstance(layer, qnn.QuantEmbedding):
            proxy.skip_create_quant_tensor = True  # plain rows to look up (quant_embedding)
        if config.frac_bits is None and proxy.needs_quant_tensor():
            proxy.use_integer_view("auto")  # integer biases / quant tensors need it
        proxy.train(layer.training)
        if not layer.weight.requires_grad:
            keep_frozen(layer, ("weight_quant",))
    return model


def warn_shared_quantizers(plan: Sequence[Tuple[str, nn.Module, int]]) -> None:
    """Warn where one Brevitas weight quantizer serves layers with different weights: each
    gets its own N-multiplier quantizer, fitted to its own weights."""
    groups: Dict[int, List[Tuple[str, nn.Module]]] = {}
    for name, layer, _ in plan:
        groups.setdefault(id(layer.weight_quant), []).append((name, layer))
    for group in groups.values():
        if len({id(layer.weight) for _, layer in group}) > 1:
            warnings.warn(
                f"layers {[n for n, _ in group]} share one Brevitas weight quantizer but not one "
                "weight: each gets its own N-multiplier quantizer, fitted to its own weights",
                UserWarning, stacklevel=3)


def set_forward_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every N-multiplier layer to ``mode`` (``paper``, ``ste`` or ``both``); the mode
    is kept in the state dict and survives Brevitas re-initialising the quantizer."""
    check_choice(mode, FORWARD_MODES, "forward mode")
    for _, layer in nmult_layers(model):
        proxy = layer.weight_quant
        proxy.quant_injector = proxy.quant_injector.let(forward_mode=mode)
        quant_of(layer).mode = mode
    return model


def unsigned_input_layers(model: nn.Module) -> List[str]:
    """Names of layers whose input-activation quantizer is unsigned."""
    out = []
    for name, m in model.named_modules():
        iq = getattr(m, "input_quant", None)
        if isinstance(m, QuantWeightBiasInputOutputLayer) and iq is not None and \
                iq.is_quant_enabled and iq.is_signed is False:
            out.append(name)
    return out
