"""The extension API against real servers on 127.0.0.1: every stage with its arguments,
every result in every shape (callbacks, sync callbacks, plugin classes, middleware),
ordering, errors and timeouts, LMTP per-recipient answers, background deliveries, and the
Server object used from code."""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import io
import logging
import os
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailgate import Accept, Reject, Server, TempFail
from mailgate.hooks import (
    Address,
    AuthAttempt,
    Envelope,
    HookContext,
    HookError,
    Hooks,
    Message,
    MessageTooLarge,
    Middleware,
    PerRecipient,
    Session,
    TLSInfo,
    fold_header,
)
from mailgate.protocol import Reply
from mailgate.server import ListenAddress, ServerOptions
from mailgate.server.errors import StartupError

from .harness import maildir_messages, make_certs, strip_received, wait_for

BODY = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hooks\r\n\r\nHello\r\n"
LOCAL_ERROR = "451 4.3.0 Local error in processing, try again later"


def new_server(tmp_path: Path, **settings: Any) -> Server:
    settings.setdefault("hostname", "mx.test")
    settings.setdefault("listen", "127.0.0.1:0")
    settings.setdefault("state_dir", tmp_path / "state")
    settings.setdefault("close_timeout", 2)
    return Server(**settings)


@contextlib.contextmanager
def serving(server: Server) -> Iterator[int]:
    """Run ``server`` on its own event loop in a thread; yield its port."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:  # handed to the test thread
            failure.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(30)
    if failure:
        thread.join(5)
        loop.close()
        raise failure[0]
    try:
        yield server.address[1]
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


class Client:
    """A raw SMTP client: exact reply lines, pipelining, STARTTLS with any SNI."""

    def __init__(self, port: int, *, greet: bool = True) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.banner = self.reply() if greet else []

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed by server")
            lines.append(line.rstrip(b"\r\n").decode())
            if line[3:4] != b"-":
                return lines

    def cmd(self, line: str) -> str:
        """Send one command; the last line of its reply."""
        self.send(line.encode() + b"\r\n")
        return self.reply()[-1]

    def ehlo(self, name: str) -> list[str]:
        self.send(f"EHLO {name}\r\n".encode())
        return self.reply()

    def message(self, body: bytes = BODY) -> str:
        assert self.cmd("DATA").startswith("354")
        self.send(body + b".\r\n")
        return self.reply()[-1]

    def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        assert self.cmd("STARTTLS").startswith("220")
        self.file.close()
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.file = self.sock.makefile("rb")

    def closed(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()  # the file holds a reference that keeps the socket open
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- every stage with its arguments ----------------------------------------------------------


def register_callbacks(server: Server, events: list[tuple[Any, ...]]) -> None:
    """Every stage as a decorator callback; half of them plain (sync) functions."""

    @server.on_connect
    async def connect(session: Session) -> None:
        events.append(("connect", session.peer_host, session.helo))

    @server.on_helo
    def helo(session: Session, hostname: str) -> None:
        events.append(("helo", hostname, session.helo))

    @server.on_mail
    async def mail(session: Session, envelope: Envelope, address: Address) -> None:
        events.append(mail_event(envelope, address))

    @server.on_rcpt
    def rcpt(session: Session, envelope: Envelope, address: Address) -> None:
        events.append(rcpt_event(envelope, address))

    @server.on_data_start
    async def data_start(session: Session, envelope: Envelope) -> None:
        events.append(("data_start", envelope.sender, envelope.rcpt_tos))

    @server.on_message
    async def message(session: Session, envelope: Envelope, message: Message) -> None:
        events.append(await message_event(session, envelope, message))

    @server.on_reset
    def reset(session: Session, envelope: Envelope) -> None:
        events.append(("reset", envelope.sender, envelope.rcpt_tos))

    @server.on_close
    async def close(session: Session) -> None:
        events.append(("close", session.transactions, session.messages))


class EveryStage:
    """The same as a plugin class."""

    name = "every-stage"

    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        self.events = events

    async def on_connect(self, session: Session) -> None:
        self.events.append(("connect", session.peer_host, session.helo))

    async def on_helo(self, session: Session, hostname: str) -> None:
        self.events.append(("helo", hostname, session.helo))

    def on_mail(self, session: Session, envelope: Envelope, address: Address) -> None:
        self.events.append(mail_event(envelope, address))

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> None:
        self.events.append(rcpt_event(envelope, address))

    def on_data_start(self, session: Session, envelope: Envelope) -> None:
        self.events.append(("data_start", envelope.sender, envelope.rcpt_tos))

    async def on_message(self, session: Session, envelope: Envelope, msg: Message) -> None:
        self.events.append(await message_event(session, envelope, msg))

    async def on_reset(self, session: Session, envelope: Envelope) -> None:
        self.events.append(("reset", envelope.sender, envelope.rcpt_tos))

    def on_close(self, session: Session) -> None:
        self.events.append(("close", session.transactions, session.messages))


def mail_event(envelope: Envelope, address: Address) -> tuple[Any, ...]:
    # The envelope a MAIL hook sees is the one the sender would begin.
    return ("mail", str(address), dict(address.params), envelope.mail_from, envelope.rcpt_tos)


def rcpt_event(envelope: Envelope, address: Address) -> tuple[Any, ...]:
    return ("rcpt", address.local, address.domain, dict(address.params), envelope.rcpt_tos)


async def message_event(session: Session, envelope: Envelope, message: Message) -> tuple[Any, ...]:
    data = await message.read()
    chunks = [chunk async for chunk in message]
    with pytest.raises(MessageTooLarge):
        await message.read(limit=10)
    parsed = message.as_email()
    return (
        "message",
        message.size,
        strip_received(data),
        b"".join(chunks) == data,
        parsed["Subject"],
        envelope.rcpt_tos,
        message.envelope is envelope and message.session is session,
        message.id,
    )


def every_stage_conversation(port: int) -> tuple[str, str]:
    with Client(port) as c:
        assert c.cmd("EHLO client.test").startswith("250 ")
        assert c.cmd("MAIL FROM:<a@example.com> SIZE=68 BODY=8BITMIME").startswith("250 2.1.0")
        notify = "RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2B@example.com"
        assert c.cmd(notify).startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<c@Example.ORG>").startswith("250 2.1.5")
        accepted = c.message()
        assert c.cmd("MAIL FROM:<>").startswith("250 ")
        assert c.cmd("RCPT TO:<postmaster@example.com>").startswith("250 ")
        assert c.cmd("RSET").startswith("250 ")
        bye = c.cmd("QUIT")
    return accepted, bye


@pytest.mark.parametrize("shape", ["callbacks", "plugin"])
def test_every_stage_fires_with_its_arguments(tmp_path: Path, shape: str) -> None:
    events: list[tuple[Any, ...]] = []
    server = new_server(tmp_path)
    if shape == "callbacks":
        register_callbacks(server, events)
    else:
        server.add_plugin(EveryStage(events))
    with serving(server) as port:
        accepted, bye = every_stage_conversation(port)
        assert wait_for(lambda: events[-1][0] == "close", 5)
    assert bye.startswith("221")
    b = ("b@example.com", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;b+@example.com"})
    (message,) = [e for e in events if e[0] == "message"]
    assert accepted == f"250 2.0.0 Message accepted as {message[-1]}"
    assert [e[:-1] if e[0] == "message" else e for e in events] == [
        ("connect", "127.0.0.1", None),
        ("helo", "client.test", None),
        ("mail", "a@example.com", {"SIZE": "68", "BODY": "8BITMIME"}, "a@example.com", ()),
        ("rcpt", "b", "example.com", b[1], ()),
        ("rcpt", "c", "Example.ORG", {}, ("b@example.com",)),
        ("data_start", "a@example.com", ("b@example.com", "c@Example.ORG")),
        ("message", len(BODY), BODY, True, "hooks", ("b@example.com", "c@Example.ORG"), True),
        ("mail", "", {}, "", ()),
        ("rcpt", "postmaster", "example.com", {}, ()),
        ("reset", "", ("postmaster@example.com",)),
        ("close", 2, 1),
    ]


def test_mail_params_and_the_null_sender_reach_the_hook(tmp_path: Path) -> None:
    seen: list[tuple[str, bool, dict[str, str | None], str, bool]] = []
    server = new_server(tmp_path)

    @server.on_mail
    def mail(session: Session, envelope: Envelope, address: Address) -> None:
        seen.append(
            (address, bool(address), dict(address.params), envelope.body, envelope.smtputf8)
        )

    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        assert c.cmd("MAIL FROM:<> BODY=8BITMIME SIZE=1000").startswith("250")
        c.cmd("RSET")
        assert c.cmd("MAIL FROM:<jürgen@example.de> SMTPUTF8").startswith("250")
    assert seen == [
        ("", False, {"BODY": "8BITMIME", "SIZE": "1000"}, "8BITMIME", False),
        ("jürgen@example.de", True, {"SMTPUTF8": None}, "7BIT", True),
    ]


# --- TLS -------------------------------------------------------------------------------------


def test_tls_stage_sees_version_cipher_bits_and_sni(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server = new_server(tmp_path, tls_cert=certs.cert, tls_key=certs.key)
    seen: list[tuple[str, TLSInfo | None, str | None]] = []

    @server.on_tls
    async def callback(session: Session) -> None:
        seen.append(("callback", session.tls, session.helo))

    @server.on_tls
    def sync_callback(session: Session) -> None:
        seen.append(("sync", session.tls, session.helo))

    class TLSPlugin:
        name = "tls-plugin"

        async def on_tls(self, session: Session) -> None:
            seen.append(("plugin", session.tls, session.helo))

    server.add_plugin(TLSPlugin())
    helos: list[tuple[str | None, TLSInfo | None]] = []
    server.on_helo(lambda session, hostname: helos.append((session.helo, session.tls)))

    context = ssl.create_default_context(cafile=str(certs.ca_file))
    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO before.test")
        c.starttls(context, "mx.test")
        assert c.cmd("EHLO after.test").startswith("250 ")
        cipher = c.sock.cipher()  # type: ignore[attr-defined]
    assert [name for name, _, _ in seen] == ["callback", "sync", "plugin"]
    for _, tls, helo in seen:
        assert tls is not None
        assert helo is None  # the session starts over after STARTTLS
        assert tls.server_name == "mx.test"
        assert tls.version is not None and tls.version.startswith("TLSv1.")
        assert cipher is not None and (tls.cipher, tls.bits) == (cipher[0], cipher[2])
        assert isinstance(tls.bits, int) and tls.bits >= 128
        assert tls.peer_certificate is False
    assert helos[0] == (None, None)
    assert helos[1][1] is seen[0][1]


def test_tls_hook_can_refuse_and_hang_up(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server = new_server(tmp_path, tls_cert=certs.cert, tls_key=certs.key)

    @server.on_tls
    def refuse(session: Session) -> None:
        assert session.tls is not None
        if session.tls.server_name != "mx.test":
            raise Reject(554, "Wrong name", enhanced="5.7.1")

    context = ssl.create_default_context(cafile=str(certs.ca_file))
    with serving(server) as port:
        with Client(port) as c:
            c.cmd("EHLO c.test")
            c.starttls(context, "localhost")
            assert c.reply() == ["554 5.7.1 Wrong name"]
            assert c.closed()
        with Client(port) as c:
            c.cmd("EHLO c.test")
            c.starttls(context, "mx.test")
            assert c.cmd("EHLO c.test").startswith("250 ")


# --- auth ------------------------------------------------------------------------------------


def test_auth_stage_and_session_user(tmp_path: Path) -> None:
    server = new_server(
        tmp_path, auth_users=["alice:secret"], allow_insecure_auth=True, auth_failure_delay=0
    )
    attempts: list[tuple[str, str, str | None, bool]] = []
    users: list[tuple[str | None, str | None, bool]] = []

    @server.on_auth
    async def check(session: Session, auth: AuthAttempt) -> Any:
        attempts.append((auth.method, auth.username, auth.password, auth.verify("secret")))
        if auth.username == "bob":
            return auth.verify("bobs-password")  # True lets bob in, False refuses
        if auth.username == "mallory":
            raise Reject(535, "Not you again", enhanced="5.7.8")
        return None  # alice: the static users plugin decides

    @server.on_mail
    def mail(session: Session, envelope: Envelope, address: Address) -> None:
        users.append((session.user, session.auth_mechanism, session.authenticated))

    def login(port: int, user: str, password: str, mechanism: str | None) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("c.test")
            try:
                if mechanism is None:
                    client.login(user, password)
                else:
                    client.user, client.password = user, password
                    method = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login}[mechanism]
                    client.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code
            client.mail("a@example.com")
            return 235

    with serving(server) as port:
        with Client(port) as c:
            (auth_line,) = [line for line in c.ehlo("c.test") if "AUTH" in line]
        # Callbacks check PLAIN and LOGIN; the static users plugin adds CRAM-MD5.
        assert auth_line == "250-AUTH PLAIN LOGIN CRAM-MD5"
        assert login(port, "alice", "secret", None) == 235  # smtplib prefers CRAM-MD5
        assert login(port, "alice", "secret", "PLAIN") == 235
        assert login(port, "alice", "secret", "LOGIN") == 235
        assert login(port, "alice", "wrong", "PLAIN") == 535
        assert login(port, "bob", "bobs-password", "PLAIN") == 235
        assert login(port, "bob", "guess", "PLAIN") == 535
        assert login(port, "mallory", "secret", "PLAIN") == 535
    assert attempts == [
        ("CRAM-MD5", "alice", None, True),
        ("PLAIN", "alice", "secret", True),
        ("LOGIN", "alice", "secret", True),
        ("PLAIN", "alice", "wrong", False),
        ("PLAIN", "bob", "bobs-password", False),
        ("PLAIN", "bob", "guess", False),
        ("PLAIN", "mallory", "secret", True),
    ]
    assert users == [
        ("alice", "CRAM-MD5", True),
        ("alice", "PLAIN", True),
        ("alice", "LOGIN", True),
        ("bob", "PLAIN", True),
    ]


def test_auth_refusal_text_reaches_the_client(tmp_path: Path) -> None:
    server = new_server(tmp_path, allow_insecure_auth=True, auth_failure_delay=0)

    @server.on_auth
    def locked(session: Session, auth: AuthAttempt) -> None:
        raise Reject("Account locked")

    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        assert c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == "550 5.7.8 Account locked"


# --- results in every shape ------------------------------------------------------------------


def returns(value: Any) -> Callable[[], Any]:
    return lambda: value


def raises(exc: BaseException) -> Callable[[], Any]:
    def act() -> Any:
        raise exc

    return act


#: (what the hook does, the reply lines the client sees). Recipient caseN gets case N.
CASES: list[tuple[Callable[[], Any], list[str]]] = [
    (returns(None), ["250 2.1.5 Recipient OK"]),
    (returns(True), ["250 2.1.5 Recipient OK"]),
    (returns(False), ["550 5.7.1 Rejected"]),
    (returns(Accept()), ["250 2.1.5 Recipient OK"]),
    (returns(Accept(text="Fine by me")), ["250 2.1.5 Fine by me"]),
    (
        returns(Accept(251, "User not local; will forward")),
        ["251 2.1.5 User not local; will forward"],
    ),
    (raises(Reject(550, "x")), ["550 5.7.1 x"]),
    (raises(Reject("x")), ["550 5.7.1 x"]),
    (raises(Reject(550, "No such user", enhanced="5.1.1")), ["550 5.1.1 No such user"]),
    (returns(Reject(553, "Bad mailbox")), ["553 5.1.3 Bad mailbox"]),
    (raises(TempFail()), ["451 4.3.0 Temporary failure, try again later"]),
    (raises(TempFail(450, "Greylisted", enhanced="4.7.1")), ["450 4.7.1 Greylisted"]),
    (
        returns(Reply(252, "2.1.5", ("Cannot verify, will try",))),
        ["252 2.1.5 Cannot verify, will try"],
    ),
    (returns(42), [LOCAL_ERROR]),
    (raises(RuntimeError("boom")), [LOCAL_ERROR]),
    (
        raises(Reject(550, "first line\nsecond line")),
        ["550-5.7.1 first line", "550 5.7.1 second line"],
    ),
]
ACCEPTED = [f"case{i}@example.com" for i, (_, lines) in enumerate(CASES) if lines[0][0] == "2"]


def case_of(address: Address) -> Any:
    return CASES[int(address.local.removeprefix("case"))][0]()


def install(server: Server, shape: str, act: Callable[[Address], Any]) -> None:
    """Answer RCPT with ``act(address)`` in the given shape."""
    if shape == "callback":

        @server.on_rcpt
        async def decide(session: Session, envelope: Envelope, address: Address) -> Any:
            return act(address)

    elif shape == "sync":
        server.on_rcpt(lambda session, envelope, address: act(address))
    elif shape == "plugin":

        class Policy:
            name = "policy"

            async def on_rcpt(self, s: Session, e: Envelope, address: Address) -> Any:
                return act(address)

        server.add_plugin(Policy())
    else:
        assert shape == "middleware"

        async def mw(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
            if ctx.stage == "rcpt":
                return act(ctx.args[1])
            return await call_next()

        server.use(mw)


SHAPES = ["callback", "sync", "plugin", "middleware"]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_result_in_every_shape(
    tmp_path: Path, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = new_server(tmp_path)
    install(server, shape, case_of)
    delivered: list[tuple[Address, ...]] = []
    server.on_message(lambda session, envelope, message: delivered.append(envelope.rcpt_tos))
    with caplog.at_level(logging.ERROR), serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@example.com>")
        for i, (_, expected) in enumerate(CASES):
            c.send(f"RCPT TO:<case{i}@example.com>\r\n".encode())
            assert (i, c.reply()) == (i, expected)
        assert c.message().startswith("250 2.0.0 Message accepted")
    # Only what was accepted is in the envelope: a refused RCPT never gets in.
    assert delivered == [tuple(ACCEPTED)]
    failures = [r.getMessage() for r in caplog.records if r.name == "mailgate.hooks"]
    assert len(failures) == 2, failures  # the bad value and the exception, each logged once
    assert all(text.startswith("session ") and " rcpt hook " in text for text in failures)


@pytest.mark.parametrize("shape", SHAPES)
def test_disconnect_after_the_reply(tmp_path: Path, shape: str) -> None:
    server = new_server(tmp_path)
    resets: list[str] = []
    install(server, shape, lambda address: Reject(550, "Go away", disconnect=True))
    server.on_reset(lambda session, envelope: resets.append(envelope.sender))
    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@example.com>")
        assert c.cmd("RCPT TO:<b@example.com>") == "550 5.7.1 Go away"
        assert c.closed()
        assert wait_for(lambda: resets == ["a@example.com"], 5)


def test_default_refusals_at_each_stage(tmp_path: Path) -> None:
    server = new_server(tmp_path, allow_insecure_auth=True, auth_failure_delay=0)
    server.on_helo(lambda session, name: False if name == "bad.test" else None)
    server.on_mail(lambda s, e, address: False if address.local == "spam" else None)
    server.on_data_start(lambda s, envelope: False if envelope.sender == "no@example.com" else None)
    server.on_auth(lambda session, auth: False)

    @server.on_message
    def message(s: Session, envelope: Envelope, m: Message) -> Any:
        if envelope.sender == "tempfail@example.com":
            raise TempFail("Try later")
        return envelope.sender != "refused@example.com"

    with serving(server) as port, Client(port) as c:
        assert c.cmd("EHLO bad.test") == "550 5.7.1 Rejected"
        assert c.cmd("MAIL FROM:<a@example.com>").startswith("503")  # no EHLO accepted yet
        assert c.cmd("EHLO good.test").startswith("250 ")
        assert c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == (
            "535 5.7.8 Authentication credentials invalid"
        )
        assert c.cmd("MAIL FROM:<spam@example.com>") == "550 5.7.1 Rejected"
        c.cmd("MAIL FROM:<no@example.com>")
        c.cmd("RCPT TO:<b@example.com>")
        assert c.cmd("DATA") == "550 5.7.1 Rejected"
        assert c.cmd("RSET").startswith("250")
        for sender, expected in [
            ("refused@example.com", "550 5.7.1 Rejected"),
            ("tempfail@example.com", "451 4.3.0 Try later"),
            ("ok@example.com", "250 2.0.0 Message accepted as "),
        ]:
            c.cmd(f"MAIL FROM:<{sender}>")
            c.cmd("RCPT TO:<b@example.com>")
            assert c.message().startswith(expected)


def test_connect_stage_results(tmp_path: Path) -> None:
    server = new_server(tmp_path)
    counter = iter(range(100))

    @server.on_connect
    def connect(session: Session) -> Any:
        n = next(counter)
        session.notes["n"] = n
        return [
            None,
            Accept(text="mx.test Welcome, friend"),
            Reject(554, "No service"),
            Reject(554, "Blocklisted", disconnect=True),
        ][n]

    with serving(server) as port:
        with Client(port) as c:
            assert c.banner == ["220 mx.test ESMTP mailgate"]
        with Client(port) as c:
            assert c.banner == ["220 mx.test Welcome, friend"]
            assert c.cmd("EHLO c.test").startswith("250 ")
        with Client(port) as c:
            assert c.banner == ["554 No service"]
            assert c.cmd("EHLO c.test").startswith("503")
            assert c.cmd("QUIT").startswith("221")
        with Client(port) as c:
            assert c.banner == ["554 Blocklisted"]
            assert c.closed()


def test_data_start_and_message_can_accept_with_their_own_text(tmp_path: Path) -> None:
    server = new_server(tmp_path)
    server.on_data_start(lambda s, e: Accept(text="Go ahead, end with a dot"))
    server.on_message(lambda s, e, m: Accept(text=f"Queued as {m.id}, thanks"))
    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.com>")
        assert c.cmd("DATA") == "354 Go ahead, end with a dot"
        c.send(BODY + b".\r\n")
        last = c.reply()[-1]
        assert last.startswith("250 2.0.0 Queued as ") and last.endswith(", thanks")


def test_bad_value_and_exception_are_logged_with_the_session_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = new_server(tmp_path)
    ids: list[str] = []

    @server.on_helo
    def helo(session: Session, hostname: str) -> Any:
        ids.append(session.id)
        if hostname == "value.test":
            return 42
        raise ZeroDivisionError("bug in a hook")

    with caplog.at_level(logging.ERROR), serving(server) as port, Client(port) as c:
        assert c.cmd("EHLO value.test") == LOCAL_ERROR
        assert c.cmd("EHLO crash.test") == LOCAL_ERROR
        assert c.cmd("NOOP").startswith("250")  # the session goes on
    records = [r for r in caplog.records if r.name == "mailgate.hooks"]
    assert len(records) == 2
    assert f"session {ids[0]}: helo hook helo:" in records[0].getMessage()
    assert "returned 42" in (records[0].exc_text or "")
    assert records[1].exc_info is not None and records[1].exc_info[0] is ZeroDivisionError
    assert all(ids[0] in r.getMessage() for r in records)


def test_hook_timeout_is_451_and_the_session_goes_on(tmp_path: Path) -> None:
    server = new_server(tmp_path, hook_timeout=0.2, delivery_timeout=0.2)
    cancelled: list[str] = []

    @server.on_message
    async def slow_delivery(s: Session, envelope: Envelope, m: Message) -> None:
        if envelope.sender == "slow@example.com":
            await asyncio.sleep(10)

    @server.on_rcpt
    async def slow(session: Session, envelope: Envelope, address: Address) -> None:
        if address.local == "slow":
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(str(address))
                raise

    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@example.com>")
        started = time.monotonic()
        assert c.cmd("RCPT TO:<slow@example.com>") == LOCAL_ERROR
        assert time.monotonic() - started < 3
        assert c.cmd("RCPT TO:<fast@example.com>") == "250 2.1.5 Recipient OK"
        assert c.message().startswith("250 2.0.0")
        # The message stage has its own limit (delivery_timeout).
        c.cmd("MAIL FROM:<slow@example.com>")
        c.cmd("RCPT TO:<fast@example.com>")
        assert c.message() == LOCAL_ERROR
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<fast@example.com>")
        assert c.message().startswith("250 2.0.0")
    assert cancelled == ["slow@example.com"]
    assert not list((tmp_path / "state" / "spool").iterdir())


# --- session fields ----------------------------------------------------------------------------


def test_session_fields_and_notes(tmp_path: Path) -> None:
    server = new_server(
        tmp_path, auth_users=["alice:secret"], allow_insecure_auth=True, auth_failure_delay=0
    )
    closed: list[dict[str, Any]] = []

    @server.on("connect")
    def connect(session: Session) -> None:
        assert session.notes == {}  # nothing left over from another session
        session.notes["trail"] = ["connect"]

    @server.on_helo
    def helo(session: Session, hostname: str) -> None:
        session.notes["trail"].append(f"helo {hostname}")

    @server.on_mail
    def mail(session: Session, envelope: Envelope, address: Address) -> None:
        session.notes["trail"].append(f"mail {session.transactions} {session.messages}")

    @server.on_close
    def close(session: Session) -> None:
        closed.append(
            {
                "peer": (session.peer_host, session.peer_port),
                "local": session.local_port,
                "helo": session.helo,
                "esmtp": session.esmtp,
                "user": session.user,
                "mechanism": session.auth_mechanism,
                "transactions": session.transactions,
                "messages": session.messages,
                "trail": session.notes["trail"],
                "id": session.id,
            }
        )

    with serving(server) as port:
        with Client(port) as c:
            first_port = c.port
            c.cmd("EHLO one.test")
            assert c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").startswith("235")
            for _ in range(2):
                c.cmd("MAIL FROM:<a@example.com>")
                c.cmd("RCPT TO:<b@example.com>")
                assert c.message().startswith("250")
            c.cmd("MAIL FROM:<a@example.com>")
            c.cmd("RSET")
            c.cmd("QUIT")
        assert wait_for(lambda: len(closed) == 1, 5)
        with Client(port) as c:
            second_port = c.port
            c.cmd("HELO two.test")
            c.cmd("QUIT")
        assert wait_for(lambda: len(closed) == 2, 5)
    one, two = closed
    assert one["peer"] == ("127.0.0.1", first_port) and one["local"] == port
    assert (one["helo"], one["esmtp"], one["user"], one["mechanism"]) == (
        "one.test",
        True,
        "alice",
        "PLAIN",
    )
    assert (one["transactions"], one["messages"]) == (3, 2)
    assert one["trail"] == ["connect", "helo one.test", "mail 0 0", "mail 1 1", "mail 2 2"]
    assert two["peer"] == ("127.0.0.1", second_port)
    assert (two["helo"], two["esmtp"], two["user"], two["mechanism"]) == (
        "two.test",
        False,
        None,
        None,
    )
    assert (two["transactions"], two["messages"], two["trail"]) == (
        0,
        0,
        ["connect", "helo two.test"],
    )
    assert one["id"] != two["id"]


# --- reset -------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_helo_hook", [False, True])
def test_reset_fires_for_rset_ehlo_again_too_big_and_quit(
    tmp_path: Path, with_helo_hook: bool
) -> None:
    server = new_server(tmp_path, max_size=2000)
    resets: list[tuple[str, tuple[Address, ...]]] = []
    server.on_reset(lambda session, envelope: resets.append((envelope.sender, envelope.rcpt_tos)))
    if with_helo_hook:
        server.on_helo(lambda session, hostname: None)
    with serving(server) as port:
        with Client(port) as c:
            c.cmd("EHLO c.test")
            c.cmd("RSET")  # nothing to reset: no call
            c.cmd("MAIL FROM:<rset@example.com>")
            c.cmd("RCPT TO:<b@example.com>")
            c.cmd("RSET")
            c.cmd("MAIL FROM:<ehlo@example.com>")
            c.cmd("EHLO c.test")
            c.cmd("MAIL FROM:<big@example.com>")
            c.cmd("RCPT TO:<c@example.com>")
            assert c.message(BODY + b"x" * 3000 + b"\r\n").startswith("552")
            c.cmd("MAIL FROM:<ok@example.com>")
            c.cmd("RCPT TO:<d@example.com>")
            assert c.message().startswith("250")  # a delivered message is no reset
            c.cmd("MAIL FROM:<quit@example.com>")
            c.cmd("QUIT")
        assert wait_for(lambda: len(resets) == 4, 5)
    assert resets == [
        ("rset@example.com", ("b@example.com",)),
        ("ehlo@example.com", ()),
        ("big@example.com", ("c@example.com",)),
        ("quit@example.com", ()),
    ]


# --- ordering and middleware at the server --------------------------------------------------------


def test_plugin_order_before_after_and_ties(tmp_path: Path) -> None:
    server = new_server(tmp_path)
    calls: list[str] = []

    def plugin(name: str) -> Any:
        class Step:
            async def on_rcpt(self, s: Session, e: Envelope, a: Address) -> None:
                calls.append(name)

        step = Step()
        step.name = name  # type: ignore[attr-defined]
        return step

    server.add_plugin(plugin("deliver"))
    server.add_plugin(plugin("spam"), before="deliver")
    server.add_plugin(plugin("audit"), after=["deliver", "spam"])
    server.add_plugin(plugin("dns"), before=("spam",))
    server.on_rcpt(lambda s, e, a: calls.append("first-callback"), name="cb", before="dns")
    server.on_rcpt(lambda s, e, a: calls.append("tie-1"), name="tie-1")
    server.on_rcpt(lambda s, e, a: calls.append("tie-2"), name="tie-2")
    with pytest.raises(HookError, match="cycle"):
        server.add_plugin(plugin("loop"), before="cb", after="audit")
    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@example.com>")
        assert c.cmd("RCPT TO:<b@example.com>").startswith("250")
    assert calls == ["first-callback", "dns", "spam", "deliver", "audit", "tie-1", "tie-2"]
    # Built-in policy (relay control here) runs ahead of what the application registered.
    assert server.hooks.names()[:6] == ["relay", "cb", "dns", "spam", "deliver", "audit"]


def test_ordering_against_an_unknown_plugin_fails_start(tmp_path: Path) -> None:
    server = new_server(tmp_path)
    server.on_message(lambda s, e, m: None, name="archive", after="spam-filter")

    async def start() -> None:
        await server.start()

    with pytest.raises(StartupError) as info:
        asyncio.run(start())
    assert str(info.value) == (
        "plugin 'archive' is ordered after 'spam-filter', which is not registered "
        "(plugins: relay, archive)"
    )
    with pytest.raises(RuntimeError):
        _ = server.address  # nothing is listening


def test_builtin_delivery_can_be_named_in_ordering(tmp_path: Path) -> None:
    server = new_server(tmp_path, maildir=tmp_path / "mail")
    order: list[str] = []

    @server.on_message(before="maildir")
    def check(session: Session, envelope: Envelope, message: Message) -> None:
        order.append("check")
        assert not maildir_messages(tmp_path / "mail")

    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.com>")
        assert c.message().startswith("250")
    assert order == ["check"]
    assert server.hooks.names() == ["relay", "message:" + check.__qualname__, "maildir"]
    assert [strip_received(m) for m in maildir_messages(tmp_path / "mail")] == [BODY]


def test_middleware_wraps_every_stage_first_added_outermost(tmp_path: Path) -> None:
    server = new_server(tmp_path)
    trace: list[tuple[str, str, str | None]] = []

    def recorder(label: str) -> Middleware:
        async def mw(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
            trace.append((f"{label}>", ctx.stage, ctx.step))
            result = await call_next()
            trace.append((f"<{label}", ctx.stage, ctx.step))
            return result

        return mw

    server.use(recorder("outer"))
    server.use(recorder("inner"))

    class Deny:
        name = "deny"

        def on_rcpt(self, s: Session, e: Envelope, address: Address) -> Any:
            return Reject("No") if address.local == "no" else None

    server.on_rcpt(lambda s, e, a: None, name="first")
    server.add_plugin(Deny())

    async def short_circuit(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        if ctx.stage == "mail" and ctx.args[1].local == "blocked":
            raise Reject(550, "Blocked by middleware", enhanced="5.7.26")
        return await call_next()

    server.use(short_circuit)
    with serving(server) as port:
        with Client(port) as c:
            c.cmd("EHLO c.test")
            assert c.cmd("MAIL FROM:<blocked@example.com>") == "550 5.7.26 Blocked by middleware"
            c.cmd("MAIL FROM:<a@example.com>")
            assert c.cmd("RCPT TO:<no@example.com>") == "550 5.7.1 No"
            assert c.cmd("RCPT TO:<yes@example.com>").startswith("250")
            c.cmd("QUIT")
        assert wait_for(lambda: trace[-1] == ("<outer", "close", None), 5)
    stages = [stage for label, stage, _ in trace if label == "outer>"]
    assert stages == ["connect", "helo", "mail", "mail", "rcpt", "rcpt", "reset", "close"]
    per_stage: dict[int, list[str]] = {}
    index = -1
    for label, _, _ in trace:
        if label == "outer>":
            index += 1
        per_stage.setdefault(index, []).append(label)
    wrapped = ["outer>", "inner>", "<inner", "<outer"]
    # The Reject raised by the innermost middleware passes up through the other two.
    assert list(per_stage.values()) == [wrapped] * 2 + [wrapped[:2]] + [wrapped] * 5
    # After call_next, ctx.step names the step that decided (or ran last).
    rcpt_exits = [step for label, stage, step in trace if label == "<outer" and stage == "rcpt"]
    assert rcpt_exits == ["deny", "deny"]
    assert all(step is None for label, _, step in trace if label.endswith(">"))


# --- the envelope is read-only -----------------------------------------------------------------


def test_hooks_cannot_add_recipients_by_mutating(tmp_path: Path) -> None:
    server = new_server(tmp_path)
    attempts: list[str] = []
    delivered: list[tuple[Address, ...]] = []

    @server.on_rcpt
    def sneaky(session: Session, envelope: Envelope, address: Address) -> None:
        if address.local == "append":
            attempts.append("append")
            envelope.rcpt_tos.append(Address("bcc@evil.test"))  # type: ignore[attr-defined]
        if address.local == "assign":
            attempts.append("assign")
            envelope.rcpt_tos = (Address("bcc@evil.test"),)  # type: ignore[misc]
        if address.local == "copy":
            # A modified copy is the hook's own: the server's envelope is unchanged.
            attempts.append("copy")
            envelope.with_recipient(Address("bcc@evil.test"))

    server.on_message(lambda s, envelope, m: delivered.append(envelope.rcpt_tos))
    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@example.com>")
        assert c.cmd("RCPT TO:<append@example.com>") == LOCAL_ERROR
        assert c.cmd("RCPT TO:<assign@example.com>") == LOCAL_ERROR
        assert c.cmd("RCPT TO:<copy@example.com>").startswith("250")
        assert c.message().startswith("250")
    assert attempts == ["append", "assign", "copy"]
    assert delivered == [("copy@example.com",)]


# --- LMTP -------------------------------------------------------------------------------------


def lmtp_exchange(port: int, recipients: list[str]) -> list[str]:
    with Client(port) as c:
        assert "LMTP" in c.banner[0]
        assert c.cmd("LHLO c.test").startswith("250")
        c.cmd("MAIL FROM:<a@example.com>")
        for rcpt in recipients:
            assert c.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.send(BODY + b".\r\n")
        replies = [c.reply()[-1] for _ in recipients]
        assert c.cmd("QUIT").startswith("221")
    return replies


@pytest.mark.parametrize("shape", ["list", "dict", "PerRecipient"])
def test_lmtp_message_hook_answers_per_recipient(tmp_path: Path, shape: str) -> None:
    server = new_server(tmp_path, lmtp=True)
    answers: list[Any] = [
        None,
        Reject(550, "No such mailbox", enhanced="5.1.1"),
        TempFail(452, "Mailbox full", enhanced="4.2.2"),
        True,
        Accept(text="Stored in INBOX"),
        False,
    ]
    recipients = [f"r{i}@example.com" for i in range(len(answers))]

    @server.on_message
    async def deliver(session: Session, envelope: Envelope, message: Message) -> Any:
        assert envelope.rcpt_tos == tuple(recipients)
        if shape == "list":
            return answers
        if shape == "dict":
            return {rcpt.upper(): answer for rcpt, answer in zip(recipients, answers, strict=True)}
        return PerRecipient(tuple(answers))

    with serving(server) as port:
        replies = lmtp_exchange(port, recipients)
    assert replies[0].startswith("250 2.1.5 <r0@example.com> Message accepted as ")
    assert replies[1:4] == [
        "550 5.1.1 No such mailbox",
        "452 4.2.2 Mailbox full",
        replies[0].replace("r0@", "r3@"),
    ]
    assert replies[4] == "250 2.1.5 Stored in INBOX"
    assert replies[5] == "550 5.7.1 Rejected"


def test_lmtp_partial_dict_single_answer_and_wrong_count(tmp_path: Path) -> None:
    server = new_server(tmp_path, lmtp=True)

    @server.on_message
    def deliver(session: Session, envelope: Envelope, message: Message) -> Any:
        sender = envelope.sender
        if sender.startswith("dict"):
            return {"r1@example.com": TempFail("Try r1 later")}
        if sender.startswith("single"):
            raise Reject(554, "Refused for all")
        return [None]  # one answer for two recipients: a hook bug

    def exchange(port: int, sender: str) -> list[str]:
        with Client(port) as c:
            c.cmd("LHLO c.test")
            c.cmd(f"MAIL FROM:<{sender}>")
            c.cmd("RCPT TO:<r0@example.com>")
            c.cmd("RCPT TO:<r1@example.com>")
            c.cmd("DATA")
            c.send(BODY + b".\r\n")
            return [c.reply()[-1], c.reply()[-1]]

    with serving(server) as port:
        dict_replies = exchange(port, "dict@example.com")
        single = exchange(port, "single@example.com")
        wrong = exchange(port, "wrong@example.com")
    assert dict_replies[0].startswith("250 2.1.5 <r0@example.com>")
    assert dict_replies[1] == "451 4.3.0 Try r1 later"
    assert single == ["554 5.7.1 Refused for all"] * 2
    assert wrong == [LOCAL_ERROR] * 2


def test_per_recipient_answers_outside_lmtp_are_a_local_error(tmp_path: Path) -> None:
    server = new_server(tmp_path)
    server.on_message(lambda s, e, m: [None])
    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.com>")
        assert c.message() == LOCAL_ERROR


# --- deliveries that do not hold up the reply ----------------------------------------------------


def test_background_plugin_runs_after_the_reply_on_a_hard_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = new_server(tmp_path)
    release = threading.Event()
    spooled: list[tuple[Path, int]] = []
    later: list[tuple[str, bytes, bool, tuple[Address, ...]]] = []
    done = threading.Event()

    @server.on_message
    def required(session: Session, envelope: Envelope, message: Message) -> None:
        assert message.path is not None
        spooled.append((message.path, message.path.stat().st_ino))

    class Archive:
        name = "archive"
        required = False

        async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, release.wait, 10)
            assert message.path is not None
            same_inode = message.path.stat().st_ino == spooled[0][1]
            later.append((message.path.name, await message.read(), same_inode, envelope.rcpt_tos))
            done.set()

    class Broken:
        name = "broken"
        required = False

        def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
            raise RuntimeError("webhook down")

    server.add_plugin(Archive())
    server.add_plugin(Broken())
    with caplog.at_level(logging.ERROR), serving(server) as port:
        with Client(port) as c:
            c.cmd("EHLO c.test")
            c.cmd("MAIL FROM:<a@example.com>")
            c.cmd("RCPT TO:<b@example.com>")
            # The 250 comes while the background plugin still waits: it does not hold it up.
            assert c.message().startswith("250 2.0.0 Message accepted")
            assert later == []
            release.set()
            assert done.wait(10)
            link = spooled[0][0].with_name(later[0][0])
            assert wait_for(lambda: not link.exists(), 5)  # removed once the plugins finished
    (name, data, same_inode, rcpts) = later[0]
    assert name != spooled[0][0].name and same_inode
    assert strip_received(data) == BODY and rcpts == ("b@example.com",)
    assert not spooled[0][0].exists()
    assert "broken failed" in caplog.text
    assert server.hooks.names() == [
        "relay",
        "message:" + required.__qualname__,
        "archive",
        "broken",
    ]


def test_background_plugin_of_a_refused_message_does_not_run(tmp_path: Path) -> None:
    server = new_server(tmp_path)
    ran: list[str] = []

    async def later(session: Session, envelope: Envelope, message: Message) -> None:
        ran.append(envelope.sender)

    later.required = False  # type: ignore[attr-defined]
    server.on_message(later)
    server.on_message(lambda s, e, m: e.sender != "spam@example.com")
    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO c.test")
        for sender in ("spam@example.com", "ham@example.com"):
            c.cmd(f"MAIL FROM:<{sender}>")
            c.cmd("RCPT TO:<b@example.com>")
            c.message()
        assert wait_for(lambda: ran == ["ham@example.com"], 5)


def test_stop_waits_for_background_plugins_within_close_timeout(tmp_path: Path) -> None:
    outcomes: list[str] = []

    async def slow(session: Session, envelope: Envelope, message: Message) -> None:
        try:
            await asyncio.sleep(0.3 if envelope.sender == "quick@example.com" else 30)
            outcomes.append(f"finished {envelope.sender}")
        except asyncio.CancelledError:
            outcomes.append(f"cancelled {envelope.sender}")
            raise

    slow.required = False  # type: ignore[attr-defined]

    async def scenario(sender: str, close_timeout: float) -> float:
        server = new_server(tmp_path, close_timeout=close_timeout)
        server.on_message(slow)
        async with server:
            host, port = server.address
            message = email.message.EmailMessage()
            message["Subject"] = "later"
            message.set_content("body")
            await aiosmtplib.send(
                message,
                hostname=host,
                port=port,
                sender=sender,
                recipients=["b@example.com"],
                start_tls=False,
            )
            started = time.monotonic()
        return time.monotonic() - started

    waited = asyncio.run(scenario("quick@example.com", 5))
    assert outcomes == ["finished quick@example.com"]
    assert 0.1 < waited < 4
    waited = asyncio.run(scenario("slow@example.com", 0.3))
    assert outcomes[1:] == ["cancelled slow@example.com"]
    assert waited < 3


# --- the Server object from code ---------------------------------------------------------------


def test_server_from_code_defaults_store_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    received: list[bytes] = []

    async def main() -> int:
        server = Server(hostname="mx.test", listen="127.0.0.1:0")

        @server.on_message
        async def keep(session: Session, envelope: Envelope, message: Message) -> None:
            received.append(await message.read())

        async with server as running:
            assert running is server
            host, port = server.address
            assert host == "127.0.0.1" and port != 0
            message = email.message.EmailMessage()
            message["From"] = "a@example.com"
            message["Subject"] = "from code"
            message.set_content("Hello from a test")
            errors, reply = await aiosmtplib.send(
                message, hostname=host, port=port, recipients=["b@example.com"], start_tls=False
            )
            assert errors == {} and reply.startswith("2.0.0 Message accepted")
        return server.messages_accepted

    assert asyncio.run(main()) == 1
    assert b"Subject: from code" in received[0]
    assert not (tmp_path / "maildir").exists()
    spool = tmp_path / ".mailgate" / "spool"
    assert not spool.exists() or not os.listdir(spool)


def test_server_from_code_delivers_into_a_maildir(tmp_path: Path) -> None:
    server = new_server(tmp_path, maildir=tmp_path / "Maildir")
    with serving(server) as port, smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        assert client.sendmail("a@example.com", ["b@example.com"], BODY) == {}
    assert [strip_received(m) for m in maildir_messages(tmp_path / "Maildir")] == [BODY]


def test_server_settings_errors() -> None:
    with pytest.raises(
        ValueError, match=r"unknown setting 'hostnme' \(did you mean 'hostname'\?\)"
    ):
        Server(hostnme="mx.test")
    with pytest.raises(ValueError, match="max_size"):
        Server(max_size="lots")
    with pytest.raises(ValueError, match="exclude each other"):
        Server(maildir="m", mbox="x.mbox")
    with pytest.raises(TypeError, match="not both"):
        Server(ServerOptions(), hostname="mx.test")


def test_server_lifecycle_errors_and_idempotent_stop(tmp_path: Path) -> None:
    async def main() -> None:
        server = new_server(tmp_path)
        with pytest.raises(RuntimeError, match="not listening"):
            _ = server.address
        await server.stop()  # never started: nothing to do
        await server.start()
        try:
            with pytest.raises(RuntimeError, match="already started"):
                await server.start()
            assert server.address[1] != 0
        finally:
            await server.stop()
        await server.stop()  # twice is safe
        with pytest.raises(RuntimeError):
            _ = server.address
        # A stopped server starts again (e.g. a test fixture reused).
        await server.start()
        port = server.address[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220 mx.test")
        writer.close()
        await server.stop()

    asyncio.run(main())


def test_server_options_object_and_hooks_object(tmp_path: Path) -> None:
    hooks = Hooks()
    seen: list[str] = []
    hooks.on("helo", lambda session, hostname: seen.append(hostname))
    options = ServerOptions(
        listen=(ListenAddress("127.0.0.1", 0),),
        hostname="mx.test",
        delivery="sink",
        state_dir=tmp_path / "state",
        hook_timeout=0.5,
    )
    server = Server(options, hooks)
    assert server.hooks is hooks and hooks.timeout == 0.5
    with serving(server) as port, Client(port) as c:
        c.cmd("EHLO shared.test")
    assert seen == ["shared.test"]


def test_maildir_delivery_leaves_the_message_to_later_steps_and_background_plugins(
    tmp_path: Path,
) -> None:
    # The Maildir delivery links the spool into new/; a step ordered after it and a
    # background plugin must still read the message, and the spool must go afterwards.
    server = new_server(tmp_path, maildir=tmp_path / "maildir")
    after: list[bytes] = []
    later: list[bytes] = []
    done = threading.Event()

    async def after_maildir(session: Session, envelope: Envelope, message: Message) -> None:
        after.append(await message.read())

    async def in_background(session: Session, envelope: Envelope, message: Message) -> None:
        later.append(await message.read())
        done.set()

    in_background.required = False  # type: ignore[attr-defined]
    server.on_message(after_maildir, after="maildir")
    server.on_message(in_background)
    with serving(server) as port, smtplib.SMTP("127.0.0.1", port) as c:
        assert c.sendmail("a@example.com", ["b@example.com"], BODY) == {}
        assert done.wait(10)
    (stored,) = maildir_messages(tmp_path / "maildir")
    assert after == [stored] and later == [stored]
    assert strip_received(stored) == BODY
    assert wait_for(lambda: not list((tmp_path / "maildir" / "tmp").iterdir()), 5)
    assert server.hooks.names().index("maildir") < server.hooks.names().index(
        "message:" + after_maildir.__qualname__
    )


def test_prepend_header_is_seen_by_later_steps_and_stored(tmp_path: Path) -> None:
    server = new_server(tmp_path, maildir=tmp_path / "maildir")
    seen: list[bytes] = []
    value = "mx.test; spf=pass smtp.mailfrom=a@example.com; " + " ".join(
        f"dkim=pass header.d=example{i}.com" for i in range(6)
    )

    @server.on_message(before="maildir")
    async def annotate(session: Session, envelope: Envelope, message: Message) -> None:
        await message.prepend_header("Authentication-Results", value)
        seen.append(await message.read())

    with serving(server) as port, smtplib.SMTP("127.0.0.1", port) as c:
        assert c.sendmail("a@example.com", ["b@example.com"], BODY) == {}
    (stored,) = maildir_messages(tmp_path / "maildir")
    assert seen == [stored]
    head, _, rest = stored.partition(b"\r\nReceived: ")
    assert head.startswith(b"Authentication-Results: mx.test; spf=pass")
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    unfolded = head.replace(b"\r\n\t", b" ").decode()
    assert unfolded == f"Authentication-Results: {value}"
    assert strip_received(b"Received: " + rest) == BODY
    assert wait_for(lambda: not list((tmp_path / "maildir" / "tmp").iterdir()), 5)


def test_remove_headers_rewrites_the_spool_for_later_steps(tmp_path: Path) -> None:
    server = new_server(tmp_path, maildir=tmp_path / "maildir")
    seen: list[bytes] = []
    removed: list[int] = []
    original = (
        b"X-Drop: one\r\n"
        b"Subject: kept\r\n"
        b"x-drop: two,\r\n"
        b"\tfolded\r\n"
        b"X-Keep: X-Drop: not a field name\r\n"
        b"\r\n"
        b"X-Drop: in the body, not a header\r\n"
    )

    @server.on_message(before="maildir")
    async def clean(session: Session, envelope: Envelope, message: Message) -> None:
        removed.append(await message.remove_headers(lambda name, _: name.lower() == "x-drop"))
        removed.append(await message.remove_headers(lambda name, _: name == "Absent"))
        seen.append(await message.read())

    with serving(server) as port, smtplib.SMTP("127.0.0.1", port) as c:
        assert c.sendmail("a@example.com", ["b@example.com"], original) == {}
    (stored,) = maildir_messages(tmp_path / "maildir")
    assert removed == [2, 0]
    assert seen == [stored]
    assert strip_received(stored) == (
        b"Subject: kept\r\n"
        b"X-Keep: X-Drop: not a field name\r\n"
        b"\r\n"
        b"X-Drop: in the body, not a header\r\n"
    )
    assert wait_for(lambda: not list((tmp_path / "maildir" / "tmp").iterdir()), 5)


def test_remove_headers_sees_names_and_raw_values() -> None:
    from mailgate.hooks.session import _header_fields, _matches

    source = io.BytesIO(b"A: 1\r\nB:  two\r\n three\r\nnot a field\r\nC: 3\r\n")
    fields, end = _header_fields(source)
    assert fields == [b"A: 1\r\n", b"B:  two\r\n three\r\n"] and end == b"not a field\r\n"
    assert source.read() == b"C: 3\r\n"
    seen: list[tuple[str, str]] = []
    for field_bytes in fields:
        _matches(lambda name, value: bool(seen.append((name, value))), field_bytes)
    assert seen == [("A", "1"), ("B", "two\r\n three")]
    message = Message("x", Session("s", "1", 1, "2", 2), Envelope(), 0, None, 0.0)
    with pytest.raises(HookError):
        asyncio.run(message.remove_headers(lambda name, value: True))  # no spool


def test_prepend_header_refuses_bad_names_and_line_breaks() -> None:
    message = Message("x", Session("s", "1", 1, "2", 2), Envelope(), 0, None, 0.0)
    with pytest.raises(HookError):
        asyncio.run(message.prepend_header("X-Test", "a"))  # no spool
    assert fold_header("X-A", "b c") == b"X-A: b c\r\n"


def test_vrfy_stage_answers_vrfy_and_expn(tmp_path: Path) -> None:
    server = new_server(tmp_path)
    seen: list[tuple[str, bool]] = []

    @server.on_vrfy
    def vrfy(session: Session, argument: str, expand: bool) -> Reject | None:
        seen.append((argument, expand))
        return Reject(550, f"<{argument}>: no such user") if argument == "nobody" else None

    with serving(server) as port, smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.verify("root")[0] == 252  # nothing decided: the usual answer
        assert smtp.verify("nobody") == (550, b"5.1.1 <nobody>: no such user")
        smtp.docmd("EXPN", "staff")
    assert seen == [("root", False), ("nobody", False), ("staff", True)]
