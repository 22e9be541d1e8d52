"""Attacker-supplied text made safe to show: control characters and the Unicode
characters that reorder text, escaped.

A honeypot stores what clients send as they sent it; what it writes for people and for
other programs (reports, the JSON lines mirror) must not carry characters a terminal, a
spreadsheet or a log viewer would act on: C0 and C1 controls (ESC starts terminal
sequences, BEL rings), DEL, and the bidirectional formatting characters (U+202E makes
``exe.txt`` look like ``txt.exe``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

__all__ = ["UNSAFE", "escape_controls", "json_text"]

#: C0 controls, DEL, C1 controls, the Arabic letter mark, LRM and RLM, the line and
#: paragraph separators, the bidi embeddings, overrides and isolates.
UNSAFE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


#: The unsafe characters json.dumps leaves raw.
_RAW_IN_JSON: Final = re.compile(
    "[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def _visible(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match[0]):04x}"


def escape_controls(text: str) -> str:
    """``text`` with every unsafe character as a visible ``\\xNN`` or ``\\uNNNN``."""
    return UNSAFE.sub(_visible, text)


def json_text(value: Any, **options: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, **options)`` with every unsafe character
    written as a ``\\uNNNN`` escape, also those JSON allows raw (DEL, C1, bidi): the text
    decodes to the same value. (``json.dumps`` escapes the C0 controls in strings itself;
    outside strings there are none of the others, so replacing them in the output only
    touches strings, and the newlines of ``indent`` stay.)"""
    return _RAW_IN_JSON.sub(_json_escape, json.dumps(value, ensure_ascii=False, **options))
