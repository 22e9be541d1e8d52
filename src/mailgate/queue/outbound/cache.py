"""Sessions kept open between messages to the same destination and address.

A session goes back to the cache after a transaction unless it is broken, older than
``connection_reuse_time`` or has carried ``connection_reuse_count`` transactions; an
idle one is closed (QUIT) after ``connection_idle_time``. The engine sends RSET before
reusing one only when its last transaction did not end cleanly (a refused MAIL or every
RCPT refused); one the server closed unnoticed is found by the next transaction before
any reply, and the message goes on a new session.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from .options import OutboundOptions
from .session import Session


class SessionCache:
    def __init__(self, options: OutboundOptions) -> None:
        self.options = options
        self._idle: dict[str, list[tuple[Session, asyncio.TimerHandle]]] = defaultdict(list)
        self._closing: set[asyncio.Task[None]] = set()
        self.opened = 0
        self.reused = 0

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._idle.values())

    def idle_count(self, key: str) -> int:
        return len(self._idle.get(key, ()))

    def take(self, key: str) -> Session | None:
        """The most recently used idle session for ``key`` (destination), if any."""
        entries = self._idle.get(key)
        while entries:
            session, timer = entries.pop()
            timer.cancel()
            if not entries:
                del self._idle[key]
            if session.usable and not self._expired(session):
                return session
            self._close(session)
        return None

    def put(self, key: str, session: Session) -> None:
        """Keep ``session`` for the next message, or close it when it has served enough."""
        if not session.usable or self._expired(session):
            self._close(session)
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.options.connection_idle_time, self._idle_out, key, session)
        self._idle[key].append((session, timer))

    def discard(self, session: Session) -> None:
        """Close a session taken from the cache that will not be used (QUIT in the
        background, so the caller does not wait for it)."""
        self._close(session)

    def _expired(self, session: Session) -> bool:
        options = self.options
        return (
            session.transactions >= options.connection_reuse_count
            or time.monotonic() - session.opened_at >= options.connection_reuse_time
        )

    def _idle_out(self, key: str, session: Session) -> None:
        entries = self._idle.get(key, [])
        for index, (cached, _) in enumerate(entries):
            if cached is session:
                del entries[index]
                break
        if not entries:
            self._idle.pop(key, None)
        self._close(session)

    def _close(self, session: Session) -> None:
        task = asyncio.get_running_loop().create_task(session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every idle session and wait for the QUITs (each bounded)."""
        for entries in list(self._idle.values()):
            for session, timer in entries:
                timer.cancel()
                self._close(session)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
