"""How a store tells its users that the queue changed: a counter and an event, shared by
every backend (each backend decides when something changed: SQLite's ``data_version``,
PostgreSQL's NOTIFY)."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["ChangeWaiting"]


class ChangeWaiting:
    """``change_count`` and ``wait_for_change`` of the QueueStore interface. A store sets
    up ``_change_count``, ``_change_event``, ``_loop`` and ``_closed``, calls
    :meth:`_changed` on the event loop when the queue changed, and sets
    ``_change_event`` when it closes so that waiters return."""

    _change_count: int
    _change_event: asyncio.Event
    _loop: asyncio.AbstractEventLoop
    _closed: bool

    def _check_open(self) -> None:
        raise NotImplementedError

    def _changed(self) -> None:
        self._change_count += 1
        self._change_event.set()
        self._change_event = asyncio.Event()

    @property
    def change_count(self) -> int:
        return self._change_count

    async def wait_for_change(self, timeout: float, seen: int | None = None) -> bool:
        self._check_open()
        if seen is None:
            seen = self._change_count
        deadline = self._loop.time() + timeout
        while self._change_count == seen:
            remaining = deadline - self._loop.time()
            if remaining <= 0 or self._closed:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._change_event.wait(), remaining)
        return True
