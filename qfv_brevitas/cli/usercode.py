"""A user's own model, data and methods on the ``qfv`` command line: ``--model``/``--data
module:function``, ``--allow-import`` (the consent to rebuild a checkpoint that names a
user's function) and the options whose names come from a registry with its plugins
(``--methods``, ``--model``, ``--dataset``).

The plugins are found by the registries (:mod:`qfv_brevitas.util.plugins`), never while the
parser is built or ``--help`` is printed: such an option's choices (:class:`LateChoices`) are
read only when the option is given, and a wrong name is the usual one-line argparse error
listing the built-in and the plugins' names. Nothing here imports torch at module level.
"""
from __future__ import annotations

import argparse
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.plugins import check_user_spec, is_user_spec

__all__ = ["user_spec", "model_arg", "add_allow_import", "import_permission", "MODEL_HELP",
           "data_option", "LazyNames", "LateChoices", "model_names", "dataset_names",
           "method_names", "MethodsOf"]


class LazyNames(Sequence):
    """The choices of an option, computed when asked (``in``, iteration), never before:
    ``names()`` lists them (for the error message), ``member(value)`` (default: ``value in
    names()``) decides; with ``specs`` a well-formed ``module:function`` is a member too. A
    broken plugin found on the way is argparse's one-line error, not a traceback."""

    def __init__(self, names: Callable[[], Sequence[str]], specs: bool = False,
                 member: Optional[Callable[[str], bool]] = None):
        self.names, self.specs, self.member = names, specs, member

    def listed(self) -> Tuple[str, ...]:
        """Every name, asked now."""
        try:
            return tuple(self.names())
        except QfvError as e:
            raise argparse.ArgumentError(None, str(e)) from None

    def __contains__(self, value: object) -> bool:
        if self.specs and is_user_spec(value):
            return True
        if self.member is None:
            return value in self.listed()
        try:
            return bool(self.member(value))
        except QfvError as e:
            raise argparse.ArgumentError(None, str(e)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.listed())

    def __len__(self) -> int:
        return len(self.listed())

    def __getitem__(self, i):
        return self.listed()[i]


class LateChoices(argparse.Action):
    """A store action whose ``choices`` is a :class:`LazyNames` (a property, so not in
    ``vars(action)``): argparse checks a given value against it, while ``--help``, which
    formats ``vars(action)`` and joins its ``choices``, never computes it. ``names``,
    ``specs``, ``member``: see LazyNames."""

    def __init__(self, option_strings, dest, names: Callable[[], Sequence[str]] = tuple,
                 specs: bool = False, member: Optional[Callable[[str], bool]] = None, **kw):
        self.late_choices = LazyNames(names, specs, member)
        super().__init__(option_strings, dest, **kw)

    @property
    def choices(self) -> LazyNames:
        return self.late_choices

    @choices.setter
    def choices(self, value) -> None:  # argparse.Action.__init__ sets None: ours stays
        pass

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)


def model_names() -> Tuple[str, ...]:
    """The built-in (not spiking: ``qfv snn train`` has those) and the plugins' models
    (imports the zoo: only when --model is given)."""
    from qfv_brevitas.zoo.models import model_names as names

    return names(spiking=False)


def dataset_names() -> Tuple[str, ...]:
    """The built-in and the plugins' data sets."""
    from qfv_brevitas.zoo.data import dataset_names as names

    return names()


def method_names() -> Tuple[str, ...]:
    """The registered and the plugins' study methods."""
    from qfv_brevitas.studies.methods import method_names as names

    return tuple(names())


class MethodsOf:
    """``member`` of :class:`LazyNames` for the methods of one scenario kind: a name is known
    (no plugin loaded for that) and, loaded alone, applies to ``kind``; ``MethodsOf(kind)()``
    lists them all (which loads the plugins, for the error message)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self) -> Tuple[str, ...]:
        from qfv_brevitas.studies.methods import method_names as names

        return tuple(names(self.kind))

    def applies(self, name: str) -> bool:
        from qfv_brevitas.studies.methods import get_method

        return name in method_names() and get_method(name).applies(self.kind)

#: the help of ``--model`` where a model is built
MODEL_HELP = ("the model: small_cnn, mlp, resnet18, vgg, an installed plugin's model, or "
              "module:function, your own function returning a torch.nn.Module (called with "
              "input_shape= and num_classes= if it takes them; the module is imported from the "
              "current folder too)")


def user_spec(text: str) -> str:
    """The argparse type of a ``module:function`` option (``--data``, ``--allow-import``)."""
    try:
        check_user_spec(text, "")
    except QfvError:
        raise argparse.ArgumentTypeError(
            f"expected module:function (e.g. my_data:load), got {text!r}") from None
    return text


def model_arg(text: str) -> str:
    """The argparse type of ``--model``: a registry name (checked when the command runs, so
    that the parser loads no plugin) or a well-formed ``module:function``."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the model name is empty")
    return user_spec(text) if ":" in text else text


def data_option(p: argparse.ArgumentParser) -> None:
    """``--data module:function``: another spelling of ``--dataset`` for a user's function
    (the same destination; the last one given counts)."""
    p.add_argument("--data", dest="dataset", type=user_spec, default=argparse.SUPPRESS,
                   metavar="MODULE:FUNCTION",
                   help="your own data instead of --dataset: a function returning (train, "
                        "test) torch Datasets of (input, integer label) pairs, or a dict with "
                        "'train' and 'test' (called with data_dir= and seed= if it takes them)")


def add_allow_import(p: argparse.ArgumentParser) -> None:
    """``--allow-import module:function`` on a command that reads a checkpoint."""
    p.add_argument("--allow-import", type=user_spec, default=None, metavar="MODULE:FUNCTION",
                   help="a checkpoint of your own model names its module:function; rebuilding "
                        "it imports that module (runs its code): give the same "
                        "module:function here to allow it")


def import_permission(args) -> Union[bool, str]:
    """What ``load_checkpoint(..., allow_import=)`` gets from the command line: the one
    ``module:function`` named by ``--allow-import``, else nothing."""
    return getattr(args, "allow_import", None) or False
