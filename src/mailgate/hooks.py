"""The extension API: stages, the objects hooks see, results, chain ordering.

One mechanism underneath three shapes:

* callbacks: ``server.on_rcpt(func)`` / ``hooks.on("rcpt", func)`` -- a one-step plugin;
* plugins: an object with a ``name`` and methods named after stages (``on_connect``,
  ``on_tls``, ``on_helo``, ``on_auth``, ``on_mail``, ``on_rcpt``, ``on_data_start``,
  ``on_message``, ``on_reset``, ``on_close``), added with optional ``before=``/``after=``;
* middleware: ``hooks.use(mw)`` with ``async def mw(ctx, call_next)`` around every stage.

Steps may be async or plain functions. A step returns ``None`` (go on), returns
:class:`Accept` or ``True`` (answer now with success, skip the rest of the chain), returns
``False`` (refuse with the stage's default refusal), or raises :class:`Reject` /
:class:`TempFail` (answer now with that 5xx / 4xx). Returning a
:class:`~mailgate.protocol.Reply` answers with exactly that reply. Any other exception,
and a chain that outlives its timeout, becomes ``451 4.3.0`` and is logged; it never
reaches the client as a traceback.

Import direction: ``mailgate.server`` calls into this module; this module imports only
``mailgate.protocol``. Plugins import only this module.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import functools
import hmac
import inspect
import itertools
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Final

from mailgate.protocol import Address as WireAddress
from mailgate.protocol import AuthCredentials, Reply

log = logging.getLogger("mailgate.hooks")

#: Every stage, in the order a session meets them.
STAGES: Final = (
    "connect",
    "tls",
    "helo",
    "auth",
    "mail",
    "rcpt",
    "data_start",
    "message",
    "reset",
    "close",
)
#: Stages that only tell: what their steps return is ignored.
NOTIFICATIONS: Final = frozenset({"reset", "close"})


class HookError(Exception):
    """Misuse of the hooks API: unknown stage or plugin name, a cycle in the ordering, a
    result a stage cannot use."""


# --- results ---------------------------------------------------------------------------------


class _Refusal(Exception):
    """What Reject and TempFail share: a reply code, text, enhanced status, disconnect."""

    _low = 0
    _default_code = 0
    _default_text = ""

    def __init__(
        self,
        *args: int | str,
        code: int | None = None,
        text: str | None = None,
        enhanced: str | None = None,
        disconnect: bool = False,
        status: str | None = None,  # older spelling of ``enhanced``
    ) -> None:
        # Positional: a code and/or a text, in either order -- Reject(550, "no such user"),
        # Reject("no such user"), Reject("no such user", 553).
        for arg in args:
            if isinstance(arg, int) and not isinstance(arg, bool) and code is None:
                code = arg
            elif isinstance(arg, str) and text is None:
                text = arg
            else:
                raise HookError(f"{type(self).__name__}: unexpected argument {arg!r}")
        code = self._default_code if code is None else code
        if not self._low <= code <= self._low + 99:
            raise HookError(f"{type(self).__name__} needs a {self._low // 100}xx code, not {code}")
        self.code = code
        self.text = text or self._default_text
        self.enhanced = enhanced or status
        if self.enhanced is not None and not self.enhanced.startswith(f"{code // 100}."):
            raise HookError(f"enhanced code {self.enhanced} does not match reply code {code}")
        self.disconnect = disconnect
        super().__init__(self.text)

    def reply(self, stage: str | None = None) -> Reply:
        """The reply this refusal gives at ``stage`` (its enhanced code filled in)."""
        status = self.enhanced or default_status(stage, self.code)
        # splitlines: a text from elsewhere may carry CRLF, which a reply line must not.
        return Reply(self.code, status, tuple(self.text.splitlines()))


class Reject(_Refusal):
    """Refuse with a permanent (5xx) reply: ``raise Reject(550, "no such user")``.
    ``enhanced`` defaults to a status that fits the stage; ``disconnect=True`` closes the
    connection after the reply."""

    _low = 500
    _default_code = 550
    _default_text = "Rejected"


class TempFail(_Refusal):
    """Refuse with a transient (4xx) reply: the client should try again later."""

    _low = 400
    _default_code = 451
    _default_text = "Temporary failure, try again later"


@dataclass(frozen=True, slots=True)
class Accept:
    """Answer now with success; later steps of the chain do not run. ``code`` and ``text``
    replace the stage's usual success reply (e.g. ``Accept(text="Hi there")``)."""

    code: int | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.code is not None and not 200 <= self.code <= 399:
            raise HookError(f"Accept needs a 2xx or 3xx code, not {self.code}")


@dataclass(frozen=True, slots=True)
class PerRecipient:
    """LMTP answers one reply per recipient: return this (or a plain list/dict) from a
    message hook. Each answer is None/True/Accept (delivered), a Reject/TempFail, or a
    Reply; a dict keyed by address leaves the others at the default."""

    answers: list[Any] | tuple[Any, ...] | dict[str, Any]


#: What a finished chain gives the server.
Outcome = Reply | Accept | _Refusal | PerRecipient | None

# RFC 3463 subjects per stage; 7.1 ("delivery not authorized") is the usual policy answer.
_STAGE_STATUS: Final = {
    "connect": "7.1",
    "tls": "7.1",
    "helo": "7.1",
    "auth": "7.8",
    "mail": "7.1",
    "rcpt": "7.1",
    "data_start": "7.1",
    "message": "7.1",
}
_CODE_STATUS: Final = {
    421: "4.3.2",
    450: "4.2.1",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    535: "5.7.8",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.7.1",
}


def default_status(stage: str | None, code: int) -> str:
    """The enhanced status code for a refusal that did not name one."""
    if code in _CODE_STATUS:
        return _CODE_STATUS[code]
    return f"{code // 100}.{_STAGE_STATUS.get(stage or '', '0.0')}"


# --- what hooks see --------------------------------------------------------------------------


class Address(str):
    """An envelope address as hooks see it: the address text (``str``) plus ``local``,
    ``domain`` and the ESMTP ``params`` that came with it (read-only; names upper-case).
    The null reverse-path ``<>`` is the empty address (``""``, false in a test)."""

    __slots__ = ("domain", "local", "params")
    local: str
    domain: str
    params: Mapping[str, str | None]

    def __new__(cls, text: str = "", params: Mapping[str, str | None] | None = None) -> Address:
        self = super().__new__(cls, text)
        local, at, domain = text.rpartition("@")
        self.local, self.domain = (local, domain) if at else (text, "")
        self.params = MappingProxyType(dict(params or {}))
        return self

    @classmethod
    def from_wire(
        cls, address: WireAddress | None, params: Mapping[str, str | None] | None = None
    ) -> Address:
        if address is None:
            return cls("", params)
        self = cls(str(address), params)
        self.local, self.domain = address.local_part, address.domain
        return self

    def __repr__(self) -> str:
        return f"Address({str.__repr__(self)}, params={dict(self.params)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), dict(self.params)))


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """The TLS state of a session: protocol version, cipher name and bits, the name the
    client asked for (SNI), and whether it showed a certificate."""

    version: str | None
    cipher: str | None
    server_name: str | None = None
    bits: int | None = None
    peer_certificate: bool = False


@dataclass(eq=False)
class Session:
    """One client connection as plugins see it. ``notes`` is free for plugins to use
    (namespaced by plugin name, by convention); the rest the server keeps current."""

    id: str
    peer_host: str
    peer_port: int
    local_host: str
    local_port: int
    started_at: float = field(default_factory=time.time)
    tls: TLSInfo | None = None
    helo: str | None = None
    esmtp: bool = False
    #: The authenticated user (AUTH, or XCLIENT LOGIN from a trusted peer).
    user: str | None = None
    auth_mechanism: str | None = None
    #: True once the peer address came from a PROXY header or XCLIENT.
    forwarded: bool = False
    xforward: dict[str, str | None] = field(default_factory=dict)
    #: Transactions begun (MAIL accepted) and messages accepted on this connection.
    transactions: int = 0
    messages: int = 0
    auth_failures: int = 0
    lmtp: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def peer(self) -> tuple[str, int]:
        return (self.peer_host, self.peer_port)

    @property
    def authenticated(self) -> bool:
        return self.user is not None


@dataclass(frozen=True, eq=False, slots=True)
class Envelope:
    """The envelope of the transaction in progress, read-only: a hook decides about the
    address it is given; the server adds what was accepted."""

    mail_from: Address | None = None
    rcpt_tos: tuple[Address, ...] = ()

    @property
    def sender(self) -> str:
        """The reverse-path as text; empty for the null sender (and before MAIL)."""
        return str(self.mail_from or "")

    @property
    def mail_params(self) -> Mapping[str, str | None]:
        return self.mail_from.params if self.mail_from is not None else MappingProxyType({})

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.mail_params

    @property
    def body(self) -> str:
        """The BODY= parameter: 7BIT (the default), 8BITMIME or BINARYMIME."""
        return (self.mail_params.get("BODY") or "7BIT").upper()

    def with_recipient(self, address: Address) -> Envelope:
        return replace(self, rcpt_tos=(*self.rcpt_tos, address))


@dataclass(frozen=True, slots=True)
class AuthAttempt:
    """What the auth stage decides about. ``password`` for PLAIN and LOGIN, ``token`` for
    XOAUTH2; for CRAM-MD5 neither travels, so check with :meth:`verify`."""

    method: str
    username: str
    # Kept out of repr: an attempt logged by a hook must not put the secret in the log.
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    authzid: str | None = None
    _credentials: AuthCredentials | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_credentials(cls, credentials: AuthCredentials) -> AuthAttempt:
        return cls(
            method=credentials.mechanism,
            username=credentials.username,
            password=credentials.password,
            token=credentials.token,
            authzid=credentials.authzid,
            _credentials=credentials,
        )

    @property
    def mechanism(self) -> str:
        return self.method

    @property
    def challenge(self) -> bytes | None:
        """CRAM-MD5: the challenge the server sent (None for other mechanisms)."""
        return self._credentials.challenge if self._credentials is not None else None

    @property
    def digest(self) -> str | None:
        """CRAM-MD5: the hex HMAC-MD5 digest the client answered with."""
        return self._credentials.digest if self._credentials is not None else None

    def verify(self, password: str) -> bool:
        """Whether the client proved it knows ``password`` (constant time): a comparison
        for PLAIN and LOGIN, the HMAC check for CRAM-MD5. Always False for XOAUTH2."""
        if self.method == "CRAM-MD5":
            credentials = self._credentials
            return credentials is not None and credentials.verify_cram_md5(password)
        if self.password is None:
            return False
        return hmac.compare_digest(self.password.encode(), password.encode())


class MessageTooLarge(HookError):
    """``Message.read()`` refused to load a message bigger than its ``limit``."""


#: Default cap of Message.read(): above it, stream with ``async for`` or ``open()``.
READ_LIMIT: Final = 64 * 1024 * 1024
_CHUNK = 256 * 1024


@dataclass(frozen=True, eq=False)
class Message:
    """A complete, received message. The bytes are in a file (``path``), never all in
    memory unless you ask (``read()``); ``as_email()`` parses with the stdlib.

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
    _rewrite: Callable[[bytes], Awaitable[Path]] | None = field(default=None, repr=False)

    async def prepend_header(self, name: str, value: str) -> None:
        """Add a header field at the top of the message (e.g. Authentication-Results),
        for the steps that come after this one. The message file is rewritten (in a worker
        thread) and ``path`` points at the new one; long values are folded."""
        if self._rewrite is None or self.path is None:
            raise HookError("this message has no spool file to add a header to")
        if not name or any(c in name for c in ": \r\n\t") or not name.isascii():
            raise HookError(f"bad header field name {name!r}")
        if "\r" in value or "\n" in value:
            raise HookError("a header value must not contain line breaks (it is folded here)")
        new_path = await self._rewrite(fold_header(name, value))
        object.__setattr__(self, "path", new_path)

    @property
    def mail_from(self) -> Address | None:
        return self.envelope.mail_from

    @property
    def rcpt_tos(self) -> tuple[Address, ...]:
        return self.envelope.rcpt_tos

    def sync(self) -> None:
        """Make the spooled bytes durable (fsync). Blocking and idempotent: call it from a
        worker thread, e.g. inside ``loop.run_in_executor``."""
        if self._sync is not None:
            self._sync()

    def open(self) -> IO[bytes]:
        """The message as a binary file (blocking reads: keep them off the event loop for
        big messages, or use ``async for``)."""
        if self.path is None:
            raise HookError("this server runs without a spool (sink mode); no message bytes")
        return self.path.open("rb")

    async def read(self, limit: int | None = READ_LIMIT) -> bytes:
        """The whole message in memory, read in a worker thread. Refuses (raises
        :class:`MessageTooLarge`) a message above ``limit`` bytes; ``None``: no limit."""
        if limit is not None and self.size > limit:
            raise MessageTooLarge(
                f"message {self.id} has {self.size} bytes, more than read(limit={limit})"
            )
        return await asyncio.get_running_loop().run_in_executor(None, self.read_bytes)

    def read_bytes(self) -> bytes:
        """Blocking :meth:`read` without a limit, for sync callbacks and threads."""
        with self.open() as f:
            return f.read()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """``async for chunk in message``: the bytes in chunks, read off the event loop."""
        loop = asyncio.get_running_loop()
        f = await loop.run_in_executor(None, self.open)
        try:
            while chunk := await loop.run_in_executor(None, f.read, _CHUNK):
                yield chunk
        finally:
            f.close()

    def as_email(self) -> email.message.EmailMessage:
        """Parsed with ``email`` (``policy=default``): headers, parts, attachments."""
        with self.open() as f:
            msg = email.message_from_binary_file(f, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg


def fold_header(name: str, value: str, width: int = 78) -> bytes:
    """``Name: value`` as CRLF-terminated bytes, folded at spaces to about ``width``
    columns (RFC 5322 2.2.3); words longer than a line stay whole."""
    lines: list[str] = []
    line = f"{name}:"
    for word in value.split(" "):
        if not word:
            continue
        if len(line) + 1 + len(word) > width and line.strip() and line != f"{name}:":
            lines.append(line)
            line = "\t" + word
        else:
            line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


@dataclass(eq=False)
class HookContext:
    """What middleware sees: the stage, the session, the stage's arguments, and the name
    of the step running (set while each step runs)."""

    stage: str
    session: Session
    args: tuple[Any, ...]
    step: str | None = None


Step = Callable[..., Any]
Middleware = Callable[[HookContext, Callable[[], Awaitable[Any]]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class _Step:
    plugin: str
    call: Callable[..., Awaitable[Any]]
    required: bool


@dataclass(eq=False)
class _Plugin:
    name: str
    obj: Any
    before: tuple[str, ...]
    after: tuple[str, ...]


_anonymous = itertools.count(1)


def _as_async(func: Step) -> Callable[..., Awaitable[Any]]:
    if inspect.iscoroutinefunction(func):
        return func

    @functools.wraps(func)
    async def call(*args: Any) -> Any:
        result = func(*args)
        if inspect.isawaitable(result):  # a plain function that returns a coroutine
            result = await result
        return result

    return call


class Hooks:
    """The ordered set of plugins and middleware a server consults.

    ``timeout`` bounds every stage's chain except ``message``; ``message_timeout`` bounds
    the message stage (deliveries). ``None``: no limit.
    """

    def __init__(self, *, timeout: float | None = 30.0, message_timeout: float | None = 300.0):
        self.timeout = timeout
        self.message_timeout = message_timeout
        self._plugins: list[_Plugin] = []
        self._middleware: list[Middleware] = []
        self._chains: dict[str, tuple[_Step, ...]] | None = None

    # --- registration -------------------------------------------------------------------

    def add(
        self,
        plugin: Any,
        *,
        name: str | None = None,
        before: str | Sequence[str] = (),
        after: str | Sequence[str] = (),
        index: int | None = None,
    ) -> Any:
        """Add a plugin object. Its order: after every name in ``after``, before every
        name in ``before``, otherwise in the order added (``index``: as if it had been
        added at that position, e.g. 0 for ahead of everything so far). Returns the plugin.

        A plugin whose ``required`` attribute is False runs at the message stage after
        the reply (in the background, on its own link to the message file); its failures
        are logged and do not change the reply."""
        plugin_name = name or getattr(plugin, "name", None) or f"plugin-{next(_anonymous)}"
        if not isinstance(plugin_name, str) or not plugin_name:
            raise HookError(f"plugin name must be a non-empty string, not {plugin_name!r}")
        if any(p.name == plugin_name for p in self._plugins):
            raise HookError(f"a plugin named {plugin_name!r} is already registered")
        if not any(callable(getattr(plugin, f"on_{stage}", None)) for stage in STAGES):
            raise HookError(
                f"plugin {plugin_name!r} has no stage method (on_connect, on_rcpt, ...)"
            )
        entry = _Plugin(plugin_name, plugin, _names(before), _names(after))
        if index is None:
            self._plugins.append(entry)
        else:
            self._plugins.insert(index, entry)
        try:
            self._order(strict=False)  # a cycle is an error now, at registration
        except HookError:
            self._plugins.remove(entry)
            raise
        self._chains = None
        return plugin

    def remove(self, name: str) -> None:
        before = len(self._plugins)
        self._plugins = [p for p in self._plugins if p.name != name]
        if len(self._plugins) == before:
            raise HookError(f"no plugin named {name!r}")
        self._chains = None

    def on(self, stage: str, func: Step, *, name: str | None = None, **order: Any) -> Step:
        """Register one callback (async or plain) for one stage: a one-step plugin."""
        if stage not in STAGES:
            raise HookError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        if not callable(func):
            raise HookError(f"callback for {stage!r} must be callable, not {func!r}")
        holder = type(f"Callback_{stage}", (), {f"on_{stage}": staticmethod(func)})()
        for attribute in ("required", "auth_mechanisms"):
            if hasattr(func, attribute):
                setattr(holder, attribute, getattr(func, attribute))
        qualname = getattr(func, "__qualname__", None) or f"callback-{next(_anonymous)}"
        self.add(holder, name=name or f"{stage}:{qualname}", **order)
        return func

    def use(self, middleware: Middleware) -> Middleware:
        """Wrap every stage call: ``async def mw(ctx, call_next): ... await call_next()``.
        The first middleware added is the outermost."""
        if not inspect.iscoroutinefunction(middleware) and not callable(middleware):
            raise HookError(f"middleware must be an async function, not {middleware!r}")
        self._middleware.append(middleware)
        return middleware

    def names(self) -> list[str]:
        """Plugin names in the order their steps run."""
        return [p.name for p in self._order(strict=False)]

    def check(self) -> None:
        """Raise :class:`HookError` if a before/after names a plugin that is not there."""
        self._order(strict=True)

    def plugins(self) -> list[Any]:
        return [p.obj for p in self._order(strict=False)]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.plugins())

    # --- running ------------------------------------------------------------------------

    def has(self, stage: str) -> bool:
        """Whether anything runs at ``stage`` (the server skips the await when not)."""
        return bool(self._middleware) or bool(self._chain(stage))

    def has_steps(self, stage: str) -> bool:
        """Whether some plugin (not only middleware) has a step at ``stage``."""
        return bool(self._chain(stage))

    def background_steps(self, stage: str) -> tuple[_Step, ...]:
        """Steps marked ``required = False``: the server runs them after replying."""
        return tuple(s for s in self._chain(stage) if not s.required)

    async def run(self, stage: str, session: Session, *args: Any) -> Outcome:
        """Run the chain for ``stage``: None (every step let it through), an Accept, a
        Reject/TempFail, or an explicit Reply. Never raises for a hook's failure: an
        exception or a timeout is logged and becomes ``451 4.3.0``."""
        steps = self._chain(stage, required=True)
        ctx = HookContext(stage, session, args) if self._middleware else None
        timeout = self.message_timeout if stage == "message" else self.timeout
        current: list[str | None] = [None]
        notification = stage in NOTIFICATIONS

        async def call_chain() -> Outcome:
            for step in steps:
                current[0] = step.plugin
                if ctx is not None:
                    ctx.step = step.plugin
                try:
                    result = await step.call(session, *args)
                except _Refusal as refusal:
                    if notification:
                        continue
                    return refusal
                except Exception:
                    if not notification:
                        raise
                    # One plugin's failed clean-up must not skip the others' clean-ups.
                    log.exception("session %s: %s hook %s failed", session.id, stage, step.plugin)
                    continue
                if notification:
                    continue
                outcome = _outcome(stage, step.plugin, result)
                if outcome is not None:
                    return outcome
            current[0] = None
            return None

        call: Callable[[], Coroutine[Any, Any, Any]] = call_chain
        if ctx is not None:
            for mw in reversed(self._middleware):
                call = _bind(mw, ctx, call)
        try:
            result = await _with_timeout(call(), timeout)
            if ctx is not None and not notification:
                # What the outermost middleware returned; a bad value is its fault.
                current[0] = None
                result = _outcome(stage, "(middleware)", result)
        except _Refusal as refusal:  # raised by a middleware
            return refusal
        except TimeoutError:
            log.error(
                "session %s: %s hook %s took longer than %.1f s",
                session.id,
                stage,
                current[0] or "(middleware)",
                timeout,
            )
            return _HOOK_FAILED
        except Exception:
            log.exception(
                "session %s: %s hook %s failed", session.id, stage, current[0] or "(middleware)"
            )
            return _HOOK_FAILED
        if notification:
            return None
        return result  # type: ignore[no-any-return]

    def _chain(self, stage: str, *, required: bool = False) -> tuple[_Step, ...]:
        """The steps of ``stage`` in order (``required``: only those the reply waits for).
        Computed once per change of the plugin set: the server asks on every command."""
        chains = self._chains
        if chains is None:
            ordered = self._order(strict=False)
            chains = {}
            for s in STAGES:
                steps = tuple(
                    _Step(p.name, _as_async(method), bool(getattr(p.obj, "required", True)))
                    for p in ordered
                    if callable(method := getattr(p.obj, f"on_{s}", None)) and _takes_part(p.obj, s)
                )
                chains[s] = steps
                chains["required:" + s] = tuple(step for step in steps if step.required)
            self._chains = chains
        return chains["required:" + stage if required else stage]

    def _order(self, *, strict: bool) -> list[_Plugin]:
        """Stable topological order honouring before/after; registration order breaks
        ties. ``strict``: a name that is not registered is an error."""
        plugins = self._plugins
        index = {p.name: i for i, p in enumerate(plugins)}
        edges: dict[int, set[int]] = {i: set() for i in range(len(plugins))}
        for i, p in enumerate(plugins):
            for relation, names in (("after", p.after), ("before", p.before)):
                for other in names:
                    if other not in index:
                        if strict:
                            known = ", ".join(index) or "none"
                            raise HookError(
                                f"plugin {p.name!r} is ordered {relation} {other!r}, which "
                                f"is not registered (plugins: {known})"
                            )
                        continue
                    if relation == "after":
                        edges[index[other]].add(i)
                    else:
                        edges[i].add(index[other])
        incoming = dict.fromkeys(edges, 0)
        for targets in edges.values():
            for t in targets:
                incoming[t] += 1
        # A plugin ordered before another takes that one's place in the queue, not its
        # own: added last with before="mail-auth", it runs just before mail-auth instead of
        # pushing mail-auth behind every plugin registered in between.
        rank = _earliest_successor(edges)
        ready = [i for i in edges if incoming[i] == 0]
        order: list[int] = []
        while ready:
            ready.sort(key=lambda i: (rank[i], i))
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


def _earliest_successor(edges: Mapping[int, set[int]]) -> dict[int, int]:
    """For each node, the lowest index among itself and everything that must come after
    it (iteratively, so long chains need no recursion; a cycle is reported by the caller)."""
    rank = {i: i for i in edges}
    changed = True
    rounds = 0
    while changed and rounds <= len(edges):
        changed = False
        rounds += 1
        for i, targets in edges.items():
            best = min((rank[t] for t in targets), default=rank[i])
            if best < rank[i]:
                rank[i] = best
                changed = True
    return rank


def _takes_part(plugin: Any, stage: str) -> bool:
    """A plugin may narrow the stages it runs at with a ``stages`` attribute (a set of
    names), e.g. leave out ``message`` when its configuration needs nothing there: a
    message step makes the server spool every message for it."""
    stages = getattr(plugin, "stages", None)
    return stages is None or stage in stages


_HOOK_FAILED = TempFail(451, "Local error in processing, try again later", enhanced="4.3.0")


def _outcome(stage: str, plugin: str, result: Any) -> Outcome:
    if result is None:
        return None
    if isinstance(result, Reply | Accept | _Refusal | PerRecipient):
        return result
    if result is True:
        return Accept()
    if result is False:
        return Reject(535, "Authentication credentials invalid") if stage == "auth" else Reject()
    if stage == "message" and isinstance(result, list | tuple | dict):
        return PerRecipient(result)
    raise HookError(
        f"{plugin} returned {result!r} at {stage}; return None, True/False, Accept or a "
        "Reply, or raise Reject/TempFail"
    )


async def _with_timeout(coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
    """Await ``coro`` within ``timeout`` seconds, paying for the timer only when it waits.

    Most chains finish without waiting for anything (checks on data at hand); arming and
    cancelling a timer for them cost more than the chain itself. So the coroutine is first
    stepped by hand, in the calling task (``current_task()`` still works for the hooks);
    only when it suspends does the rest run under ``asyncio.timeout``."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value
    except BaseException:
        coro.close()
        raise
    if timeout is None:
        return await _drive(coro, yielded)
    async with asyncio.timeout(timeout):
        return await _drive(coro, yielded)


async def _drive(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Go on running a coroutine that suspended while being stepped by hand, the way a
    Task steps it: wait for the future it yielded, then resume it (the future's
    ``__await__`` then hands it the result or raises). A cancellation of the calling task
    (a timeout, a closed connection) cancels that future, so the coroutine sees it."""
    try:
        while True:
            try:
                if yielded is None:  # a bare yield (asyncio.sleep(0)): give others a turn
                    await asyncio.sleep(0)
                elif getattr(yielded, "_asyncio_future_blocking", None) is not None:
                    yielded._asyncio_future_blocking = False
                    await asyncio.wait((yielded,))
                else:
                    yielded = coro.throw(RuntimeError(f"bad yield in a hook: {yielded!r}"))
                    continue
            except asyncio.CancelledError:
                if yielded is None or not yielded.cancel():
                    yielded = coro.throw(asyncio.CancelledError())
                    continue
                if not yielded.done():  # a task: wait until it has finished cancelling
                    await asyncio.wait((yielded,))
            yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value
    finally:
        coro.close()


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _bind(
    mw: Middleware, ctx: HookContext, call_next: Callable[[], Awaitable[Any]]
) -> Callable[[], Coroutine[Any, Any, Any]]:
    async def call() -> Any:
        return await mw(ctx, call_next)

    return call


__all__ = [
    "NOTIFICATIONS",
    "READ_LIMIT",
    "STAGES",
    "Accept",
    "Address",
    "AuthAttempt",
    "Envelope",
    "HookContext",
    "HookError",
    "Hooks",
    "Message",
    "MessageTooLarge",
    "Outcome",
    "PerRecipient",
    "Reject",
    "Session",
    "TLSInfo",
    "TempFail",
    "default_status",
    "fold_header",
]
