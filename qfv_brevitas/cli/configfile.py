"""``qfv COMMAND --config FILE``: a command's options from a JSON or YAML file.

The file is a flat mapping of the command's own long options, spelled as on the command line
without the dashes, ``-`` or ``_`` alike::

    # train.yaml                       (qfv train --config train.yaml --seed 3)
    dataset: digits
    bits: [4, 3]
    variants: [nmult]
    float-epochs: 30
    per_channel: true

Each entry becomes the option it names, parsed by the command's own parser (same types, same
checks, same errors) and placed before the options typed on the command line, so those win.
A flag is ``true`` (given) or ``false`` (not given); a list is the option's values. Positional
arguments (``CHECKPOINT``) stay on the command line. An unknown key, a nested value, or a key
given twice (``float-epochs`` and ``float_epochs``) is an error naming the key and the file.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, List, Sequence

from qfv_brevitas.util.errors import QfvError

__all__ = ["expand_config", "config_tokens", "MAX_CONFIG_BYTES"]

#: the largest config file read (a config is a few dozen lines)
MAX_CONFIG_BYTES = 1 << 20


def _find(argv: Sequence[str]) -> List[int]:
    """Indexes of the ``--config`` tokens of ``argv`` (before any ``--``)."""
    found = []
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" or token.startswith("--config="):
            found.append(i)
    return found


def _read(path: str) -> Any:
    """The mapping in the JSON (``.json``) or YAML file ``path``, read within a size budget;
    YAML with the safe loader (no Python objects)."""
    from qfv_brevitas.util.budgets import read_regular

    data = read_regular(Path(path), path, MAX_CONFIG_BYTES, error=QfvError,
                        what="a config file").decode("utf-8", errors="replace")
    if Path(path).suffix.lower() == ".json":
        import json

        try:
            return json.loads(data)
        except ValueError as e:
            raise QfvError(f"--config {path}: not valid JSON: {e}") from None
    import yaml

    try:
        return yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise QfvError(f"--config {path}: not valid YAML: {e}") from None


def _scalar(value: Any, key: str, path: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise QfvError(f"--config {path}: {key}: expected a number or a string, got "
                       f"{value!r}")
    if not isinstance(value, (int, float, str)):
        raise QfvError(f"--config {path}: {key}: expected a number or a string, got "
                       f"{type(value).__name__}")
    return str(value)


def config_tokens(config: Any, parser: argparse.ArgumentParser, path: str) -> List[str]:
    """The command-line tokens of the mapping ``config`` for ``parser`` (a command's)."""
    if config is None:
        return []
    if not isinstance(config, dict):
        raise QfvError(f"--config {path}: expected a mapping of options (key: value), got "
                       f"{type(config).__name__}")
    options = parser._option_string_actions
    seen, tokens = {}, []
    for key, value in config.items():
        if not isinstance(key, str) or not key.strip():
            raise QfvError(f"--config {path}: option names are strings, got {key!r}")
        option = "--" + key.strip().lstrip("-").replace("_", "-")
        action = options.get(option)
        if action is None or option in ("--config", "--help", "--version") \
                or action.help == argparse.SUPPRESS and not hasattr(action, "new"):
            raise QfvError(f"--config {path}: {key!r} is not an option of {parser.prog} (see "
                           f"{parser.prog} --help)")
        if action.dest in seen:
            raise QfvError(f"--config {path}: {key!r} and {seen[action.dest]!r} are the same "
                           "option")
        seen[action.dest] = key
        if action.nargs == 0:  # a flag
            if not isinstance(value, bool):
                raise QfvError(f"--config {path}: {key} is a flag: true or false, got "
                               f"{value!r}")
            tokens += [option] if value else []
        elif isinstance(value, list):
            if action.nargs not in ("+", "*") and not isinstance(action.nargs, int):
                raise QfvError(f"--config {path}: {key} takes one value, got a list")
            tokens += [option, *(_scalar(v, key, path) for v in value)]
        else:
            tokens += [option, _scalar(value, key, path)]
    return tokens


def expand_config(argv: Sequence[str], words: int, parser: argparse.ArgumentParser
                  ) -> List[str]:
    """``argv`` with its ``--config FILE`` replaced by the file's options, placed right after
    the ``words`` command words (so that the options typed after them win); ``parser`` is the
    command's own parser."""
    argv = list(argv)
    found = _find(argv)
    if not found:
        return argv
    if len(found) > 1:
        raise QfvError("--config is given more than once; give one file")
    i = found[0]
    if argv[i] == "--config":
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            raise QfvError("--config needs a file (JSON or YAML)")
        path, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    else:
        path, rest = argv[i].split("=", 1)[1], argv[:i] + argv[i + 1:]
    if not path.strip() or "\0" in path:
        raise QfvError("--config: give the path of a JSON or YAML file")
    start = _after_words(rest, words)
    return rest[:start] + config_tokens(_read(path), parser, path) + rest[start:]


def _after_words(argv: Sequence[str], words: int) -> int:
    """The index just after the first ``words`` non-option tokens (the command words)."""
    seen = 0
    for i, token in enumerate(argv):
        if seen == words:
            return i
        if not token.startswith("-"):
            seen += 1
    return len(argv)
