"""The interface of a durable queue store, implemented by every backend (SQLite here;
PostgreSQL for many nodes).

Three kinds of callers use it:

* the SMTP server: :meth:`QueueStore.enqueue` returns once the message, its recipients
  and its body are durable, and only then may the server answer 250;
* delivery workers: :meth:`~QueueStore.claim_due` hands out due recipients grouped per
  message and destination (one SMTP transaction each) under a lease,
  :meth:`~QueueStore.record_results` records what the remote servers said; the DSN
  producer takes :meth:`~QueueStore.pending_notices` and settles them with
  :meth:`~QueueStore.mark_notified` (or by enqueueing the DSN with ``settles=``, which
  does both in one transaction);
* operators (``mailgate queue ...``), possibly from another process while the server
  runs: list, show, flush, hold, release, delete, bounce, stats.

A worker loop, in outline::

    while running:
        seen = store.change_count
        batches = await store.claim_due(limit=20)
        for batch in batches:
            results = await deliver(batch)          # one DeliveryResult per recipient
            await store.record_results(batch, results)
        if not batches:
            due = await store.next_due()
            wait = 60.0 if due is None else max(0.0, due - time.time())
            await store.wait_for_change(min(wait, 60.0), seen)

Every recipient of a batch should get a result, or the batch be handed back with
:meth:`~QueueStore.release_claim`; otherwise it is claimable again when the lease expires.
Times are seconds since the epoch; ``now=None`` means the store's clock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterable, AsyncIterator, Collection, Sequence
from typing import Protocol, runtime_checkable

from .model import (
    DeliveryBatch,
    DeliveryResult,
    DsnNotice,
    Lease,
    MessageDetails,
    NewMessage,
    QueuedMessage,
    QueueFilter,
    QueueStats,
)
from .policy import QueuePolicy

__all__ = ["BodySource", "NoticeSettled", "QueueError", "QueueStore"]

#: A message body to enqueue: a path to an already spooled file (hard-linked into the
#: queue when on the same file system, else copied in blocks), bytes in memory, or an
#: async iterator of chunks (written as they come). Never read whole into memory.
BodySource = os.PathLike[str] | bytes | bytearray | memoryview | AsyncIterable[bytes]


class QueueError(Exception):
    """The queue store cannot do what was asked (closed, damaged, misconfigured)."""


class NoticeSettled(QueueError):
    """``enqueue(settles=...)`` refused: a notice it answers was settled meanwhile (by
    another node's copy of the same report) or has changed (a later event superseded
    it). Nothing was enqueued; the notices still due come again from
    :meth:`QueueStore.pending_notices`."""


@runtime_checkable
class QueueStore(Protocol):
    """A durable queue of messages and per-recipient delivery state."""

    policy: QueuePolicy

    # --- accepting ---------------------------------------------------------------------

    async def enqueue(
        self,
        message: NewMessage,
        body: BodySource,
        *,
        synced: bool = False,
        settles: Sequence[DsnNotice] = (),
    ) -> str:
        """Store a message; returns its queue id once message, recipients and body are
        durably committed. ``synced``: a path body is already fsynced by its writer.
        ``settles``: DSN notices this message (a DSN) answers, marked done in the same
        transaction so a crash can neither lose nor duplicate the DSN: when any of
        their recipients no longer owes that notice (another node queued the report
        first), nothing is enqueued and :class:`NoticeSettled` is raised."""
        ...

    # --- delivery workers ----------------------------------------------------------------

    async def claim_due(
        self,
        now: float | None = None,
        limit: int = 100,
        *,
        max_recipients: int = 100,
        exclude_destinations: Collection[str] = (),
    ) -> list[DeliveryBatch]:
        """Lease up to ``limit`` batches of due recipients (queued or deferred,
        ``next_attempt <= now``, no live lease), oldest due first. A batch is one message
        and one destination, at most ``max_recipients`` recipients (the rest come in
        another batch)."""
        ...

    async def renew_lease(self, batch: DeliveryBatch, now: float | None = None) -> Lease | None:
        """Extend a batch's lease by the policy's ``lease_time``; ``None`` if it was lost."""
        ...

    async def release_claim(self, batch: DeliveryBatch, now: float | None = None) -> int:
        """Give recipients back without an attempt (shutdown, destination suspended):
        they stay due as they were. Returns how many were still held by this lease."""
        ...

    async def record_results(
        self,
        batch: DeliveryBatch,
        results: Sequence[DeliveryResult],
        now: float | None = None,
    ) -> int:
        """Record one attempt per recipient: delivered, deferred (next attempt by the
        schedule, or failed once the lifetime is over) or failed. Results for recipients
        no longer under this batch's lease are ignored. Returns how many were applied."""
        ...

    async def next_due(self) -> float | None:
        """When the earliest pending recipient is due (``None``: nothing pending)."""
        ...

    # --- DSNs ----------------------------------------------------------------------------

    async def pending_notices(self, limit: int = 100) -> list[DsnNotice]:
        """DSNs owed: one notice per message and kind with every recipient owed it."""
        ...

    async def claim_notice_producer(self) -> bool:
        """Whether this store instance is the queue's DSN producer: the first instance
        to ask (of every process and node using the queue) holds the role until it
        closes, or its process dies (SQLite: a lock file) or its database session ends
        (PostgreSQL: an advisory lock); the others get ``False`` and ask again later.
        Keeps several nodes from building the same reports; ``enqueue(settles=)``
        still refuses a second copy in the moment the role changes hands."""
        ...

    def destination_slot(
        self, destination: str, limit: int
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """``async with store.destination_slot(key, n):`` waits for one of the ``n``
        slots of the destination ``key``, shared by every process and node using this
        queue, and holds it for the block (``[queue] destination_concurrency``). A slot
        of a process that dies is free again at once (the lock is the operating
        system's or the database session's)."""
        ...

    async def mark_notified(self, notices: Sequence[DsnNotice]) -> None:
        """The notices were produced (or need not be): never hand them out again."""
        ...

    def read_body(self, message_id: str, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        """The message body in chunks (implementations are async generators). Raises
        KeyError when iterated if the message is not in the queue."""
        ...

    # --- operators -----------------------------------------------------------------------

    async def list_messages(self, filter: QueueFilter | None = None) -> list[QueuedMessage]:
        """Messages (oldest first) with all their recipients."""
        ...

    async def show(self, message_id: str) -> MessageDetails | None: ...

    async def flush(
        self,
        *,
        ids: Collection[str] | None = None,
        domain: str | None = None,
        now: float | None = None,
    ) -> int:
        """Make pending recipients due now (all, or those of ``ids`` / of recipient
        ``domain``). Returns how many recipients were touched."""
        ...

    async def hold(self, ids: Collection[str], reason: str = "held by the operator") -> int:
        """Put pending recipients of these messages on hold. Returns recipients touched."""
        ...

    async def release(self, ids: Collection[str], now: float | None = None) -> int:
        """Held recipients of these messages become queued and due now."""
        ...

    async def delete(self, ids: Collection[str]) -> int:
        """Remove messages, their recipients, history and body. Returns messages removed."""
        ...

    async def bounce(self, ids: Collection[str], reason: str = "", now: float | None = None) -> int:
        """Fail every non-final recipient of these messages now, owing a failure DSN
        (per NOTIFY; none for the null sender). Returns recipients failed."""
        ...

    async def stats(self, now: float | None = None) -> QueueStats: ...

    async def purge_finished(self, now: float | None = None) -> int:
        """Remove messages whose recipients are all final and DSNs settled, finished at
        least ``policy.keep_finished`` ago. Returns messages removed."""
        ...

    # --- change notification ---------------------------------------------------------------

    @property
    def change_count(self) -> int:
        """Grows whenever the queue changes (in this process or another, as noticed)."""
        ...

    async def wait_for_change(self, timeout: float, seen: int | None = None) -> bool:
        """Wait until the queue changes (``change_count`` differs from ``seen``, or from
        its value at the call); ``False`` on timeout or when the store is closed.
        Changes by other processes (and nodes) are noticed well under a second after
        their commit. Take ``seen`` before looking for work, so a change made meanwhile
        wakes the wait at once instead of being missed. A wake-up may be spurious (a
        backend may see its own commit twice: signalled at once, then polled); a change
        is never missed."""
        ...

    async def aclose(self) -> None: ...
