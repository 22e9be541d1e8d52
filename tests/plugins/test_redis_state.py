"""Policy state shared through Redis ([state] backend = "redis"): real mailgate servers
sharing one real redis-server (tests/redis_server.py) count one per-IP limit together and
share greylisting triplets; a Redis that is down, refuses connections or never answers
makes the policies fail open (or closed, 4xx) within the timeout, logged once per outage.

Clients come from 127.0.19.0/24 (reserved for this file)."""

from __future__ import annotations

import contextlib
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from mailgate.testing import running_server

MESSAGE = b"Subject: shared\r\n\r\nhello\r\n"
CLIENT = "127.0.19.1"


@pytest.fixture
def smtp() -> Iterator[list[smtplib.SMTP]]:
    clients: list[smtplib.SMTP] = []
    yield clients
    for client in clients:
        with contextlib.suppress(OSError):
            client.close()


def connect(srv: Any, clients: list[smtplib.SMTP], source: str = CLIENT) -> smtplib.SMTP:
    client = smtplib.SMTP(srv.host, srv.port, source_address=(source, 0), timeout=10)
    clients.append(client)
    return client


def state(url: str, prefix: str, **more: Any) -> dict[str, Any]:
    return {"backend": "redis", "url": url, "key_prefix": prefix, **more}


def send(client: smtplib.SMTP) -> int:
    """One message on an open session: the reply code to DATA (or to its end)."""
    try:
        client.sendmail("a@sender.example", ["u@example.com"], MESSAGE)
    except smtplib.SMTPDataError as exc:
        client.rset()
        return exc.smtp_code
    return 250


def test_two_servers_share_one_per_ip_limit(
    redis_url: str, redis_prefix: str, smtp: list[smtplib.SMTP]
) -> None:
    settings: dict[str, Any] = {
        "limits": {"messages_per_ip": "5/1h"},
        "state": state(redis_url, redis_prefix),
    }
    with running_server(**settings) as one, running_server(**settings) as two:
        first, second = connect(one, smtp), connect(two, smtp)
        codes = [send(first if turn % 2 == 0 else second) for turn in range(10)]
        assert codes.count(250) == 5, codes  # 5 in total, not 5 per server
        assert codes[:5] == [250] * 5 and set(codes[5:]) == {450}
        assert len(one.messages) + len(two.messages) == 5
