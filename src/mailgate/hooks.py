"""The extension API: stages, the objects hooks see, results, chain ordering.

One mechanism underneath three shapes:

* callbacks: ``hooks.on("rcpt", func)`` -- a one-step plugin;
* plugins: an object with a ``name`` and async methods named after stages
  (``on_connect``, ``on_helo``, ``on_auth``, ``on_mail``, ``on_rcpt``, ``on_data_start``,
  ``on_message``, ``on_close``), added with optional ``before=``/``after=`` names;
* middleware: ``hooks.use(mw)`` with ``async def mw(ctx, call_next)`` around every stage.

A step may return ``None`` (go on), return :class:`Accept` (answer now with success, skip
the rest of the chain), or raise :class:`Reject` / :class:`TempFail` (answer now with that
5xx / 4xx). Returning a :class:`~mailgate.protocol.Reply` answers with exactly that reply.

Import direction: ``mailgate.server`` calls into this module; this module imports only
``mailgate.protocol``. Plugins import only this module.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mailgate.protocol import Address, AuthCredentials, Reply

STAGES = ("connect", "helo", "auth", "mail", "rcpt", "data_start", "message", "close")


class HookError(Exception):
    """Misuse of the hooks API (unknown stage, ordering that cannot be satisfied...)."""


class Reject(Exception):
    """Refuse with a permanent (5xx) reply."""

    def __init__(
        self, text: str = "Rejected", code: int = 550, status: str | None = "5.7.1"
    ) -> None:
        super().__init__(text)
        if not 500 <= code <= 599:
            raise HookError(f"Reject needs a 5xx code, not {code}")
        self.reply = Reply(code, status, tuple(text.split("\n")))


class TempFail(Exception):
    """Refuse with a transient (4xx) reply: the client should try again later."""

    def __init__(
        self,
        text: str = "Temporary failure, try again later",
        code: int = 451,
        status: str | None = "4.7.1",
    ) -> None:
        super().__init__(text)
        if not 400 <= code <= 499:
            raise HookError(f"TempFail needs a 4xx code, not {code}")
        self.reply = Reply(code, status, tuple(text.split("\n")))


@dataclass(frozen=True, slots=True)
class Accept:
    """Answer now with success; later steps of the chain do not run. ``text`` replaces the
    default reply text."""

    text: str | None = None


@dataclass(frozen=True, slots=True)
class TLSInfo:
    version: str | None
    cipher: str | None
    server_name: str | None = None


@dataclass(eq=False)
class Session:
    """One client connection as plugins see it. ``state`` is free for plugins to use."""

    id: str
    peer_host: str
    peer_port: int
    local_host: str
    local_port: int
    started_at: float = field(default_factory=time.time)
    tls: TLSInfo | None = None
    helo: str | None = None
    esmtp: bool = False
    user: str | None = None
    #: True once the peer address came from a PROXY header or XCLIENT.
    forwarded: bool = False
    xforward: dict[str, str | None] = field(default_factory=dict)
    messages: int = 0
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Envelope:
    """The SMTP envelope of the transaction in progress."""

    mail_from: Address | None = None
    mail_params: dict[str, str | None] = field(default_factory=dict)
    rcpt_to: list[Address] = field(default_factory=list)
    rcpt_params: list[dict[str, str | None]] = field(default_factory=list)

    @property
    def sender(self) -> str:
        """The reverse-path as text; empty for the null sender."""
        return str(self.mail_from) if self.mail_from else ""


@dataclass(frozen=True, eq=False)
class Message:
    """A complete, received message. The bytes are in a file (``path``), never all in
    memory; ``as_email()`` parses lazily with the stdlib. ``path`` is None when the server
    spools nothing (sink mode without message hooks).

    The file is complete when message hooks run but not necessarily fsynced: a delivery
    that keeps this very file (a hard link) calls :meth:`sync` in its own worker thread
    before making it visible. The server syncs it anyway before it answers 250.
    """

    id: str
    session: Session
    envelope: Envelope
    size: int
    path: Path | None
    received_at: float
    _sync: Callable[[], None] | None = field(default=None, repr=False)

    def sync(self) -> None:
        """Make the spooled bytes durable (fsync). Blocking and idempotent: call it from a
        worker thread, e.g. inside ``loop.run_in_executor``."""
        if self._sync is not None:
            self._sync()

    def open(self) -> IO[bytes]:
        if self.path is None:
            raise HookError("this server runs without a spool (sink mode); no message bytes")
        return self.path.open("rb")

    def read_bytes(self) -> bytes:
        with self.open() as f:
            return f.read()

    def as_email(self) -> email.message.EmailMessage:
        with self.open() as f:
            msg = email.message_from_binary_file(f, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg


@dataclass(eq=False)
class HookContext:
    """What middleware sees: the stage, the session and the stage's arguments."""

    stage: str
    session: Session
    args: tuple[Any, ...]


Step = Callable[..., Awaitable[Any]]
Middleware = Callable[[HookContext, Callable[[], Awaitable[Any]]], Awaitable[Any]]


@dataclass(eq=False)
class _Plugin:
    name: str
    obj: Any
    before: tuple[str, ...]
    after: tuple[str, ...]


_anonymous = itertools.count(1)


class Hooks:
    """The ordered set of plugins and middleware a server consults."""

    def __init__(self) -> None:
        self._plugins: list[_Plugin] = []
        self._middleware: list[Middleware] = []
        self._chains: dict[str, tuple[Step, ...]] | None = None

    # --- registration -------------------------------------------------------------------

    def add(
        self,
        plugin: Any,
        *,
        name: str | None = None,
        before: str | Sequence[str] = (),
        after: str | Sequence[str] = (),
    ) -> Any:
        """Add a plugin object. Its order: after every name in ``after``, before every
        name in ``before``, otherwise in the order added. Returns the plugin."""
        plugin_name = name or getattr(plugin, "name", None) or f"plugin-{next(_anonymous)}"
        if any(p.name == plugin_name for p in self._plugins):
            raise HookError(f"a plugin named {plugin_name!r} is already registered")
        for stage in STAGES:
            method = getattr(plugin, f"on_{stage}", None)
            if method is not None and not inspect.iscoroutinefunction(method):
                raise HookError(f"{plugin_name}.on_{stage} must be an async function")
        self._plugins.append(_Plugin(plugin_name, plugin, _names(before), _names(after)))
        self._chains = None
        self._order()  # fail now, at registration, on impossible orderings
        return plugin

    def on(self, stage: str, func: Step, *, name: str | None = None, **order: Any) -> Step:
        """Register one async callback for one stage (a one-step plugin)."""
        if stage not in STAGES:
            raise HookError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        if not inspect.iscoroutinefunction(func):
            raise HookError(f"callback for {stage!r} must be an async function")
        holder = type(f"Callback_{stage}", (), {f"on_{stage}": staticmethod(func)})()
        self.add(
            holder, name=name or f"{stage}:{getattr(func, '__qualname__', 'callback')}", **order
        )
        return func

    def use(self, middleware: Middleware) -> Middleware:
        """Wrap every stage call: ``async def mw(ctx, call_next): ... await call_next()``."""
        self._middleware.append(middleware)
        return middleware

    def names(self) -> list[str]:
        return [p.name for p in self._order()]

    # --- running ------------------------------------------------------------------------

    def has(self, stage: str) -> bool:
        """Whether anything runs at ``stage`` (the server skips the await when not)."""
        return bool(self._middleware) or bool(self._chain(stage))

    async def run(self, stage: str, session: Session, *args: Any) -> Reply | Accept | None:
        """Run the chain for ``stage``. Returns a Reply for Reject/TempFail/explicit
        replies, an Accept, or None when every step let it through."""
        steps = self._chain(stage)

        async def call_chain() -> Reply | Accept | None:
            for step in steps:
                try:
                    result = await step(session, *args)
                except (Reject, TempFail) as refusal:
                    return refusal.reply
                if result is None:
                    continue
                if isinstance(result, Reply | Accept):
                    return result
                raise HookError(
                    f"a {stage} hook returned {result!r}; return None, Accept or a Reply, "
                    "or raise Reject/TempFail"
                )
            return None

        if not self._middleware:
            return await call_chain()
        ctx = HookContext(stage, session, args)
        call: Callable[[], Awaitable[Any]] = call_chain
        for mw in reversed(self._middleware):
            call = _bind(mw, ctx, call)
        result = await call()
        return result  # type: ignore[no-any-return]

    def _chain(self, stage: str) -> tuple[Step, ...]:
        if self._chains is None:
            ordered = self._order()
            self._chains = {
                s: tuple(
                    getattr(p.obj, f"on_{s}") for p in ordered if getattr(p.obj, f"on_{s}", None)
                )
                for s in STAGES
            }
        return self._chains[stage]

    def _order(self) -> list[_Plugin]:
        """Stable topological order honouring before/after; registration order breaks ties."""
        plugins = self._plugins
        index = {p.name: i for i, p in enumerate(plugins)}
        edges: dict[int, set[int]] = {i: set() for i in range(len(plugins))}
        for i, p in enumerate(plugins):
            for other in p.after:
                if other in index:
                    edges[index[other]].add(i)
            for other in p.before:
                if other in index:
                    edges[i].add(index[other])
        incoming = {i: 0 for i in edges}
        for targets in edges.values():
            for t in targets:
                incoming[t] += 1
        ready = [i for i in edges if incoming[i] == 0]
        order: list[int] = []
        while ready:
            ready.sort()
            i = ready.pop(0)
            order.append(i)
            for t in edges[i]:
                incoming[t] -= 1
                if incoming[t] == 0:
                    ready.append(t)
        if len(order) != len(plugins):
            cycle = [plugins[i].name for i in edges if i not in order]
            raise HookError(f"plugin ordering has a cycle among: {', '.join(cycle)}")
        return [plugins[i] for i in order]

    def __iter__(self) -> Iterator[Any]:
        return (p.obj for p in self._order())


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _bind(
    mw: Middleware, ctx: HookContext, call_next: Callable[[], Awaitable[Any]]
) -> Callable[[], Awaitable[Any]]:
    async def call() -> Any:
        return await mw(ctx, call_next)

    return call


__all__ = [
    "STAGES",
    "Accept",
    "AuthCredentials",
    "Envelope",
    "HookContext",
    "HookError",
    "Hooks",
    "Message",
    "Reject",
    "Session",
    "TLSInfo",
    "TempFail",
]
