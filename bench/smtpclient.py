"""A minimal blocking SMTP client for memory.py: one command at a time, no pipelining, and a
message body taken from an iterable of chunks so a 100 MB message never sits in the client.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator


class SMTPError(Exception):
    pass


class Client:
    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def reply(self) -> tuple[int, bytes]:
        """Read one (possibly multi-line) reply."""
        lines = []
        while True:
            line = self.reader.readline(2048)
            if not line:
                raise SMTPError("connection closed by server")
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines)

    def expect(self, code: int) -> bytes:
        got, text = self.reply()
        if got != code:
            raise SMTPError(f"expected {code}, got {text.strip()[:200]!r}")
        return text

    def command(self, line: str, code: int) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.expect(code)

    def send_message(self, sender: str, rcpt: str, body: Iterable[bytes]) -> tuple[int, bytes]:
        """MAIL, RCPT, DATA; `body` must already be dot-stuffed CRLF lines ending in CRLF.
        Returns the reply to the end of data, whatever it is."""
        self.command(f"MAIL FROM:<{sender}>", 250)
        self.command(f"RCPT TO:<{rcpt}>", 250)
        self.command("DATA", 354)
        for chunk in body:
            self.sock.sendall(chunk)
        self.sock.sendall(b".\r\n")
        return self.reply()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def headers(size_hint: int) -> bytes:
    return (
        "From: <sender@bench.example>\r\n"
        "To: <rcpt@bench.example>\r\n"
        f"Subject: bench {size_hint} bytes\r\n"
        "Message-ID: <bench@bench.example>\r\n"
        "\r\n"
    ).encode()


def body_chunks(total: int, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
    """Headers, then filler lines (78 chars + CRLF, none starting with a dot) for about
    `total` bytes in all (to within 2). The same chunk object is yielded again and again, so
    the client's memory stays flat whatever the size."""
    head = headers(total)
    yield head
    line = b"x" * 78 + b"\r\n"
    chunk = line * max(1, chunk_size // len(line))
    remaining = max(0, total - len(head))
    for _ in range(remaining // len(chunk)):
        yield chunk
    remaining %= len(chunk)
    yield line * (remaining // len(line))
    if remaining % len(line) > 2:
        yield b"x" * (remaining % len(line) - 2) + b"\r\n"
