"""A user's own code reaching the registries: installed plugins (entry points) and
``module:function`` names.

A package registers methods, models and data sets in its ``pyproject.toml``::

    [project.entry-points."qfv_brevitas.models"]
    tiny_mlp = "my_pkg.models:tiny_mlp"

Each registry (:mod:`qfv_brevitas.studies.methods`, :mod:`qfv_brevitas.zoo.models`,
:mod:`qfv_brevitas.zoo.data`) asks :func:`plugin_names` for the names of its group when it is
looked up, never at ``import qfv_brevitas`` nor at ``qfv --help``; the names are read once
(no plugin code runs). A plugin's code is imported only when its name is used
(:func:`load_plugin`), once. So a broken plugin fails only the command that asks for it,
with a :class:`PluginError` naming the distribution and the entry point; a plugin whose name
is a built-in's (or another distribution's) is refused as soon as its group is looked up,
since it would change what an existing command line means.

``module:function`` (``qfv train --model my_nets:tiny``) is imported by
:func:`import_user_object`, from the current folder too (as ``python -m`` does).
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from typing import Any, Callable, Collection, Dict, Iterable, Tuple, Union

from qfv_brevitas.util.errors import QfvError

__all__ = ["PluginError", "METHODS_GROUP", "MODELS_GROUP", "DATASETS_GROUP", "GROUPS",
           "plugin_names", "load_plugin", "forget_plugins", "is_user_spec",
           "check_user_spec", "import_user_object", "call_accepting", "import_allowed"]

METHODS_GROUP = "qfv_brevitas.methods"
MODELS_GROUP = "qfv_brevitas.models"
DATASETS_GROUP = "qfv_brevitas.datasets"
GROUPS = (METHODS_GROUP, MODELS_GROUP, DATASETS_GROUP)

#: a dotted Python name (``pkg.module``, ``function``, ``Class.builder``)
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: a plugin's name: what a user types after --model / --dataset / --methods
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class PluginError(QfvError):
    """An installed plugin or a ``module:function`` that cannot be used: it does not import,
    names nothing callable, returns the wrong thing, or claims a name taken already."""


#: group -> {name: entry point}, read once per group
_FOUND: Dict[str, Dict[str, Any]] = {}
#: (group, name) -> the plugin's object after ``convert``
_LOADED: Dict[Tuple[str, str], Any] = {}


def forget_plugins() -> None:
    """Read the entry points again at the next lookup (after installing a plugin into a
    running interpreter, or in tests)."""
    _FOUND.clear()
    _LOADED.clear()


def _where(ep) -> str:
    """``plugin 'x' (entry point x = mod:fn of distribution D in group G)``."""
    dist = getattr(getattr(ep, "dist", None), "name", None) or "an unknown distribution"
    return (f"plugin {ep.name!r} (entry point {ep.name} = {ep.value} of distribution {dist}, "
            f"group {ep.group})")


def _discover(group: str) -> Dict[str, Any]:
    """The entry points of ``group`` by name; two distributions claiming one name, or a name
    that is no plain word, is an error naming both."""
    if group not in _FOUND:
        from importlib.metadata import entry_points

        found: Dict[str, Any] = {}
        for ep in entry_points(group=group):
            if not _NAME.match(ep.name):
                raise PluginError(f"{_where(ep)}: its name must be letters, digits, '_', '.' "
                                  "or '-' (no ':' or spaces); rename the entry point")
            if ep.name in found and found[ep.name].value != ep.value:
                raise PluginError(f"{_where(ep)} and {_where(found[ep.name])} claim the same "
                                  "name; uninstall one of them")
            found[ep.name] = ep
        _FOUND[group] = found
    return _FOUND[group]


def plugin_names(group: str, builtins: Iterable[str]) -> Tuple[str, ...]:
    """The names the installed plugins register in ``group`` (none of their code runs); an
    error if one claims a name of ``builtins``, the registry's own names."""
    found = _discover(group)
    taken = sorted(set(found) & set(builtins))
    if taken:
        raise PluginError(f"{_where(found[taken[0]])}: {taken[0]!r} is a built-in name of "
                          f"{group}; a plugin may not replace it (rename the entry point or "
                          "uninstall the distribution)")
    return tuple(found)


def load_plugin(group: str, name: str, convert: Callable[[str, Any], Any]) -> Any:
    """The object of plugin ``name`` of ``group`` (loaded once), passed through
    ``convert(name, obj)``, which checks it and raises QfvError/TypeError saying what is
    wrong; any failure becomes a :class:`PluginError` naming the distribution and entry
    point."""
    key = (group, name)
    if key not in _LOADED:
        ep = _discover(group)[name]
        try:
            obj = ep.load()
        except Exception as e:  # any error of someone else's import: name the plugin
            raise PluginError(f"{_where(ep)} does not load: {type(e).__name__}: "
                              f"{_first_line(e)}") from e
        try:
            _LOADED[key] = convert(name, obj)
        except (QfvError, TypeError) as e:
            raise PluginError(f"{_where(ep)}: {_first_line(e)}") from e
    return _LOADED[key]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def is_user_spec(text: object) -> bool:
    """Whether ``text`` is a ``module:function`` name (a registry name holds no ``:``)."""
    return isinstance(text, str) and ":" in text


def check_user_spec(text: str, option: str = "--model") -> Tuple[str, str]:
    """``(module, function)`` of ``module:function`` (dotted names both); an error naming
    ``option`` otherwise."""
    module, sep, attr = str(text).partition(":")
    if not sep or not _DOTTED.match(module) or not _DOTTED.match(attr):
        raise QfvError(f"{option} {text!r}: expected module:function, e.g. my_nets:tiny "
                       "(a module importable from the current folder or sys.path, and a "
                       "function in it)")
    return module, attr


def import_user_object(spec: str, option: str = "--model") -> Callable:
    """The callable ``module:function`` names, the module imported from the current folder
    too (first, as ``python -m`` does). Errors name ``option``, the module and what failed:
    a module not found, one whose import raised, a missing or non-callable attribute."""
    module, attr = check_user_spec(spec, option)
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise PluginError(f"{option} {spec}: no module named {module!r} in the current "
                              f"folder ({here}) or on sys.path") from None
        raise PluginError(f"{option} {spec}: importing module {module!r} failed: "
                          f"{_first_line(e)}") from e
    except Exception as e:  # the user's module raised while importing
        raise PluginError(f"{option} {spec}: importing module {module!r} failed: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    finally:
        if added and here in sys.path:
            sys.path.remove(here)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{option} {spec}: module {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{option} {spec}: {module}.{attr} is a {type(obj).__name__}, not "
                          "a function")
    return obj


def call_accepting(fn: Callable, **values) -> Any:
    """``fn`` called with those of ``values`` (as keywords) that its signature names, all of
    them if it takes ``**kwargs``: a builder declares only what it needs."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): call it plain
        return fn()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**values)
    named = {k: v for k, v in values.items() if k in params
             and params[k].kind is not inspect.Parameter.POSITIONAL_ONLY}
    return fn(**named)


def import_allowed(spec: str, allow: Union[bool, Collection[str], None]) -> bool:
    """Whether rebuilding ``spec`` from a file may import its module: ``allow`` is True (any),
    ``spec`` itself, or a collection holding exactly ``spec``."""
    if isinstance(allow, bool) or allow is None:
        return allow is True
    if isinstance(allow, str):
        return allow == spec
    return spec in allow
