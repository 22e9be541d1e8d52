"""The console's HTTP server: where it listens, who may use it, start and stop.

Access rules (docs/api.md):

- bound to a loopback address without a token, anyone on this machine may use it; the
  ``Host`` header must name a loopback host (a web page elsewhere cannot reach it through
  DNS rebinding) and a state-changing request from a browser must come from the console's
  own origin (``Origin``/``Sec-Fetch-Site``: no cross-site request forgery);
- with a token (``admin_token_file``), every request carries ``Authorization: Bearer
  TOKEN``; with a users file (``users_file``), HTTP Basic authentication as one of its
  users is accepted (either, when both are set); on any address other than loopback the
  console refuses to start without one of them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from mailgate.server.errors import StartupError
from mailgate.server.options import ListenAddress, ServerOptions

from .context import CONSOLE_KEY, USER_KEY, ConsoleSources

if TYPE_CHECKING:
    from mailgate.server.app import SMTPServer

    from .workers import SharedCounters

__all__ = ["Console", "ConsoleSources", "is_loopback", "read_token"]

log = logging.getLogger("mailgate.console")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: (user name, password) -> whether they match (a users file's check).
PasswordCheck = Callable[[str, str], Awaitable[bool]]

#: Sent with every response: nothing of the console may be framed, sniffed into another
#: type, cached by a proxy or run script it did not ship (the JSON API ships none).
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.", "ip6-localhost"})
#: How long verified Basic credentials are taken without asking argon2 again (a changed
#: users file is seen by new credentials at once, by remembered ones after this).
_VERIFIED_SECONDS: Final = 60.0
#: Longest token file read: a token is a line, not a document.
_MAX_TOKEN_BYTES: Final = 4096


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal or a name, IPv6 without brackets) is this machine
    only: 127.0.0.0/8, ::1, or the name localhost."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def read_token(path: Path) -> str:
    """The bearer token in ``path`` (surrounding white space removed); StartupError when
    the file cannot be read or holds no usable token."""
    try:
        with path.open("rb") as file:
            raw = file.read(_MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise StartupError(f"admin_token_file {path}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_TOKEN_BYTES:
        raise StartupError(f"admin_token_file {path}: longer than {_MAX_TOKEN_BYTES} bytes")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise StartupError(f"admin_token_file {path}: the token must be ASCII") from None
    if len(token) < 16 or any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise StartupError(
            f"admin_token_file {path}: the token must be at least 16 printable characters "
            "without spaces (e.g. from 'openssl rand -hex 32')"
        )
    return token


def _host_of(header: str) -> str:
    """The host of a Host header: without its port, an IPv6 literal without brackets."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    host, _, port = header.rpartition(":")
    return host if host and port.isdigit() else header


class Console:
    """The console of one server process.

    ``server``: the SMTP server whose counters it shows and whose readiness it reports;
    ``listen``: where it binds (port 0: a free port, see :attr:`address`); ``token``: the
    bearer token every request needs, or ``token_file`` holding it (neither: allowed on
    loopback only); ``sources``: the queue and honeypot stores it can show.
    """

    def __init__(
        self,
        server: SMTPServer,
        listen: ListenAddress,
        *,
        token: str | None = None,
        token_file: Path | None = None,
        sources: ConsoleSources | None = None,
        workers: int = 1,
        state_dir: Path | None = None,
        users_file: Path | None = None,
    ) -> None:
        self.server = server
        self.listen = listen
        self.token = token
        #: Read at start (so that a bad file is a StartupError, reported like the others).
        self.token_file = token_file
        #: With several worker processes, their counters are shared through files in
        #: ``state_dir`` (see :mod:`.workers`).
        #: With a users file (``users_file``, ``mailgate users``), HTTP Basic
        #: authentication as one of its users is accepted (the token too, when given).
        self.users_file = users_file
        self._users: PasswordCheck | None = None
        #: Basic credentials recently verified (their digest -> until when): argon2 costs
        #: tens of milliseconds, and the UI makes several requests a second.
        self._verified: dict[bytes, float] = {}
        self.workers = workers
        self.state_dir = state_dir
        self._shared: SharedCounters | None = None
        #: Set at stop: event streams end at once instead of holding the stop up.
        self.closing = asyncio.Event()
        self.sources = sources or ConsoleSources()
        self._runner: web.AppRunner | None = None
        self._bound: tuple[str, int] | None = None

    @classmethod
    def from_options(
        cls, server: SMTPServer, options: ServerOptions, sources: ConsoleSources | None = None
    ) -> Console | None:
        """The console ``options`` ask for (None: ``admin_listen`` is not set); its token
        file is read when it starts."""
        if options.admin_listen is None:
            return None
        return cls(
            server,
            options.admin_listen,
            token_file=options.admin_token_file,
            sources=sources,
            workers=options.workers,
            state_dir=options.state_dir,
            users_file=options.users_file,
        )

    def own_counters(self) -> dict[str, Any]:
        """This process's counters as plain data (see :func:`.metrics.snapshot`)."""
        from .metrics import snapshot

        return snapshot(self.server.stats, len(self.server.connections))

    async def counters(self) -> dict[str, Any]:
        """The counters to show: this process's, or with several workers the sum of all."""
        shared = self._shared
        if shared is None:
            return self.own_counters()
        return await asyncio.to_thread(shared.total)

    @property
    def protected(self) -> bool:
        """Whether requests need credentials (a token or a user of the users file)."""
        return self.token is not None or self._users is not None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self._bound is None:
            raise RuntimeError("the console is not started")
        return self._bound

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def make_app(self) -> web.Application:
        """The aiohttp application (tests may drive it with aiohttp's test client)."""
        # Imported here: the routes pull in prometheus-client and the API's modules.
        from . import api, metrics, ui

        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app[CONSOLE_KEY] = self
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/readyz", _readyz)
        metrics.add_routes(app)
        api.add_routes(app)
        ui.add_routes(app)
        return app

    async def start(self, *, reuse_port: bool = False) -> None:
        """Bind and serve; StartupError when the address is unusable or not allowed.
        ``reuse_port``: share the port with the other worker processes (SO_REUSEPORT)."""
        if self._runner is not None:
            return
        self.closing = asyncio.Event()
        if self.workers > 1 and self.listen.port == 0:
            raise StartupError(f"admin_listen {self.listen}: --workers needs a fixed port, not 0")
        if self.token_file is not None:
            self.token = read_token(self.token_file)
        if self.users_file is not None:
            from mailgate.plugins.users_file import UsersFile, UsersFileError

            try:
                self._users = UsersFile(self.users_file, rehash=False).verify
            except UsersFileError as exc:
                raise StartupError(f"console: {exc}") from None
        if not self.protected and not is_loopback(self.listen.host):
            raise StartupError(
                f"admin_listen {self.listen} is not a loopback address: give "
                "admin_token_file (--admin-token-file) or users_file (--users-file) to "
                "protect the console"
            )
        runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner,
                self.listen.host,
                self.listen.port,
                reuse_address=True,
                reuse_port=reuse_port or None,
                backlog=128,
            )
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(
                f"cannot listen on {self.listen} (admin_listen): {exc.strerror or exc}"
            ) from None
        if self.workers > 1:
            from .workers import SharedCounters

            shared = SharedCounters(self.state_dir or Path("."), self.own_counters)
            try:
                await shared.start()
            except OSError as exc:
                await runner.cleanup()
                raise StartupError(
                    f"cannot share the console's counters in {shared.directory}: {exc}"
                ) from None
            self._shared = shared
        self._runner = runner
        # The bound address (port 0 asks for a free one): the first of the sockets.
        bound = runner.addresses[0]
        self._bound = (str(bound[0]), int(bound[1]))
        log.info(
            "console listening on %s (%s)",
            self.url,
            "bearer token required" if self.token else "loopback, no token",
        )

    async def stop(self) -> None:
        """Stop serving; safe to call twice."""
        self.closing.set()
        runner, self._runner = self._runner, None
        shared, self._shared = self._shared, None
        if shared is not None:
            await shared.stop()
        if runner is not None:
            # Requests in flight are short (nothing streams): five seconds are plenty.
            await asyncio.wait_for(runner.cleanup(), timeout=5.0)

    async def _authenticated(self, header: str) -> bool:
        """Whether the Authorization header carries the token or a user's password."""
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and self.token is not None:
            return hmac.compare_digest(credentials.strip().encode(), self.token.encode())
        if scheme.lower() != "basic" or self._users is None:
            return False
        digest = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
        now = time.monotonic()
        if self._verified.get(digest, 0.0) > now:
            return True
        parsed = _basic_credentials(credentials)
        if parsed is None or not await self._users(*parsed):
            return False
        if len(self._verified) > 1000:  # a bound on memory: forget them all, re-verify
            self._verified.clear()
        self._verified[digest] = now + _VERIFIED_SECONDS
        return True

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = await self._refusal(request)
        if refusal is not None:
            refusal.headers.update(SECURITY_HEADERS)
            return refusal
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # 404, 405...: aiohttp answers them itself
            exc.headers.update(SECURITY_HEADERS)
            raise
        for name, value in SECURITY_HEADERS.items():
            # The UI's pages set their own Content-Security-Policy (scripts of their own).
            response.headers.setdefault(name, value)
        return response

    async def _refusal(self, request: web.Request) -> web.Response | None:
        """Why ``request`` may not be served (a 401/403 response), or None."""
        if self.protected:
            header = request.headers.get("Authorization", "")
            if await self._authenticated(header):
                request[USER_KEY] = _user_of(header)
                return None
            challenges = []
            if self.token is not None:
                challenges.append('Bearer realm="mailgate"')
            if self._users is not None:
                challenges.append('Basic realm="mailgate console", charset="UTF-8"')
            what = " or ".join(
                name
                for name, present in (
                    ("a bearer token", self.token is not None),
                    ("a user of the users file (Basic)", self._users is not None),
                )
                if present
            )
            refusal = _problem(401, f"{what} is required")
            for challenge in challenges:
                refusal.headers.add("WWW-Authenticate", challenge)
            return refusal
        # No token: loopback only. A browser page of another site could still send
        # requests here; refuse what only such a page would send.
        if not is_loopback(_host_of(request.headers.get("Host", ""))):
            return _problem(403, "the Host header must name this machine (localhost)")
        if request.method not in _SAFE_METHODS and not _same_origin(request):
            return _problem(403, "cross-origin request refused")
        request[USER_KEY] = "loopback"
        return None


def _user_of(header: str) -> str:
    """Who an accepted Authorization header names: the users file's user, or ``token``."""
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "basic":
        parsed = _basic_credentials(credentials)
        if parsed is not None:
            return parsed[0]
    return "token"


def _basic_credentials(encoded: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    username, colon, password = decoded.partition(":")
    return (username, password) if colon and username else None


def _same_origin(request: web.Request) -> bool:
    """A state-changing request is allowed from tools that send no browser headers, and
    from a page of the console itself; never from another site's page."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == f"http://{request.headers.get('Host', '')}"


def _problem(status: int, detail: str, *, headers: dict[str, str] | None = None) -> web.Response:
    """An error response in the API's format: ``{"error": detail}``."""
    return web.json_response({"error": detail}, status=status, headers=headers)


async def _healthz(request: web.Request) -> web.Response:
    """The process answers: alive."""
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """Ready when the SMTP server is listening (not before start, not while stopping)."""
    console = request.app[CONSOLE_KEY]
    listening = [f"{host}:{port}" for host, port in console.server.addresses]
    if not listening:
        return web.json_response({"status": "not listening"}, status=503)
    return web.json_response({"status": "ready", "listening": listening})
