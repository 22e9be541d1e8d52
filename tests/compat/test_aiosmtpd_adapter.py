"""mailgate.compat.aiosmtpd: aiosmtpd handler objects run unchanged on a real mailgate server.

The handlers here are written after the examples in aiosmtpd's documentation (a DATA
printer, the example.com recipient filter, sender rules, EHLO/HELO hooks, an
authenticator); aiosmtpd's own stock handlers (Sink, Message, AsyncMessage, Mailbox,
Debugging) run as they come. Clients are smtplib and aiosmtplib over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import io
import json
import logging
import mailbox
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.handlers import AsyncMessage, Debugging, Mailbox, Sink
from aiosmtpd.handlers import Message as MessageHandler
from aiosmtpd.smtp import AuthResult, LoginPassword
from tests.server.harness import CLIServer

from mailgate import Server
from mailgate.compat.aiosmtpd import (
    MISSING,
    HandlerAdapter,
    load_handler,
    parse_status,
    strip_own_received,
)
from mailgate.hooks import HookError
from mailgate.protocol import Reply
from mailgate.protocol.proxy import build_proxy_v1
from mailgate.server.errors import StartupError

from . import handlers

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = (
    b"From: Anne <anne@example.com>\r\n"
    b"To: Bart <bart@example.com>\r\n"
    b"Subject: A test\r\n"
    b"Message-ID: <ant@example.com>\r\n"
    b"\r\n"
    b"Hi Bart, this is Anne.\r\n"
    b".A line that starts with a dot.\r\n"
)


# --- a real server in a background thread ------------------------------------------------------


@contextlib.contextmanager
def serving(tmp_path: Path, *plugins: Any, **settings: Any) -> Iterator[Server]:
    """A mailgate Server on 127.0.0.1 (port 0) with ``plugins``, on its own loop thread."""
    defaults: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "hostname": "mx.test",
        "state_dir": tmp_path / "state",
        "auth_failure_delay": 0,
        "close_timeout": 1,
    }
    server = Server(**{**defaults, **settings})
    for plugin in plugins:
        server.add_plugin(plugin)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        yield server
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def client(server: Server, helo: str = "client.test") -> smtplib.SMTP:
    host, port = server.address
    return smtplib.SMTP(host, port, local_hostname=helo, timeout=10)


def send(server: Server, sender: str, rcpts: list[str], data: bytes = MESSAGE) -> dict[str, Any]:
    with client(server) as smtp:
        return smtp.sendmail(sender, rcpts, data)


# --- (1) a handler with only handle_DATA ---------------------------------------------------------


class Printer:
    """Prints each message, as aiosmtpd's first example does (into a buffer here)."""

    def __init__(self) -> None:
        self.out = io.StringIO()
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        print(f"Message from {envelope.mail_from}", file=self.out)
        print(f"Message for {envelope.rcpt_tos}", file=self.out)
        content = envelope.content
        if isinstance(content, bytes):  # str when the server decodes (decode_data=True)
            content = content.decode("utf8", errors="replace")
        for line in content.splitlines():
            print(f"> {line}".strip(), file=self.out)
        return "250 Message accepted for delivery"


def test_data_only_handler_sees_the_envelope_and_the_content_as_sent(tmp_path: Path) -> None:
    printer = Printer()
    text = Printer()
    with serving(
        tmp_path,
        HandlerAdapter(printer, hostname="mx.test"),
        HandlerAdapter(text, name="as-text", decode_data=True),
    ) as server:
        with client(server) as smtp:
            assert smtp.ehlo()[0] == 250
            assert smtp.mail("anne@example.com", ["BODY=8BITMIME"])[0] == 250
            assert smtp.rcpt("bart@example.com")[0] == 250
            assert smtp.rcpt("cate@example.com")[0] == 250
            code, reply = smtp.data(MESSAGE)
            # 2xx from handle_DATA lets the chain go on; the reply is mailgate's.
            assert code == 250 and reply.startswith(b"2.0.0 Message accepted as ")
            # A second transaction on the same connection starts a fresh envelope.
            assert smtp.sendmail("<>", ["dave@example.com"], MESSAGE) == {}
            utf8 = "Subject: Grüße\r\n\r\nGrüße aus Köln\r\n".encode()
            options = ["SMTPUTF8", "BODY=8BITMIME"]
            assert smtp.sendmail("jörg@example.com", ["bart@example.com"], utf8, options) == {}

    first, second, third = printer.envelopes
    assert first.mail_from == "anne@example.com"
    assert first.mail_options == ["BODY=8BITMIME"]
    assert first.rcpt_tos == ["bart@example.com", "cate@example.com"]
    assert first.rcpt_options == []
    assert first.smtp_utf8 is False
    # aiosmtpd's content: as the client meant it (smtplib dot-stuffed ".A line", mailgate
    # unstuffed it), without the Received header mailgate spools first.
    assert first.content == MESSAGE
    assert first.original_content == first.content
    assert (second.mail_from, second.rcpt_tos) == ("<>", ["dave@example.com"])
    assert (third.mail_from, third.smtp_utf8) == ("jörg@example.com", True)
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(third.mail_options)  # and smtplib's SIZE=
    assert "Message for ['bart@example.com', 'cate@example.com']" in printer.out.getvalue()
    assert "> Hi Bart, this is Anne." in printer.out.getvalue()
    # decode_data=True: content is str, original_content stays bytes.
    decoded = text.envelopes[0]
    assert isinstance(decoded.content, str) and decoded.content.startswith("From: Anne")
    assert decoded.original_content == first.content
    assert text.envelopes[2].content.endswith("Grüße aus Köln\r\n")


def test_strip_received_false_shows_the_message_as_mailgate_stores_it(tmp_path: Path) -> None:
    printer = Printer()
    with serving(tmp_path, HandlerAdapter(printer, strip_received=False)) as server:
        send(server, "anne@example.com", ["bart@example.com"])
    content = printer.envelopes[0].content
    assert content.startswith(b"Received: from client.test")
    assert content.endswith(MESSAGE)


def test_strip_own_received_removes_only_mailgates_header_for_this_message() -> None:
    ours = b"Received: from c.test (c.test [127.0.0.1])\r\n\tby mx.test (mailgate) with ESMTP id ABC123;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
    body = b"Received: by relay.test; Sun, 31 Dec 2023\r\nSubject: x\r\n\r\nbody\r\n"
    assert strip_own_received(ours + body, "ABC123") == body
    assert strip_own_received(ours + body, "ABC1234") == ours + body  # another message's
    assert strip_own_received(body, "ABC123") == body  # the client's own trace header stays


# --- (2) the recipient filter from aiosmtpd's Controller documentation -------------------------


class ExampleHandler:
    """Accepts mail for example.com only; the handler builds envelope.rcpt_tos itself."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, list[str]]] = []
        self.resets = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if not address.endswith("@example.com"):
            return "550 not relaying to that domain"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.delivered.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.resets += 1
        assert envelope.rcpt_tos == []  # aiosmtpd resets the envelope before the hook
        return "250 OK"


class ForgetfulRecipients:
    """Says 250 to every RCPT but never appends: aiosmtpd then refuses DATA with 503."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        return "250 OK"


def test_recipient_filter_rejects_other_domains_and_builds_the_envelope(tmp_path: Path) -> None:
    handler = ExampleHandler()
    with serving(tmp_path, HandlerAdapter(handler)) as server:
        refused = send(server, "a@example.com", ["b@example.com", "c@example.net"])
        assert refused == {"c@example.net": (550, b"5.7.1 not relaying to that domain")}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send(server, "a@example.com", ["d@example.org"])
        with client(server) as smtp:
            smtp.ehlo()
            smtp.mail("a@example.com")
            code, reply = smtp.rcpt("e@example.com")
            assert (code, reply) == (250, b"2.1.5 OK")  # the handler's text, as aiosmtpd sends it
            assert smtp.rset()[0] == 250
            assert smtp.sendmail("a@example.com", ["f@example.com"], MESSAGE) == {}
    # e@example.com was reset away: the handler's envelope had only f for that message.
    assert handler.delivered == [
        ("a@example.com", ["b@example.com"]),
        ("a@example.com", ["f@example.com"]),
    ]
    assert handler.resets >= 1


def test_a_recipient_accepted_but_not_appended_leaves_data_without_recipients(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, HandlerAdapter(ForgetfulRecipients())) as server:
        with client(server) as smtp:
            smtp.ehlo()
            smtp.mail("a@example.com")
            assert smtp.rcpt("b@example.com")[0] == 250
            assert smtp.docmd("DATA") == (503, b"5.5.1 Error: need RCPT command")


# --- (3) sender rules in handle_MAIL ----------------------------------------------------------------


class SenderRules:
    """Refuses one sender; records others in lower case (the handler owns mail_from)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[str]]] = []

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if address.lower().startswith("spammer@"):
            return "553 5.7.1 Sender not allowed"
        if address == "forgetful@example.com":
            return "250 OK"  # never sets mail_from: aiosmtpd then refuses RCPT
        envelope.mail_from = address.lower()
        envelope.mail_options.extend(mail_options)
        return "250 Sender OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.seen.append((envelope.mail_from, envelope.mail_options))
        return "250 OK"


def test_handle_mail_refuses_senders_and_sets_mail_from_itself(tmp_path: Path) -> None:
    handler = SenderRules()
    mailgate_saw: list[str] = []

    class MailgateView:
        name = "view"

        async def on_message(self, session: Any, envelope: Any, message: Any) -> None:
            mailgate_saw.append(envelope.sender)

    with serving(tmp_path, HandlerAdapter(handler), MailgateView()) as server:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            send(server, "spammer@bad.test", ["b@example.com"])
        assert refused.value.smtp_code == 553
        assert refused.value.smtp_error == b"5.7.1 Sender not allowed"
        assert send(server, "Anne.Person@Example.COM", ["b@example.com"]) == {}
        with client(server) as smtp:
            smtp.ehlo()
            assert smtp.mail("forgetful@example.com") == (250, b"2.1.0 OK")
            assert smtp.rcpt("b@example.com") == (503, b"5.5.1 Error: need MAIL command")
    [(mail_from, options)] = handler.seen
    assert mail_from == "anne.person@example.com"
    assert any(option.startswith("SIZE=") for option in options)  # smtplib sends SIZE=
    # mailgate's own (read-only) envelope keeps what the client said.
    assert mailgate_saw == ["Anne.Person@Example.COM"]


# --- (4) HELO and EHLO hooks ---------------------------------------------------------------------


class Greeter:
    """An EHLO hook that turns one client away and edits the response list."""

    def __init__(self) -> None:
        self.responses: list[list[str]] = []

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if hostname == "bad.client":
            return ["550 5.7.1 Go away"]
        session.host_name = hostname
        self.responses.append(list(responses))
        responses.insert(-1, "250-XFOO")
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.responses.append([f"data from {session.host_name}"])
        return "250 OK"


class HeloOnly:
    """A HELO hook with a custom text; it forgets session.host_name for one client."""

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        if hostname != "sloppy.client":
            session.host_name = hostname
        return f"250 Hi {hostname}, I am {server.hostname}"


def test_ehlo_hook_refusals_count_and_capabilities_stay_mailgates(tmp_path: Path) -> None:
    greeter = Greeter()
    with serving(tmp_path, HandlerAdapter(greeter, hostname="mx.test")) as server:
        with client(server, helo="bad.client") as smtp:
            assert smtp.ehlo() == (550, b"5.7.1 Go away")
        with client(server) as smtp:
            assert smtp.ehlo()[0] == 250
            assert smtp.has_extn("pipelining") and smtp.has_extn("size")
            assert not smtp.has_extn("xfoo")  # not implemented by mailgate: not advertised
            assert smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE) == {}
    assert greeter.responses == [["250-mx.test", "250 HELP"], ["data from client.test"]]


class OldStyleEhlo:
    """aiosmtpd's deprecated four-argument handle_EHLO: one status string back."""

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        if hostname.endswith(".invalid"):
            return "554 5.7.1 Not from there"
        session.host_name = hostname
        return "250 HELP"


def test_helo_hook_must_set_host_name_or_mail_is_refused(tmp_path: Path) -> None:
    with serving(tmp_path, HandlerAdapter(HeloOnly(), hostname="mx.test")) as server:
        with client(server) as smtp:
            assert smtp.helo()[0] == 250
            assert smtp.mail("a@example.com")[0] == 250
        with client(server, helo="sloppy.client") as smtp:
            assert smtp.helo()[0] == 250
            assert smtp.mail("a@example.com") == (503, b"5.5.1 Error: send HELO first")
    with serving(tmp_path, HandlerAdapter(OldStyleEhlo())) as server:
        with client(server, helo="x.invalid") as smtp:
            assert smtp.ehlo() == (554, b"5.7.1 Not from there")
        assert send(server, "a@example.com", ["b@example.com"]) == {}


class BothGreetings:
    """Separate HELO and EHLO hooks, each with its own greeting line."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        self.calls.append(f"HELO {hostname}")
        session.host_name = hostname
        return f"250 Plain hello, {hostname}"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.calls.append(f"EHLO {hostname} extended={session.extended_smtp}")
        session.host_name = hostname
        return [f"250-Extended hello, {hostname}", *responses[1:]]


def test_helo_and_ehlo_hooks_each_run_for_their_own_verb(tmp_path: Path) -> None:
    handler = BothGreetings()
    with serving(tmp_path, HandlerAdapter(handler, hostname="mx.test")) as server:
        with client(server, helo="old.client") as smtp:
            assert smtp.helo() == (250, b"Plain hello, old.client")
        with client(server, helo="new.client") as smtp:
            code, text = smtp.ehlo()
            assert code == 250
            assert text.splitlines()[0] == b"Extended hello, new.client"
            assert smtp.has_extn("pipelining")  # the greeting line changed, not the offer
    assert handler.calls == ["HELO old.client", "EHLO new.client extended=True"]


# --- (5) AUTH: an authenticator, auth_* methods, handle_AUTH -------------------------------------


class Credentials:
    """aiosmtpd's authenticator callable: a fixed user list."""

    users = {b"anne": b"s3cret"}

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        self.calls.append(mechanism)
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        if self.users.get(auth_data.login) == auth_data.password:
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)


class WhoSent:
    """Records who sent each message, from aiosmtpd's session attributes."""

    def __init__(self) -> None:
        self.sessions: list[tuple[Any, Any, Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sessions.append((session.authenticated, session.auth_data, session.login_data))
        return "250 OK"


class OwnLogin:
    """An auth_LOGIN method of its own that asks the client twice, as aiosmtpd's does
    (and a third time for one user, more than any client sends)."""

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        user = await server.challenge_auth("User Name\x00")
        password = await server.challenge_auth("Password\x00")
        if user == b"greedy":
            await server.challenge_auth("And your PIN?")
        return AuthResult(
            success=(user, password) == (b"bart", b"pw"), handled=False, auth_data=user
        )


class PushingAuth:
    """handle_AUTH that answers through server.push() and returns None."""

    async def handle_AUTH(self, server: Any, session: Any, envelope: Any, args: list[str]) -> None:
        import base64

        password = base64.b64decode(args[1]).split(b"\0")[2]
        if password == b"open sesame":
            session.authenticated = True
            await server.push("235 2.7.0 Come in")
        else:
            await server.push("535 5.7.8 No")


async def _auth(server: Server, mechanism: str, user: str, password: str) -> tuple[int, str]:
    host, port = server.address
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
    await smtp.connect()
    try:
        await smtp.ehlo()
        method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        try:
            response = await method(user, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            return exc.code, exc.message
        await smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        return response.code, response.message
    finally:
        smtp.close()


def test_authenticator_checks_plain_and_login(tmp_path: Path) -> None:
    credentials = Credentials()
    handler = WhoSent()
    adapter = HandlerAdapter(handler, authenticator=credentials)
    with serving(tmp_path, adapter, allow_insecure_auth=True) as server:
        assert asyncio.run(_auth(server, "PLAIN", "anne", "s3cret")) == (
            235,
            "2.7.0 Authentication successful",
        )
        assert asyncio.run(_auth(server, "LOGIN", "anne", "s3cret"))[0] == 235
        assert asyncio.run(_auth(server, "PLAIN", "anne", "wrong")) == (
            535,
            "5.7.8 Authentication credentials invalid",
        )
        assert asyncio.run(_auth(server, "LOGIN", "nobody", "s3cret"))[0] == 535
    assert credentials.calls == ["PLAIN", "LOGIN", "PLAIN", "LOGIN"]
    assert handler.sessions == [
        (True, LoginPassword(b"anne", b"s3cret"), b"anne"),
        (True, LoginPassword(b"anne", b"s3cret"), b"anne"),
    ]


def test_handler_auth_methods_and_handle_auth_get_the_exchange_replayed(tmp_path: Path) -> None:
    with serving(tmp_path, HandlerAdapter(OwnLogin()), allow_insecure_auth=True) as server:
        assert asyncio.run(_auth(server, "LOGIN", "bart", "pw"))[0] == 235
        assert asyncio.run(_auth(server, "LOGIN", "bart", "nope"))[0] == 535
        # mailgate ran the SASL exchange already: there is nothing more to ask the client.
        assert asyncio.run(_auth(server, "LOGIN", "greedy", "pw")) == (
            454,
            "4.7.0 Temporary authentication failure",
        )
    legacy = HandlerAdapter(
        WhoSent(), auth_callback=lambda mechanism, login, password: password == b"pw"
    )
    with serving(tmp_path, legacy, allow_insecure_auth=True) as server:
        assert asyncio.run(_auth(server, "LOGIN", "dave", "pw"))[0] == 235
        assert asyncio.run(_auth(server, "PLAIN", "dave", "nope"))[0] == 535
    with serving(tmp_path, HandlerAdapter(PushingAuth()), allow_insecure_auth=True) as server:
        assert asyncio.run(_auth(server, "PLAIN", "cate", "open sesame")) == (235, "2.7.0 Come in")
        assert asyncio.run(_auth(server, "PLAIN", "cate", "closed")) == (535, "5.7.8 No")


def test_auth_is_offered_only_when_something_can_say_yes(tmp_path: Path) -> None:
    assert HandlerAdapter(Printer()).on_auth is None
    assert HandlerAdapter(OwnLogin()).auth_mechanisms == ("LOGIN",)
    assert HandlerAdapter(Printer(), auth_callback=lambda m, u, p: True).auth_mechanisms == (
        "PLAIN",
        "LOGIN",
    )
    with serving(tmp_path, HandlerAdapter(Printer()), allow_insecure_auth=True) as server:
        with client(server) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("auth")


# --- (6) aiosmtpd's own handlers, unchanged ----------------------------------------------------------


class Keep(MessageHandler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[email.message.Message] = []

    def handle_message(self, message: email.message.Message) -> None:
        self.messages.append(message)


class KeepAsync(AsyncMessage):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.subjects: list[str] = []

    async def handle_message(self, message: email.message.Message) -> None:
        self.subjects.append(str(message["Subject"]))


class PreHooks:
    """aiosmtpd's pre-1.0 API: process_message(peer, mail_from, rcpt_tos, data)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str, list[str], bytes]] = []

    def process_message(self, peer: Any, mail_from: str, rcpt_tos: list[str], data: bytes) -> None:
        self.calls.append((peer, mail_from, rcpt_tos, data))


def test_aiosmtpd_stock_handlers_run_unchanged_side_by_side(tmp_path: Path) -> None:
    unused_loop = asyncio.new_event_loop()  # AsyncMessage wants one; handle_DATA never uses it
    keep, keep_async = Keep(), KeepAsync(unused_loop)
    printed = io.StringIO()
    box = tmp_path / "Maildir"
    adapters = [
        HandlerAdapter(Sink(), name="sink"),
        HandlerAdapter(keep, name="message"),
        HandlerAdapter(keep_async, name="async-message"),
        HandlerAdapter(Mailbox(box), name="mailbox"),
        HandlerAdapter(Debugging(printed), name="debugging"),
        HandlerAdapter(legacy := PreHooks(), name="process-message"),
    ]
    try:
        with serving(tmp_path, *adapters) as server:
            assert send(server, "anne@example.com", ["bart@example.com", "cate@example.com"]) == {}
    finally:
        unused_loop.close()
    [message] = keep.messages
    assert message["Subject"] == "A test"
    assert message["X-MailFrom"] == "anne@example.com"
    assert message["X-RcptTo"] == "bart@example.com, cate@example.com"
    assert message["X-Peer"].startswith("('127.0.0.1', ")
    assert message["Received"] is None  # mailgate's trace header was not handed over
    assert keep_async.subjects == ["A test"]
    [stored] = list(mailbox.Maildir(box))
    assert stored["Message-ID"] == "<ant@example.com>"
    assert "---------- MESSAGE FOLLOWS ----------" in printed.getvalue()
    assert "Hi Bart, this is Anne." in printed.getvalue()
    [(peer, mail_from, rcpt_tos, data)] = legacy.calls
    assert (peer[0], mail_from, rcpt_tos, data) == (
        "127.0.0.1",
        "anne@example.com",
        ["bart@example.com", "cate@example.com"],
        MESSAGE,
    )


# --- (7) by name: the aiosmtpd_handler setting and mailgate serve --aiosmtpd-handler ---------------


def test_setting_loads_a_handler_class_by_name(tmp_path: Path) -> None:
    with serving(tmp_path, aiosmtpd_handler="tests.compat.handlers:Collector") as server:
        assert send(server, "a@example.com", ["b@example.com"]) == {}
        [adapter] = [p for p in server.hooks.plugins() if isinstance(p, HandlerAdapter)]
    assert isinstance(adapter.handler, handlers.Collector)
    [record] = adapter.handler.messages
    assert record["rcpt_tos"] == ["b@example.com"]
    assert record["content"] == MESSAGE
    assert record["host_name"] == "client.test"


def test_bad_handler_setting_is_a_one_line_startup_error(tmp_path: Path) -> None:
    server = Server(
        listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        aiosmtpd_handler="tests.compat.handlers:Nope",
    )
    with pytest.raises(StartupError) as failure:
        asyncio.run(server.start())
    assert str(failure.value) == (
        "aiosmtpd handler 'tests.compat.handlers:Nope': tests.compat.handlers has no attribute 'Nope'"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_mailgate_serve_runs_a_handler_named_on_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = [
        "--listen", f"127.0.0.1:{free_port()}",
        "--hostname", "mx.test",
        "--maildir", str(tmp_path / "maildir"),
        "--state-dir", str(tmp_path / "state"),
        "--aiosmtpd-handler", f"tests.compat.handlers:LocalOnlyToDirectory {out}",
    ]  # fmt: skip
    server = CLIServer(args, ROOT).start()
    try:
        assert server.ports, server.text()
        with smtplib.SMTP(
            "127.0.0.1", server.port, local_hostname="client.test", timeout=10
        ) as smtp:
            refused = smtp.sendmail("a@example.com", ["b@example.com", "x@example.net"], MESSAGE)
        assert refused == {"x@example.net": (550, b"5.7.1 not relaying to that domain")}
        assert server.stop() == 0
    finally:
        server.kill()
    record = json.loads((out / "1.json").read_text())
    assert record["rcpt_tos"] == ["b@example.com"]
    assert record["content"].startswith("From: Anne")
    # 2xx from handle_DATA lets the chain go on: the Maildir delivery stored it as well.
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 1


def test_mailgate_serve_reports_a_bad_handler_in_one_line(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "mailgate", "serve",
        "--listen", f"127.0.0.1:{free_port()}",
        "--state-dir", str(tmp_path / "state"),
        "--maildir", str(tmp_path / "maildir"),
        "--aiosmtpd-handler", "tests.compat.handlers:NeedsArguments",
    ]  # fmt: skip
    proc = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "aiosmtpd handler" in line]
    assert errors == [
        "mailgate: cannot start: aiosmtpd handler 'tests.compat.handlers:NeedsArguments': "
        "cannot create NeedsArguments: TypeError: NeedsArguments.__init__() missing 1 "
        "required positional argument: 'where'"
    ]
    assert "Traceback" not in proc.stderr


def test_load_handler_names_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_handler("tests.compat.handlers:shared_collector") is handlers.shared_collector
    assert isinstance(
        load_handler("tests.compat.handlers.Collector"), handlers.Collector
    )  # aiosmtpd's -c form
    mailbox_handler = load_handler(
        f"aiosmtpd.handlers:Mailbox {tmp_path / 'box'}"
    )  # from_cli(parser, path)
    assert isinstance(mailbox_handler, Mailbox)
    cases = {
        "": "aiosmtpd handler: empty name; expected module:Class",
        "nomodule": "aiosmtpd handler 'nomodule' is not module:Class (e.g. myapp.handlers:Handler)",
        "tests.compat.missing_module:X": "no module named 'tests.compat.missing_module'",
        "tests.compat.handlers:not_a_handler": "is a function, not a handler class or object",
        "aiosmtpd.handlers:Mailbox": "aiosmtpd handler 'aiosmtpd.handlers:Mailbox': The directory for the maildir is required",
        "tests.compat.handlers:Collector extra": "Collector takes no arguments (no from_cli)",
        "tests.compat.handlers:shared_collector x": "arguments are for a class, not an object",
    }
    for spec, expected in cases.items():
        with pytest.raises(HookError) as failure:
            load_handler(spec)
        message = str(failure.value)
        assert expected in message and "\n" not in message, (spec, message)

    # A module in the current directory is found even when it is not on sys.path.
    (tmp_path / "cwd_handlers.py").write_text(
        "class Here:\n    async def handle_DATA(self, *a):\n        return '250 OK'\n"
    )
    (tmp_path / "broken_handlers.py").write_text("import no_such_dependency_here\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert type(load_handler("cwd_handlers:Here")).__name__ == "Here"
        with pytest.raises(
            HookError,
            match="importing broken_handlers failed: ModuleNotFoundError: No module named 'no_such_dependency_here'",
        ):
            load_handler("broken_handlers:X")
    finally:
        sys.modules.pop("cwd_handlers", None)
        sys.modules.pop("broken_handlers", None)


# --- errors, reply strings, PROXY, STARTTLS -------------------------------------------------------


class Troubled:
    """Raises in handle_RCPT for one address; answers nonsense for another."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> Any:
        if address.startswith("boom@"):
            raise RuntimeError("database is down")
        if address.startswith("nonsense@"):
            return "all good"
        if address.startswith("nothing@"):
            return None
        envelope.rcpt_tos.append(address)
        return "250-first line\r\n250 2.1.5 second line"


class Apologetic(Troubled):
    async def handle_exception(self, error: Exception) -> str | None:
        if "database" in str(error):
            return "421 4.3.0 Try later, we are fixing it"
        return None


def test_handler_exceptions_and_bad_replies_become_451(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with serving(tmp_path, HandlerAdapter(Troubled())) as server:
        with client(server) as smtp:
            smtp.ehlo()
            smtp.mail("a@example.com")
            # aiosmtpd answers 500 with the exception text; mailgate's rule is 451 4.3.0.
            assert smtp.rcpt("boom@example.com") == (
                451,
                b"4.3.0 Local error in processing, try again later",
            )
            assert smtp.rcpt("nonsense@example.com")[0] == 451
            assert smtp.rcpt("nothing@example.com")[0] == 451
            assert smtp.rcpt("fine@example.com") == (250, b"2.1.5 first line\n2.1.5 second line")
    assert "not an SMTP reply such as '250 OK'" in caplog.text
    assert "database is down" in caplog.text  # logged with the traceback, not sent
    with serving(tmp_path, HandlerAdapter(Apologetic())) as server:
        with client(server) as smtp:
            smtp.ehlo()
            smtp.mail("a@example.com")
            assert smtp.rcpt("boom@example.com") == (421, b"4.3.0 Try later, we are fixing it")


def test_parse_status_reads_aiosmtpd_reply_strings() -> None:
    assert parse_status("250 OK", "rcpt") == Reply(250, "2.1.5", ("OK",))
    assert parse_status("550 5.1.1 No such user", "rcpt") == Reply(550, "5.1.1", ("No such user",))
    assert parse_status(b"554 Message refused", "message") == Reply(
        554, "5.7.1", ("Message refused",)
    )
    assert parse_status("250-a\r\n250 b\r\n", "mail") == Reply(250, "2.1.0", ("a", "b"))
    assert parse_status("250", "helo") == Reply(250, "2.0.0", ("",))
    for bad in ("OK", "250OK", "999 what", "250-a\r\n550 b", "", "354 go ahead"):
        assert parse_status(bad, "rcpt") is None, bad
    assert MISSING is __import__("aiosmtpd.smtp").smtp.MISSING


class ProxyGate:
    """handle_PROXY: one source address is turned away."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any, Any]] = []

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> bool:
        self.seen.append(
            (proxy_data.src_addr, proxy_data.src_port, session.proxy_data is proxy_data)
        )
        return proxy_data.src_addr != IPv4Address("192.0.2.66")


def _greeting_after_proxy(server: Server, source: str) -> bytes:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(build_proxy_v1(source, 40000, "127.0.0.1", 25))
        reply = sock.makefile("rb").readline()
        sock.sendall(b"QUIT\r\n")
        return reply


def test_handle_proxy_decides_on_proxied_connections(tmp_path: Path) -> None:
    gate = ProxyGate()
    with serving(tmp_path, HandlerAdapter(gate), proxy_protocol="127.0.0.1/32") as server:
        assert _greeting_after_proxy(server, "192.0.2.10").startswith(b"220 ")
        assert _greeting_after_proxy(server, "192.0.2.66").startswith(b"421 ")
    assert gate.seen == [
        (IPv4Address("192.0.2.10"), 40000, True),
        (IPv4Address("192.0.2.66"), 40000, True),
    ]


class TLSWatcher:
    """handle_STARTTLS (called synchronously by aiosmtpd) sees session.ssl."""

    def __init__(self) -> None:
        self.allow = True
        self.ciphers: list[Any] = []

    def handle_STARTTLS(self, server: Any, session: Any, envelope: Any) -> bool:
        self.ciphers.append(session.ssl["cipher"])
        return self.allow


def test_handle_starttls_can_refuse_the_session_after_the_handshake(tmp_path: Path) -> None:
    watcher = TLSWatcher()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with serving(tmp_path, HandlerAdapter(watcher)) as server:
        with client(server) as smtp:
            smtp.starttls(context=context)
            assert smtp.ehlo()[0] == 250
        watcher.allow = False
        with client(server) as smtp:
            smtp.starttls(context=context)
            with pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.ehlo()
                smtp.noop()
    assert len(watcher.ciphers) == 2 and all(c[0] for c in watcher.ciphers)
