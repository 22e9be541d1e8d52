"""swaks against the real ``mailgate serve``: pipelining, STARTTLS, AUTH, implicit TLS.

swaks 20201014 (Debian 12) has no BDAT/CHUNKING support, so CHUNKING is exercised by the
in-process tests only.

swaks dot-stuffs the ``--data`` file and appends ``CRLF .`` itself, unless the file already
ends with the closing dot; the file is therefore the message followed by ``.`` CRLF, which
makes the bytes swaks sends for the message exactly MESSAGE.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.server.harness import Certs, CLIServer, make_certs

from .conftest import (
    MESSAGE,
    PASSWORD,
    RECIPIENT,
    SENDER,
    USER,
    Mailgate,
    describe,
    free_ports,
    require_tool,
    run_tool,
)

# swaks's exit status when AUTH was required and no mechanism succeeded.
SWAKS_AUTH_FAILED = 28


@pytest.fixture
def swaks() -> str:
    return require_tool("swaks")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.eml"
    path.write_bytes(MESSAGE + b".\r\n")
    return path


def swaks_args(swaks: str, port: int, data_file: Path, *extra: str) -> list[str]:
    return [
        swaks,
        "--server", "127.0.0.1",
        "--port", str(port),
        "--ehlo", "swaks.test",
        "--from", SENDER,
        "--to", RECIPIENT,
        "--data", f"@{data_file}",
        "--timeout", "20",
        *extra,
    ]  # fmt: skip


def test_plain_with_pipelining(swaks: str, mailgate: Mailgate, data_file: Path) -> None:
    result = run_tool(swaks_args(swaks, mailgate.port, data_file, "--pipeline"))
    assert result.returncode == 0, describe(result)
    transcript = result.stdout.decode()
    # Pipelined: MAIL, RCPT and DATA go out before the first of their replies comes back.
    assert re.search(r" -> MAIL FROM:.*\n -> RCPT TO:.*\n -> DATA\n<-  250 ", transcript), (
        transcript
    )
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTP"
    assert "from swaks.test ([127.0.0.1])" in mailgate.received()


def test_starttls_verifies_the_certificate(
    swaks: str, mailgate: Mailgate, data_file: Path, tmp_path: Path
) -> None:
    tls = ["-tls", "--tls-verify", "--tls-ca-path", str(mailgate.certs.ca_file)]
    result = run_tool(swaks_args(swaks, mailgate.port, data_file, *tls))
    assert result.returncode == 0, describe(result)
    assert "=== TLS started with cipher" in result.stdout.decode()
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPS"

    # The same run against an unrelated CA must fail: the check above really verified.
    other = tmp_path / "other-ca"
    other.mkdir()
    wrong = ["-tls", "--tls-verify", "--tls-ca-path", str(make_certs(other).ca_file)]
    result = run_tool(swaks_args(swaks, mailgate.port, data_file, *wrong))
    assert result.returncode != 0, describe(result)
    assert len(mailgate.messages()) == 1


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_over_starttls(
    swaks: str, mailgate: Mailgate, data_file: Path, mechanism: str
) -> None:
    tls = ["-tls", "--tls-verify", "--tls-ca-path", str(mailgate.certs.ca_file)]
    auth = ["-a", mechanism, "-au", USER, "-ap", PASSWORD]
    result = run_tool(swaks_args(swaks, mailgate.port, data_file, *tls, *auth))
    assert result.returncode == 0, describe(result)
    assert "<~  235 " in result.stdout.decode()
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPSA"


def test_auth_is_not_offered_before_tls(swaks: str, mailgate: Mailgate, data_file: Path) -> None:
    auth = ["-a", "PLAIN", "-au", USER, "-ap", PASSWORD]
    result = run_tool(swaks_args(swaks, mailgate.port, data_file, *auth))
    assert result.returncode != 0, describe(result)
    transcript = result.stdout.decode()
    assert "250-AUTH" not in transcript and "250 AUTH" not in transcript
    assert mailgate.messages() == []


def test_implicit_tls_with_auth(swaks: str, mailgate: Mailgate, data_file: Path) -> None:
    tls = ["--tls-on-connect", "--tls-verify", "--tls-ca-path", str(mailgate.certs.ca_file)]
    auth = ["-a", "PLAIN", "-au", USER, "-ap", PASSWORD]
    result = run_tool(swaks_args(swaks, mailgate.smtps_port, data_file, *tls, *auth))
    assert result.returncode == 0, describe(result)
    transcript = result.stdout.decode()
    assert "STARTTLS" not in transcript  # TLS from the first byte, nothing to upgrade
    assert "<~  220 " in transcript
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPSA"


def test_failed_auth_gets_535(swaks: str, mailgate: Mailgate, data_file: Path) -> None:
    tls = ["-tls", "--tls-ca-path", str(mailgate.certs.ca_file)]
    auth = ["-a", "PLAIN", "-au", USER, "-ap", "not-the-password"]
    result = run_tool(swaks_args(swaks, mailgate.port, data_file, *tls, *auth))
    assert result.returncode == SWAKS_AUTH_FAILED, describe(result)
    assert re.search(r"^<~\* 535 5\.7\.8 ", result.stdout.decode(), re.M), describe(result)
    assert mailgate.messages() == []


# --- a submission listener (RFC 6409) ----------------------------------------------------------


@pytest.fixture
def submission(tmp_path: Path, certs: Certs) -> Iterator[Mailgate]:
    """``mailgate serve`` with a submission listener only, and a [senders] table that
    gives the user SENDER's domain."""
    config = tmp_path / "mailgate.toml"
    config.write_text(f'[senders]\n{USER} = ["*@{SENDER.partition("@")[2]}"]\n')
    maildir = tmp_path / "maildir"
    for _ in range(5):
        [port] = free_ports(1)
        args = [
            "--config", str(config),
            "--submission-listen", f"127.0.0.1:{port}",
            "--hostname", "mx.test",
            "--maildir", str(maildir),
            "--state-dir", str(tmp_path / "state"),
            "--tls-cert", str(certs.cert),
            "--tls-key", str(certs.key),
            "--auth-user", f"{USER}:{PASSWORD}",
        ]  # fmt: skip
        process = CLIServer(args, cwd=tmp_path).start()
        if process.ports:
            break
        process.wait(10)
    else:
        raise AssertionError("no free port for the submission listener")
    server = Mailgate(process, port, port, maildir, certs)
    try:
        yield server
    finally:
        process.kill()
        print(f"--- mailgate log\n{server.log()}")
    assert "Traceback" not in server.log(), server.log()


def test_submission_port_needs_auth_and_an_owned_sender(
    swaks: str, submission: Mailgate, data_file: Path
) -> None:
    tls = ["-tls", "--tls-verify", "--tls-ca-path", str(submission.certs.ca_file)]
    auth = ["-a", "PLAIN", "-au", USER, "-ap", PASSWORD]
    # Without AUTH: 530 at MAIL, even over TLS.
    result = run_tool(swaks_args(swaks, submission.port, data_file, *tls))
    assert result.returncode != 0, describe(result)
    assert re.search(r"^<\~\* 530 5\.7\.0 Authentication required", result.stdout.decode(), re.M), (
        describe(result)
    )
    # AUTH, but a sender of another domain: 553 5.7.1.
    foreign = swaks_args(swaks, submission.port, data_file, *tls, *auth)
    foreign[foreign.index("--from") + 1] = "someone@elsewhere.test"
    result = run_tool(foreign)
    assert result.returncode != 0, describe(result)
    assert re.search(
        r"^<\~\* 553 5\.7\.1 <someone@elsewhere\.test>: Sender address rejected: "
        rf"not owned by user {USER}$",
        result.stdout.decode(),
        re.M,
    ), describe(result)
    assert submission.messages() == []
    # AUTH and the user's own sender: delivered.
    result = run_tool(swaks_args(swaks, submission.port, data_file, *tls, *auth))
    assert result.returncode == 0, describe(result)
    assert submission.only_message() == MESSAGE
    assert submission.with_protocol() == "ESMTPSA"
