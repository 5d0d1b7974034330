"""The registry of the methods a study compares, and the library's own methods.

A method is registered with :func:`register_method`: its name, the scenario kinds it applies
to, and whether it runs on each sampled map (``per_map=True``: the function gets a copy of
the model with the map attached) or once before any map is drawn (``per_map=False``: the
function trains a copy of the model, which is then deployed on every map)::

    @register_method("nearest_valid", applies_to=("faults", "variability"), needs_train=False)
    def nearest_valid(model, scenario, train, config):
        set_deploy_mapping(model, "aware")

    @register_method("saq", per_map=False)
    def saq(model, train, config):
        fit(model, train, None, replace(config.finetune, sam_rho=config.sam_rho), ...)

``config`` is the study's :class:`qfv_brevitas.studies.engine.CompareConfig` (fine-tune
settings, SAM radius, remap period, ...). The library's methods (:data:`METHODS`, in table
order):

- ``none``: the model as it is, naive mapping (nearest ideal level);
- ``nearest_valid``: aware mapping, the nearest level the chip can hold (FAQ/Matic);
- ``paper`` (per map): the paper's device-aware fine-tune (eq. 11 plus the periodic remap for
  faults, eq. 12 for variability) with the fine-tune's regularizer shape (default ``sq``);
- ``gauss``, ``sin`` (per map): the same with the Gaussian-well / SinReQ shape;
- ``chip_in_loop`` (per map): simulated chip-in-loop, STE through the chip's weights;
- ``saq_aware`` (per map): ``paper`` with FlatENN's sharpness-aware (SAM) updates;
- ``random_bit_error`` (once): random-bit-error training at ``rbe_rate``;
- ``saq`` (once): FlatENN's SAQ, a QAT fine-tune with SAM updates;
- ``selftune``: ``none`` plus self-tuning on the chip (no labels, no weight update).

Methods that adapt to a chip's map do not apply to transient bit flips (no map to adapt to).

An installed package adds methods with entry points in the group ``qfv_brevitas.methods``
(:mod:`qfv_brevitas.util.plugins`): each names a :class:`MethodSpec` (or a plain function,
``MethodSpec(fn)``'s defaults), registered under the entry point's name when a study first
asks for it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn
from torch.utils.data import Dataset

from qfv_brevitas.chip.bitflips import BitFlipModel, attach_bitflips, detach_bitflips
from qfv_brevitas.chip.repair import (chip_in_loop_finetune, fault_aware_finetune,
                                      set_deploy_mapping, variability_aware_finetune)
from qfv_brevitas.core.convert import set_forward_mode
from qfv_brevitas.training.train import TrainConfig, fit
from qfv_brevitas.studies.scenario import SCENARIO_KINDS, exempt_layers
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.plugins import METHODS_GROUP, load_plugin, plugin_names
from qfv_brevitas.util.validate import check_choice

__all__ = ["Method", "MethodSpec", "register_method", "unregister_method", "get_method", "method_names",
           "check_methods", "METHODS", "MAP_KINDS", "random_bit_error_finetune"]

#: Scenario kinds with a persistent map that a method can adapt to.
MAP_KINDS = ("faults", "variability")


@dataclass(frozen=True)
class Method:
    """A registered method (see :func:`register_method`)."""

    name: str
    fn: Callable
    applies_to: Tuple[str, ...]
    per_map: bool
    needs_train: bool
    selftune: bool
    doc: str

    def applies(self, kind: str) -> bool:
        """Whether the method runs on scenarios of ``kind``."""
        return kind in self.applies_to


_REGISTRY: Dict[str, Method] = {}


@dataclass(frozen=True)
class MethodSpec:
    """What a plugin's entry point names: the method's function and the settings of
    :func:`register_method` (the name is the entry point's).

    >>> MethodSpec(lambda model, scenario, train, config: None, applies_to=("faults",)).per_map
    True
    """

    fn: Callable
    applies_to: Sequence[str] = SCENARIO_KINDS
    per_map: bool = True
    needs_train: bool = True
    selftune: bool = False


def _checked_kinds(name: str, applies_to: Sequence[str]) -> Tuple[str, ...]:
    """``applies_to`` as a tuple of scenario kinds, at least one."""
    if not isinstance(name, str) or not name or "+" in name or name != name.strip():
        raise QfvError(f"a method name is a non-empty string without '+' or spaces around "
                       f"it, got {name!r}")
    kinds = (applies_to,) if isinstance(applies_to, str) else tuple(applies_to)
    if not kinds:
        raise QfvError(f"method {name!r}: give at least one scenario kind it applies to")
    for k in kinds:
        check_choice(k, SCENARIO_KINDS, f"scenario kind of method {name!r}:")
    return kinds


def _plugin_method(name: str, obj) -> Method:
    """The :class:`Method` of a plugin's entry point object (a MethodSpec or a function)."""
    spec = obj if isinstance(obj, MethodSpec) else MethodSpec(obj)
    if not callable(spec.fn):
        raise QfvError(f"a method plugin names a MethodSpec or a function, got a "
                       f"{type(spec.fn).__name__}")
    return Method(name, spec.fn, _checked_kinds(name, spec.applies_to), bool(spec.per_map),
                  bool(spec.needs_train), bool(spec.selftune), (spec.fn.__doc__ or "").strip())


def register_method(name: str, applies_to: Sequence[str] = SCENARIO_KINDS,
                    per_map: bool = True, needs_train: bool = True, selftune: bool = False
                    ) -> Callable:
    """Decorator: register ``fn`` as the study method ``name``.

    Args:
        name: the method's name in tables, ``--methods`` and
            :func:`~qfv_brevitas.studies.compare.compare_methods`.
        applies_to: scenario kinds it runs on; elsewhere its table cell is ``n/a`` (and a
            study of one kind refuses it).
        per_map: ``True``: ``fn(model, scenario, train, config)`` adapts a copy of the model
            with the scenario's map attached, per map; ``False``: ``fn(model, train, config)``
            trains a copy of the model once, before any map; it is deployed as it is.
        needs_train: whether it needs the training set.
        selftune: its rows are the model after self-tuning on the chip.

    Registering a name twice is an error (:func:`unregister_method` first).
    """
    kinds = _checked_kinds(name, applies_to)

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise QfvError(f"method {name!r} is registered already (by "
                           f"{_REGISTRY[name].fn.__module__}.{_REGISTRY[name].fn.__qualname__})"
                           f"; pick another name or unregister_method({name!r}) first")
        _REGISTRY[name] = Method(name, fn, kinds, bool(per_map), bool(needs_train),
                                 bool(selftune), (fn.__doc__ or "").strip())
        return fn
    return decorate


def unregister_method(name: str) -> None:
    """Remove the method ``name`` from the registry."""
    check_choice(name, list(_REGISTRY), "method")
    del _REGISTRY[name]


def method_names(kind: Optional[str] = None) -> List[str]:
    """Registered method names in registration order, then the installed plugins'; only
    those that apply to ``kind`` (which loads the plugins to ask them)."""
    names = list(_REGISTRY) + list(plugin_names(METHODS_GROUP, _REGISTRY))
    return [n for n in names if kind is None or get_method(n).applies(kind)]


def get_method(name: str) -> Method:
    """The registered method ``name`` (a plugin's is loaded at its first lookup); an error
    listing the registered ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    check_choice(name, method_names(), "method")
    return load_plugin(METHODS_GROUP, name, _plugin_method)


def check_methods(methods: Sequence[str], kind: Optional[str] = None,
                  what: str = "method") -> List[str]:
    """``methods`` as a list without duplicates; an error naming an unknown one (``what``
    names the vocabulary, e.g. ``"fault method"``) or, with ``kind``, one that does not apply
    to that scenario kind.

    >>> check_methods(["paper", "gauss", "paper"])
    ['paper', 'gauss']
    """
    if isinstance(methods, str):
        methods = [methods]
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise QfvError(f"give at least one method; choose from {', '.join(method_names())}")
    for m in methods:
        if m not in _REGISTRY:
            check_choice(m, method_names(), what)
        method = get_method(m)  # a plugin's is loaded (and checked) here
        if kind is not None and not method.applies(kind):
            raise QfvError(f"method {m!r} does not apply to {kind} scenarios (it applies to "
                           f"{', '.join(method.applies_to)}); choose from "
                           f"{', '.join(method_names(kind))}")
    return methods


# -- the library's methods -----------------------------------------------------------------------

@register_method("none", needs_train=False)
def _none(model: nn.Module, scenario, train: Dataset, config) -> None:
    """The model as it is, naive mapping (nearest ideal level)."""


@register_method("nearest_valid", applies_to=MAP_KINDS, needs_train=False)
def _nearest_valid(model: nn.Module, scenario, train: Dataset, config) -> None:
    """Aware mapping: the nearest level the chip can hold (FAQ/Matic, the paper's baseline)."""
    set_deploy_mapping(model, "aware")


def _device_aware(model: nn.Module, scenario, train: Dataset, config, **changes) -> None:
    run = replace(config.finetune, **changes)
    if scenario.kind == "faults":
        fault_aware_finetune(model, train, None, run, remap_every=config.remap_every,
                             progress=False)
    else:
        variability_aware_finetune(model, train, None, run, progress=False)


@register_method("paper", applies_to=MAP_KINDS)
def _paper(model: nn.Module, scenario, train: Dataset, config) -> None:
    """The paper's device-aware fine-tune: eq. 11 + periodic remap (faults), eq. 12
    (variability)."""
    _device_aware(model, scenario, train, config, sam_rho=0.0)


@register_method("gauss", applies_to=MAP_KINDS)
def _gauss(model: nn.Module, scenario, train: Dataset, config) -> None:
    """``paper`` with the Gaussian-well regularizer shape."""
    _device_aware(model, scenario, train, config, reg_shape="gauss", sam_rho=0.0)


@register_method("sin", applies_to=MAP_KINDS)
def _sin(model: nn.Module, scenario, train: Dataset, config) -> None:
    """``paper`` with the SinReQ regularizer shape."""
    _device_aware(model, scenario, train, config, reg_shape="sin", sam_rho=0.0)


@register_method("chip_in_loop", applies_to=MAP_KINDS)
def _chip_in_loop(model: nn.Module, scenario, train: Dataset, config) -> None:
    """Simulated chip-in-loop: STE training through the chip's weights (baseline)."""
    chip_in_loop_finetune(model, train, None, replace(config.finetune, sam_rho=0.0),
                          progress=False)
    set_forward_mode(model, "paper")  # evaluation is the same in every mode


@register_method("saq_aware", applies_to=MAP_KINDS)
def _saq_aware(model: nn.Module, scenario, train: Dataset, config) -> None:
    """``paper`` with FlatENN's sharpness-aware (SAM) updates at ``config.sam_rho``."""
    _device_aware(model, scenario, train, config, sam_rho=config.sam_rho)


def random_bit_error_finetune(model: nn.Module, train: Dataset, test: Optional[Dataset],
                              cfg: TrainConfig, flips: BitFlipModel, progress: bool = True
                              ) -> dict:
    """Random-bit-error training: fine-tune ``model`` in place with fresh random bit flips at
    ``flips.rate`` in every training forward pass (straight-through gradient), the regularizer
    of ``cfg`` as usual. The injectors are removed afterwards: the model deploys as before,
    hopefully tolerating flips. Returns :func:`qfv_brevitas.training.train.fit`'s history."""
    attach_bitflips(model, flips)
    try:
        return fit(model, train, test, cfg, desc="random-bit-error", progress=progress)
    finally:
        detach_bitflips(model)


@register_method("random_bit_error", per_map=False)
def _random_bit_error(model: nn.Module, train: Dataset, config) -> None:
    """Random-bit-error training at ``config.rbe_rate``, once, deployed as it is."""
    random_bit_error_finetune(model, train, None, replace(config.finetune, sam_rho=0.0),
                              BitFlipModel(config.rbe_rate, config.seed,
                                           exempt_layers(model, config.layers)),
                              progress=False)


@register_method("saq", per_map=False)
def _saq(model: nn.Module, train: Dataset, config) -> None:
    """FlatENN's SAQ: a QAT fine-tune with SAM updates at ``config.sam_rho``, once."""
    fit(model, train, None, replace(config.finetune, sam_rho=config.sam_rho), desc="saq",
        progress=False)


@register_method("selftune", selftune=True)
def _selftune(model: nn.Module, scenario, train: Dataset, config) -> None:
    """``none`` plus self-tuning on the chip (no labels, no weight update)."""


#: The library's own methods, in table order (a study's default).
METHODS: Tuple[str, ...] = tuple(_REGISTRY)
