"""Suite-wide settings."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
from tests.dns_server import DNSTestServer

# A Server made in code keeps its state under $XDG_STATE_HOME/mailgate by default; the
# suite's servers (and the examples it starts) must not write into the real home.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="mailgate-tests-state-")


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DNSTestServer]:
    """A real authoritative DNS server on 127.0.0.1 (see tests/dns_server.py)."""
    server = DNSTestServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server for the shared-state tests: the one ``MAILGATE_TEST_REDIS_URL``
    names when set, else a private redis-server started here (tests/redis_server.py).
    Tests keep apart by key prefix (:func:`redis_prefix`), so one server serves all."""
    from tests.redis_server import REDIS_URL_VARIABLE, PrivateRedis, redis_server_binary

    configured = os.environ.get(REDIS_URL_VARIABLE)
    if configured:
        yield configured
        return
    if redis_server_binary() is None:
        pytest.skip(
            f"Redis state: {REDIS_URL_VARIABLE} is not set and redis-server is not installed "
            "(scripts/install-test-deps installs the redis-server package)"
        )
    server = PrivateRedis.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    import secrets

    return f"mailgate-test-{secrets.token_hex(6)}:"
