"""What only the SQLite backend has: body files in the queue directory (and small bodies
in their rows), their crash recovery across processes, the database settings."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.queue.conftest import Clock, fixed_policy
from tests.queue.test_store import body_of, new_message, rcpt

from mailgate.queue import NewMessage, NewRecipient, QueueError, RecipientState, SQLiteQueueStore
from mailgate.queue.bodies import BodyDirectory
from mailgate.queue.sqlite import INLINE_BODY_LIMIT, SCHEMA_VERSION, new_message_id

#: A body given as bytes that is too large for its row: a file in bodies/.
LARGE = b"L" * (INLINE_BODY_LIMIT + 1)


async def _open(path: Path, clock: Clock) -> SQLiteQueueStore:
    return await SQLiteQueueStore.open(path, policy=fixed_policy(), clock=clock)


def test_body_is_stored_once_and_a_spooled_file_is_linked(tmp_path: Path, clock: Clock) -> None:
    queue = tmp_path / "queue"
    spool = tmp_path / "spool"
    spool.write_bytes(b"x" * 5000)

    async def main() -> None:
        store = await _open(queue, clock)
        try:
            message_id = await store.enqueue(
                new_message(
                    "a@example.org",
                    rcpt("x@one.example"),
                    rcpt("y@one.example"),
                    rcpt("z@two.example"),
                    rcpt("w@three.example", "forward:smtp://smarthost.example"),
                ),
                spool,
                synced=True,
            )
            assert sorted(os.listdir(queue / "bodies")) == [message_id]
            # Same file system: the spooled file is linked, not copied.
            assert os.stat(store.body_path(message_id)).st_ino == os.stat(spool).st_ino
            assert os.stat(spool).st_nlink == 2  # the spool's name and the queue's
            assert list((queue / "tmp" / store.instance).iterdir()) == []
        finally:
            await store.aclose()

    asyncio.run(main())


def test_database_is_in_wal_mode_with_full_sync(tmp_path: Path, clock: Clock) -> None:
    async def main() -> None:
        store = await _open(tmp_path / "queue", clock)
        try:
            await store.enqueue(new_message(), b"x")

            def pragmas(connection: sqlite3.Connection) -> tuple[str, int]:
                mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
                sync = connection.execute("PRAGMA synchronous").fetchone()[0]
                return str(mode), int(sync)

            assert await store._write(pragmas, signals=False) == ("wal", 2)  # 2 = FULL
        finally:
            await store.aclose()

    asyncio.run(main())


def test_open_removes_bodies_of_enqueues_that_never_committed(tmp_path: Path, clock: Clock) -> None:
    queue = tmp_path / "queue"

    async def main() -> None:
        store = await _open(queue, clock)
        kept = await store.enqueue(new_message(), LARGE)
        await store.aclose()
        # A process that died after linking a body but before its commit: its lock is
        # free, its staging directory still names the body.
        dead = "deadhost-1-00000000"
        (queue / "tmp" / dead).mkdir()
        (queue / "tmp" / f"{dead}.lock").touch()
        (queue / "tmp" / dead / "DEADBODY").write_bytes(b"half")
        os.link(queue / "tmp" / dead / "DEADBODY", queue / "bodies" / "DEADBODY")
        # ... a committed enqueue whose staging name survived the crash ...
        os.link(queue / "bodies" / kept, queue / "tmp" / dead / kept)
        # ... a delete that removed the rows but not the file, and a staging directory
        # whose lock file was never created.
        (queue / "bodies" / "LEFTOVER").write_bytes(b"gone")
        (queue / "tmp" / "nolock-2-00000000").mkdir()
        # A hidden lock file of an instance that died before naming it (from an earlier
        # run: a young one may belong to an instance starting right now, and stays).
        old_hidden = queue / "tmp" / ".unnamed-3-00000000.new"
        old_hidden.touch()
        os.utime(old_hidden, (time.time() - 60, time.time() - 60))
        young_hidden = queue / "tmp" / ".starting-4-00000000.0.new"
        young_hidden.touch()
        store = await _open(queue, clock)
        try:
            assert sorted(os.listdir(queue / "bodies")) == [kept]
            assert os.stat(queue / "bodies" / kept).st_nlink == 1
            assert sorted(os.listdir(queue / "tmp")) == sorted(
                [young_hidden.name, store.instance, f"{store.instance}.lock"]
            )
            assert [m.id for m in await store.list_messages()] == [kept]
        finally:
            await store.aclose()

    asyncio.run(main())


def test_open_leaves_a_live_process_enqueue_alone(tmp_path: Path, clock: Clock) -> None:
    queue = tmp_path / "queue"

    async def main() -> None:
        # Another live instance (its lock is held) has linked a body and not committed.
        other = BodyDirectory(queue)
        try:
            other.stage_bytes("INFLIGHT", b"being committed")
            store = await _open(queue, clock)
            await store.aclose()
            assert (queue / "bodies" / "INFLIGHT").read_bytes() == b"being committed"
            assert (queue / "tmp" / other.instance / "INFLIGHT").exists()
        finally:
            other.close()
        # Once that instance is gone without committing, the body is an orphan.
        store = await _open(queue, clock)
        await store.aclose()
        assert not (queue / "bodies" / "INFLIGHT").exists()

    asyncio.run(main())


def test_a_message_whose_body_vanished_is_held(tmp_path: Path, clock: Clock) -> None:
    queue = tmp_path / "queue"

    async def main() -> None:
        store = await _open(queue, clock)
        message_id = await store.enqueue(new_message(), LARGE)  # a file, not in the row
        await store.aclose()
        (queue / "bodies" / message_id).unlink()
        store = await _open(queue, clock)
        try:
            ((recipient,),) = [m.recipients for m in await store.list_messages()]
            assert recipient.state is RecipientState.HELD
            assert recipient.held_reason == "body file missing"
            assert await store.claim_due() == []
        finally:
            await store.aclose()

    asyncio.run(main())


def test_an_unknown_schema_version_is_refused(tmp_path: Path, clock: Clock) -> None:
    queue = tmp_path / "queue"

    async def create() -> None:
        store = await _open(queue, clock)
        await store.aclose()

    asyncio.run(create())
    with sqlite3.connect(queue / "queue.db") as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(QueueError, match="schema version 99"):
        asyncio.run(_open(queue, clock))
    # The failed open left no lock or staging directory behind.
    assert list((queue / "tmp").iterdir()) == []


def test_a_version_1_queue_is_migrated_and_keeps_its_messages(tmp_path: Path, clock: Clock) -> None:
    queue = tmp_path / "queue"

    async def create() -> str:
        store = await _open(queue, clock)
        try:
            return await store.enqueue(
                NewMessage("a@example.org", [NewRecipient("b@example.net", "relay:example.net")]),
                LARGE,
            )
        finally:
            await store.aclose()

    old_id = asyncio.run(create())
    # Back to the first release's schema: no REQUIRETLS columns, version 1.
    with sqlite3.connect(queue / "queue.db") as connection:
        connection.execute("ALTER TABLE messages DROP COLUMN require_tls")
        connection.execute("ALTER TABLE messages DROP COLUMN tls_optional")
        connection.execute("ALTER TABLE messages DROP COLUMN body")
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")

    async def reopen() -> None:
        store = await _open(queue, clock)
        try:
            new_id = await store.enqueue(
                NewMessage(
                    "a@example.org",
                    [NewRecipient("b@example.net", "relay:example.net")],
                    require_tls=True,
                ),
                b"new",
            )
            flags = {m.id: m.info.require_tls for m in await store.list_messages()}
            assert flags == {old_id: False, new_id: True}
            # The version 1 body (a file then, as every body was) is still read.
            assert await body_of(store, old_id) == LARGE
        finally:
            await store.aclose()

    asyncio.run(reopen())
    with sqlite3.connect(queue / "queue.db") as connection:
        (version,) = connection.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone()
    assert version == str(SCHEMA_VERSION)


def test_message_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_message_id(1_800_000_000.0 + n / 1000) for n in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000
    assert len(set(new_message_id(1.0) for _ in range(1000))) == 1000
    assert all(len(i) == 16 and i.isalnum() for i in ids)


def test_instances_must_be_opened_with_open() -> None:
    with pytest.raises(TypeError, match="open"):
        SQLiteQueueStore()


def test_a_cancelled_enqueue_leaves_no_file_behind(tmp_path: Path, clock: Clock) -> None:
    queue = tmp_path / "queue"

    async def slow() -> AsyncIterator[bytes]:
        yield b"a" * 300_000  # more than one write block: a write is under way
        await asyncio.sleep(30)
        yield b"never"

    async def main() -> None:
        store = await _open(queue, clock)
        try:
            task = asyncio.create_task(store.enqueue(new_message(), slow()))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert os.listdir(queue / "bodies") == []
            assert os.listdir(queue / "tmp" / store.instance) == []
            assert await store.list_messages() == []
        finally:
            await store.aclose()

    asyncio.run(main())


def test_instances_opening_at_the_same_moment_never_reap_each_other(tmp_path: Path) -> None:
    """Found by the server crash test with --workers 2: one worker's recovery reaped the
    other's lock file between its creation and its lock, and that worker failed to start."""
    from mailgate.queue.bodies import BodyDirectory

    root = tmp_path / "queue"
    BodyDirectory(root).close()
    errors: list[BaseException] = []

    def open_and_reap() -> None:
        for _ in range(150):
            try:
                directory = BodyDirectory(root)
                try:
                    directory.reap_dead_instances()
                finally:
                    directory.close()
            except BaseException as exc:  # collected, so the test says what went wrong
                errors.append(exc)
                return

    threads = [threading.Thread(target=open_and_reap) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)


def test_a_small_body_is_kept_in_its_row_and_comes_with_the_claim(
    tmp_path: Path, clock: Clock
) -> None:
    queue = tmp_path / "queue"
    small = b"Subject: small\r\n\r\n" + b"s" * 1000
    largest = b"x" * INLINE_BODY_LIMIT

    async def main() -> None:
        store = await _open(queue, clock)
        try:
            in_row = await store.enqueue(new_message(), small)
            at_limit = await store.enqueue(new_message(), largest)
            as_file = await store.enqueue(new_message(), LARGE)
            # Only the large one is a file; nothing is left in the staging directory.
            assert sorted(os.listdir(queue / "bodies")) == [as_file]
            assert list((queue / "tmp" / store.instance).iterdir()) == []
            assert await body_of(store, in_row) == small
            assert await body_of(store, at_limit) == largest
            assert await body_of(store, as_file) == LARGE
            sizes = {m.id: m.info.size for m in await store.list_messages()}
            assert sizes == {in_row: len(small), at_limit: len(largest), as_file: len(LARGE)}
            bodies = {batch.message.id: batch.body for batch in await store.claim_due()}
            assert bodies == {in_row: small, at_limit: largest, as_file: None}
        finally:
            await store.aclose()
        # After a restart (recovery looks for missing files): nothing is held.
        store = await _open(queue, clock)
        try:
            states = {m.id: [r.state for r in m.recipients] for m in await store.list_messages()}
            assert all(RecipientState.HELD not in s for s in states.values()), states
            assert await body_of(store, in_row) == small
            await store.delete([in_row, as_file])
            assert sorted(os.listdir(queue / "bodies")) == []
            with pytest.raises(KeyError):
                await body_of(store, in_row)
        finally:
            await store.aclose()

    asyncio.run(main())


def test_a_write_waits_for_another_process_holding_the_write_lock(
    tmp_path: Path, clock: Clock
) -> None:
    queue = tmp_path / "queue"

    async def main() -> None:
        store = await _open(queue, clock)
        try:
            await store.enqueue(new_message(), b"first")
            # Another process (a `mailgate queue` command) in a write transaction.
            other = sqlite3.connect(queue / "queue.db", isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                waiting = asyncio.ensure_future(store.enqueue(new_message(), b"second"))
                # The loop is not blocked while the write waits in the thread.
                for _ in range(5):
                    await asyncio.sleep(0.05)
                    assert not waiting.done()
            finally:
                other.execute("COMMIT")
                other.close()
            second = await asyncio.wait_for(waiting, 10)
            assert await body_of(store, second) == b"second"
            assert len(await store.list_messages()) == 2
        finally:
            await store.aclose()

    asyncio.run(main())
