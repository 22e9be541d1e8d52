"""Events the protocol hands to its caller.

Two kinds:

* **Policy points** (subclasses of :class:`PolicyPoint`): the connection stops producing
  events until the caller answers with :meth:`ServerConnection.respond`. Passing ``None``
  gives the default success reply for that point; passing a :class:`Reply` overrides it
  (a 4xx/5xx rejects). This is what keeps replies in order under pipelining.
* **Notifications**: facts the caller may act on (store a chunk of data, log, close the
  socket). They need no answer.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from .address import Address
from .replies import Reply


class Event:
    """Base class of everything :meth:`ServerConnection.next_event` returns."""

    __slots__ = ()


class PolicyPoint(Event):
    """An event that needs :meth:`ServerConnection.respond` before the session goes on."""

    __slots__ = ()


class _Sentinel(Event):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: No complete event in the buffer: feed more bytes with ``receive_data``.
NEED_DATA: Final = _Sentinel("NEED_DATA")
#: A policy point is waiting for ``respond``; nothing else will come out until then.
PAUSED: Final = _Sentinel("PAUSED")


# --- policy points -------------------------------------------------------------------
#
# The events made for every message have an ``__init__`` of their own, the one dataclass
# would write: in the optional compiled build (setup.py) mypyc compiles it, while the
# methods dataclass generates stay interpreted -- a generated __init__ of a frozen
# dataclass cost about ten times a compiled one there. tests/protocol/test_events_init.py
# checks that each keeps the fields' names, order and defaults.


@dataclass(frozen=True, slots=True)
class Greeting(PolicyPoint):
    """Start of the session; answer with the banner (``None``: 220 ``<hostname> ESMTP``).

    A 554 answer refuses the session (RFC 5321 3.1): only QUIT is served afterwards.
    """


@dataclass(frozen=True, slots=True)
class Hello(PolicyPoint):
    """HELO, EHLO or LHLO. ``None`` answers with the greeting line (and for EHLO/LHLO
    the capability list the connection computes from its config and state)."""

    verb: str  # "HELO", "EHLO" or "LHLO"
    domain: str

    def __init__(self, verb: str, domain: str) -> None:
        object.__setattr__(self, "verb", verb)
        object.__setattr__(self, "domain", domain)


@dataclass(frozen=True, slots=True)
class MailFrom(PolicyPoint):
    """MAIL FROM. ``address`` is ``None`` for the null reverse-path ``<>``. ``written``:
    the path as the client wrote it (``<a@b>``, or a bare ``a@b`` a lenient persona took;
    not made safe for a reply: see persona.echo)."""

    address: Address | None
    params: dict[str, str | None]
    written: str = ""

    def __init__(
        self, address: Address | None, params: dict[str, str | None], written: str = ""
    ) -> None:
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "written", written)


@dataclass(frozen=True, slots=True)
class RcptTo(PolicyPoint):
    """RCPT TO. ``written`` as for :class:`MailFrom`."""

    address: Address
    params: dict[str, str | None]
    written: str = ""

    def __init__(self, address: Address, params: dict[str, str | None], written: str = "") -> None:
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "written", written)


@dataclass(frozen=True, slots=True)
class DataStart(PolicyPoint):
    """DATA, or the first BDAT of a transaction. ``None`` answers 354 for DATA and
    lets the chunk in for BDAT. A rejection with BDAT still consumes the chunk."""

    bdat: bool

    def __init__(self, bdat: bool) -> None:
        object.__setattr__(self, "bdat", bdat)


@dataclass(frozen=True, slots=True)
class DataComplete(PolicyPoint):
    """End of message data, valid and within limits. Make the message durable, then
    respond: one reply for SMTP; for LMTP a sequence with one reply per accepted
    recipient, in the order they were accepted (RFC 2033 4.2)."""

    size: int
    recipients: tuple[Address, ...]

    def __init__(self, size: int, recipients: tuple[Address, ...]) -> None:
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "recipients", recipients)


@dataclass(frozen=True, slots=True)
class AuthCredentials(PolicyPoint):
    """A SASL exchange finished; check the credentials and respond
    (``None``: 235 success; a 535 or other reply: failure)."""

    mechanism: str
    authzid: str | None
    username: str
    password: str | None = None
    # CRAM-MD5: the challenge sent and the hex digest received; see sasl.CramMD5.
    challenge: bytes | None = None
    digest: str | None = None
    # XOAUTH2: the bearer token.
    token: str | None = None

    def verify_cram_md5(self, secret: str) -> bool:
        if self.challenge is None or self.digest is None:
            return False
        return cram_md5_matches(self.challenge, self.digest, secret)


def cram_md5_matches(challenge: bytes, digest_hex: str, secret: str) -> bool:
    """Whether ``digest_hex`` is HMAC-MD5(secret, challenge), in constant time."""
    # compare_digest refuses non-ASCII str; such a digest can never match anyway. Checked
    # before lower() because a few non-ASCII letters (KELVIN SIGN) lower to ASCII.
    if not digest_hex.isascii():
        return False
    candidate = digest_hex.lower()
    expected = hmac.new(secret.encode("utf-8"), challenge, hashlib.md5).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), candidate.encode("ascii"))


@dataclass(frozen=True, slots=True)
class StartTLS(PolicyPoint):
    """STARTTLS. ``None`` answers 220 and the connection enters the TLS-pending state:
    the caller must start TLS, then call :meth:`ServerConnection.tls_established`."""


@dataclass(frozen=True, slots=True)
class Verify(PolicyPoint):
    """VRFY (``expand=False``) or EXPN (``expand=True``). ``None`` gives the defaults:
    252 for VRFY, 502 for EXPN."""

    argument: str
    expand: bool = False


@dataclass(frozen=True, slots=True)
class Xclient(PolicyPoint):
    """XCLIENT (Postfix). Decoded attributes, upper-case names. ``None`` accepts: the
    session restarts with a 220 greeting and the client must say EHLO again. Decide
    whether the peer may use it (trusted networks) in the answer."""

    attributes: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class Xforward(PolicyPoint):
    """XFORWARD (Postfix). ``None`` accepts with 250; attributes apply to the next
    transaction (the caller keeps them)."""

    attributes: dict[str, str | None]


# --- notifications -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataChunk(Event):
    """Message bytes, already dot-unstuffed (DATA) or assembled (BDAT), in order."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        object.__setattr__(self, "data", data)


class DiscardReason(Enum):
    TOO_BIG = "too-big"
    BARE_NEWLINE = "bare-newline"
    LINE_TOO_LONG = "line-too-long"
    REJECTED = "rejected"  # a BDAT chunk of a transaction that was refused


@dataclass(frozen=True, slots=True)
class DataDiscarded(Event):
    """Message data ended but the message was refused by the protocol's own rules; the
    reply is already queued. Throw away whatever was spooled for it."""

    reason: DiscardReason
    reply: Reply


@dataclass(frozen=True, slots=True)
class TransactionReset(Event):
    """The mail transaction was abandoned (RSET, HELO/EHLO, STARTTLS, XCLIENT, ...)
    while the caller may hold state for it (spool files, recipients)."""


@dataclass(frozen=True, slots=True)
class CommandRejected(Event):
    """A command was answered by the protocol itself with an error (500/501/503/555...).
    For logging, honeypots and error counting in the caller."""

    line: bytes
    reply: Reply


class Limit(Enum):
    COMMAND_LINE_LENGTH = "command-line-length"
    UNKNOWN_COMMANDS = "unknown-commands"
    BAD_COMMANDS = "bad-commands"
    RECIPIENTS = "recipients"
    AUTH_FAILURES = "auth-failures"
    #: The persona's error_limit: every error reply counted together.
    ERRORS = "errors"


@dataclass(frozen=True, slots=True)
class LimitExceeded(Event):
    """A limit was hit. ``closing`` tells whether the protocol queued a 421 and closed."""

    limit: Limit
    closing: bool


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The session is over (QUIT answered, a 421 sent, or the peer closed). Send what
    ``data_to_send`` still holds, then close the socket."""

    reason: str = field(default="quit")
