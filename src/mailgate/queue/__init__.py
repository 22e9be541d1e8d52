"""The durable relay queue (issue 12): messages accepted for relay or forwarding wait
here, per recipient, until they are delivered, fail for good, or the operator acts on
them. Its delivery engine is :mod:`mailgate.queue.outbound`, its reports
:mod:`mailgate.queue.dsn`.

:class:`QueueStore` is the interface every backend implements; :class:`SQLiteQueueStore`
is the local one (a directory with an SQLite database and one body file per message).
The rules (retry schedule, lifetimes, DSN bookkeeping) live in :mod:`.policy` and are
shared by every backend.
"""

from __future__ import annotations

from .model import (
    ClientInfo,
    DeliveryBatch,
    DeliveryResult,
    DsnKind,
    DsnNotice,
    HistoryEntry,
    Lease,
    MessageDetails,
    MessageInfo,
    NewMessage,
    NewRecipient,
    Notify,
    Outcome,
    QueuedMessage,
    QueueFilter,
    QueueStats,
    RecipientInfo,
    RecipientState,
    RemoteReply,
    destination_domain,
    format_notify,
    parse_notify,
)
from .policy import QueuePolicy, wants_dsn
from .schedule import (
    DEFAULT_RETRY_SCHEDULE,
    DurationError,
    RetrySchedule,
    format_duration,
    parse_duration,
)
from .sqlite import SQLiteQueueStore
from .store import BodySource, NoticeSettled, QueueError, QueueStore

__all__ = [
    "DEFAULT_RETRY_SCHEDULE",
    "BodySource",
    "ClientInfo",
    "DeliveryBatch",
    "DeliveryResult",
    "DsnKind",
    "DsnNotice",
    "DurationError",
    "HistoryEntry",
    "Lease",
    "MessageDetails",
    "MessageInfo",
    "NewMessage",
    "NewRecipient",
    "NoticeSettled",
    "Notify",
    "Outcome",
    "QueueError",
    "QueueFilter",
    "QueuePolicy",
    "QueueStats",
    "QueueStore",
    "QueuedMessage",
    "RecipientInfo",
    "RecipientState",
    "RemoteReply",
    "RetrySchedule",
    "SQLiteQueueStore",
    "destination_domain",
    "format_duration",
    "format_notify",
    "parse_duration",
    "parse_notify",
    "wants_dsn",
]
