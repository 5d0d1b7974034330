"""``qfv --help`` without importing torch.

Building the real parser declares every option with its default, and the defaults live in the
configs (:class:`~qfv_brevitas.training.train.TrainConfig`, ...), whose modules import torch and
Brevitas: several seconds before a line of help. The help needs none of that, only what each
option prints. So :func:`describe` writes the parser down as plain data (option strings, help,
defaults and choices as the help prints them, groups), ``tools/cli_help.py`` stores it in
``help.json`` beside this module, and :func:`help_parser` rebuilds a parser from it that prints
the same help, byte for byte, and gives the same usage errors, with no torch. A test rebuilds
the description from the real parser and fails when the stored one is stale; another compares
the two parsers' help of every command.

Only ``-h``/``--help``, ``--version`` and a bare ``qfv`` are answered from the description
(:func:`wants_help`); every command that runs parses its arguments with the real parser.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

__all__ = ["describe", "help_parser", "wants_help", "load_description", "HELP_FILE",
           "SPEC_VERSION"]

#: the stored description (package data; ``python tools/cli_help.py`` rewrites it)
HELP_FILE = Path(__file__).with_name("help.json")
#: the layout of :data:`HELP_FILE`; a description of another layout is not used
SPEC_VERSION = 1

#: actions whose option takes no value, by argparse class name -> ``add_argument(action=)``
_FLAG_ACTIONS = {"_StoreTrueAction": "store_true", "_StoreFalseAction": "store_false",
                 "_StoreConstAction": "store_const", "_CountAction": "count",
                 "_AppendConstAction": "append_const", "_VersionAction": "version",
                 "_HelpAction": "help"}


def _text(value: Any) -> Any:
    """A default or choice as the help shows it (``%(default)s`` is ``str``)."""
    if value is None or value is argparse.SUPPRESS or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    return str(value)


def _action(a: argparse.Action, groups: Dict[int, int]) -> dict:
    kind = _FLAG_ACTIONS.get(type(a).__name__)
    d = {"option_strings": list(a.option_strings), "dest": a.dest, "help": a.help,
         "metavar": list(a.metavar) if isinstance(a.metavar, tuple) else a.metavar,
         "default": _text(a.default), "required": a.required, "action": kind,
         "nargs": a.nargs, "choices": None if a.choices is None else
         [_text(c) for c in a.choices], "xgroup": groups.get(id(a))}
    if kind == "version":
        d["version"] = a.version
    return d


def _parser(p: argparse.ArgumentParser) -> dict:
    """The description of one parser and, under ``commands``, of its subcommands."""
    xgroups = {id(a): i for i, g in enumerate(p._mutually_exclusive_groups)
               for a in g._group_actions}
    d: Dict[str, Any] = {
        "prog": p.prog, "description": p.description, "epilog": p.epilog,
        "xgroups": [g.required for g in p._mutually_exclusive_groups],
        "groups": [], "commands": {}}
    for group in p._action_groups:
        actions = []
        for a in group._group_actions:
            if isinstance(a, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in a._choices_actions}
                d["subcommands"] = {"dest": a.dest, "required": a.required,
                                    "metavar": a.metavar, "help": a.help,
                                    "title": group.title, "names": list(a.choices),
                                    "helps": [helps.get(n) for n in a.choices]}
                for name, sub in a.choices.items():
                    d["commands"][name] = _parser(sub)
                continue
            actions.append(_action(a, xgroups))
        d["groups"].append({"title": group.title, "description": group.description,
                            "actions": actions})
    return d


def describe(parser: argparse.ArgumentParser) -> dict:
    """``parser`` (the real ``qfv`` parser) written down as JSON-ready data."""
    return {"spec_version": SPEC_VERSION, "parser": _parser(parser)}


def _add(target, a: dict) -> None:
    default = argparse.SUPPRESS if a["default"] == argparse.SUPPRESS else a["default"]
    hidden = argparse.SUPPRESS if a["help"] == argparse.SUPPRESS else a["help"]
    kw: Dict[str, Any] = {"help": hidden, "default": default}
    if a["action"] is not None:
        kw["action"] = a["action"]
        if a["action"] == "version":
            kw = {"action": "version", "version": a["version"], "help": a["help"]}
        elif a["action"] == "help":
            kw = {"action": "help", "help": a["help"]}
    else:
        kw.update(nargs=a["nargs"], choices=a["choices"],
                  metavar=tuple(a["metavar"]) if isinstance(a["metavar"], list)
                  else a["metavar"])
    if a["option_strings"]:
        kw.update(dest=a["dest"])
        if a["action"] in (None, "store_const", "count", "store_true", "store_false") \
                and a["required"]:
            kw["required"] = True
        target.add_argument(*a["option_strings"], **kw)
    else:
        target.add_argument(a["dest"], **kw)


def _build(d: dict, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    xgroups = [parser.add_mutually_exclusive_group(required=r) for r in d["xgroups"]]
    titles = {g.title: g for g in parser._action_groups}
    for g in d["groups"]:
        group = titles.get(g["title"]) or parser.add_argument_group(g["title"], g["description"])
        for a in g["actions"]:
            if a["action"] == "help":
                continue  # every parser has its own -h
            if a["xgroup"] is not None:
                _add(xgroups[a["xgroup"]], a)
            else:
                _add(group, a)
    sub = d.get("subcommands")
    if sub is not None:
        s = parser.add_subparsers(dest=sub["dest"], required=sub["required"],
                                  metavar=sub["metavar"], help=sub["help"], title=sub["title"])
        for name, helptext in zip(sub["names"], sub["helps"]):
            child = d["commands"][name]
            kw = {} if helptext is None else {"help": helptext}
            p = s.add_parser(name, description=child["description"], epilog=child["epilog"],
                             prog=child["prog"], formatter_class=parser.formatter_class, **kw)
            _build(child, p)
    return parser


def help_parser(description: dict, parser_class=argparse.ArgumentParser,
                formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    """A parser that prints the help :func:`describe` wrote down (no types: it answers
    ``--help`` and usage errors only)."""
    d = description["parser"]

    class _Parser(parser_class):  # subparsers take the class of their parent
        pass

    root = _Parser(prog=d["prog"], description=d["description"], epilog=d["epilog"],
                   formatter_class=formatter_class)
    return _build(d, root)


def load_description(path: Path = HELP_FILE) -> Optional[dict]:
    """The stored description, or None when it is missing or of another layout (the caller
    then builds the real parser)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("spec_version") == SPEC_VERSION else None


def wants_help(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for help or the version only (``-h``, ``--help``, ``--version``
    before any ``--``), or is empty (the usage error of a missing command)."""
    if not argv:
        return True
    for token in argv:
        if token == "--":
            return False
        if token in ("-h", "--help", "--version"):
            return True
    return False
