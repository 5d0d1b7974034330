"""One base for the library's configuration dataclasses.

A configuration is a ``@dataclass`` that derives from :class:`QfvConfig`: its defaults are its
field defaults (one place), it checks itself in :meth:`QfvConfig.validate` (called from
``__post_init__``, with the shared validators of :mod:`qfv_brevitas.util.validate`), and it
round-trips through plain, JSON-able dicts with a format version::

    d = cfg.to_dict()                  # {"config_version": 1, field: value, ...}
    cfg2 = type(cfg).from_dict(d)      # equal to cfg; also takes a legacy dict without version

``from_dict`` refuses unknown keys and dicts written by a newer version, naming them; every
error is a :class:`~qfv_brevitas.util.errors.QfvError`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Type, TypeVar

from qfv_brevitas.util.errors import QfvError

__all__ = ["QfvConfig", "VERSION_KEY"]

#: Key of the format version in :meth:`QfvConfig.to_dict`.
VERSION_KEY = "config_version"

C = TypeVar("C", bound="QfvConfig")


class QfvConfig:
    """Mixin base of every configuration dataclass (see the module docstring)."""

    #: Format version of :meth:`to_dict`; bump it when a field changes meaning.
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalise) the fields; subclasses override. Raises QfvError."""

    def to_dict(self) -> dict:
        """The fields as a plain dict (nested configs included) plus the format version."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out[VERSION_KEY] = self.VERSION
        return out

    @classmethod
    def from_dict(cls: Type[C], d: Mapping[str, Any]) -> C:
        """The configuration written by :meth:`to_dict` (or a legacy dict of its fields)."""
        name = cls.__name__
        if not isinstance(d, Mapping):
            raise QfvError(f"{name}: expected a dict of settings, got {type(d).__name__}")
        d = dict(d)
        version = d.pop(VERSION_KEY, 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise QfvError(f"{name}: {VERSION_KEY} must be a positive integer, got {version!r}")
        if version > cls.VERSION:
            raise QfvError(f"{name}: settings of format version {version}, this qfv-brevitas "
                           f"reads up to {cls.VERSION}; upgrade qfv-brevitas")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QfvError(f"{name}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                           f"known: {', '.join(sorted(known))}")
        return cls(**d)


def _plain(value: Any) -> Any:
    if isinstance(value, QfvConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
