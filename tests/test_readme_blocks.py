"""README's "Use it" runs as written: its Python code blocks, executed in order in one
namespace (as a reader pastes them into one session), must not raise.

A block preceded by ``<!-- not run: why -->`` is skipped (each is listed in ``NOT_RUN``, so a
new one is a decision made here, not a silent gap); one preceded by ``<!-- needs: module -->``
runs when ``module`` imports (an extra) and is skipped otherwise."""
import importlib.util
import re
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it"
#: blocks of the section deliberately not run: first line of the block -> why
NOT_RUN = {}
#: the section's Python blocks (a parser that finds fewer would make the test vacuous)
BLOCKS = 7

MARK = re.compile(r"<!--\s*(not run|needs)\s*:\s*(.*?)\s*-->")


class Block(NamedTuple):
    line: int  # of the opening fence, 1-based
    code: str
    mark: Optional[str]  # "not run" or "needs"
    arg: str


def section(text: str, heading: str) -> List[str]:
    """The lines from ``heading`` to the next heading of its level (or the end)."""
    lines = text.splitlines()
    start = lines.index(heading)
    level = heading.split()[0]
    for end in range(start + 1, len(lines)):
        if lines[end].split(" ")[0] == level:
            return lines[start:end]
    return lines[start:]


def python_blocks(text: str, heading: str = SECTION) -> List[Block]:
    lines = section(text, heading)
    offset = text.splitlines().index(heading)
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            j = next(k for k in range(i + 1, len(lines)) if lines[k].strip() == "```")
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = MARK.fullmatch(prev.strip())
            blocks.append(Block(offset + i + 1, "\n".join(lines[i + 1:j]),
                                m.group(1) if m else None, m.group(2) if m else ""))
            i = j
        i += 1
    return blocks


def run_blocks(blocks: List[Block], path: str = "README.md") -> List[str]:
    """Execute ``blocks`` in one namespace; returns what was skipped and why. A block that
    raises fails with its line in the file."""
    ns = {"__name__": "__readme__"}
    skipped = []
    for b in blocks:
        if b.mark == "not run":
            skipped.append(f"line {b.line}: not run ({b.arg})")
            continue
        if b.mark == "needs" and importlib.util.find_spec(b.arg) is None:
            skipped.append(f"line {b.line}: needs {b.arg}, not installed")
            continue
        try:
            exec(compile(b.code, f"{path}:{b.line}", "exec"), ns)
        except Exception as e:
            raise AssertionError(f"{path}, the block at line {b.line} raised "
                                 f"{type(e).__name__}: {e}") from e
    return skipped


@pytest.mark.slow  # ~10 s: quantizes a ResNet-18 and trains it for a few steps
def test_use_it_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays out of the repository
    blocks = python_blocks(README.read_text())
    assert len(blocks) == BLOCKS, [b.line for b in blocks]
    not_run = {b.code.splitlines()[0]: b.arg for b in blocks if b.mark == "not run"}
    assert not_run == NOT_RUN
    skipped = run_blocks(blocks)
    print("\n".join(skipped))


def test_a_block_that_raises_fails_the_check_and_marks_are_honoured():
    text = ("## Use it\n\n```python\nx = 1\n```\n\n<!-- not run: needs a chip -->\n"
            "```python\nraise RuntimeError('skipped')\n```\n\n<!-- needs: no_such_module_qfv -->\n"
            "```python\nraise RuntimeError('skipped too')\n```\n\n"
            "```python\nassert x == 1\ny = 1 / 0\n```\n\n## Next\n\n```python\nraise SystemExit\n```\n")
    blocks = python_blocks(text)
    assert [(b.line, b.mark) for b in blocks] == [(3, None), (8, "not run"), (13, "needs"),
                                                  (17, None)]
    with pytest.raises(AssertionError, match="line 17 raised ZeroDivisionError"):
        run_blocks(blocks)
    assert run_blocks(blocks[:3]) == ["line 8: not run (needs a chip)",
                                      "line 13: needs no_such_module_qfv, not installed"]
