"""The syntax of an ``Authentication-Results:`` header field (RFC 8601 2.2): property
values, comments, one method's result ("resinfo"), and the authserv-id of a field."""

from __future__ import annotations

import re
from collections.abc import Sequence

_TSPECIALS = set('()<>@,;:\\"/[]?=')


def property_value(text: str) -> str:
    """A property value: a token when it is one, else a quoted-string."""
    if (
        text
        and text.isascii()
        and all(c.isprintable() and c != " " and c not in _TSPECIALS for c in text)
    ):
        return text
    cleaned = "".join(c for c in text if c.isprintable())
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment_text(text: str, limit: int = 120) -> str:
    """A comment without parentheses, escapes, semicolons (for naive parsers that split
    on them) or line breaks."""
    cleaned = "".join(c if c.isprintable() and c not in "()\\" else " " for c in text)
    cleaned = " ".join(cleaned.replace(";", ",").split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned


def resinfo_text(method: str, result: str, comment: str, props: Sequence[tuple[str, str]]) -> str:
    """One method's result: ``method=result (comment) name=value ...`` (empty values left
    out)."""
    out = f"{method}={result}"
    comment = comment_text(comment)
    if comment:
        out += f" ({comment})"
    for name, text in props:
        if text:
            out += f" {name}={property_value(text)}"
    return out


def authserv_of(value: bytes) -> str:
    """The authserv-id (lower case) of an Authentication-Results field value."""
    text = value.replace(b"\r", b"").replace(b"\n", b"").decode("utf-8", "replace")
    text = re.sub(r"\([^()]*\)", " ", text)  # comments (not nested: enough for this)
    return text.split(";", 1)[0].strip().strip('"').split(" ")[0].lower()


__all__ = ["authserv_of", "comment_text", "property_value", "resinfo_text"]
