"""One client connection: an asyncio.Protocol that drives a protocol.ServerConnection.

The hot path stays synchronous: when no hook is registered for a stage, the policy point is
answered inline and every reply to a pipelined batch goes out in one ``transport.write``.
Only real work (hooks, fsync, TLS handshakes) leaves the callback for a task.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import ssl
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final

from mailgate.hooks import (
    Accept,
    Address,
    AuthAttempt,
    Envelope,
    HookError,
    Message,
    Outcome,
    PerRecipient,
    Reject,
    Session,
    TempFail,
    TLSInfo,
)
from mailgate.hooks.logs import LogLimiter
from mailgate.hooks.registry import INLINE, NOTHING
from mailgate.hooks.session import SpoolRewrite, address_from_wire
from mailgate.protocol import (
    NEED_DATA,
    PAUSED,
    AuthCredentials,
    ConnectionClosed,
    DataChunk,
    DataComplete,
    DataDiscarded,
    DataStart,
    Greeting,
    Hello,
    LimitExceeded,
    MailFrom,
    PolicyPoint,
    RcptTo,
    Reply,
    ServerConnection,
    StartTLS,
    State,
    TransactionReset,
    Verify,
    Xclient,
    Xforward,
)
from mailgate.protocol.proxy import ProxyError, ProxyHeader, parse_proxy_header
from mailgate.protocol.replies import (
    AUTH_FAILED,
    AUTH_OK,
    IDLE_TIMEOUT,
    RECIPIENT_OK,
    SENDER_OK,
    SHUTTING_DOWN,
    START_DATA,
)

from .host import ConnectionHost, SessionRecorder
from .logs import log_line
from .received import received_header, with_protocol
from .spool import SpoolFile
from .tls import SERVER_NAME_ATTRIBUTE

log = logging.getLogger("mailgate.session")

#: What a client can trigger over and over (failures of this server's own, on every message
#: or line) is logged a few times a minute per kind, with a count of what was held back.
_limited = LogLimiter(burst=5, interval=60.0)
#: Recipients named in a message's log line; the rest are counted.
_LOGGED_RECIPIENTS = 10
#: The level of the lines per message and per session (a module attribute read less).
_INFO: Final = logging.INFO
#: The line of a message (its arguments: _log_message).
_MESSAGE_LINE: Final = "session %s: message %s %s from=<%s> to=%s%s size=%d client=%s"

_STAGE_OF: dict[type[PolicyPoint], str] = {
    Greeting: "connect",
    Hello: "helo",
    AuthCredentials: "auth",
    MailFrom: "mail",
    RcptTo: "rcpt",
    Verify: "vrfy",
    DataStart: "data_start",
    DataComplete: "message",
}
_IN_TRANSACTION = frozenset({State.MAIL, State.RCPT, State.DATA, State.BDAT, State.BDAT_OPEN})
_LOCAL_ERROR = Reply(451, "4.3.0", ("Local error in processing, try again later",))
_AUTH_UNAVAILABLE = Reply(454, "4.7.0", ("Temporary authentication failure",))
_TLS_UNAVAILABLE = Reply(454, "4.7.0", ("TLS not available",))
#: The spool write failed (ENOSPC, EIO...): RFC 3463 4.3.1 is "mail system full".
_SPOOL_FAILED = Reply(452, "4.3.1", ("Insufficient system storage, try again later",))
_COMMAND_TIMEOUT = Reply(421, "4.4.2", ("Command not received in time, closing connection",))
_DATA_TOO_SLOW = Reply(421, "4.4.2", ("Message data received too slowly, closing connection",))
_SESSION_TOO_LONG = Reply(421, "4.4.2", ("Session too long, closing connection",))
_RECEIVING_DATA = frozenset({State.DATA, State.BDAT})
#: The same two, for the test on every command line: an Enum's hash is a Python-level call.
_DATA: Final = State.DATA
_BDAT: Final = State.BDAT
_CLOSED: Final = State.CLOSED
_STORAGE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Read no more while this much unparsed input waits for a slow hook.
_MAX_BUFFERED = 256 * 1024
_NO_ENVELOPE = Envelope()
#: (options, _longest_sleep() for them): asked at every connection and every timer check;
#: replaced whole.
_LONGEST_SLEEP: tuple[object, float] = (None, 0.0)


class ConnectionDriver(asyncio.Protocol):
    """One client connection: drives a sans-IO :class:`~mailgate.protocol.ServerConnection`
    from the bytes asyncio hands over, runs the hooks at its policy points through
    ``host`` (the server that accepted it, seen through :class:`~.host.ConnectionHost`)
    and writes the replies."""

    def __init__(
        self,
        host: ConnectionHost,
        *,
        implicit_tls: bool = False,
        expect_proxy: bool = False,
        submission: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.host = host
        #: The listener's factory passes its loop: ``host.loop`` asks asyncio for the
        #: running loop, once per connection otherwise.
        self.loop = host.loop if loop is None else loop
        self.implicit_tls = implicit_tls
        self.submission = submission
        self.expect_proxy = expect_proxy
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.session: Session | None = None
        self.envelope = _NO_ENVELOPE
        self.spool: SpoolFile | None = None
        self.message_id = ""
        self.peer_ip = ""
        self._admitted = False
        self._task: asyncio.Task[None] | None = None
        self._greeted = False
        self._proxy_buf = bytearray()
        self._read_paused = False
        self._write_paused = False
        self._closing = False  # graceful shutdown requested
        self._last_activity = 0.0
        #: Deadlines, in loop time (0.0: none running). One timer per connection checks
        #: them all (see _check_deadlines); data_received only records times.
        self._started_at = 0.0
        self._line_started = 0.0
        self._data_started = 0.0
        #: Bytes received in all (for min_data_rate) and when the message data began.
        self._bytes_in = 0
        self._data_base = 0
        #: An SMTPS handshake is running (before it, the connection has no SMTP session).
        self._handshaking = False
        self._lost = False
        #: The spool write failed during this message: the error, answered at its end.
        self._spool_error: OSError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._greeting_timer: asyncio.TimerHandle | None = None
        #: -v: log the conversation. Read once, so the hot path pays one attribute test.
        self._debug = log.isEnabledFor(logging.DEBUG)
        #: While a STARTTLS handshake runs: decrypted bytes that arrived early.
        self._tls_pending: bytearray | None = None
        #: A hook refused with disconnect=True: close after that reply.
        self._disconnect = False
        #: The transcript tap (read once); _tap_state: 0 not opened, 1 open, 2 closed.
        self.recorder: SessionRecorder | None = host.recorder
        self._tap_state = 0
        self._close_reason: str | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self._connection_made(transport)
        except Exception:
            self._internal_error("accepting the connection")

    def _connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it (not a
        # typing.cast: a Python-level call in the pure build, at every connection).
        stream: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = stream
        peer = stream.get_extra_info("peername") or ("", 0)
        local = stream.get_extra_info("sockname") or ("", 0)
        self.peer_ip = str(peer[0])
        # Counted before any TLS handshake: an SMTPS connection that never finishes its
        # handshake holds a slot of max_clients and of its address's max_clients_per_ip.
        refusal = self.host.admit(self)
        if refusal is not None:
            if self.implicit_tls:
                # No plaintext reply to a TLS client, and no handshake spent on a refusal.
                if self.recorder is not None:
                    self.session = self._new_session(peer, local)
                    self._note_close("refused")
                    self._record("opened")
                stream.abort()
            elif self.recorder is not None:  # scanners hitting the limits are recorded too
                self.session = self._new_session(peer, local)
                self._refuse(refusal, "refused")
            else:
                stream.write(refusal.render(False))
                stream.close()
            return
        self._admitted = True
        self.session = self._new_session(peer, local)
        self._last_activity = self._started_at = self.loop.time()
        if self._debug:
            log.debug(
                "session %s: connection from %s port %s%s",
                self.session.id,
                self.peer_ip,
                peer[1],
                " (implicit TLS)" if self.implicit_tls else "",
            )
        if self.implicit_tls:
            self._handshaking = True
            self._tls_pending = bytearray()
            self._arm_timer(None)
            # start_tls must put the TLS layer on the transport before connection_made
            # returns: uvloop starts reading then (pause_reading here does not stop it),
            # and a ClientHello read by this protocol would be lost to the handshake.
            self._task = _start_eagerly(self.loop, self._implicit_tls())
            return
        # _after_connect, written out for the plain connection (a call less per connection).
        if self.expect_proxy:
            self._arm_timer(self.host.options.proxy_timeout)
        else:
            self._start_session()  # arms the timer itself

    def _after_connect(self) -> None:
        """The connection is admitted (and for SMTPS, encrypted): wait for the PROXY
        header, or begin the SMTP session."""
        if self.expect_proxy:
            self._arm_timer(self.host.options.proxy_timeout)
        else:
            self._start_session()  # arms the timer itself

    def data_received(self, data: bytes) -> None:
        # The work inside the try, not in a method it calls: a call less for every read
        # (a try costs nothing until something is raised).
        try:
            now = self._last_activity = self.loop.time()
            self._bytes_in += len(data)
            if self._debug:
                log.debug("session %s: <<< %s", self._sid(), _shown(data))
            conn = self.conn
            if conn is None:
                if self._tls_pending is not None:
                    self._tls_pending += data  # decrypted before the SMTPS handshake returned
                elif self.expect_proxy and not self._greeted:
                    self._proxy_data(data)
                return
            if not self._greeted and self._refuses_early_talkers():
                # Bytes before our banner: a client that does not wait its turn (often spam).
                if self.recorder is not None:
                    self._record("received", data)
                self._refuse(self._outside("early_talker"), "early-talker")
                return
            if self._tls_pending is not None:
                # Decrypted bytes can arrive before start_tls() returns to us; they belong to the
                # new session, which begins once tls_established() has run.
                self._tls_pending += data
                return
            if not self._line_started:
                self._line_started = now  # _process clears it once no partial line is left
            conn.receive_data(data)
            if self._task is None:
                self._process()
            elif conn.buffered > _MAX_BUFFERED:
                self._pause_reading()
            if not self._data_started and ((state := conn.state) is _DATA or state is _BDAT):
                # The message data began: min_data_rate counts from here.
                self._data_started = now
                self._data_base = self._bytes_in
                options = self.host.options
                if options.min_data_rate:
                    # Have the timer fire by ``when``: re-armed only if it would be later.
                    when = now + options.data_rate_grace
                    timer = self._timer
                    if timer is None or timer.when() > when:
                        self._arm_timer(max(0.0, when - self.loop.time()))
        except Exception:
            self._internal_error("receiving data")

    def eof_received(self) -> bool | None:
        try:
            if self.conn is not None:
                self.conn.receive_data(b"")
                if self._task is None:
                    self._process()
        except Exception:
            self._internal_error("handling the client's close")
        return None

    def _internal_error(self, doing: str) -> None:
        """An exception reached the driver from a protocol callback: asyncio would only
        log it without the session, and the client would get no reply. Log it with the
        session id, tell the client, close."""
        # Every one is logged, with its session; the traceback a few times a minute (a
        # client that can trigger a bug again and again must not fill the disk with them).
        with_traceback, held = _limited.allow(("internal", doing))
        log.error(
            "session %s: internal error %s%s",
            self._sid(),
            doing,
            f" ({held} tracebacks of this kind left out)" if held else "",
            exc_info=with_traceback,
        )
        self._note_close("internal-error")
        conn = self.conn
        try:
            if conn is not None and conn.state is not State.CLOSED:
                conn.close(SHUTTING_DOWN)
                self._flush()
        except Exception:
            log.exception("session %s: cannot send the closing reply", self._sid())
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return  # called by _handshake already
        self._lost = True
        reason = self._close_reason or ("peer-closed" if exc is None else "connection-lost")
        admitted = self._admitted
        session = self.session
        if admitted and session is not None:
            tls = session.tls
            self.host.stats.session_ended(
                reason, tls.version if tls is not None else None, self._bytes_in
            )
            self._log_session(reason)
        if self.recorder is not None:
            self._record("closed", reason)
        timer = self._timer
        if timer is not None:
            timer.cancel()
        if self._greeting_timer is not None:
            self._greeting_timer.cancel()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        if self.spool is not None:
            self._drop_spool()
        if admitted:
            self._admitted = False
            self.host.release(self)  # and the close hooks of the session
        self.transport = None

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its commands too.
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._task is None:
            self._resume_reading()

    # --- session start -----------------------------------------------------------------------

    def _proxy_data(self, data: bytes) -> None:
        self._proxy_buf += data
        try:
            parsed = parse_proxy_header(self._proxy_buf)
        except ProxyError as exc:
            log.debug("session %s: bad PROXY header from %s: %s", self._sid(), self.peer_ip, exc)
            self._refuse(self._outside("proxy_refused"), "bad-proxy-header")
            return
        if parsed is None:
            return
        header, used = parsed
        rest = bytes(self._proxy_buf[used:])
        self._proxy_buf = bytearray()
        self._apply_proxy(header)
        if self.transport is None or self.transport.is_closing():
            return  # refused for the real client's address
        self._start_session()
        if rest and self.conn is not None:
            if not self._greeted and self._refuses_early_talkers():
                if self.recorder is not None:
                    self._record("received", rest)
                self._refuse(self._outside("early_talker"), "early-talker")
                return
            self.conn.receive_data(rest)
            self._process()

    def _apply_proxy(self, header: ProxyHeader) -> None:
        session = self.session
        assert session is not None
        if (
            header.command == "PROXY"
            and header.source_address
            and header.family in ("TCP4", "TCP6")
        ):
            session.peer_host = header.source_address
            session.peer_port = header.source_port or 0
            session.local_host = header.destination_address or session.local_host
            session.local_port = header.destination_port or session.local_port
            session.forwarded = True
            refusal = self.host.rebind_ip(self, header.source_address)
            self.peer_ip = header.source_address
            if refusal is not None:
                self.refuse(refusal)

    def _outside(self, name: str) -> Reply:
        """The server's own refusal ``name`` (sent outside the dialogue) in the persona's
        words."""
        return self.host.protocol_config.persona.outside_reply(
            name, hostname=self.host.options.hostname, client_ip=self.peer_ip
        )

    def _refuses_early_talkers(self) -> bool:
        """Whether bytes before the banner end the session (554). A persona whose product
        just reads them after its banner (``early_talkers = "greet"``) keeps them for the
        protocol, which answers them once the greeting is sent -- unless a greeting delay
        was asked for, whose point is to catch such clients."""
        if self.host.options.greeting_delay > 0:
            return True
        return self.host.protocol_config.persona.behaviour.early_talkers != "greet"

    def _start_session(self) -> None:
        session = self.session
        assert session is not None
        host = self.host
        options = host.options
        tapped = self.recorder is not None
        peer = session.peer_host
        conn = self.conn = ServerConnection(
            host.protocol_config,
            tls_active=self.implicit_tls,
            # Without trusted networks nobody is: not asked then (a call less per connection).
            peer_trusted=bool(options.trusted_networks) and host.is_trusted(peer),
            client_ip=peer,
            # Only with a recorder: without one, the protocol pays nothing for observing.
            on_line=self._line_received if tapped else None,
        )
        if tapped:
            self._record("opened")
        known = _LONGEST_SLEEP  # _longest_sleep() without the call, when known
        self._arm_timer(known[1] if known[0] is options else None)
        delay = options.greeting_delay
        if delay > 0:
            self._greeting_timer = self.loop.call_later(delay, self._process)
            return
        hooks = host.hooks
        if not hooks.has("connect") and not (self.implicit_tls and hooks.has("tls")):
            # Nothing to decide at connect (what _answer_inline does for the Greeting): the
            # banner, when the same for every connection, goes out without the event's
            # round trip through _process.
            banner = conn.greet()
            if banner is not None:
                self._greeted = True
                transport = self.transport
                assert transport is not None
                if self._debug:
                    log.debug("session %s: >>> %s", session.id, _shown(banner))
                transport.write(banner)
                if tapped:
                    self._record("sent", banner)
                return
        self._process()

    # --- the event loop of one connection ----------------------------------------------------

    def _process(self) -> None:
        conn = self.conn
        if conn is None:
            return
        while True:
            event = conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            cls = type(event)
            if cls is DataChunk:
                spool = self.spool
                if spool is not None:
                    try:
                        spool.write(event.data)  # type: ignore[attr-defined]
                    except OSError as exc:
                        self._spool_failed(exc)
                continue
            if cls is DataComplete:
                self._data_started = 0.0
                if self._spool_error is not None:
                    # The message could not be stored: no hook sees a partial file.
                    self._spool_error = None
                    self._log_message("failed (spool write)", event.size)  # type: ignore[attr-defined]
                    conn.respond(_SPOOL_FAILED)
                    self._after_message()
                    continue
            if isinstance(event, PolicyPoint):
                # One question to the hooks per policy point: does anything run, and may
                # it wait?
                stage = _STAGE_OF.get(type(event))
                mode = self.host.hooks.mode(stage) if stage is not None else NOTHING
                if mode == NOTHING:
                    if self._answer_inline(event):
                        continue
                elif mode == INLINE and (cls is RcptTo or cls is MailFrom):
                    self._answer_now(event)  # type: ignore[arg-type]
                    continue
                answer = self._answer(event)
                if self._runs_inline(event):
                    # The hooks cannot wait (checks on data at hand): run them here,
                    # and only what waits after all (a spool file being made) goes on
                    # in a task.
                    try:
                        yielded = answer.send(None)
                    except StopIteration:
                        continue
                    answer = _resume(answer, yielded)
                # Replies queued so far wait for this answer and leave in the same
                # write: the client already sent the commands they answer (RFC 2920
                # asks for a flush before waiting for input, not before our own work).
                task = self._task = self.loop.create_task(self._answer_async(answer))
                # A task cancelled before its first step never starts ``answer``:
                # closed here, it is not reported as never awaited.
                task.add_done_callback(functools.partial(_close_coroutine, answer))
                return
            if cls is ConnectionClosed:
                self._note_close(event.reason)  # type: ignore[attr-defined]
                self._flush()
                self._close_transport()
                return
            if cls is TransactionReset or cls is DataDiscarded:
                if cls is DataDiscarded:
                    self._log_message(
                        f"refused {event.reply.code} ({event.reason.value})",  # type: ignore[attr-defined]
                        self.spool.size if self.spool is not None else 0,
                    )
                self._drop_spool()
                self._spool_error = None
                self._data_started = 0.0
                envelope, self.envelope = self.envelope, _NO_ENVELOPE
                if envelope.mail_from is not None and self.host.hooks.has("reset"):
                    self._task = self.loop.create_task(self._notify_reset(envelope))
                    return
            elif cls is LimitExceeded and self._debug:
                log.debug("session %s: limit exceeded: %s", self._sid(), event.limit.value)  # type: ignore[attr-defined]
        if not conn.mid_line:
            self._line_started = 0.0
        # _flush written out (after every batch of command lines): a call less each time.
        transport = self.transport
        if transport is not None:
            out = conn.data_to_send()
            if out:
                if self._debug:
                    log.debug("session %s: >>> %s", self._sid(), _shown(out))
                transport.write(out)
                if self.recorder is not None:
                    self._record("sent", out)

    def _spool_failed(self, exc: OSError) -> None:
        """A write to the spool failed (disk full, I/O error): keep reading the message
        to its end, store none of it, answer 452 there. Logged once per message."""
        _limited.log(
            log,
            logging.ERROR,
            "spool-write",
            "session %s: cannot write message %s to the spool: %s",
            self._sid(),
            self.message_id,
            exc,
        )
        self._spool_error = exc
        self._drop_spool()

    def _answer_inline(self, point: PolicyPoint) -> bool:
        """Answer a policy point without awaiting, when no hook runs at its stage (the
        caller asked). Returns False when the answer needs a task (disk sync, TLS...)."""
        conn = self.conn
        assert conn is not None
        cls = type(point)
        if cls is Greeting:
            if self.implicit_tls and self.host.hooks.has("tls"):
                return False  # the tls stage of an SMTPS connection runs before connect
            self._greeted = True
            conn.respond(None)
        elif cls is Hello:
            self._note_hello(point)  # type: ignore[arg-type]
            conn.respond(None)
        elif cls is MailFrom:
            # _begin_transaction and Envelope.with_recipient below written out: a call less
            # at every MAIL and RCPT.
            self.envelope = Envelope(
                address_from_wire(point.address, point.params, point.written)  # type: ignore[attr-defined]
            )
            session = self.session
            assert session is not None
            session.transactions += 1
            conn.respond(None)
        elif cls is RcptTo:
            envelope = self.envelope
            self.envelope = Envelope(
                envelope.mail_from,
                (
                    *envelope.rcpt_tos,
                    address_from_wire(point.address, point.params, point.written),  # type: ignore[attr-defined]
                ),
            )
            conn.respond(None)
        elif cls is DataStart:
            if self.host.spooling:
                return False  # the spool file is created in a worker thread
            self.message_id = self.host.new_id()
            conn.respond(None)
        elif cls is DataComplete:
            host = self.host
            if host.spooling:
                return False  # fsync and delivery happen in a task
            session = self.session
            assert session is not None
            # _finish_message_count and _after_message written out (at every message).
            session.messages += 1
            host.message_accepted()
            self._log_message("accepted", point.size)  # type: ignore[attr-defined]
            conn.respond(None)
            self.envelope = _NO_ENVELOPE
            if self._closing:
                self._shutdown_now()
        elif cls is AuthCredentials:
            return False  # refused after the failure delay
        elif cls is StartTLS:
            if self.host.ssl_context is None:
                conn.respond(_TLS_UNAVAILABLE)
            else:
                return False
        elif cls in (Verify, Xforward):
            if cls is Xforward and self.session is not None:
                self.session.xforward = dict(point.attributes)  # type: ignore[attr-defined]
            conn.respond(None)
        elif cls is Xclient:
            self._apply_xclient(point.attributes)  # type: ignore[attr-defined]
            conn.respond(None)
        else:  # pragma: no cover - every policy point is handled above
            conn.respond(None)
        return True

    def _runs_inline(self, point: PolicyPoint) -> bool:
        """Whether the hooks answering ``point`` cannot wait (see Hooks.runs_inline)."""
        stage = _STAGE_OF.get(type(point))
        if stage is None:
            return False  # STARTTLS: the handshake waits
        hooks = self.host.hooks
        if not hooks.runs_inline(stage):
            return False
        return not (type(point) is Greeting and self.implicit_tls and not hooks.runs_inline("tls"))

    async def _answer_async(self, answer: Coroutine[Any, Any, None]) -> None:
        """The task that finishes answering a policy point, then reads on."""
        try:
            await answer
        finally:
            self._task = None
        if self.transport is None:
            return
        if not self._write_paused:
            self._resume_reading()
        self._process()

    async def _answer(self, point: PolicyPoint) -> None:
        """Answer ``point`` through the hooks (and the spool, the TLS handshake...)."""
        conn = self.conn
        session = self.session
        assert conn is not None and session is not None
        try:
            if isinstance(point, StartTLS):
                await self._starttls()
            else:
                began = self.loop.time()
                reply = await self._policy(point, session)
                self._send_verdict(_STAGE_OF.get(type(point)), reply, began)
                if isinstance(point, Greeting):
                    self._greeted = True
                elif isinstance(point, DataComplete):
                    self._after_message()
        except asyncio.CancelledError:
            raise
        except Exception:
            self._answer_failed(point)

    def _answer_now(self, point: MailFrom | RcptTo) -> None:
        """Answer MAIL or RCPT at once when the hooks of its stage cannot wait (relay
        control, the policy's checks on data at hand): the same decision as
        :meth:`_policy`, without a coroutine per command and per hook."""
        session = self.session
        assert session is not None
        hooks = self.host.hooks
        try:
            began = self.loop.time()
            address = address_from_wire(point.address, point.params, point.written)
            reply: Reply | None
            if type(point) is MailFrom:
                stage = "mail"
                outcome = hooks.run_now("mail", session, Envelope(address), address)
                if outcome is None:  # let through, the usual answer: no verdict to make
                    self._begin_transaction(point, address)
                    reply = None
                else:
                    reply = self._mail_verdict(point, address, outcome)
            else:
                stage = "rcpt"
                outcome = hooks.run_now("rcpt", session, self.envelope, address)
                if outcome is None:
                    envelope = self.envelope  # with_recipient, without the call
                    self.envelope = Envelope(envelope.mail_from, (*envelope.rcpt_tos, address))
                    reply = None
                else:
                    reply = self._rcpt_verdict(address, outcome)
            self._send_verdict(stage, reply, began)
        except Exception:
            self._answer_failed(point)

    def _send_verdict(
        self, stage: str | None, reply: Reply | list[Reply] | None, began: float
    ) -> None:
        """Time the stage, and send its reply unless the connection closed meanwhile."""
        if stage is not None:
            self.host.stats.stage_took(stage, self.loop.time() - began)
        conn = self.conn
        assert conn is not None
        if conn.state is not _CLOSED:
            conn.respond(reply)
            if self._disconnect:
                self._note_close("policy")
                conn.close(None)

    def _answer_failed(self, point: PolicyPoint) -> None:
        """A bug while answering ``point``: logged with the session, the client told to
        try again later (at the greeting: that the server is going away)."""
        log.exception("session %s: internal error answering %s", self._sid(), type(point).__name__)
        conn = self.conn
        if conn is not None and conn.state is not State.CLOSED:
            try:
                conn.respond(_LOCAL_ERROR if not isinstance(point, Greeting) else SHUTTING_DOWN)
            except Exception:  # the point may have been answered already
                conn.close(SHUTTING_DOWN)

    async def _policy(self, point: PolicyPoint, session: Session) -> Reply | list[Reply] | None:
        """Run the hooks for a policy point and turn their verdict into the reply."""
        hooks = self.host.hooks
        if isinstance(point, Greeting):
            # Accept(text=...) gives a banner with that text: a greeting is a 220, not a 250.
            banner = Reply(220, None, (f"{self.host.options.hostname} ESMTP",))
            if self.implicit_tls and hooks.has("tls"):
                # SMTPS: the handshake is over before the banner; the tls stage comes first.
                refused = self._verdict("tls", await hooks.run("tls", session), None)
                if refused is not None and not refused.is_positive:
                    return refused
            return self._verdict("connect", await hooks.run("connect", session), banner)
        if isinstance(point, Hello):
            # The hooks may want to know HELO from EHLO: say it now, undo it if refused.
            was_esmtp, session.esmtp = session.esmtp, point.verb != "HELO"
            reply = self._verdict("helo", await hooks.run("helo", session, point.domain), None)
            if reply is None or reply.is_positive:
                self._note_hello(point)
            else:
                session.esmtp = was_esmtp
            return reply
        if isinstance(point, MailFrom):
            address = address_from_wire(point.address, point.params, point.written)
            outcome = await hooks.run("mail", session, Envelope(address), address)
            return self._mail_verdict(point, address, outcome)
        if isinstance(point, RcptTo):
            address = address_from_wire(point.address, point.params, point.written)
            outcome = await hooks.run("rcpt", session, self.envelope, address)
            return self._rcpt_verdict(address, outcome)
        if isinstance(point, DataStart):
            outcome = await hooks.run("data_start", session, self.envelope)
            reply = self._verdict("data_start", outcome, START_DATA if not point.bdat else None)
            if reply is None or reply.is_positive:
                if self.host.spooling:
                    return await self._open_spool() or (None if point.bdat else reply)
                self.message_id = self.host.new_id()
            return reply
        if isinstance(point, DataComplete):
            return await self._complete_message(point, session)
        if isinstance(point, AuthCredentials):
            return await self._authenticate(point, session)
        if isinstance(point, Verify):
            # VRFY and EXPN: a step may answer for the user (None: the persona's reply).
            outcome = await hooks.run("vrfy", session, point.argument, point.expand)
            return self._verdict("vrfy", outcome, None)
        return None  # pragma: no cover

    def _mail_verdict(self, point: MailFrom, address: Address, outcome: Outcome) -> Reply | None:
        reply = self._verdict("mail", outcome, SENDER_OK)
        if reply is None or reply.is_positive:
            self._begin_transaction(point, address)
        return reply

    def _rcpt_verdict(self, address: Address, outcome: Outcome) -> Reply | None:
        reply = self._verdict("rcpt", outcome, RECIPIENT_OK)
        if reply is None or reply.is_positive:
            self.envelope = self.envelope.with_recipient(address)
        return reply

    def _verdict(self, stage: str, outcome: Outcome, success: Reply | None) -> Reply | None:
        """A chain's outcome as the reply to send (None: the protocol's default)."""
        if outcome is None:
            return None
        if isinstance(outcome, Accept):
            if outcome.code is None and outcome.text is None:
                return None  # the stage's usual success reply
            base = success or Reply(250, "2.0.0", ("OK",))
            code = outcome.code or base.code
            return Reply(
                code,
                # The enhanced code goes with the class: Accept(251, ...) at RCPT is 2.1.5 too.
                base.status if code // 100 == base.code // 100 else None,
                tuple(outcome.text.splitlines()) if outcome.text is not None else base.lines,
            )
        if isinstance(outcome, Reply):
            return outcome
        if isinstance(outcome, PerRecipient):
            raise HookError(f"{stage}: one answer per recipient is only for LMTP messages")
        if outcome.disconnect:
            self._disconnect = True
        return outcome.reply(stage)

    async def _authenticate(self, point: AuthCredentials, session: Session) -> Reply:
        hooks = self.host.hooks
        reply = AUTH_FAILED
        if hooks.has("auth"):
            attempt = AuthAttempt.from_credentials(point)
            outcome = await hooks.run("auth", session, attempt)
            # Every step passing without deciding is no authentication.
            if outcome is not None:
                reply = self._verdict("auth", outcome, AUTH_OK) or AUTH_OK
        if reply.is_positive:
            session.user = point.username
            session.auth_mechanism = point.mechanism
            self.host.stats.auth_successes += 1
            return reply
        self.host.stats.auth_failures += 1
        if reply.code == 535 or reply.code >= 500:
            # Each failure costs the client more time; the protocol layer hangs up after
            # max_auth_failures of them.
            session.auth_failures += 1
            delay = self.host.options.auth_failure_delay
            if delay > 0 and not self._disconnect:
                await asyncio.sleep(min(delay * 2 ** (session.auth_failures - 1), 30.0))
        return reply

    async def _complete_message(self, point: DataComplete, session: Session) -> Reply | list[Reply]:
        spool = self.spool
        if spool is not None:
            try:
                spool.flush()  # complete on disk for the hooks to read; fsync comes below
            except OSError as exc:
                self._spool_failed(exc)
                self._spool_error = None  # answered here, not at the next message's end
                self._log_message("failed (spool write)", point.size)
                return _SPOOL_FAILED
        envelope = self.envelope
        message = Message(
            id=self.message_id,
            session=session,
            envelope=envelope,
            size=point.size,
            path=spool.path if spool is not None else None,
            received_at=time.time(),
            _sync=self._sync_spool if spool is not None else None,
            _rewrite=self._rewrite_spool if spool is not None else None,
        )
        hooks = self.host.hooks
        try:
            # The promise behind a 250 is kept by the deliveries: each makes durable what
            # it keeps (Maildir fsyncs the spool it links, mbox its file, forwarding hands
            # it on). The spool file itself is removed below, so syncing it would buy
            # nothing.
            outcome = await hooks.run("message", session, envelope, message)
            accepted = self.host.protocol_config.persona.format(
                "message_queued", queue_id=self.message_id, hostname=self.host.options.hostname
            )
            if isinstance(outcome, PerRecipient) and self.host.options.lmtp:
                replies = self._per_recipient(outcome, envelope, accepted)
                delivered = any(r.is_positive for r in replies)
                reply: Reply | list[Reply] = replies
            else:
                single = self._verdict("message", outcome, accepted) or accepted
                delivered = single.is_positive
                reply = single
            if message.staged:
                # Two-phase deliveries: all of them keep the message, or none does.
                failed = await message.settle(delivered)
                if delivered and failed:
                    log.error(
                        "session %s: message %s: staged deliveries %s failed to commit "
                        "after the others kept it; answering 451, a retry may duplicate it "
                        "there",
                        session.id,
                        self.message_id,
                        ", ".join(failed),
                    )
                    delivered = False
                    # A commit that asked for a reply (a full disk: 452 4.3.1) gets it.
                    reply = message.commit_refusal or _LOCAL_ERROR
            spool = self.spool  # a hook that added a header replaced it
            if delivered and spool is not None and hooks.background_steps("message"):
                await self.host.deliver_later(message, spool)
        finally:
            message.abort_staged()  # not settled: an exception, or the client left
            self._drop_spool()
        if delivered:
            self._finish_message_count()
            self._log_message("accepted", point.size, envelope)
        else:
            first = reply[0] if isinstance(reply, list) else reply
            self._log_message(f"refused {first.code}", point.size, envelope)
        return reply

    def _sync_spool(self) -> None:
        # Whatever spool the message has now (a header may have been added since).
        spool = self.spool
        if spool is not None:
            spool.finish()

    async def _rewrite_spool(self, produce: SpoolRewrite) -> Path:
        """Message.prepend_header and remove_headers: a new spool file written by
        ``produce(old file, write)`` (in a worker thread), replacing the current one
        (removed once the copy is complete)."""
        old = self.spool
        assert old is not None
        directory = old.path.parent

        def copy() -> SpoolFile:
            new = SpoolFile(directory)
            try:
                with old.open_for_reading() as source:
                    produce(source, new.write)
                new.flush()
            except BaseException:
                new.discard()
                raise
            return new

        new = await self.loop.run_in_executor(None, copy)
        gone = self.spool is not old  # the connection went away meanwhile
        if gone:
            new.discard()
            raise asyncio.CancelledError
        self.spool = new
        old.discard()
        return new.path

    def _per_recipient(
        self, outcome: PerRecipient, envelope: Envelope, accepted: Reply
    ) -> list[Reply]:
        """LMTP: one reply per recipient from a hook's list (in order) or dict (by address)."""
        answers = outcome.answers
        rcpts = envelope.rcpt_tos
        if isinstance(answers, dict):
            by_address = {str(k).lower(): v for k, v in answers.items()}
            ordered = [by_address.get(str(r).lower()) for r in rcpts]
        else:
            ordered = list(answers)
            if len(ordered) != len(rcpts):
                raise HookError(
                    f"message hook gave {len(ordered)} answers for {len(rcpts)} recipients"
                )
        replies = []
        for rcpt, answer in zip(rcpts, ordered, strict=True):
            ok = Reply(250, "2.1.5", (f"<{rcpt}> {accepted.text}",))
            if isinstance(answer, Reject | TempFail):
                replies.append(answer.reply("message"))
            elif isinstance(answer, Reply):
                replies.append(answer)
            elif answer is False:
                replies.append(Reject().reply("message"))
            elif answer is None or answer is True:
                replies.append(ok)
            elif isinstance(answer, Accept):
                replies.append(self._verdict("message", answer, ok) or ok)
            else:
                raise HookError(
                    f"message hook answered {answer!r} for <{rcpt}>; give None, True/False, "
                    "Accept, Reject/TempFail or a Reply"
                )
        return replies

    def _after_message(self) -> None:
        self.envelope = _NO_ENVELOPE
        if self._closing:
            self._shutdown_now()

    def _finish_message_count(self) -> None:
        assert self.session is not None
        self.session.messages += 1
        self.host.message_accepted()

    # --- STARTTLS ----------------------------------------------------------------------------

    async def _starttls(self) -> None:
        conn = self.conn
        transport = self.transport
        context = self.host.ssl_context
        assert conn is not None and transport is not None and context is not None
        conn.respond(None)  # queues the 220 and drops anything pipelined after STARTTLS
        self._flush()
        self._tls_pending = bytearray()
        new_transport = await self._handshake(transport, context)
        if new_transport is None:
            return
        self.transport = new_transport
        conn.tls_established()
        early, self._tls_pending = self._tls_pending, None
        if early:
            conn.receive_data(bytes(early))
        assert self.session is not None
        self.session.tls = _tls_info(new_transport)
        self.session.helo = None
        self.session.user = None
        self.session.auth_mechanism = None
        if self.recorder is not None:
            self._record("tls")
        if self.host.hooks.has("tls"):
            await self._notify_tls()

    async def _implicit_tls(self) -> None:
        """SMTPS: the handshake, after admission (so it counts against the client limits)
        and within handshake_timeout; then the PROXY header or the session."""
        transport = self.transport
        context = self.host.ssl_context
        assert transport is not None and context is not None
        try:
            new_transport = await self._handshake(transport, context)
        finally:
            self._handshaking = False
            self._task = None
        if new_transport is None:
            return
        self.transport = new_transport
        assert self.session is not None
        self.session.tls = _tls_info(new_transport)
        early, self._tls_pending = self._tls_pending, None
        try:
            self._after_connect()
        except Exception:
            self._internal_error("starting the session")
            return
        if early:
            self.data_received(bytes(early))

    async def _handshake(
        self, transport: asyncio.Transport, context: ssl.SSLContext
    ) -> asyncio.Transport | None:
        """A server-side TLS handshake on ``transport``, never longer than the handshake
        or the idle timeout. None (the connection is closed) when it fails."""
        options = self.host.options
        timeout = min(options.handshake_timeout, options.idle_timeout)
        try:
            new_transport = await self.loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=timeout
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            self._tls_pending = None
            reason = f"no handshake in {timeout:g} s" if isinstance(exc, TimeoutError) else exc
            log.debug("session %s: TLS handshake failed: %s", self._sid(), reason)
            self._note_close("tls-timeout" if isinstance(exc, TimeoutError) else "tls-failed")
            if self.transport is not None:
                self.transport.abort()
            # asyncio tells the app protocol of a lost connection only after a finished
            # handshake: without this the slot and the per-IP count would never be freed.
            self.connection_lost(exc)
            return None
        if new_transport is None:  # pragma: no cover - closed during handshake
            self._tls_pending = None
            self.connection_lost(None)
            return None
        return new_transport

    # --- helpers -----------------------------------------------------------------------------

    def _note_hello(self, point: Hello) -> None:
        assert self.session is not None
        self.session.helo = point.domain
        self.session.esmtp = point.verb != "HELO"
        # The envelope of a transaction this ends stays until the protocol's
        # TransactionReset: the reset hooks are given it there.

    def _begin_transaction(self, point: MailFrom, address: Address | None = None) -> None:
        if address is None:
            address = address_from_wire(point.address, point.params, point.written)
        self.envelope = Envelope(address)
        assert self.session is not None
        self.session.transactions += 1

    async def _notify_reset(self, envelope: Envelope) -> None:
        assert self.session is not None
        try:
            await self.host.hooks.run("reset", self.session, envelope)
        finally:
            self._task = None
        if self.transport is not None:
            if not self._write_paused:
                self._resume_reading()
            self._process()

    async def _notify_tls(self) -> None:
        """The tls stage: after the handshake, before the client's next command."""
        session = self.session
        conn = self.conn
        assert session is not None and conn is not None
        reply = self._verdict("tls", await self.host.hooks.run("tls", session), None)
        if reply is not None and not reply.is_positive:
            conn.close(reply)

    def _apply_xclient(self, attributes: dict[str, str | None]) -> None:
        session = self.session
        assert session is not None
        if attributes.get("ADDR"):
            session.peer_host = str(attributes["ADDR"])
            session.forwarded = True
            if self.conn is not None:
                self.conn.client_ip = session.peer_host  # for a persona's {client_ip}
        if attributes.get("PORT"):
            session.peer_port = int(str(attributes["PORT"]))
        if "LOGIN" in attributes:
            session.user = attributes["LOGIN"]
        session.helo = attributes.get("HELO") or None

    async def _open_spool(self) -> Reply | None:
        """Create the spool file for a new message (in a worker thread: on a busy disk,
        creating a file waits for the journal) and write the trace header into it."""
        self.message_id = self.host.new_id()
        header = self._received() if self.host.options.received_header else b""
        pool = self.host.spool_pool
        ready = pool.take(self.loop) if pool is not None else None
        if ready is not None:
            # Made ahead in a worker thread; the header only fills its buffer.
            if header:
                ready.write(header)
            self.spool = ready
            return None
        directory = self.host.spool_dir

        def create() -> SpoolFile:
            spool = SpoolFile(directory)
            if header:
                spool.write(header)
            return spool

        future = self.loop.run_in_executor(None, create)
        try:
            spool = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The connection went away while the file was being made: remove it once made.
            future.add_done_callback(_discard_result)
            raise
        except OSError as exc:
            _limited.log(
                log,
                logging.ERROR,
                "spool-create",
                "session %s: cannot create spool file: %s",
                self._sid(),
                exc,
            )
            return _SPOOL_FAILED if exc.errno in _STORAGE_FULL else _LOCAL_ERROR
        if self.conn is None or self.transport is None:  # the client left meanwhile
            spool.discard()
            return None
        self.spool = spool
        return None

    def _received(self) -> bytes:
        session = self.session
        conn = self.conn
        assert session is not None and conn is not None
        tls = session.tls
        rcpts = self.envelope.rcpt_tos
        protocol = with_protocol(
            lmtp=self.host.options.lmtp,
            esmtp=session.esmtp,
            tls=tls is not None,
            auth=session.user is not None,
            utf8="SMTPUTF8" in self.envelope.mail_params,
        )
        return received_header(
            helo=session.helo,
            peer_host=None,
            peer_ip=session.peer_host,
            peer_port=session.peer_port,
            by_host=self.host.options.hostname,
            protocol=protocol,
            tls=f"{tls.version} {tls.cipher}" if tls is not None else None,
            queue_id=self.message_id,
            recipient=str(rcpts[0]) if len(rcpts) == 1 else None,
        )

    def _drop_spool(self) -> None:
        spool = self.spool
        if spool is not None:
            self.spool = None
            spool.discard()

    def _flush(self) -> None:
        conn = self.conn
        transport = self.transport
        if conn is None or transport is None:
            return
        out = conn.data_to_send()
        if out:
            if self._debug:
                log.debug("session %s: >>> %s", self._sid(), _shown(out))
            transport.write(out)
            if self.recorder is not None:
                self._record("sent", out)

    def refuse(self, reply: Reply, reason: str = "refused") -> None:
        """Send ``reply`` (outside the SMTP dialogue: a limit, a bad PROXY header) and close;
        ``reason`` is what the recorder is told."""
        self._refuse(reply, reason)

    def _refuse(self, reply: Reply, reason: str = "refused") -> None:
        transport = self.transport
        if transport is not None:
            data = reply.render(False)
            transport.write(data)
            self._note_close(reason)
            if self.recorder is not None:
                self._record("sent", data)
            self._close_transport()

    # --- the log: one line per session and per message ------------------------------------------

    def _log_message(self, outcome: str, size: int, envelope: Envelope | None = None) -> None:
        """The one INFO line of a message transaction (the end of its data: accepted,
        refused, discarded). Transactions that end before DATA (RSET, refused recipients)
        are counted in the session's line; their commands are logged at DEBUG."""
        self.host.stats.message_done(outcome, size)
        if not log.isEnabledFor(_INFO):
            return
        session = self.session
        assert session is not None
        envelope = envelope or self.envelope
        rcpts = envelope.rcpt_tos
        count = len(rcpts)
        sender = str(envelope.mail_from or "")  # Envelope.sender, without the property
        # _printable's test written out for the sender and a lone recipient (the usual
        # message, with addresses that need no escaping): no call for each.
        shown_sender = sender if len(sender) <= 256 and sender.isprintable() else _printable(sender)
        if count == 1:
            recipient = str(rcpts[0])
            shown = [recipient]
            if len(recipient) > 256 or not recipient.isprintable():
                recipient = _printable(recipient)
            to = f"<{recipient}>"
            more = ""
        else:
            shown = [str(r) for r in rcpts[:_LOGGED_RECIPIENTS]]
            to = ",".join(f"<{_printable(r)}>" for r in shown)
            more = f" (+{count - len(shown)})" if count > len(shown) else ""
        message_id = self.message_id or "-"
        log_line(
            log,
            _INFO,
            _MESSAGE_LINE,
            (session.id, message_id, outcome, shown_sender, to, more, size, session.peer_host),
            {
                "session": session.id,
                "client": session.peer_host,
                "helo": session.helo,
                "sender": sender,
                "recipients": shown,
                "rcpt_count": count,
                "size": size,
                "queue_id": self.message_id,
                "user": session.user,
                "outcome": outcome,
            },
            # _MESSAGE_LINE % the arguments above, made without the %-formatting.
            f"session {session.id}: message {message_id} {outcome} from=<{shown_sender}> "
            f"to={to}{more} size={size} client={session.peer_host}",
        )

    def _log_session(self, reason: str) -> None:
        """The one INFO line of a session, when it ends."""
        session = self.session
        assert session is not None
        if not log.isEnabledFor(logging.INFO):
            return
        duration = self.loop.time() - self._started_at if self._started_at else 0.0
        tls = session.tls.version if session.tls is not None else None
        helo = session.helo or "-"
        log_line(
            log,
            logging.INFO,
            "session %s: closed (%s) client=%s helo=%s tls=%s transactions=%d messages=%d "
            "duration=%.1fs",
            (
                session.id,
                reason,
                session.peer_host,
                # _printable's test written out: the usual name needs no escaping.
                helo if len(helo) <= 256 and helo.isprintable() else _printable(helo),
                tls or "no",
                session.transactions,
                session.messages,
                duration,
            ),
            {
                "session": session.id,
                "client": session.peer_host,
                "helo": session.helo,
                "tls": tls,
                "transactions": session.transactions,
                "messages": session.messages,
                "duration": round(duration, 3),
                "outcome": reason,
            },
        )

    # --- the transcript tap -------------------------------------------------------------------

    def _new_session(self, peer: Any, local: Any) -> Session:
        return Session(
            id=self.host.new_id(),
            peer_host=self.peer_ip,
            peer_port=int(peer[1]),
            local_host=str(local[0]),
            local_port=int(local[1]),
            lmtp=self.host.options.lmtp,
            submission=self.submission,
        )

    def _line_received(self, line: bytes) -> None:
        self._record("received", line)

    def _note_close(self, reason: str) -> None:
        """Why the connection ends, for the recorder: the first reason given wins."""
        if self._close_reason is None:
            self._close_reason = reason

    def _record(self, event: str, *args: Any) -> None:
        """Call ``recorder.<event>(session, *args)``: ``opened`` (with ``tls`` for SMTPS)
        first even when the connection never got that far, ``closed`` once, nothing after."""
        recorder, session = self.recorder, self.session
        if recorder is None or session is None or self._tap_state == 2:
            return
        try:
            if self._tap_state == 0:
                self._tap_state = 1
                recorder.opened(session)
                if session.tls is not None:
                    recorder.tls(session)
                if event == "opened":
                    return
            elif event == "opened":
                return
            if event == "closed":
                self._tap_state = 2
            getattr(recorder, event)(session, *args)
        except Exception:
            self.recorder = None
            log.exception("session %s: the session recorder failed; not recording it", session.id)

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.close()  # a no-op on a closing transport (asyncio's and uvloop's)

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def _sid(self) -> str:
        return self.session.id if self.session is not None else "-"

    # --- timeouts and shutdown -------------------------------------------------------------------

    def _arm_timer(self, timeout: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if timeout is None:
            timeout = self._longest_sleep()
        self._timer = self.loop.call_later(timeout, self._check_deadlines)

    def _longest_sleep(self) -> float:
        """How long the timer may sleep without a check: no deadline that could begin
        meanwhile (a command line, message data) is then missed by more than its length."""
        global _LONGEST_SLEEP
        options = self.host.options
        known = _LONGEST_SLEEP
        if known[0] is options:  # the options are frozen: computed once per (re)load
            return known[1]
        sleep = min(options.idle_timeout, options.data_timeout, options.command_timeout)
        if options.session_timeout:
            sleep = min(sleep, options.session_timeout)
        _LONGEST_SLEEP = (options, sleep)
        return sleep

    def _check_deadlines(self) -> None:
        try:
            self._check_deadlines_now()
        except Exception:
            self._internal_error("checking the time limits")

    def _check_deadlines_now(self) -> None:
        """The one timer of a connection: end it when a limit has passed (idle, message
        stall, command line, data rate, session length), else sleep until the earliest
        deadline. data_received only notes times, so a busy connection costs no timer
        operations per line."""
        self._timer = None
        if self.transport is None or self._handshaking:
            return  # the handshake has its own timeout; then the session arms the timer
        conn = self.conn
        if conn is None:  # still waiting for the PROXY header
            log.debug("session %s: no PROXY header in time from %s", self._sid(), self.peer_ip)
            self._refuse(self._outside("proxy_refused"), "proxy-timeout")
            return
        if self._task is not None:
            # Our own work (a slow hook, fsync, a STARTTLS handshake) is not the client's.
            self._arm_timer(None)
            return
        options = self.host.options
        now = self.loop.time()
        receiving = conn.state in _RECEIVING_DATA
        timeout = options.data_timeout if receiving else options.idle_timeout
        idle = now - self._last_activity
        next_check = now + self._longest_sleep()
        if idle >= timeout:
            log.debug("session %s: idle timeout after %.0f s", self._sid(), idle)
            self._expire("idle-timeout", IDLE_TIMEOUT)
            return
        next_check = min(next_check, self._last_activity + timeout)
        if options.session_timeout:
            ends = self._started_at + options.session_timeout
            if now >= ends:
                log.debug("session %s: longer than %g s", self._sid(), options.session_timeout)
                self._expire("session-timeout", _SESSION_TOO_LONG)
                return
            next_check = min(next_check, ends)
        if self._line_started and not receiving:
            ends = self._line_started + options.command_timeout
            if now >= ends:
                log.debug(
                    "session %s: no complete command line in %g s",
                    self._sid(),
                    options.command_timeout,
                )
                self._expire("command-timeout", _COMMAND_TIMEOUT)
                return
            next_check = min(next_check, ends)
        rate = options.min_data_rate
        if receiving and rate and self._data_started:
            received = self._bytes_in - self._data_base
            # The grace period is an allowance: the data must keep up with rate * (elapsed
            # - grace), so a slow start is forgiven and a drip is cut soon after it.
            due = self._data_started + options.data_rate_grace + received / rate
            if now >= due:
                log.debug(
                    "session %s: message data at %.0f bytes/s, below min_data_rate %d",
                    self._sid(),
                    received / max(now - self._data_started, 1e-3),
                    rate,
                )
                self._expire("data-too-slow", _DATA_TOO_SLOW)
                return
            next_check = min(next_check, due)
        self._timer = self.loop.call_at(next_check, self._check_deadlines)

    def _expire(self, reason: str, reply: Reply) -> None:
        """Close the session for a limit of time: ``reply`` (421) and hang up. Under a
        persona (honeypot mode) every time limit is its idle-timeout reply, in its words:
        a text of mailgate's own would give the disguise away."""
        conn = self.conn
        assert conn is not None
        self._note_close(reason)
        conn.close(reply if self.host.options.persona is None else IDLE_TIMEOUT)
        self._process()

    def begin_shutdown(self) -> None:
        """Graceful shutdown: close now if idle, else after the transaction in flight."""
        self._closing = True
        conn = self.conn
        if conn is None:
            self._note_close("shutdown")
            self._close_transport()
            return
        if conn.state in _IN_TRANSACTION or self._task is not None:
            return
        self._shutdown_now()

    def _shutdown_now(self) -> None:
        self._note_close("shutdown")
        conn = self.conn
        if conn is not None and conn.state is not State.CLOSED:
            conn.close(SHUTTING_DOWN)
            self._process()
        self._close_transport()

    def abort(self) -> None:
        """Close at once (shutdown timeout passed), telling the client why."""
        self._closing = True
        self._shutdown_now()


def _as_reply(result: Reply | Accept | Any | None, success: Reply | None) -> Reply | None:
    if result is None:
        return None
    if isinstance(result, Accept):
        if result.text is None or success is None:
            return success
        return Reply(success.code, success.status, (result.text,))
    assert isinstance(result, Reply)
    return result


def _start_eagerly(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Run ``coro`` up to its first wait now, in the caller, and the rest in a task (what
    Python 3.12's eager tasks do); None when it finished without waiting."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_resume(coro, yielded))


async def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Go on with a coroutine stepped by hand until it waited on ``yielded``: wait for that
    future as a task would, then resume the coroutine; a cancellation is passed into it."""
    try:
        while True:
            try:
                if yielded is None:  # a bare yield: give others a turn
                    await asyncio.sleep(0)
                else:
                    yielded._asyncio_future_blocking = False
                    await asyncio.wait((yielded,))
            except asyncio.CancelledError:
                if yielded is not None:
                    yielded.cancel()
                yielded = coro.throw(asyncio.CancelledError())
                continue
            yielded = coro.send(None)
    except StopIteration:
        return
    finally:
        coro.close()


def _close_coroutine(coro: Coroutine[Any, Any, None], _: asyncio.Future[None]) -> None:
    coro.close()


def _discard_result(future: asyncio.Future[SpoolFile]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().discard()


def _printable(text: str, limit: int = 256) -> str:
    """Client-given text for a log line: control characters escaped, cut at ``limit``."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _shown(data: bytes, limit: int = 300) -> str:
    """Bytes for a debug log line: escaped, cut at ``limit``."""
    text = repr(data[:limit])[2:-1]
    return text + (f"... ({len(data)} bytes)" if len(data) > limit else "")


def _tls_info(transport: asyncio.BaseTransport) -> TLSInfo | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return TLSInfo(
        version=ssl_object.version(),
        cipher=cipher[0] if cipher else None,
        server_name=getattr(ssl_object, SERVER_NAME_ATTRIBUTE, None),
        bits=cipher[2] if cipher else None,
        peer_certificate=ssl_object.getpeercert(binary_form=True) is not None,
    )
