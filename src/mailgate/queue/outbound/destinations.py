"""Per-destination concurrency with a slow start, and the dead-destination tracker.

Concurrency works like Postfix's scheduler: a destination starts with ``initial``
parallel deliveries, gains 1/window with each attempt that got a session (so one more
after a window's worth of them) up to ``maximum``, and loses 1/window with each attempt
that did not (never below 1). After ``dead_after`` such attempts in a row the destination
is suspended: every request is deferred at once without connecting, except one probe per
``probe_interval``; the probe's success revives it.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable


class Admission(enum.Enum):
    GO = "go"
    PROBE = "probe"
    SUSPENDED = "suspended"


class DestinationState:
    def __init__(
        self,
        *,
        initial: int,
        maximum: int,
        dead_after: int,
        probe_interval: float,
        clock: Callable[[], float],
    ) -> None:
        self.window = float(initial)
        self.maximum = maximum
        self.active = 0
        self.dead_after = dead_after
        self.probe_interval = probe_interval
        self._clock = clock
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: Consecutive attempts without a session, and the last one's account.
        self.failures = 0
        self.last_failure: tuple[str, str] | None = None
        self.suspended = False
        self.next_probe = 0.0
        self.probing = False
        self.last_used = clock()

    @property
    def limit(self) -> int:
        return max(1, min(self.maximum, int(self.window)))

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self._waiters and not self.suspended

    # --- suspension -----------------------------------------------------------------------

    def admit(self) -> Admission:
        """May an attempt go on now? A PROBE must be ended with :meth:`record`."""
        self.last_used = self._clock()
        if not self.suspended:
            return Admission.GO
        if self.probing or self._clock() < self.next_probe:
            return Admission.SUSPENDED
        self.probing = True
        self.next_probe = self._clock() + self.probe_interval
        return Admission.PROBE

    def record(self, *, session: bool, failure: tuple[str, str] | None = None) -> None:
        """The end of an attempt: did it get a session with the destination?"""
        self.last_used = self._clock()
        if session:
            self.failures = 0
            self.suspended = False
            self.window = min(float(self.maximum), self.window + 1.0 / self.window)
            self._wake()
            return
        self.failures += 1
        self.last_failure = failure
        self.window = max(1.0, self.window - 1.0 / self.window)
        if self.failures >= self.dead_after and not self.suspended:
            self.suspended = True
            self.next_probe = self._clock() + self.probe_interval

    def end_probe(self) -> None:
        self.probing = False

    # --- concurrency --------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait for a delivery slot (first come, first served)."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot came with the cancellation: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1  # the slot is handed over, so nobody can jump the queue
                waiter.set_result(None)
