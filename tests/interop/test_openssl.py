"""``openssl s_client`` as a bare TLS pipe: a whole SMTP session typed through its stdin.

Unlike the mail clients, nothing here is done for us: the test writes every command, waits
for every reply (no pipelining of the message text before 354), dot-stuffs the message
itself and checks each reply code.
"""

from __future__ import annotations

import base64
import queue
import subprocess
import threading
from pathlib import Path

import pytest
from tests.server.harness import make_certs

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

REPLY_TIMEOUT = 10.0


@pytest.fixture
def openssl() -> str:
    return require_tool("openssl")


def dot_stuffed(message: bytes) -> bytes:
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


class SClient:
    """An ``openssl s_client`` process: lines written to its stdin, replies read back."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(b"")  # end of output

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def reply(self) -> tuple[int, list[str]]:
        """The next complete (possibly multi-line) reply: its code and its lines."""
        lines: list[str] = []
        while True:
            try:
                raw = self._lines.get(timeout=REPLY_TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no reply within {REPLY_TIMEOUT} s after {lines}") from None
            if not raw:
                raise AssertionError(f"s_client ended; stderr: {self.stderr()}")
            line = raw.decode().rstrip("\r\n")
            lines.append(line)
            if line[3:4] != "-":
                return int(line[:3]), lines

    def command(self, line: str) -> tuple[int, list[str]]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def finish(self) -> int:
        """Close stdin and wait for s_client to exit (the server closes after QUIT)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(REPLY_TIMEOUT)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(REPLY_TIMEOUT)


def s_client_args(openssl: str, port: int, ca_file: Path, *extra: str) -> list[str]:
    return [
        openssl, "s_client",
        "-connect", f"127.0.0.1:{port}",
        "-CAfile", str(ca_file),
        "-verify_return_error",
        "-verify_ip", "127.0.0.1",
        # -quiet: no certificate dump on stdout, no single-letter commands (Q, R) on stdin.
        "-quiet",
        *extra,
    ]  # fmt: skip


def send_message(client: SClient, *, auth: bool) -> None:
    """EHLO .. QUIT over an established TLS session, checking every reply."""
    code, lines = client.command("EHLO openssl.test")
    assert code == 250
    assert "250-STARTTLS" not in lines and "250 STARTTLS" not in lines
    assert any(line[4:].startswith("AUTH ") and "PLAIN" in line for line in lines), lines
    if auth:
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert client.command(f"AUTH PLAIN {token}")[0] == 235
    assert client.command(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert client.command(f"RCPT TO:<{RECIPIENT}>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(dot_stuffed(MESSAGE) + b".\r\n")
    code, lines = client.reply()
    assert code == 250, lines
    assert client.command("QUIT")[0] == 221
    assert client.finish() == 0


def test_starttls_session_with_auth(openssl: str, mailgate: Mailgate) -> None:
    args = s_client_args(openssl, mailgate.port, mailgate.certs.ca_file, "-starttls", "smtp")
    client = SClient(args)
    try:
        # s_client has done banner, EHLO and STARTTLS itself; the session starts over.
        send_message(client, auth=True)
    finally:
        client.close()
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPSA"
    assert "from openssl.test ([127.0.0.1])" in mailgate.received()


def test_implicit_tls_session(openssl: str, mailgate: Mailgate) -> None:
    client = SClient(s_client_args(openssl, mailgate.smtps_port, mailgate.certs.ca_file))
    try:
        code, banner = client.reply()
        assert code == 220 and banner[0].startswith("220 mx.test "), banner
        send_message(client, auth=False)
    finally:
        client.close()
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPS"


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_unknown_ca_is_refused(
    openssl: str, mailgate: Mailgate, tmp_path: Path, implicit: bool
) -> None:
    """The verification options above bite: the handshake fails against another CA."""
    other = tmp_path / "other-ca"
    other.mkdir()
    ca_file = make_certs(other).ca_file
    if implicit:
        args = s_client_args(openssl, mailgate.smtps_port, ca_file)
    else:
        args = s_client_args(openssl, mailgate.port, ca_file, "-starttls", "smtp")
    result = run_tool(args, stdin=b"QUIT\r\n")
    assert result.returncode != 0, describe(result)
    assert b"certificate verify failed" in result.stderr, describe(result)
