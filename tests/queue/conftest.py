"""Fixtures of the queue suite: a store per backend, a clock the test moves."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.queue.backends import BACKENDS, open_backend

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


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


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
