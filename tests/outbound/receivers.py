"""Receiving servers for the outbound tests, on loopback addresses 127.0.0.x.

:class:`Receiver` is an aiosmtpd server in its own thread whose behaviour a test sets
on cue (replies per recipient, a reply to the message, a dropped connection, a slow
DATA) and which records what it got: messages, sessions, STARTTLS attempts, the most
transactions in flight at once. :class:`RawServer` is a bare asyncio listener for what
aiosmtpd cannot do (a 4xx/5xx greeting, a sink that throws the message away).
:func:`mailgate_server` is mailgate's own server, for DSN, PIPELINING, AUTH and LMTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailgate import Server, hooks

#: The test-DNS names use these addresses; a test picks its own.
LOOPBACK = "127.0.0.{}"


def free_port(hosts: range = range(2, 64)) -> int:
    """A TCP port that is free on every 127.0.0.x the tests use (bounded tries)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((LOOPBACK.format(hosts[0]), 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((LOOPBACK.format(host), port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all test loopback addresses")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    rcpt_options: dict[str, list[str]]
    data: bytes
    tls: bool
    session: int


@dataclass
class Cue:
    """What the receiver does; a test may change it between deliveries."""

    #: address -> reply to its RCPT (e.g. "550 5.1.1 No such user"); others get 250.
    rcpt: dict[str, str] = field(default_factory=dict)
    #: The reply to the end of the message (None: 250).
    data_reply: str | None = None
    #: "rcpt": drop the connection at the first RCPT; "data": after the message arrived.
    drop: str | None = None
    #: Seconds the server takes over each message (for concurrency tests).
    data_delay: float = 0.0


class _Handler:
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self._rcpt_options: dict[tuple[int, str], list[str]] = {}

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        with self.receiver.lock:
            self.receiver.sessions.add(id(session))
            self.receiver.ehlo_names.append(hostname)
        session.host_name = hostname
        return responses

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        cue = self.receiver.cue
        if cue.drop == "rcpt":
            assert server.transport is not None
            server.transport.abort()
            return "421 gone"
        reply = cue.rcpt.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        self._rcpt_options[id(envelope), address] = rcpt_options
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        receiver = self.receiver
        cue = receiver.cue
        with receiver.lock:
            receiver.active += 1
            receiver.max_active = max(receiver.max_active, receiver.active)
        try:
            if cue.data_delay:
                await asyncio.sleep(cue.data_delay)
        finally:
            with receiver.lock:
                receiver.active -= 1
        if cue.drop == "data":
            assert server.transport is not None
            server.transport.abort()
            return "421 gone"
        if cue.data_reply is not None:
            return cue.data_reply
        options = {
            address: self._rcpt_options.pop((id(envelope), address), [])
            for address in envelope.rcpt_tos
        }
        with receiver.lock:
            receiver.messages.append(
                Received(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=list(envelope.rcpt_tos),
                    mail_options=list(envelope.mail_options),
                    rcpt_options=options,
                    data=bytes(envelope.original_content or b""),
                    tls=session.ssl is not None,
                    session=id(session),
                )
            )
        return "250 2.0.0 Ok: queued"


class _CountingSMTP(SMTP):
    receiver: Receiver

    async def smtp_STARTTLS(self, arg: str) -> None:
        with self.receiver.lock:
            self.receiver.starttls += 1
        await super().smtp_STARTTLS(arg)


class _Controller(Controller):
    receiver: Receiver

    def factory(self) -> SMTP:
        server = _CountingSMTP(self.handler, **self.SMTP_kwargs)
        server.receiver = self.receiver
        return server


class Receiver:
    """An aiosmtpd server on ``host:port`` (a thread of its own) with a :class:`Cue`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls_context: ssl.SSLContext | None = None,
        smtputf8: bool = True,
        size_limit: int = 33_554_432,
        name: str = "receiver.test",
    ) -> None:
        self.cue = Cue()
        self.lock = threading.Lock()
        self.messages: list[Received] = []
        self.sessions: set[int] = set()
        self.ehlo_names: list[str] = []
        self.starttls = 0
        self.active = 0
        self.max_active = 0
        self.host, self.port = host, port
        self._controller = _Controller(
            _Handler(self),
            hostname=host,
            port=port,
            server_hostname=name,
            tls_context=tls_context,
            require_starttls=False,
            enable_SMTPUTF8=smtputf8,
            decode_data=False,
            data_size_limit=size_limit,
            ready_timeout=10,
        )
        self._controller.receiver = self

    def __enter__(self) -> Receiver:
        self._controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._controller.stop()

    @property
    def session_count(self) -> int:
        """Sessions that said EHLO (aiosmtpd's own start-up probe never does)."""
        return len(self.sessions)


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A bare asyncio listener in the test's loop; ``connections`` counts accepts."""

    def __init__(self, host: str, port: int, behaviour: Behaviour) -> None:
        self.host, self.port = host, port
        self.behaviour = behaviour
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with asyncio.timeout(30):
                await self.behaviour(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)


def greeting(reply: str) -> Behaviour:
    """A server that answers every connection with ``reply`` and then QUIT with 221."""

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(reply.encode() + b"\r\n")
        await writer.drain()
        for _ in range(10):
            line = await reader.readline()
            if not line or line.upper().startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                break
            writer.write(b"503 go away\r\n")

    return behaviour


def sink(counter: list[int]) -> Behaviour:
    """A minimal SMTP server that counts the message's bytes and keeps none of them."""

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.test ESMTP\r\n")
        for _ in range(100):
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"LHLO"):
                writer.write(b"250-sink.test\r\n250-8BITMIME\r\n250 SIZE\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                tail = b""
                while True:
                    chunk = await reader.read(1 << 16)
                    if not chunk:
                        return
                    counter[0] += len(chunk)
                    tail = (tail + chunk)[-5:]
                    if tail == b"\r\n.\r\n":
                        break
                writer.write(b"250 2.0.0 swallowed\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    return behaviour


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path

    def server_context(self, *names: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*names).configure_cert(context)
        return context

    def files(self, directory: Path, *names: str) -> tuple[Path, Path]:
        """A certificate chain and key file for ``names`` (for a mailgate server)."""
        leaf = self.ca.issue_cert(*names)
        cert, key = directory / "cert.pem", directory / "key.pem"
        with cert.open("wb") as out:
            for blob in leaf.cert_chain_pems:
                out.write(blob.bytes())
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key


@dataclass
class Seen:
    """What a mailgate server's message hook saw."""

    messages: list[tuple[hooks.Session, hooks.Envelope, bytes]] = field(default_factory=list)

    async def on_message(
        self, session: hooks.Session, envelope: hooks.Envelope, message: hooks.Message
    ) -> None:
        self.messages.append((session, envelope, await message.read()))


@asynccontextmanager
async def mailgate_server(
    tmp_path: Path,
    certs: Certs,
    listen: str | list[str],
    name: str,
    *,
    cert_names: tuple[str, ...] = (),
    **extra: Any,
) -> AsyncIterator[tuple[Server, Seen]]:
    """A receiving mailgate server in the test's own loop (it offers PIPELINING, DSN,
    SMTPUTF8, STARTTLS with a certificate for ``name`` and ``cert_names``, AUTH, LMTP)."""
    directory = tmp_path / name
    directory.mkdir()
    cert, key = certs.files(directory, name, *cert_names)
    server = Server(
        hostname=name,
        listen=listen,
        state_dir=directory / "state",
        tls_cert=cert,
        tls_key=key,
        auth_failure_delay=0,
        maildir=directory / "maildir",
        **extra,
    )
    seen = Seen()
    server.on_message(seen.on_message)
    async with server:
        yield server, seen
