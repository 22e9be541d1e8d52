"""The server of one process: listeners, connection limits, TLS context, shutdown, reload.

:class:`SMTPServer` is the core: it takes its options and hooks from outside and knows no
configuration reader and no plugin. ``mailgate.Server`` (in ``mailgate.composition``) is
the same server built from settings, with the built-in plugins those settings ask for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import ipaddress
import itertools
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar, cast, overload

from mailgate.hooks import HookError, Hooks, Message, Middleware, Reject, Session, TempFail
from mailgate.hooks.logs import LogLimiter
from mailgate.protocol import COMPILED, ProtocolConfig, Reply
from mailgate.protocol.persona import DEFAULT_PERSONA

from .connection import ConnectionDriver
from .errors import StartupError
from .host import HostedConnection, SessionRecorder
from .options import ListenAddress, ServerOptions
from .spool import SpoolFile, SpoolPool
from .stats import ServerStats
from .tls import add_certificates, create_server_context, ensure_dev_certificate

log = logging.getLogger("mailgate.server")
#: Refused connections come as fast as a client can open them: a few lines a minute of
#: each kind, with the count of those held back.
_refusals = LogLimiter(burst=5, interval=60.0)

#: What an auth callback can check: a password (PLAIN, LOGIN).
DEFAULT_MECHANISMS = ("PLAIN", "LOGIN")
F = TypeVar("F", bound=Callable[..., Any])


class Register(Protocol):
    """What ``server.on_rcpt`` and the other stage decorators are: used bare
    (``@server.on_rcpt``) they return the function; called with ordering arguments
    (``@server.on_rcpt(before="maildir")``) they return the decorator."""

    @overload
    def __call__(self, func: F, /) -> F: ...
    @overload
    def __call__(
        self,
        func: None = None,
        /,
        *,
        name: str | None = None,
        before: str | Sequence[str] = (),
        after: str | Sequence[str] = (),
    ) -> Callable[[F], F]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class StartPlugins:
    """Plugins a server adds when it starts (see :meth:`SMTPServer.start_plugins`):
    ``first`` ahead of every plugin registered in code, in this order; ``last`` after
    them."""

    first: Sequence[Any] = ()
    last: Sequence[Any] = ()


def protocol_config(
    options: ServerOptions, *, tls: bool, auth: tuple[str, ...] | bool
) -> ProtocolConfig:
    """The protocol settings for ``options``; ``auth``: the SASL mechanisms to offer."""
    if auth is True:
        auth = options.auth_mechanisms or DEFAULT_MECHANISMS
    elif auth is False:
        auth = ()
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
        auth_mechanisms=auth,
        auth_requires_tls=not options.allow_insecure_auth,
        max_auth_failures=options.max_auth_failures,
        xclient=bool(options.trusted_networks),
        xforward=bool(options.trusted_networks),
        persona=options.persona or DEFAULT_PERSONA,
    )


class SMTPServer:
    """An SMTP/LMTP server: listeners, hooks, limits, graceful shutdown.

    The core server: construct it with a ready :class:`ServerOptions` (and optionally
    :class:`~mailgate.hooks.Hooks`); it adds no plugin of its own. Register hooks with the
    ``on_<stage>`` decorators, :meth:`add_plugin` and :meth:`use`, then
    ``await server.start()`` / ``await server.stop()``, ``async with server:``, or
    :meth:`run` in a script. A subclass adds plugins at start by overriding
    :meth:`start_plugins`. Most programs want ``mailgate.Server``, which takes the
    settings of ``mailgate serve`` and adds the plugins they ask for.
    """

    def __init__(self, options: ServerOptions, hooks: Hooks | None = None) -> None:
        self.options = options
        self.hooks = hooks or Hooks()
        self.hooks.timeout = options.hook_timeout
        self.hooks.message_timeout = options.delivery_timeout
        self.connections: set[HostedConnection] = set()
        #: The transcript tap: told every command and reply of each connection made after
        #: it is set (see SessionRecorder). None: nothing recorded, at no cost.
        self.recorder: SessionRecorder | None = None
        #: Open connections per client address (a plain dict: a Counter's missing key is a
        #: Python-level call, at every connection).
        self.per_ip: dict[str, int] = {}
        self.messages_accepted = 0
        #: Counters for the metrics exporter (mailgate.console), read at scrape time.
        self.stats = ServerStats()
        self.ssl_context: ssl.SSLContext | None = None
        self.spool_dir = self._spool_dir()
        self.spooling = False
        #: Spool files made ahead (when the server spools): no thread hop per message.
        self.spool_pool: SpoolPool | None = None
        self.protocol_config = protocol_config(options, tls=False, auth=False)
        self.listening: list[tuple[ListenAddress, tuple[str, int]]] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._id_prefix = _id_prefix()
        self._closed: asyncio.Event | None = None
        self._dev_certificate: Path | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._start_plugins_added = False
        self._started = False

    # --- registering hooks --------------------------------------------------------------------

    @overload
    def on(self, stage: str, func: F, /) -> F: ...
    @overload
    def on(
        self,
        stage: str,
        func: None = None,
        /,
        *,
        name: str | None = None,
        before: str | Sequence[str] = (),
        after: str | Sequence[str] = (),
    ) -> Callable[[F], F]: ...
    def on(self, stage: str, func: Any = None, /, **order: Any) -> Any:
        """Register a callback (async or plain) for ``stage``: ``server.on("rcpt", f)``,
        or as a decorator, ``@server.on("rcpt")`` / ``@server.on("rcpt", before="x")``."""
        if func is None:
            return lambda f: self.hooks.on(stage, f, **order)
        return self.hooks.on(stage, func, **order)

    @property
    def on_connect(self) -> Register:
        """``(session)``: a client connected (after PROXY), before the banner.
        ``@server.on_connect`` or ``@server.on_connect(name=..., before=..., after=...)``."""
        return cast(Register, functools.partial(self.on, "connect"))

    @property
    def on_tls(self) -> Register:
        """``(session)``: a TLS handshake finished (STARTTLS, or an SMTPS connection before
        the banner); ``session.tls`` is filled in.
        ``@server.on_tls`` or ``@server.on_tls(name=..., before=..., after=...)``."""
        return cast(Register, functools.partial(self.on, "tls"))

    @property
    def on_helo(self) -> Register:
        """``(session, hostname)``: HELO, EHLO or LHLO (``session.esmtp`` tells which).
        ``@server.on_helo`` or ``@server.on_helo(name=..., before=..., after=...)``."""
        return cast(Register, functools.partial(self.on, "helo"))

    @property
    def on_auth(self) -> Register:
        """``(session, auth)``: check an :class:`~mailgate.hooks.AuthAttempt`; return
        True/Accept to let the user in, None to leave it to the next backend (nothing
        deciding means 535).
        ``@server.on_auth`` or ``@server.on_auth(name=..., before=..., after=...)``."""
        return cast(Register, functools.partial(self.on, "auth"))

    @property
    def on_mail(self) -> Register:
        """``(session, envelope, address)``: MAIL FROM; ``address`` is ``""`` for ``<>``.
        ``@server.on_mail`` or ``@server.on_mail(name=..., before=..., after=...)``."""
        return cast(Register, functools.partial(self.on, "mail"))

    @property
    def on_rcpt(self) -> Register:
        """``(session, envelope, address)``: RCPT TO, before the address joins the envelope.
        ``@server.on_rcpt`` or ``@server.on_rcpt(name=..., before=..., after=...)``."""
        return cast(Register, functools.partial(self.on, "rcpt"))

    @property
    def on_vrfy(self) -> Register:
        """``(session, argument, expand)``: VRFY (``expand`` False) or EXPN (True); a reply
        replaces the usual one. ``@server.on_vrfy`` or ``@server.on_vrfy(name=...)``."""
        return cast(Register, functools.partial(self.on, "vrfy"))

    @property
    def on_data_start(self) -> Register:
        """``(session, envelope)``: DATA or the first BDAT, before any message byte.
        ``@server.on_data_start`` or ``@server.on_data_start(name=..., before=..., after=...)``."""
        return cast(Register, functools.partial(self.on, "data_start"))

    @property
    def on_message(self) -> Register:
        """``(session, envelope, message)``: the message is complete (spooled to disk).
        ``@server.on_message`` or ``@server.on_message(name=..., before=..., after=...)``."""
        return cast(Register, functools.partial(self.on, "message"))

    @property
    def on_reset(self) -> Register:
        """``(session, envelope)``: a transaction ended without a message (RSET, ...).
        ``@server.on_reset`` or ``@server.on_reset(name=..., before=..., after=...)``."""
        return cast(Register, functools.partial(self.on, "reset"))

    @property
    def on_close(self) -> Register:
        """``(session)``: the connection closed.
        ``@server.on_close`` or ``@server.on_close(name=..., before=..., after=...)``."""
        return cast(Register, functools.partial(self.on, "close"))

    def add_plugin(
        self,
        plugin: Any,
        *,
        name: str | None = None,
        before: str | tuple[str, ...] | list[str] = (),
        after: str | tuple[str, ...] | list[str] = (),
    ) -> Any:
        """Add a plugin object (a ``name`` and ``on_<stage>`` methods) in chain order."""
        return self.hooks.add(plugin, name=name, before=before, after=after)

    def use(self, middleware: Middleware) -> Middleware:
        """Add middleware ``async def mw(ctx, call_next)`` around every stage."""
        return self.hooks.use(middleware)

    # --- start and stop -----------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    @property
    def address(self) -> tuple[str, int]:
        """The first bound (host, port): with ``listen="127.0.0.1:0"``, the real port."""
        if not self.listening:
            raise RuntimeError("the server is not listening; await server.start() first")
        return self.listening[0][1]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [bound for _, bound in self.listening]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def run(self) -> int:
        """Run until SIGINT/SIGTERM, in this thread (for scripts): uvloop when installed,
        logging set up as for ``mailgate serve``. Returns the exit status."""
        from .runner import run_server

        return run_server(self)

    async def start(self, *, reuse_port: bool = False) -> None:
        if self._started:
            raise RuntimeError("the server is already started")
        options = self.options
        self._closed = asyncio.Event()
        # Which build of the protocol runs (setup.py, MAILGATE_COMPILE=1): for benchmarks.
        log.debug("mailgate.protocol: %s", "compiled with mypyc" if COMPILED else "pure Python")
        self._add_start_plugins()
        try:
            self.hooks.check()
        except HookError as exc:
            raise StartupError(str(exc)) from None
        self._load_tls()
        self.spooling = options.delivery != "sink" or self.hooks.has_steps("message")
        self.protocol_config = protocol_config(
            options, tls=self.ssl_context is not None, auth=self._mechanisms()
        )
        if self.spooling:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            await self.loop.run_in_executor(None, self.remove_orphans)
            self.spool_pool = SpoolPool(self.spool_dir)
        if not self.protocol_config.auth_mechanisms and any(a.submission for a in options.listen):
            log.warning(
                "submission listeners but no AUTH backend (auth_users, users_file or an auth "
                "hook): every MAIL there will be refused with 530"
            )
        self._started = True
        try:
            for address in options.listen:
                await self._listen(address, reuse_port)
        except BaseException:
            await self._close_listeners()
            self._started = False
            raise
        await self._start_plugin_tasks()
        if self._dev_certificate is not None:
            log.warning(
                "no --tls-cert/--tls-key given: using a self-signed development certificate "
                "from %s (clients will not trust it)",
                self._dev_certificate,
            )

    async def stop(self) -> None:
        """Graceful shutdown (see :meth:`shutdown`); safe to call twice."""
        if self._started:
            await self.shutdown()

    def start_plugins(self) -> StartPlugins:
        """The plugins to add when the server starts, asked once, at the first
        :meth:`start`, after the hooks registered in code. The core server adds none;
        ``mailgate.Server`` overrides this with the built-in plugins its settings ask for.
        A ValueError or OSError raised here (a bad policy table, an unreadable list file)
        stops the start as a :class:`StartupError`."""
        return StartPlugins()

    def _add_start_plugins(self) -> None:
        if self._start_plugins_added:
            return
        self._start_plugins_added = True
        try:
            plugins = self.start_plugins()
            for index, plugin in enumerate(plugins.first):
                self.hooks.add(plugin, index=index)
            for plugin in plugins.last:
                self.hooks.add(plugin)
        except (HookError, ValueError, OSError) as exc:
            raise StartupError(str(exc)) from None

    def _mechanisms(self) -> tuple[str, ...]:
        """SASL mechanisms to offer: the setting, else what the auth plugins can check."""
        if not self.hooks.has_steps("auth"):
            return ()
        if self.options.auth_mechanisms:
            return self.options.auth_mechanisms
        offered: list[str] = []
        for plugin in self.hooks.plugins():
            if callable(getattr(plugin, "on_auth", None)):
                for name in getattr(plugin, "auth_mechanisms", DEFAULT_MECHANISMS):
                    if name not in offered:
                        offered.append(name)
        return tuple(offered)

    async def _listen(self, address: ListenAddress, reuse_port: bool) -> None:
        if (
            address.implicit_tls and self.ssl_context is None
        ):  # pragma: no cover - _load_tls makes one
            raise StartupError(f"{address}: implicit TLS needs a certificate")
        expect_proxy = bool(self.options.proxy_protocol)

        # A partial, not a closure: the class is called from C, without a Python frame per
        # connection; and the loop is given, not asked of asyncio per connection.
        factory = functools.partial(
            ConnectionDriver,
            self,
            implicit_tls=address.implicit_tls,
            expect_proxy=expect_proxy,
            submission=address.submission,
            loop=self.loop,
        )

        try:
            server = await self.loop.create_server(
                factory,
                host=address.host,
                port=address.port,
                reuse_address=True,
                reuse_port=reuse_port or None,
                backlog=1024,
                # No ssl= for SMTPS: the connection runs its handshake itself, after it
                # has been admitted (counted against the client limits) and under
                # handshake_timeout; asyncio's own handshake would hold a socket uncounted.
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
            if address.submission:
                kind += " submission"
            log.info("listening on %s port %d (%s)", bound[0], bound[1], kind)

    def _load_tls(self) -> None:
        options = self.options
        cert, key = options.tls_cert, options.tls_key
        try:
            if cert is None or key is None:
                cert, key = ensure_dev_certificate(options.state_dir, options.hostname)
                self._dev_certificate = cert.parent
            context = create_server_context(cert, key)
            add_certificates(context, [(c.names, c.cert, c.key) for c in options.tls_certificates])
            self.ssl_context = context
        except ValueError as exc:
            raise StartupError(str(exc)) from None

    def reload(self, options: ServerOptions) -> None:
        """SIGHUP: take new settings for new connections; keep existing ones."""
        if options.listen != self.options.listen or options.workers != self.options.workers:
            log.warning("reload: listen addresses and workers change only on restart")
        old_context = self.ssl_context
        self.options = options
        self.hooks.timeout = options.hook_timeout
        self.hooks.message_timeout = options.delivery_timeout
        try:
            self._load_tls()
        except StartupError as exc:
            log.error("reload: keeping the old certificate: %s", exc)
            self.ssl_context = old_context
        self.protocol_config = protocol_config(
            options, tls=self.ssl_context is not None, auth=self._mechanisms()
        )
        self.reload_plugins()
        log.info("configuration reloaded")

    def reload_plugins(self, skip: Sequence[Any] = ()) -> None:
        """SIGHUP for plugins: those with a ``reload()`` method re-read their files (block
        and allow lists, users), except those in ``skip`` (a subclass that has just built
        them again). A plugin that fails keeps what it had and says why."""
        skipped = {id(plugin) for plugin in skip}
        for plugin in self.hooks.plugins():
            if id(plugin) in skipped:
                continue
            reload = getattr(plugin, "reload", None)
            if not callable(reload):
                continue
            try:
                reload()
            except Exception as exc:
                log.error("reload: plugin %s: %s", getattr(plugin, "name", plugin), exc)

    async def shutdown(self) -> None:
        """Stop accepting, let transactions in flight finish for close_timeout, then close."""
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.begin_shutdown()
        deadline = self.loop.time() + self.options.close_timeout
        while (self.connections or self._background) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()
        for task in list(self._background):
            task.cancel()
        await self._close_listeners()
        await self._close_plugins()
        pool, self.spool_pool = self.spool_pool, None
        if pool is not None:
            await pool.aclose()
        self._started = False
        if self._closed is not None:
            self._closed.set()

    async def _start_plugin_tasks(self) -> None:
        """Plugins with work of their own (a queue's delivery workers): ``astart()``,
        awaited in chain order once the listeners are bound. One that fails stops the
        start: the listeners close, the plugins already started get their ``aclose()``,
        and the error is a :class:`StartupError`."""
        started: list[Any] = []
        for plugin in self.hooks.plugins():
            astart = getattr(plugin, "astart", None)
            if not callable(astart):
                continue
            try:
                await astart()
            except BaseException as exc:
                await self._close_listeners()
                for done in reversed(started):
                    aclose = getattr(done, "aclose", None)
                    if callable(aclose):
                        with contextlib.suppress(Exception):
                            await aclose()
                self._started = False
                if not isinstance(exc, Exception):
                    raise
                name = getattr(plugin, "name", plugin)
                raise StartupError(f"plugin {name}: cannot start: {exc}") from exc
            started.append(plugin)

    async def _close_plugins(self) -> None:
        """Let plugins release what they hold (HTTP sessions, files): ``aclose()``."""
        for plugin in self.hooks.plugins():
            aclose = getattr(plugin, "aclose", None)
            if not callable(aclose):
                continue
            try:
                await aclose()
            except Exception:
                log.exception("plugin %s: aclose() failed", getattr(plugin, "name", plugin))

    async def _close_listeners(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self.listening.clear()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await self._closed.wait()

    def orphan_age(self) -> float:
        """Seconds after which a file in the spool directory belongs to no session: the
        longest session plus the longest delivery after it (background deliveries keep a
        link that long). Without session_timeout, the 36 hours Maildir readers wait."""
        options = self.options
        if not options.session_timeout:
            return 36 * 3600.0
        return options.session_timeout + options.delivery_timeout * (
            1 + len(self.hooks.background_steps("message"))
        )

    def remove_orphans(self) -> int:
        """Remove spool files left by a process that died (kill -9, power loss) mid-message:
        those older than :meth:`orphan_age`. Files of running sessions, here or in other
        worker processes, are younger. Returns how many were removed."""
        cutoff = time.time() - self.orphan_age()
        removed = 0
        try:
            entries = list(os.scandir(self.spool_dir))
        except OSError as exc:
            log.warning("cannot scan the spool directory %s: %s", self.spool_dir, exc)
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue  # another worker process removed it first
            except OSError as exc:
                log.warning("cannot remove the orphaned spool file %s: %s", entry.path, exc)
        if removed:
            log.info("removed %d orphaned spool files from %s", removed, self.spool_dir)
        return removed

    # --- deliveries that do not hold up the reply ---------------------------------------------

    async def deliver_later(self, message: Message, spool: SpoolFile) -> None:
        """Run the message steps marked ``required = False`` after the reply, on their own
        hard link to the (synced) spool file, which they remove when done."""
        steps = self.hooks.background_steps("message")
        link = spool.path.with_name(spool.path.name + ".later")
        try:
            await self.loop.run_in_executor(None, os.link, spool.path, link)
        except OSError as exc:
            log.error("message %s: cannot keep it for later deliveries: %s", message.id, exc)
            return
        kept = dataclasses.replace(message, path=link, _sync=None, _rewrite=None)
        task = self.loop.create_task(self._run_later(steps, kept, link))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run_later(self, steps: tuple[Any, ...], message: Message, link: Path) -> None:
        timeout = self.options.delivery_timeout
        try:
            for step in steps:
                done = False
                began = self.loop.time()
                try:
                    async with asyncio.timeout(timeout):
                        await step.call(message.session, message.envelope, message)
                    done = True
                except (Reject, TempFail) as refusal:
                    log.warning("message %s: %s refused it: %s", message.id, step.plugin, refusal)
                except TimeoutError:
                    log.error("message %s: %s took over %.0f s", message.id, step.plugin, timeout)
                except Exception as exc:
                    # One line, as for a delivery before the 250; the traceback at -v.
                    log.error(
                        "session %s: message %s: background delivery %s failed: %s: %s",
                        message.session.id,
                        message.id,
                        step.plugin,
                        type(exc).__name__,
                        " ".join(str(exc).splitlines()),
                        extra={"session": message.session.id, "queue_id": message.id},
                    )
                    log.debug("message %s: %s traceback", message.id, step.plugin, exc_info=exc)
                finally:
                    self.stats.background_latency.observe(self.loop.time() - began)
                    if not done:
                        message.abort_staged()
                if done and message.staged:
                    # A background step stands alone: what it staged is final at once.
                    await message.settle(True)
        finally:
            with contextlib.suppress(OSError):
                link.unlink()

    # --- closing a session from outside --------------------------------------------------------

    def close_session(self, session: Session, reply: Reply, reason: str = "closed") -> bool:
        """Send ``reply`` to the client of ``session`` outside the SMTP dialogue (not as
        the answer to a command: a timer of a plugin, an operator; without its enhanced
        status code, as before EHLO) and close its connection; ``reason`` is what the
        session recorder is told. False when the session has no open connection on this
        server (it ended already)."""
        for connection in self.connections:
            if connection.session is session:
                connection.refuse(reply, reason)
                return True
        return False

    # --- what connections ask ---------------------------------------------------------------------

    def admit(self, connection: HostedConnection) -> Reply | None:
        """Admit a new connection or say why not (max clients, per-IP, PROXY sources)."""
        options = self.options
        ip = connection.peer_ip
        stats = self.stats
        stats.connections_total += 1
        connections = self.connections
        per_ip = self.per_ip
        if options.proxy_protocol:
            refusal = self._admission(connection, ip, options)
        else:
            # The usual connection, in one step: a call and a dict miss less per connection.
            count = per_ip.get(ip, 0)
            if len(connections) < options.max_clients and count < options.max_clients_per_ip:
                connections.add(connection)
                per_ip[ip] = count + 1
                return None
            refusal = self._admission(connection, ip, options)
        if refusal is not None:
            stats.connections_refused += 1
        return refusal

    def _admission(
        self, connection: HostedConnection, ip: str, options: ServerOptions
    ) -> Reply | None:
        if options.proxy_protocol and not _in_networks(ip, options.proxy_protocol):
            return self._outside("proxy_required", ip)
        if len(self.connections) >= options.max_clients:
            _refusals.log(
                log,
                logging.WARNING,
                "max-clients",
                "refusing %s: %d connections (max_clients)",
                ip,
                len(self.connections),
            )
            return self._outside("too_many_clients", ip)
        if not options.proxy_protocol and self.per_ip.get(ip, 0) >= options.max_clients_per_ip:
            _refusals.log(
                log,
                logging.INFO,
                "per-ip",
                "refusing %s: too many connections from this address (max_clients_per_ip)",
                ip,
            )
            return self._outside("too_many_from_ip", ip)
        self.connections.add(connection)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def _outside(self, name: str, ip: str) -> Reply:
        """The server's own refusal ``name`` in the persona's words."""
        return self.protocol_config.persona.outside_reply(
            name, hostname=self.options.hostname, client_ip=ip
        )

    def rebind_ip(self, connection: HostedConnection, ip: str) -> Reply | None:
        """After a PROXY header the per-IP limit applies to the real client address:
        count ``connection`` (still under its old ``peer_ip``) under ``ip`` instead; the
        refusal when ``ip`` is over its limit."""
        self._forget_ip(connection.peer_ip)
        count = self.per_ip.get(ip, 0)
        over = count >= self.options.max_clients_per_ip
        self.per_ip[ip] = count + 1  # released in connection_lost like any other
        if over:
            _refusals.log(
                log,
                logging.INFO,
                "per-ip",
                "refusing %s (via PROXY): too many connections from this address",
                ip,
            )
            return self._outside("too_many_from_ip", ip)
        return None

    def release(self, connection: HostedConnection) -> None:
        """``connection`` is gone: uncount it, and run the close hooks for its session."""
        self.connections.discard(connection)
        # _forget_ip, written out: a call less per connection.
        per_ip = self.per_ip
        ip = connection.peer_ip
        count = per_ip.get(ip, 0) - 1
        if count > 0:
            per_ip[ip] = count
        else:
            per_ip.pop(ip, None)
        session = connection.session
        if session is not None and self.hooks.has("close"):
            self.session_closed(session)

    def _forget_ip(self, ip: str) -> None:
        count = self.per_ip.get(ip, 0) - 1
        if count > 0:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)

    def is_trusted(self, ip: str) -> bool:
        return _in_networks(ip, self.options.trusted_networks)

    def new_id(self) -> str:
        return f"{self._id_prefix}{next(_MESSAGE_IDS):06X}"

    def message_accepted(self) -> None:
        self.messages_accepted += 1

    def session_closed(self, session: Session) -> None:
        if self.hooks.has("close"):
            task = self.loop.create_task(self.hooks.run("close", session))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

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


#: One counter for every SMTPServer of the process: two servers started in the same second
#: (a front and a target in one test, say) must not hand out the same ids.
_MESSAGE_IDS = itertools.count(1)


def _id_prefix() -> str:
    """Queue ids unique across restarts and worker processes: time, pid, then a counter."""
    raw = int(time.time()).to_bytes(5, "big") + os.getpid().to_bytes(4, "big")
    return base64.b32encode(raw).decode().rstrip("=")[-10:]
