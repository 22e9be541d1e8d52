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
