"""The calibration probe: a scripted SMTP session set, as data, that is played against the
real products (Postfix, Exim, Sendmail from Debian 12) and against mailgate's personas.

The probe is a list of :class:`Connection`; each is a list of :class:`Step`. A step is a
line to send (or several, sent in one write: a pipelining group), raw bytes, a TLS
upgrade, or "send before the banner" (an early talker). Steps that only make sense after
a given reply (the message after ``354``, an AUTH answer after ``334``, the TLS handshake
after ``220``) name the code they need in ``when``; if the previous reply had another
code the step is recorded as skipped, so the product and the persona stay comparable
even where they disagree.

:func:`run_probe` plays the probe against a server and returns one result per step;
:func:`normalise` and :func:`compare` turn two such runs into a match ratio. The recorder
(``scripts/record-personas``) writes the real products' runs to
``tests/honeypot/recorded/<product>.json``; ``test_persona_replay.py`` replays.

Only the standard library is used, so the recorder runs anywhere a Python 3.11 is.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import re
import socket
import ssl
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The probe's client: a loopback address the products' default configurations do not
#: trust (Debian's Postfix and Exim let 127.0.0.1 relay; the probe plays an outsider).
CLIENT_IP = "127.0.0.2"
#: The HELO name the probe gives.
HELO = "probe.example.net"
#: The local domain every recorded product (and the persona under test) receives mail for.
LOCAL_DOMAIN = "example.com"
#: A user that exists on every recorded product (created by the recorder's setup).
LOCAL_USER = "alice"
SENDER = "attacker@example.net"
RELAY_TARGET = "victim@example.org"


@dataclass(frozen=True, slots=True)
class Step:
    """One thing the client does.

    ``kind``: ``line`` (send ``data`` + CRLF), ``pipeline`` (several lines in one write;
    one reply each), ``raw`` (bytes as given), ``tls`` (TLS handshake), ``early`` (send
    ``data`` right after connecting, before the banner is read; its replies are the
    banner and the answer). ``replies``: complete replies to read (``None``: read until
    the server is quiet, for inputs a server may split into several commands).
    ``when``: only if the previous reply's code is this one (else skipped).
    """

    kind: str
    data: Any = None
    replies: int | None = 1
    when: int | None = None
    note: str = ""

    def describe(self) -> str:
        if self.kind == "tls":
            return "<TLS handshake>"
        if self.kind == "pipeline":
            return " | ".join(_short(line) for line in self.data)
        if self.kind == "raw":
            return _short(self.data.decode("latin-1"))
        if self.kind == "early":
            return f"<before banner> {_short(self.data)}"
        if self.kind == "banner":
            return "<connect>"
        return _short(self.data)


def _short(text: str) -> str:
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} chars)"


@dataclass(frozen=True, slots=True)
class Connection:
    name: str
    steps: tuple[Step, ...]


def line(text: str, *, when: int | None = None, replies: int | None = 1, note: str = "") -> Step:
    return Step("line", text, replies, when, note)


def pipeline(*lines: str, when: int | None = None) -> Step:
    return Step("pipeline", tuple(lines), len(lines), when)


def raw(data: bytes, *, replies: int | None = 1, when: int | None = None) -> Step:
    return Step("raw", data, replies, when)


def body(text: str, *, replies: int | None = 1) -> Step:
    """A message after ``354``: lines CRLF-terminated, the final dot added."""
    data = "".join(f"{part}\r\n" for part in text.split("\n")) + ".\r\n"
    return Step("raw", data.encode(), replies, 354, "message")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


BANNER = Step("banner")
TLS = Step("tls", replies=0, when=220)
EHLO = line(f"EHLO {HELO}")
QUIT = line("QUIT")
MAIL = line(f"MAIL FROM:<{SENDER}>")
RCPT_LOCAL = line(f"RCPT TO:<{LOCAL_USER}@{LOCAL_DOMAIN}>")
MESSAGE = (
    f"From: <{SENDER}>\nTo: <{LOCAL_USER}@{LOCAL_DOMAIN}>\nSubject: probe\n"
    "Message-ID: <probe-1@example.net>\nDate: Tue, 01 Dec 2026 10:00:00 +0000\n\n"
    "A probe message.\n..a dot-stuffed line"
)


def conn(name: str, *steps: Step) -> Connection:
    return Connection(name, (BANNER, *steps))


PROBE: tuple[Connection, ...] = (
    conn("ehlo-basics", EHLO, line("NOOP"), line("RSET"), line("HELP"), QUIT),
    conn(
        "helo-basics",
        line(f"HELO {HELO}"),
        MAIL,
        RCPT_LOCAL,
        line("RSET"),
        line("NOOP"),
        line(f"HELO {HELO}"),
        QUIT,
    ),
    conn(
        "mail-before-helo",
        MAIL,
        RCPT_LOCAL,
        line("RSET"),
        EHLO,
        QUIT,
    ),
    conn(
        "hello-syntax",
        line("HELO"),
        line("EHLO"),
        line(f"EHLO {HELO} extra words"),
        line("HELO [127.0.0.2]"),
        QUIT,
    ),
    conn("hello-bad-name", line("EHLO -bad_name!"), line("EHLO a..b"), EHLO, QUIT),
    conn("unknown-command", EHLO, line("XYZZY"), line("RSET"), QUIT),
    conn("empty-line", EHLO, line(""), line("NOOP"), QUIT),
    conn("whitespace-line", EHLO, line("   "), line("noop"), line("ehlo " + HELO), QUIT),
    conn("http-request", EHLO, line("GET / HTTP/1.0", replies=None)),
    conn(
        "transaction-order",
        EHLO,
        RCPT_LOCAL,
        line("DATA"),
        MAIL,
        line("DATA"),
        QUIT,
    ),
    conn("nested-mail", EHLO, MAIL, MAIL, line("RSET"), MAIL, QUIT),
    conn(
        "full-message",
        EHLO,
        MAIL,
        RCPT_LOCAL,
        line("DATA"),
        body(MESSAGE),
        line("NOOP"),
        MAIL,
        RCPT_LOCAL,
        line("RSET"),
        QUIT,
    ),
    conn(
        "message-after-helo",
        line(f"HELO {HELO}"),
        MAIL,
        RCPT_LOCAL,
        line("DATA"),
        body(MESSAGE),
        QUIT,
    ),
    conn(
        "address-forms",
        EHLO,
        line(f"MAIL FROM:{SENDER}"),
        line("RSET"),
        line(f"MAIL FROM: <{SENDER}>"),
        line("RSET"),
        line(f"mail from:<{SENDER}>"),
        line("RSET"),
        line("MAIL FROM:<>"),
        line(f"RCPT TO:{LOCAL_USER}@{LOCAL_DOMAIN}"),
        line(f"RCPT TO: <{LOCAL_USER}@{LOCAL_DOMAIN}>"),
        line(f"rcpt to:<{LOCAL_USER}@{LOCAL_DOMAIN}>"),
        line("RSET"),
        QUIT,
    ),
    conn(
        "address-forms-2",
        EHLO,
        line("MAIL FROM:<attacker@[203.0.113.5]>"),
        line(f"RCPT TO:<postmaster@{LOCAL_DOMAIN}>"),
        line("RCPT TO:<postmaster>"),
        line(f'RCPT TO:<"{LOCAL_USER}"@{LOCAL_DOMAIN}>'),
        line(f"RCPT TO:<{LOCAL_USER.upper()}@{LOCAL_DOMAIN.upper()}>"),
        line("RSET"),
        QUIT,
    ),
    conn(
        "mail-parameters",
        EHLO,
        line(f"MAIL FROM:<{SENDER}> SIZE=1000"),
        line("RSET"),
        line(f"MAIL FROM:<{SENDER}> BODY=8BITMIME"),
        line("RSET"),
        line(f"MAIL FROM:<{SENDER}> SIZE=999999999999"),
        line(f"MAIL FROM:<{SENDER}> SMTPUTF8"),
        QUIT,
    ),
    conn(
        "mail-parameter-errors",
        EHLO,
        line(f"MAIL FROM:<{SENDER}> FOO=BAR"),
        line(f"MAIL FROM:<{SENDER}> SIZE=abc"),
        line(f"MAIL FROM:<{SENDER}> BODY=7BIT RET=HDRS ENVID=probe1"),
        QUIT,
    ),
    conn(
        "mail-syntax",
        EHLO,
        line("MAIL"),
        line("MAIL FROM"),
        line(f"MAIL TO:<{SENDER}>"),
        QUIT,
    ),
    conn(
        "mail-syntax-2",
        EHLO,
        line("MAIL FROM:<attacker@example.net"),
        line("MAIL FROM:<a b@example.net>"),
        line("MAIL FROM:<attacker@@example.net>"),
        QUIT,
    ),
    conn(
        "rcpt-syntax",
        EHLO,
        MAIL,
        line("RCPT"),
        line("RCPT TO"),
        line(f"RCPT FROM:<{LOCAL_USER}@{LOCAL_DOMAIN}>"),
        QUIT,
    ),
    conn(
        "rcpt-syntax-2",
        EHLO,
        MAIL,
        line("RCPT TO:<>"),
        line(f"RCPT TO:<{LOCAL_USER}@{LOCAL_DOMAIN}"),
        line(f"RCPT TO:<{LOCAL_USER}@{LOCAL_DOMAIN}> NOTIFY=NEVER"),
        QUIT,
    ),
    conn(
        "local-users",
        EHLO,
        MAIL,
        RCPT_LOCAL,
        line(f"RCPT TO:<root@{LOCAL_DOMAIN}>"),
        line(f"RCPT TO:<nosuchuser@{LOCAL_DOMAIN}>"),
        line(f"RCPT TO:<{LOCAL_USER}>"),
        line(f"RCPT TO:<webmaster@{LOCAL_DOMAIN}>"),
        line("RSET"),
        QUIT,
    ),
    conn(
        "relay",
        EHLO,
        MAIL,
        line(f"RCPT TO:<{RELAY_TARGET}>"),
        line("DATA"),
        line("RCPT TO:<victim%example.org@example.com>"),
        QUIT,
    ),
    conn(
        "relay-2",
        EHLO,
        MAIL,
        line("RCPT TO:<@example.com:victim@example.org>"),
        line("RCPT TO:<victim@[203.0.113.7]>"),
        QUIT,
    ),
    conn(
        "vrfy-expn",
        EHLO,
        line("VRFY root"),
        line(f"VRFY {LOCAL_USER}"),
        line("VRFY nosuchuser"),
        line(f"VRFY <{LOCAL_USER}@{LOCAL_DOMAIN}>"),
        line("EXPN postmaster"),
        QUIT,
    ),
    conn("vrfy-expn-2", EHLO, line("VRFY"), line("EXPN"), line("EXPN root"), QUIT),
    conn("vrfy-before-helo", line("VRFY root"), line("EXPN root"), QUIT),
    conn(
        "help-topics",
        line("HELP"),
        EHLO,
        line("HELP MAIL"),
        line("HELP RCPT"),
        line("HELP XYZZY"),
        QUIT,
    ),
    conn("etrn", EHLO, line(f"ETRN {LOCAL_DOMAIN}"), line("ETRN"), line("ETRN example.org"), QUIT),
    conn("turn-verb", EHLO, line("TURN"), line("VERB"), line("ATRN"), QUIT),
    conn("xclient", EHLO, line("XCLIENT NAME=spoofed.example ADDR=192.0.2.1"), line("NOOP"), QUIT),
    conn("xforward", EHLO, line("XFORWARD NAME=spoofed.example"), line("NOOP"), QUIT),
    conn("noop-rset-args", EHLO, line("NOOP hello"), line("RSET now"), line("QUIT now")),
    conn(
        "auth-plain",
        EHLO,
        line("AUTH PLAIN " + b64(f"\0{LOCAL_USER}\0wrong-password")),
        line("AUTH PLAIN"),
        line(b64(f"\0{LOCAL_USER}\0still-wrong"), when=334),
        QUIT,
    ),
    conn(
        "auth-login",
        EHLO,
        line("AUTH LOGIN"),
        line(b64(LOCAL_USER), when=334),
        line(b64("wrong-password"), when=334),
        line("AUTH LOGIN " + b64("admin")),
        line(b64("123456"), when=334),
        QUIT,
    ),
    conn(
        "auth-errors",
        EHLO,
        line("AUTH"),
        line("AUTH FOO"),
        line("AUTH PLAIN !!!not-base64!!!"),
        QUIT,
    ),
    conn(
        "auth-cancel",
        EHLO,
        line("AUTH LOGIN"),
        line("*", when=334),
        line("AUTH PLAIN"),
        line("*", when=334),
        line("AUTH PLAIN"),
        line("%%%", when=334),
        QUIT,
    ),
    conn(
        "auth-cram-md5",
        EHLO,
        line("AUTH CRAM-MD5"),
        line(b64(f"{LOCAL_USER} 0123456789abcdef0123456789abcdef"), when=334),
        line("AUTH PLAIN ="),
        QUIT,
    ),
    conn(
        "auth-before-helo",
        line("AUTH PLAIN " + b64(f"\0{LOCAL_USER}\0wrong-password")),
        line(f"HELO {HELO}"),
        line("AUTH PLAIN " + b64(f"\0{LOCAL_USER}\0wrong-password")),
        QUIT,
    ),
    conn(
        "auth-in-transaction",
        EHLO,
        MAIL,
        line("AUTH PLAIN " + b64(f"\0{LOCAL_USER}\0wrong-password")),
        line("RSET"),
        QUIT,
    ),
    conn(
        "starttls",
        EHLO,
        line("STARTTLS"),
        TLS,
        EHLO,
        line("STARTTLS"),
        MAIL,
        RCPT_LOCAL,
        line("DATA"),
        body(MESSAGE),
        line("AUTH PLAIN " + b64(f"\0{LOCAL_USER}\0wrong-password")),
        QUIT,
    ),
    conn("starttls-before-helo", line("STARTTLS"), TLS, MAIL, EHLO, MAIL, QUIT),
    conn(
        "starttls-errors",
        EHLO,
        line("STARTTLS now"),
        line("STARTTLS"),
        TLS,
        MAIL,
        line(f"HELO {HELO}"),
        MAIL,
        QUIT,
    ),
    conn(
        "starttls-in-transaction",
        EHLO,
        MAIL,
        line("STARTTLS"),
        TLS,
        EHLO,
        RCPT_LOCAL,
        QUIT,
    ),
    conn(
        "pipelining",
        EHLO,
        pipeline(
            f"MAIL FROM:<{SENDER}>",
            f"RCPT TO:<{LOCAL_USER}@{LOCAL_DOMAIN}>",
            f"RCPT TO:<nosuchuser@{LOCAL_DOMAIN}>",
            "DATA",
        ),
        body(MESSAGE),
        pipeline("RSET", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<root@{LOCAL_DOMAIN}>", "RSET", "NOOP"),
        pipeline("QUIT"),
    ),
    conn(
        "pipelining-refused",
        EHLO,
        pipeline(f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RELAY_TARGET}>", "DATA"),
        line("QUIT"),
    ),
    conn(
        "pipelining-after-helo",
        pipeline(f"HELO {HELO}", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{LOCAL_USER}@{LOCAL_DOMAIN}>"),
        line("QUIT"),
    ),
    conn(
        "pipelining-ehlo-group",
        pipeline(f"EHLO {HELO}", f"MAIL FROM:<{SENDER}>"),
        line("QUIT"),
    ),
    Connection("early-talker", (Step("early", f"EHLO {HELO}", 2), line("NOOP"), QUIT)),
    conn(
        "long-lines",
        EHLO,
        line("NOOP " + "x" * 600),
        line(f"MAIL FROM:<{'a' * 200}@example.net>"),
        line(f"RCPT TO:<{'b' * 300}@{LOCAL_DOMAIN}>"),
        line("RSET"),
        QUIT,
    ),
    conn("long-helo", line("HELO " + "h" * 600 + ".example.net"), QUIT),
    conn("very-long-line", EHLO, line("NOOP " + "y" * 5000, replies=None), line("NOOP"), QUIT),
    conn(
        "bdat",
        EHLO,
        MAIL,
        RCPT_LOCAL,
        # A server without CHUNKING takes the chunk's lines as commands: read until quiet.
        raw(b"BDAT 22 LAST\r\nSubject: chunk\r\n\r\nhi\r\n", replies=None),
        MAIL,
        RCPT_LOCAL,
        raw(b"BDAT 5\r\nabcde", replies=None),
        line("DATA"),
        raw(b"BDAT 4 LAST\r\nfg\r\n", replies=None),
        QUIT,
    ),
    conn("bdat-no-mail", EHLO, line("BDAT 0 LAST"), line("BDAT"), QUIT),
    conn(
        "data-arguments",
        EHLO,
        MAIL,
        RCPT_LOCAL,
        line("DATA now"),
        line("DATA"),
        body("Subject: bare\n\nline one\nline two"),
        QUIT,
    ),
    conn("quit-variants", line("QUIT")),
    conn("bad-bytes", EHLO, raw(b"NOOP\x00x\r\n"), raw(b"\xff\xfe\xfd\r\n"), line("NOOP"), QUIT),
    conn("bare-lf", EHLO, raw(b"NOOP\n"), line("NOOP"), QUIT),
    conn(
        "too-many-errors",
        EHLO,
        *(line(f"XYZZY{n}") for n in range(1, 12)),
        QUIT,
    ),
    conn(
        "many-recipients",
        EHLO,
        MAIL,
        pipeline(*(f"RCPT TO:<{LOCAL_USER}@{LOCAL_DOMAIN}>" for _ in range(101))),
        line("RSET"),
        QUIT,
    ),
    conn("second-session-message", EHLO, MAIL, RCPT_LOCAL, line("DATA"), body(MESSAGE), QUIT),
    # Per-recipient replies (PRDR, where offered; elsewhere an unknown parameter).
    conn(
        "prdr",
        EHLO,
        line(f"MAIL FROM:<{SENDER}> PRDR"),
        RCPT_LOCAL,
        line(f"RCPT TO:<root@{LOCAL_DOMAIN}>"),
        line("DATA"),
        body(MESSAGE, replies=None),
        QUIT,
    ),
)


def probe_size() -> int:
    """Steps in the probe (connections' banners included)."""
    return sum(len(c.steps) for c in PROBE)


# --- playing the probe ---------------------------------------------------------------------


class _Closed(Exception):
    pass


class _Client:
    def __init__(self, host: str, port: int, source: str, timeout: float) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0)
        )
        self.timeout = timeout
        self.buffer = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _Closed(str(exc)) from None

    def _fill(self, timeout: float) -> bool:
        """More bytes into the buffer; False on timeout. _Closed on EOF."""
        if self.closed:
            raise _Closed("closed")
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (ssl.SSLError, OSError) as exc:
            self.closed = True
            raise _Closed(str(exc)) from None
        if not chunk:
            self.closed = True
            raise _Closed("eof")
        self.buffer += chunk
        return True

    def _take_reply(self) -> list[str] | None:
        """One complete reply from the buffer, or None."""
        lines: list[str] = []
        pos = 0
        while True:
            end = self.buffer.find(b"\n", pos)
            if end < 0:
                return None
            text = self.buffer[pos:end].rstrip(b"\r").decode("utf-8", "replace")
            lines.append(text)
            pos = end + 1
            if len(text) < 4 or text[3] != "-":
                self.buffer = self.buffer[pos:]
                return lines

    def read_replies(self, count: int | None) -> tuple[list[list[str]], str]:
        """``count`` replies (None: until quiet for a moment). The status says how it
        ended: ``ok``, ``timeout`` or ``closed``."""
        replies: list[list[str]] = []
        deadline = time.monotonic() + self.timeout
        quiet = 0.5
        while count is None or len(replies) < count:
            reply = self._take_reply()
            if reply is not None:
                replies.append(reply)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return replies, "ok" if count is None else "timeout"
            try:
                got = self._fill(min(left, quiet) if count is None else left)
            except _Closed:
                return replies, "closed"
            if not got and count is None:
                return replies, "ok"
        # Whatever else is already here came unasked (a reply and a hang-up, say).
        while (extra := self._take_reply()) is not None:
            replies.append(extra)
        return replies, "ok"

    def upgrade(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        assert isinstance(self.sock, socket.socket)
        self.sock.settimeout(self.timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=None)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _payload(step: Step) -> bytes:
    if step.kind in ("line", "early"):
        return step.data.encode("utf-8") + b"\r\n"
    if step.kind == "pipeline":
        return "".join(f"{text}\r\n" for text in step.data).encode()
    if step.kind == "raw":
        return bytes(step.data)
    raise ValueError(step.kind)


def run_connection(
    connection: Connection,
    port: int,
    *,
    host: str = "127.0.0.1",
    source: str = CLIENT_IP,
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """Play one connection; one result per step: ``{"step", "sent", "status", "replies"}``
    with status ``ok``, ``timeout``, ``closed`` (the server hung up before or while
    answering) or ``skipped`` (its ``when`` did not hold, or the connection is gone)."""
    results: list[dict[str, Any]] = []
    client: _Client | None = None
    last_code: int | None = None
    gone = False
    for step in connection.steps:
        result: dict[str, Any] = {"sent": step.describe(), "status": "ok", "replies": []}
        began = time.monotonic()
        results.append(result)
        if gone:
            result["status"] = "skipped"
            continue
        if step.when is not None and last_code != step.when:
            result["status"] = "skipped"
            continue
        try:
            if step.kind in ("banner", "early"):
                client = _Client(host, port, source, timeout)
                if step.kind == "early":
                    client.send(_payload(step))
                replies, status = client.read_replies(step.replies)
            elif step.kind == "tls":
                assert client is not None
                client.upgrade()
                replies, status = [], "ok"
            else:
                assert client is not None
                client.send(_payload(step))
                replies, status = client.read_replies(step.replies)
        except _Closed:
            replies, status = [], "closed"
        except (ssl.SSLError, OSError) as exc:
            replies, status = [[f"<error: {type(exc).__name__}>"]], "closed"
        result["replies"] = replies
        result["status"] = status
        # How long the answer took: products slow down on errors (tarpits), which a
        # persona may or may not copy; informational, not compared.
        result["seconds"] = round(time.monotonic() - began, 1)
        if replies and replies[-1] and replies[-1][-1][:3].isdigit():
            last_code = int(replies[-1][-1][:3])
        else:
            last_code = None
        if status == "closed" or (client is not None and client.closed):
            gone = True
    if client is not None:
        client.close()
    return results


def run_probe(
    port: int,
    *,
    host: str = "127.0.0.1",
    source: str = CLIENT_IP,
    timeout: float = 10.0,
    probe: Sequence[Connection] = PROBE,
) -> list[dict[str, Any]]:
    """Play every connection in turn; one result per step, with the connection's name."""
    out: list[dict[str, Any]] = []
    for connection in probe:
        for index, result in enumerate(
            run_connection(connection, port, host=host, source=source, timeout=timeout)
        ):
            out.append({"connection": connection.name, "index": index, **result})
    return out


# --- comparing -------------------------------------------------------------------------------

_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
#: An RFC 5322 date. Only the moment is normalised, not the form: a one- or two-digit day
#: and the zone as written (``+0000``, ``GMT``, ``+0000 (UTC)``) stay visible, because a
#: scanner can tell products apart by them.
_DATE = re.compile(rf"{_DAY}, +(\d{{1,2}}) {_MONTH} \d{{4}} \d\d:\d\d:\d\d(?= )")
#: Queue ids as each product writes them, in the replies that carry them.
_QUEUE_IDS = (
    re.compile(r"(?<=queued as )[0-9A-F]{10,12}\b"),  # Postfix
    re.compile(r"(?<=queued as )[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{11,}\b"),  # long ids
    re.compile(r"\b[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}\b"),  # Exim < 4.97
    re.compile(r"\b[0-9A-Za-x]{8}[0-9]{6}\b"),  # Sendmail
)
_CHALLENGE = re.compile(r"^334 ([A-Za-z0-9+/]{16,}={0,2})$")


def normalise_line(text: str, hostnames: Iterable[str]) -> str:
    """One reply line with what differs between any two runs replaced: the server's host
    name(s), dates, queue ids, a CRAM-MD5 challenge."""
    for name in sorted({h for h in hostnames if h}, key=len, reverse=True):
        text = re.sub(re.escape(name), "HOST", text, flags=re.I)
    text = _DATE.sub(lambda m: "DAY, " + "D" * len(m[1]) + " MON YYYY HH:MM:SS", text)
    for pattern in _QUEUE_IDS:
        text = pattern.sub("QUEUEID", text)
    match = _CHALLENGE.match(text)
    if match:
        try:
            decoded = base64.b64decode(match[1]).decode("latin-1")
        except ValueError:
            decoded = ""
        if decoded.startswith("<") and decoded.endswith(">"):
            text = "334 CHALLENGE"
    return text


def normalise(result: Mapping[str, Any], hostnames: Iterable[str]) -> dict[str, Any]:
    names = list(hostnames)
    return {
        "status": result["status"],
        "replies": [[normalise_line(t, names) for t in reply] for reply in result["replies"]],
    }


@dataclass
class Comparison:
    total: int
    equal: int
    differences: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.equal / self.total if self.total else 1.0


def step_key(result: Mapping[str, Any]) -> str:
    return f"{result['connection']}#{result['index']}"


def compare(
    expected: Sequence[Mapping[str, Any]],
    got: Sequence[Mapping[str, Any]],
    *,
    expected_hosts: Iterable[str],
    got_hosts: Iterable[str],
) -> Comparison:
    """Step by step, after normalising each side with its own host names. A step counts
    as equal when status and every reply line are equal."""
    by_key = {step_key(r): r for r in got}
    exp_hosts, got_hosts = list(expected_hosts), list(got_hosts)
    out = Comparison(total=len(expected), equal=0)
    for want in expected:
        key = step_key(want)
        have = by_key.get(key)
        want_n = normalise(want, exp_hosts)
        have_n = normalise(have, got_hosts) if have else {"status": "missing", "replies": []}
        if want_n == have_n:
            out.equal += 1
        else:
            out.differences.append(
                {"step": key, "sent": want["sent"], "expected": want_n, "got": have_n}
            )
    return out


# --- the recorder ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Record the calibration probe against a server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--source", default=CLIENT_IP)
    parser.add_argument("--product", required=True, help="name for the metadata, e.g. postfix")
    parser.add_argument(
        "--server-hostname", action="append", default=[], help="host names to normalise"
    )
    parser.add_argument("--meta", action="append", default=[], help="KEY=VALUE for metadata")
    parser.add_argument("--meta-file", action="append", default=[], help="KEY=FILE for metadata")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    started = time.time()
    steps = run_probe(args.port, host=args.host, source=args.source)
    meta: dict[str, Any] = {
        "product": args.product,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "client_ip": args.source,
        "helo": HELO,
        "local_domain": LOCAL_DOMAIN,
        "local_user": LOCAL_USER,
        "server_hostnames": args.server_hostname,
        "steps": len(steps),
        "connections": len(PROBE),
    }
    for item in args.meta:
        key, _, value = item.partition("=")
        meta[key] = value
    for item in args.meta_file:
        key, _, path = item.partition("=")
        meta[key] = Path(path).read_text(errors="replace").splitlines()
    Path(args.out).write_text(json.dumps({"meta": meta, "steps": steps}, indent=1) + "\n")
    print(f"{args.product}: {len(steps)} steps in {meta['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
