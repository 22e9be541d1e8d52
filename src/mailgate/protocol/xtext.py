"""xtext (RFC 3461 section 4): the encoding of ENVID, ORCPT, AUTH= and XCLIENT values."""

from __future__ import annotations

import re

_HEX = re.compile(r"\+([0-9A-F]{2})")
_XCHAR_OK = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]*")


class XtextError(ValueError):
    """The value is not valid xtext."""


def xtext_decode(value: str) -> str:
    """Decode ``+HH`` escapes; the decoded octets must be UTF-8 (ASCII in practice).

    Raises XtextError on characters xtext does not allow (space, ``=``, controls, a
    trailing newline) or on a ``+`` not followed by two upper-case hex digits."""
    plain = _HEX.sub("", value)
    if "+" in plain or not _XCHAR_OK.fullmatch(plain):
        raise XtextError(f"invalid xtext: {value!r}")
    if "+" not in value:
        return value
    raw = _HEX.sub(lambda m: chr(int(m.group(1), 16)), value).encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XtextError(f"xtext does not decode to UTF-8: {value!r}") from None


def xtext_encode(value: str) -> str:
    return "".join(
        c if ("!" <= c <= "~" and c not in "+=") else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )
