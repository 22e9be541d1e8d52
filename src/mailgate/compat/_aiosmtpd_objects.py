"""What aiosmtpd handlers see and say: its Session, Envelope and ProxyData attribute
names, its MISSING and LoginPassword, and its reply strings (:func:`parse_status`).

Re-exported by :mod:`mailgate.compat.aiosmtpd`; nothing here imports aiosmtpd unless it
is installed, and then only for the two names handlers compare with.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from mailgate.hooks import default_status
from mailgate.protocol import Reply

__all__ = [
    "MISSING",
    "Envelope",
    "LoginPassword",
    "ProxyData",
    "Session",
    "parse_status",
    "strip_own_received",
]


class _Missing(enum.Enum):
    MISSING = object()


class _LoginPassword(NamedTuple):
    login: bytes
    password: bytes


def _aiosmtpd_names() -> tuple[Any, Any]:
    """aiosmtpd's MISSING and LoginPassword, so that handlers comparing with them (``is
    MISSING``, ``isinstance(data, LoginPassword)``) see the real ones; look-alikes when
    aiosmtpd is not installed (a handler need not import it)."""
    try:
        from aiosmtpd.smtp import MISSING as missing
        from aiosmtpd.smtp import LoginPassword as login_password
    except ImportError:
        return _Missing.MISSING, _LoginPassword
    return missing, login_password


_NAMES = _aiosmtpd_names()
#: aiosmtpd's "hook not implemented / use the default" sentinel.
MISSING: Final[Any] = _NAMES[0]
#: The ``auth_data`` of the built-in PLAIN and LOGIN mechanisms: ``(login, password)`` bytes.
LoginPassword: Final[Any] = _NAMES[1]

_POSITIVE_STATUS: Final = {"mail": "2.1.0", "rcpt": "2.1.5", "auth": "2.7.0"}


class Session:
    """aiosmtpd's ``Session``: the attributes handlers read and set, per connection.
    A new one starts after STARTTLS, as in aiosmtpd."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.peer: tuple[str, int] | None = None
        #: TLS facts as a dict (``cipher``: (name, version, bits), ``version``,
        #: ``server_name``, ``peercert``: always None); None without TLS.
        self.ssl: dict[str, Any] | None = None
        self.host_name: str | None = None
        self.extended_smtp = False
        self.loop = loop
        self.proxy_data: ProxyData | None = None
        self.login_data: Any = None
        self.auth_data: Any = None
        self.authenticated: bool | None = None


class Envelope:
    """aiosmtpd's ``Envelope``: the transaction as the handler builds it."""

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.smtp_utf8 = False
        self.content: bytes | str | None = None
        self.original_content: bytes | None = None
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []


@dataclass(eq=False)
class ProxyData:
    """What ``handle_PROXY`` gets: aiosmtpd's ``ProxyData`` attribute names, filled from
    the addresses mailgate took from the PROXY header. ``version`` is None and ``rest``,
    ``whole_raw`` and ``tlv`` are empty: mailgate does not keep the raw header.
    ``family`` (1 INET, 2 INET6), ``protocol`` (1 STREAM) and ``command`` (1 PROXY)
    compare equal to aiosmtpd's ``AF``, ``PROTO`` and ``V2_CMD`` members."""

    src_addr: ipaddress.IPv4Address | ipaddress.IPv6Address | str
    dst_addr: ipaddress.IPv4Address | ipaddress.IPv6Address | str
    src_port: int | None
    dst_port: int | None
    family: int = 0
    protocol: int = 1
    command: int = 1
    version: int | None = None
    rest: bytes = b""
    whole_raw: bytearray = field(default_factory=bytearray)
    tlv_start: int | None = None
    error: str = ""
    tlv: None = None

    @property
    def valid(self) -> bool:
        return not self.error

    def __bool__(self) -> bool:
        return self.valid


@dataclass(frozen=True, slots=True)
class AuthCallbackResult:
    """What aiosmtpd's auth_callback path yields (its AuthResult, without importing it)."""

    success: bool
    handled: bool = True
    message: str | None = None
    auth_data: Any = None


# --- reply strings and content ---------------------------------------------------------------

_STATUS_LINE = re.compile(r"([245]\d\d)(?:[ -](.*))?", re.S)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: (.*))?", re.S)


def parse_status(status: str | bytes, stage: str | None = None) -> Reply | None:
    """An aiosmtpd status string (``"250 OK"``, ``"550 5.1.1 No such user"``, several
    lines joined with CRLF or LF) as a :class:`Reply`, or None if it is not one: each
    line a 2xx/4xx/5xx code, the same on every line. A missing enhanced status code is
    filled in for ``stage`` (RFC 2034 asks for one on every line once advertised)."""
    if isinstance(status, bytes):
        try:
            status = status.decode("utf-8")
        except UnicodeDecodeError:
            return None
    lines = status.rstrip("\r\n").replace("\r\n", "\n").split("\n")
    code: int | None = None
    enhanced: str | None = None
    texts: list[str] = []
    for line in lines:
        match = _STATUS_LINE.fullmatch(line)
        if match is None or "\r" in line:
            return None
        if code is None:
            code = int(match[1])
        elif int(match[1]) != code:
            return None
        text = match[2] or ""
        detail = _ENHANCED.fullmatch(text)
        if detail is not None and detail[1] == match[1][0]:
            enhanced = enhanced or f"{detail[1]}.{detail[2]}.{detail[3]}"
            text = detail[4] or ""
        texts.append(text)
    assert code is not None
    if enhanced is None:
        enhanced = (
            _POSITIVE_STATUS.get(stage or "", "2.0.0")
            if code < 300
            else default_status(stage, code)
        )
    return Reply(code, enhanced, tuple(texts))


def strip_own_received(data: bytes, message_id: str) -> bytes:
    """``data`` without the ``Received:`` header mailgate put at its top for message
    ``message_id``; unchanged when the first header is anything else."""
    if not data.startswith(b"Received:"):
        return data
    end = data.find(b"\r\n")
    while end != -1 and data[end + 2 : end + 3] in (b" ", b"\t"):
        end = data.find(b"\r\n", end + 2)
    if end == -1:
        return data
    header = data[:end]
    own = re.search(
        rb"\sid " + re.escape(message_id.encode("ascii", "replace")) + rb"[\s;]", header + b";"
    )
    if b"(mailgate)" in header and own is not None:
        return data[end + 2 :]
    return data
