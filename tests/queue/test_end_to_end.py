"""mailgate routes and sends mail onward, end to end: a server built from settings with
``[[routes]]``, ``[queue]`` and ``[outbound]``, real DNS answers from the test DNS server,
receiving SMTP servers on 127.0.0.x that accept, defer, refuse or drop on cue, and the
DSNs that come back parsed by flufl.bounce. Nothing mocked."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from flufl.bounce import all_failures
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import run
from tests.outbound.receivers import Certs, RawServer, Receiver, free_port, greeting, mailgate_server

from mailgate.queue import RecipientState, SQLiteQueueStore

from .e2e import (
    Client,
    bounces,
    message_bytes,
    new_domain,
    parsed,
    publish_mx,
    queue_of,
    queued,
    sender_domain,
    serving,
    settings,
    wait_for,
    wait_until_empty,
)

RELAY_ALL = [{"recipients": ["*"], "action": "relay"}]


@pytest.fixture(scope="module")
def mx_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certs]:
    ca = trustme.CA()
    ca_file = Path(tmp_path_factory.mktemp("ca")) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    yield Certs(ca, ca_file)


def test_relay_to_the_mx(tmp_path: Path, dns_server: DNSTestServer, mx_port: int) -> None:
    domain = new_domain("relay")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.5"))

    async def main() -> None:
        with Receiver("127.0.0.5", mx_port) as receiver:
            async with serving(**settings(tmp_path, dns_server, mx_port, RELAY_ALL)) as server:
                replies, final = await Client(server).send(
                    "alice@example.org", [f"bob@{domain}", f"carol@{domain}"]
                )
                assert [code for code, _ in replies] == [250, 250]
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(receiver.messages) == 1, what="the relayed message")
                await wait_until_empty(server)
        [message] = receiver.messages
        assert message.mail_from == "alice@example.org"
        assert message.rcpt_tos == [f"bob@{domain}", f"carol@{domain}"]
        assert message.data.startswith(b"Received: from client.test")
        assert message.data.endswith(message_bytes())
        assert receiver.ehlo_names == ["mx.mailgate.test"]
        # Nothing was stored locally: every recipient went onward.
        assert not list((tmp_path / "maildir" / "new").glob("*"))

    run(main())
