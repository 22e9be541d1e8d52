"""Fixtures of the outbound tests: one port for every receiving server, a CA."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from tests.outbound.receivers import Certs, free_port


@pytest.fixture(scope="session")
def mx_port() -> int:
    """The port every test MX listens on (``OutboundOptions.port``), on its own 127.0.0.x."""
    return free_port()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    ca_file = Path(tmp_path_factory.mktemp("ca")) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, ca_file)
