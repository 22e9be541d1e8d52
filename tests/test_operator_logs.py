"""What an operator reads in the log (issue 17): the banner's host name and where it came
from, a delivery failure as one line, structured fields on the "accepted" line, and a
warning with the fix for a server on the internet without local_domains."""

from __future__ import annotations

import errno
import json
import logging
import smtplib
import socket
import time
from collections.abc import Iterator

import pytest

from mailgate.plugins import relay
from mailgate.plugins.policy import PolicyEnv
from mailgate.server.logs import JSONFormatter
from mailgate.server.options import ListenAddress, ServerOptions
from mailgate.settings import machine
from mailgate.testing import running_server

MESSAGE = "From: a@example.org\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


# -- the banner's host name --------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostname", "fqdn", "chosen"),
    [
        ("vm", "localhost", "vm"),  # /etc/hosts: "127.0.0.1 localhost" before "127.0.0.1 vm"
        ("vm", "localhost.localdomain", "vm"),
        ("mx1", "mx1", "mx1"),
        ("mx1", "ip6-loopback", "mx1"),  # no dot: not a fully qualified name
        ("mx1", "mx1.example.com", "mx1.example.com"),
        ("mx1.example.com", "mx1.example.com", "mx1.example.com"),
        ("", "mx1.example.com", "mx1.example.com"),
        ("", "", "localhost"),
        ("localhost", "localhost", "localhost"),
    ],
)
def test_choose_machine_name(hostname: str, fqdn: str, chosen: str) -> None:
    assert machine.choose_machine_name(hostname, fqdn) == chosen


@pytest.fixture
def host_vm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A host named vm whose /etc/hosts gives "localhost" first."""
    monkeypatch.setattr(socket, "gethostname", lambda: "vm")
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "localhost")
    monkeypatch.setattr(machine, "_choice", None)
    machine.machine_fqdn.cache_clear()
    yield
    machine.machine_fqdn.cache_clear()


def test_machine_fqdn_prefers_the_host_name_to_a_localhost_alias(host_vm: None) -> None:
    assert machine.machine_name_choice() is None  # not looked up until asked
    assert machine.machine_fqdn() == "vm"
    assert machine.machine_name_choice() == (
        "vm",
        "the host name; socket.getfqdn() gave 'localhost'",
    )


def test_the_start_logs_which_name_the_banner_uses(
    host_vm: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailgate")
    # hostname=None: not given, as from a command line without --hostname.
    with running_server(hostname=None) as srv:
        assert srv.server.options.hostname == "vm"
        with smtplib.SMTP(*srv.address, timeout=10) as client:
            assert client.ehlo()[1].startswith(b"vm")
    lines = [r.getMessage() for r in caplog.records if r.name == "mailgate.server"]
    assert (
        "host name vm (from the host name; socket.getfqdn() gave 'localhost'); "
        "set hostname to choose another"
    ) in lines


def test_a_given_hostname_is_not_explained(host_vm: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailgate")
    machine.machine_fqdn()
    with running_server(hostname="mx.example.com"):
        pass
    assert not any("host name" in r.getMessage() for r in caplog.records)


# -- a delivery that fails ---------------------------------------------------------------


def test_a_delivery_failure_is_one_line_with_session_and_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "mailgate")

    def full_disk(session: object, envelope: object, message: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with running_server(configure=lambda server: server.on_message(full_disk)) as srv:
        with smtplib.SMTP(*srv.address, timeout=10) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("a@example.org", ["bob@example.com"], MESSAGE)
    assert refused.value.smtp_code == 451
    [record] = [
        r for r in caplog.records if r.name == "mailgate.hooks" and r.levelno >= logging.INFO
    ]
    assert record.levelno == logging.ERROR and record.exc_info is None
    text = record.getMessage()
    assert "\n" not in text
    session, queue_id = record.session, record.queue_id  # type: ignore[attr-defined]
    assert session and queue_id
    assert text.startswith(f"session {session}: message {queue_id}: delivery message:")
    assert text.endswith(
        ".full_disk failed, the client was told to retry: OSError: [Errno 28] No space left "
        "on device"
    )
    # The traceback is still there for -v.
    [debug] = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert debug.getMessage().startswith(f"session {session}: delivery message:")


def test_a_background_delivery_failure_is_one_line_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailgate")

    class Notify:
        name = "notify"
        required = False  # runs after the 250

        def on_message(self, session: object, envelope: object, message: object) -> None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    with running_server(configure=lambda server: server.add_plugin(Notify())) as srv:
        with smtplib.SMTP(*srv.address, timeout=10) as client:
            client.sendmail("a@example.org", ["bob@example.com"], MESSAGE)
        [captured] = srv.messages
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _errors(caplog):
            time.sleep(0.02)
    [record] = _errors(caplog)
    assert record.exc_info is None
    assert record.getMessage() == (
        f"session {captured.session.id}: message {captured.id}: background delivery notify "
        "failed: ConnectionRefusedError: [Errno 111] Connection refused"
    )


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- the accepted line -------------------------------------------------------------------


def test_the_accepted_line_has_structured_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailgate")
    with running_server() as srv:
        with smtplib.SMTP(*srv.address, timeout=10) as client:
            client.sendmail("a@example.org", ["bob@example.com", "carol@example.com"], MESSAGE)
        [captured] = srv.messages
    [record] = [r for r in caplog.records if " accepted from=<" in r.getMessage()]
    entry = json.loads(JSONFormatter().format(record))
    assert entry["session"] == captured.session.id
    assert entry["client"] == "127.0.0.1"
    assert entry["sender"] == "a@example.org"
    assert entry["recipients"] == ["bob@example.com", "carol@example.com"]
    assert entry["queue_id"] == captured.id
    assert entry["size"] > len(MESSAGE) - 10
    assert entry["user"] is None
    assert entry["msg"].startswith(
        f"session {captured.session.id}: message {captured.id} accepted "
    )


# -- no local_domains on the internet ----------------------------------------------------


def relay_log(caplog: pytest.LogCaptureFixture, **options: object) -> list[logging.LogRecord]:
    caplog.set_level(logging.INFO, "mailgate")
    relay.plugins_from_options(PolicyEnv(ServerOptions(**options)))  # type: ignore[arg-type]
    return [r for r in caplog.records if "local_domains" in r.getMessage()]


def test_no_local_domains_on_a_public_address_is_a_warning_with_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listen = (ListenAddress("127.0.0.1", 25), ListenAddress("0.0.0.0", 25), ListenAddress("::", 25))
    [record] = relay_log(caplog, listen=listen)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "no local_domains while listening on 0.0.0.0:25, [::]:25: every recipient from "
        "outside relay_networks (127.0.0.0/8, ::1/128) and authenticated users is refused "
        'with 554 5.7.1; to receive mail for your domains set local_domains = ["example.com"] '
        "in [server] (or --local-domains example.com)"
    )


@pytest.mark.parametrize(
    "options",
    [
        {"listen": (ListenAddress("127.0.0.1", 25), ListenAddress("::1", 25))},
        {"listen": (ListenAddress("localhost", 25),)},
    ],
)
def test_no_local_domains_on_loopback_is_only_information(
    options: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    [record] = relay_log(caplog, **options)
    assert record.levelno == logging.INFO


def test_local_domains_given_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    assert (
        relay_log(caplog, listen=(ListenAddress("0.0.0.0", 25),), local_domains=("example.com",))
        == []
    )
