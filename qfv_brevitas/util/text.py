"""Text from files made safe for a terminal.

A layer name, a metadata value or a file name comes from whoever wrote the file; printed raw,
an escape sequence in it (``ESC [ 2 J``, an OSC hyperlink, a C1 ``CSI``) drives the terminal,
and a bidi override (U+202E) makes the line read other than it is. :func:`printable` shows every
such character as its Python escape, as ``repr`` does, without the quotes.

>>> printable("net.0\\x1b[2Jweight\\u202e")
'net.0\\\\x1b[2Jweight\\\\u202e'
>>> printable("ordinary names, ÄÖÜ and 中文 stay")
'ordinary names, ÄÖÜ and 中文 stay'
"""
from __future__ import annotations

from typing import Any

__all__ = ["printable", "printable_lines"]


def _escape(ch: str) -> str:
    n = ord(ch)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def printable(text: Any) -> str:
    """``str(text)`` with every character that ``str.isprintable`` rejects (C0 and C1 controls,
    DEL, ESC, bidi and other format characters, line and paragraph separators, surrogates
    from undecodable file names, unassigned code points) written as its escape (``\\x1b``,
    ``\\u202e``). Backslashes stay as they are, so text that is already escaped (a ``repr``)
    is unchanged: ``printable(printable(s)) == printable(s)``."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in s)


def printable_lines(text: Any) -> str:
    """:func:`printable` of each line of ``text``, the line breaks kept (a table, a report)."""
    return "\n".join(printable(line) for line in str(text).split("\n"))
