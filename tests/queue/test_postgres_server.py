"""A mailgate server on the PostgreSQL queue (``[queue] backend = "postgresql"``), end to
end: routes relay to receivers on 127.0.0.x through the test DNS server, the queue lives
in the private PostgreSQL cluster of the suite (tests/queue/conftest.py), and bodies are
streamed out of the database for each delivery and each DSN. Nothing mocked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.cli.conftest import Stdin
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import run
from tests.outbound.receivers import Receiver

from mailgate import cli
from mailgate.queue import RecipientState
from mailgate.queue.postgres import DEFAULT_SCHEMA, PostgresQueueStore

from .e2e import (
    Client,
    bounces,
    message_bytes,
    new_domain,
    parsed,
    publish_mx,
    queue_of,
    sender_domain,
    serving,
    settings,
    wait_for,
)

pytest.importorskip("asyncpg")

RELAY_ALL = [{"recipients": ["*"], "action": "relay"}]


@pytest.fixture
def database(postgres_dsn: str) -> Iterator[str]:
    """The suite's database, its queue schema dropped after the test."""
    yield postgres_dsn
    asyncio.run(_drop_schema(postgres_dsn))


async def _drop_schema(dsn: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{DEFAULT_SCHEMA}" CASCADE')
    finally:
        await connection.close()


async def _committed_messages(dsn: str) -> list[str]:
    """The queued messages another session sees: only committed rows."""
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(f'SELECT id FROM "{DEFAULT_SCHEMA}".messages')
    finally:
        await connection.close()
    return [str(row["id"]) for row in rows]


def _pending_bodies(directory: Path) -> list[Path]:
    """Bodies copied out of the database for a delivery and not yet removed."""
    return sorted(directory.glob("body-*")) if directory.exists() else []


def test_accepted_after_the_commit_then_delivered(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, database: str
) -> None:
    domain = new_domain("pgrelay")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.51"))
    queue = {"backend": "postgresql", "dsn": database}

    async def main() -> None:
        with Receiver("127.0.0.51", mx_port) as receiver:
            # Deferred first, so the message is still queued when the 250 has come.
            receiver.cue.rcpt[f"bob@{domain}"] = "451 4.7.1 greylisted, try again"
            values = settings(tmp_path, dns_server, mx_port, RELAY_ALL, queue=queue)
            async with serving(**values) as server:
                plugin = queue_of(server)
                store = plugin.store
                assert isinstance(store, PostgresQueueStore)
                assert not hasattr(store, "body_path")
                replies, final = await Client(server).send(
                    "alice@example.org", [f"bob@{domain}", f"carol@{domain}"]
                )
                assert [code for code, _ in replies] == [250, 250]
                assert final is not None and final[0] == 250
                # The 250 came after the commit: a session of its own sees the message.
                [queue_id] = await _committed_messages(database)
                assert [message.id for message in await store.list_messages()] == [queue_id]

                async def deferred() -> bool:
                    [message] = await store.list_messages()
                    states = {r.address: r.state for r in message.recipients}
                    return states.get(f"bob@{domain}") is RecipientState.DEFERRED

                for _ in range(200):
                    if await deferred():
                        break
                    await asyncio.sleep(0.05)
                assert await deferred()
                receiver.cue.rcpt.clear()
                await wait_for(lambda: len(receiver.messages) == 2, what="the retried delivery")
                for _ in range(200):
                    if not await store.list_messages():
                        break
                    await asyncio.sleep(0.05)
                assert await store.list_messages() == []
                assert await _committed_messages(database) == []
                # The body copies made for the two attempts are gone.
                assert plugin.directory is not None
                assert _pending_bodies(plugin.directory) == []
        first, retried = receiver.messages
        assert first.rcpt_tos == [f"carol@{domain}"]
        assert retried.rcpt_tos == [f"bob@{domain}"]
        for message in (first, retried):
            assert message.mail_from == "alice@example.org"
            assert message.data.startswith(b"Received: from client.test")
            assert message.data.endswith(message_bytes())

    run(main())


def test_a_refused_recipient_bounces_to_the_senders_mx(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, database: str
) -> None:
    domain = new_domain("pgbounce")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.52"))
    sender = f"alice@{sender_domain(dns_server, '127.0.0.53')}"
    queue = {"backend": "postgresql", "dsn": database}

    async def main() -> None:
        with (
            Receiver("127.0.0.52", mx_port) as receiver,
            Receiver("127.0.0.53", mx_port) as sender_mx,
        ):
            receiver.cue.rcpt[f"nobody@{domain}"] = "550 5.1.1 no such user"
            values = settings(tmp_path, dns_server, mx_port, RELAY_ALL, queue=queue)
            async with serving(**values) as server:
                _, final = await Client(server).send(sender, [f"nobody@{domain}"])
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(bounces(sender_mx)) == 1, what="the bounce")
                store = queue_of(server).store
                assert store is not None
                for _ in range(200):
                    if not await store.list_messages():
                        break
                    await asyncio.sleep(0.05)
                assert await store.list_messages() == []
        assert receiver.messages == []
        [report] = bounces(sender_mx)
        assert report.rcpt_tos == [sender]
        message = parsed(report)
        assert message.get_content_type() == "multipart/report"
        parts = {part.get_content_type(): part for part in message.walk()}
        status = "\n".join(str(block) for block in parts["message/delivery-status"].get_payload())
        assert f"Final-Recipient: rfc822; nobody@{domain}" in status
        assert "Status: 5.1.1" in status
        assert "550 5.1.1 no such user" in status
        # The original (RET defaults to FULL) came out of the database into the report.
        assert b".a line that starts with a dot" in report.data

    run(main())


def test_sendmail_and_the_queue_commands_use_the_database(
    tmp_path: Path,
    database: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``mailgate sendmail`` queues into the server's database (not a SQLite file that
    no server reads) and ``mailgate queue`` shows and changes what is there."""
    config = tmp_path / "mailgate.toml"
    config.write_text(
        '[server]\nhostname = "mx.example.test"\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n'
        f'[queue]\nbackend = "postgresql"\ndsn = "{database}"\n'
        '[[routes]]\nrecipients = ["*"]\naction = "relay"\n'
    )
    monkeypatch.setattr("sys.stdin", Stdin(b"Subject: nightly\n\nAll good.\n"))
    status = cli.main(
        ["sendmail", "--config", str(config), "-v", "-f", "cron@corp.example", "bob@example.net"]
    )
    err = capsys.readouterr().err
    assert status == 0, err
    queue_id = err.strip().rpartition("queued as ")[2].split()[0]
    assert [queue_id] == asyncio.run(_committed_messages(database))
    # Nothing was written beside the configuration: the database is the queue.
    assert not (tmp_path / "state" / "queue").exists()

    status = cli.main(["queue", "list", "--json", "--config", str(config)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    [listed] = json.loads(captured.out)["messages"]
    assert listed["id"] == queue_id
    assert [r["address"] for r in listed["recipients"]] == ["bob@example.net"]

    status = cli.main(["queue", "delete", "--config", str(config), queue_id])
    assert status == 0, capsys.readouterr().err
    assert asyncio.run(_committed_messages(database)) == []
