"""What the PostgreSQL backend does beyond the shared suite (tests/queue/test_store.py
runs against it too): several nodes on one queue, lease fencing, dead nodes' claims,
schema migrations, a 50 MB body.

Every test uses a real server: the session's database (see conftest.py) and a schema
of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import queue
import signal
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from tests.queue.backends import drop_schemas, schema_name
from tests.queue.conftest import START, Clock, fixed_policy
from tests.queue.test_crash import DELIVERY_CHILD, read_lines, start_child
from tests.queue.test_store import BUSY, OK, new_message, rcpt, results

from mailgate.queue import QueueError, RecipientState
from mailgate.queue.postgres import (
    BODY_CHUNK,
    SCHEMA_VERSION,
    PostgresQueueStore,
    migrate,
)

MINUTE = 60.0


@pytest.fixture
def schema(postgres_dsn: str, tmp_path: Path) -> Iterator[str]:
    """This test's queue schema (the one open_backend uses for ``tmp_path / "queue"``)."""
    yield schema_name(tmp_path / "queue")
    asyncio.run(drop_schemas(postgres_dsn))


async def open_node(
    dsn: str, schema: str, clock: Clock | None = None, **options: object
) -> PostgresQueueStore:
    return await PostgresQueueStore.open(
        dsn,
        schema=schema,
        policy=fixed_policy(lease_time=MINUTE),
        clock=clock if clock is not None else Clock(),
        migrate=True,
        **options,  # type: ignore[arg-type]
    )


def node_id(store: PostgresQueueStore) -> int:
    return int(store.instance.rsplit(":", 1)[1])


def test_two_nodes_claiming_at_once_never_get_the_same_recipient(
    postgres_dsn: str, schema: str
) -> None:
    async def main() -> None:
        clock = Clock()
        first = await open_node(postgres_dsn, schema, clock)
        second = await open_node(postgres_dsn, schema, clock)
        try:
            assert first.instance != second.instance
            for n in range(60):
                await first.enqueue(
                    new_message(
                        "a@example.org",
                        *(rcpt(f"u{n}-{k}@d{k % 3}.example") for k in range(5)),
                    ),
                    b"x",
                )
            claimed: dict[int, str] = {}
            duplicates: list[int] = []

            async def worker(store: PostgresQueueStore) -> None:
                # Small claims, many of them, from both nodes at once.
                for _ in range(500):
                    batches = await store.claim_due(limit=3, max_recipients=1)
                    if not batches:
                        return
                    for batch in batches:
                        for recipient in batch.recipients:
                            if recipient.id in claimed:
                                duplicates.append(recipient.id)
                            claimed[recipient.id] = store.instance

            await asyncio.gather(*(worker(store) for store in (first, second) for _ in range(3)))
            assert duplicates == []
            assert len(claimed) == 300
            owners = set(claimed.values())
            assert owners == {first.instance, second.instance}  # both did some of the work
            messages = await first.list_messages()
            leased = [r for m in messages for r in m.recipients]
            assert all(claimed[r.id] == r.lease_owner for r in leased)
        finally:
            await first.aclose()
            await second.aclose()

    asyncio.run(main())


def test_a_node_that_lost_its_lease_cannot_overwrite_the_new_owners_result(
    postgres_dsn: str, schema: str
) -> None:
    async def main() -> None:
        clock = Clock()
        slow = await open_node(postgres_dsn, schema, clock)
        other = await open_node(postgres_dsn, schema, clock)
        try:
            message_id = await slow.enqueue(new_message(), b"x")
            (stale,) = await slow.claim_due()
            # The lease runs out while the slow node is still busy: another takes over.
            clock.advance(MINUTE + 1)
            (taken,) = await other.claim_due()
            assert taken.recipients[0].id == stale.recipients[0].id
            assert taken.lease.id > stale.lease.id
            assert taken.lease.owner == other.instance
            # The fence: every write on the lost lease's behalf is refused.
            assert await slow.renew_lease(stale) is None
            assert await slow.record_results(stale, results(stale, OK)) == 0
            assert await slow.release_claim(stale) == 0
            assert await other.record_results(taken, results(taken, BUSY)) == 1
            (message,) = await other.list_messages()
            (recipient,) = message.recipients
            assert (recipient.state, recipient.attempts) == (RecipientState.DEFERRED, 1)
            assert recipient.last_reply == BUSY and recipient.lease_owner is None
            details = await other.show(message_id)
            assert details is not None
            assert [e.event for e in details.history] == ["enqueued", "deferred"]
        finally:
            await slow.aclose()
            await other.aclose()

    asyncio.run(main())


def test_a_killed_nodes_claims_go_to_a_live_node_without_waiting_for_expiry(
    postgres_dsn: str, schema: str, tmp_path: Path
) -> None:
    location = tmp_path / "queue"

    async def main() -> None:
        # The real clock: the killed child uses it for its leases (15 minutes).
        live = await PostgresQueueStore.open(
            postgres_dsn, schema=schema, migrate=True, reap_interval=0.1
        )
        try:
            for n in range(10):
                await live.enqueue(
                    new_message("a@example.org", rcpt(f"x{n}@one.example")), f"body {n}".encode()
                )
            child = start_child(DELIVERY_CHILD, "postgresql", str(location), "3")
            lines: queue.Queue[str | None] = queue.Queue()
            reader = read_lines(child.stdout, lines)
            try:
                first = await asyncio.to_thread(lines.get, True, 30)
                assert first == "claimed 10\n", child.stderr.read() if child.stderr else ""
                while (await asyncio.to_thread(lines.get, True, 30)) != "ready\n":
                    pass
                # Alive, it keeps its claims, through several rounds of the reaper.
                await asyncio.sleep(0.3)
                assert await live.claim_due() == []
                seen = live.change_count
            finally:
                child.send_signal(signal.SIGKILL)
                await asyncio.to_thread(child.wait, 30)
                reader.join(timeout=30)
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            # The reaper returns them and says so: the idle node wakes up.
            assert await live.wait_for_change(10, seen) is True
            assert loop.time() - killed_at < 2.0
            batches = await live.claim_due(limit=100)
            assert len(batches) == 7  # three were delivered before the kill
            assert all(batch.lease.owner == live.instance for batch in batches)
        finally:
            await live.aclose()

    asyncio.run(main())


def test_a_node_whose_connection_drops_comes_back_as_a_new_node(
    postgres_dsn: str, schema: str
) -> None:
    async def main() -> None:
        clock = Clock()
        dropped = await open_node(postgres_dsn, schema, clock)
        other = await open_node(postgres_dsn, schema, clock, reap_interval=0.1)
        try:
            message_id = await dropped.enqueue(new_message(), b"x")
            (batch,) = await dropped.claim_due()
            old_name = dropped.instance
            admin = await asyncpg.connect(postgres_dsn)
            try:
                pids = await admin.fetch(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = $1::oid "
                    "AND objsubid = 2 AND granted",
                    node_id(dropped),
                )
                assert len(pids) == 1
                await admin.execute("SELECT pg_terminate_backend($1)", pids[0]["pid"])
            finally:
                await admin.close()
            # The others see a dead node and take its claim over at once.
            for _ in range(100):
                if await other.claim_due():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the dropped node's claim was not returned")
            # The dropped node is back under a new name, its old lease fenced off.
            for _ in range(100):
                if dropped.instance != old_name:
                    break
                await asyncio.sleep(0.05)
            assert dropped.instance != old_name
            assert await dropped.record_results(batch, results(batch, OK)) == 0
            # And it hears the others again.
            seen = dropped.change_count
            await other.hold([message_id])
            assert await dropped.wait_for_change(5, seen) is True
        finally:
            await dropped.aclose()
            await other.aclose()

    asyncio.run(main())


def test_migrations_are_versioned_and_required(postgres_dsn: str, schema: str) -> None:
    async def main() -> None:
        with pytest.raises(QueueError, match="migrate"):
            await PostgresQueueStore.open(postgres_dsn, schema=schema)
        # Several nodes starting at once: one migrates, the others wait and find it done.
        assert (
            await asyncio.gather(*(migrate(postgres_dsn, schema=schema) for _ in range(3)))
            == [SCHEMA_VERSION] * 3
        )
        assert await migrate(postgres_dsn, schema=schema) == SCHEMA_VERSION
        connection = await asyncpg.connect(postgres_dsn)
        try:
            versions = await connection.fetch(
                f'SELECT version FROM "{schema}".schema_version ORDER BY version'
            )
            assert [row[0] for row in versions] == list(range(1, SCHEMA_VERSION + 1))
            store = await PostgresQueueStore.open(postgres_dsn, schema=schema)
            await store.aclose()
            # A schema from a newer mailgate is refused, not misread.
            await connection.execute(
                f'INSERT INTO "{schema}".schema_version (version) VALUES ($1)', SCHEMA_VERSION + 1
            )
            with pytest.raises(QueueError, match="newer"):
                await migrate(connection, schema=schema)
            with pytest.raises(QueueError, match="version"):
                await PostgresQueueStore.open(postgres_dsn, schema=schema)
        finally:
            await connection.close()
        with pytest.raises(QueueError, match="invalid queue schema name"):
            await migrate(postgres_dsn, schema='x"; DROP TABLE y; --')

    asyncio.run(main())


def test_a_50_mb_body_is_stored_once_and_streamed_with_flat_memory(
    postgres_dsn: str, schema: str, tmp_path: Path
) -> None:
    spooled = tmp_path / "spool"
    digest = hashlib.sha256()
    size = 50 * 1000 * 1000
    with spooled.open("wb") as spool:
        written = 0
        block = 0
        while written < size:
            data = hashlib.sha512(str(block).encode()).digest() * 1024  # 64 KiB
            data = data[: size - written]
            spool.write(data)
            digest.update(data)
            written += len(data)
            block += 1

    async def main() -> None:
        store = await open_node(postgres_dsn, schema)
        try:
            tracemalloc.start()
            try:
                message_id = await store.enqueue(new_message(), spooled, synced=True)
                _, enqueue_peak = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                check = hashlib.sha256()
                read = 0
                async for chunk in store.read_body(message_id):
                    check.update(chunk)
                    read += len(chunk)
                _, read_peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert read == size and check.digest() == digest.digest()
            assert enqueue_peak < 4 * 1024 * 1024, f"enqueue peak {enqueue_peak} bytes"
            assert read_peak < 4 * 1024 * 1024, f"read peak {read_peak} bytes"
            (message,) = await store.list_messages()
            assert message.info.size == size
            connection = await asyncpg.connect(postgres_dsn)
            try:
                rows, stored = await connection.fetchrow(
                    f'SELECT count(*), sum(length(data)) FROM "{schema}".bodies'
                )
            finally:
                await connection.close()
            assert (rows, stored) == (math.ceil(size / BODY_CHUNK), size)
            assert await store.delete([message_id]) == 1
            with pytest.raises(KeyError):
                async for _ in store.read_body(message_id):
                    pass
        finally:
            await store.aclose()

    asyncio.run(main())


def test_closing_returns_the_nodes_claims_and_its_registration(
    postgres_dsn: str, schema: str
) -> None:
    async def main() -> None:
        clock = Clock()
        first = await open_node(postgres_dsn, schema, clock)
        second = await open_node(postgres_dsn, schema, clock)
        try:
            await first.enqueue(new_message(), b"x")
            (batch,) = await first.claim_due()
            assert batch.lease.expires == START + MINUTE
            seen = second.change_count
            await first.aclose()
            assert await second.wait_for_change(5, seen) is True
            (again,) = await second.claim_due()
            assert again.recipients[0].id == batch.recipients[0].id
            connection = await asyncpg.connect(postgres_dsn)
            try:
                nodes = await connection.fetch(f'SELECT name FROM "{schema}".nodes')
            finally:
                await connection.close()
            assert [row[0] for row in nodes] == [second.instance]
        finally:
            await first.aclose()
            await second.aclose()

    asyncio.run(main())
