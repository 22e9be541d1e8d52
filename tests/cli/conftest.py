"""Fixtures of the CLI tests: a configuration with a queue and routes, and a real queue
filled through the store API (deferred, failed, delivered, held and queued recipients)."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailgate.queue import (
    ClientInfo,
    DeliveryResult,
    NewMessage,
    NewRecipient,
    QueueStore,
    RemoteReply,
    SQLiteQueueStore,
)

T = TypeVar("T")

SRC = Path(__file__).resolve().parents[2] / "src"
HOSTNAME = "mx.example.test"

CONFIG = f"""\
[server]
hostname = "{HOSTNAME}"
max_size = "20K"
listen = "127.0.0.1:{{port}}"

[queue]
path = "spool/queue"

[[routes]]
name = "ours"
recipients = ["*@{HOSTNAME}", "*@corp.example"]
action = "deliver"

[[routes]]
name = "blocked"
recipients = ["*@blocked.example"]
action = "reject"
reply = "550 5.7.1 We do not send there"

[[routes]]
name = "later"
recipients = ["*@later.example"]
action = "reject"
reply = "450 4.7.1 Not today"

[[routes]]
name = "partners"
recipients = ["*@partner.example"]
action = "forward"
to = "smtp://127.0.0.1:2525"

[[routes]]
name = "internet"
recipients = ["*"]
action = "relay"
"""

BODY = (
    b"From: Alice <alice@corp.example>\r\n"
    b"To: bob@example.net, carol@example.org\r\n"
    b"Subject: quarterly numbers\r\n"
    b"X-Folded: one\r\n"
    b"\ttwo\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)

DEFERRED = RemoteReply(451, "4.3.0", "try again later")
REFUSED = RemoteReply(550, "5.1.1", "no such user")
ACCEPTED = RemoteReply(250, "2.0.0", "ok")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@dataclass
class Queue:
    """The test's queue: the configuration file naming it and the ids put in it."""

    config: Path
    directory: Path
    #: alice's message: bob deferred, carol failed, dave (partner) delivered.
    mixed: str = ""
    #: a bounce (null sender) on hold.
    held: str = ""
    #: a message received 90 minutes ago, still queued (never tried).
    old: str = ""

    def open(self) -> Any:
        """``async with queue.open() as store``: the store, as the server opens it."""
        return _Opened(self.directory)

    def read(self, function: Callable[[QueueStore], Coroutine[Any, Any, T]]) -> T:
        """Run ``function(store)`` on a freshly opened store (what the server would see)."""

        async def go() -> T:
            async with self.open() as store:
                return await function(store)

        return run(go())


class _Opened:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store: SQLiteQueueStore | None = None

    async def __aenter__(self) -> SQLiteQueueStore:
        self.store = await SQLiteQueueStore.open(self.directory)
        return self.store

    async def __aexit__(self, *exc: object) -> None:
        assert self.store is not None
        await self.store.aclose()


def closed_port() -> int:
    """A loopback port nobody listens on (just freed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(path: Path, port: int) -> Path:
    """The test configuration with the server's first listener on ``port``."""
    path.write_text(CONFIG.format(port=port))
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "mailgate.toml", closed_port())


async def fill(store: QueueStore) -> tuple[str, str, str]:
    """Three messages whose recipients are in every state."""
    now = time.time()
    mixed = await store.enqueue(
        NewMessage(
            "alice@corp.example",
            [
                NewRecipient("bob@example.net", "relay:example.net"),
                NewRecipient("carol@example.org", "relay:example.org"),
                NewRecipient("dave@partner.example", "forward:smtp://127.0.0.1:2525"),
            ],
            client=ClientInfo(address="192.0.2.7", helo="client.example", protocol="ESMTP"),
            require_tls=True,
        ),
        BODY,
    )
    held = await store.enqueue(
        NewMessage("", [NewRecipient("postmaster@example.net", "relay:example.net")]),
        b"From: MAILER-DAEMON@mx.example.test\r\nSubject: failure\r\n\r\nreport\r\n",
    )
    old = await store.enqueue(
        NewMessage(
            "ann@corp.example",
            [NewRecipient("erin@example.org", "relay:example.org")],
            received_at=now - 90 * 60,
        ),
        b"Subject: old\r\n\r\nold\r\n",
    )
    # Only the mixed message is tried: the old one waits (its first attempt is due).
    for batch in await store.claim_due(limit=100):
        if batch.message.id != mixed:
            await store.release_claim(batch)
            continue
        results = []
        for recipient in batch.recipients:
            reply = {
                "bob@example.net": DEFERRED,
                "carol@example.org": REFUSED,
                "dave@partner.example": ACCEPTED,
            }[recipient.address]
            results.append(
                DeliveryResult.from_reply(
                    recipient.id, reply, remote_mta="mx.example[192.0.2.1]:25"
                )
            )
        await store.record_results(batch, results)
    await store.hold([held], "kept for the postmaster")
    return mixed, held, old


@pytest.fixture
def queue(config: Path) -> Queue:
    directory = config.parent / "spool" / "queue"
    filled = Queue(config, directory)

    async def go() -> None:
        async with filled.open() as store:
            filled.mixed, filled.held, filled.old = await fill(store)

    run(go())
    return filled


def mailgate_env() -> dict[str, str]:
    """The environment for ``python -m mailgate`` from this tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def mailgate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mailgate", *args]


class Stdin:
    """A replacement for sys.stdin whose ``buffer`` holds ``data``."""

    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)
