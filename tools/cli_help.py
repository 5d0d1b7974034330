"""Write (or check) ``qfv_brevitas/cli/help.json``, the description of the ``qfv`` parser that
``qfv --help`` prints from without importing torch (:mod:`qfv_brevitas.cli.helpspec`).

    python tools/cli_help.py          # rewrite it after changing an option
    python tools/cli_help.py --check  # exit 1 if it is stale (tests/cli/test_help.py does this)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qfv_brevitas.cli.app import build_parser  # noqa: E402
from qfv_brevitas.cli.helpspec import HELP_FILE, describe  # noqa: E402


def render() -> str:
    """The file's text: the description of the real parser, keys sorted, one per line."""
    return json.dumps(describe(build_parser()), indent=1, sort_keys=True) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = HELP_FILE.read_text(encoding="utf-8") if HELP_FILE.exists() else ""
        if current != text:
            print(f"{HELP_FILE} is stale: run python tools/cli_help.py", file=sys.stderr)
            return 1
        return 0
    HELP_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {HELP_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
