"""mailgate.testing: the helpers applications use in their own tests, driven the way an
application would drive them (real servers on 127.0.0.1, smtplib and aiosmtplib)."""

from __future__ import annotations

import asyncio
import email.message
import smtplib
import socket
import threading
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailgate import Accept, Reject, Server
from mailgate.testing import (
    Captured,
    RunningServer,
    async_running_server,
    running_server,
)

BODY = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: Hello there\r\n\r\nBody text\r\n"


def test_sync_server_captures_envelope_and_content() -> None:
    with running_server() as srv:
        assert srv.host == "127.0.0.1" and srv.port > 0
        with smtplib.SMTP(*srv.address) as client:
            client.sendmail("a@example.com", ["b@example.com", "c@example.org"], BODY)
            client.sendmail("", ["bounce@example.com"], BODY)
        first, second = srv.messages
    assert first.mail_from == "a@example.com" and first.sender == "a@example.com"
    assert first.rcpt_tos == ["b@example.com", "c@example.org"]
    assert first.rcpt_tos[1].domain == "example.org"
    assert first.content.endswith(BODY)
    assert first.content.startswith(b"Received: ")
    assert first.as_email()["Subject"] == "Hello there"
    assert first.as_email().get_content().strip() == "Body text"
    assert first.session.peer_host == "127.0.0.1"
    assert first.envelope.rcpt_tos == tuple(first.rcpt_tos)
    assert second.mail_from == "" and not second.mail_from
    assert first.id != second.id


def test_no_received_header_gives_the_bytes_as_sent() -> None:
    with running_server(no_received_header=True) as srv:
        with smtplib.SMTP(*srv.address) as client:
            client.sendmail("a@example.com", ["b@example.com"], BODY)
    assert srv.messages[0].content == BODY


def test_capture_works_beside_a_maildir_delivery(tmp_path: Path) -> None:
    # Maildir delivery moves the spooled file into new/: the capture must not depend on it.
    with running_server(maildir=tmp_path / "maildir") as srv:
        with smtplib.SMTP(*srv.address) as client:
            client.sendmail("a@example.com", ["b@example.com"], BODY)
        assert srv.messages[0].content.endswith(BODY)
    (stored,) = (tmp_path / "maildir" / "new").iterdir()
    assert stored.read_bytes() == srv.messages[0].content


def test_configure_registers_hooks_and_refusals_are_not_captured() -> None:
    def configure(server: Server) -> None:
        @server.on_rcpt
        def local_only(session: Any, envelope: Any, address: Any) -> None:
            if address.domain != "example.com":
                raise Reject(550, "no such domain here")

        @server.on_message
        async def no_spam(session: Any, envelope: Any, message: Any) -> None:
            if b"spam" in await message.read():
                raise Reject(554, "no spam")

    with running_server(configure=configure) as srv:
        with smtplib.SMTP(*srv.address) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail("a@example.com", ["x@elsewhere.test"], BODY)
            assert refused.value.recipients["x@elsewhere.test"][0] == 550
            with pytest.raises(smtplib.SMTPDataError) as data_error:
                client.sendmail("a@example.com", ["b@example.com"], BODY + b"spam\r\n")
            assert data_error.value.smtp_code == 554
            client.sendmail("a@example.com", ["b@example.com"], BODY)
        assert [m.rcpt_tos for m in srv.messages] == [["b@example.com"]]


def test_a_failing_hook_is_a_451_and_nothing_is_captured() -> None:
    def configure(server: Server) -> None:
        server.on_message(lambda session, envelope, message: 1 / 0)

    with running_server(configure=configure) as srv:
        with smtplib.SMTP(*srv.address) as client:
            with pytest.raises(smtplib.SMTPDataError) as error:
                client.sendmail("a@example.com", ["b@example.com"], BODY)
        assert error.value.smtp_code == 451
        assert list(srv.messages) == []


def test_hooks_registered_on_the_server_before_start() -> None:
    srv = RunningServer(hostname="mx.test")
    seen: list[str] = []
    srv.server.on_helo(lambda session, hostname: seen.append(hostname))
    srv.server.add_plugin(_Greeter(), before="mailgate.testing")
    with srv:
        with smtplib.SMTP(*srv.address, local_hostname="client.test") as client:
            code, text = client.ehlo()
            assert code == 250 and text.startswith(b"mx.test")
            code, text = client.mail("a@example.com")
            assert (code, text) == (250, b"2.1.0 Welcome, sender")
    assert seen == ["client.test"]


class _Greeter:
    name = "greeter"

    def on_mail(self, session: Any, envelope: Any, address: Any) -> Accept:
        return Accept(text="Welcome, sender")


def test_auth_and_starttls_with_test_settings() -> None:
    # smtplib's login() tries every mechanism offered (CRAM-MD5, PLAIN, LOGIN): one
    # wrong password costs three failures, the default limit.
    with running_server(auth_users=["alice:secret"], max_auth_failures=5) as srv:
        with smtplib.SMTP(*srv.address) as client:
            client.starttls()  # the development certificate; smtplib does not verify it
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("alice", "wrong")  # answered at once: auth_failure_delay=0
            client.login("alice", "secret")
            client.sendmail("alice@example.com", ["b@example.com"], BODY)
    (message,) = srv.messages
    assert message.session.user == "alice"
    assert message.session.tls is not None


def _per_recipient(session: Any, envelope: Any, message: Any) -> Any:
    first = envelope.rcpt_tos[0].local
    if first == "short":
        return [None]  # one answer for two recipients: the server's error, 451 for all
    if first == "all":
        return [None, True]
    return {"full@example.com": Reject(552, "mailbox full", enhanced="5.2.2")}


def test_lmtp_captures_only_the_recipients_delivered_to() -> None:
    def configure(server: Server) -> None:
        server.on_message(_per_recipient)

    with running_server(lmtp=True, configure=configure) as srv:
        replies = _lmtp_send(srv.address, ["ok@example.com", "full@example.com"])
        assert [r[:3] for r in replies] == ["250", "552"]
        replies = _lmtp_send(srv.address, ["short@example.com", "b@example.com"])
        assert [r[:3] for r in replies] == ["451", "451"]
        replies = _lmtp_send(srv.address, ["all@example.com", "b@example.com"])
        assert [r[:3] for r in replies] == ["250", "250"]
        assert [m.rcpt_tos for m in srv.messages] == [
            ["ok@example.com"],
            ["all@example.com", "b@example.com"],
        ]


def test_per_recipient_answers_over_smtp_are_not_captured() -> None:
    def configure(server: Server) -> None:
        server.on_message(_per_recipient)

    with running_server(configure=configure) as srv:
        with smtplib.SMTP(*srv.address) as client:
            with pytest.raises(smtplib.SMTPDataError) as error:
                client.sendmail("a@example.com", ["all@example.com"], BODY)
        assert error.value.smtp_code == 451
        assert list(srv.messages) == []


def _lmtp_send(address: tuple[str, int], rcpts: list[str]) -> list[str]:
    """One LMTP transaction over a raw socket (smtplib reads one reply after DATA only);
    returns the replies to the end of data, one per recipient."""
    with socket.create_connection(address, timeout=5) as sock:
        reader = sock.makefile("rb")

        def reply() -> str:
            while True:
                line = reader.readline().decode()
                assert line, "connection closed"
                if line[3:4] != "-":
                    return line.strip()

        reply()
        commands = ["LHLO client.test", "MAIL FROM:<a@example.com>"]
        commands += [f"RCPT TO:<{r}>" for r in rcpts] + ["DATA"]
        for command in commands:
            sock.sendall(command.encode() + b"\r\n")
            assert reply()[0] in "23"
        sock.sendall(BODY + b".\r\n")
        answers = [reply() for _ in rcpts]
        sock.sendall(b"QUIT\r\n")
        return answers


def test_async_server_in_the_current_loop() -> None:
    message = email.message.EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.com"
    message["Subject"] = "via aiosmtplib"
    message.set_content("Hello\n")
    seen_loops: list[asyncio.AbstractEventLoop] = []

    def configure(server: Server) -> None:
        server.on_connect(lambda session: seen_loops.append(asyncio.get_running_loop()))

    async def main() -> None:
        async with async_running_server(configure=configure) as srv:
            # aiosmtplib upgrades to TLS when offered and checks the certificate.
            await aiosmtplib.send(
                message, hostname=srv.host, port=srv.port, tls_context=srv.client_tls_context()
            )
            (captured,) = await srv.messages.wait_async(1, timeout=5)
            assert captured.as_email()["Subject"] == "via aiosmtplib"
            assert seen_loops == [asyncio.get_running_loop()]

    asyncio.run(main())


def test_wait_for_messages_sent_from_another_thread() -> None:
    with running_server() as srv:

        def send() -> None:
            with smtplib.SMTP(*srv.address) as client:
                client.sendmail("a@example.com", ["b@example.com"], BODY)

        sender = threading.Thread(target=send)
        sender.start()
        (message,) = srv.messages.wait(1, timeout=5)
        sender.join(5)
        assert message.rcpt_tos == ["b@example.com"]
        with pytest.raises(TimeoutError, match="1 message"):
            srv.messages.wait(2, timeout=0.05)


def test_wait_async_times_out() -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError, match="0 message"):
            await Captured().wait_async(1, timeout=0.05)

    asyncio.run(main())


def test_temporary_state_is_removed_and_stop_is_idempotent() -> None:
    srv = RunningServer().start()
    state_dir = srv.server.options.state_dir
    assert (state_dir / "dev-cert.pem").exists()
    srv.stop()
    srv.stop()
    assert not state_dir.exists()
    with pytest.raises(RuntimeError, match="already started"):
        srv.start()


def test_a_given_state_dir_is_kept(tmp_path: Path) -> None:
    with running_server(state_dir=tmp_path / "state") as srv:
        assert srv.server.options.state_dir == tmp_path / "state"
    assert (tmp_path / "state" / "dev-cert.pem").exists()


def test_start_failures_reach_the_test() -> None:
    with pytest.raises(ValueError, match="max_sise"):
        RunningServer(max_sise=10)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = RunningServer(listen=f"127.0.0.1:{port}")
        state_dir = srv.server.options.state_dir
        with pytest.raises(Exception, match="cannot listen"):
            srv.start()
    assert not state_dir.exists()


# --- the pytest fixture, from the plugin mailgate registers through its entry point ----------


def test_fixture_gives_a_running_server(mailgate_server: RunningServer) -> None:
    with smtplib.SMTP(*mailgate_server.address) as client:
        client.sendmail("a@example.com", ["b@example.com"], BODY)
    assert mailgate_server.messages[0].as_email()["Subject"] == "Hello there"


class TestFixtureSettings:
    """Overriding ``mailgate_settings`` changes the fixture's server (here for one class)."""

    @pytest.fixture
    def mailgate_settings(self) -> dict[str, Any]:
        def configure(server: Server) -> None:
            server.on_rcpt(lambda session, envelope, address: address.local != "nobody")

        return {"hostname": "fixture.test", "configure": configure}

    def test_settings_and_hooks_apply(self, mailgate_server: RunningServer) -> None:
        with smtplib.SMTP(*mailgate_server.address) as client:
            assert client.ehlo()[1].startswith(b"fixture.test")
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("a@example.com", ["nobody@example.com"], BODY)
        assert list(mailgate_server.messages) == []


def test_the_fixture_comes_from_the_entry_point_plugin(pytestconfig: pytest.Config) -> None:
    import mailgate.testing

    assert pytestconfig.pluginmanager.is_registered(mailgate.testing)
