"""TLS policy through the whole server: ``[[routes]]`` with ``tls``, ``[outbound]``
``tls_policy`` and ``[outbound.tls_policies]``, the queue, real receivers with trustme
certificates, and what ``mailgate queue show`` prints about the TLS of each attempt."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.dns_server import DNSTestServer
from tests.outbound.helpers import run
from tests.outbound.receivers import Certs, Receiver

from mailgate.cli.queue import show_text
from mailgate.queue import RecipientState, SQLiteQueueStore

from .e2e import (
    Client,
    new_domain,
    publish_mx,
    queue_of,
    queued,
    serving,
    settings,
    wait_for,
)


def test_route_and_domain_policies_reach_the_wire_and_queue_show(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    strict = new_domain("routeVerify").lower()  # a route says verify; its MX has a wrong name
    table = new_domain("tableEncrypt").lower()  # the domain table says encrypt; no STARTTLS
    fine = new_domain("fine").lower()  # the default (may): a valid certificate
    publish_mx(dns_server, strict, (10, "mx", "127.0.0.57"))
    publish_mx(dns_server, table, (10, "mx", "127.0.0.60"))
    publish_mx(dns_server, fine, (10, "mx", "127.0.0.56"))
    routes = [
        {"recipients": [f"*@{strict}"], "action": "relay", "tls": "verify"},
        {"recipients": ["*"], "action": "relay"},
    ]
    outbound = {"tls_cafile": str(certs.ca_file), "tls_policies": {table: "encrypt"}}

    async def main() -> None:
        with (
            Receiver("127.0.0.57", mx_port, tls_context=certs.server_context("x.test")) as wrong,
            Receiver("127.0.0.60", mx_port) as plain_only,
            Receiver("127.0.0.56", mx_port, tls_context=certs.server_context(f"mx.{fine}")) as good,
        ):
            values = settings(tmp_path, dns_server, mx_port, routes, outbound=outbound)
            async with serving(**values) as server:
                _, final = await Client(server).send(
                    "alice@example.org", [f"a@{strict}", f"b@{table}", f"c@{fine}"]
                )
                assert final is not None and final[0] == 250

                def attempted() -> bool:
                    return bool(good.messages) and wrong.starttls > 0

                await wait_for(attempted, what="the three deliveries")
                store = queue_of(server).store
                assert isinstance(store, SQLiteQueueStore)
                for _ in range(200):  # until every attempt is recorded (bounded: 10 s)
                    [message] = await queued(server)
                    if all(r.attempts for r in message.recipients):
                        break
                    await asyncio.sleep(0.05)
                details = await store.show(message.id)
                assert details is not None
                text = show_text(details, None, time.time())
        assert wrong.messages == [] and plain_only.messages == []
        assert [m.tls for m in good.messages] == [True]
        by_address = {r.address: r for r in message.recipients}
        assert by_address[f"a@{strict}"].destination == f"relay:{strict}?tls=verify"
        assert by_address[f"a@{strict}"].state is RecipientState.DEFERRED
        assert by_address[f"b@{table}"].state is RecipientState.DEFERRED
        # queue show: the TLS of each attempt and the policy with its source.
        assert f"via relay:{strict}?tls=verify" in text
        assert "Server certificate not verified" in text
        assert "(TLS policy=verify(route))" in text
        assert "TLS is required, but was not offered" in text
        assert "(TLS policy=encrypt(domain))" in text
        assert "/verified(ca) policy=may(default)" in text

    run(main())
