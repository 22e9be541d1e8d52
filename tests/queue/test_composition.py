"""Which servers get a queue: only those whose ``[[routes]]`` send mail onward (a relay
or forward rule); it runs first among the built-in deliveries, after the application's
own message hooks."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from mailgate import Server
from mailgate.hooks import Envelope, Message, Session
from mailgate.queue import QueueError
from mailgate.queue.plugin import POSTGRESQL_MISSING, QueuePlugin, open_store
from mailgate.queue.settings import QueueSettings
from mailgate.settings import ConfigError


def names_at_start(tmp_path: Path, **settings: Any) -> list[str]:
    async def main() -> list[str]:
        server = Server(
            hostname="mx.test",
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            maildir=tmp_path / "maildir",
            **settings,
        )

        @server.on_message(name="application")
        def application(session: Session, envelope: Envelope, message: Message) -> None:
            return None

        async with server:
            return server.hooks.names()

    return asyncio.run(main())


def test_without_routes_there_is_no_queue(tmp_path: Path) -> None:
    names = names_at_start(tmp_path)
    assert "queue" not in names and "routing" not in names
    assert not (tmp_path / "state" / "queue").exists()


@pytest.mark.parametrize(
    "routes",
    [
        [{"recipients": ["*@example.org"], "action": "deliver"}],
        [{"recipients": ["*@spam.test"], "action": "reject"}],
    ],
)
def test_routes_that_keep_mail_local_need_no_queue(
    tmp_path: Path, routes: list[dict[str, Any]]
) -> None:
    names = names_at_start(tmp_path, routes=routes)
    assert "routing" in names and "queue" not in names


@pytest.mark.parametrize(
    "route",
    [
        {"recipients": ["*"], "action": "relay"},
        {"recipients": ["*"], "action": "forward", "to": "smtp://smarthost.test:587"},
    ],
)
def test_onward_routes_add_the_queue_before_the_local_deliveries(
    tmp_path: Path, route: dict[str, Any]
) -> None:
    names = names_at_start(tmp_path, routes=[route], queue={"path": str(tmp_path / "q")})
    assert names.index("application") < names.index("queue") < names.index("maildir")
    assert (tmp_path / "q" / "queue.db").exists()


def test_the_queue_plugin_needs_a_place() -> None:
    with pytest.raises(ValueError, match="queue directory or an open store"):
        QueuePlugin(destinations=lambda session, envelope: {}, hostname="mx.test")


def test_postgresql_without_asyncpg_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the postgresql extra were not installed: importing asyncpg fails.
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    monkeypatch.setitem(sys.modules, "mailgate.queue.postgres", None)
    with pytest.raises(ConfigError) as raised:
        names_at_start(
            tmp_path,
            routes=[{"recipients": ["*"], "action": "relay"}],
            queue={"backend": "postgresql", "dsn": "postgresql://mailgate:pw@127.0.0.1:1/q"},
        )
    assert str(raised.value) == POSTGRESQL_MISSING
    assert "pip install" in str(raised.value) and "\n" not in str(raised.value)

    async def opened() -> None:
        settings = QueueSettings(backend="postgresql", dsn="postgresql://127.0.0.1:1/q")
        await open_store(settings, tmp_path / "queue")

    with pytest.raises(QueueError, match=r'needs asyncpg: pip install "mailgate\[postgresql\]"'):
        asyncio.run(opened())


def test_an_unreachable_database_is_named_without_its_password(tmp_path: Path) -> None:
    pytest.importorskip("asyncpg")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = QueueSettings(backend="postgresql", dsn=f"postgresql://mg:s3cret@127.0.0.1:{port}/q")

    async def opened() -> None:
        await open_store(settings, tmp_path / "queue")

    with pytest.raises(QueueError) as raised:
        asyncio.run(opened())
    assert f"queue database postgresql://mg:***@127.0.0.1:{port}/q:" in str(raised.value)
    assert "s3cret" not in str(raised.value)
