"""Which servers get a queue: only those whose ``[[routes]]`` send mail onward (a relay
or forward rule); it runs first among the built-in deliveries, after the application's
own message hooks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mailgate import Server
from mailgate.hooks import Envelope, Message, Session
from mailgate.queue.plugin import QueuePlugin


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
