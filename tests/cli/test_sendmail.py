"""``mailgate sendmail``: the message on stdin completed, routed and queued (checked
through the store API), and sendmail's exit statuses for what cannot be queued."""

from __future__ import annotations

import email
import email.policy
import os
import subprocess
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from tests.cli.conftest import (
    HOSTNAME,
    Stdin,
    mailgate_command,
    mailgate_env,
    run,
    write_config,
)

from mailgate import cli
from mailgate.cli import sendmail
from mailgate.hooks import Reject
from mailgate.queue import QueuedMessage, SQLiteQueueStore
from mailgate.testing import running_server


def send(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    data: bytes,
    *args: str,
) -> tuple[int, str]:
    monkeypatch.setattr("sys.stdin", Stdin(data))
    status = cli.main(["sendmail", *args])
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return status, captured.err


def queued(config: Path) -> list[tuple[QueuedMessage, bytes]]:
    """What the queue holds: each message and its body."""
    directory = config.parent / "spool" / "queue"
    if not directory.exists():
        return []

    async def read() -> list[tuple[QueuedMessage, bytes]]:
        async with await SQLiteQueueStore.open(directory) as store:
            result = []
            for message in await store.list_messages():
                body = b"".join([chunk async for chunk in store.read_body(message.id)])
                result.append((message, body))
            return result

    return run(read())


def text_of(message: bytes) -> bytes:
    """The body of a queued message (after the blank line)."""
    return message.split(b"\r\n\r\n", 1)[1]


def parsed(body: bytes) -> EmailMessage:
    message = email.message_from_bytes(body, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_a_message_is_completed_and_queued_per_route(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = send(
        monkeypatch,
        capsys,
        b"Subject: report\nTo: bob@example.net\n\nAll good.\n",
        "--config",
        str(config),
        "-f",
        "cron@corp.example",
        "-F",
        "Cron Daemon",
        "-v",
        "bob@example.net",
        "dave@partner.example",
    )
    assert status == 0, err
    [(message, body)] = queued(config)
    assert err.strip() == f"mailgate sendmail: queued as {message.id} for 2 recipient(s)"
    assert message.info.sender == "cron@corp.example"
    assert message.info.client.listener == "sendmail"
    assert [(r.address, r.destination, r.state.value) for r in message.recipients] == [
        ("bob@example.net", "relay:example.net", "queued"),
        ("dave@partner.example", "forward:smtp://127.0.0.1:2525", "queued"),
    ]
    # CRLF line ends, as the SMTP client sends them.
    assert b"\r\n" in body and b"\n" not in body.replace(b"\r\n", b"")
    assert body.startswith(f"Received: by {HOSTNAME} (mailgate sendmail".encode())
    mail = parsed(body)
    assert mail["From"] == "Cron Daemon <cron@corp.example>"
    assert mail["Subject"] == "report"
    assert mail["Date"] is not None
    assert mail["Message-ID"].endswith(f"@{HOSTNAME}>")
    assert text_of(body) == b"All good.\r\n"


def test_t_takes_to_cc_and_bcc_and_removes_bcc(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = (
        b"From: Alice <alice@corp.example>\n"
        b"To: Bob <bob@example.net>, carol@example.org\n"
        b"Cc: undisclosed-recipients:;\n"
        b"Bcc: secret@example.com,\n"
        b"  hidden@partner.example\n"
        b"Date: Tue, 1 Dec 2026 10:00:00 +0000\n"
        b"Message-ID: <given@corp.example>\n"
        b"Subject: plans\n"
        b"\n"
        b"line one\n"
        b".\n"
        b"after the dot\n"
    )
    status, err = send(monkeypatch, capsys, data, "-t", "--config", str(config), "erin@example.org")
    assert status == 0, err
    [(message, body)] = queued(config)
    assert [r.address for r in message.recipients] == [
        "erin@example.org",
        "bob@example.net",
        "carol@example.org",
        "secret@example.com",
        "hidden@partner.example",
    ]
    assert b"Bcc" not in body and b"secret@" not in body and b"hidden@" not in body
    mail = parsed(body)
    # Present fields are kept as they were; nothing is added twice.
    assert mail["From"] == "Alice <alice@corp.example>"
    assert mail.get_all("Date") == ["Tue, 01 Dec 2026 10:00:00 +0000"]
    assert mail.get_all("Message-ID") == ["<given@corp.example>"]
    # Without -i a line with only "." ends the message.
    assert text_of(body) == b"line one\r\n"
    # The default sender is the user @ the server's hostname.
    assert message.info.sender.endswith(f"@{HOSTNAME}")


def test_i_keeps_reading_past_a_dot_line(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = b"Subject: dots\n\nbefore\n.\nafter\n"
    for flag in ("-i", "-oi"):
        status, err = send(
            monkeypatch, capsys, data, flag, "--config", str(config), "a@example.net"
        )
        assert status == 0, err
    bodies = [text_of(body) for _, body in queued(config)]
    assert bodies == [b"before\r\n.\r\nafter\r\n"] * 2


def test_crons_command_line_is_accepted(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # cronie: sendmail -FCronDaemon -i -odi -oem -oi -t -f root
    data = b"To: ops@example.net\nSubject: Cron <root@host> backup\n\ndone\n"
    status, err = send(
        monkeypatch,
        capsys,
        data,
        "--config",
        str(config),
        "-FCronDaemon",
        "-i",
        "-odi",
        "-oem",
        "-oi",
        "-t",
        "-f",
        "root",
        "-B8BITMIME",
    )
    assert status == 0, err
    [(message, body)] = queued(config)
    assert message.info.sender == f"root@{HOSTNAME}"
    assert message.info.body_type == "8BITMIME"
    assert [r.address for r in message.recipients] == ["ops@example.net"]
    assert parsed(body)["From"] == f"CronDaemon <root@{HOSTNAME}>"


def test_a_message_without_a_header_gets_one(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _ = send(
        monkeypatch,
        capsys,
        "just text, ünïcode\n".encode(),
        "--config",
        str(config),
        "-f",
        "<>",
        "a@example.net",
    )
    assert status == 0
    [(message, body)] = queued(config)
    assert message.info.sender == ""
    assert message.info.body_type == "8BITMIME"
    mail = parsed(body)
    assert mail["From"].endswith(f"@{HOSTNAME}")
    assert text_of(body) == "just text, ünïcode\r\n".encode()


def test_options_map_to_the_envelope(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = send(
        monkeypatch,
        capsys,
        b"Subject: x\n\nx\n",
        "--config",
        str(config),
        "-N",
        "failure,delay",
        "-R",
        "hdrs",
        "-V",
        "env-1",
        "a@example.net",
    )
    assert status == 0, err
    [(message, _)] = queued(config)
    assert message.info.ret == "HDRS"
    assert message.info.envid == "env-1"
    assert message.recipients[0].notify == frozenset({"FAILURE", "DELAY"})


def test_the_config_can_come_from_the_environment(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(sendmail.CONFIG_ENVIRONMENT, str(config))
    status, err = send(monkeypatch, capsys, b"Subject: x\n\nx\n", "a@example.net")
    assert status == 0, err
    assert len(queued(config)) == 1


@pytest.mark.parametrize(
    ("recipient", "status", "needle"),
    [
        ("x@blocked.example", sendmail.EX_NOUSER, "550 5.7.1 We do not send there"),
        ("x@later.example", sendmail.EX_TEMPFAIL, "450 4.7.1 Not today"),
    ],
)
def test_a_recipient_refused_by_a_rule_refuses_the_whole_message(
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    recipient: str,
    status: int,
    needle: str,
) -> None:
    result, err = send(
        monkeypatch,
        capsys,
        b"Subject: x\n\nx\n",
        "--config",
        str(config),
        "ok@example.net",
        recipient,
    )
    assert result == status
    assert len(err.splitlines()) == 1 and needle in err and "nothing queued" in err
    assert queued(config) == []


def test_local_recipients_go_to_the_running_server_with_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A recipient routed deliver: the whole message goes to the server's first listener
    over SMTP, with every recipient (the server routes them), and nothing is queued here."""
    with running_server() as server:
        config = write_config(tmp_path / "mailgate.toml", server.port)
        status, err = send(
            monkeypatch,
            capsys,
            b"Subject: to both\n\nline\n..two dots\n",
            "--config",
            str(config),
            "-i",
            "-v",
            "-f",
            "cron@corp.example",
            "root",
            "bob@example.net",
        )
        assert status == 0, err
        assert f"handed to the server at 127.0.0.1 port {server.port} (250 " in err
        [message] = server.messages.wait(1)
    assert message.sender == "cron@corp.example"
    assert [str(rcpt) for rcpt in message.rcpt_tos] == [f"root@{HOSTNAME}", "bob@example.net"]
    mail = message.as_email()
    assert mail["Subject"] == "to both"
    assert mail["Received"] is not None
    # Dot-stuffing is the SMTP client's: the line arrives as it was given.
    assert text_of(message.content) == b"line\r\n..two dots\r\n"
    assert queued(config) == []


def test_local_recipients_without_a_running_server_are_a_temporary_failure(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = send(
        monkeypatch, capsys, b"Subject: x\n\nx\n", "--config", str(config), "a@corp.example"
    )
    assert status == sendmail.EX_TEMPFAIL
    assert len(err.splitlines()) == 1
    assert (
        'a@corp.example (rule #1 "ours") is delivered locally, by the server at 127.0.0.1:' in err
    )
    assert "cannot be reached" in err and "nothing sent" in err
    assert queued(config) == []


def test_a_refusal_by_the_server_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse_some(server: Any) -> None:
        @server.on_rcpt
        async def refuse(session: Any, envelope: Any, address: Any) -> None:
            if str(address).startswith("nobody@"):
                raise Reject(550, "No such user", enhanced="5.1.1")

    with running_server(configure=refuse_some) as server:
        config = write_config(tmp_path / "mailgate.toml", server.port)
        status, err = send(
            monkeypatch,
            capsys,
            b"Subject: x\n\nx\n",
            "--config",
            str(config),
            "a@corp.example",
            "nobody@corp.example",
        )
        assert status == sendmail.EX_UNAVAILABLE
        assert "refused RCPT TO:<nobody@corp.example>: 550 5.1.1 No such user" in err
        assert "nothing sent" in err
        assert server.messages == []


def test_oversize_input_is_refused(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = b"Subject: big\n\n" + b"x" * 100 + b"\n" * 300 + (b"y" * 76 + b"\n") * 300
    status, err = send(monkeypatch, capsys, data, "--config", str(config), "a@example.net")
    assert status == sendmail.EX_DATAERR
    assert "larger than max_size (20480 bytes)" in err
    assert queued(config) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["a@example.net", "-b", "p"], "-bp is not supported"),
        (["not an address@"], "is not a list of addresses"),
        (["a@@example.net"], "is not a list of addresses"),
        (["-f", "bad address@x", "a@example.net"], "-f 'bad address@x' is not an address"),
        (["-N", "sometimes", "a@example.net"], "-N 'sometimes'"),
        (["--no-such-option", "a@example.net"], "unrecognized arguments"),
        ([], "no recipients"),
    ],
)
def test_usage_errors_exit_64(
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    needle: str,
) -> None:
    status, err = send(monkeypatch, capsys, b"Subject: x\n\nx\n", "--config", str(config), *args)
    assert status == sendmail.EX_USAGE
    assert len(err.splitlines()) == 1 and needle in err


def test_bad_header_addresses_with_t_exit_65(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for field in (b"To: a b c@d e", b"Cc: <bad@@x>", b"Bcc: ok@example.net, @@"):
        status, err = send(monkeypatch, capsys, field + b"\n\nx\n", "-t", "--config", str(config))
        assert status == sendmail.EX_DATAERR
        assert len(err.splitlines()) == 1 and "is not a list of addresses" in err
    assert queued(config) == []


def test_a_bad_config_exits_78(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        '[server]\nhostname = "h.example"\n[[routes]]\nrecipients = ["*"]\naction = "fly"\n'
    )
    status, err = send(monkeypatch, capsys, b"x\n", "--config", str(path), "a@example.net")
    assert status == sendmail.EX_CONFIG
    assert len(err.splitlines()) == 1 and "[[routes]] #1" in err
    status, err = send(
        monkeypatch, capsys, b"x\n", "--config", str(tmp_path / "none.toml"), "a@x.net"
    )
    assert status == sendmail.EX_CONFIG
    assert "cannot read config file" in err


def test_an_unwritable_queue_is_a_temporary_failure(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The queue directory's place is taken by a file: nothing can be created there.
    (config.parent / "spool").mkdir()
    (config.parent / "spool" / "queue").write_text("not a directory")
    status, err = send(
        monkeypatch, capsys, b"Subject: x\n\nx\n", "--config", str(config), "a@example.net"
    )
    assert status == sendmail.EX_TEMPFAIL
    assert len(err.splitlines()) == 1 and "nothing queued" in err


def test_as_a_process_and_as_a_link_named_sendmail(config: Path, tmp_path: Path) -> None:
    env = mailgate_env()
    result = subprocess.run(
        mailgate_command("sendmail", "--config", str(config), "-t"),
        input=b"To: a@example.net\nSubject: one\n\nbody\n",
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Installed as /usr/sbin/sendmail: a link whose name is sendmail takes its arguments.
    link = tmp_path / "sendmail"
    link.write_text("import sys\nfrom mailgate.cli import main\nsys.exit(main())\n")
    env[sendmail.CONFIG_ENVIRONMENT] = str(config)
    result = subprocess.run(
        [mailgate_command()[0], str(link), "-t", "-i"],
        input=b"To: b@example.net\nSubject: two\n\nbody\n",
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    subjects = [parsed(body)["Subject"] for _, body in queued(config)]
    assert subjects == ["one", "two"]
    result = subprocess.run(
        [mailgate_command()[0], str(link), "-q"],
        input=b"",
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == sendmail.EX_USAGE
    assert os.fsdecode(result.stderr).count("\n") == 1
