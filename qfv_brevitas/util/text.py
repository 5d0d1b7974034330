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

from typing import Any, Dict

__all__ = ["printable", "printable_lines", "text_table"]


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


def _cell(value: Any) -> str:
    """One table cell: a shape as ``64x32x3x3``, a float to 4 significant digits, None as -."""
    if value is None:
        return "-"
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def text_table(rows: Dict[str, Dict[str, Any]], first: str = "layer") -> str:
    """Rows of dicts (``{name: {column: value}}``, the columns of the first row) as an aligned
    plain-text table, numbers right-aligned; what ``qfv faults sample`` prints instead of
    dict reprs.

    >>> print(text_table({"fc1": {"shape": (8, 16), "stuck": 3, "fraction": 0.0058593}}))
    layer  shape  stuck  fraction
    fc1     8x16      3  0.005859
    """
    if not rows:
        return ""
    columns = list(next(iter(rows.values())))
    body = [[str(name)] + [_cell(r.get(c)) for c in columns] for name, r in rows.items()]
    header = [first] + columns
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(cells, numeric):
        return "  ".join(c.rjust(w) if numeric and i else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header, False)] + [line(b, True) for b in body])
