"""The queue backends the shared suite runs against, and how to open each.

Every backend listed in ``BACKENDS`` must pass tests/queue/test_store.py unchanged.
Child processes of the crash tests import this module too, so it must stay importable
without pytest.

PostgreSQL: ``location`` (a path, as for SQLite) names a database on the server at
``MAILGATE_TEST_POSTGRES_DSN``: ``<prefix>_<hash of the path>``, created on first open
as a copy of ``<prefix>_template`` (migrated once per session), so reopening the same
location reopens the same queue and every test has its own. The session fixture in
conftest.py sets both variables (a private cluster when no DSN is configured); child
processes inherit them.
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
POSTGRES_PREFIX_VARIABLE = "MAILGATE_TEST_POSTGRES_PREFIX"


def database_dsn(dsn: str, database: str) -> str:
    """``dsn`` (a postgresql:// URI) naming ``database`` instead."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def postgres_prefix() -> str:
    return os.environ.get(POSTGRES_PREFIX_VARIABLE, "mailgate_test")


def template_name() -> str:
    return f"{postgres_prefix()}_template"


def database_name(location: Path) -> str:
    digest = hashlib.sha256(str(Path(location).resolve()).encode()).hexdigest()[:24]
    return f"{postgres_prefix()}_{digest}"


async def prepare_template(dsn: str) -> None:
    """(Re)create this session's template database with the current schema."""
    import asyncpg

    from mailgate.queue.postgres import migrate

    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{template_name()}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{template_name()}"')
    finally:
        await connection.close()
    await migrate(database_dsn(dsn, template_name()))


async def drop_databases(dsn: str, *, keep_template: bool) -> None:
    """Drop the databases of this session (those of its prefix)."""
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        names = [
            row[0]
            for row in await connection.fetch(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1)",
                f"{postgres_prefix()}_",
            )
        ]
        for name in names:
            if keep_template and name == template_name():
                continue
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def postgres_location(location: Path) -> str:
    """The DSN of the database for ``location``, created from the template if new."""
    import asyncpg

    base = os.environ.get(POSTGRES_DSN_VARIABLE)
    if not base:
        raise RuntimeError(f"{POSTGRES_DSN_VARIABLE} is not set (the test fixture sets it)")
    name = database_name(location)
    connection = await asyncpg.connect(base)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                # FILE_COPY: a small template is copied in ~70 ms (WAL_LOG takes longer).
                await connection.execute(
                    f'CREATE DATABASE "{name}" TEMPLATE "{template_name()}" STRATEGY FILE_COPY'
                )
            except asyncpg.DuplicateDatabaseError:
                pass
    finally:
        await connection.close()
    return database_dsn(base, name)


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

        # Changes come by LISTEN/NOTIFY: there is no poll interval to pass on.
        return await PostgresQueueStore.open(
            await postgres_location(location), policy=policy, clock=clock
        )
    raise ValueError(f"unknown queue backend {name!r}")
