"""DNS block and allow lists against a real DNS server (tests/dns_server.py): refusals at
connect and RCPT, the header action, return codes, failing open, allow lists, caching,
exemptions, configuration errors, and IPv6 nibble names at unit level."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from tests.dns_server import DNSTestServer, unique

from mailgate.config import options_from_settings
from mailgate.dns import Resolver
from mailgate.hooks import Address, Envelope, Message, Reject, Session
from mailgate.plugins.dnsbl import (
    DNSBL,
    Lookups,
    Zone,
    ZoneError,
    parse_code,
    plugins_from_options,
)
from mailgate.plugins.policy import (
    DECISIONS,
    PolicyConfigError,
    PolicyEnv,
    allowlisted,
)
from mailgate.server.errors import StartupError
from mailgate.testing import RunningServer, running_server

MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


def new_zone(prefix: str = "bl") -> str:
    return f"{unique(prefix)}.test"


def listing(dns: DNSTestServer, zone: str, client: str, *answers: str, txt: str = "") -> str:
    """List ``client`` (an IPv4 address) in ``zone``; returns the name looked up."""
    name = ".".join(reversed(client.split("."))) + "." + zone
    records = [f"{name}. 60 IN A {answer}" for answer in answers]
    if txt:
        records.append(f'{name}. 60 IN TXT "{txt}"')
    dns.add("\n".join(records))
    return name


@contextmanager
def server(dns: DNSTestServer, **settings: Any) -> Iterator[RunningServer]:
    base: dict[str, Any] = {
        "dns_nameservers": [dns.address],
        "dns_timeout": 1,
        "local_domains": ["example.com"],
        "relay_networks": [],
    }
    with running_server(**{**base, **settings}) as srv:
        yield srv


def client(srv: RunningServer, ip: str) -> smtplib.SMTP:
    """A client from ``ip`` (any 127.x.y.z), greeted and past EHLO."""
    c = smtplib.SMTP(srv.host, srv.port, source_address=(ip, 0), timeout=10)
    c.ehlo("bot.example")
    return c


def delta(before: dict[tuple[str, str], int], verdict: str) -> int:
    return DECISIONS[("dnsbl", verdict)] - before.get(("dnsbl", verdict), 0)


def snapshot() -> dict[tuple[str, str], int]:
    return dict(DECISIONS)


# --- refusals -----------------------------------------------------------------------------------


def test_listed_client_is_refused_at_each_rcpt_naming_zone_and_reason(
    dns_server: DNSTestServer,
) -> None:
    zone = new_zone()
    listing(dns_server, zone, "127.0.0.2", "127.0.0.2", txt="Listed, see https://bl.test/q")
    before = snapshot()
    with server(dns_server, dnsbl=[{"zone": zone}]) as srv:
        with client(srv, "127.0.0.2") as c:
            assert c.mail("spam@example.org")[0] == 250
            code, text = c.rcpt("a@example.com")
            assert code == 554
            assert text.decode() == (
                f"5.7.1 Service unavailable; client [127.0.0.2] blocked using {zone}; "
                "Listed, see https://bl.test/q"
            )
            assert c.rcpt("b@example.com")[0] == 554  # each attempt refused (and logged)
        with client(srv, "127.0.0.3") as c:  # not listed
            c.sendmail("ok@example.org", ["a@example.com"], MESSAGE)
        srv.messages.wait(1)
    assert delta(before, "reject") == 2
    assert [m.session.peer_host for m in srv.messages] == ["127.0.0.3"]


def test_reject_connect_refuses_the_banner(dns_server: DNSTestServer) -> None:
    zone = new_zone()
    listing(dns_server, zone, "127.0.0.4", "127.0.0.4", txt="go away")
    with server(dns_server, dnsbl=[{"zone": zone, "action": "reject_connect"}]) as srv:
        with pytest.raises(smtplib.SMTPConnectError) as caught:
            client(srv, "127.0.0.4")
        assert caught.value.smtp_code == 554
        text = caught.value.smtp_error.decode()
        assert f"blocked using {zone}; go away" in text
        assert "5.7.1" not in text  # the banner carries no enhanced code
        with client(srv, "127.0.0.5") as c:
            assert c.noop()[0] == 250


def test_custom_message_without_txt(dns_server: DNSTestServer) -> None:
    zone = new_zone()
    name = listing(dns_server, zone, "127.0.0.6", "127.0.0.3", txt="never shown")
    table = {"zone": zone, "message": "{ip} is on {zone} ({result}){reason}", "use_txt": False}
    with server(dns_server, dnsbl=[table]) as srv:
        with client(srv, "127.0.0.6") as c:
            c.mail("x@example.org")
            code, text = c.rcpt("a@example.com")
    assert (code, text.decode()) == (554, f"5.7.1 127.0.0.6 is on {zone} (127.0.0.3)")
    assert dns_server.resolver.questions.count((name, "TXT")) == 0


def test_header_action_marks_the_message(dns_server: DNSTestServer) -> None:
    zone = new_zone()
    listing(dns_server, zone, "127.0.0.7", "127.0.0.3")
    before = snapshot()
    stored: list[list[str] | None] = []

    def configure(s: Any) -> None:
        # Steps registered in code run after the policy plugins: they see the header.
        # (srv.messages holds the bytes as they came in, before any hook added headers.)
        @s.on_message
        def look(session: Session, envelope: Envelope, message: Message) -> None:
            stored.append(message.as_email().get_all("X-Mailgate-DNSBL"))

    settings = {"dnsbl": [{"zone": zone, "action": "header"}], "configure": configure}
    with server(dns_server, **settings) as srv:
        with client(srv, "127.0.0.7") as c:
            c.sendmail("x@example.org", ["a@example.com"], MESSAGE)
            c.sendmail("x@example.org", ["b@example.com"], MESSAGE)
        srv.messages.wait(2)
    expected = [f"zone={zone}; ip=127.0.0.7; result=127.0.0.3"]
    assert stored == [expected, expected]  # once per message, each time
    assert delta(before, "annotate") == 1


# --- return codes ---------------------------------------------------------------------------------


def test_codes_that_do_not_count_let_the_client_through(dns_server: DNSTestServer) -> None:
    zone, pattern_zone = new_zone(), new_zone()
    listing(dns_server, zone, "127.0.0.8", "127.0.0.10")
    listing(dns_server, pattern_zone, "127.0.0.8", "127.0.5.3")
    listing(dns_server, zone, "127.0.0.9", "127.0.0.2")
    tables = [
        {"zone": zone, "codes": ["127.0.0.2", "127.0.0.4-127.0.0.7"]},
        {"zone": pattern_zone, "codes": "127.0.[0-4].2-3"},  # 127.0.5.3 is outside
    ]
    with server(dns_server, dnsbl=tables) as srv:
        with client(srv, "127.0.0.8") as c:
            c.sendmail("x@example.org", ["a@example.com"], MESSAGE)
        with client(srv, "127.0.0.9") as c:
            c.mail("x@example.org")
            code, text = c.rcpt("a@example.com")
        srv.messages.wait(1)
    assert code == 554 and zone in text.decode()


def test_parse_code_forms() -> None:
    from ipaddress import IPv4Address as A

    assert parse_code("127.0.0.2").matches(A("127.0.0.2"))
    assert not parse_code("127.0.0.2").matches(A("127.0.0.3"))
    assert parse_code("127.0.0.0/30").matches(A("127.0.0.3"))
    assert not parse_code("127.0.0.0/30").matches(A("127.0.0.4"))
    assert parse_code("127.0.0.4-127.0.0.7").matches(A("127.0.0.7"))
    assert not parse_code("127.0.0.4-127.0.0.7").matches(A("127.0.0.8"))
    dnswl = parse_code("127.0.[0..255].[1..3]")
    assert dnswl.matches(A("127.0.15.1")) and not dnswl.matches(A("127.0.15.0"))
    assert parse_code("127.*.*.2").matches(A("127.9.9.2"))
    assert parse_code("127.0.0.2-3").matches(A("127.0.0.3"))
    for bad, why in [
        ("127.0.0.256", "not an octet"),
        ("127.0.0.7-127.0.0.4", "ends before it starts"),
        ("127.0.0.3-2", "ends before it starts"),
        ("10.0.0.2", "inside 127.0.0.0/8"),
        ("127.0.0.0/7", "inside 127.0.0.0/8"),
        ("listed", "is not a return code"),
        ("127.0.0", "is not a return code"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_code(bad)


# --- failing open ----------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["127.255.255.254", "10.0.0.2"])
def test_error_answers_never_block(
    dns_server: DNSTestServer, caplog: pytest.LogCaptureFixture, answer: str
) -> None:
    zone = new_zone()
    listing(dns_server, zone, "127.0.0.10", answer)
    before = snapshot()
    with caplog.at_level(logging.WARNING, logger="mailgate.policy"):
        with server(dns_server, dnsbl=[{"zone": zone}]) as srv:
            with client(srv, "127.0.0.10") as c:
                c.sendmail("x@example.org", ["a@example.com"], MESSAGE)
            srv.messages.wait(1)
    assert delta(before, "error") == 1 and delta(before, "reject") == 0
    [record] = [r for r in caplog.records if getattr(r, "zone", None) == zone]
    assert record.levelno == logging.WARNING
    assert f"answer {answer} is not a listing" in record.getMessage()


def test_servfail_never_blocks(dns_server: DNSTestServer, caplog: pytest.LogCaptureFixture) -> None:
    zone = new_zone()
    dns_server.fail(f"11.0.0.127.{zone}")
    with caplog.at_level(logging.WARNING, logger="mailgate.policy"):
        with server(dns_server, dnsbl=[{"zone": zone, "action": "reject_connect"}]) as srv:
            with client(srv, "127.0.0.11") as c:
                c.sendmail("x@example.org", ["a@example.com"], MESSAGE)
            srv.messages.wait(1)
    [record] = [r for r in caplog.records if getattr(r, "zone", None) == zone]
    assert "lookup failed" in record.getMessage()


def test_hanging_server_times_out_and_the_banner_does_not_wait(
    dns_server: DNSTestServer,
) -> None:
    zone = new_zone()
    dns_server.hang(f"12.0.0.127.{zone}")
    with server(dns_server, dnsbl=[{"zone": zone}], dns_timeout=0.5) as srv:
        started = time.monotonic()
        with client(srv, "127.0.0.12") as c:
            greeted = time.monotonic() - started
            c.mail("x@example.org")
            assert c.rcpt("a@example.com")[0] == 250
            answered = time.monotonic() - started
    # The lookup runs while the client talks; only RCPT waits for it, at most dns_timeout.
    assert greeted < 0.4
    assert 0.3 < answered < 1.5


# --- allow lists ---------------------------------------------------------------------------------


def test_allow_list_skips_the_block_lists(dns_server: DNSTestServer) -> None:
    allow, block = new_zone("wl"), new_zone()
    listing(dns_server, allow, "127.0.0.13", "127.0.10.2")
    listing(dns_server, block, "127.0.0.13", "127.0.0.2")
    # dnswl.org's "too many queries" answer does not allow-list with the default codes
    listing(dns_server, allow, "127.0.0.14", "127.0.0.255")
    listing(dns_server, block, "127.0.0.14", "127.0.0.2")
    seen: dict[str, str | None] = {}

    def configure(s: Any) -> None:
        @s.on_rcpt
        def record(session: Session, envelope: Envelope, address: Address) -> None:
            seen[session.peer_host] = allowlisted(session)

    tables = [
        {"zone": block, "action": "reject_connect"},  # listed first: the allow list still wins
        {"zone": allow, "type": "allow", "codes": ["127.0.[0-255].0-3"]},
    ]
    with server(dns_server, dnsbl=tables, configure=configure) as srv:
        with client(srv, "127.0.0.13") as c:
            c.sendmail("x@example.org", ["a@example.com"], MESSAGE)
        srv.messages.wait(1)
    assert seen == {"127.0.0.13": f"dnswl {allow}"}

    with server(dns_server, dnsbl=[{"zone": block}, {"zone": allow, "type": "allow"}]) as srv:
        with client(srv, "127.0.0.14") as c:
            c.mail("x@example.org")
            assert c.rcpt("a@example.com")[0] == 554


# --- caching and exemptions ------------------------------------------------------------------------


def test_answers_are_cached_between_connections(dns_server: DNSTestServer) -> None:
    zone = new_zone()
    name = listing(dns_server, zone, "127.0.0.15", "127.0.0.2", txt="cached")
    with server(dns_server, dnsbl=[{"zone": zone}]) as srv:
        for _ in range(2):
            with client(srv, "127.0.0.15") as c:
                c.mail("x@example.org")
                code, text = c.rcpt("a@example.com")
                assert code == 554 and text.decode().endswith("; cached")
    assert dns_server.asked(name) == 2  # one A and one TXT question, for both connections
    assert sorted(q[1] for q in dns_server.resolver.questions if q[0] == name) == ["A", "TXT"]


def test_authenticated_and_relay_network_clients_are_not_looked_up(
    dns_server: DNSTestServer,
) -> None:
    zone = new_zone()
    name = listing(dns_server, zone, "127.0.0.16", "127.0.0.2")
    settings: dict[str, Any] = {"auth_users": ["joe:secret"], "allow_insecure_auth": True}
    with server(dns_server, dnsbl=[{"zone": zone}], **settings) as srv:
        with client(srv, "127.0.0.16") as c:
            c.login("joe", "secret")
            c.sendmail("joe@example.org", ["a@example.com"], MESSAGE)
        srv.messages.wait(1)
    asked = dns_server.asked(name)  # looked up at connect, before AUTH: not used
    with server(dns_server, dnsbl=[{"zone": zone}], relay_networks=["127.0.0.16/32"]) as srv:
        with client(srv, "127.0.0.16") as c:
            c.sendmail("x@example.org", ["a@example.com"], MESSAGE)
        srv.messages.wait(1)
    assert dns_server.asked(name) == asked  # relay networks: no question at all


def test_dnsbl_zones_setting(dns_server: DNSTestServer) -> None:
    zone = new_zone()
    listing(dns_server, zone, "127.0.0.17", "127.0.0.2")
    with server(dns_server, dnsbl_zones=[zone]) as srv:
        with client(srv, "127.0.0.17") as c:
            c.mail("x@example.org")
            code, text = c.rcpt("a@example.com")
    assert code == 554 and f"blocked using {zone}" in text.decode()


# --- configuration -------------------------------------------------------------------------------


def plugins(**settings: Any) -> list[Any]:
    return plugins_from_options(PolicyEnv(options_from_settings(settings)))


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"zone": "bl.test", "action": "refuse"}, r"\[\[dnsbl\]\] #1 action: 'refuse' is not one"),
        ({"zone": "bl.test", "codes": ["127.0.0.2", "2"]}, r"codes: '2' is not a return code"),
        ({"zone": "bl.test", "codes": "10.0.0.2"}, r"codes: '10.0.0.2': DNS lists answer inside"),
        (
            {"zone": "bl.test", "acton": "header"},
            r"unknown key 'acton' \(did you mean 'action'\?\)",
        ),
        ({"zone": "bl.test", "message": "blocked by {list}"}, r"message: .*unknown placeholder"),
        ({"zone": "bl.test", "message": "blocked {zone"}, r"message: bad reply text"),
        ({"zone": "bl..test"}, r"zone: 'bl..test' is not a DNS zone name"),
        ({"codes": ["127.0.0.2"]}, r"missing key \"zone\""),
        ({"zone": "wl.test", "type": "allow", "action": "header"}, r"action: is for block lists"),
        ({"zone": "bl.test", "ipv6": "no"}, r"ipv6: expected true or false"),
    ],
)
def test_config_errors(table: dict[str, Any], error: str) -> None:
    with pytest.raises(PolicyConfigError, match=error):
        plugins(dnsbl=[table])


def test_config_error_stops_the_server() -> None:
    with pytest.raises(StartupError, match="setting \\[\\[dnsbl\\]\\] #2 action"):
        with running_server(dnsbl=[{"zone": "a.test"}, {"zone": "b.test", "action": "nope"}]):
            pass


def test_plugins_from_options() -> None:
    assert plugins() == []
    [plugin] = plugins(
        dnsbl=[{"zone": "A.test.", "action": "header"}],
        dnsbl_zones=["a.test", "b.test"],
        relay_networks=["192.0.2.0/24"],
    )
    assert isinstance(plugin, DNSBL)
    # the table wins over the simple setting for the same zone
    assert [(z.zone, z.action) for z in plugin.zones] == [
        ("a.test", "header"),
        ("b.test", "reject_rcpt"),
    ]
    assert [str(n) for n in plugin.relay_networks] == ["192.0.2.0/24"]


def test_zone_in_code() -> None:
    zone = Zone("bl.test", codes=["127.0.0.2"], action="reject_connect")
    assert zone.codes == ("127.0.0.2",)
    with pytest.raises(ZoneError, match="action"):
        Zone("bl.test", action="drop")
    with pytest.raises(ValueError, match="at least one zone"):
        DNSBL([])


# --- unit level: IPv6, address changes, closing -------------------------------------------------


def session(peer: str) -> Session:
    return Session(id="t", peer_host=peer, peer_port=1, local_host="::1", local_port=25)


def test_ipv6_client_is_looked_up_by_nibbles(dns_server: DNSTestServer) -> None:
    zone, v4only = new_zone(), new_zone()
    nibbles = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    dns_server.add(f"{nibbles}.{zone}. 60 IN A 127.0.0.2")
    dns_server.add(f"{nibbles}.{v4only}. 60 IN A 127.0.0.2")

    async def main() -> None:
        plugin = DNSBL(
            [Zone(v4only, ipv6=False), Zone(zone)],
            resolver=Resolver([dns_server.address], timeout=1),
            relay_networks=(),
        )
        s = session("2001:db8::1")
        await plugin.on_connect(s)
        with pytest.raises(Reject) as caught:
            await plugin.on_rcpt(s, Envelope(Address("x@example.org")), Address("a@example.com"))
        assert caught.value.code == 554
        assert caught.value.text.startswith("Service unavailable; client [2001:db8::1] blocked")
        assert caught.value.text.endswith(f"using {zone}")
        state = s.notes["dnsbl"]
        assert isinstance(state, Lookups)
        assert [x.status for x in state.listings] == ["skipped", "listed"]
        await plugin.on_close(s)

    asyncio.run(main())
    assert dns_server.asked(f"{nibbles}.{zone}") == 2  # A, then TXT for the reason
    assert dns_server.asked(f"{nibbles}.{v4only}") == 0


def test_mapped_ipv4_and_changed_address(dns_server: DNSTestServer) -> None:
    zone = new_zone()
    listing(dns_server, zone, "192.0.2.7", "127.0.0.2")

    async def main() -> None:
        plugin = DNSBL([zone], resolver=Resolver([dns_server.address], timeout=1))
        rcpt = (Envelope(Address("x@example.org")), Address("a@example.com"))
        s = session("::ffff:192.0.2.7")
        await plugin.on_connect(s)
        with pytest.raises(Reject, match=r"client \[192\.0\.2\.7\]"):
            await plugin.on_rcpt(s, *rcpt)
        s.peer_host = "192.0.2.8"  # XCLIENT from a trusted proxy: a new client, asked again
        assert await plugin.on_rcpt(s, *rcpt) is None
        s.peer_host = "127.0.0.1"  # loopback is in the default relay_networks
        assert await plugin.on_rcpt(s, *rcpt) is None
        assert s.notes["dnsbl"].task is None  # not looked up

    asyncio.run(main())


def test_close_cancels_pending_lookups(dns_server: DNSTestServer) -> None:
    zone = new_zone()
    dns_server.hang(f"9.2.0.192.{zone}")

    async def main() -> None:
        plugin = DNSBL([zone], resolver=Resolver([dns_server.address], timeout=3))
        s = session("192.0.2.9")
        await plugin.on_connect(s)  # returns at once: nothing is decided at connect
        task = s.notes["dnsbl"].task
        assert task is not None and not task.done()
        await plugin.on_close(s)
        await asyncio.sleep(0)
        assert task.cancelled()
        await plugin.aclose()

    asyncio.run(asyncio.wait_for(main(), 2))
