"""What the queue holds: messages, their recipients' delivery state, and the values the
store hands to delivery workers, the DSN producer and operators.

Everything here is an immutable value; a backend builds them from its rows. Times are
seconds since the epoch (floats), as ``time.time()`` gives them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from enum import StrEnum
from typing import Literal

__all__ = [
    "AGE_BUCKETS_MINUTES",
    "NOTIFY_KEYWORDS",
    "ClientInfo",
    "DeliveryBatch",
    "DeliveryResult",
    "DsnKind",
    "DsnNotice",
    "HistoryEntry",
    "Lease",
    "MessageDetails",
    "MessageInfo",
    "NewMessage",
    "NewRecipient",
    "Notify",
    "NotifyKeyword",
    "Outcome",
    "QueueFilter",
    "QueueStats",
    "QueuedMessage",
    "RecipientInfo",
    "RecipientState",
    "RemoteReply",
    "age_bucket",
    "age_bucket_labels",
    "destination_domain",
    "format_notify",
    "parse_notify",
]


class RecipientState(StrEnum):
    """Where one recipient stands.

    ``queued``: waiting for its first attempt; ``deferred``: an attempt failed
    temporarily, another comes at ``next_attempt``; ``held``: put aside by the operator,
    or a failed bounce (null sender) kept for the operator; ``delivered`` and ``failed``
    are final.
    """

    QUEUED = "queued"
    DEFERRED = "deferred"
    HELD = "held"
    DELIVERED = "delivered"
    FAILED = "failed"

    @property
    def pending(self) -> bool:
        """Waiting for a delivery attempt (claimable once due)."""
        return self in (RecipientState.QUEUED, RecipientState.DEFERRED)

    @property
    def final(self) -> bool:
        return self in (RecipientState.DELIVERED, RecipientState.FAILED)


class Outcome(StrEnum):
    """The result of one delivery attempt for one recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


DsnKind = Literal["failure", "delay", "success"]
NotifyKeyword = Literal["SUCCESS", "DELAY", "FAILURE"]
#: RFC 3461 NOTIFY: ``None`` when the client gave none (the MTA's default: failures and
#: delays are reported), an empty set for ``NOTIFY=NEVER``, otherwise the keywords given.
Notify = frozenset[NotifyKeyword] | None
NOTIFY_KEYWORDS: frozenset[NotifyKeyword] = frozenset({"SUCCESS", "DELAY", "FAILURE"})
_NOTIFY_BY_NAME: dict[str, NotifyKeyword] = {keyword: keyword for keyword in NOTIFY_KEYWORDS}


def parse_notify(value: str | None) -> Notify:
    """``"SUCCESS,DELAY"`` -> ``frozenset({"SUCCESS", "DELAY"})``; ``"NEVER"`` -> empty;
    ``None`` -> ``None``. Raises ValueError for anything RFC 3461 does not allow."""
    if value is None:
        return None
    keywords = [item.strip().upper() for item in value.split(",")]
    if keywords == ["NEVER"]:
        return frozenset()
    result: set[NotifyKeyword] = set()
    for keyword in keywords:
        known = _NOTIFY_BY_NAME.get(keyword)
        if known is None:
            raise ValueError(f"invalid NOTIFY value {value!r}")
        result.add(known)
    return frozenset(result)


def format_notify(notify: Notify) -> str | None:
    """The inverse of :func:`parse_notify` (keywords in a fixed order)."""
    if notify is None:
        return None
    if not notify:
        return "NEVER"
    return ",".join(keyword for keyword in ("SUCCESS", "DELAY", "FAILURE") if keyword in notify)


_DESTINATION = re.compile(r"(relay|forward):(.+)", re.DOTALL)


def destination_domain(address: str) -> str:
    """The domain of a recipient address, lower-cased (``""`` for a bare local part)."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


@dataclass(frozen=True, slots=True)
class RemoteReply:
    """An SMTP reply, as the remote server (or the outbound client) gave it."""

    code: int
    enhanced: str | None = None
    text: str = ""

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Facts about the SMTP client that handed the message over, kept for logs,
    ``Received:``-style reports and DSNs. All optional: a message queued by
    ``mailgate sendmail`` or by a DSN producer has no client."""

    address: str | None = None
    port: int | None = None
    #: Reverse DNS name of ``address`` (verified), if any.
    name: str | None = None
    helo: str | None = None
    #: RFC 3848 protocol: ``SMTP``, ``ESMTP``, ``ESMTPS``, ``ESMTPSA``, ``LMTP`` ...
    protocol: str | None = None
    #: e.g. ``"TLSv1.3 TLS_AES_256_GCM_SHA384"``; ``None`` in clear text.
    tls: str | None = None
    auth_user: str | None = None
    #: The listener (``"127.0.0.1:25"``, ``"submission"``) that received it.
    listener: str | None = None


@dataclass(frozen=True, slots=True)
class NewRecipient:
    """A recipient to enqueue. ``destination`` is the routing result: ``relay:<domain>``
    (the recipient domain's MX) or ``forward:<url>`` (a smarthost)."""

    address: str
    destination: str
    orcpt: str | None = None
    notify: Notify = None

    def __post_init__(self) -> None:
        if _DESTINATION.fullmatch(self.destination) is None:
            raise ValueError(
                f"destination must be 'relay:<domain>' or 'forward:<url>', got {self.destination!r}"
            )


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to enqueue (its body is passed separately). ``sender`` is the
    reverse-path without brackets, ``""`` for the null sender ``<>``."""

    sender: str
    #: Any sequence; stored as a tuple.
    recipients: Sequence[NewRecipient]
    _: KW_ONLY
    envid: str | None = None
    ret: Literal["FULL", "HDRS"] | None = None
    smtputf8: bool = False
    #: BODY= of MAIL: ``7BIT``, ``8BITMIME`` or ``BINARYMIME`` (``None``: not given).
    body_type: str | None = None
    client: ClientInfo = field(default_factory=ClientInfo)
    #: When the message was received; the store's clock when ``None``.
    received_at: float | None = None
    #: RFC 8689: received with ``MAIL FROM:<...> REQUIRETLS``: relayed only over
    #: verified TLS to a server that offers REQUIRETLS, else it bounces.
    require_tls: bool = False
    #: RFC 8689 5: the message has ``TLS-Required: No`` (and no REQUIRETLS): the
    #: recipient domains' TLS policies (DANE, MTA-STS) do not hold it back.
    tls_optional: bool = False

    def __post_init__(self) -> None:
        # A list is accepted at run time too; the stored value is always a tuple.
        recipients = tuple(self.recipients)
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        object.__setattr__(self, "recipients", recipients)


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """The envelope of a queued message (without its recipients)."""

    id: str
    sender: str
    size: int
    received_at: float
    #: After this moment a temporary failure is final (``lifetime`` or ``bounce_lifetime``).
    expires_at: float
    envid: str | None
    ret: Literal["FULL", "HDRS"] | None
    smtputf8: bool
    body_type: str | None
    client: ClientInfo
    #: See :class:`NewMessage`.
    require_tls: bool = False
    tls_optional: bool = False

    @property
    def null_sender(self) -> bool:
        return self.sender == ""


@dataclass(frozen=True, slots=True)
class RecipientInfo:
    """One recipient of a queued message and its delivery state."""

    id: int
    message_id: str
    address: str
    destination: str
    orcpt: str | None
    notify: Notify
    state: RecipientState
    attempts: int
    #: When it is due (pending recipients); for others, when it was last scheduled.
    next_attempt: float
    #: What the remote server last said (``None``: no reply, e.g. no connection).
    last_reply: RemoteReply | None
    remote_mta: str | None
    #: RFC 3463 status of the last attempt or action (a DSN's Status field).
    last_status: str | None
    #: One-line account of the last attempt or action, for logs and people.
    last_diagnostic: str | None
    last_attempt_at: float | None
    #: When it became delivered or failed.
    final_at: float | None
    held_reason: str | None
    #: DSNs already produced (or settled as not needed) for this recipient.
    dsn_sent: frozenset[DsnKind]
    #: A DSN of this kind is owed and not produced yet.
    dsn_pending: DsnKind | None
    lease_owner: str | None
    lease_expires: float | None

    @property
    def domain(self) -> str:
        return destination_domain(self.address)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message with all of its recipients (what ``queue list`` shows)."""

    info: MessageInfo
    recipients: tuple[RecipientInfo, ...]

    @property
    def id(self) -> str:
        return self.info.id


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of a message's history: a delivery attempt or an operator action."""

    at: float
    #: ``enqueued``, ``delivered``, ``deferred``, ``failed``, ``held``, ``released``,
    #: ``flushed``, ``bounced``, ``expired``, ``dsn-failure``/``dsn-delay``/``dsn-success``
    event: str
    recipient_id: int | None = None
    recipient: str | None = None
    attempt: int | None = None
    reply: RemoteReply | None = None
    remote_mta: str | None = None
    detail: str | None = None
    status: str | None = None


@dataclass(frozen=True, slots=True)
class MessageDetails:
    """What ``queue show`` prints."""

    message: QueuedMessage
    history: tuple[HistoryEntry, ...]


@dataclass(frozen=True, slots=True)
class Lease:
    """A claim on recipients: ``owner`` (the store instance), ``id`` (a fencing token
    checked on every update: a worker whose lease was taken over cannot overwrite the new
    owner's result) and ``expires``."""

    owner: str
    id: int
    expires: float


@dataclass(frozen=True, slots=True)
class DeliveryBatch:
    """Due recipients of one message for one destination: one SMTP transaction with
    one RCPT per recipient."""

    message: MessageInfo
    destination: str
    recipients: tuple[RecipientInfo, ...]
    lease: Lease
    #: The message itself when the store keeps it in its database (a small message in
    #: the SQLite store), read with the claim; ``None``: read it from the store.
    body: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome of one attempt for one recipient of a batch.

    ``reply`` is what the remote server said (``None`` when it said nothing: no
    connection, DNS trouble, a null MX); ``status`` the RFC 3463 code for a DSN (the
    reply's enhanced code when ``None``, else 2.0.0/4.0.0/5.0.0 by outcome);
    ``diagnostic`` a one-line account for logs (the reply's text when ``None``);
    ``remote_mta`` e.g. ``"mx.example.net[192.0.2.1]:25"``; ``next_attempt`` overrides the retry schedule of a deferral (e.g. a destination
    suspended as dead); ``dsn_relayed``: the next hop accepted the NOTIFY/ORCPT
    parameters, so it reports success itself and no success DSN is owed here.
    """

    recipient_id: int
    outcome: Outcome
    reply: RemoteReply | None = None
    remote_mta: str | None = None
    next_attempt: float | None = None
    dsn_relayed: bool = False
    status: str | None = None
    diagnostic: str | None = None

    @classmethod
    def from_reply(
        cls,
        recipient_id: int,
        reply: RemoteReply,
        *,
        remote_mta: str | None = None,
        dsn_relayed: bool = False,
        status: str | None = None,
        diagnostic: str | None = None,
    ) -> DeliveryResult:
        """2xx delivered, 4xx deferred, 5xx failed (anything else counts as a deferral)."""
        if 200 <= reply.code < 300:
            outcome = Outcome.DELIVERED
        elif 500 <= reply.code < 600:
            outcome = Outcome.FAILED
        else:
            outcome = Outcome.DEFERRED
        return cls(
            recipient_id,
            outcome,
            reply,
            remote_mta,
            None,
            dsn_relayed,
            status,
            diagnostic,
        )


@dataclass(frozen=True, slots=True)
class DsnNotice:
    """A DSN owed to a message's sender for some of its recipients: one notice per
    message and kind covers every recipient due at that moment (one bounce per event)."""

    kind: DsnKind
    message: MessageInfo
    recipients: tuple[RecipientInfo, ...]


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """Which messages ``list_messages`` returns: those with at least one recipient
    matching every given criterion. ``domain`` is the recipient domain (exact, any case)."""

    states: frozenset[RecipientState] | None = None
    domain: str | None = None
    ids: tuple[str, ...] | None = None
    limit: int | None = None


#: Upper bounds of the age buckets of ``QueueStats`` in minutes (qshape's), last is open.
AGE_BUCKETS_MINUTES: tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


def age_bucket_labels() -> tuple[str, ...]:
    return (*(str(minutes) for minutes in AGE_BUCKETS_MINUTES), f"{AGE_BUCKETS_MINUTES[-1]}+")


def age_bucket(age_seconds: float) -> int:
    """The index of the bucket an age falls in (qshape: "5" holds ages below 5 minutes)."""
    minutes = age_seconds / 60.0
    for index, bound in enumerate(AGE_BUCKETS_MINUTES):
        if minutes < bound:
            return index
    return len(AGE_BUCKETS_MINUTES)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts for ``queue stats``.

    ``messages``: messages in the store; ``by_state``: recipients per state;
    ``by_domain``: for recipients not yet final (queued, deferred, held), per recipient
    domain, counts per age bucket (``bucket_labels``, minutes since the message was
    received, like Postfix's qshape); ``oldest``: received time of the oldest message.
    """

    messages: int
    by_state: dict[RecipientState, int]
    by_domain: dict[str, tuple[int, ...]]
    bucket_labels: tuple[str, ...]
    oldest: float | None
