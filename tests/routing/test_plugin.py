"""RoutingPlugin in a real server: reject rules answer at RCPT with their reply; every
accepted recipient's decision is there for the message stage."""

from __future__ import annotations

import asyncio
import smtplib
import tomllib
from typing import Any

from mailgate import Server
from mailgate.hooks import Address, Envelope, Message, Session
from mailgate.plugins.policy import DECISIONS, PolicyEnv
from mailgate.plugins.routing import Action, RouteDecision, RouteTable, RoutingPlugin
from mailgate.plugins.routing.plugin import DECISIONS_NOTE, plugins_from_options
from mailgate.server.options import PolicySection, ServerOptions
from mailgate.testing import running_server

INSIDE = "127.0.12.2"  # in 127.0.12.0/28 (this file's loopback addresses)
OUTSIDE = "127.0.12.100"
MESSAGE = b"Subject: routing test\r\n\r\nhello\r\n"

ROUTES = """
[[routes]]
recipients = ["*@blocked.test"]
action = "reject"
reply = "550 5.7.1 No mail for blocked.test"

[[routes]]
recipients = ["*@later.test"]
action = "reject"
reply = "451 4.7.1 Not now"

[[routes]]
name = "partners"
recipients = ["*@partner.test"]
clients = ["127.0.12.0/28"]
action = "forward"
to = "smtp://127.0.0.1:2600"

[[routes]]
recipients = ["*@vip.test"]
authenticated = true
action = "forward"
to = "smtps://[::1]:465"

[[routes]]
recipients = ["*@local.test"]
action = "deliver"

[[routes]]
recipients = ["*"]
action = "relay"
"""


def table() -> RouteTable:
    return RouteTable.from_document(tomllib.loads(ROUTES), "mailgate.toml")


class Recorder:
    """A message step after routing, as the queue will be: it asks the plugin where each
    recipient goes."""

    name = "recorder"

    def __init__(self, routing: RoutingPlugin) -> None:
        self.routing = routing
        self.seen: list[tuple[dict[str, list[str]], list[tuple[str, RouteDecision]]]] = []

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        groups = self.routing.destinations(session, envelope)
        decisions = self.routing.decisions(session, envelope)
        self.seen.append(
            (
                {key: [str(a) for a in addresses] for key, addresses in groups.items()},
                [(str(a), d) for a, d in decisions],
            )
        )


def serve(**settings: Any) -> tuple[Any, Recorder]:
    routing = RoutingPlugin(table())
    recorder = Recorder(routing)

    def configure(server: Server) -> None:
        server.add_plugin(routing)
        server.add_plugin(recorder, after="routing")

    return running_server(configure=configure, **settings), recorder


def test_reject_routes_answer_at_rcpt_and_decisions_reach_the_message_stage() -> None:
    srv_context, recorder = serve()
    with srv_context as srv:
        before = DECISIONS[("routing", "reject")]
        with smtplib.SMTP(srv.host, srv.port, source_address=(INSIDE, 0), timeout=10) as client:
            client.ehlo("client.test")
            client.mail("sender@corp.test")
            assert client.rcpt("x@blocked.test") == (550, b"5.7.1 No mail for blocked.test")
            assert client.rcpt("x@later.test") == (451, b"4.7.1 Not now")
            assert client.rcpt("a@partner.test")[0] == 250
            assert client.rcpt("b@Partner.Test")[0] == 250
            assert client.rcpt("c@local.test")[0] == 250
            assert client.rcpt("d@elsewhere.test")[0] == 250
            assert client.rcpt("e@elsewhere.test")[0] == 250
            assert client.rcpt("f@vip.test")[0] == 250  # not authenticated: relayed
            assert client.data(MESSAGE)[0] == 250
        srv.messages.wait(1)
        assert DECISIONS[("routing", "reject")] == before + 1
        assert DECISIONS[("routing", "tempfail")] >= 1
    [(groups, decisions)] = recorder.seen
    assert groups == {
        "forward:smtp://127.0.0.1:2600": ["a@partner.test", "b@Partner.Test"],
        "deliver": ["c@local.test"],
        "relay:elsewhere.test": ["d@elsewhere.test", "e@elsewhere.test"],
        "relay:vip.test": ["f@vip.test"],
    }
    by_address = dict(decisions)
    assert by_address["a@partner.test"].name == "partners"
    assert by_address["a@partner.test"].index == 3
    assert by_address["c@local.test"].action is Action.DELIVER


def test_client_address_and_authentication_come_from_the_session() -> None:
    srv_context, recorder = serve(auth_users=["alice:wonderland"], allow_insecure_auth=True)
    with srv_context as srv:
        with smtplib.SMTP(srv.host, srv.port, source_address=(OUTSIDE, 0), timeout=10) as client:
            client.login("alice", "wonderland")
            refused = client.sendmail("alice@corp.test", ["a@partner.test", "f@vip.test"], MESSAGE)
            assert refused == {}
        srv.messages.wait(1)
    [(groups, _)] = recorder.seen
    # The client is outside 127.0.12.0/28: partner mail is relayed; alice authenticated.
    assert groups == {
        "relay:partner.test": ["a@partner.test"],
        "forward:smtps://[::1]:465": ["f@vip.test"],
    }


def test_each_transaction_has_its_own_decisions() -> None:
    srv_context, recorder = serve()
    with srv_context as srv:
        with smtplib.SMTP(srv.host, srv.port, source_address=(INSIDE, 0), timeout=10) as client:
            client.ehlo("client.test")
            client.mail("s@corp.test")
            assert client.rcpt("old@partner.test")[0] == 250
            client.rset()
            assert client.sendmail("s@corp.test", ["a@local.test"], MESSAGE) == {}
            assert client.sendmail("<>", ["b@partner.test"], MESSAGE) == {}
        srv.messages.wait(2)
    assert [groups for groups, _ in recorder.seen] == [
        {"deliver": ["a@local.test"]},
        {"forward:smtp://127.0.0.1:2600": ["b@partner.test"]},
    ]


def test_a_recipient_the_plugin_did_not_see_is_routed_when_asked() -> None:
    """An earlier step that accepts at RCPT ends the chain before routing runs: the
    message stage still gets a decision, made then."""
    routing = RoutingPlugin(table())
    session = Session(id="t", peer_host=INSIDE, peer_port=1, local_host="127.0.0.1", local_port=25)
    envelope = Envelope(
        Address("s@corp.test"), (Address("x@blocked.test"), Address("y@partner.test"))
    )
    asyncio.run(routing.on_mail(session, envelope, Address("s@corp.test")))
    assert session.notes[DECISIONS_NOTE] == {}
    groups = routing.destinations(session, envelope)
    # The reject reply is a key, so the caller bounces the accepted mail instead of dropping it.
    assert groups == {
        "550 5.7.1 No mail for blocked.test": ["x@blocked.test"],
        "forward:smtp://127.0.0.1:2600": ["y@partner.test"],
    }
    asyncio.run(routing.on_reset(session, envelope))
    assert DECISIONS_NOTE not in session.notes


def test_plugins_from_options() -> None:
    section = PolicySection(
        "routes", {"recipients": ["*"], "action": "relay"}, None, "setting [[routes]] #1"
    )
    [plugin] = plugins_from_options(PolicyEnv(ServerOptions(policy=(section,))))
    assert isinstance(plugin, RoutingPlugin)
    assert plugin.table.match("a@b.test").destination == "relay:b.test"
    assert plugins_from_options(PolicyEnv(ServerOptions())) == []
