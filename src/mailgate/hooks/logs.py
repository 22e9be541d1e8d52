"""Log lines a client can trigger at will, bounded: :class:`LogLimiter` lets a few lines of
one kind through per interval and folds the rest into a count, so a flood of refused
connections or a plugin failing on every command cannot fill the disk through the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["LogLimiter"]


class LogLimiter:
    """At most ``burst`` lines per ``key`` in each ``interval`` seconds; the first line let
    through after some were held back says how many (``... (37 similar lines suppressed
    in 60 s)``). Keys are kinds of lines (``("max-clients",)``, ``(stage, plugin)``), not
    clients: at most ``max_keys`` are tracked, the table starts over beyond that.
    Thread-safe; ``clock`` is for tests."""

    def __init__(
        self,
        *,
        burst: int = 5,
        interval: float = 60.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        # key -> [window start, lines let through in it, lines held back since the last one]
        self._windows: dict[Hashable, list[Any]] = {}
        self._lock = threading.Lock()

    def allow(self, key: Hashable) -> tuple[bool, int]:
        """Whether a line of kind ``key`` may be written now, and how many were held back
        since the last one written (to say so in it)."""
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                if len(self._windows) >= self.max_keys:
                    self._windows.clear()
                window = self._windows[key] = [now, 0, 0]
            elif now - window[0] >= self.interval:
                window[0], window[1] = now, 0
            if window[1] < self.burst:
                window[1] += 1
                held, window[2] = window[2], 0
                return True, held
            window[2] += 1
            return False, 0

    def log(
        self,
        logger: logging.Logger,
        level: int,
        key: Hashable,
        msg: str,
        *args: Any,
        **kwargs: Any,
    ) -> bool:
        """``logger.log(level, msg, *args, **kwargs)`` if ``key`` allows it now; True if
        written."""
        if not logger.isEnabledFor(level):
            return False
        allowed, held = self.allow(key)
        if not allowed:
            return False
        if held:
            msg = f"{msg} (%d similar lines suppressed in the last %g s)"
            args = (*args, held, self.interval)
        logger.log(level, msg, *args, **kwargs)
        return True
