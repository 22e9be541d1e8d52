"""The queue backends the shared suite runs against, and how to open each.

Every backend listed in ``BACKENDS`` must pass tests/queue/test_store.py unchanged. The
PostgreSQL backend (issue 19) adds its name here and a branch in :func:`open_backend`
(its ``location`` then names a database, e.g. from ``MAILGATE_TEST_POSTGRES_DSN``).
Child processes of the crash tests import this module too, so it must stay importable
without pytest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from mailgate.queue import QueuePolicy, QueueStore, SQLiteQueueStore

BACKENDS: tuple[str, ...] = ("sqlite",)


async def open_backend(
    name: str,
    location: Path,
    *,
    policy: QueuePolicy | None = None,
    clock: Callable[[], float] = time.time,
    poll_interval: float = 0.05,
) -> QueueStore:
    """Open (or reopen) the store of backend ``name`` kept at ``location``."""
    if name == "sqlite":
        return await SQLiteQueueStore.open(
            location, policy=policy, clock=clock, poll_interval=poll_interval
        )
    raise ValueError(f"unknown queue backend {name!r}")
