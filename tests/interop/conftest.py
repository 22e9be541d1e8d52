"""Shared set-up for the interop tests: the real ``mailgate serve`` and the outside clients.

Each test starts its own server process (plain SMTP with STARTTLS on one port, implicit
TLS on another, trustme certificates, one AUTH user) and checks what landed in the
Maildir. A client tool that is not installed fails the test: skipping would let the
suite pass without having talked to the client at all.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.server.harness import Certs, CLIServer, maildir_messages, make_certs, strip_received

HOSTNAME = "mx.test"
USER, PASSWORD = "alice", "secret"
SENDER = "sender@example.com"
RECIPIENT = "rcpt@example.com"

# CRLF line ends throughout, a leading dot (the client must stuff it, the server unstuff
# it), a line that is only a dot, a long line and a trailing CRLF: the clients must hand
# these bytes over unchanged for the byte-for-byte comparison to mean anything.
MESSAGE = (
    b"From: Sender <sender@example.com>\r\n"
    b"To: Recipient <rcpt@example.com>\r\n"
    b"Subject: mailgate interop\r\n"
    b"Message-ID: <interop-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"First line.\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b"\r\n" + b"x" * 900 + b"\r\n"
    b"Last line.\r\n"
)

_INSTALL_HINT = "run scripts/install-test-deps to install the interop test tools"
_IN_USE = "already in use"


def require_tool(name: str) -> str:
    """The path of an outside program; a missing one fails the test (never skips)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {_INSTALL_HINT}", pytrace=False)
    return path


def run_tool(
    args: list[str], *, stdin: bytes | None = None, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        args, input=stdin, capture_output=True, cwd=cwd, timeout=timeout, check=False
    )


def describe(result: subprocess.CompletedProcess[bytes]) -> str:
    """Everything a failed client run said, for the assertion message."""
    return (
        f"exit {result.returncode}: {' '.join(map(str, result.args))}\n"
        f"--- stdout\n{result.stdout.decode(errors='replace')}\n"
        f"--- stderr\n{result.stderr.decode(errors='replace')}"
    )


def free_ports(count: int) -> list[int]:
    """Ports free right now (held open together so they differ); another process may
    still take one before the server binds it, hence the retry in start_server."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclasses.dataclass
class Mailgate:
    process: CLIServer
    port: int
    smtps_port: int
    maildir: Path
    certs: Certs

    def messages(self) -> list[bytes]:
        return maildir_messages(self.maildir)

    def only_message(self) -> bytes:
        """The one stored message, as the client sent it (the Received header removed)."""
        messages = self.messages()
        assert len(messages) == 1, f"expected one stored message, found {len(messages)}"
        return strip_received(messages[0])

    def received(self) -> str:
        """The unfolded Received header of the one stored message."""
        (stored,) = self.messages()
        header = stored[: len(stored) - len(strip_received(stored))]
        return re.sub(r"\r\n[ \t]+", " ", header.decode()).strip()

    def with_protocol(self) -> str:
        match = re.search(r"\bwith (\S+)", self.received())
        assert match, self.received()
        return match.group(1)

    def log(self) -> str:
        return self.process.text()


def start_server(tmp_path: Path, certs: Certs, *extra: str, attempts: int = 5) -> Mailgate:
    """``mailgate serve`` on two free ports. The CLI refuses port 0, so the ports are
    picked here, and picked again when another process took one in the meantime."""
    maildir = tmp_path / "maildir"
    for _ in range(attempts):
        port, smtps_port = free_ports(2)
        args = [
            "--listen", f"127.0.0.1:{port}",
            "--smtps-listen", f"127.0.0.1:{smtps_port}",
            "--hostname", HOSTNAME,
            "--maildir", str(maildir),
            "--state-dir", str(tmp_path / "state"),
            "--tls-cert", str(certs.cert),
            "--tls-key", str(certs.key),
            "--auth-user", f"{USER}:{PASSWORD}",
            "--verbose",
            *extra,
        ]  # fmt: skip
        process = CLIServer(args, cwd=tmp_path).start(expected_listeners=2)
        if len(process.ports) == 2:
            return Mailgate(process, port, smtps_port, maildir, certs)
        code = process.wait(10)
        if _IN_USE not in process.text():
            raise AssertionError(f"mailgate serve exited with {code}:\n{process.text()}")
    raise AssertionError(f"no free port pair found in {attempts} attempts")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    directory = tmp_path / "certs"
    directory.mkdir()
    return make_certs(directory)


@pytest.fixture
def mailgate(tmp_path: Path, certs: Certs) -> Iterator[Mailgate]:
    server = start_server(tmp_path, certs)
    try:
        yield server
    finally:
        server.process.kill()
        # Shown by pytest only when the test fails: the server's side of the story.
        print(f"--- mailgate log\n{server.log()}")
    # A client that got its message through can still have hit a logged server error.
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture
def message_file(tmp_path: Path) -> Path:
    path = tmp_path / "message.eml"
    path.write_bytes(MESSAGE)
    return path
