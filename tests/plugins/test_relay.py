"""Relay control: local domains from anyone, other domains only from authenticated users
and relay networks, 554 5.7.1 otherwise; open_relay only when asked, with a warning."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailgate.hooks import Address, Envelope, Reject, Session
from mailgate.plugins.policy import DECISIONS
from mailgate.plugins.relay import DomainSet, RelayControl
from mailgate.testing import running_server

OUTSIDE = "127.0.3.1"  # a client that is not in relay_networks=[] (127.0.3.0/24: this file's)
MESSAGE = b"Subject: relay test\r\n\r\nhello\r\n"


def session(peer: str = "192.0.2.7", user: str | None = None) -> Session:
    s = Session(id="t", peer_host=peer, peer_port=1, local_host="127.0.0.1", local_port=25)
    s.user = user
    return s


# --- the matching rules, without sockets ------------------------------------------------


def test_domain_set_exact_wildcards_case_and_idn() -> None:
    domains = DomainSet(["Example.COM", "*.corp.example", "bücher.example", "sub.test."])
    assert "example.com" in domains
    assert "EXAMPLE.com." in domains
    assert "mail.example.com" not in domains  # exact names do not cover subdomains
    assert "a.corp.example" in domains
    assert "a.b.corp.example" in domains
    assert "corp.example" not in domains  # *.corp.example is subdomains only
    assert "xn--bcher-kva.example" in domains
    assert "bücher.example" in domains
    assert "sub.test" in domains
    assert "other.test" not in domains
    assert not DomainSet()


def test_postmaster_without_domain_is_always_local() -> None:
    relay = RelayControl(["example.com"], relay_networks=())
    assert relay.is_local(Address("postmaster"))
    assert relay.is_local(Address("PostMaster"))
    assert not relay.is_local(Address("root"))
    assert not relay.is_local(Address("x@[192.0.2.1]"))


def test_the_relay_networks_answer_is_remembered_and_follows_a_new_value() -> None:
    relay = RelayControl(["example.com"], relay_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    assert relay.may_relay("10.1.2.3") and relay.may_relay("10.1.2.3")
    assert not relay.may_relay("192.0.2.7") and not relay.may_relay("not an address")
    relay.relay_networks = (ipaddress.ip_network("192.0.2.0/24"),)
    assert not relay.may_relay("10.1.2.3")
    assert relay.may_relay("192.0.2.7")
    for n in range(3000):  # bounded: the table starts over
        relay.may_relay(f"10.0.{n // 256}.{n % 256}")
    assert relay.may_relay("192.0.2.7") and not relay.may_relay("10.1.2.3")


def test_decisions_for_each_kind_of_client() -> None:
    relay = RelayControl(["example.com"], relay_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    envelope = Envelope()  # what the server passes: relay control does not look at it

    async def rcpt(s: Session, to: str) -> None:
        await relay.on_rcpt(s, envelope, Address(to))

    asyncio.run(rcpt(session(), "user@example.com"))
    asyncio.run(rcpt(session(user="alice"), "user@elsewhere.test"))
    asyncio.run(rcpt(session("10.1.2.3"), "user@elsewhere.test"))
    asyncio.run(rcpt(session("::ffff:10.1.2.3"), "user@elsewhere.test"))  # mapped IPv4
    before = DECISIONS[("relay", "reject")]
    with pytest.raises(Reject) as refused:
        asyncio.run(rcpt(session(), "user@elsewhere.test"))
    reply = refused.value.reply("rcpt")
    assert (reply.code, reply.status) == (554, "5.7.1")
    assert "Relay access denied" in reply.lines[0]
    assert DECISIONS[("relay", "reject")] == before + 1


# --- a real server ------------------------------------------------------------------------


def rcpt_code(port: int, to: str, *, source: str = OUTSIDE, login: bool = False) -> tuple:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as client:
        client.ehlo("client.test")
        if login:
            client.login("alice", "wonderland")
        client.mail("sender@remote.test")
        return client.rcpt(to)


def test_unauthenticated_relay_refused_local_accepted() -> None:
    with running_server(local_domains=["example.com", "*.example.org"], relay_networks=[]) as srv:
        code, text = rcpt_code(srv.port, "someone@elsewhere.test")
        assert code == 554
        assert text.startswith(b"5.7.1 <someone@elsewhere.test>: Relay access denied")
        assert rcpt_code(srv.port, "user@example.com")[0] == 250
        assert rcpt_code(srv.port, "user@lists.example.org")[0] == 250
        assert rcpt_code(srv.port, "postmaster")[0] == 250
        # A refused recipient does not end the transaction: the local one still goes.
        with smtplib.SMTP(srv.host, srv.port, source_address=(OUTSIDE, 0)) as client:
            refused = client.sendmail(
                "s@remote.test", ["x@elsewhere.test", "user@example.com"], MESSAGE
            )
            assert refused == {"x@elsewhere.test": (554, refused["x@elsewhere.test"][1])}
        [message] = srv.messages.wait(1)
        assert message.rcpt_tos == ["user@example.com"]


def test_authenticated_user_may_relay() -> None:
    with running_server(
        local_domains=["example.com"],
        relay_networks=[],
        auth_users=["alice:wonderland"],
        allow_insecure_auth=True,
    ) as srv:
        assert rcpt_code(srv.port, "someone@elsewhere.test", login=True)[0] == 250
        assert rcpt_code(srv.port, "someone@elsewhere.test")[0] == 554


def test_relay_networks_may_relay() -> None:
    with running_server(local_domains=["example.com"], relay_networks=["127.0.3.0/28"]) as srv:
        assert rcpt_code(srv.port, "x@elsewhere.test", source="127.0.3.2")[0] == 250
        assert rcpt_code(srv.port, "x@elsewhere.test", source="127.0.3.100")[0] == 554


def test_default_relay_networks_are_loopback_so_the_quick_start_works() -> None:
    with running_server() as srv:  # no local domains, default relay_networks
        assert rcpt_code(srv.port, "anyone@anywhere.test", source="127.0.0.1")[0] == 250


def test_without_local_domains_outsiders_may_not_send_at_all() -> None:
    with running_server(relay_networks=[]) as srv:
        assert rcpt_code(srv.port, "anyone@anywhere.test")[0] == 554


def test_open_relay_accepts_everything_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mailgate.policy"):
        with running_server(open_relay=True, relay_networks=[]) as srv:
            assert rcpt_code(srv.port, "anyone@anywhere.test")[0] == 250
    assert any("open_relay is on" in r.getMessage() for r in caplog.records)
    assert "relay" not in srv.server.hooks.names()


def test_lmtp_mode_has_no_relay_control() -> None:
    with running_server(lmtp=True, relay_networks=[]) as srv:
        assert "relay" not in srv.server.hooks.names()


def test_xclient_peer_is_judged_not_the_proxy() -> None:
    """An XCLIENT-trusted front end on loopback forwards an outside client: relaying is
    decided on the outside client's address, not on the proxy's."""
    with running_server(local_domains=["example.com"], trusted_networks=["127.0.0.0/8"]) as srv:
        with smtplib.SMTP(srv.host, srv.port) as client:
            client.ehlo("proxy.test")
            assert client.docmd("XCLIENT ADDR=198.51.100.7 NAME=[UNAVAILABLE]")[0] == 220
            client.ehlo("outside.test")
            client.mail("s@remote.test")
            assert client.rcpt("x@elsewhere.test")[0] == 554
            assert client.rcpt("user@example.com")[0] == 250


def test_open_relay_flag_warns_at_start_from_the_command_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailgate",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--open-relay",
            "--maildir",
            str(tmp_path / "maildir"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "listening on" in line:
                break
        assert any("open_relay is on" in line for line in lines), lines
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_inline_path_answers_as_the_coroutine_does() -> None:
    """The server runs relay control through Hooks.run_now, which calls its plain twin
    (_rcpt_now) instead of stepping on_rcpt: the same answers; a subclass's own on_rcpt is
    run as it is."""
    from mailgate.hooks import Hooks

    relay = RelayControl(["example.com"], relay_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    hooks = Hooks()
    hooks.add(relay)
    assert hooks.runs_inline("rcpt")
    (step,) = hooks._chain("rcpt", required=True)
    assert step.now is not None
    envelope = Envelope()
    assert hooks.run_now("rcpt", session(), envelope, Address("a@example.com")) is None
    assert hooks.run_now("rcpt", session("10.1.2.3"), envelope, Address("a@elsewhere.test")) is None
    refused = hooks.run_now("rcpt", session(), envelope, Address("a@elsewhere.test"))
    assert isinstance(refused, Reject) and refused.code == 554

    class Stricter:
        name = "stricter"

        async def on_rcpt(self, s: Session, e: Envelope, a: Address) -> None:
            raise Reject(550, "no")

        def _rcpt_now(self, s: Session, e: Envelope, a: Address) -> None:
            return None

    class Inheriting(Stricter):
        async def on_rcpt(self, s: Session, e: Envelope, a: Address) -> None:
            raise Reject(551, "no")

    other = Hooks()
    other.add(Inheriting())
    (step,) = other._chain("rcpt", required=True)
    assert step.now is None
    refused = other.run_now("rcpt", session(), envelope, Address("a@example.com"))
    assert isinstance(refused, Reject) and refused.code == 551
