"""The harness of the end-to-end queue tests: a mailgate server built from settings (or a
TOML file) with ``[[routes]]``, ``[queue]`` and ``[outbound]``, the test DNS server
publishing MX records of test domains that point at receiving servers on 127.0.0.x, and
an SMTP client that gives per-recipient DSN parameters."""

from __future__ import annotations

import asyncio
import email
import email.message
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import new_domain, publish_mx
from tests.outbound.receivers import Received, Receiver

from mailgate import Server
from mailgate.queue import QueuedMessage, SQLiteQueueStore
from mailgate.queue.plugin import QueuePlugin

__all__ = [
    "Client",
    "bounces",
    "new_domain",
    "publish_mx",
    "queue_of",
    "serving",
    "wait_for",
]


def message_bytes(subject: str = "onward", sender: str = "alice@example.org") -> bytes:
    return (
        f"From: Alice <{sender}>\r\n"
        f"To: bob@example.net\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.org>\r\n"
        "\r\n"
        "first line\r\n"
        ".a line that starts with a dot\r\n"
        "last line\r\n"
    ).encode()


def settings(
    tmp_path: Path,
    dns: DNSTestServer,
    mx_port: int,
    routes: list[dict[str, Any]],
    *,
    queue: dict[str, Any] | None = None,
    outbound: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """``Server(**settings(...))``: short retries and timeouts, the test DNS, the test MX
    port, a Maildir for the local recipients."""
    queue_table: dict[str, Any] = {"retry_schedule": ["1s"], "lifetime": "1h"}
    queue_table.update(queue or {})
    outbound_table: dict[str, Any] = {
        "port": mx_port,
        "connect_timeout": 2,
        "command_timeout": 5,
        "data_timeout": 10,
        "dead_after_failures": 100,
    }
    outbound_table.update(outbound or {})
    values: dict[str, Any] = {
        "hostname": "mx.mailgate.test",
        "listen": "127.0.0.1:0",
        "state_dir": tmp_path / "state",
        "maildir": tmp_path / "maildir",
        "dns_nameservers": [dns.address],
        "dns_timeout": 2,
        "close_timeout": 2,
        "routes": routes,
        "queue": queue_table,
        "outbound": outbound_table,
    }
    values.update(extra)
    return values


@asynccontextmanager
async def serving(**values: Any) -> AsyncIterator[Server]:
    server = Server(**values)
    async with server:
        yield server


def queue_of(server: Server) -> QueuePlugin:
    for plugin in server.hooks.plugins():
        if isinstance(plugin, QueuePlugin):
            return plugin
    raise AssertionError("the server has no queue")


async def queued(server: Server) -> list[QueuedMessage]:
    store = queue_of(server).store
    assert isinstance(store, SQLiteQueueStore)
    return await store.list_messages()


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_until_empty(server: Server, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while await queued(server):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the queue is not empty after {timeout} s: {await queued(server)}"
            )
        await asyncio.sleep(0.1)


class Client:
    """One SMTP transaction with per-recipient parameters; the replies are kept."""

    def __init__(self, server: Server) -> None:
        self.host, self.port = server.address

    async def send(
        self,
        sender: str,
        recipients: Sequence[str | tuple[str, Sequence[str]]],
        data: bytes | None = None,
        *,
        mail_options: Sequence[str] = (),
    ) -> tuple[list[tuple[int, str]], tuple[int, str] | None]:
        """RCPT replies, and the reply to the message (None when no recipient was
        accepted)."""
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            start_tls=False,
            timeout=15,
            local_hostname="client.test",
        )
        await smtp.connect()
        try:
            await smtp.ehlo()
            await smtp.mail(sender, options=list(mail_options))
            replies: list[tuple[int, str]] = []
            for item in recipients:
                address, options = (item, ()) if isinstance(item, str) else item
                try:
                    answer = await smtp.rcpt(address, options=list(options))
                    replies.append((answer.code, answer.message))
                except aiosmtplib.SMTPRecipientRefused as exc:
                    replies.append((exc.code, exc.message))
            if not any(code < 300 for code, _ in replies):
                await smtp.rset()
                return replies, None
            try:
                answer = await smtp.data(data if data is not None else message_bytes())
                final = (answer.code, answer.message)
            except aiosmtplib.SMTPDataError as exc:
                final = (exc.code, exc.message)
            return replies, final
        finally:
            try:
                await smtp.quit()
            except aiosmtplib.SMTPException:
                smtp.close()


def bounces(receiver: Receiver) -> list[Received]:
    """The DSNs a sender's MX got (from <>)."""
    with receiver.lock:
        return [m for m in receiver.messages if m.mail_from in ("", "<>")]


def parsed(message: Received) -> email.message.Message:
    return email.message_from_bytes(message.data)


def sender_domain(dns: DNSTestServer, address: str) -> str:
    """A sender domain whose MX is ``address`` (where its bounces arrive)."""
    domain = new_domain("sender")
    publish_mx(dns, domain, (10, "mx", address))
    return domain
