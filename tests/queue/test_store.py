"""The queue store interface, run against every backend in tests/queue/backends.py.

Nothing here knows which backend it talks to: a new backend passes this file unchanged.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tests.queue.conftest import START, Clock, StoreOpener, fixed_policy

from mailgate.queue import (
    ClientInfo,
    DeliveryBatch,
    DeliveryResult,
    NewMessage,
    NewRecipient,
    NoticeSettled,
    Outcome,
    QueueFilter,
    QueuePolicy,
    QueueStore,
    RecipientInfo,
    RecipientState,
    RemoteReply,
    RetrySchedule,
    parse_notify,
)

T = TypeVar("T")

OK = RemoteReply(250, "2.0.0", "queued as 123")
BUSY = RemoteReply(451, "4.3.0", "try again later")
REFUSED = RemoteReply(550, "5.1.1", "no such user")
MINUTE = 60.0
HOUR = 3600.0
DAY = 86_400.0


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def rcpt(address: str, destination: str | None = None, **kwargs: Any) -> NewRecipient:
    domain = address.rpartition("@")[2]
    return NewRecipient(address, destination or f"relay:{domain}", **kwargs)


def new_message(
    sender: str = "alice@example.org", *recipients: NewRecipient, **kwargs: Any
) -> NewMessage:
    if not recipients:
        recipients = (rcpt("bob@example.net"),)
    return NewMessage(sender, recipients, **kwargs)


async def body_of(store: QueueStore, message_id: str) -> bytes:
    return b"".join([chunk async for chunk in store.read_body(message_id)])


async def recipients_of(store: QueueStore, message_id: str) -> dict[str, RecipientInfo]:
    (message,) = await store.list_messages(QueueFilter(ids=(message_id,)))
    return {recipient.address: recipient for recipient in message.recipients}


def results(batch: DeliveryBatch, reply: RemoteReply, **kwargs: Any) -> list[DeliveryResult]:
    return [DeliveryResult.from_reply(r.id, reply, **kwargs) for r in batch.recipients]


async def attempt(
    store: QueueStore, reply: RemoteReply, now: float | None = None, **kwargs: Any
) -> list[DeliveryBatch]:
    """Claim everything due and answer every recipient with ``reply``."""
    batches = await store.claim_due(now, limit=1000)
    for batch in batches:
        await store.record_results(batch, results(batch, reply, **kwargs), now)
    return batches


# --- enqueue ---------------------------------------------------------------------------------


def test_enqueue_keeps_the_envelope_and_body(open_store: StoreOpener, clock: Clock) -> None:
    client = ClientInfo(
        address="192.0.2.7",
        port=40000,
        name="mail.example.org",
        helo="mail.example.org",
        protocol="ESMTPSA",
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
        auth_user="alice",
        listener="127.0.0.1:587",
    )
    message = NewMessage(
        "alice@example.org",
        [
            rcpt(
                "bob@example.net",
                orcpt="rfc822;bob@example.net",
                notify=parse_notify("SUCCESS,DELAY"),
            ),
            rcpt("carol@Example.COM", notify=parse_notify("NEVER")),
            rcpt("dave@example.com", "forward:smtp://smarthost.example:587"),
        ],
        envid="ENV-1",
        ret="HDRS",
        smtputf8=True,
        body_type="8BITMIME",
        client=client,
    )

    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(message, b"Subject: hi\r\n\r\nbody\r\n")
            details = await store.show(message_id)
            assert details is not None
            info = details.message.info
            assert info.id == message_id
            assert (info.sender, info.size, info.received_at) == ("alice@example.org", 21, START)
            assert (info.envid, info.ret, info.smtputf8, info.body_type) == (
                "ENV-1",
                "HDRS",
                True,
                "8BITMIME",
            )
            assert info.client == client
            assert info.expires_at == START + 5 * DAY
            bob, carol, dave = details.message.recipients
            assert (bob.address, bob.destination, bob.orcpt) == (
                "bob@example.net",
                "relay:example.net",
                "rfc822;bob@example.net",
            )
            assert bob.notify == frozenset({"SUCCESS", "DELAY"})
            assert carol.notify == frozenset() and carol.domain == "example.com"
            assert (
                dave.notify is None and dave.destination == "forward:smtp://smarthost.example:587"
            )
            for recipient in (bob, carol, dave):
                assert recipient.state is RecipientState.QUEUED
                assert (recipient.attempts, recipient.next_attempt) == (0, START)
                assert recipient.last_reply is None and recipient.final_at is None
                assert recipient.dsn_sent == frozenset() and recipient.dsn_pending is None
            assert [entry.event for entry in details.history] == ["enqueued"]
            assert await body_of(store, message_id) == b"Subject: hi\r\n\r\nbody\r\n"

    run(main())


def test_requiretls_and_tls_required_no_are_kept_with_the_message(
    open_store: StoreOpener,
) -> None:
    async def main() -> None:
        async with open_store() as store:
            required = await store.enqueue(new_message(require_tls=True), b"x")
            optional = await store.enqueue(new_message(tls_optional=True), b"y")
            plain = await store.enqueue(new_message(), b"z")
            flags = {
                m.id: (m.info.require_tls, m.info.tls_optional) for m in await store.list_messages()
            }
            assert flags == {
                required: (True, False),
                optional: (False, True),
                plain: (False, False),
            }
            batches = {b.message.id: b.message for b in await store.claim_due(limit=10)}
            assert batches[required].require_tls and not batches[plain].require_tls

    run(main())


def test_enqueue_null_sender_and_given_received_time(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(new_message("", received_at=START - 100.0), b"bounce")
            (queued,) = await store.list_messages()
            assert queued.id == message_id
            assert queued.info.null_sender and queued.info.received_at == START - 100.0

    run(main())


def test_enqueue_from_a_spooled_file_and_from_a_stream(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    spooled = tmp_path / "spool-file"
    spooled.write_bytes(b"From a file\r\n" * 1000)

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(100):
            yield f"line {index}\r\n".encode()
            await asyncio.sleep(0)

    async def main() -> None:
        async with open_store() as store:
            from_file = await store.enqueue(new_message(), spooled)
            # The caller may drop its spool file once enqueue returned.
            spooled.unlink()
            from_stream = await store.enqueue(new_message(), chunks())
            from_bytearray = await store.enqueue(new_message(), memoryview(bytearray(b"xyz")))
            assert await body_of(store, from_file) == b"From a file\r\n" * 1000
            expected = b"".join(f"line {index}\r\n".encode() for index in range(100))
            assert await body_of(store, from_stream) == expected
            assert await body_of(store, from_bytearray) == b"xyz"
            sizes = {m.id: m.info.size for m in await store.list_messages()}
            assert sizes == {from_file: 13_000, from_stream: len(expected), from_bytearray: 3}

    run(main())


def test_a_failing_stream_enqueues_nothing(open_store: StoreOpener) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"part one"
        raise OSError("client went away")

    async def main() -> None:
        async with open_store() as store:
            with pytest.raises(OSError, match="client went away"):
                await store.enqueue(new_message(), broken())
            assert await store.list_messages() == []
            assert (await store.stats()).messages == 0

    run(main())


def test_large_body_memory_stays_flat(open_store: StoreOpener) -> None:
    block = b"x" * 65536
    blocks = 320  # 20 MiB

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(blocks):
            yield block

    async def main() -> None:
        async with open_store() as store:
            tracemalloc.start()
            try:
                message_id = await store.enqueue(new_message(), chunks())
                size = 0
                async for chunk in store.read_body(message_id):
                    size += len(chunk)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert size == len(block) * blocks
            assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for a 20 MiB body"

    run(main())


def test_concurrent_enqueues_are_all_committed(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            ids = await asyncio.gather(
                *(
                    store.enqueue(new_message(f"s{n}@example.org"), f"body {n}".encode())
                    for n in range(60)
                )
            )
            assert len(set(ids)) == 60
            listed = await store.list_messages()
            assert {m.id for m in listed} == set(ids)
            for n, message_id in enumerate(ids):
                assert await body_of(store, message_id) == f"body {n}".encode()

    run(main())


def test_message_validation() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        NewMessage("a@example.org", [])
    with pytest.raises(ValueError, match="destination must be"):
        NewRecipient("b@example.net", "smtp:example.net")
    with pytest.raises(ValueError, match="invalid NOTIFY"):
        parse_notify("SOMETIMES")
    assert parse_notify(None) is None


# --- claiming ----------------------------------------------------------------------------------


def test_claims_group_recipients_by_message_and_destination(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(
                new_message(
                    "alice@example.org",
                    rcpt("a1@a.example"),
                    rcpt("b1@b.example"),
                    rcpt("a2@a.example"),
                    rcpt("x@c.example", "forward:smtp://smarthost.example"),
                    rcpt("y@d.example", "forward:smtp://smarthost.example"),
                ),
                b"body",
            )
            batches = await store.claim_due(limit=10)
            grouped = {
                batch.destination: sorted(r.address for r in batch.recipients) for batch in batches
            }
            assert grouped == {
                "relay:a.example": ["a1@a.example", "a2@a.example"],
                "relay:b.example": ["b1@b.example"],
                "forward:smtp://smarthost.example": ["x@c.example", "y@d.example"],
            }
            for batch in batches:
                assert batch.message.id == message_id
                assert batch.lease.expires == START + store.policy.lease_time
                assert all(r.lease_owner == batch.lease.owner for r in batch.recipients)
            assert len({batch.lease.id for batch in batches}) == 3
            # Leased recipients are not handed out twice.
            assert await store.claim_due(limit=10) == []

    run(main())


def test_claim_limits_and_exclusions(open_store: StoreOpener, clock: Clock) -> None:
    async def main() -> None:
        async with open_store() as store:
            big = await store.enqueue(
                new_message("a@example.org", *(rcpt(f"u{n}@big.example") for n in range(5))),
                b"1",
            )
            clock.advance(1)
            other = await store.enqueue(new_message("a@example.org", rcpt("v@small.example")), b"2")
            clock.advance(1)
            third = await store.enqueue(new_message("a@example.org", rcpt("w@third.example")), b"3")
            # Oldest due first; at most `limit` batches.
            (first,) = await store.claim_due(limit=1, max_recipients=2)
            assert first.message.id == big and len(first.recipients) == 2
            # The rest of a message's recipients come in later batches.
            batches = await store.claim_due(
                limit=10, max_recipients=2, exclude_destinations={"relay:small.example"}
            )
            assert [(b.message.id, len(b.recipients)) for b in batches] == [(big, 2), (third, 1)]
            last, small = await store.claim_due(limit=10, max_recipients=2)
            assert (last.message.id, len(last.recipients)) == (big, 1)
            assert small.message.id == other
            assert await store.claim_due(limit=10) == []
            with pytest.raises(ValueError):
                await store.claim_due(limit=0)

    run(main())


def test_nothing_is_claimed_before_it_is_due(open_store: StoreOpener, clock: Clock) -> None:
    async def main() -> None:
        async with open_store() as store:
            assert await store.next_due() is None
            await store.enqueue(new_message(), b"x")
            assert await store.next_due() == START
            await attempt(store, BUSY)
            assert await store.next_due() == START + 5 * MINUTE
            assert await store.claim_due(START + 5 * MINUTE - 1) == []
            assert len(await store.claim_due(START + 5 * MINUTE)) == 1

    run(main())


def test_an_expired_lease_is_claimed_again_and_the_old_owner_is_fenced(
    open_store: StoreOpener, clock: Clock
) -> None:
    async def main() -> None:
        async with open_store() as store:
            lease_time = store.policy.lease_time
            await store.enqueue(new_message(), b"x")
            (old,) = await store.claim_due()
            renewed = await store.renew_lease(old, START + 60)
            assert renewed is not None and renewed.expires == START + 60 + lease_time
            assert await store.claim_due(START + lease_time + 1) == []
            (new,) = await store.claim_due(START + 60 + lease_time)
            assert new.lease.id != old.lease.id
            # The worker that lost its lease can neither record nor renew.
            assert await store.record_results(old, results(old, OK)) == 0
            assert await store.renew_lease(old) is None
            assert await store.release_claim(old) == 0
            (recipient,) = (await recipients_of(store, new.message.id)).values()
            assert recipient.state is RecipientState.QUEUED and recipient.attempts == 0
            assert await store.record_results(new, results(new, BUSY)) == 1

    run(main())


def test_a_released_claim_is_due_again_at_once(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            await store.enqueue(new_message(), b"x")
            (batch,) = await store.claim_due()
            assert await store.release_claim(batch) == 1
            (again,) = await store.claim_due()
            assert [r.id for r in again.recipients] == [r.id for r in batch.recipients]
            assert again.recipients[0].attempts == 0

    run(main())


def test_results_for_recipients_outside_the_batch_are_ignored(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            await store.enqueue(
                new_message("a@example.org", rcpt("x@one.example"), rcpt("y@two.example")), b"x"
            )
            first, second = await store.claim_due()
            foreign = DeliveryResult.from_reply(second.recipients[0].id, OK)
            assert await store.record_results(first, [foreign]) == 0
            assert await store.record_results(second, [foreign]) == 1
            # Two results for one recipient: one attempt, the last result.
            own = first.recipients[0].id
            twice = [DeliveryResult.from_reply(own, BUSY), DeliveryResult.from_reply(own, REFUSED)]
            assert await store.record_results(first, twice) == 1
            (message,) = await store.list_messages()
            recipient = next(r for r in message.recipients if r.id == own)
            assert (recipient.state, recipient.attempts) == (RecipientState.FAILED, 1)

    run(main())


# --- results and the schedule ------------------------------------------------------------------


def test_delivered_messages_are_removed_with_their_body(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(
                new_message("a@example.org", rcpt("x@one.example"), rcpt("y@two.example")), b"x"
            )
            first, second = await store.claim_due()
            await store.record_results(first, results(first, OK, remote_mta="mx.one.example"))
            # One recipient still pending: the message stays.
            states = {r.address: r.state for r in (await recipients_of(store, message_id)).values()}
            assert states == {
                "x@one.example": RecipientState.DELIVERED,
                "y@two.example": RecipientState.QUEUED,
            }
            await store.record_results(second, results(second, OK))
            assert await store.list_messages() == []
            assert await store.show(message_id) is None
            with pytest.raises(KeyError):
                await body_of(store, message_id)

    run(main())


def test_keep_finished_keeps_delivered_messages_until_purged(
    open_store: StoreOpener, clock: Clock
) -> None:
    async def main() -> None:
        async with open_store(fixed_policy(keep_finished=HOUR)) as store:
            message_id = await store.enqueue(new_message(), b"x")
            (batch,) = await store.claim_due()
            await store.record_results(
                batch, results(batch, OK, remote_mta="mx.example.net"), START + 10
            )
            (recipient,) = (await recipients_of(store, message_id)).values()
            assert recipient.state is RecipientState.DELIVERED
            assert recipient.final_at == START + 10
            assert recipient.last_reply == OK and recipient.remote_mta == "mx.example.net"
            assert recipient.attempts == 1 and recipient.lease_owner is None
            assert await store.purge_finished(START + 10 + HOUR - 1) == 0
            assert await store.purge_finished(START + 10 + HOUR) == 1
            assert await store.list_messages() == []

    run(main())


def test_temporary_failures_follow_the_schedule_and_the_last_delay_repeats(
    open_store: StoreOpener,
) -> None:
    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(new_message(), b"x")
            now = START
            waits: list[float] = []
            for _ in range(7):
                (batch,) = await store.claim_due(now)
                await store.record_results(batch, results(batch, BUSY), now)
                (recipient,) = (await recipients_of(store, message_id)).values()
                assert recipient.state is RecipientState.DEFERRED
                assert recipient.last_reply == BUSY
                waits.append(recipient.next_attempt - now)
                now = recipient.next_attempt
            assert waits == [300, 600, 1200, 2400, 3960, 3960, 3960]
            assert recipient.attempts == 7
            details = await store.show(message_id)
            assert details is not None
            deferrals = [entry for entry in details.history if entry.event == "deferred"]
            assert [entry.attempt for entry in deferrals] == list(range(1, 8))
            assert all(entry.reply == BUSY for entry in deferrals)

    run(main())


def test_jittered_retries_spread_within_ten_percent(open_store: StoreOpener) -> None:
    values = iter([0.0, 0.999999])
    policy = QueuePolicy(schedule=RetrySchedule.parse(["10m"], random=lambda: next(values)))

    async def main() -> None:
        async with open_store(policy) as store:
            ids = [await store.enqueue(new_message(), b"x") for _ in range(2)]
            for batch in await store.claim_due(limit=2):
                await store.record_results(batch, results(batch, BUSY))
            waits: list[float] = []
            for message_id in ids:
                (recipient,) = (await recipients_of(store, message_id)).values()
                waits.append(recipient.next_attempt - START)
            waits.sort()
            assert waits == pytest.approx([540.0, 660.0], abs=0.01)

    run(main())


def test_an_attempt_without_a_reply_records_status_and_diagnostic(
    open_store: StoreOpener,
) -> None:
    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(new_message(), b"x")
            (batch,) = await store.claim_due()
            await store.record_results(batch, results(batch, BUSY, remote_mta="mx[192.0.2.1]:25"))
            (recipient,) = (await recipients_of(store, message_id)).values()
            assert (recipient.last_reply, recipient.last_status) == (BUSY, "4.3.0")
            assert recipient.last_diagnostic == "451 4.3.0 try again later"
            assert recipient.last_attempt_at == START
            # A connection that failed: no reply, and the old one is not kept.
            (batch,) = await store.claim_due(START + 5 * MINUTE)
            lost = DeliveryResult(
                batch.recipients[0].id,
                Outcome.DEFERRED,
                diagnostic="connect to mx.example.net[192.0.2.1]:25: Connection refused",
            )
            await store.record_results(batch, [lost], START + 5 * MINUTE)
            (recipient,) = (await recipients_of(store, message_id)).values()
            assert recipient.last_reply is None and recipient.remote_mta is None
            assert recipient.last_status == "4.0.0"
            assert recipient.last_diagnostic is not None
            assert "Connection refused" in recipient.last_diagnostic
            assert recipient.last_attempt_at == START + 5 * MINUTE
            # A null MX: failed with the status the client determined.
            (batch,) = await store.claim_due(START + 15 * MINUTE)
            null_mx = DeliveryResult(
                batch.recipients[0].id,
                Outcome.FAILED,
                status="5.1.10",
                diagnostic="Domain example.net does not accept mail (null MX)",
            )
            await store.record_results(batch, [null_mx], START + 15 * MINUTE)
            (notice,) = await store.pending_notices()
            (failed,) = notice.recipients
            assert (failed.state, failed.last_status, failed.last_reply) == (
                RecipientState.FAILED,
                "5.1.10",
                None,
            )
            details = await store.show(message_id)
            assert details is not None
            assert [(e.event, e.status) for e in details.history if e.attempt] == [
                ("deferred", "4.3.0"),
                ("deferred", "4.0.0"),
                ("failed", "5.1.10"),
            ]

    run(main())


def test_an_explicit_next_attempt_overrides_the_schedule(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(new_message(), b"x")
            (batch,) = await store.claim_due()
            result = DeliveryResult(
                batch.recipients[0].id, Outcome.DEFERRED, BUSY, next_attempt=START + 42
            )
            await store.record_results(batch, [result])
            (recipient,) = (await recipients_of(store, message_id)).values()
            assert recipient.next_attempt == START + 42

    run(main())


def test_permanent_failure_owes_one_bounce_for_all_recipients_failed_together(
    open_store: StoreOpener,
) -> None:
    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(
                new_message(
                    "alice@example.org",
                    rcpt("x1@one.example"),
                    rcpt("x2@one.example"),
                    rcpt("x3@one.example"),
                ),
                b"x",
            )
            (batch,) = await store.claim_due()
            await store.record_results(batch, results(batch, REFUSED, remote_mta="mx.one.example"))
            notices = await store.pending_notices()
            assert len(notices) == 1
            (notice,) = notices
            assert notice.kind == "failure" and notice.message.id == message_id
            assert sorted(r.address for r in notice.recipients) == [
                "x1@one.example",
                "x2@one.example",
                "x3@one.example",
            ]
            for recipient in notice.recipients:
                assert recipient.state is RecipientState.FAILED
                assert recipient.last_reply == REFUSED and recipient.remote_mta == "mx.one.example"
                assert recipient.final_at == START
            # Asking again before it is settled hands out the same notice, not a new one.
            assert await store.pending_notices() == notices
            await store.mark_notified(notices)
            assert await store.pending_notices() == []
            # Settled and final: the message is done.
            assert await store.list_messages() == []

    run(main())


def test_separate_failures_are_separate_events(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store(fixed_policy(keep_finished=DAY)) as store:
            message_id = await store.enqueue(
                new_message("alice@example.org", rcpt("x@one.example"), rcpt("y@two.example")), b"x"
            )
            one, two = await store.claim_due()
            await store.record_results(one, results(one, REFUSED))
            await store.record_results(two, results(two, BUSY))
            (first,) = await store.pending_notices()
            assert [r.address for r in first.recipients] == ["x@one.example"]
            await store.mark_notified([first])
            # Retries of the other recipient owe nothing ...
            await attempt(store, BUSY, START + 5 * MINUTE)
            assert await store.pending_notices() == []
            # ... until it fails: one more bounce, for it alone.
            await attempt(store, REFUSED, START + 15 * MINUTE)
            (second,) = await store.pending_notices()
            assert [r.address for r in second.recipients] == ["y@two.example"]
            await store.mark_notified([second])
            recipients = await recipients_of(store, message_id)
            assert all(r.dsn_sent == frozenset({"failure"}) for r in recipients.values())
            details = await store.show(message_id)
            assert details is not None
            assert [e.event for e in details.history].count("dsn-failure") == 2

    run(main())


def test_notify_never_and_null_sender_owe_no_bounce(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            never = await store.enqueue(
                new_message(
                    "alice@example.org", rcpt("x@one.example", notify=parse_notify("NEVER"))
                ),
                b"x",
            )
            bounce = await store.enqueue(new_message("", rcpt("y@two.example")), b"bounce")
            await attempt(store, REFUSED)
            assert await store.pending_notices() == []
            # NOTIFY=NEVER: failed, settled, gone.
            assert await store.show(never) is None
            # A bounce that cannot be delivered is kept, held, for the operator.
            (held,) = (await recipients_of(store, bounce)).values()
            assert held.state is RecipientState.HELD
            assert held.held_reason is not None and "null sender" in held.held_reason
            assert held.last_reply == REFUSED
            assert await store.claim_due(START + 10 * DAY) == []
            # The operator may retry it.
            assert await store.release([bounce], START + 60) == 1
            (again,) = await store.claim_due(START + 60)
            assert again.message.id == bounce

    run(main())


def test_success_dsn_only_when_asked_and_not_relayed(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            asked = parse_notify("SUCCESS")
            wanted = await store.enqueue(
                new_message("a@example.org", rcpt("x@one.example", notify=asked)), b"x"
            )
            await store.enqueue(
                new_message("a@example.org", rcpt("y@two.example", notify=asked)), b"x"
            )
            await store.enqueue(new_message("a@example.org", rcpt("z@three.example")), b"x")
            for batch in await store.claim_due(limit=10):
                relayed = batch.destination == "relay:two.example"
                await store.record_results(batch, results(batch, OK, dsn_relayed=relayed))
            (notice,) = await store.pending_notices()
            assert (notice.kind, notice.message.id) == ("success", wanted)
            assert notice.recipients[0].state is RecipientState.DELIVERED
            await store.mark_notified([notice])
            assert await store.list_messages() == []

    run(main())


def test_lifetime_expiry_turns_a_deferral_into_a_failure(open_store: StoreOpener) -> None:
    policy = fixed_policy(lifetime=HOUR)

    async def main() -> None:
        async with open_store(policy) as store:
            message_id = await store.enqueue(new_message(), b"x")
            now = START
            for _ in range(10):
                batches = await store.claim_due(now)
                if not batches:
                    break
                for batch in batches:
                    await store.record_results(batch, results(batch, BUSY), now)
                (recipient,) = (await recipients_of(store, message_id)).values()
                if recipient.state is not RecipientState.DEFERRED:
                    break
                # The last try is at the end of the lifetime, not after it.
                assert recipient.next_attempt <= START + HOUR
                now = recipient.next_attempt
            assert recipient.state is RecipientState.FAILED
            assert now == START + HOUR
            assert recipient.last_reply == BUSY
            (notice,) = await store.pending_notices()
            assert notice.kind == "failure"
            details = await store.show(message_id)
            assert details is not None
            assert details.history[-1].event == "expired"

    run(main())


def test_bounce_lifetime_applies_to_null_sender_messages(open_store: StoreOpener) -> None:
    policy = fixed_policy(lifetime=DAY, bounce_lifetime=10 * MINUTE)

    async def main() -> None:
        async with open_store(policy) as store:
            bounce = await store.enqueue(new_message(""), b"bounce")
            normal = await store.enqueue(new_message("a@example.org"), b"x")
            await attempt(store, BUSY, START)
            await attempt(store, BUSY, START + 5 * MINUTE)
            await attempt(store, BUSY, START + 10 * MINUTE)
            (held,) = (await recipients_of(store, bounce)).values()
            assert held.state is RecipientState.HELD  # expired; a bounce is never bounced
            (deferred,) = (await recipients_of(store, normal)).values()
            assert deferred.state is RecipientState.DEFERRED
            assert await store.pending_notices() == []

    run(main())


def test_delay_warnings_are_off_by_default(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            await store.enqueue(new_message(), b"x")
            now = START
            for _ in range(8):
                await attempt(store, BUSY, now)
                now += 2 * HOUR
            assert await store.pending_notices() == []

    run(main())


def test_a_delay_warning_is_reported_once(open_store: StoreOpener) -> None:
    policy = fixed_policy(delay_warning=30 * MINUTE, keep_finished=DAY)

    async def main() -> None:
        async with open_store(policy) as store:
            message_id = await store.enqueue(
                new_message("a@example.org", rcpt("x@one.example"), rcpt("y@one.example")), b"x"
            )
            await attempt(store, BUSY, START)  # +5m
            await attempt(store, BUSY, START + 5 * MINUTE)  # +10m
            assert await store.pending_notices() == []
            await attempt(store, BUSY, START + 15 * MINUTE)  # +20m
            assert await store.pending_notices() == []
            await attempt(store, BUSY, START + 35 * MINUTE)  # older than 30 minutes now
            (notice,) = await store.pending_notices()
            assert notice.kind == "delay" and len(notice.recipients) == 2
            assert all(r.state is RecipientState.DEFERRED for r in notice.recipients)
            await store.mark_notified([notice])
            await attempt(store, BUSY, START + 80 * MINUTE)
            assert await store.pending_notices() == []
            # The final failure is still reported.
            await attempt(store, REFUSED, START + 150 * MINUTE)
            (failure,) = await store.pending_notices()
            assert failure.kind == "failure" and failure.message.id == message_id
            assert all(r.dsn_sent == frozenset({"delay"}) for r in failure.recipients)

    run(main())


def test_a_later_event_supersedes_an_unproduced_delay_warning(open_store: StoreOpener) -> None:
    policy = fixed_policy(delay_warning=1.0)

    async def main() -> None:
        async with open_store(policy) as store:
            await store.enqueue(new_message(), b"x")
            await attempt(store, BUSY, START + 2)
            (stale,) = await store.pending_notices()
            assert stale.kind == "delay"
            await attempt(store, REFUSED, START + 5 * MINUTE + 2)
            (notice,) = await store.pending_notices()
            assert notice.kind == "failure"
            # Settling the stale notice does not settle the failure.
            await store.mark_notified([stale])
            assert await store.pending_notices() == [notice]

    run(main())


def test_a_dsn_enqueued_with_settles_settles_its_notice(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            original = await store.enqueue(new_message("alice@example.org"), b"x")
            await attempt(store, REFUSED)
            (notice,) = await store.pending_notices()
            dsn = await store.enqueue(
                NewMessage("", [rcpt("alice@example.org")]), b"the bounce", settles=[notice]
            )
            assert await store.pending_notices() == []
            listed = [m.id for m in await store.list_messages()]
            assert listed == [dsn]  # the original is finished and gone
            assert original not in listed

    run(main())


def test_two_instances_queue_one_report_per_notice(open_store: StoreOpener) -> None:
    """Both instances read the same notice (the producer's role changed hands between
    their reads): both build the report, one enqueue commits, the other is refused and
    leaves nothing behind."""

    async def main() -> None:
        async with open_store() as first, open_store() as second:
            await first.enqueue(new_message("alice@example.org"), b"x")
            await attempt(first, REFUSED)
            (notice,) = await first.pending_notices()
            assert await second.pending_notices() == [notice]
            outcomes = await asyncio.gather(
                *(
                    store.enqueue(
                        NewMessage("", [rcpt("alice@example.org")]), b"report", settles=[notice]
                    )
                    for store in (first, second)
                ),
                return_exceptions=True,
            )
            refused = [item for item in outcomes if isinstance(item, NoticeSettled)]
            queued = [item for item in outcomes if isinstance(item, str)]
            assert len(refused) == 1 and len(queued) == 1, outcomes
            assert [m.id for m in await second.list_messages()] == queued
            assert await second.pending_notices() == []
            # Settled afterwards: refused too, also on its own.
            with pytest.raises(NoticeSettled):
                await first.enqueue(
                    NewMessage("", [rcpt("alice@example.org")]), b"r", settles=[notice]
                )
            assert [m.id for m in await first.list_messages()] == queued

    run(main())


def test_one_instance_at_a_time_is_the_notice_producer(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as first:
            async with open_store() as second:
                assert await first.claim_notice_producer() is True
                assert await first.claim_notice_producer() is True  # kept
                assert await second.claim_notice_producer() is False
            # The holder closes: the role passes on to the next to ask.
            async with open_store() as third:
                assert await third.claim_notice_producer() is False
                await first.aclose()
                assert await third.claim_notice_producer() is True

    run(main())


def test_destination_slots_are_shared_by_the_instances(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as first, open_store() as second:
            one = first.destination_slot("relay:example.net", 2)
            two = second.destination_slot("relay:example.net", 2)
            await one.__aenter__()
            await two.__aenter__()
            # Both slots taken, by two instances: a third delivery waits...
            third = asyncio.ensure_future(
                first.destination_slot("relay:example.net", 2).__aenter__()
            )
            # ... while another destination has slots of its own.
            async with second.destination_slot("relay:example.org", 2):
                pass
            await asyncio.sleep(0.3)
            assert not third.done()
            # A slot freed by the other instance is noticed (polled: within 0.25 s).
            await two.__aexit__(None, None, None)
            await asyncio.wait_for(third, 2)
            await one.__aexit__(None, None, None)

    run(main())


# --- operators -----------------------------------------------------------------------------------


def test_hold_and_release(open_store: StoreOpener, clock: Clock) -> None:
    async def main() -> None:
        async with open_store() as store:
            held_id = await store.enqueue(new_message(), b"x")
            other = await store.enqueue(new_message(), b"y")
            assert await store.hold([held_id], "suspicious") == 1
            assert await store.hold([held_id]) == 0  # already held
            (recipient,) = (await recipients_of(store, held_id)).values()
            assert (recipient.state, recipient.held_reason) == (RecipientState.HELD, "suspicious")
            (batch,) = await store.claim_due(START + DAY)
            assert batch.message.id == other
            assert await store.release([held_id], START + 100) == 1
            (recipient,) = (await recipients_of(store, held_id)).values()
            assert recipient.state is RecipientState.QUEUED and recipient.held_reason is None
            assert recipient.next_attempt == START + 100
            (batch,) = await store.claim_due(START + 100)
            assert batch.message.id == held_id
            details = await store.show(held_id)
            assert details is not None
            assert [e.event for e in details.history] == ["enqueued", "held", "released"]
            assert details.history[1].detail == "suspicious"

    run(main())


def test_hold_while_an_attempt_runs(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(
                new_message("a@example.org", rcpt("x@one.example"), rcpt("y@two.example")), b"x"
            )
            one, two = await store.claim_due()
            await store.hold([message_id])
            # A deferral keeps it held; a delivery that happened anyway is recorded.
            await store.record_results(one, results(one, BUSY))
            await store.record_results(two, results(two, OK))
            states = {
                r.address: (r.state, r.attempts)
                for r in (await recipients_of(store, message_id)).values()
            }
            assert states == {
                "x@one.example": (RecipientState.HELD, 1),
                "y@two.example": (RecipientState.DELIVERED, 1),
            }

    run(main())


def test_flush_makes_deferred_mail_due_now(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            one = await store.enqueue(new_message("a@example.org", rcpt("x@one.example")), b"x")
            two = await store.enqueue(
                new_message("a@example.org", rcpt("y@two.example"), rcpt("z@three.example")), b"x"
            )
            await attempt(store, BUSY)
            now = START + 60
            assert await store.claim_due(now) == []
            assert await store.flush(domain="ONE.example", now=now) == 1
            (batch,) = await store.claim_due(now)
            assert batch.message.id == one
            await store.release_claim(batch)
            assert await store.flush(ids=[two], now=now) == 2
            # The released claim of `one` is due as well.
            assert len(await attempt(store, BUSY, now)) == 3
            assert await store.flush(now=now + 1) == 3  # everything
            assert len(await store.claim_due(now + 1, limit=10)) == 3
            details = await store.show(two)
            assert details is not None and "flushed" in [e.event for e in details.history]

    run(main())


def test_delete_removes_message_body_and_history(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            gone = await store.enqueue(new_message(), b"x")
            kept = await store.enqueue(new_message(), b"y")
            (batch, _) = await store.claim_due(limit=10)
            assert batch.message.id == gone
            assert await store.delete([gone, "NO-SUCH-ID"]) == 1
            assert await store.show(gone) is None
            with pytest.raises(KeyError):
                await body_of(store, gone)
            # A worker finishing the deleted message changes nothing.
            assert await store.record_results(batch, results(batch, OK)) == 0
            assert [m.id for m in await store.list_messages()] == [kept]
            assert await store.delete([]) == 0

    run(main())


def test_bounce_now_fails_with_a_reason_and_owes_a_dsn(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(
                new_message("alice@example.org", rcpt("x@one.example"), rcpt("y@two.example")), b"x"
            )
            null = await store.enqueue(new_message("", rcpt("z@three.example")), b"bounce")
            (one, _, _) = await store.claim_due(limit=10)
            await store.record_results(one, results(one, OK))
            assert await store.bounce([message_id, null], "spam run, cancelled") == 2
            (notice,) = await store.pending_notices()
            assert notice.kind == "failure" and notice.message.id == message_id
            (failed,) = notice.recipients
            assert failed.address == "y@two.example" and failed.state is RecipientState.FAILED
            assert failed.last_reply is None  # no server said anything
            assert failed.last_status == "5.0.0"
            assert failed.last_diagnostic == "spam run, cancelled"
            details = await store.show(message_id)
            assert details is not None
            (bounced,) = [e for e in details.history if e.event == "bounced"]
            assert (bounced.recipient, bounced.reply, bounced.status) == (
                "y@two.example",
                None,
                "5.0.0",
            )
            assert bounced.detail is not None and "spam run, cancelled" in bounced.detail
            # The operator's bounce of a bounce fails it without a DSN: it is finished.
            assert await store.show(null) is None
            assert await store.bounce([message_id]) == 0  # nothing left to bounce

    run(main())


def test_list_filters(open_store: StoreOpener, clock: Clock) -> None:
    async def main() -> None:
        async with open_store() as store:
            first = await store.enqueue(new_message("a@example.org", rcpt("x@one.example")), b"x")
            clock.advance(1)
            second = await store.enqueue(
                new_message("a@example.org", rcpt("y@two.example"), rcpt("z@one.example")), b"x"
            )
            clock.advance(1)
            third = await store.enqueue(new_message("a@example.org", rcpt("w@three.example")), b"x")
            await store.hold([third])

            async def ids(criteria: QueueFilter) -> list[str]:
                return [m.id for m in await store.list_messages(criteria)]

            assert await ids(QueueFilter()) == [first, second, third]
            assert await ids(QueueFilter(domain="One.Example")) == [first, second]
            assert await ids(QueueFilter(states=frozenset({RecipientState.HELD}))) == [third]
            assert (
                await ids(
                    QueueFilter(states=frozenset({RecipientState.QUEUED}), domain="three.example")
                )
                == []
            )
            assert await ids(QueueFilter(ids=(third, first))) == [first, third]
            assert await ids(QueueFilter(ids=())) == []
            assert await ids(QueueFilter(limit=2)) == [first, second]
            (listed,) = await store.list_messages(QueueFilter(ids=(second,)))
            assert [r.address for r in listed.recipients] == ["y@two.example", "z@one.example"]

    run(main())


def test_stats_count_states_and_age_per_domain(open_store: StoreOpener, clock: Clock) -> None:
    async def main() -> None:
        async with open_store(fixed_policy(keep_finished=DAY)) as store:
            await store.enqueue(
                new_message("a@example.org", rcpt("x@one.example"), rcpt("y@two.example")),
                b"x",
            )
            clock.advance(30 * MINUTE)
            held = await store.enqueue(new_message("a@example.org", rcpt("z@one.example")), b"x")
            await store.hold([held])
            clock.advance(29 * MINUTE)
            fresh = await store.enqueue(new_message("a@example.org", rcpt("w@three.example")), b"x")
            batches = await store.claim_due(clock(), limit=10)
            for each in batches:
                reply = OK if each.message.id == fresh else BUSY
                await store.record_results(each, results(each, reply))
            stats = await store.stats(START + HOUR)
            assert stats.messages == 3
            assert stats.oldest == START
            assert stats.by_state == {
                RecipientState.QUEUED: 0,
                RecipientState.DEFERRED: 2,
                RecipientState.HELD: 1,
                RecipientState.DELIVERED: 1,
                RecipientState.FAILED: 0,
            }
            labels = stats.bucket_labels
            assert labels == ("5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+")
            one = dict(zip(labels, stats.by_domain["one.example"], strict=True))
            assert one["80"] == 1 and one["40"] == 1 and sum(one.values()) == 2
            assert dict(zip(labels, stats.by_domain["two.example"], strict=True))["80"] == 1
            assert "three.example" not in stats.by_domain  # delivered: not in the queue shape
            assert list(stats.by_domain) == sorted(stats.by_domain)

    run(main())


# --- persistence and change notification ---------------------------------------------------------


def test_reopen_keeps_everything_and_returns_claims(open_store: StoreOpener, clock: Clock) -> None:
    async def main() -> None:
        async with open_store() as store:
            message_id = await store.enqueue(new_message(), b"persistent")
            (batch,) = await store.claim_due()
            assert batch.message.id == message_id
        # The instance that held the claim is gone (closed): reopening returns its claim
        # at once, without waiting for the lease to expire.
        async with open_store() as store:
            (again,) = await store.claim_due()
            assert again.message.id == message_id
            assert await body_of(store, message_id) == b"persistent"
            await store.record_results(again, results(again, BUSY))
        async with open_store() as store:
            (recipient,) = (await recipients_of(store, message_id)).values()
            assert recipient.state is RecipientState.DEFERRED and recipient.attempts == 1
            details = await store.show(message_id)
            assert details is not None and [e.event for e in details.history] == [
                "enqueued",
                "deferred",
            ]

    run(main())


def test_a_second_live_instance_does_not_steal_claims(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as first:
            await first.enqueue(new_message(), b"x")
            (batch,) = await first.claim_due()
            async with open_store() as second:
                assert await second.claim_due() == []
                assert len(await second.list_messages()) == 1
            assert await first.record_results(batch, results(batch, OK)) == 1

    run(main())


def test_wait_for_change_sees_local_and_other_instances_changes(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store, open_store() as other:
            assert await store.wait_for_change(0.05) is False
            seen = store.change_count
            message_id = await store.enqueue(new_message(), b"x")
            # A change since `seen` returns at once.
            assert await store.wait_for_change(5, seen) is True
            loop = asyncio.get_running_loop()
            start = loop.time()
            waiter = asyncio.create_task(store.wait_for_change(5))
            await asyncio.sleep(0.1)
            await other.hold([message_id])
            assert await waiter is True
            assert loop.time() - start < 1.0
            # The same the other way round.
            waiter = asyncio.create_task(other.wait_for_change(5))
            await asyncio.sleep(0.1)
            await store.release([message_id])
            assert await waiter is True
            # A change made just before the wait began is not missed.
            seen = other.change_count
            await store.hold([message_id])
            assert await other.wait_for_change(5, seen) is True
        # Closing wakes a waiter, which reports no change (a store that has made no
        # change of its own, and nobody else writes: no echo of a commit can come).
        async with open_store() as quiet:
            waiter = asyncio.create_task(quiet.wait_for_change(30))
            await asyncio.sleep(0.1)
            await quiet.aclose()
            assert await asyncio.wait_for(waiter, 5) is False

    run(main())


def test_a_closed_store_refuses_work(open_store: StoreOpener) -> None:
    async def main() -> None:
        async with open_store() as store:
            pass
        await store.aclose()  # idempotent
        with pytest.raises(Exception, match="closed"):
            await store.enqueue(new_message(), b"x")

    run(main())
