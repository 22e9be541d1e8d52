"""The queue runner: hands due recipients to the outbound engine, records what became of
them, and sends the DSNs the store says are owed.

One runner per process and store, on the server's event loop (``--workers N``: one in
each worker process, against the same store; leases keep them from sending the same
recipients twice). The loop is the one of :mod:`mailgate.queue.store`'s docstring:

1. note ``store.change_count``;
2. claim due batches, up to the free delivery slots (``max_deliveries`` in flight at
   once), and start one delivery task per batch: ``OutboundEngine.deliver`` then
   ``store.record_results``;
3. produce the owed DSNs, when this store instance holds the queue's producer role
   (:meth:`QueueStore.claim_notice_producer`: one process of all the nodes does it):
   :meth:`QueueStore.pending_notices` -> :func:`build_dsn` -> ``enqueue`` from ``<>``
   with ``settles=`` the notice, one transaction: a crash can neither lose nor repeat a
   report, and a second copy (the role changing hands) is refused with NoticeSettled;
4. sleep until the queue changes (an enqueue, a result, an operator's command, in this
   process or another), a delivery slot frees, or the next recipient is due.

:meth:`QueueRunner.stop` stops claiming, lets deliveries in flight finish for a grace
period, then cancels the rest and hands their recipients back (``release_claim``), so a
restart tries them again at once instead of after the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mailgate.server.stats import LatencyHistogram

from . import dsn
from .model import (
    ClientInfo,
    DeliveryBatch,
    DeliveryResult,
    DsnKind,
    DsnNotice,
    NewMessage,
    NewRecipient,
    Outcome,
    RecipientInfo,
    RemoteReply,
    format_notify,
)
from .outbound import (
    DeliveryRequest,
    Destination,
    Forward,
    OutboundEngine,
    Recipient,
    Relay,
    tls_summary,
)
from .outbound import DeliveryResult as EngineDeliveryResult
from .outbound import Outcome as EngineOutcome
from .outbound import RecipientResult as EngineRecipientResult
from .store import NoticeSettled, QueueStore

__all__ = [
    "BounceRoute",
    "FileQueueStore",
    "QueueRunner",
    "body_file",
    "destination_of",
    "remove_stale_bodies",
]

log = logging.getLogger("mailgate.queue.runner")

#: What the runners of this process made of their attempts, per recipient, by outcome
#: (``delivered``, ``deferred``, ``failed``). Plain counters, read by the operations
#: console at scrape time (``mailgate_queue_delivery_attempts_total``), like the policy
#: plugins' ``DECISIONS``.
DELIVERY_RESULTS: Counter[str] = Counter()
#: How long each attempt took (one batch: a session with the next hop, or the wait for
#: one), for ``mailgate_queue_delivery_duration_seconds``.
DELIVERY_LATENCY = LatencyHistogram()

#: Longest sleep with nothing due: the store's change notification wakes the runner
#: sooner for anything new; this only bounds the damage of a missed wake-up.
_IDLE_WAIT = 60.0
#: Something is due but nothing could be claimed: the due recipients are leased (by a
#: delivery of this process, which wakes the runner when it ends, or of another worker).
_LEASED_WAIT = 1.0
#: After a failure of the store itself (a full disk, a locked database).
_ERROR_WAIT = 2.0
#: Notices taken per round.
_NOTICE_BATCH = 50

#: The destination key a bounce to ``address`` goes to (``relay:<domain>`` or
#: ``forward:<url>``), as the routing rules say for mail from ``<>``; ``None``: relay
#: to the address's domain.
BounceRoute = Callable[[str], str | None]


class FileQueueStore(QueueStore, Protocol):
    """A store whose bodies are local files the engine can stream (the SQLite store)."""

    def body_path(self, message_id: str) -> Path: ...


#: The name of a body copied out of a store for a delivery: ``body-<pid>-<id>-<random>.eml``.
_COPY_PREFIX = "body-"


def remove_stale_bodies(spool: Path) -> int:
    """Remove the body copies a process that is gone left in ``spool`` (it was killed
    during a delivery); the copies of running processes (other workers on the same
    queue directory) stay. Returns how many were removed."""
    removed = 0
    for path in spool.glob(f"{_COPY_PREFIX}*.eml"):
        pid_text = path.name[len(_COPY_PREFIX) :].partition("-")[0]
        if not pid_text.isdigit() or _running(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.asynccontextmanager
async def body_file(
    store: QueueStore, message_id: str, spool: Path | None = None, *, file_known: bool = False
) -> AsyncIterator[Path]:
    """A local file holding the body of ``message_id``, for as long as the block runs.

    A store whose bodies are files (``body_path``, the SQLite store) gives its own file:
    no copy (``file_known``: the caller knows there is one; otherwise it is looked for,
    as a small body may be in the database instead). Any other body (a PostgreSQL
    store's, a small one of the SQLite store) is streamed with ``read_body`` into
    a temporary file in ``spool`` (the system's temporary directory when None), removed
    when the block ends: the engine and the DSN builder read files, and a copy on disk
    keeps memory flat whatever the message's size.
    """
    path_of = getattr(store, "body_path", None)
    loop = asyncio.get_running_loop()
    if callable(path_of):
        path = Path(path_of(message_id))
        # A small body the store keeps in its database has no file: copied out below.
        if file_known or await loop.run_in_executor(None, path.exists):
            yield path
            return
    # The pid in the name tells whose copy it is (remove_stale_bodies).
    fd, name = tempfile.mkstemp(
        prefix=f"{_COPY_PREFIX}{os.getpid()}-{message_id}-", suffix=".eml", dir=spool
    )
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            async for chunk in store.read_body(message_id):
                # Off the loop: a slow disk must not stall every session.
                await loop.run_in_executor(None, file.write, chunk)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass(frozen=True, slots=True)
class _Settings:
    hostname: str
    max_deliveries: int
    grace: float


def destination_of(key: str, forward_targets: Mapping[str, Forward]) -> Destination | None:
    """The engine's destination for a queued recipient's key: ``relay:<domain>`` is the
    domain's MX (``relay:<domain>?tls=verify``: with a route's own TLS policy),
    ``forward:<url>`` the smarthost of the rule (its credentials come from
    ``forward_targets``, as the key has no password). ``None``: a forward key no rule has
    any more, or a key this version cannot read."""
    kind, _, rest = key.partition(":")
    if kind == "relay" and rest:
        try:
            return Relay.from_key(rest)
        except ValueError:
            return None
    if kind == "forward":
        return forward_targets.get(key)
    return None


class QueueRunner:
    """Deliver what is due in ``store`` with ``engine``; see the module docstring.

    ``forward_targets``: destination key -> :class:`Forward` (URL and credentials) of the
    forward rules. ``bounce_route``: where DSNs go (the store decides which of the
    processes and nodes sharing it sends them: :meth:`QueueStore.claim_notice_producer`).
    ``destination_concurrency``: deliveries at once to one destination over every
    process and node sharing the store (its :meth:`QueueStore.destination_slot`);
    ``None``: only the engine's per-process limit.
    """

    def __init__(
        self,
        store: QueueStore,
        engine: OutboundEngine,
        *,
        hostname: str,
        forward_targets: Mapping[str, Forward] | None = None,
        bounce_route: BounceRoute | None = None,
        max_deliveries: int = 100,
        destination_concurrency: int | None = None,
        grace: float = 5.0,
        spool: Path | None = None,
        sign_report: Callable[[bytes], bytes] | None = None,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self.store = store
        self.engine = engine
        self.forward_targets = dict(forward_targets or {})
        self.bounce_route = bounce_route
        if destination_concurrency is not None and destination_concurrency < 1:
            raise ValueError("destination_concurrency must be at least 1 (None: no cap)")
        self._settings = _Settings(hostname, max_deliveries, grace)
        #: Deliveries to one destination at once over every node (the store's slots).
        self.destination_concurrency = destination_concurrency
        # Destination -> deliveries here waiting for one of its slots: not claimed
        # for meanwhile, so one saturated destination does not fill max_deliveries.
        self._waiting_for_slot: dict[str, int] = {}
        #: Where bodies of a store without local files are copied for a delivery.
        self.spool = spool
        #: Adds the DKIM signatures of ``[[dkim_sign]]`` to a report (run in a thread).
        self.sign_report = sign_report
        self._in_flight: dict[asyncio.Task[None], DeliveryBatch] = {}
        self._slot_freed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: Counters for logs and tests.
        self.attempts = 0
        self.reports_sent = 0
        self.duplicate_reports_avoided = 0

    # --- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the queue runner is already running")
        self._stopping = False
        if self.spool is not None and self.spool.is_dir():
            try:
                stale = remove_stale_bodies(self.spool)
            except OSError as exc:
                log.warning("queue: cannot clear old body copies in %s: %s", self.spool, exc)
            else:
                if stale:
                    log.info("queue: removed %d body copies left by a stopped process", stale)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mailgate-queue")

    async def stop(self) -> None:
        """Stop claiming; deliveries in flight get ``grace`` seconds to finish, the rest
        are cancelled and their recipients handed back to the queue."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        in_flight = list(self._in_flight)
        if in_flight:
            _, pending = await asyncio.wait(in_flight, timeout=self._settings.grace)
            for delivery in pending:
                delivery.cancel()
            # Each cancelled delivery releases its own claim (shielded) before it ends.
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # --- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        store = self.store
        while not self._stopping:
            try:
                seen = store.change_count
                claimed, asked = await self._claim()
                await self._produce_notices()
                if asked and claimed == asked:
                    continue  # there may be more due right now
                await self._sleep(seen, await self._wait_time(claimed))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("queue runner: error; trying again in %.0f s", _ERROR_WAIT)
                await asyncio.sleep(_ERROR_WAIT)

    async def _claim(self) -> tuple[int, int]:
        free = self._settings.max_deliveries - len(self._in_flight)
        if free <= 0:
            return 0, 0
        batches = await self.store.claim_due(
            limit=free, exclude_destinations=tuple(self._waiting_for_slot)
        )
        loop = asyncio.get_running_loop()
        for batch in batches:
            task = loop.create_task(self._deliver(batch), name=f"mailgate-queue-{batch.message.id}")
            self._in_flight[task] = batch
            task.add_done_callback(self._delivery_done)
        return len(batches), free

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("queue runner: delivery task failed", exc_info=task.exception())

    async def _wait_time(self, claimed: int) -> float:
        if len(self._in_flight) >= self._settings.max_deliveries:
            return _IDLE_WAIT  # a slot freeing wakes the loop
        if claimed:
            # Everything due was claimed just now (fewer batches than asked for); what
            # is due next is leased or later. A delivery ending wakes the loop, which
            # looks again then; under load that is soon, and saves a read per claim.
            return _LEASED_WAIT
        due = await self.store.next_due()
        if due is None:
            return _IDLE_WAIT
        wait = due - time.time()
        if wait <= 0:
            # Due, yet not claimable: leased by a delivery in flight (here or in another
            # worker). Those here wake the loop when they end; look again soon for others.
            return _LEASED_WAIT
        return min(wait, _IDLE_WAIT)

    async def _sleep(self, seen: int, timeout: float) -> None:
        self._slot_freed.clear()
        changed = asyncio.ensure_future(self.store.wait_for_change(timeout, seen))
        freed = asyncio.ensure_future(self._slot_freed.wait())
        try:
            await asyncio.wait({changed, freed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (changed, freed):
                if not waiter.done():
                    waiter.cancel()
            await asyncio.gather(changed, freed, return_exceptions=True)

    # --- one delivery ---------------------------------------------------------------------------

    async def _deliver(self, batch: DeliveryBatch) -> None:
        store = self.store
        try:
            results = await self._attempt(batch)
        except asyncio.CancelledError:
            # Shutdown: give the recipients back, due as they were.
            await asyncio.shield(self._release(batch))
            raise
        for result in results:
            DELIVERY_RESULTS[str(result.outcome)] += 1
        try:
            await asyncio.shield(store.record_results(batch, results))
        except Exception:
            # Not recorded: the lease expires and the recipients are tried again (a
            # delivered one may then be delivered twice, the price of not losing it).
            log.exception("queue %s: cannot record the delivery results", batch.message.id)

    async def _release(self, batch: DeliveryBatch) -> None:
        try:
            await self.store.release_claim(batch)
        except Exception:
            log.exception("queue %s: cannot hand the recipients back", batch.message.id)

    async def _attempt(self, batch: DeliveryBatch) -> list[DeliveryResult]:
        message = batch.message
        destination = destination_of(batch.destination, self.forward_targets)
        if destination is None:
            log.error(
                "queue %s: no forward rule for %s any more; deferred", message.id, batch.destination
            )
            return [
                DeliveryResult(
                    recipient.id,
                    Outcome.DEFERRED,
                    status="4.3.5",
                    diagnostic=f"no route for {batch.destination} in the configuration",
                )
                for recipient in batch.recipients
            ]
        self.attempts += 1
        started = time.monotonic()
        outcome = await self._with_lease(batch, self._send(batch, destination))
        DELIVERY_LATENCY.observe(time.monotonic() - started)
        return [
            _result(recipient, result)
            for recipient, result in zip(batch.recipients, outcome.recipients, strict=True)
        ]

    async def _send(self, batch: DeliveryBatch, destination: Destination) -> EngineDeliveryResult:
        """One attempt with the engine, the body in a local file meanwhile (copied out
        of the store under the lease, as that too may take a while)."""
        message = batch.message
        async with contextlib.AsyncExitStack() as stack:
            if self.destination_concurrency is not None:
                await self._wait_for_slot(stack, batch.destination, self.destination_concurrency)
            if batch.body is not None:  # read with the claim: no file, no trip
                path = Path(message.id)  # not read: the request carries the body
                return await self.engine.deliver(self._request(batch, destination, path))
            # A claim without a body: the store keeps it as a file, or (PostgreSQL) a
            # copy is made for the delivery.
            async with body_file(self.store, message.id, self.spool, file_known=True) as body_path:
                return await self.engine.deliver(self._request(batch, destination, body_path))
        raise AssertionError("unreachable")  # mypy: the stack swallows no exception

    async def _wait_for_slot(
        self, stack: contextlib.AsyncExitStack, destination: str, limit: int
    ) -> None:
        """Hold one of the destination's shared slots until ``stack`` closes."""
        waiting = self._waiting_for_slot
        waiting[destination] = waiting.get(destination, 0) + 1
        try:
            await stack.enter_async_context(self.store.destination_slot(destination, limit))
        finally:
            waiting[destination] -= 1
            if not waiting[destination]:
                del waiting[destination]
                self._slot_freed.set()  # claim for this destination again

    def _request(
        self, batch: DeliveryBatch, destination: Destination, body_path: Path
    ) -> DeliveryRequest:
        message = batch.message
        return DeliveryRequest(
            queue_id=message.id,
            sender=message.sender,
            body_path=body_path,
            size=message.size,
            recipients=tuple(
                Recipient(r.address, orcpt=r.orcpt, notify=format_notify(r.notify))
                for r in batch.recipients
            ),
            destination=destination,
            envid=message.envid,
            ret=message.ret,
            smtputf8=message.smtputf8,
            eight_bit=message.body_type in ("8BITMIME", "BINARYMIME"),
            attempt=1 + max(r.attempts for r in batch.recipients),
            require_tls=message.require_tls,
            tls_optional=message.tls_optional,
            body=batch.body,
        )

    async def _with_lease(
        self, batch: DeliveryBatch, work: Coroutine[Any, Any, EngineDeliveryResult]
    ) -> EngineDeliveryResult:
        """Run the engine's delivery, renewing the batch's lease while it takes long (a
        slow server may hold a message for longer than one lease)."""
        task = asyncio.ensure_future(work)
        renew_every = max(1.0, self.store.policy.lease_time / 3)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=renew_every)
                if done:
                    return task.result()
                if await self.store.renew_lease(batch) is None:
                    log.warning("queue %s: lease lost during delivery", batch.message.id)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # --- DSNs ---------------------------------------------------------------------------------

    async def _produce_notices(self) -> None:
        if not await self.store.claim_notice_producer():
            return
        notices = await self.store.pending_notices(limit=_NOTICE_BATCH)
        for notice in notices:
            if self._stopping:
                return
            await self._produce(notice)

    async def _produce(self, notice: DsnNotice) -> None:
        message = notice.message
        if message.null_sender:  # the store owes none; settle rather than loop on it
            await self.store.mark_notified([notice])
            return
        facts = dsn.MessageFacts(
            sender=message.sender,
            reporting_mta=self._settings.hostname,
            arrival_date=message.received_at,
            envid=message.envid,
            ret=message.ret,
            received_from=_client_name(message.client),
            queue_id=message.id,
        )
        results = [
            _report_line(notice.kind, recipient, message.expires_at)
            for recipient in notice.recipients
        ]
        loop = asyncio.get_running_loop()
        try:
            async with body_file(self.store, message.id, self.spool) as body_path:
                report = await loop.run_in_executor(None, _build, facts, results, body_path)
            if self.sign_report is not None:
                report = await loop.run_in_executor(None, self.sign_report, report)
        except (ValueError, OSError, KeyError) as exc:
            # A report that cannot be made (an address no report can go to, a body gone):
            # settled, so it is not tried forever; the history keeps the reason.
            log.error("queue %s: no %s report can be made: %s", message.id, notice.kind, exc)
            await self.store.mark_notified([notice])
            return
        recipient = message.sender
        destination = self._bounce_destination(recipient)
        try:
            report_id = await self.store.enqueue(
                NewMessage(
                    sender="",
                    recipients=(NewRecipient(recipient, destination, notify=frozenset()),),
                    smtputf8=not recipient.isascii(),
                    body_type="8BITMIME" if dsn.needs_8bitmime(report) else None,
                    client=ClientInfo(protocol="local", listener="dsn"),
                ),
                report,
                settles=[notice],
            )
        except NoticeSettled as exc:
            # Another node queued this report first (the producer's role changed hands
            # while both had read the notice), or a later event superseded it.
            self.duplicate_reports_avoided += 1
            log.info("queue %s: %s report not queued: %s", message.id, notice.kind, exc)
            return
        self.reports_sent += 1
        log.info(
            "queue %s: %s report for %d recipient(s) queued as %s to <%s>",
            message.id,
            notice.kind,
            len(notice.recipients),
            report_id,
            recipient,
        )

    def _bounce_destination(self, address: str) -> str:
        if self.bounce_route is not None:
            key = self.bounce_route(address)
            if key is not None and key.startswith(("relay:", "forward:")):
                return key
        domain = address.rpartition("@")[2]
        return f"relay:{_a_label(domain)}"


def _a_label(domain: str) -> str:
    domain = domain.lower().rstrip(".")
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _result(recipient: RecipientInfo, result: EngineRecipientResult) -> DeliveryResult:
    reply = result.reply
    summary = tls_summary(result.tls, result.tls_policy, session=result.remote is not None)
    return DeliveryResult(
        recipient.id,
        _OUTCOMES[result.outcome],
        RemoteReply(reply.code, reply.enhanced, reply.text) if reply is not None else None,
        remote_mta=str(result.remote) if result.remote is not None else None,
        status=result.status,
        # The TLS of the attempt and the policy that applied go into the history that
        # ``mailgate queue show`` prints (and the DSN, when there was no reply).
        diagnostic=f"{result.diagnostic} (TLS {summary})",
    )


_OUTCOMES: Mapping[EngineOutcome, Outcome] = {
    EngineOutcome.DELIVERED: Outcome.DELIVERED,
    EngineOutcome.DEFERRED: Outcome.DEFERRED,
    EngineOutcome.FAILED: Outcome.FAILED,
}

_ACTIONS: Mapping[DsnKind, dsn.Action] = {
    "failure": dsn.Action.FAILED,
    "delay": dsn.Action.DELAYED,
    # The next hop took it; whether it reports delivery itself is not known here.
    "success": dsn.Action.RELAYED,
}
_CLASS: Mapping[DsnKind, str] = {"failure": "5", "delay": "4", "success": "2"}


def _report_line(kind: DsnKind, recipient: RecipientInfo, expires_at: float) -> dsn.RecipientResult:
    action = _ACTIONS[kind]
    status = recipient.last_status or ""
    if not status.startswith(_CLASS[kind]):
        # A deferral that ran out of time fails with its last temporary status: the
        # report says "delivery time expired" (RFC 3463 X.4.7).
        status = "5.4.7" if kind == "failure" and status.startswith("4") else f"{_CLASS[kind]}.0.0"
    reply = recipient.last_reply
    diagnostic: dsn.Reply | None = reply
    if reply is None and recipient.last_diagnostic:
        code = {"failure": 550, "delay": 451, "success": 250}[kind]
        diagnostic = dsn.Diagnostic(code, status, recipient.last_diagnostic)
    return dsn.RecipientResult(
        address=recipient.address,
        action=action,
        status=status,
        orcpt=recipient.orcpt,
        remote_mta=_host_of(recipient.remote_mta),
        diagnostic=diagnostic,
        last_attempt=recipient.last_attempt_at,
        will_retry_until=expires_at if kind == "delay" else None,
    )


def _host_of(remote_mta: str | None) -> str | None:
    """``mx.example.net[192.0.2.1]:25`` -> ``mx.example.net`` (the DSN's Remote-MTA)."""
    if not remote_mta:
        return None
    return remote_mta.partition("[")[0] or remote_mta


def _client_name(client: ClientInfo) -> str | None:
    return client.name or client.helo or client.address


def _build(facts: dsn.MessageFacts, results: list[dsn.RecipientResult], original: Path) -> bytes:
    return dsn.build_dsn(facts, results, original)
