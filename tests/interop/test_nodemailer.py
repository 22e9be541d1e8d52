"""nodemailer (through tests/interop/node/send.js) against the real ``mailgate serve``.

send.js ``--eml`` hands the file to nodemailer as a raw message, so what is stored must be
the file byte for byte; the envelope comes from ``--from``/``--to``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    MESSAGE,
    PASSWORD,
    RECIPIENT,
    SENDER,
    USER,
    Mailgate,
    describe,
    require_tool,
    run_tool,
)

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture
def node() -> str:
    path = require_tool("node")
    if not (NODE_DIR / "node_modules" / "nodemailer" / "package.json").is_file():
        pytest.fail(
            f"nodemailer is not installed in {NODE_DIR}: "
            "run scripts/install-test-deps to install the interop test tools",
            pytrace=False,
        )
    return path


def send(node: str, port: int, *args: str) -> dict[str, Any]:
    """Run send.js; its one JSON line on stdout, which must report success."""
    command = [node, "send.js", "--host", "127.0.0.1", "--port", str(port), "--debug", *args]
    result = run_tool(command, cwd=NODE_DIR)
    assert result.returncode == 0, describe(result)
    report: dict[str, Any] = json.loads(result.stdout.decode())
    assert report["ok"] is True, describe(result)
    assert report["rejected"] == [], report
    return report


def eml(message_file: Path, *recipients: str) -> list[str]:
    return [
        "--eml",
        str(message_file),
        "--from",
        SENDER,
        "--to",
        ",".join(recipients or [RECIPIENT]),
    ]


def test_plain(node: str, mailgate: Mailgate, message_file: Path) -> None:
    report = send(node, mailgate.port, *eml(message_file))
    assert report["response"].startswith("250 ")
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTP"
    assert "from nodemailer.test ([127.0.0.1])" in mailgate.received()


def test_starttls_two_recipients(node: str, mailgate: Mailgate, message_file: Path) -> None:
    recipients = (RECIPIENT, "second@example.com")
    tls = ["--starttls", "--ca", str(mailgate.certs.ca_file)]
    report = send(node, mailgate.port, *tls, *eml(message_file, *recipients))
    assert report["accepted"] == list(recipients)
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPS"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_over_starttls(
    node: str, mailgate: Mailgate, message_file: Path, mechanism: str
) -> None:
    tls = ["--starttls", "--ca", str(mailgate.certs.ca_file)]
    auth = ["--user", USER, "--pass", PASSWORD, "--auth-method", mechanism]
    send(node, mailgate.port, *tls, *auth, *eml(message_file))
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPSA"


def test_implicit_tls_with_auth(node: str, mailgate: Mailgate, message_file: Path) -> None:
    tls = ["--secure", "--ca", str(mailgate.certs.ca_file)]
    auth = ["--user", USER, "--pass", PASSWORD]
    send(node, mailgate.smtps_port, *tls, *auth, *eml(message_file))
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPSA"


def test_wrong_password_is_refused(node: str, mailgate: Mailgate, message_file: Path) -> None:
    tls = ["--starttls", "--ca", str(mailgate.certs.ca_file)]
    auth = ["--user", USER, "--pass", "not-the-password", "--auth-method", "PLAIN"]
    command = [node, "send.js", "--host", "127.0.0.1", "--port", str(mailgate.port)]
    result = run_tool([*command, *tls, *auth, *eml(message_file)], cwd=NODE_DIR)
    assert result.returncode == 1, describe(result)
    report = json.loads(result.stdout.decode())
    assert report["ok"] is False and report["responseCode"] == 535, report
    assert mailgate.messages() == []


def test_smtputf8_recipient(node: str, mailgate: Mailgate, tmp_path: Path) -> None:
    recipient = "jürgen@example.com"
    message = (
        "From: sender@example.com\r\n"
        f"To: {recipient}\r\n"
        "Subject: Grüße\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Schöne Grüße aus Köln.\r\n"
    ).encode()
    path = tmp_path / "utf8.eml"
    path.write_bytes(message)
    tls = ["--starttls", "--ca", str(mailgate.certs.ca_file)]
    report = send(node, mailgate.port, *tls, "--eml", str(path), "--to", recipient)
    assert report["accepted"] == [recipient]
    assert mailgate.only_message() == message
    # nodemailer asked for SMTPUTF8 on MAIL FROM, and the trace header says so.
    assert mailgate.with_protocol() == "UTF8SMTPS"
    assert f"for <{recipient}>" in mailgate.received()
