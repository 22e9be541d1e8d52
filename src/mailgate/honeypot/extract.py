"""What a honeypot keeps from a message besides its bytes: subject, URLs, attachments.

Parsing is the stdlib ``email`` package (``policy=default``) over at most the first
``max_parse_bytes`` of the message (the caller cuts it), with bounded output: at most
``max_urls`` distinct URLs (in order of appearance) and ``max_attachments`` attachments
from at most ``max_parts`` MIME parts. Malformed messages give what could be read; this
module never raises on message content.

URLs come from every ``text/plain`` and ``text/html`` part (attachments included), after
the transfer encoding (base64, quoted-printable) and charset are undone; in HTML, after
character references (``&amp;``, ``&#104;``) are resolved, so ``href`` values and
obfuscated links are found as a browser would see them. A URL is ``http://``,
``https://`` or ``ftp://`` (any case) or a bare ``www.`` name, up to the first space,
quote or angle bracket, without trailing punctuation.

An attachment is a non-multipart part that has a file name or an ``attachment``
disposition, or whose type is not ``text/*`` (images, archives, executables); its size
and SHA-256 are of the decoded content. An attached message (``message/rfc822``) is
listed itself (size and hash of its serialised form) and its own parts are searched too.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import logging
import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import Final

log = logging.getLogger("mailgate.honeypot.extract")

__all__ = [
    "MAX_ATTACHMENTS",
    "MAX_PARTS",
    "MAX_URLS",
    "Attachment",
    "Extracted",
    "extract",
    "find_urls",
]

MAX_URLS: Final = 100
MAX_ATTACHMENTS: Final = 100
MAX_PARTS: Final = 1000
#: Longer URLs are cut to this many characters.
MAX_URL_LENGTH: Final = 2048

_URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"'`{}|\\^\[\]]+", re.IGNORECASE)
_TRAILING = ".,;:!?'\")]}>*"


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str | None
    content_type: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Extracted:
    subject: str | None
    urls: tuple[str, ...]
    attachments: tuple[Attachment, ...]


def find_urls(text: str, *, html_text: bool = False) -> list[str]:
    """The URLs in ``text`` in order, duplicates included; ``html_text``: resolve
    character references first."""
    if html_text:
        text = html.unescape(text)
    found = []
    for match in _URL.finditer(text):
        url = _trim(match.group(0))
        if len(url) > 4 and not url.lower().endswith("://"):
            found.append(url[:MAX_URL_LENGTH])
    return found


def _trim(url: str) -> str:
    while url and url[-1] in _TRAILING:
        if url[-1] == ")" and url.count("(") >= url.count(")"):
            break  # part of the URL, as in Wikipedia links
        url = url[:-1]
    return url


def extract(
    data: bytes,
    *,
    max_urls: int = MAX_URLS,
    max_attachments: int = MAX_ATTACHMENTS,
    max_parts: int = MAX_PARTS,
) -> Extracted:
    """Subject, URLs and attachments of the message ``data`` (see the module docstring)."""
    try:
        msg = BytesParser(policy=policy.default).parsebytes(data)
    except Exception:  # pragma: no cover - the parser is lenient; be safe anyway
        log.debug("message could not be parsed", exc_info=True)
        return Extracted(None, (), ())
    subject = _subject(msg)
    urls: dict[str, None] = {}
    attachments: list[Attachment] = []
    try:
        for count, part in enumerate(msg.walk()):
            if count >= max_parts:
                break
            _visit(part, urls, attachments, max_urls, max_attachments)
    except Exception:  # RecursionError on absurd nesting, a header the parser chokes on
        log.debug("message parts could not all be read", exc_info=True)
    return Extracted(subject, tuple(urls), tuple(attachments))


def _subject(msg: Message) -> str | None:
    try:
        value = msg["Subject"]
    except Exception:
        return None
    return None if value is None else str(value)[:1000]


def _visit(
    part: Message,
    urls: dict[str, None],
    attachments: list[Attachment],
    max_urls: int,
    max_attachments: int,
) -> None:
    content_type = part.get_content_type()
    maintype = part.get_content_maintype()
    if maintype == "multipart":
        return
    filename = _filename(part)
    disposition = part.get_content_disposition()
    if content_type in ("text/plain", "text/html") and len(urls) < max_urls:
        text = _text(part)
        if text:
            for url in find_urls(text, html_text=content_type == "text/html"):
                if len(urls) >= max_urls:
                    break
                urls.setdefault(url, None)
    is_attachment = filename is not None or disposition == "attachment" or maintype != "text"
    if is_attachment and len(attachments) < max_attachments:
        content = _content(part)
        if content is not None:
            attachments.append(
                Attachment(
                    filename=filename,
                    content_type=content_type,
                    size=len(content),
                    sha256=hashlib.sha256(content).hexdigest(),
                )
            )


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        return None
    return None if name is None else str(name)[:1000]


def _text(part: Message) -> str:
    """A text part's content as text: transfer encoding and charset undone (an unknown
    charset read as UTF-8 with replacement characters)."""
    if isinstance(part, EmailMessage):
        with contextlib.suppress(Exception):
            content = part.get_content()
            if isinstance(content, str):
                return content
    payload = _content(part)
    return payload.decode("utf-8", "replace") if payload is not None else ""


def _content(part: Message) -> bytes | None:
    """The decoded bytes of a leaf part; an attached message serialised."""
    try:
        if part.get_content_type() == "message/rfc822" or part.is_multipart():
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return bytes(inner[0].as_bytes(policy=policy.default))
            return None
        payload = part.get_payload(decode=True)
    except Exception:
        return None
    return payload if isinstance(payload, bytes) else None
