"""Rate counters: the small interface rate limits are counted through, and the in-process
store that backs it by default.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one number):
a limit of ``limit`` hits per ``window`` seconds lets a burst of ``limit`` hits through at
once, then one more every ``window / limit`` seconds. Per key the store keeps a single
timestamp, the "theoretical arrival time" (TAT): the moment the bucket would be full again.

* a hit of ``cost`` at ``now`` is allowed when ``max(tat, now) + cost * window / limit -
  window <= now``; then the TAT moves forward by ``cost * window / limit``;
* a refused hit changes nothing (a client hammering a closed door does not lock itself
  out for longer);
* once ``tat <= now`` the key holds nothing a fresh key would not: it can be forgotten.

That makes memory O(1) per key, idle keys free to drop, and each call one read-modify-
write of one number: what a shared store (Redis, a Lua script) can do atomically. A store
for many nodes implements :class:`CounterStore` and is handed to the plugin
(``RateLimits(store=...)``).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

log = logging.getLogger("mailgate.policy")

#: Float slack for "exactly at the limit" (TATs are sums of float intervals).
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class RateResult:
    """The answer of a counter: whether the hit is (or would be) allowed, how many more
    hits of cost 1 the window has room for after it, and, when refused, how many seconds
    until a hit of that cost would be allowed."""

    allowed: bool
    remaining: int
    retry_after: float = 0.0


@runtime_checkable
class CounterStore(Protocol):
    """Where rate limits are counted. ``key`` names the counter (the plugin uses
    ``"<limit name>:<subject>"``, e.g. ``"messages_per_ip:192.0.2.1"``); ``limit`` hits
    per ``window`` seconds is the rate; ``cost`` what this hit counts for (1 to ``limit``).

    ``hit`` checks and consumes in one call (atomic in a shared store): allowed hits are
    counted, refused ones are not. ``peek`` answers the same question without counting.
    """

    async def hit(self, key: str, limit: int, window: float, cost: int = 1) -> RateResult: ...

    async def peek(self, key: str, limit: int, window: float, cost: int = 1) -> RateResult: ...

    async def aclose(self) -> None: ...


class MemoryCounters:
    """A :class:`CounterStore` in this process's memory: one float per key, at most
    ``max_keys`` keys. Keys whose bucket has refilled are dropped as they are met (a few
    per hit, oldest first); when the table is full, a sweep drops every idle key, and if
    that frees too little, the least recently used eighth is forgotten (those clients
    start over with a full bucket: under a flood of addresses the limits fail open rather
    than the memory growing). ``clock`` gives the time in seconds (``time.time`` by
    default; tests inject their own).

    With ``--workers N`` every worker process has its own counters."""

    def __init__(self, *, clock: Callable[[], float] = time.time, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.clock = clock
        self.max_keys = max_keys
        #: Keys forgotten while their bucket still held hits (the table was full).
        self.evicted = 0
        # key -> TAT; insertion order is recency of use (a hit moves its key to the end).
        self._tat: dict[str, float] = {}
        # The plugin runs on one event loop, but a store may be shared by servers on
        # several threads (tests do that): the read-modify-write stays whole.
        self._lock = threading.Lock()
        self._warned_at = -math.inf

    def __len__(self) -> int:
        return len(self._tat)

    async def hit(self, key: str, limit: int, window: float, cost: int = 1) -> RateResult:
        return self.take(key, limit, window, cost)

    async def peek(self, key: str, limit: int, window: float, cost: int = 1) -> RateResult:
        return self.take(key, limit, window, cost, consume=False)

    async def aclose(self) -> None:
        with self._lock:
            self._tat.clear()

    def take(
        self, key: str, limit: int, window: float, cost: int = 1, *, consume: bool = True
    ) -> RateResult:
        """The synchronous form of :meth:`hit` (``consume=False``: :meth:`peek`)."""
        _check(limit, window, cost)
        interval = window / limit
        with self._lock:
            now = self.clock()
            tats = self._tat
            start = tats.get(key, now)
            if start < now:
                start = now
            after = start + cost * interval
            allow_at = after - window
            if allow_at > now + _EPSILON:
                return RateResult(False, _room(start, now, window, interval), allow_at - now)
            if not consume:
                return RateResult(True, _room(start, now, window, interval))
            if key in tats:
                del tats[key]  # re-inserted at the end: most recently used
            elif len(tats) >= self.max_keys:
                self._make_room(now)
            tats[key] = after
            self._drop_idle(now, 2)
            return RateResult(True, _room(after, now, window, interval))

    def _drop_idle(self, now: float, budget: int) -> None:
        """Forget up to ``budget`` idle keys from the least recently used end."""
        tats = self._tat
        for key in list(itertools.islice(tats, budget)):
            if tats[key] > now:
                return
            del tats[key]

    def _make_room(self, now: float) -> None:
        """The table is full: drop every idle key, and if that leaves less than an eighth
        free, forget the least recently used keys until it does. Each sweep so frees at
        least max_keys/8 slots, which keeps its cost per hit constant."""
        tats = self._tat
        for key in [k for k, tat in tats.items() if tat <= now]:
            del tats[key]
        keep = self.max_keys - max(1, self.max_keys // 8)
        excess = len(tats) - keep
        if excess > 0:
            for key in list(itertools.islice(tats, excess)):
                del tats[key]
            self.evicted += excess
            if now - self._warned_at >= 60.0:
                self._warned_at = now
                log.warning(
                    "rate counters: %d keys in use (max_keys); forgot the %d least recently "
                    "used (those clients start over)",
                    self.max_keys,
                    excess,
                )


def _check(limit: int, window: float, cost: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not window > 0 or not math.isfinite(window):
        raise ValueError(f"window must be a positive number of seconds, got {window}")
    if not 1 <= cost <= limit:
        raise ValueError(f"cost must be between 1 and the limit ({limit}), got {cost}")


def _room(tat: float, now: float, window: float, interval: float) -> int:
    """Hits of cost 1 the bucket still has room for, given its TAT."""
    return max(0, math.floor((now + window - max(tat, now)) / interval + _EPSILON))


__all__ = ["CounterStore", "MemoryCounters", "RateResult"]
