"""``qfv_brevitas.util.text``: text from files escaped before it reaches a terminal."""
from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qfv_brevitas.util.text import printable, printable_lines

#: one of each kind of character a terminal acts on, and how it must be shown
HOSTILE = {
    "\x1b": "\\x1b",          # ESC: starts CSI / OSC sequences
    "\x07": "\\x07",          # BEL: ends an OSC hyperlink or title
    "\x00": "\\x00",
    "\r": "\\x0d",            # carriage return: overwrites the line
    "\n": "\\x0a",            # a new line inside one name
    "\t": "\\x09",
    "\x7f": "\\x7f",          # DEL
    "\x9b": "\\x9b",          # C1 CSI: ESC [ in one byte
    "\x85": "\\x85",          # C1 NEL
    "\u202e": "\\u202e",      # RIGHT-TO-LEFT OVERRIDE
    "\u2066": "\\u2066",      # LEFT-TO-RIGHT ISOLATE
    "\u200f": "\\u200f",      # RIGHT-TO-LEFT MARK
    "\u200b": "\\u200b",      # ZERO WIDTH SPACE (a format character)
    "\u2028": "\\u2028",      # LINE SEPARATOR
    "\udcff": "\\udcff",      # a surrogate: an undecodable byte of a file name
    "\U000e0041": "\\U000e0041",  # TAG LATIN CAPITAL LETTER A (invisible)
}


@pytest.mark.parametrize("ch", list(HOSTILE), ids=[f"U+{ord(c):04X}" for c in HOSTILE])
def test_every_kind_of_control_is_shown_as_its_escape(ch):
    assert printable(f"net.{ch}3") == f"net.{HOSTILE[ch]}3"


def test_a_whole_escape_sequence_is_inert_and_ordinary_text_stays():
    hostile = "layer\x1b]8;;http://evil\x07click\x1b]8;;\x07\x1b[2J\u202egpj.exe"
    out = printable(hostile)
    assert out == ("layer\\x1b]8;;http://evil\\x07click\\x1b]8;;\\x07\\x1b[2J\\u202egpj.exe")
    assert out.isprintable() and out.isascii()
    for plain in ("net.3.weight", "Äpfel/中文/émoji 🙂", "a\\x1b stays as typed", ""):
        assert printable(plain) == plain


def test_lines_keep_their_breaks_and_lose_everything_else():
    table = "layer  bits\nnet.0\x1b[31m  4\r\nnet.1\u202e  3"
    assert printable_lines(table) == "layer  bits\nnet.0\\x1b[31m  4\\x0d\nnet.1\\u202e  3"
    assert printable_lines(12) == "12"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF)))
def test_any_text_comes_out_printable_and_escaping_twice_changes_nothing(s):
    out = printable(s)
    assert out.isprintable()
    assert printable(out) == out
    if s.isprintable():
        assert out == s  # ordinary text is never touched
    # every character kept or replaced by its own escape: nothing dropped, nothing merged
    assert out == "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100
                          else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                          for c in s)
    assert all(unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in out)
