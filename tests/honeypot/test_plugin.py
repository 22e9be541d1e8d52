"""HoneypotPlugin and the server's transcript tap, with a real server and real clients."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import smtplib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailgate.honeypot.plugin import (
    CaptureRecorder,
    HoneypotPlugin,
    _own_headers_end,
    parse_auth_outcome,
)
from mailgate.honeypot.store import DB_NAME, CaptureStore
from mailgate.hooks import AuthAttempt, Session
from mailgate.protocol.events import AuthCredentials
from mailgate.testing import RunningServer, running_server

SETTINGS: dict[str, Any] = {
    "open_relay": True,
    "allow_insecure_auth": True,
    "max_auth_failures": 10,
    "hostname": "mx.example.com",
}


def query(data_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(data_dir / DB_NAME)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


@contextlib.contextmanager
def honeypot(
    data_dir: Path,
    *,
    install: bool = True,
    settings: dict[str, Any] | None = None,
    after: Any = None,
    **options: Any,
) -> Iterator[tuple[RunningServer, HoneypotPlugin]]:
    store = CaptureStore(data_dir, batch_seconds=0.01, jsonl=options.pop("jsonl", None))
    plugin = HoneypotPlugin(store, **options)

    def configure(server: Any) -> None:
        if install:
            plugin.install(server)
        else:
            server.add_plugin(plugin)
            server.recorder = plugin.recorder
        if after is not None:
            server.add_plugin(after, after="honeypot")

    with running_server(configure=configure, **{**SETTINGS, **(settings or {})}) as srv:
        yield srv, plugin


def client(srv: RunningServer, ip: str = "127.0.0.2") -> smtplib.SMTP:
    return smtplib.SMTP(srv.host, srv.port, source_address=(ip, 0), timeout=5)


def plain_login(smtp: smtplib.SMTP, user: str, password: str) -> None:
    """One AUTH PLAIN attempt (smtplib's login() tries every mechanism in turn)."""
    smtp.ehlo_or_helo_if_needed()
    smtp.user, smtp.password = user, password
    smtp.auth("PLAIN", smtp.auth_plain)


def wait_closed(store: CaptureStore, data_dir: Path, count: int) -> None:
    """Until ``count`` sessions are recorded as closed (connection_lost runs after the
    client's socket is gone)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        store.flush()
        if query(data_dir, "SELECT count(*) FROM sessions WHERE ended IS NOT NULL")[0][0] >= count:
            return
        time.sleep(0.02)
    raise AssertionError("sessions not closed in time")


# --- unit -------------------------------------------------------------------------------------


def test_parse_auth_outcome() -> None:
    assert parse_auth_outcome("refuse") == ("refuse", 0)
    assert parse_auth_outcome("Accept") == ("accept", 0)
    assert parse_auth_outcome("accept-after:3") == ("accept-after", 3)
    for bad in ("accept-after:0", "accept-after", "maybe", "accept-after:x"):
        with pytest.raises(ValueError, match="refuse, accept or accept-after:N"):
            parse_auth_outcome(bad)


def test_own_headers_are_found_only_with_our_queue_id() -> None:
    ours = (
        b"X-Added: by a plugin\r\n"
        b"Received: from x ([127.0.0.2])\r\n\tby mx.example.com (mailgate) with ESMTP\r\n"
        b"\tid ABC123; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
    )
    client_part = b"Received: from elsewhere id ABC1234;\r\nSubject: x\r\n\r\nbody\r\n"
    assert _own_headers_end(ours + client_part, "ABC123") == len(ours)
    assert _own_headers_end(client_part, "ABC123") == 0
    assert _own_headers_end(b"Subject: x\r\n\r\nReceived: by y id ABC123;\r\n", "ABC123") == 0


def test_tarpit_delay_grows_per_address_and_is_capped(tmp_path: Path) -> None:
    plugin = HoneypotPlugin(CaptureStore(tmp_path), tarpit=0.5, tarpit_max=1.2)
    assert plugin.delay("192.0.2.1") == 0.5
    for expected in (0.5, 1.0, 1.2, 1.2):
        plugin._address("192.0.2.1").connections += 1
        assert plugin.delay("192.0.2.1") == expected
    assert plugin.delay("192.0.2.2") == 0.5
    plugin.store.close()


def test_cram_md5_is_stored_in_hashcat_format(tmp_path: Path) -> None:
    import asyncio

    store = CaptureStore(tmp_path, batch_seconds=0.01)
    plugin = HoneypotPlugin(store)
    session = Session(id="S1", peer_host="192.0.2.1", peer_port=1, local_host="h", local_port=25)
    challenge = b"<1.2@mx>"
    digest = hmac.new(b"secret", challenge, "md5").hexdigest()
    credentials = AuthCredentials(
        mechanism="CRAM-MD5", authzid=None, username="alice", challenge=challenge, digest=digest
    )
    store.session_opened(session)
    assert asyncio.run(plugin.on_auth(session, AuthAttempt.from_credentials(credentials))) is None
    store.close()
    [(token, outcome)] = query(tmp_path, "SELECT token, outcome FROM auth_attempts")
    _, tag, b64_challenge, b64_answer = token.split("$")
    assert tag == "cram_md5" and outcome == "refused"
    assert base64.b64decode(b64_challenge) == challenge
    assert base64.b64decode(b64_answer).decode() == f"alice {digest}"


def test_message_is_recorded_even_when_the_client_goes_away_while_it_is_read(
    tmp_path: Path,
) -> None:
    """The stage is cancelled (client gone) while the message is read: the capture still
    ends with its row, so the raw file placed for it is not orphaned."""
    import asyncio

    from mailgate.hooks import Envelope, Message

    store = CaptureStore(tmp_path / "data", batch_seconds=0.01)
    plugin = HoneypotPlugin(store)
    session = Session(id="S2", peer_host="192.0.2.2", peer_port=1, local_host="h", local_port=25)
    spooled = tmp_path / "spool.eml"
    spooled.write_bytes(b"Subject: late\r\n\r\nhello\r\n")
    envelope = Envelope()
    message = Message(
        id="Q1", session=session, envelope=envelope, size=26, path=spooled, received_at=1.0
    )
    read = plugin._read_message

    def slow_read(*args: Any) -> Any:
        time.sleep(0.3)
        return read(*args)

    plugin._read_message = slow_read  # type: ignore[method-assign]
    store.session_opened(session)

    async def main() -> None:
        stage = asyncio.ensure_future(plugin.on_message(session, envelope, message))
        await asyncio.sleep(0.05)
        stage.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stage
        await plugin.aclose()

    asyncio.run(main())
    [(subject, path)] = query(tmp_path / "data", "SELECT subject, path FROM messages")
    assert subject == "late"
    assert (tmp_path / "data" / path).exists()


# --- with a server ----------------------------------------------------------------------------


def test_transcript_has_commands_and_replies_in_order(tmp_path: Path) -> None:
    with honeypot(tmp_path) as (srv, plugin):
        with client(srv) as smtp:
            smtp.ehlo("scanner.test")
            smtp.mail("a@example.net")
            smtp.rcpt("b@example.com")
            smtp.data(b"Subject: t\r\n\r\nsecret body line\r\n")
            smtp.noop()
        wait_closed(plugin.store, tmp_path, 1)
    events = query(tmp_path, "SELECT direction, line FROM events ORDER BY id")
    client_lines = [line for d, line in events if d == "c"]
    assert client_lines == [
        "ehlo scanner.test",
        "mail FROM:<a@example.net>",
        "rcpt TO:<b@example.com>",
        "data",
        "noop",
        "QUIT",
    ]
    assert all("secret body" not in line for _, line in events)
    codes = [(d, line[:4]) for d, line in events]
    assert codes[0] == ("s", "220 ")
    assert codes[1] == ("c", "ehlo")
    assert codes[2] == ("s", "250-")
    data_at = codes.index(("c", "data"))
    assert codes[data_at + 1] == ("s", "354 ")
    assert codes[data_at + 2] == ("s", "250 ")  # the message, answered after its content
    assert codes[-1] == ("s", "221 ")
    [(peer, helo, reason, ended)] = query(
        tmp_path, "SELECT peer_ip, helo, close_reason, ended IS NOT NULL FROM sessions"
    )
    assert (peer, helo, reason, ended) == ("127.0.0.2", "scanner.test", "quit", 1)


def test_auth_plain_and_login_are_captured_and_refused(tmp_path: Path) -> None:
    with honeypot(tmp_path) as (srv, plugin):
        with client(srv) as smtp:
            smtp.ehlo("x")
            assert "PLAIN" in smtp.esmtp_features["auth"]
            smtp.user, smtp.password = "admin", "hunter2"
            with pytest.raises(smtplib.SMTPAuthenticationError) as plain:
                smtp.auth("PLAIN", smtp.auth_plain)
            assert plain.value.smtp_code == 535
            smtp.user, smtp.password = "root", "toor"
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.auth("LOGIN", smtp.auth_login)
        wait_closed(plugin.store, tmp_path, 1)
    assert query(
        tmp_path, "SELECT mechanism, username, password, outcome FROM auth_attempts ORDER BY id"
    ) == [("PLAIN", "admin", "hunter2", "refused"), ("LOGIN", "root", "toor", "refused")]
    client_lines = [r[0] for r in query(tmp_path, "SELECT line FROM events WHERE direction='c'")]
    # The LOGIN exchange's continuation lines are in the transcript (base64, as sent).
    assert base64.b64encode(b"toor").decode() in client_lines


def test_accept_after_counts_attempts_per_address(tmp_path: Path) -> None:
    with honeypot(tmp_path, auth_outcome="accept-after:2") as (srv, plugin):
        with client(srv) as smtp:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                plain_login(smtp, "u1", "p1")
        with client(srv) as smtp:  # the second attempt from 127.0.0.2, a new connection
            plain_login(smtp, "u2", "p2")
            smtp.sendmail("u2@example.com", ["x@example.org"], b"Subject: s\r\n\r\nb\r\n")
        with client(srv, "127.0.0.3") as smtp:  # another address starts at one
            with pytest.raises(smtplib.SMTPAuthenticationError):
                plain_login(smtp, "u3", "p3")
        wait_closed(plugin.store, tmp_path, 3)
    rows = query(tmp_path, "SELECT username, outcome FROM auth_attempts ORDER BY id")
    assert rows == [("u1", "refused"), ("u2", "accepted"), ("u3", "refused")]
    assert ("u2",) in query(tmp_path, "SELECT user FROM sessions")


def test_drop_after_credentials(tmp_path: Path) -> None:
    with honeypot(tmp_path, auth_outcome="accept", drop_after_credentials=True) as (srv, plugin):
        smtp = client(srv)
        smtp.ehlo("x")
        smtp.user, smtp.password = "bob", "letmein"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("PLAIN", smtp.auth_plain)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()
        smtp.close()
        wait_closed(plugin.store, tmp_path, 1)
    assert query(tmp_path, "SELECT username, password, outcome FROM auth_attempts") == [
        ("bob", "letmein", "dropped")
    ]
    assert query(tmp_path, "SELECT close_reason, user FROM sessions") == [("policy", None)]


def timed_banner(srv: RunningServer, ip: str) -> float:
    started = time.monotonic()
    with socket.create_connection((srv.host, srv.port), timeout=5, source_address=(ip, 0)) as sock:
        assert sock.recv(100).startswith(b"220")
        return time.monotonic() - started


def test_tarpit_delays_grow_per_address_without_blocking_others(tmp_path: Path) -> None:
    with honeypot(tmp_path, tarpit=0.15, tarpit_max=0.8) as (srv, plugin):
        first = timed_banner(srv, "127.0.0.2")
        second = timed_banner(srv, "127.0.0.2")
        assert 0.15 <= first < 0.3 + 0.2
        assert second >= 0.3
        # A busy address waits long; another is answered meanwhile with its own delay.
        plugin._address("127.0.0.4").connections = 10  # next: min(11 * 0.15, 0.8)
        slow: list[float] = []
        waiter = threading.Thread(target=lambda: slow.append(timed_banner(srv, "127.0.0.4")))
        waiter.start()
        time.sleep(0.05)
        other = timed_banner(srv, "127.0.0.5")
        waiter.join()
        assert 0.15 <= other < 0.5
        assert slow[0] >= 0.8


def test_message_stored_with_hash_urls_and_attachment(tmp_path: Path) -> None:
    msg = EmailMessage()
    msg["Subject"] = "Invoice"
    msg["From"] = "a@example.net"
    msg.set_content("Pay here: https://pay.example/now\n")
    msg.add_alternative('<a href="https://html.example/?a=1&amp;b=2">x</a>', subtype="html")
    payload = bytes(range(256)) * 20
    msg.add_attachment(payload, maintype="application", subtype="zip", filename="invoice.zip")
    content = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))

    later: list[str] = []

    class Later:
        name = "later"

        async def on_message(self, *args: Any) -> None:
            later.append("delivered")

    with honeypot(tmp_path, after=Later()) as (srv, plugin):
        with client(srv) as smtp:
            smtp.sendmail("a@example.net", ["v1@example.com", "v2@example.org"], content)
            smtp.sendmail("a@example.net", ["v3@example.com"], content)  # the same bytes
        wait_closed(plugin.store, tmp_path, 1)
    sha = hashlib.sha256(content).hexdigest()
    rows = query(
        tmp_path, "SELECT id, mail_from, rcpt_tos, size, sha256, path, subject FROM messages"
    )
    assert len(rows) == 2
    first = rows[0]
    assert first[1:] == (
        "a@example.net",
        json.dumps(["v1@example.com", "v2@example.org"]),
        len(content),
        sha,
        f"messages/{sha[:2]}/{sha}.eml",
        "Invoice",
    )
    assert rows[1][5] == first[5]  # deduplicated: one file for both
    assert (tmp_path / first[5]).read_bytes() == content  # as sent, without our Received
    assert len(list((tmp_path / "messages").rglob("*.eml"))) == 1
    urls = query(tmp_path, "SELECT url FROM urls WHERE message_id = ?", first[0])
    assert urls == [("https://pay.example/now",), ("https://html.example/?a=1&b=2",)]
    assert query(
        tmp_path,
        "SELECT filename, content_type, size, sha256 FROM attachments WHERE message_id = ?",
        first[0],
    ) == [("invoice.zip", "application/zip", len(payload), hashlib.sha256(payload).hexdigest())]
    assert later == []  # the honeypot's 250 ended the chain: nothing delivered


def test_max_session_seconds_timer_closes_a_silent_session(tmp_path: Path) -> None:
    with honeypot(tmp_path, max_session_seconds=0.4) as (srv, plugin):
        smtp = client(srv)
        smtp.ehlo("x")
        time.sleep(0.6)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()
            smtp.noop()
        smtp.close()
        wait_closed(plugin.store, tmp_path, 1)
    assert query(tmp_path, "SELECT close_reason FROM sessions") == [("max-session",)]
    last = query(tmp_path, "SELECT line FROM events WHERE direction = 's' ORDER BY id DESC LIMIT 1")
    assert last == [("421 mx.example.com Error: timeout exceeded",)]


def test_max_session_seconds_at_the_next_command_without_install(tmp_path: Path) -> None:
    with honeypot(tmp_path, install=False, max_session_seconds=0.3) as (srv, plugin):
        smtp = client(srv)
        smtp.ehlo("x")
        time.sleep(0.4)
        code, text = smtp.mail("a@example.net")
        assert (code, text) == (421, b"4.4.2 Error: timeout exceeded")
        smtp.close()
        wait_closed(plugin.store, tmp_path, 1)
    assert query(tmp_path, "SELECT close_reason FROM sessions") == [("policy",)]


def test_refused_connections_and_tls_are_recorded(tmp_path: Path) -> None:
    with honeypot(tmp_path, settings={"max_clients": 1}) as (srv, plugin):
        with client(srv) as smtp:
            smtp.starttls(context=srv.client_tls_context())
            smtp.ehlo("after-tls")
            with socket.create_connection(srv.address, source_address=("127.0.0.7", 0)) as extra:
                assert extra.recv(100).startswith(b"421")
        wait_closed(plugin.store, tmp_path, 2)
    rows = query(
        tmp_path, "SELECT peer_ip, close_reason, tls_version, helo FROM sessions ORDER BY started"
    )
    assert ("127.0.0.7", "refused", None, None) in rows
    [tls_row] = [r for r in rows if r[0] == "127.0.0.2"]
    assert tls_row[1] == "quit" and tls_row[2] and tls_row[2].startswith("TLS")
    assert tls_row[3] == "after-tls"
    refused_lines = query(
        tmp_path,
        "SELECT line FROM events JOIN sessions ON sessions.id = session_id"
        " WHERE peer_ip = '127.0.0.7'",
    )
    assert refused_lines == [("421 Too many connections, try again later",)]


def test_jsonl_mirror_from_a_live_server(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    with honeypot(tmp_path / "data", jsonl=target) as (srv, plugin):
        with client(srv) as smtp:
            smtp.ehlo("x")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                plain_login(smtp, "u", "p")
            smtp.sendmail(
                "a@example.net", ["b@example.com"], b"Subject: s\r\n\r\nhttp://u.test/\r\n"
            )
        wait_closed(plugin.store, tmp_path / "data", 1)
    types = [json.loads(line)["type"] for line in target.read_text().splitlines()]
    assert types[0] == "session_open" and types[-1] == "session_close"
    assert {"command", "reply", "auth", "message"} <= set(types)
    message = next(json.loads(x) for x in target.read_text().splitlines() if '"message"' in x)
    assert message["urls"] == ["http://u.test/"]


def test_recorder_failure_does_not_break_the_session(tmp_path: Path) -> None:
    class Broken(CaptureRecorder):
        def sent(self, session: Session, data: bytes) -> None:
            raise RuntimeError("boom")

    store = CaptureStore(tmp_path, batch_seconds=0.01)

    def configure(server: Any) -> None:
        server.recorder = Broken(store)

    with running_server(configure=configure, **SETTINGS) as srv:
        with client(srv) as smtp:
            assert smtp.noop()[0] == 250
    store.close()
    assert query(tmp_path, "SELECT count(*) FROM sessions") == [(1,)]


def test_proxy_sessions_and_early_talkers_are_recorded(tmp_path: Path) -> None:
    settings = {"proxy_protocol": ["127.0.0.0/8"]}
    with honeypot(tmp_path, settings=settings, tarpit=0.2) as (srv, plugin):
        with socket.create_connection(srv.address, timeout=5) as sock:  # not a PROXY header
            sock.sendall(b"EHLO nope\r\n")
            assert sock.recv(100).startswith(b"421")
        with socket.create_connection(srv.address, timeout=5) as sock:
            # The real client is 203.0.113.9; it talks before the (tarpitted) banner.
            sock.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 25\r\n")
            time.sleep(0.05)
            sock.sendall(b"EHLO eager\r\n")
            assert sock.recv(100).startswith(b"554")
        wait_closed(plugin.store, tmp_path, 2)
    rows = query(tmp_path, "SELECT peer_ip, peer_port, close_reason FROM sessions ORDER BY started")
    assert rows[0][0] == "127.0.0.1" and rows[0][2] == "bad-proxy-header"
    assert rows[1] == ("203.0.113.9", 4444, "early-talker")
    lines = query(
        tmp_path,
        "SELECT direction, line FROM events JOIN sessions ON sessions.id = session_id"
        " WHERE peer_ip = '203.0.113.9' ORDER BY events.id",
    )
    assert lines == [
        ("c", "EHLO eager"),
        ("s", "554 Protocol error: data sent before the greeting"),
    ]
