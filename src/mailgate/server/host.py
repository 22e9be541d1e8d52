"""What the parts of the server ask of each other, as interfaces.

The server (:mod:`.app`) owns listeners and limits and makes one
:class:`~.connection.ConnectionDriver` per accepted socket; the driver needs a few things
from the server that made it (settings, hooks, limits, ids) and the process runner
(:mod:`.runner`) needs a server to start and stop. Both needs are written down here, so
that :mod:`.connection` and :mod:`.runner` depend on this module instead of on the server
class: imports inside ``mailgate.server`` run one way only (app -> connection -> host,
app -> runner -> host).
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Protocol

from mailgate.hooks import Hooks, Message, Session
from mailgate.protocol import ProtocolConfig, Reply

from .options import ServerOptions
from .spool import SpoolFile, SpoolPool
from .stats import ServerStats

__all__ = ["ConnectionHost", "HostedConnection", "RunnableServer", "SessionRecorder"]


class SessionRecorder(Protocol):
    """The transcript tap (``SMTPServer.recorder``): told what crosses the wire of every
    connection, including those refused at once (client limits, a bad PROXY header).
    Called on the event loop: every method must be quick and must not block (a store
    queues the records for a thread of its own). An exception stops recording of that
    connection and is logged; the connection itself goes on."""

    def opened(self, session: Session) -> None:
        """A connection began: after the PROXY header (``session.peer_host`` is the real
        client), before the banner; first of all for a connection refused at once."""

    def received(self, session: Session, line: bytes) -> None:
        """A command line or AUTH continuation line as parsed, without its line end
        (message content never comes here); bytes a client sent before the banner."""

    def sent(self, session: Session, data: bytes) -> None:
        """Bytes written to the client: one or more rendered replies, CRLF-terminated."""

    def tls(self, session: Session) -> None:
        """A TLS handshake finished (STARTTLS, or SMTPS right after ``opened``);
        ``session.tls`` is set."""

    def closed(self, session: Session, reason: str) -> None:
        """The connection is gone; ``reason`` e.g. ``quit``, ``peer-closed``,
        ``idle-timeout``, ``command-timeout``, ``data-too-slow``, ``session-timeout``,
        ``tls-failed``, ``refused``, ``too-many-auth-failures``, ``shutdown``,
        ``internal-error``, ``max-session`` (the honeypot's)."""


class HostedConnection(Protocol):
    """What the server reads from and asks of one of its connections."""

    #: The client's address the per-IP limit counts (the PROXY header's, once read).
    peer_ip: str

    @property
    def session(self) -> Session | None:
        """The session, once the connection was admitted (None before)."""

    def refuse(self, reply: Reply, reason: str = "refused") -> None:
        """Send ``reply`` outside the SMTP dialogue and close; ``reason`` goes to the
        recorder."""

    def begin_shutdown(self) -> None:
        """Close when idle, else after the transaction in flight."""

    def abort(self) -> None:
        """Close at once, telling the client why."""


class ConnectionHost(Protocol):
    """What a connection driver needs from the server that accepted it. Attributes are
    read on every use (not copied), so a reload (new options, certificate, protocol
    settings) reaches connections at their next command."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def options(self) -> ServerOptions: ...

    @property
    def hooks(self) -> Hooks: ...

    @property
    def protocol_config(self) -> ProtocolConfig: ...

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The STARTTLS context; None: STARTTLS is answered 454."""

    @property
    def spooling(self) -> bool:
        """Whether messages are written to a spool file (else they are counted only)."""

    @property
    def spool_dir(self) -> Path: ...

    @property
    def spool_pool(self) -> SpoolPool | None:
        """Spool files made ahead (None before start and in sink mode)."""

    @property
    def recorder(self) -> SessionRecorder | None:
        """The transcript tap for connections made from now on."""

    @property
    def stats(self) -> ServerStats:
        """The counters the metrics exporter reads (one increment per event)."""

    def admit(self, connection: HostedConnection) -> Reply | None:
        """Count a new connection in, or say why not (the connection then refuses)."""

    def rebind_ip(self, connection: HostedConnection, ip: str) -> Reply | None:
        """After a PROXY header: count ``connection`` under the client's real address
        ``ip`` (the connection sets its ``peer_ip`` after this call); a reply when that
        address is over its limit."""

    def release(self, connection: HostedConnection) -> None:
        """The connection is gone: uncount it, and run the close hooks for its session
        (in the background)."""

    def is_trusted(self, ip: str) -> bool:
        """Whether ``ip`` may send XCLIENT/XFORWARD."""

    def new_id(self) -> str:
        """A new session or queue id, unique across restarts and workers."""

    def message_accepted(self) -> None:
        """Count one accepted message."""

    async def deliver_later(self, message: Message, spool: SpoolFile) -> None:
        """Start the background (``required = False``) message steps for ``message``."""


class RunnableServer(Protocol):
    """What :mod:`.runner` starts, reloads and stops (``SMTPServer`` is one)."""

    @property
    def options(self) -> ServerOptions: ...

    @property
    def messages_accepted(self) -> int: ...

    async def start(self, *, reuse_port: bool = False) -> None: ...

    async def shutdown(self) -> None: ...

    def reload(self, options: ServerOptions) -> None: ...
