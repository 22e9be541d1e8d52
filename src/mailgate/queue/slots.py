"""Per-destination delivery slots shared by every process and node using one queue.

``[queue] destination_concurrency = N`` caps the deliveries in progress at once to one
destination (``relay:<domain>`` or ``forward:<url>``) over all the nodes, where the
outbound engine's ``max_concurrency_per_destination`` caps them per process. A slot is
a lock the operating system or the database drops by itself when its holder dies (a
flock on a file for SQLite; a session advisory lock for PostgreSQL), so a killed node
never keeps a slot.

:class:`SlotGate` is the part both backends share: a delivery that finds every slot
taken waits; one waiter per destination and process asks the backend again (after a
local release at once, otherwise polling with a backoff up to :data:`MAX_POLL`), the
others queue behind it, so a saturated destination costs a few queries a second per
node, not one per waiting delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["MAX_POLL", "SlotGate", "slot_keys"]

Token = TypeVar("Token")

#: Longest wait between two tries for a saturated destination's slots: how late a
#: slot freed on another node is noticed, at worst.
MAX_POLL = 0.25
_FIRST_POLL = 0.01


def slot_keys(namespace: str, destination: str, limit: int) -> list[int]:
    """The ``limit`` slot keys of ``destination``: signed 64-bit numbers (PostgreSQL's
    bigint advisory-lock keys), distinct per queue ``namespace``, in a random order so
    the nodes do not all try the same slot first."""
    keys = [
        int.from_bytes(
            hashlib.blake2b(
                f"{namespace}\0{destination}\0{index}".encode(), digest_size=8
            ).digest(),
            "big",
            signed=True,
        )
        for index in range(limit)
    ]
    random.shuffle(keys)
    return keys


class SlotGate(Generic[Token]):
    """``async with gate.slot(destination, limit):`` around a delivery.

    ``try_take(destination, limit)`` (the backend) returns a token when it got one of
    the destination's slots, else ``None``; ``give_back(token)`` releases it. Both must
    be safe to run to the end when the caller is cancelled (they are shielded here)."""

    def __init__(
        self,
        try_take: Callable[[str, int], Awaitable[Token | None]],
        give_back: Callable[[Token], Awaitable[None]],
    ) -> None:
        self._try_take = try_take
        self._give_back = give_back
        self._turns: dict[str, asyncio.Lock] = {}
        self._released: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}
        self.waits = 0  # for tests and the benchmark: tries that found every slot taken

    @contextlib.asynccontextmanager
    async def slot(self, destination: str, limit: int) -> AsyncIterator[None]:
        if limit < 1:
            raise ValueError("a destination needs at least one slot")
        token = await self._take(destination, limit)
        try:
            yield
        finally:
            await asyncio.shield(self._give_back(token))
            event = self._released.get(destination)
            if event is not None:
                event.set()

    async def _take(self, destination: str, limit: int) -> Token:
        turn = self._turns.setdefault(destination, asyncio.Lock())
        released = self._released.setdefault(destination, asyncio.Event())
        self._waiting[destination] = self._waiting.get(destination, 0) + 1
        try:
            async with turn:
                delay = _FIRST_POLL
                while True:
                    released.clear()
                    token = await self._shielded_take(destination, limit)
                    if token is not None:
                        return token
                    self.waits += 1
                    # A local release wakes at once; one on another node is polled for.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(released.wait(), delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, MAX_POLL)
        finally:
            self._waiting[destination] -= 1
            if not self._waiting[destination]:
                # Nobody waits: forget the destination (the dicts stay small).
                del self._waiting[destination]
                self._turns.pop(destination, None)
                self._released.pop(destination, None)

    async def _shielded_take(self, destination: str, limit: int) -> Token | None:
        """The backend's try, run to its end even when the caller is cancelled meanwhile
        (a slot taken just then is given back, not leaked)."""
        attempt = asyncio.ensure_future(self._try_take(destination, limit))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                token = await attempt
                if token is not None:
                    await self._give_back(token)
            raise
