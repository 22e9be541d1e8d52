"""The asyncio server with real sockets on 127.0.0.1, driven by smtplib, aiosmtplib and raw sockets."""

from __future__ import annotations

import asyncio
import email.message
import smtplib
import socket
import ssl
from pathlib import Path

import aiosmtplib
import pytest

from mailgate.hooks import (
    Address,
    Envelope,
    Hooks,
    Message,
    Reject,
    Session,
)
from mailgate.protocol import BareNewline
from mailgate.protocol.proxy import build_proxy_v1, build_proxy_v2
from mailgate.server import ListenAddress

from .harness import maildir_messages, make_certs, running_server, strip_received, wait_for

BODY = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: test\r\n\r\nHello\r\n.leading dot\r\n"


def tls_client_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


class Raw:
    """A raw SMTP client socket for exact byte-level tests."""

    def __init__(self, port: int, *, greet: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        if greet:
            self.banner = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed by server")
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return lines

    def code(self) -> int:
        return int(self.reply()[-1][:3])

    def closed(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()  # the file holds a reference that keeps the socket open
        self.sock.close()


# --- delivery ------------------------------------------------------------------------------


def test_smtplib_plain_delivery_byte_for_byte(tmp_path: Path) -> None:
    with (
        running_server(tmp_path) as srv,
        smtplib.SMTP("127.0.0.1", srv.port(), timeout=10) as client,
    ):
        refused = client.sendmail("a@example.com", ["b@example.com", "c@example.com"], BODY)
        assert refused == {}
    (stored,) = maildir_messages(tmp_path / "maildir")
    assert strip_received(stored) == BODY
    assert stored.startswith(b"Received: from ")
    assert not list((tmp_path / "maildir" / "tmp").iterdir())


def test_no_received_header_option(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, received_header=False) as srv,
        smtplib.SMTP("127.0.0.1", srv.port()) as c,
    ):
        c.sendmail("a@example.com", ["b@example.com"], BODY)
    assert maildir_messages(tmp_path / "maildir") == [BODY]


def test_starttls_and_auth(tmp_path: Path) -> None:
    from mailgate.plugins.static_auth import StaticUsers

    certs = make_certs(tmp_path)
    hooks = Hooks()
    hooks.add(StaticUsers({"alice": "secret"}))
    with running_server(
        tmp_path, hooks, tls_cert=certs.cert, tls_key=certs.key, auth_failure_delay=0.0
    ) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port(), timeout=10) as c:
            c.ehlo()
            assert c.has_extn("starttls")
            assert not c.has_extn("auth"), "AUTH must not be offered before TLS"
            c.starttls(context=tls_client_context(certs.ca_file))
            c.ehlo()
            assert not c.has_extn("starttls")
            assert "PLAIN" in c.esmtp_features["auth"]
            for mechanism in ("PLAIN", "LOGIN"):
                c.user, c.password = "alice", "secret"
                code, _ = c.auth(mechanism, getattr(c, f"auth_{mechanism.lower()}"))
                assert code == 235
                c.rset()
                break
            c.sendmail("a@example.com", ["b@example.com"], BODY)
        with smtplib.SMTP("127.0.0.1", srv.port(), timeout=10) as c:
            c.starttls(context=tls_client_context(certs.ca_file))
            # smtplib tries CRAM-MD5, PLAIN and LOGIN: three failures end the session.
            with pytest.raises(smtplib.SMTPAuthenticationError):
                c.login("alice", "wrong")
            assert c.noop()[0] == 421
        with smtplib.SMTP("127.0.0.1", srv.port(), timeout=10) as c:
            c.starttls(context=tls_client_context(certs.ca_file))
            c.login("alice", "secret")
    (stored,) = maildir_messages(tmp_path / "maildir")
    assert b"with ESMTPSA" in stored.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
    assert strip_received(stored) == BODY


def test_implicit_tls_counts_as_tls_for_auth(tmp_path: Path) -> None:
    from mailgate.plugins.static_auth import StaticUsers

    certs = make_certs(tmp_path)
    hooks = Hooks()
    hooks.add(StaticUsers({"alice": "secret"}))
    listen = (ListenAddress("127.0.0.1", 0, implicit_tls=True),)
    with running_server(
        tmp_path, hooks, listen=listen, tls_cert=certs.cert, tls_key=certs.key
    ) as srv:
        ctx = tls_client_context(certs.ca_file)
        with smtplib.SMTP_SSL("127.0.0.1", srv.port(), context=ctx, timeout=10) as c:
            c.ehlo()
            assert "auth" in c.esmtp_features
            assert not c.has_extn("starttls")
            c.login("alice", "secret")
            c.sendmail("a@example.com", ["b@example.com"], BODY)
    (stored,) = maildir_messages(tmp_path / "maildir")
    assert strip_received(stored) == BODY


def test_aiosmtplib(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    message = email.message.EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.com"
    message["Subject"] = "via aiosmtplib"
    message.set_content("Body line\n.dot line\n")

    with running_server(tmp_path, tls_cert=certs.cert, tls_key=certs.key) as srv:

        async def send() -> None:
            await aiosmtplib.send(
                message,
                hostname="127.0.0.1",
                port=srv.port(),
                start_tls=True,
                tls_context=tls_client_context(certs.ca_file),
            )

        asyncio.run(send())
    (stored,) = maildir_messages(tmp_path / "maildir")
    assert strip_received(stored).replace(b"\r\n", b"\n") == bytes(message)


def test_mbox_delivery(tmp_path: Path) -> None:
    mbox = tmp_path / "mail.mbox"
    hooks = Hooks()
    with (
        running_server(tmp_path, hooks, delivery="mbox", mbox=mbox) as srv,
        smtplib.SMTP("127.0.0.1", srv.port()) as c,
    ):
        c.sendmail("a@example.com", ["b@example.com"], BODY)
        c.sendmail("a@example.com", ["b@example.com"], b"Subject: 2\r\n\r\nFrom here\r\n")
    text = mbox.read_bytes()
    assert text.startswith(b"From a@example.com ")
    assert text.count(b"\nFrom ") == 1  # the body's "From here" is quoted
    assert b"\n>From here\n" in text


def test_sink_mode_writes_nothing(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, delivery="sink") as srv,
        smtplib.SMTP("127.0.0.1", srv.port()) as c,
    ):
        c.sendmail("a@example.com", ["b@example.com"], BODY)
    assert not (tmp_path / "maildir").exists()


def test_lmtp_mode(tmp_path: Path) -> None:
    with running_server(tmp_path, lmtp=True) as srv:
        with smtplib.LMTP("127.0.0.1", srv.port()) as c:
            assert c.sendmail("a@example.com", ["b@example.com"], BODY) == {}
        # smtplib reads one reply after DATA; LMTP sends one per recipient (RFC 2033).
        raw = Raw(srv.port())
        assert b"LMTP" in raw.banner[0]
        raw.send(
            b"LHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
            b"RCPT TO:<c@example.com>\r\nDATA\r\n"
        )
        raw.reply()
        assert [raw.code() for _ in range(4)] == [250, 250, 250, 354]
        raw.send(b"Subject: two\r\n\r\nx\r\n.\r\n")
        assert [raw.code(), raw.code()] == [250, 250]
        raw.close()
    stored = maildir_messages(tmp_path / "maildir")
    assert len(stored) == 2
    assert b"with LMTP" in stored[0]


# --- limits and hostile input ----------------------------------------------------------------


def test_oversized_message_is_552_and_leaves_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path, max_size=10_000) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port()) as c:
            c.ehlo()
            assert c.esmtp_features["size"] == "10000"
            c.mail("a@example.com")
            c.rcpt("b@example.com")
            code, _ = c.data(b"x" * 20_000)
            assert code == 552
            # The session goes on.
            c.sendmail("a@example.com", ["b@example.com"], BODY)
    assert len(maildir_messages(tmp_path / "maildir")) == 1
    assert not list((tmp_path / "maildir" / "tmp").iterdir())


@pytest.mark.parametrize("payload", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n"], ids=repr)
def test_smtp_smuggling_is_refused(tmp_path: Path, payload: bytes) -> None:
    with running_server(tmp_path) as srv:
        raw = Raw(srv.port())
        raw.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [raw.code() for _ in range(4)] == [250, 250, 250, 354]
        raw.send(
            b"Subject: real\r\n\r\nreal body"
            + payload
            + b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            + b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
        )
        assert raw.code() == 554
        raw.send(b"QUIT\r\n")
        assert raw.code() == 221
        raw.close()
    assert maildir_messages(tmp_path / "maildir") == []


def test_bare_lf_normalize_policy(tmp_path: Path) -> None:
    with running_server(tmp_path, bare_newline=BareNewline.NORMALIZE, received_header=False) as srv:
        raw = Raw(srv.port())
        raw.send(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [raw.code() for _ in range(4)] == [250, 250, 250, 354]
        raw.send(b"line one\nline two\r\n.\r\n")
        assert raw.code() == 250
        raw.close()
    assert maildir_messages(tmp_path / "maildir") == [b"line one\r\nline two\r\n"]


def test_starttls_injection_is_discarded(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    with running_server(tmp_path, tls_cert=certs.cert, tls_key=certs.key) as srv:
        raw = Raw(srv.port())
        raw.send(b"EHLO c.test\r\n")
        raw.reply()
        raw.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
        assert raw.code() == 220
        ctx = tls_client_context(certs.ca_file)
        tls = ctx.wrap_socket(raw.sock, server_hostname="localhost")
        f = tls.makefile("rb")
        tls.sendall(b"NOOP\r\n")
        # Had the injected MAIL survived, its reply (503, no EHLO) would come first.
        assert f.readline().startswith(b"250 ")
        tls.sendall(b"MAIL FROM:<a@example.com>\r\n")
        assert f.readline().startswith(b"503 ")  # EHLO is needed again after TLS
        f.close()  # else the socket stays open and stop() waits out close_timeout
        tls.close()


def test_idle_timeout_sends_421(tmp_path: Path) -> None:
    with running_server(tmp_path, idle_timeout=0.3) as srv:
        raw = Raw(srv.port())
        raw.send(b"EHLO c.test\r\n")
        raw.reply()
        assert raw.code() == 421  # arrives by itself after the timeout
        assert raw.closed()


def test_data_timeout(tmp_path: Path) -> None:
    with running_server(tmp_path, idle_timeout=30, data_timeout=0.3) as srv:
        raw = Raw(srv.port())
        raw.send(
            b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\npartial"
        )
        assert [raw.code() for _ in range(4)] == [250, 250, 250, 354]
        assert raw.code() == 421
    assert not list((tmp_path / "maildir" / "tmp").iterdir())


def test_too_many_unknown_commands(tmp_path: Path) -> None:
    with running_server(tmp_path, max_unknown_commands=3) as srv:
        raw = Raw(srv.port())
        raw.send(b"X\r\n" * 5)
        assert [raw.code() for _ in range(4)] == [500, 500, 500, 500]
        assert raw.code() == 421
        assert raw.closed()


def test_max_clients_and_per_ip(tmp_path: Path) -> None:
    with running_server(tmp_path, max_clients=3, max_clients_per_ip=2) as srv:
        first, second = Raw(srv.port()), Raw(srv.port())
        third = Raw(srv.port(), greet=False)
        assert third.code() == 421
        first.close()
        assert wait_for(lambda: len(srv.server.connections) == 1)  # type: ignore[union-attr]
        fourth = Raw(srv.port())
        assert fourth.banner[0].startswith(b"220 ")
        second.close()
        fourth.close()


def test_early_talker_refused(tmp_path: Path) -> None:
    with running_server(tmp_path, greeting_delay=0.5) as srv:
        raw = Raw(srv.port(), greet=False)
        raw.send(b"EHLO too.early\r\n")
        assert raw.code() == 554
        assert raw.closed()
        polite = Raw(srv.port())
        assert polite.banner[0].startswith(b"220 ")


def test_pipelined_replies_in_one_write(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        raw = Raw(srv.port())
        raw.send(b"EHLO c\r\n")
        raw.reply()
        raw.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
        )
        raw.sock.settimeout(5)
        # All four replies arrive together (one segment on loopback).
        data = raw.sock.recv(65536)
        assert data.count(b"\r\n") == 4, data
        raw.close()


def test_connect_hook_rejects(tmp_path: Path) -> None:
    hooks = Hooks()

    async def deny(session: Session) -> None:
        raise Reject("No service for you", code=554, status="5.7.1")

    hooks.on("connect", deny)
    with running_server(tmp_path, hooks) as srv:
        raw = Raw(srv.port(), greet=False)
        assert raw.reply()[-1].startswith(b"554 ")
        raw.send(b"MAIL FROM:<a@example.com>\r\n")
        assert raw.code() == 503
        raw.send(b"QUIT\r\n")
        assert raw.code() == 221


def test_rcpt_hook_and_message_hook(tmp_path: Path) -> None:
    seen: list[Message] = []
    hooks = Hooks()

    async def only_example(session: Session, envelope: Envelope, address: Address) -> None:
        if address.domain != "example.com":
            raise Reject("Relay access denied", code=554, status="5.7.1")

    async def capture(session: Session, envelope: Envelope, message: Message) -> None:
        seen.append(message)
        assert message.read_bytes().endswith(BODY)
        assert message.as_email()["Subject"] == "test"

    hooks.on("rcpt", only_example)
    hooks.on("message", capture)
    with running_server(tmp_path, hooks) as srv, smtplib.SMTP("127.0.0.1", srv.port()) as c:
        refused = c.sendmail("a@example.com", ["b@example.com", "x@elsewhere.test"], BODY)
        assert refused == {"x@elsewhere.test": (554, b"5.7.1 Relay access denied")}
    assert [str(r) for r in seen[0].envelope.rcpt_tos] == ["b@example.com"]


def test_proxy_protocol(tmp_path: Path) -> None:
    import ipaddress

    seen: list[str] = []
    hooks = Hooks()

    async def record(session: Session) -> None:
        seen.append(f"{session.peer_host}:{session.peer_port}")

    hooks.on("connect", record)
    networks = (ipaddress.ip_network("127.0.0.0/8"),)
    with running_server(tmp_path, hooks, proxy_protocol=networks) as srv:
        for header in (
            build_proxy_v1("203.0.113.9", 4444, "192.0.2.1", 25),
            build_proxy_v2("2001:db8::7", 5555, "2001:db8::1", 25),
        ):
            raw = Raw(srv.port(), greet=False)
            raw.send(header)
            assert raw.code() == 220
            raw.send(b"QUIT\r\n")
            assert raw.code() == 221
            raw.close()
        bad = Raw(srv.port(), greet=False)
        bad.send(b"EHLO not-a-proxy\r\n")
        assert bad.code() == 421
    assert seen == ["203.0.113.9:4444", "2001:db8::7:5555"]


def test_per_ip_limit_applies_to_the_proxied_address(tmp_path: Path) -> None:
    import ipaddress

    networks = (ipaddress.ip_network("127.0.0.0/8"),)
    with running_server(tmp_path, proxy_protocol=networks, max_clients_per_ip=1) as srv:
        first = Raw(srv.port(), greet=False)
        first.send(build_proxy_v1("203.0.113.9", 4444, "192.0.2.1", 25))
        assert first.code() == 220
        second = Raw(srv.port(), greet=False)
        second.send(build_proxy_v1("203.0.113.9", 4445, "192.0.2.1", 25))
        assert second.code() == 421
        assert second.closed()
        other = Raw(srv.port(), greet=False)  # another real client is still welcome
        other.send(build_proxy_v1("198.51.100.7", 4446, "192.0.2.1", 25))
        assert other.code() == 220
        for raw in (first, second, other):
            raw.close()


def test_graceful_shutdown_finishes_transaction(tmp_path: Path) -> None:
    with running_server(tmp_path, close_timeout=10) as srv:
        raw = Raw(srv.port())
        raw.send(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [raw.code() for _ in range(4)] == [250, 250, 250, 354]
        idle = Raw(srv.port())
        assert srv.server is not None
        done = asyncio.run_coroutine_threadsafe(srv.server.shutdown(), srv.loop)
        assert idle.code() == 421  # idle sessions are told at once
        raw.send(b"Subject: in flight\r\n\r\nbody\r\n.\r\n")
        assert raw.code() == 250  # the transaction in flight completes
        assert raw.code() == 421
        done.result(10)
    assert len(maildir_messages(tmp_path / "maildir")) == 1


def test_many_connections_fresh_client_still_served(tmp_path: Path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4500
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    count = min(2000, (min(wanted, hard) - 200) // 2)
    with running_server(tmp_path, max_clients=count + 10, max_clients_per_ip=count + 10) as srv:
        socks = []
        try:
            for _ in range(count):
                socks.append(socket.create_connection(("127.0.0.1", srv.port()), timeout=10))
            assert wait_for(lambda: len(srv.server.connections) == count, timeout=30)  # type: ignore[union-attr]
            with smtplib.SMTP("127.0.0.1", srv.port(), timeout=10) as c:
                assert c.sendmail("a@example.com", ["b@example.com"], BODY) == {}
        finally:
            for s in socks:
                s.close()
    assert len(maildir_messages(tmp_path / "maildir")) == 1
