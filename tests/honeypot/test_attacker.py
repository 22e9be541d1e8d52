"""A scripted attacker against each honeypot persona: what a real scanner and spammer do.

For every built-in persona an in-process honeypot (``mailgate.honeypot.mode.build_server``,
loopback only) gets, from distinct 127.x addresses:

- an AUTH brute force of 10 attempts with smtplib (the 10th is accepted:
  ``accept-after:10``), then an authenticated message;
- swaks over STARTTLS with AUTH LOGIN (attempt 11 from the same address: accepted);
- an open-relay probe: MAIL/RCPT to foreign domains and an address literal, which must
  get 250 and the persona's "queued" reply, while nothing leaves the honeypot (a sink
  SMTP listener on another loopback port gets no connection, and the server's event loop
  opens none);
- VRFY/EXPN user enumeration;
- garbage bytes, and an HTTP request;
- for two personas, a spam run of 50 messages (with a URL and an attachment each).

Then the capture database, the JSON lines and the report must show all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailgate.config import HoneypotOptions
from mailgate.honeypot.mode import HoneypotServer, build_server
from mailgate.honeypot.personas import PERSONAS, PersonaProfile
from mailgate.honeypot.report import format_summary, open_database, summary
from mailgate.honeypot.store import DB_NAME
from mailgate.server.options import ListenAddress, ServerOptions

ALL_PERSONAS = ["postfix", "exim", "exchange", "sendmail", "generic"]
#: The 50-message spam run is for these only (it is the slow part).
SPAM_PERSONAS = {"postfix", "exchange"}
SPAM_MESSAGES = 50
BRUTE_FORCE = [
    ("admin", "admin"),
    ("admin", "password"),
    ("root", "123456"),
    ("test", "test"),
    ("info", "info123"),
    ("admin", "qwerty"),
    ("postmaster", "postmaster"),
    ("user", "letmein"),
    ("admin", "12345678"),
    ("sales", "sales2024"),
]
BRUTE_IP, SWAKS_IP, PROBE_IP, ENUM_IP, GARBAGE_IP, SPAM_IP = (
    "127.0.0.2",
    "127.0.0.2",  # swaks comes back from the brute-force address: attempt 11, accepted
    "127.0.0.4",
    "127.0.0.5",
    "127.0.0.6",
    "127.0.0.7",
)
ATTACHMENT = b"MZ\x90\x00 not really a program " * 20


# --- the honeypot in a thread ---------------------------------------------------------------


@dataclass
class Honeypot:
    server: HoneypotServer
    data_dir: Path
    jsonl: Path
    #: (method, args) of every outbound connection the server's event loop opened.
    outbound: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.address[1]

    @property
    def profile(self) -> PersonaProfile:
        return self.server.profile

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        self.server.store.flush()
        db = sqlite3.connect(self.data_dir / DB_NAME)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def wait_all_closed(self, timeout: float = 5.0) -> None:
        """Until every recorded session is closed (the server records the close after the
        client's socket is gone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.query("SELECT count(*) FROM sessions WHERE ended IS NULL")[0][0] == 0:
                return
            time.sleep(0.02)
        raise AssertionError("sessions still open")


@contextlib.contextmanager
def running_honeypot(
    tmp_path: Path,
    persona: str,
    server_settings: dict[str, Any] | None = None,
    *,
    profile: PersonaProfile | None = None,
    **settings: Any,
) -> Iterator[Honeypot]:
    data_dir = tmp_path / "data"
    jsonl = tmp_path / "capture.jsonl"
    options = ServerOptions(
        listen=(ListenAddress("127.0.0.1", 0),),
        auth_failure_delay=0,
        close_timeout=2,
        **(server_settings or {}),
    )
    honeypot = HoneypotOptions(
        data_dir=data_dir,
        persona=persona,
        jsonl=str(jsonl),
        given=frozenset(
            {"listen", "auth_failure_delay", "close_timeout", *(server_settings or {})}
        ),
        **settings,
    )
    server = build_server(
        options, honeypot, profile=profile, store_settings={"batch_seconds": 0.01}
    )
    loop = asyncio.new_event_loop()
    result = Honeypot(server, data_dir, jsonl)

    def spy(name: str) -> None:
        real = getattr(loop, name)

        def recording(*args: Any, **kwargs: Any) -> Any:
            result.outbound.append((name, args))
            return real(*args, **kwargs)

        setattr(loop, name, recording)

    for method in ("create_connection", "sock_connect", "open_connection"):
        if hasattr(loop, method):
            spy(method)
    started = threading.Event()
    failed: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:
            failed.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="honeypot", daemon=True)
    thread.start()
    assert started.wait(15), "the honeypot did not start"
    if failed:
        raise failed[0]
    try:
        yield result
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class Sink:
    """An SMTP listener on another loopback port: a honeypot that relayed would talk to it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.sendall(b"220 sink ESMTP\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


# --- the attacker -----------------------------------------------------------------------------


def connect(hp: Honeypot, ip: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", hp.port, source_address=(ip, 0), timeout=10)


def reply_pattern(profile: PersonaProfile, reply_name: str, **values: str) -> re.Pattern[str]:
    """The persona's reply as smtplib shows it (code, then the text with the enhanced
    code if the persona writes them), placeholders as patterns."""
    template = getattr(profile, reply_name)
    line = template.lines[-1]
    status = template.status if profile.persona.enhanced_status_codes else None
    pattern = re.escape(f"{template.code} " + (f"{status} " if status else "") + line)
    fills = {
        "queue_id": profile.queue_id_pattern,
        "message_id": r"[0-9a-f]{32}@" + re.escape(profile.hostname),
        "hostname": re.escape(profile.hostname),
        "client_ip": r"[0-9.]*",
        **{key: re.escape(value) for key, value in values.items()},
    }
    for name, fill in fills.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), fill)
    return re.compile(pattern)


def brute_force(hp: Honeypot) -> None:
    """10 AUTH attempts, reconnecting when the server hangs up after its failure limit;
    the 10th is accepted, and the session then sends a message."""
    mechanisms = hp.profile.auth_mechanisms
    mechanism = "PLAIN" if "PLAIN" in mechanisms else "LOGIN"
    smtp: smtplib.SMTP | None = None
    for attempt, (user, password) in enumerate(BRUTE_FORCE, start=1):
        if smtp is None:
            smtp = connect(hp, BRUTE_IP)
            smtp.ehlo("brute.example")
            assert smtp.has_extn("auth")
        smtp.user, smtp.password = user, password
        method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        try:
            code, _ = smtp.auth(mechanism, method)
        except smtplib.SMTPAuthenticationError as exc:
            assert attempt < len(BRUTE_FORCE), f"attempt {attempt}: {exc}"
            assert exc.smtp_code == hp.profile.auth_failed.code
            if attempt % 3 == 0:  # the server's max_auth_failures (3): it hangs up
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    smtp.close()
                smtp = None
            continue
        except smtplib.SMTPServerDisconnected:
            smtp = None
            continue
        assert attempt == len(BRUTE_FORCE) and code == 235
    assert smtp is not None
    smtp.sendmail(
        "sales@brute.example", ["ceo@victim.example"], b"Subject: logged in\r\n\r\nhi\r\n"
    )
    smtp.quit()


def swaks_run(hp: Honeypot, tmp_path: Path) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:  # never skip: the suite would pass without having talked to swaks
        pytest.fail("swaks is not installed: run scripts/install-test-deps", pytrace=False)
    args = [
        swaks,
        "--server", "127.0.0.1",
        "--port", str(hp.port),
        "--local-interface", SWAKS_IP,
        "--ehlo", "swaks.attacker.example",
        "--from", "swaks@attacker.example",
        "--to", "target@victim.example",
        "--tls",
        "--auth", "LOGIN",
        "--auth-user", "swaksuser",
        "--auth-password", "swakspass",
        "--header", "Subject: swaks run",
        "--body", "Cheap pills at http://pills.example/swaks",
        "--timeout", "15",
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, timeout=30, check=False, cwd=tmp_path)
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    assert "STARTTLS" in output


def relay_probe(hp: Honeypot, sink: Sink) -> str:
    """The open-relay probe: foreign domains and an address literal pointing at the
    sink's host. Returns the end-of-data reply."""
    with connect(hp, PROBE_IP) as smtp:
        smtp.ehlo("probe.example")
        code, _ = smtp.mail("relaytest@probe.example")
        assert code == 250
        persona = hp.profile.persona
        for rcpt in ("relaytest@[127.0.0.1]", "victim@gmail.com", f"sink@localhost:{sink.port}"):
            code, text = smtp.rcpt(rcpt.split(":")[0])
            if "[" in rcpt and not persona.behaviour.domain_literals:
                # Exim refuses domain literals by default, relay or not.
                assert code == persona.reply("domain_literal").code, (rcpt, code, text)
                continue
            assert code in (250, 251), (rcpt, code, text)
        code, text = smtp.data(
            b"Subject: relay test\r\nMessage-ID: <relay-probe-1@probe.example>\r\n\r\n"
            b"relay test to [127.0.0.1]\r\n"
        )
        assert code == 250, text
        return f"{code} {text.decode()}"


def enumerate_users(hp: Honeypot) -> dict[str, tuple[int, str]]:
    replies = {}
    with connect(hp, ENUM_IP) as smtp:
        smtp.ehlo("enum.example")
        for user in ("root", "admin", "postmaster", "nosuchuser"):
            code, text = smtp.verify(user)
            replies[f"VRFY {user}"] = (code, text.decode())
        for alias in ("staff", "all"):
            code, text = smtp.docmd("EXPN", alias)
            replies[f"EXPN {alias}"] = (code, text.decode())
    return replies


def raw_session(hp: Honeypot, payload: bytes) -> bytes:
    """Send ``payload`` after the banner on a raw socket; everything the server answered
    until it closed (or went quiet)."""
    with socket.create_connection(
        ("127.0.0.1", hp.port), timeout=5, source_address=(GARBAGE_IP, 0)
    ) as sock:
        received = sock.recv(4096)
        sock.sendall(payload)
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            for _ in range(50):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
    return received


def spam_run(hp: Honeypot) -> None:
    for batch in range(5):
        with connect(hp, SPAM_IP) as smtp:
            smtp.ehlo(f"spam{batch}.example")
            for index in range(SPAM_MESSAGES // 5):
                number = batch * 10 + index
                message = EmailMessage()
                message["From"] = f"offers{number}@spam.example"
                message["To"] = f"user{number}@victim.example"
                message["Subject"] = f"Offer {number}"
                message.set_content(
                    "Buy now: http://common.spam.example/buy and "
                    f"https://track.spam.example/{number}\n"
                )
                message.add_attachment(
                    ATTACHMENT, maintype="application", subtype="octet-stream",
                    filename="invoice.exe",
                )  # fmt: skip
                smtp.send_message(message)


# --- the test ---------------------------------------------------------------------------------


@pytest.mark.parametrize("persona", ALL_PERSONAS)
def test_scripted_attacker(persona: str, tmp_path: Path) -> None:
    sink = Sink()
    users = ("relaytest", "sink", "root", "postmaster", "admin")
    spam = persona in SPAM_PERSONAS
    try:
        # relay = "pretend": the open-relay probe below is accepted (and still never
        # relayed); "relaytest" and "sink" are users, so the address literal naming the honeypot's
        # own address is taken as local mail.
        with running_honeypot(
            tmp_path,
            persona,
            auth_outcome="accept-after:10",
            relay="pretend",
            local_users=users,
        ) as hp:
            profile = hp.profile
            assert profile is PERSONAS[persona]

            # The banner and EHLO are the persona's; STARTTLS and AUTH are offered.
            with connect(hp, "127.0.0.3") as smtp:
                code, ehlo = smtp.ehlo("look.example")
                text = ehlo.decode()
                assert "STARTTLS" in text
                assert "AUTH " + " ".join(profile.auth_mechanisms) in text
                smtp.starttls()
                code, _ = smtp.ehlo("look.example")
                assert code == 250

            brute_force(hp)
            swaks_run(hp, tmp_path)
            queued = relay_probe(hp, sink)
            # The persona's queued reply, showing the message's own Message-ID where the
            # product does (Exchange).
            pattern = reply_pattern(
                profile, "message_queued", message_id="relay-probe-1@probe.example"
            )
            assert pattern.fullmatch(queued), queued
            # A persona that hides VRFY/EXPN treats them as unknown commands.
            hidden = profile.persona.hidden_capabilities
            unknown = profile.persona.reply("unknown_command").code
            for command, (code, _) in enumerate_users(hp).items():
                verb = command.split()[0]
                known = profile.vrfy.code if verb == "VRFY" else profile.expn.code
                if verb == "VRFY" and "@" not in command:
                    # A bare name: the persona's vrfy_unqualified (Exim refuses it).
                    known = profile.persona.reply("vrfy_unqualified").code
                if command == "VRFY nosuchuser" and profile.vrfy_checks_users:
                    known = profile.unknown_user.code  # looked up like RCPT (Postfix)
                if profile.vrfy_answers_users:
                    # Answered from the users (Sendmail): root has a full name; EXPN of a
                    # name that is no user and no alias is unknown.
                    name = command.split()[1]
                    known = (
                        profile.vrfy_unknown_user.code
                        if name not in users
                        else profile.vrfy_user_named.code
                        if name in profile.full_names
                        else profile.vrfy_user.code
                    )
                assert code == (unknown if verb in hidden else known), (command, code)
            garbage = raw_session(hp, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\xff\xfe")
            garbage += raw_session(hp, b"garbage\x00\x01 line\r\n")
            http = raw_session(
                hp, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: scanner/1.0\r\n\r\n"
            )
            assert garbage.startswith(b"220 ") and http.startswith(b"220 ")
            after_banner = http.split(b"\r\n", 1)[1]
            if "GET" in profile.persona.behaviour.forbidden_commands:
                # Postfix hangs up on HTTP with its own words.
                forbidden = profile.persona.reply("forbidden_command")
                assert after_banner.startswith(f"{forbidden.code} ".encode()), http
            else:
                assert re.search(rb"^5\d\d", after_banner, re.M), http
            if spam:
                spam_run(hp)
            hp.wait_all_closed()

            # --- SQLite ---------------------------------------------------------------------
            expected_messages = 3 + (SPAM_MESSAGES if spam else 0)
            attempts = hp.query(
                "SELECT username, password, outcome, mechanism FROM auth_attempts ORDER BY id"
            )
            brute = [a for a in attempts if (a[0], a[1]) in BRUTE_FORCE]
            assert len(brute) == 10
            assert [a[2] for a in brute] == ["refused"] * 9 + ["accepted"]
            assert ("swaksuser", "swakspass", "accepted", "LOGIN") in attempts
            [(swaks_tls,)] = hp.query(
                "SELECT tls_version FROM sessions WHERE helo = 'swaks.attacker.example'"
            )
            assert swaks_tls and swaks_tls.startswith("TLS")
            assert hp.query("SELECT count(*) FROM messages")[0][0] == expected_messages
            [(probe_rcpts,)] = hp.query(
                "SELECT rcpt_tos FROM messages WHERE mail_from = 'relaytest@probe.example'"
            )
            literal_taken = profile.persona.behaviour.domain_literals
            assert ("relaytest@[127.0.0.1]" in json.loads(probe_rcpts)) == literal_taken
            lines = {row[0] for row in hp.query("SELECT line FROM events WHERE direction = 'c'")}
            assert "GET / HTTP/1.1" in lines
            lowered = {line.lower() for line in lines}
            assert "vrfy root" in lowered and "expn staff" in lowered
            assert any("garbage" in line for line in lines)
            peers = {row[0] for row in hp.query("SELECT DISTINCT peer_ip FROM sessions")}
            assert {BRUTE_IP, PROBE_IP, ENUM_IP, GARBAGE_IP} <= peers
            # Every reply the client got is in the transcript as sent.
            replies = {row[0] for row in hp.query("SELECT line FROM events WHERE direction = 's'")}
            assert queued in replies
            if spam:
                [(urls,)] = hp.query(
                    "SELECT count(*) FROM urls WHERE url = 'http://common.spam.example/buy'"
                )
                assert urls == SPAM_MESSAGES
                [(attached,)] = hp.query(
                    "SELECT count(*) FROM attachments WHERE filename = 'invoice.exe'"
                )
                assert attached == SPAM_MESSAGES

            # --- the report, read-only while the honeypot still runs --------------------------
            db = open_database(hp.data_dir)
            try:
                report = summary(db, top=50)
            finally:
                db.close()
            assert report["messages"] == expected_messages
            assert report["unique_ips"] >= 5
            tops = {
                name: {r["value"]: r["count"] for r in rows} for name, rows in report["top"].items()
            }
            assert tops["usernames"]["admin"] == 4
            assert tops["passwords"]["123456"] == 1
            assert tops["credentials"]["admin:qwerty"] == 1
            assert BRUTE_IP in tops["ips"]
            for verb in ("EHLO", "AUTH", "MAIL", "RCPT", "DATA", "VRFY", "EXPN", "GET", "QUIT"):
                assert verb in tops["commands"], verb
            # SASL responses (base64 after a 334) are not counted as commands.
            assert not any(re.fullmatch(r"[A-Za-z0-9+/]+=*", v) and len(v) > 8
                           for v in tops["commands"] if v not in ("STARTTLS", "POSTMASTER"))  # fmt: skip
            if spam:
                assert tops["urls"]["http://common.spam.example/buy"] == SPAM_MESSAGES
                [attachment] = report["top"]["attachments"]
                assert attachment["filename"] == "invoice.exe"
                assert attachment["count"] == SPAM_MESSAGES
            table = format_summary(report, "table", source=str(hp.data_dir))
            assert f"messages        {expected_messages} " in table
            assert "admin" in table and BRUTE_IP in table
    finally:
        sink.close()

    # Nothing was relayed: no connection to the sink, none opened by the server at all.
    assert sink.connections == 0
    assert hp.outbound == []

    # --- JSON lines (complete once the store is closed) ---------------------------------------
    events = [json.loads(line) for line in hp.jsonl.read_text().splitlines()]
    kinds = {event["type"] for event in events}
    assert {"session_open", "command", "reply", "auth", "message", "session_close"} <= kinds
    assert sum(1 for e in events if e["type"] == "message") == expected_messages
    assert sum(1 for e in events if e["type"] == "auth") == len(attempts)
    assert any(e["type"] == "command" and e["line"] == "GET / HTTP/1.1" for e in events)
    assert {e["username"] for e in events if e["type"] == "auth"} >= {u for u, _ in BRUTE_FORCE}
