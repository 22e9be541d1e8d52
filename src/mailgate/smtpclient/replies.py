"""Reading a server's reply for passing it on: its enhanced status code and its text,
cleaned so that nothing of it can garble our own reply, log line or DSN."""

from __future__ import annotations

import re
from typing import Final

from aiosmtplib import SMTPResponse

__all__ = ["split_reply"]

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
# What of a remote reply's text is passed on: printable ASCII, a few short lines.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_MAX_LINE_TEXT: Final = 200
_MAX_LINES: Final = 5


def split_reply(response: SMTPResponse) -> tuple[str | None, list[str]]:
    """The enhanced status code (from the first line) and the cleaned text lines."""
    status: str | None = None
    lines: list[str] = []
    for index, raw in enumerate(response.message.split("\n")):
        text = raw.strip()
        match = _ENHANCED.match(text)
        if match:
            if index == 0:
                status = ".".join(match.groups())
            text = text[match.end() :]
        text = _UNPRINTABLE.sub("?", text)[:_MAX_LINE_TEXT].strip()
        if text:
            lines.append(text)
    return status, lines[:_MAX_LINES]
