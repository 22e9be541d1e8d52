"""Shared pieces of the outbound tests: the message, requests, an engine on the test DNS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from tests.dns_server import DNSTestServer, unique

from mailgate.dns import Resolver
from mailgate.queue.outbound import (
    DeliveryRequest,
    Destination,
    OutboundEngine,
    OutboundOptions,
    Recipient,
)

T = TypeVar("T")

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: outbound\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"  # a lone dot inside the body must arrive as a line, not end the message
    b"last line\r\n"
)


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Run a test's main coroutine, bounded in time, on uvloop as ``mailgate serve``
    does when it is installed (``MAILGATE_LOOP=asyncio``: the stock loop)."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if os.environ.get("MAILGATE_LOOP", "").lower() != "asyncio":
        with contextlib.suppress(ImportError):
            import uvloop

            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(bounded())


def new_domain(prefix: str = "d") -> str:
    return f"{unique(prefix)}.test"


def publish_mx(dns: DNSTestServer, domain: str, *hosts: tuple[int, str, str]) -> None:
    """MX records of ``domain``: (preference, host label, IPv4 address) each; the host
    is ``label.domain``."""
    lines = []
    for preference, label, address in hosts:
        lines.append(f"{domain}. 60 IN MX {preference} {label}.{domain}.")
        lines.append(f"{label}.{domain}. 60 IN A {address}")
    dns.add("\n".join(lines) + "\n")


def body(tmp_path: Path, data: bytes = MESSAGE, name: str = "message") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def request(
    path: Path,
    destination: Destination,
    *recipients: str | Recipient,
    sender: str = "alice@example.org",
    queue_id: str = "Q1",
    **extra: Any,
) -> DeliveryRequest:
    return DeliveryRequest(
        queue_id=queue_id,
        sender=sender,
        body_path=path,
        size=path.stat().st_size,
        recipients=tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients),
        destination=destination,
        **extra,
    )


def make_engine(
    dns: DNSTestServer, port: int, *, rng: random.Random | None = None, **options: Any
) -> OutboundEngine:
    settings: dict[str, Any] = {
        "helo": "outbound.test",
        "port": port,
        "connect_timeout": 2.0,
        "command_timeout": 5.0,
        "data_timeout": 10.0,
    }
    settings.update(options)
    return OutboundEngine(
        OutboundOptions(**settings), resolver=Resolver([dns.address], timeout=2.0), rng=rng
    )
