"""Crash tests: real child processes killed with SIGKILL while they enqueue or deliver,
then the store reopened. Also: a change made by another process is noticed."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.queue.backends import open_backend
from tests.queue.test_store import body_of, new_message, rcpt

import mailgate
from mailgate.queue import QueueFilter, RecipientState

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[2]
SOURCE = Path(mailgate.__file__).resolve().parents[1]
MAX_IDS = 300
MAX_SECONDS = 10.0

ENQUEUE_CHILD = r"""
import asyncio, itertools, os, sys
from pathlib import Path
from tests.queue.backends import open_backend
from mailgate.queue import NewMessage, NewRecipient

def body(n):
    return f"Subject: message {n}\r\n\r\n".encode() + bytes([65 + n % 26]) * 1024

async def main(backend, location, spool):
    store = await open_backend(backend, Path(location))
    counter = itertools.count()

    async def stream(data):
        for start in range(0, len(data), 300):
            yield data[start:start + 300]
            await asyncio.sleep(0)

    async def worker():
        while True:
            n = next(counter)
            message = NewMessage(
                "sender@example.org",
                [NewRecipient(f"r{n}@one.example", "relay:one.example"),
                 NewRecipient(f"s{n}@one.example", "relay:one.example"),
                 NewRecipient(f"t{n}@two.example", "forward:smtp://smarthost.example")],
            )
            data = body(n)
            if n % 3 == 0:
                message_id = await store.enqueue(message, data)
            elif n % 3 == 1:
                # Like the server: a spooled, fsynced file, removed once queued.
                path = Path(spool) / f"spool-{n}"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                message_id = await store.enqueue(message, path, synced=True)
                os.unlink(path)
            else:
                message_id = await store.enqueue(message, stream(data))
            sys.stdout.write(f"{message_id} {n}\n")
            sys.stdout.flush()

    await asyncio.gather(*(worker() for _ in range(8)))

asyncio.run(main(*sys.argv[1:]))
"""

DELIVERY_CHILD = r"""
import asyncio, sys, time
from pathlib import Path
from tests.queue.backends import open_backend
from mailgate.queue import DeliveryResult, RemoteReply

async def main(backend, location, record):
    store = await open_backend(backend, Path(location))
    batches = await store.claim_due(limit=1000)
    done = []
    for batch in batches[: int(record)]:
        results = [DeliveryResult.from_reply(r.id, RemoteReply(250, "2.0.0", "ok"))
                   for r in batch.recipients]
        await store.record_results(batch, results)
        done.append(f"{batch.message.id}:{batch.destination}")
    sys.stdout.write(f"claimed {len(batches)}\n" + "".join(f"done {d}\n" for d in done) + "ready\n")
    sys.stdout.flush()
    time.sleep(60)  # killed long before this ends, with its claims held

asyncio.run(main(*sys.argv[1:]))
"""

HOLD_CHILD = r"""
import asyncio, sys
from pathlib import Path
from tests.queue.backends import open_backend

async def main(backend, location, message_id):
    store = await open_backend(backend, Path(location))
    await store.hold([message_id], "held from another process")
    await store.aclose()

asyncio.run(main(*sys.argv[1:]))
"""


def child_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(SOURCE), str(REPOSITORY)])
    return environment


def start_child(code: str, *arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_environment(),
        cwd=REPOSITORY,
    )


def read_lines(stream: object, into: queue.Queue[str | None]) -> threading.Thread:
    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.put(line)
        into.put(None)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def expected_body(n: int) -> bytes:
    return f"Subject: message {n}\r\n\r\n".encode() + bytes([65 + n % 26]) * 1024


def test_kill_during_enqueue_loses_no_acknowledged_message(backend: str, tmp_path: Path) -> None:
    location = tmp_path / "queue"
    spool = tmp_path / "spool"
    spool.mkdir()
    child = start_child(ENQUEUE_CHILD, backend, str(location), str(spool))
    lines: queue.Queue[str | None] = queue.Queue()
    reader = read_lines(child.stdout, lines)
    acknowledged: dict[str, int] = {}
    deadline = time.monotonic() + MAX_SECONDS
    try:
        while len(acknowledged) < MAX_IDS and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            message_id, number = line.split()
            acknowledged[message_id] = int(number)
    finally:
        # Killed while its eight enqueuers are mid-flight.
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    reader.join(timeout=30)
    # Lines the child printed that the test had not read yet count too.
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            break
        if line is None or not line.endswith("\n"):
            continue
        message_id, number = line.split()
        acknowledged[message_id] = int(number)
    stderr = child.stderr.read() if child.stderr else ""
    assert child.returncode == -signal.SIGKILL, stderr
    assert len(acknowledged) >= 20, f"the child acknowledged only {len(acknowledged)}: {stderr}"

    async def check() -> None:
        store = await open_backend(backend, location)
        try:
            messages = {m.id: m for m in await store.list_messages()}
            missing = set(acknowledged) - set(messages)
            assert not missing, f"{len(missing)} acknowledged messages lost"
            as_files: set[str] = set()
            for message_id, message in messages.items():
                # Every message in the queue, acknowledged or caught mid-commit, is whole.
                body = await body_of(store, message_id)
                number = int(body.split(b"\r\n", 1)[0].rsplit(b" ", 1)[1])
                if number % 3:  # a path or a stream; bytes this small are in the row
                    as_files.add(message_id)
                if message_id in acknowledged:
                    assert number == acknowledged[message_id]
                assert body == expected_body(number)
                assert message.info.size == len(body)
                assert [r.state for r in message.recipients] == [RecipientState.QUEUED] * 3
                assert all(r.attempts == 0 for r in message.recipients)
            # Everything is deliverable after the restart.
            due = await store.claim_due(limit=10_000)
            assert {batch.message.id for batch in due} == set(messages)
            assert len(due) == 2 * len(messages)
            if backend == "sqlite":
                # No orphan body and no staging leftovers.
                assert set(os.listdir(location / "bodies")) == as_files
        finally:
            await store.aclose()

    asyncio.run(check())


def test_kill_during_delivery_resumes_every_pending_delivery(backend: str, tmp_path: Path) -> None:
    location = tmp_path / "queue"

    async def fill() -> list[str]:
        store = await open_backend(backend, location)
        try:
            return [
                await store.enqueue(
                    new_message(
                        "a@example.org", rcpt(f"x{n}@one.example"), rcpt(f"y{n}@two.example")
                    ),
                    f"body {n}".encode(),
                )
                for n in range(20)
            ]
        finally:
            await store.aclose()

    ids = asyncio.run(fill())
    child = start_child(DELIVERY_CHILD, backend, str(location), "10")
    lines: queue.Queue[str | None] = queue.Queue()
    reader = read_lines(child.stdout, lines)
    output: list[str] = []
    try:
        while True:
            line = lines.get(timeout=30)
            assert line is not None, child.stderr.read() if child.stderr else ""
            output.append(line.strip())
            if line.strip() == "ready":
                break
        assert output[0] == "claimed 40"
        delivered = {line.split(" ", 1)[1] for line in output if line.startswith("done ")}
        assert len(delivered) == 10

        async def while_child_lives() -> None:
            # Another process opening the queue leaves the live worker's claims alone.
            store = await open_backend(backend, location)
            try:
                assert await store.claim_due(limit=1000) == []
            finally:
                await store.aclose()

        asyncio.run(while_child_lives())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        reader.join(timeout=30)

    async def after_restart() -> None:
        store = await open_backend(backend, location)
        try:
            # Claims of the killed worker are returned at open, not after lease expiry.
            batches = await store.claim_due(limit=1000)
            keys = {f"{batch.message.id}:{batch.destination}" for batch in batches}
            assert len(batches) == 30
            assert not keys & delivered
            everything = {f"{i}:relay:{d}.example" for i in ids for d in ("one", "two")}
            assert keys | delivered == everything
            for batch in batches:
                assert all(r.attempts == 0 for r in batch.recipients)
                assert (
                    await body_of(store, batch.message.id)
                    == f"body {ids.index(batch.message.id)}".encode()
                )
            left = await store.list_messages(
                QueueFilter(states=frozenset({RecipientState.DELIVERED}))
            )
            for message in left:
                delivered_keys = {
                    f"{message.id}:{r.destination}"
                    for r in message.recipients
                    if r.state is RecipientState.DELIVERED
                }
                assert delivered_keys <= delivered
        finally:
            await store.aclose()

    asyncio.run(after_restart())


def test_a_change_by_another_process_is_noticed_within_a_second(
    backend: str, tmp_path: Path
) -> None:
    location = tmp_path / "queue"

    async def main() -> None:
        store = await open_backend(backend, location, poll_interval=0.25)
        try:
            message_id = await store.enqueue(new_message(), b"x")
            loop = asyncio.get_running_loop()
            woke_at: list[float] = []

            async def wait() -> bool:
                changed = await store.wait_for_change(30)
                woke_at.append(loop.time())
                return changed

            waiter = asyncio.create_task(wait())
            await asyncio.sleep(0.1)
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                HOLD_CHILD,
                backend,
                str(location),
                message_id,
                env=child_environment(),
                cwd=REPOSITORY,
            )
            assert await asyncio.wait_for(child.wait(), 30) == 0
            exited_at = loop.time()
            assert await asyncio.wait_for(waiter, 5) is True
            assert woke_at[0] - exited_at < 1.0
            (message,) = await store.list_messages()
            assert message.recipients[0].state is RecipientState.HELD
            assert message.recipients[0].held_reason == "held from another process"
        finally:
            await store.aclose()

    asyncio.run(main())
