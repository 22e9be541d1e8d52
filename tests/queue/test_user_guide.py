"""The example of docs/user-guide.md's "Sending mail onward" is true: the file builds as
``mailgate serve --config`` reads it, and the server it describes delivers ann locally,
forwards bob to the partner's gateway with AUTH over STARTTLS and relays carol to her
domain's MX (listen address, paths, DNS and ports changed for the test)."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from tests.dns_server import DNSTestServer
from tests.outbound.helpers import run
from tests.outbound.receivers import Certs, Receiver, mailgate_server

from mailgate.config import build_options
from mailgate.plugins.routing import RouteTable
from mailgate.queue.settings import outbound_options, queue_settings

from .e2e import Client, serving, wait_for, wait_until_empty

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "user-guide.md"


def example() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    section = text.split("## Sending mail onward", 1)[1]
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


def test_the_example_file_builds(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(example(), encoding="utf-8")
    options = build_options(argparse.Namespace(config=str(path)))
    table = RouteTable.from_sections(options.policy)
    assert [route.name for route in table.routes] == ["ours", "partner", "internet"]
    assert table.match("ann@example.com").destination == "deliver"
    assert table.match("carol@elsewhere.example").destination == "relay:elsewhere.example"
    assert queue_settings(options.policy).delay_warning == 4 * 3600
    assert outbound_options(options.policy, options.hostname).helo == "mx.example.com"


def test_the_example_server_routes_as_described(
    tmp_path: Path,
    dns_server: DNSTestServer,
    mx_port: int,
    certs: Certs,
) -> None:
    document: dict[str, Any] = tomllib.loads(example())
    dns_server.add(
        "elsewhere.example. 60 IN MX 10 mx.elsewhere.example.\n"
        "mx.elsewhere.example. 60 IN A 127.0.0.27\n"
        "gateway.partner.example. 60 IN A 127.0.0.26\n"
    )
    server_table = dict(document["server"])
    server_table.update(
        listen="127.0.0.1:0",
        maildir=tmp_path / "maildir",
        state_dir=tmp_path / "state",
        dns_nameservers=[dns_server.address],
        relay_networks=["127.0.0.0/8"],
        close_timeout=2,
    )
    routes = document["routes"]
    routes[1]["to"] = routes[1]["to"].replace(":587", f":{mx_port}")
    outbound = {**document["outbound"], "port": mx_port, "connect_timeout": 2}

    async def main() -> None:
        async with mailgate_server(
            tmp_path,
            certs,
            f"127.0.0.26:{mx_port}",
            "gateway.partner.example",
            auth_users=["example:secret"],
        ) as (_, gateway):
            with Receiver("127.0.0.27", mx_port) as elsewhere:
                async with serving(
                    **server_table, routes=routes, queue=document["queue"], outbound=outbound
                ) as server:
                    _, final = await Client(server).send(
                        "boss@example.com",
                        ["ann@example.com", "bob@partner.example", "carol@elsewhere.example"],
                    )
                    assert final is not None and final[0] == 250
                    await wait_for(lambda: len(elsewhere.messages) == 1, what="carol's copy")
                    await wait_for(lambda: len(gateway.messages) == 1, what="bob's copy")
                    await wait_until_empty(server)
        assert elsewhere.messages[0].rcpt_tos == ["carol@elsewhere.example"]
        [(session, envelope, _)] = gateway.messages
        assert session.user == "example" and session.tls is not None
        assert list(envelope.rcpt_tos) == ["bob@partner.example"]
        assert len(list((tmp_path / "maildir" / "new").iterdir())) == 1

    run(main())
