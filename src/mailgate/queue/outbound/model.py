"""What the engine is asked to do and what it answers: plain frozen values.

A :class:`DeliveryRequest` is one message to one destination for many recipients; the
answer is a :class:`DeliveryResult` with one :class:`RecipientResult` per recipient, in
the request's order, each delivered, deferred or failed, with what a queue needs to record
the attempt and build a DSN (RFC 3464: Status, Remote-MTA, Diagnostic-Code).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mailgate.smtpclient.target import SmartHost, display_host, parse_url, redact

from .tlspolicy import TLS_LEVELS, TLSLevel, VerifyMethod


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    #: Try again later (4xx, no connection, DNS trouble, suspended destination).
    DEFERRED = "deferred"
    #: Permanent (5xx, null MX, no such domain): bounce.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Recipient:
    """One envelope recipient with its DSN parameters as mailgate's parser keeps them
    (decoded): ``notify`` like ``"SUCCESS,FAILURE"`` or ``"NEVER"``, ``orcpt`` like
    ``"rfc822;bob@example.org"``. They are passed on when the next server offers DSN."""

    address: str
    orcpt: str | None = None
    notify: str | None = None

    def __post_init__(self) -> None:
        check_address(self.address, "recipient")
        if self.notify is not None:
            items = self.notify.upper().split(",")
            if items != ["NEVER"] and not (
                items and len(set(items)) == len(items) and set(items) <= _NOTIFY
            ):
                raise ValueError(f"NOTIFY {self.notify!r} is not NEVER or SUCCESS,FAILURE,DELAY")
        if self.orcpt is not None:
            addr_type, sep, address = self.orcpt.partition(";")
            if not (sep and addr_type and address) or _CONTROL.search(self.orcpt):
                raise ValueError(f"ORCPT {self.orcpt!r} is not TYPE;ADDRESS")


@dataclass(frozen=True, slots=True)
class Relay:
    """Deliver to the MX hosts of ``domain`` (a name, or an address literal ``[192.0.2.1]``).
    ``tls``: the TLS policy level a route gave (None: the domain's or the default)."""

    domain: str
    tls: TLSLevel | None = None

    def __post_init__(self) -> None:
        name = self.domain.strip().rstrip(".")
        if not name or _CONTROL.search(name) or any(c.isspace() for c in name):
            raise ValueError(f"relay domain {self.domain!r} is not a domain")
        if self.tls is not None and self.tls not in TLS_LEVELS:
            raise ValueError(f"relay tls {self.tls!r} is not one of {', '.join(TLS_LEVELS)}")

    @classmethod
    def from_key(cls, rest: str) -> Relay:
        """The relay of a queued key's part after ``relay:``: ``example.com`` or
        ``example.com?tls=verify`` (a route's own TLS policy); raises ValueError."""
        domain, _, query = rest.partition("?")
        tls = None
        if query:
            name, _, level = query.partition("=")
            if name != "tls" or level not in TLS_LEVELS:
                raise ValueError(f"relay key {rest!r}: unknown option {query!r}")
            tls = level
        return cls(domain, tls)  # type: ignore[arg-type]  # checked above

    @property
    def key(self) -> str:
        """What concurrency, suspension and the connection cache are counted by: mail
        that a route sends with its own TLS policy is a destination of its own."""
        key = f"relay:{self.domain.lower().rstrip('.')}"
        return f"{key}?tls={self.tls}" if self.tls is not None else key


@dataclass(frozen=True, slots=True, repr=False)
class Forward:
    """Deliver to one smarthost: ``smtp://host:port`` (STARTTLS by the TLS policy),
    ``smtps://host:port`` (implicit TLS) or ``lmtp://host:port``; ``auth`` is
    ``"user:password"`` (or put ``user:password@`` in the URL). The URL may also say
    ``?starttls=no|auto|require`` (TLS policy none, may, encrypt for this host) and
    ``?cafile=PATH`` (CAs to check its certificate against) and ``?tls=LEVEL`` (any TLS
    policy level, ``verify`` say; it wins over ``starttls=``). A host name is looked up
    through mailgate's resolver (``localhost`` is the loopback address)."""

    url: str
    auth: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.target()  # raises ValueError for an unusable URL
        if self.auth is not None and ":" not in self.auth:
            raise ValueError("forward auth must be 'user:password'")

    def __repr__(self) -> str:
        return f"Forward({redact(self.url)!r})"  # never the password

    def target(self) -> SmartHost:
        """The parsed URL, with ``auth`` applied."""
        return _forward_target(self.url, self.auth)

    @property
    def key(self) -> str:
        """The URL without the password (it is logged), options included."""
        target = self.target()
        user = f"{target.username}@" if target.username else ""
        query = urllib.parse.urlsplit(self.url.strip()).query
        key = f"forward:{target.scheme}://{user}{display_host(target.host)}:{target.port}"
        return f"{key}?{query}" if query else key


Destination = Relay | Forward


@dataclass(frozen=True, slots=True)
class DeliveryRequest:
    """One message to one destination for ``recipients`` (one transaction with many RCPTs,
    or several for more than ``max_recipients_per_transaction``).

    ``sender`` is the reverse-path without brackets, ``""`` for ``<>``. ``body_path`` is
    the message as it goes on the wire (CRLF lines, not dot-stuffed); ``size`` its length
    in bytes (for SIZE=). ``envid`` (decoded) and ``ret`` are the DSN parameters of MAIL;
    ``smtputf8``: the message needs SMTPUTF8 (it fails with 5.6.7 where it is not
    offered); ``eight_bit``: the body is 8BITMIME (BODY=8BITMIME where offered; sent as
    it is elsewhere, as Postfix does). ``attempt`` (1 for the first) is for the log."""

    queue_id: str
    sender: str
    body_path: Path
    size: int
    recipients: tuple[Recipient, ...]
    destination: Destination
    envid: str | None = None
    ret: Literal["FULL", "HDRS"] | None = None
    smtputf8: bool = False
    eight_bit: bool = False
    attempt: int = 1
    #: RFC 8689 REQUIRETLS: only over verified TLS (a CA for a DNSSEC-secure MX or a
    #: smarthost, DANE or MTA-STS) to a server that offers REQUIRETLS, which is passed on;
    #: anything else fails the recipient (5.7.30) instead of deferring it.
    require_tls: bool = False
    #: RFC 8689 5 ``TLS-Required: No``: the recipient domains' DANE and MTA-STS policies
    #: are not applied (TLS is still used when offered).
    tls_optional: bool = False
    #: The message in memory (a small queued message, read with its claim): sent from
    #: here, and ``body_path`` is not read.
    body: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.recipients:
            raise ValueError("a delivery request needs at least one recipient")
        if self.body is not None and len(self.body) != self.size:
            raise ValueError("the size of a delivery request must be its body's length")
        if self.sender:
            check_address(self.sender, "sender")
        if self.envid is not None and _CONTROL.search(self.envid):
            raise ValueError("ENVID must not contain control characters")
        if self.size < 0:
            raise ValueError("a message size cannot be negative")


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply of the remote server: code, enhanced status code (None when it gave
    none) and its text (cleaned: printable ASCII, at most a few lines)."""

    code: int
    enhanced: str | None
    text: str

    def __str__(self) -> str:
        return " ".join(str(part) for part in (self.code, self.enhanced, self.text) if part)


@dataclass(frozen=True, slots=True)
class RemoteMTA:
    """The server that was talked to: its name (MX host or smarthost) and address."""

    host: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """The TLS of a session: protocol version, cipher, whether the certificate was
    verified and how (``ca``: a trusted CA and the host's name; ``mta-sts``: the same,
    required by the domain's MTA-STS policy; ``dane``: TLSA records), or why not
    (``detail``)."""

    version: str
    cipher: str | None
    verified: bool
    method: VerifyMethod | None = None
    detail: str = ""

    def describe(self) -> str:
        """``TLSv1.3 TLS_AES_256_GCM_SHA384 verified (ca)`` / ``... unverified``."""
        how = f"verified ({self.method})" if self.verified else "unverified"
        return " ".join(part for part in (self.version, self.cipher, how) if part)


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """The TLS policy that applied to an attempt: ``level`` as configured or found
    (``verify``, ``mta-sts``, ``dane``...), ``mode`` what it meant for the session
    (none/may/encrypt/verify), ``source`` where it came from (default, domain, route,
    url, mta-sts, dane) and ``reason`` anything more (the MTA-STS policy id)."""

    level: str
    mode: str
    source: str
    reason: str = ""

    def describe(self) -> str:
        """``verify (domain)``, ``mta-sts/verify (mta-sts: policy 20240101 ...)``."""
        name = self.level if self.level == self.mode else f"{self.level}/{self.mode}"
        return f"{name} ({self.source}{': ' + self.reason if self.reason else ''})"


def tls_summary(tls: TLSInfo | None, policy: PolicyInfo | None, *, session: bool = True) -> str:
    """``TLSv1.3/TLS_AES_256_GCM_SHA384/verified(ca) policy=verify(domain)``, ``none
    policy=may(default)`` (plain text), or with ``session`` False (no host gave one)
    just ``policy=verify(route)``: one word for the log line and the queue's history."""
    parts = []
    if session:
        if tls is None:
            parts.append("none")
        else:
            how = f"verified({tls.method})" if tls.verified else "unverified"
            parts.append("/".join(part for part in (tls.version, tls.cipher, how) if part))
    if policy is not None:
        level = policy.level if policy.level == policy.mode else f"{policy.level}:{policy.mode}"
        parts.append(f"policy={level}({policy.source})")
    return " ".join(parts) or "none"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What happened to one recipient in one attempt.

    ``status`` is the RFC 3463 code for the DSN's Status field (the server's own enhanced
    code when it gave one); ``reply`` the server's reply when the outcome comes from one
    (the DSN's Diagnostic-Code), None when it does not (no connection, DNS, ...);
    ``diagnostic`` a one-line account in Postfix's words for logs and the queue;
    ``remote`` and ``tls`` the session it happened in, when there was one."""

    recipient: Recipient
    outcome: Outcome
    status: str
    diagnostic: str
    reply: Reply | None = None
    remote: RemoteMTA | None = None
    tls: TLSInfo | None = None
    tls_policy: PolicyInfo | None = None


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The answer to one :class:`DeliveryRequest`: ``recipients`` in the request's order."""

    request: DeliveryRequest
    recipients: tuple[RecipientResult, ...]
    #: The server of the session the message went through (None: no session).
    remote: RemoteMTA | None
    tls: TLSInfo | None
    #: Seconds this attempt took (waiting for a concurrency slot included).
    delay: float
    #: The session came from the connection cache.
    reused: bool = False
    #: The TLS policy of the session (or of the last host tried when there was none).
    tls_policy: PolicyInfo | None = None

    def by_outcome(self, outcome: Outcome) -> list[RecipientResult]:
        return [result for result in self.recipients if result.outcome is outcome]


_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
# Nothing that could end or split a command line may reach the wire inside an address.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_address(address: str, what: str) -> None:
    """ValueError unless ``address`` can go between ``<`` and ``>`` on a command line."""
    if not address or _CONTROL.search(address) or "<" in address or ">" in address:
        raise ValueError(f"{what} address {address!r} cannot be sent")


@functools.lru_cache(maxsize=256)
def _forward_target(url: str, auth: str | None) -> SmartHost:
    target = parse_url(url, tls_levels=TLS_LEVELS)
    if auth is None:
        return target
    username, _, password = auth.partition(":")
    return dataclasses.replace(target, username=username, password=password)
