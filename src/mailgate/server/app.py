"""The server of one process: listeners, connection limits, TLS context, shutdown, reload."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import itertools
import logging
import os
import ssl
import time
from collections import Counter
from pathlib import Path

from mailgate import hooks as H
from mailgate.protocol import ProtocolConfig, Reply

from .connection import SMTPConnection
from .errors import StartupError
from .options import ListenAddress, ServerOptions
from .tls import create_server_context, ensure_dev_certificate

log = logging.getLogger("mailgate.server")

_TOO_MANY_CLIENTS = Reply(421, "4.7.0", ("Too many connections, try again later",))
_TOO_MANY_FROM_IP = Reply(421, "4.7.0", ("Too many connections from your address",))
_PROXY_NOT_ALLOWED = Reply(421, "4.7.0", ("Connections must come through the proxy",))


def protocol_config(options: ServerOptions, *, tls: bool, auth: bool) -> ProtocolConfig:
    return ProtocolConfig(
        hostname=options.hostname,
        lmtp=options.lmtp,
        max_message_size=options.max_size or None,
        max_recipients=options.max_recipients,
        max_command_line=options.max_command_line,
        max_unknown_commands=options.max_unknown_commands,
        max_bad_commands=options.max_bad_commands,
        bare_newline=options.bare_newline,
        starttls=tls,
        auth_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5") if auth else (),
        auth_requires_tls=not options.allow_insecure_auth,
        xclient=bool(options.trusted_networks),
        xforward=bool(options.trusted_networks),
    )


class Server:
    """Listens, admits connections within limits, and shuts down gracefully."""

    def __init__(self, options: ServerOptions, hooks: H.Hooks | None = None) -> None:
        self.options = options
        self.hooks = hooks or H.Hooks()
        self.loop = asyncio.get_running_loop()
        self.connections: set[SMTPConnection] = set()
        self.per_ip: Counter[str] = Counter()
        self.messages_accepted = 0
        self.ssl_context: ssl.SSLContext | None = None
        self.spool_dir = self._spool_dir()
        self.spooling = options.delivery != "sink" or self.hooks.has("message")
        self.protocol_config = protocol_config(options, tls=False, auth=False)
        self.listening: list[tuple[ListenAddress, tuple[str, int]]] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._ids = itertools.count(1)
        self._id_prefix = _id_prefix()
        self._closed = asyncio.Event()
        self._dev_certificate: Path | None = None

    # --- start and stop -----------------------------------------------------------------------

    async def start(self, *, reuse_port: bool = False) -> None:
        options = self.options
        self._load_tls()
        self.protocol_config = protocol_config(
            options, tls=self.ssl_context is not None, auth=self.hooks.has("auth")
        )
        if self.spooling:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        for address in options.listen:
            await self._listen(address, reuse_port)
        if self._dev_certificate is not None:
            log.warning(
                "no --tls-cert/--tls-key given: using a self-signed development certificate "
                "from %s (clients will not trust it)",
                self._dev_certificate,
            )

    async def _listen(self, address: ListenAddress, reuse_port: bool) -> None:
        if (
            address.implicit_tls and self.ssl_context is None
        ):  # pragma: no cover - _load_tls makes one
            raise StartupError(f"{address}: implicit TLS needs a certificate")
        expect_proxy = bool(self.options.proxy_protocol)

        def factory() -> SMTPConnection:
            return SMTPConnection(
                self, implicit_tls=address.implicit_tls, expect_proxy=expect_proxy
            )

        try:
            server = await self.loop.create_server(
                factory,
                host=address.host,
                port=address.port,
                ssl=self.ssl_context if address.implicit_tls else None,
                reuse_address=True,
                reuse_port=reuse_port or None,
                backlog=1024,
                ssl_handshake_timeout=30.0 if address.implicit_tls else None,
            )
        except OSError as exc:
            # asyncio's own message repeats the address; the errno text is enough.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise StartupError(f"cannot listen on {address}: {reason}") from None
        self._servers.append(server)
        for sock in server.sockets:
            bound = sock.getsockname()
            self.listening.append((address, (bound[0], bound[1])))
            kind = "SMTPS" if address.implicit_tls else ("LMTP" if self.options.lmtp else "SMTP")
            log.info("listening on %s port %d (%s)", bound[0], bound[1], kind)

    def _load_tls(self) -> None:
        options = self.options
        cert, key = options.tls_cert, options.tls_key
        if cert is None or key is None:
            cert, key = ensure_dev_certificate(options.state_dir, options.hostname)
            self._dev_certificate = cert.parent
        try:
            self.ssl_context = create_server_context(cert, key)
        except ValueError as exc:
            raise StartupError(str(exc)) from None

    def reload(self, options: ServerOptions) -> None:
        """SIGHUP: take new settings for new connections; keep existing ones."""
        if options.listen != self.options.listen or options.workers != self.options.workers:
            log.warning("reload: listen addresses and workers change only on restart")
        old_context = self.ssl_context
        self.options = options
        try:
            self._load_tls()
        except StartupError as exc:
            log.error("reload: keeping the old certificate: %s", exc)
            self.ssl_context = old_context
        self.protocol_config = protocol_config(
            options, tls=self.ssl_context is not None, auth=self.hooks.has("auth")
        )
        log.info("configuration reloaded")

    async def shutdown(self) -> None:
        """Stop accepting, let transactions in flight finish for close_timeout, then close."""
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.begin_shutdown()
        deadline = self.loop.time() + self.options.close_timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()
        for server in self._servers:
            await server.wait_closed()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # --- what connections ask ---------------------------------------------------------------------

    def admit(self, connection: SMTPConnection) -> Reply | None:
        """Admit a new connection or say why not (max clients, per-IP, PROXY sources)."""
        options = self.options
        ip = connection.peer_ip
        if options.proxy_protocol and not _in_networks(ip, options.proxy_protocol):
            return _PROXY_NOT_ALLOWED
        if len(self.connections) >= options.max_clients:
            log.warning("refusing %s: %d connections (--max-clients)", ip, len(self.connections))
            return _TOO_MANY_CLIENTS
        if not options.proxy_protocol and self.per_ip[ip] >= options.max_clients_per_ip:
            log.info("refusing %s: too many connections from this address", ip)
            return _TOO_MANY_FROM_IP
        self.connections.add(connection)
        self.per_ip[ip] += 1
        return None

    def rebind_ip(self, connection: SMTPConnection, ip: str) -> None:
        """After a PROXY header the per-IP limit applies to the real client address."""
        self._forget_ip(connection.peer_ip)
        over = self.per_ip[ip] >= self.options.max_clients_per_ip
        connection.peer_ip = ip
        self.per_ip[ip] += 1  # released in connection_lost like any other
        if over:
            log.info("refusing %s (via PROXY): too many connections from this address", ip)
            connection.refuse(_TOO_MANY_FROM_IP)

    def release(self, connection: SMTPConnection) -> None:
        self.connections.discard(connection)
        self._forget_ip(connection.peer_ip)

    def _forget_ip(self, ip: str) -> None:
        count = self.per_ip[ip] - 1
        if count > 0:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)

    def is_trusted(self, ip: str) -> bool:
        return _in_networks(ip, self.options.trusted_networks)

    def new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):06X}"

    def hooks_close(self, session: H.Session) -> None:
        if self.hooks.has("close"):
            self.loop.create_task(self.hooks.run("close", session))

    def _spool_dir(self) -> Path:
        options = self.options
        if options.delivery == "maildir":
            # Spooling inside the Maildir's tmp/ makes delivery a hard link: no copy.
            return options.maildir / "tmp"
        return options.state_dir / "spool"


def _in_networks(
    ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _id_prefix() -> str:
    """Queue ids unique across restarts and worker processes: time, pid, then a counter."""
    raw = int(time.time()).to_bytes(5, "big") + os.getpid().to_bytes(4, "big")
    return base64.b32encode(raw).decode().rstrip("=")[-10:]
