"""Plugins with work of their own: ``astart()`` once the listeners are bound, ``aclose()``
at shutdown, and a plugin that cannot start stopping the server's start."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import pytest

from mailgate.hooks import Envelope, Message, Session
from mailgate.server.app import SMTPServer
from mailgate.server.errors import StartupError


def make_server(tmp_path: Path) -> SMTPServer:
    from mailgate import Server

    return Server(hostname="mx.test", listen="127.0.0.1:0", state_dir=tmp_path / "state")


class Worker:
    """A plugin with a background task, recording the order of events."""

    def __init__(self, name: str, events: list[str], *, fail: bool = False) -> None:
        self.name = name
        self.events = events
        self.fail = fail
        self.task: asyncio.Task[None] | None = None
        self.bound: tuple[str, int] | None = None
        self.server: SMTPServer | None = None

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        return None

    async def astart(self) -> None:
        assert self.server is not None
        # The listeners are bound already: the address is known and takes connections.
        self.bound = self.server.address
        with socket.create_connection(self.bound, timeout=2):
            pass
        if self.fail:
            self.events.append(f"{self.name} failed")
            raise RuntimeError("no queue directory")
        self.task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        self.events.append(f"{self.name} started")

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.events.append(f"{self.name} closed")


def test_astart_runs_after_the_listeners_are_bound_and_aclose_at_stop(tmp_path: Path) -> None:
    events: list[str] = []

    async def main() -> None:
        server = make_server(tmp_path)
        first, second = Worker("first", events), Worker("second", events)
        for plugin in (first, second):
            plugin.server = server
            server.add_plugin(plugin)
        server.add_plugin(_NoLifecycle())
        await server.start()
        assert first.bound == server.address
        assert first.task is not None and not first.task.done()
        assert events == ["first started", "second started"]
        await server.stop()
        assert first.task.cancelled()

    asyncio.run(main())
    assert events == ["first started", "second started", "first closed", "second closed"]


class _NoLifecycle:
    name = "plain"

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Any) -> None:
        return None


def test_a_plugin_that_cannot_start_stops_the_start(tmp_path: Path) -> None:
    events: list[str] = []

    async def main() -> tuple[str, int]:
        server = make_server(tmp_path)
        good, bad, never = (
            Worker("good", events),
            Worker("bad", events, fail=True),
            Worker("never", events),
        )
        for plugin in (good, bad, never):
            plugin.server = server
            server.add_plugin(plugin)
        with pytest.raises(StartupError, match="plugin bad: cannot start: no queue directory"):
            await server.start()
        assert server.listening == []
        assert bad.bound is not None
        return bad.bound

    bound = asyncio.run(main())
    # The plugin started before it was closed; the one after it never started.
    assert events == ["good started", "bad failed", "good closed"]
    with pytest.raises(OSError), socket.create_connection(bound, timeout=1):
        pass
