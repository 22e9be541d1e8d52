"""Run aiosmtpd handler objects unchanged on mailgate's hooks.

::

    from mailgate import Server
    from mailgate.compat.aiosmtpd import HandlerAdapter

    server = Server(hostname="mx.example.com", listen="0.0.0.0:25", maildir="mail")
    server.add_plugin(HandlerAdapter(MyHandler()))

or ``mailgate serve --aiosmtpd-handler myapp.handlers:MyHandler`` (see :func:`load_handler`).

The handler gets what aiosmtpd 1.4 gives it: ``await handler.handle_X(server, session,
envelope, ...)`` (plain functions are accepted too), a ``session`` and an ``envelope``
with aiosmtpd's attribute names, kept per connection in ``session.notes["aiosmtpd"]``
(the adapter's ``name``; give two adapters on one server different names),
and it answers with aiosmtpd's reply strings (``"250 OK"``, ``"550 5.1.1 No such
user"``, several lines joined with CRLF). What maps to what:

=====================  =================  =============================================
aiosmtpd               mailgate stage     notes
=====================  =================  =============================================
handle_PROXY           connect            only for connections that came with a PROXY
                                          header; falsy answer: 421 and close
handle_STARTTLS        tls                falsy answer: 554 and close
handle_EHLO/HELO       helo               see "Greeting" below
auth_* / authenticator auth               PLAIN and LOGIN, see "AUTH" below
handle_AUTH            auth               args and challenge_auth() are replayed
handle_MAIL            mail               sets envelope.mail_from itself, as in aiosmtpd
handle_RCPT            rcpt               appends to envelope.rcpt_tos itself
(DATA checks)          data_start         503 when the handler's envelope has no recipient
handle_DATA            message            the spooled message as envelope.content
process_message        message            the pre-1.0 API, when handle_DATA is missing
handle_RSET            reset              any abandoned transaction; reply not sent
handle_exception       (any)              its status answers a hook that raised
=====================  =================  =============================================

Replies. A 4xx/5xx string becomes that reply (the enhanced code added when missing). A
2xx string at MAIL, RCPT and AUTH is sent as the handler wrote it and ends the chain like
:class:`~mailgate.hooks.Accept`; at the message stage it lets the chain go on (the
deliveries configured after the adapter still run) and mailgate's ``250 ... accepted as
<id>`` is sent. A hook that returns something that is not a reply gets 451 and a log
line; an exception gets 451 4.3.0 (aiosmtpd answers 500) unless the handler has
``handle_exception``, whose status is used (451 when it returns None or raises, as in
aiosmtpd). A hook returning ``MISSING`` (aiosmtpd's sentinel) gets aiosmtpd's default.
Handlers that ``await server.push(...)`` and return None (the handle_AUTH style) are
answered with the lines they pushed.

Greeting. mailgate tells the hooks whether the client said HELO or EHLO/LHLO
(``session.esmtp``), so ``handle_HELO`` runs for HELO and ``handle_EHLO`` for EHLO, and the
verb a handler does not hook gets aiosmtpd's default. ``handle_EHLO`` gets ``responses =
["250-<server.hostname>", "250 HELP"]``. A 4xx/5xx answer (the last line of the list)
refuses the greeting; a 2xx answer's first line becomes the greeting line, but the
capability lines are mailgate's own: lines the handler adds, removes or rewrites are not
sent (logged once), so no extension is advertised that mailgate does not implement. The
handler must set ``session.host_name`` as aiosmtpd requires; if it leaves it empty, MAIL
gets aiosmtpd's ``503 Error: send HELO first``.

The envelope. mailgate's own envelope is read-only and rebuilt by the server from the
hooks' decisions; the adapter keeps the aiosmtpd envelope beside it: the one the
handler's hooks mutate is the one ``handle_DATA`` sees. A recipient is accepted by
mailgate only when ``handle_RCPT`` answered 2xx. Handlers without handle_MAIL/handle_RCPT
get aiosmtpd's defaults (sender and recipients copied in). ``mail_options`` and
``rcpt_options`` are the ESMTP parameters as aiosmtpd lists them (``"SIZE=1234"``,
``"SMTPUTF8"``, upper-case); the null sender is ``"<>"`` as aiosmtpd parses it.

Content. ``envelope.original_content`` is the message as the client sent it (bytes,
dot-unstuffed, or assembled from BDAT chunks); ``envelope.content`` is the same bytes, or
``str`` when the adapter is made with ``decode_data=True`` (UTF-8 with surrogateescape,
like aiosmtpd with SMTPUTF8 enabled). mailgate writes its ``Received:`` trace header at
the top of the spooled file; aiosmtpd's content has no such header, so the adapter
removes it (``strip_received=True``, the default). Only a header that is mailgate's own
for this message is removed (it names ``(mailgate)`` and the message id), so a client's
``Received:`` lines stay. With ``strip_received=False`` the handler sees the message as
mailgate stores it.

AUTH. mailgate's protocol layer runs the SASL exchange, then the adapter replays it to
the handler: ``auth_PLAIN``/``auth_LOGIN`` methods (the handler's own, or aiosmtpd's
built-in ones calling ``authenticator=`` or ``auth_callback=``) get aiosmtpd's ``args``
(``["PLAIN", <base64>]``, ``["LOGIN"]``), and ``server.challenge_auth()`` returns what
the client already sent (user name, then password, for LOGIN). ``handle_AUTH`` gets the
same. Other mechanisms (``auth_CRAM__MD5``, custom ones) cannot be offered through the
handler: their exchange is mailgate's. A failed ``AuthResult`` always gets an answer
(``535``), even with ``handled=True`` where aiosmtpd would send nothing. The adapter
offers AUTH only when something can say yes (an authenticator, an auth callback, a
handler auth method or handle_AUTH).

The ``server`` argument is a :class:`ServerView`: ``hostname``, ``__ident__``,
``event_handler``, ``loop``, ``session``, ``envelope``, ``push()``, ``challenge_auth()``,
``_authenticate()`` and aiosmtpd's settings as mailgate has them (``enable_SMTPUTF8``
True, ``data_size_limit`` None: mailgate enforces its own max_size, ``_decode_data``).
There is no ``transport``: the connection is mailgate's.

Not mapped (no stage in mailgate, or owned by mailgate's settings): ``handle_NOOP``,
``handle_QUIT`` and ``handle_VRFY`` (mailgate's VRFY policy point has no hook stage); custom ``smtp_*`` commands (they subclass aiosmtpd's SMTP class, not the
handler); SMTP() options such as ``require_starttls``, ``auth_required``,
``auth_exclude_mechanism``, ``command_call_limit``, ``data_size_limit``, ``timeout``
(use mailgate's settings); ``session.peer`` is the real client even behind PROXY (in
aiosmtpd it is the proxy's address), and ``proxy_data`` carries no raw header, version
or TLVs, since mailgate keeps only the addresses.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import ipaddress
import logging
import socket
import types
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

from mailgate.hooks import Address, AuthAttempt, HookError, Message
from mailgate.hooks import Envelope as MailgateEnvelope
from mailgate.hooks import Session as MailgateSession
from mailgate.protocol import Reply
from mailgate.version import __version__

from ._aiosmtpd_loader import load_handler
from ._aiosmtpd_objects import (
    MISSING,
    AuthCallbackResult,
    Envelope,
    LoginPassword,
    ProxyData,
    Session,
    parse_status,
    strip_own_received,
)

__all__ = [
    "MISSING",
    "Envelope",
    "HandlerAdapter",
    "LoginPassword",
    "ProxyData",
    "ServerView",
    "Session",
    "load_handler",
    "parse_status",
    "strip_own_received",
]

log = logging.getLogger("mailgate.compat.aiosmtpd")

_AUTH_SUCCESS: Final = "235 2.7.0 Authentication successful"
_AUTH_INVALID: Final = "535 5.7.8 Authentication credentials invalid"
_LOCAL_ERROR: Final = Reply(451, "4.3.0", ("Local error in processing, try again later",))
_AUTH_UNAVAILABLE: Final = Reply(454, "4.7.0", ("Temporary authentication failure",))
_PROXY_REFUSED: Final = Reply(421, "4.7.0", ("Connection refused",))
_TLS_REFUSED: Final = Reply(554, "5.7.0", ("Command refused due to lack of security",))
_NEED_HELO: Final = Reply(503, "5.5.1", ("Error: send HELO first",))
_NEED_MAIL: Final = Reply(503, "5.5.1", ("Error: need MAIL command",))
_NEED_RCPT: Final = Reply(503, "5.5.1", ("Error: need RCPT command",))
#: Mechanisms whose credentials mailgate can hand back to a handler as aiosmtpd would.
_REPLAYABLE: Final = ("PLAIN", "LOGIN")


class _NoMoreInput(Exception):
    """A handler asked the client for more than mailgate's SASL exchange collected."""


class ServerView:
    """The ``server`` argument: what handlers use of aiosmtpd's per-connection ``SMTP``."""

    enable_SMTPUTF8 = True
    #: mailgate enforces its own max_size before any hook sees the message.
    data_size_limit: int | None = None
    transport = None
    tls_context = None

    def __init__(self, adapter: HandlerAdapter, state: _State) -> None:
        self._adapter = adapter
        self._state = state
        self.__ident__ = adapter.ident
        self.event_handler = adapter.handler
        self.loop = asyncio.get_running_loop()
        self._decode_data = adapter.decode_data
        self._pushed: list[str] = []
        self._replay: deque[bytes] = deque()

    @property
    def hostname(self) -> str:
        return self._adapter.hostname

    @property
    def session(self) -> Session:
        return self._state.session

    @property
    def envelope(self) -> Envelope:
        return self._state.envelope

    async def push(self, status: str | bytes) -> None:
        """Collected, not written: a hook that returns None is answered with these lines."""
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        self._pushed.append(status)

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> bytes:
        """The client's next answer in the SASL exchange mailgate already ran."""
        if not self._replay:
            raise _NoMoreInput("the handler asked the client for more than it sent")
        return self._replay.popleft()

    def _authenticate(self, mechanism: str, auth_data: Any) -> Any:
        """aiosmtpd's helper for auth_* methods: ask the authenticator (or auth_callback)."""
        result = self._adapter._check(self._state, mechanism, auth_data)
        if inspect.isawaitable(result):
            # aiosmtpd calls the authenticator synchronously here; an async one cannot be.
            if isinstance(result, types.CoroutineType):
                result.close()
            raise HookError("server._authenticate() needs a synchronous authenticator")
        return result


@dataclass(eq=False)
class _State:
    """One connection's aiosmtpd objects (in ``session.notes[adapter.name]``)."""

    sid: str
    session: Session
    envelope: Envelope
    tls: bool
    #: mailgate's transaction number the envelope belongs to (-1: none).
    transaction: int = -1
    #: A HELO/EHLO hook ran: the handler owns ``session.host_name`` from then on.
    hello_hooked: bool = False
    server: ServerView = field(init=False)

    def new_envelope(self) -> Envelope:
        self.envelope = Envelope()
        self.transaction = -1
        return self.envelope


StageMethod = Callable[..., Awaitable[Any]]

# --- the adapter -------------------------------------------------------------------------------


class HandlerAdapter:
    """A mailgate plugin that runs an aiosmtpd handler object (see the module docstring).

    ``hostname`` is ``server.hostname`` and the first EHLO line handlers see (default:
    the machine's FQDN, as in aiosmtpd; pass the server's hostname). ``decode_data``:
    ``envelope.content`` is ``str``. ``authenticator`` / ``auth_callback``: aiosmtpd's
    SMTP() arguments of those names, for the built-in PLAIN and LOGIN. ``strip_received``:
    remove mailgate's own Received header before the handler sees the message.
    """

    required = True

    def __init__(
        self,
        handler: Any,
        *,
        name: str = "aiosmtpd",
        hostname: str | None = None,
        ident: str | None = None,
        decode_data: bool = False,
        authenticator: Callable[..., Any] | None = None,
        auth_callback: Callable[[str, bytes, bytes], Any] | None = None,
        strip_received: bool = True,
    ) -> None:
        if isinstance(handler, type):
            raise HookError(
                f"HandlerAdapter needs a handler object, not the class {handler.__name__}; "
                f"pass {handler.__name__}()"
            )
        self.handler = handler
        self.name = name
        self._hostname = hostname
        self.ident = ident or f"mailgate {__version__}"
        self.decode_data = decode_data
        self.authenticator = authenticator
        # aiosmtpd ignores auth_callback when an authenticator is given.
        self.auth_callback = auth_callback if authenticator is None else None
        self.strip_received = strip_received
        self._told: set[str] = set()
        self._hooks: dict[str, Callable[..., Any]] = _hooks_of(handler)
        self._old_ehlo = _old_style_ehlo(self._hooks.get("EHLO"))
        self._auth_methods = _auth_methods_of(handler)

        hooks = self._hooks
        transaction = "MAIL" in hooks or "RCPT" in hooks
        hello = "HELO" in hooks or "EHLO" in hooks
        mechanisms = self._mechanisms()
        # Only the stages the handler needs: a stage without steps stays on mailgate's
        # fast path, and AUTH is offered only when something here can say yes.
        self.on_connect: StageMethod | None = self._connect if "PROXY" in hooks else None
        self.on_tls: StageMethod | None = self._tls if "STARTTLS" in hooks else None
        self.on_helo: StageMethod | None = self._helo if hello else None
        self.on_auth: StageMethod | None = self._auth if mechanisms else None
        self.on_mail: StageMethod | None = self._mail if transaction or hello else None
        self.on_rcpt: StageMethod | None = self._rcpt if transaction else None
        rcpt = "RCPT" in hooks
        self.on_data_start: StageMethod | None = self._data_start if rcpt else None
        delivers = "DATA" in hooks or callable(getattr(handler, "process_message", None))
        self.on_message: StageMethod | None = self._message if delivers else None
        # Always there: it drops the aiosmtpd envelope of an abandoned transaction (and
        # gives every adapter a stage, even for aiosmtpd's hook-less Sink).
        self.on_reset: StageMethod = self._reset
        self.auth_mechanisms: tuple[str, ...] = mechanisms

    def __repr__(self) -> str:
        return f"HandlerAdapter({type(self.handler).__name__}, name={self.name!r})"

    @cached_property
    def hostname(self) -> str:
        # socket.getfqdn() may ask DNS: only when a handler looks at it.
        return self._hostname or socket.getfqdn()

    def _mechanisms(self) -> tuple[str, ...]:
        for mechanism in self._auth_methods:
            if mechanism not in _REPLAYABLE:
                log.warning(
                    "aiosmtpd handler %s: AUTH %s is not offered: mailgate runs the SASL "
                    "exchange itself and can hand a handler only PLAIN and LOGIN",
                    type(self.handler).__name__,
                    mechanism,
                )
        if "AUTH" in self._hooks or self.authenticator or self.auth_callback:
            return _REPLAYABLE
        return tuple(m for m in _REPLAYABLE if m in self._auth_methods)

    # --- per-connection state ------------------------------------------------------------------

    def _state(self, session: MailgateSession) -> _State:
        """The aiosmtpd objects of this connection, brought up to date with mailgate's."""
        state = session.notes.get(self.name)
        tls = session.tls is not None
        if not isinstance(state, _State) or (tls and not state.tls):
            # A new connection, or STARTTLS done: aiosmtpd starts a new Session then.
            state = _State(session.id, Session(asyncio.get_running_loop()), Envelope(), tls)
            state.server = ServerView(self, state)
            session.notes[self.name] = state
        current = state.session
        current.peer = session.peer
        current.ssl = _ssl_info(session)
        current.extended_smtp = session.esmtp
        if not state.hello_hooked:
            # No HELO/EHLO hook: aiosmtpd's default records the client's name.
            current.host_name = session.helo
        if session.user is not None and not current.authenticated:
            # Authenticated by another plugin (or XCLIENT LOGIN).
            current.authenticated = True
            current.login_data = session.user.encode("utf-8", "surrogateescape")
        return state

    def _envelope(
        self, state: _State, session: MailgateSession, envelope: MailgateEnvelope
    ) -> Envelope:
        """The handler's envelope for mailgate's current transaction. When the adapter did
        not see its MAIL (no MAIL/RCPT hook, or an earlier plugin answered), it is what
        aiosmtpd's defaults would have built from mailgate's envelope."""
        if state.transaction == session.transactions:
            return state.envelope
        built = state.new_envelope()
        state.transaction = session.transactions
        sender = envelope.mail_from if envelope.mail_from is not None else Address("")
        built.mail_from = str(sender) or "<>"
        built.mail_options = _options(sender.params)
        built.smtp_utf8 = envelope.smtputf8
        for rcpt in envelope.rcpt_tos:
            built.rcpt_tos.append(str(rcpt))
            built.rcpt_options.extend(_options(rcpt.params))
        return built

    # --- calling the handler ----------------------------------------------------------------------

    async def _run(self, state: _State, func: Callable[..., Any], *args: Any) -> Any:
        """Call ``func`` (async or not); an exception goes to the handler's
        handle_exception when it has one, else on to mailgate (451 4.3.0, logged)."""
        try:
            result = func(*args)
            if inspect.isawaitable(result):
                result = await result
            return result
        except _NoMoreInput:
            raise
        except Exception as exc:
            handle_exception = self._hooks.get("exception")
            if handle_exception is None:
                raise
            log.warning(
                "session %s: aiosmtpd handler raised %s: %s; asking its handle_exception",
                state.sid,
                type(exc).__name__,
                exc,
                exc_info=True,
            )
            try:
                status = handle_exception(exc)
                if inspect.isawaitable(status):
                    status = await status
            except Exception:
                log.exception("session %s: aiosmtpd handle_exception failed", state.sid)
                return _LOCAL_ERROR
            return _LOCAL_ERROR if status is None else status

    async def _call(self, state: _State, hook: Callable[..., Any], *args: Any) -> Any:
        """``handle_X(server, session, envelope, *args)``; a None result with lines pushed
        through ``server.push()`` means those lines."""
        server = state.server
        server._pushed.clear()
        result = await self._run(state, hook, server, state.session, state.envelope, *args)
        if result is None and server._pushed:
            result = "\r\n".join(server._pushed)
        return result

    def _reply(self, state: _State, what: str, stage: str, status: Any) -> Reply:
        """A handler's status string as a Reply; anything else is a local error."""
        if isinstance(status, Reply):
            return status
        reply = parse_status(status, stage) if isinstance(status, str | bytes) else None
        if reply is None:
            log.error(
                "session %s: aiosmtpd %s returned %s, which is not an SMTP reply such as "
                "'250 OK'; answering 451",
                state.sid,
                what,
                _shown(status),
            )
            return _LOCAL_ERROR
        return reply

    def _tell_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._told:
            self._told.add(key)
            log.info(message, *args)

    # --- stages ------------------------------------------------------------------------------------

    async def _connect(self, session: MailgateSession) -> Reply | None:
        if not session.forwarded:
            return None  # aiosmtpd calls handle_PROXY only for a PROXY handshake
        state = self._state(session)
        data = _proxy_data(session)
        state.session.proxy_data = data
        answer = await self._call(state, self._hooks["PROXY"], data)
        if answer is MISSING or not answer or isinstance(answer, Reply):
            log.info("session %s: refused by the aiosmtpd handle_PROXY hook", session.id)
            return _PROXY_REFUSED
        return None

    async def _tls(self, session: MailgateSession) -> Reply | None:
        state = self._state(session)
        answer = await self._call(state, self._hooks["STARTTLS"])
        if answer is MISSING or (answer and not isinstance(answer, Reply)):
            return None
        return _TLS_REFUSED

    async def _helo(self, session: MailgateSession, hostname: str) -> Reply | None:
        state = self._state(session)
        state.hello_hooked = True
        state.new_envelope()
        # The server tells EHLO/LHLO from HELO in session.esmtp before the hooks run.
        extended = session.esmtp
        state.session.extended_smtp = extended
        hook = self._hooks.get("EHLO" if extended else "HELO")
        if hook is None:  # aiosmtpd's default for the verb the handler does not hook
            state.session.host_name = hostname
            return None
        if extended and not self._old_ehlo:
            planned = [f"250-{self.hostname}", "250 HELP"]
            answer = await self._call(state, hook, hostname, list(planned))
            if answer is MISSING:
                state.session.host_name = hostname
                return None
            if (
                isinstance(answer, list | tuple)
                and answer
                and all(isinstance(line, str) for line in answer)
            ):
                if [line[4:] for line in answer[1:]] != [line[4:] for line in planned[1:]]:
                    self._tell_once(
                        "ehlo",
                        "aiosmtpd handle_EHLO changed the EHLO capability lines; mailgate "
                        "sends the capabilities it implements (the first line is honoured)",
                    )
                answer = "\r\n".join(answer)
            reply = self._reply(state, "handle_EHLO", "helo", answer)
        else:
            answer = await self._call(state, hook, hostname)
            if answer is MISSING:
                state.session.host_name = hostname
                return None
            reply = self._reply(state, "handle_HELO", "helo", answer)
        if not reply.is_positive:
            return reply
        # The handler's greeting line is sent; the capabilities stay mailgate's own.
        return Reply(reply.code, None, reply.lines[:1])

    async def _auth(self, session: MailgateSession, attempt: AuthAttempt) -> Reply | None:
        mechanism = attempt.method.upper()
        if mechanism not in self.auth_mechanisms:
            return None  # CRAM-MD5, XOAUTH2: for other plugins to decide
        state = self._state(session)
        server = state.server
        login = attempt.username.encode("utf-8", "surrogateescape")
        password = (attempt.password or "").encode("utf-8", "surrogateescape")
        if mechanism == "PLAIN":
            authzid = (attempt.authzid or "").encode("utf-8", "surrogateescape")
            args = ["PLAIN", base64.b64encode(b"\0".join((authzid, login, password))).decode()]
            server._replay = deque()
        else:
            # No initial response: the handler asks for both, as clients may make it.
            args = ["LOGIN"]
            server._replay = deque((login, password))
        try:
            answer = MISSING
            if "AUTH" in self._hooks:
                answer = await self._call(state, self._hooks["AUTH"], args)
            identity: tuple[Any, Any] | None = None
            if answer is MISSING:
                server._pushed.clear()
                method = self._auth_methods.get(mechanism)
                if method is not None:
                    result = await self._run(state, method, server, args)
                else:
                    result = await self._run(
                        state, self._check, state, mechanism, LoginPassword(login, password)
                    )
                answer, identity = _auth_answer(result, server._pushed)
        except _NoMoreInput as exc:
            log.error("session %s: aiosmtpd AUTH %s: %s", session.id, mechanism, exc)
            return _AUTH_UNAVAILABLE
        finally:
            server._replay.clear()
        reply = self._reply(state, f"AUTH {mechanism}", "auth", answer)
        if reply.is_positive and identity is not None:
            current = state.session
            current.authenticated = True
            current.auth_data, current.login_data = identity
        return reply

    def _check(self, state: _State, mechanism: str, auth_data: Any) -> Any:
        """aiosmtpd's built-in credential check: the authenticator, else auth_callback,
        else refuse (aiosmtpd's login_always_fail)."""
        if self.authenticator is not None:
            server = state.server
            return self.authenticator(server, state.session, state.envelope, mechanism, auth_data)
        if self.auth_callback is not None:
            return _callback_result(self.auth_callback(mechanism, *auth_data), auth_data)
        return AuthCallbackResult(success=False, handled=False)

    async def _mail(
        self, session: MailgateSession, envelope: MailgateEnvelope, address: Address
    ) -> Reply | None:
        state = self._state(session)
        if state.hello_hooked and not state.session.host_name:
            return _NEED_HELO
        if self.on_rcpt is None:
            return None  # no MAIL/RCPT hook: the envelope is built at the message stage
        built = state.new_envelope()
        # session.transactions counts this one once it is accepted.
        state.transaction = session.transactions + 1
        built.smtp_utf8 = "SMTPUTF8" in address.params
        sender = str(address) or "<>"
        options = _options(address.params)
        hook = self._hooks.get("MAIL")
        if hook is not None:
            answer = await self._call(state, hook, sender, options)
            if answer is not MISSING:
                return self._reply(state, "handle_MAIL", "mail", answer)
        built.mail_from = sender
        built.mail_options.extend(options)
        return None

    async def _rcpt(
        self, session: MailgateSession, envelope: MailgateEnvelope, address: Address
    ) -> Reply | None:
        state = self._state(session)
        built = self._envelope(state, session, envelope)
        if not built.mail_from:
            return _NEED_MAIL  # handle_MAIL said yes without setting mail_from
        recipient = str(address)
        options = _options(address.params)
        hook = self._hooks.get("RCPT")
        if hook is not None:
            answer = await self._call(state, hook, recipient, options)
            if answer is not MISSING:
                return self._reply(state, "handle_RCPT", "rcpt", answer)
        built.rcpt_tos.append(recipient)
        built.rcpt_options.extend(options)
        return None

    async def _data_start(
        self, session: MailgateSession, envelope: MailgateEnvelope
    ) -> Reply | None:
        state = self._state(session)
        if not self._envelope(state, session, envelope).rcpt_tos:
            return _NEED_RCPT  # every handle_RCPT answer was 2xx, but none appended
        return None

    async def _message(
        self, session: MailgateSession, envelope: MailgateEnvelope, message: Message
    ) -> Reply | None:
        state = self._state(session)
        built = self._envelope(state, session, envelope)
        # Bounded already: the server refused anything above max_size.
        data = await message.read(limit=None)
        if self.strip_received:
            data = strip_own_received(data, message.id)
        built.original_content = data
        built.content = data.decode("utf-8", "surrogateescape") if self.decode_data else data
        try:
            hook = self._hooks.get("DATA")
            if hook is not None:
                answer = await self._call(state, hook)
                what = "handle_DATA"
            else:
                process = self.handler.process_message
                peer, rcpts = state.session.peer, built.rcpt_tos
                answer = await self._run(
                    state, process, peer, built.mail_from, rcpts, built.content
                )
                answer = MISSING if answer is None else answer
                what = "process_message"
        finally:
            state.new_envelope()  # aiosmtpd's post-DATA state
        if answer is MISSING:
            return None
        reply = self._reply(state, what, "message", answer)
        # 2xx: go on, so deliveries after the adapter still run; mailgate's 250 is sent.
        return None if reply.is_positive else reply

    async def _reset(self, session: MailgateSession, envelope: MailgateEnvelope) -> None:
        state = self._state(session)
        state.new_envelope()
        hook = self._hooks.get("RSET")
        if hook is not None:
            await self._call(state, hook)  # a notification: its reply is not sent


# --- helpers -----------------------------------------------------------------------------------


def _hooks_of(handler: Any) -> dict[str, Callable[..., Any]]:
    """``handle_X`` methods by X, found as aiosmtpd finds them (``dir()``)."""
    found: dict[str, Callable[..., Any]] = {}
    for name in dir(handler):
        if name.startswith("handle_"):
            method = getattr(handler, name, None)
            if callable(method):
                found[name[len("handle_") :]] = method
    return found


def _auth_methods_of(handler: Any) -> dict[str, Callable[..., Any]]:
    """``auth_MECHANISM`` methods by mechanism name (``__`` for ``-``, or the name given
    with aiosmtpd's ``@auth_mechanism``)."""
    found: dict[str, Callable[..., Any]] = {}
    for name in dir(handler):
        if name.startswith("auth_"):
            method = getattr(handler, name, None)
            if callable(method):
                mechanism = getattr(method, "__auth_mechanism_name__", None)
                found[(mechanism or name[len("auth_") :].replace("__", "-")).upper()] = method
    return found


def _old_style_ehlo(hook: Callable[..., Any] | None) -> bool:
    """aiosmtpd's deprecated 4-argument handle_EHLO returns one status, not a list."""
    if hook is None:
        return False
    try:
        parameters = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return False
    if len(parameters) not in (4, 5):
        raise HookError(
            f"handle_EHLO takes {len(parameters)} arguments; aiosmtpd's is "
            "handle_EHLO(server, session, envelope, hostname, responses)"
        )
    return len(parameters) == 4


def _auth_answer(result: Any, pushed: list[str]) -> tuple[Any, tuple[Any, Any] | None]:
    """An auth_* method's result as a status, and (auth_data, login_data) on success;
    aiosmtpd's smtp_AUTH rules, except that a failure always gets an answer."""
    if isinstance(result, Reply):  # from handle_exception or a local error
        return result, None
    fallback = "\r\n".join(pushed) if pushed else _AUTH_INVALID
    if hasattr(result, "success") and hasattr(result, "handled"):
        if result.success:
            data = result.auth_data
            return result.message or _AUTH_SUCCESS, (data, getattr(data, "login", None))
        if result.handled:
            return fallback, None  # aiosmtpd would send nothing: the method pushed it
        return result.message or _AUTH_INVALID, None
    if result is None:
        return fallback, None
    if result is MISSING or result is False:
        return _AUTH_INVALID, None
    return _AUTH_SUCCESS, (None, result)  # the pre-1.3 API: the result is the identity


def _callback_result(ok: Any, auth_data: Any) -> Any:
    if inspect.isawaitable(ok):

        async def later() -> Any:
            return _callback_result(await ok, auth_data)

        return later()
    if ok:
        return AuthCallbackResult(success=True, handled=True, auth_data=auth_data)
    return AuthCallbackResult(success=False, handled=False)


def _options(params: Mapping[str, str | None]) -> list[str]:
    """ESMTP parameters as aiosmtpd lists them: ``["SIZE=1234", "SMTPUTF8"]``."""
    return [
        (name if value is None else f"{name}={value}").upper() for name, value in params.items()
    ]


def _ssl_info(session: MailgateSession) -> dict[str, Any] | None:
    tls = session.tls
    if tls is None:
        return None
    return {
        "cipher": (tls.cipher, tls.version, tls.bits),
        "version": tls.version,
        "server_name": tls.server_name,
        "peercert": None,
    }


def _proxy_data(session: MailgateSession) -> ProxyData:
    source = _ip(session.peer_host)
    family = {4: 1, 6: 2}.get(getattr(source, "version", 0), 0)
    return ProxyData(
        src_addr=source,
        dst_addr=_ip(session.local_host),
        src_port=session.peer_port,
        dst_port=session.local_port,
        family=family,
    )


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return text


def _shown(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
