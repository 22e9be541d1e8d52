"""The JSON API under /api/v1/: the queue over a real SQLite queue store and the honeypot
over a real capture store, through aiohttp's test client (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp.test_utils import TestClient, TestServer

from mailgate.console import Console, ConsoleSources
from mailgate.honeypot.store import CaptureStore
from mailgate.hooks import Session
from mailgate.queue import (
    DeliveryResult,
    NewMessage,
    NewRecipient,
    QueueStore,
    RemoteReply,
    SQLiteQueueStore,
)
from mailgate.server import ListenAddress, ServerOptions, SMTPServer

T = TypeVar("T")
TOKEN = "0123456789abcdef0123456789abcdef"
BUSY = RemoteReply(451, "4.3.0", "try again later")


def _console(sources: ConsoleSources, token: str | None = None) -> Console:
    server = SMTPServer(ServerOptions())
    return Console(server, ListenAddress("127.0.0.1", 0), token=token, sources=sources)


async def _with_client(console: Console, test: Callable[[TestClient[Any, Any]], Awaitable[T]]) -> T:
    async with TestClient(TestServer(console.make_app(), host="127.0.0.1")) as client:
        return await test(client)


async def _queue_with_messages(directory: Path) -> tuple[SQLiteQueueStore, list[str]]:
    store = await SQLiteQueueStore.open(directory)
    ids = []
    for sender, address in (
        ("alice@example.org", "bob@example.net"),
        ("carol@example.org", "dave@example.net"),
        ("erin@example.org", "frank@example.com"),
    ):
        domain = address.rpartition("@")[2]
        message = NewMessage(sender, [NewRecipient(address, f"relay:{domain}")])
        ids.append(await store.enqueue(message, b"Subject: test\r\n\r\nbody\r\n"))
    return store, ids


def test_queue_list_show_and_actions(tmp_path: Path) -> None:
    async def main() -> None:
        store, ids = await _queue_with_messages(tmp_path / "queue")
        try:
            await _with_client(
                _console(ConsoleSources(queue=store)), lambda c: _queue_checks(c, store, ids)
            )
        finally:
            await store.aclose()

    asyncio.run(main())


async def _queue_checks(client: TestClient[Any, Any], store: QueueStore, ids: list[str]) -> None:
    listed = await client.get("/api/v1/queue")
    assert listed.status == 200
    assert listed.headers["Content-Security-Policy"].startswith("default-src 'none'")
    messages = (await listed.json())["messages"]
    assert [m["info"]["id"] for m in messages] == ids
    assert messages[0]["info"]["sender"] == "alice@example.org"
    assert messages[0]["recipients"][0]["address"] == "bob@example.net"
    assert messages[0]["recipients"][0]["state"] == "queued"

    by_domain = await (await client.get("/api/v1/queue", params={"domain": "example.com"})).json()
    assert [m["info"]["id"] for m in by_domain["messages"]] == [ids[2]]
    limited = await (await client.get("/api/v1/queue", params={"limit": "2"})).json()
    assert len(limited["messages"]) == 2

    stats = await (await client.get("/api/v1/queue/stats")).json()
    assert stats["messages"] == 3 and stats["by_state"] == {
        "queued": 3,
        "deferred": 0,
        "held": 0,
        "delivered": 0,
        "failed": 0,
    }
    assert sum(stats["by_domain"]["example.net"].values()) == 2

    shown = await client.get(f"/api/v1/queue/{ids[0]}")
    assert shown.status == 200
    detail = await shown.json()
    assert detail["message"]["info"]["id"] == ids[0]
    assert [entry["event"] for entry in detail["history"]] == ["enqueued"]

    held = await client.post(f"/api/v1/queue/{ids[0]}/hold", json={"reason": "checking"})
    assert (held.status, await held.json()) == (200, {"recipients": 1})
    (message,) = [m for m in await store.list_messages() if m.id == ids[0]]
    assert message.recipients[0].state.value == "held"
    assert message.recipients[0].held_reason == "checking"
    only_held = await (await client.get("/api/v1/queue", params={"state": "held"})).json()
    assert [m["info"]["id"] for m in only_held["messages"]] == [ids[0]]

    released = await client.post(f"/api/v1/queue/{ids[0]}/release")
    assert await released.json() == {"recipients": 1}
    # Every recipient is due now: flushing touches none. After a failed attempt each
    # waits for its retry, and a flush makes it due again.
    assert await (await client.post(f"/api/v1/queue/{ids[1]}/flush")).json() == {"recipients": 0}
    for batch in await store.claim_due(limit=10):
        await store.record_results(
            batch, [DeliveryResult.from_reply(r.id, BUSY) for r in batch.recipients]
        )
    deferred = await (await client.get("/api/v1/queue", params={"state": "deferred"})).json()
    assert len(deferred["messages"]) == 3
    flushed = await client.post(f"/api/v1/queue/{ids[1]}/flush")
    assert await flushed.json() == {"recipients": 1}
    flushed_domain = await client.post("/api/v1/queue/flush", json={"domain": "example.com"})
    assert await flushed_domain.json() == {"recipients": 1}

    deleted = await client.delete(f"/api/v1/queue/{ids[2]}")
    assert (deleted.status, await deleted.json()) == (200, {"messages": 1})
    assert (await client.get(f"/api/v1/queue/{ids[2]}")).status == 404
    assert (await client.delete(f"/api/v1/queue/{ids[2]}")).status == 404
    assert (await client.post("/api/v1/queue/NOSUCHID/hold")).status == 404
    assert len(await store.list_messages()) == 2

    # Bad input: 400 with the reason.
    bad_state = await client.get("/api/v1/queue", params={"state": "lost"})
    assert bad_state.status == 400 and "queued" in (await bad_state.json())["error"]
    assert (await client.get("/api/v1/queue", params={"limit": "0"})).status == 400
    assert (await client.get("/api/v1/queue", params={"limit": "x"})).status == 400
    not_json = await client.post(f"/api/v1/queue/{ids[0]}/hold", data=b"reason=x")
    assert not_json.status == 400
    wrong_type = await client.post(f"/api/v1/queue/{ids[0]}/hold", json={"reason": 5})
    assert wrong_type.status == 400

    # A page of another site cannot act on the queue; nothing changed.
    forged = await client.delete(
        f"/api/v1/queue/{ids[0]}", headers={"Origin": "http://evil.example"}
    )
    assert forged.status == 403
    assert (await client.get(f"/api/v1/queue/{ids[0]}")).status == 200


def test_queue_actions_need_the_token_when_one_is_set(tmp_path: Path) -> None:
    async def main() -> None:
        store, ids = await _queue_with_messages(tmp_path / "queue")

        async def checks(client: TestClient[Any, Any]) -> None:
            assert (await client.delete(f"/api/v1/queue/{ids[0]}")).status == 401
            assert (await client.get("/api/v1/queue")).status == 401
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert (await client.delete(f"/api/v1/queue/{ids[0]}", headers=good)).status == 200

        try:
            await _with_client(_console(ConsoleSources(queue=store), token=TOKEN), checks)
            assert [m.id for m in await store.list_messages()] == ids[1:]
        finally:
            await store.aclose()

    asyncio.run(main())


def test_no_queue_and_no_honeypot(tmp_path: Path) -> None:
    async def checks(client: TestClient[Any, Any]) -> None:
        for path in ("/api/v1/queue", "/api/v1/queue/stats", "/api/v1/honeypot/sessions"):
            response = await client.get(path)
            assert response.status == 404
            assert (
                "no queue" in (await response.json())["error"]
                or "no honeypot" in (await response.json())["error"]
            )

    asyncio.run(_with_client(_console(ConsoleSources()), checks))


def _record_sessions(data_dir: Path) -> list[str]:
    """Two sessions as the honeypot records them, one with an AUTH attempt whose user
    name holds control and direction characters."""
    store = CaptureStore(data_dir, batch_seconds=0.01)
    ids = []
    try:
        for number, peer in enumerate(("192.0.2.7", "198.51.100.9")):
            session = Session(f"S{number}", peer, 40000 + number, "127.0.0.1", 25)
            store.session_opened(session)
            store.line(session, "s", b"220 mail.example ESMTP\r\n")
            store.line(session, "c", b"EHLO scanner<script>")
            if number == 0:
                store.line(session, "c", b"AUTH PLAIN ...")
                store.auth_attempt(
                    session,
                    mechanism="PLAIN",
                    username="root\x1b[31m\u202e",
                    password="hunter2",
                    outcome="refused",
                )
            store.session_closed(session, "quit")
            ids.append(session.id)
        assert store.flush()
    finally:
        store.close()
    return ids


def test_honeypot_sessions_transcript_credentials_summary(tmp_path: Path) -> None:
    ids = _record_sessions(tmp_path / "data")

    async def checks(client: TestClient[Any, Any]) -> None:
        listed = await client.get("/api/v1/honeypot/sessions")
        sessions = (await listed.json())["sessions"]
        assert sorted(s["id"] for s in sessions) == sorted(ids)
        one_ip = await (
            await client.get("/api/v1/honeypot/sessions", params={"ip": "192.0.2.0/24"})
        ).json()
        assert [s["id"] for s in one_ip["sessions"]] == [ids[0]]
        assert (await client.get("/api/v1/honeypot/sessions", params={"ip": "nope"})).status == 400
        assert (
            await client.get("/api/v1/honeypot/sessions", params={"since": "soon"})
        ).status == 400

        detail = await (await client.get(f"/api/v1/honeypot/sessions/{ids[0]}")).json()
        lines = [event["line"] for event in detail["events"]]
        assert "EHLO scanner<script>" in lines and "220 mail.example ESMTP" in lines
        assert (await client.get("/api/v1/honeypot/sessions/NOPE")).status == 404

        response = await client.get("/api/v1/honeypot/credentials")
        raw = await response.read()
        # ASCII only: the escape and the right-to-left override arrive as \\u escapes.
        assert b"\\u001b" in raw and b"\\u202e" in raw and raw.isascii()
        (credential,) = (await response.json())["credentials"]
        assert credential["username"] == "root\x1b[31m\u202e"
        assert credential["password"] == "hunter2"
        assert credential["peer_ip"] == "192.0.2.7" and credential["outcome"] == "refused"

        summary = await (await client.get("/api/v1/honeypot/summary", params={"top": "5"})).json()
        assert summary["sessions"] == 2 and summary["auth_attempts"] == 1
        assert summary["top"]["passwords"] == [{"value": "hunter2", "count": 1}]

    asyncio.run(_with_client(_console(ConsoleSources(honeypot_dir=tmp_path / "data")), checks))


def test_queue_gauges_in_metrics(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async def main() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        store, ids = await _queue_with_messages(tmp_path / "queue")
        await store.hold([ids[0]])

        async def scrape(client: TestClient[Any, Any]) -> str:
            return await (await client.get("/metrics")).text()

        try:
            text = await _with_client(_console(ConsoleSources(queue=store)), scrape)
        finally:
            await store.aclose()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    samples = asyncio.run(main())
    assert samples[("mailgate_queue_messages", ())] == 3
    assert samples[("mailgate_queue_recipients", (("state", "queued"),))] == 2
    assert samples[("mailgate_queue_recipients", (("state", "held"),))] == 1
    assert 0 <= samples[("mailgate_queue_oldest_age_seconds", ())] < 60
