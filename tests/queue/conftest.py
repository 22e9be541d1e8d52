"""Fixtures of the queue suite: a store per backend, a clock the test moves, and the
PostgreSQL server the postgresql backend's tests use."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.queue.backends import (
    BACKENDS,
    POSTGRES_DSN_VARIABLE,
    database_dsn,
    drop_schemas,
    open_backend,
)
from tests.queue.postgres_cluster import PrivateCluster, find_server_binaries

from mailgate.queue import QueuePolicy, QueueStore, RetrySchedule

START = 1_800_000_000.0


class Clock:
    """Time as the store sees it; tests move it forward explicitly."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def fixed_policy(**overrides: Any) -> QueuePolicy:
    """The default policy without jitter (``random`` always 0.5: delay * 1.0)."""
    settings: dict[str, Any] = {"schedule": RetrySchedule.parse(random=lambda: 0.5)}
    settings.update(overrides)
    return QueuePolicy(**settings)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A database of its own for this session, on the server ``MAILGATE_TEST_POSTGRES_DSN``
    names when set (a postgresql:// URI of a role that may create databases), else on a
    private cluster started here. Its DSN is exported to os.environ under that name, so
    the crash tests' child processes use it too."""
    server = os.environ.get(POSTGRES_DSN_VARIABLE)
    cluster: PrivateCluster | None = None
    if not server:
        binaries = find_server_binaries()
        if binaries is None:
            pytest.skip(
                f"PostgreSQL backend: {POSTGRES_DSN_VARIABLE} is not set and no initdb/pg_ctl "
                "is installed (scripts/install-test-deps installs the postgresql package)"
            )
        cluster = PrivateCluster.start(binaries)
        server = cluster.dsn
    database = f"mailgate_test_{secrets.token_hex(4)}"
    asyncio.run(_database(server, f'CREATE DATABASE "{database}"'))
    dsn = database_dsn(server, database)
    saved = os.environ.get(POSTGRES_DSN_VARIABLE)
    os.environ[POSTGRES_DSN_VARIABLE] = dsn
    try:
        yield dsn
    finally:
        if saved is None:
            os.environ.pop(POSTGRES_DSN_VARIABLE, None)
        else:
            os.environ[POSTGRES_DSN_VARIABLE] = saved
        try:
            asyncio.run(_database(server, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        finally:
            if cluster is not None:
                cluster.stop()


async def _database(server: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(server)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    name = str(request.param)
    if name != "postgresql":
        yield name
        return
    dsn = request.getfixturevalue("postgres_dsn")
    yield name
    # Every test has its own queue schemas (one per location); they go with the test.
    asyncio.run(drop_schemas(dsn))


@pytest.fixture
def clock() -> Clock:
    return Clock()


StoreOpener = Callable[..., contextlib.AbstractAsyncContextManager[QueueStore]]


@pytest.fixture
def open_store(backend: str, tmp_path: Path, clock: Clock) -> StoreOpener:
    """``async with open_store(policy=...) as store``: the test's store, opened (or
    reopened: same location) on the test's clock, closed at the end of the block."""

    @contextlib.asynccontextmanager
    async def opener(policy: QueuePolicy | None = None) -> AsyncIterator[QueueStore]:
        store = await open_backend(
            backend,
            tmp_path / "queue",
            policy=policy if policy is not None else fixed_policy(),
            clock=clock,
        )
        try:
            yield store
        finally:
            await store.aclose()

    return opener


@pytest.fixture(scope="session")
def mx_port() -> int:
    """The port every receiving server of the end-to-end tests listens on, each on its
    own 127.0.0.x (the ``[outbound] port`` of the servers under test)."""
    from tests.outbound.receivers import free_port

    return free_port()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A test CA (trustme) for receiving servers that offer STARTTLS."""
    import trustme
    from tests.outbound.receivers import Certs

    ca = trustme.CA()
    ca_file = Path(tmp_path_factory.mktemp("ca")) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, ca_file)
