"""Database rows to the queue's values, shared by every backend: a row is anything that
gives its columns by name (``sqlite3.Row``, asyncpg's ``Record``); the column names are
the same in every backend's schema."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol, cast

from .model import (
    ClientInfo,
    DsnKind,
    HistoryEntry,
    MessageInfo,
    RecipientInfo,
    RecipientState,
    RemoteReply,
    parse_notify,
)
from .policy import RecipientFacts

__all__ = [
    "dsn_kinds",
    "history_entry",
    "joined",
    "message_info",
    "recipient_facts",
    "recipient_info",
    "remote_reply",
]


class Row(Protocol):
    """A row whose columns are read by name."""

    def __getitem__(self, key: str, /) -> Any: ...


_DSN_KINDS: Mapping[str, DsnKind] = {"failure": "failure", "delay": "delay", "success": "success"}


def dsn_kinds(values: Iterable[str]) -> frozenset[DsnKind]:
    """The DSN kinds named in ``values``; unknown names are ignored."""
    return frozenset(_DSN_KINDS[item] for item in values if item in _DSN_KINDS)


def remote_reply(code: int | None, enhanced: str | None, text: str | None) -> RemoteReply | None:
    if code is None:
        return None
    return RemoteReply(code, enhanced, text or "")


def recipient_info(row: Row, dsn_sent: frozenset[DsnKind]) -> RecipientInfo:
    """A recipients row; ``dsn_sent`` is the row's ``dsn_sent`` column as each backend
    stores it, already read."""
    return RecipientInfo(
        id=row["id"],
        message_id=row["message_id"],
        address=row["address"],
        destination=row["destination"],
        orcpt=row["orcpt"],
        notify=parse_notify(row["notify"]),
        state=RecipientState(row["state"]),
        attempts=row["attempts"],
        next_attempt=row["next_attempt"],
        last_reply=remote_reply(row["reply_code"], row["reply_enhanced"], row["reply_text"]),
        remote_mta=row["remote_mta"],
        last_status=row["status"],
        last_diagnostic=row["diagnostic"],
        last_attempt_at=row["last_attempt_at"],
        final_at=row["final_at"],
        held_reason=row["held_reason"],
        dsn_sent=dsn_sent,
        dsn_pending=cast("DsnKind | None", row["dsn_pending"]),
        lease_owner=row["lease_owner"],
        lease_expires=row["lease_expires"],
    )


def message_info(row: Row) -> MessageInfo:
    """A messages row (``client`` is stored as JSON)."""
    return MessageInfo(
        id=row["id"],
        sender=row["sender"],
        size=row["size"],
        received_at=row["received_at"],
        expires_at=row["expires_at"],
        envid=row["envid"],
        ret=cast("Literal['FULL', 'HDRS'] | None", row["ret"]),
        smtputf8=bool(row["smtputf8"]),
        body_type=row["body_type"],
        client=ClientInfo(**json.loads(row["client"])),
        require_tls=bool(row["require_tls"]),
        tls_optional=bool(row["tls_optional"]),
    )


def history_entry(row: Row) -> HistoryEntry:
    """A history row: one event of a message's life (enqueued, an attempt, an operator's
    action)."""
    return HistoryEntry(
        at=row["at"],
        event=row["event"],
        recipient_id=row["recipient_id"],
        recipient=row["recipient"],
        attempt=row["attempt"],
        reply=remote_reply(row["reply_code"], row["reply_enhanced"], row["reply_text"]),
        remote_mta=row["remote_mta"],
        detail=row["detail"],
        status=row["status"],
    )


def recipient_facts(recipient: RecipientInfo) -> RecipientFacts:
    """What the shared state rules (mailgate.queue.policy) need of a recipient."""
    return RecipientFacts(
        state=recipient.state,
        attempts=recipient.attempts,
        next_attempt=recipient.next_attempt,
        notify=recipient.notify,
        last_reply=recipient.last_reply,
        remote_mta=recipient.remote_mta,
        last_status=recipient.last_status,
        last_diagnostic=recipient.last_diagnostic,
        last_attempt_at=recipient.last_attempt_at,
        held_reason=recipient.held_reason,
        dsn_pending=recipient.dsn_pending,
        dsn_sent=recipient.dsn_sent,
    )


def joined(*parts: str | None) -> str | None:
    """The parts given, joined with "; " (None when there are none)."""
    present = [part for part in parts if part]
    return "; ".join(present) if present else None
