"""The queue backends the shared suite runs against, and how to open each.

Every backend listed in ``BACKENDS`` must pass tests/queue/test_store.py unchanged.
Child processes of the crash tests import this module too, so it must stay importable
without pytest.

PostgreSQL: ``MAILGATE_TEST_POSTGRES_DSN`` names the session's database (the session
fixture in conftest.py creates it, on a private cluster when no server is configured,
and exports the variable, so the crash tests' child processes inherit it). ``location``
(a path, as for SQLite) names a schema in it, ``q_<hash of the path>``, migrated on first
open: reopening the same location reopens the same queue, and every test has its own
(a schema is made in ~30 ms, a database copied from a template in ~200 ms).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mailgate.queue import QueuePolicy, QueueStore, SQLiteQueueStore

BACKENDS: tuple[str, ...] = ("sqlite", "postgresql")

POSTGRES_DSN_VARIABLE = "MAILGATE_TEST_POSTGRES_DSN"


def database_dsn(dsn: str, database: str) -> str:
    """``dsn`` (a postgresql:// URI) naming ``database`` instead."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def schema_name(location: Path) -> str:
    digest = hashlib.sha256(str(Path(location).resolve()).encode()).hexdigest()[:24]
    return f"q_{digest}"


async def drop_schemas(dsn: str) -> None:
    """Drop every queue schema of the test database (between tests)."""
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        names = [
            row[0]
            for row in await connection.fetch(
                "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, 'q_')"
            )
        ]
        for name in names:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await connection.close()


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
    if name == "postgresql":
        from mailgate.queue.postgres import PostgresQueueStore

        dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
        if not dsn:
            raise RuntimeError(f"{POSTGRES_DSN_VARIABLE} is not set (the test fixture sets it)")
        # Changes come by LISTEN/NOTIFY: there is no poll interval to pass on.
        return await PostgresQueueStore.open(
            dsn, schema=schema_name(location), policy=policy, clock=clock, migrate=True
        )
    raise ValueError(f"unknown queue backend {name!r}")
