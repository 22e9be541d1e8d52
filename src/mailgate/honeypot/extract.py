"""What a honeypot keeps from a message besides its bytes: subject, URLs, attachments.

Parsing is the stdlib ``email`` package (``policy=default``) over at most the first
``max_parse_bytes`` of the message (the caller cuts it), with bounded work and output: at
most ``max_parts`` MIME parts nested at most ``max_depth`` levels are parsed, within a
``budget`` of CPU seconds; at most ``max_urls`` distinct URLs (in order of appearance) and
``max_attachments`` attachments are kept. When a limit stops the analysis, what it found
until then is kept (the subject, the URLs and attachments of the parts before the limit)
and ``Extracted.truncated`` names the limit. Malformed messages give what could be read;
this module never raises on message content.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import policy
from email.feedparser import BytesFeedParser
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.policy import Policy
from typing import Final

log = logging.getLogger("mailgate.honeypot.extract")

__all__ = [
    "LIMIT_BUDGET",
    "LIMIT_DEPTH",
    "LIMIT_ERROR",
    "LIMIT_PARTS",
    "MAX_ATTACHMENTS",
    "MAX_DEPTH",
    "MAX_PARTS",
    "MAX_URLS",
    "Attachment",
    "Extracted",
    "extract",
    "extract_subject",
    "find_urls",
]

MAX_URLS: Final = 100
MAX_ATTACHMENTS: Final = 100
MAX_PARTS: Final = 1000
#: Nesting levels of multipart parts and attached messages analysed (the top level is 1).
MAX_DEPTH: Final = 50
#: Why an analysis stopped early (Extracted.truncated).
LIMIT_PARTS: Final = "parts"
LIMIT_DEPTH: Final = "depth"
LIMIT_BUDGET: Final = "budget"
LIMIT_ERROR: Final = "error"
#: Bytes given to the parser at a time (the budget is checked in between, and at each part).
_FEED_CHUNK: Final = 64 * 1024
_POLICY: Final = policy.default
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
    #: None: the whole message was analysed; otherwise the limit that stopped the
    #: analysis early (what it found until then is above): ``LIMIT_PARTS``,
    #: ``LIMIT_DEPTH``, ``LIMIT_BUDGET``, ``LIMIT_ERROR``.
    truncated: str | None = None


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
    max_depth: int = MAX_DEPTH,
    budget: float | None = None,
    clock: Callable[[], float] = time.thread_time,
) -> Extracted:
    """Subject, URLs and attachments of the message ``data`` (see the module docstring).

    ``budget``: seconds of ``clock`` (by default the CPU time of the calling thread) the
    analysis may take; None for no limit. What was found when a limit stopped it is
    returned with ``truncated`` saying which limit."""
    deadline = parse_deadline = None
    if budget is not None:
        # Parsing gets half the budget, so that the parts it made can still be looked at.
        start = clock()
        deadline = start + max(0.0, budget)
        parse_deadline = start + max(0.0, budget) / 2
    root, truncated = _parse(data, max_parts, max_depth, parse_deadline, clock)
    if root is None:
        return Extracted(None, (), (), truncated)
    subject = _subject(root)
    urls: dict[str, None] = {}
    attachments: list[Attachment] = []
    try:
        for count, part in enumerate(_walk(root, max_depth)):
            if count >= max_parts:
                truncated = truncated or LIMIT_PARTS
                break
            if deadline is not None and clock() > deadline:
                truncated = truncated or LIMIT_BUDGET
                break
            _visit(part, urls, attachments, max_urls, max_attachments)
    except Exception:  # a header the parser chokes on: keep what was found
        log.debug("message parts could not all be read", exc_info=True)
        truncated = truncated or LIMIT_ERROR
    return Extracted(subject, tuple(urls), tuple(attachments), truncated)


def extract_subject(data: bytes) -> str | None:
    """Only the Subject of the message ``data``: its header section is parsed, nothing
    else (for when there is no time to analyse the message)."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    header = data[: min(ends)] if ends else data
    try:
        msg = BytesHeaderParser(policy=policy.default).parsebytes(header)
    except Exception:  # pragma: no cover - the parser is lenient; be safe anyway
        return None
    return _subject(msg)


class _Stop(Exception):
    """Raised inside the parser to stop it; ``reason`` is the limit reached."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _parse(
    data: bytes,
    max_parts: int,
    max_depth: int,
    deadline: float | None,
    clock: Callable[[], float],
) -> tuple[Message | None, str | None]:
    """The message tree the parser built, and why it stopped early (None: it did not).

    The stdlib parser makes every part through its message factory, attaching it to the
    part it is nested in; the factory below counts parts and watches the nesting depth and
    the clock, and stops the parser by raising. Everything made until then stays in the
    tree under the first message (the top level, whose header section is complete by the
    time its first part is made), so the subject and what the parts before the limit hold
    are still found. The depth is the parser's stack of open parts: the parser recurses
    once per level, so past about 970 levels Python's recursion limit would end it and
    lose everything."""
    parts: list[Message] = []
    parser: BytesFeedParser | None = None

    def factory(*, policy: Policy = _POLICY) -> Message:
        if parser is not None:  # the parser's constructor calls it once to try it out
            if len(parts) >= max_parts:
                raise _Stop(LIMIT_PARTS)
            if len(getattr(parser, "_msgstack", ())) >= max_depth:
                raise _Stop(LIMIT_DEPTH)
            if deadline is not None and clock() > deadline:
                raise _Stop(LIMIT_BUDGET)
        message = EmailMessage(policy=policy)
        if parser is not None:
            parts.append(message)
        return message

    parser = BytesFeedParser(factory, policy=_POLICY)
    truncated: str | None = None
    try:
        view = memoryview(data)
        for start in range(0, len(data), _FEED_CHUNK):
            parser.feed(bytes(view[start : start + _FEED_CHUNK]))
            if deadline is not None and clock() > deadline:
                truncated = LIMIT_BUDGET
                break
        else:
            parser.close()
    except _Stop as stop:
        truncated = stop.reason
    except RecursionError:  # pragma: no cover - the depth limit comes first
        truncated = LIMIT_DEPTH
    except Exception:  # pragma: no cover - the parser is lenient; be safe anyway
        log.debug("message could not be parsed", exc_info=True)
        truncated = LIMIT_ERROR
    return (parts[0] if parts else None), truncated


def _walk(root: Message, max_depth: int) -> Iterator[Message]:
    """The parts of ``root`` in the order of ``Message.walk()``, without its recursion,
    down to ``max_depth`` levels."""
    stack: list[tuple[Message, int]] = [(root, 1)]
    while stack:
        part, depth = stack.pop()
        yield part
        if depth < max_depth and part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(
                    (sub, depth + 1) for sub in reversed(payload) if isinstance(sub, Message)
                )


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
