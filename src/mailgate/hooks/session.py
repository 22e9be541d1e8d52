"""The objects hooks see: the :class:`Session` (one client connection, its :class:`TLSInfo`),
the :class:`Envelope` of the transaction in progress and its :class:`Address` es, the
:class:`AuthAttempt` the auth stage decides about, and the received :class:`Message`.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Final, TypeVar

from mailgate.hooks.chunks import file_chunks
from mailgate.hooks.outcomes import HookError, TempFail
from mailgate.protocol import Address as WireAddress
from mailgate.protocol import AuthCredentials, Reply

log = logging.getLogger("mailgate.hooks")

#: A staged delivery's actions: commit (plain: run in a worker thread; or async) and abort
#: (plain and quick: it may run on the event loop, also when the connection is gone).
_Staged = tuple[Callable[[], Any], Callable[[], Any] | None, str]


_Class = TypeVar("_Class", bound=type)


def _python_class(cls: _Class) -> _Class:
    """Leaves a class an ordinary Python class in the optional compiled build: mypyc makes
    no native class of one with a decorator it does not know (its methods are compiled all
    the same). For classes mypyc cannot make native, such as a subclass of ``str``."""
    return cls


#: The parameters of an address given none: one read-only empty mapping for them all.
_NO_PARAMS: Mapping[str, str | None] = MappingProxyType({})


@_python_class
class Address(str):
    """An envelope address as hooks see it: the address text (``str``) plus ``local``,
    ``domain`` and the ESMTP ``params`` that came with it (read-only; names upper-case).
    The null reverse-path ``<>`` is the empty address (``""``, false in a test).
    ``written`` is the path as the client wrote it (``<a@b>``, a bare ``a@b``, a source
    route kept), empty when not known; raw client text: make it safe before showing it
    (``mailgate.protocol.persona.echo``)."""

    __slots__ = ("domain", "local", "params", "written")
    local: str
    domain: str
    params: Mapping[str, str | None]
    written: str

    def __new__(
        cls,
        text: str = "",
        params: Mapping[str, str | None] | None = None,
        written: str = "",
    ) -> Address:
        # str.__new__, not super(): mypyc compiles no super().__new__ in a Python class.
        self = str.__new__(cls, text)
        local, at, domain = text.rpartition("@")
        self.local, self.domain = (local, domain) if at else (text, "")
        # A read-only copy; no parameters (the usual case) share one empty view.
        self.params = MappingProxyType(dict(params)) if params else _NO_PARAMS
        self.written = written
        return self

    @classmethod
    def from_wire(
        cls,
        address: WireAddress | None,
        params: Mapping[str, str | None] | None = None,
        written: str = "",
    ) -> Address:
        return _wire_address(cls, address, params, written)

    def __repr__(self) -> str:
        return f"Address({str.__repr__(self)}, params={dict(self.params)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), dict(self.params), self.written))


def address_from_wire(
    address: WireAddress | None,
    params: Mapping[str, str | None] | None = None,
    written: str = "",
) -> Address:
    """``Address.from_wire(...)``, as the server makes it at every MAIL and RCPT: a module
    function, which the compiled driver calls directly (a classmethod of a Python class is
    looked up and given its arguments through Python)."""
    return _wire_address(Address, address, params, written)


def _wire_address(
    cls: type[Address],
    address: WireAddress | None,
    params: Mapping[str, str | None] | None,
    written: str,
) -> Address:
    """The one body of ``Address.from_wire`` and :func:`address_from_wire`."""
    if address is None:
        return cls("", params, written)
    # The parts as parsed (made at every MAIL and RCPT): no second split of the text.
    made = str.__new__(cls, str(address))
    made.local, made.domain = address.local_part, address.domain
    made.params = MappingProxyType(dict(params)) if params else _NO_PARAMS
    made.written = written
    return made


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
    #: The client came in on a message submission listener (RFC 6409: port 587 or 465):
    #: it must authenticate before MAIL (set at connect, from the listener).
    submission: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    # Made for every connection: an __init__ mypyc compiles in the optional compiled build,
    # where the one dataclass writes stays interpreted (about ten times slower; see
    # protocol/events.py). The same fields, order and defaults; a factory's field (the
    # start time, the dicts) made anew when not given.
    def __init__(
        self,
        id: str,
        peer_host: str,
        peer_port: int,
        local_host: str,
        local_port: int,
        started_at: float | None = None,
        tls: TLSInfo | None = None,
        helo: str | None = None,
        esmtp: bool = False,
        user: str | None = None,
        auth_mechanism: str | None = None,
        forwarded: bool = False,
        xforward: dict[str, str | None] | None = None,
        transactions: int = 0,
        messages: int = 0,
        auth_failures: int = 0,
        lmtp: bool = False,
        submission: bool = False,
        notes: dict[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.peer_host = peer_host
        self.peer_port = peer_port
        self.local_host = local_host
        self.local_port = local_port
        self.started_at = time.time() if started_at is None else started_at
        self.tls = tls
        self.helo = helo
        self.esmtp = esmtp
        self.user = user
        self.auth_mechanism = auth_mechanism
        self.forwarded = forwarded
        self.xforward = {} if xforward is None else xforward
        self.transactions = transactions
        self.messages = messages
        self.auth_failures = auth_failures
        self.lmtp = lmtp
        self.submission = submission
        self.notes = {} if notes is None else notes

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

    # Made at MAIL and at every RCPT: an __init__ mypyc compiles in the optional compiled
    # build, where the methods dataclass writes stay interpreted (see protocol/events.py).
    def __init__(
        self, mail_from: Address | None = None, rcpt_tos: tuple[Address, ...] = ()
    ) -> None:
        object.__setattr__(self, "mail_from", mail_from)
        object.__setattr__(self, "rcpt_tos", rcpt_tos)

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
        # Not dataclasses.replace: it reads the fields back by name, on every RCPT.
        return type(self)(self.mail_from, (*self.rcpt_tos, address))


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


#: What rewrites a message file: ``produce(old file, write)`` writes the new bytes.
SpoolRewrite = Callable[[IO[bytes], Callable[[bytes], object]], None]
#: Which header fields ``Message.remove_headers`` removes: ``predicate(name, value)``,
#: the name as written (without the colon) and the raw value (folding kept, no line end).
HeaderPredicate = Callable[[str, str], bool]
#: How much of a message is looked at for header fields: the rest is copied as is.
MAX_HEADER_SECTION: Final = 1024 * 1024

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
    _rewrite: Callable[[SpoolRewrite], Awaitable[Path]] | None = field(default=None, repr=False)
    #: Deliveries staged by message hooks, settled once the stage's verdict is known.
    _staged: list[_Staged] = field(default_factory=list, init=False, repr=False)
    #: What staged deliveries run before the spool is rewritten (see before_rewrite).
    _before_rewrite: list[Callable[[], Awaitable[None]]] = field(
        default_factory=list, init=False, repr=False
    )
    #: The replies of commits that failed with TempFail (e.g. a full disk at the fsync).
    _commit_refusals: list[Reply] = field(default_factory=list, init=False, repr=False)

    def stage(
        self,
        commit: Callable[[], Any],
        abort: Callable[[], None] | None = None,
        *,
        name: str = "",
    ) -> None:
        """Two-phase delivery (see docs/plugins.md): a message hook that has prepared its
        delivery without making it visible (a Maildir file still in ``tmp/``) registers
        here what makes it final and what undoes it. The server calls every ``commit``
        once every required message step accepted the message, every ``abort`` when one
        refused it, failed or timed out, or the client left: the deliveries of one
        message succeed or fail together, and a client's retry never finds a copy kept.

        ``commit``: a plain function (run in a worker thread; may block, e.g. link and
        fsync) or a coroutine function. ``abort``: a plain function that must be quick
        and must not block (remove a file); it may run on the event loop. ``name``: for
        the log when one of them fails."""
        self._staged.append((commit, abort, name))

    def before_rewrite(self, pin: Callable[[], Awaitable[None]]) -> None:
        """For a staged delivery that keeps ``path`` itself until its commit (a Maildir
        links the spool file at commit time): ``pin`` is awaited before a later step
        rewrites the message (:meth:`prepend_header`, :meth:`remove_headers` replace the
        file and remove the old one), so that the delivery can keep the version it was
        given (e.g. under a name of its own). Run before every rewrite: make it
        idempotent. An exception from it fails the rewriting step."""
        self._before_rewrite.append(pin)

    @property
    def commit_refusal(self) -> Reply | None:
        """The reply a failed commit asked for (a staged delivery's commit that raised
        TempFail, e.g. ``452 4.3.1`` for a full disk), None when none did."""
        return self._commit_refusals[0] if self._commit_refusals else None

    @property
    def staged(self) -> int:
        """How many deliveries are staged and not yet settled."""
        return len(self._staged)

    async def settle(self, delivered: bool) -> list[str]:
        """Commit (``delivered``) or abort every staged delivery, in the order staged;
        called by the server after the message stage. Every action runs even when an
        earlier one fails; returns the names of those that failed (logged here)."""
        staged = list(self._staged)
        self._staged.clear()
        failed: list[str] = []
        loop = asyncio.get_running_loop()
        for commit, abort, name in staged:
            action = commit if delivered else abort
            if action is None:
                continue
            try:
                if not delivered:
                    action()
                elif inspect.iscoroutinefunction(action):
                    await action()
                else:
                    await loop.run_in_executor(None, action)
            except TempFail as exc:
                if not delivered:
                    log.error("message %s: abort of %s failed: %s", self.id, name or action, exc)
                    failed.append(name or repr(action))
                    continue
                log.error(
                    "message %s: commit of the staged delivery %s failed: %s%s",
                    self.id,
                    name or action,
                    exc,
                    f" ({exc.__cause__})" if exc.__cause__ is not None else "",
                )
                self._commit_refusals.append(exc.reply("message"))
                failed.append(name or repr(action))
            except Exception:
                log.exception(
                    "message %s: %s of the staged delivery %s failed",
                    self.id,
                    "commit" if delivered else "abort",
                    name or action,
                )
                failed.append(name or repr(action))
        return failed

    def abort_staged(self) -> None:
        """Abort every staged delivery now, without awaiting (the connection is gone)."""
        staged = list(self._staged)
        self._staged.clear()
        for _, abort, name in staged:
            if abort is None:
                continue
            try:
                abort()
            except Exception:
                log.exception("message %s: abort of %s failed", self.id, name or abort)

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
        header = fold_header(name, value)

        def produce(source: IO[bytes], write: Callable[[bytes], object]) -> None:
            write(header)
            _copy_rest(source, write)

        await self._pin_staged()
        new_path = await self._rewrite(produce)
        object.__setattr__(self, "path", new_path)

    async def remove_headers(self, predicate: HeaderPredicate) -> int:
        """Remove the header fields for which ``predicate(name, value)`` is true (e.g.
        Authentication-Results claiming this server's authserv-id, RFC 8601 5), for the
        steps that come after this one; returns how many were removed. Like
        :meth:`prepend_header`, the message file is rewritten (in a worker thread, only
        when something matches) and ``path`` points at the new one. Only the first MiB of
        the message is looked at for header fields; ``size`` stays the size received."""
        if self._rewrite is None or self.path is None:
            raise HookError("this message has no spool file to remove headers from")
        path = self.path

        def count() -> int:
            with path.open("rb") as source:
                fields, _ = _header_fields(source)
            return sum(1 for field in fields if _matches(predicate, field))

        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, count)
        if not found:
            return 0
        removed = 0

        def produce(source: IO[bytes], write: Callable[[bytes], object]) -> None:
            nonlocal removed
            fields, end = _header_fields(source)
            for field_bytes in fields:
                if _matches(predicate, field_bytes):
                    removed += 1
                else:
                    write(field_bytes)
            write(end)
            _copy_rest(source, write)

        await self._pin_staged()
        new_path = await self._rewrite(produce)
        object.__setattr__(self, "path", new_path)
        return removed

    async def _pin_staged(self) -> None:
        for pin in list(self._before_rewrite):
            await pin()

    @property
    def mail_from(self) -> Address | None:
        return self.envelope.mail_from

    @property
    def rcpt_tos(self) -> tuple[Address, ...]:
        return self.envelope.rcpt_tos

    def sync(self) -> bool:
        """Make the spooled bytes durable (fsync). Blocking and idempotent: call it from a
        worker thread, e.g. inside ``loop.run_in_executor``. False when this message has
        no spool of its own to sync (a background step gets a copy under another name):
        fsync ``path`` yourself then."""
        if self._sync is None:
            return False
        self._sync()
        return True

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

    def __aiter__(self) -> AsyncIterator[bytes]:
        """``async for chunk in message``: the bytes in chunks, read off the event loop."""
        return file_chunks(self.open, _CHUNK)

    def as_email(self) -> email.message.EmailMessage:
        """Parsed with ``email`` (``policy=default``): headers, parts, attachments."""
        with self.open() as f:
            msg = email.message_from_binary_file(f, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg


def _copy_rest(source: IO[bytes], write: Callable[[bytes], object]) -> None:
    while chunk := source.read(_CHUNK):
        write(chunk)


def _header_fields(source: IO[bytes]) -> tuple[list[bytes], bytes]:
    """The header fields at the start of ``source`` (each with its continuation lines and
    line ends) and the line that ended the header section (the empty line; a line that is
    no field; b"" at the end of the file or after MAX_HEADER_SECTION bytes). ``source``
    is left after that line."""
    fields: list[bytes] = []
    size = 0
    while size < MAX_HEADER_SECTION:
        line = source.readline(MAX_HEADER_SECTION - size)
        if not line:
            return fields, b""
        size += len(line)
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not name.strip() or b" " in name.strip() or line in (b"\r\n", b"\n"):
            return fields, line
        fields.append(line)
    # Cut at the limit: the last field may be incomplete, so it is left as it is.
    return (fields[:-1], fields[-1]) if fields else (fields, b"")


def _matches(predicate: HeaderPredicate, field_bytes: bytes) -> bool:
    name, _, value = field_bytes.partition(b":")
    text = value.decode("utf-8", "surrogateescape").rstrip("\r\n").lstrip(" \t")
    return bool(predicate(name.decode("utf-8", "surrogateescape").strip(), text))


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


__all__ = [
    "MAX_HEADER_SECTION",
    "READ_LIMIT",
    "Address",
    "AuthAttempt",
    "Envelope",
    "HeaderPredicate",
    "Message",
    "MessageTooLarge",
    "Session",
    "SpoolRewrite",
    "TLSInfo",
    "fold_header",
]
