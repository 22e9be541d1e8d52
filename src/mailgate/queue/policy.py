"""The queue's rules, apart from any storage: retry schedule, lifetimes, delay warnings,
leases, and what one delivery result or operator action does to a recipient.

Every backend applies the same functions here to its rows, so the SQLite store and a
PostgreSQL store cannot drift apart on when a deferral becomes a failure or which DSN is
owed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from .model import (
    DeliveryResult,
    DsnKind,
    MessageInfo,
    Notify,
    NotifyKeyword,
    Outcome,
    RecipientState,
    RemoteReply,
)
from .schedule import DEFAULT_RETRY_SCHEDULE, DurationError, RetrySchedule, parse_duration

__all__ = ["QueuePolicy", "RecipientUpdate", "apply_operator_bounce", "apply_result", "wants_dsn"]

_FIVE_DAYS = 5 * 86_400.0


@dataclass(frozen=True)
class QueuePolicy:
    """How long and how often the queue tries.

    ``lifetime``: a recipient still failing temporarily this long after the message was
    received fails for good (``bounce_lifetime`` instead for null-sender messages, the
    bounces; ``None`` means the same as ``lifetime``). ``delay_warning``: after this
    long, a still-deferred recipient is reported once in a delay DSN (``None``: never,
    the default). ``lease_time``: how long a claim on recipients lasts before another
    worker may take them over (renewable). ``keep_finished``: how long a message whose
    recipients are all final and whose DSNs are settled stays visible before it and its
    body are removed (0: removed as soon as it is finished).
    """

    schedule: RetrySchedule = field(default_factory=RetrySchedule)
    lifetime: float = _FIVE_DAYS
    bounce_lifetime: float | None = None
    delay_warning: float | None = None
    lease_time: float = 900.0
    keep_finished: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lifetime", "lease_time", "keep_finished"):
            value = getattr(self, name)
            if value < 0:
                raise DurationError(f"{name} must be >= 0, got {value!r}")
        if self.lease_time <= 0:
            raise DurationError("lease_time must be > 0")
        for name in ("bounce_lifetime", "delay_warning"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise DurationError(f"{name} must be >= 0, got {value!r}")

    @classmethod
    def from_settings(
        cls,
        *,
        retry_schedule: Sequence[str | int | float] = DEFAULT_RETRY_SCHEDULE,
        jitter: float = 0.10,
        lifetime: str | float = "5d",
        bounce_lifetime: str | float | None = None,
        delay_warning: str | float | None = None,
        lease_time: str | float = "15m",
        keep_finished: str | float = 0,
        random: Callable[[], float] | None = None,
    ) -> QueuePolicy:
        """A policy from configuration values (duration strings or seconds)."""
        schedule = (
            RetrySchedule.parse(retry_schedule, jitter=jitter)
            if random is None
            else RetrySchedule.parse(retry_schedule, jitter=jitter, random=random)
        )

        def optional(name: str, value: str | float | None) -> float | None:
            return None if value is None else _named(name, value)

        return cls(
            schedule=schedule,
            lifetime=_named("lifetime", lifetime),
            bounce_lifetime=optional("bounce_lifetime", bounce_lifetime),
            delay_warning=optional("delay_warning", delay_warning),
            lease_time=_named("lease_time", lease_time),
            keep_finished=_named("keep_finished", keep_finished),
        )

    def expires_at(self, received_at: float, sender: str) -> float:
        lifetime = self.lifetime
        if sender == "" and self.bounce_lifetime is not None:
            lifetime = self.bounce_lifetime
        return received_at + lifetime


def _named(name: str, value: str | float) -> float:
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise DurationError(f"{name}: {exc}") from None


_NOTIFY_FOR: dict[DsnKind, NotifyKeyword] = {
    "failure": "FAILURE",
    "delay": "DELAY",
    "success": "SUCCESS",
}


def wants_dsn(kind: DsnKind, notify: Notify, sender: str) -> bool:
    """Whether the sender is to be told about this event (RFC 3461 5.2.1 and 6.2).

    Never for the null sender (no bounces of bounces). Without NOTIFY the MTA's
    default applies: failures and delays, not successes.
    """
    if sender == "":
        return False
    if notify is None:
        return kind != "success"
    return _NOTIFY_FOR[kind] in notify


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """The new state of a recipient after an attempt or an operator action, plus the
    history line to write. ``dsn_pending`` replaces what was pending (a later event
    supersedes an unproduced delay warning)."""

    state: RecipientState
    attempts: int
    next_attempt: float
    last_reply: RemoteReply | None
    remote_mta: str | None
    last_status: str | None
    last_diagnostic: str | None
    last_attempt_at: float | None
    final_at: float | None
    held_reason: str | None
    dsn_pending: DsnKind | None
    event: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class RecipientFacts:
    """The parts of a recipient row the rules need (backends fill it from their row)."""

    state: RecipientState
    attempts: int
    next_attempt: float
    notify: Notify
    last_reply: RemoteReply | None
    remote_mta: str | None
    last_status: str | None
    last_diagnostic: str | None
    last_attempt_at: float | None
    held_reason: str | None
    dsn_pending: DsnKind | None
    dsn_sent: frozenset[DsnKind]


def apply_result(
    facts: RecipientFacts,
    message: MessageInfo,
    result: DeliveryResult,
    policy: QueuePolicy,
    now: float,
) -> RecipientUpdate | None:
    """What one attempt's result does. ``None``: nothing (the recipient is already final,
    e.g. the operator bounced it while the attempt ran)."""
    if facts.state.final:
        return None
    attempts = facts.attempts + 1
    # Everything "last" describes this attempt: an old reply next to a new failure to
    # connect would put words in a server's mouth.
    reply = result.reply
    status = result.status
    if status is None:
        status = reply.enhanced if reply is not None and reply.enhanced else None
    if status is None:
        status = _GENERIC_STATUS[result.outcome]
    diagnostic = result.diagnostic
    if diagnostic is None and reply is not None:
        diagnostic = str(reply)
    base = RecipientUpdate(
        state=facts.state,
        attempts=attempts,
        next_attempt=facts.next_attempt,
        last_reply=reply,
        remote_mta=result.remote_mta,
        last_status=status,
        last_diagnostic=diagnostic,
        last_attempt_at=now,
        final_at=None,
        held_reason=facts.held_reason,
        dsn_pending=facts.dsn_pending,
        event=str(result.outcome),
    )
    if result.outcome is Outcome.DELIVERED:
        success = (
            not result.dsn_relayed
            and "success" not in facts.dsn_sent
            and wants_dsn("success", facts.notify, message.sender)
        )
        return replace(
            base,
            state=RecipientState.DELIVERED,
            final_at=now,
            held_reason=None,
            dsn_pending="success" if success else None,
        )
    if result.outcome is Outcome.FAILED:
        return _fail(base, facts, message, now, event="failed")
    # A deferral.
    if facts.state is RecipientState.HELD:
        # Held while the attempt ran: it stays held (release schedules it again).
        return base
    if now >= message.expires_at:
        return _fail(base, facts, message, now, event="expired", detail="queue lifetime ended")
    if result.next_attempt is not None:
        next_attempt = result.next_attempt
    else:
        next_attempt = now + policy.schedule.delay(attempts)
    # The last try comes at the end of the lifetime rather than up to a full retry
    # interval after it.
    next_attempt = max(now, min(next_attempt, message.expires_at))
    dsn_pending = facts.dsn_pending
    if (
        policy.delay_warning is not None
        and now - message.received_at >= policy.delay_warning
        and "delay" not in facts.dsn_sent
        and dsn_pending is None
        and wants_dsn("delay", facts.notify, message.sender)
    ):
        dsn_pending = "delay"
    return replace(
        base, state=RecipientState.DEFERRED, next_attempt=next_attempt, dsn_pending=dsn_pending
    )


_GENERIC_STATUS: dict[Outcome, str] = {
    Outcome.DELIVERED: "2.0.0",
    Outcome.DEFERRED: "4.0.0",
    Outcome.FAILED: "5.0.0",
}


def _fail(
    base: RecipientUpdate,
    facts: RecipientFacts,
    message: MessageInfo,
    now: float,
    *,
    event: str,
    detail: str | None = None,
) -> RecipientUpdate:
    if message.null_sender:
        # A bounce that cannot be delivered has nobody to bounce to: it is kept, held,
        # for the operator to look at (and release or delete).
        reason = f"undeliverable, null sender: {base.last_diagnostic or detail or event}"
        return replace(
            base,
            state=RecipientState.HELD,
            held_reason=reason,
            dsn_pending=None,
            event=event,
            detail=f"{detail}; held (null sender, no bounce)" if detail else "held (null sender)",
        )
    failure = "failure" not in facts.dsn_sent and wants_dsn("failure", facts.notify, message.sender)
    return replace(
        base,
        state=RecipientState.FAILED,
        final_at=now,
        held_reason=None,
        dsn_pending="failure" if failure else None,
        event=event,
        detail=detail,
    )


def apply_operator_bounce(
    facts: RecipientFacts, message: MessageInfo, reason: str, now: float
) -> RecipientUpdate | None:
    """``queue bounce``: fail now with a DSN (none for the null sender, which is failed
    rather than held: the operator decided). ``None`` for recipients already final."""
    if facts.state.final:
        return None
    failure = "failure" not in facts.dsn_sent and wants_dsn("failure", facts.notify, message.sender)
    return RecipientUpdate(
        state=RecipientState.FAILED,
        attempts=facts.attempts,
        next_attempt=facts.next_attempt,
        # The remote server's last words stay; the operator's reason is the diagnostic.
        last_reply=facts.last_reply,
        remote_mta=facts.remote_mta,
        last_status="5.0.0",
        last_diagnostic=reason or "delivery cancelled by the operator",
        last_attempt_at=facts.last_attempt_at,
        final_at=now,
        held_reason=None,
        dsn_pending="failure" if failure else None,
        event="bounced",
        detail=reason,
    )
