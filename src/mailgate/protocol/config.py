"""What a protocol connection may offer and enforce. Shared by all connections of a server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from .persona import DEFAULT_PERSONA, Persona, local_now


class BareNewline(Enum):
    """What to do with a bare CR or LF (one not part of CRLF) inside DATA.

    None of these ever lets a bare CR or LF end the data: only CRLF "." CRLF does.
    """

    #: Refuse (554 after the real end of data) a message in which a bare CR or LF is
    #: followed by "." -- the SMTP smuggling pattern. Other bare newlines pass through.
    REJECT = "reject"
    #: Refuse any message with a bare CR or LF anywhere (Postfix's strict setting).
    STRICT = "strict"
    #: Accept, and rewrite every bare LF as CRLF in the delivered message.
    NORMALIZE = "normalize"


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    hostname: str = "localhost"
    #: LMTP (RFC 2033): LHLO instead of HELO/EHLO and a reply per recipient after DATA.
    lmtp: bool = False

    # Limits. ``None`` or 0 for the size means unlimited.
    max_message_size: int | None = 25 * 1024 * 1024
    max_recipients: int = 100
    #: Command line including CRLF. RFC 5321 4.5.3.1.4 gives 512 as the minimum.
    max_command_line: int = 512
    #: A data line, CRLF excluded. RFC 5321 says 998; real mail (HTML) often breaks it.
    max_data_line: int | None = 1024 * 1024
    #: SASL response lines (RFC 4954 4 asks servers to accept at least 12288 octets).
    max_auth_line: int = 12288
    max_unknown_commands: int = 10
    max_bad_commands: int = 20
    max_auth_failures: int = 3
    bare_newline: BareNewline = BareNewline.REJECT

    # Extensions offered in EHLO.
    pipelining: bool = True
    eightbitmime: bool = True
    smtputf8: bool = True
    chunking: bool = True
    binarymime: bool = True
    dsn: bool = True
    enhanced_status_codes: bool = True
    requiretls: bool = True
    #: STARTTLS is offered only when the caller can do it (has a certificate).
    starttls: bool = False
    #: SASL mechanisms to offer, in order, upper case. Empty: no AUTH.
    auth_mechanisms: tuple[str, ...] = ()
    #: Offer AUTH only once the connection is encrypted.
    auth_requires_tls: bool = True
    #: Offer XCLIENT / XFORWARD to connections created with ``peer_trusted=True``.
    xclient: bool = False
    xforward: bool = False
    vrfy: bool = True
    expn: bool = True
    #: Verbs answered 502 as if not implemented (upper case).
    disabled_commands: frozenset[str] = field(default_factory=frozenset)
    #: The software name: ``{software}`` in the persona's banner and HELP texts.
    software: str = "mailgate"
    #: How replies, the banner, the EHLO greeting and HELP look (mailgate.protocol.persona).
    #: The default gives mailgate's own texts.
    persona: Persona = DEFAULT_PERSONA
    #: The current time, for the persona's ``{date}``: an aware datetime (default: now, in
    #: the local time zone). Tests inject a fixed one.
    clock: Callable[[], datetime] = local_now
