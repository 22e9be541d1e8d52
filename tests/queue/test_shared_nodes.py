"""Several nodes on one PostgreSQL queue, in one test process: mailgate servers (each a
node: its own store, runner and outbound engine) delivering to real receivers on
127.0.0.x through the test DNS server. What the nodes share is checked where it shows:

* one DSN producer: a failed recipient gets one report, not one per node;
* ``[queue] destination_concurrency``: the receiving server never sees more
  transactions at once than the cap, however many nodes deliver;
* slots and the producer's role are session locks: a node whose connection drops
  frees them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import run
from tests.outbound.receivers import Receiver

from mailgate.queue.postgres import PostgresQueueStore

from .e2e import (
    Client,
    bounces,
    new_domain,
    publish_mx,
    queue_of,
    sender_domain,
    serving,
    settings,
)

pytest.importorskip("asyncpg")

RELAY_ALL = [{"recipients": ["*"], "action": "relay"}]


@pytest.fixture
def schema(postgres_dsn: str) -> Iterator[str]:
    name = f"q_nodes_{secrets.token_hex(4)}"
    yield name
    asyncio.run(_sql(postgres_dsn, f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


async def _sql(dsn: str, statement: str, *args: object) -> list[tuple[object, ...]]:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return [tuple(row) for row in await connection.fetch(statement, *args)]
    finally:
        await connection.close()


async def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate() if callable(predicate) else predicate
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def test_two_nodes_send_one_report_per_failed_recipient(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, postgres_dsn: str, schema: str
) -> None:
    domain = new_domain("pgnodes-dsn")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.81"))
    sender = f"alice@{sender_domain(dns_server, '127.0.0.82')}"
    queue = {"backend": "postgresql", "dsn": postgres_dsn, "schema": schema}
    count = 12

    async def main() -> None:
        with (
            Receiver("127.0.0.81", mx_port) as receiver,
            Receiver("127.0.0.82", mx_port) as sender_mx,
        ):
            for n in range(count):
                receiver.cue.rcpt[f"nobody{n}@{domain}"] = "550 5.1.1 no such user"
            async with contextlib.AsyncExitStack() as stack:
                nodes = [
                    await stack.enter_async_context(
                        serving(
                            **settings(tmp_path / name, dns_server, mx_port, RELAY_ALL, queue=queue)
                        )
                    )
                    for name in ("a", "b")
                ]
                # Half the mail through each node: both nodes deliver, both see notices.
                for n in range(count):
                    _, final = await Client(nodes[n % 2]).send(sender, [f"nobody{n}@{domain}"])
                    assert final is not None and final[0] == 250
                await _wait(lambda: len(bounces(sender_mx)) >= count, 20, "the reports")
                # Time for a second copy to arrive, were one produced.
                await asyncio.sleep(1.0)
                runners = [queue_of(node).runner for node in nodes]
                assert all(runner is not None for runner in runners)
                producers = [runner.reports_sent for runner in runners if runner]
                attempts = [runner.attempts for runner in runners if runner]
        reports = bounces(sender_mx)
        failed = sorted(
            line.split(b";", 1)[1].strip().decode()
            for report in reports
            for line in report.data.splitlines()
            if line.startswith(b"Final-Recipient:")
        )
        print(f"reports {len(reports)}; sent by node a/b {producers}; attempts a/b {attempts}")
        assert failed == sorted(f"nobody{n}@{domain}" for n in range(count))
        assert len(reports) == count
        # One node holds the producer's role: the other sent none.
        assert sorted(producers) == [0, count]

    run(main())


def test_two_nodes_share_a_destinations_concurrency_cap(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, postgres_dsn: str, schema: str
) -> None:
    domain = new_domain("pgnodes-cap")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.83"))
    queue = {
        "backend": "postgresql",
        "dsn": postgres_dsn,
        "schema": schema,
        "destination_concurrency": 2,
    }
    # Each node alone would open 8 sessions at once to the destination.
    outbound = {"max_concurrency_per_destination": 8, "initial_concurrency": 8}
    count = 16

    async def main() -> None:
        with Receiver("127.0.0.83", mx_port) as receiver:
            receiver.cue.data_delay = 0.3
            async with contextlib.AsyncExitStack() as stack:
                nodes = [
                    await stack.enter_async_context(
                        serving(
                            **settings(
                                tmp_path / name,
                                dns_server,
                                mx_port,
                                RELAY_ALL,
                                queue=queue,
                                outbound=outbound,
                            )
                        )
                    )
                    for name in ("a", "b")
                ]
                await asyncio.gather(
                    *(
                        Client(nodes[n % 2]).send("alice@example.org", [f"bob{n}@{domain}"])
                        for n in range(count)
                    )
                )
                await _wait(lambda: len(receiver.messages) >= count, 30, "the deliveries")
                runners = [queue_of(node).runner for node in nodes]
                attempts = [runner.attempts if runner else 0 for runner in runners]
        print(f"most transactions at once: {receiver.max_active}; attempts a/b {attempts}")
        assert len(receiver.messages) == count
        assert receiver.max_active == 2
        assert all(attempts), "both nodes delivered"

    run(main())


def test_a_dropped_connection_frees_the_nodes_slots_and_role(
    postgres_dsn: str, schema: str
) -> None:
    async def main() -> None:
        first = await PostgresQueueStore.open(
            postgres_dsn, schema=schema, migrate=True, reap_interval=0.1
        )
        second = await PostgresQueueStore.open(postgres_dsn, schema=schema, migrate=True)
        try:
            assert await first.claim_notice_producer()
            assert not await second.claim_notice_producer()
            held = first.destination_slot("relay:example.net", 1)
            await held.__aenter__()
            waiter = asyncio.ensure_future(
                second.destination_slot("relay:example.net", 1).__aenter__()
            )
            await asyncio.sleep(0.3)
            assert not waiter.done()  # the one slot is the first node's
            # The first node's sessions end, as when its host goes away: the one
            # registering it (and holding the role) and the one holding its slots.
            old_name = first.instance
            sessions = [first._listener.get_server_pid(), first._slots.get_server_pid()]  # type: ignore[union-attr]
            await _sql(
                postgres_dsn,
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid",
                sessions,
            )
            await asyncio.wait_for(waiter, 5)  # the slot is the second node's now
            await _wait(second.claim_notice_producer, 5, "the producer's role")
            # The first node is back (a new session) and finds both taken.
            await _wait(lambda: first.instance != old_name, 5, "the first node's return")
            assert not await first.claim_notice_producer()
            with contextlib.suppress(Exception):
                await held.__aexit__(None, None, None)  # its session is gone: a no-op
        finally:
            await first.aclose()
            await second.aclose()

    run(main())
